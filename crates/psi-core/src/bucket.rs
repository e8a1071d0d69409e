//! The bucket index of the bucket mode: the registry's tags grouped by the
//! bucket of their record, the first `p` bits of
//! `SHA-256("psi.v1.bucket" || record)`. A client sends its record's bucket
//! with its blinded element and receives that bucket's tags; the server learns
//! those `p` bits and nothing else about the record.
//!
//! `p` is chosen so that a bucket holds on average at least
//! [`MIN_MEAN_BUCKET`] entries. Tags are kept whole (64 bits): a lookup's
//! false-positive rate is at most `bucket size / 2^64`, far below 2^-32.
//! In memory: 8 bytes per entry plus 8 bytes per bucket (well under 12), or
//! next to nothing when the tags are read in place from a memory-mapped
//! index ([`BucketIndex::from_shared`]); an update's change is kept beside
//! the base bucket by bucket ([`BucketIndex::apply`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::tag::Tag;
use crate::tagset::Reader;

/// Least average number of registry entries per bucket.
pub const MIN_MEAN_BUCKET: u64 = 1024;
/// First bytes of a serialised bucket index.
pub const BUCKET_MAGIC: &[u8; 8] = b"PSIBKT\x00\x01";
/// Serialisation format version.
pub const BUCKET_VERSION: u16 = 1;
/// Most prefix bits a bucket id has.
pub const MAX_PREFIX_BITS: u8 = 32;
const WHAT: &str = "bucket index";

/// Prefix bits for a registry of `n` entries: the largest `p` with
/// `n / 2^p >= 1024` (0 below 2048 entries), so the mean bucket holds
/// between 1024 and 2047 entries.
#[must_use]
pub fn prefix_bits_for(n: u64) -> u8 {
    let ratio = n / MIN_MEAN_BUCKET;
    if ratio < 2 {
        return 0;
    }
    // The cast cannot truncate: at most 63.
    let p = (63 - ratio.leading_zeros()) as u8;
    p.min(MAX_PREFIX_BITS)
}

/// Bytes an index's tags can be read from in place: a memory-mapped file,
/// say (the owner keeps them alive as long as any index uses them).
pub type SharedBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// Where the base tags are: decoded in memory, or the big-endian words of a
/// serialised index, read in place.
#[derive(Clone)]
enum Store {
    Words(Arc<Vec<u64>>),
    Bytes { bytes: SharedBytes, start: usize },
}

/// One bucket's sorted tags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Run<'a> {
    /// Decoded words.
    Words(&'a [u64]),
    /// Big-endian words of a serialised index.
    Bytes(&'a [u8]),
    /// A bucket that changed since the base: merged on demand.
    Merged(Vec<u64>),
}

impl Run<'_> {
    /// Number of tags.
    #[must_use]
    pub fn len(&self) -> usize {
        match self {
            Run::Words(w) => w.len(),
            Run::Bytes(b) => b.len() / 8,
            Run::Merged(v) => v.len(),
        }
    }

    /// Whether the bucket is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tag `i`, if there is one.
    #[must_use]
    pub fn get(&self, i: usize) -> Option<u64> {
        match self {
            Run::Words(w) => w.get(i).copied(),
            Run::Bytes(b) => b
                .get(i.checked_mul(8)?..)?
                .first_chunk::<8>()
                .map(|c| u64::from_be_bytes(*c)),
            Run::Merged(v) => v.get(i).copied(),
        }
    }

    /// The tags in order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.len()).filter_map(move |i| self.get(i))
    }

    /// Whether `tag` is in the bucket (binary search).
    #[must_use]
    pub fn contains(&self, tag: u64) -> bool {
        let (mut lo, mut hi) = (0, self.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.get(mid).map(|t| t.cmp(&tag)) {
                Some(std::cmp::Ordering::Less) => lo = mid + 1,
                Some(std::cmp::Ordering::Greater) => hi = mid,
                Some(std::cmp::Ordering::Equal) => return true,
                None => return false,
            }
        }
        false
    }

    /// The tags as big-endian words, as the wire carries them.
    #[must_use]
    pub fn to_be_bytes(&self) -> Vec<u8> {
        match self {
            Run::Bytes(b) => b.to_vec(),
            _ => self.iter().flat_map(u64::to_be_bytes).collect(),
        }
    }

    /// The tags, decoded.
    #[must_use]
    pub fn to_vec(&self) -> Vec<u64> {
        self.iter().collect()
    }
}

