//! The OPRF key files: `DIR/oprf-epoch-N.key`, one per key epoch, mode 0600,
//! written atomically, holding the epoch and the secret scalar. The key
//! appears nowhere else: not in logs, errors or Debug output.
//!
//! A rotation retires the previous epoch's file by renaming it to
//! `oprf-epoch-N.retired-until-T.key` (T in Unix seconds); [`sweep`] destroys
//! it (overwritten with zeros, synced, removed) once T has passed. The
//! public history of keys, each endorsed by its predecessor, is
//! `DIR/key-history.txt`.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use psi_core::rotation::KeyStep;
use psi_core::{PublicKey, ServerKey};
use rand_core::OsRng;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use psi_files::atomic::write_atomically;

/// Key files written before they carried their public key and a checksum.
const MAGIC_V1: &[u8; 8] = b"PSIKEY\x00\x01";
const FILE_LEN_V1: usize = 8 + 8 + 32;
/// Magic, epoch, secret scalar, public key, SHA-256 of what precedes.
const MAGIC: &[u8; 8] = b"PSIKEY\x00\x02";
const FILE_LEN: usize = 8 + 8 + 32 + 32 + 32;
/// The public key history's name inside the data directory.
pub const HISTORY_FILE: &str = "key-history.txt";
/// How long a retired key is kept when nobody says otherwise.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 3600);

/// The server's key with its epoch.
#[derive(Debug)]
pub struct EpochKey {
    /// The key epoch (starts at 1; a rotation increments it).
    pub epoch: u64,
    /// The secret key.
    pub key: ServerKey,
}

/// Path of the key file of `epoch` in `data_dir`.
#[must_use]
pub fn key_path(data_dir: &Path, epoch: u64) -> PathBuf {
    data_dir.join(format!("oprf-epoch-{epoch}.key"))
}

/// The highest epoch with a live (not retired) key file.
///
/// # Errors
/// An unreadable directory.
pub fn latest_epoch(data_dir: &Path) -> Result<Option<u64>> {
    Ok(key_files(data_dir)?
        .into_iter()
        .filter(|(_, retired, _)| retired.is_none())
        .map(|(epoch, _, _)| epoch)
        .max())
}

/// The names of the key files in `data_dir`, live and retired.
pub(crate) fn key_file_names(data_dir: &Path) -> Result<std::collections::BTreeSet<String>> {
    Ok(key_files(data_dir)?
        .into_iter()
        .filter_map(|(_, _, path)| Some(path.file_name()?.to_str()?.to_string()))
        .collect())
}

/// Key files in `data_dir`: epoch, retired-until time (if retired), path.
fn key_files(data_dir: &Path) -> Result<Vec<(u64, Option<u64>, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(data_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("listing {}", data_dir.display())),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(rest) = name
            .to_str()
            .and_then(|n| n.strip_prefix("oprf-epoch-"))
            .and_then(|n| n.strip_suffix(".key"))
        else {
            continue;
        };
        let (epoch, retired) = match rest.split_once(".retired-until-") {
            Some((e, t)) => (e.parse().ok(), t.parse().ok().map(Some)),
            None => (rest.parse().ok(), Some(None)),
        };
        if let (Some(epoch), Some(retired)) = (epoch, retired) {
            out.push((epoch, retired, entry.path()));
        }
    }
    Ok(out)
}

/// Creates the key of `epoch` with a fresh random scalar (replacing a file
/// a crashed rotation left behind; it never served).
///
/// # Errors
/// I/O errors.
pub fn create(data_dir: &Path, epoch: u64) -> Result<EpochKey> {
    let key = EpochKey {
        epoch,
        key: ServerKey::generate(&mut OsRng),
    };
    store(data_dir, &key)?;
    Ok(key)
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
    bytes.extend_from_slice(&key.key.public_key().to_bytes());
    let digest = Sha256::digest(bytes.as_slice());
    bytes.extend_from_slice(&digest);
    Ok(write_atomically(
        &key_path(data_dir, key.epoch),
        &bytes,
        0o600,
    )?)
}

