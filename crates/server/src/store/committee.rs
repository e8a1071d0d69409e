//! `committee-epoch-N.txt`: the public side of a threshold epoch (`t`, the
//! public key, every holder's public share), in a data directory whose key
//! exists only as shares on key holders, and in each holder's directory.
//! Its presence is what puts a data directory's epoch in threshold mode.
//!
//! ```text
//! psi-committee 1
//! epoch 3
//! generation 0
//! threshold 2
//! public_key <64 hex>
//! holder 1 <64 hex>
//! holder 2 <64 hex>
//! holder 3 <64 hex>
//! end <SHA-256 of the lines above, 64 hex>
//! ```
//!
//! Read back, it is checked: its checksum, its epoch, and that the shares
//! lie on one polynomial through the public key ([`Committee::new`]).
//!
//! The generation counts proactive refreshes: new shares of the same key.
//! A data directory holds the current generation's file; a holder keeps
//! each generation it holds a share of, generation G > 0 as
//! `committee-epoch-N.gen-G.txt` ([`path_of`]).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use psi_core::threshold::{Committee, PublicShare};
use psi_core::PublicKey;
use sha2::{Digest, Sha256};

use psi_files::atomic::write_atomically;

const HEADER: &str = "psi-committee 1";

/// The committee of an epoch in one generation of its sharing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sharing {
    /// 0 for the first sharing, one more after each refresh.
    pub generation: u32,
    /// The public shares.
    pub committee: Committee,
}

/// Path of the committee file of `epoch` in a data directory `dir`.
#[must_use]
pub fn path(dir: &Path, epoch: u64) -> PathBuf {
    path_of(dir, epoch, 0)
}

/// Path of the committee file of `epoch`, generation `generation`, in a
/// holder's directory (generation 0 is [`path`]'s name).
#[must_use]
pub fn path_of(dir: &Path, epoch: u64, generation: u32) -> PathBuf {
    match generation {
        0 => dir.join(format!("committee-epoch-{epoch}.txt")),
        g => dir.join(format!("committee-epoch-{epoch}.gen-{g}.txt")),
    }
}

/// The epochs of the committee files in `dir`, lowest first.
///
/// # Errors
/// An unreadable directory (a missing one has none).
pub fn epochs(dir: &Path) -> Result<Vec<u64>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    let mut out: Vec<u64> = entries
        .filter_map(|e| {
            let name = e.ok()?.file_name();
            name.to_str()?
                .strip_prefix("committee-epoch-")?
                .strip_suffix(".txt")?
                .parse()
                .ok()
        })
        .collect();
    out.sort_unstable();
    Ok(out)
}

/// Writes `sharing` as the committee file of `epoch` at `p` atomically
/// (mode 0644: public): [`path`] in a data directory, [`path_of`] in a
/// holder's.
///
/// # Errors
/// I/O errors.
pub fn store_at(p: &Path, epoch: u64, sharing: &Sharing) -> Result<()> {
    let committee = &sharing.committee;
    let mut body = format!(
        "{HEADER}\nepoch {epoch}\ngeneration {}\nthreshold {}\npublic_key {}\n",
        sharing.generation,
        committee.threshold(),
        committee.public_key().to_hex()
    );
    for s in committee.shares() {
        body.push_str(&format!("holder {} {}\n", s.index, s.key.to_hex()));
    }
    let digest = hex::encode(Sha256::digest(body.as_bytes()));
    body.push_str(&format!("end {digest}\n"));
    write_atomically(p, body.as_bytes(), 0o644).with_context(|| format!("writing {}", p.display()))
}

/// Writes the first sharing (generation 0) of `epoch` into `dir`.
///
/// # Errors
/// I/O errors.
pub fn store(dir: &Path, epoch: u64, committee: &Committee) -> Result<()> {
    store_at(
        &path(dir, epoch),
        epoch,
        &Sharing {
            generation: 0,
            committee: committee.clone(),
        },
    )
}

/// The committee of `epoch` in `dir`, or `None` when there is no file
/// (single-key mode).
///
/// # Errors
/// An unreadable, damaged or inconsistent file.
pub fn load(dir: &Path, epoch: u64) -> Result<Option<Committee>> {
    Ok(load_at(&path(dir, epoch), epoch)?.map(|s| s.committee))
}

