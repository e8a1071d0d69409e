//! The `psi.v1.Match` gRPC service. Handlers decode, call psi-core or the
//! snapshot, and encode; the elliptic-curve work runs on the rayon pool, not
//! on the async runtime's threads.

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};

use psi_core::suite::SUITE_ID;
use psi_core::BlindedElement;
use psi_proto::v1::match_server::Match;
use psi_proto::v1::{
    sync_tag_set_response, Bucket, BucketQueryRequest, BucketQueryResponse, EvaluateRequest,
    EvaluateResponse, GetServerInfoRequest, KeyStep, PartialEvaluation, PirInfo, PirQueryRequest,
    PirQueryResponse, PirSetupRequest, PirSetupResponse, QueryMode, ServerInfo, ShardData,
    SyncTagSetRequest, SyncTagSetResponse, TagSetDelta,
};
use psi_proto::{
    committee_to_proto, delta_parts, in_bitmap, manifest_in_parts, pack, pack_tags,
    partial_to_proto, root_only_manifest, unpack_blinded,
};
use rand_core::OsRng;
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

use crate::keyholder::pool::{HolderPool, OnBehalf};
use crate::serving::audit::{AuditLog, Entry};
use crate::serving::error::ServiceError;
use crate::serving::policy::Enforcer;
use crate::serving::snapshot::{Evaluator, Snapshot};

pub use psi_proto::{is_valid_purpose, PURPOSE_HEADER};

/// Request size limits, stated in `ServerInfo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Elements per `Evaluate` request.
    pub max_batch: usize,
    /// Elements per `BucketQuery` request.
    pub max_bucket_batch: usize,
    /// Largest message, in bytes.
    pub max_message_bytes: usize,
    /// Requests one institution may have in flight at once.
    pub max_concurrent_per_institution: usize,
    /// Elements per `PirQuery` request (each costs a pass over the PIR
    /// database).
    pub pir_max_batch: usize,
    /// `PirQuery` requests admitted at once, server-wide (their queries
    /// wait for passes, one pass at a time, shared: `pir::Passes`); more
    /// are refused with RESOURCE_EXHAUSTED and a retry delay.
    pub pir_max_concurrent: usize,
    /// Bytes of institutions' PIR public parameters kept (least recently
    /// used evicted first).
    pub pir_keys_cache_bytes: usize,
    /// Largest PIR database built; a registry that needs more serves
    /// without PIR mode. 0: no PIR mode.
    pub pir_max_database_bytes: usize,
    /// Which PIR scheme serves (`auto`: the smaller database).
    pub pir_scheme: psi_pir::SchemeChoice,
    /// At least `2^tagset_min_shard_bits` shards in the sync tag set (0:
    /// by the registry's size; at most 20).
    pub tagset_min_shard_bits: u8,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_batch: 4096,
            max_bucket_batch: 64,
            max_message_bytes: 16 << 20,
            max_concurrent_per_institution: 16,
            pir_max_batch: 4,
            pir_max_concurrent: 8,
            pir_keys_cache_bytes: 1 << 30,
            pir_max_database_bytes: 4 << 30,
            pir_scheme: psi_pir::SchemeChoice::Auto,
            tagset_min_shard_bits: 0,
        }
    }
}

/// Shared state: the current snapshot (absent while loading), the limits,
/// and whether clients authenticate with certificates.
#[derive(Debug)]
pub struct State {
    snapshot: RwLock<Option<Arc<Snapshot>>>,
    limits: Limits,
    mutual_tls: bool,
    audit: AuditLog,
    enforcer: Arc<Enforcer>,
    metrics: Arc<crate::serving::metrics::Metrics>,
    in_flight: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Semaphore>>>,
    pir_keys: crate::serving::pir::KeysCache,
    pir_slots: Arc<tokio::sync::Semaphore>,
    passes: Arc<crate::serving::pir::Passes>,
    holders: Option<Arc<HolderPool>>,
}

/// The institution of a plaintext (loopback) connection.
pub const LOCAL_INSTITUTION: &str = "local";

impl State {
    /// A state with no snapshot yet. With `mutual_tls`, every request must
    /// carry a client certificate naming an institution.
    #[must_use]
    pub fn new(
        limits: Limits,
        mutual_tls: bool,
        audit: AuditLog,
        enforcer: Arc<Enforcer>,
        metrics: Arc<crate::serving::metrics::Metrics>,
    ) -> Self {
        Self {
            snapshot: RwLock::new(None),
            limits,
            mutual_tls,
            audit,
            enforcer,
            metrics: Arc::clone(&metrics),
            in_flight: std::sync::Mutex::new(std::collections::HashMap::new()),
            pir_keys: crate::serving::pir::KeysCache::new(limits.pir_keys_cache_bytes),
            pir_slots: Arc::new(tokio::sync::Semaphore::new(limits.pir_max_concurrent)),
            passes: Arc::new(crate::serving::pir::Passes::new(metrics.clone())),
            holders: None,
        }
    }

