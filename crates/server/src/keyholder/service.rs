//! The `psi.v1.KeyHolder` gRPC service: a holder evaluates `k_i * B` for
//! the callers it lists (serving replicas, the encoding side), checks each
//! request against its own policy (per-institution rate, daily cap, modes,
//! purposes), and records every evaluation in its own audit trail before
//! answering. It never sees a record, a tag or `H(x)`: only blinded
//! elements.
//!
//! The callers it lists as operators may also run its ceremonies: key
//! generation and refresh (`DkgStart`, `DkgDeal`, `DkgFinish`), the
//! endorsement of a next epoch's key (`EndorseCommit`, `EndorseSign`) and
//! the destruction of old shares (`RetireShares`). Each is audited too.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use psi_core::threshold::dkg::{self, Purpose, Round1Package, Round1Secret, Sealed, Session};
use psi_core::threshold::sign::{self, Commitment, Endorsed, Nonces};
use psi_core::threshold::{KeyShare, Partial};
use psi_core::{Mode, PublicKey, Server, ServerKey};
use psi_proto::v1::key_holder_server::KeyHolder;
use psi_proto::v1::{
    DkgDealRequest, DkgDealResponse, DkgFinishRequest, DkgFinishResponse, DkgPackage,
    DkgStartRequest, EndorseCommitRequest, EndorseCommitment, EndorseSignRequest,
    EndorseSignatureShare, GetHolderInfoRequest, HolderInfo, PartialEvaluateRequest,
    PartialEvaluation, RetireSharesRequest, RetireSharesResponse,
};
use psi_proto::{committee_to_proto, partial_to_proto, unpack_blinded};
use rand_core::OsRng;
use tonic::{Request, Response, Status};

use crate::keyholder::ceremony::{
    commitment_from_proto, endorsed_from_proto, package_from_proto, package_to_proto,
    sealed_from_proto, sealed_to_proto, session_from_proto,
};
use crate::keyholder::share;
use crate::serving::audit::{AuditLog, Entry};
use crate::serving::error::ServiceError;
use crate::serving::policy::Enforcer;
use crate::serving::service::is_valid_purpose;
use crate::store::committee::{self, Sharing};

/// How long a ceremony's secret state is kept between its rounds.
const CEREMONY_TTL: Duration = Duration::from_secs(600);
/// Ceremonies (key generations, refreshes, endorsements) open at once.
const MAX_CEREMONIES: usize = 8;

/// One epoch's share in one generation, as a VOPRF server, with its
/// committee.
#[derive(Debug)]
pub struct EpochShare {
    /// The holder's index.
    pub index: u16,
    /// The share as a key.
    pub server: Server,
    /// The sharing's public data.
    pub sharing: Sharing,
}

/// This holder's identity and the committee's, for key generation.
#[derive(Debug)]
pub struct Identity {
    /// Its index in the committee.
    pub index: u16,
    /// Its identity key.
    pub key: ServerKey,
    /// Every holder's identity, holder 1 first.
    pub holders: Vec<PublicKey>,
}

enum Ceremony {
    Dkg(Round1Secret, Session, u64, u32),
    Endorse(Nonces, Endorsed),
}

/// The holder's state.
pub struct HolderState {
    /// The holder's directory.
    pub dir: PathBuf,
    /// Shares by (epoch, generation).
    pub shares: RwLock<BTreeMap<(u64, u32), Arc<EpochShare>>>,
    /// For ceremonies; `None` when the holder has no identity.
    pub identity: Option<Identity>,
    /// Callers (client-certificate common names) allowed to ask for
    /// evaluations; under mutual TLS no other is answered.
    pub callers: Vec<String>,
    /// Callers allowed to run ceremonies and retire shares.
    pub operators: Vec<String>,
    /// Whether callers authenticate with certificates.
    pub mutual_tls: bool,
    /// The holder's audit trail.
    pub audit: AuditLog,
    /// The holder's quotas.
    pub enforcer: Arc<Enforcer>,
    /// Most elements per request.
    pub max_batch: usize,
    ceremonies: Mutex<HashMap<Vec<u8>, (Instant, Ceremony)>>,
}