/// What changed in one bucket since the base: tags added (absent from the
/// base) and removed (present in it), each sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Change {
    added: Vec<u64>,
    removed: Vec<u64>,
}

/// The registry's tags grouped by bucket, each bucket sorted: a base (in
/// memory, or read in place from a serialised index) and, after
/// [`BucketIndex::apply`], the changes since, kept apart and merged per
/// bucket on demand, so applying an update costs the update, not the index.
#[derive(Clone)]
pub struct BucketIndex {
    prefix_bits: u8,
    epoch: u64,
    registry_version: u64,
    /// `offsets[b]..offsets[b + 1]` is bucket `b`'s run in the base.
    offsets: Arc<Vec<u64>>,
    store: Store,
    /// Changed buckets.
    changes: Arc<BTreeMap<u32, Change>>,
    len: usize,
}

impl std::fmt::Debug for BucketIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BucketIndex")
            .field("prefix_bits", &self.prefix_bits)
            .field("epoch", &self.epoch)
            .field("registry_version", &self.registry_version)
            .field("len", &self.len)
            .field("changed_buckets", &self.changes.len())
            .field("in_place", &matches!(self.store, Store::Bytes { .. }))
            .finish()
    }
}

impl PartialEq for BucketIndex {
    /// Same parameters and the same tags in every bucket, however stored.
    fn eq(&self, other: &Self) -> bool {
        self.prefix_bits == other.prefix_bits
            && self.epoch == other.epoch
            && self.registry_version == other.registry_version
            && self.len == other.len
            && self.entries().eq(other.entries())
    }
}

impl Eq for BucketIndex {}

impl BucketIndex {
    /// Groups `tags[i]` under `buckets[i]` (a counting sort, then each bucket
    /// sorted in parallel; peak memory about 12 bytes per entry).
    ///
    /// # Errors
    /// [`Error::LengthMismatch`]; [`Error::InvalidParameter`] for a bucket id
    /// of `prefix_bits` or more bits.
    pub fn build(
        prefix_bits: u8,
        buckets: &[u32],
        tags: &[Tag],
        epoch: u64,
        registry_version: u64,
    ) -> Result<Self> {
        if prefix_bits > MAX_PREFIX_BITS {
            return Err(Error::InvalidParameter("bucket prefix bits above 32"));
        }
        if buckets.len() != tags.len() {
            return Err(Error::LengthMismatch {
                expected: buckets.len(),
                got: tags.len(),
            });
        }
        let n_buckets = 1usize << prefix_bits;
        let mut offsets = vec![0u64; n_buckets + 1];
        for &b in buckets {
            let slot = offsets
                .get_mut(b as usize + 1)
                .ok_or(Error::InvalidParameter(
                    "bucket id has more bits than the prefix",
                ))?;
            *slot += 1;
        }
        for i in 1..offsets.len() {
            let prev = offsets.get(i - 1).copied().unwrap_or(0);
            if let Some(o) = offsets.get_mut(i) {
                *o += prev;
            }
        }
        let mut cursor: Vec<u64> = offsets.iter().take(n_buckets).copied().collect();
        let mut sorted = vec![0u64; tags.len()];
        for (&b, t) in buckets.iter().zip(tags) {
            if let Some(c) = cursor.get_mut(b as usize) {
                if let Some(slot) = sorted.get_mut(*c as usize) {
                    *slot = t.0;
                }
                *c += 1;
            }
        }
        // Sort each bucket's run in parallel.
        let mut runs: Vec<&mut [u64]> = Vec::with_capacity(n_buckets);
        let mut rest: &mut [u64] = &mut sorted;
        for w in offsets.windows(2) {
            if let [a, b] = w {
                let (run, tail) = rest.split_at_mut((b - a) as usize);
                runs.push(run);
                rest = tail;
            }
        }
        runs.par_iter_mut().for_each(|run| run.sort_unstable());
        Ok(Self {
            prefix_bits,
            epoch,
            registry_version,
            len: sorted.len(),
            offsets: Arc::new(offsets),
            store: Store::Words(Arc::new(sorted)),
            changes: Arc::default(),
        })
    }