    /// The same state, asking `holders` for evaluations of a threshold-mode
    /// snapshot.
    #[must_use]
    pub fn with_holders(mut self, holders: Option<Arc<HolderPool>>) -> Self {
        self.holders = holders;
        self
    }

    /// A slot among the institution's concurrent requests, or a refusal.
    pub(crate) fn slot(
        &self,
        institution: &str,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, ServiceError> {
        let limit = self.limits.max_concurrent_per_institution;
        let semaphore = Arc::clone(
            self.in_flight
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .entry(institution.to_string())
                .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(limit))),
        );
        semaphore
            .try_acquire_owned()
            .map_err(|_| ServiceError::QuotaExhausted {
                what: format!("{limit} concurrent requests per institution"),
                retry_after: std::time::Duration::from_millis(200),
            })
    }

    /// Publishes a snapshot; requests already running keep the one they started with.
    pub fn publish(&self, snapshot: Snapshot) {
        let mut guard = self
            .snapshot
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *guard = Some(Arc::new(snapshot));
    }

    /// The key epoch being served.
    ///
    /// # Errors
    /// Unavailable while no snapshot is loaded.
    pub fn current_epoch(&self) -> Result<u64, ServiceError> {
        self.current().map(|s| s.epoch)
    }

    /// The snapshot being served, if one is loaded.
    #[must_use]
    pub fn snapshot(&self) -> Option<Arc<Snapshot>> {
        self.current().ok()
    }

    fn current(&self) -> Result<Arc<Snapshot>, ServiceError> {
        self.snapshot
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .ok_or(ServiceError::Loading)
    }

    /// The registry version being served.
    ///
    /// # Errors
    /// Unavailable while no snapshot is loaded.
    pub fn registry_version(&self) -> Result<u64, ServiceError> {
        self.current().map(|s| s.index.registry_version())
    }

    /// The limits.
    #[must_use]
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The audit trail.
    #[must_use]
    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// The metrics.
    #[must_use]
    pub fn metrics(&self) -> &crate::serving::metrics::Metrics {
        &self.metrics
    }

    /// The metrics, shared.
    #[must_use]
    pub fn metrics_arc(&self) -> Arc<crate::serving::metrics::Metrics> {
        Arc::clone(&self.metrics)
    }

    /// The institution behind a request: its client certificate's common
    /// name under mutual TLS, [`LOCAL_INSTITUTION`] on plaintext loopback.
    ///
    /// # Errors
    /// Unauthenticated under mutual TLS without a usable certificate.
    pub fn institution_of(&self, extensions: &tonic::Extensions) -> Result<String, ServiceError> {
        if !self.mutual_tls {
            return Ok(LOCAL_INSTITUTION.to_string());
        }
        // Set by the admission layer, which read the certificate already.
        if let Some(known) = extensions.get::<crate::serving::admission::Authenticated>() {
            return Ok(known.0.clone());
        }
        let certs = crate::serving::connection::peer_certs(extensions)
            .ok_or(ServiceError::Unauthenticated)?;
        let leaf = certs.first().ok_or(ServiceError::Unauthenticated)?;
        crate::tools::ca::institution_of(leaf).map_err(|_| ServiceError::Unauthenticated)
    }
}

/// The service.
#[derive(Debug, Clone)]
pub struct MatchService {
    state: Arc<State>,
}

tokio::task_local! {
    /// On whose behalf the request runs: what a threshold-mode evaluation
    /// tells the key holders (their audit trails and quotas).
    static ON_BEHALF: OnBehalf;
}

tokio::task_local! {
    /// The key epoch and registry version of the snapshot that answered the
    /// request being accounted (set where a handler takes its snapshot), so
    /// that its audit record names them even when a new version is
    /// published before the record is written.
    static ANSWERED_BY: std::cell::Cell<Option<(u64, u64)>>;
}

impl MatchService {
    /// A service over `state`.
    #[must_use]
    pub fn new(state: Arc<State>) -> Self {
        Self { state }
    }

