//! The registry store: `init` turns a registry source into the encrypted
//! snapshot, `update` adds and removes records as a new registry version,
//! `rotate_key` re-encrypts everything under a new key epoch, and
//! `Snapshot::load` reads the current version back for serving.
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

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use psi_core::bucket::{prefix_bits_for, SharedBytes};
use psi_core::record::bucket_of_encoding;
use psi_core::rotation::{self, KeyStep};
use psi_core::tagset::TagSetParams;
use psi_core::{BucketIndex, CivilDate, Error as CoreError, Mode, Record, Server, Tag, TagSet};
use rand_core::OsRng;
use rayon::prelude::*;

use crate::atomic_file::write_atomically;
use crate::delta::{Delta, KEEP_DELTAS};
use crate::keystore::{self, EpochKey};
use crate::mapped::MappedFile;
use crate::records::Records;
use crate::source::Source;

/// The snapshot file's name inside the data directory.
pub const SNAPSHOT_FILE: &str = "registry.bkt";
/// The rejected-rows report's name inside the data directory.
pub const REPORT_FILE: &str = "rejected-rows.csv";
const LOCK_FILE: &str = ".lock";
const CHUNK_ROWS: usize = 1 << 16;
/// Default for how many updates the log may hold before an update compacts
/// it into a new base (at most [`KEEP_DELTAS`]).
pub const DEFAULT_COMPACT_AFTER: usize = 32;

/// What the server serves: the key and the encrypted registry of one epoch
/// and version.
#[derive(Debug)]
pub struct Snapshot {
    /// The VOPRF server with the epoch's key.
    pub server: Server,
    /// The key epoch.
    pub epoch: u64,
    /// Tags by bucket (bucket mode).
    pub index: BucketIndex,
    /// The tag set (sync mode), derived from the index's tags.
    pub tagset: TagSet,
    /// Recent versions' changes, oldest first (incremental sync).
    pub deltas: Vec<Delta>,
    /// The endorsed key history (public).
    pub history: Vec<KeyStep>,
    /// The PIR database derived from the index (PIR mode), when offered:
    /// set by the server after loading (see `crate::pir::database_for`).
    pub pir: Option<std::sync::Arc<psi_pir::Database>>,
    /// The base index file it was loaded from.
    base: Option<FileStamp>,
}

impl Snapshot {
    /// Loads the current version (the base index with the log applied), the
    /// key of its epoch, its deltas and the key history, and builds the tag
    /// set.
    ///
    /// # Errors
    /// Missing or corrupt files.
    pub fn load(data_dir: &Path) -> Result<Self> {
        // Stamped before it is read: a replacement meanwhile makes the next
        // reload a full one.
        let base_stamp = file_stamp(&data_dir.join(SNAPSHOT_FILE))
            .with_context(|| format!("{} has no registry", data_dir.display()))?;
        let Current {
            index,
            deltas,
            mapped,
            ..
        } = current(data_dir)?;
        let key = keystore::load(data_dir, index.epoch())?;
        let tagset = TagSet::build_from_iter(
            index.tags(),
            index.len(),
            key.epoch,
            index.registry_version(),
        )?;
        // Verifying the index and building the tag set read every page of
        // it; lookups need only their buckets' pages.
        mapped.release();
        Ok(Self {
            server: Server::new(Mode::Voprf, key.key),
            epoch: key.epoch,
            deltas,
            history: keystore::load_history(data_dir)?,
            index,
            tagset,
            pir: None,
            base: Some(base_stamp),
        })
    }

    /// The data directory's current version, from `prev`: when the base
    /// index is the one `prev` was loaded from and only updates were logged
    /// since, their change is applied to `prev`'s index and tag set (the
    /// cost of the change, not of the registry: no re-verifying, no rebuild);
    /// otherwise a full [`Snapshot::load`]. Either way the same snapshot.
    ///
    /// # Errors
    /// As [`Snapshot::load`].
    pub fn reload(prev: &Snapshot, data_dir: &Path) -> Result<Self> {
        match Self::apply_log(prev, data_dir) {
            Ok(Some(next)) => Ok(next),
            Ok(None) => Self::load(data_dir),
            Err(e) => {
                tracing::warn!("applying the new updates failed, loading in full: {e:#}");
                Self::load(data_dir)
            }
        }
    }