    /// The index of `registry_version` that results from removing the
    /// `(bucket, tag)` pairs of `removed` and adding those of `added` (an
    /// update's delta). The base is shared, not copied: the change is kept
    /// beside it, bucket by bucket, so this costs the change. A removed pair
    /// that is absent, or an added one already present, changes nothing; a
    /// pair in both ends up present.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a bucket id of `prefix_bits` or more
    /// bits.
    pub fn apply(
        &self,
        added: &[(u32, Tag)],
        removed: &[(u32, Tag)],
        registry_version: u64,
    ) -> Result<Self> {
        let n_buckets = self.offsets.len().saturating_sub(1);
        let mut touched: BTreeMap<u32, (Vec<u64>, Vec<u64>)> = BTreeMap::new();
        for (pairs, is_add) in [(removed, false), (added, true)] {
            for (b, t) in pairs {
                if *b as usize >= n_buckets {
                    return Err(Error::InvalidParameter(
                        "bucket id has more bits than the prefix",
                    ));
                }
                let entry = touched.entry(*b).or_default();
                if is_add { &mut entry.0 } else { &mut entry.1 }.push(t.0);
            }
        }
        let mut changes = (*self.changes).clone();
        let mut len = self.len;
        for (b, (mut plus, mut minus)) in touched {
            plus.sort_unstable();
            minus.sort_unstable();
            // The bucket as it is now, then as it will be.
            let before = self.bucket(b).map(|r| r.to_vec()).unwrap_or_default();
            let mut after: Vec<u64> = before
                .iter()
                .copied()
                .filter(|t| minus.binary_search(t).is_err() || plus.binary_search(t).is_ok())
                .chain(plus.iter().copied())
                .collect();
            after.sort_unstable();
            after.dedup();
            len = len - before.len() + after.len();
            // Kept as the difference from the base.
            let base = self.base_run(b);
            let change = Change {
                added: after
                    .iter()
                    .copied()
                    .filter(|t| !base.contains(*t))
                    .collect(),
                removed: base
                    .iter()
                    .filter(|t| after.binary_search(t).is_err())
                    .collect(),
            };
            if change.added.is_empty() && change.removed.is_empty() {
                changes.remove(&b);
            } else {
                changes.insert(b, change);
            }
        }
        Ok(Self {
            prefix_bits: self.prefix_bits,
            epoch: self.epoch,
            registry_version,
            offsets: Arc::clone(&self.offsets),
            store: self.store.clone(),
            changes: Arc::new(changes),
            len,
        })
    }

    /// Bits of a bucket id.
    #[must_use]
    pub fn prefix_bits(&self) -> u8 {
        self.prefix_bits
    }

    /// Key epoch of the tags.
    #[must_use]
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Registry version.
    #[must_use]
    pub fn registry_version(&self) -> u64 {
        self.registry_version
    }

    /// Number of entries.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the index is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of buckets.
    #[must_use]
    pub fn bucket_count(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    /// Buckets changed since the base (by [`BucketIndex::apply`]).
    #[must_use]
    pub fn changed_buckets(&self) -> usize {
        self.changes.len()
    }

    /// All tags, grouped by bucket (for building the sync tag set).
    pub fn tags(&self) -> impl Iterator<Item = Tag> + '_ {
        self.entries().map(|(_, t)| t)
    }

