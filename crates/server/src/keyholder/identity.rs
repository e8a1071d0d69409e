//! A key holder's long-term identity, for key generation: `identity.key`
//! (mode 0600: magic, the secret scalar, its public key, SHA-256), made
//! once by `psi-server keyholder init`, and `holders.txt`, the committee's
//! identities the operator gives every holder:
//!
//! ```text
//! holder 1 <identity public key, 64 hex>
//! holder 2 <...>
//! holder 3 <...>
//! ```
//!
//! A holder signs its key-generation messages with its identity and checks
//! the others' against `holders.txt`, so the coordinator that relays them
//! cannot stand in for a holder. A holder finds its own index there.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use psi_core::{PublicKey, ServerKey};
use rand_core::OsRng;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use psi_files::atomic::write_atomically;

use crate::store::keystore::check_owner_only;

const MAGIC: &[u8; 8] = b"PSIIDK\x00\x01";
const FILE_LEN: usize = 8 + 32 + 32 + 32;
/// The identity file's name in a holder's directory.
pub const IDENTITY_FILE: &str = "identity.key";
/// The committee's identities' name in a holder's directory.
pub const HOLDERS_FILE: &str = "holders.txt";

/// Path of the identity file in `dir`.
#[must_use]
pub fn path(dir: &Path) -> PathBuf {
    dir.join(IDENTITY_FILE)
}

/// Creates the identity of the holder in `dir` (refusing to replace one).
///
/// # Errors
/// An existing identity; I/O errors.
pub fn create(dir: &Path) -> Result<PublicKey> {
    let p = path(dir);
    if p.exists() {
        bail!("{} already exists: a holder has one identity", p.display());
    }
    let key = ServerKey::generate(&mut OsRng);
    let mut bytes = Zeroizing::new(Vec::with_capacity(FILE_LEN));
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(key.to_bytes().as_slice());
    bytes.extend_from_slice(&key.public_key().to_bytes());
    let digest = Sha256::digest(bytes.as_slice());
    bytes.extend_from_slice(&digest);
    write_atomically(&p, &bytes, 0o600).with_context(|| format!("writing {}", p.display()))?;
    Ok(*key.public_key())
}

/// Loads the identity of the holder in `dir`, checked.
///
/// # Errors
/// Missing, readable by others, damaged.
pub fn load(dir: &Path) -> Result<ServerKey> {
    let p = path(dir);
    let meta = fs::metadata(&p).with_context(|| {
        format!(
            "no identity at {} (run `psi-server keyholder init --dir {}`)",
            p.display(),
            dir.display()
        )
    })?;
    check_owner_only(&p, &meta)?;
    let bytes = Zeroizing::new(fs::read(&p).with_context(|| format!("reading {}", p.display()))?);
    let damaged = || anyhow::anyhow!("{} is damaged or not an identity file", p.display());
    if bytes.len() != FILE_LEN || bytes.get(..8) != Some(MAGIC.as_slice()) {
        return Err(damaged());
    }
    let (body, digest) = bytes.split_at(FILE_LEN - 32);
    if Sha256::digest(body)[..] != *digest {
        return Err(damaged());
    }
    let secret: Zeroizing<[u8; 32]> =
        Zeroizing::new(body.get(8..40).ok_or_else(damaged)?.try_into()?);
    let key = ServerKey::from_bytes(&secret).map_err(|_| damaged())?;
    if body.get(40..72) != Some(key.public_key().to_bytes().as_slice()) {
        return Err(damaged());
    }
    Ok(key)
}

/// Reads a committee's identities: holder 1..n's, in order.
///
/// # Errors
/// Unreadable; a line that is not `holder <i> <hex>`; indices not 1..n in order.
pub fn load_holders(path: &Path) -> Result<Vec<PublicKey>> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .enumerate()
    {
        let bad = || {
            format!(
                "{} line {}: not `holder <index> <identity>`",
                path.display(),
                n + 1
            )
        };
        let mut parts = line.split_whitespace();
        let (Some("holder"), Some(index), Some(hex_key), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            bail!(bad());
        };
        if index.parse::<usize>().ok() != Some(n + 1) {
            bail!(
                "{}: holders are listed 1, 2, 3, ... in order",
                path.display()
            );
        }
        let bytes = hex::decode(hex_key).with_context(bad)?;
        out.push(PublicKey::from_bytes(&bytes).with_context(bad)?);
    }
    if out.is_empty() || out.len() > usize::from(psi_core::threshold::MAX_HOLDERS) {
        bail!("{} lists {} holders (1 to 255)", path.display(), out.len());
    }
    Ok(out)
}

/// Writes a committee's identities (the operator's, from each holder's
/// `keyholder init` output).
///
/// # Errors
/// I/O errors.
pub fn store_holders(path: &Path, identities: &[PublicKey]) -> Result<()> {
    let text: String = identities
        .iter()
        .enumerate()
        .map(|(i, k)| format!("holder {} {}\n", i + 1, k.to_hex()))
        .collect();
    write_atomically(path, text.as_bytes(), 0o644)
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_is_made_once_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let pk = create(dir.path()).unwrap();
        assert!(create(dir.path()).is_err());
        assert_eq!(load(dir.path()).unwrap().public_key(), &pk);
        let good = fs::read(path(dir.path())).unwrap();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 1;
            fs::write(path(dir.path()), &bad).unwrap();
            assert!(load(dir.path()).is_err(), "byte {i}");
        }
        let list = dir.path().join(HOLDERS_FILE);
        store_holders(&list, &[pk, pk]).unwrap();
        assert_eq!(load_holders(&list).unwrap(), vec![pk, pk]);
        fs::write(&list, format!("holder 2 {}\n", pk.to_hex())).unwrap();
        assert!(load_holders(&list).is_err());
    }
}
