//! The plain database of the LWE PIR family (SimplePIR, Henzinger et al.,
//! USENIX Security 2023; YPIR and YPIR+SP, Menon and Wu, USENIX Security
//! 2024), and the answer's pass over it: the groundwork of PIR mode at
//! population scale (issue #24).
//!
//! The database is the items themselves, as words of [`WORD_BITS`] bits
//! held in `u16`s (16/14 = 1.14 times the items' bytes), one item per row
//! and stored column by column, so that the answer's pass reads it once,
//! front to back, at memory speed. An item is patched in place
//! ([`PlainDatabase::set_item`]): an update touches only the items it
//! changes.
//!
//! The pass ([`PlainDatabase::first_pass`]) multiplies the queries' vectors
//! (one word per row, carrying two residues of the scheme's CRT modulus,
//! low and high 32 bits) by the database: for every column, the sum of
//! query word times database word, modulo each residue's prime. It serves
//! up to [`MAX_QUERIES_PER_PASS`] queries with one read of the database,
//! splits the columns across rayon's threads, and runs the widest kernel
//! the CPU has (AVX-512, AVX2, or the portable build: `kernels`).
//!
//! What YPIR+SP adds on top, and is not built yet: queries generated as
//! ring-LWE encryptions from a public seed, the server's precomputed hint
//! (the database times the queries' public part) and the packing of the
//! pass's outputs into ring-LWE ciphertexts with the client's key-switching
//! keys, so that the client downloads no hint. Until then nothing serves
//! from this database; the benchmarks measure the pass against the
//! machine's read bandwidth.

use rayon::prelude::*;

pub use crate::kernels::Kernel;
use crate::kernels::plain_pass;
#[cfg(test)]
use crate::kernels::PASS_CHUNK_ROWS;
use crate::{Error, Result};

/// Bits of an item per database word (YPIR+SP's plaintext modulus 2^14).
pub const WORD_BITS: usize = 14;

/// Queries answered by one pass over the database at most.
pub const MAX_QUERIES_PER_PASS: usize = 4;

/// Columns a thread takes at a time: enough to stream, few enough to
/// share the work on any number of cores.
const COLUMNS_PER_TASK: usize = 32;

/// Items as rows of 14-bit words, stored column by column.
#[derive(Clone)]
pub struct PlainDatabase {
    rows: usize,
    columns: usize,
    words: Vec<u16>,
}

impl std::fmt::Debug for PlainDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlainDatabase")
            .field("rows", &self.rows)
            .field("columns", &self.columns)
            .finish_non_exhaustive()
    }
}

impl PlainDatabase {
    /// An empty database (every item all zero bits) of `rows` items of
    /// `columns` words each.
    ///
    /// # Errors
    /// No rows or columns, or more words than this machine can address.
    pub fn new(rows: usize, columns: usize) -> Result<Self> {
        let words = rows
            .checked_mul(columns)
            .filter(|&w| rows > 0 && columns > 0 && w <= isize::MAX as usize / 2)
            .ok_or_else(|| Error::Shape(format!("a plain database of {rows} x {columns} words")))?;
        Ok(Self {
            rows,
            columns,
            words: vec![0; words],
        })
    }

    /// Items (rows).
    #[must_use]
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Words per item (columns).
    #[must_use]
    pub fn columns(&self) -> usize {
        self.columns
    }

    /// Bytes an item holds: its words' bits, whole bytes.
    #[must_use]
    pub fn item_bytes(&self) -> usize {
        self.columns * WORD_BITS / 8
    }

    /// Bytes the database takes in memory.
    #[must_use]
    pub fn memory_bytes(&self) -> usize {
        self.words.len() * 2
    }

    /// Writes item `row` (at most [`PlainDatabase::item_bytes`] bytes; the
    /// rest of the item is zero): bits in order, little-endian, 14 to a
    /// word.
    ///
    /// # Errors
    /// A row outside the database, or too many bytes.
    pub fn set_item(&mut self, row: usize, bytes: &[u8]) -> Result<()> {
        if row >= self.rows {
            return Err(Error::Item {
                index: row,
                items: self.rows,
            });
        }
        if bytes.len() > self.item_bytes() {
            return Err(Error::Length {
                what: "an item",
                got: bytes.len(),
                want: self.item_bytes(),
            });
        }
        let mut bits = 0u32;
        let mut held = 0usize;
        let mut bytes = bytes.iter();
        for column in 0..self.columns {
            while held < WORD_BITS {
                bits |= u32::from(bytes.next().copied().unwrap_or(0)) << held;
                held += 8;
            }
            let word = (bits & ((1 << WORD_BITS) - 1)) as u16;
            bits >>= WORD_BITS;
            held -= WORD_BITS;
            if let Some(w) = self.words.get_mut(column * self.rows + row) {
                *w = word;
            }
        }
        Ok(())
    }

