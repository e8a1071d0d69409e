//! A key holder's share files: `DIR/share-epoch-N.key` (and, after
//! proactive refreshes, `share-epoch-N.gen-G.key`), mode 0600, written
//! atomically: magic, epoch, generation, holder index, the share `k_i`, its
//! public share `P_i` and a SHA-256 of what precedes. The share appears
//! nowhere else: not in logs, errors or Debug output. Beside each, its
//! committee file (`crate::store::committee::path_of`), public.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use psi_core::KeyShare;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use psi_files::atomic::write_atomically;

use crate::store::keystore::check_owner_only;

const MAGIC: &[u8; 8] = b"PSISHR\x00\x01";
const FILE_LEN: usize = 8 + 8 + 4 + 2 + 32 + 32 + 32;

/// Path of the share file of `epoch`, `generation`, in `dir`.
#[must_use]
pub fn path(dir: &Path, epoch: u64, generation: u32) -> PathBuf {
    match generation {
        0 => dir.join(format!("share-epoch-{epoch}.key")),
        g => dir.join(format!("share-epoch-{epoch}.gen-{g}.key")),
    }
}

/// Writes the share of `epoch`, `generation`, atomically with mode 0600.
///
/// # Errors
/// I/O errors.
pub fn store(dir: &Path, epoch: u64, generation: u32, share: &KeyShare) -> Result<()> {
    let mut bytes = Zeroizing::new(Vec::with_capacity(FILE_LEN));
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&epoch.to_be_bytes());
    bytes.extend_from_slice(&generation.to_be_bytes());
    bytes.extend_from_slice(&share.index().to_be_bytes());
    bytes.extend_from_slice(share.to_bytes().as_slice());
    bytes.extend_from_slice(&share.public_share().key.to_bytes());
    let digest = Sha256::digest(bytes.as_slice());
    bytes.extend_from_slice(&digest);
    let p = path(dir, epoch, generation);
    write_atomically(&p, &bytes, 0o600).with_context(|| format!("writing {}", p.display()))
}

/// The (epoch, generation) of each share file in `dir`, lowest first.
///
/// # Errors
/// An unreadable directory.
pub fn held(dir: &Path) -> Result<Vec<(u64, u32)>> {
    let mut out: Vec<(u64, u32)> = fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| {
            let name = e.ok()?.file_name();
            let rest = name
                .to_str()?
                .strip_prefix("share-epoch-")?
                .strip_suffix(".key")?;
            match rest.split_once(".gen-") {
                Some((e, g)) => Some((e.parse().ok()?, g.parse().ok().filter(|g| *g > 0)?)),
                None => Some((rest.parse().ok()?, 0)),
            }
        })
        .collect();
    out.sort_unstable();
    Ok(out)
}

/// Destroys the share file of `epoch`, `generation` (overwritten with
/// zeros, synced, removed) and its committee file.
///
/// # Errors
/// I/O errors.
pub fn destroy(dir: &Path, epoch: u64, generation: u32) -> Result<()> {
    crate::store::keystore::destroy(&path(dir, epoch, generation))?;
    let committee = crate::store::committee::path_of(dir, epoch, generation);
    if committee.exists() {
        fs::remove_file(&committee).with_context(|| format!("removing {}", committee.display()))?;
    }
    Ok(())
}

/// Loads the share of `epoch`, `generation`, checking its mode, checksum,
/// epoch and generation, and that the share derives the public share it
/// holds.
///
/// # Errors
/// Missing, readable by others, damaged, of another epoch or generation.
pub fn load(dir: &Path, epoch: u64, generation: u32) -> Result<KeyShare> {
    let p = path(dir, epoch, generation);
    let meta = fs::metadata(&p).with_context(|| format!("no share file at {}", p.display()))?;
    check_owner_only(&p, &meta)?;
    let bytes = Zeroizing::new(fs::read(&p).with_context(|| format!("reading {}", p.display()))?);
    let damaged = || {
        anyhow::anyhow!("{} is damaged or not a share file: restore it from the holder's backup, or have the committee refresh its shares", p.display())
    };
    if bytes.len() != FILE_LEN || bytes.get(..8) != Some(MAGIC.as_slice()) {
        return Err(damaged());
    }
    let (body, digest) = bytes.split_at(FILE_LEN - 32);
    if Sha256::digest(body)[..] != *digest {
        return Err(damaged());
    }
    let field = |from: usize, len: usize| body.get(from..from + len).ok_or_else(damaged);
    let got = u64::from_be_bytes(field(8, 8)?.try_into()?);
    let got_generation = u32::from_be_bytes(field(16, 4)?.try_into()?);
    if (got, got_generation) != (epoch, generation) {
        bail!(
            "{} holds the share of epoch {got}, generation {got_generation}",
            p.display()
        );
    }
    let index = u16::from_be_bytes(field(20, 2)?.try_into()?);
    let secret: Zeroizing<[u8; 32]> = Zeroizing::new(field(22, 32)?.try_into()?);
    let share = KeyShare::from_bytes(index, &secret).map_err(|_| damaged())?;
    if share.public_share().key.to_bytes() != field(54, 32)? {
        return Err(damaged());
    }
    Ok(share)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn written_with_mode_0600_and_every_damage_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = psi_core::ServerKey::generate(&mut rand_core::OsRng);
        let shares = psi_core::threshold::split(&key, 2, 3, &mut rand_core::OsRng).unwrap();
        store(dir.path(), 2, 0, &shares[1]).unwrap();
        store(dir.path(), 2, 3, &shares[2]).unwrap();
        let p = path(dir.path(), 2, 0);
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let back = load(dir.path(), 2, 0).unwrap();
        assert_eq!(back.public_share(), shares[1].public_share());
        assert_eq!(held(dir.path()).unwrap(), vec![(2, 0), (2, 3)]);
        assert!(load(dir.path(), 3, 0).is_err());
        // A file under another generation's name is refused.
        fs::copy(path(dir.path(), 2, 3), path(dir.path(), 2, 4)).unwrap();
        assert!(load(dir.path(), 2, 4).is_err());
        destroy(dir.path(), 2, 3).unwrap();
        assert!(!path(dir.path(), 2, 3).exists());
        let good = fs::read(&p).unwrap();
        for bit in 0..good.len() * 8 {
            let mut bad = good.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            fs::write(&p, &bad).unwrap();
            assert!(load(dir.path(), 2, 0).is_err(), "bit {bit}");
        }
        fs::write(&p, &good).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
        assert!(load(dir.path(), 2, 0)
            .unwrap_err()
            .to_string()
            .contains("chmod 600"));
    }
}
