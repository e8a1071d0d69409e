//! The registry-holding side: `init` turns a registry source into the
//! encrypted snapshot, `update` adds and removes records as a new registry
//! version, `rotate_key` re-encrypts everything under a new key epoch,
//! `compact` folds the log into a new base.
//!
//! Each writes through the data directory's one writer, `store::Writer`
//! (log-structured: a base plus the deltas and record segments of the
//! updates since).

pub mod encode;
pub mod partition;
pub mod publish;
pub mod source;
pub mod tagger;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use psi_core::bucket::prefix_bits_for;
use psi_core::record::bucket_of_encoding;
use psi_core::rotation::{self, KeyStep};
use psi_core::{BucketIndex, Mode, Server, Tag};
use rand_core::OsRng;
use rayon::prelude::*;

use crate::keyholder::pool::HoldersConfig;
use crate::registry::encode::{
    bar, buckets_of, dedup, encrypt_source, report_writer, Encrypted, CHUNK_ROWS,
};
use crate::registry::source::Source;
use crate::registry::tagger::Tagger;
use crate::store::delta::{Delta, KEEP_DELTAS};
use crate::store::keystore;
use crate::store::records::Records;
use crate::store::{Current, Writer};

/// The rejected-rows report's name inside the data directory.
pub const REPORT_FILE: &str = "rejected-rows.csv";
/// Default for how many updates the log may hold before an update compacts
/// it into a new base (at most [`KEEP_DELTAS`]).
pub const DEFAULT_COMPACT_AFTER: usize = 32;

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

    /// Refuses `label`'s rows when none was accepted (a header-only file
    /// included) or too many were rejected.
    fn check_rows(&self, label: &str, counts: &RowCounts) -> Result<()> {
        if self.force {
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

/// Validates, canonicalises and encrypts every row of `source` on all cores
/// and writes a new registry version into `data_dir` (created if needed),
/// replacing the whole registry. Creates the key if there is none.
///
/// # Errors
/// Unreadable input, a source without the name and ID columns, I/O errors.
pub fn init(source: &Source, data_dir: &Path, show_progress: bool) -> Result<InitReport> {
    init_guarded(
        source,
        data_dir,
        show_progress,
        &PublishGuard::default(),
        None,
    )
}

/// [`init`] held to `guard`: a source with too many rejected rows, or a
/// registry that shrinks too much, is refused before anything is published
/// (the rejected-rows report is still written, to say why). In threshold
/// mode (a committee file for the epoch, from `psi-server keyholder dkg`
/// or `psi-server key split`) the tags are made through `holders`.
///
/// # Errors
/// As [`init`], and the guard's refusals; a threshold-mode epoch without
/// `holders`, or fewer than `t` of them answering.
pub fn init_guarded(
    source: &Source,
    data_dir: &Path,
    show_progress: bool,
    guard: &PublishGuard,
    holders: Option<&HoldersConfig>,
) -> Result<InitReport> {
    let started = Instant::now();
    let mut store = Writer::open(data_dir, true)?;
    let previous = store.current()?.map(|c| c.index);
    let (epoch, tagger, key_created) = match (&previous, Tagger::newest_epoch(data_dir)?) {
        (Some(_), _) => {
            let m = store.committed()?;
            let tagger = Tagger::of_epoch(data_dir, m.epoch, Some(&m.public_key), holders)?;
            (m.epoch, tagger, false)
        }
        (None, Some(epoch)) => (
            epoch,
            Tagger::of_epoch(data_dir, epoch, None, holders)?,
            false,
        ),
        (None, None) => {
            let key = keystore::create(data_dir, 1)?;
            (1, Tagger::Key(Server::new(Mode::Voprf, key.key)), true)
        }
    };
    let public_key = tagger.public_key().to_bytes();
    let mut rejected = report_writer()?;
    let (enc, counts) = encrypt_source(
        source,
        "registry",
        &tagger,
        &mut rejected,
        show_progress,
        None,
    )?;
    let mut report = publish_version(
        &mut store,
        previous,
        (epoch, public_key),
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
/// repeated records, applies `guard`, writes the rejected-rows report
/// (`rejected`: CSV with its header) and commits the records, the index
/// and the delta from `previous` as the next registry version, under the
/// key of `(epoch, public key)`.
pub(crate) fn publish_version(
    store: &mut Writer,
    previous: Option<BucketIndex>,
    (epoch, public_key): (u64, [u8; 32]),
    enc: Encrypted,
    counts: RowCounts,
    rejected: Vec<u8>,
    guard: &PublishGuard,
) -> Result<InitReport> {
    let started = Instant::now();
    let data_dir = store.dir().to_path_buf();
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
        store.write_report(REPORT_FILE, &rejected)?;
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
    let sync_delta = previous.filter(|i| i.epoch() == epoch).map(|prev| {
        let old: Vec<Tag> = prev.tags().collect();
        Delta::between(epoch, prev.registry_version(), version, &old, &enc.tags)
    });
    store.write_report(REPORT_FILE, &rejected)?;
    // The commit point.
    store.commit_base(&index, &records, public_key, sync_delta.as_ref())?;
    keystore::sweep(&data_dir, epoch, SystemTime::now())?;
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
        None,
    )
}

/// [`update_guarded`] compacting the log once it holds `compact_after`
/// updates (1 to [`KEEP_DELTAS`]), making tags through `holders` in
/// threshold mode.
///
/// # Errors
/// As [`update_guarded`]; `compact_after` out of range; a threshold-mode
/// epoch without `holders`, or fewer than `t` of them answering.
pub fn update_with(
    add: Option<&Source>,
    remove: Option<&Source>,
    data_dir: &Path,
    show_progress: bool,
    guard: &PublishGuard,
    compact_after: usize,
    holders: Option<&HoldersConfig>,
) -> Result<UpdateReport> {
    let started = Instant::now();
    if add.is_none() && remove.is_none() {
        bail!("nothing to do: give --add, --remove or both");
    }
    if !(1..=KEEP_DELTAS).contains(&compact_after) {
        bail!("--compact-after must be between 1 and {KEEP_DELTAS}, not {compact_after}");
    }
    let mut store = Writer::open(data_dir, false)?;
    let mut current = committed_version(&store)?;
    if current.log_len >= compact_after {
        compact_locked(&mut store, &current)?;
        current.base_version = current.index.registry_version();
        current.log_len = 0;
    }
    let index = &current.index;
    let m = store.committed()?;
    let epoch = m.epoch;
    let tagger = Tagger::of_epoch(data_dir, epoch, Some(&m.public_key), holders)?;
    let report_path = data_dir.join(REPORT_FILE);
    let mut rejected = report_writer()?;
    let mut report = UpdateReport {
        epoch,
        report_path: report_path.clone(),
        ..UpdateReport::default()
    };
    let mut run = |source: Option<&Source>, label: &str| -> Result<(Encrypted, RowCounts)> {
        match source {
            Some(s) => encrypt_source(s, label, &tagger, &mut rejected, show_progress, None),
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
    // Each source given must have valid rows (a header-only file is a slip).
    let refusal = [
        (add.is_some(), "add", &report.add),
        (remove.is_some(), "remove", &report.remove),
    ]
    .into_iter()
    .filter(|(given, _, _)| *given)
    .try_for_each(|(_, label, counts)| guard.check_rows(label, counts))
    .and_then(|()| guard.check_shrink(before, report.records));
    let rejected = rejected.into_inner()?;
    if let Err(e) = refusal {
        store.write_report(REPORT_FILE, &rejected)?;
        return Err(e.context(format!(
            "nothing was published; rejected rows are listed in {}",
            report_path.display()
        )));
    }
    let from = index.registry_version();
    let version = from + 1;
    store.write_report(REPORT_FILE, &rejected)?;
    // The commit point: the delta that leads on from the current version.
    let delta = Delta::of_change(epoch, from, version, &added, &removed);
    store.commit_update(
        current.base_version,
        &delta,
        &added_records,
        &removed_records,
    )?;
    report.registry_version = version;
    report.elapsed = started.elapsed();
    Ok(report)
}

/// The committed version of `store`; an error if there is no registry.
fn committed_version(store: &Writer) -> Result<Current> {
    store.current()?.with_context(|| {
        format!(
            "{} has no registry: run `psi-server init` first",
            store.dir().display()
        )
    })
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
    let mut store = Writer::open(data_dir, false)?;
    let current = committed_version(&store)?;
    let records = if current.log_len == 0 {
        store.records()?.len()
    } else {
        compact_locked(&mut store, &current)?
    };
    Ok(CompactReport {
        registry_version: current.index.registry_version(),
        updates_folded: current.log_len,
        records,
        elapsed: started.elapsed(),
    })
}

/// Commits `current` as the new base (a new base of the same version: a
/// watcher reloads the same registry); the folded segments go.
fn compact_locked(store: &mut Writer, current: &Current) -> Result<u64> {
    let version = current.index.registry_version();
    let records = store.records()?;
    store.commit_base(&current.index, &records, current.manifest.public_key, None)?;
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
    rotate_key_with(data_dir, grace, show_progress, None)
}

/// [`rotate_key`], in threshold mode through `holders`: they generate the
/// next epoch's key among themselves (no dealer), the retiring epoch's
/// holders endorse it with a threshold signature, and the records are
/// re-encrypted through them. (A rotation that failed after the key
/// generation reuses the new epoch's committee file on its next run.) Once
/// the replicas serve the new epoch, retire the old shares
/// (`psi-server keyholder retire`).
///
/// # Errors
/// As [`rotate_key`]; a threshold-mode epoch without `holders`; a
/// ceremony failure.
pub fn rotate_key_with(
    data_dir: &Path,
    grace: Duration,
    show_progress: bool,
    holders: Option<&HoldersConfig>,
) -> Result<RotateReport> {
    let started = Instant::now();
    let mut store = Writer::open(data_dir, false)?;
    let index = committed_version(&store)?.index;
    let m = store.committed()?.clone();
    let mut records = store.records()?;
    let epoch = m.epoch + 1;
    let (step, server) = match crate::store::committee::load_committed(
        data_dir,
        m.epoch,
        &m.public_key,
    )? {
        None => {
            let old = store.key()?;
            let new = keystore::create(data_dir, epoch)?;
            let endorsement =
                rotation::endorse(&old.key, old.epoch, new.key.public_key(), epoch, &mut OsRng);
            let step = KeyStep {
                epoch,
                public_key: *new.key.public_key(),
                endorsement,
            };
            drop(old);
            (step, Tagger::Key(Server::new(Mode::Voprf, new.key)))
        }
        Some(old) => {
            let holders = holders.with_context(|| {
                format!(
                    "key epoch {} is in threshold mode: its holders make the next key; give --holders (with --holders-ca, --holders-cert, --holders-key)",
                    m.epoch
                )
            })?;
            let (handle, _runtime) = crate::keyholder::pool::runtime_handle()?;
            let pool = {
                let _entered = handle.enter();
                crate::keyholder::pool::HolderPool::new(holders, None)?
            };
            let new_path = crate::store::committee::path(data_dir, epoch);
            let new = match crate::store::committee::load_at(&new_path, epoch)? {
                Some(made) => made,
                None => {
                    let made = handle.block_on(crate::keyholder::ceremony::generate(
                        &pool,
                        old.committee.threshold(),
                        epoch,
                        0,
                    ))?;
                    crate::store::committee::store_at(&new_path, epoch, &made)?;
                    made
                }
            };
            let message = psi_core::threshold::sign::Endorsed {
                old_epoch: m.epoch,
                new_key: *new.committee.public_key(),
                new_epoch: epoch,
            };
            let endorsement = handle.block_on(crate::keyholder::ceremony::endorse(
                &pool,
                &old.committee,
                &message,
            ))?;
            let step = KeyStep {
                epoch,
                public_key: message.new_key,
                endorsement,
            };
            (
                step,
                Tagger::of_epoch(data_dir, epoch, None, Some(holders))?,
            )
        }
    };
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
    // The commit point: from here the new epoch is the registry's (the old
    // epoch's deltas and segments go with it).
    store.commit_base(&new_index, &records, step.public_key.to_bytes(), None)?;
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
