//! Pinning the server's public key and key epoch: given by flag, or trusted
//! on first use and remembered in `known-servers.txt` (one line per server:
//! `URL PUBLIC_KEY_HEX EPOCH`). A changed key is accepted only when each
//! key from the pinned one to it is endorsed by its predecessor (a key
//! rotation); any other change is an error, never silently accepted.

use std::fs;
use std::io::Write;
use std::path::Path;

use psi_core::rotation::{self, KeyStep};
use psi_core::PublicKey;

use crate::error::{Error, Result};

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
    /// The server rotated its key: each key from the remembered one to the
    /// presented one is endorsed by its predecessor. The new key and epoch
    /// are now remembered.
    Rotated {
        /// The epoch pinned before.
        from_epoch: u64,
    },
}

/// The server presented an older key epoch than the one pinned: a replica
/// that has not loaded the rotation yet (or an attempt to roll the client
/// back to a retired key). The older key is never used; the caller may ask
/// again, expecting a replica at the pinned epoch or later.
#[derive(Debug, thiserror::Error)]
#[error("the server {server} presents key epoch {presented}, older than the pinned epoch {pinned}: a replica behind the rotation (the older key is not used)")]
pub struct OlderThanPinned {
    /// The server's URL.
    pub server: String,
    /// The epoch it presented.
    pub presented: u64,
    /// The epoch pinned.
    pub pinned: u64,
}

/// Checks `key` and `epoch` for `server` against `pin` or the known-servers
/// file in `dir`; a newer key is accepted only through `history`'s endorsements.
///
/// # Errors
/// A mismatch (with what to do about it), or an unwritable file.
pub fn check(
    server: &str,
    key: &PublicKey,
    epoch: u64,
    history: &[KeyStep],
    pin: Option<&str>,
    dir: &Path,
) -> Result<Pinned> {
    let key_hex = key.to_hex();
    if let Some(pin) = pin {
        if !pin.trim().eq_ignore_ascii_case(&key_hex) {
            return Err(Error::KeyNotTrusted(format!(
                "the server's public key {key_hex} does not match the pinned key {}; do not proceed unless the operator confirms a new key",
                pin.trim()
            )));
        }
        return Ok(Pinned::ByFlag);
    }
    let path = dir.join(KNOWN_SERVERS);
    let known = fs::read_to_string(&path).unwrap_or_default();
    for line in known.lines() {
        let mut parts = line.split_whitespace();
        let (Some(url), Some(old_hex), Some(ep)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if url != server {
            continue;
        }
        if old_hex == key_hex && ep == epoch.to_string() {
            return Ok(Pinned::Known);
        }
        if let Some(pinned) = ep.parse::<u64>().ok().filter(|&p| epoch < p) {
            return Err(OlderThanPinned {
                server: server.to_string(),
                presented: epoch,
                pinned,
            }
            .into());
        }
        let endorsed = ep.parse::<u64>().ok().and_then(|old_epoch| {
            let old = hex::decode(old_hex)
                .ok()
                .and_then(|b| PublicKey::from_bytes(&b).ok())?;
            rotation::verify_chain(&old, old_epoch, key, epoch, history)
                .ok()
                .map(|()| old_epoch)
        });
        let Some(from_epoch) = endorsed else {
            return Err(Error::KeyNotTrusted(format!(
                "the server {server} now presents key {key_hex} (epoch {epoch}), but {} pinned key {old_hex} (epoch {ep}) and the server shows no endorsed rotation between them; if the operator confirms the new key, pass --pin-key {key_hex} or remove that line",
                path.display()
            )));
        };
        let rewritten: String = known
            .lines()
            .map(|l| {
                if l.split_whitespace().next() == Some(server) {
                    format!("{server} {key_hex} {epoch}\n")
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        psi_files::atomic::write_atomically(&path, rewritten.as_bytes(), 0o600)
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        return Ok(Pinned::Rotated { from_epoch });
    }
    fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| writeln!(f, "{server} {key_hex} {epoch}"))
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    Ok(Pinned::FirstUse)
}

#[cfg(test)]
mod tests {
    use super::*;
    use psi_core::ServerKey;

    use rand_core::OsRng;

    #[test]
    fn first_use_then_known_then_mismatch() {
        let d = tempfile::tempdir().unwrap();
        let [a, b, c] = [(); 3].map(|()| ServerKey::generate(&mut OsRng));
        let (a, b, c) = (a.public_key(), b.public_key(), c.public_key());
        assert_eq!(
            check("http://a", a, 1, &[], None, d.path()).unwrap(),
            Pinned::FirstUse
        );
        assert_eq!(
            check("http://a", a, 1, &[], None, d.path()).unwrap(),
            Pinned::Known
        );
        assert_eq!(
            check("http://b", b, 1, &[], None, d.path()).unwrap(),
            Pinned::FirstUse
        );
        let e = check("http://a", c, 1, &[], None, d.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("--pin-key {}", c.to_hex())), "{e}");
        assert!(check("http://a", a, 2, &[], None, d.path()).is_err());
        assert_eq!(
            check(
                "http://a",
                c,
                2,
                &[],
                Some(&c.to_hex().to_uppercase()),
                d.path()
            )
            .unwrap(),
            Pinned::ByFlag
        );
        assert!(check("http://a", c, 2, &[], Some(&b.to_hex()), d.path()).is_err());
    }

    #[test]
    fn an_endorsed_rotation_moves_the_pin() {
        let d = tempfile::tempdir().unwrap();
        let k1 = ServerKey::generate(&mut OsRng);
        let k2 = ServerKey::generate(&mut OsRng);
        let rogue = ServerKey::generate(&mut OsRng);
        check("http://a", k1.public_key(), 1, &[], None, d.path()).unwrap();
        check("http://z", rogue.public_key(), 1, &[], None, d.path()).unwrap();
        let step = |signer: &ServerKey| KeyStep {
            epoch: 2,
            public_key: *k2.public_key(),
            endorsement: rotation::endorse(signer, 1, k2.public_key(), 2, &mut OsRng),
        };
        // Endorsed by another key: refused, the pin stays.
        assert!(check(
            "http://a",
            k2.public_key(),
            2,
            &[step(&rogue)],
            None,
            d.path()
        )
        .is_err());
        assert_eq!(
            check("http://a", k2.public_key(), 2, &[step(&k1)], None, d.path()).unwrap(),
            Pinned::Rotated { from_epoch: 1 }
        );
        assert_eq!(
            check("http://a", k2.public_key(), 2, &[], None, d.path()).unwrap(),
            Pinned::Known
        );
        // The other server's line is untouched.
        assert_eq!(
            check("http://z", rogue.public_key(), 1, &[], None, d.path()).unwrap(),
            Pinned::Known
        );
    }
}
