//! The `psi.v1.KeyHolder` gRPC service: a holder evaluates `k_i * B` for
//! the callers it lists (serving replicas, the encoding side), checks each
//! request against its own policy (per-institution rate, daily cap, modes,
//! purposes), and records every evaluation in its own audit trail before
//! answering. It never sees a record, a tag or `H(x)`: only blinded
//! elements.

use std::collections::BTreeMap;
use std::sync::Arc;

use psi_core::threshold::{Committee, Partial};
use psi_core::{Mode, Server};
use psi_proto::v1::key_holder_server::KeyHolder;
use psi_proto::v1::{GetHolderInfoRequest, HolderInfo, PartialEvaluateRequest, PartialEvaluation};
use psi_proto::{committee_to_proto, partial_to_proto, unpack_blinded};
use rand_core::OsRng;
use tonic::{Request, Response, Status};

use crate::serving::audit::{AuditLog, Entry};
use crate::serving::error::ServiceError;
use crate::serving::policy::Enforcer;
use crate::serving::service::is_valid_purpose;

/// One epoch's share, as a VOPRF server, with its committee.
#[derive(Debug)]
pub struct EpochShare {
    /// The holder's index.
    pub index: u16,
    /// The share as a key.
    pub server: Server,
    /// The committee's public data.
    pub committee: Committee,
}

/// The holder's state.
#[derive(Debug)]
pub struct HolderState {
    /// Shares by epoch.
    pub shares: BTreeMap<u64, Arc<EpochShare>>,
    /// Callers (client-certificate common names) allowed; under mutual TLS
    /// no other is answered.
    pub callers: Vec<String>,
    /// Whether callers authenticate with certificates.
    pub mutual_tls: bool,
    /// The holder's audit trail.
    pub audit: AuditLog,
    /// The holder's quotas.
    pub enforcer: Arc<Enforcer>,
    /// Most elements per request.
    pub max_batch: usize,
}

/// The service.
#[derive(Debug, Clone)]
pub struct HolderService {
    state: Arc<HolderState>,
}

/// Modes a caller may name.
const MODES: [&str; 4] = ["sync", "bucket", "pir", "encode"];

impl HolderService {
    /// A service over `state`.
    #[must_use]
    pub fn new(state: Arc<HolderState>) -> Self {
        Self { state }
    }

    fn caller<T>(&self, request: &Request<T>) -> Result<String, ServiceError> {
        if !self.state.mutual_tls {
            return Ok(crate::serving::service::LOCAL_INSTITUTION.to_string());
        }
        let certs = request.peer_certs().ok_or(ServiceError::Unauthenticated)?;
        let leaf = certs.first().ok_or(ServiceError::Unauthenticated)?;
        let name =
            crate::tools::ca::institution_of(leaf).map_err(|_| ServiceError::Unauthenticated)?;
        if !self.state.callers.contains(&name) {
            return Err(ServiceError::PermissionDenied(format!(
                "`{name}` is not among this key holder's callers (--callers)"
            )));
        }
        Ok(name)
    }

    fn epoch(&self, epoch: u64) -> Result<Arc<EpochShare>, ServiceError> {
        self.state.shares.get(&epoch).cloned().ok_or_else(|| {
            ServiceError::InvalidArgument(format!(
                "this key holder holds no share of epoch {epoch} (it holds {:?})",
                self.state.shares.keys().collect::<Vec<_>>()
            ))
        })
    }

    async fn partial_inner(
        &self,
        req: PartialEvaluateRequest,
    ) -> Result<PartialEvaluation, ServiceError> {
        let share = self.epoch(req.key_epoch)?;
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
        Ok(partial_to_proto(&Partial {
            index: share.index,
            elements: evaluation.elements,
            proof,
        }))
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
        self.caller(&request)?;
        let (epoch, share) = self
            .state
            .shares
            .iter()
            .next_back()
            .ok_or(ServiceError::Loading)?;
        Ok(Response::new(HolderInfo {
            key_epoch: *epoch,
            holder_index: u32::from(share.index),
            public_key: share.committee.public_key().to_bytes().to_vec(),
            committee: Some(committee_to_proto(&share.committee)),
        }))
    }

    async fn partial_evaluate(
        &self,
        request: Request<PartialEvaluateRequest>,
    ) -> Result<Response<PartialEvaluation>, Status> {
        let caller = self.caller(&request);
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
}

/// The share of each epoch in `dir`, with its committee, checked: the
/// share's public share must be its index's in the committee.
///
/// # Errors
/// No share, a damaged file, or a share that is not the committee's.
pub fn load_shares(dir: &std::path::Path) -> anyhow::Result<BTreeMap<u64, Arc<EpochShare>>> {
    use anyhow::Context;
    let mut out = BTreeMap::new();
    for epoch in super::share::epochs(dir)? {
        let share = super::share::load(dir, epoch)?;
        let committee = crate::store::committee::load(dir, epoch)?.with_context(|| {
            format!(
                "{} has the share of epoch {epoch} but not its committee file",
                dir.display()
            )
        })?;
        if committee.share(share.index()) != Some(&share.public_share()) {
            anyhow::bail!(
                "the share of epoch {epoch} in {} is not holder {}'s in its committee",
                dir.display(),
                share.index()
            );
        }
        let index = share.index();
        out.insert(
            epoch,
            Arc::new(EpochShare {
                index,
                server: Server::new(Mode::Voprf, share.into_key()),
                committee,
            }),
        );
    }
    if out.is_empty() {
        anyhow::bail!(
            "{} holds no key share: run `psi-server key split` or `psi-server keyholder dkg` first",
            dir.display()
        );
    }
    Ok(out)
}
