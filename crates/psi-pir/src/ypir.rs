//! YPIR+SP (Menon and Wu, "YPIR: High-Throughput Single-Server PIR with
//! Silent Preprocessing", USENIX Security 2024, section 4.6): SimplePIR's
//! plain database and one pass over it, its answer packed into ring-LWE
//! ciphertexts so that the client downloads no hint. The scheme's
//! cryptography, no I/O; not serving yet (issue #24).
//!
//! - The client's query is a ring-LWE encryption, block by block of
//!   [`RING`] rows, of the one-hot vector of the row it wants, scaled by
//!   `Δ / n` (`Δ = floor(q / p)`): `b_k = a_k s + n^-1 (e_k + Δ u_k)`, the
//!   `a_k` drawn from a public seed, so the query is the `b`s only (one
//!   word mod q per row). Read as LWE, its matrix `A` is the stack of the
//!   `a_k`'s negacyclic matrices.
//! - The server's pass (`plain::PlainDatabase::first_pass`) gives, per
//!   column `j`, `c_j = <H_j, s> + n^-1 (E_j + Δ D[row][j])`, where the
//!   hint `H = D^T A` depends on the database and the public seed only: it
//!   is computed once per database ([`Hint`]), by NTTs (`H_j = Σ_k d_kj
//!   conj(a_k)`, `d_kj` column `j` of block `k` as a polynomial).
//! - The `n` LWE ciphertexts `(H_j, c_j)` of each group of `n` columns are
//!   packed into one ring-LWE ciphertext (Chen, Dai, Kim, Song, ACNS 2021:
//!   `log n` levels, each adding an automorphism `X -> X^(2^l + 1)` whose
//!   key-switching key the client made), which multiplies the messages by
//!   `n`: the client decrypts `Δ D[row][j] + noise` at coefficient `j`.
//!
//! Parameters as YPIR's `params_for_scenario_simplepir`: ring dimension
//! 2048, `q` the product of the CRT primes 268369921 and 249561089 (about
//! 2^56), plaintext modulus `p = 2^14`, secret and errors from the discrete
//! Gaussian of width 16.042421 (σ = 6.4), key-switching gadget of 3 digits
//! (base 2^19). The answer is sent at full modulus here (32 KiB per group);
//! YPIR's modulus switching to 2^20 and 2^28 (12 KiB) is not built yet.

// Fixed-size ring arithmetic: every length is the ring's or checked on
// entry (the query by the pass, the answer by its length).
#![allow(clippy::indexing_slicing)]

use std::fmt;
use std::sync::OnceLock;

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use spiral_rs::arith::rescale;
use spiral_rs::discrete_gaussian::DiscreteGaussian;
use spiral_rs::gadget::{build_gadget, gadget_invert_rdim};
use spiral_rs::number_theory::invert_uint_mod;
use spiral_rs::params::Params;
use spiral_rs::poly::{automorph_alloc, PolyMatrix, PolyMatrixNTT, PolyMatrixRaw};
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::plain::{PlainDatabase, WORD_BITS};

/// The ring's dimension `n`: rows of a query block, columns of an answer
/// group.
pub const RING: usize = 2048;

/// `log2(n)`: the packing's levels.
const LEVELS: usize = 11;

/// The CRT primes of `q` (YPIR's and Spiral's).
pub const MODULI: (u64, u64) = (268_369_921, 249_561_089);

/// Digits of the key-switching gadget (YPIR's `t_exp_left`).
const DIGITS: usize = 3;

/// Width of the discrete Gaussian (`σ sqrt(2π)`, σ = 6.4).
const NOISE_WIDTH: f64 = 16.042_421;

/// The ring's parameters, built once (spiral-rs's `Params`; only the
/// ring, the moduli, the noise and the gadget are used here).
fn params() -> &'static Params {
    static PARAMS: OnceLock<Params> = OnceLock::new();
    PARAMS.get_or_init(|| {
        Params::init(
            RING,
            &[MODULI.0, MODULI.1],
            NOISE_WIDTH,
            1,
            1 << WORD_BITS,
            28,
            4,
            DIGITS,
            2,
            3,
            false,
            1,
            1,
            1,
            RING * WORD_BITS / 8,
        )
    })
}