    /// Every `(bucket, tag)` pair, bucket by bucket.
    pub fn entries(&self) -> impl Iterator<Item = (u32, Tag)> + '_ {
        (0..self.bucket_count()).flat_map(move |b| {
            let id = u32::try_from(b).unwrap_or(u32::MAX);
            let run = self.bucket(id).unwrap_or(Run::Words(&[]));
            run.to_vec().into_iter().map(move |t| (id, Tag(t)))
        })
    }

    /// Bucket `id`'s run in the base.
    fn base_run(&self, id: u32) -> Run<'_> {
        let i = id as usize;
        let (Some(&a), Some(&b)) = (self.offsets.get(i), self.offsets.get(i + 1)) else {
            return Run::Words(&[]);
        };
        let (a, b) = (a as usize, b as usize);
        match &self.store {
            Store::Words(w) => Run::Words(w.get(a..b).unwrap_or(&[])),
            Store::Bytes { bytes, start } => Run::Bytes(
                (*bytes)
                    .as_ref()
                    .as_ref()
                    .get(start + a * 8..start + b * 8)
                    .unwrap_or(&[]),
            ),
        }
    }

    /// The sorted tags of bucket `id`, or `None` if `id` has more bits than
    /// the prefix.
    #[must_use]
    pub fn bucket(&self, id: u32) -> Option<Run<'_>> {
        if id as usize >= self.bucket_count() {
            return None;
        }
        let base = self.base_run(id);
        Some(match self.changes.get(&id) {
            None => base,
            Some(c) => {
                let mut v: Vec<u64> = base
                    .iter()
                    .filter(|t| c.removed.binary_search(t).is_err())
                    .chain(c.added.iter().copied())
                    .collect();
                v.sort_unstable();
                Run::Merged(v)
            }
        })
    }

    /// Bytes held in memory (not counting bytes read in place).
    #[must_use]
    pub fn memory_bytes(&self) -> usize {
        let words = match &self.store {
            Store::Words(w) => w.len(),
            Store::Bytes { .. } => 0,
        };
        let changed: usize = self
            .changes
            .values()
            .map(|c| c.added.len() + c.removed.len() + 4)
            .sum();
        (words + self.offsets.len() + changed) * 8
    }

    /// Serialises: header, per-bucket counts, tags, then a SHA-256 of all that.
    #[must_use]
    pub fn to_bytes(&self) -> Vec<u8> {
        let n_buckets = self.bucket_count();
        let mut out = Vec::with_capacity(8 + 2 + 1 + 24 + 4 * n_buckets + 8 * self.len + 32);
        out.extend_from_slice(BUCKET_MAGIC);
        out.extend_from_slice(&BUCKET_VERSION.to_be_bytes());
        out.push(self.prefix_bits);
        out.extend_from_slice(&self.epoch.to_be_bytes());
        out.extend_from_slice(&self.registry_version.to_be_bytes());
        out.extend_from_slice(&(self.len as u64).to_be_bytes());
        let runs: Vec<Run<'_>> = (0..n_buckets)
            .map(|b| {
                self.bucket(u32::try_from(b).unwrap_or(u32::MAX))
                    .unwrap_or(Run::Words(&[]))
            })
            .collect();
        for run in &runs {
            let count = u32::try_from(run.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&count.to_be_bytes());
        }
        for run in &runs {
            match run {
                Run::Bytes(b) => out.extend_from_slice(b),
                _ => out.extend(run.iter().flat_map(u64::to_be_bytes)),
            }
        }
        let digest = Sha256::digest(&out);
        out.extend_from_slice(&digest);
        out
    }

    /// Reads a serialised index into memory, verifying its checksum, sizes
    /// and order.
    ///
    /// # Errors
    /// [`Error::Malformed`], [`Error::UnsupportedVersion`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let layout = Layout::verify(bytes)?;
        let raw = bytes
            .get(layout.start..layout.start + layout.count * 8)
            .ok_or(malformed("truncated"))?;
        let tags: Vec<u64> = raw
            .par_chunks_exact(8)
            .map(|c| c.try_into().map(u64::from_be_bytes).unwrap_or(0))
            .collect();
        Ok(layout.into_index(Store::Words(Arc::new(tags))))
    }

    /// Reads a serialised index in place: the tags stay in `bytes` (a
    /// memory-mapped file, say) and are read from there on each lookup.
    /// Verified as [`BucketIndex::from_bytes`] verifies.
    ///
    /// # Errors
    /// As [`BucketIndex::from_bytes`].
    pub fn from_shared(bytes: SharedBytes) -> Result<Self> {
        let layout = Layout::verify((*bytes).as_ref())?;
        let start = layout.start;
        Ok(layout.into_index(Store::Bytes { bytes, start }))
    }
}

