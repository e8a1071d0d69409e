//! The store's manifest, `DIR/MANIFEST`: the one commit point of every
//! writer. It names each file of the committed state (the base bucket
//! index, the record store, the deltas, the record segments) with its
//! length and SHA-256, and the key epoch with its public key. A writer puts
//! its new files beside the committed ones under names the manifest does
//! not hold yet, syncs them, then replaces the manifest atomically; only
//! after that does it remove what the new manifest no longer names. So every
//! prefix of a run leaves the old state or the new one, and a reader trusts
//! nothing the manifest does not vouch for.
//!
//! Format (text, one field a line, the last line the SHA-256 of all the
//! lines before it):
//!
//! ```text
//! psi-store-manifest 1
//! generation 3
//! registry-version 12
//! key-epoch 2
//! public-key <64 hex digits>
//! base registry-3.bkt <length> <sha256 hex>
//! records records-3.bin <length> <sha256 hex>
//! delta deltas/epoch-2-v11-v12.delta <length> <sha256 hex>
//! segment records.d/v11-v12.seg <length> <sha256 hex>
//! end <sha256 hex of the lines above>
//! ```
//!
//! `records` and `segment` lines are absent in a serving directory (it holds
//! no plaintext). For the base, the digest is the bucket index file's own
//! trailing checksum, which loading the index verifies over the whole file.

use std::fmt::Write as _;
use std::path::{Component, Path};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// The manifest's name inside the data directory.
pub const MANIFEST_FILE: &str = "MANIFEST";
const HEADER: &str = "psi-store-manifest 1";
/// Longest manifest accepted (64 deltas and as many segments take ~25 KiB).
const MAX_BYTES: u64 = 1 << 20;

/// A file the manifest names: its path inside the data directory, length
/// and SHA-256.
#[derive(Clone, PartialEq, Eq)]
pub struct Entry {
    /// Relative path (`name` or `dir/name`).
    pub name: String,
    /// Length in bytes.
    pub len: u64,
    /// SHA-256 of the content (of the body, for the base index).
    pub digest: [u8; 32],
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({} bytes)", self.name, self.len)
    }
}

impl Entry {
    /// The entry of `bytes` to be written as `name`.
    #[must_use]
    pub fn of(name: impl Into<String>, bytes: &[u8]) -> Self {
        Self {
            name: name.into(),
            len: bytes.len() as u64,
            digest: Sha256::digest(bytes).into(),
        }
    }

    /// Reads the file from `dir`, checking its length and digest.
    ///
    /// # Errors
    /// A missing, unreadable, truncated or altered file.
    pub fn read(&self, dir: &Path) -> Result<Vec<u8>> {
        let path = dir.join(&self.name);
        let bytes = std::fs::read(&path).with_context(|| {
            format!(
                "reading {}, which the manifest names: the store is damaged",
                path.display()
            )
        })?;
        self.check(&path, &bytes)?;
        Ok(bytes)
    }

    /// Checks `bytes`, read from `path`, against the entry.
    ///
    /// # Errors
    /// A length or digest that differs.
    pub fn check(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        if bytes.len() as u64 != self.len {
            bail!(
                "{} is {} bytes, the manifest says {}: the file is damaged (truncated or replaced); \
                 restore it from a backup or the encoding directory",
                path.display(),
                bytes.len(),
                self.len
            );
        }
        if Sha256::digest(bytes)[..] != self.digest {
            bail!(
                "{} does not match its checksum in the manifest: the file is damaged; \
                 restore it from a backup or the encoding directory",
                path.display()
            );
        }
        Ok(())
    }
}

/// The committed state of a data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Bumped by every commit that writes a new base; names its files.
    pub generation: u64,
    /// The registry version.
    pub version: u64,
    /// The key epoch.
    pub epoch: u64,
    /// The epoch's public key: its key file must derive it.
    pub public_key: [u8; 32],
    /// The base bucket index (digest: its trailing checksum).
    pub base: Entry,
    /// The record store of the base (encoding directories only).
    pub records: Option<Entry>,
    /// The deltas kept: the log since the base and recent versions for sync.
    pub deltas: Vec<Entry>,
    /// The record segments of the updates since the base.
    pub segments: Vec<Entry>,
}

