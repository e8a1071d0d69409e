//! Files replaced atomically: written beside their final path with the
//! mode they keep, synced, renamed over it, and the directory synced, so a
//! crash at any point leaves either the old file or the new one, never a
//! half-written one. One helper for the operator's and the institution's
//! files alike.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// An I/O error with what was being done, and to which path, in its message.
fn context(e: io::Error, doing: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{doing} {}: {e}", path.display()))
}

/// Writes `bytes` to `path` atomically, the file created with `mode` (e.g. 0o600).
///
/// # Errors
/// Any I/O error, with the path in its message.
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    replace_with(path, mode, |f, tmp| {
        f.write_all(bytes).map_err(|e| context(e, "writing", tmp))
    })
}

/// Copies `from` to `to` atomically, streaming (no copy held in memory),
/// the new file created with `mode`.
///
/// # Errors
/// Any I/O error, with the paths in its message.
pub fn copy_atomically(from: &Path, to: &Path, mode: u32) -> io::Result<()> {
    let mut source = File::open(from).map_err(|e| context(e, "opening", from))?;
    replace_with(to, mode, |f, tmp| {
        io::copy(&mut source, f)
            .map(|_| ())
            .map_err(|e| context(e, &format!("copying {} to", from.display()), tmp))
    })
}

/// Creates the temporary file beside `path` with `mode`, lets `fill` write
/// it, syncs it, renames it over `path` and syncs the directory; the
/// temporary file is removed if anything fails.
///
/// # Errors
/// Any I/O error, with the path in its message, or `fill`'s.
pub fn replace_with(
    path: &Path,
    mode: u32,
    fill: impl FnOnce(&mut File, &Path) -> io::Result<()>,
) -> io::Result<()> {
    let tmp = temp_path(path);
    let result = (|| -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|e| context(e, "creating", &tmp))?;
        fill(&mut f, &tmp)?;
        f.sync_all().map_err(|e| context(e, "syncing", &tmp))?;
        rename_durably(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Renames `from` over `to` and syncs the directory, so that the rename
/// survives a crash (`from` must already be synced).
///
/// # Errors
/// Any I/O error, with the paths in its message.
pub fn rename_durably(from: &Path, to: &Path) -> io::Result<()> {
    fs::rename(from, to).map_err(|e| context(e, &format!("renaming {} to", from.display()), to))?;
    sync_parent_dir(to)
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

/// Removes temporary files that a killed writer left in `dir` (names made
/// by [`write_atomically`]: `.NAME.tmp-PID-UNIQUE`, or `.NAME.tmp-PID` from
/// earlier versions). Returns how many it removed; a missing `dir` has none.
///
/// # Errors
/// An unreadable directory.
pub fn remove_stale_temps(dir: &Path) -> io::Result<usize> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(context(e, "reading", dir)),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let stale = name.starts_with('.')
            && name.rsplit_once(".tmp-").is_some_and(|(_, suffix)| {
                suffix.bytes().next().is_some_and(|b| b.is_ascii_digit())
                    && suffix.bytes().all(|b| b.is_ascii_digit() || b == b'-')
            });
        if stale && fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}

/// A temporary name beside `path`, unique to this process and call: a
/// leftover of a killed run under the same process id (a container's PID
/// 1) never collides with it.
fn temp_path(path: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    path.with_file_name(format!(
        ".{name}.tmp-{}-{nanos}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Syncs the directory holding `path`, so that a rename or removal there is durable.
///
/// # Errors
/// I/O errors.
pub fn sync_parent_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| context(e, "syncing directory", dir))
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

    #[test]
    fn a_failed_fill_leaves_the_old_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_atomically(&p, b"old", 0o600).unwrap();
        let err = replace_with(&p, 0o600, |f, _| {
            f.write_all(b"half")?;
            Err(io::Error::other("interrupted"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("interrupted"), "{err}");
        assert_eq!(fs::read(&p).unwrap(), b"old");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn stale_temporaries_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(".registry.bkt.tmp-4242"), b"x").unwrap();
        fs::write(dir.path().join(".registry.bkt.tmp-4242-17-0"), b"x").unwrap();
        fs::write(dir.path().join("registry.bkt"), b"x").unwrap();
        fs::write(dir.path().join(".hidden.tmp-"), b"x").unwrap();
        fs::write(dir.path().join(".hidden.tmp-x1"), b"x").unwrap();
        assert_eq!(remove_stale_temps(dir.path()).unwrap(), 2);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 3);
        assert_eq!(remove_stale_temps(&dir.path().join("missing")).unwrap(), 0);
    }

    #[test]
    fn a_leftover_of_a_killed_run_under_the_same_pid_is_no_obstacle() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        // What the earlier naming made for this process: it must not collide.
        let leftover = dir.path().join(format!(".f.tmp-{}", std::process::id()));
        fs::write(&leftover, b"half").unwrap();
        write_atomically(&p, b"new", 0o600).unwrap();
        write_atomically(&p, b"newer", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"newer");
        assert_eq!(remove_stale_temps(dir.path()).unwrap(), 1);
    }

    #[test]
    fn errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("missing-dir").join("f");
        let err = write_atomically(&p, b"x", 0o600).unwrap_err();
        assert!(err.to_string().contains("missing-dir"), "{err}");
    }
}
