//! `psi-server key split`: the one-time migration of a single-key epoch to
//! threshold mode. The current epoch's key is split into `n` Shamir shares
//! (a dealer's split: the key existed whole once, here, and this is the
//! last time it does), each written into its holder's directory with the
//! committee file; the committee file goes into the data directory; every
//! share is read back and checked; then the key file is destroyed. The
//! public key does not change, so nothing is re-encoded and institutions
//! keep their pins. New epochs are then made by the holders' DKG, with no
//! dealer.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use psi_core::threshold::{self, Committee};
use rand_core::OsRng;

use crate::keyholder::share;
use crate::store::{committee, keystore, Writer};

/// What a split did.
#[derive(Debug, Clone)]
pub struct SplitReport {
    /// The epoch split.
    pub epoch: u64,
    /// `t`.
    pub threshold: u16,
    /// Each holder's directory, holder 1 first.
    pub holder_dirs: Vec<PathBuf>,
    /// The unchanged public key, in hex.
    pub public_key_hex: String,
}

/// Splits the current epoch's key of `data_dir` into `n` shares with
/// threshold `t`, written under `out/holder-1` .. `out/holder-n`.
///
/// # Errors
/// No registry; an epoch already in threshold mode; a bad `t` or `n`; an
/// existing holder directory with a share of the epoch; I/O errors (the
/// key file is destroyed only after every share is written and checked).
pub fn split(data_dir: &Path, t: u16, n: u16, out: &Path) -> Result<SplitReport> {
    // The writers' lock: no init, update or rotation meanwhile.
    let store = Writer::open(data_dir, false)?;
    let m = store.committed()?.clone();
    if committee::load(data_dir, m.epoch)?.is_some() {
        bail!(
            "key epoch {} of {} is already in threshold mode",
            m.epoch,
            data_dir.display()
        );
    }
    if t < 2 {
        bail!("--threshold must be at least 2: with 1, every holder holds the whole key");
    }
    let key = store.key()?;
    let shares = threshold::split(&key.key, t, n, &mut OsRng)
        .map_err(|e| anyhow::anyhow!("--threshold {t} --holders {n}: {e}"))?;
    let committee = Committee::new(
        t,
        *key.key.public_key(),
        shares
            .iter()
            .map(psi_core::KeyShare::public_share)
            .collect(),
    )?;
    let mut dirs = Vec::with_capacity(shares.len());
    for s in &shares {
        let dir = out.join(format!("holder-{}", s.index()));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        if share::path(&dir, m.epoch, 0).exists() {
            bail!(
                "{} already holds a share of epoch {}: refusing to overwrite it",
                dir.display(),
                m.epoch
            );
        }
        // The committee first: a share is never left without its committee.
        committee::store(&dir, m.epoch, &committee)?;
        share::store(&dir, m.epoch, 0, s)?;
        dirs.push(dir);
    }
    // Read back before the key goes: every share loads and is its holder's.
    for (dir, s) in dirs.iter().zip(&shares) {
        let back = share::load(dir, m.epoch, 0)?;
        let c = committee::load(dir, m.epoch)?.context("the committee file just written")?;
        if back.public_share() != s.public_share() || c != committee {
            bail!(
                "{} does not read back as written: nothing destroyed",
                dir.display()
            );
        }
    }
    committee::store(data_dir, m.epoch, &committee)?;
    drop(key);
    keystore::destroy(&keystore::key_path(data_dir, m.epoch))?;
    tracing::info!(
        epoch = m.epoch,
        threshold = t,
        holders = n,
        "key split into shares; the key file is destroyed"
    );
    Ok(SplitReport {
        epoch: m.epoch,
        threshold: t,
        holder_dirs: dirs,
        public_key_hex: committee.public_key().to_hex(),
    })
}
