//! YPIR+SP (Menon and Wu, "YPIR: High-Throughput Single-Server PIR with
//! Silent Preprocessing", USENIX Security 2024, section 4.6): SimplePIR's
//! plain database and one pass over it, its answer packed into ring-LWE
//! ciphertexts so that the client downloads no hint: PIR mode's scheme for
//! large registries (`scheme` picks it). No I/O.
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
//!   The keys' `a` halves come from the public seed, so the packing's `a`
//!   side, and the `a` each key switch cuts into digits, are computed once
//!   per database ([`Precomputed`]); its `b` side depends on the client's
//!   keys and the database only and is kept with the keys ([`YpirKeys`]):
//!   a query costs the pass. A group's missing columns (the last group of
//!   an item that is not a multiple of `n` words) are zero ciphertexts.
//! - The answer is switched to moduli 2^28 (`a`) and 2^20 (`b`): 12 KiB a
//!   group.
//!
//! Parameters as YPIR's `params_for_scenario_simplepir`: ring dimension
//! 2048, `q` the product of the CRT primes 268369921 and 249561089 (about
//! 2^56), plaintext modulus `p = 2^14`, secret and errors from the discrete
//! Gaussian of width 16.042421 (σ = 6.4), key-switching gadget of 3 digits
//! (base 2^19). docs/PROTOCOL.md ("PIR mode at population scale") has the
//! shape rule, the wire and the noise margin.

// Fixed-size ring arithmetic: every length is the ring's or checked on
// entry (the query by the pass, the answer by its length).
#![allow(clippy::indexing_slicing)]

use std::fmt;
use std::sync::{Mutex, OnceLock};

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use spiral_rs::discrete_gaussian::DiscreteGaussian;
use spiral_rs::gadget::build_gadget;
use spiral_rs::number_theory::invert_uint_mod;
use spiral_rs::params::Params;
use spiral_rs::poly::{automorph_alloc, PolyMatrix, PolyMatrixNTT, PolyMatrixRaw};
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::plain::{from_words, PlainDatabase, WORD_BITS};

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
    // `m0^-1 mod m1`, found once (a query composes one value a row).
    static INVERSE: OnceLock<u64> = OnceLock::new();
    let p = params();
    let (m0, m1) = MODULI;
    let inv = *INVERSE.get_or_init(|| invert_uint_mod(m0 % m1, m1).unwrap_or(0));
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
#[derive(Clone)]
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
        // Sums of up to 128 products below 2^56 fit 64 bits unreduced
        // (MAX_ROWS / RING = 128 blocks); more are reduced every 128.
        const UNREDUCED: usize = 128;
        let values: Vec<u64> = (0..columns)
            .into_par_iter()
            .flat_map_iter(|j| {
                let mut acc = vec![0u64; 2 * RING];
                let mut sum = PolyMatrixNTT::zero(p, 1, 1);
                let mut d = vec![0u64; 2 * RING];
                let mut coeffs = vec![0i32; RING];
                for (k, a) in conj_a.iter().enumerate() {
                    let words = db.column_run(k * RING, RING, j);
                    for (c, &w) in coeffs.iter_mut().zip(words) {
                        *c = i32::from(w);
                    }
                    crate::ntt::forward_signed(p, &mut d, &coeffs);
                    crate::kernels::multiply_add(&mut acc, &d, a.get_poly(0, 0));
                    if (k + 1) % UNREDUCED == 0 || k + 1 == conj_a.len() {
                        let out = sum.get_poly_mut(0, 0);
                        for (i, (o, x)) in out.iter_mut().zip(acc.iter_mut()).enumerate() {
                            let m = if i < RING { MODULI.0 } else { MODULI.1 };
                            *o = (*o + *x % m) % m;
                            *x = 0;
                        }
                    }
                }
                sum.raw().get_poly(0, 0).to_vec()
            })
            .collect();
        Ok(Self { columns, values })
    }

    fn column(&self, j: usize) -> &[u64] {
        &self.values[j * RING..(j + 1) * RING]
    }

    /// Bytes held.
    #[must_use]
    pub fn memory_bytes(&self) -> usize {
        self.values.len() * 8
    }

    /// The hint of `new`, which differs from `old` (this hint's database)
    /// in `rows` only: row `r` of block `k` at `t` adds `δ_rj` times row
    /// `r` of `A` (`a_k X^l`'s coefficient `t`, `l = 0..n`) to column `j`,
    /// so `ΔH = A_rows^T Δ`, a matrix product of `n x R x columns` per CRT
    /// prime, against [`Hint::new`]'s `columns x blocks` NTTs. The products
    /// run in `f64`, exact: `|δ| < 2^14` times a residue below 2^28 is
    /// below 2^42, and [`HINT_PATCH_CHUNK`] of them sum below 2^52.
    ///
    /// # Errors
    /// `old` and `new` of other shapes than this hint's, a row outside them.
    pub fn patch(
        &mut self,
        old: &PlainDatabase,
        new: &PlainDatabase,
        rows: &[usize],
        public_seed: &[u8; 32],
    ) -> Result<()> {
        use rayon::prelude::*;
        let (height, columns) = (new.rows(), self.columns);
        if (old.rows(), old.columns()) != (height, columns) || new.columns() != columns {
            return Err(Error::Shape(format!(
                "a hint of {columns} columns patched from {} x {} to {height} x {} words",
                old.rows(),
                old.columns(),
                new.columns()
            )));
        }
        if let Some(&bad) = rows.iter().find(|&&r| r >= height) {
            return Err(Error::Item {
                index: bad,
                items: height,
            });
        }
        let mut rows = rows.to_vec();
        rows.sort_unstable();
        rows.dedup();
        let a = public_polys(public_seed, blocks_of(height)?);
        let q = params().modulus;
        for chunk in rows.chunks(HINT_PATCH_CHUNK) {
            // A's rows for the changed rows, per prime: column r of an
            // n x R matrix.
            let a_rows: [Vec<f64>; 2] = [MODULI.0, MODULI.1].map(|m| {
                let mut out = vec![0f64; RING * chunk.len()];
                for (&r, col) in chunk.iter().zip(out.chunks_exact_mut(RING)) {
                    let (a, t) = (a[r / RING].get_poly(0, 0), r % RING);
                    for (l, o) in col.iter_mut().enumerate() {
                        let v = if l <= t {
                            a[t - l]
                        } else {
                            (q - a[RING + t - l]) % q
                        };
                        *o = (v % m) as f64;
                    }
                }
                out
            });
            // Δ, R x columns, row by row.
            let mut delta = vec![0f64; chunk.len() * columns];
            for (&r, out) in chunk.iter().zip(delta.chunks_exact_mut(columns)) {
                for (j, o) in out.iter_mut().enumerate() {
                    *o = f64::from(new.word(r, j)) - f64::from(old.word(r, j));
                }
            }
            const TASK_COLUMNS: usize = 128;
            self.values
                .par_chunks_mut(RING * TASK_COLUMNS)
                .enumerate()
                .try_for_each(|(task, values)| {
                    let first = task * TASK_COLUMNS;
                    let width = values.len() / RING;
                    let [lo, hi] = [&a_rows[0], &a_rows[1]].map(|a_rows| {
                        let mut out = vec![0f64; RING * width];
                        let done = crate::kernels::matrix_product(
                            (RING, chunk.len(), width),
                            a_rows,
                            (delta.get(first..).unwrap_or_default(), columns),
                            &mut out,
                        );
                        done.map(|()| out)
                    });
                    let (Some(lo), Some(hi)) = (lo, hi) else {
                        return Err(Error::Scheme);
                    };
                    for ((v, &lo), &hi) in values.iter_mut().zip(&lo).zip(&hi) {
                        let lo = (lo as i64).rem_euclid(MODULI.0 as i64) as u64;
                        let hi = (hi as i64).rem_euclid(MODULI.1 as i64) as u64;
                        *v = (*v + compose(lo, hi)) % q;
                    }
                    Ok(())
                })?;
        }
        Ok(())
    }
}

/// Bytes of a column's hint: `RING` values mod q.
const HINT_COLUMN_BYTES: usize = RING * 8;

