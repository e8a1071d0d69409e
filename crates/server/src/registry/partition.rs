//! Partitioned encoding: `init --partition I/N` encrypts one deterministic
//! slice of the source into a part file, on as many machines as there are
//! slices (a Kubernetes Indexed Job: `deploy/k8s/encode-job.yaml`), and
//! `merge` combines the N parts into the snapshot a single-process `init`
//! of the same rows writes, byte for byte.
//!
//! A slice is the accepted rows whose canonical record hashes to I (mod N)
//! and the rejected rows whose line number does: every process reads and
//! validates the whole source (cheap) and evaluates the OPRF (the cost)
//! for its slice only. Every process needs the key: create it first with
//! `psi-server keygen` in the shared data directory. A part holds canonical
//! records (personal data): it is written with mode 0600, and `merge`
//! leaves the parts for the operator to delete.
//!
//! Part file `part-I-of-N.bin`, big-endian:
//! `PSIPART\0\x01`, epoch, I, N, rows, accepted (u64 each); the rejection
//! counts (u32 count, then per reason a u32 length, the reason, a u64
//! count); the rejected-rows report lines (u64 length, CSV without header);
//! the records (u64 count, then per record: source line u64, tag u64,
//! bucket hash u32, u32 length, canonical record).

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use psi_core::Tag;

use crate::keyholder::pool::HoldersConfig;
use crate::registry::tagger::Tagger;

use crate::registry::encode::{Encrypted, Slice};
use crate::registry::source::Source;
use crate::registry::{self, InitReport, PublishGuard, RowCounts};
use crate::store::{self, keystore};
use psi_files::atomic::write_atomically;

const MAGIC: &[u8; 8] = b"PSIPART\x01";

/// The part file of slice `index` of `count` in `parts_dir`.
#[must_use]
pub fn part_path(parts_dir: &Path, slice: Slice) -> PathBuf {
    parts_dir.join(format!("part-{}-of-{}.bin", slice.index, slice.count))
}

/// Parses `I/N` (0 <= I < N).
///
/// # Errors
/// Anything else, saying what is expected.
pub fn parse_slice(text: &str) -> Result<Slice, String> {
    let parsed = text
        .split_once('/')
        .and_then(|(i, n)| Some((i.trim().parse().ok()?, n.trim().parse().ok()?)));
    match parsed {
        Some((index, count)) if index < count => Ok(Slice { index, count }),
        _ => Err(format!(
            "`{text}` is not a partition: expected I/N with 0 <= I < N, e.g. 0/4"
        )),
    }
}

/// What encoding one part did.
#[derive(Debug, Clone)]
pub struct PartReport {
    /// The part file written.
    pub path: PathBuf,
    /// The slice's rows: read, accepted, rejected.
    pub counts: RowCounts,
    /// Wall time.
    pub elapsed: Duration,
}

/// Encrypts `slice` of `source` with the key in `data_dir` (which is only
/// read: parts run in parallel) into its part file in `parts_dir`.
///
/// # Errors
/// No key in `data_dir` (create it with `psi-server keygen`), unreadable
/// input, I/O errors.
pub fn encode_part(
    source: &Source,
    data_dir: &Path,
    parts_dir: &Path,
    slice: Slice,
    show_progress: bool,
    holders: Option<&HoldersConfig>,
) -> Result<PartReport> {
    let started = Instant::now();
    let (epoch, server) = match store::committed(data_dir)? {
        // The registry's key (or committee), checked against the manifest.
        Some(m) => (
            m.epoch,
            Tagger::of_epoch(data_dir, m.epoch, Some(&m.public_key), holders)?,
        ),
        None => {
            let epoch = Tagger::newest_epoch(data_dir)?.with_context(|| {
                format!(
                    "{} has no key: create it once with `psi-server keygen --data-dir {}` (or, in threshold mode, `psi-server keyholder dkg`) before the partitions run",
                    data_dir.display(),
                    data_dir.display()
                )
            })?;
            (epoch, Tagger::of_epoch(data_dir, epoch, None, holders)?)
        }
    };
    let mut rejected = csv::Writer::from_writer(Vec::new());
    let (enc, counts) = registry::encode::encrypt_source(
        source,
        "registry",
        &server,
        &mut rejected,
        show_progress,
        Some(slice),
    )?;
    let rejected = rejected.into_inner()?;
    let mut out = Vec::with_capacity(64 + usize::try_from(enc.records.len())? * 64);
    out.extend_from_slice(MAGIC);
    for v in [
        epoch,
        slice.index,
        slice.count,
        counts.rows,
        counts.accepted,
    ] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out.extend_from_slice(&u32::try_from(counts.rejected.len())?.to_be_bytes());
    for (reason, n) in &counts.rejected {
        out.extend_from_slice(&u32::try_from(reason.len())?.to_be_bytes());
        out.extend_from_slice(reason.as_bytes());
        out.extend_from_slice(&n.to_be_bytes());
    }
    out.extend_from_slice(&(rejected.len() as u64).to_be_bytes());
    out.extend_from_slice(&rejected);
    out.extend_from_slice(&enc.records.len().to_be_bytes());
    for (((record, tag), hash), line) in enc
        .records
        .iter()
        .zip(&enc.tags)
        .zip(&enc.hashes)
        .zip(&enc.lines)
    {
        out.extend_from_slice(&line.to_be_bytes());
        out.extend_from_slice(&tag.0.to_be_bytes());
        out.extend_from_slice(&hash.to_be_bytes());
        out.extend_from_slice(&u32::try_from(record.len())?.to_be_bytes());
        out.extend_from_slice(record);
    }
    // The parts hold canonical records: the directory is the owner's only.
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(parts_dir)
        .with_context(|| format!("creating {}", parts_dir.display()))?;
    let path = part_path(parts_dir, slice);
    write_atomically(&path, &out, 0o600)?;
    Ok(PartReport {
        path,
        counts,
        elapsed: started.elapsed(),
    })
}

