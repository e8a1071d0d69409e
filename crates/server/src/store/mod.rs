//! The data directory: its layout, its files' formats, reading the current
//! version and taking the writers' lock.
//!
//! The store is log-structured: `init`, `merge`, `rotate-key` and `compact`
//! write a base (the bucket index and the record store of one version); an
//! `update` writes only what it changed, a delta of tags (with their
//! buckets) and a segment of records, so its cost follows the change, not
//! the registry. The current version is the base with the deltas that lead
//! on from its version applied. An update that makes the log longer than
//! its `compact_after` setting folds it into a new base first.
//!
//! Data directory (everything written atomically; see also `keystore`,
//! `records`, `delta`):
//! - `registry.bkt`: the base bucket index. Replacing it, or writing a
//!   delta that leads on from the current version, is the commit point of
//!   every change: a server watching the directory publishes the new version.
//! - `deltas/`: what each version added and removed (the log since the
//!   base, and recent versions for incremental sync).
//! - `oprf-epoch-N.key`: the key of each live epoch (mode 0600).
//! - `key-history.txt`: each rotation's new public key, endorsed by the old key.
//! - `records.bin` and `records.d/`: the canonical records (mode 0600) of the
//!   base version and the updates since, for updates, compaction and rotation.
//! - `rejected-rows.csv`: the last run's rejected rows: source, row, field,
//!   reason; never a name or an ID number.

pub mod delta;
pub mod keystore;
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
use mapped::MappedFile;
use records::Records;

/// The snapshot file's name inside the data directory.
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

/// What a change to the data directory alters: the base index file and the
/// newest delta. A watcher reloads when it changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    base: FileStamp,
    newest_delta: Option<(u64, u64, u64)>,
}

/// Identifies the current snapshot's files (a commit replaces the base
/// index, so its inode changes, or adds a delta).
#[must_use]
pub fn snapshot_stamp(data_dir: &Path) -> Option<Stamp> {
    Some(Stamp {
        base: file_stamp(&data_dir.join(SNAPSHOT_FILE))?,
        newest_delta: crate::store::delta::newest(data_dir),
    })
}

/// The current registry version and how it is stored.
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
}

/// The current version: the base index with the log applied (in memory;
/// nothing is written). An error if there is no registry yet.
pub(crate) fn current(data_dir: &Path) -> Result<Current> {
    read_current(data_dir)?.with_context(|| {
        format!(
            "{} has no registry: run `psi-server init` first",
            data_dir.display()
        )
    })
}

pub(crate) fn read_current(data_dir: &Path) -> Result<Option<Current>> {
    let Some((base, mapped)) = read_base(data_dir)? else {
        return Ok(None);
    };
    let base_version = base.registry_version();
    let all = Delta::load(data_dir, base.epoch(), u64::MAX)?;
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
    let deltas = all.into_iter().filter(|d| d.to <= version).collect();
    Ok(Some(Current {
        index,
        base_version,
        log_len,
        deltas,
        mapped,
    }))
}

/// The current registry version's index; an error if there is none yet.
pub(crate) fn current_index(data_dir: &Path) -> Result<BucketIndex> {
    current(data_dir).map(|c| c.index)
}

/// The canonical records of the current version (the record store with the
/// segments of the updates since replayed): what `rotate-key` re-encrypts.
///
/// # Errors
/// No registry, a missing or damaged record store or segment.
pub fn current_records(data_dir: &Path) -> Result<Records> {
    Records::read(data_dir, current_index(data_dir)?.registry_version())
}

/// The base index alone (without the log), memory-mapped and verified.
pub(crate) fn read_base(data_dir: &Path) -> Result<Option<(BucketIndex, Arc<MappedFile>)>> {
    let path = data_dir.join(SNAPSHOT_FILE);
    match fs::metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        Ok(_) => {}
    }
    let mapped = MappedFile::open(&path)?;
    let index = BucketIndex::from_shared(Arc::clone(&mapped) as SharedBytes)
        .with_context(|| format!("loading {}", path.display()))?;
    Ok(Some((index, mapped)))
}

/// The current version's index, if there is a registry.
pub(crate) fn read_index(data_dir: &Path) -> Result<Option<BucketIndex>> {
    Ok(read_current(data_dir)?.map(|c| c.index))
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
    } else if !data_dir.join(SNAPSHOT_FILE).is_file() {
        bail!(
            "{} holds no registry ({} is missing): check the path, or run `psi-server init` first",
            data_dir.display(),
            SNAPSHOT_FILE
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
    let stale = psi_files::atomic::remove_stale_temps(data_dir)?;
    if stale > 0 {
        tracing::warn!(stale, "removed temporary files left by an interrupted run");
    }
    Ok(file)
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