    /// Who asks and why: the institution and the declared purpose.
    fn caller<T>(&self, request: &Request<T>) -> Caller {
        let note = request
            .extensions()
            .get::<Arc<crate::serving::admission::RequestNote>>()
            .cloned();
        if let Some(note) = &note {
            note.reached();
        }
        let purpose = request
            .metadata()
            .get(PURPOSE_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .filter(|p| is_valid_purpose(p))
            .ok_or_else(|| {
                ServiceError::InvalidArgument(format!(
                    "declare the purpose of the query in the `{PURPOSE_HEADER}` header: 1 to 32 of a-z, 0-9, '_' or '-' (psi-client --purpose CODE)"
                ))
            });
        let commitment = match request.metadata().get(psi_proto::LOG_COMMITMENT_HEADER) {
            None => Ok(String::new()),
            Some(v) => v
                .to_str()
                .ok()
                .filter(|c| c.len() == 64 && c.bytes().all(|b| b.is_ascii_hexdigit()))
                .map(str::to_ascii_lowercase)
                .ok_or_else(|| {
                    ServiceError::InvalidArgument(format!(
                        "`{}` is 64 hex digits (a SHA-256)",
                        psi_proto::LOG_COMMITMENT_HEADER
                    ))
                }),
        };
        let purpose = purpose.and_then(|p| commitment.map(|c| (p, c)));
        Caller {
            institution: self.state.institution_of(request.extensions()),
            purpose,
            note,
        }
    }

    /// Runs `work` for `caller` and records the request in the audit trail;
    /// the answer is released only once its record is durable. (The
    /// institution's concurrency slot was taken by the admission layer,
    /// which holds it until the response, stream included, ends.)
    async fn accounted<T>(
        &self,
        caller: Caller,
        method: &str,
        mode: &str,
        elements: usize,
        work: impl std::future::Future<Output = Result<T, ServiceError>>,
    ) -> Result<T, Status> {
        let received = std::time::Instant::now();
        let mut entry = Entry::now(
            caller.institution.as_deref().unwrap_or("unauthenticated"),
            caller.purpose.as_ref().map_or("", |(p, _)| p.as_str()),
            method,
            mode,
        );
        if let Ok((_, commitment)) = &caller.purpose {
            entry.commitment.clone_from(commitment);
        }
        entry.elements = elements as u64;
        if let Some(note) = &caller.note {
            note.set_elements(entry.elements);
            entry.request_id.clone_from(&note.request_id);
        }
        let on_behalf = OnBehalf {
            institution: entry.institution.clone(),
            purpose: entry.purpose.clone(),
            mode: mode.to_string(),
            request_id: entry.request_id.clone(),
        };
        let (result, answered_by) = ON_BEHALF
            .scope(
                on_behalf,
                ANSWERED_BY.scope(std::cell::Cell::new(None), async {
                    let result = match (caller.institution, caller.purpose) {
                        (Err(e), _) | (_, Err(e)) => Err(e),
                        (Ok(institution), Ok((purpose, _))) => {
                            match self
                                .state
                                .enforcer
                                .admit(&institution, mode, &purpose, elements as u64)
                                .await
                            {
                                Ok(()) => work.await,
                                Err(e) => Err(e),
                            }
                        }
                    };
                    (result, ANSWERED_BY.with(std::cell::Cell::get))
                }),
            )
            .await;
        // Finished after the deadline: not an answer anyone receives.
        let result = match result {
            Ok(_) if caller.note.as_ref().is_some_and(|n| n.past_deadline()) => {
                Err(ServiceError::DeadlineExceeded)
            }
            other => other,
        };
        // The snapshot that answered; for a refusal before any was taken,
        // the one current now.
        let answered_by = answered_by.or_else(|| {
            self.state
                .current()
                .ok()
                .map(|snap| (snap.epoch, snap.index.registry_version()))
        });
        if let Some((epoch, version)) = answered_by {
            entry.key_epoch = epoch;
            entry.registry_version = version;
        }
        entry.outcome = match &result {
            Ok(_) => "ok".to_string(),
            Err(e) => format!("{:?}", e.code()),
        };
        let (institution, request_id, outcome) = (
            entry.institution.clone(),
            entry.request_id.clone(),
            entry.outcome.clone(),
        );
        let audit_started = std::time::Instant::now();
        // From here the record is this handler's to write, even if the
        // request is cancelled while it waits for the write.
        if let Some(note) = &caller.note {
            note.audited();
        }
        let audited = self.state.audit.append(entry).await;
        self.state.metrics.audit_write(audit_started.elapsed());
        self.state.metrics.request(
            method,
            &institution,
            &outcome,
            elements as u64,
            received.elapsed(),
        );
        if let Err(e) = audited {
            tracing::error!(%request_id, "answer withheld: {e:#}");
            // Transient (a database restarting or slow): the client retries.
            return Err(ServiceError::Unavailable(
                "the audit trail cannot record this request now; retry shortly".into(),
            )
            .into());
        }
        match &result {
            Ok(_) => tracing::info!(institution, method, elements, %request_id, "request"),
            Err(e) => {
                tracing::warn!(institution, method, elements, %request_id, outcome = %e, "request refused")
            }
        }
        result.map_err(Status::from)
    }

    fn snapshot_for(&self, epoch: u64) -> Result<Arc<Snapshot>, ServiceError> {
        if epoch == 0 {
            return Err(ServiceError::InvalidArgument(
                "key_epoch is 0: the field is missing; send the key epoch ServerInfo advertises"
                    .into(),
            ));
        }
        let snap = self.state.current()?;
        // Noted for the request's audit record (outside an accounted request,
        // as in unit tests, there is nothing to note it in).
        let _ = ANSWERED_BY.try_with(|a| a.set(Some((snap.epoch, snap.index.registry_version()))));
        if epoch > snap.epoch {
            // A key rotation other replicas have loaded and this one not
            // yet: the client's epoch is right, this replica is behind.
            return Err(ServiceError::Unavailable(format!(
                "key epoch {epoch} is not loaded on this replica yet (it serves epoch {})",
                snap.epoch
            )));
        }
        if epoch != snap.epoch {
            return Err(ServiceError::StaleEpoch {
                client: epoch,
                server: snap.epoch,
            });
        }
        Ok(snap)
    }

    /// Evaluates a blinded batch: with the key (single-key mode), or by
    /// asking `t` key holders (threshold mode, for a client that combines
    /// partial evaluations; others are refused saying why).
    async fn evaluate_blinded(
        &self,
        snap: &Arc<Snapshot>,
        blinded: Vec<BlindedElement>,
        combines_partials: bool,
    ) -> Result<Evaluated, ServiceError> {
        match &snap.evaluator {
            Evaluator::Key(_) => {
                let work = Arc::clone(snap);
                let evaluation = on_cpu(move |stop| match &work.evaluator {
                    Evaluator::Key(server) => server
                        .blind_evaluate_until(&blinded, &mut OsRng, stop)
                        .map_err(ServiceError::from),
                    Evaluator::Holders { .. } => Err(ServiceError::Internal),
                })
                .await??;
                Ok(Evaluated::Whole(evaluation))
            }
            Evaluator::Holders {
                committee,
                generation,
            } => {
                if !combines_partials {
                    return Err(ServiceError::ThresholdMode);
                }
                let pool = self.state.holders.as_ref().ok_or_else(|| {
                    ServiceError::Unavailable(
                        "this replica serves a threshold-mode epoch but has no key holders configured (--holders)".into(),
                    )
                })?;
                let on_behalf = ON_BEHALF.try_with(Clone::clone).unwrap_or_default();
                let partials = pool
                    .evaluate(
                        committee,
                        (snap.epoch, *generation),
                        &Arc::new(blinded),
                        &on_behalf,
                    )
                    .await?;
                Ok(Evaluated::Partials(partials, *generation))
            }
        }
    }

    fn check_batch(&self, n: usize, setting: &str, max: usize) -> Result<(), ServiceError> {
        if n == 0 {
            return Err(ServiceError::InvalidArgument("the batch is empty".into()));
        }
        if n > max {
            return Err(ServiceError::InvalidArgument(format!(
                "a batch of {n} elements is over the limit of a batch of at most {setting} = {max} elements; split it"
            )));
        }
        Ok(())
    }
}

/// A response's evaluated elements (packed), proof, and partial evaluations.
type EvaluationFields = (Vec<u8>, Vec<u8>, Vec<PartialEvaluation>);

/// A batch's evaluation: whole (single-key mode) or as the holders'
/// verified partial evaluations (threshold mode).
enum Evaluated {
    Whole(psi_core::Evaluation),
    Partials(Vec<psi_core::Partial>, u32),
}

impl Evaluated {
    /// The response fields: evaluated elements, proof, partials.
    fn into_fields(self) -> Result<EvaluationFields, ServiceError> {
        match self {
            Evaluated::Whole(e) => {
                let proof = e.proof.ok_or(ServiceError::Internal)?;
                Ok((
                    pack(e.elements.iter().map(|e| &e.0)),
                    proof.to_bytes().to_vec(),
                    Vec::new(),
                ))
            }
            Evaluated::Partials(p, generation) => Ok((
                Vec::new(),
                Vec::new(),
                p.iter().map(|p| partial_to_proto(p, generation)).collect(),
            )),
        }
    }
}

/// Runs CPU-heavy work on the rayon pool and awaits it. The work is given
/// a `stop` test that turns true once nobody awaits the result any more
/// (the request was cancelled or timed out), to give up between chunks.
///
/// A panic in the work (a bug, or a library's assertion) is caught at this
/// boundary: the request is answered `INTERNAL` and logged, and the server
/// keeps serving (uncaught, a panic on the rayon pool aborts the process).
async fn on_cpu<T: Send + 'static>(
    work: impl FnOnce(&(dyn Fn() -> bool + Sync)) -> T + Send + 'static,
) -> Result<T, ServiceError> {
    let (tx, rx) = oneshot::channel();
    rayon::spawn(move || {
        let stop = || tx.is_closed();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(&stop))) {
            Ok(result) => {
                let _ = tx.send(result);
            }
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                tracing::error!("request work panicked (answered INTERNAL, still serving): {what}");
            }
        }
    });
    rx.await.map_err(|_| ServiceError::Internal)
}

