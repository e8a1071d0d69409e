//! The canonical record store, `DIR/records.bin` (mode 0600): every accepted
//! record's encoding, so that an update can drop records and a key rotation
//! can re-encrypt the registry without the source. It holds the same
//! personal data as the registry source and is protected like the key.
//!
//! Format: magic, registry version, count, then each record as a 16-bit
//! length and its encoding.

use std::collections::HashSet;
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::atomic_file::write_atomically;

/// The store's name inside the data directory.
pub const RECORDS_FILE: &str = "records.bin";
const MAGIC: &[u8; 8] = b"PSIREC\x00\x01";

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
        write_atomically(&data_dir.join(RECORDS_FILE), &out, 0o600)
    }

    /// Reads the store.
    ///
    /// # Errors
    /// A missing or malformed file.
    pub fn read(data_dir: &Path) -> Result<Self> {
        let path = data_dir.join(RECORDS_FILE);
        let mut bytes = std::fs::read(&path).with_context(|| {
            format!(
                "reading {} (the data directory predates updates: rerun `psi-server init`)",
                path.display()
            )
        })?;
        let header: Option<([u8; 8], u64, u64)> = (|| {
            let (magic, rest) = bytes.split_first_chunk::<8>()?;
            let (version, rest) = rest.split_first_chunk::<8>()?;
            let (count, _) = rest.split_first_chunk::<8>()?;
            Some((
                *magic,
                u64::from_be_bytes(*version),
                u64::from_be_bytes(*count),
            ))
        })();
        let Some((magic, version, count)) = header else {
            bail!("{} is truncated", path.display());
        };
        if &magic != MAGIC {
            bail!("{} is not a record store", path.display());
        }
        bytes.drain(..24);
        let records = Self {
            version,
            bytes,
            count,
        };
        if records.iter().count() as u64 != count {
            bail!("{} is truncated or corrupt", path.display());
        }
        Ok(records)
    }
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
        let back = Records::read(dir.path()).unwrap();
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
        assert!(Records::read(dir.path()).is_err());
    }
}
