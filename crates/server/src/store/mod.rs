//! The data directory: its layout, its files' formats, its one writer
//! (`Writer`: the lock, the committed state read and verified, new states
//! committed), and reading the committed version.
//!
//! The store is log-structured: `init`, `merge`, `rotate-key` and `compact`
//! write a base (the bucket index and the record store of one version); an
//! `update` writes only what it changed, a delta of tags (with their
//! buckets) and a segment of records, so its cost follows the change, not
//! the registry. The current version is the base with the deltas that lead
//! on from its version applied. An update that makes the log longer than
//! its `compact_after` setting folds it into a new base first.
//!
//! Data directory (see also `manifest`, `keystore`, `records`, `delta`):
//! - `MANIFEST`: the committed state, and the one commit point of every
//!   writer: each file below with its length and SHA-256, the key epoch and
//!   its public key. A server watching the directory loads each new one.
//! - `registry-G.bkt`: the base bucket index of generation G (a new base
//!   gets a new name, so the committed one is never overwritten).
//! - `deltas/`: what each version added and removed (the log since the
//!   base, and recent versions for incremental sync).
//! - `oprf-epoch-N.key`: the key of each live epoch (mode 0600), with its
//!   public key and a checksum.
//! - `key-history.txt`: each rotation's new public key, endorsed by the old key.
//! - `committee-epoch-N.txt`: in threshold mode, instead of the key file:
//!   the holders' public shares (`committee`); the key is on the holders.
//! - `records-G.bin` and `records.d/`: the canonical records (mode 0600) of
//!   the base version and the updates since, for updates, compaction and
//!   rotation (not in a serving directory).
//! - `rejected-rows.csv`: the last run's rejected rows: source, row, field,
//!   reason; never a name or an ID number.
//!
//! Directories written before manifests (`registry.bkt`, `records.bin`) are
//! read as found and committed by the next writer.

pub mod committee;
pub mod delta;
pub mod keystore;
pub mod manifest;
pub mod mapped;
pub mod records;

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::{bail, Context, Result};
use psi_core::bucket::SharedBytes;
use psi_core::{BucketIndex, Tag};

use delta::Delta;
use keystore::EpochKey;
use manifest::{Entry, Manifest, MANIFEST_FILE};
use mapped::MappedFile;
use records::Records;

/// The base index's name in a data directory written before manifests
/// (now `registry-G.bkt`, named by the manifest: see [`base_file`]).
pub const SNAPSHOT_FILE: &str = "registry.bkt";
const LOCK_FILE: &str = ".lock";

/// A file's identity and content stamp: a replacement changes it.
pub(crate) type FileStamp = (u64, u64, SystemTime);

pub(crate) fn file_stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(path).ok()?;
    Some((m.ino(), m.len(), m.modified().ok()?))
}

/// `(bucket, tag)` pairs.
pub(crate) type Pairs = Vec<(u32, Tag)>;

/// The net change of a sequence of changes applied oldest first: removing
/// what an earlier change added cancels it, and adding what an earlier one
/// removed cancels that. The one fold behind every log: deltas of tags with
/// their buckets ([`net_change`]), of tags alone for sync clients
/// ([`delta::Delta::compose`]) and of canonical records ([`records::Records::read`]).
/// Each key keeps the value it was first added or removed with.
#[derive(Debug)]
pub(crate) struct NetChange<K, V> {
    /// What the sequence added in net.
    pub(crate) added: std::collections::HashMap<K, V>,
    /// What the sequence removed in net.
    pub(crate) removed: std::collections::HashMap<K, V>,
}

impl<K: std::hash::Hash + Eq, V> NetChange<K, V> {
    pub(crate) fn new() -> Self {
        Self {
            added: std::collections::HashMap::new(),
            removed: std::collections::HashMap::new(),
        }
    }

    /// `key` removed: cancels an earlier add, or is a net removal.
    pub(crate) fn remove(&mut self, key: K, value: V) {
        if self.added.remove(&key).is_none() {
            self.removed.entry(key).or_insert(value);
        }
    }

    /// `key` added: cancels an earlier removal, or is a net addition.
    pub(crate) fn add(&mut self, key: K, value: V) {
        if self.removed.remove(&key).is_none() {
            self.added.entry(key).or_insert(value);
        }
    }
}