impl std::fmt::Debug for HolderState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HolderState")
            .field("dir", &self.dir)
            .field("callers", &self.callers)
            .field("operators", &self.operators)
            .finish_non_exhaustive()
    }
}

impl HolderState {
    /// A holder's state.
    #[must_use]
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        dir: PathBuf,
        shares: BTreeMap<(u64, u32), Arc<EpochShare>>,
        identity: Option<Identity>,
        callers: Vec<String>,
        operators: Vec<String>,
        mutual_tls: bool,
        audit: AuditLog,
        enforcer: Arc<Enforcer>,
        max_batch: usize,
    ) -> Self {
        Self {
            dir,
            shares: RwLock::new(shares),
            identity,
            callers,
            operators,
            mutual_tls,
            audit,
            enforcer,
            max_batch,
            ceremonies: Mutex::new(HashMap::new()),
        }
    }

    fn shares(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<(u64, u32), Arc<EpochShare>>> {
        self.shares
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The service.
#[derive(Debug, Clone)]
pub struct HolderService {
    state: Arc<HolderState>,
}

/// Modes a caller may name.
const MODES: [&str; 4] = ["sync", "bucket", "pir", "encode"];

/// Who may call what.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Caller,
    Operator,
}

impl HolderService {
    /// A service over `state`.
    #[must_use]
    pub fn new(state: Arc<HolderState>) -> Self {
        Self { state }
    }

    fn caller<T>(&self, request: &Request<T>, role: Role) -> Result<String, ServiceError> {
        if !self.state.mutual_tls {
            return Ok(crate::serving::service::LOCAL_INSTITUTION.to_string());
        }
        let certs = request.peer_certs().ok_or(ServiceError::Unauthenticated)?;
        let leaf = certs.first().ok_or(ServiceError::Unauthenticated)?;
        let name =
            crate::tools::ca::institution_of(leaf).map_err(|_| ServiceError::Unauthenticated)?;
        let (list, flag) = match role {
            Role::Caller => (&self.state.callers, "--callers"),
            Role::Operator => (&self.state.operators, "--operators"),
        };
        if !list.contains(&name) {
            return Err(ServiceError::PermissionDenied(format!(
                "`{name}` is not among this key holder's {flag}"
            )));
        }
        Ok(name)
    }

    fn share_of(&self, epoch: u64, generation: u32) -> Result<Arc<EpochShare>, ServiceError> {
        let shares = self.state.shares();
        shares.get(&(epoch, generation)).cloned().ok_or_else(|| {
            ServiceError::InvalidArgument(format!(
                "this key holder holds no share of epoch {epoch}, generation {generation} (it holds {:?})",
                shares.keys().collect::<Vec<_>>()
            ))
        })
    }

    /// The newest generation held of `epoch`.
    fn newest_of(&self, epoch: u64) -> Option<Arc<EpochShare>> {
        self.state
            .shares()
            .range((epoch, 0)..=(epoch, u32::MAX))
            .next_back()
            .map(|(_, s)| Arc::clone(s))
    }

    async fn partial_inner(
        &self,
        req: PartialEvaluateRequest,
    ) -> Result<PartialEvaluation, ServiceError> {
        let share = self.share_of(req.key_epoch, req.generation)?;
        let blinded = unpack_blinded(&req.blinded_elements)?;
        if blinded.is_empty() || blinded.len() > self.state.max_batch {
            return Err(ServiceError::InvalidArgument(format!(
                "a batch of {} elements; a key holder takes 1 to max_batch = {}",
                blinded.len(),
                self.state.max_batch
            )));
        }
        self.state
            .enforcer
            .admit(
                &req.institution,
                &req.mode,
                &req.purpose,
                blinded.len() as u64,
            )
            .await?;
        let work = Arc::clone(&share);
        let (tx, rx) = tokio::sync::oneshot::channel();
        rayon::spawn(move || {
            let _ = tx.send(work.server.blind_evaluate(&blinded, &mut OsRng));
        });
        let evaluation = rx.await.map_err(|_| ServiceError::Internal)??;
        let proof = evaluation.proof.ok_or(ServiceError::Internal)?;
        Ok(partial_to_proto(
            &Partial {
                index: share.index,
                elements: evaluation.elements,
                proof,
            },
            req.generation,
        ))
    }

    /// Records a ceremony step in the audit trail (before its answer
    /// leaves).
    async fn audited<T>(
        &self,
        caller: &Result<String, ServiceError>,
        method: &str,
        epoch: u64,
        result: Result<T, ServiceError>,
    ) -> Result<Response<T>, Status> {
        let who = caller.as_deref().unwrap_or("unauthenticated");
        let mut entry = Entry::now(who, "key-ceremony", method, "ceremony");
        entry.key_epoch = epoch;
        entry.outcome = match &result {
            Ok(_) => "ok".to_string(),
            Err(e) => format!("{:?}", e.code()),
        };
        if let Err(e) = self.state.audit.append(entry).await {
            tracing::error!("{method} withheld: {e:#}");
            return Err(ServiceError::Unavailable(
                "the key holder's audit trail cannot record this now".into(),
            )
            .into());
        }
        match &result {
            Ok(_) => tracing::info!(method, epoch, "key ceremony step"),
            Err(e) => tracing::warn!(method, epoch, outcome = %e, "key ceremony step refused"),
        }
        result.map(Response::new).map_err(Status::from)
    }

    fn identity(&self) -> Result<&Identity, ServiceError> {
        self.state.identity.as_ref().ok_or_else(|| {
            ServiceError::InvalidArgument(
                "this key holder has no identity for key generation (psi-server keyholder init, and holders.txt in its directory)".into(),
            )
        })
    }

    /// Opens a ceremony under `id`, closing expired ones.
    fn open(&self, id: &[u8], ceremony: Ceremony) -> Result<(), ServiceError> {
        let mut all = self
            .state
            .ceremonies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        all.retain(|_, (at, _)| at.elapsed() < CEREMONY_TTL);
        if all.len() >= MAX_CEREMONIES || all.contains_key(id) {
            return Err(ServiceError::QuotaExhausted {
                what: format!("{MAX_CEREMONIES} key ceremonies at once, each id once"),
                retry_after: Duration::from_secs(5),
            });
        }
        all.insert(id.to_vec(), (Instant::now(), ceremony));
        Ok(())
    }

    fn take(&self, id: &[u8]) -> Result<Ceremony, ServiceError> {
        self.state
            .ceremonies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(id)
            .filter(|(at, _)| at.elapsed() < CEREMONY_TTL)
            .map(|(_, c)| c)
            .ok_or_else(|| {
                ServiceError::InvalidArgument(
                    "no such key ceremony open here (expired, finished, or never started)".into(),
                )
            })
    }

    fn put_back(&self, id: &[u8], ceremony: Ceremony) {
        self.state
            .ceremonies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id.to_vec(), (Instant::now(), ceremony));
    }

    fn dkg_start_inner(&self, req: DkgStartRequest) -> Result<(DkgPackage, u64), ServiceError> {
        let id = self.identity()?;
        let proto = req
            .session
            .ok_or_else(|| ServiceError::InvalidArgument("no session".into()))?;
        let (session, epoch, generation) = session_from_proto(&proto)?;
        if usize::from(session.holders) != id.holders.len() {
            return Err(ServiceError::InvalidArgument(format!(
                "the session has {} holders; this holder's holders.txt lists {}",
                session.holders,
                id.holders.len()
            )));
        }
        let held: Vec<(u64, u32)> = self.state.shares().keys().copied().collect();
        match session.purpose {
            Purpose::NewKey => {
                if held.iter().any(|(e, _)| *e >= epoch) {
                    return Err(ServiceError::InvalidArgument(format!(
                        "this holder already holds a share of epoch {epoch} or later: a new key is for a new epoch"
                    )));
                }
            }
            Purpose::Refresh => {
                let current = self.newest_of(epoch).ok_or_else(|| {
                    ServiceError::InvalidArgument(format!("no share of epoch {epoch} to refresh"))
                })?;
                if generation != current.sharing.generation + 1
                    || current.sharing.committee.threshold() != session.threshold
                    || current.sharing.committee.shares().len() != usize::from(session.holders)
                {
                    return Err(ServiceError::InvalidArgument(format!(
                        "a refresh of epoch {epoch} makes generation {} of the same committee",
                        current.sharing.generation + 1
                    )));
                }
            }
        }
        let (secret, package) = dkg::start(&session, id.index, &id.key, &mut OsRng)?;
        self.open(&proto.id, Ceremony::Dkg(secret, session, epoch, generation))?;
        Ok((package_to_proto(&package), epoch))
    }

    fn dkg_deal_inner(&self, req: DkgDealRequest) -> Result<(DkgDealResponse, u64), ServiceError> {
        let id = self.identity()?;
        let ceremony = self.take(&req.session_id)?;
        let Ceremony::Dkg(secret, session, epoch, generation) = ceremony else {
            return Err(ServiceError::InvalidArgument("not a key generation".into()));
        };
        let packages = req
            .packages
            .iter()
            .map(package_from_proto)
            .collect::<Result<Vec<_>, _>>();
        let sealed = packages.and_then(|p| Ok(dkg::seal(&secret, &id.holders, &p)?));
        self.put_back(
            &req.session_id,
            Ceremony::Dkg(secret, session, epoch, generation),
        );
        Ok((
            DkgDealResponse {
                shares: sealed?.iter().map(sealed_to_proto).collect(),
            },
            epoch,
        ))
    }

    fn dkg_finish_inner(
        &self,
        req: DkgFinishRequest,
    ) -> Result<(DkgFinishResponse, u64), ServiceError> {
        let id = self.identity()?;
        let Ceremony::Dkg(secret, session, epoch, generation) = self.take(&req.session_id)? else {
            return Err(ServiceError::InvalidArgument("not a key generation".into()));
        };
        let packages: Vec<Round1Package> = req
            .packages
            .iter()
            .map(package_from_proto)
            .collect::<Result<_, _>>()?;
        let sealed: Vec<Sealed> = req
            .shares
            .iter()
            .map(sealed_from_proto)
            .collect::<Result<_, _>>()?;
        let (share, committee) = match session.purpose {
            Purpose::NewKey => dkg::finish(&secret, &id.holders, &packages, &sealed)?,
            Purpose::Refresh => {
                let current = self.newest_of(epoch).ok_or(ServiceError::Internal)?;
                let old = share::load(&self.state.dir, epoch, current.sharing.generation).map_err(
                    |e| ServiceError::Unavailable(format!("reading the current share: {e:#}")),
                )?;
                dkg::refresh(
                    &secret,
                    &id.holders,
                    &packages,
                    &sealed,
                    &old,
                    &current.sharing.committee,
                )?
            }
        };
        let sharing = Sharing {
            generation,
            committee,
        };
        self.install(epoch, share, &sharing)?;
        Ok((
            DkgFinishResponse {
                key_epoch: epoch,
                public_key: sharing.committee.public_key().to_bytes().to_vec(),
                committee: Some(committee_to_proto(&sharing.committee, generation)),
            },
            epoch,
        ))
    }

    /// Writes a new share and its committee, then serves it. The committee
    /// goes first: a crash between the two leaves a committee file without
    /// a share (ignored at load), never a share without its committee
    /// (which would stop the holder from starting).
    fn install(&self, epoch: u64, share: KeyShare, sharing: &Sharing) -> Result<(), ServiceError> {
        let dir = &self.state.dir;
        let written = committee::store_at(
            &committee::path_of(dir, epoch, sharing.generation),
            epoch,
            sharing,
        )
        .and_then(|()| share::store(dir, epoch, sharing.generation, &share));
        if let Err(e) = written {
            tracing::error!("writing a new share: {e:#}");
            return Err(ServiceError::Internal);
        }
        let index = share.index();
        self.state
            .shares
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(
                (epoch, sharing.generation),
                Arc::new(EpochShare {
                    index,
                    server: Server::new(Mode::Voprf, share.into_key()),
                    sharing: sharing.clone(),
                }),
            );
        Ok(())
    }

    /// A holder endorses only the key of a DKG it took part in: it must
    /// hold a share of the new epoch, under that public key.
    fn check_endorsable(&self, message: &Endorsed) -> Result<Arc<EpochShare>, ServiceError> {
        let new = self.newest_of(message.new_epoch).ok_or_else(|| {
            ServiceError::PermissionDenied(format!(
                "this holder holds no share of epoch {}: it endorses only keys it helped make",
                message.new_epoch
            ))
        })?;
        if *new.sharing.committee.public_key() != message.new_key
            || message.new_epoch <= message.old_epoch
        {
            return Err(ServiceError::PermissionDenied(
                "the key to endorse is not the one this holder holds a share of".into(),
            ));
        }
        self.newest_of(message.old_epoch).ok_or_else(|| {
            ServiceError::InvalidArgument(format!(
                "this holder holds no share of epoch {} to endorse with",
                message.old_epoch
            ))
        })
    }

    /// The share of the signing epoch, read from its file.
    fn signing_share(&self, old: &EpochShare, epoch: u64) -> Result<KeyShare, ServiceError> {
        share::load(&self.state.dir, epoch, old.sharing.generation).map_err(|e| {
            ServiceError::Unavailable(format!("reading the share of epoch {epoch}: {e:#}"))
        })
    }

    fn endorse_commit_inner(
        &self,
        req: EndorseCommitRequest,
    ) -> Result<(EndorseCommitment, u64), ServiceError> {
        let message = endorsed_from_proto(req.message.as_ref())?;
        let old = self.check_endorsable(&message)?;
        let share = self.signing_share(&old, message.old_epoch)?;
        let (nonces, c) = sign::commit(&share, &mut OsRng);
        self.open(&req.session_id, Ceremony::Endorse(nonces, message))?;
        Ok((
            EndorseCommitment {
                holder_index: u32::from(c.index),
                hiding: c.hiding.to_vec(),
                binding: c.binding.to_vec(),
            },
            message.old_epoch,
        ))
    }

    fn endorse_sign_inner(
        &self,
        req: EndorseSignRequest,
    ) -> Result<(EndorseSignatureShare, u64), ServiceError> {
        let message = endorsed_from_proto(req.message.as_ref())?;
        let Ceremony::Endorse(nonces, committed) = self.take(&req.session_id)? else {
            return Err(ServiceError::InvalidArgument("not an endorsement".into()));
        };
        if committed != message {
            return Err(ServiceError::InvalidArgument(
                "the message differs from the one committed to".into(),
            ));
        }
        let old = self.check_endorsable(&message)?;
        let share = self.signing_share(&old, message.old_epoch)?;
        let commitments: Vec<Commitment> = req
            .commitments
            .iter()
            .map(commitment_from_proto)
            .collect::<Result<_, _>>()?;
        let z = sign::sign(
            &share,
            nonces,
            &old.sharing.committee,
            &message,
            &commitments,
        )?;
        Ok((
            EndorseSignatureShare {
                holder_index: u32::from(z.index),
                z: z.z.to_vec(),
            },
            message.old_epoch,
        ))
    }

    fn retire_inner(
        &self,
        req: &RetireSharesRequest,
    ) -> Result<RetireSharesResponse, ServiceError> {
        let keep = (req.key_epoch, req.generation);
        let mut shares = self
            .state
            .shares
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !shares.contains_key(&keep) {
            return Err(ServiceError::InvalidArgument(format!(
                "this holder holds no share of epoch {}, generation {}: it keeps what it has",
                req.key_epoch, req.generation
            )));
        }
        let old: Vec<(u64, u32)> = shares.range(..keep).map(|(k, _)| *k).collect();
        let mut destroyed = Vec::new();
        for (e, g) in old {
            if let Err(err) = share::destroy(&self.state.dir, e, g) {
                tracing::error!("destroying the share of epoch {e}, generation {g}: {err:#}");
                return Err(ServiceError::Internal);
            }
            shares.remove(&(e, g));
            destroyed.push(format!("{e}.{g}"));
        }
        Ok(RetireSharesResponse { destroyed })
    }
}