/// Changed rows up to which patching a database's hint is faster than
/// making it again: [`Hint::patch`] costs `n` multiply-adds per changed
/// row and column, [`Hint::new`] an NTT per block of `n` rows and column.
/// Measured (`psi-bench ypir`, BENCHMARKS.md): they cost the same at ~45
/// changed rows a block (2^18 rows: 1.62 s made, 1.24 s patched for 4,096
/// rows; 2^15 rows: 0.31 s, 0.29 s for 1,024).
#[must_use]
pub fn hint_patch_rows(rows: usize) -> usize {
    rows / RING * PATCH_ROWS_PER_BLOCK
}

/// See [`hint_patch_rows`].
const PATCH_ROWS_PER_BLOCK: usize = 40;

/// Changed rows a hint patch multiplies at once: the most whose `f64`
/// sums stay exact ([`Hint::patch`]).
const HINT_PATCH_CHUNK: usize = 1 << 10;

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
/// `X -> X^(2^l + 1)`, `l = 1..=11`: per automorphism, three ring-LWE
/// encryptions `(a_i, b_i = a_i s + e_i + τ(s) B^i)` (gadget base
/// `B = 2^19`) whose `a_i` come from the public seed ([`key_polys`]), so
/// only the `b_i` are the client's (NTT form, 11 x 3 polynomials).
pub struct PackingKeys {
    b: Vec<[Vec<u64>; DIGITS]>,
}

impl fmt::Debug for PackingKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PackingKeys").finish_non_exhaustive()
    }
}

/// The keys' public halves `a_i` (NTT form), level by level, from the
/// public seed (a ChaCha20 stream of its own).
fn key_polys(seed: &[u8; 32]) -> Vec<PolyMatrixNTT<'static>> {
    let mut rng = ChaCha20Rng::from_seed(*seed);
    rng.set_stream(1);
    (0..LEVELS)
        .map(|_| PolyMatrixRaw::random_rng(params(), 1, DIGITS, &mut rng).ntt())
        .collect()
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

    /// The packing keys under `public_seed` (the database's), fresh
    /// errors from `rng_seed`.
    #[must_use]
    pub fn packing_keys(&self, public_seed: &[u8; 32], rng_seed: &[u8; 32]) -> PackingKeys {
        let p = params();
        let mut rng = ChaCha20Rng::from_seed(*rng_seed);
        let dg = DiscreteGaussian::init(p.noise_width);
        let s = self.secret();
        let s_ntt = s.ntt();
        let gadget = build_gadget(p, 1, DIGITS).ntt();
        let b = key_polys(public_seed)
            .iter()
            .enumerate()
            .map(|(level, a)| {
                let t = (1 << (level + 1)) + 1;
                let tau_s = automorph_alloc(&s, t).ntt();
                let e = PolyMatrixRaw::noise(p, 1, DIGITS, &dg, &mut rng).ntt();
                std::array::from_fn(|i| {
                    let part = |m: &PolyMatrixNTT<'static>| {
                        let mut one = PolyMatrixNTT::zero(p, 1, 1);
                        one.get_poly_mut(0, 0).copy_from_slice(m.get_poly(0, i));
                        one
                    };
                    let bi = &(&(&part(a) * &s_ntt) + &part(&e)) + &(&tau_s * &part(&gadget));
                    bi.get_poly(0, 0).to_vec()
                })
            })
            .collect();
        PackingKeys { b }
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

    /// The row's first `item_bytes` bytes from the answer: per group of
    /// [`RING`] columns, `RING` values `a | b << 28` (the packed
    /// ciphertext switched to moduli 2^28 and 2^20).
    ///
    /// # Errors
    /// A group of the wrong length, a value over 48 bits, too few groups
    /// for `item_bytes`.
    pub fn decode(&self, answer: &[Vec<u64>], item_bytes: usize) -> Result<Vec<u8>> {
        let p = params();
        let q = p.modulus;
        let want = (item_bytes * 8).div_ceil(WORD_BITS).div_ceil(RING);
        if answer.len() != want {
            return Err(Error::Length {
                what: "a YPIR+SP answer's groups",
                got: answer.len(),
                want,
            });
        }
        let s = self.secret().ntt();
        let mut words = Vec::with_capacity(answer.len() * RING);
        for group in answer {
            if group.len() != RING {
                return Err(Error::Length {
                    what: "a YPIR+SP answer",
                    got: group.len() * SWITCHED_BYTES,
                    want: RING * SWITCHED_BYTES,
                });
            }
            if let Some(index) = group.iter().position(|&x| x >> (A_BITS + B_BITS) != 0) {
                return Err(Error::Coefficient {
                    what: "a YPIR+SP answer",
                    index,
                });
            }
            // a s over the integers (|a| < 2^28, s small: well below q/2),
            // then mod 2^28 and scaled to 2^20.
            let mut a = PolyMatrixRaw::zero(p, 1, 1);
            for (x, &v) in a.get_poly_mut(0, 0).iter_mut().zip(group) {
                *x = v & ((1 << A_BITS) - 1);
            }
            let a_s = (&a.ntt() * &s).raw();
            words.extend(group.iter().zip(a_s.get_poly(0, 0)).map(|(&v, &x)| {
                let centred = if x > q / 2 {
                    i128::from(x) - i128::from(q)
                } else {
                    i128::from(x)
                };
                let a_s = centred.rem_euclid(1 << A_BITS) as u64;
                let t = (a_s + (1 << (A_BITS - B_BITS - 1))) >> (A_BITS - B_BITS);
                let m = ((v >> A_BITS) + (1 << B_BITS) - t) & ((1 << B_BITS) - 1);
                let shift = B_BITS - WORD_BITS as u32;
                (((m + (1 << (shift - 1))) >> shift) & ((1 << WORD_BITS) - 1)) as u16
            }));
        }
        Ok(from_words(&words, item_bytes))
    }
}

/// Values of a polynomial in NTT form: both residues, `2 x RING`.
type Ntt = Vec<u64>;

/// `X^(RING / 2^l)` in NTT form, `l = 1..=11`: the packing's shifts.
fn shifts() -> &'static [Ntt] {
    static SHIFTS: OnceLock<Vec<Ntt>> = OnceLock::new();
    SHIFTS.get_or_init(|| {
        (1..=LEVELS)
            .map(|l| {
                let mut r = PolyMatrixRaw::zero(params(), 1, 1);
                r.get_poly_mut(0, 0)[RING >> l] = 1;
                r.ntt().get_poly(0, 0).to_vec()
            })
            .collect()
    })
}

/// For each level's automorphism `X -> X^(2^l + 1)`, where it sends each
/// NTT slot: `τ(f)` at slot `i` is `f` at slot `table[i]` (the slots are
/// the ring's roots; `X` evaluated there is the root itself, so the table
/// is found by matching `root^t` among the roots).
fn automorph_tables() -> &'static [Vec<usize>] {
    static TABLES: OnceLock<Vec<Vec<usize>>> = OnceLock::new();
    TABLES.get_or_init(|| {
        let p = params();
        let mut x = PolyMatrixRaw::zero(p, 1, 1);
        x.get_poly_mut(0, 0)[1] = 1;
        let roots = x.ntt().get_poly(0, 0).to_vec();
        (1..=LEVELS)
            .map(|l| {
                let t = (1u64 << l) + 1;
                let mut table = vec![0; 2 * RING];
                for (k, m) in [MODULI.0, MODULI.1].into_iter().enumerate() {
                    let part = &roots[k * RING..(k + 1) * RING];
                    let slot: std::collections::HashMap<u64, usize> =
                        part.iter().enumerate().map(|(i, &r)| (r, i)).collect();
                    for (i, &r) in part.iter().enumerate() {
                        let rt = spiral_rs::arith::exponentiate_uint_mod(r, t, m);
                        table[k * RING + i] = k * RING + slot.get(&rt).copied().unwrap_or(0);
                    }
                }
                table
            })
            .collect()
    })
}

/// `out = a * b` slot by slot (NTT form; the slots' values below 2^28).
fn mul<T: Copy + Into<u64>>(a: &[T], b: &[u64]) -> Ntt {
    let mut out = Vec::with_capacity(2 * RING);
    for (k, m) in [MODULI.0, MODULI.1].into_iter().enumerate() {
        let range = k * RING..(k + 1) * RING;
        let (a, b) = (&a[range.clone()], &b[range]);
        out.extend(a.iter().zip(b).map(|(&x, &y)| (x.into() * y) % m));
    }
    out
}

