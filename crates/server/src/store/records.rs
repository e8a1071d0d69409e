//! The canonical record store, `DIR/records-G.bin` (mode 0600): every accepted
//! record's encoding, so that an update can drop records and a key rotation
//! can re-encrypt the registry without the source. It holds the same
//! personal data as the registry source and is protected like the key.
//!
//! Format: magic, registry version, count, then each record as a 16-bit
//! length and its encoding.
//!
//! An `update` does not rewrite the store: it writes a segment,
//! `DIR/records.d/vA-vB.seg` (mode 0600), with the records version B added
//! and removed (magic, A, B, the two counts, then the records as above).
//! The current records are the store with the segments that follow on from
//! its version replayed, up to the registry's current version; `compact`
//! and `rotate-key` fold them into a new store.

use std::collections::HashSet;
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::store::manifest::{Entry, Manifest};

/// The store's name in a data directory written before manifests (now
/// `records-G.bin`, named by the manifest).
pub const RECORDS_FILE: &str = "records.bin";
/// The directory of record segments inside the data directory.
pub const SEGMENT_DIR: &str = "records.d";
const MAGIC: &[u8; 8] = b"PSIREC\x00\x01";
const SEGMENT_MAGIC: &[u8; 8] = b"PSISEG\x00\x01";

/// All records of one registry version, as one buffer.
#[derive(Default)]
pub struct Records {
    /// The registry version they make up.
    pub version: u64,
    bytes: Vec<u8>,
    count: u64,
}

impl std::fmt::Debug for Records {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Records({} of version {})", self.count, self.version)
    }
}

impl Records {
    /// An empty store for `version`.
    #[must_use]
    pub fn new(version: u64) -> Self {
        Self {
            version,
            ..Self::default()
        }
    }

    /// Adds an encoding.
    ///
    /// # Errors
    /// An encoding longer than 65535 bytes (never the case for a valid record).
    pub fn push(&mut self, encoding: &[u8]) -> Result<()> {
        let len = u16::try_from(encoding.len()).context("record encoding too long")?;
        self.bytes.extend_from_slice(&len.to_be_bytes());
        self.bytes.extend_from_slice(encoding);
        self.count += 1;
        Ok(())
    }

    /// Number of records.
    #[must_use]
    pub fn len(&self) -> u64 {
        self.count
    }

