//! The tag set of the sync mode: the registry's tags, truncated to just enough
//! bits for a false-positive rate of at most 2^-32 per lookup, sorted, split
//! into shards by their leading bits, and Golomb-Rice coded. Each shard has
//! its own digest, so a client can fetch only the shards that changed.
//!
//! With `n` distinct entries and `L = ceil(log2 n)`, a stored value is the
//! first `b = L + 32` bits of a tag. A tag that is not in the set matches one
//! of the `n` values with probability at most `n / 2^b <= 2^-32`. The gaps
//! between sorted values average `2^b / n` in `[2^32, 2^33)`, coded with Rice
//! parameter `k = 32` in about 34 to 34.6 bits: at most 4.33 bytes per entry.

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::rice;
use crate::tag::Tag;

/// First bytes of a serialised tag set.
pub const TAGSET_MAGIC: &[u8; 8] = b"PSITAGS\x01";
/// Serialisation format version.
pub const TAGSET_VERSION: u16 = 1;
/// Largest registry a tag set holds with the 2^-32 false-positive bound.
pub const MAX_TAGSET_ENTRIES: u64 = 1 << 32;
/// Target entries per shard (shards hold between half and all of this).
pub const SHARD_TARGET_LOG2: u8 = 12;
const MAX_SHARD_BITS: u8 = 20;
const WHAT: &str = "tag set";
const FIXED_HEADER_LEN: usize = 8 + 2 + 4 + 8 + 8 + 8 + 32;
const SHARD_ENTRY_LEN: usize = 4 + 4 + 32;

/// How values are truncated, sharded and coded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TagSetParams {
    /// Bits of each tag kept (`b`).
    pub tag_bits: u8,
    /// Leading bits that choose the shard (`s`); there are `2^s` shards.
    pub shard_bits: u8,
    /// Rice parameter (`k`).
    pub rice_bits: u8,
}

impl TagSetParams {
    /// Parameters for a registry of `n` entries: false-positive rate at most
    /// 2^-32 per lookup, 2^11 to 2^12 entries per shard.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] above [`MAX_TAGSET_ENTRIES`].
    pub fn for_count(n: u64) -> Result<Self> {
        if n > MAX_TAGSET_ENTRIES {
            return Err(Error::InvalidParameter(
                "a tag set holds at most 2^32 entries",
            ));
        }
        let lg = ceil_log2(n.max(2));
        Ok(Self {
            tag_bits: lg + 32,
            shard_bits: lg.saturating_sub(SHARD_TARGET_LOG2).min(MAX_SHARD_BITS),
            rice_bits: 32,
        })
    }

    /// [`TagSetParams::for_count`] with at least `2^min_shard_bits` shards
    /// (at most 2^20): more shards make a re-sync finer-grained and the
    /// manifest larger (a server's `tagset_min_shard_bits` tuning, and how a
    /// small set is given a population's shard count to test with). The
    /// Rice parameter stays below the bits a shard's values keep.
    ///
    /// # Errors
    /// As [`TagSetParams::for_count`]; a set too small for that many shards.
    pub fn for_count_at_least(n: u64, min_shard_bits: u8) -> Result<Self> {
        let mut p = Self::for_count(n)?;
        if min_shard_bits > p.shard_bits {
            p.shard_bits = min_shard_bits.min(MAX_SHARD_BITS);
            p.rice_bits = p
                .rice_bits
                .min(p.tag_bits.saturating_sub(p.shard_bits).saturating_sub(1));
        }
        p.validate()
    }

    fn validate(self) -> Result<Self> {
        let ok = (1..=64).contains(&self.tag_bits)
            && self.shard_bits <= MAX_SHARD_BITS
            && self.shard_bits < self.tag_bits
            && self.rice_bits < self.tag_bits - self.shard_bits;
        if ok {
            Ok(self)
        } else {
            Err(Error::Malformed {
                what: WHAT,
                reason: "inconsistent parameters",
            })
        }
    }

    /// Bits of a value within its shard.
    fn low_bits(self) -> u8 {
        self.tag_bits - self.shard_bits
    }

    fn shard_count(self) -> usize {
        1usize << self.shard_bits
    }