/// The net change of a log of deltas, oldest first: `(added, removed)`.
pub(crate) fn net_change(chain: &[&Delta]) -> (Pairs, Pairs) {
    let mut net = NetChange::new();
    for d in chain {
        for (b, t) in d.removed_pairs() {
            net.remove(t.0, b);
        }
        for (b, t) in d.added_pairs() {
            net.add(t.0, b);
        }
    }
    let pairs = |m: std::collections::HashMap<u64, u32>| -> Pairs {
        m.into_iter().map(|(t, b)| (b, Tag(t))).collect()
    };
    (pairs(net.added), pairs(net.removed))
}

#[cfg(test)]
mod tests {
    use super::NetChange;

    #[test]
    fn later_changes_cancel_earlier_ones() {
        let mut net = NetChange::new();
        net.add(1, 'a');
        net.remove(1, 'a'); // added then removed: nothing
        net.remove(2, 'b');
        net.add(2, 'b'); // removed then added back: nothing
        net.remove(3, 'c');
        net.add(4, 'd');
        net.add(4, 'e'); // added twice: the first value stays
        let mut added: Vec<_> = net.added.into_iter().collect();
        added.sort_unstable();
        assert_eq!(added, vec![(4, 'd')]);
        assert_eq!(net.removed.into_iter().collect::<Vec<_>>(), vec![(3, 'c')]);
    }
}

/// What a commit to the data directory alters: its manifest (replaced by
/// every commit), or for a directory written before manifests, the base
/// index file and the newest delta; and in threshold mode the committee
/// files (a refresh replaces one without a new manifest). A watcher
/// reloads when it changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    committed: FileStamp,
    newest_delta: Option<String>,
    committees: Vec<Option<FileStamp>>,
}

/// Identifies the committed state's files.
#[must_use]
pub fn snapshot_stamp(data_dir: &Path) -> Option<Stamp> {
    let committees = committee::epochs(data_dir)
        .ok()?
        .into_iter()
        .map(|e| file_stamp(&committee::path(data_dir, e)))
        .collect();
    if let Some(committed) = file_stamp(&data_dir.join(MANIFEST_FILE)) {
        return Some(Stamp {
            committed,
            newest_delta: None,
            committees,
        });
    }
    Some(Stamp {
        committed: file_stamp(&data_dir.join(SNAPSHOT_FILE))?,
        newest_delta: legacy_files(&data_dir.join(delta::DELTA_DIR), ".delta")
            .ok()?
            .into_iter()
            .max(),
        committees,
    })
}

/// Whether `data_dir` holds a registry (committed, or written before manifests).
#[must_use]
pub fn has_registry(data_dir: &Path) -> bool {
    data_dir.join(MANIFEST_FILE).is_file() || data_dir.join(SNAPSHOT_FILE).is_file()
}

/// The committed base index file of `data_dir` (its name changes with
/// every new base: `registry-G.bkt`).
///
/// # Errors
/// No registry, or a damaged manifest.
pub fn base_file(data_dir: &Path) -> Result<PathBuf> {
    committed_or_none(data_dir).map(|m| data_dir.join(m.base.name))
}

/// The committed key epoch of `data_dir` and its public key (public data:
/// read from the manifest, no key file opened).
///
/// # Errors
/// No registry, or a damaged manifest.
pub fn public_key(data_dir: &Path) -> Result<(u64, psi_core::PublicKey)> {
    let m = committed_or_none(data_dir)?;
    let key = psi_core::PublicKey::from_bytes(&m.public_key)
        .context("the manifest's public key is not a valid ristretto255 element")?;
    Ok((m.epoch, key))
}

/// The committed record store file of `data_dir` (`records-G.bin`).
///
/// # Errors
/// No registry or record store, or a damaged manifest.
pub fn records_file(data_dir: &Path) -> Result<PathBuf> {
    committed_or_none(data_dir)?
        .records
        .map(|r| data_dir.join(r.name))
        .with_context(|| format!("{} holds no record store", data_dir.display()))
}

fn committed_or_none(data_dir: &Path) -> Result<Manifest> {
    committed(data_dir)?.with_context(|| {
        format!(
            "{} has no registry: run `psi-server init` first",
            data_dir.display()
        )
    })
}