/// The refusal of a caller whose check failed (the check's error is kept
/// for the audit record).
fn refused(e: &ServiceError) -> ServiceError {
    match e {
        ServiceError::Unauthenticated => ServiceError::Unauthenticated,
        other => ServiceError::PermissionDenied(other.to_string()),
    }
}

fn valid_id(s: &str) -> bool {
    crate::tools::ca::is_valid_institution(s)
}

#[tonic::async_trait]
impl KeyHolder for HolderService {
    async fn get_holder_info(
        &self,
        request: Request<GetHolderInfoRequest>,
    ) -> Result<Response<HolderInfo>, Status> {
        self.caller(&request, Role::Caller)
            .or_else(|_| self.caller(&request, Role::Operator))?;
        let shares = self.state.shares();
        let ((epoch, _), share) = shares.iter().next_back().ok_or(ServiceError::Loading)?;
        Ok(Response::new(HolderInfo {
            key_epoch: *epoch,
            holder_index: u32::from(share.index),
            public_key: share.sharing.committee.public_key().to_bytes().to_vec(),
            committee: Some(committee_to_proto(
                &share.sharing.committee,
                share.sharing.generation,
            )),
        }))
    }

    async fn partial_evaluate(
        &self,
        request: Request<PartialEvaluateRequest>,
    ) -> Result<Response<PartialEvaluation>, Status> {
        let caller = self.caller(&request, Role::Caller);
        let req = request.into_inner();
        let elements = (req.blinded_elements.len() / 32) as u64;
        let mut entry = Entry::now(
            &req.institution,
            &req.purpose,
            &format!(
                "PartialEvaluate via {}",
                caller.as_deref().unwrap_or("unauthenticated")
            ),
            &req.mode,
        );
        entry.elements = elements;
        entry.key_epoch = req.key_epoch;
        if req.request_id.len() == 32 && req.request_id.bytes().all(|b| b.is_ascii_hexdigit()) {
            entry.request_id.clone_from(&req.request_id);
        }
        let result = match caller {
            Err(e) => Err(e),
            Ok(_) if !valid_id(&req.institution) => Err(ServiceError::InvalidArgument(
                "institution: 1 to 64 of A-Z a-z 0-9 . _ -".into(),
            )),
            Ok(_) if !is_valid_purpose(&req.purpose) => Err(ServiceError::InvalidArgument(
                "purpose: 1 to 32 of a-z 0-9 _ -".into(),
            )),
            Ok(_) if !MODES.contains(&req.mode.as_str()) => Err(ServiceError::InvalidArgument(
                format!("mode: one of {}", MODES.join(", ")),
            )),
            Ok(_) => self.partial_inner(req).await,
        };
        entry.outcome = match &result {
            Ok(_) => "ok".to_string(),
            Err(e) => format!("{:?}", e.code()),
        };
        let request_id = entry.request_id.clone();
        // No answer leaves before its record is durable.
        if let Err(e) = self.state.audit.append(entry).await {
            tracing::error!(%request_id, "answer withheld: {e:#}");
            return Err(ServiceError::Unavailable(
                "the key holder's audit trail cannot record this request now".into(),
            )
            .into());
        }
        match &result {
            Ok(_) => tracing::info!(%request_id, elements, "partial evaluation"),
            Err(e) => {
                tracing::warn!(%request_id, elements, outcome = %e, "partial evaluation refused")
            }
        }
        result.map(Response::new).map_err(Status::from)
    }