/// `a + sign b` slot by slot (NTT form), `sign` 1 or -1.
fn add(a: &[u64], b: &[u64], negate: bool) -> Ntt {
    let (m0, m1) = MODULI;
    a.iter()
        .zip(b)
        .enumerate()
        .map(|(i, (&x, &y))| {
            let m = if i < RING { m0 } else { m1 };
            if negate {
                (x + m - y) % m
            } else {
                (x + y) % m
            }
        })
        .collect()
}

/// What the answer needs of a database, computed once per database and
/// public seed: the packing's `a` side, which depends on the hint and the
/// keys' public halves only (YPIR's offline precomputation). For each
/// group of [`RING`] columns (the last one's missing columns zero), the
/// packed ciphertext's `a` and, for every automorphism of the packing
/// tree, the `a` it switches (coefficients mod q: 16 KiB a node, a third
/// of its gadget digits' NTTs, which a client's `b` sides derive from it
/// once per keys and database). A query's answer is then the pass and the
/// client's `b` sides.
pub struct Precomputed {
    columns: usize,
    groups: Vec<Group>,
}

struct Group {
    /// The packed ciphertext's `a` (coefficients mod q).
    alpha: Vec<u64>,
    /// Per node of the tree (`node_id`), the `a` its key switch cuts into
    /// digits (coefficients mod q).
    switched: Vec<Vec<u64>>,
}

impl fmt::Debug for Precomputed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Precomputed")
            .field("columns", &self.columns)
            .finish_non_exhaustive()
    }
}

/// The node of level `l` (1..=11) whose first input is `start`
/// (`start < 2^(11-l)`): levels below first, `2^11 - 1` in all.
fn node_id(l: usize, start: usize) -> usize {
    (1 << LEVELS) - (1 << (LEVELS + 1 - l)) + start
}

impl Precomputed {
    /// From the database's hint and the public seed (the keys' `a`
    /// halves); the work of about `RING` key switches per group, on all
    /// threads.
    #[must_use]
    pub fn new(hint: &Hint, public_seed: &[u8; 32]) -> Self {
        use rayon::prelude::*;
        let key_a = key_polys(public_seed);
        let groups = (0..hint.columns.div_ceil(RING))
            .into_par_iter()
            .map(|g| {
                let p = params();
                let leaves: Vec<PolyMatrixNTT<'static>> = (g * RING..(g + 1) * RING)
                    .map(|j| {
                        // Column j's LWE ciphertext as a ring one:
                        // a = conj(H_j), so (a s)_0 = <H_j, s>; zero past
                        // the last column.
                        let mut a = PolyMatrixRaw::zero(p, 1, 1);
                        if j < hint.columns {
                            conjugate(hint.column(j), a.get_poly_mut(0, 0));
                        }
                        a.ntt()
                    })
                    .collect();
                let mut switched = vec![Vec::new(); RING - 1];
                let found = Mutex::new(&mut switched);
                let alpha = pack_alpha(LEVELS, 0, &leaves, &key_a, &found);
                Group {
                    alpha: alpha.raw().get_poly(0, 0).to_vec(),
                    switched,
                }
            })
            .collect();
        Self {
            columns: hint.columns,
            groups,
        }
    }

    /// Bytes held per group of columns.
    pub const GROUP_BYTES: usize = RING * 8 + (RING - 1) * RING * 8;

    /// Bytes held.
    #[must_use]
    pub fn memory_bytes(&self) -> usize {
        self.groups.len() * Self::GROUP_BYTES
    }
}

/// The `a` side of packing `leaves[start + m 2^(11-l)]`, `m < 2^l`, each
/// automorphism's switched `a` written to `switched` at its node: `a =
/// a_even + y a_odd - K_a G^-1(τ(a_even - y a_odd))`.
fn pack_alpha(
    l: usize,
    start: usize,
    leaves: &[PolyMatrixNTT<'static>],
    key_a: &[PolyMatrixNTT<'static>],
    switched: &Mutex<&mut Vec<Vec<u64>>>,
) -> PolyMatrixNTT<'static> {
    if l == 0 {
        return leaves[start].clone();
    }
    let p = params();
    let step = 1 << (LEVELS - l);
    let (even, odd) = if l > LEVELS - 4 {
        rayon::join(
            || pack_alpha(l - 1, start, leaves, key_a, switched),
            || pack_alpha(l - 1, start + step, leaves, key_a, switched),
        )
    } else {
        (
            pack_alpha(l - 1, start, leaves, key_a, switched),
            pack_alpha(l - 1, start + step, leaves, key_a, switched),
        )
    };
    let y_odd = mul(&shifts()[l - 1], odd.get_poly(0, 0));
    let minus = add(even.get_poly(0, 0), &y_odd, true);
    let plus = add(even.get_poly(0, 0), &y_odd, false);
    // τ(minus) in coefficients, cut into digits.
    let mut m = PolyMatrixNTT::zero(p, 1, 1);
    m.get_poly_mut(0, 0).copy_from_slice(&minus);
    let tau = automorph_alloc(&m.raw(), (1 << l) + 1);
    let d = digits_of(tau.get_poly(0, 0));
    let mut key_switched = vec![0; 2 * RING];
    for (i, di) in d.iter().enumerate() {
        key_switched = add(&key_switched, &mul(di, key_a[l - 1].get_poly(0, i)), false);
    }
    switched
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)[node_id(l, start)] =
        tau.get_poly(0, 0).to_vec();
    let mut out = PolyMatrixNTT::zero(p, 1, 1);
    out.get_poly_mut(0, 0)
        .copy_from_slice(&add(&plus, &key_switched, true));
    out
}

/// The gadget digits `G^-1(v)` of `v` (coefficients mod q), in NTT form
/// (values below 2^28, held in 32 bits): spiral-rs's `gadget_invert_rdim`
/// and `ntt`, on our transforms (a client's packed `b` sides make 6,141 a
/// group).
fn digits_of(v: &[u64]) -> [Vec<u32>; DIGITS] {
    let p = params();
    let bits = spiral_rs::gadget::get_bits_per(p, DIGITS);
    let mask = (1u64 << bits) - 1;
    let mut coeffs = vec![0i32; RING];
    let mut ntt = vec![0u64; 2 * RING];
    std::array::from_fn(|i| {
        for (c, &x) in coeffs.iter_mut().zip(v) {
            // A digit below 2^19: far below either prime.
            *c = ((x >> (i * bits)) & mask) as i32;
        }
        crate::ntt::forward_signed(p, &mut ntt, &coeffs);
        ntt.iter().map(|&x| x as u32).collect()
    })
}

/// The `b` side of the same packing, from zero at the leaves (the pass's
/// outputs are added at the root): `b = b_even + y b_odd + τ(b_even -
/// y b_odd) - K_b G^-1(...)`, the switched `a` precomputed, `τ` a
/// permutation of the NTT's slots.
fn pack_beta(l: usize, start: usize, group: &Group, key_b: &[[Vec<u64>; DIGITS]]) -> Ntt {
    let mut out = vec![0; 2 * RING];
    let digits = digits_of(&group.switched[node_id(l, start)]);
    for (di, ki) in digits.iter().zip(&key_b[l - 1]) {
        out = add(&out, &mul(di, ki), true);
    }
    if l == 1 {
        // Both halves are leaves, whose b is zero.
        return out;
    }
    let step = 1 << (LEVELS - l);
    let (even, odd) = if l > LEVELS - 4 {
        rayon::join(
            || pack_beta(l - 1, start, group, key_b),
            || pack_beta(l - 1, start + step, group, key_b),
        )
    } else {
        (
            pack_beta(l - 1, start, group, key_b),
            pack_beta(l - 1, start + step, group, key_b),
        )
    };
    let y_odd = mul(&shifts()[l - 1], &odd);
    let minus = add(&even, &y_odd, true);
    let table = &automorph_tables()[l - 1];
    let tau: Ntt = table.iter().map(|&i| minus[i]).collect();
    add(&add(&add(&even, &y_odd, false), &tau, false), &out, false)
}

/// The packed ciphertexts' `b` sides before the pass's outputs are added:
/// they depend on the client's keys and the precomputation only (the
/// leaves' `b` are zero), so they are computed once per keys and database
/// and serve every query (`YpirKeys` keeps them). Coefficients mod q, per
/// group.
fn packed_b(pre: &Precomputed, keys: &PackingKeys) -> Vec<Vec<u64>> {
    let p = params();
    pre.groups
        .iter()
        .map(|group| {
            let mut beta = PolyMatrixNTT::zero(p, 1, 1);
            beta.get_poly_mut(0, 0)
                .copy_from_slice(&pack_beta(LEVELS, 0, group, &keys.b));
            beta.raw().get_poly(0, 0).to_vec()
        })
        .collect()
}