    /// The stored value of a tag: its first `tag_bits` bits.
    #[must_use]
    pub fn value(self, tag: Tag) -> u64 {
        tag.prefix(self.tag_bits)
    }

    fn shard_of(self, value: u64) -> usize {
        usize::try_from(value >> self.low_bits()).unwrap_or(usize::MAX)
    }
}

fn ceil_log2(n: u64) -> u8 {
    // The cast cannot truncate: at most 64.
    (64 - (n - 1).leading_zeros()) as u8
}

/// The header of a tag set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TagSetHeader {
    /// Coding parameters.
    pub params: TagSetParams,
    /// The key epoch the tags were computed under.
    pub epoch: u64,
    /// The registry version the set was built from.
    pub registry_version: u64,
    /// Distinct values in the set.
    pub count: u64,
}

/// One shard: the Rice-coded values whose leading bits equal its index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    count: u32,
    data: Vec<u8>,
    digest: [u8; 32],
}

impl Shard {
    /// A shard received or read from disk. Its digest is computed here; the
    /// caller compares it with the expected one ([`TagSet::from_parts`] does).
    #[must_use]
    pub fn new(header: &TagSetHeader, index: usize, count: u32, data: Vec<u8>) -> Self {
        let digest = shard_digest(header, index, count, &data);
        Self {
            count,
            data,
            digest,
        }
    }

    /// Values in the shard.
    #[must_use]
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The coded values.
    #[must_use]
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// `SHA-256("psi.v1.shard" || epoch || params || index || count || data)`.
    /// Independent of the registry version, so unchanged shards keep their digest.
    #[must_use]
    pub fn digest(&self) -> &[u8; 32] {
        &self.digest
    }
}

fn shard_digest(header: &TagSetHeader, index: usize, count: u32, data: &[u8]) -> [u8; 32] {
    let p = header.params;
    Sha256::new()
        .chain_update(b"psi.v1.shard")
        .chain_update(header.epoch.to_be_bytes())
        .chain_update([p.tag_bits, p.shard_bits, p.rice_bits])
        .chain_update((index as u64).to_be_bytes())
        .chain_update(count.to_be_bytes())
        .chain_update(data)
        .finalize()
        .into()
}

/// The sharded, compressed set of a registry's tags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagSet {
    header: TagSetHeader,
    shards: Vec<Shard>,
    root: [u8; 32],
}

impl TagSet {
    /// Builds the set from unsorted tags, in parallel, with parameters chosen
    /// for their number.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] above [`MAX_TAGSET_ENTRIES`] tags.
    pub fn build(tags: &[Tag], epoch: u64, registry_version: u64) -> Result<Self> {
        let params = TagSetParams::for_count(tags.len() as u64)?;
        Self::build_with(params, tags, epoch, registry_version)
    }

    /// Builds the set with given parameters (an update keeps its registry's
    /// parameters so that unchanged shards keep their digests).
    ///
    /// # Errors
    /// [`Error::Malformed`] for inconsistent parameters.
    pub fn build_with(
        params: TagSetParams,
        tags: &[Tag],
        epoch: u64,
        registry_version: u64,
    ) -> Result<Self> {
        let params = params.validate()?;
        let values: Vec<u64> = tags.par_iter().map(|&t| params.value(t)).collect();
        Ok(Self::from_values(params, values, epoch, registry_version))
    }

    /// [`TagSet::build`] from an iterator, without a copy of the tags: a
    /// server loading its snapshot builds the set straight from the bucket
    /// index, so that its peak memory holds no extra 8 bytes per entry.
    ///
    /// # Errors
    /// [`Error::Malformed`] for a count the parameters cannot hold;
    /// [`Error::LengthMismatch`] when `tags` does not yield `count` tags.
    pub fn build_from_iter(
        tags: impl Iterator<Item = Tag>,
        count: usize,
        epoch: u64,
        registry_version: u64,
    ) -> Result<Self> {
        let params = TagSetParams::for_count(count as u64)?.validate()?;
        Self::build_from_iter_with(params, tags, count, epoch, registry_version)
    }

