//! The canonical record store, `DIR/records.bin` (mode 0600): every accepted
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
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::store::named_files;
use psi_files::atomic::write_atomically;

/// The store's name inside the data directory.
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

    /// Writes the store atomically, mode 0600.
    ///
    /// # Errors
    /// I/O errors.
    pub fn write(&self, data_dir: &Path) -> Result<()> {
        let mut out = Vec::with_capacity(24 + self.bytes.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&self.count.to_be_bytes());
        out.extend_from_slice(&self.bytes);
        Ok(write_atomically(&data_dir.join(RECORDS_FILE), &out, 0o600)?)
    }

    /// Reads the records of registry version `version`: the store with the
    /// segments that lead on from its version to `version` replayed.
    ///
    /// # Errors
    /// A missing or malformed file; no segments leading to `version`.
    pub fn read(data_dir: &Path, version: u64) -> Result<Self> {
        let base = Self::read_base(data_dir)?;
        if base.version == version {
            return Ok(base);
        }
        let mut at = base.version;
        // Each record with the order it was first seen in, so that the
        // records added keep the order of the updates that added them.
        let mut net = crate::store::NetChange::new();
        let mut seen = 0usize;
        for (from, to, path) in segments(data_dir)? {
            if from < at || to > version {
                continue;
            }
            if from != at {
                break;
            }
            let seg = read_segment(&path)?;
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
                "{} is of registry version {} and the segments in {} lead to version {at}, not {version}: \
                 the record store is out of step with the registry (an interrupted run); rerun `psi-server init`",
                data_dir.join(RECORDS_FILE).display(),
                base.version,
                data_dir.join(SEGMENT_DIR).display()
            );
        }
        let mut added: Vec<(Vec<u8>, usize)> = net.added.into_iter().collect();
        added.sort_unstable_by_key(|(_, order)| *order);
        let added: Vec<Vec<u8>> = added.into_iter().map(|(r, _)| r).collect();
        let removed: HashSet<&[u8]> = net.removed.keys().map(Vec::as_slice).collect();
        base.updated(&removed, &added, version)
    }

    /// Reads the store alone, without its segments.
    ///
    /// # Errors
    /// A missing or malformed file.
    pub fn read_base(data_dir: &Path) -> Result<Self> {
        let path = data_dir.join(RECORDS_FILE);
        let bytes = std::fs::read(&path).with_context(|| {
            format!(
                "reading {} (the data directory predates updates: rerun `psi-server init`)",
                path.display()
            )
        })?;
        if bytes.get(..8) != Some(MAGIC.as_slice()) {
            bail!("{} is not a record store", path.display());
        }
        let (_, _, records) = parse_store(bytes)
            .with_context(|| format!("{} is truncated or corrupt", path.display()))?;
        Ok(records)
    }

    /// Writes what the update from version `from` to `to` added and removed
    /// as a segment (atomically, mode 0600).
    ///
    /// # Errors
    /// I/O errors.
    pub fn write_segment(
        data_dir: &Path,
        from: u64,
        to: u64,
        added: &Records,
        removed: &Records,
    ) -> Result<()> {
        let dir = data_dir.join(SEGMENT_DIR);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        let mut out = Vec::with_capacity(40 + added.bytes.len() + removed.bytes.len());
        out.extend_from_slice(SEGMENT_MAGIC);
        for n in [from, to, added.count, removed.count] {
            out.extend_from_slice(&n.to_be_bytes());
        }
        out.extend_from_slice(&added.bytes);
        out.extend_from_slice(&removed.bytes);
        Ok(write_atomically(
            &dir.join(format!("v{from}-v{to}.seg")),
            &out,
            0o600,
        )?)
    }

    /// Removes every segment (after a new store has folded them in).
    ///
    /// # Errors
    /// I/O errors.
    pub fn remove_segments(data_dir: &Path) -> Result<()> {
        for (_, _, path) in segments(data_dir)? {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
        Ok(())
    }
}

/// What one segment holds.
struct Segment {
    added: Records,
    removed: Records,
}

/// The segments in the data directory, by starting version.
fn segments(data_dir: &Path) -> Result<Vec<(u64, u64, PathBuf)>> {
    let found = named_files(&data_dir.join(SEGMENT_DIR), |name| {
        let n = name.strip_prefix('v')?.strip_suffix(".seg")?;
        let (a, b) = n.split_once("-v")?;
        Some((a.parse().ok()?, b.parse().ok()?))
    })?;
    let mut out: Vec<(u64, u64, PathBuf)> =
        found.into_iter().map(|((a, b), p)| (a, b, p)).collect();
    out.sort_by_key(|(a, b, _)| (*a, *b));
    Ok(out)
}

fn read_segment(path: &Path) -> Result<Segment> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let bad = || format!("{} is truncated or corrupt", path.display());
    let (magic, rest) = bytes.split_first_chunk::<8>().with_context(bad)?;
    if magic != SEGMENT_MAGIC {
        bail!("{} is not a records segment", path.display());
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

    #[test]
    fn round_trips_and_updates_without_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Records::new(1);
        for e in [b"aa".as_slice(), b"b", b"ccc"] {
            r.push(e).unwrap();
        }
        r.write(dir.path()).unwrap();
        let back = Records::read(dir.path(), 1).unwrap();
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
        let p = dir.path().join(RECORDS_FILE);
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 1]).unwrap();
        assert!(Records::read(dir.path(), 1).is_err());
    }

    fn of(list: &[&[u8]]) -> Records {
        let mut r = Records::new(0);
        for e in list {
            r.push(e).unwrap();
        }
        r
    }

    #[test]
    fn segments_replay_onto_the_store_up_to_the_version_asked() {
        let dir = tempfile::tempdir().unwrap();
        of(&[b"a", b"b", b"c"]).with(4).write(dir.path()).unwrap();
        // 4 -> 5: b out, d in; 5 -> 6: d out again, b back, e in.
        Records::write_segment(dir.path(), 4, 5, &of(&[b"d"]), &of(&[b"b"])).unwrap();
        Records::write_segment(dir.path(), 5, 6, &of(&[b"b", b"e"]), &of(&[b"d"])).unwrap();
        // A segment from an interrupted run, past the version asked: ignored.
        Records::write_segment(dir.path(), 6, 7, &of(&[b"z"]), &of(&[])).unwrap();
        let sorted = |v: u64| {
            let r = Records::read(dir.path(), v).unwrap();
            assert_eq!(r.version, v);
            let mut all: Vec<Vec<u8>> = r.iter().map(<[u8]>::to_vec).collect();
            all.sort();
            all
        };
        assert_eq!(sorted(4), [b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
        assert_eq!(sorted(5), [b"a".to_vec(), b"c".to_vec(), b"d".to_vec()]);
        assert_eq!(
            sorted(6),
            [b"a".to_vec(), b"b".to_vec(), b"c".to_vec(), b"e".to_vec()]
        );
        assert!(
            Records::read(dir.path(), 9).is_err(),
            "no segments lead there"
        );
        // A damaged segment is an error, never a silently shorter registry.
        let seg = dir.path().join(SEGMENT_DIR).join("v5-v6.seg");
        let bytes = std::fs::read(&seg).unwrap();
        std::fs::write(&seg, &bytes[..bytes.len() - 1]).unwrap();
        assert!(Records::read(dir.path(), 6).is_err());
        Records::remove_segments(dir.path()).unwrap();
        assert_eq!(sorted(4).len(), 3);
    }

    impl Records {
        fn with(mut self, version: u64) -> Self {
            self.version = version;
            self
        }
    }
}
