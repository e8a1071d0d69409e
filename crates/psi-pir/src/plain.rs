//! The plain database of the LWE PIR family (SimplePIR, Henzinger et al.,
//! USENIX Security 2023; YPIR and YPIR+SP, Menon and Wu, USENIX Security
//! 2024), and the answer's pass over it: the core of PIR mode at
//! population scale.
//!
//! The database is the items themselves, as words of [`WORD_BITS`] bits
//! held in `u16`s (16/14 = 1.14 times the items' bytes), one item per row.
//! It is stored in tiles of `PASS_CHUNK_ROWS` rows (the last one shorter),
//! each tile column by column, so that the answer's pass reads it once,
//! front to back, at memory speed, while the queries' words for the tile
//! stay in the core's cache. Items are patched in place
//! ([`PlainDatabase::patch`], in memory order): an update touches only the
//! items it changes.
//!
//! The pass ([`PlainDatabase::first_pass`]) multiplies the queries' vectors
//! (one word per row, carrying two residues of the scheme's CRT modulus,
//! low and high 32 bits) by the database: for every column, the sum of
//! query word times database word, modulo each residue's prime. It serves
//! up to [`MAX_QUERIES_PER_PASS`] queries with one read of the database,
//! splits the columns across rayon's threads, and runs the widest kernel
//! the CPU has (AVX-512, AVX2, or the portable build: `kernels`).
//!
//! `ypir` builds YPIR+SP on it: queries as ring-LWE encryptions from a
//! public seed, the hint, and the pass's outputs packed into ring-LWE
//! ciphertexts, so that the client downloads no hint.

use rayon::prelude::*;

pub use crate::kernels::Kernel;
use crate::kernels::{plain_pass, PASS_CHUNK_ROWS};
use crate::{Error, Result};

/// Bits of an item per database word (YPIR+SP's plaintext modulus 2^14).
pub const WORD_BITS: usize = 14;

/// Queries answered by one pass over the database at most.
pub const MAX_QUERIES_PER_PASS: usize = 4;

/// Columns of a tile a thread takes at a time: enough to stream, few
/// enough to share a small database's work on any number of cores.
const COLUMNS_PER_TASK: usize = 256;

/// Columns a patch writes at a time (a cache line of an item's words).
const PATCH_COLUMNS: usize = 32;

