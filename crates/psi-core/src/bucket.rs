//! The bucket index of the bucket mode: the registry's tags grouped by the
//! bucket of their record, the first `p` bits of
//! `SHA-256("psi.v1.bucket" || record)`. A client sends its record's bucket
//! with its blinded element and receives that bucket's tags; the server learns
//! those `p` bits and nothing else about the record.
//!
//! `p` is chosen so that a bucket holds on average at least
//! [`MIN_MEAN_BUCKET`] entries. Tags are kept whole (64 bits): a lookup's
//! false-positive rate is at most `bucket size / 2^64`, far below 2^-32.
//! In memory: 8 bytes per entry plus 8 bytes per bucket (well under 12).

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
    #[allow(clippy::cast_possible_truncation)] // at most 63
    let p = (63 - ratio.leading_zeros()) as u8;
    p.min(MAX_PREFIX_BITS)
}

/// The registry's tags grouped by bucket, each bucket sorted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketIndex {
    prefix_bits: u8,
    epoch: u64,
    registry_version: u64,
    /// `offsets[b]..offsets[b + 1]` is bucket `b`'s run in `tags`.
    offsets: Vec<u64>,
    tags: Vec<u64>,
}

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
            offsets,
            tags: sorted,
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
        self.tags.len()
    }

    /// Whether the index is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.tags.is_empty()
    }

    /// All tags, grouped by bucket (for building the sync tag set).
    #[must_use]
    pub fn tags(&self) -> impl ExactSizeIterator<Item = Tag> + '_ {
        self.tags.iter().map(|&t| Tag(t))
    }

    /// Every `(bucket, tag)` pair, bucket by bucket (an update rebuilds the
    /// index from these).
    pub fn entries(&self) -> impl Iterator<Item = (u32, Tag)> + '_ {
        self.offsets.windows(2).enumerate().flat_map(move |(b, w)| {
            let run = match w {
                [a, z] => self.tags.get(*a as usize..*z as usize).unwrap_or(&[]),
                _ => &[],
            };
            let id = u32::try_from(b).unwrap_or(u32::MAX);
            run.iter().map(move |&t| (id, Tag(t)))
        })
    }

    /// The sorted tags of bucket `id`, or `None` if `id` has more bits than
    /// the prefix.
    #[must_use]
    pub fn bucket(&self, id: u32) -> Option<&[u64]> {
        let i = id as usize;
        let (a, b) = (*self.offsets.get(i)?, *self.offsets.get(i + 1)?);
        self.tags.get(a as usize..b as usize)
    }

    /// Bytes held in memory.
    #[must_use]
    pub fn memory_bytes(&self) -> usize {
        (self.tags.len() + self.offsets.len()) * 8
    }

    /// Serialises: header, per-bucket counts, tags, then a SHA-256 of all that.
    #[must_use]
    pub fn to_bytes(&self) -> Vec<u8> {
        let n_buckets = self.offsets.len().saturating_sub(1);
        let mut out = Vec::with_capacity(8 + 2 + 1 + 24 + 4 * n_buckets + 8 * self.tags.len() + 32);
        out.extend_from_slice(BUCKET_MAGIC);
        out.extend_from_slice(&BUCKET_VERSION.to_be_bytes());
        out.push(self.prefix_bits);
        out.extend_from_slice(&self.epoch.to_be_bytes());
        out.extend_from_slice(&self.registry_version.to_be_bytes());
        out.extend_from_slice(&(self.tags.len() as u64).to_be_bytes());
        for w in self.offsets.windows(2) {
            if let [a, b] = w {
                let count = u32::try_from(b - a).unwrap_or(u32::MAX);
                out.extend_from_slice(&count.to_be_bytes());
            }
        }
        for t in &self.tags {
            out.extend_from_slice(&t.to_be_bytes());
        }
        let digest = Sha256::digest(&out);
        out.extend_from_slice(&digest);
        out
    }

    /// Reads a serialised index, verifying its checksum, sizes and order.
    ///
    /// # Errors
    /// [`Error::Malformed`], [`Error::UnsupportedVersion`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let malformed = |reason| Error::Malformed { what: WHAT, reason };
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
        let raw = r.take(
            usize::try_from(count)
                .ok()
                .and_then(|c| c.checked_mul(8))
                .ok_or(malformed("too many tags"))?,
        )?;
        if !r.is_empty() {
            return Err(malformed("trailing bytes"));
        }
        let tags: Vec<u64> = raw
            .par_chunks_exact(8)
            .map(|c| c.try_into().map(u64::from_be_bytes).unwrap_or(0))
            .collect();
        let index = Self {
            prefix_bits,
            epoch,
            registry_version,
            offsets,
            tags,
        };
        let sorted = (0..n_buckets).into_par_iter().all(|b| {
            let b = u32::try_from(b).unwrap_or(u32::MAX);
            index
                .bucket(b)
                .is_some_and(|run| run.windows(2).all(|w| w.first() <= w.get(1)))
        });
        if !sorted {
            return Err(malformed("a bucket is not sorted"));
        }
        Ok(index)
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
        assert_eq!(index.bucket(3).unwrap(), &[10, 30, 50]);
        assert_eq!(index.bucket(0).unwrap(), &[7]);
        assert_eq!(index.bucket(4), None);
        let back = BucketIndex::from_bytes(&index.to_bytes()).unwrap();
        assert_eq!(back, index);
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
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = BucketIndex::from_bytes(&data);
        }
    }
}
