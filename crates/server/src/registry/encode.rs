//! Encoding a source: every row validated, canonicalised and encrypted on
//! all cores, a chunk at a time; rejected rows reported by field and reason.

use std::collections::HashSet;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use psi_core::record::bucket_of_encoding;
use psi_core::{CivilDate, Error as CoreError, Record, Tag};
use rayon::prelude::*;

use crate::registry::source::Source;
use crate::registry::RowCounts;
use crate::store::records::Records;

pub(crate) const CHUNK_ROWS: usize = 1 << 16;

/// A rejected row's field and reason: never the value itself.
fn rejection(e: &CoreError) -> (&'static str, String) {
    match e {
        CoreError::InvalidName { reason } => ("name", reason.to_string()),
        CoreError::InvalidIdNumber { reason } => ("id", reason.summary().to_string()),
        other => ("row", other.to_string()),
    }
}

pub(crate) fn bar(show: bool, len: Option<u64>, what: &str) -> ProgressBar {
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
    server: &crate::registry::tagger::Tagger,
    rejected: &mut csv::Writer<Vec<u8>>,
    show_progress: bool,
    slice: Option<Slice>,
) -> Result<(Encrypted, RowCounts)> {
    let mut reader = source.open()?;
    let (_, total) = reader.progress();
    let bar = bar(show_progress, total, "encrypting");
    let today = CivilDate::today();
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

pub(crate) fn buckets_of(hashes: &[u32], p: u8) -> Vec<u32> {
    hashes
        .par_iter()
        .map(|h| if p == 0 { 0 } else { h >> (32 - u32::from(p)) })
        .collect()
}

/// Drops repeated records (a person listed twice), keeping the first.
pub(crate) fn dedup(enc: Encrypted) -> Encrypted {
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