impl Manifest {
    /// The name a new base index of `generation` is written under.
    #[must_use]
    pub fn base_name(generation: u64) -> String {
        format!("registry-{generation}.bkt")
    }

    /// The name a new record store of `generation` is written under.
    #[must_use]
    pub fn records_name(generation: u64) -> String {
        format!("records-{generation}.bin")
    }

    /// Every file it names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        std::iter::once(&self.base)
            .chain(&self.records)
            .chain(&self.deltas)
            .chain(&self.segments)
            .map(|e| e.name.as_str())
    }

    /// The manifest of `dir`, verified; `None` when there is none.
    ///
    /// # Errors
    /// An unreadable, damaged or malformed manifest.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(MANIFEST_FILE);
        let text = match std::fs::metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
            Ok(m) if m.len() > MAX_BYTES => bail!(
                "{} is {} bytes, more than a manifest can be",
                path.display(),
                m.len()
            ),
            Ok(_) => std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?,
        };
        Self::parse(&text)
            .map(Some)
            .with_context(|| format!("{} is damaged or not a manifest", path.display()))
    }

    /// Replaces `dir`'s manifest atomically: the commit.
    ///
    /// # Errors
    /// I/O errors.
    pub fn commit(&self, dir: &Path) -> Result<()> {
        psi_files::atomic::write_atomically(
            &dir.join(MANIFEST_FILE),
            self.to_text().as_bytes(),
            0o600,
        )?;
        Ok(())
    }

    fn to_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "{HEADER}");
        let _ = writeln!(s, "generation {}", self.generation);
        let _ = writeln!(s, "registry-version {}", self.version);
        let _ = writeln!(s, "key-epoch {}", self.epoch);
        let _ = writeln!(s, "public-key {}", hex::encode(self.public_key));
        let mut entry = |kind: &str, e: &Entry| {
            let _ = writeln!(s, "{kind} {} {} {}", e.name, e.len, hex::encode(e.digest));
        };
        entry("base", &self.base);
        if let Some(r) = &self.records {
            entry("records", r);
        }
        for d in &self.deltas {
            entry("delta", d);
        }
        for g in &self.segments {
            entry("segment", g);
        }
        let digest = hex::encode(Sha256::digest(s.as_bytes()));
        let _ = writeln!(s, "end {digest}");
        s
    }

    fn parse(text: &str) -> Result<Self> {
        let body_len = text.rfind("\nend ").map(|i| i + 1).context("no end line")?;
        let (body, end) = text.split_at(body_len);
        let digest = end
            .strip_prefix("end ")
            .and_then(|d| d.strip_suffix('\n'))
            .context("malformed end line")?;
        if hex::encode(Sha256::digest(body.as_bytes())) != digest {
            bail!("its checksum does not match its content");
        }
        let mut lines = body.lines();
        if lines.next() != Some(HEADER) {
            bail!("it does not start with `{HEADER}`");
        }
        let mut field = |name: &str| -> Result<String> {
            let line = lines.next().with_context(|| format!("no {name} line"))?;
            line.strip_prefix(name)
                .and_then(|v| v.strip_prefix(' '))
                .map(str::to_string)
                .with_context(|| format!("expected a {name} line, found `{line}`"))
        };
        let number = |v: String, what: &str| -> Result<u64> {
            v.parse()
                .with_context(|| format!("{what} `{v}` is not a number"))
        };
        let generation = number(field("generation")?, "generation")?;
        let version = number(field("registry-version")?, "registry-version")?;
        let epoch = number(field("key-epoch")?, "key-epoch")?;
        let public_key = hex32(&field("public-key")?).context("malformed public-key")?;
        let mut base = None;
        let mut records = None;
        let mut deltas = Vec::new();
        let mut segments = Vec::new();
        for line in lines {
            let mut parts = line.split(' ');
            let (Some(kind), Some(name), Some(len), Some(digest), None) = (
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
            ) else {
                bail!("malformed line `{line}`");
            };
            let entry = Entry {
                name: checked_name(name)?,
                len: len
                    .parse()
                    .with_context(|| format!("malformed length in `{line}`"))?,
                digest: hex32(digest).with_context(|| format!("malformed digest in `{line}`"))?,
            };
            match kind {
                "base" if base.is_none() => base = Some(entry),
                "records" if records.is_none() => records = Some(entry),
                "delta" => deltas.push(entry),
                "segment" => segments.push(entry),
                _ => bail!("unexpected line `{line}`"),
            }
        }
        Ok(Self {
            generation,
            version,
            epoch,
            public_key,
            base: base.context("no base line")?,
            records,
            deltas,
            segments,
        })
    }
}