/// The sharing in the committee file at `p`, or `None` when there is none.
///
/// # Errors
/// An unreadable, damaged or inconsistent file, or one of another epoch.
pub fn load_at(p: &Path, epoch: u64) -> Result<Option<Sharing>> {
    let text = match std::fs::read_to_string(p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
    };
    parse(&text, epoch)
        .map(Some)
        .with_context(|| format!("{} is damaged or not a committee file", p.display()))
}

/// Loads the sharing of `epoch` in a data directory and checks it is for
/// `public_key` (the one the manifest committed).
///
/// # Errors
/// As [`load`], and a committee of another key.
pub fn load_committed(dir: &Path, epoch: u64, public_key: &[u8; 32]) -> Result<Option<Sharing>> {
    let c = load_at(&path(dir, epoch), epoch)?;
    if let Some(c) = &c {
        if c.committee.public_key().to_bytes() != *public_key {
            bail!(
                "{} is for another public key than the manifest committed for epoch {epoch}",
                path(dir, epoch).display()
            );
        }
    }
    Ok(c)
}

fn parse(text: &str, epoch: u64) -> Result<Sharing> {
    let (body, end) = text
        .strip_suffix('\n')
        .and_then(|t| t.rsplit_once('\n'))
        .context("no end line")?;
    let body = format!("{body}\n");
    let digest = end.strip_prefix("end ").context("no end line")?;
    if hex::encode(Sha256::digest(body.as_bytes())) != digest {
        bail!("its checksum does not match");
    }
    let mut lines = body.lines();
    if lines.next() != Some(HEADER) {
        bail!("it does not start with `{HEADER}`");
    }
    let mut field = |name: &str| -> Result<String> {
        lines
            .next()
            .and_then(|l| l.strip_prefix(name))
            .and_then(|l| l.strip_prefix(' '))
            .map(str::to_string)
            .with_context(|| format!("no `{name}` line"))
    };
    let got: u64 = field("epoch")?.parse()?;
    if got != epoch {
        bail!("it is the committee of epoch {got}");
    }
    let generation: u32 = field("generation")?.parse()?;
    let threshold: u16 = field("threshold")?.parse()?;
    let public_key = key(&field("public_key")?)?;
    let shares = lines
        .map(|l| {
            let (index, hex) = l
                .strip_prefix("holder ")
                .and_then(|r| r.split_once(' '))
                .context("a line that is not `holder <index> <public share>`")?;
            Ok(PublicShare {
                index: index.parse()?,
                key: key(hex)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Sharing {
        generation,
        committee: Committee::new(threshold, public_key, shares)?,
    })
}

fn key(hex_text: &str) -> Result<PublicKey> {
    let bytes = hex::decode(hex_text).context("not hex")?;
    Ok(PublicKey::from_bytes(&bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use psi_core::ServerKey;
    use rand_core::OsRng;

    #[test]
    fn written_read_and_every_damage_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = ServerKey::generate(&mut OsRng);
        let shares = psi_core::threshold::split(&key, 2, 3, &mut OsRng).unwrap();
        let c = Committee::new(
            2,
            *key.public_key(),
            shares
                .iter()
                .map(psi_core::KeyShare::public_share)
                .collect(),
        )
        .unwrap();
        assert_eq!(load(dir.path(), 4).unwrap(), None);
        store(dir.path(), 4, &c).unwrap();
        assert_eq!(load(dir.path(), 4).unwrap(), Some(c.clone()));
        assert!(load_committed(dir.path(), 4, &key.public_key().to_bytes()).is_ok());
        assert!(load_committed(dir.path(), 4, &[1; 32]).is_err());
        // Another epoch's name on it, any changed byte: refused.
        std::fs::copy(path(dir.path(), 4), path(dir.path(), 5)).unwrap();
        assert!(load(dir.path(), 5).is_err());
        let good = std::fs::read(path(dir.path(), 4)).unwrap();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x01;
            std::fs::write(path(dir.path(), 4), &bad).unwrap();
            assert!(load(dir.path(), 4).is_err(), "byte {i}");
        }
    }
}
