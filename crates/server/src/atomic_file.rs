//! Files replaced atomically: written beside their final path, synced,
//! renamed over it, and the directory synced, so a crash at any point leaves
//! either the old file or the new one, never a half-written one.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Writes `bytes` to `path` atomically, the file created with `mode` (e.g. 0o600).
///
/// # Errors
/// Any I/O error, with the path in its context.
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    replace_with(path, mode, |f, tmp| {
        f.write_all(bytes)
            .with_context(|| format!("writing {}", tmp.display()))
    })
}

/// Copies `from` to `to` atomically, streaming (no copy held in memory),
/// the new file created with `mode`.
///
/// # Errors
/// Any I/O error, with the paths in its context.
pub fn copy_atomically(from: &Path, to: &Path, mode: u32) -> Result<()> {
    let mut source = File::open(from).with_context(|| format!("opening {}", from.display()))?;
    replace_with(to, mode, |f, tmp| {
        std::io::copy(&mut source, f)
            .map(|_| ())
            .with_context(|| format!("copying {} to {}", from.display(), tmp.display()))
    })
}

/// Creates the temporary file beside `path`, lets `fill` write it, syncs
/// it, renames it over `path` and syncs the directory; the temporary file
/// is removed if anything fails.
fn replace_with(
    path: &Path,
    mode: u32,
    fill: impl FnOnce(&mut File, &Path) -> Result<()>,
) -> Result<()> {
    let tmp = temp_path(path);
    let result = (|| -> Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        fill(&mut f, &tmp)?;
        f.sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))?;
        fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        sync_parent_dir(path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Whether two files hold the same bytes (compared a block at a time; a
/// missing file is different).
#[must_use]
pub fn same_content(a: &Path, b: &Path) -> bool {
    use std::io::Read;
    let (Ok(fa), Ok(fb)) = (File::open(a), File::open(b)) else {
        return false;
    };
    let same_len = match (fa.metadata(), fb.metadata()) {
        (Ok(ma), Ok(mb)) => ma.len() == mb.len(),
        _ => false,
    };
    if !same_len {
        return false;
    }
    let (mut ra, mut rb) = (
        std::io::BufReader::with_capacity(1 << 16, fa),
        std::io::BufReader::with_capacity(1 << 16, fb),
    );
    let (mut ba, mut bb) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    loop {
        let n = match ra.read(&mut ba) {
            Ok(0) => return true,
            Ok(n) => n,
            Err(_) => return false,
        };
        let Some(want) = bb.get_mut(..n) else {
            return false;
        };
        if rb.read_exact(want).is_err() || ba.get(..n) != Some(&*want) {
            return false;
        }
    }
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
    let entries = match std::fs::read_dir(dir) {
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

/// Removes temporary files that a killed writer left in `dir` (names made
/// by [`write_atomically`]: `.NAME.tmp-PID`). Returns how many it removed.
///
/// # Errors
/// An unreadable directory.
pub fn remove_stale_temps(dir: &Path) -> Result<usize> {
    let mut removed = 0;
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let stale = name.starts_with('.')
            && name
                .rsplit_once(".tmp-")
                .is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()));
        if stale && fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Syncs the directory holding `path`, so that a rename or removal there is durable.
///
/// # Errors
/// I/O errors.
pub fn sync_parent_dir(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing directory {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_content_with_the_given_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_atomically(&p, b"one", 0o600).unwrap();
        write_atomically(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file left"
        );
    }

    #[test]
    fn copies_stream_with_the_given_mode_and_compare_by_content() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (
            dir.path().join("a"),
            dir.path().join("b"),
            dir.path().join("c"),
        );
        // Larger than one comparison block, differing only in the last byte.
        let mut bytes = vec![7u8; 200_000];
        fs::write(&a, &bytes).unwrap();
        assert!(!same_content(&a, &b), "a missing file differs");
        copy_atomically(&a, &b, 0o600).unwrap();
        assert_eq!(fs::read(&b).unwrap(), bytes);
        assert_eq!(
            fs::metadata(&b).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(same_content(&a, &b));
        *bytes.last_mut().unwrap() = 8;
        fs::write(&c, &bytes).unwrap();
        assert!(!same_content(&a, &c));
        fs::write(&c, &bytes[..1000]).unwrap();
        assert!(!same_content(&a, &c), "a shorter file differs");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 3);
    }
}