    async fn dkg_start(
        &self,
        request: Request<DkgStartRequest>,
    ) -> Result<Response<DkgPackage>, Status> {
        let caller = self.caller(&request, Role::Operator);
        let result = match &caller {
            Ok(_) => self.dkg_start_inner(request.into_inner()),
            Err(e) => Err(refused(e)),
        };
        let epoch = result.as_ref().map_or(0, |(_, e)| *e);
        self.audited(&caller, "DkgStart", epoch, result.map(|(p, _)| p))
            .await
    }

    async fn dkg_deal(
        &self,
        request: Request<DkgDealRequest>,
    ) -> Result<Response<DkgDealResponse>, Status> {
        let caller = self.caller(&request, Role::Operator);
        let result = match &caller {
            Ok(_) => self.dkg_deal_inner(request.into_inner()),
            Err(e) => Err(refused(e)),
        };
        let epoch = result.as_ref().map_or(0, |(_, e)| *e);
        self.audited(&caller, "DkgDeal", epoch, result.map(|(p, _)| p))
            .await
    }

    async fn dkg_finish(
        &self,
        request: Request<DkgFinishRequest>,
    ) -> Result<Response<DkgFinishResponse>, Status> {
        let caller = self.caller(&request, Role::Operator);
        let result = match &caller {
            Ok(_) => self.dkg_finish_inner(request.into_inner()),
            Err(e) => Err(refused(e)),
        };
        let epoch = result.as_ref().map_or(0, |(_, e)| *e);
        self.audited(&caller, "DkgFinish", epoch, result.map(|(p, _)| p))
            .await
    }