/// Whether `data_dir` holds the plaintext record store (an encoding
/// directory, not one made by `psi-server publish`).
#[must_use]
pub fn holds_records(data_dir: &Path) -> bool {
    match Manifest::read(data_dir) {
        Ok(Some(m)) => m.records.is_some(),
        _ => data_dir.join(records::RECORDS_FILE).exists(),
    }
}

/// The committed registry version and how it is stored.
pub(crate) struct Current {
    /// The index of the current version.
    pub(crate) index: BucketIndex,
    /// The version of the base index it was built from.
    pub(crate) base_version: u64,
    /// How many updates the log since the base holds.
    pub(crate) log_len: usize,
    /// The deltas of the epoch up to the current version (incremental sync).
    pub(crate) deltas: Vec<Delta>,
    /// The mapped base index file.
    pub(crate) mapped: Arc<MappedFile>,
    /// The manifest it was read from.
    pub(crate) manifest: Manifest,
}

/// `read(manifest)` of the committed manifest, if there is a registry. A
/// reader does not hold the writers' lock: when `read` fails because a
/// commit replaced the manifest meanwhile (and removed what the old one
/// named), it reads the new one, a few times; a failure under an unchanged
/// manifest is the store's and is returned.
///
/// # Errors
/// A damaged manifest, or `read`'s error under an unchanged manifest.
pub(crate) fn read_committed<T>(
    data_dir: &Path,
    read: impl Fn(Manifest) -> Result<T>,
) -> Result<Option<T>> {
    let mut attempts = 0;
    loop {
        let Some(manifest) = committed(data_dir)? else {
            return Ok(None);
        };
        match read(manifest.clone()) {
            Ok(value) => return Ok(Some(value)),
            Err(e) => {
                attempts += 1;
                let moved_on = committed(data_dir)?.is_some_and(|now| now != manifest);
                if !moved_on || attempts >= 5 {
                    return Err(e);
                }
                tracing::debug!("a commit replaced the manifest while it was read; reading again");
            }
        }
    }
}

/// The state `manifest` commits: its base index (length and checksum
/// verified), its deltas (each verified), the log applied.
pub(crate) fn load_state(data_dir: &Path, manifest: Manifest) -> Result<Current> {
    let (base, mapped) = read_base(data_dir, &manifest.base)?;
    if base.epoch() != manifest.epoch {
        bail!(
            "{} is of key epoch {}, the manifest says {}: the store is damaged",
            manifest.base.name,
            base.epoch(),
            manifest.epoch
        );
    }
    let base_version = base.registry_version();
    let all = manifest
        .deltas
        .iter()
        .map(|e| Delta::read(data_dir, e))
        .collect::<Result<Vec<Delta>>>()?;
    if let Some(d) = all.iter().find(|d| d.epoch != manifest.epoch) {
        bail!("the manifest names {}, of another key epoch", d.name());
    }
    let chain = Delta::chain_from(&all, base_version);
    let log_len = chain.len();
    let index = match chain.last() {
        None => base,
        Some(last) => {
            // The net change of the whole log, applied beside the base.
            let (added, removed) = net_change(&chain);
            base.apply(&added, &removed, last.to)
                .with_context(|| format!("applying the deltas after version {base_version}"))?
        }
    };
    let version = index.registry_version();
    if version != manifest.version {
        bail!(
            "{} and its deltas make registry version {version}, the manifest commits {}: the store is damaged",
            manifest.base.name,
            manifest.version
        );
    }
    let deltas = all.into_iter().filter(|d| d.to <= version).collect();
    Ok(Current {
        index,
        base_version,
        log_len,
        deltas,
        mapped,
        manifest,
    })
}

/// The canonical records of the committed version (the record store with
/// the segments of the updates since replayed): what `rotate-key` re-encrypts.
///
/// # Errors
/// No registry, a missing or damaged record store or segment.
pub fn current_records(data_dir: &Path) -> Result<Records> {
    Records::read(data_dir, &committed_or_none(data_dir)?)
}

