//! A verified session with one server: its pinned public key and epoch, and
//! the exchanges (evaluate, bucket and PIR queries in [`query`](self), the
//! tag-set sync and its cache in `sync`). Every response is checked against
//! the pinned epoch and every evaluation's proof is verified; a failure is
//! an error, never a "no match".

mod query;
mod sync;

use std::path::PathBuf;
use std::sync::Arc;

use psi_core::rotation::KeyStep;
use psi_core::suite::SUITE_ID;
use psi_core::{Blinding, Client, Committee, Mode, PublicKey, TagSet};
use psi_proto::v1::match_client::MatchClient;
use psi_proto::v1::{GetServerInfoRequest, ServerInfo};
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

use crate::error::{is_transport, Error, Result};
use crate::pin::{self, Pinned};

use psi_proto::{PURPOSE_HEADER, RETRY_AFTER_MS};

/// How to connect.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Server URL, e.g. `http://127.0.0.1:50051`.
    pub server: String,
    /// The server's public key in hex, if known out of band: a root of
    /// trust, from which endorsed rotations are followed.
    pub pin_key: Option<String>,
    /// Accept only `pin_key` itself, not keys endorsed from it.
    pub pin_exact: bool,
    /// Where the known-servers file and tag-set caches live.
    pub cache_dir: PathBuf,
    /// Blinding path (both give the same answers).
    pub blinding: Blinding,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Mutual TLS (an `https://` server URL).
    pub tls: Option<ClientTls>,
    /// The declared purpose of the queries (a code the operator allows, e.g.
    /// `kyc-onboarding`), sent with every request and kept in the server's audit trail.
    pub purpose: String,
}

/// PEM contents for mutual TLS.
#[derive(Clone)]
pub struct ClientTls {
    /// The operator's CA certificate.
    pub ca: Vec<u8>,
    /// The institution's certificate.
    pub cert: Vec<u8>,
    /// The institution's private key.
    pub key: Vec<u8>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientTls(..)")
    }
}

/// A connected, pinned session.
#[derive(Debug, Clone)]
pub struct Session {
    grpc: MatchClient<Channel>,
    info: ServerInfo,
    core: Arc<Client>,
    /// Threshold mode: the key holders' public shares, checked to
    /// interpolate to the pinned key, and their generation (updated when a
    /// refresh gives the holders new shares).
    committee: Arc<std::sync::RwLock<Option<Holders>>>,
    options: ConnectOptions,
    /// How the key was pinned.
    pub pinned: Pinned,
    /// PIR mode's state, made on first use.
    pir: Arc<tokio::sync::Mutex<Option<crate::pir::PirState>>>,
    /// The PIR shape as last read: `ServerInfo.pir` at connection, read
    /// again when the server says it changed (an update).
    pir_info: Arc<std::sync::RwLock<Option<psi_proto::v1::PirInfo>>>,
    /// The ids of the requests the server answered (shared with the
    /// sessions that follow this one through a rotation).
    request_ids: Arc<RequestIds>,
    /// The commitment to the institution's log entries that this session's
    /// requests answer (`x-psi-log-commitment`), if any.
    log_commitment: Option<[u8; 32]>,
}

/// Threshold mode: the key holders' committee and the generation of its
/// shares.
type Holders = (Arc<Committee>, u32);

/// Threshold mode: the committee `info` announces, checked to make `pk`.
fn committee_of(pk: &PublicKey, info: &ServerInfo) -> Result<Option<Holders>> {
    info.threshold
        .as_ref()
        .map(|t| {
            psi_proto::committee_from_proto(pk, t)
                .map(|c| (Arc::new(c), t.generation))
                .map_err(|e| {
                    Error::invalid(
                        "the key holders' public shares in ServerInfo do not make the pinned public key",
                        e,
                    )
                })
        })
        .transpose()
}

/// The first and the last request id the server answered with
/// (`x-psi-request-id`, the id its audit record holds).
#[derive(Debug, Default)]
pub struct RequestIds(std::sync::Mutex<(Option<String>, Option<String>)>);