#[tonic::async_trait]
impl Match for MatchService {
    async fn get_server_info(
        &self,
        _request: Request<GetServerInfoRequest>,
    ) -> Result<Response<ServerInfo>, Status> {
        let snap = self.state.current()?;
        let limits = self.state.limits;
        let to_u32 = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Ok(Response::new(ServerInfo {
            ciphersuite: SUITE_ID.to_string(),
            oprf_mode: 1,
            public_key: snap.evaluator.public_key().to_bytes().to_vec(),
            threshold: snap
                .evaluator
                .committee()
                .map(|(c, generation)| committee_to_proto(c, generation)),
            key_epoch: snap.epoch,
            registry_version: snap.index.registry_version(),
            registry_size: snap.index.len() as u64,
            bucket_prefix_bits: snap.index.prefix_bits().into(),
            max_batch: to_u32(limits.max_batch),
            max_bucket_batch: to_u32(limits.max_bucket_batch),
            max_message_bytes: limits.max_message_bytes as u64,
            modes: if snap.pir.is_some() {
                vec![
                    QueryMode::Sync as i32,
                    QueryMode::Bucket as i32,
                    QueryMode::Pir as i32,
                ]
            } else {
                vec![QueryMode::Sync as i32, QueryMode::Bucket as i32]
            },
            pir: snap.pir.as_ref().map(|db| {
                let shape = db.shape();
                let mut info = PirInfo {
                    scheme: shape.scheme().to_string(),
                    bucket_shift: shape.bucket_shift().into(),
                    fingerprint_bits: shape.fingerprint_bits(),
                    keys_bytes: shape.keys_bytes() as u64,
                    query_bytes: shape.query_bytes() as u64,
                    answer_bytes: shape.answer_bytes() as u64,
                    max_batch: to_u32(limits.pir_max_batch),
                    ..PirInfo::default()
                };
                match shape {
                    psi_pir::PirShape::Spiral(s) => {
                        info.nu1 = s.nu1.into();
                        info.nu2 = s.nu2.into();
                        info.instances = s.instances.into();
                    }
                    psi_pir::PirShape::Ypir(s) => {
                        info.item_bits = s.item_bits.into();
                        info.groups = u32::try_from(s.groups()).unwrap_or(u32::MAX);
                        info.item_columns = s.columns;
                    }
                }
                info.shape_id = shape.id().to_vec();
                info
            }),
            tag_bits: snap.tagset.header().params.tag_bits.into(),
            key_history: snap
                .history
                .iter()
                .filter(|s| s.epoch <= snap.epoch)
                .map(|s| KeyStep {
                    epoch: s.epoch,
                    public_key: s.public_key.to_bytes().to_vec(),
                    endorsement: s.endorsement.to_vec(),
                })
                .collect(),
        }))
    }