/// Bits of the answer's `a` coefficients after modulus switching.
const A_BITS: u32 = 28;

/// Bits of the answer's `b` coefficients after modulus switching.
const B_BITS: u32 = 20;

/// `round(x 2^bits / q) mod 2^bits`: `x` mod q switched to modulus 2^bits.
fn switch(x: u64, bits: u32) -> u64 {
    let q = u128::from(params().modulus);
    let scaled = ((u128::from(x) << bits) + q / 2) / q;
    (scaled as u64) & ((1 << bits) - 1)
}

/// One query's answer from the pass's outputs `c` (CRT words, one per
/// column): per group, the packed ciphertext (`a`, and `b` plus `n c_j` at
/// coefficient `j`: the packing multiplies each message by `n`), switched
/// from q to 2^28 (`a`) and 2^20 (`b`), one value `a | b << 28` a
/// coefficient (YPIR's modulus switching).
fn finish(pre: &Precomputed, b: &[Vec<u64>], c: &[u64]) -> Vec<Vec<u64>> {
    let q = params().modulus;
    pre.groups
        .iter()
        .zip(b)
        .enumerate()
        .map(|(g, (group, b))| {
            group
                .alpha
                .iter()
                .zip(b)
                .enumerate()
                .map(|(i, (&a, &b))| {
                    // The pass has no output past the last column.
                    let w = c.get(g * RING + i).copied().unwrap_or(0);
                    let cj = compose(w & 0xffff_ffff, w >> 32);
                    let n_cj = (u128::from(cj) * RING as u128 % u128::from(q)) as u64;
                    switch(a, A_BITS) | switch((b + n_cj) % q, B_BITS) << A_BITS
                })
                .collect()
        })
        .collect()
}

/// Checks that `pre` and `keys` go with `db`.
fn check_answerable(db: &PlainDatabase, pre: &Precomputed, keys: &PackingKeys) -> Result<()> {
    blocks_of(db.rows())?;
    if pre.columns != db.columns() || keys.b.len() != LEVELS {
        return Err(Error::Shape(
            "a YPIR+SP answer needs the database's precomputation and 11 levels of keys".into(),
        ));
    }
    Ok(())
}

/// The server's answer to a query: the pass, then each group of `RING`
/// columns packed with the client's keys; per group `2 x RING` values mod
/// q (`a` then `b`).
///
/// # Errors
/// A query of the wrong length or out of range; a database that does not
/// match its precomputation.
pub fn answer(
    db: &PlainDatabase,
    pre: &Precomputed,
    query: &[u64],
    keys: &PackingKeys,
    kernel: crate::plain::Kernel,
) -> Result<Vec<Vec<u64>>> {
    check_answerable(db, pre, keys)?;
    let pass = db.first_pass(&[query], MODULI, kernel)?;
    Ok(finish(pre, &packed_b(pre, keys), &pass[0]))
}

/// The scheme and parameter family, as `ServerInfo` names it.
pub const SCHEME: &str = "ypir-sp-v1";

/// Most rows (items) of a database: a query is 7 bytes a row, at most
/// 1.75 MiB.
pub const MAX_ROWS: usize = 1 << 18;

/// Most groups of [`RING`] columns an item spans: an answer is 12 KiB a
/// group, at most 768 KiB.
pub const MAX_GROUPS: u16 = 64;

/// Bytes of item one group of columns holds (2048 words of 14 bits).
pub const GROUP_BYTES: usize = RING * WORD_BITS / 8;

/// An item's columns are a multiple of this (112 bytes): its last group
/// holds only the columns the fullest item needs, and the shape changes
/// only when the fullest item grows past such a step.
pub const COLUMN_STEP: u32 = 64;

/// Rows from which a database keeps its hint to patch it on an update:
/// there the hint (16 KiB a column) is at most 1/16 of the items (2 bytes
/// a row and column), and an update of a few thousand entries touches few
/// enough rows for a patch to pay ([`hint_patch_rows`]). Smaller databases
/// make it again from the items.
pub const KEEP_HINT_ROWS: usize = 1 << 17;

/// Bytes of a value mod q on the wire (q < 2^56), little-endian.
pub const VALUE_BYTES: usize = 7;

/// Bytes of an answer's coefficient on the wire: `a` (28 bits) and `b`
/// (20 bits) after modulus switching, `a | b << 28` little-endian.
pub const SWITCHED_BYTES: usize = 6;

/// A YPIR+SP database's shape: public, advertised in `ServerInfo`.
///
/// Item `i` holds the fingerprints of buckets `i 2^bucket_shift ..
/// (i+1) 2^bucket_shift - 1` and is a row of `columns` words of 14 bits
/// (`columns x 14 / 8` bytes); there are `2^item_bits` items, in
/// `max(2^item_bits, 2048)` rows (whole query blocks; the rows past the
/// items are empty). The columns are answered in groups of [`RING`], the
/// last one partial when `columns` is not a multiple of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct YpirShape {
    /// Items, as a power of two.
    pub item_bits: u8,
    /// Words per item: a multiple of [`COLUMN_STEP`], at most
    /// [`MAX_GROUPS`] x [`RING`].
    pub columns: u32,
    /// Buckets per item, as a power of two.
    pub bucket_shift: u8,
}

impl YpirShape {
    /// The shape for a registry whose buckets have `prefix_bits` bits, with
    /// `load(shift)` the most entries any item would hold with `2^shift`
    /// buckets per item: the fewest items of one group that hold the
    /// fullest, or, when that would exceed [`MAX_ROWS`] items, `MAX_ROWS`
    /// items; their columns the fewest (in steps of [`COLUMN_STEP`]) that
    /// hold the fullest.
    ///
    /// # Errors
    /// [`Error::Shape`] when even [`MAX_GROUPS`] cannot hold the fullest
    /// item, or prefix bits over 32.
    pub fn for_registry(prefix_bits: u8, load: impl Fn(u8) -> usize) -> Result<Self> {
        if prefix_bits > 32 {
            return Err(Error::Shape(format!("{prefix_bits} bucket prefix bits")));
        }
        let most_bits = MAX_ROWS.trailing_zeros() as u8;
        let one_group = crate::item::capacity(GROUP_BYTES);
        // The most buckets per item that one group holds, at least enough
        // to keep the items within MAX_ROWS.
        let least = prefix_bits.saturating_sub(most_bits);
        let mut shift = least;
        while shift < prefix_bits && load(shift + 1) <= one_group {
            shift += 1;
        }
        let most = load(shift);
        let most_columns = u32::from(MAX_GROUPS) * RING as u32;
        let columns = (1..=most_columns / COLUMN_STEP)
            .map(|k| k * COLUMN_STEP)
            .find(|&c| crate::item::capacity(words_bytes(c)) >= most)
            .ok_or_else(|| {
                Error::Shape(format!(
                    "an item would hold {most} entries, more than {MAX_GROUPS} groups can"
                ))
            })?;
        Ok(Self {
            item_bits: prefix_bits - shift,
            columns,
            bucket_shift: shift,
        })
    }

    /// Checks an advertised shape (a client does, before using it).
    ///
    /// # Errors
    /// [`Error::Shape`] for anything out of range.
    pub fn validate(&self) -> Result<()> {
        if usize::from(self.item_bits) > MAX_ROWS.trailing_zeros() as usize
            || !(COLUMN_STEP..=u32::from(MAX_GROUPS) * RING as u32).contains(&self.columns)
            || !self.columns.is_multiple_of(COLUMN_STEP)
            || u32::from(self.item_bits) + u32::from(self.bucket_shift) > 32
        {
            return Err(Error::Shape(format!(
                "item_bits {} columns {} bucket_shift {}",
                self.item_bits, self.columns, self.bucket_shift
            )));
        }
        Ok(())
    }

    /// Items in the database.
    #[must_use]
    pub fn items(&self) -> usize {
        1 << self.item_bits
    }

    /// Rows of the database (whole query blocks).
    #[must_use]
    pub fn rows(&self) -> usize {
        self.items().max(RING)
    }

    /// The item that holds `bucket`.
    #[must_use]
    pub fn item_of(&self, bucket: u32) -> usize {
        (u64::from(bucket) >> self.bucket_shift) as usize
    }