    /// [`TagSet::build_from_iter`] with given parameters.
    ///
    /// # Errors
    /// As [`TagSet::build_from_iter`].
    pub fn build_from_iter_with(
        params: TagSetParams,
        tags: impl Iterator<Item = Tag>,
        count: usize,
        epoch: u64,
        registry_version: u64,
    ) -> Result<Self> {
        let params = params.validate()?;
        let mut values: Vec<u64> = Vec::with_capacity(count);
        values.extend(tags.map(|t| params.value(t)));
        if values.len() != count {
            return Err(Error::LengthMismatch {
                expected: count,
                got: values.len(),
            });
        }
        Ok(Self::from_values(params, values, epoch, registry_version))
    }

    /// The set of the (unsorted) values of its tags.
    fn from_values(
        params: TagSetParams,
        mut values: Vec<u64>,
        epoch: u64,
        registry_version: u64,
    ) -> Self {
        values.par_sort_unstable();
        values.dedup();
        let header = TagSetHeader {
            params,
            epoch,
            registry_version,
            count: values.len() as u64,
        };
        let low_mask = low_mask(params);
        // Boundaries of each shard's run in the sorted values.
        let bounds: Vec<usize> = (0..=params.shard_count())
            .map(|s| values.partition_point(|&v| params.shard_of(v) < s))
            .collect();
        let shards = bounds
            .par_windows(2)
            .enumerate()
            .map(|(index, w)| {
                let run = match w {
                    [a, b] => values.get(*a..*b).unwrap_or(&[]),
                    _ => &[],
                };
                let lows: Vec<u64> = run.iter().map(|v| v & low_mask).collect();
                let data = rice::encode(&lows, params.rice_bits);
                let count = u32::try_from(lows.len()).unwrap_or(u32::MAX);
                Shard::new(&header, index, count, data)
            })
            .collect::<Vec<_>>();
        let root = root_digest(&header, &shards);
        Self {
            header,
            shards,
            root,
        }
    }

    /// Assembles a set from a header and its shards (as received in a sync),
    /// checking every shard's digest against `digests` and the counts.
    ///
    /// # Errors
    /// [`Error::DigestMismatch`] naming the first bad shard; [`Error::Malformed`].
    pub fn from_parts(
        header: TagSetHeader,
        shards: Vec<Shard>,
        digests: &[[u8; 32]],
    ) -> Result<Self> {
        let params = header.params.validate()?;
        if shards.len() != params.shard_count() || digests.len() != shards.len() {
            return Err(Error::Malformed {
                what: WHAT,
                reason: "wrong number of shards",
            });
        }
        for (index, (shard, want)) in shards.iter().zip(digests).enumerate() {
            if shard.digest != shard_digest(&header, index, shard.count, &shard.data)
                || &shard.digest != want
            {
                return Err(Error::DigestMismatch { shard: index });
            }
        }
        let total: u64 = shards.iter().map(|s| u64::from(s.count)).sum();
        if total != header.count {
            return Err(Error::Malformed {
                what: WHAT,
                reason: "shard counts do not add up to the header's count",
            });
        }
        let root = root_digest(&header, &shards);
        Ok(Self {
            header,
            shards,
            root,
        })
    }

    /// The header.
    #[must_use]
    pub fn header(&self) -> &TagSetHeader {
        &self.header
    }

    /// The shards, indexed by the leading `shard_bits` bits of their values.
    #[must_use]
    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// The digest over the header and every shard digest: one value that
    /// identifies the whole set.
    #[must_use]
    pub fn root_digest(&self) -> &[u8; 32] {
        &self.root
    }

    /// Number of distinct values.
    #[must_use]
    pub fn len(&self) -> u64 {
        self.header.count
    }