    async fn evaluate(
        &self,
        request: Request<EvaluateRequest>,
    ) -> Result<Response<EvaluateResponse>, Status> {
        let caller = self.caller(&request);
        let req = request.into_inner();
        let elements = req.blinded_elements.len() / 32;
        self.accounted(
            caller,
            "Evaluate",
            "sync",
            elements,
            self.evaluate_inner(req),
        )
        .await
        .map(Response::new)
    }

    async fn bucket_query(
        &self,
        request: Request<BucketQueryRequest>,
    ) -> Result<Response<BucketQueryResponse>, Status> {
        let caller = self.caller(&request);
        let req = request.into_inner();
        let elements = req.blinded_elements.len() / 32;
        self.accounted(
            caller,
            "BucketQuery",
            "bucket",
            elements,
            self.bucket_query_inner(req),
        )
        .await
        .map(Response::new)
    }

    async fn pir_setup(
        &self,
        request: Request<PirSetupRequest>,
    ) -> Result<Response<PirSetupResponse>, Status> {
        let institution = self.state.institution_of(request.extensions()).ok();
        let caller = self.caller(&request);
        let req = request.into_inner();
        self.accounted(
            caller,
            "PirSetup",
            "pir",
            0,
            self.pir_setup_inner(institution, req),
        )
        .await
        .map(Response::new)
    }

    async fn pir_query(
        &self,
        request: Request<PirQueryRequest>,
    ) -> Result<Response<PirQueryResponse>, Status> {
        let institution = self.state.institution_of(request.extensions()).ok();
        let caller = self.caller(&request);
        let req = request.into_inner();
        let elements = req.blinded_elements.len() / 32;
        self.accounted(
            caller,
            "PirQuery",
            "pir",
            elements,
            self.pir_query_inner(institution, req),
        )
        .await
        .map(Response::new)
    }

    type SyncTagSetStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<SyncTagSetResponse, Status>> + Send + 'static>,
    >;