    /// Item `row`'s bytes, as [`PlainDatabase::set_item`] wrote them.
    ///
    /// # Errors
    /// A row outside the database.
    pub fn item(&self, row: usize) -> Result<Vec<u8>> {
        if row >= self.rows {
            return Err(Error::Item {
                index: row,
                items: self.rows,
            });
        }
        let mut out = Vec::with_capacity(self.item_bytes());
        let mut bits = 0u32;
        let mut held = 0usize;
        for column in 0..self.columns {
            let word = self.words.get(column * self.rows + row).copied().unwrap_or(0);
            bits |= u32::from(word) << held;
            held += WORD_BITS;
            while held >= 8 && out.len() < self.item_bytes() {
                out.push(bits as u8);
                bits >>= 8;
                held -= 8;
            }
        }
        Ok(out)
    }

    /// The answer's first pass for 1 to [`MAX_QUERIES_PER_PASS`] queries,
    /// each a word per row carrying two residues (low and high 32 bits,
    /// each below its modulus, both moduli below 2^32): per query, per
    /// column, `(sum lo(q_i) d_ij mod moduli.0) | (sum hi(q_i) d_ij mod
    /// moduli.1) << 32`. One read of the database serves them all; the
    /// columns are shared across rayon's threads.
    ///
    /// # Errors
    /// No queries or too many, a query of the wrong length, a residue out
    /// of range, a modulus of 0 or over 32 bits, a kernel this CPU lacks.
    pub fn first_pass(
        &self,
        queries: &[&[u64]],
        moduli: (u64, u64),
        kernel: Kernel,
    ) -> Result<Vec<Vec<u64>>> {
        if queries.is_empty() || queries.len() > MAX_QUERIES_PER_PASS {
            return Err(Error::Shape(format!(
                "a pass answers 1 to {MAX_QUERIES_PER_PASS} queries, not {}",
                queries.len()
            )));
        }
        if !(1..=1 << 32).contains(&moduli.0) || !(1..=1 << 32).contains(&moduli.1) {
            return Err(Error::Shape("a residue's modulus is 1 to 2^32".into()));
        }
        if !kernel.available() {
            return Err(Error::Shape(format!("this CPU has no {kernel:?}")));
        }
        for q in queries {
            if q.len() != self.rows {
                return Err(Error::Length {
                    what: "a query",
                    got: q.len() * 8,
                    want: self.rows * 8,
                });
            }
            if let Some(index) = q
                .iter()
                .position(|&w| (w & 0xffff_ffff) >= moduli.0 || (w >> 32) >= moduli.1)
            {
                return Err(Error::Coefficient {
                    what: "a query",
                    index,
                });
            }
        }
        let sums = match queries {
            [a] => self.pass([*a], moduli, kernel),
            [a, b] => self.pass([*a, *b], moduli, kernel),
            [a, b, c] => self.pass([*a, *b, *c], moduli, kernel),
            [a, b, c, d] => self.pass([*a, *b, *c, *d], moduli, kernel),
            _ => unreachable!("counted above"),
        };
        Ok(sums)
    }

    fn pass<const K: usize>(
        &self,
        queries: [&[u64]; K],
        moduli: (u64, u64),
        kernel: Kernel,
    ) -> Vec<Vec<u64>> {
        let mut sums = vec![[0u64; K]; self.columns];
        sums.par_chunks_mut(COLUMNS_PER_TASK)
            .zip(self.words.par_chunks(COLUMNS_PER_TASK * self.rows))
            .for_each(|(out, words)| plain_pass(kernel, queries, words, self.rows, moduli, out));
        let mut out = vec![Vec::with_capacity(self.columns); K];
        for s in &sums {
            for (o, &v) in out.iter_mut().zip(s) {
                o.push(v);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// YPIR's CRT primes (both below 2^28).
    const MODULI: (u64, u64) = (268_369_921, 249_561_089);

    fn query(rows: usize, seed: u64) -> Vec<u64> {
        let mut x = seed | 1;
        (0..rows)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % MODULI.0) | ((x >> 20) % MODULI.1) << 32
            })
            .collect()
    }

