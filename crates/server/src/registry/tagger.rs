//! What makes records' tags on the encoding side: the epoch's key in this
//! process (single-key mode), or, in threshold mode, `t` key holders. Then
//! the encoding side is a client of the holders like any institution: it
//! blinds `H(record)`, has `t` holders evaluate, verifies each partial
//! evaluation against its holder's public share, combines and unblinds.
//! The holders see blinded elements only, never a record or a tag.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use psi_core::threshold::Committee;
use psi_core::{Blinding, Client, Mode, Output, PublicKey, Server};
use rand_core::OsRng;

use crate::keyholder::pool::{HolderPool, HoldersConfig, OnBehalf};
use crate::store::committee::{self, Sharing};
use crate::store::keystore;

/// The name the encoding side gives the holders for their audit trails and
/// quotas (a holder's policy lists it with mode `encode`).
pub const ENCODING_INSTITUTION: &str = "encoding";
/// The purpose it declares.
pub const ENCODING_PURPOSE: &str = "registry-encoding";
/// Elements per request to the holders.
const HOLDER_BATCH: usize = 16_384;
/// Requests to the holders in flight at once.
const IN_FLIGHT: usize = 4;

/// Makes tags under one epoch's key.
#[derive(Debug)]
pub enum Tagger {
    /// The key, in this process.
    Key(Server),
    /// Threshold mode: through the key holders.
    Holders(Box<HolderTagger>),
}

/// The encoding side's way through the key holders.
pub struct HolderTagger {
    client: Client,
    committee: Arc<Committee>,
    epoch: u64,
    generation: u32,
    pool: HolderPool,
    handle: tokio::runtime::Handle,
    // Kept while the handle is in use, when no runtime was running.
    _runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for HolderTagger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HolderTagger")
            .field("epoch", &self.epoch)
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

impl Tagger {
    /// The tagger of `epoch` in `data_dir`: its committee file's holders
    /// (threshold mode; `holders` says how to reach them), else its key
    /// file. With `public_key`, the one the manifest committed, the file is
    /// checked against it.
    ///
    /// # Errors
    /// A threshold-mode epoch without `holders`; a missing, damaged or
    /// foreign key or committee file.
    pub fn of_epoch(
        data_dir: &Path,
        epoch: u64,
        public_key: Option<&[u8; 32]>,
        holders: Option<&HoldersConfig>,
    ) -> Result<Self> {
        let sharing = match public_key {
            Some(pk) => committee::load_committed(data_dir, epoch, pk)?,
            None => committee::load_at(&committee::path(data_dir, epoch), epoch)?,
        };
        if let Some(sharing) = sharing {
            let Some(holders) = holders else {
                bail!(
                    "key epoch {epoch} of {} is in threshold mode (its key exists only as shares on the key holders): give --holders, with --holders-ca, --holders-cert and --holders-key",
                    data_dir.display()
                );
            };
            return Ok(Self::Holders(Box::new(HolderTagger::new(
                sharing, epoch, holders,
            )?)));
        }
        let key = match public_key {
            Some(pk) => keystore::load_committed(data_dir, epoch, pk)?,
            None => keystore::load(data_dir, epoch)?,
        };
        Ok(Self::Key(Server::new(Mode::Voprf, key.key)))
    }

    /// The public key of `epoch` in `data_dir`: its committee's, or its
    /// key's (no holder is asked).
    ///
    /// # Errors
    /// Neither file, or a damaged one.
    pub fn public_key_of(data_dir: &Path, epoch: u64) -> Result<[u8; 32]> {
        if let Some(c) = committee::load(data_dir, epoch)? {
            return Ok(c.public_key().to_bytes());
        }
        Ok(keystore::load(data_dir, epoch)?.key.public_key().to_bytes())
    }

    /// The newest epoch with a key or a committee file in `data_dir`.
    ///
    /// # Errors
    /// An unreadable directory.
    pub fn newest_epoch(data_dir: &Path) -> Result<Option<u64>> {
        Ok(keystore::latest_epoch(data_dir)?.max(committee::epochs(data_dir)?.last().copied()))
    }

    /// The epoch's public key.
    #[must_use]
    pub fn public_key(&self) -> PublicKey {
        match self {
            Self::Key(server) => *server.public_key(),
            Self::Holders(h) => *h.committee.public_key(),
        }
    }

    /// `Evaluate` for many inputs: the outputs of the single-key VOPRF
    /// under the epoch's key, whichever way they are made.
    ///
    /// # Errors
    /// An input too long or hashing to the identity; in threshold mode,
    /// fewer than `t` holders answering with a verified evaluation.
    pub fn evaluate_batch<I: AsRef<[u8]> + Sync>(&self, inputs: &[I]) -> Result<Vec<Output>> {
        match self {
            Self::Key(server) => Ok(server.evaluate_batch(inputs)?),
            Self::Holders(h) => h.evaluate_batch(inputs),
        }
    }
}

impl HolderTagger {
    fn new(sharing: Sharing, epoch: u64, holders: &HoldersConfig) -> Result<Self> {
        let committee = sharing.committee;
        let (handle, runtime) = crate::keyholder::pool::runtime_handle()?;
        let pool = {
            // Channels are made inside the runtime they will run on.
            let _entered = handle.enter();
            HolderPool::new(holders, None)?
        };
        Ok(Self {
            client: Client::new(Mode::Voprf, *committee.public_key()),
            committee: Arc::new(committee),
            epoch,
            generation: sharing.generation,
            pool,
            handle,
            _runtime: runtime,
        })
    }

    fn evaluate_batch<I: AsRef<[u8]> + Sync>(&self, inputs: &[I]) -> Result<Vec<Output>> {
        let mut out = Vec::with_capacity(inputs.len());
        let chunks: Vec<&[I]> = inputs.chunks(HOLDER_BATCH).collect();
        for group in chunks.chunks(IN_FLIGHT) {
            let blinded = group
                .iter()
                .map(|c| self.client.blind(c, Blinding::Additive, &mut OsRng))
                .collect::<psi_core::Result<Vec<_>>>()?;
            let asks = blinded.iter().map(|(_, b)| {
                let b = Arc::new(b.clone());
                let on_behalf = OnBehalf {
                    institution: ENCODING_INSTITUTION.to_string(),
                    purpose: ENCODING_PURPOSE.to_string(),
                    mode: "encode".to_string(),
                    request_id: crate::serving::audit::new_request_id(),
                };
                async move {
                    self.pool
                        .evaluate(
                            &self.committee,
                            (self.epoch, self.generation),
                            &b,
                            &on_behalf,
                        )
                        .await
                }
            });
            let answers = self.handle.block_on(futures::future::join_all(asks));
            for ((state, _), (chunk, answer)) in blinded.into_iter().zip(group.iter().zip(answers))
            {
                let partials = answer.context("evaluating through the key holders")?;
                out.extend(self.client.finalize_threshold(
                    state,
                    chunk,
                    &self.committee,
                    &partials,
                )?);
            }
        }
        Ok(out)
    }
}
