//! The operator's side: the database in the form the scheme computes on,
//! clients' public parameters, and answers.

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};

use rayon::prelude::*;
use spiral_rs::aligned_memory::AlignedMemory64;
use spiral_rs::client::{PublicParameters, Query};
use spiral_rs::params::Params;

use crate::error::{Error, Result};
use crate::item;
use crate::shape::Shape;
use crate::{answer, ntt};

const SEED_BYTES: usize = 32;
/// Items coded and transformed at once while building (bounds the
/// temporary memory to about 64 items' worth).
const BUILD_CHUNK: usize = 64;

/// The PIR database of one registry version and key epoch: every item's
/// plaintext coefficients in NTT form, one 64-bit word each (two 28-bit
/// CRT residues), laid out as the scheme reads them.
pub struct Database {
    shape: Shape,
    epoch: u64,
    words: AlignedMemory64,
}

impl fmt::Debug for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Database")
            .field("shape", &self.shape)
            .field("epoch", &self.epoch)
            .field("bytes", &(self.words.len() * 8))
            .finish()
    }
}

impl Database {
    /// Builds the database of `shape` for key epoch `epoch`; `tags(i)` gives
    /// the tags of item `i` (its buckets' tags, any order).
    ///
    /// # Errors
    /// [`Error::Overflow`] when an item does not fit the shape.
    pub fn build(
        shape: Shape,
        epoch: u64,
        tags: impl Fn(usize) -> Vec<u64> + Sync,
    ) -> Result<Self> {
        shape.validate()?;
        let mut db = Self {
            shape,
            epoch,
            words: AlignedMemory64::new(shape.database_bytes() / 8),
        };
        let all: Vec<usize> = (0..shape.items()).collect();
        db.write_items(&all, &tags)?;
        Ok(db)
    }

    /// This database with items `changed` coded afresh from `tags` (an
    /// update's change: the cost of the items, plus one copy of the words).
    ///
    /// # Errors
    /// [`Error::Overflow`] when an item no longer fits (build a new shape),
    /// [`Error::Item`] for an index outside the database.
    pub fn patch(
        &self,
        changed: &[usize],
        tags: impl Fn(usize) -> Vec<u64> + Sync,
    ) -> Result<Self> {
        let mut db = Self {
            shape: self.shape,
            epoch: self.epoch,
            words: self.words.clone(),
        };
        db.write_items(changed, &tags)?;
        Ok(db)
    }

    fn write_items(
        &mut self,
        which: &[usize],
        tags: &(impl Fn(usize) -> Vec<u64> + Sync),
    ) -> Result<()> {
        let shape = self.shape;
        let params = shape.params();
        let items = shape.items();
        if let Some(&bad) = which.iter().find(|&&i| i >= items) {
            return Err(Error::Item { index: bad, items });
        }
        for chunk in which.chunks(BUILD_CHUNK) {
            let coded: Vec<(usize, Vec<u64>)> = chunk
                .par_iter()
                .map(|&i| {
                    let bytes = item::encode(&tags(i), i as u64, self.epoch, shape.item_bytes())?;
                    Ok((i, transform(params, &bytes)))
                })
                .collect::<Result<_>>()?;
            for (i, words) in coded {
                self.scatter(i, &words);
            }
        }
        Ok(())
    }

    /// Writes item `i`'s transformed polynomials where the scheme reads them:
    /// word `[chunk][z][i mod 2^nu2][i / 2^nu2]`.
    fn scatter(&mut self, i: usize, words: &[u64]) {
        let params = self.shape.params();
        let (dim0, num_per) = (1usize << params.db_dim_1, 1usize << params.db_dim_2);
        let (ii, j) = (i % num_per, i / num_per);
        let out = self.words.as_mut_slice();
        for (c, poly) in words.chunks(params.poly_len).enumerate() {
            for (z, &w) in poly.iter().enumerate() {
                let at = ((c * params.poly_len + z) * num_per + ii) * dim0 + j;
                if let Some(slot) = out.get_mut(at) {
                    *slot = w;
                }
            }
        }
    }

    /// The shape.
    #[must_use]
    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// The key epoch whose tags it holds.
    #[must_use]
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Bytes held.
    #[must_use]
    pub fn bytes(&self) -> usize {
        self.words.len() * 8
    }

    /// The answer to `query` under `keys`. The work is the same for every
    /// query of the shape (a pass over the whole database), whatever it asks.
    ///
    /// # Errors
    /// [`Error::Length`] or [`Error::Coefficient`] for a malformed query,
    /// [`Error::Shape`] for keys made for other dimensions, [`Error::Scheme`]
    /// if the scheme's code fails anyway.
    pub fn answer(&self, keys: &Keys, query: &[u8]) -> Result<Vec<u8>> {
        self.checked(keys, query, |params, q| {
            let ct = q.ct.as_ref().ok_or(Error::Scheme)?;
            answer::answer(params, &keys.public, ct, self.words.as_slice())
        })
    }

    /// The answer computed by spiral-rs's own `process_query` on this very
    /// database, checked as [`Database::answer`] checks: the outside
    /// baseline `cargo bench --bench pir` measures ours against. The
    /// server never calls it.
    ///
    /// # Errors
    /// As [`Database::answer`].
    #[doc(hidden)]
    pub fn answer_by_spiral_rs(&self, keys: &Keys, query: &[u8]) -> Result<Vec<u8>> {
        self.checked(keys, query, |params, q| {
            Ok(spiral_rs::server::process_query(
                params,
                &keys.public,
                q,
                self.words.as_slice(),
            ))
        })
    }

