//! The key ceremonies, from the coordinator's side (the encoding host,
//! connected to every holder as an operator): a distributed key generation
//! for a new epoch, a proactive refresh of the current one, the old
//! holders' endorsement of a new epoch's key, and the retirement of shares
//! the replicas no longer use. The coordinator only relays: every secret
//! stays on its holder (shares travel sealed to their recipient; see
//! `psi_core::threshold::dkg`). Also the wire forms of the ceremonies'
//! messages.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use psi_core::threshold::dkg::{Purpose, Round1Package, Sealed, Session};
use psi_core::threshold::sign::{self, Commitment, Endorsed, SignatureShare};
use psi_core::threshold::Committee;
use psi_core::PublicKey;
use psi_proto::v1::{
    DkgDealRequest, DkgFinishRequest, DkgPackage, DkgPurpose, DkgSession, DkgStartRequest,
    EndorseCommitRequest, EndorseCommitment, EndorseSignRequest, EndorsedKey, RetireSharesRequest,
    SealedShare,
};
use rand_core::RngCore;

use crate::keyholder::pool::HolderPool;
use crate::serving::error::ServiceError;
use crate::store::committee::Sharing;

fn bad(what: &str) -> ServiceError {
    ServiceError::InvalidArgument(format!("malformed {what}"))
}

fn array<const N: usize>(bytes: &[u8], what: &str) -> Result<[u8; N], ServiceError> {
    bytes.try_into().map_err(|_| bad(what))
}

fn index(i: u32, what: &str) -> Result<u16, ServiceError> {
    u16::try_from(i).map_err(|_| bad(what))
}

/// A session on the wire.
#[must_use]
pub fn session_to_proto(s: &Session, epoch: u64, generation: u32) -> DkgSession {
    DkgSession {
        id: s.id.to_vec(),
        threshold: u32::from(s.threshold),
        holders: u32::from(s.holders),
        purpose: match s.purpose {
            Purpose::NewKey => DkgPurpose::NewKey,
            Purpose::Refresh => DkgPurpose::Refresh,
        } as i32,
        key_epoch: epoch,
        generation,
    }
}

/// A session from the wire, with its epoch and generation. The epoch and
/// generation are bound into the session id's use: the id is hashed with
/// them (`context`), so one run's messages fit no other.
///
/// # Errors
/// A malformed session.
pub fn session_from_proto(p: &DkgSession) -> Result<(Session, u64, u32), ServiceError> {
    let purpose = match DkgPurpose::try_from(p.purpose) {
        Ok(DkgPurpose::NewKey) if p.generation == 0 => Purpose::NewKey,
        Ok(DkgPurpose::Refresh) if p.generation > 0 => Purpose::Refresh,
        _ => return Err(bad("key-generation purpose or generation")),
    };
    if p.key_epoch == 0 {
        return Err(bad("key-generation epoch"));
    }
    let raw: [u8; 32] = array(&p.id, "session id")?;
    Ok((
        Session {
            id: bound_id(&raw, p.key_epoch, p.generation),
            threshold: index(p.threshold, "threshold")?,
            holders: index(p.holders, "holder count")?,
            purpose,
        },
        p.key_epoch,
        p.generation,
    ))
}

/// The session id the holders sign under: the coordinator's random id
/// bound to the epoch and generation the run makes.
fn bound_id(raw: &[u8; 32], epoch: u64, generation: u32) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::new()
        .chain_update(b"psi.v1.dkg-session")
        .chain_update(raw)
        .chain_update(epoch.to_be_bytes())
        .chain_update(generation.to_be_bytes())
        .finalize()
        .into()
}

/// A round-1 package on the wire.
#[must_use]
pub fn package_to_proto(p: &Round1Package) -> DkgPackage {
    DkgPackage {
        holder_index: u32::from(p.index),
        commitments: p.commitments.iter().map(|c| c.to_vec()).collect(),
        proof_of_knowledge: p.proof_of_knowledge.to_vec(),
        dh_public: p.dh_public.to_vec(),
        signature: p.signature.to_vec(),
    }
}