/// Reads a part file's fields in order, naming the file in every error.
struct Reader<'a> {
    bytes: &'a [u8],
    path: &'a Path,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let Some((head, rest)) = self.bytes.split_at_checked(n) else {
            bail!("{} is truncated or damaged", self.path.display());
        };
        self.bytes = rest;
        Ok(head)
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into()?))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into()?))
    }
}

/// One part, read back.
struct Part {
    epoch: u64,
    counts: RowCounts,
    /// Report lines: (source line, CSV record).
    rejected: Vec<(u64, csv::StringRecord)>,
    enc: Encrypted,
}

fn read_part(path: &Path, slice: Slice) -> Result<Part> {
    let bytes = fs::read(path).with_context(|| {
        format!(
            "reading {} (did partition {}/{} finish?)",
            path.display(),
            slice.index,
            slice.count
        )
    })?;
    let mut r = Reader {
        bytes: &bytes,
        path,
    };
    if r.take(8)? != MAGIC {
        bail!("{} is not a psi-server part file", path.display());
    }
    let epoch = r.u64()?;
    if (r.u64()?, r.u64()?) != (slice.index, slice.count) {
        bail!(
            "{} is not partition {}/{}",
            path.display(),
            slice.index,
            slice.count
        );
    }
    let mut counts = RowCounts {
        rows: r.u64()?,
        accepted: r.u64()?,
        ..RowCounts::default()
    };
    for _ in 0..r.u32()? {
        let len = r.u32()? as usize;
        let reason = String::from_utf8(r.take(len)?.to_vec())
            .with_context(|| format!("{} is damaged", path.display()))?;
        let n = r.u64()?;
        counts.rejected.insert(reason, n);
    }
    let len = usize::try_from(r.u64()?)?;
    let mut rejected = Vec::new();
    for record in csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(r.take(len)?)
        .records()
    {
        let record = record.with_context(|| format!("{} is damaged", path.display()))?;
        let line = record.get(1).and_then(|l| l.parse().ok()).unwrap_or(0);
        rejected.push((line, record));
    }
    let n = r.u64()?;
    let mut enc = Encrypted::default();
    for _ in 0..n {
        enc.lines.push(r.u64()?);
        enc.tags.push(Tag(r.u64()?));
        enc.hashes.push(r.u32()?);
        let len = r.u32()? as usize;
        enc.records.push(r.take(len)?)?;
    }
    if !r.bytes.is_empty() {
        bail!("{} has trailing bytes", path.display());
    }
    if enc.lines.windows(2).any(|w| w.first() >= w.last()) {
        bail!("{} is damaged: its rows are out of order", path.display());
    }
    Ok(Part {
        epoch,
        counts,
        rejected,
        enc,
    })
}

