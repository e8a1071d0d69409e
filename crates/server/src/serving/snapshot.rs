//! The served snapshot: the key (or, in threshold mode, the committee of
//! key holders), bucket index, tag set, deltas and key history of the data
//! directory's current version, loaded in full or brought forward by
//! applying the updates logged since.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use psi_core::rotation::KeyStep;
use psi_core::tagset::TagSetParams;
use psi_core::threshold::Committee;
use psi_core::{BucketIndex, Mode, PublicKey, Server, Tag, TagSet};

use crate::store::delta::Delta;
use crate::store::manifest::Entry;
use crate::store::{
    committed, committee, keystore, load_state, net_change, read_committed, Current,
};

/// What the server serves: the key and the encrypted registry of one epoch
/// and version.
#[derive(Debug)]
pub struct Snapshot {
    /// What evaluates: the epoch's key, or (threshold mode) its holders.
    pub evaluator: Evaluator,
    /// The key epoch.
    pub epoch: u64,
    /// Tags by bucket (bucket mode).
    pub index: BucketIndex,
    /// The tag set (sync mode), derived from the index's tags.
    pub tagset: TagSet,
    /// Recent versions' changes, oldest first (incremental sync).
    pub deltas: Vec<Delta>,
    /// The endorsed key history (public).
    pub history: Vec<KeyStep>,
    /// The PIR database derived from the index (PIR mode), when offered:
    /// set by the server after loading (see `crate::serving::pir::database_for`).
    pub pir: Option<std::sync::Arc<psi_pir::PirDatabase>>,
    /// The base index file it was loaded from, as the manifest named it.
    base: Option<Entry>,
    /// The tag set has at least `2^min_shard_bits` shards (a setting).
    min_shard_bits: u8,
}

/// What evaluates blinded elements for a snapshot.
#[derive(Debug)]
pub enum Evaluator {
    /// Single-key mode: the epoch's key, in this process.
    Key(Server),
    /// Threshold mode: the committee of holders whose shares make the key
    /// (no key or share is on this host), and which sharing of it.
    Holders {
        /// The public shares.
        committee: Arc<Committee>,
        /// The sharing's generation (refreshes so far).
        generation: u32,
    },
}

impl Evaluator {
    /// The epoch's evaluator in `data_dir`: its committee file when there
    /// is one (threshold mode), else its key file; either checked against
    /// the public key the manifest committed.
    ///
    /// # Errors
    /// A missing, damaged or foreign key or committee file.
    pub fn load(data_dir: &Path, epoch: u64, public_key: &[u8; 32]) -> Result<Self> {
        if let Some(s) = committee::load_committed(data_dir, epoch, public_key)? {
            return Ok(Self::Holders {
                committee: Arc::new(s.committee),
                generation: s.generation,
            });
        }
        let key = keystore::load_committed(data_dir, epoch, public_key)?;
        Ok(Self::Key(Server::new(Mode::Voprf, key.key)))
    }

    /// The epoch's public key.
    #[must_use]
    pub fn public_key(&self) -> PublicKey {
        match self {
            Self::Key(server) => *server.public_key(),
            Self::Holders { committee, .. } => *committee.public_key(),
        }
    }

    /// The committee and its generation, in threshold mode.
    #[must_use]
    pub fn committee(&self) -> Option<(&Arc<Committee>, u32)> {
        match self {
            Self::Key(_) => None,
            Self::Holders {
                committee,
                generation,
            } => Some((committee, *generation)),
        }
    }
}

impl Snapshot {
    /// Loads the current version (the base index with the log applied), the
    /// key of its epoch, its deltas and the key history, and builds the tag
    /// set.
    ///
    /// # Errors
    /// Missing or damaged files (every one is checked against the manifest;
    /// the key must derive the public key it commits).
    pub fn load(data_dir: &Path) -> Result<Self> {
        Self::load_with(data_dir, 0)
    }

    /// [`Snapshot::load`] with at least `2^min_shard_bits` shards in the
    /// tag set (`Limits::tagset_min_shard_bits`).
    ///
    /// # Errors
    /// As [`Snapshot::load`]; a registry too small for that many shards.
    pub fn load_with(data_dir: &Path, min_shard_bits: u8) -> Result<Self> {
        let (current, evaluator) = read_committed(data_dir, |m| {
            let evaluator = Evaluator::load(data_dir, m.epoch, &m.public_key)?;
            Ok((load_state(data_dir, m)?, evaluator))
        })?
        .with_context(|| {
            format!(
                "{} has no registry: run `psi-server init` first",
                data_dir.display()
            )
        })?;
        let Current {
            index,
            deltas,
            mapped,
            manifest,
            ..
        } = current;
        let tagset = TagSet::build_from_iter_with(
            TagSetParams::for_count_at_least(index.len() as u64, min_shard_bits)?,
            index.tags(),
            index.len(),
            manifest.epoch,
            index.registry_version(),
        )?;
        // Verifying the index and building the tag set read every page of
        // it; lookups need only their buckets' pages.
        mapped.release();
        Ok(Self {
            evaluator,
            epoch: manifest.epoch,
            deltas,
            history: keystore::load_history(data_dir)?,
            index,
            tagset,
            pir: None,
            base: Some(manifest.base),
            min_shard_bits,
        })
    }