    /// Whether there are none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The encodings, in store order.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let mut rest = self.bytes.as_slice();
        std::iter::from_fn(move || {
            let (len, tail) = rest.split_first_chunk::<2>()?;
            let (record, tail) = tail.split_at_checked(usize::from(u16::from_be_bytes(*len)))?;
            rest = tail;
            Some(record)
        })
    }

    /// The store without `removed`, with `added` (those not already present)
    /// appended, for `version`.
    ///
    /// # Errors
    /// As [`Records::push`].
    pub fn updated(
        &self,
        removed: &HashSet<&[u8]>,
        added: &[Vec<u8>],
        version: u64,
    ) -> Result<Self> {
        let mut out = Self::new(version);
        let mut present = HashSet::with_capacity(usize::try_from(self.count).unwrap_or(0));
        for r in self.iter() {
            if !removed.contains(r) && present.insert(r) {
                out.push(r)?;
            }
        }
        for r in added {
            if !removed.contains(r.as_slice()) && present.insert(r.as_slice()) {
                out.push(r)?;
            }
        }
        Ok(out)
    }

    /// The store file's bytes.
    #[must_use]
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(24 + self.bytes.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&self.count.to_be_bytes());
        out.extend_from_slice(&self.bytes);
        out
    }

    /// A store from its file's bytes.
    ///
    /// # Errors
    /// Not a record store, or one whose records do not fill it exactly.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        if bytes.get(..8) != Some(MAGIC.as_slice()) {
            bail!("not a record store");
        }
        let (_, _, records) = parse_store(bytes).context("truncated or corrupt")?;
        Ok(records)
    }

    /// The file name of the segment of the update from `from` to `to`.
    #[must_use]
    pub fn segment_name(from: u64, to: u64) -> String {
        format!("{SEGMENT_DIR}/v{from}-v{to}.seg")
    }

    /// The bytes of the segment of the update from `from` to `to`: what it
    /// added and removed.
    #[must_use]
    pub fn segment_bytes(from: u64, to: u64, added: &Records, removed: &Records) -> Vec<u8> {
        let mut out = Vec::with_capacity(40 + added.bytes.len() + removed.bytes.len());
        out.extend_from_slice(SEGMENT_MAGIC);
        for n in [from, to, added.count, removed.count] {
            out.extend_from_slice(&n.to_be_bytes());
        }
        out.extend_from_slice(&added.bytes);
        out.extend_from_slice(&removed.bytes);
        out
    }

    /// The records of the committed registry version: the store `manifest`
    /// names with its segments replayed, each file's checksum verified.
    ///
    /// # Errors
    /// No record store (a serving directory), a missing or damaged file,
    /// segments that do not lead to the manifest's version.
    pub fn read(data_dir: &Path, manifest: &Manifest) -> Result<Self> {
        let entry = manifest.records.as_ref().with_context(|| {
            format!(
                "{} holds no record store: it is a serving directory; run this on the encoding directory",
                data_dir.display()
            )
        })?;
        let base = Self::from_bytes(entry.read(data_dir)?)
            .with_context(|| format!("{} is damaged", data_dir.join(&entry.name).display()))?;
        let version = manifest.version;
        if manifest.segments.is_empty() && base.version == version {
            return Ok(base);
        }
        let mut segments: Vec<(u64, u64, &Entry)> = manifest
            .segments
            .iter()
            .map(|e| {
                parse_segment_name(&e.name)
                    .map(|(a, b)| (a, b, e))
                    .with_context(|| format!("the manifest names a segment `{}`", e.name))
            })
            .collect::<Result<_>>()?;
        segments.sort_by_key(|(a, b, _)| (*a, *b));
        let mut at = base.version;
        // Each record with the order it was first seen in, so that the
        // records added keep the order of the updates that added them.
        let mut net = crate::store::NetChange::new();
        let mut seen = 0usize;
        for (from, to, entry) in segments {
            if from != at {
                bail!(
                    "the record segments do not follow on from version {at} ({} starts at {from}): the store is damaged",
                    entry.name
                );
            }
            let seg = parse_segment(&entry.read(data_dir)?)
                .with_context(|| format!("{} is damaged", entry.name))?;
            for r in seg.removed.iter() {
                net.remove(r.to_vec(), seen);
                seen += 1;
            }
            for r in seg.added.iter() {
                net.add(r.to_vec(), seen);
                seen += 1;
            }
            at = to;
        }
        if at != version {
            bail!(
                "the record store is of registry version {} and its segments lead to version {at}, not {version}: the store is damaged",
                base.version
            );
        }
        let mut added: Vec<(Vec<u8>, usize)> = net.added.into_iter().collect();
        added.sort_unstable_by_key(|(_, order)| *order);
        let added: Vec<Vec<u8>> = added.into_iter().map(|(r, _)| r).collect();
        let removed: HashSet<&[u8]> = net.removed.keys().map(Vec::as_slice).collect();
        base.updated(&removed, &added, version)
    }
}