    /// Whether the set is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.header.count == 0
    }

    /// Whether `tag` is in the set, decoding only its shard (for one lookup;
    /// use [`TagSet::lookup`] for many).
    ///
    /// # Errors
    /// [`Error::Malformed`] if the shard's data does not decode.
    pub fn contains(&self, tag: Tag) -> Result<bool> {
        let p = self.header.params;
        let v = p.value(tag);
        let shard = self.shards.get(p.shard_of(v)).ok_or(Error::Malformed {
            what: WHAT,
            reason: "shard index out of range",
        })?;
        let lows = decode_shard(p, shard)?;
        Ok(lows.binary_search(&(v & low_mask(p))).is_ok())
    }

    /// Decodes every shard, in parallel, into an in-memory index for fast
    /// lookups (8 bytes per entry).
    ///
    /// # Errors
    /// [`Error::Malformed`] if a shard's data does not decode.
    pub fn lookup(&self) -> Result<TagLookup> {
        let p = self.header.params;
        let low = p.low_bits();
        let parts = self
            .shards
            .par_iter()
            .enumerate()
            .map(|(i, s)| {
                let lows = decode_shard(p, s)?;
                Ok(lows.into_iter().map(move |v| ((i as u64) << low) | v))
            })
            .collect::<Result<Vec<_>>>()?;
        let values = parts.into_iter().flatten().collect();
        Ok(TagLookup { params: p, values })
    }

    /// Serialises the set: fixed header, shard table, shard data.
    #[must_use]
    pub fn to_bytes(&self) -> Vec<u8> {
        let data_len: usize = self.shards.iter().map(|s| s.data.len()).sum();
        let mut out =
            Vec::with_capacity(FIXED_HEADER_LEN + self.shards.len() * SHARD_ENTRY_LEN + data_len);
        let h = &self.header;
        out.extend_from_slice(TAGSET_MAGIC);
        out.extend_from_slice(&TAGSET_VERSION.to_be_bytes());
        out.extend_from_slice(&[
            h.params.tag_bits,
            h.params.shard_bits,
            h.params.rice_bits,
            0,
        ]);
        out.extend_from_slice(&h.epoch.to_be_bytes());
        out.extend_from_slice(&h.registry_version.to_be_bytes());
        out.extend_from_slice(&h.count.to_be_bytes());
        out.extend_from_slice(&self.root);
        for s in &self.shards {
            out.extend_from_slice(&s.count.to_be_bytes());
            let len = u32::try_from(s.data.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&s.digest);
        }
        for s in &self.shards {
            out.extend_from_slice(&s.data);
        }
        out
    }

    /// The set after a registry update: `removed` values taken out, `added`
    /// put in (values as [`TagSetParams::value`] gives them), under the same
    /// parameters and epoch. Only the shards the change touches are re-coded;
    /// the others keep their data and digests.
    ///
    /// # Errors
    /// [`Error::Malformed`] for a value of more than `tag_bits` bits or a shard
    /// that does not decode.
    pub fn apply_delta(
        &self,
        added: &[u64],
        removed: &[u64],
        registry_version: u64,
    ) -> Result<Self> {
        let p = self.header.params;
        let limit = match p.tag_bits {
            64.. => u64::MAX,
            b => (1u64 << b) - 1,
        };
        if added.iter().chain(removed).any(|&v| v > limit) {
            return Err(malformed(
                "a delta value has more bits than the tag set keeps",
            ));
        }
        let mut touched: std::collections::BTreeMap<usize, (Vec<u64>, Vec<u64>)> =
            std::collections::BTreeMap::new();
        for &v in added {
            touched.entry(p.shard_of(v)).or_default().0.push(v);
        }
        for &v in removed {
            touched.entry(p.shard_of(v)).or_default().1.push(v);
        }
        let header = TagSetHeader {
            registry_version,
            ..self.header
        };
        let low_mask = low_mask(p);
        // Each touched shard re-coded on its own, in parallel.
        let touched: Vec<_> = touched.into_iter().collect();
        let recoded: Vec<(usize, Shard)> = touched
            .into_par_iter()
            .map(|(index, (add, mut remove))| {
                let shard = self
                    .shards
                    .get(index)
                    .ok_or_else(|| malformed("shard out of range"))?;
                let high = (index as u64)
                    .checked_shl(u32::from(p.low_bits()))
                    .unwrap_or(0);
                let mut values: Vec<u64> = decode_shard(p, shard)?
                    .into_iter()
                    .map(|low| high | low)
                    .collect();
                remove.sort_unstable();
                values.retain(|v| remove.binary_search(v).is_err());
                values.extend(add);
                values.sort_unstable();
                values.dedup();
                let lows: Vec<u64> = values.iter().map(|v| v & low_mask).collect();
                let count = u32::try_from(lows.len()).map_err(|_| malformed("shard too large"))?;
                Ok((
                    index,
                    Shard::new(&header, index, count, rice::encode(&lows, p.rice_bits)),
                ))
            })
            .collect::<Result<_>>()?;
        let mut shards = self.shards.clone();
        for (index, shard) in recoded {
            if let Some(slot) = shards.get_mut(index) {
                *slot = shard;
            }
        }
        let header = TagSetHeader {
            count: shards.iter().map(|s| u64::from(s.count)).sum(),
            ..header
        };
        let root = root_digest(&header, &shards);
        Ok(Self {
            header,
            shards,
            root,
        })
    }

    /// Reads what can be trusted of a damaged serialised set: the header and,
    /// for each shard, the shard if its data is present, matches its digest
    /// and decodes, else `None`. `None` overall when not even the header and
    /// shard table are readable. A sync then refetches only the missing shards.
    #[must_use]
    pub fn salvage(bytes: &[u8]) -> Option<(TagSetHeader, Vec<Option<Shard>>)> {
        let (header, _root, table, mut r) = read_head(bytes).ok()?;
        let shards = table
            .into_iter()
            .enumerate()
            .map(|(index, (count, len, digest))| {
                let data = r.take(len).ok()?.to_vec();
                let shard = Shard::new(&header, index, count, data);
                (shard.digest == digest && decode_shard(header.params, &shard).is_ok())
                    .then_some(shard)
            })
            .collect();
        Some((header, shards))
    }

    /// Reads a serialised set, verifying every digest and the root.
    ///
    /// # Errors
    /// [`Error::Malformed`], [`Error::UnsupportedVersion`], [`Error::DigestMismatch`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let (header, root, table, mut r) = read_head(bytes)?;
        let n = table.len();
        let mut shards = Vec::with_capacity(n);
        let mut digests = Vec::with_capacity(n);
        for (index, (count, len, digest)) in table.into_iter().enumerate() {
            let data = r.take(len)?.to_vec();
            shards.push(Shard::new(&header, index, count, data));
            digests.push(digest);
        }
        if !r.is_empty() {
            return Err(malformed("trailing bytes"));
        }
        let set = Self::from_parts(header, shards, &digests)?;
        if set.root != root {
            return Err(malformed("root digest does not match"));
        }
        Ok(set)
    }
}