    async fn sync_tag_set(
        &self,
        request: Request<SyncTagSetRequest>,
    ) -> Result<Response<Self::SyncTagSetStream>, Status> {
        let caller = self.caller(&request);
        let req = request.into_inner();
        self.accounted(
            caller,
            "SyncTagSet",
            "sync",
            0,
            self.sync_tag_set_inner(req),
        )
        .await
        .map(Response::new)
    }
}

/// Who asks and why (with the log commitment the request carries), each
/// possibly refused, and the admission layer's note.
struct Caller {
    institution: Result<String, ServiceError>,
    purpose: Result<(String, String), ServiceError>,
    note: Option<Arc<crate::serving::admission::RequestNote>>,
}

impl MatchService {
    async fn evaluate_inner(&self, req: EvaluateRequest) -> Result<EvaluateResponse, ServiceError> {
        let snap = self.snapshot_for(req.key_epoch)?;
        let blinded = unpack_blinded(&req.blinded_elements)?;
        self.check_batch(blinded.len(), "max_batch", self.state.limits.max_batch)?;
        let (evaluated_elements, proof, partials) = self
            .evaluate_blinded(&snap, blinded, req.combines_partials)
            .await?
            .into_fields()?;
        Ok(EvaluateResponse {
            key_epoch: snap.epoch,
            evaluated_elements,
            proof,
            partials,
        })
    }

    async fn bucket_query_inner(
        &self,
        req: BucketQueryRequest,
    ) -> Result<BucketQueryResponse, ServiceError> {
        let snap = self.snapshot_for(req.key_epoch)?;
        let blinded = unpack_blinded(&req.blinded_elements)?;
        self.check_batch(
            blinded.len(),
            "max_bucket_batch",
            self.state.limits.max_bucket_batch,
        )?;
        if req.buckets.len() != blinded.len() {
            return Err(ServiceError::InvalidArgument(format!(
                "{} buckets for {} elements",
                req.buckets.len(),
                blinded.len()
            )));
        }
        let ids: BTreeSet<u32> = req.buckets.iter().copied().collect();
        if ids.iter().any(|&b| snap.index.bucket(b).is_none()) {
            return Err(ServiceError::InvalidArgument(format!(
                "bucket id out of range: the registry uses {} prefix bits",
                snap.index.prefix_bits()
            )));
        }
        let (evaluated_elements, proof, partials) = self
            .evaluate_blinded(&snap, blinded, req.combines_partials)
            .await?
            .into_fields()?;
        let buckets = ids
            .into_iter()
            .map(|id| Bucket {
                id,
                tags: snap
                    .index
                    .bucket(id)
                    .map(|run| run.to_be_bytes())
                    .unwrap_or_default(),
            })
            .collect();
        Ok(BucketQueryResponse {
            key_epoch: snap.epoch,
            registry_version: snap.index.registry_version(),
            evaluated_elements,
            proof,
            buckets,
            partials,
        })
    }

    fn pir_database(snap: &Snapshot) -> Result<Arc<psi_pir::PirDatabase>, ServiceError> {
        snap.pir.clone().ok_or_else(|| {
            ServiceError::InvalidArgument(
                "this server does not offer PIR mode (see ServerInfo.modes)".into(),
            )
        })
    }

    async fn pir_setup_inner(
        &self,
        institution: Option<String>,
        req: PirSetupRequest,
    ) -> Result<PirSetupResponse, ServiceError> {
        let institution = institution.ok_or(ServiceError::Unauthenticated)?;
        let snap = self.snapshot_for(req.key_epoch)?;
        let shape = Self::pir_database(&snap)?.shape();
        let scheme = if req.scheme.is_empty() {
            psi_pir::shape::SCHEME
        } else {
            req.scheme.as_str()
        };
        if scheme != shape.scheme() {
            return Err(ServiceError::InvalidArgument(format!(
                "public parameters for the PIR scheme `{scheme}`; the database is `{}`: fetch ServerInfo",
                shape.scheme()
            )));
        }
        if let psi_pir::PirShape::Spiral(shape) = shape {
            if (req.nu1, req.nu2) != (shape.nu1.into(), shape.nu2.into()) {
                return Err(ServiceError::InvalidArgument(format!(
                    "public parameters for dimensions ({}, {}); the database has ({}, {}): fetch ServerInfo",
                    req.nu1, req.nu2, shape.nu1, shape.nu2
                )));
            }
        }
        // Checked before any work: the exact length, then every coefficient.
        let bytes = req.public_parameters;
        let id = crate::serving::pir::keys_id(&bytes);
        let epoch = snap.epoch;
        let keys = on_cpu(move |_| psi_pir::PirKeys::parse(shape, epoch, &bytes))
            .await?
            .map_err(|e| ServiceError::InvalidArgument(e.to_string()))?;
        self.state.pir_keys.insert(&institution, id, keys)?;
        Ok(PirSetupResponse {
            keys_id: id.to_vec(),
        })
    }