/// A round-1 package from the wire (checked by the holders, not here).
///
/// # Errors
/// Fields of the wrong length.
pub fn package_from_proto(p: &DkgPackage) -> Result<Round1Package, ServiceError> {
    Ok(Round1Package {
        index: index(p.holder_index, "package index")?,
        commitments: p
            .commitments
            .iter()
            .map(|c| array(c, "commitment"))
            .collect::<Result<_, _>>()?,
        proof_of_knowledge: array(&p.proof_of_knowledge, "proof of knowledge")?,
        dh_public: array(&p.dh_public, "Diffie-Hellman key")?,
        signature: array(&p.signature, "package signature")?,
    })
}

/// A sealed share on the wire.
#[must_use]
pub fn sealed_to_proto(s: &Sealed) -> SealedShare {
    SealedShare {
        from: u32::from(s.from),
        to: u32::from(s.to),
        share: s.bytes.to_vec(),
    }
}

/// A sealed share from the wire.
///
/// # Errors
/// Fields of the wrong size.
pub fn sealed_from_proto(s: &SealedShare) -> Result<Sealed, ServiceError> {
    Ok(Sealed {
        from: index(s.from, "sealed share")?,
        to: index(s.to, "sealed share")?,
        bytes: array(&s.share, "sealed share")?,
    })
}

/// What is endorsed, on the wire.
#[must_use]
pub fn endorsed_to_proto(m: &Endorsed) -> EndorsedKey {
    EndorsedKey {
        old_epoch: m.old_epoch,
        new_public_key: m.new_key.to_bytes().to_vec(),
        new_epoch: m.new_epoch,
    }
}

/// What is endorsed, from the wire.
///
/// # Errors
/// Missing or malformed.
pub fn endorsed_from_proto(m: Option<&EndorsedKey>) -> Result<Endorsed, ServiceError> {
    let m = m.ok_or_else(|| bad("endorsement message"))?;
    Ok(Endorsed {
        old_epoch: m.old_epoch,
        new_key: PublicKey::from_bytes(&m.new_public_key).map_err(|_| bad("new public key"))?,
        new_epoch: m.new_epoch,
    })
}

/// A signing commitment from the wire.
///
/// # Errors
/// Fields of the wrong size.
pub fn commitment_from_proto(c: &EndorseCommitment) -> Result<Commitment, ServiceError> {
    Ok(Commitment {
        index: index(c.holder_index, "commitment index")?,
        hiding: array(&c.hiding, "hiding commitment")?,
        binding: array(&c.binding, "binding commitment")?,
    })
}

fn request<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.set_timeout(timeout);
    r
}