/// `(from, to)` of a segment's file name (`records.d/vA-vB.seg`).
#[must_use]
pub fn parse_segment_name(name: &str) -> Option<(u64, u64)> {
    let n = name
        .strip_prefix(SEGMENT_DIR)?
        .strip_prefix("/v")?
        .strip_suffix(".seg")?;
    let (a, b) = n.split_once("-v")?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// What one segment holds.
struct Segment {
    added: Records,
    removed: Records,
}

fn parse_segment(bytes: &[u8]) -> Result<Segment> {
    let bad = || "truncated or corrupt".to_string();
    let (magic, rest) = bytes.split_first_chunk::<8>().with_context(bad)?;
    if magic != SEGMENT_MAGIC {
        bail!("not a records segment");
    }
    let word = |at: usize| -> Option<u64> {
        Some(u64::from_be_bytes(*rest.get(at..)?.first_chunk::<8>()?))
    };
    let (n_add, n_rem) = (word(16).with_context(bad)?, word(24).with_context(bad)?);
    let body = rest.get(32..).with_context(bad)?;
    let all = Records {
        version: 0,
        bytes: body.to_vec(),
        count: n_add.saturating_add(n_rem),
    };
    let mut added = Records::new(0);
    let mut removed = Records::new(0);
    let mut seen = 0u64;
    for r in all.iter() {
        if seen < n_add {
            added.push(r)?;
        } else {
            removed.push(r)?;
        }
        seen += 1;
    }
    if seen != all.count || added.bytes.len() + removed.bytes.len() != body.len() {
        bail!(bad());
    }
    Ok(Segment { added, removed })
}

/// Splits a store file into its magic, version and records (in place),
/// checking that the records fill the file exactly.
fn parse_store(mut bytes: Vec<u8>) -> Option<([u8; 8], u64, Records)> {
    let (magic, rest) = bytes.split_first_chunk::<8>()?;
    let (version, rest) = rest.split_first_chunk::<8>()?;
    let (count, _) = rest.split_first_chunk::<8>()?;
    let (magic, version, count) = (
        *magic,
        u64::from_be_bytes(*version),
        u64::from_be_bytes(*count),
    );
    bytes.drain(..24);
    let records = Records {
        version,
        bytes,
        count,
    };
    let (n, len) = records
        .iter()
        .fold((0u64, 0usize), |(n, len), r| (n + 1, len + 2 + r.len()));
    (n == count && len == records.bytes.len()).then_some((magic, version, records))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::manifest::Entry;

    fn of(list: &[&[u8]]) -> Records {
        let mut r = Records::new(0);
        for e in list {
            r.push(e).unwrap();
        }
        r
    }

    #[test]
    fn round_trips_and_updates_without_duplicates() {
        let mut r = of(&[b"aa", b"b", b"ccc"]);
        r.version = 1;
        let back = Records::from_bytes(r.to_bytes()).unwrap();
        assert_eq!(back.version, 1);
        assert_eq!(
            back.iter().collect::<Vec<_>>(),
            [b"aa".as_slice(), b"b", b"ccc"]
        );
        let removed: HashSet<&[u8]> = [b"b".as_slice()].into_iter().collect();
        let next = back
            .updated(&removed, &[b"dd".to_vec(), b"aa".to_vec()], 2)
            .unwrap();
        assert_eq!(
            next.iter().collect::<Vec<_>>(),
            [b"aa".as_slice(), b"ccc", b"dd"]
        );
        assert_eq!(next.len(), 3);
        // Truncation is detected.
        let bytes = r.to_bytes();
        assert!(Records::from_bytes(bytes[..bytes.len() - 1].to_vec()).is_err());
    }

    #[test]
    fn segments_replay_onto_the_store_up_to_the_manifests_version() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(SEGMENT_DIR)).unwrap();
        let put = |name: String, bytes: Vec<u8>| {
            std::fs::write(dir.path().join(&name), &bytes).unwrap();
            Entry::of(name, &bytes)
        };
        let mut base = of(&[b"a", b"b", b"c"]);
        base.version = 4;
        let records = put("records-1.bin".into(), base.to_bytes());
        // 4 -> 5: b out, d in; 5 -> 6: d out again, b back, e in.
        let s1 = put(
            Records::segment_name(4, 5),
            Records::segment_bytes(4, 5, &of(&[b"d"]), &of(&[b"b"])),
        );
        let s2 = put(
            Records::segment_name(5, 6),
            Records::segment_bytes(5, 6, &of(&[b"b", b"e"]), &of(&[b"d"])),
        );
        let manifest = |version: u64, segments: Vec<Entry>| Manifest {
            generation: 1,
            version,
            epoch: 1,
            public_key: [0; 32],
            base: Entry::of("registry-1.bkt", b""),
            records: Some(records.clone()),
            deltas: Vec::new(),
            segments,
        };
        let sorted = |m: &Manifest| {
            let r = Records::read(dir.path(), m).unwrap();
            assert_eq!(r.version, m.version);
            let mut all: Vec<Vec<u8>> = r.iter().map(<[u8]>::to_vec).collect();
            all.sort();
            all
        };
        assert_eq!(
            sorted(&manifest(4, vec![])),
            [b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]
        );
        assert_eq!(
            sorted(&manifest(5, vec![s1.clone()])),
            [b"a".to_vec(), b"c".to_vec(), b"d".to_vec()]
        );
        assert_eq!(
            sorted(&manifest(6, vec![s2.clone(), s1.clone()])),
            [b"a".to_vec(), b"b".to_vec(), b"c".to_vec(), b"e".to_vec()]
        );
        assert!(
            Records::read(dir.path(), &manifest(9, vec![s1.clone()])).is_err(),
            "no segments lead there"
        );
        assert!(
            Records::read(dir.path(), &manifest(6, vec![s2.clone()])).is_err(),
            "a gap"
        );
        // A damaged segment is an error, never a silently shorter registry.
        let seg = dir.path().join(&s2.name);
        let mut bytes = std::fs::read(&seg).unwrap();
        bytes[40] ^= 1;
        std::fs::write(&seg, &bytes).unwrap();
        assert!(Records::read(dir.path(), &manifest(6, vec![s1, s2])).is_err());
    }
}
