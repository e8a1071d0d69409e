//! Pinning the server's public key and key epoch: given by flag, or trusted
//! on first use and remembered in `known-servers.txt` (one line per server:
//! `URL PUBLIC_KEY_HEX EPOCH`). A changed key or epoch is an error, never
//! silently accepted.

use std::fs;
use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// The known-servers file's name inside the cache directory.
pub const KNOWN_SERVERS: &str = "known-servers.txt";

/// What pinning decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pinned {
    /// The key matches the pin given by flag.
    ByFlag,
    /// The key and epoch match the remembered ones.
    Known,
    /// First contact: the key and epoch are now remembered.
    FirstUse,
}

/// Checks `key_hex` and `epoch` for `server` against `pin` or the known-servers file in `dir`.
///
/// # Errors
/// A mismatch (with what to do about it), or an unwritable file.
pub fn check(
    server: &str,
    key_hex: &str,
    epoch: u64,
    pin: Option<&str>,
    dir: &Path,
) -> Result<Pinned> {
    if let Some(pin) = pin {
        if !pin.trim().eq_ignore_ascii_case(key_hex) {
            bail!(
                "the server's public key {key_hex} does not match the pinned key {}; do not proceed unless the operator confirms a new key",
                pin.trim()
            );
        }
        return Ok(Pinned::ByFlag);
    }
    let path = dir.join(KNOWN_SERVERS);
    let known = fs::read_to_string(&path).unwrap_or_default();
    for line in known.lines() {
        let mut parts = line.split_whitespace();
        if let (Some(url), Some(key), Some(ep)) = (parts.next(), parts.next(), parts.next()) {
            if url != server {
                continue;
            }
            if key != key_hex || ep != epoch.to_string() {
                bail!(
                    "the server {server} now presents key {key_hex} (epoch {epoch}), but {} pinned key {key} (epoch {ep}); if the operator announced a key rotation, pass --pin-key {key_hex} or remove that line",
                    path.display()
                );
            }
            return Ok(Pinned::Known);
        }
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    writeln!(f, "{server} {key_hex} {epoch}")
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(Pinned::FirstUse)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_use_then_known_then_mismatch() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(
            check("http://a", "aa", 1, None, d.path()).unwrap(),
            Pinned::FirstUse
        );
        assert_eq!(
            check("http://a", "aa", 1, None, d.path()).unwrap(),
            Pinned::Known
        );
        assert_eq!(
            check("http://b", "bb", 1, None, d.path()).unwrap(),
            Pinned::FirstUse
        );
        assert!(check("http://a", "cc", 1, None, d.path())
            .unwrap_err()
            .to_string()
            .contains("--pin-key cc"));
        assert!(check("http://a", "aa", 2, None, d.path()).is_err());
        assert_eq!(
            check("http://a", "cc", 2, Some("CC"), d.path()).unwrap(),
            Pinned::ByFlag
        );
        assert!(check("http://a", "cc", 2, Some("dd"), d.path()).is_err());
    }
}
