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
use std::sync::{Mutex, OnceLock};

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
                    let words = db.column_run(k * RING, RING, j);
                    for (x, &w) in d.get_poly_mut(0, 0).iter_mut().zip(words) {
                        *x = u64::from(w);
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
    /// [`RING`] columns, `2 x RING` values mod q (the packed ciphertext's
    /// `a` then `b`).
    ///
    /// # Errors
    /// A group of the wrong length, a value not below q, too few groups
    /// for `item_bytes`.
    pub fn decode(&self, answer: &[Vec<u64>], item_bytes: usize) -> Result<Vec<u8>> {
        let p = params();
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
            if group.len() != 2 * RING {
                return Err(Error::Length {
                    what: "a YPIR+SP answer",
                    got: group.len() * 8,
                    want: 2 * RING * 8,
                });
            }
            if let Some(index) = group.iter().position(|&x| x >= p.modulus) {
                return Err(Error::Coefficient {
                    what: "a YPIR+SP answer",
                    index,
                });
            }
            let mut a = PolyMatrixRaw::zero(p, 1, 1);
            a.get_poly_mut(0, 0).copy_from_slice(&group[..RING]);
            let a_s = (&a.ntt() * &s).raw();
            words.extend(
                group[RING..]
                    .iter()
                    .zip(a_s.get_poly(0, 0))
                    .map(|(&b, &x)| {
                        let m = (b + p.modulus - x) % p.modulus;
                        (rescale(m, p.modulus, p.pt_modulus) % p.pt_modulus) as u16
                    }),
            );
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

/// `out = a * b` slot by slot (NTT form).
fn mul(a: &[u64], b: &[u64]) -> Ntt {
    let (m0, m1) = MODULI;
    a.iter()
        .zip(b)
        .enumerate()
        .map(|(i, (&x, &y))| (x * y) % if i < RING { m0 } else { m1 })
        .collect()
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
/// group of [`RING`] columns, the packed ciphertext's `a` and, for every
/// automorphism of the packing tree, the gadget digits of the `a` it
/// switches (NTT form). The client's part of an answer is then the `b`
/// side alone: a few products per node, no transform until the last.
pub struct Precomputed {
    columns: usize,
    groups: Vec<Group>,
}

struct Group {
    /// The packed ciphertext's `a` (coefficients mod q).
    alpha: Vec<u64>,
    /// Per node of the tree (`node_id`), the digits' NTTs.
    digits: Vec<[Ntt; DIGITS]>,
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
        let groups = (0..hint.columns / RING)
            .into_par_iter()
            .map(|g| {
                let p = params();
                let leaves: Vec<PolyMatrixNTT<'static>> = (0..RING)
                    .map(|i| {
                        // Column j's LWE ciphertext as a ring one:
                        // a = conj(H_j), so (a s)_0 = <H_j, s>.
                        let mut a = PolyMatrixRaw::zero(p, 1, 1);
                        conjugate(hint.column(g * RING + i), a.get_poly_mut(0, 0));
                        a.ntt()
                    })
                    .collect();
                let mut digits = vec![[Vec::new(), Vec::new(), Vec::new()]; RING - 1];
                let found = Mutex::new(&mut digits);
                let alpha = pack_alpha(LEVELS, 0, &leaves, &key_a, &found);
                Group {
                    alpha: alpha.raw().get_poly(0, 0).to_vec(),
                    digits,
                }
            })
            .collect();
        Self {
            columns: hint.columns,
            groups,
        }
    }

    /// Bytes held.
    #[must_use]
    pub fn memory_bytes(&self) -> usize {
        self.groups.len() * (RING * 8 + (RING - 1) * DIGITS * 2 * RING * 8)
    }
}

/// The `a` side of packing `leaves[start + m 2^(11-l)]`, `m < 2^l`, each
/// automorphism's digits written to `digits` at its node: `a = a_even +
/// y a_odd - K_a G^-1(τ(a_even - y a_odd))`.
fn pack_alpha(
    l: usize,
    start: usize,
    leaves: &[PolyMatrixNTT<'static>],
    key_a: &[PolyMatrixNTT<'static>],
    digits: &Mutex<&mut Vec<[Ntt; DIGITS]>>,
) -> PolyMatrixNTT<'static> {
    if l == 0 {
        return leaves[start].clone();
    }
    let p = params();
    let step = 1 << (LEVELS - l);
    let (even, odd) = if l > LEVELS - 4 {
        rayon::join(
            || pack_alpha(l - 1, start, leaves, key_a, digits),
            || pack_alpha(l - 1, start + step, leaves, key_a, digits),
        )
    } else {
        (
            pack_alpha(l - 1, start, leaves, key_a, digits),
            pack_alpha(l - 1, start + step, leaves, key_a, digits),
        )
    };
    let y_odd = mul(&shifts()[l - 1], odd.get_poly(0, 0));
    let minus = add(even.get_poly(0, 0), &y_odd, true);
    let plus = add(even.get_poly(0, 0), &y_odd, false);
    // τ(minus) in coefficients, cut into digits.
    let mut m = PolyMatrixNTT::zero(p, 1, 1);
    m.get_poly_mut(0, 0).copy_from_slice(&minus);
    let tau = automorph_alloc(&m.raw(), (1 << l) + 1);
    let mut d = PolyMatrixRaw::zero(p, DIGITS, 1);
    gadget_invert_rdim(&mut d, &tau, 1);
    let d = d.ntt();
    let d: [Ntt; DIGITS] = std::array::from_fn(|i| d.get_poly(i, 0).to_vec());
    let mut switched = vec![0; 2 * RING];
    for (i, di) in d.iter().enumerate() {
        switched = add(&switched, &mul(di, key_a[l - 1].get_poly(0, i)), false);
    }
    digits
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)[node_id(l, start)] = d;
    let mut out = PolyMatrixNTT::zero(p, 1, 1);
    out.get_poly_mut(0, 0)
        .copy_from_slice(&add(&plus, &switched, true));
    out
}

/// The `b` side of the same packing, from zero at the leaves (the pass's
/// outputs are added at the root): `b = b_even + y b_odd + τ(b_even -
/// y b_odd) - K_b G^-1(...)`, the digits precomputed, `τ` a permutation of
/// the NTT's slots.
fn pack_beta(l: usize, start: usize, group: &Group, key_b: &[[Vec<u64>; DIGITS]]) -> Ntt {
    let mut out = vec![0; 2 * RING];
    for (di, ki) in group.digits[node_id(l, start)].iter().zip(&key_b[l - 1]) {
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
    blocks_of(db.rows())?;
    if pre.columns != db.columns() || keys.b.len() != LEVELS {
        return Err(Error::Shape(
            "a YPIR+SP answer needs the database's precomputation and 11 levels of keys".into(),
        ));
    }
    let pass = db.first_pass(&[query], MODULI, kernel)?;
    let c = &pass[0];
    let p = params();
    let q = p.modulus;
    pre.groups
        .iter()
        .enumerate()
        .map(|(g, group)| {
            let mut beta = PolyMatrixNTT::zero(p, 1, 1);
            beta.get_poly_mut(0, 0)
                .copy_from_slice(&pack_beta(LEVELS, 0, group, &keys.b));
            let beta = beta.raw();
            let mut out = group.alpha.clone();
            for (i, &b) in beta.get_poly(0, 0).iter().enumerate() {
                // The pass's c_j, times n as the packing multiplies.
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
}
