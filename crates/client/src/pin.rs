//! Pinning the server's public key and key epoch: given by flag (a root of
//! trust), or trusted on first use and remembered in `known-servers.txt`
//! (one line per server: `URL PUBLIC_KEY_HEX EPOCH`). A changed key is
//! accepted only when each key from the pinned one to it is endorsed by its
//! predecessor (a key rotation); with `pin_exact`, a key given by flag must
//! be the server's exactly. Any other change is an error, never silently
//! accepted.

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
    /// The key given by flag is an earlier epoch's: each key from it to the
    /// presented one is endorsed by its predecessor.
    EndorsedFromFlag {
        /// The epoch of the key given by flag.
        from_epoch: u64,
    },
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

/// Checks `key` and `epoch` for `server` against `pin` (followed through
/// `history`'s endorsements unless `exact`) or the known-servers file in
/// `dir`; a newer key is accepted only through `history`'s endorsements.
///
/// # Errors
/// A mismatch (with what to do about it), or an unwritable file.
pub fn check(
    server: &str,
    key: &PublicKey,
    epoch: u64,
    history: &[KeyStep],
    pin: Option<&str>,
    exact: bool,
    dir: &Path,
) -> Result<Pinned> {
    let key_hex = key.to_hex();
    if let Some(pin) = pin {
        let pin = pin.trim();
        if pin.eq_ignore_ascii_case(&key_hex) {
            return Ok(Pinned::ByFlag);
        }
        let mismatch = |why: &str| {
            Error::KeyNotTrusted(format!(
                "the server's public key {key_hex} (epoch {epoch}) is not the pinned key {pin}{why}; do not proceed unless the operator confirms a new key"
            ))
        };
        if exact {
            return Err(mismatch(" (pin_exact: only that key is accepted)"));
        }
        // The pinned key as the key of some earlier epoch, from which every
        // rotation up to the server's key is endorsed.
        let pinned = hex::decode(pin)
            .ok()
            .and_then(|b| PublicKey::from_bytes(&b).ok())
            .ok_or_else(|| mismatch(" (which is not a public key)"))?;
        return (1..epoch)
            .find(|&e| rotation::verify_chain(&pinned, e, key, epoch, history).is_ok())
            .map(|from_epoch| Pinned::EndorsedFromFlag { from_epoch })
            .ok_or_else(|| mismatch(" and the server shows no endorsed rotation from it"));
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
            check("http://a", a, 1, &[], None, false, d.path()).unwrap(),
            Pinned::FirstUse
        );
        assert_eq!(
            check("http://a", a, 1, &[], None, false, d.path()).unwrap(),
            Pinned::Known
        );
        assert_eq!(
            check("http://b", b, 1, &[], None, false, d.path()).unwrap(),
            Pinned::FirstUse
        );
        let e = check("http://a", c, 1, &[], None, false, d.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("--pin-key {}", c.to_hex())), "{e}");
        assert!(check("http://a", a, 2, &[], None, false, d.path()).is_err());
        assert_eq!(
            check(
                "http://a",
                c,
                2,
                &[],
                Some(&c.to_hex().to_uppercase()),
                false,
                d.path()
            )
            .unwrap(),
            Pinned::ByFlag
        );
        assert!(check("http://a", c, 2, &[], Some(&b.to_hex()), false, d.path()).is_err());
    }

    #[test]
    fn an_endorsed_rotation_moves_the_pin() {
        let d = tempfile::tempdir().unwrap();
        let k1 = ServerKey::generate(&mut OsRng);
        let k2 = ServerKey::generate(&mut OsRng);
        let rogue = ServerKey::generate(&mut OsRng);
        check("http://a", k1.public_key(), 1, &[], None, false, d.path()).unwrap();
        check(
            "http://z",
            rogue.public_key(),
            1,
            &[],
            None,
            false,
            d.path(),
        )
        .unwrap();
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
            false,
            d.path()
        )
        .is_err());
        assert_eq!(
            check(
                "http://a",
                k2.public_key(),
                2,
                &[step(&k1)],
                None,
                false,
                d.path()
            )
            .unwrap(),
            Pinned::Rotated { from_epoch: 1 }
        );
        assert_eq!(
            check("http://a", k2.public_key(), 2, &[], None, false, d.path()).unwrap(),
            Pinned::Known
        );
        // The other server's line is untouched.
        assert_eq!(
            check(
                "http://z",
                rogue.public_key(),
                1,
                &[],
                None,
                false,
                d.path()
            )
            .unwrap(),
            Pinned::Known
        );
    }

    #[test]
    fn a_configured_key_is_a_root_of_trust_unless_exact() {
        let d = tempfile::tempdir().unwrap();
        let keys: Vec<ServerKey> = (0..3).map(|_| ServerKey::generate(&mut OsRng)).collect();
        let rogue = ServerKey::generate(&mut OsRng);
        // Epochs 1 -> 2 -> 3, each endorsed by its predecessor.
        let history: Vec<KeyStep> = (1..3)
            .map(|i| KeyStep {
                epoch: i as u64 + 1,
                public_key: *keys[i].public_key(),
                endorsement: rotation::endorse(
                    &keys[i - 1],
                    i as u64,
                    keys[i].public_key(),
                    i as u64 + 1,
                    &mut OsRng,
                ),
            })
            .collect();
        let pin1 = keys[0].public_key().to_hex();
        let now = keys[2].public_key();
        assert_eq!(
            check("http://a", now, 3, &history, Some(&pin1), false, d.path()).unwrap(),
            Pinned::EndorsedFromFlag { from_epoch: 1 }
        );
        // The epoch-2 key configured: followed from there.
        let pin2 = keys[1].public_key().to_hex();
        assert_eq!(
            check("http://a", now, 3, &history, Some(&pin2), false, d.path()).unwrap(),
            Pinned::EndorsedFromFlag { from_epoch: 2 }
        );
        // With pin_exact, only the configured key itself.
        let e = check("http://a", now, 3, &history, Some(&pin1), true, d.path()).unwrap_err();
        assert!(e.to_string().contains("pin_exact"), "{e}");
        // A key the chain does not lead from, or a history that breaks.
        let rogue_pin = rogue.public_key().to_hex();
        let e = check(
            "http://a",
            now,
            3,
            &history,
            Some(&rogue_pin),
            false,
            d.path(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("no endorsed rotation"), "{e}");
        assert!(check(
            "http://a",
            now,
            3,
            &history[1..],
            Some(&pin1),
            false,
            d.path()
        )
        .is_err());
        assert!(check("http://a", now, 3, &history, Some("zz"), false, d.path()).is_err());
    }
}
