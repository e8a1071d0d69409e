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

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::SystemTime;

use anyhow::{bail, Context, Result};

use crate::store::delta::DELTA_DIR;
use crate::store::keystore::{self, HISTORY_FILE};
use crate::store::manifest::Manifest;
use crate::store::records::RECORDS_FILE;
use crate::store::{self};
use psi_files::atomic::{copy_atomically, same_content};

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
    let target = store::Writer::open(to, true)?;
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
    source.key()?;
    keystore::sweep(data_dir, manifest.epoch, SystemTime::now())?;

    let mut report = PublishReport {
        epoch: manifest.epoch,
        registry_version: manifest.version,
        ..PublishReport::default()
    };
    // Each file keeps its mode (keys and the index are 0600); copied as a
    // stream, never held in memory (the index is ~8 bytes per entry).
    // Keys are copied by the kernel (copy_file_range), never read into this
    // process's memory, so they are not compared: always rewritten.
    let mut copy = |from: &Path, to: &Path, secret: bool| -> Result<()> {
        // Unchanged files are left alone (a running server may be reading them).
        if !secret && same_content(from, to) {
            return Ok(());
        }
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        let meta = fs::metadata(from).with_context(|| format!("reading {}", from.display()))?;
        copy_atomically(from, to, meta.permissions().mode() & 0o777)?;
        report.files_written += 1;
        report.bytes_written += meta.len();
        Ok(())
    };

    // Keys (live and retired, as named in the encoding directory).
    let keys = keystore::key_file_names(data_dir)?;
    for name in &keys {
        copy(&data_dir.join(name), &to.join(name), true)?;
    }
    // The public key history.
    let history = data_dir.join(HISTORY_FILE);
    if history.exists() {
        copy(&history, &to.join(HISTORY_FILE), false)?;
    }
    // The deltas and the base, beside what the serving directory serves.
    for entry in manifest.deltas.iter().chain([&manifest.base]) {
        copy(&data_dir.join(&entry.name), &to.join(&entry.name), false)?;
    }
    // The commit point; then what the serving directory no longer names.
    let serving = Manifest {
        records: None,
        segments: Vec::new(),
        ..manifest
    };
    let before = files_in(to)?;
    store::commit_serving(to, &serving)?;
    report.files_removed += before.difference(&files_in(to)?).count();
    // Keys the encoding directory destroyed, last: the old manifest's epoch
    // served until the commit.
    for stale in keystore::key_file_names(to)?.difference(&keys) {
        keystore::destroy(&to.join(stale))?;
        report.files_removed += 1;
    }
    drop(target);
    Ok(report)
}

/// The store's files in the serving directory `dir`, with the deltas'.
fn files_in(dir: &Path) -> Result<BTreeSet<String>> {
    let mut names = file_names(dir)?;
    names.extend(
        file_names(&dir.join(DELTA_DIR))?
            .into_iter()
            .map(|n| format!("{DELTA_DIR}/{n}")),
    );
    Ok(names)
}

/// Names of the regular files in `dir` (none if it does not exist), but
/// for temporary files of an atomic write in progress.
fn file_names(dir: &Path) -> Result<BTreeSet<String>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    let mut names = BTreeSet::new();
    for entry in entries {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            if let Some(name) = entry.file_name().to_str() {
                if !name.starts_with('.') {
                    names.insert(name.to_string());
                }
            }
        }
    }
    Ok(names)
}