    async fn pir_query_inner(
        &self,
        institution: Option<String>,
        req: PirQueryRequest,
    ) -> Result<PirQueryResponse, ServiceError> {
        let institution = institution.ok_or(ServiceError::Unauthenticated)?;
        let snap = self.snapshot_for(req.key_epoch)?;
        let db = Self::pir_database(&snap)?;
        let blinded = unpack_blinded(&req.blinded_elements)?;
        self.check_batch(
            blinded.len(),
            "pir_max_batch",
            self.state.limits.pir_max_batch,
        )?;
        if req.queries.len() != blinded.len() {
            return Err(ServiceError::InvalidArgument(format!(
                "{} PIR queries for {} elements",
                req.queries.len(),
                blinded.len()
            )));
        }
        if !req.shape_id.is_empty() && req.shape_id != db.shape().id() {
            return Err(ServiceError::PirShapeChanged);
        }
        let want = db.shape().query_bytes();
        if let Some((i, q)) = req
            .queries
            .iter()
            .enumerate()
            .find(|(_, q)| q.len() != want)
        {
            return Err(ServiceError::InvalidArgument(format!(
                "PIR query {i} is {} bytes; the database takes {want}",
                q.len()
            )));
        }
        let keys = self
            .state
            .pir_keys
            .get(&institution, &req.keys_id)
            .filter(|k| k.serve(&db))
            .ok_or(ServiceError::PirKeysUnknown)?;
        let _slot = Arc::clone(&self.state.pir_slots)
            .try_acquire_owned()
            .map_err(|_| ServiceError::QuotaExhausted {
                what: format!(
                    "{} PIR requests are being answered (pir_max_concurrent)",
                    self.state.limits.pir_max_concurrent
                ),
                retry_after: std::time::Duration::from_millis(500),
            })?;
        let refused = |e: psi_pir::Error| match e {
            psi_pir::Error::Scheme => {
                ServiceError::InvalidArgument("the PIR query could not be processed".into())
            }
            other => ServiceError::InvalidArgument(other.to_string()),
        };
        // Every query checked (each value below the modulus) before the
        // evaluation and before any is queued; then they share passes with
        // other requests' queries (dropped unanswered if this request is
        // cancelled).
        let prepared = {
            let (db, keys, queries) = (Arc::clone(&db), Arc::clone(&keys), req.queries);
            on_cpu(move |_| {
                queries
                    .iter()
                    .map(|q| db.prepare(&keys, q))
                    .collect::<Result<Vec<_>, _>>()
            })
            .await?
            .map_err(refused)?
        };
        let (evaluated_elements, proof, partials) = self
            .evaluate_blinded(&snap, blinded, req.combines_partials)
            .await?
            .into_fields()?;
        let mut answers = Vec::with_capacity(prepared.len());
        for answer in self.state.passes.submit(&db, &keys, prepared) {
            answers.push(
                answer
                    .await
                    .map_err(|_| ServiceError::Internal)?
                    .map_err(refused)?,
            );
        }
        Ok(PirQueryResponse {
            key_epoch: snap.epoch,
            registry_version: snap.index.registry_version(),
            evaluated_elements,
            proof,
            answers,
            partials,
        })
    }

