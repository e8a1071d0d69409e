//! The operator's evaluation of one query: Spiral's answer (expand the
//! query, a pass over the database for the first dimension, fold the
//! others, pack each instance), built on spiral-rs's types, transforms and
//! packing, with less work than spiral-rs's `process_query`:
//!
//! - **Expansion** computes only the ciphertexts the later steps read,
//!   applies each round's automorphism to the second row in the NTT domain
//!   (there it only permutes the evaluation points) instead of two inverse
//!   and two forward transforms, and sums the key-switching products before
//!   one reduction per coefficient. Its output is spiral-rs's
//!   `expand_query`'s, bit for bit (tested).
//! - **First dimension**: 64-bit sums (128 products of 28-bit residues stay
//!   below 2^63) instead of 128-bit sums and remainders.
//! - **Folding** keeps the ciphertexts in the NTT domain and selects with
//!   one product, `c0 + C * G^-1(c1 - c0)` with balanced digits, where
//!   spiral-rs computes `(G - C) * G^-1(c0) + C * G^-1(c1)`: half the
//!   transforms, and no more noise (one decomposition with digits in
//!   `[-B/2, B/2)` has half the variance of the difference of two with
//!   digits in `[0, B)`; docs/PROTOCOL.md, "PIR mode").
//!
//! Work runs on rayon's pool: each expansion round's ciphertexts, then the
//! `instances * n^2` passes over the database, then the packing.

// Arithmetic over buffers whose sizes follow from the shape, checked once
// at the top of `answer` (peer bytes were checked before: lengths and
// coefficients); the whole evaluation runs under `catch_unwind` besides.
#![allow(clippy::indexing_slicing)]

use std::collections::HashMap;
use std::sync::OnceLock;

use rayon::prelude::*;
use spiral_rs::aligned_memory::AlignedMemory64;
use spiral_rs::arith::{barrett_coeff_u64, exponentiate_uint_mod};
use spiral_rs::client::PublicParameters;
use spiral_rs::gadget::get_bits_per;
use spiral_rs::params::Params;
use spiral_rs::poly::{automorph, scalar_multiply, PolyMatrix, PolyMatrixNTT, PolyMatrixRaw};
use spiral_rs::server::{encode, pack, regev_to_gsw};
use spiral_rs::util::reorient_reg_ciphertexts;

use crate::error::{Error, Result};
use crate::kernels::{first_dimension_sums, multiply_add};
use crate::ntt::{forward_signed, from_ntt};

/// Most first-dimension ciphertexts a 64-bit sum can take: products of two
/// residues below 2^28 are below 2^56, and 128 of them below 2^63.
const MAX_FIRST_DIMENSION: usize = 128;

/// The answer to the (deserialised) query ciphertext `query` under the
/// client's `public` parameters, over the database words `db` laid out as
/// spiral-rs reads them: an answer the client decodes exactly as one from
/// spiral-rs's `process_query`. The work is the same for every query of
/// the shape.
///
/// # Errors
/// [`Error::Scheme`] for parameters this module does not serve (no folding
/// dimension, a first dimension above 128), public parameters without
/// expansion keys or a database of the wrong length.
pub(crate) fn answer(
    params: &'static Params,
    public: &PublicParameters<'static>,
    query: &PolyMatrixRaw<'static>,
    db: &[u64],
) -> Result<Vec<u8>> {
    let dim0 = 1usize << params.db_dim_1;
    let num_per = 1usize << params.db_dim_2;
    let per_poly = params.n * params.n;
    let slice = dim0 * num_per * params.poly_len;
    if params.db_dim_2 == 0
        || dim0 > MAX_FIRST_DIMENSION
        || db.len() != params.instances * per_poly * slice
    {
        return Err(Error::Scheme);
    }
    let (Some(left), Some(right), Some(conversion)) = (
        public.v_expansion_left.as_ref(),
        public.v_expansion_right.as_ref(),
        public.v_conversion.as_ref().and_then(|v| v.first()),
    ) else {
        return Err(Error::Scheme);
    };

    let (first, selectors) = expand(params, [left, right], conversion, query);
    let selected: Vec<PolyMatrixRaw<'static>> = db
        .par_chunks_exact(slice)
        .map(|part| {
            let mut cts = first_dimension(params, part, first.as_slice(), dim0, num_per);
            fold(params, &mut cts, &selectors);
            let mut raw = PolyMatrixRaw::zero(params, 2, 1);
            from_ntt(&mut raw, &cts[0]);
            raw
        })
        .collect();
    let mut selected = selected.into_iter();
    let groups: Vec<Vec<PolyMatrixRaw<'static>>> = (0..params.instances)
        .map(|_| selected.by_ref().take(per_poly).collect())
        .collect();
    let packed: Vec<PolyMatrixRaw<'static>> = groups
        .par_iter()
        .map(|cts| pack(params, cts, &public.v_packing).raw())
        .collect();
    Ok(encode(params, &packed))
}