/// The base index file `entry` names, memory-mapped, its length and
/// checksum verified.
pub(crate) fn read_base(data_dir: &Path, entry: &Entry) -> Result<(BucketIndex, Arc<MappedFile>)> {
    let path = data_dir.join(&entry.name);
    let mapped = MappedFile::open(&path).with_context(|| {
        format!(
            "opening {}, which the manifest names: the store is damaged",
            path.display()
        )
    })?;
    let bytes: &[u8] = (*mapped).as_ref();
    let trailer = bytes.len().checked_sub(32).and_then(|at| bytes.get(at..));
    if bytes.len() as u64 != entry.len || trailer != Some(entry.digest.as_slice()) {
        bail!(
            "{} is not the base index the manifest committed ({} bytes, {} expected): the file is damaged or replaced",
            path.display(),
            bytes.len(),
            entry.len
        );
    }
    let index = BucketIndex::from_shared(Arc::clone(&mapped) as SharedBytes)
        .with_context(|| format!("loading {}: the file is damaged", path.display()))?;
    Ok((index, mapped))
}

/// The manifest entry of a base index file's bytes: its trailing checksum
/// (which loading verifies over the whole file) is its digest.
fn base_entry(name: String, bytes: &[u8]) -> Entry {
    let mut digest = [0u8; 32];
    if let Some(tail) = bytes.len().checked_sub(32).and_then(|at| bytes.get(at..)) {
        digest.copy_from_slice(tail);
    }
    Entry {
        name,
        len: bytes.len() as u64,
        digest,
    }
}

/// The committed state of `data_dir`: its manifest, verified; for a
/// directory written before manifests, one describing its files as found
/// (the next writer commits it). `None` when there is no registry.
///
/// # Errors
/// A damaged manifest; in an older directory, unreadable files.
pub(crate) fn committed(data_dir: &Path) -> Result<Option<Manifest>> {
    match Manifest::read(data_dir)? {
        Some(m) => Ok(Some(m)),
        None => legacy_manifest(data_dir),
    }
}

/// A directory written before manifests: `registry.bkt`, `records.bin` (in
/// an encoding directory), the deltas of the base's epoch and the record
/// segments, as found. The deltas and segments are hashed as they are: a
/// damaged one then fails to parse when read, and is never skipped.
fn legacy_manifest(data_dir: &Path) -> Result<Option<Manifest>> {
    let base_path = data_dir.join(SNAPSHOT_FILE);
    if !base_path.is_file() {
        return Ok(None);
    }
    let bytes = fs::read(&base_path).with_context(|| format!("reading {}", base_path.display()))?;
    let base = base_entry(SNAPSHOT_FILE.to_string(), &bytes);
    drop(bytes);
    let (index, _) = read_base(data_dir, &base)?;
    let epoch = index.epoch();
    let base_version = index.registry_version();
    let public_key = keystore::load(data_dir, epoch)?.key.public_key().to_bytes();
    let mut deltas = Vec::new();
    let mut parsed = Vec::new();
    for name in legacy_files(&data_dir.join(delta::DELTA_DIR), ".delta")? {
        let name = format!("{}/{name}", delta::DELTA_DIR);
        if delta::parse_name(&name).is_some_and(|(e, _, _)| e == epoch) {
            let bytes =
                fs::read(data_dir.join(&name)).with_context(|| format!("reading {name}"))?;
            let d = delta::parse(&bytes).with_context(|| format!("{name} is damaged"))?;
            deltas.push(Entry::of(name, &bytes));
            parsed.push(d);
        }
    }
    let version = Delta::chain_from(&parsed, base_version)
        .last()
        .map_or(base_version, |d| d.to);
    let records_path = data_dir.join(records::RECORDS_FILE);
    let (records, segments) = if records_path.is_file() {
        let bytes = fs::read(&records_path)
            .with_context(|| format!("reading {}", records_path.display()))?;
        let stored = Records::from_bytes(bytes.clone())
            .with_context(|| format!("{} is damaged", records_path.display()))?
            .version;
        let mut segments = Vec::new();
        for name in legacy_files(&data_dir.join(records::SEGMENT_DIR), ".seg")? {
            let name = format!("{}/{name}", records::SEGMENT_DIR);
            // Segments of an interrupted run, past the version: not committed.
            if records::parse_segment_name(&name).is_some_and(|(a, b)| a >= stored && b <= version)
            {
                let bytes =
                    fs::read(data_dir.join(&name)).with_context(|| format!("reading {name}"))?;
                segments.push(Entry::of(name, &bytes));
            }
        }
        (
            Some(Entry::of(records::RECORDS_FILE.to_string(), &bytes)),
            segments,
        )
    } else {
        (None, Vec::new())
    };
    Ok(Some(Manifest {
        generation: 0,
        version,
        epoch,
        public_key,
        base,
        records,
        deltas,
        segments,
    }))
}