    /// `prev` with the updates logged since applied, or `None` when a full
    /// load is needed or cheaper (a new base index, nothing new, a registry
    /// that outgrew the tag set's parameters, or a change of more than a
    /// quarter as many entries as there are shards, and over 256).
    ///
    /// # Errors
    /// Unreadable deltas, key or history.
    pub fn apply_log(prev: &Snapshot, data_dir: &Path) -> Result<Option<Self>> {
        if prev.base.is_none() || file_stamp(&data_dir.join(SNAPSHOT_FILE)) != prev.base {
            return Ok(None);
        }
        let from = prev.index.registry_version();
        let all = Delta::load(data_dir, prev.epoch, u64::MAX)?;
        let chain = Delta::chain_from(&all, from);
        let Some(last) = chain.last() else {
            return Ok(None);
        };
        let (added, removed) = net_change(&chain);
        // A change that touches most shards costs more applied than loaded
        // afresh (every shard re-coded, every bucket read): at 10^8 entries
        // 0.2% took 11.5 s applied, 6.5 s loaded.
        let shards = prev.tagset.shards().len();
        if added.len() + removed.len() > (shards / 4).max(256) {
            return Ok(None);
        }
        let index = prev.index.apply(&added, &removed, last.to)?;
        // The tag set keeps its parameters only while they suit the new
        // count; a full load chooses new ones.
        let params = prev.tagset.header().params;
        if TagSetParams::for_count(index.len() as u64)? != params {
            return Ok(None);
        }
        let values = |pairs: &[(u32, Tag)]| -> Vec<u64> {
            let mut v: Vec<u64> = pairs.iter().map(|(_, t)| params.value(*t)).collect();
            v.sort_unstable();
            v
        };
        let tagset = prev
            .tagset
            .apply_delta(&values(&added), &values(&removed), last.to)?;
        let key = keystore::load(data_dir, prev.epoch)?;
        let version = index.registry_version();
        Ok(Some(Self {
            server: Server::new(Mode::Voprf, key.key),
            epoch: prev.epoch,
            deltas: all.into_iter().filter(|d| d.to <= version).collect(),
            history: keystore::load_history(data_dir)?,
            index,
            tagset,
            pir: None,
            base: prev.base,
        }))
    }
}

/// A file's identity and content stamp: a replacement changes it.
type FileStamp = (u64, u64, SystemTime);

fn file_stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(path).ok()?;
    Some((m.ino(), m.len(), m.modified().ok()?))
}

/// `(bucket, tag)` pairs.
type Pairs = Vec<(u32, Tag)>;