fn hex32(text: &str) -> Option<[u8; 32]> {
    hex::decode(text).ok()?.try_into().ok()
}

/// A file name the manifest may hold: relative, at most one directory
/// deep, no `..`, no hidden (temporary) files.
fn checked_name(name: &str) -> Result<String> {
    let path = Path::new(name);
    let parts: Vec<Component<'_>> = path.components().collect();
    let plain = |c: &Component<'_>| matches!(c, Component::Normal(n) if !n.to_string_lossy().starts_with('.'));
    if parts.is_empty() || parts.len() > 2 || !parts.iter().all(plain) {
        bail!("the file name `{name}` is not one a manifest may hold");
    }
    Ok(name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            generation: 3,
            version: 12,
            epoch: 2,
            public_key: [7; 32],
            base: Entry::of("registry-3.bkt", b"base"),
            records: Some(Entry::of("records-3.bin", b"records")),
            deltas: vec![Entry::of("deltas/epoch-2-v11-v12.delta", b"d")],
            segments: vec![Entry::of("records.d/v11-v12.seg", b"s")],
        }
    }

    #[test]
    fn round_trips_and_any_change_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Manifest::read(dir.path()).unwrap(), None);
        let m = sample();
        m.commit(dir.path()).unwrap();
        assert_eq!(Manifest::read(dir.path()).unwrap(), Some(m.clone()));
        let path = dir.path().join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        // Every single-character change, and every truncation, is refused.
        for (i, c) in text.char_indices() {
            let flipped = if c == '1' { '2' } else { '1' };
            let mut altered = text.clone();
            altered.replace_range(i..i + c.len_utf8(), &flipped.to_string());
            std::fs::write(&path, &altered).unwrap();
            assert!(Manifest::read(dir.path()).is_err(), "changed at {i}");
        }
        for cut in [0, 10, text.len() / 2, text.len() - 1] {
            std::fs::write(&path, &text[..cut]).unwrap();
            assert!(Manifest::read(dir.path()).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn entries_check_length_and_content() {
        let dir = tempfile::tempdir().unwrap();
        let e = Entry::of("f", b"content");
        std::fs::write(dir.path().join("f"), b"content").unwrap();
        assert_eq!(e.read(dir.path()).unwrap(), b"content");
        std::fs::write(dir.path().join("f"), b"contenT").unwrap();
        assert!(format!("{:#}", e.read(dir.path()).unwrap_err()).contains("checksum"));
        std::fs::write(dir.path().join("f"), b"conte").unwrap();
        assert!(format!("{:#}", e.read(dir.path()).unwrap_err()).contains("bytes"));
        std::fs::remove_file(dir.path().join("f")).unwrap();
        assert!(e.read(dir.path()).is_err());
    }

    #[test]
    fn names_outside_the_directory_are_refused() {
        for bad in ["../x", "/etc/passwd", "a/b/c", ".hidden", "deltas/.tmp", ""] {
            assert!(checked_name(bad).is_err(), "{bad}");
        }
        for good in ["registry-3.bkt", "deltas/epoch-1-v1-v2.delta"] {
            assert!(checked_name(good).is_ok(), "{good}");
        }
    }
}