    async fn endorse_commit(
        &self,
        request: Request<EndorseCommitRequest>,
    ) -> Result<Response<EndorseCommitment>, Status> {
        let caller = self.caller(&request, Role::Operator);
        let result = match &caller {
            Ok(_) => self.endorse_commit_inner(request.into_inner()),
            Err(e) => Err(refused(e)),
        };
        let epoch = result.as_ref().map_or(0, |(_, e)| *e);
        self.audited(&caller, "EndorseCommit", epoch, result.map(|(p, _)| p))
            .await
    }

    async fn endorse_sign(
        &self,
        request: Request<EndorseSignRequest>,
    ) -> Result<Response<EndorseSignatureShare>, Status> {
        let caller = self.caller(&request, Role::Operator);
        let result = match &caller {
            Ok(_) => self.endorse_sign_inner(request.into_inner()),
            Err(e) => Err(refused(e)),
        };
        let epoch = result.as_ref().map_or(0, |(_, e)| *e);
        self.audited(&caller, "EndorseSign", epoch, result.map(|(p, _)| p))
            .await
    }

    async fn retire_shares(
        &self,
        request: Request<RetireSharesRequest>,
    ) -> Result<Response<RetireSharesResponse>, Status> {
        let caller = self.caller(&request, Role::Operator);
        let req = request.into_inner();
        let result = match &caller {
            Ok(_) => self.retire_inner(&req),
            Err(e) => Err(refused(e)),
        };
        self.audited(&caller, "RetireShares", req.key_epoch, result)
            .await
    }
}