fn malformed(reason: &'static str) -> Error {
    Error::Malformed { what: WHAT, reason }
}

/// Where things are in a serialised index that checked out.
struct Layout {
    prefix_bits: u8,
    epoch: u64,
    registry_version: u64,
    offsets: Vec<u64>,
    start: usize,
    count: usize,
}

impl Layout {
    /// Checks the magic, version, checksum, sizes and that every bucket is
    /// sorted.
    fn verify(bytes: &[u8]) -> Result<Self> {
        let split = bytes.len().checked_sub(32).ok_or(malformed("truncated"))?;
        let (body, digest) = bytes.split_at(split);
        let mut r = Reader::new(body);
        if r.take(8)? != BUCKET_MAGIC {
            return Err(malformed("not a bucket index (bad magic)"));
        }
        let version = r.u16()?;
        if version != BUCKET_VERSION {
            return Err(Error::UnsupportedVersion {
                what: WHAT,
                got: version,
                supported: BUCKET_VERSION,
            });
        }
        if Sha256::digest(body)[..] != *digest {
            return Err(malformed("checksum does not match"));
        }
        let [prefix_bits] = r.array::<1>()?;
        if prefix_bits > MAX_PREFIX_BITS {
            return Err(malformed("prefix bits above 32"));
        }
        let epoch = r.u64()?;
        let registry_version = r.u64()?;
        let count = r.u64()?;
        let n_buckets = 1usize << prefix_bits;
        let counts = r.take(
            n_buckets
                .checked_mul(4)
                .ok_or(malformed("too many buckets"))?,
        )?;
        let mut offsets = Vec::with_capacity(n_buckets + 1);
        let mut total = 0u64;
        offsets.push(0);
        for c in counts.chunks_exact(4) {
            let c: [u8; 4] = c.try_into().map_err(|_| malformed("truncated"))?;
            total += u64::from(u32::from_be_bytes(c));
            offsets.push(total);
        }
        if total != count {
            return Err(malformed("bucket counts do not add up"));
        }
        let start = body.len() - r.remaining();
        let count = usize::try_from(count).map_err(|_| malformed("too many tags"))?;
        let raw = r.take(count.checked_mul(8).ok_or(malformed("too many tags"))?)?;
        if !r.is_empty() {
            return Err(malformed("trailing bytes"));
        }
        // Big-endian words compare as their bytes do.
        let sorted = offsets.par_windows(2).all(|w| {
            let [a, b] = w else { return false };
            raw.get(*a as usize * 8..*b as usize * 8)
                .is_some_and(|run| {
                    run.chunks_exact(8)
                        .zip(run.chunks_exact(8).skip(1))
                        .all(|(x, y)| x <= y)
                })
        });
        if !sorted {
            return Err(malformed("a bucket is not sorted"));
        }
        Ok(Self {
            prefix_bits,
            epoch,
            registry_version,
            offsets,
            start,
            count,
        })
    }