impl RequestIds {
    fn note(&self, metadata: &tonic::metadata::MetadataMap) {
        let Some(id) = metadata
            .get(psi_proto::REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok())
        else {
            return;
        };
        let mut ids = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if ids.0.is_none() {
            ids.0 = Some(id.to_string());
        }
        ids.1 = Some(id.to_string());
    }

    /// The first and the last request id answered, if any.
    #[must_use]
    pub fn span(&self) -> Option<(String, String)> {
        let ids = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Some((ids.0.clone()?, ids.1.clone()?))
    }
}

/// The answers of bucket or PIR checks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Answers {
    /// Whether each record is in the registry, in order.
    pub found: Vec<bool>,
    /// The registry versions that answered: the first and the last (a
    /// request may be answered by a newer version than the one before it).
    pub registry_versions: Option<(u64, u64)>,
}

impl Answers {
    fn with_capacity(n: usize) -> Self {
        Self {
            found: Vec::with_capacity(n),
            registry_versions: None,
        }
    }

    /// Notes that a response of `version` answered.
    fn answered_by(&mut self, version: u64) {
        let first = self.registry_versions.map_or(version, |(first, _)| first);
        self.registry_versions = Some((first, version));
    }
}

/// The result of a sync.
#[derive(Debug)]
pub struct SyncOutcome {
    /// The verified tag set.
    pub set: TagSet,
    /// Shards downloaded (the others came from the cache).
    pub shards_fetched: usize,
    /// Shards in the set.
    pub shards_total: usize,
    /// Bytes received (manifest, delta and shard data).
    pub bytes_fetched: u64,
    /// Whether the server sent the delta since the cached version.
    pub delta_applied: bool,
}

/// The longest server-requested wait the client sits out by itself; a longer
/// one (a daily cap) is an error saying when to come back.
pub const MAX_QUOTA_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// How long the client keeps retrying an unavailable server (a restart, a
/// load balancer moving it) before giving up.
pub const MAX_UNAVAILABLE_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