/// `x mod q` from its residues (Garner).
fn compose(lo: u64, hi: u64) -> u64 {
    let p = params();
    let (m0, m1) = MODULI;
    let inv = invert_uint_mod(m0 % m1, m1).unwrap_or(0);
    let lo1 = lo % m1;
    let diff = (hi + m1 - lo1) % m1;
    let k = (u128::from(diff) * u128::from(inv) % u128::from(m1)) as u64;
    (lo + m0 * k) % p.modulus
}

/// `conj(v)(X) = v(X^-1)` in `Z_q[X]/(X^n + 1)`: `v_0, -v_{n-1}, ...,
/// -v_1`. `<u, v> = (conj(u) v)_0`.
fn conjugate(v: &[u64], out: &mut [u64]) {
    let q = params().modulus;
    out[0] = v[0] % q;
    for l in 1..RING {
        out[RING - l] = (q - v[l] % q) % q;
    }
}

/// The public `a_k` of a query's blocks, from the public seed, in order.
fn public_polys(seed: &[u8; 32], blocks: usize) -> Vec<PolyMatrixRaw<'static>> {
    let mut rng = ChaCha20Rng::from_seed(*seed);
    (0..blocks)
        .map(|_| PolyMatrixRaw::random_rng(params(), 1, 1, &mut rng))
        .collect()
}

/// The database's hint `H = D^T A` for one public seed: `RING` values mod
/// q per column, column by column.
pub struct Hint {
    columns: usize,
    values: Vec<u64>,
}

impl fmt::Debug for Hint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hint")
            .field("columns", &self.columns)
            .finish_non_exhaustive()
    }
}

impl Hint {
    /// Computes it: per column, `Σ_k NTT(d_kj) NTT(conj(a_k))`, one
    /// inverse NTT.
    ///
    /// # Errors
    /// A database whose rows are not whole blocks of [`RING`].
    pub fn new(db: &PlainDatabase, public_seed: &[u8; 32]) -> Result<Self> {
        use rayon::prelude::*;
        let blocks = blocks_of(db.rows())?;
        let p = params();
        let conj_a: Vec<PolyMatrixNTT<'static>> = public_polys(public_seed, blocks)
            .iter()
            .map(|a| {
                let mut c = PolyMatrixRaw::zero(p, 1, 1);
                conjugate(a.get_poly(0, 0), c.get_poly_mut(0, 0));
                c.ntt()
            })
            .collect();
        let columns = db.columns();
        let values: Vec<u64> = (0..columns)
            .into_par_iter()
            .flat_map_iter(|j| {
                let mut acc = PolyMatrixNTT::zero(p, 1, 1);
                let mut d = PolyMatrixRaw::zero(p, 1, 1);
                for (k, a) in conj_a.iter().enumerate() {
                    for (t, x) in d.get_poly_mut(0, 0).iter_mut().enumerate() {
                        *x = u64::from(db.word(k * RING + t, j));
                    }
                    acc = &acc + &(&d.ntt() * a);
                }
                acc.raw().get_poly(0, 0).to_vec()
            })
            .collect();
        Ok(Self { columns, values })
    }

    fn column(&self, j: usize) -> &[u64] {
        &self.values[j * RING..(j + 1) * RING]
    }
}

/// Rows as whole query blocks.
fn blocks_of(rows: usize) -> Result<usize> {
    if rows == 0 || !rows.is_multiple_of(RING) {
        return Err(Error::Shape(format!(
            "YPIR+SP needs whole blocks of {RING} rows, not {rows}"
        )));
    }
    Ok(rows / RING)
}

/// The client's key-switching keys for the packing's automorphisms
/// `X -> X^(2^l + 1)`, `l = 1..=11`: per automorphism `t`, three ring-LWE
/// encryptions of `τ_t(s) B^i` (gadget base `B = 2^19`), NTT form.
pub struct PackingKeys {
    keys: Vec<PolyMatrixNTT<'static>>,
}

impl fmt::Debug for PackingKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PackingKeys").finish_non_exhaustive()
    }
}

/// An institution's side of YPIR+SP: its secret `s`.
pub struct YpirClient {
    secret: Zeroizing<Vec<u64>>,
}

impl fmt::Debug for YpirClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("YpirClient").finish_non_exhaustive()
    }
}

