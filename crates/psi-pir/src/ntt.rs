//! Number-theoretic transforms of spiral-rs's polynomials for the answer:
//! bit for bit spiral-rs's `to_ntt` and `from_ntt`, on the kernels of
//! [`crate::kernels`] (32-bit lanes, AVX2 chosen at run time), straight
//! from small signed coefficients (no reduction mod q first) and with the
//! CRT composition in 64-bit arithmetic.

// Fixed-size arithmetic (the ring is fixed, asserted on entry), run under
// the answer's `catch_unwind` besides.
#![allow(clippy::indexing_slicing)]

use spiral_rs::arith::{barrett_coeff_u64, exponentiate_uint_mod};
use spiral_rs::params::Params;
use spiral_rs::poly::{PolyMatrix, PolyMatrixNTT, PolyMatrixRaw};

use crate::kernels::{self, N};

/// `out = NTT(c)` for a polynomial of small signed coefficients `c`
/// (`|c| < m` for every modulus: gadget digits, centred plaintext bytes),
/// `out` holding every CRT component. The same words as spiral-rs's
/// `to_ntt` of the coefficients written mod q.
pub(crate) fn forward_signed(params: &Params, out: &mut [u64], coeffs: &[i32]) {
    assert!(params.poly_len == N && coeffs.len() == N && out.len() == params.crt_count * N);
    let mut lane = [0u32; N];
    for (k, part) in out.chunks_exact_mut(N).enumerate() {
        let m = params.moduli[k] as i64;
        for (l, &c) in lane.iter_mut().zip(coeffs) {
            let c = i64::from(c);
            *l = (if c < 0 { m + c } else { c }) as u32;
        }
        forward(params, k, &mut lane);
        for (d, &l) in part.iter_mut().zip(&lane) {
            *d = u64::from(l);
        }
    }
}

/// `out = NTT^-1(inp)`, the two CRT residues composed into coefficients
/// mod q (Garner: `a0 + m0 * ((a1 - a0) / m0 mod m1)`), spiral-rs's
/// `from_ntt` word for word; `out` may have fewer rows than `inp` (the
/// first ones are converted).
pub(crate) fn from_ntt(out: &mut PolyMatrixRaw<'_>, inp: &PolyMatrixNTT<'_>) {
    let params = out.params;
    assert!(params.poly_len == N && params.crt_count == 2);
    let (m0, m1) = (params.moduli[0], params.moduli[1]);
    let inv = exponentiate_uint_mod(m0 % m1, m1 - 2, m1);
    let mut lanes = [[0u32; N]; 2];
    for r in 0..out.rows {
        for c in 0..out.cols {
            let src = inp.get_poly(r, c);
            for (k, (lane, part)) in lanes.iter_mut().zip(src.chunks_exact(N)).enumerate() {
                for (l, &x) in lane.iter_mut().zip(part) {
                    *l = x as u32;
                }
                inverse(params, k, lane);
            }
            let dst = out.get_poly_mut(r, c);
            for ((d, &a0), &a1) in dst.iter_mut().zip(&lanes[0]).zip(&lanes[1]) {
                let (a0, a1) = (u64::from(a0), u64::from(a1));
                let a0_1 = if a0 >= m1 { a0 - m1 } else { a0 };
                let diff = if a1 >= a0_1 {
                    a1 - a0_1
                } else {
                    a1 + m1 - a0_1
                };
                *d = a0 + m0 * barrett_coeff_u64(params, diff * inv, 1);
            }
        }
    }
}

/// The forward transform of one residue polynomial, modulus `k`.
fn forward(params: &Params, k: usize, a: &mut [u32; N]) {
    let (w, wp) = (
        params.get_ntt_forward_table(k),
        params.get_ntt_forward_prime_table(k),
    );
    kernels::forward(a, w, wp, params.moduli[k] as u32);
}

/// The inverse transform of one residue polynomial, modulus `k`.
fn inverse(params: &Params, k: usize, a: &mut [u32; N]) {
    let (w, wp) = (
        params.get_ntt_inverse_table(k),
        params.get_ntt_inverse_prime_table(k),
    );
    kernels::inverse(a, w, wp, params.moduli[k] as u32);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Shape;
    use spiral_rs::poly::{from_ntt as spiral_from_ntt, to_ntt as spiral_to_ntt};

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
        let q = params.modulus;
        let mut signed = vec![0i32; N];
        let mut raw = PolyMatrixRaw::zero(params, 1, 1);
        for (i, (s, r)) in signed.iter_mut().zip(raw.data.as_mut_slice()).enumerate() {
            *s = ((i as i64 * 7919) % 513 - 256) as i32;
            *r = if *s < 0 {
                q - u64::from(s.unsigned_abs())
            } else {
                *s as u64
            };
        }
        let mut ours = PolyMatrixNTT::zero(params, 1, 1);
        forward_signed(params, ours.as_mut_slice(), &signed);
        let mut theirs = PolyMatrixNTT::zero(params, 1, 1);
        spiral_to_ntt(&mut theirs, &raw);
        assert!(ours.as_slice() == theirs.as_slice());

        // Inverse: any reduced NTT words, and the round trip.
        let any = random_raw(params, 2, q, 1);
        let mut ntt = PolyMatrixNTT::zero(params, 2, 1);
        spiral_to_ntt(&mut ntt, &any);
        let mut back = PolyMatrixRaw::zero(params, 2, 1);
        let mut spiral_back = PolyMatrixRaw::zero(params, 2, 1);
        from_ntt(&mut back, &ntt);
        spiral_from_ntt(&mut spiral_back, &ntt);
        assert!(back.as_slice() == spiral_back.as_slice());
        assert!(back.as_slice() == any.as_slice());
        let mut first_row = PolyMatrixRaw::zero(params, 1, 1);
        from_ntt(&mut first_row, &ntt);
        assert!(first_row.as_slice() == any.get_poly(0, 0));
    }
}