/// Expands the query into the first dimension's ciphertexts (reoriented for
/// the database pass) and one GSW selector per folding dimension.
/// `keys` are the left (first-dimension) and right (GSW-bound) expansion
/// keys, `conversion` the Regev-to-GSW key.
fn expand(
    params: &'static Params,
    [left, right]: [&Vec<PolyMatrixNTT<'static>>; 2],
    conversion: &PolyMatrixNTT<'static>,
    query: &PolyMatrixRaw<'static>,
) -> (AlignedMemory64, Vec<PolyMatrixNTT<'static>>) {
    let dim0 = 1usize << params.db_dim_1;
    let gsw_inputs = params.t_gsw * params.db_dim_2;
    let rounds = params.g();
    let stop = params.stop_round();
    let neg1 = params.get_v_neg1();
    let turns = automorphisms(params);
    let needed = needed_positions(dim0, gsw_inputs, rounds);

    let mut v: Vec<PolyMatrixNTT<'static>> = (0..1usize << rounds)
        .map(|_| PolyMatrixNTT::zero(params, 2, 1))
        .collect();
    v[0] = query.ntt();
    for (r, need) in needed.iter().enumerate() {
        let half = 1usize << r;
        // Round r doubles the ciphertexts: the upper half is the lower half
        // times -x^(-2^r), then every ciphertext adds its own image under
        // x -> x^(n/2^r + 1). After the stop round the GSW-bound (odd)
        // positions are final.
        let (lower, upper) = v[..2 * half].split_at_mut(half);
        upper
            .par_iter_mut()
            .zip(lower.par_iter())
            .enumerate()
            .filter(|(i, _)| need[half + i])
            .for_each(|(_, (dst, src))| scalar_multiply(dst, &neg1[r], src));
        let t = params.poly_len / half + 1;
        v[..2 * half]
            .par_iter_mut()
            .enumerate()
            .filter(|(p, _)| need[*p] && !(r > stop && p % 2 == 1))
            .for_each_init(
                || Scratch::new(params),
                |scratch, (p, ct)| {
                    let keys = if r != 0 && p % 2 == 0 { left } else { right };
                    expansion_step(params, ct, &keys[r], t, &turns[r], scratch);
                },
            );
    }

    let regular: Vec<PolyMatrixNTT<'static>> = (0..dim0).map(|i| v[2 * i].clone()).collect();
    let mut first = AlignedMemory64::new(dim0 * 2 * params.poly_len);
    reorient_reg_ciphertexts(params, first.as_mut_slice(), &regular);
    let gsw: Vec<PolyMatrixNTT<'static>> = (0..gsw_inputs).map(|i| v[2 * i + 1].clone()).collect();
    let mut selectors: Vec<PolyMatrixNTT<'static>> = (0..params.db_dim_2)
        .map(|_| PolyMatrixNTT::zero(params, 2, 2 * params.t_gsw))
        .collect();
    regev_to_gsw(&mut selectors, &gsw, conversion, params, 1, 0);
    (first, selectors)
}

/// For each expansion round, which of its output positions a later step
/// reads: the first dimension's at the even positions `2i`, the GSW inputs'
/// at the odd positions `2i + 1`, and whatever those derive from (position
/// `p` of round `r` derives from position `p mod 2^r` of round `r - 1`).
fn needed_positions(dim0: usize, gsw_inputs: usize, rounds: usize) -> Vec<Vec<bool>> {
    let mut need = vec![false; 1 << rounds];
    for i in 0..dim0 {
        need[2 * i] = true;
    }
    for i in 0..gsw_inputs {
        need[2 * i + 1] = true;
    }
    let mut out = vec![Vec::new(); rounds];
    for r in (0..rounds).rev() {
        let half = 1usize << r;
        let mut before = vec![false; half];
        for (p, &n) in need.iter().enumerate() {
            if n {
                before[p % half] = true;
            }
        }
        out[r] = std::mem::replace(&mut need, before);
    }
    out
}

/// Buffers one thread reuses across expansion steps.
struct Scratch {
    row: PolyMatrixRaw<'static>,
    turned: PolyMatrixRaw<'static>,
    turned_second: Vec<u64>,
    digit: Vec<i32>,
    digits: Vec<PolyMatrixNTT<'static>>,
}

impl Scratch {
    fn new(params: &'static Params) -> Self {
        Self {
            row: PolyMatrixRaw::zero(params, 1, 1),
            turned: PolyMatrixRaw::zero(params, 1, 1),
            turned_second: vec![0; params.crt_count * params.poly_len],
            digit: vec![0; params.poly_len],
            digits: Vec::new(),
        }
    }
}

/// One ciphertext of one expansion round: `ct += W * G^-1(tau(ct_0)) +
/// (0, tau(ct_1))`, with `tau` the round's automorphism and `W` its
/// key-switching matrix; spiral-rs's step, exactly.
fn expansion_step(
    params: &'static Params,
    ct: &mut PolyMatrixNTT<'static>,
    keys: &PolyMatrixNTT<'static>,
    t: usize,
    turn: &[Vec<u32>],
    scratch: &mut Scratch,
) {
    let n = params.poly_len;
    let rows = keys.cols;
    // The first row, raw, turned and decomposed (a 1x1 target reads only
    // the first row of `ct`).
    from_ntt(&mut scratch.row, ct);
    automorph(&mut scratch.turned, &scratch.row, t);
    let at = match scratch.digits.iter().position(|d| d.rows == rows) {
        Some(at) => at,
        None => {
            scratch.digits.push(PolyMatrixNTT::zero(params, rows, 1));
            scratch.digits.len() - 1
        }
    };
    let digits = &mut scratch.digits[at];
    // G^-1 as spiral-rs's `gadget_invert`: digit k is bits [k b, (k + 1) b).
    let bits = get_bits_per(params, rows);
    let mask = (1u64 << bits) - 1;
    for k in 0..rows {
        let shift = (k * bits).min(64) as u32;
        for (d, &x) in scratch.digit.iter_mut().zip(scratch.turned.as_slice()) {
            *d = (x.checked_shr(shift).unwrap_or(0) & mask) as i32;
        }
        forward_signed(params, digits.get_poly_mut(k, 0), &scratch.digit);
    }
    // The second row turned in the NTT domain: a permutation per modulus.
    let second = ct.get_poly(1, 0);
    for (c, order) in turn.iter().enumerate() {
        let from = &second[c * n..(c + 1) * n];
        for (out, &j) in scratch.turned_second[c * n..(c + 1) * n]
            .iter_mut()
            .zip(order)
        {
            *out = from[j as usize];
        }
    }
    for row in 0..2 {
        let out = ct.get_poly_mut(row, 0);
        if row == 1 {
            for (o, &s) in out.iter_mut().zip(&scratch.turned_second) {
                *o += s;
            }
        }
        for k in 0..rows {
            multiply_add(out, keys.get_poly(row, k), digits.get_poly(k, 0));
        }
        reduce(params, out);
    }
}

/// Where each evaluation of `tau(a)` comes from in the NTT of `a`, for the
/// automorphism `x -> x^(n/2^r + 1)` of each round `r`, per CRT modulus.
/// Every shape has the same ring (shape.rs), so one table serves all.
fn automorphisms(params: &Params) -> &'static [Vec<Vec<u32>>] {
    static TABLE: OnceLock<Vec<Vec<Vec<u32>>>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let n = params.poly_len;
        // The NTT of x: the evaluation points themselves.
        let mut x = PolyMatrixRaw::zero(params, 1, 1);
        x.data[1] = 1;
        let points = x.ntt();
        (0..params.poly_len_log2)
            .map(|r| {
                let t = (n / (1 << r) + 1) as u64;
                (0..params.crt_count)
                    .map(|c| {
                        let m = params.moduli[c];
                        let ev = &points.data.as_slice()[c * n..(c + 1) * n];
                        let at: HashMap<u64, u32> =
                            (0u32..).zip(ev).map(|(j, &e)| (e, j)).collect();
                        ev.iter()
                            .map(|&e| at[&exponentiate_uint_mod(e, t, m)])
                            .collect()
                    })
                    .collect()
            })
            .collect()
    })
}