/// Combines the `count` parts in `parts_dir` into the next registry version
/// of `data_dir`: the same snapshot, records and report as `init` of the
/// whole source would write (rows in source order, repeated records kept
/// once, `guard` applied to the whole).
///
/// # Errors
/// A missing, damaged or foreign part (another epoch, another N), the
/// guard's refusals, I/O errors.
pub fn merge(
    data_dir: &Path,
    parts_dir: &Path,
    count: u64,
    guard: &PublishGuard,
) -> Result<InitReport> {
    let started = Instant::now();
    if count == 0 {
        bail!("--partitions must be at least 1");
    }
    let mut store = store::Writer::open(data_dir, true)?;
    let previous = store.current()?.map(|c| c.index);
    let mut counts = RowCounts::default();
    let mut rejected = Vec::new();
    let mut encrypted = Vec::new();
    let mut epoch = None;
    for index in 0..count {
        let slice = Slice { index, count };
        let part = read_part(&part_path(parts_dir, slice), slice)?;
        if *epoch.get_or_insert(part.epoch) != part.epoch {
            bail!(
                "the parts were encrypted under different key epochs ({} and {}): rerun them",
                epoch.unwrap_or_default(),
                part.epoch
            );
        }
        counts.rows += part.counts.rows;
        counts.accepted += part.counts.accepted;
        for (reason, n) in part.counts.rejected {
            *counts.rejected.entry(reason).or_default() += n;
        }
        rejected.extend(part.rejected);
        encrypted.push(part.enc);
    }
    let epoch = epoch.unwrap_or_default();
    let current = previous
        .as_ref()
        .map_or_else(|| keystore::latest_epoch(data_dir), |i| Ok(Some(i.epoch())))?;
    if current != Some(epoch) {
        bail!(
            "the parts were encrypted under key epoch {epoch}, but {} is at {}: rerun the partitions",
            data_dir.display(),
            current.map_or("no key".to_string(), |e| format!("epoch {e}"))
        );
    }
    // Source order, as one process would have read the rows: each part is
    // in source order already, so a k-way merge of the parts' lines.
    rejected.sort_by_key(|r| r.0);
    let enc = merge_in_line_order(&encrypted)?;
    drop(encrypted);
    let mut report = registry::encode::report_writer()?;
    for (_, record) in &rejected {
        report.write_record(record)?;
    }
    let public_key = match store.manifest() {
        Some(m) if m.epoch == epoch => m.public_key,
        _ => Tagger::public_key_of(data_dir, epoch)?,
    };
    let mut r = registry::publish_version(
        &mut store,
        previous,
        (epoch, public_key),
        enc,
        counts,
        report.into_inner()?,
        guard,
    )?;
    r.elapsed = started.elapsed();
    Ok(r)
}

/// The parts' records in source-line order (each part is in that order).
fn merge_in_line_order(parts: &[Encrypted]) -> Result<Encrypted> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let mut records: Vec<_> = parts.iter().map(|p| p.records.iter()).collect();
    let mut next = vec![0usize; parts.len()];
    let mut heap: BinaryHeap<Reverse<(u64, usize)>> = parts
        .iter()
        .enumerate()
        .filter_map(|(i, p)| p.lines.first().map(|&l| Reverse((l, i))))
        .collect();
    let mut out = Encrypted::default();
    while let Some(Reverse((line, i))) = heap.pop() {
        let (Some(part), Some(at), Some(record)) = (
            parts.get(i),
            next.get_mut(i),
            records.get_mut(i).and_then(Iterator::next),
        ) else {
            bail!("a part's records and lines disagree");
        };
        out.lines.push(line);
        out.tags.extend(part.tags.get(*at));
        out.hashes.extend(part.hashes.get(*at));
        out.records.push(record)?;
        *at += 1;
        if let Some(&l) = part.lines.get(*at) {
            heap.push(Reverse((l, i)));
        }
    }
    if out.tags.len() != out.lines.len() || out.hashes.len() != out.lines.len() {
        bail!("a part's tags and lines disagree");
    }
    Ok(out)
}

/// Creates the key of epoch 1 in `data_dir` (created with mode 0700) for
/// the partitions to share; an existing key is kept.
///
/// # Errors
/// I/O errors.
pub fn keygen(data_dir: &Path) -> Result<(u64, bool)> {
    let _store = store::Writer::open(data_dir, true)?;
    match keystore::latest_epoch(data_dir)? {
        Some(epoch) => Ok((epoch, false)),
        None => Ok((keystore::create(data_dir, 1)?.epoch, true)),
    }
}