/// Retires the key of `epoch`: it is destroyed by the first [`sweep`] after
/// `grace` has passed. A key already retired (a running server's sweep may
/// get there first, with the default grace) gets this grace instead; a key
/// already destroyed is left so.
///
/// # Errors
/// I/O errors.
pub fn retire(data_dir: &Path, epoch: u64, grace: Duration) -> Result<()> {
    let until = unix_secs(SystemTime::now() + grace);
    let to = data_dir.join(format!("oprf-epoch-{epoch}.retired-until-{until}.key"));
    for (e, _, from) in key_files(data_dir)? {
        if e == epoch && from != to {
            fs::rename(&from, &to).with_context(|| format!("retiring {}", from.display()))?;
            psi_files::atomic::sync_parent_dir(&to)?;
        }
    }
    Ok(())
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Destroys retired keys whose grace period is over, and retires (with the
/// default grace) live keys of epochs before `current` that a crash left
/// unretired. Returns the epochs destroyed.
///
/// # Errors
/// I/O errors.
pub fn sweep(data_dir: &Path, current: u64, now: SystemTime) -> Result<Vec<u64>> {
    let mut destroyed = Vec::new();
    for (epoch, retired, path) in key_files(data_dir)? {
        match retired {
            None if epoch < current => retire(data_dir, epoch, DEFAULT_GRACE)?,
            Some(until) if until <= unix_secs(now) => {
                destroy(&path)?;
                destroyed.push(epoch);
            }
            _ => {}
        }
    }
    Ok(destroyed)
}

/// Overwrites a key file with zeros, syncs it, then removes it.
pub(crate) fn destroy(path: &Path) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let len = f.metadata()?.len();
    f.write_all(&vec![0u8; usize::try_from(len).unwrap_or(FILE_LEN)])?;
    f.sync_all()?;
    drop(f);
    fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
    Ok(psi_files::atomic::sync_parent_dir(path)?)
}

/// The public key history: each rotation's new key and epoch with the
/// retiring key's endorsement, oldest first.
///
/// # Errors
/// A malformed file.
pub fn load_history(data_dir: &Path) -> Result<Vec<KeyStep>> {
    let path = data_dir.join(HISTORY_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|line| {
            let mut parts = line.split_whitespace();
            let (Some(epoch), Some(pk), Some(endorsement)) =
                (parts.next(), parts.next(), parts.next())
            else {
                bail!("{}: malformed line `{line}`", path.display());
            };
            let endorsement: [u8; 64] = hex::decode(endorsement)
                .ok()
                .and_then(|b| b.try_into().ok())
                .with_context(|| format!("{}: bad endorsement", path.display()))?;
            Ok(KeyStep {
                epoch: epoch
                    .parse()
                    .with_context(|| format!("{}: bad epoch", path.display()))?,
                public_key: hex::decode(pk)
                    .ok()
                    .and_then(|b| PublicKey::from_bytes(&b).ok())
                    .with_context(|| format!("{}: bad public key", path.display()))?,
                endorsement,
            })
        })
        .collect()
}

/// Adds a step to the history (atomically), replacing a step of the same
/// epoch that a crashed rotation left behind.
///
/// # Errors
/// I/O errors.
pub fn append_history(data_dir: &Path, step: &KeyStep) -> Result<()> {
    let mut steps = load_history(data_dir)?;
    steps.retain(|s| s.epoch < step.epoch);
    steps.push(*step);
    let mut text = String::from("# epoch public-key endorsement-by-the-previous-key (public)\n");
    for s in &steps {
        text.push_str(&format!(
            "{} {} {}\n",
            s.epoch,
            s.public_key.to_hex(),
            hex::encode(s.endorsement)
        ));
    }
    Ok(write_atomically(
        &data_dir.join(HISTORY_FILE),
        text.as_bytes(),
        0o644,
    )?)
}

/// Refuses a secret file (a key, a key share) that group or others may read.
///
/// # Errors
/// A mode with any group or other bit.
pub fn check_owner_only(path: &Path, meta: &fs::Metadata) -> Result<()> {
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "key file {} has mode {mode:o}; it must be readable by its owner only (chmod 600)",
            path.display()
        );
    }
    Ok(())
}