    /// The data directory's current version, from `prev`: when the base
    /// index is the one `prev` was loaded from and only updates were logged
    /// since, their change is applied to `prev`'s index and tag set (the
    /// cost of the change, not of the registry: no re-verifying, no rebuild);
    /// otherwise a full [`Snapshot::load`]. Either way the same snapshot.
    ///
    /// # Errors
    /// As [`Snapshot::load`].
    pub fn reload(prev: &Snapshot, data_dir: &Path) -> Result<Self> {
        if let Some(next) = Self::refreshed(prev, data_dir)? {
            return Ok(next);
        }
        match Self::apply_log(prev, data_dir) {
            Ok(Some(next)) => Ok(next),
            Ok(None) => Self::load_with(data_dir, prev.min_shard_bits),
            Err(e) => {
                tracing::warn!("applying the new updates failed, loading in full: {e:#}");
                Self::load_with(data_dir, prev.min_shard_bits)
            }
        }
    }

    /// `prev` with a refreshed committee (threshold mode: the holders were
    /// given new shares of the same key), when that is all that changed;
    /// `None` otherwise. The registry is not read again.
    ///
    /// # Errors
    /// A damaged manifest or committee file.
    fn refreshed(prev: &Snapshot, data_dir: &Path) -> Result<Option<Self>> {
        let Some((_, generation)) = prev.evaluator.committee() else {
            return Ok(None);
        };
        let Some(m) = committed(data_dir)? else {
            return Ok(None);
        };
        let same = prev.base.as_ref() == Some(&m.base)
            && m.epoch == prev.epoch
            && m.version == prev.index.registry_version();
        if !same {
            return Ok(None);
        }
        let evaluator = Evaluator::load(data_dir, m.epoch, &m.public_key)?;
        if evaluator.committee().map(|(_, g)| g) == Some(generation) {
            return Ok(None);
        }
        Ok(Some(Self {
            evaluator,
            epoch: prev.epoch,
            index: prev.index.clone(),
            tagset: prev.tagset.clone(),
            deltas: prev.deltas.clone(),
            history: prev.history.clone(),
            pir: prev.pir.clone(),
            base: prev.base.clone(),
            min_shard_bits: prev.min_shard_bits,
        }))
    }

    /// `prev` with the updates logged since applied, or `None` when a full
    /// load is needed or cheaper (a new base index, nothing new, a registry
    /// that outgrew the tag set's parameters, or a change of more than a
    /// quarter as many entries as there are shards, and over 256).
    ///
    /// # Errors
    /// A damaged manifest, deltas, key or history.
    pub fn apply_log(prev: &Snapshot, data_dir: &Path) -> Result<Option<Self>> {
        let Some(manifest) = committed(data_dir)? else {
            return Ok(None);
        };
        if prev.base.as_ref() != Some(&manifest.base) || manifest.epoch != prev.epoch {
            return Ok(None);
        }
        let from = prev.index.registry_version();
        let all = manifest
            .deltas
            .iter()
            .map(|e| Delta::read(data_dir, e))
            .collect::<Result<Vec<Delta>>>()?;
        let chain = Delta::chain_from(&all, from);
        let Some(last) = chain.last() else {
            return Ok(None);
        };
        if last.to != manifest.version {
            anyhow::bail!(
                "the deltas lead from version {from} to {}, the manifest commits {}: the store is damaged",
                last.to,
                manifest.version
            );
        }
        let (added, removed) = net_change(&chain);
        // A change that touches most shards costs more applied than loaded
        // afresh (every shard re-coded, every bucket read): at 10^8 entries
        // 0.2% took 11.5 s applied, 6.5 s loaded.
        let shards = prev.tagset.shards().len();
        if added.len() + removed.len() > (shards / 4).max(256) {
            return Ok(None);
        }
        let index = prev.index.apply(&added, &removed, last.to)?;
        // The tag set keeps its parameters only while they suit the new
        // count; a full load chooses new ones.
        let params = prev.tagset.header().params;
        if TagSetParams::for_count_at_least(index.len() as u64, prev.min_shard_bits)? != params {
            return Ok(None);
        }
        let values = |pairs: &[(u32, Tag)]| -> Vec<u64> {
            let mut v: Vec<u64> = pairs.iter().map(|(_, t)| params.value(*t)).collect();
            v.sort_unstable();
            v
        };
        let tagset = prev
            .tagset
            .apply_delta(&values(&added), &values(&removed), last.to)?;
        let evaluator = Evaluator::load(data_dir, prev.epoch, &manifest.public_key)?;
        let version = index.registry_version();
        Ok(Some(Self {
            evaluator,
            epoch: prev.epoch,
            deltas: all.into_iter().filter(|d| d.to <= version).collect(),
            history: keystore::load_history(data_dir)?,
            index,
            tagset,
            pir: None,
            base: prev.base.clone(),
            min_shard_bits: prev.min_shard_bits,
        }))
    }
}