impl YpirClient {
    /// The client whose secret `seed` determines.
    #[must_use]
    pub fn new(seed: &[u8; 32]) -> Self {
        let p = params();
        let mut rng = ChaCha20Rng::from_seed(*seed);
        let s = PolyMatrixRaw::noise(p, 1, 1, &DiscreteGaussian::init(p.noise_width), &mut rng);
        Self {
            secret: Zeroizing::new(s.get_poly(0, 0).to_vec()),
        }
    }

    fn secret(&self) -> PolyMatrixRaw<'static> {
        let mut s = PolyMatrixRaw::zero(params(), 1, 1);
        s.get_poly_mut(0, 0).copy_from_slice(&self.secret);
        s
    }

    /// The packing keys, fresh randomness from `rng_seed`.
    #[must_use]
    pub fn packing_keys(&self, rng_seed: &[u8; 32]) -> PackingKeys {
        let p = params();
        let mut rng = ChaCha20Rng::from_seed(*rng_seed);
        let dg = DiscreteGaussian::init(p.noise_width);
        let s = self.secret();
        let s_ntt = s.ntt();
        let gadget = build_gadget(p, 1, DIGITS).ntt();
        let keys = (1..=LEVELS)
            .map(|l| {
                let t = (1 << l) + 1;
                let tau_s = automorph_alloc(&s, t).ntt();
                let a = PolyMatrixRaw::random_rng(p, 1, DIGITS, &mut rng).ntt();
                let e = PolyMatrixRaw::noise(p, 1, DIGITS, &dg, &mut rng).ntt();
                // b = a s + e + τ(s) g, entry by entry.
                let mut b = PolyMatrixNTT::zero(p, 1, DIGITS);
                for i in 0..DIGITS {
                    let mut ai = PolyMatrixNTT::zero(p, 1, 1);
                    ai.get_poly_mut(0, 0).copy_from_slice(a.get_poly(0, i));
                    let mut ei = PolyMatrixNTT::zero(p, 1, 1);
                    ei.get_poly_mut(0, 0).copy_from_slice(e.get_poly(0, i));
                    let mut gi = PolyMatrixNTT::zero(p, 1, 1);
                    gi.get_poly_mut(0, 0).copy_from_slice(gadget.get_poly(0, i));
                    let bi = &(&(&ai * &s_ntt) + &ei) + &(&tau_s * &gi);
                    b.get_poly_mut(0, i).copy_from_slice(bi.get_poly(0, 0));
                }
                let mut key = PolyMatrixNTT::zero(p, 2, DIGITS);
                for i in 0..DIGITS {
                    key.get_poly_mut(0, i).copy_from_slice(a.get_poly(0, i));
                    key.get_poly_mut(1, i).copy_from_slice(b.get_poly(0, i));
                }
                key
            })
            .collect();
        PackingKeys { keys }
    }

    /// The query for `row` of a database of `rows` rows under
    /// `public_seed`: one word per row, the residues mod each CRT prime in
    /// its low and high 32 bits (as `first_pass` takes them). Errors from
    /// `rng_seed`.
    ///
    /// # Errors
    /// Rows not whole blocks, or `row` outside them.
    pub fn query(
        &self,
        row: usize,
        rows: usize,
        public_seed: &[u8; 32],
        rng_seed: &[u8; 32],
    ) -> Result<Vec<u64>> {
        let blocks = blocks_of(rows)?;
        if row >= rows {
            return Err(Error::Item {
                index: row,
                items: rows,
            });
        }
        let p = params();
        let q = p.modulus;
        let n_inv = invert_uint_mod(RING as u64, q)
            .ok_or_else(|| Error::Shape("the ring's dimension has no inverse".into()))?;
        let delta = q / p.pt_modulus;
        let dg = DiscreteGaussian::init(p.noise_width);
        let mut rng = ChaCha20Rng::from_seed(*rng_seed);
        let s = self.secret().ntt();
        let mut out = Vec::with_capacity(rows);
        for (k, a) in public_polys(public_seed, blocks).iter().enumerate() {
            let mut e = PolyMatrixRaw::noise(p, 1, 1, &dg, &mut rng);
            if k == row / RING {
                let c = &mut e.get_poly_mut(0, 0)[row % RING];
                *c = (*c + delta) % q;
            }
            let a_s = (&a.ntt() * &s).raw();
            for (&x, &y) in a_s.get_poly(0, 0).iter().zip(e.get_poly(0, 0)) {
                let b =
                    ((u128::from(y) * u128::from(n_inv) + u128::from(x)) % u128::from(q)) as u64;
                out.push((b % MODULI.0) | ((b % MODULI.1) << 32));
            }
        }
        Ok(out)
    }

    /// The row's words from the answer's group of columns (`2 x RING`
    /// values mod q: the packed ciphertext's `a` then `b`).
    ///
    /// # Errors
    /// An answer of the wrong length or a value not below q.
    pub fn decode(&self, answer: &[u64]) -> Result<Vec<u16>> {
        let p = params();
        if answer.len() != 2 * RING {
            return Err(Error::Length {
                what: "a YPIR+SP answer",
                got: answer.len() * 8,
                want: 2 * RING * 8,
            });
        }
        if let Some(index) = answer.iter().position(|&x| x >= p.modulus) {
            return Err(Error::Coefficient {
                what: "a YPIR+SP answer",
                index,
            });
        }
        let mut a = PolyMatrixRaw::zero(p, 1, 1);
        a.get_poly_mut(0, 0).copy_from_slice(&answer[..RING]);
        let a_s = (&a.ntt() * &self.secret().ntt()).raw();
        Ok(answer[RING..]
            .iter()
            .zip(a_s.get_poly(0, 0))
            .map(|(&b, &x)| {
                let m = (b + p.modulus - x) % p.modulus;
                (rescale(m, p.modulus, p.pt_modulus) % p.pt_modulus) as u16
            })
            .collect())
    }
}