/// The net change of a log of deltas, oldest first: `(added, removed)`.
fn net_change(chain: &[&Delta]) -> (Pairs, Pairs) {
    let mut added: std::collections::HashMap<u64, u32> = Default::default();
    let mut removed: std::collections::HashMap<u64, u32> = Default::default();
    for d in chain {
        for (b, t) in d.removed_pairs() {
            if added.remove(&t.0).is_none() {
                removed.insert(t.0, b);
            }
        }
        for (b, t) in d.added_pairs() {
            if removed.remove(&t.0).is_none() {
                added.insert(t.0, b);
            }
        }
    }
    let pairs = |m: std::collections::HashMap<u64, u32>| -> Pairs {
        m.into_iter().map(|(t, b)| (b, Tag(t))).collect()
    };
    (pairs(added), pairs(removed))
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
        newest_delta: crate::delta::newest(data_dir),
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
fn read_base(data_dir: &Path) -> Result<Option<(BucketIndex, Arc<MappedFile>)>> {
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

/// What a new registry version must look like to be published without
/// `--force`: a slip (swapped columns, the wrong file, a header-only
/// export) must not silently empty the registry that institutions are
/// answered from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PublishGuard {
    /// Largest fraction of a source's rows that may be rejected.
    pub max_rejected_fraction: f64,
    /// Largest fraction of the previous version's records that may
    /// disappear in one new version.
    pub max_shrink_fraction: f64,
    /// Publish whatever the counts, even an empty registry.
    pub force: bool,
}

impl Default for PublishGuard {
    fn default() -> Self {
        Self {
            max_rejected_fraction: 0.01,
            max_shrink_fraction: 0.10,
            force: false,
        }
    }
}

impl PublishGuard {
    /// Publishes anything.
    #[must_use]
    pub fn force() -> Self {
        Self {
            force: true,
            ..Self::default()
        }
    }

    /// Refuses `label`'s rows when none was accepted or too many were rejected.
    fn check_rows(&self, label: &str, counts: &RowCounts) -> Result<()> {
        if self.force || counts.rows == 0 && label != "registry" {
            return Ok(());
        }
        let rejected = counts.rejected_total();
        let top = counts
            .rejected
            .iter()
            .max_by_key(|(_, n)| **n)
            .map(|(reason, n)| format!(" (most often: {reason}, {n} rows)"))
            .unwrap_or_default();
        if counts.accepted == 0 {
            bail!(
                "refusing to publish: the {label} source gave no valid row ({} rows read, {rejected} rejected{top}). \
                 Check the file and its columns (--name-column, --id-column); pass --force to publish anyway",
                counts.rows
            );
        }
        let fraction = rejected as f64 / counts.rows as f64;
        if fraction > self.max_rejected_fraction {
            bail!(
                "refusing to publish: {rejected} of {} rows of the {label} source rejected ({:.2}%, over --max-rejected-fraction {}){top}. \
                 Fix the source, raise the limit, or pass --force",
                counts.rows,
                fraction * 100.0,
                self.max_rejected_fraction
            );
        }
        Ok(())
    }

    /// Refuses a new version that loses more than the allowed fraction of
    /// the previous one's records.
    fn check_shrink(&self, previous: u64, next: u64) -> Result<()> {
        if self.force || previous == 0 || next >= previous {
            return Ok(());
        }
        let lost = (previous - next) as f64 / previous as f64;
        if lost > self.max_shrink_fraction {
            bail!(
                "refusing to publish: the registry would fall from {previous} to {next} records ({:.2}% fewer, over --max-shrink {}). \
                 Pass --force if that is intended",
                lost * 100.0,
                self.max_shrink_fraction
            );
        }
        Ok(())
    }
}

/// Row counts of a run, by outcome.
#[derive(Debug, Clone, Default)]
pub struct RowCounts {
    /// Data rows read.
    pub rows: u64,
    /// Rows that passed validation.
    pub accepted: u64,
    /// Rows rejected, by field and reason.
    pub rejected: BTreeMap<String, u64>,
}

impl RowCounts {
    /// Total rejected rows.
    #[must_use]
    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }
}

/// What `init` did.
#[derive(Debug, Clone, Default)]
pub struct InitReport {
    /// Rows read, accepted, rejected.
    pub counts: RowCounts,
    /// Whether a new key was created.
    pub key_created: bool,
    /// The key epoch.
    pub epoch: u64,
    /// The new registry version.
    pub registry_version: u64,
    /// Distinct records in the registry.
    pub records: u64,
    /// Accepted rows that repeated an earlier row's record (kept once).
    pub duplicates: u64,
    /// Bucket prefix bits chosen.
    pub bucket_prefix_bits: u8,
    /// Where the rejected rows are listed.
    pub report_path: PathBuf,
    /// Wall time.
    pub elapsed: Duration,
}

/// What `update` did.
#[derive(Debug, Clone, Default)]
pub struct UpdateReport {
    /// Rows of the add source.
    pub add: RowCounts,
    /// Rows of the remove source.
    pub remove: RowCounts,
    /// Records added.
    pub added: u64,
    /// Rows to add that were already registered.
    pub already_present: u64,
    /// Records removed.
    pub removed: u64,
    /// Rows to remove that were not registered.
    pub not_found: u64,
    /// Records in the new version.
    pub records: u64,
    /// The key epoch.
    pub epoch: u64,
    /// The new registry version.
    pub registry_version: u64,
    /// Where the rejected rows are listed.
    pub report_path: PathBuf,
    /// Wall time.
    pub elapsed: Duration,
}

