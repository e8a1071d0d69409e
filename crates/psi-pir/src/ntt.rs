//! Number-theoretic transforms of spiral-rs's polynomials for the answer's
//! hot loops: bit for bit spiral-rs's `ntt_forward` and `ntt_inverse` (its
//! tables, the same lazy Harvey butterflies, results fully reduced), but on
//! 32-bit lanes (every value stays below `4m < 2^30`), which the compiler
//! vectorises, and in an AVX2 build chosen at run time on CPUs that have
//! it. spiral-rs has AVX2 kernels only in a build for an AVX2 CPU
//! (`-C target-cpu=...`); this makes the default build as fast.
//!
//! The one `unsafe` is the call of the AVX2 build after the CPU was seen to
//! support it (the module allows `unsafe_code` for that call alone).

#![allow(unsafe_code)]
// Fixed-size arithmetic (the ring is fixed, asserted on entry), run under
// the answer's `catch_unwind` besides.
#![allow(clippy::indexing_slicing)]

use spiral_rs::arith::barrett_coeff_u64;
use spiral_rs::params::Params;
use spiral_rs::poly::{PolyMatrix, PolyMatrixNTT, PolyMatrixRaw};

/// Coefficients of every polynomial (shape.rs fixes the ring).
const N: usize = 2048;

/// `out = NTT(inp)`, each raw coefficient (below q) first reduced modulo
/// each CRT modulus; spiral-rs's `to_ntt`.
pub(crate) fn to_ntt(out: &mut PolyMatrixNTT<'_>, inp: &PolyMatrixRaw<'_>) {
    transform_in(out, inp, true);
}

/// `out = NTT(inp)` for coefficients already below every modulus (gadget
/// digits); spiral-rs's `to_ntt_no_reduce`.
pub(crate) fn to_ntt_small(out: &mut PolyMatrixNTT<'_>, inp: &PolyMatrixRaw<'_>) {
    transform_in(out, inp, false);
}

fn transform_in(out: &mut PolyMatrixNTT<'_>, inp: &PolyMatrixRaw<'_>, reduce: bool) {
    let params = out.params;
    assert_eq!(params.poly_len, N);
    let mut lane = [0u32; N];
    for r in 0..out.rows {
        for c in 0..out.cols {
            let src = inp.get_poly(r, c);
            let dst = out.get_poly_mut(r, c);
            for (k, part) in dst.chunks_exact_mut(N).enumerate() {
                for (l, &x) in lane.iter_mut().zip(src) {
                    *l = if reduce {
                        barrett_coeff_u64(params, x, k) as u32
                    } else {
                        x as u32
                    };
                }
                forward(params, k, &mut lane);
                for (d, &l) in part.iter_mut().zip(&lane) {
                    *d = u64::from(l);
                }
            }
        }
    }
}

/// `out = NTT^-1(inp)`, the CRT residues composed into coefficients mod q
/// (spiral-rs's `from_ntt`); `out` may have fewer rows than `inp` (the
/// first ones are converted).
pub(crate) fn from_ntt(out: &mut PolyMatrixRaw<'_>, inp: &PolyMatrixNTT<'_>) {
    let params = out.params;
    assert_eq!(params.poly_len, N);
    let mut lanes = [[0u32; N]; 2];
    let mut words = vec![0u64; 2 * N];
    for r in 0..out.rows {
        for c in 0..out.cols {
            let src = inp.get_poly(r, c);
            for (k, lane) in lanes.iter_mut().enumerate().take(params.crt_count) {
                for (l, &x) in lane.iter_mut().zip(&src[k * N..]) {
                    *l = x as u32;
                }
                inverse(params, k, lane);
                for (w, &l) in words[k * N..].iter_mut().zip(lane.iter()) {
                    *w = u64::from(l);
                }
            }
            let dst = out.get_poly_mut(r, c);
            for (z, d) in dst.iter_mut().enumerate() {
                *d = params.crt_compose(&words, z);
            }
        }
    }
}

/// The forward transform of one residue polynomial, modulus `k`.
fn forward(params: &Params, k: usize, a: &mut [u32; N]) {
    let tables = (
        params.get_ntt_forward_table(k),
        params.get_ntt_forward_prime_table(k),
    );
    let m = params.moduli[k] as u32;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        unsafe { forward_avx2(a, tables, m) };
        return;
    }
    forward_lanes(a, tables, m);
}