/// `X -> X^t` on a ciphertext (`α`, `β`), then back under `s` with the
/// key for `t`: `α' = -K_a G^-1(τ(α))`, `β' = τ(β) - K_b G^-1(τ(α))`.
fn automorph_switched(
    ct: &PolyMatrixNTT<'static>,
    t: usize,
    key: &PolyMatrixNTT<'static>,
) -> PolyMatrixNTT<'static> {
    let p = params();
    let tau = automorph_alloc(&ct.raw(), t);
    let mut alpha = PolyMatrixRaw::zero(p, 1, 1);
    alpha.get_poly_mut(0, 0).copy_from_slice(tau.get_poly(0, 0));
    let mut digits = PolyMatrixRaw::zero(p, DIGITS, 1);
    gadget_invert_rdim(&mut digits, &alpha, 1);
    let switched = key * &digits.ntt();
    let mut beta = PolyMatrixRaw::zero(p, 2, 1);
    beta.get_poly_mut(1, 0).copy_from_slice(tau.get_poly(1, 0));
    &beta.ntt() + &(-&switched.raw()).ntt()
}

/// Packs `cts[start + m 2^(11-l)]`, `m < 2^l`, (messages at coefficient
/// 0) into one ciphertext with message `m` at coefficient `m n / 2^l`,
/// times `2^l`.
fn pack(
    l: usize,
    start: usize,
    cts: &[PolyMatrixNTT<'static>],
    keys: &PackingKeys,
    y: &[PolyMatrixNTT<'static>],
) -> PolyMatrixNTT<'static> {
    if l == 0 {
        return cts[start].clone();
    }
    let step = 1 << (LEVELS - l);
    let even = pack(l - 1, start, cts, keys, y);
    let odd = pack(l - 1, start + step, cts, keys, y);
    let y_odd = scale(&y[l - 1], &odd);
    let minus = &even + &(-&y_odd.raw()).ntt();
    let plus = &even + &y_odd;
    &plus + &automorph_switched(&minus, (1 << l) + 1, &keys.keys[l - 1])
}

/// Both rows of `ct` times the polynomial `y` (1 x 1).
fn scale(y: &PolyMatrixNTT<'static>, ct: &PolyMatrixNTT<'static>) -> PolyMatrixNTT<'static> {
    let mut out = PolyMatrixNTT::zero(params(), 2, 1);
    for r in 0..2 {
        let mut c = PolyMatrixNTT::zero(params(), 1, 1);
        c.get_poly_mut(0, 0).copy_from_slice(ct.get_poly(r, 0));
        out.get_poly_mut(r, 0)
            .copy_from_slice((y * &c).get_poly(0, 0));
    }
    out
}