/// A shard table entry: value count, data length, digest.
type TableEntry = (u32, usize, [u8; 32]);

/// Reads the fixed header and the shard table; returns the reader positioned
/// at the shard data.
fn read_head(bytes: &[u8]) -> Result<(TagSetHeader, [u8; 32], Vec<TableEntry>, Reader<'_>)> {
    let mut r = Reader::new(bytes);
    if r.take(8)? != TAGSET_MAGIC {
        return Err(malformed("not a tag set (bad magic)"));
    }
    let version = r.u16()?;
    if version != TAGSET_VERSION {
        return Err(Error::UnsupportedVersion {
            what: WHAT,
            got: version,
            supported: TAGSET_VERSION,
        });
    }
    let p = r.take(4)?;
    let params = match p {
        [tag_bits, shard_bits, rice_bits, 0] => TagSetParams {
            tag_bits: *tag_bits,
            shard_bits: *shard_bits,
            rice_bits: *rice_bits,
        },
        _ => return Err(malformed("reserved byte set")),
    }
    .validate()?;
    let header = TagSetHeader {
        params,
        epoch: r.u64()?,
        registry_version: r.u64()?,
        count: r.u64()?,
    };
    let root: [u8; 32] = r.array()?;
    let n = params.shard_count();
    let mut table = Vec::with_capacity(n);
    for _ in 0..n {
        let count = r.u32()?;
        let len = r.u32()? as usize;
        let digest: [u8; 32] = r.array()?;
        table.push((count, len, digest));
    }
    Ok((header, root, table, r))
}

fn low_mask(p: TagSetParams) -> u64 {
    match p.low_bits() {
        64.. => u64::MAX,
        b => (1u64 << b) - 1,
    }
}

fn decode_shard(p: TagSetParams, shard: &Shard) -> Result<Vec<u64>> {
    let limit = match p.low_bits() {
        64.. => u64::MAX,
        b => 1u64 << b,
    };
    rice::decode(&shard.data, shard.count as usize, p.rice_bits, limit)
}