    /// `evaluate` on `query` once the keys' dimensions, the query's length
    /// and every coefficient were checked, under `catch_unwind`.
    fn checked(
        &self,
        keys: &Keys,
        query: &[u8],
        evaluate: impl FnOnce(&'static Params, &Query<'static>) -> Result<Vec<u8>>,
    ) -> Result<Vec<u8>> {
        if !keys.shape.same_keys(&self.shape) {
            return Err(Error::Shape(
                "the public parameters were made for other dimensions".into(),
            ));
        }
        let params = self.shape.params();
        check_words("PIR query", query, params.query_bytes(), params.modulus)?;
        catch_unwind(AssertUnwindSafe(|| {
            evaluate(params, &Query::deserialize(params, query))
        }))
        .unwrap_or(Err(Error::Scheme))
    }
}

/// One item's bytes as the scheme's plaintext polynomials (a byte per
/// coefficient, centred as spiral-rs's `recenter_mod` does: above p/2 is
/// negative), transformed, the two residues packed per word.
fn transform(params: &'static Params, bytes: &[u8]) -> Vec<u64> {
    let n = params.poly_len;
    let half = params.pt_modulus / 2;
    let mut out = Vec::with_capacity(bytes.len());
    let mut coeffs = vec![0i32; n];
    let mut words = vec![0u64; params.crt_count * n];
    for chunk in bytes.chunks(n) {
        coeffs.fill(0);
        for (c, &b) in coeffs.iter_mut().zip(chunk) {
            let b = u64::from(b);
            *c = if b > half {
                b as i32 - params.pt_modulus as i32
            } else {
                b as i32
            };
        }
        ntt::forward_signed(params, &mut words, &coeffs);
        let (lo, hi) = words.split_at(n.min(words.len()));
        out.extend(lo.iter().zip(hi).map(|(&a, &b)| a | (b << 32)));
    }
    out
}

/// Checks bytes in the scheme's serialisation: a 32-byte seed, then
/// little-endian words, each below `modulus`.
fn check_words(what: &'static str, bytes: &[u8], want: usize, modulus: u64) -> Result<()> {
    if bytes.len() != want {
        return Err(Error::Length {
            what,
            got: bytes.len(),
            want,
        });
    }
    let words = bytes.get(SEED_BYTES..).unwrap_or_default();
    for (index, w) in words.chunks_exact(8).enumerate() {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        if u64::from_le_bytes(b) >= modulus {
            return Err(Error::Coefficient { what, index });
        }
    }
    Ok(())
}

/// A client's public parameters (key-switching matrices), checked and
/// transformed: what the server needs to answer that client's queries and
/// nothing else (they cannot decrypt).
pub struct Keys {
    shape: Shape,
    public: PublicParameters<'static>,
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keys")
            .field("shape", &self.shape)
            .field("bytes", &self.memory_bytes())
            .finish_non_exhaustive()
    }
}

impl Keys {
    /// Checks and loads public parameters uploaded for `shape`.
    ///
    /// # Errors
    /// [`Error::Length`] or [`Error::Coefficient`] for malformed bytes,
    /// [`Error::Scheme`] if the scheme's code fails anyway.
    pub fn parse(shape: Shape, bytes: &[u8]) -> Result<Self> {
        shape.validate()?;
        let params = shape.params();
        check_words(
            "PIR public parameters",
            bytes,
            params.setup_bytes(),
            params.modulus,
        )?;
        let public = catch_unwind(AssertUnwindSafe(|| {
            PublicParameters::deserialize(params, bytes)
        }))
        .map_err(|_| Error::Scheme)?;
        Ok(Self { shape, public })
    }

    /// The shape they were made for.
    #[must_use]
    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// Memory they take, in bytes.
    #[must_use]
    pub fn memory_bytes(&self) -> usize {
        let p = &self.public;
        let words = |v: &[spiral_rs::poly::PolyMatrixNTT<'_>]| -> usize {
            v.iter().map(|m| m.data.len()).sum()
        };
        8 * (words(&p.v_packing)
            + p.v_expansion_left.as_deref().map_or(0, words)
            + p.v_expansion_right.as_deref().map_or(0, words)
            + p.v_conversion.as_deref().map_or(0, words))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_are_transformed_as_spiral_rs_would() {
        use spiral_rs::arith::recenter_mod;
        use spiral_rs::poly::{PolyMatrix, PolyMatrixRaw};
        let params = Shape::for_registry(0, |_| 5).expect("shape").params();
        let n = params.poly_len;
        let bytes: Vec<u8> = (0..n + 100).map(|i| (i * 37 % 256) as u8).collect();
        let words = transform(params, &bytes);
        assert_eq!(words.len(), 2 * n);
        for (chunk, got) in bytes.chunks(n).zip(words.chunks(n)) {
            let mut poly = PolyMatrixRaw::zero(params, 1, 1);
            for (slot, &b) in poly.data.as_mut_slice().iter_mut().zip(chunk) {
                *slot = recenter_mod(u64::from(b), params.pt_modulus, params.modulus);
            }
            let ntt = poly.ntt();
            let (lo, hi) = ntt.as_slice().split_at(n);
            let want: Vec<u64> = lo.iter().zip(hi).map(|(&a, &b)| a | (b << 32)).collect();
            assert_eq!(got, want.as_slice());
        }
    }

    #[test]
    fn out_of_range_words_are_refused_before_any_work() {
        let want = 32 + 16;
        let mut bytes = vec![0u8; want];
        assert!(check_words("q", &bytes, want, 100).is_ok());
        bytes[32 + 8] = 100;
        assert_eq!(
            check_words("q", &bytes, want, 100),
            Err(Error::Coefficient {
                what: "q",
                index: 1
            })
        );
        assert!(matches!(
            check_words("q", &bytes[..40], want, 100),
            Err(Error::Length { got: 40, .. })
        ));
    }
}