/// Items as rows of 14-bit words, in tiles of rows stored column by column.
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

    /// Tile `c`: its first row, its rows, and where its words start.
    fn tile(&self, c: usize) -> (usize, usize, usize) {
        let start = c * PASS_CHUNK_ROWS;
        let len = PASS_CHUNK_ROWS.min(self.rows - start);
        (start, len, start * self.columns)
    }

    /// Where the word of `row` in `column` is.
    fn at(&self, row: usize, column: usize) -> usize {
        let (start, len, offset) = self.tile(row / PASS_CHUNK_ROWS);
        offset + column * len + (row - start)
    }

    /// The words of `column` for rows `first..first + len`, a run within
    /// one tile (`PASS_CHUNK_ROWS` is a multiple of `len` and of `first`'s
    /// alignment); empty outside the database.
    pub(crate) fn column_run(&self, first: usize, len: usize, column: usize) -> &[u16] {
        if len == 0 || first / PASS_CHUNK_ROWS != (first + len - 1) / PASS_CHUNK_ROWS {
            return &[];
        }
        let at = self.at(first, column);
        self.words.get(at..at + len).unwrap_or_default()
    }

    /// The word of `row` in `column` (0 outside the database).
    pub(crate) fn word(&self, row: usize, column: usize) -> u16 {
        if row >= self.rows || column >= self.columns {
            return 0;
        }
        self.words.get(self.at(row, column)).copied().unwrap_or(0)
    }

    /// Bytes the database takes in memory.
    #[must_use]
    pub fn memory_bytes(&self) -> usize {
        self.words.len() * 2
    }

    /// Writes item `row` (at most [`PlainDatabase::item_bytes`] bytes; the
    /// rest of the item is zero): bits in order, little-endian, 14 to a
    /// word. For many items, [`PlainDatabase::patch`] is faster.
    ///
    /// # Errors
    /// A row outside the database, or too many bytes.
    pub fn set_item(&mut self, row: usize, bytes: &[u8]) -> Result<()> {
        self.patch(&[(row, bytes)])
    }

    /// Writes many items at once, as [`PlainDatabase::set_item`] would one
    /// after the other (a row given twice keeps its last bytes), in memory
    /// order: tile by tile, column by column, so an update's changed items
    /// cost a few passes over the tiles they touch rather than a cache miss
    /// per word. Nothing is written unless every item is valid.
    ///
    /// # Errors
    /// A row outside the database, or an item of too many bytes.
    pub fn patch(&mut self, items: &[(usize, &[u8])]) -> Result<()> {
        for &(row, bytes) in items {
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
        }
        // The last bytes given for each row, in row order, as words.
        let mut rows: Vec<(usize, &[u8])> = items.iter().rev().copied().collect();
        rows.sort_by_key(|&(row, _)| row);
        rows.dedup_by_key(|(row, _)| *row);
        let columns = self.columns;
        let mut words = vec![0u16; rows.len() * columns];
        for (&(_, bytes), out) in rows.iter().zip(words.chunks_exact_mut(columns)) {
            to_words(bytes, out);
        }
        let mut words = words.chunks_exact(columns);
        for group in rows.chunk_by(|a, b| a.0 / PASS_CHUNK_ROWS == b.0 / PASS_CHUNK_ROWS) {
            let group_words: Vec<&[u16]> = words.by_ref().take(group.len()).collect();
            let (start, len, offset) =
                self.tile(group.first().map_or(0, |g| g.0) / PASS_CHUNK_ROWS);
            let tile = self
                .words
                .get_mut(offset..offset + len * columns)
                .unwrap_or_default();
            // Columns a few at a time: an item's words for them are one
            // read, and each column's writes go front to back.
            for (block, stored) in tile.chunks_mut(len * PATCH_COLUMNS).enumerate() {
                let mut stored: Vec<&mut [u16]> = stored.chunks_exact_mut(len).collect();
                let first = block * PATCH_COLUMNS;
                for (&(row, _), item) in group.iter().zip(&group_words) {
                    let item = item.get(first..).unwrap_or_default();
                    for (column, &word) in stored.iter_mut().zip(item) {
                        if let Some(w) = column.get_mut(row - start) {
                            *w = word;
                        }
                    }
                }
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
        let words: Vec<u16> = (0..self.columns).map(|c| self.word(row, c)).collect();
        Ok(from_words(&words, self.item_bytes()))
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
        (p_lo, p_hi): (u64, u64),
        kernel: Kernel,
    ) -> Vec<Vec<u64>> {
        // Tasks in memory order (tile by tile, columns in blocks): each
        // thread streams through its share of the database.
        let tiles = self.rows.div_ceil(PASS_CHUNK_ROWS);
        let blocks = self.columns.div_ceil(COLUMNS_PER_TASK);
        let partial: Vec<Vec<[u64; K]>> = (0..tiles * blocks)
            .into_par_iter()
            .map(|task| {
                let (c, b) = (task / blocks, task % blocks);
                let (start, len, offset) = self.tile(c);
                let first = b * COLUMNS_PER_TASK;
                let end = self.columns.min(first + COLUMNS_PER_TASK);
                let words = self
                    .words
                    .get(offset + first * len..offset + end * len)
                    .unwrap_or_default();
                let qs: [&[u64]; K] =
                    queries.map(|q| q.get(start..start + len).unwrap_or_default());
                let mut out = vec![[0u64; K]; end - first];
                plain_pass(kernel, qs, words, len, (p_lo, p_hi), &mut out);
                out
            })
            .collect();
        let mut out = vec![vec![0u64; self.columns]; K];
        for (task, sums) in partial.iter().enumerate() {
            let first = (task % blocks) * COLUMNS_PER_TASK;
            for (j, s) in sums.iter().enumerate() {
                for (o, &v) in out.iter_mut().zip(s) {
                    if let Some(acc) = o.get_mut(first + j) {
                        let lo = ((*acc & 0xffff_ffff) + (v & 0xffff_ffff)) % p_lo;
                        let hi = ((*acc >> 32) + (v >> 32)) % p_hi;
                        *acc = lo | (hi << 32);
                    }
                }
            }
        }
        out
    }
}

/// An item's first `len` bytes from its words, as [`to_words`] wrote them
/// (fewer when the words hold fewer).
#[must_use]
pub fn from_words(words: &[u16], len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut bits = 0u32;
    let mut held = 0usize;
    for &word in words {
        if out.len() == len {
            break;
        }
        bits |= u32::from(word & ((1 << WORD_BITS) - 1)) << held;
        held += WORD_BITS;
        while held >= 8 && out.len() < len {
            out.push(bits as u8);
            bits >>= 8;
            held -= 8;
        }
    }
    out
}

/// An item's bytes as words: bits in order, little-endian, 14 to a word;
/// `out` is filled whole (zero words past the bytes).
fn to_words(bytes: &[u8], out: &mut [u16]) {
    let mut bits = 0u32;
    let mut held = 0usize;
    let mut bytes = bytes.iter();
    for word in out {
        while held < WORD_BITS {
            bits |= u32::from(bytes.next().copied().unwrap_or(0)) << held;
            held += 8;
        }
        *word = (bits & ((1 << WORD_BITS) - 1)) as u16;
        bits >>= WORD_BITS;
        held -= WORD_BITS;
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
                    let d = u128::from(db.words[db.at(i, j)]);
                    lo += u128::from(w & 0xffff_ffff) * d;
                    hi += u128::from(w >> 32) * d;
                }
                (lo % u128::from(MODULI.0)) as u64 | ((hi % u128::from(MODULI.1)) as u64) << 32
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
        // An item's first bytes from more words than it needs (a partial
        // group's answer is decoded whole): the rest is ignored.
        let mut words = vec![0u16; 4096];
        to_words(&a, &mut words);
        assert_eq!(from_words(&words, 15), a);
        assert_eq!(from_words(&words, 4), a[..4]);
    }

    #[test]
    fn a_patch_writes_as_items_one_by_one_would() {
        // Rows over three tiles, a row given twice (the last bytes win),
        // items out of order.
        let rows = 2 * PASS_CHUNK_ROWS + 5;
        let mut patched = PlainDatabase::new(rows, 7).unwrap();
        let mut one_by_one = patched.clone();
        let items: Vec<(usize, Vec<u8>)> = [rows - 1, 3, PASS_CHUNK_ROWS, 3, 0, rows - 6]
            .iter()
            .enumerate()
            .map(|(n, &row)| (row, vec![n as u8 * 41 + 7; 12 - n]))
            .collect();
        for (row, bytes) in &items {
            one_by_one.set_item(*row, bytes).unwrap();
        }
        let refs: Vec<(usize, &[u8])> = items.iter().map(|(r, b)| (*r, b.as_slice())).collect();
        patched.patch(&refs).unwrap();
        assert_eq!(patched.words, one_by_one.words);
        assert_eq!(patched.item(3).unwrap()[..9], [130; 9]);
        // One bad item: nothing is written.
        let before = patched.words.clone();
        assert!(patched.patch(&[(1, &[9; 4]), (rows, &[1])]).is_err());
        assert!(patched.patch(&[(1, &[9; 4]), (2, &[1; 13])]).is_err());
        assert_eq!(patched.words, before);
    }

    #[test]
    fn every_kernel_sums_as_the_definition_does() {
        // Rows over one chunk, so partial sums are carried; columns not a
        // multiple of a task's.
        let rows = 2 * PASS_CHUNK_ROWS + 77;
        let mut db = PlainDatabase::new(rows, COLUMNS_PER_TASK + 45).unwrap();
        let mut x = 0x1234_5678_u64;
        for w in &mut db.words {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            *w = (x >> 50) as u16 & ((1 << WORD_BITS) - 1);
        }
        // The largest words, for the bounds.
        for i in 0..rows {
            let at = db.at(i, 0);
            db.words[at] = (1 << WORD_BITS) - 1;
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
        assert!(db
            .first_pass(&[q.as_slice(); 5], MODULI, Kernel::Portable)
            .is_err());
        assert!(db.first_pass(&[&q], (0, 7), Kernel::Portable).is_err());
    }
}