fn root_digest(header: &TagSetHeader, shards: &[Shard]) -> [u8; 32] {
    let p = header.params;
    let mut h = Sha256::new()
        .chain_update(b"psi.v1.tagset")
        .chain_update(TAGSET_VERSION.to_be_bytes())
        .chain_update([p.tag_bits, p.shard_bits, p.rice_bits])
        .chain_update(header.epoch.to_be_bytes())
        .chain_update(header.registry_version.to_be_bytes())
        .chain_update(header.count.to_be_bytes());
    for s in shards {
        h.update(s.digest);
    }
    h.finalize().into()
}

fn malformed(reason: &'static str) -> Error {
    Error::Malformed { what: WHAT, reason }
}

/// A byte reader that fails with [`Error::Malformed`] instead of panicking.
pub(crate) struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.rest.len() {
            return Err(malformed("truncated"));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        self.take(N)?.try_into().map_err(|_| malformed("truncated"))
    }

    pub(crate) fn u16(&mut self) -> Result<u16> {
        self.array().map(u16::from_be_bytes)
    }

    pub(crate) fn u32(&mut self) -> Result<u32> {
        self.array().map(u32::from_be_bytes)
    }

    pub(crate) fn u64(&mut self) -> Result<u64> {
        self.array().map(u64::from_be_bytes)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    pub(crate) fn remaining(&self) -> usize {
        self.rest.len()
    }
}

/// A decoded tag set: sorted values, binary-searched.
#[derive(Debug, Clone)]
pub struct TagLookup {
    params: TagSetParams,
    values: Vec<u64>,
}

impl TagLookup {
    /// Whether `tag` is in the set (false-positive rate at most 2^-32).
    #[must_use]
    pub fn contains(&self, tag: Tag) -> bool {
        self.values.binary_search(&self.params.value(tag)).is_ok()
    }

    /// Number of values.
    #[must_use]
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether the set is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand_core::{OsRng, RngCore};

    fn random_tags(n: usize) -> Vec<Tag> {
        (0..n).map(|_| Tag(OsRng.next_u64())).collect()
    }

    #[test]
    fn building_from_an_iterator_makes_the_same_set() {
        let mut tags = random_tags(30_000);
        tags.extend_from_within(..100);
        let from_slice = TagSet::build(&tags, 2, 5).unwrap();
        let from_iter = TagSet::build_from_iter(tags.iter().copied(), tags.len(), 2, 5).unwrap();
        assert!(TagSet::build_from_iter(tags.iter().copied(), tags.len() + 1, 2, 5).is_err());
        assert_eq!(from_iter, from_slice);
        assert_eq!(from_iter.to_bytes(), from_slice.to_bytes());
    }

    #[test]
    fn params_meet_the_false_positive_bound() {
        for n in [
            0u64,
            1,
            2,
            3,
            1000,
            1 << 20,
            (1 << 20) + 1,
            1_400_000_000,
            1 << 31,
            1 << 32,
        ] {
            let p = TagSetParams::for_count(n).unwrap();
            // n / 2^b <= 2^-32  <=>  b - 32 >= log2(n)
            assert!(u64::from(p.tag_bits - 32) >= u64::from(ceil_log2(n.max(2))));
            assert!(p.tag_bits <= 64);
        }
        assert!(TagSetParams::for_count((1 << 32) + 1).is_err());
    }

    #[test]
    fn members_are_found_and_serialisation_round_trips() {
        let tags = random_tags(20_000);
        let set = TagSet::build(&tags, 7, 3).unwrap();
        assert_eq!(set.len(), 20_000);
        assert_eq!(set.shards().len(), 1 << set.header().params.shard_bits);
        let lookup = set.lookup().unwrap();
        for t in tags.iter().take(500) {
            assert!(set.contains(*t).unwrap());
            assert!(lookup.contains(*t));
        }
        let bytes = set.to_bytes();
        let back = TagSet::from_bytes(&bytes).unwrap();
        assert_eq!(back, set);
        let outsiders = random_tags(2000);
        assert!(outsiders.iter().all(|t| !lookup.contains(*t)));
    }

    #[test]
    fn size_is_at_most_4_5_bytes_per_entry() {
        // Just above a power of two is the worst case for the gap size.
        for n in [(1usize << 16) + 1, 100_000, 1 << 17] {
            let set = TagSet::build(&random_tags(n), 1, 1).unwrap();
            let per_entry = set.to_bytes().len() as f64 / n as f64;
            assert!(per_entry <= 4.5, "{per_entry} bytes per entry at n = {n}");
        }
    }

