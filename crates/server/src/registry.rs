//! The registry store: `init` turns a CSV registry into the encrypted
//! snapshot (the bucket index of all tags, from which the sync tag set is
//! derived), and `Snapshot::load` reads it back for serving.
//!
//! Data directory:
//! - `oprf.key`: the key and its epoch (mode 0600; see `keystore`).
//! - `registry.bkt`: the bucket index (tags grouped by bucket), written atomically.
//! - `rejected-rows.csv`: the last init's rejected rows: row, field, reason;
//!   never a name or an ID number.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use psi_core::bucket::prefix_bits_for;
use psi_core::record::bucket_of_encoding;
use psi_core::{BucketIndex, CivilDate, Error as CoreError, Mode, Record, Server, Tag, TagSet};
use rayon::prelude::*;

use crate::atomic_file::write_atomically;
use crate::keystore;

/// The snapshot file's name inside the data directory.
pub const SNAPSHOT_FILE: &str = "registry.bkt";
/// The rejected-rows report's name inside the data directory.
pub const REPORT_FILE: &str = "rejected-rows.csv";
const CHUNK_ROWS: usize = 1 << 16;

/// What the server serves: the key and the encrypted registry of one epoch.
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
}

impl Snapshot {
    /// Loads the key and the snapshot and builds the tag set.
    ///
    /// # Errors
    /// Missing or corrupt files, or a snapshot of another key epoch.
    pub fn load(data_dir: &Path) -> Result<Self> {
        let key = keystore::load(data_dir)?;
        let path = data_dir.join(SNAPSHOT_FILE);
        let bytes = fs::read(&path)
            .with_context(|| format!("reading {} (run `psi-server init` first)", path.display()))?;
        let index = BucketIndex::from_bytes(&bytes)
            .with_context(|| format!("loading {}", path.display()))?;
        if index.epoch() != key.epoch {
            bail!(
                "snapshot {} is of key epoch {} but the key is of epoch {}; rerun `psi-server init`",
                path.display(),
                index.epoch(),
                key.epoch
            );
        }
        let tags: Vec<Tag> = index.tags().collect();
        let tagset = TagSet::build(&tags, key.epoch, index.registry_version())?;
        Ok(Self {
            server: Server::new(Mode::Voprf, key.key),
            epoch: key.epoch,
            index,
            tagset,
        })
    }
}

/// What `init` did.
#[derive(Debug, Clone, Default)]
pub struct InitReport {
    /// Data rows read.
    pub rows: u64,
    /// Rows encrypted into the registry.
    pub accepted: u64,
    /// Rows rejected, by field and reason.
    pub rejected: BTreeMap<String, u64>,
    /// Whether a new key was created.
    pub key_created: bool,
    /// The key epoch.
    pub epoch: u64,
    /// The new registry version.
    pub registry_version: u64,
    /// Bucket prefix bits chosen.
    pub bucket_prefix_bits: u8,
    /// Where the rejected rows are listed.
    pub report_path: PathBuf,
    /// Wall time.
    pub elapsed: Duration,
}

impl InitReport {
    /// Total rejected rows.
    #[must_use]
    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }
}

/// Today's date in China Standard Time, for birth-date validation (the
/// client validates against the same date).
#[must_use]
pub fn today() -> CivilDate {
    psi_client::today()
}

struct Row {
    line: u64,
    name: Option<String>,
    id: Option<String>,
}

/// A rejected row's field and reason: never the value itself.
fn rejection(e: &CoreError) -> (&'static str, String) {
    match e {
        CoreError::InvalidName { reason } => ("name", reason.to_string()),
        CoreError::InvalidIdNumber { reason } => ("id", reason.summary().to_string()),
        other => ("row", other.to_string()),
    }
}