    async fn sync_tag_set_inner(
        &self,
        req: SyncTagSetRequest,
    ) -> Result<<Self as Match>::SyncTagSetStream, ServiceError> {
        let snap = self.snapshot_for(req.key_epoch)?;
        let held = req.held_digests;
        if !held.len().is_multiple_of(32) {
            return Err(ServiceError::InvalidArgument(
                "held_digests length is not a multiple of 32".into(),
            ));
        }
        let n = snap.tagset.shards().len();
        let wanted = req.wanted_shards;
        if !wanted.is_empty() && (!held.is_empty() || wanted.len() != n.div_ceil(8)) {
            return Err(ServiceError::InvalidArgument(format!(
                "wanted_shards is a bitmap of {} bytes for {n} shards, sent without held_digests",
                n.div_ceil(8)
            )));
        }
        let item = |i| Ok(SyncTagSetResponse { item: Some(i) });
        // Every message of the stream stays within half the message limit.
        let part_bytes = self.state.limits.max_message_bytes / 2;
        let whole_manifest = |snap: &Snapshot| -> Vec<Result<SyncTagSetResponse, Status>> {
            let (head, parts) = manifest_in_parts(&snap.tagset, part_bytes);
            std::iter::once(item(sync_tag_set_response::Item::Manifest(head)))
                .chain(
                    parts
                        .into_iter()
                        .map(|p| item(sync_tag_set_response::Item::ManifestPart(p))),
                )
                .collect()
        };
        if !wanted.is_empty() {
            // The client has the manifest and says which shards it lacks.
            let head = item(sync_tag_set_response::Item::Manifest(root_only_manifest(
                &snap.tagset,
            )));
            let shards = shard_messages(Arc::clone(&snap), move |i, _| in_bitmap(&wanted, i));
            return Ok(Box::pin(tokio_stream::iter(
                std::iter::once(head).chain(shards),
            )));
        }
        // Composing the deltas is O(changes): off the async threads.
        let max_delta = self
            .state
            .limits
            .max_message_bytes
            .saturating_mul(MAX_DELTA_MESSAGES);
        let work = Arc::clone(&snap);
        let delta = on_cpu(move |_| delta_since(&work, req.held_version, max_delta)).await?;
        if let Some(delta) = delta {
            let mut out = if req.root_only {
                vec![item(sync_tag_set_response::Item::Manifest(
                    root_only_manifest(&snap.tagset),
                ))]
            } else {
                whole_manifest(&snap)
            };
            out.extend(
                delta_parts(delta, part_bytes)
                    .into_iter()
                    .map(|d| item(sync_tag_set_response::Item::Delta(d))),
            );
            return Ok(Box::pin(tokio_stream::iter(out)));
        }
        if req.root_only && req.held_version == snap.tagset.header().registry_version {
            // The client is current: the root digest confirms it.
            let head = item(sync_tag_set_response::Item::Manifest(root_only_manifest(
                &snap.tagset,
            )));
            return Ok(Box::pin(tokio_stream::iter([head])));
        }
        let manifest = whole_manifest(&snap);
        if req.root_only {
            // No delta reaches the client's version: the manifest alone; the
            // client asks again for the shards that differ (by its digests,
            // or for a large set by a bitmap of the shards it wants).
            return Ok(Box::pin(tokio_stream::iter(manifest)));
        }
        let shards = shard_messages(Arc::clone(&snap), move |i, digest| {
            held.get(i * 32..(i + 1) * 32) != Some(digest.as_slice())
        });
        Ok(Box::pin(tokio_stream::iter(
            manifest.into_iter().chain(shards),
        )))
    }
}

/// The shards of `snap`'s tag set that `send` picks (by index and digest),
/// one message each, in shard order.
fn shard_messages(
    snap: Arc<Snapshot>,
    send: impl Fn(usize, &[u8; 32]) -> bool + Send + 'static,
) -> impl Iterator<Item = Result<SyncTagSetResponse, Status>> + Send {
    let n = snap.tagset.shards().len();
    (0..n).filter_map(move |i| {
        let shard = snap.tagset.shards().get(i)?;
        if !send(i, shard.digest()) {
            return None;
        }
        Some(Ok(SyncTagSetResponse {
            item: Some(sync_tag_set_response::Item::Shard(ShardData {
                index: u32::try_from(i).unwrap_or(u32::MAX),
                count: shard.count(),
                data: shard.data().to_vec(),
            })),
        }))
    })
}

/// How many messages' worth a delta may be (`max_message_bytes` each);
/// beyond, the changed shards are sent instead.
pub const MAX_DELTA_MESSAGES: usize = 8;

/// The net change since `held` as tag-set values, if the deltas reach back
/// that far and it is smaller than half the whole set and `max_bytes`
/// (sent in parts: `psi_proto::delta_parts`).
fn delta_since(snap: &Snapshot, held: u64, max_bytes: usize) -> Option<TagSetDelta> {
    let current = snap.tagset.header().registry_version;
    if held == 0 || held >= current {
        return None;
    }
    let (added, removed) = crate::store::delta::Delta::compose(&snap.deltas, held, current)?;
    let bytes = 8 * (added.len() + removed.len());
    let whole: usize = snap.tagset.shards().iter().map(|s| s.data().len()).sum();
    if bytes > whole / 2 || bytes > max_bytes {
        return None;
    }
    let params = snap.tagset.header().params;
    let values = |tags: Vec<u64>| {
        let mut v: Vec<u64> = tags
            .into_iter()
            .map(|t| params.value(psi_core::Tag(t)))
            .collect();
        v.sort_unstable();
        pack_tags(&v)
    };
    Some(TagSetDelta {
        from_version: held,
        to_version: current,
        added: values(added),
        removed: values(removed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_in_request_work_is_an_internal_error_and_the_pool_lives_on() {
        let panicked = on_cpu(|_| -> u32 { panic!("injected") }).await;
        assert!(
            matches!(panicked, Err(ServiceError::Internal)),
            "{panicked:?}"
        );
        assert_eq!(
            Status::from(ServiceError::Internal).code(),
            tonic::Code::Internal
        );
        // The pool still answers, on every thread.
        for n in 0..8u32 {
            assert_eq!(on_cpu(move |_| n * 2).await.unwrap(), n * 2);
        }
    }
}