/// The server's answer to a query: the pass, then each group of `RING`
/// columns packed; per group `2 x RING` values mod q (`a` then `b`).
///
/// # Errors
/// A query of the wrong length or out of range; columns not whole groups.
pub fn answer(
    db: &PlainDatabase,
    hint: &Hint,
    query: &[u64],
    keys: &PackingKeys,
    kernel: crate::plain::Kernel,
) -> Result<Vec<Vec<u64>>> {
    blocks_of(db.rows())?;
    if !db.columns().is_multiple_of(RING) || hint.columns != db.columns() {
        return Err(Error::Shape(format!(
            "YPIR+SP answers whole groups of {RING} columns, not {}",
            db.columns()
        )));
    }
    if keys.keys.len() != LEVELS {
        return Err(Error::Shape("packing keys for 11 levels".into()));
    }
    let pass = db.first_pass(&[query], MODULI, kernel)?;
    let c = &pass[0];
    let p = params();
    let q = p.modulus;
    let y: Vec<PolyMatrixNTT<'static>> = (1..=LEVELS)
        .map(|l| {
            let mut r = PolyMatrixRaw::zero(p, 1, 1);
            r.get_poly_mut(0, 0)[RING >> l] = 1;
            r.ntt()
        })
        .collect();
    (0..db.columns() / RING)
        .map(|g| {
            // Column j's LWE ciphertext as a ring one: α = conj(H_j) (so
            // (α s)_0 = <H_j, s>), β = 0; the pass's c_j added after.
            let cts: Vec<PolyMatrixNTT<'static>> = (0..RING)
                .map(|i| {
                    let mut ct = PolyMatrixRaw::zero(p, 2, 1);
                    conjugate(hint.column(g * RING + i), ct.get_poly_mut(0, 0));
                    ct.ntt()
                })
                .collect();
            let packed = pack(LEVELS, 0, &cts, keys, &y).raw();
            let mut out = packed.get_poly(0, 0).to_vec();
            for (i, &b) in packed.get_poly(1, 0).iter().enumerate() {
                let w = c[g * RING + i];
                let cj = compose(w & 0xffff_ffff, w >> 32);
                let n_cj = (u128::from(cj) * RING as u128 % u128::from(q)) as u64;
                out.push((b + n_cj) % q);
            }
            Ok(out)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plain::Kernel;

    #[test]
    fn the_hint_is_the_database_times_the_queries_matrix() {
        // Against the definition: A's rows are the a_k's negacyclic rows.
        let mut db = PlainDatabase::new(RING, 2).unwrap();
        for r in 0..RING {
            db.set_item(r, &[(r * 7) as u8, (r >> 3) as u8, 0x5a])
                .unwrap();
        }
        let seed = [3u8; 32];
        let hint = Hint::new(&db, &seed).unwrap();
        let a = public_polys(&seed, 1);
        let a = a[0].get_poly(0, 0);
        let q = params().modulus;
        for j in 0..2 {
            for l in [0, 1, 700, RING - 1] {
                // A[t][l] = coefficient t of a X^l.
                let mut sum = 0u128;
                for t in 0..RING {
                    let v = if t >= l {
                        a[t - l]
                    } else {
                        (q - a[RING + t - l]) % q
                    };
                    sum += u128::from(db.word(t, j)) * u128::from(v);
                }
                assert_eq!(
                    hint.column(j)[l],
                    (sum % u128::from(q)) as u64,
                    "column {j}, {l}"
                );
            }
        }
    }

    #[test]
    fn a_query_answered_and_decoded_gives_the_row() {
        let rows = 2 * RING;
        let mut db = PlainDatabase::new(rows, RING).unwrap();
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        let items: Vec<(usize, Vec<u8>)> = (0..rows)
            .map(|r| {
                let bytes = (0..db.item_bytes())
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect();
                (r, bytes)
            })
            .collect();
        let refs: Vec<(usize, &[u8])> = items.iter().map(|(r, b)| (*r, b.as_slice())).collect();
        db.patch(&refs).unwrap();
        let public = [9u8; 32];
        let hint = Hint::new(&db, &public).unwrap();
        let client = YpirClient::new(&[1u8; 32]);
        let keys = client.packing_keys(&[2u8; 32]);
        for row in [0, RING + 5, rows - 1] {
            let query = client.query(row, rows, &public, &[row as u8; 32]).unwrap();
            let answer = answer(&db, &hint, &query, &keys, Kernel::best()).unwrap();
            let words = client.decode(&answer[0]).unwrap();
            let want: Vec<u16> = (0..RING).map(|j| db.word(row, j)).collect();
            assert_eq!(words, want, "row {row}");
        }
    }
}