/// Loads the key file of `epoch`, checking its checksum and that its secret
/// derives the public key it holds.
///
/// # Errors
/// Missing, unreadable, malformed, damaged, of another epoch, or readable
/// by group or others.
pub fn load(data_dir: &Path, key_epoch: u64) -> Result<EpochKey> {
    let path = key_path(data_dir, key_epoch);
    let meta = fs::metadata(&path).with_context(|| {
        format!(
            "no key file at {} (run `psi-server init` first)",
            path.display()
        )
    })?;
    check_owner_only(&path, &meta)?;
    let bytes =
        Zeroizing::new(fs::read(&path).with_context(|| format!("reading {}", path.display()))?);
    let (magic, rest) = bytes.split_at_checked(8).unwrap_or((&[], &[]));
    let (epoch, rest) = rest.split_at_checked(8).unwrap_or((&[], &[]));
    let (secret, rest) = rest.split_at_checked(32).unwrap_or((&[], &[]));
    let public = match (magic, bytes.len()) {
        (m, FILE_LEN) if m == MAGIC => {
            let (public, digest) = rest.split_at(32);
            let body = bytes.get(..FILE_LEN - 32).unwrap_or(&[]);
            if Sha256::digest(body)[..] != *digest {
                bail!(
                    "{} is damaged (its checksum does not match): restore the key file from a backup",
                    path.display()
                );
            }
            Some(public)
        }
        (m, FILE_LEN_V1) if m == MAGIC_V1 => None,
        _ => bail!("{} is not a psi-server key file", path.display()),
    };
    let epoch = u64::from_be_bytes(epoch.try_into()?);
    if epoch != key_epoch {
        bail!("{} holds the key of epoch {epoch}", path.display());
    }
    let secret: Zeroizing<[u8; 32]> = Zeroizing::new(secret.try_into()?);
    let key = ServerKey::from_bytes(&secret)
        .map_err(|_| anyhow::anyhow!("{} holds an invalid key", path.display()))?;
    if public.is_some_and(|p| p != key.public_key().to_bytes()) {
        bail!(
            "{} is damaged (its secret does not derive its public key): restore the key file from a backup",
            path.display()
        );
    }
    Ok(EpochKey { epoch, key })
}