    /// Groups of [`RING`] columns: packed ciphertexts of an answer.
    #[must_use]
    pub fn groups(&self) -> usize {
        (self.columns as usize).div_ceil(RING)
    }

    /// Bytes of one item.
    #[must_use]
    pub fn item_bytes(&self) -> usize {
        words_bytes(self.columns)
    }

    /// The client's packing keys' length (uploaded once per epoch).
    #[must_use]
    pub fn keys_bytes(&self) -> usize {
        LEVELS * DIGITS * RING * VALUE_BYTES
    }

    /// One query's length.
    #[must_use]
    pub fn query_bytes(&self) -> usize {
        self.rows() * VALUE_BYTES
    }

    /// One answer's length.
    #[must_use]
    pub fn answer_bytes(&self) -> usize {
        self.groups() * RING * SWITCHED_BYTES
    }

    /// Whether the database keeps its hint ([`KEEP_HINT_ROWS`]).
    #[must_use]
    pub fn keeps_hint(&self) -> bool {
        self.rows() >= KEEP_HINT_ROWS
    }

    /// Bytes the server holds: the items in 16-bit words, the packing's
    /// precomputation (per group, the `a` switched at each of 2,047 nodes),
    /// and the hint where it is kept.
    #[must_use]
    pub fn database_bytes(&self) -> usize {
        let columns = self.columns as usize;
        let hint = if self.keeps_hint() {
            columns * HINT_COLUMN_BYTES
        } else {
            0
        };
        self.rows() * columns * 2 + self.groups() * Precomputed::GROUP_BYTES + hint
    }
}

/// Bytes `columns` words of 14 bits hold (whole bytes).
fn words_bytes(columns: u32) -> usize {
    columns as usize * WORD_BITS / 8
}

/// The public seed of a key epoch's databases: the queries' `a` and the
/// keys' public halves. Every replica derives the same.
#[must_use]
pub fn public_seed(epoch: u64) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"psi.v1.ypir.public");
    h.update(epoch.to_be_bytes());
    h.finalize().into()
}

/// Values mod q as 7-byte little-endian words.
fn to_wire(values: &[u64]) -> Vec<u8> {
    to_bytes(values, VALUE_BYTES)
}

/// Values as `width`-byte little-endian words.
fn to_bytes(values: &[u64], width: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * width);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes()[..width]);
    }
    out
}

/// 7-byte words back to values, each checked below q; the length checked
/// first.
fn from_wire(bytes: &[u8], want: usize, what: &'static str) -> Result<Vec<u64>> {
    from_bytes(bytes, want, what, VALUE_BYTES, params().modulus)
}

/// `width`-byte words back to values, each checked below `bound`; the
/// length checked first.
fn from_bytes(
    bytes: &[u8],
    want: usize,
    what: &'static str,
    width: usize,
    bound: u64,
) -> Result<Vec<u64>> {
    if bytes.len() != want {
        return Err(Error::Length {
            what,
            got: bytes.len(),
            want,
        });
    }
    bytes
        .chunks_exact(width)
        .enumerate()
        .map(|(index, w)| {
            let mut v = [0u8; 8];
            v[..width].copy_from_slice(w);
            let v = u64::from_le_bytes(v);
            if v < bound {
                Ok(v)
            } else {
                Err(Error::Coefficient { what, index })
            }
        })
        .collect()
}

/// A client's packing keys as the server keeps them, with the packed `b`
/// sides for the last database they answered (`packed_b`): the first
/// query after a database change computes them, the others reuse them.
pub struct YpirKeys {
    keys: PackingKeys,
    packed: Mutex<Option<(u64, PackedB)>>,
}

/// The packed `b` sides of a database's groups for one client's keys.
type PackedB = std::sync::Arc<Vec<Vec<u64>>>;

impl fmt::Debug for YpirKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("YpirKeys").finish_non_exhaustive()
    }
}

impl YpirKeys {
    /// Parses a client's upload: exactly [`YpirShape::keys_bytes`] bytes,
    /// every value below q (checked before any transform).
    ///
    /// # Errors
    /// [`Error::Length`] or [`Error::Coefficient`].
    pub fn parse(shape: YpirShape, bytes: &[u8]) -> Result<Self> {
        let values = from_wire(bytes, shape.keys_bytes(), "YPIR+SP packing keys")?;
        let p = params();
        let mut polys = values.chunks_exact(RING).map(|c| {
            let mut r = PolyMatrixRaw::zero(p, 1, 1);
            r.get_poly_mut(0, 0).copy_from_slice(c);
            r.ntt().get_poly(0, 0).to_vec()
        });
        let b = (0..LEVELS)
            .map(|_| std::array::from_fn(|_| polys.next().unwrap_or_default()))
            .collect();
        Ok(Self {
            keys: PackingKeys { b },
            packed: Mutex::new(None),
        })
    }

    /// Bytes held (the packed `b` sides of up to [`MAX_GROUPS`] groups
    /// counted).
    #[must_use]
    pub fn memory_bytes(&self) -> usize {
        LEVELS * DIGITS * 2 * RING * 8 + usize::from(MAX_GROUPS) * RING * 8
    }

    /// The packed `b` sides for `db`, computed on first use.
    fn packed_for(&self, db: &YpirDatabase) -> PackedB {
        let mut held = self
            .packed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match &*held {
            Some((id, b)) if *id == db.id => std::sync::Arc::clone(b),
            _ => {
                let b = std::sync::Arc::new(packed_b(&db.pre, &self.keys));
                *held = Some((db.id, std::sync::Arc::clone(&b)));
                b
            }
        }
    }
}

/// A YPIR+SP database: the items of a key epoch and its precomputation.
pub struct YpirDatabase {
    shape: YpirShape,
    epoch: u64,
    db: PlainDatabase,
    /// Kept to be patched ([`Hint::patch`]) where the shape keeps it
    /// ([`YpirShape::keeps_hint`]).
    hint: Option<Hint>,
    pre: Precomputed,
    /// Unique in the process: what keys' cached packings are for.
    id: u64,
}

