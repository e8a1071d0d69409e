//! The OPRF key file: `DIR/oprf.key`, mode 0600, written atomically, holding
//! the key epoch and the secret scalar. The key appears nowhere else: not in
//! logs, errors or Debug output.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use psi_core::ServerKey;
use rand_core::OsRng;
use zeroize::Zeroizing;

use crate::atomic_file::write_atomically;

const MAGIC: &[u8; 8] = b"PSIKEY\x00\x01";
const FILE_LEN: usize = 8 + 8 + 32;
/// The key file's name inside the data directory.
pub const KEY_FILE: &str = "oprf.key";

/// The server's key with its epoch.
#[derive(Debug)]
pub struct EpochKey {
    /// The key epoch (starts at 1; a rotation increments it).
    pub epoch: u64,
    /// The secret key.
    pub key: ServerKey,
}

/// Path of the key file in `data_dir`.
#[must_use]
pub fn key_path(data_dir: &Path) -> PathBuf {
    data_dir.join(KEY_FILE)
}

/// Loads the key, or creates epoch 1 with a fresh random key if there is none.
/// Returns whether it was created.
///
/// # Errors
/// An unreadable, malformed or group/world-readable key file.
pub fn load_or_create(data_dir: &Path) -> Result<(EpochKey, bool)> {
    let path = key_path(data_dir);
    if path.exists() {
        return Ok((load(data_dir)?, false));
    }
    let key = EpochKey {
        epoch: 1,
        key: ServerKey::generate(&mut OsRng),
    };
    store(data_dir, &key)?;
    Ok((key, true))
}

/// Writes the key file atomically with mode 0600.
///
/// # Errors
/// I/O errors.
pub fn store(data_dir: &Path, key: &EpochKey) -> Result<()> {
    let mut bytes = Zeroizing::new(Vec::with_capacity(FILE_LEN));
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&key.epoch.to_be_bytes());
    bytes.extend_from_slice(key.key.to_bytes().as_slice());
    write_atomically(&key_path(data_dir), &bytes, 0o600)
}

/// Loads the key file.
///
/// # Errors
/// Missing, unreadable, malformed, or readable by group or others.
pub fn load(data_dir: &Path) -> Result<EpochKey> {
    let path = key_path(data_dir);
    let meta = fs::metadata(&path).with_context(|| {
        format!(
            "no key file at {} (run `psi-server init` first)",
            path.display()
        )
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "key file {} has mode {mode:o}; it must be readable by its owner only (chmod 600)",
            path.display()
        );
    }
    let bytes =
        Zeroizing::new(fs::read(&path).with_context(|| format!("reading {}", path.display()))?);
    let (magic, rest) = bytes.split_at_checked(8).unwrap_or((&[], &[]));
    let (epoch, secret) = rest.split_at_checked(8).unwrap_or((&[], &[]));
    if bytes.len() != FILE_LEN || magic != MAGIC {
        bail!("{} is not a psi-server key file", path.display());
    }
    let epoch = u64::from_be_bytes(epoch.try_into()?);
    let secret: Zeroizing<[u8; 32]> = Zeroizing::new(secret.try_into()?);
    let key = ServerKey::from_bytes(&secret)
        .map_err(|_| anyhow::anyhow!("{} holds an invalid key", path.display()))?;
    Ok(EpochKey { epoch, key })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_loaded_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let (a, created) = load_or_create(dir.path()).unwrap();
        assert!(created);
        let (b, created) = load_or_create(dir.path()).unwrap();
        assert!(!created);
        assert_eq!(a.key.public_key(), b.key.public_key());
        assert_eq!(a.epoch, 1);
        let mode = fs::metadata(key_path(dir.path()))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!format!("{a:?}").contains(&format!("{:?}", &a.key.to_bytes()[..4])));
    }

    #[test]
    fn loose_permissions_and_garbage_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        load_or_create(dir.path()).unwrap();
        let p = key_path(dir.path());
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load(dir.path())
            .unwrap_err()
            .to_string()
            .contains("chmod 600"));
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&p, b"garbage").unwrap();
        assert!(load(dir.path()).is_err());
    }
}
