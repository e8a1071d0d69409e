//! Publishing a serving directory: what `serve` reads (the OPRF keys, the
//! public key history, the deltas and the bucket index), and nothing of the
//! plaintext registry. `records.bin` (every canonical name and ID number)
//! and the rejected-rows report stay in the encoding directory, on the host
//! where the source lives; the host that institutions connect to holds keys
//! and tags only.
//!
//! The serving directory mirrors the encoding directory's serving files:
//! keys, history and deltas first, each written atomically (a new delta is
//! an update's commit: a running server applies it to the base it holds),
//! then the base bucket index, whose replacement is the commit point of
//! `init`, `compact` and `rotate-key`. Files the encoding directory no
//! longer has are removed: a destroyed key (overwritten with zeros first)
//! before the index, a delta past its window or of an old epoch after it. The encoding directory's retired keys are swept before, so a key
//! destroyed on either side is never brought back.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::SystemTime;

use anyhow::{bail, Context, Result};

use crate::store::delta::DELTA_DIR;
use crate::store::keystore::{self, HISTORY_FILE};
use crate::store::records::RECORDS_FILE;
use crate::store::{self, SNAPSHOT_FILE};
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
/// `records.bin`) or `data_dir` itself, another publication or change
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
    let _source = store::lock(data_dir, false)?;
    let _target = store::lock(to, true)?;
    let index = store::current_index(data_dir)?;
    keystore::sweep(data_dir, index.epoch(), SystemTime::now())?;

    let mut report = PublishReport {
        epoch: index.epoch(),
        registry_version: index.registry_version(),
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
    for stale in keystore::key_file_names(to)?.difference(&keys) {
        keystore::destroy(&to.join(stale))?;
        report.files_removed += 1;
    }
    // The public key history.
    let history = data_dir.join(HISTORY_FILE);
    if history.exists() {
        copy(&history, &to.join(HISTORY_FILE), false)?;
    }
    // Deltas.
    let (from_deltas, to_deltas) = (data_dir.join(DELTA_DIR), to.join(DELTA_DIR));
    let deltas = file_names(&from_deltas)?;
    if !deltas.is_empty() {
        fs::create_dir_all(&to_deltas)
            .with_context(|| format!("creating {}", to_deltas.display()))?;
    }
    for name in &deltas {
        copy(&from_deltas.join(name), &to_deltas.join(name), false)?;
    }
    // The commit point: the base index (an update's commit, its delta, is
    // already in place).
    copy(
        &data_dir.join(SNAPSHOT_FILE),
        &to.join(SNAPSHOT_FILE),
        false,
    )?;
    // Only then the deltas the encoding side dropped: removed earlier, an
    // old epoch's log could vanish under the old base and a watching server
    // fall back to that base's version for a moment.
    for stale in file_names(&to_deltas)?.difference(&deltas) {
        let path = to_deltas.join(stale);
        fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        report.files_removed += 1;
    }
    Ok(report)
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