/// The inverse transform of one residue polynomial, modulus `k`.
fn inverse(params: &Params, k: usize, a: &mut [u32; N]) {
    let tables = (
        params.get_ntt_inverse_table(k),
        params.get_ntt_inverse_prime_table(k),
    );
    let m = params.moduli[k] as u32;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        unsafe { inverse_avx2(a, tables, m) };
        return;
    }
    inverse_lanes(a, tables, m);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn forward_avx2(a: &mut [u32; N], tables: (&[u64], &[u64]), m: u32) {
    forward_lanes(a, tables, m);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn inverse_avx2(a: &mut [u32; N], tables: (&[u64], &[u64]), m: u32) {
    inverse_lanes(a, tables, m);
}

/// Cooley-Tukey with Harvey's lazy butterflies: inputs below `4m`, outputs
/// reduced to `[0, m)`. `w` are the root powers in bit-reversed order and
/// `w'` = `floor(w * 2^32 / m)`.
#[inline(always)]
fn forward_lanes(a: &mut [u32; N], (w, wp): (&[u64], &[u64]), m: u32) {
    let two_m = 2 * m;
    let mut groups = 1;
    let mut t = N / 2;
    while groups < N {
        for (i, chunk) in a.chunks_exact_mut(2 * t).enumerate() {
            let (wi, wpi) = (w[groups + i] as u32, wp[groups + i] as u32);
            let (xs, ys) = chunk.split_at_mut(t);
            for (x, y) in xs.iter_mut().zip(ys.iter_mut()) {
                let cx = if *x >= two_m { *x - two_m } else { *x };
                let q = ((u64::from(*y) * u64::from(wpi)) >> 32) as u32;
                let r = wi.wrapping_mul(*y).wrapping_sub(q.wrapping_mul(m));
                *x = cx + r;
                *y = cx + two_m - r;
            }
        }
        groups *= 2;
        t /= 2;
    }
    for x in a.iter_mut() {
        if *x >= two_m {
            *x -= two_m;
        }
        if *x >= m {
            *x -= m;
        }
    }
}

/// Gentleman-Sande with the halving folded into each stage (spiral-rs's
/// inverse tables hold `w / 2`): inputs below `m`, outputs in `[0, m)`.
#[inline(always)]
fn inverse_lanes(a: &mut [u32; N], (w, wp): (&[u64], &[u64]), m: u32) {
    let two_m = 2 * m;
    let mut h = N / 2;
    let mut t = 1;
    while h >= 1 {
        for (i, chunk) in a.chunks_exact_mut(2 * t).enumerate() {
            let (wi, wpi) = (w[h + i] as u32, wp[h + i] as u32);
            let (xs, ys) = chunk.split_at_mut(t);
            for (x, y) in xs.iter_mut().zip(ys.iter_mut()) {
                let (xv, yv) = (*x, *y);
                let s = two_m - yv + xv;
                let sum = xv + yv;
                let cx = if sum >= two_m { sum - two_m } else { sum };
                let q = ((u64::from(s) * u64::from(wpi)) >> 32) as u32;
                *x = (cx + if s & 1 == 1 { m } else { 0 }) >> 1;
                *y = wi.wrapping_mul(s).wrapping_sub(q.wrapping_mul(m));
            }
        }
        h /= 2;
        t *= 2;
    }
    for x in a.iter_mut() {
        if *x >= two_m {
            *x -= two_m;
        }
        if *x >= m {
            *x -= m;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Shape;
    use spiral_rs::poly::{from_ntt as spiral_from_ntt, to_ntt as spiral_to_ntt, to_ntt_no_reduce};

    fn params() -> &'static Params {
        Shape::for_registry(0, |_| 5).expect("shape").params()
    }

    fn random_raw(
        params: &'static Params,
        rows: usize,
        bound: u64,
        salt: u64,
    ) -> PolyMatrixRaw<'static> {
        let mut a = PolyMatrixRaw::zero(params, rows, 1);
        for (i, w) in a.data.as_mut_slice().iter_mut().enumerate() {
            *w = ((i as u64 + salt).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 7) % bound;
        }
        // The edges: 0 and bound - 1.
        a.data[0] = 0;
        a.data[1] = bound - 1;
        a
    }

    #[test]
    fn transforms_are_spiral_rs_bit_for_bit() {
        let params = params();
        let raw = random_raw(params, 2, params.modulus, 1);
        let mut ours = PolyMatrixNTT::zero(params, 2, 1);
        let mut theirs = PolyMatrixNTT::zero(params, 2, 1);
        to_ntt(&mut ours, &raw);
        spiral_to_ntt(&mut theirs, &raw);
        assert!(ours.as_slice() == theirs.as_slice());

        let digits = random_raw(params, 3, 256, 2);
        let mut ours = PolyMatrixNTT::zero(params, 3, 1);
        let mut theirs = PolyMatrixNTT::zero(params, 3, 1);
        to_ntt_small(&mut ours, &digits);
        to_ntt_no_reduce(&mut theirs, &digits);
        assert!(ours.as_slice() == theirs.as_slice());

        let mut back = PolyMatrixRaw::zero(params, 2, 1);
        let mut spiral_back = PolyMatrixRaw::zero(params, 2, 1);
        from_ntt(&mut back, &ours);
        spiral_from_ntt(&mut spiral_back, &theirs);
        assert!(back.as_slice() == spiral_back.as_slice());
        let mut round_trip = PolyMatrixRaw::zero(params, 2, 1);
        let mut ntt = PolyMatrixNTT::zero(params, 2, 1);
        to_ntt(&mut ntt, &raw);
        from_ntt(&mut round_trip, &ntt);
        assert!(round_trip.as_slice() == raw.as_slice());
    }

    #[test]
    fn the_portable_and_the_avx2_builds_agree() {
        let params = params();
        let raw = random_raw(params, 1, params.moduli[0], 3);
        let mut lane = [0u32; N];
        for (l, &x) in lane.iter_mut().zip(raw.as_slice()) {
            *l = x as u32;
        }
        let tables = (
            params.get_ntt_forward_table(0),
            params.get_ntt_forward_prime_table(0),
        );
        let inv = (
            params.get_ntt_inverse_table(0),
            params.get_ntt_inverse_prime_table(0),
        );
        let m = params.moduli[0] as u32;
        let mut portable = lane;
        forward_lanes(&mut portable, tables, m);
        let mut dispatched = lane;
        forward(params, 0, &mut dispatched);
        assert_eq!(portable, dispatched);
        inverse_lanes(&mut portable, inv, m);
        inverse(params, 0, &mut dispatched);
        assert_eq!(portable, dispatched);
        assert_eq!(portable, lane);
    }
}