/// Names of the files in `dir` ending in `suffix`, but hidden (temporary)
/// ones; none when `dir` does not exist.
fn legacy_files(dir: &Path, suffix: &str) -> Result<Vec<String>> {
    Ok(named_files(dir, |name| {
        (name.ends_with(suffix) && !name.starts_with('.')).then(|| name.to_string())
    })?
    .into_iter()
    .map(|(name, _)| name)
    .collect())
}

/// Takes the data directory's lock: one writer (init, update, rotate-key)
/// at a time. Released when the returned file is dropped. Only `init`
/// creates the directory; `update` and `rotate-key` need an existing
/// registry, so a mistyped path is an error, not a new empty directory.
pub(crate) fn lock(data_dir: &Path, create: bool) -> Result<fs::File> {
    if create {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(data_dir)
            .with_context(|| format!("creating data directory {}", data_dir.display()))?;
    } else if !has_registry(data_dir) {
        bail!(
            "{} holds no registry (no {MANIFEST_FILE}): check the path, or run `psi-server init` first",
            data_dir.display()
        );
    }
    let path = data_dir.join(LOCK_FILE);
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => bail!(
            "another init, update or rotate-key is running on {}",
            data_dir.display()
        ),
        Err(fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
    let mut stale = 0;
    for dir in [
        data_dir.to_path_buf(),
        data_dir.join(delta::DELTA_DIR),
        data_dir.join(records::SEGMENT_DIR),
    ] {
        stale += psi_files::atomic::remove_stale_temps(&dir)?;
    }
    if stale > 0 {
        tracing::warn!(stale, "removed temporary files left by an interrupted run");
    }
    Ok(file)
}

/// The one writer of a data directory: holds its lock, knows its layout,
/// reads and verifies the committed state, and commits new states through
/// the manifest. Every file of a new state is written under a name the
/// committed manifest does not hold, and synced, before the manifest that
/// names it replaces the old one; files no longer named are removed only
/// after. A directory written before manifests is committed as found when
/// opened (its files keep their names until a new base replaces them).
#[derive(Debug)]
pub(crate) struct Writer {
    dir: PathBuf,
    committed: Option<Manifest>,
    _lock: fs::File,
}

impl Writer {
    /// Takes `data_dir`'s lock (creating the directory when `create`) and
    /// reads its committed state, removing what an interrupted run left.
    ///
    /// # Errors
    /// As [`lock`]; a damaged manifest.
    pub(crate) fn open(data_dir: &Path, create: bool) -> Result<Self> {
        let lock = lock(data_dir, create)?;
        let committed = committed(data_dir)?;
        let writer = Self {
            dir: data_dir.to_path_buf(),
            committed,
            _lock: lock,
        };
        if let Some(m) = &writer.committed {
            if !data_dir.join(MANIFEST_FILE).exists() {
                m.commit(data_dir)?;
                tracing::info!(
                    registry_version = m.version,
                    "the data directory now has a manifest (it was written by an earlier version)"
                );
            }
            collect_garbage(data_dir, m)?;
        }
        Ok(writer)
    }

    /// The data directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The committed manifest, if there is a registry.
    pub(crate) fn manifest(&self) -> Option<&Manifest> {
        self.committed.as_ref()
    }

    pub(crate) fn committed(&self) -> Result<&Manifest> {
        self.committed.as_ref().with_context(|| {
            format!(
                "{} has no registry: run `psi-server init` first",
                self.dir.display()
            )
        })
    }

    /// The committed version, every file verified.
    ///
    /// # Errors
    /// A damaged or out-of-step store.
    pub(crate) fn current(&self) -> Result<Option<Current>> {
        self.committed
            .clone()
            .map(|m| load_state(&self.dir, m))
            .transpose()
    }

    /// The committed version's canonical records, every file verified.
    ///
    /// # Errors
    /// No registry or record store, a damaged file.
    pub(crate) fn records(&self) -> Result<Records> {
        Records::read(&self.dir, self.committed()?)
    }

    /// The committed epoch's key, checked against the manifest's public key.
    ///
    /// # Errors
    /// No registry; a missing, damaged or foreign key file.
    pub(crate) fn key(&self) -> Result<EpochKey> {
        let m = self.committed()?;
        keystore::load_committed(&self.dir, m.epoch, &m.public_key)
    }

    /// Writes `bytes` as `name` (mode 0600, atomically, its directory made).
    fn put(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let path = self.dir.join(name);
        if let Some(parent) = path.parent() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        psi_files::atomic::write_atomically(&path, bytes, 0o600)?;
        Ok(())
    }

    /// Writes the last run's rejected-rows report (`REPORT_FILE`): not part
    /// of the committed state.
    pub(crate) fn write_report(&self, name: &str, bytes: &[u8]) -> Result<()> {
        self.put(name, bytes)
    }

    /// Commits a new base: `index` and its `records` (the registry version
    /// and key epoch are the index's), with `sync_delta` (the change from
    /// the committed version, for sync clients) when it is of the same
    /// epoch. `public_key` is the epoch's. The log starts afresh; deltas of
    /// the same epoch are kept for sync, up to the window.
    ///
    /// # Errors
    /// I/O errors.
    pub(crate) fn commit_base(
        &mut self,
        index: &BucketIndex,
        records: &Records,
        public_key: [u8; 32],
        sync_delta: Option<&Delta>,
    ) -> Result<()> {
        let generation = self.committed.as_ref().map_or(1, |m| m.generation + 1);
        let epoch = index.epoch();
        let version = index.registry_version();
        let records_name = Manifest::records_name(generation);
        let records_bytes = records.to_bytes();
        self.put(&records_name, &records_bytes)?;
        let records = Entry::of(records_name, &records_bytes);
        drop(records_bytes);
        let base_name = Manifest::base_name(generation);
        let base_bytes = index.to_bytes();
        self.put(&base_name, &base_bytes)?;
        let base = base_entry(base_name, &base_bytes);
        drop(base_bytes);
        let mut deltas: Vec<Entry> = self
            .committed
            .as_ref()
            .filter(|m| m.epoch == epoch)
            .map(|m| m.deltas.clone())
            .unwrap_or_default();
        if let Some(d) = sync_delta.filter(|d| d.epoch == epoch && d.to == version) {
            let bytes = d.to_bytes();
            self.put(&d.name(), &bytes)?;
            deltas.retain(|e| e.name != d.name());
            deltas.push(Entry::of(d.name(), &bytes));
        }
        let manifest = Manifest {
            generation,
            version,
            epoch,
            public_key,
            base,
            records: Some(records),
            deltas: retained_deltas(deltas, version),
            segments: Vec::new(),
        };
        self.commit(manifest).map(drop)
    }

    /// Commits an update: `delta` (with buckets, from the committed version)
    /// and the records it `added` and `removed`, on the base of version
    /// `base_version`.
    ///
    /// # Errors
    /// No registry; a delta that does not follow on; I/O errors.
    pub(crate) fn commit_update(
        &mut self,
        base_version: u64,
        delta: &Delta,
        added: &Records,
        removed: &Records,
    ) -> Result<()> {
        let mut manifest = self.committed()?.clone();
        if delta.from != manifest.version || delta.epoch != manifest.epoch {
            bail!(
                "the update leads from version {} of epoch {}, the committed version is {} of epoch {}",
                delta.from,
                delta.epoch,
                manifest.version,
                manifest.epoch
            );
        }
        let segment_name = Records::segment_name(delta.from, delta.to);
        let segment = Records::segment_bytes(delta.from, delta.to, added, removed);
        self.put(&segment_name, &segment)?;
        let bytes = delta.to_bytes();
        self.put(&delta.name(), &bytes)?;
        manifest.deltas.retain(|e| e.name != delta.name());
        manifest.deltas.push(Entry::of(delta.name(), &bytes));
        manifest.deltas = retained_deltas(manifest.deltas, base_version);
        manifest.segments.retain(|e| e.name != segment_name);
        manifest.segments.push(Entry::of(segment_name, &segment));
        manifest.version = delta.to;
        self.commit(manifest).map(drop)
    }

    /// The commit point: the manifest replaced; then what it no longer
    /// names is removed. Returns how many files that was.
    fn commit(&mut self, manifest: Manifest) -> Result<usize> {
        manifest.commit(&self.dir)?;
        let committed = self.committed.insert(manifest);
        collect_garbage(&self.dir, committed)
    }

    /// Copies `name` from the data directory `source` into this one (a
    /// serving directory), atomically and keeping its mode, unless an
    /// identical file is already there (a running server may be reading
    /// it). A `secret` (a key) is never read into this process to be
    /// compared: it is copied by the kernel, every time. Returns the bytes
    /// written, or `None` when the file was already there.
    ///
    /// # Errors
    /// I/O errors.
    pub(crate) fn copy_in(&self, source: &Path, name: &str, secret: bool) -> Result<Option<u64>> {
        use std::os::unix::fs::PermissionsExt;
        let (from, to) = (source.join(name), self.dir.join(name));
        if !secret && psi_files::atomic::same_content(&from, &to) {
            return Ok(None);
        }
        if let Some(parent) = to.parent() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let meta = fs::metadata(&from).with_context(|| format!("reading {}", from.display()))?;
        psi_files::atomic::copy_atomically(&from, &to, meta.permissions().mode() & 0o777)?;
        Ok(Some(meta.len()))
    }

    /// Commits `manifest` as this serving directory's (its files copied in
    /// already) and removes what it no longer names; returns how many.
    ///
    /// # Errors
    /// I/O errors.
    pub(crate) fn commit_serving(&mut self, manifest: Manifest) -> Result<usize> {
        self.commit(manifest)
    }

    /// Destroys (overwritten with zeros, then removed) the key files here
    /// that are not among `keep`; returns how many.
    ///
    /// # Errors
    /// I/O errors.
    pub(crate) fn destroy_keys_except(
        &self,
        keep: &std::collections::BTreeSet<String>,
    ) -> Result<usize> {
        let stale = keystore::key_file_names(&self.dir)?;
        let stale: Vec<&String> = stale.difference(keep).collect();
        for name in &stale {
            keystore::destroy(&self.dir.join(name))?;
        }
        Ok(stale.len())
    }
}

/// The deltas kept with the base at version `base`: see [`delta::retained`].
fn retained_deltas(deltas: Vec<Entry>, base: u64) -> Vec<Entry> {
    let mut kept = delta::retained(
        deltas
            .into_iter()
            .map(|e| (delta::parse_name(&e.name).map_or(0, |(_, from, _)| from), e))
            .collect(),
        base,
    );
    kept.sort_by_key(|e| delta::parse_name(&e.name).map(|(_, from, _)| from));
    kept
}

/// Removes the store's files that `manifest` does not name: those of
/// earlier states, and those an interrupted run wrote but never committed.
/// Keys, the key history and the report are not the manifest's: left alone.
/// Returns how many files it removed.
fn collect_garbage(dir: &Path, manifest: &Manifest) -> Result<usize> {
    let named: std::collections::HashSet<&str> = manifest.names().collect();
    let mut candidates = Vec::new();
    for (sub, suffix) in [
        ("", ".bkt"),
        ("", ".bin"),
        (delta::DELTA_DIR, ".delta"),
        (records::SEGMENT_DIR, ".seg"),
    ] {
        let at = if sub.is_empty() {
            dir.to_path_buf()
        } else {
            dir.join(sub)
        };
        for name in legacy_files(&at, suffix)? {
            let store_file = !sub.is_empty()
                || name == SNAPSHOT_FILE
                || name == records::RECORDS_FILE
                || name.starts_with("registry-")
                || name.starts_with("records-");
            if store_file {
                candidates.push(if sub.is_empty() {
                    name
                } else {
                    format!("{sub}/{name}")
                });
            }
        }
    }
    let mut removed = 0;
    for name in candidates {
        if !named.contains(name.as_str()) {
            let path = dir.join(&name);
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            removed += 1;
        }
    }
    for sub in [delta::DELTA_DIR, records::SEGMENT_DIR] {
        let _ = psi_files::atomic::sync_parent_dir(&dir.join(sub).join("x"));
    }
    psi_files::atomic::sync_parent_dir(&dir.join(MANIFEST_FILE))?;
    Ok(removed)
}

/// The files in `dir` whose names `parse` recognises, with what it read
/// from each name; none when `dir` does not exist.
///
/// # Errors
/// An unreadable directory.
pub(crate) fn named_files<T>(
    dir: &Path,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<Vec<(T, PathBuf)>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry?;
        if let Some(parsed) = entry.file_name().to_str().and_then(&parse) {
            out.push((parsed, entry.path()));
        }
    }
    Ok(out)
}