/// Runs a key generation (`generation` 0: a new key for `epoch`) or a
/// refresh (`generation` > 0: new shares of `epoch`'s key) among every
/// holder of `pool`; returns the committee all of them agree on. Every
/// holder must take part.
///
/// # Errors
/// A holder that does not answer or refuses (named), or holders that end
/// with different committees.
pub async fn generate(
    pool: &HolderPool,
    threshold: u16,
    epoch: u64,
    generation: u32,
) -> Result<Sharing> {
    let clients = pool.clients();
    let n = u16::try_from(clients.len()).context("too many holders")?;
    let mut id = [0u8; 32];
    rand_core::OsRng.fill_bytes(&mut id);
    let session = Session {
        id,
        threshold,
        holders: n,
        purpose: if generation == 0 {
            Purpose::NewKey
        } else {
            Purpose::Refresh
        },
    };
    let proto = session_to_proto(&session, epoch, generation);
    let timeout = pool.timeout() * 4;
    let mut packages = Vec::with_capacity(clients.len());
    for (i, c) in &clients {
        let p = c
            .clone()
            .dkg_start(request(
                DkgStartRequest {
                    session: Some(proto.clone()),
                },
                timeout,
            ))
            .await
            .with_context(|| format!("key holder {i} did not start the key generation"))?
            .into_inner();
        if p.holder_index != u32::from(*i) {
            bail!(
                "the holder listed as {i} says it is holder {} (its holders.txt and --holders disagree)",
                p.holder_index
            );
        }
        packages.push(p);
    }
    let mut sealed: Vec<SealedShare> = Vec::new();
    for (i, c) in &clients {
        let dealt = c
            .clone()
            .dkg_deal(request(
                DkgDealRequest {
                    session_id: id.to_vec(),
                    packages: packages.clone(),
                },
                timeout,
            ))
            .await
            .with_context(|| format!("key holder {i} did not deal its shares"))?
            .into_inner();
        if dealt.shares.iter().any(|s| s.from != u32::from(*i)) {
            bail!("key holder {i} dealt shares in another holder's name");
        }
        sealed.extend(dealt.shares);
    }
    let mut agreed: Option<Sharing> = None;
    for (i, c) in &clients {
        let finished = c
            .clone()
            .dkg_finish(request(
                DkgFinishRequest {
                    session_id: id.to_vec(),
                    packages: packages.clone(),
                    shares: sealed
                        .iter()
                        .filter(|s| s.to == u32::from(*i))
                        .cloned()
                        .collect(),
                },
                timeout,
            ))
            .await
            .with_context(|| format!("key holder {i} did not finish the key generation"))?
            .into_inner();
        let pk = PublicKey::from_bytes(&finished.public_key)?;
        let info = finished
            .committee
            .context("a holder finished without its committee")?;
        let sharing = Sharing {
            generation: info.generation,
            committee: psi_proto::committee_from_proto(&pk, &info)?,
        };
        match &agreed {
            None => agreed = Some(sharing),
            Some(a) if *a == sharing => {}
            Some(_) => {
                bail!("key holder {i} ended with another committee than the holders before it")
            }
        }
    }
    let sharing = agreed.context("no holders")?;
    if sharing.generation != generation {
        bail!(
            "the holders made generation {}, not {generation}",
            sharing.generation
        );
    }
    Ok(sharing)
}

/// The endorsement of `message` by `t` holders of `old` (the retiring
/// epoch's committee), any that answer.
///
/// # Errors
/// Fewer than `t` holders committing; a signer's bad share (named).
pub async fn endorse(pool: &HolderPool, old: &Committee, message: &Endorsed) -> Result<[u8; 64]> {
    let timeout = pool.timeout() * 4;
    let mut id = [0u8; 32];
    rand_core::OsRng.fill_bytes(&mut id);
    let wire = endorsed_to_proto(message);
    let t = usize::from(old.threshold());
    let mut signers = Vec::new();
    let mut refusals = Vec::new();
    for (i, c) in pool.clients() {
        if signers.len() == t {
            break;
        }
        match c
            .clone()
            .endorse_commit(request(
                EndorseCommitRequest {
                    session_id: id.to_vec(),
                    message: Some(wire.clone()),
                },
                timeout,
            ))
            .await
        {
            Ok(r) => signers.push((i, c, commitment_from_proto(&r.into_inner())?)),
            Err(s) => refusals.push(format!("holder {i}: {}", s.message())),
        }
    }
    if signers.len() < t {
        bail!(
            "{} of the {t} holders needed committed to the endorsement ({})",
            signers.len(),
            refusals.join("; ")
        );
    }
    signers.sort_by_key(|(i, _, _)| *i);
    let commitments: Vec<Commitment> = signers.iter().map(|(_, _, c)| *c).collect();
    let wire_commitments: Vec<EndorseCommitment> = commitments
        .iter()
        .map(|c| EndorseCommitment {
            holder_index: u32::from(c.index),
            hiding: c.hiding.to_vec(),
            binding: c.binding.to_vec(),
        })
        .collect();
    let mut shares = Vec::with_capacity(t);
    for (i, c, _) in &signers {
        let z = c
            .clone()
            .endorse_sign(request(
                EndorseSignRequest {
                    session_id: id.to_vec(),
                    message: Some(wire.clone()),
                    commitments: wire_commitments.clone(),
                },
                timeout,
            ))
            .await
            .with_context(|| format!("key holder {i} did not sign the endorsement"))?
            .into_inner();
        shares.push(SignatureShare {
            index: index(z.holder_index, "signature share")?,
            z: array(&z.z, "signature share")?,
        });
    }
    Ok(sign::aggregate(old, message, &commitments, &shares)?)
}