    fn naive(db: &PlainDatabase, q: &[u64]) -> Vec<u64> {
        (0..db.columns)
            .map(|j| {
                let (mut lo, mut hi) = (0u128, 0u128);
                for (i, &w) in q.iter().enumerate() {
                    let d = u128::from(db.words[j * db.rows + i]);
                    lo += u128::from(w & 0xffff_ffff) * d;
                    hi += u128::from(w >> 32) * d;
                }
                (lo % u128::from(MODULI.0)) as u64
                    | ((hi % u128::from(MODULI.1)) as u64) << 32
            })
            .collect()
    }

    #[test]
    fn items_round_trip_and_patch_in_place() {
        let mut db = PlainDatabase::new(5, 9).unwrap();
        assert_eq!(db.item_bytes(), 15);
        let a: Vec<u8> = (0..15u8).map(|i| i.wrapping_mul(37) ^ 0xa5).collect();
        db.set_item(3, &a).unwrap();
        assert_eq!(db.item(3).unwrap(), a);
        assert_eq!(db.item(2).unwrap(), vec![0; 15]);
        db.set_item(3, &[0xff]).unwrap();
        let mut b = vec![0u8; 15];
        b[0] = 0xff;
        assert_eq!(db.item(3).unwrap(), b, "a patch replaces the whole item");
        assert!(db.words.iter().all(|&w| w < 1 << WORD_BITS));
        assert!(matches!(db.set_item(5, &a), Err(Error::Item { .. })));
        assert!(matches!(
            db.set_item(0, &[0; 16]),
            Err(Error::Length { .. })
        ));
        assert!(PlainDatabase::new(0, 4).is_err());
    }

    #[test]
    fn every_kernel_sums_as_the_definition_does() {
        // Rows over one chunk, so partial sums are carried; columns not a
        // multiple of a task's.
        let rows = PASS_CHUNK_ROWS + 77;
        let mut db = PlainDatabase::new(rows, 45).unwrap();
        let mut x = 0x1234_5678_u64;
        for w in &mut db.words {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            *w = (x >> 50) as u16 & ((1 << WORD_BITS) - 1);
        }
        // The largest words, for the bounds.
        for w in db.words.iter_mut().take(rows) {
            *w = (1 << WORD_BITS) - 1;
        }
        let qs: Vec<Vec<u64>> = (0..4).map(|s| query(rows, s + 11)).collect();
        let want: Vec<Vec<u64>> = qs.iter().map(|q| naive(&db, q)).collect();
        for kernel in [Kernel::Portable, Kernel::Avx2, Kernel::Avx512] {
            if !kernel.available() {
                println!("this CPU has no {kernel:?}: its build is not tested here");
                continue;
            }
            for k in 1..=4 {
                let refs: Vec<&[u64]> = qs.iter().take(k).map(Vec::as_slice).collect();
                let got = db.first_pass(&refs, MODULI, kernel).unwrap();
                assert_eq!(got, want[..k], "{kernel:?} with {k} queries");
            }
        }
    }

    #[test]
    fn a_bad_query_is_refused_before_any_work() {
        let db = PlainDatabase::new(64, 8).unwrap();
        let q = query(64, 3);
        let short = &q[..63];
        assert!(matches!(
            db.first_pass(&[short], MODULI, Kernel::Portable),
            Err(Error::Length { .. })
        ));
        let mut high = q.clone();
        high[9] = MODULI.0;
        assert!(matches!(
            db.first_pass(&[&high], MODULI, Kernel::Portable),
            Err(Error::Coefficient { index: 9, .. })
        ));
        assert!(db.first_pass(&[], MODULI, Kernel::Portable).is_err());
        assert!(db.first_pass(&[q.as_slice(); 5], MODULI, Kernel::Portable).is_err());
        assert!(db.first_pass(&[&q], (0, 7), Kernel::Portable).is_err());
    }
}