/// Validates, canonicalises and encrypts every row of `registry` (a CSV file
/// with a header naming the columns `name` and `id`) on all cores, and writes
/// the snapshot into `data_dir` atomically. Creates the key if there is none.
///
/// # Errors
/// Unreadable input, a header without `name` or `id`, I/O errors.
pub fn init(registry: &Path, data_dir: &Path, show_progress: bool) -> Result<InitReport> {
    let started = Instant::now();
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .with_context(|| format!("creating data directory {}", data_dir.display()))?;
    let stale = crate::atomic_file::remove_stale_temps(data_dir)?;
    if stale > 0 {
        tracing::warn!(stale, "removed temporary files left by an interrupted run");
    }
    let (key, key_created) = keystore::load_or_create(data_dir)?;
    let epoch = key.epoch;
    let server = Server::new(Mode::Voprf, key.key);
    let previous_version = fs::read(data_dir.join(SNAPSHOT_FILE))
        .ok()
        .and_then(|b| BucketIndex::from_bytes(&b).ok())
        .map_or(0, |i| i.registry_version());

    let file_len = fs::metadata(registry)
        .with_context(|| format!("reading {}", registry.display()))?
        .len();
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_path(registry)
        .with_context(|| format!("opening {}", registry.display()))?;
    let headers = reader
        .byte_headers()
        .with_context(|| format!("reading the header of {}", registry.display()))?
        .clone();
    let column = |want: &str| {
        headers
            .iter()
            .position(|h| h.trim_ascii().eq_ignore_ascii_case(want.as_bytes()))
            .with_context(|| {
                format!(
                    "{} has no `{want}` column: its first line must name the columns `name` and `id`",
                    registry.display()
                )
            })
    };
    let (name_col, id_col) = (column("name")?, column("id")?);

    let bar = if show_progress {
        ProgressBar::new(file_len)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "encrypting {bar:40} {bytes}/{total_bytes} {msg} ({elapsed}, ETA {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );

    let report_path = data_dir.join(REPORT_FILE);
    let mut rejected_rows = csv::Writer::from_writer(Vec::new());
    rejected_rows.write_record(["row", "field", "reason"])?;
    let mut report = InitReport {
        key_created,
        epoch,
        report_path: report_path.clone(),
        ..InitReport::default()
    };
    let today = today();
    let mut tags: Vec<Tag> = Vec::new();
    let mut hashes: Vec<u32> = Vec::new();
    let mut record = csv::ByteRecord::new();
    loop {
        let mut rows = Vec::with_capacity(CHUNK_ROWS);
        while rows.len() < CHUNK_ROWS && reader.read_byte_record(&mut record)? {
            let field = |i: usize| {
                record
                    .get(i)
                    .and_then(|f| std::str::from_utf8(f).ok().map(str::to_owned))
            };
            rows.push(Row {
                line: record.position().map_or(0, csv::Position::line),
                name: field(name_col),
                id: field(id_col),
            });
        }
        if rows.is_empty() {
            break;
        }
        report.rows += rows.len() as u64;
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
        for (row, p) in rows.iter().zip(parsed) {
            match p {
                Ok(encoded) => accepted.push(encoded),
                Err((field, reason)) => {
                    rejected_rows.write_record([row.line.to_string().as_str(), field, &reason])?;
                    *report
                        .rejected
                        .entry(format!("{field}: {reason}"))
                        .or_default() += 1;
                }
            }
        }
        let outputs = server.evaluate_batch(&accepted)?;
        tags.extend(outputs.iter().map(psi_core::Output::tag));
        hashes.par_extend(accepted.par_iter().map(|e| bucket_of_encoding(e, 32)));
        report.accepted += accepted.len() as u64;
        bar.set_position(reader.position().byte());
        bar.set_message(format!("{} rows", report.rows));
    }
    bar.finish_and_clear();

    let p = prefix_bits_for(report.accepted);
    let buckets: Vec<u32> = hashes
        .par_iter()
        .map(|h| if p == 0 { 0 } else { h >> (32 - u32::from(p)) })
        .collect();
    drop(hashes);
    report.registry_version = previous_version + 1;
    report.bucket_prefix_bits = p;
    let index = BucketIndex::build(p, &buckets, &tags, epoch, report.registry_version)?;
    write_atomically(&report_path, &rejected_rows.into_inner()?, 0o600)?;
    write_atomically(&data_dir.join(SNAPSHOT_FILE), &index.to_bytes(), 0o600)?;
    report.elapsed = started.elapsed();
    Ok(report)
}