    fn into_index(self, store: Store) -> BucketIndex {
        BucketIndex {
            prefix_bits: self.prefix_bits,
            epoch: self.epoch,
            registry_version: self.registry_version,
            offsets: Arc::new(self.offsets),
            store,
            changes: Arc::default(),
            len: self.count,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn prefix_bits_keep_buckets_at_1024_or_more() {
        assert_eq!(prefix_bits_for(0), 0);
        assert_eq!(prefix_bits_for(2047), 0);
        assert_eq!(prefix_bits_for(2048), 1);
        assert_eq!(prefix_bits_for(1_000_000), 9);
        for n in [2048u64, 5000, 1_000_000, 10_000_000, 1_400_000_000] {
            let p = prefix_bits_for(n);
            let mean = n >> p;
            assert!((1024..2048).contains(&mean), "n={n} p={p} mean={mean}");
        }
    }

    #[test]
    fn buckets_hold_their_tags_sorted_and_round_trip() {
        let buckets = [3u32, 0, 3, 1, 3, 2];
        let tags = [50u64, 7, 10, 9, 30, 1].map(Tag);
        let index = BucketIndex::build(2, &buckets, &tags, 4, 9).unwrap();
        assert_eq!(index.bucket(3).unwrap().to_vec(), [10, 30, 50]);
        assert_eq!(index.bucket(0).unwrap().to_vec(), [7]);
        assert_eq!(index.bucket(4), None);
        let bytes = index.to_bytes();
        let back = BucketIndex::from_bytes(&bytes).unwrap();
        assert_eq!(back, index);
        // Read in place: the same index, the same bytes again.
        let shared = BucketIndex::from_shared(Arc::new(bytes.clone())).unwrap();
        assert_eq!(shared, index);
        assert_eq!(shared.to_bytes(), bytes);
        assert!(shared.bucket(3).unwrap().contains(30));
        assert!(!shared.bucket(3).unwrap().contains(31));
        assert_eq!(
            shared.bucket(3).unwrap().to_be_bytes(),
            index.bucket(3).unwrap().to_be_bytes()
        );
        let entries: Vec<(u32, u64)> = index.entries().map(|(b, t)| (b, t.0)).collect();
        assert_eq!(entries, [(0, 7), (1, 9), (2, 1), (3, 10), (3, 30), (3, 50)]);
        assert!(BucketIndex::build(1, &[2], &[Tag(1)], 0, 0).is_err());
    }

    #[test]
    fn corrupt_index_is_rejected() {
        let index = BucketIndex::build(1, &[0, 1], &[Tag(1), Tag(2)], 0, 0).unwrap();
        let mut bytes = index.to_bytes();
        bytes[30] ^= 1;
        assert!(BucketIndex::from_bytes(&bytes).is_err());
        assert!(BucketIndex::from_shared(Arc::new(bytes)).is_err());
    }

    proptest! {
        #[test]
        fn applying_a_change_equals_rebuilding(
            start in proptest::collection::vec((0u32..8, 0u64..200), 0..120),
            added in proptest::collection::vec((0u32..8, 0u64..200), 0..40),
            removed in proptest::collection::vec((0u32..8, 0u64..200), 0..40),
        ) {
            // A tag lives in one bucket (the bucket is a function of the
            // record, the tag too): derive the bucket from the tag.
            let fix = |v: &[(u32, u64)]| -> Vec<(u32, Tag)> {
                v.iter().map(|&(_, t)| ((t % 8) as u32, Tag(t))).collect()
            };
            let (start, added, removed) = (fix(&start), fix(&added), fix(&removed));
            let mut live: std::collections::BTreeSet<(u32, u64)> =
                start.iter().map(|(b, t)| (*b, t.0)).collect();
            let (b0, t0): (Vec<u32>, Vec<Tag>) = live.iter().map(|&(b, t)| (b, Tag(t))).unzip();
            let base = BucketIndex::build(3, &b0, &t0, 1, 1).unwrap();
            let applied = base.apply(&added, &removed, 2).unwrap();
            // The same on a base read in place, and applied in two steps.
            let shared = BucketIndex::from_shared(Arc::new(base.to_bytes())).unwrap();
            let half = added.len() / 2;
            let stepwise = shared
                .apply(&added[..half], &removed, 2)
                .unwrap()
                .apply(&added[half..], &[], 2)
                .unwrap();
            for (b, t) in &removed {
                live.remove(&(*b, t.0));
            }
            for (b, t) in &added {
                live.insert((*b, t.0));
            }
            let (b1, t1): (Vec<u32>, Vec<Tag>) = live.iter().map(|&(b, t)| (b, Tag(t))).unzip();
            let rebuilt = BucketIndex::build(3, &b1, &t1, 1, 2).unwrap();
            prop_assert_eq!(&applied, &rebuilt);
            prop_assert_eq!(&stepwise, &rebuilt);
            // Serialised, a changed index is the rebuilt one byte for byte.
            prop_assert_eq!(applied.to_bytes(), rebuilt.to_bytes());
            prop_assert_eq!(applied.len(), live.len());
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = BucketIndex::from_bytes(&data);
            let _ = BucketIndex::from_shared(Arc::new(data));
        }
    }
}