impl fmt::Debug for YpirDatabase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("YpirDatabase")
            .field("shape", &self.shape)
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl YpirDatabase {
    /// Builds the database of `shape` for key epoch `epoch`; `tags(i)`
    /// gives the tags of item `i`.
    ///
    /// # Errors
    /// [`Error::Overflow`] when an item does not fit the shape.
    pub fn build(
        shape: YpirShape,
        epoch: u64,
        tags: impl Fn(usize) -> Vec<u64> + Sync,
    ) -> Result<Self> {
        Self::build_keeping(shape, epoch, tags, shape.keeps_hint())
    }

    /// [`YpirDatabase::build`], keeping the hint or not whatever the shape
    /// says (tests patch the hints of small databases).
    fn build_keeping(
        shape: YpirShape,
        epoch: u64,
        tags: impl Fn(usize) -> Vec<u64> + Sync,
        keep_hint: bool,
    ) -> Result<Self> {
        shape.validate()?;
        let mut db = PlainDatabase::new(shape.rows(), shape.columns as usize)?;
        let all: Vec<usize> = (0..shape.items()).collect();
        write_items(&mut db, shape, epoch, &all, &tags)?;
        let hint = Hint::new(&db, &public_seed(epoch))?;
        Ok(Self::finish(shape, epoch, db, hint, keep_hint))
    }

    /// The database with its precomputation from `hint`, which it keeps
    /// when `keep_hint`.
    fn finish(
        shape: YpirShape,
        epoch: u64,
        db: PlainDatabase,
        hint: Hint,
        keep_hint: bool,
    ) -> Self {
        let pre = Precomputed::new(&hint, &public_seed(epoch));
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        Self {
            shape,
            epoch,
            db,
            hint: keep_hint.then_some(hint),
            pre,
            id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// This database with items `changed` coded afresh from `tags`: the
    /// items patched in place, the hint patched for the changed rows where
    /// it is kept ([`Hint::patch`]; made again from the database when more
    /// than [`hint_patch_rows`] changed, where that is faster, or when it
    /// is not kept), and the packing's precomputation made again (a fixed
    /// cost per group: it is not linear in the hint, docs/PROTOCOL.md).
    ///
    /// # Errors
    /// [`Error::Overflow`] when an item no longer fits, [`Error::Item`] for
    /// an index outside the database.
    pub fn patch(
        &self,
        changed: &[usize],
        tags: impl Fn(usize) -> Vec<u64> + Sync,
    ) -> Result<Self> {
        let mut db = self.db.clone();
        write_items(&mut db, self.shape, self.epoch, changed, &tags)?;
        let mut rows = changed.to_vec();
        rows.sort_unstable();
        rows.dedup();
        let seed = public_seed(self.epoch);
        let hint = match &self.hint {
            Some(kept) if rows.len() <= hint_patch_rows(db.rows()) => {
                let mut hint = kept.clone();
                hint.patch(&self.db, &db, &rows, &seed)?;
                hint
            }
            _ => Hint::new(&db, &seed)?,
        };
        Ok(Self::finish(
            self.shape,
            self.epoch,
            db,
            hint,
            self.hint.is_some(),
        ))
    }

    /// The shape.
    #[must_use]
    pub fn shape(&self) -> YpirShape {
        self.shape
    }

    /// The key epoch its items are coded for.
    #[must_use]
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Bytes held.
    #[must_use]
    pub fn bytes(&self) -> usize {
        self.db.memory_bytes()
            + self.hint.as_ref().map_or(0, Hint::memory_bytes)
            + self.pre.memory_bytes()
    }

    /// The answer to a query: exactly [`YpirShape::query_bytes`], every
    /// value below q (checked before any work).
    ///
    /// # Errors
    /// [`Error::Length`] or [`Error::Coefficient`].
    pub fn answer(&self, keys: &YpirKeys, query: &[u8]) -> Result<Vec<u8>> {
        let mut answers = self.answer_many(keys, &[query])?;
        answers.pop().ok_or(Error::Scheme)
    }

    /// The answers to several queries of one client, every one checked
    /// before any work; up to [`crate::plain::MAX_QUERIES_PER_PASS`] share
    /// a pass over the database.
    ///
    /// # Errors
    /// [`Error::Length`] or [`Error::Coefficient`] for any query.
    pub fn answer_many(&self, keys: &YpirKeys, queries: &[&[u8]]) -> Result<Vec<Vec<u8>>> {
        let prepared: Vec<PreparedQuery> = queries
            .iter()
            .map(|q| self.prepare(keys, q))
            .collect::<Result<_>>()?;
        let jobs: Vec<(&YpirKeys, &PreparedQuery)> = prepared.iter().map(|q| (keys, q)).collect();
        self.answer_prepared(&jobs)
    }

    /// `query` checked (exactly [`YpirShape::query_bytes`], every value
    /// below q) against this database and `keys`: ready for a pass, which
    /// it may share with other clients' queries ([`YpirDatabase::answer_prepared`]).
    ///
    /// # Errors
    /// [`Error::Length`] or [`Error::Coefficient`]; keys that do not fit
    /// the database.
    pub fn prepare(&self, keys: &YpirKeys, query: &[u8]) -> Result<PreparedQuery> {
        let values = from_wire(query, self.shape.query_bytes(), "a YPIR+SP query")?;
        check_answerable(&self.db, &self.pre, &keys.keys)?;
        Ok(PreparedQuery {
            words: values
                .iter()
                .map(|&v| (v % MODULI.0) | ((v % MODULI.1) << 32))
                .collect(),
        })
    }

    /// The answers to prepared queries of any clients, each with its
    /// client's keys, in order: up to [`crate::plain::MAX_QUERIES_PER_PASS`]
    /// share a pass over the database, then each is packed with its keys.
    ///
    /// # Errors
    /// [`Error::Scheme`] when the scheme's code faults (caught: nothing
    /// else is affected).
    pub fn answer_prepared(&self, jobs: &[(&YpirKeys, &PreparedQuery)]) -> Result<Vec<Vec<u8>>> {
        // The scheme's code (spiral-rs's ring arithmetic among it) under
        // catch_unwind: a fault refuses these queries, nothing more.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut out = Vec::with_capacity(jobs.len());
            for chunk in jobs.chunks(crate::plain::MAX_QUERIES_PER_PASS) {
                let refs: Vec<&[u64]> = chunk.iter().map(|(_, q)| q.words.as_slice()).collect();
                let pass = self
                    .db
                    .first_pass(&refs, MODULI, crate::plain::Kernel::best())?;
                for ((keys, _), c) in chunk.iter().zip(&pass) {
                    let b = keys.packed_for(self);
                    out.push(to_bytes(&finish(&self.pre, &b, c).concat(), SWITCHED_BYTES));
                }
            }
            Ok(out)
        }))
        .map_err(|_| Error::Scheme)?
    }
}

/// A query checked by [`YpirDatabase::prepare`]: one word a row, its two
/// residues in the low and high 32 bits.
pub struct PreparedQuery {
    words: Vec<u64>,
}

impl fmt::Debug for PreparedQuery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PreparedQuery")
            .field("rows", &self.words.len())
            .finish_non_exhaustive()
    }
}

/// Codes items `which` into `db`, in parallel, patched in one pass.
fn write_items(
    db: &mut PlainDatabase,
    shape: YpirShape,
    epoch: u64,
    which: &[usize],
    tags: &(impl Fn(usize) -> Vec<u64> + Sync),
) -> Result<()> {
    use rayon::prelude::*;
    let items = shape.items();
    if let Some(&bad) = which.iter().find(|&&i| i >= items) {
        return Err(Error::Item { index: bad, items });
    }
    for chunk in which.chunks(1 << 15) {
        let coded: Vec<(usize, Vec<u8>)> = chunk
            .par_iter()
            .map(|&i| {
                Ok((
                    i,
                    crate::item::encode(&tags(i), i as u64, epoch, shape.item_bytes())?,
                ))
            })
            .collect::<Result<_>>()?;
        let refs: Vec<(usize, &[u8])> = coded.iter().map(|(i, b)| (*i, b.as_slice())).collect();
        db.patch(&refs)?;
    }
    Ok(())
}

/// An institution's YPIR+SP client for one shape and key epoch.
pub struct YpirPirClient {
    shape: YpirShape,
    /// The key epoch's public seed.
    public: [u8; 32],
    inner: YpirClient,
}

impl fmt::Debug for YpirPirClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("YpirPirClient")
            .field("shape", &self.shape)
            .finish_non_exhaustive()
    }
}

impl YpirPirClient {
    /// The client whose secret `seed` determines, for the databases of
    /// key epoch `epoch` (whose public seed it derives).
    ///
    /// # Errors
    /// [`Error::Shape`] for a shape out of range.
    pub fn new(shape: YpirShape, epoch: u64, seed: &[u8; 32]) -> Result<Self> {
        shape.validate()?;
        Ok(Self {
            shape,
            public: public_seed(epoch),
            inner: YpirClient::new(seed),
        })
    }

    /// The shape.
    #[must_use]
    pub fn shape(&self) -> YpirShape {
        self.shape
    }

    /// The packing keys to upload (fresh errors each call).
    #[must_use]
    pub fn public_parameters(&self) -> Vec<u8> {
        self.public_parameters_from(&fresh_seed())
    }

    /// The packing keys with errors from `rng_seed`, on the wire: the `b`
    /// halves' coefficients, 7 bytes each.
    fn public_parameters_from(&self, rng_seed: &[u8; 32]) -> Vec<u8> {
        let keys = self.inner.packing_keys(&self.public, rng_seed);
        let p = params();
        let values: Vec<u64> = keys
            .b
            .iter()
            .flatten()
            .flat_map(|ntt| {
                let mut m = PolyMatrixNTT::zero(p, 1, 1);
                m.get_poly_mut(0, 0).copy_from_slice(ntt);
                m.raw().get_poly(0, 0).to_vec()
            })
            .collect();
        to_wire(&values)
    }

    /// A query for the item holding `bucket` (fresh errors each call).
    ///
    /// # Errors
    /// [`Error::Item`] when the bucket lies outside the database.
    pub fn query(&self, bucket: u32) -> Result<Vec<u8>> {
        self.query_from(bucket, &fresh_seed())
    }

    /// The query with errors from `rng_seed`, on the wire: a value mod q
    /// per row, 7 bytes each.
    fn query_from(&self, bucket: u32, rng_seed: &[u8; 32]) -> Result<Vec<u8>> {
        let index = self.item_of(bucket)?;
        let words = self
            .inner
            .query(index, self.shape.rows(), &self.public, rng_seed)?;
        let values: Vec<u64> = words
            .iter()
            .map(|&w| compose(w & 0xffff_ffff, w >> 32))
            .collect();
        Ok(to_wire(&values))
    }