/// Reduces one NTT-domain polynomial (all its CRT components) in place.
fn reduce(params: &Params, poly: &mut [u64]) {
    for (c, part) in poly.chunks_exact_mut(params.poly_len).enumerate() {
        for w in part {
            *w = barrett_coeff_u64(params, *w, c);
        }
    }
}

/// The first dimension for one (instance, polynomial) slice of the
/// database: `num_per` ciphertexts, each the sum over `dim0` items of a
/// query ciphertext times the item's polynomial.
fn first_dimension(
    params: &'static Params,
    db: &[u64],
    query: &[u64],
    dim0: usize,
    num_per: usize,
) -> Vec<PolyMatrixNTT<'static>> {
    let n = params.poly_len;
    let mut out: Vec<PolyMatrixNTT<'static>> = (0..num_per)
        .map(|_| PolyMatrixNTT::zero(params, 2, 1))
        .collect();
    let mut sums = vec![[0u64; 4]; num_per];
    for (z, (a, items)) in query
        .chunks_exact(2 * dim0)
        .zip(db.chunks_exact(num_per * dim0))
        .enumerate()
    {
        first_dimension_sums(a, items, &mut sums);
        for (ct, s) in out.iter_mut().zip(&sums) {
            // Row 0 then row 1, each residue mod m0 then mod m1.
            let d = ct.data.as_mut_slice();
            for (k, &sum) in s.iter().enumerate() {
                d[k * n + z] = barrett_coeff_u64(params, sum, k % 2);
            }
        }
    }
    out
}