impl Session {
    /// Runs an RPC and sends the same request again when the server asks to wait
    /// (`RESOURCE_EXHAUSTED` with `retry-after-ms`, up to [`MAX_QUOTA_WAIT`]), is
    /// unavailable, or the connection broke (backing off, up to
    /// [`MAX_UNAVAILABLE_WAIT`] in all). The
    /// caller's rows wait for the answer, so none is lost or answered twice.
    async fn ask<T, F, Fut>(&self, what: &str, mut call: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut unavailable_for = std::time::Duration::ZERO;
        let mut backoff = std::time::Duration::from_millis(100);
        loop {
            match call().await {
                Ok(response) => {
                    self.request_ids.note(response.metadata());
                    return Ok(response.into_inner());
                }
                Err(status) if status.code() == Code::ResourceExhausted => {
                    let wait = status
                        .metadata()
                        .get(RETRY_AFTER_MS)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok())
                        .map(std::time::Duration::from_millis);
                    match wait {
                        Some(wait) if wait <= MAX_QUOTA_WAIT => {
                            tracing::warn!(
                                "{what}: {}; waiting {:.1} s, then resuming",
                                status.message(),
                                wait.as_secs_f64()
                            );
                            tokio::time::sleep(wait).await;
                        }
                        _ => return Err(Error::from_status(&status, what)),
                    }
                }
                // Every exchange is read-only: after a broken connection (a
                // server killed mid-request, a balancer's reset) the same
                // request is sent again, as when the server says it is unavailable.
                Err(status)
                    if (status.code() == Code::Unavailable || is_transport(&status))
                        && unavailable_for < MAX_UNAVAILABLE_WAIT =>
                {
                    tracing::warn!(
                        "{what}: server unavailable or connection lost ({}); retrying in {:.1} s",
                        status.message(),
                        backoff.as_secs_f64()
                    );
                    tokio::time::sleep(backoff).await;
                    unavailable_for += backoff;
                    backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
                }
                Err(status) => return Err(Error::from_status(&status, what)),
            }
        }
    }

    /// A request carrying the declared purpose (and the log commitment,
    /// when this session has one).
    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Ok(value) = self.options.purpose.parse() {
            request.metadata_mut().insert(PURPOSE_HEADER, value);
        }
        if let Some(c) = &self.log_commitment {
            if let Ok(value) = hex::encode(c).parse() {
                request
                    .metadata_mut()
                    .insert(psi_proto::LOG_COMMITMENT_HEADER, value);
            }
        }
        request
    }

    /// This session sending `commitment` with every request: the commitment
    /// to the institution's log entries the requests answer
    /// (`psi_core::commitment`), which the operator's audit trail keeps.
    #[must_use]
    pub fn with_log_commitment(&self, commitment: [u8; 32]) -> Self {
        Self {
            log_commitment: Some(commitment),
            ..self.clone()
        }
    }

    /// Connects, reads `ServerInfo`, checks the ciphersuite and pins the key and epoch.
    ///
    /// # Errors
    /// Unreachable server, unsupported ciphersuite, or a key that differs from the pin.
    pub async fn connect(options: ConnectOptions) -> Result<Self> {
        let mut endpoint = Endpoint::from_shared(options.server.clone()).map_err(|_| {
            Error::Options(format!(
                "`{}` is not a server URL (e.g. http://127.0.0.1:50051)",
                options.server
            ))
        })?;
        if let Some(tls) = &options.tls {
            endpoint = endpoint
                .tls_config(
                    tonic::transport::ClientTlsConfig::new()
                        .ca_certificate(tonic::transport::Certificate::from_pem(&tls.ca))
                        .identity(tonic::transport::Identity::from_pem(&tls.cert, &tls.key)),
                )
                .map_err(|e| Error::Options(format!("configuring TLS: {e}")))?;
        }
        let channel = endpoint
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| Error::connecting(&options.server, &e))?;
        let mut grpc = MatchClient::new(channel)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        // A replica behind a key rotation presents an older epoch than the
        // pin: ask again (through a balancer, another replica may answer)
        // until one presents the pinned epoch or later.
        let mut waited = std::time::Duration::ZERO;
        let mut backoff = std::time::Duration::from_millis(100);
        let (info, pk, pinned) = loop {
            match Self::read_and_pin(&mut grpc, &options).await {
                Err(e @ Error::OlderThanPinned(_)) if waited < MAX_UNAVAILABLE_WAIT => {
                    tracing::warn!("{e}; asking again in {:.1} s", backoff.as_secs_f64());
                    tokio::time::sleep(backoff).await;
                    waited += backoff;
                    backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
                }
                read => break read?,
            }
        };
        let core = Arc::new(Client::new(Mode::Voprf, pk));
        let committee = committee_of(&pk, &info)?;
        let pir_info = Arc::new(std::sync::RwLock::new(info.pir.clone()));
        Ok(Self {
            grpc,
            info,
            core,
            committee: Arc::new(std::sync::RwLock::new(committee)),
            options,
            pinned,
            pir: Arc::default(),
            pir_info,
            request_ids: Arc::default(),
            log_commitment: None,
        })
    }

    /// Threshold mode: the committee, reading it again from `ServerInfo`
    /// when the server's partial evaluations are of another `generation`
    /// (the holders were refreshed: same key, new shares). The new public
    /// shares must make the pinned key.
    pub(super) async fn committee_for(&self, generation: u32) -> Result<Option<Arc<Committee>>> {
        let current = self
            .committee
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        match current {
            None => Ok(None),
            Some((c, g)) if g == generation => Ok(Some(c)),
            Some(_) => {
                let mut grpc = self.grpc.clone();
                let info = Self::server_info(&mut grpc)
                    .await
                    .map_err(|s| Error::from_status(&s, "reading the server's key holders"))?;
                if info.key_epoch != self.info.key_epoch {
                    return Err(Error::StaleEpoch {
                        what: "reading the server's key holders".into(),
                        message: format!(
                            "the server moved to key epoch {} from {}",
                            info.key_epoch, self.info.key_epoch
                        ),
                    });
                }
                let fresh = committee_of(self.core.public_key(), &info)?;
                match fresh {
                    Some((c, g)) if g == generation => {
                        *self
                            .committee
                            .write()
                            .unwrap_or_else(std::sync::PoisonError::into_inner) =
                            Some((Arc::clone(&c), g));
                        Ok(Some(c))
                    }
                    _ => Err(Error::Invalid(format!(
                        "the server answered with key holders' shares of generation {generation}, which its ServerInfo does not announce"
                    ))),
                }
            }
        }
    }

    /// Reads `ServerInfo`, checks the ciphersuite and pins the key and epoch.
    async fn read_and_pin(
        grpc: &mut MatchClient<Channel>,
        options: &ConnectOptions,
    ) -> Result<(ServerInfo, PublicKey, Pinned)> {
        let info = match Self::server_info(grpc).await {
            Ok(info) => info,
            Err(s) => {
                return Err(
                    match Error::from_status(&s, "reading the server's parameters") {
                        // Plaintext HTTP/2 to a TLS port: the server's TLS
                        // alert reads as an HTTP/2 protocol error.
                        Error::Transport { what, message } if options.tls.is_none() => {
                            Error::Transport {
                                what: format!(
                                    "{} did not speak plaintext HTTP/2; if it requires TLS, use an https:// URL with --tls-ca, --tls-cert and --tls-key; {what}",
                                    options.server
                                ),
                                message,
                            }
                        }
                        e => e,
                    },
                );
            }
        };
        if info.ciphersuite != SUITE_ID || info.oprf_mode != 1 {
            return Err(Error::Unsupported(format!(
                "the server speaks {} mode {}, this client only {SUITE_ID} VOPRF (mode 1)",
                info.ciphersuite, info.oprf_mode
            )));
        }
        let pk = PublicKey::from_bytes(&info.public_key).map_err(|e| {
            Error::invalid(
                "the server's public key is not a valid ristretto255 element",
                e,
            )
        })?;
        let history = info
            .key_history
            .iter()
            .map(|s| {
                Ok(KeyStep {
                    epoch: s.epoch,
                    public_key: PublicKey::from_bytes(&s.public_key).map_err(|e| {
                        Error::invalid("the server's key history holds an invalid key", e)
                    })?,
                    endorsement: s.endorsement.as_slice().try_into().map_err(|_| {
                        Error::Invalid(
                            "the server's key history holds a malformed endorsement".into(),
                        )
                    })?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let pinned = pin::check(
            &options.server,
            &pk,
            info.key_epoch,
            &history,
            options.pin_key.as_deref(),
            options.pin_exact,
            &options.cache_dir,
        )?;
        match pinned {
            Pinned::Rotated { from_epoch } => tracing::warn!(
                "{}: key rotated from epoch {from_epoch} to {}; the new key is endorsed by the pinned one and is now pinned",
                options.server,
                info.key_epoch
            ),
            Pinned::EndorsedFromFlag { from_epoch } => tracing::info!(
                "{}: key epoch {}, endorsed through every rotation from the configured key (epoch {from_epoch})",
                options.server,
                info.key_epoch
            ),
            _ => {}
        }
        Ok((info, pk, pinned))
    }

    /// `GetServerInfo`, waiting (up to [`MAX_UNAVAILABLE_WAIT`]) while the
    /// server says it is unavailable: it is up but still loading its
    /// snapshot, as after a restart. A connection that fails is not waited for.
    async fn server_info(grpc: &mut MatchClient<Channel>) -> Result<ServerInfo, tonic::Status> {
        let mut waited = std::time::Duration::ZERO;
        let mut backoff = std::time::Duration::from_millis(50);
        loop {
            match grpc.get_server_info(GetServerInfoRequest {}).await {
                // Up but unavailable (loading, or at its connection limit,
                // which psi-server answers in the clear): wait; a connection
                // that fails otherwise is not waited for.
                Err(s)
                    if matches!(Error::from_status(&s, ""), Error::Unavailable { .. })
                        && waited < MAX_UNAVAILABLE_WAIT =>
                {
                    if waited.is_zero() {
                        tracing::warn!(
                            "the server is unavailable ({}); waiting for it",
                            s.message()
                        );
                    }
                    tokio::time::sleep(backoff).await;
                    waited += backoff;
                    backoff = (backoff * 2).min(std::time::Duration::from_secs(2));
                }
                answered => return answered.map(tonic::Response::into_inner),
            }
        }
    }

    /// Connects, waiting up to `patience` for a server that is still
    /// starting (not yet listening, or `UNAVAILABLE` while its snapshot loads).
    ///
    /// # Errors
    /// As [`Session::connect`], or the last error once `patience` has passed.
    pub async fn connect_when_ready(
        options: ConnectOptions,
        patience: std::time::Duration,
    ) -> Result<Self> {
        let started = std::time::Instant::now();
        loop {
            match Self::connect(options.clone()).await {
                Ok(session) => return Ok(session),
                Err(e) if e.is_not_reached() && started.elapsed() < patience => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A new session with the same options: after a key rotation, it reads
    /// the new key and epoch and follows the endorsed history from the pin.
    ///
    /// # Errors
    /// As [`Session::connect`].
    pub async fn reconnect(&self) -> Result<Self> {
        let mut next = Self::connect(self.options.clone()).await?;
        next.request_ids = Arc::clone(&self.request_ids);
        Ok(next)
    }

    /// This session declaring `purpose` instead (a gateway answering for
    /// several purposes over one session).
    #[must_use]
    pub fn with_purpose(&self, purpose: &str) -> Self {
        let mut s = self.clone();
        s.options.purpose = purpose.to_string();
        s
    }

    /// The server's URL.
    #[must_use]
    pub fn server(&self) -> &str {
        &self.options.server
    }

    /// This session with a request-id record of its own (a batch's: its
    /// first and last request, not the session's since it connected).
    #[must_use]
    pub fn with_own_request_ids(&self) -> Self {
        Self {
            request_ids: Arc::default(),
            ..self.clone()
        }
    }

    /// The first and the last request id the server answered this session
    /// (and the sessions it led to through rotations) with.
    #[must_use]
    pub fn request_ids(&self) -> Option<(String, String)> {
        self.request_ids.span()
    }

    /// After the server refused this session's key epoch as stale: a new
    /// session at a newer epoch. Behind a load balancer a replica that has
    /// not loaded the rotation yet may still advertise the old epoch; this
    /// asks again, backing off, until a replica advertises a newer one (up to
    /// [`MAX_UNAVAILABLE_WAIT`], as for an unavailable server).
    ///
    /// # Errors
    /// As [`Session::connect`], or no newer epoch advertised in time.
    pub async fn follow_rotation(&self) -> Result<Self> {
        let mut waited = std::time::Duration::ZERO;
        let mut backoff = std::time::Duration::from_millis(100);
        loop {
            let next = self.reconnect().await?;
            if next.info.key_epoch > self.info.key_epoch {
                return Ok(next);
            }
            if waited >= MAX_UNAVAILABLE_WAIT {
                return Err(Error::Unavailable {
                    what: "following the key rotation".into(),
                    message: format!(
                        "key epoch {} was refused as stale but is still advertised after {} s",
                        self.info.key_epoch,
                        waited.as_secs()
                    ),
                });
            }
            tracing::warn!(
                "key epoch {} refused as stale, still advertised (a replica behind the rotation); asking again in {:.1} s",
                self.info.key_epoch,
                backoff.as_secs_f64()
            );
            tokio::time::sleep(backoff).await;
            waited += backoff;
            backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
        }
    }

    /// The server's parameters as read at connection.
    #[must_use]
    pub fn info(&self) -> &ServerInfo {
        &self.info
    }

    /// The first 16 hex digits of the server's key: names its cache files.
    fn server_key_prefix(&self) -> String {
        psi_core::PublicKey::from_bytes(&self.info.public_key)
            .map(|k| k.to_hex())
            .unwrap_or_default()
            .chars()
            .take(16)
            .collect()
    }
}

/// Runs CPU-heavy work on the rayon pool and awaits it.
pub(crate) async fn on_cpu<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    rayon::spawn(move || {
        let _ = tx.send(work());
    });
    rx.await
        .map_err(|_| Error::Internal("a worker thread failed".into()))
}