    fn item_of(&self, bucket: u32) -> Result<usize> {
        crate::item::within(self.shape.item_of(bucket), self.shape.items())
    }

    /// The sorted fingerprints of the item holding `bucket`, from the
    /// server's answer, checked against its checksum.
    ///
    /// # Errors
    /// [`Error::Length`] for an answer of the wrong length,
    /// [`Error::Coefficient`] for a value not below q, [`Error::Integrity`]
    /// when it does not decrypt to the item asked.
    pub fn decode(&self, bucket: u32, epoch: u64, answer: &[u8]) -> Result<Vec<u64>> {
        let index = self.item_of(bucket)?;
        let values = from_bytes(
            answer,
            self.shape.answer_bytes(),
            "a YPIR+SP answer",
            SWITCHED_BYTES,
            1 << (A_BITS + B_BITS),
        )?;
        let groups: Vec<Vec<u64>> = values.chunks_exact(RING).map(<[u64]>::to_vec).collect();
        let bytes = self.inner.decode(&groups, self.shape.item_bytes())?;
        crate::item::decode(&bytes, index as u64, epoch)
    }

    /// Whether `tag` is in an item decoded by [`YpirPirClient::decode`].
    #[must_use]
    pub fn contains(&self, fingerprints: &[u64], tag: u64) -> bool {
        crate::item::contains(fingerprints, tag, self.shape.item_bytes())
    }
}