    #[test]
    fn corruption_is_detected_and_named() {
        let set = TagSet::build(&random_tags(10_000), 1, 1).unwrap();
        let bytes = set.to_bytes();
        let mut bad = bytes.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(matches!(
            TagSet::from_bytes(&bad),
            Err(Error::DigestMismatch { .. })
        ));
        assert!(TagSet::from_bytes(&bytes[..bytes.len() - 1]).is_err());
        let mut wrong_epoch = bytes.clone();
        wrong_epoch[21] ^= 1; // inside the epoch field
        assert!(TagSet::from_bytes(&wrong_epoch).is_err());
    }

    #[test]
    fn unchanged_shards_keep_their_digest_across_versions() {
        let mut tags = random_tags(50_000);
        let v1 = TagSet::build(&tags, 1, 1).unwrap();
        tags.push(Tag(12345));
        let v2 = TagSet::build_with(v1.header().params, &tags, 1, 2).unwrap();
        let changed = v1
            .shards()
            .iter()
            .zip(v2.shards())
            .filter(|(a, b)| a.digest() != b.digest())
            .count();
        assert_eq!(changed, 1);
        assert_ne!(v1.root_digest(), v2.root_digest());
    }

    #[test]
    fn a_delta_gives_the_same_set_as_a_rebuild() {
        let tags = random_tags(30_000);
        let v1 = TagSet::build(&tags, 4, 1).unwrap();
        let p = v1.header().params;
        let (gone, kept) = tags.split_at(300);
        let fresh = random_tags(300);
        let mut after: Vec<Tag> = kept.to_vec();
        after.extend(&fresh);
        let rebuilt = TagSet::build_with(p, &after, 4, 2).unwrap();
        let added: Vec<u64> = fresh.iter().map(|&t| p.value(t)).collect();
        let removed: Vec<u64> = gone.iter().map(|&t| p.value(t)).collect();
        let patched = v1.apply_delta(&added, &removed, 2).unwrap();
        assert_eq!(patched, rebuilt);
        assert_eq!(patched.len(), 30_000);
        // Removing what is absent and adding what is present change nothing.
        let same = patched.apply_delta(&added[..5], &removed[..5], 3).unwrap();
        assert_eq!(same.shards(), patched.shards());
        // A value wider than the tag bits is refused.
        assert!(v1.apply_delta(&[u64::MAX], &[], 2).is_err());
    }

    #[test]
    fn salvage_keeps_the_good_shards_of_a_damaged_file() {
        let set = TagSet::build(&random_tags(40_000), 1, 1).unwrap();
        let n = set.shards().len();
        let bytes = set.to_bytes();
        let (header, shards) = TagSet::salvage(&bytes).unwrap();
        assert_eq!(header, *set.header());
        assert!(shards.iter().all(Option::is_some));
        // One flipped byte in the last shard's data: only that shard is lost.
        let mut bad = bytes.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x40;
        let (_, shards) = TagSet::salvage(&bad).unwrap();
        assert_eq!(shards.iter().filter(|s| s.is_none()).count(), 1);
        assert!(shards[n - 1].is_none());
        // Truncated: the shards past the cut are lost, the others kept.
        let cut = bytes.len() - set.shards()[n - 1].data().len() - set.shards()[n - 2].data().len();
        let (_, shards) = TagSet::salvage(&bytes[..cut + 3]).unwrap();
        assert_eq!(shards.iter().filter(|s| s.is_none()).count(), 2);
        // Not even a header: nothing to salvage.
        assert!(TagSet::salvage(&bytes[..20]).is_none());
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(data in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = TagSet::from_bytes(&data);
            let _ = TagSet::salvage(&data);
        }

        #[test]
        fn membership_is_exact_for_members(raw in proptest::collection::vec(any::<u64>(), 1..2000)) {
            let tags: Vec<Tag> = raw.iter().copied().map(Tag).collect();
            let set = TagSet::build(&tags, 0, 0).unwrap();
            let lookup = set.lookup().unwrap();
            prop_assert!(tags.iter().all(|t| lookup.contains(*t)));
        }
    }
}