/// Loads the key file of `epoch` and checks that it derives `public_key`
/// (the one the manifest committed for the epoch).
///
/// # Errors
/// As [`load`], and a key that derives another public key.
pub fn load_committed(data_dir: &Path, epoch: u64, public_key: &[u8; 32]) -> Result<EpochKey> {
    let key = load(data_dir, epoch)?;
    if key.key.public_key().to_bytes() != *public_key {
        bail!(
            "{} does not derive the public key the manifest committed for epoch {epoch}:              the key file is damaged or not this registry's; restore it from a backup",
            key_path(data_dir, epoch).display()
        );
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_then_loaded_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(latest_epoch(dir.path()).unwrap(), None);
        let a = create(dir.path(), 1).unwrap();
        let b = load(dir.path(), 1).unwrap();
        assert_eq!(a.key.public_key(), b.key.public_key());
        assert_eq!(latest_epoch(dir.path()).unwrap(), Some(1));
        assert!(load(dir.path(), 2).is_err());
        let mode = fs::metadata(key_path(dir.path(), 1))
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
        create(dir.path(), 1).unwrap();
        let p = key_path(dir.path(), 1);
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load(dir.path(), 1)
            .unwrap_err()
            .to_string()
            .contains("chmod 600"));
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&p, b"garbage").unwrap();
        assert!(load(dir.path(), 1).is_err());
    }

    #[test]
    fn any_flipped_bit_is_refused_and_a_foreign_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let key = create(dir.path(), 1).unwrap();
        let public = key.key.public_key().to_bytes();
        let p = key_path(dir.path(), 1);
        let good = fs::read(&p).unwrap();
        for bit in 0..good.len() * 8 {
            let mut bad = good.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            fs::write(&p, &bad).unwrap();
            assert!(load(dir.path(), 1).is_err(), "bit {bit} flipped");
        }
        fs::write(&p, &good).unwrap();
        assert!(load_committed(dir.path(), 1, &public).is_ok());
        let err = load_committed(dir.path(), 1, &[9; 32]).unwrap_err();
        assert!(err.to_string().contains("manifest"), "{err}");
        // A key file of the earlier format (no public key, no checksum)
        // still loads; the manifest's public key is what checks it.
        let mut v1 = MAGIC_V1.to_vec();
        v1.extend_from_slice(&1u64.to_be_bytes());
        v1.extend_from_slice(key.key.to_bytes().as_slice());
        fs::write(&p, &v1).unwrap();
        assert!(load_committed(dir.path(), 1, &public).is_ok());
        v1[20] ^= 1;
        fs::write(&p, &v1).unwrap();
        assert!(load_committed(dir.path(), 1, &public).is_err());
    }

    #[test]
    fn retired_keys_are_destroyed_after_their_grace_period() {
        let dir = tempfile::tempdir().unwrap();
        create(dir.path(), 1).unwrap();
        create(dir.path(), 2).unwrap();
        create(dir.path(), 3).unwrap();
        retire(dir.path(), 1, Duration::from_secs(60)).unwrap();
        assert!(load(dir.path(), 1).is_err(), "a retired key is not loaded");
        assert_eq!(latest_epoch(dir.path()).unwrap(), Some(3));
        // Epoch 2 was left live by a crash: the sweep retires it.
        assert!(sweep(dir.path(), 3, SystemTime::now()).unwrap().is_empty());
        assert!(!key_path(dir.path(), 2).exists());
        assert_eq!(key_files(dir.path()).unwrap().len(), 3);
        let later = SystemTime::now() + Duration::from_secs(61);
        assert_eq!(sweep(dir.path(), 3, later).unwrap(), vec![1]);
        let much_later = SystemTime::now() + DEFAULT_GRACE + Duration::from_secs(1);
        assert_eq!(sweep(dir.path(), 3, much_later).unwrap(), vec![2]);
        assert_eq!(key_files(dir.path()).unwrap().len(), 1);
        assert!(load(dir.path(), 3).is_ok());
        // Retiring again (a sweep got there first) sets the new grace.
        retire(dir.path(), 3, DEFAULT_GRACE).unwrap();
        retire(dir.path(), 3, Duration::ZERO).unwrap();
        assert_eq!(key_files(dir.path()).unwrap().len(), 1);
        assert_eq!(sweep(dir.path(), 4, SystemTime::now()).unwrap(), vec![3]);
        retire(dir.path(), 3, Duration::ZERO).unwrap();
    }

    #[test]
    fn the_history_round_trips_and_replaces_a_crashed_step() {
        let dir = tempfile::tempdir().unwrap();
        let k1 = create(dir.path(), 1).unwrap();
        let k2 = create(dir.path(), 2).unwrap();
        let step = |epoch, new: &EpochKey| KeyStep {
            epoch,
            public_key: *new.key.public_key(),
            endorsement: psi_core::rotation::endorse(
                &k1.key,
                1,
                new.key.public_key(),
                epoch,
                &mut OsRng,
            ),
        };
        append_history(dir.path(), &step(2, &k1)).unwrap();
        append_history(dir.path(), &step(2, &k2)).unwrap();
        let h = load_history(dir.path()).unwrap();
        assert_eq!(
            h,
            [step(2, &k2)]
                .iter()
                .map(|s| KeyStep {
                    endorsement: h[0].endorsement,
                    ..*s
                })
                .collect::<Vec<_>>()
        );
        psi_core::rotation::verify(
            k1.key.public_key(),
            1,
            k2.key.public_key(),
            2,
            &h[0].endorsement,
        )
        .unwrap();
    }
}