/// Folds `cts` (NTT domain, `2^dims` of them) into `cts[0]` with one GSW
/// selector per dimension: `c0 + C * G^-1(c1 - c0)`.
fn fold(
    params: &'static Params,
    cts: &mut [PolyMatrixNTT<'static>],
    selectors: &[PolyMatrixNTT<'static>],
) {
    let dims = selectors.len();
    assert_eq!(cts.len(), 1 << dims);
    let rows = 2 * params.t_gsw;
    let mut diff = PolyMatrixNTT::zero(params, 2, 1);
    let mut diff_raw = PolyMatrixRaw::zero(params, 2, 1);
    let mut digits = PolyMatrixNTT::zero(params, rows, 1);
    let mut num = cts.len();
    for level in 0..dims {
        num /= 2;
        let selector = &selectors[dims - 1 - level];
        let (low, high) = cts.split_at_mut(num);
        for (c0, c1) in low.iter_mut().zip(high.iter()) {
            subtract(params, diff.as_mut_slice(), c1.as_slice(), c0.as_slice());
            from_ntt(&mut diff_raw, &diff);
            balanced_digits(params, &mut digits, &diff_raw);
            for row in 0..2 {
                let out = c0.get_poly_mut(row, 0);
                for k in 0..rows {
                    multiply_add(out, selector.get_poly(row, k), digits.get_poly(k, 0));
                }
                reduce(params, out);
            }
        }
    }
}

/// `out = a - b` for NTT-domain matrices (reduced residues).
fn subtract(params: &Params, out: &mut [u64], a: &[u64], b: &[u64]) {
    let n = params.poly_len;
    for (i, ((o, &x), &y)) in out.iter_mut().zip(a).zip(b).enumerate() {
        let m = params.moduli[(i / n) % params.crt_count];
        *o = if x >= y { x - y } else { x + m - y };
    }
}

/// `NTT(G^-1(inp))` for the GSW gadget (`t_gsw` digits of `bits` bits per
/// row, row `j` digit `k` at output row `j + 2k`, as spiral-rs lays it
/// out), every digit but the last in `[-2^(bits-1), 2^(bits-1))`.
fn balanced_digits(params: &Params, out: &mut PolyMatrixNTT<'_>, inp: &PolyMatrixRaw<'_>) {
    let t = params.t_gsw;
    let bits = get_bits_per(params, t);
    let rdim = inp.rows;
    let mut digits = vec![0i32; t * params.poly_len];
    for j in 0..rdim {
        for (z, &x) in inp.get_poly(j, 0).iter().enumerate() {
            for (k, d) in signed_digits(x, bits, t).enumerate() {
                digits[k * params.poly_len + z] = d;
            }
        }
        for (k, row) in digits.chunks_exact(params.poly_len).enumerate() {
            forward_signed(params, out.get_poly_mut(j + k * rdim, 0), row);
        }
    }
}

/// The `t` balanced base-`2^bits` digits of `x`: `x = sum d_k 2^(k bits)`,
/// all but the last in `[-2^(bits-1), 2^(bits-1))` (the last takes what is
/// left, 0 or 1 for the parameters served).
fn signed_digits(mut x: u64, bits: usize, t: usize) -> impl Iterator<Item = i32> {
    let base = 1i64 << bits;
    (0..t).map(move |k| {
        if k + 1 == t {
            return x as i32;
        }
        let d = (x & (base as u64 - 1)) as i64;
        x >>= bits;
        if d >= base / 2 {
            x += 1;
            (d - base) as i32
        } else {
            d as i32
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PirClient, Shape};
    use spiral_rs::client::Query;
    use spiral_rs::server::expand_query;

    fn small() -> Shape {
        Shape::for_registry(0, |_| 5).expect("shape")
    }

    #[test]
    fn expansion_is_spiral_rs_expand_query_bit_for_bit() {
        // Every folding depth served: the rounds, the stop round and the
        // positions read differ with nu2.
        for nu2 in crate::shape::MIN_NU2..=crate::shape::MAX_NU2 {
            let shape = Shape {
                nu1: crate::shape::NU1,
                nu2,
                instances: 1,
                bucket_shift: 0,
            };
            let params = shape.params();
            let mut client = PirClient::new(shape, &[nu2; 32]).expect("client");
            let public = PublicParameters::deserialize(params, &client.public_parameters());
            let query = Query::deserialize(params, &client.query(5).expect("query"));
            let ct = query.ct.as_ref().expect("an expanding query");
            let keys = [
                public.v_expansion_left.as_ref().expect("left"),
                public.v_expansion_right.as_ref().expect("right"),
            ];
            let conversion = &public.v_conversion.as_ref().expect("conversion")[0];
            let (first, selectors) = expand(params, keys, conversion, ct);
            let (want_first, want_selectors) = expand_query(params, &public, &query);
            assert!(first.as_slice() == want_first.as_slice(), "nu2 {nu2}");
            assert_eq!(selectors.len(), want_selectors.len());
            for (a, b) in selectors.iter().zip(&want_selectors) {
                assert!(a.as_slice() == b.as_slice(), "nu2 {nu2}");
            }
        }
    }

    #[test]
    fn an_automorphism_is_a_permutation_of_the_ntt() {
        let params = small().params();
        let mut a = PolyMatrixRaw::zero(params, 1, 1);
        for (i, w) in a.data.as_mut_slice().iter_mut().enumerate() {
            *w = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) % params.modulus;
        }
        let ntt = a.ntt();
        let n = params.poly_len;
        for (r, turn) in automorphisms(params).iter().enumerate() {
            let t = n / (1 << r) + 1;
            let mut turned = PolyMatrixRaw::zero(params, 1, 1);
            automorph(&mut turned, &a, t);
            let want = turned.ntt();
            for (c, order) in turn.iter().enumerate() {
                for (z, &j) in order.iter().enumerate() {
                    assert_eq!(
                        ntt.data[c * n + j as usize],
                        want.data[c * n + z],
                        "round {r} modulus {c} at {z}"
                    );
                }
            }
        }
    }

    #[test]
    fn balanced_digits_recompose_to_the_value_and_stay_small() {
        let params = small().params();
        let q = params.modulus;
        let (bits, t) = (get_bits_per(params, params.t_gsw), params.t_gsw);
        let edge = [
            0,
            1,
            127,
            128,
            255,
            256,
            q - 1,
            q / 2,
            0x0080_8080_8080_8080 % q,
        ];
        let any = (0..10_000u64).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15) % q);
        for x in edge.into_iter().chain(any) {
            let digits: Vec<i32> = signed_digits(x, bits, t).collect();
            assert_eq!(digits.len(), t);
            let mut sum = 0i128;
            for (k, &d) in digits.iter().enumerate() {
                let bound = if k + 1 == t { 1 } else { 1 << (bits - 1) };
                assert!(d.abs() <= bound, "digit {k} of {x}: {d}");
                sum += i128::from(d) << (bits * k);
            }
            assert_eq!(sum, i128::from(x));
        }
    }
}
