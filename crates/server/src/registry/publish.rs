//! Publishing a serving directory: what `serve` reads (the OPRF keys, the
//! public key history, the deltas and the bucket index, and the manifest
//! that names them), and nothing of the plaintext registry. The record store
//! and the rejected-rows report stay in the encoding directory, on the host
//! where the source lives; the host that institutions connect to holds keys
//! and tags only.
//!
//! Every prefix of a publication is a directory that serves: the new files
//! (keys, history, deltas, a new base under its own name) are copied beside
//! the ones the serving directory's manifest names, then its manifest is
//! replaced (the commit point), and only then are the files it no longer
//! names removed: old bases and deltas, and keys the encoding directory
//! destroyed (overwritten with zeros first). The encoding directory's
//! retired keys are swept before, so a key destroyed on either side is never
//! brought back.

use std::fs;
use std::path::Path;
use std::time::SystemTime;

use anyhow::{bail, Context, Result};

use crate::store::keystore::{self, HISTORY_FILE};
use crate::store::manifest::Manifest;
use crate::store::records::RECORDS_FILE;
use crate::store::{self};

/// What a publication wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishReport {
    /// The key epoch published.
    pub epoch: u64,
    /// The registry version published.
    pub registry_version: u64,
    /// Files written (replaced or new).
    pub files_written: usize,
    /// Files removed from the serving directory.
    pub files_removed: usize,
    /// Bytes written.
    pub bytes_written: u64,
}

/// Publishes `data_dir`'s current snapshot into the serving directory `to`
/// (created with mode 0700 if missing).
///
/// # Errors
/// No registry in `data_dir`, `to` being an encoding directory (it holds
/// a record store) or `data_dir` itself, another publication or change
/// running, I/O errors.
pub fn publish(data_dir: &Path, to: &Path) -> Result<PublishReport> {
    let same = fs::canonicalize(data_dir)
        .ok()
        .is_some_and(|from| fs::canonicalize(to).ok().is_some_and(|to| to == from));
    if same {
        bail!("the serving directory must not be the encoding directory itself");
    }
    if to.join(RECORDS_FILE).exists() {
        bail!(
            "{} holds {RECORDS_FILE}: it is an encoding directory, not a serving one; publish into an empty or serving directory",
            to.display()
        );
    }
    // No init, update or rotation on either side meanwhile.
    let source = store::Writer::open(data_dir, false)?;
    let mut target = store::Writer::open(to, true)?;
    if target.manifest().is_some_and(|m| m.records.is_some()) {
        bail!(
            "{} holds a record store: it is an encoding directory, not a serving one; publish into an empty or serving directory",
            to.display()
        );
    }
    // Every file the source's manifest names, verified before it is copied.
    let current = source.current()?.with_context(|| {
        format!(
            "{} has no registry: run `psi-server init` first",
            data_dir.display()
        )
    })?;
    let manifest = current.manifest;
    // The epoch's key, or in threshold mode its committee, checked.
    crate::serving::snapshot::Evaluator::load(data_dir, manifest.epoch, &manifest.public_key)?;
    keystore::sweep(data_dir, manifest.epoch, SystemTime::now())?;

    let mut report = PublishReport {
        epoch: manifest.epoch,
        registry_version: manifest.version,
        ..PublishReport::default()
    };
    let mut copy = |name: &str, secret: bool| -> Result<()> {
        if let Some(bytes) = target.copy_in(data_dir, name, secret)? {
            report.files_written += 1;
            report.bytes_written += bytes;
        }
        Ok(())
    };
    // Keys (live and retired, as named in the encoding directory).
    let keys = keystore::key_file_names(data_dir)?;
    for name in &keys {
        copy(name, true)?;
    }
    // Threshold mode: the committee (public) instead of a key.
    let committee = crate::store::committee::path(data_dir, manifest.epoch);
    if committee.exists() {
        if let Some(name) = committee.file_name().and_then(|n| n.to_str()) {
            copy(name, false)?;
        }
    }
    // The public key history.
    if data_dir.join(HISTORY_FILE).exists() {
        copy(HISTORY_FILE, false)?;
    }
    // The deltas and the base, beside what the serving directory serves.
    for entry in manifest.deltas.iter().chain([&manifest.base]) {
        copy(&entry.name, false)?;
    }
    // The commit point; then what the serving directory no longer names,
    // and last the keys the encoding directory destroyed (the old
    // manifest's epoch served until the commit).
    report.files_removed += target.commit_serving(Manifest {
        records: None,
        segments: Vec::new(),
        ..manifest
    })?;
    report.files_removed += target.destroy_keys_except(&keys)?;
    Ok(report)
}