/// Tells every holder to destroy its shares older than (`epoch`,
/// `generation`); returns what each destroyed.
///
/// # Errors
/// A holder that does not answer or refuses (named; the others have
/// already retired theirs: run it again once the holder is back).
pub async fn retire(
    pool: &HolderPool,
    epoch: u64,
    generation: u32,
) -> Result<Vec<(u16, Vec<String>)>> {
    let mut out = Vec::new();
    for (i, c) in pool.clients() {
        let r = c
            .clone()
            .retire_shares(request(
                RetireSharesRequest {
                    key_epoch: epoch,
                    generation,
                },
                pool.timeout() * 4,
            ))
            .await
            .with_context(|| format!("key holder {i} did not retire its old shares"))?
            .into_inner();
        out.push((i, r.destroyed));
    }
    Ok(out)
}

/// A new threshold deployment: the holders generate epoch 1's key (no
/// dealer), and its committee file goes into `data_dir`, where `init
/// --holders` then encodes the registry through them.
///
/// # Errors
/// A data directory that already has a registry or a key; a ceremony
/// failure.
pub async fn new_deployment(
    data_dir: &std::path::Path,
    threshold: u16,
    holders: &crate::keyholder::pool::HoldersConfig,
) -> Result<Sharing> {
    if crate::store::has_registry(data_dir)
        || crate::registry::tagger::Tagger::newest_epoch(data_dir)?.is_some()
    {
        bail!(
            "{} already has a key or a registry: a running single-key deployment moves to threshold mode with `psi-server key split`, and a threshold one makes new epochs with `psi-server rotate-key --holders`",
            data_dir.display()
        );
    }
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let pool = HolderPool::new(holders, None)?;
    let sharing = generate(&pool, threshold, 1, 0).await?;
    crate::store::committee::store_at(&crate::store::committee::path(data_dir, 1), 1, &sharing)?;
    Ok(sharing)
}

/// A proactive refresh of the committed epoch of `data_dir`: the holders
/// make new shares of the same key (generation + 1) and its committee file
/// is replaced. Publish it; once the replicas serve it, retire the old
/// shares (`retire_old`).
///
/// # Errors
/// A single-key epoch; a ceremony failure; a key that changed (never).
pub async fn refresh(
    data_dir: &std::path::Path,
    holders: &crate::keyholder::pool::HoldersConfig,
) -> Result<(u64, Sharing)> {
    let store = crate::store::Writer::open(data_dir, false)?;
    let m = store.committed()?.clone();
    let current = crate::store::committee::load_committed(data_dir, m.epoch, &m.public_key)?
        .with_context(|| format!("key epoch {} is not in threshold mode", m.epoch))?;
    let pool = HolderPool::new(holders, None)?;
    let next = generate(
        &pool,
        current.committee.threshold(),
        m.epoch,
        current.generation + 1,
    )
    .await?;
    if next.committee.public_key() != current.committee.public_key() {
        bail!("the refreshed shares make another key: nothing written");
    }
    crate::store::committee::store_at(
        &crate::store::committee::path(data_dir, m.epoch),
        m.epoch,
        &next,
    )?;
    drop(store);
    Ok((m.epoch, next))
}

/// Has every holder destroy its shares older than the sharing committed
/// in `data_dir` (run it once the replicas serve that sharing).
///
/// # Errors
/// A single-key epoch; a holder that does not answer.
pub async fn retire_old(
    data_dir: &std::path::Path,
    holders: &crate::keyholder::pool::HoldersConfig,
) -> Result<Vec<(u16, Vec<String>)>> {
    let m = crate::store::committed(data_dir)?
        .with_context(|| format!("{} has no registry", data_dir.display()))?;
    let current = crate::store::committee::load_committed(data_dir, m.epoch, &m.public_key)?
        .with_context(|| format!("key epoch {} is not in threshold mode", m.epoch))?;
    let pool = HolderPool::new(holders, None)?;
    retire(&pool, m.epoch, current.generation).await
}