/// 32 bytes from the operating system's generator, for a query's or the
/// keys' errors.
fn fresh_seed() -> [u8; 32] {
    use rand::RngCore;
    let mut seed = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut seed);
    seed
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
    fn a_patched_hint_is_the_hint_of_the_patched_database() {
        // Two blocks, 130 columns (a task of 128 and one of 2); rows at
        // both ends of both blocks, one given twice, words going up and
        // down by up to 2^14 - 1.
        let (rows, columns) = (2 * RING, 130);
        let mut old = PlainDatabase::new(rows, columns).unwrap();
        let full = vec![0xffu8; old.item_bytes()];
        for r in (0..rows).step_by(3) {
            old.set_item(r, &full).unwrap();
        }
        for r in (1..rows).step_by(5) {
            old.set_item(r, &[(r * 11) as u8, (r >> 2) as u8, 0x33, 0x7e])
                .unwrap();
        }
        let seed = [9u8; 32];
        let mut hint = Hint::new(&old, &seed).unwrap();
        let before = hint.values.clone();
        let changed = [0, 3, 700, RING - 1, RING, RING + 1, 2 * RING - 1, 3];
        let mut new = old.clone();
        for &r in &changed {
            let bytes: Vec<u8> = (0..old.item_bytes())
                .map(|i| if r % 2 == 0 { 0 } else { (i * 37 + r) as u8 })
                .collect();
            new.set_item(r, &bytes).unwrap();
        }
        hint.patch(&old, &new, &changed, &seed).unwrap();
        assert_ne!(hint.values, before);
        assert!(hint.values == Hint::new(&new, &seed).unwrap().values);
        // Nothing changed: the same hint; a row outside, or databases of
        // another shape: refused.
        hint.patch(&new, &new, &[5], &seed).unwrap();
        assert!(hint.values == Hint::new(&new, &seed).unwrap().values);
        assert!(matches!(
            hint.patch(&old, &new, &[rows], &seed),
            Err(Error::Item { .. })
        ));
        let other = PlainDatabase::new(rows, columns + 1).unwrap();
        assert!(matches!(
            hint.patch(&old, &other, &[0], &seed),
            Err(Error::Shape(_))
        ));
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
        let pre = Precomputed::new(&hint, &public);
        let client = YpirClient::new(&[1u8; 32]);
        let keys = client.packing_keys(&public, &[2u8; 32]);
        for row in [0, RING + 5, rows - 1] {
            let query = client.query(row, rows, &public, &[row as u8; 32]).unwrap();
            let answer = answer(&db, &pre, &query, &keys, Kernel::best()).unwrap();
            let item = client.decode(&answer, db.item_bytes()).unwrap();
            assert_eq!(item, db.item(row).unwrap(), "row {row}");
        }
    }

    #[test]
    fn digits_are_spiral_rs_gadget_inverse_transformed() {
        use rand::RngCore;
        let p = params();
        let mut rng = ChaCha20Rng::from_seed([7; 32]);
        let mut v: Vec<u64> = (0..RING).map(|_| rng.next_u64() % p.modulus).collect();
        v[0] = p.modulus - 1;
        v[1] = 0;
        let mut c = PolyMatrixRaw::zero(p, 1, 1);
        c.get_poly_mut(0, 0).copy_from_slice(&v);
        let mut d = PolyMatrixRaw::zero(p, DIGITS, 1);
        spiral_rs::gadget::gadget_invert_rdim(&mut d, &c, 1);
        let d = d.ntt();
        for (i, got) in digits_of(&v).iter().enumerate() {
            let want: Vec<u32> = d.get_poly(i, 0).iter().map(|&x| x as u32).collect();
            assert!(*got == want, "digit {i}");
        }
    }

    #[test]
    fn shapes_hold_the_fullest_item_within_the_limits() {
        // Uniform buckets of 6 entries: one group of 3,584 bytes holds
        // capacity(3584) entries.
        let cap = crate::item::capacity(GROUP_BYTES);
        let load = |per: usize| move |shift: u8| per << shift;
        // The fewest columns, in steps, that hold the fullest item.
        let fits = |s: &YpirShape, most: usize| {
            crate::item::capacity(s.item_bytes()) >= most
                && (s.columns == COLUMN_STEP
                    || crate::item::capacity(words_bytes(s.columns - COLUMN_STEP)) < most)
        };
        // A tiny registry: one item of one step.
        let s = YpirShape::for_registry(0, load(6)).unwrap();
        assert_eq!((s.items(), s.rows(), s.groups()), (1, RING, 1));
        assert_eq!(s.columns, COLUMN_STEP);
        assert!(!s.keeps_hint());
        // Items as full as one group allows, in as few columns as hold them.
        let s = YpirShape::for_registry(16, load(6)).unwrap();
        assert!(load(6)(s.bucket_shift) <= cap && load(6)(s.bucket_shift + 1) > cap);
        assert!(fits(&s, load(6)(s.bucket_shift)));
        assert_eq!(s.groups(), 1);
        // 2^31 entries: MAX_ROWS items of several groups, the last partial.
        let s = YpirShape::for_registry(28, load(8)).unwrap();
        assert_eq!(s.items(), MAX_ROWS);
        assert!(s.groups() > 1 && s.groups() <= usize::from(MAX_GROUPS));
        assert!(fits(&s, load(8)(s.bucket_shift)));
        assert!(s.keeps_hint());
        assert!(s.query_bytes() <= 2_000_000 && s.validate().is_ok());
        assert_eq!(s.answer_bytes(), s.groups() * RING * SWITCHED_BYTES);
        // At MAX_GROUPS: taken; beyond: refused.
        let full = crate::item::capacity(usize::from(MAX_GROUPS) * GROUP_BYTES);
        let s = YpirShape::for_registry(18, |_| full).unwrap();
        assert_eq!(s.groups(), usize::from(MAX_GROUPS));
        assert_eq!(s.columns, u32::from(MAX_GROUPS) * RING as u32);
        assert!(YpirShape::for_registry(18, |_| full + 1).is_err());
        assert!(YpirShape::for_registry(32, load(64)).is_err());
        assert!(YpirShape::for_registry(33, load(1)).is_err());
        for (item_bits, columns) in [(19, 64), (0, 0), (0, 100), (0, 64 * 2048 + 64)] {
            let bad = YpirShape {
                item_bits,
                columns,
                bucket_shift: 0,
            };
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    fn small() -> (YpirShape, YpirDatabase, YpirPirClient, YpirKeys) {
        // 2^12 items of one bucket each; item i holds tags i<<40 and a few;
        // a group and two steps of columns (the second group partial), the
        // hint kept to be patched.
        let shape = YpirShape {
            item_bits: 12,
            columns: RING as u32 + 2 * COLUMN_STEP,
            bucket_shift: 0,
        };
        let tags = |i: usize| vec![(i as u64) << 40, (i as u64 + 7) << 44, 0xdead_beef];
        let db = YpirDatabase::build_keeping(shape, 5, tags, true).unwrap();
        let client = YpirPirClient::new(shape, 5, &[4; 32]).unwrap();
        let keys = YpirKeys::parse(shape, &client.public_parameters()).unwrap();
        (shape, db, client, keys)
    }

    #[test]
    fn a_bucket_is_found_through_the_wire_and_a_patch_is_seen() {
        let (shape, db, client, keys) = small();
        assert_eq!(shape.groups(), 2);
        let hint_bytes = shape.columns as usize * HINT_COLUMN_BYTES;
        assert_eq!(db.bytes(), shape.database_bytes() + hint_bytes);
        for bucket in [0u32, 1, 2_049, 4_095] {
            let query = client.query(bucket).unwrap();
            assert_eq!(query.len(), shape.query_bytes());
            let answer = db.answer(&keys, &query).unwrap();
            assert_eq!(answer.len(), shape.answer_bytes());
            let fps = client.decode(bucket, 5, &answer).unwrap();
            assert!(client.contains(&fps, u64::from(bucket) << 40));
            assert!(!client.contains(&fps, u64::from(bucket + 1) << 40));
            // Another epoch's checksum: an error, not "no match".
            assert!(matches!(
                client.decode(bucket, 6, &answer),
                Err(Error::Integrity)
            ));
        }
        assert!(client.query(4_096).is_err());
        // Three queries in one call share a pass and answer as one by one
        // (the packed b sides come from the keys' cache the second time).
        let queries: Vec<Vec<u8>> = [7u32, 8, 4_000]
            .iter()
            .map(|&b| client.query(b).unwrap())
            .collect();
        let refs: Vec<&[u8]> = queries.iter().map(Vec::as_slice).collect();
        let many = db.answer_many(&keys, &refs).unwrap();
        for ((q, a), bucket) in queries.iter().zip(&many).zip([7u32, 8, 4_000]) {
            assert_eq!(*a, db.answer(&keys, q).unwrap());
            let fps = client.decode(bucket, 5, a).unwrap();
            assert!(client.contains(&fps, u64::from(bucket) << 40));
        }
        let mut bad = refs.clone();
        bad[2] = &refs[2][1..];
        assert!(matches!(
            db.answer_many(&keys, &bad),
            Err(Error::Length { .. })
        ));
        // Item 9 changes; the others stay.
        let patched = db
            .patch(&[9], |i| {
                vec![if i == 9 { 77 << 40 } else { (i as u64) << 40 }]
            })
            .unwrap();
        let answer = patched.answer(&keys, &client.query(9).unwrap()).unwrap();
        let fps = client.decode(9, 5, &answer).unwrap();
        assert!(client.contains(&fps, 77 << 40) && !client.contains(&fps, 9 << 40));
        // A few items: the hint was patched, and is the patched items'.
        let remade = |db: &YpirDatabase| Hint::new(&db.db, &public_seed(5)).unwrap().values;
        let kept = |db: &YpirDatabase| db.hint.as_ref().map(|h| h.values.clone());
        assert!(1 <= hint_patch_rows(shape.rows()));
        assert!(kept(&patched) == Some(remade(&patched)));
        // More than hint_patch_rows: the hint made again, the same way.
        let many: Vec<usize> = (0..=hint_patch_rows(shape.rows())).map(|i| 3 * i).collect();
        let repatched = patched
            .patch(&many, |i| vec![((i as u64) << 40) ^ (1 << 39)])
            .unwrap();
        assert!(kept(&repatched) == Some(remade(&repatched)));
        let answer = repatched.answer(&keys, &client.query(30).unwrap()).unwrap();
        let fps = client.decode(30, 5, &answer).unwrap();
        assert!(client.contains(&fps, (30 << 40) ^ (1 << 39)));
        // Built as the shape says (this one keeps no hint), a patch makes
        // the hint again and answers the same.
        assert!(!shape.keeps_hint());
        let lean = YpirDatabase::build(shape, 5, |i| vec![(i as u64) << 40]).unwrap();
        assert!(lean.hint.is_none() && lean.bytes() == shape.database_bytes());
        let lean = lean.patch(&[30], |_| vec![(30 << 40) ^ (1 << 39)]).unwrap();
        assert!(lean.hint.is_none());
        let answer = lean.answer(&keys, &client.query(30).unwrap()).unwrap();
        let fps = client.decode(30, 5, &answer).unwrap();
        assert!(client.contains(&fps, (30 << 40) ^ (1 << 39)));
    }

    #[test]
    fn hostile_bytes_are_refused_and_a_tampered_answer_is_an_error() {
        let (shape, db, client, keys) = small();
        let query = client.query(3).unwrap();
        assert!(matches!(
            db.answer(&keys, &query[1..]),
            Err(Error::Length { .. })
        ));
        let mut high = query.clone();
        high[7 * 10..7 * 11].copy_from_slice(&[0xff; 7]);
        assert!(matches!(
            db.answer(&keys, &high),
            Err(Error::Coefficient { index: 10, .. })
        ));
        let upload = client.public_parameters();
        assert!(matches!(
            YpirKeys::parse(shape, &upload[..upload.len() - 7]),
            Err(Error::Length { .. })
        ));
        let mut high = upload.clone();
        high[..7].copy_from_slice(&[0xff; 7]);
        assert!(matches!(
            YpirKeys::parse(shape, &high),
            Err(Error::Coefficient { index: 0, .. })
        ));
        // A coefficient of the answer changed by more than the noise, in
        // its a (bits 24-27) or its b (bits 40-47): an error. (Low bits of
        // b are within the noise and decode to the same item.)
        let answer = db.answer(&keys, &query).unwrap();
        for (value, byte, bit) in [
            (0, 3, 0x04),
            (5, 5, 0x10),
            (RING - 1, 5, 0x80),
            (700, 3, 0x01),
        ] {
            let mut bad = answer.clone();
            bad[value * SWITCHED_BYTES + byte] ^= bit;
            assert!(client.decode(3, 5, &bad).is_err(), "value {value}");
        }
        assert!(client.decode(3, 5, &answer[1..]).is_err());
    }

    /// Known answer (docs/vectors/ypir-sp.json): from fixed seeds, the
    /// keys, a query and its answer are fixed bytes.
    #[test]
    fn known_answer() {
        use sha2::{Digest, Sha256};
        let hex = |b: &[u8]| -> String { b.iter().map(|x| format!("{x:02x}")).collect() };
        let shape = YpirShape {
            item_bits: 11,
            columns: RING as u32,
            bucket_shift: 0,
        };
        let db = YpirDatabase::build(shape, 1, |i| vec![(i as u64) << 40, 0x0123_4567_89ab_cdef])
            .unwrap();
        let seed = public_seed(1);
        let client = YpirPirClient::new(shape, 1, &[1; 32]).unwrap();
        let upload = client.public_parameters_from(&[2; 32]);
        let query = client.query_from(1_234, &[3; 32]).unwrap();
        let answer = db
            .answer(&YpirKeys::parse(shape, &upload).unwrap(), &query)
            .unwrap();
        let got = [
            hex(&seed),
            hex(&Sha256::digest(&upload)),
            hex(&Sha256::digest(&query)),
            hex(&Sha256::digest(&answer)),
        ];
        let published = include_str!("../../../docs/vectors/ypir-sp.json");
        for (what, digest) in ["public_seed", "keys", "query", "answer"].iter().zip(&got) {
            assert!(
                published.contains(digest.as_str()),
                "{what}: {digest} is not in docs/vectors/ypir-sp.json"
            );
        }
        // And the answer decodes to item 1234.
        let fps = client.decode(1_234, 1, &answer).unwrap();
        assert!(client.contains(&fps, 1_234 << 40));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]
        #[test]
        fn arbitrary_bytes_never_panic_the_decoders(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40_000)) {
            let shape = YpirShape { item_bits: 0, columns: RING as u32, bucket_shift: 0 };
            let client = YpirPirClient::new(shape, 1, &[2; 32]).unwrap();
            // Stretched to the exact length, as a peer could send.
            let answer: Vec<u8> = bytes.iter().copied().cycle().take(shape.answer_bytes()).collect();
            proptest::prop_assert!(client.decode(0, 1, &bytes).is_err());
            if answer.len() == shape.answer_bytes() {
                proptest::prop_assert!(client.decode(0, 1, &answer).is_err());
            }
            let _ = YpirKeys::parse(shape, &bytes);
        }
    }
}