/// What `rotate_key` did.
#[derive(Debug, Clone, Default)]
pub struct RotateReport {
    /// The retired epoch.
    pub old_epoch: u64,
    /// The new epoch.
    pub epoch: u64,
    /// The new registry version.
    pub registry_version: u64,
    /// Records re-encrypted.
    pub records: u64,
    /// When the old key file is destroyed.
    pub old_key_destroyed_after: Duration,
    /// Wall time.
    pub elapsed: Duration,
}

/// Today's date in China Standard Time, for birth-date validation (the
/// client validates against the same date).
#[must_use]
pub fn today() -> CivilDate {
    psi_client::today()
}

/// A rejected row's field and reason: never the value itself.
fn rejection(e: &CoreError) -> (&'static str, String) {
    match e {
        CoreError::InvalidName { reason } => ("name", reason.to_string()),
        CoreError::InvalidIdNumber { reason } => ("id", reason.summary().to_string()),
        other => ("row", other.to_string()),
    }
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
    let stale = crate::atomic_file::remove_stale_temps(data_dir)?;
    if stale > 0 {
        tracing::warn!(stale, "removed temporary files left by an interrupted run");
    }
    Ok(file)
}

fn bar(show: bool, len: Option<u64>, what: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let (bar, template) = match len {
        Some(n) => (
            ProgressBar::new(n),
            format!("{what} {{bar:40}} {{percent:>3}}% {{msg}} ({{elapsed}}, ETA {{eta}})"),
        ),
        None => (
            ProgressBar::new_spinner(),
            format!("{what} {{spinner}} {{msg}} ({{elapsed}})"),
        ),
    };
    bar.set_style(
        ProgressStyle::with_template(&template).unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// Records, tags and bucket hashes of a source's accepted rows.
#[derive(Default)]
pub(crate) struct Encrypted {
    pub(crate) records: Records,
    pub(crate) tags: Vec<Tag>,
    pub(crate) hashes: Vec<u32>,
    /// The source line of each record (orders the parts of a partitioned run).
    pub(crate) lines: Vec<u64>,
}

/// One of `count` deterministic slices of a source: the accepted rows whose
/// canonical record hashes to `index` (mod `count`), and the rejected rows
/// whose line number does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slice {
    /// Which slice, from 0.
    pub index: u64,
    /// How many.
    pub count: u64,
}

/// Reads `source`, validates and canonicalises every row and encrypts the
/// accepted ones with `server`, all on all cores, a chunk at a time. Rejected
/// rows go to `rejected` as (label, row, field, reason).
pub(crate) fn encrypt_source(
    source: &Source,
    label: &str,
    server: &Server,
    rejected: &mut csv::Writer<Vec<u8>>,
    show_progress: bool,
    slice: Option<Slice>,
) -> Result<(Encrypted, RowCounts)> {
    let mut reader = source.open()?;
    let (_, total) = reader.progress();
    let bar = bar(show_progress, total, "encrypting");
    let today = today();
    let mut out = Encrypted::default();
    let mut counts = RowCounts::default();
    loop {
        let rows = reader
            .next_chunk(CHUNK_ROWS)
            .with_context(|| format!("reading {}", source.describe()))?;
        if rows.is_empty() {
            break;
        }
        let parsed: Vec<Result<Vec<u8>, (&'static str, String)>> = rows
            .par_iter()
            .map(|r| match (&r.name, &r.id) {
                (Some(name), Some(id)) => Record::parse(name, id, today)
                    .map(|rec| rec.encode())
                    .map_err(|e| rejection(&e)),
                (None, _) => Err(("name", "missing or not valid UTF-8".to_string())),
                (_, None) => Err(("id", "missing or not valid UTF-8".to_string())),
            })
            .collect();
        let mut accepted = Vec::with_capacity(parsed.len());
        let mut hashes = Vec::with_capacity(parsed.len());
        for (row, p) in rows.iter().zip(parsed) {
            let hash = p.as_ref().ok().map(|e| bucket_of_encoding(e, 32));
            let mine = slice.is_none_or(|s| hash.map_or(row.line, u64::from) % s.count == s.index);
            if !mine {
                continue;
            }
            counts.rows += 1;
            match p {
                Ok(encoded) => {
                    accepted.push(encoded);
                    hashes.extend(hash);
                    out.lines.push(row.line);
                }
                Err((field, reason)) => {
                    rejected.write_record([
                        label,
                        row.line.to_string().as_str(),
                        field,
                        &reason,
                    ])?;
                    *counts
                        .rejected
                        .entry(format!("{field}: {reason}"))
                        .or_default() += 1;
                }
            }
        }
        let outputs = server.evaluate_batch(&accepted)?;
        out.tags.extend(outputs.iter().map(psi_core::Output::tag));
        out.hashes.extend(hashes);
        for e in &accepted {
            out.records.push(e)?;
        }
        counts.accepted += accepted.len() as u64;
        let (done, _) = reader.progress();
        bar.set_position(done);
        bar.set_message(format!("{} rows", counts.rows));
    }
    bar.finish_and_clear();
    Ok((out, counts))
}

pub(crate) fn report_writer() -> Result<csv::Writer<Vec<u8>>> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(["source", "row", "field", "reason"])?;
    Ok(w)
}

fn buckets_of(hashes: &[u32], p: u8) -> Vec<u32> {
    hashes
        .par_iter()
        .map(|h| if p == 0 { 0 } else { h >> (32 - u32::from(p)) })
        .collect()
}

/// Drops repeated records (a person listed twice), keeping the first.
fn dedup(enc: Encrypted) -> Encrypted {
    let mut seen = HashSet::with_capacity(enc.tags.len());
    let mut out = Encrypted {
        records: Records::new(0),
        tags: Vec::with_capacity(enc.tags.len()),
        hashes: Vec::with_capacity(enc.hashes.len()),
        lines: Vec::with_capacity(enc.lines.len()),
    };
    for (i, ((r, t), h)) in enc
        .records
        .iter()
        .zip(&enc.tags)
        .zip(&enc.hashes)
        .enumerate()
    {
        if seen.insert(t.0) {
            // Lengths were checked when the record was first pushed.
            let _ = out.records.push(r);
            out.tags.push(*t);
            out.hashes.push(*h);
            out.lines.extend(enc.lines.get(i));
        }
    }
    out
}

/// Validates, canonicalises and encrypts every row of `source` on all cores
/// and writes a new registry version into `data_dir` (created if needed),
/// replacing the whole registry. Creates the key if there is none.
///
/// # Errors
/// Unreadable input, a source without the name and ID columns, I/O errors.
pub fn init(source: &Source, data_dir: &Path, show_progress: bool) -> Result<InitReport> {
    init_guarded(source, data_dir, show_progress, &PublishGuard::default())
}

/// [`init`] held to `guard`: a source with too many rejected rows, or a
/// registry that shrinks too much, is refused before anything is published
/// (the rejected-rows report is still written, to say why).
///
/// # Errors
/// As [`init`], and the guard's refusals.
pub fn init_guarded(
    source: &Source,
    data_dir: &Path,
    show_progress: bool,
    guard: &PublishGuard,
) -> Result<InitReport> {
    let started = Instant::now();
    let _lock = lock(data_dir, true)?;
    let previous = read_index(data_dir)?;
    let (key, key_created) = match (&previous, keystore::latest_epoch(data_dir)?) {
        (Some(index), _) => (keystore::load(data_dir, index.epoch())?, false),
        (None, Some(epoch)) => (keystore::load(data_dir, epoch)?, false),
        (None, None) => (keystore::create(data_dir, 1)?, true),
    };
    let epoch = key.epoch;
    let server = Server::new(Mode::Voprf, key.key);
    let mut rejected = report_writer()?;
    let (enc, counts) = encrypt_source(
        source,
        "registry",
        &server,
        &mut rejected,
        show_progress,
        None,
    )?;
    let mut report = publish_version(
        data_dir,
        previous,
        epoch,
        enc,
        counts,
        rejected.into_inner()?,
        guard,
    )?;
    report.key_created = key_created;
    report.elapsed = started.elapsed();
    Ok(report)
}

/// What `init` and `merge` share once the rows are encrypted: drops
/// repeated records, applies `guard`, and writes the records, the delta
/// from `previous`, the rejected-rows report (`rejected`: CSV with its
/// header) and, last, the snapshot, as the next registry version. The
/// caller holds the data directory's lock.
pub(crate) fn publish_version(
    data_dir: &Path,
    previous: Option<BucketIndex>,
    epoch: u64,
    enc: Encrypted,
    counts: RowCounts,
    rejected: Vec<u8>,
    guard: &PublishGuard,
) -> Result<InitReport> {
    let started = Instant::now();
    let report_path = data_dir.join(REPORT_FILE);
    let accepted = enc.tags.len() as u64;
    let enc = dedup(enc);
    let duplicates = accepted - enc.tags.len() as u64;
    let refusal = guard.check_rows("registry", &counts).and_then(|()| {
        guard.check_shrink(
            previous.as_ref().map_or(0, |i| i.len() as u64),
            enc.tags.len() as u64,
        )
    });
    if let Err(e) = refusal {
        write_atomically(&report_path, &rejected, 0o600)?;
        return Err(e.context(format!(
            "nothing was published; rejected rows are listed in {}",
            report_path.display()
        )));
    }
    let version = previous.as_ref().map_or(0, BucketIndex::registry_version) + 1;
    let p = prefix_bits_for(enc.tags.len() as u64);
    let index = BucketIndex::build(p, &buckets_of(&enc.hashes, p), &enc.tags, epoch, version)?;
    let mut records = enc.records;
    records.version = version;
    records.write(data_dir)?;
    Records::remove_segments(data_dir)?;
    if let Some(prev) = previous.filter(|i| i.epoch() == epoch) {
        let old: Vec<Tag> = prev.tags().collect();
        Delta::between(epoch, prev.registry_version(), version, &old, &enc.tags)
            .store(data_dir, version)?;
    }
    write_atomically(&report_path, &rejected, 0o600)?;
    write_atomically(&data_dir.join(SNAPSHOT_FILE), &index.to_bytes(), 0o600)?;
    keystore::sweep(data_dir, epoch, SystemTime::now())?;
    Ok(InitReport {
        counts,
        key_created: false,
        epoch,
        registry_version: version,
        records: records.len(),
        duplicates,
        bucket_prefix_bits: p,
        report_path,
        elapsed: started.elapsed(),
    })
}

/// Adds the records of `add` and removes those of `remove` (same row
/// contract and validation as `init`) as a new registry version; a running
/// server publishes it within its reload interval. Only the change is
/// written (a delta and a records segment); the bucket prefix stays that of
/// the epoch. When the log since the base would exceed
/// [`DEFAULT_COMPACT_AFTER`] updates it is compacted first.
///
/// # Errors
/// No registry yet, unreadable input, I/O errors.
pub fn update(
    add: Option<&Source>,
    remove: Option<&Source>,
    data_dir: &Path,
    show_progress: bool,
) -> Result<UpdateReport> {
    update_guarded(
        add,
        remove,
        data_dir,
        show_progress,
        &PublishGuard::default(),
    )
}

/// [`update`] held to `guard` (see [`init_guarded`]).
///
/// # Errors
/// As [`update`], and the guard's refusals.
pub fn update_guarded(
    add: Option<&Source>,
    remove: Option<&Source>,
    data_dir: &Path,
    show_progress: bool,
    guard: &PublishGuard,
) -> Result<UpdateReport> {
    update_with(
        add,
        remove,
        data_dir,
        show_progress,
        guard,
        DEFAULT_COMPACT_AFTER,
    )
}

/// [`update_guarded`] compacting the log once it holds `compact_after`
/// updates (1 to [`KEEP_DELTAS`]).
///
/// # Errors
/// As [`update_guarded`]; `compact_after` out of range.
pub fn update_with(
    add: Option<&Source>,
    remove: Option<&Source>,
    data_dir: &Path,
    show_progress: bool,
    guard: &PublishGuard,
    compact_after: usize,
) -> Result<UpdateReport> {
    let started = Instant::now();
    if add.is_none() && remove.is_none() {
        bail!("nothing to do: give --add, --remove or both");
    }
    if !(1..=KEEP_DELTAS).contains(&compact_after) {
        bail!("--compact-after must be between 1 and {KEEP_DELTAS}, not {compact_after}");
    }
    let _lock = lock(data_dir, false)?;
    let mut current = current(data_dir)?;
    if current.log_len >= compact_after {
        compact_locked(data_dir, &current)?;
        current.base_version = current.index.registry_version();
        current.log_len = 0;
    }
    let index = &current.index;
    let EpochKey { epoch, key } = keystore::load(data_dir, index.epoch())?;
    let server = Server::new(Mode::Voprf, key);
    let report_path = data_dir.join(REPORT_FILE);
    let mut rejected = report_writer()?;
    let mut report = UpdateReport {
        epoch,
        report_path: report_path.clone(),
        ..UpdateReport::default()
    };
    let mut run = |source: Option<&Source>, label: &str| -> Result<(Encrypted, RowCounts)> {
        match source {
            Some(s) => encrypt_source(s, label, &server, &mut rejected, show_progress, None),
            None => Ok((Encrypted::default(), RowCounts::default())),
        }
    };
    let (gone, remove_counts) = run(remove, "remove")?;
    let (fresh, add_counts) = run(add, "add")?;
    report.remove = remove_counts;
    report.add = add_counts;

    // Each changed record is looked up in its bucket: nothing scales with
    // the registry but the reading of the index.
    let p = index.prefix_bits();
    let present = |b: u32, t: Tag| index.bucket(b).is_some_and(|run| run.contains(t.0));
    let removed_tags: HashSet<u64> = gone.tags.iter().map(|t| t.0).collect();
    let mut removed = Vec::new();
    let mut removed_records = Records::new(0);
    let mut seen = HashSet::new();
    for ((t, b), r) in gone
        .tags
        .iter()
        .zip(buckets_of(&gone.hashes, p))
        .zip(gone.records.iter())
    {
        if !seen.insert(t.0) {
            continue;
        }
        if present(b, *t) {
            removed.push((b, *t));
            removed_records.push(r)?;
        } else {
            report.not_found += 1;
        }
    }
    report.removed = removed.len() as u64;
    let mut added = Vec::new();
    let mut added_records = Records::new(0);
    let mut fresh_seen = HashSet::new();
    for ((t, b), r) in fresh
        .tags
        .iter()
        .zip(buckets_of(&fresh.hashes, p))
        .zip(fresh.records.iter())
    {
        if removed_tags.contains(&t.0) || !fresh_seen.insert(t.0) {
            continue; // listed in both files: the removal wins; or a repeat
        }
        if present(b, *t) {
            report.already_present += 1;
        } else {
            added.push((b, *t));
            added_records.push(r)?;
        }
    }
    report.added = added.len() as u64;
    let before = index.len() as u64;
    report.records = before - report.removed + report.added;
    let refusal = guard
        .check_rows("add", &report.add)
        .and_then(|()| guard.check_rows("remove", &report.remove))
        .and_then(|()| guard.check_shrink(before, report.records));
    if let Err(e) = refusal {
        write_atomically(&report_path, &rejected.into_inner()?, 0o600)?;
        return Err(e.context(format!(
            "nothing was published; rejected rows are listed in {}",
            report_path.display()
        )));
    }
    let from = index.registry_version();
    let version = from + 1;
    Records::write_segment(data_dir, from, version, &added_records, &removed_records)?;
    write_atomically(&report_path, &rejected.into_inner()?, 0o600)?;
    // The commit point: the delta that leads on from the current version.
    Delta::of_change(epoch, from, version, &added, &removed)
        .store(data_dir, current.base_version)?;
    report.registry_version = version;
    report.elapsed = started.elapsed();
    Ok(report)
}

/// What `compact` did.
#[derive(Debug, Clone, Default)]
pub struct CompactReport {
    /// The registry version (unchanged by compaction).
    pub registry_version: u64,
    /// Updates folded into the new base.
    pub updates_folded: usize,
    /// Records in the new base.
    pub records: u64,
    /// Wall time.
    pub elapsed: Duration,
}

/// Folds the log (the updates since the base) into a new base index and
/// record store of the same version; the served registry does not change.
///
/// # Errors
/// No registry yet, a record store out of step with the registry, I/O errors.
pub fn compact(data_dir: &Path) -> Result<CompactReport> {
    let started = Instant::now();
    let _lock = lock(data_dir, false)?;
    let current = current(data_dir)?;
    let records = if current.log_len == 0 {
        Records::read_base(data_dir)?.len()
    } else {
        compact_locked(data_dir, &current)?
    };
    Ok(CompactReport {
        registry_version: current.index.registry_version(),
        updates_folded: current.log_len,
        records,
        elapsed: started.elapsed(),
    })
}

/// Writes `current` as the new base: the record store first, then the
/// index (a new base of the same version: a watcher reloads the same
/// registry), then the folded segments go. The caller holds the lock.
fn compact_locked(data_dir: &Path, current: &Current) -> Result<u64> {
    let version = current.index.registry_version();
    let records = Records::read(data_dir, version)?;
    records.write(data_dir)?;
    write_atomically(
        &data_dir.join(SNAPSHOT_FILE),
        &current.index.to_bytes(),
        0o600,
    )?;
    Records::remove_segments(data_dir)?;
    tracing::info!(
        registry_version = version,
        updates = current.log_len,
        "log compacted into a new base"
    );
    Ok(records.len())
}

/// Rotates the key: creates epoch N+1, re-encrypts every record under it on
/// all cores (a running server keeps serving epoch N meanwhile), records the
/// old key's endorsement of the new one, then switches atomically. The old
/// key file is retired and destroyed once `grace` has passed.
///
/// # Errors
/// No registry yet, a record store out of step with the registry, I/O errors.
pub fn rotate_key(data_dir: &Path, grace: Duration, show_progress: bool) -> Result<RotateReport> {
    let started = Instant::now();
    let _lock = lock(data_dir, false)?;
    let index = current_index(data_dir)?;
    let old = keystore::load(data_dir, index.epoch())?;
    let mut records = Records::read(data_dir, index.registry_version())?;
    let epoch = old.epoch + 1;
    let new = keystore::create(data_dir, epoch)?;
    let endorsement =
        rotation::endorse(&old.key, old.epoch, new.key.public_key(), epoch, &mut OsRng);
    let step = KeyStep {
        epoch,
        public_key: *new.key.public_key(),
        endorsement,
    };
    drop(old);
    let server = Server::new(Mode::Voprf, new.key);
    let bar = bar(show_progress, Some(records.len()), "re-encrypting");
    let mut tags = Vec::with_capacity(usize::try_from(records.len()).unwrap_or(0));
    let mut hashes = Vec::with_capacity(tags.capacity());
    let all: Vec<&[u8]> = records.iter().collect();
    for chunk in all.chunks(CHUNK_ROWS) {
        tags.extend(
            server
                .evaluate_batch(chunk)?
                .iter()
                .map(psi_core::Output::tag),
        );
        hashes.par_extend(chunk.par_iter().map(|e| bucket_of_encoding(e, 32)));
        bar.inc(chunk.len() as u64);
    }
    drop(all);
    bar.finish_and_clear();
    let version = index.registry_version() + 1;
    let p = prefix_bits_for(tags.len() as u64);
    let new_index = BucketIndex::build(p, &buckets_of(&hashes, p), &tags, epoch, version)?;
    keystore::append_history(data_dir, &step)?;
    records.version = version;
    records.write(data_dir)?;
    // The commit point: from here the new epoch is the registry's.
    write_atomically(&data_dir.join(SNAPSHOT_FILE), &new_index.to_bytes(), 0o600)?;
    Delta::remove_all(data_dir)?;
    Records::remove_segments(data_dir)?;
    keystore::retire(data_dir, index.epoch(), grace)?;
    keystore::sweep(data_dir, epoch, SystemTime::now())?;
    Ok(RotateReport {
        old_epoch: index.epoch(),
        epoch,
        registry_version: version,
        records: records.len(),
        old_key_destroyed_after: grace,
        elapsed: started.elapsed(),
    })
}