/// Every share in `dir`, with its committee, checked: the share's public
/// share must be its index's in the committee of its generation.
///
/// # Errors
/// No share, a damaged file, or a share that is not its committee's.
pub fn load_shares(dir: &std::path::Path) -> anyhow::Result<BTreeMap<(u64, u32), Arc<EpochShare>>> {
    use anyhow::Context;
    let mut out = BTreeMap::new();
    for (epoch, generation) in share::held(dir)? {
        let share = share::load(dir, epoch, generation)?;
        let sharing = committee::load_at(&committee::path_of(dir, epoch, generation), epoch)?
            .with_context(|| {
                format!(
                    "{} has the share of epoch {epoch}, generation {generation}, but not its committee file",
                    dir.display()
                )
            })?;
        if sharing.generation != generation
            || sharing.committee.share(share.index()) != Some(&share.public_share())
        {
            anyhow::bail!(
                "the share of epoch {epoch}, generation {generation}, in {} is not holder {}'s in its committee",
                dir.display(),
                share.index()
            );
        }
        let index = share.index();
        out.insert(
            (epoch, generation),
            Arc::new(EpochShare {
                index,
                server: Server::new(Mode::Voprf, share.into_key()),
                sharing,
            }),
        );
    }
    Ok(out)
}

/// The holder's identity, when it has one: its key and `holders.txt`, in
/// which it finds its own index.
///
/// # Errors
/// An identity without `holders.txt`, or not listed in it; damaged files.
pub fn load_identity(dir: &std::path::Path) -> anyhow::Result<Option<Identity>> {
    use crate::keyholder::identity;
    if !identity::path(dir).exists() {
        return Ok(None);
    }
    let key = identity::load(dir)?;
    let holders = identity::load_holders(&dir.join(identity::HOLDERS_FILE))?;
    let index = holders
        .iter()
        .position(|h| h == key.public_key())
        .and_then(|i| u16::try_from(i + 1).ok())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "this holder's identity {} is not in {}",
                key.public_key().to_hex(),
                dir.join(identity::HOLDERS_FILE).display()
            )
        })?;
    Ok(Some(Identity {
        index,
        key,
        holders,
    }))
}
