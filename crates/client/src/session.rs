//! A verified session with one server: its pinned public key and epoch, and
//! the three exchanges (evaluate, bucket query, tag-set sync). Every response
//! is checked against the pinned epoch and every evaluation's proof is
//! verified; a failure is an error, never a "no match".

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use futures::{StreamExt, TryStreamExt};
use psi_core::rotation::KeyStep;
use psi_core::suite::SUITE_ID;
use psi_core::tagset::{Shard, TagSetHeader};
use psi_core::{
    BlindState, BlindedElement, Blinding, Client, Mode, Output, Proof, PublicKey, Record, TagSet,
};
use psi_proto::v1::match_client::MatchClient;
use psi_proto::v1::{
    sync_tag_set_response, BucketQueryRequest, EvaluateRequest, GetServerInfoRequest,
    PirQueryRequest, PirSetupRequest, ServerInfo, ShardData, SyncTagSetRequest, TagSetDelta,
    TagSetManifest,
};
use psi_proto::{manifest_parts, pack, unpack_evaluated, unpack_tags};
use rand_core::OsRng;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

use crate::pin::{self, Pinned};

use psi_proto::{PURPOSE_HEADER, RETRY_AFTER_MS};

/// How to connect.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Server URL, e.g. `http://127.0.0.1:50051`.
    pub server: String,
    /// The server's public key in hex, if known out of band.
    pub pin_key: Option<String>,
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
    options: ConnectOptions,
    /// How the key was pinned.
    pub pinned: Pinned,
    /// PIR mode's state, made on first use.
    pir: Arc<tokio::sync::Mutex<Option<crate::pir::PirState>>>,
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

/// The server moved to a new key epoch (a key rotation): reconnect, follow
/// the endorsed key history, re-sync, and ask again.
#[derive(Debug, thiserror::Error)]
#[error("{what}: the server's key epoch changed ({message}); reconnect to follow the rotation and re-sync")]
pub struct StaleEpoch {
    what: String,
    message: String,
}

/// Whether `e` says the server rotated its key.
#[must_use]
pub fn is_stale_epoch(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<StaleEpoch>().is_some())
}

/// Whether `status` came from the transport (the connection or HTTP/2
/// framing), not from the server's answer.
fn is_transport_error(status: &tonic::Status) -> bool {
    use std::error::Error as _;
    // A status the server sent has no source; one made from a connection or
    // HTTP/2 error has.
    status.source().is_some()
        || status.message().starts_with("h2 protocol error")
        || status.message().contains("transport error")
}

fn rpc_error(status: tonic::Status, what: &str) -> anyhow::Error {
    if status.metadata().get(psi_proto::PIR_KEYS_HEADER).is_some() {
        return crate::pir::KeysUnknown(format!("{what}: {}", status.message())).into();
    }
    match status.code() {
        Code::FailedPrecondition => StaleEpoch {
            what: what.to_string(),
            message: status.message().to_string(),
        }
        .into(),
        Code::Unavailable => anyhow!(
            "{what}: the server is unavailable ({}); check the address or retry shortly",
            status.message()
        ),
        _ => anyhow!("{what}: {} ({:?})", status.message(), status.code()),
    }
}

/// The longest server-requested wait the client sits out by itself; a longer
/// one (a daily cap) is an error saying when to come back.
pub const MAX_QUOTA_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// How long the client keeps retrying an unavailable server (a restart, a
/// load balancer moving it) before giving up.
pub const MAX_UNAVAILABLE_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Runs an RPC and sends the same request again when the server asks to wait
/// (`RESOURCE_EXHAUSTED` with `retry-after-ms`, up to [`MAX_QUOTA_WAIT`]) or is
/// unavailable (backing off, up to [`MAX_UNAVAILABLE_WAIT`] in all). The
/// caller's rows wait for the answer, so none is lost or answered twice.
async fn with_retry<T, F, Fut>(what: &str, mut call: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let mut unavailable_for = std::time::Duration::ZERO;
    let mut backoff = std::time::Duration::from_millis(100);
    loop {
        match call().await {
            Ok(response) => return Ok(response.into_inner()),
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
                    _ => return Err(rpc_error(status, what)),
                }
            }
            Err(status)
                if status.code() == Code::Unavailable && unavailable_for < MAX_UNAVAILABLE_WAIT =>
            {
                tracing::warn!(
                    "{what}: server unavailable ({}); retrying in {:.1} s",
                    status.message(),
                    backoff.as_secs_f64()
                );
                tokio::time::sleep(backoff).await;
                unavailable_for += backoff;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
            }
            Err(status) => return Err(rpc_error(status, what)),
        }
    }
}

impl Session {
    /// A request carrying the declared purpose.
    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Ok(value) = self.options.purpose.parse() {
            request.metadata_mut().insert(PURPOSE_HEADER, value);
        }
        request
    }

    /// Connects, reads `ServerInfo`, checks the ciphersuite and pins the key and epoch.
    ///
    /// # Errors
    /// Unreachable server, unsupported ciphersuite, or a key that differs from the pin.
    pub async fn connect(options: ConnectOptions) -> Result<Self> {
        let mut endpoint = Endpoint::from_shared(options.server.clone()).with_context(|| {
            format!(
                "`{}` is not a server URL (e.g. http://127.0.0.1:50051)",
                options.server
            )
        })?;
        if let Some(tls) = &options.tls {
            endpoint = endpoint
                .tls_config(
                    tonic::transport::ClientTlsConfig::new()
                        .ca_certificate(tonic::transport::Certificate::from_pem(&tls.ca))
                        .identity(tonic::transport::Identity::from_pem(&tls.cert, &tls.key)),
                )
                .context("configuring TLS")?;
        }
        let channel = endpoint
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("connecting to {}", options.server))?;
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
                Err(e)
                    if e.downcast_ref::<crate::pin::OlderThanPinned>().is_some()
                        && waited < MAX_UNAVAILABLE_WAIT =>
                {
                    tracing::warn!("{e}; asking again in {:.1} s", backoff.as_secs_f64());
                    tokio::time::sleep(backoff).await;
                    waited += backoff;
                    backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
                }
                read => break read?,
            }
        };
        let core = Arc::new(Client::new(Mode::Voprf, pk));
        Ok(Self {
            grpc,
            info,
            core,
            options,
            pinned,
            pir: Arc::default(),
        })
    }

    /// Reads `ServerInfo`, checks the ciphersuite and pins the key and epoch.
    async fn read_and_pin(
        grpc: &mut MatchClient<Channel>,
        options: &ConnectOptions,
    ) -> Result<(ServerInfo, PublicKey, Pinned)> {
        let info = match Self::server_info(grpc).await {
            Ok(info) => info,
            // Plaintext HTTP/2 to a TLS port: the server's TLS alert reads
            // as an HTTP/2 protocol error.
            Err(s) if options.tls.is_none() && is_transport_error(&s) => {
                return Err(rpc_error(s, "reading the server's parameters").context(format!(
                    "{} did not speak plaintext HTTP/2; if it requires TLS, use an https:// URL with --tls-ca, --tls-cert and --tls-key",
                    options.server
                )))
            }
            Err(s) => return Err(rpc_error(s, "reading the server's parameters")),
        };
        if info.ciphersuite != SUITE_ID || info.oprf_mode != 1 {
            bail!(
                "the server speaks {} mode {}, this client only {SUITE_ID} VOPRF (mode 1)",
                info.ciphersuite,
                info.oprf_mode
            );
        }
        let pk = PublicKey::from_bytes(&info.public_key)
            .context("the server's public key is not a valid ristretto255 element")?;
        let history = info
            .key_history
            .iter()
            .map(|s| {
                Ok(KeyStep {
                    epoch: s.epoch,
                    public_key: PublicKey::from_bytes(&s.public_key)
                        .context("the server's key history holds an invalid key")?,
                    endorsement: s
                        .endorsement
                        .as_slice()
                        .try_into()
                        .context("the server's key history holds a malformed endorsement")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let pinned = pin::check(
            &options.server,
            &pk,
            info.key_epoch,
            &history,
            options.pin_key.as_deref(),
            &options.cache_dir,
        )?;
        if let Pinned::Rotated { from_epoch } = pinned {
            tracing::warn!(
                "{}: key rotated from epoch {from_epoch} to {}; the new key is endorsed by the pinned one and is now pinned",
                options.server,
                info.key_epoch
            );
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
                Err(s)
                    if s.code() == Code::Unavailable
                        && !is_transport_error(&s)
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
                Err(e) => {
                    let text = format!("{e:#}");
                    let starting = text.contains("unavailable") || text.contains("connecting to");
                    if !starting || started.elapsed() >= patience {
                        return Err(e);
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// A new session with the same options: after a key rotation, it reads
    /// the new key and epoch and follows the endorsed history from the pin.
    ///
    /// # Errors
    /// As [`Session::connect`].
    pub async fn reconnect(&self) -> Result<Self> {
        Self::connect(self.options.clone()).await
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
                bail!(
                    "the server refused key epoch {} as stale but still advertises it after {} s",
                    self.info.key_epoch,
                    waited.as_secs()
                );
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

    /// PRF outputs for encoded records, in order: blinded, sent in chunks of
    /// the server's `max_batch` with several in flight, proofs verified.
    ///
    /// # Errors
    /// RPC failures, a stale epoch, or a proof that does not verify.
    pub async fn evaluate(&self, inputs: Vec<Vec<u8>>) -> Result<Vec<Output>> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let max = (self.info.max_batch as usize).clamp(1, psi_core::proof::MAX_PROOF_BATCH);
        let mut chunks = Vec::new();
        let mut rest = inputs;
        while !rest.is_empty() {
            let tail = rest.split_off(rest.len().min(max));
            chunks.push(rest);
            rest = tail;
        }
        let results: Vec<Vec<Output>> = futures::stream::iter(chunks)
            .map(|chunk| self.evaluate_chunk(chunk))
            .buffered(self.options.concurrency.max(1))
            .try_collect()
            .await?;
        Ok(results.into_iter().flatten().collect())
    }

    async fn evaluate_chunk(&self, inputs: Vec<Vec<u8>>) -> Result<Vec<Output>> {
        let (inputs, state, blinded) = self.blind(inputs).await?;
        let message = EvaluateRequest {
            key_epoch: self.info.key_epoch,
            blinded_elements: pack(blinded.iter().map(|b| &b.0)),
        };
        let response = with_retry("evaluating", || {
            let mut grpc = self.grpc.clone();
            let request = self.request(message.clone());
            async move { grpc.evaluate(request).await }
        })
        .await?;
        self.finalize(
            state,
            inputs,
            response.key_epoch,
            &response.evaluated_elements,
            &response.proof,
        )
        .await
    }

    /// Blinds `inputs` on the rayon pool; returns them with the state and the blinded elements.
    async fn blind(
        &self,
        inputs: Vec<Vec<u8>>,
    ) -> Result<(Vec<Vec<u8>>, BlindState, Vec<BlindedElement>)> {
        let core = Arc::clone(&self.core);
        let blinding = self.options.blinding;
        let (inputs, state, blinded) = on_cpu(move || {
            let (state, blinded) = core.blind(&inputs, blinding, &mut OsRng)?;
            Ok::<_, psi_core::Error>((inputs, state, blinded))
        })
        .await??;
        Ok((inputs, state, blinded))
    }

    /// Checks an answer's epoch, verifies its proof and unblinds, on the rayon pool.
    async fn finalize(
        &self,
        state: BlindState,
        inputs: Vec<Vec<u8>>,
        epoch: u64,
        evaluated: &[u8],
        proof: &[u8],
    ) -> Result<Vec<Output>> {
        self.check_epoch(epoch)?;
        let evaluated = unpack_evaluated(evaluated)?;
        let proof = Proof::from_bytes(proof).context("the server's proof is malformed")?;
        let core = Arc::clone(&self.core);
        on_cpu(move || core.finalize(state, &inputs, &evaluated, &proof))
            .await?
            .context("verifying the server's evaluation")
    }

    fn check_epoch(&self, epoch: u64) -> Result<()> {
        if epoch != self.info.key_epoch {
            bail!(
                "the server answered under key epoch {epoch}, not the pinned epoch {}; refusing the answer",
                self.info.key_epoch
            );
        }
        Ok(())
    }

    /// Bucket mode: whether each record is in the registry, without a download.
    ///
    /// # Errors
    /// As [`Session::evaluate`].
    pub async fn bucket_check(&self, records: &[Record]) -> Result<Vec<bool>> {
        let p = u8::try_from(self.info.bucket_prefix_bits).unwrap_or(32);
        let max = (self.info.max_bucket_batch as usize).max(1);
        let mut answers = Vec::with_capacity(records.len());
        for chunk in records.chunks(max) {
            let inputs: Vec<Vec<u8>> = chunk.iter().map(Record::encode).collect();
            let buckets: Vec<u32> = chunk.iter().map(|r| r.bucket(p)).collect();
            let (inputs, state, blinded) = self.blind(inputs).await?;
            let message = BucketQueryRequest {
                key_epoch: self.info.key_epoch,
                blinded_elements: pack(blinded.iter().map(|b| &b.0)),
                buckets: buckets.clone(),
            };
            let response = with_retry("querying buckets", || {
                let mut grpc = self.grpc.clone();
                let request = self.request(message.clone());
                async move { grpc.bucket_query(request).await }
            })
            .await?;
            let outputs = self
                .finalize(
                    state,
                    inputs,
                    response.key_epoch,
                    &response.evaluated_elements,
                    &response.proof,
                )
                .await?;
            let mut tags_by_bucket = HashMap::new();
            for b in response.buckets {
                tags_by_bucket.insert(b.id, unpack_tags(&b.tags)?);
            }
            for (out, bucket) in outputs.iter().zip(&buckets) {
                let tags = tags_by_bucket
                    .get(bucket)
                    .ok_or_else(|| anyhow!("the server left out bucket {bucket}"))?;
                answers.push(tags.binary_search(&out.tag().0).is_ok());
            }
        }
        Ok(answers)
    }

    /// PIR mode: whether each record is in the registry; the server learns
    /// neither the records nor their buckets. The first check under a key
    /// epoch registers this client's public parameters (6-7.9 MB, once);
    /// each record then costs one query (16 KiB) and one answer (20 KiB per
    /// 8 KiB instance). An answer that fails its integrity check is an
    /// error, never a "no match".
    ///
    /// # Errors
    /// A server without PIR mode, RPC failures, a stale epoch, a proof or
    /// an answer that does not verify.
    pub async fn pir_check(&self, records: &[Record]) -> Result<Vec<bool>> {
        let info = self
            .info
            .pir
            .as_ref()
            .ok_or_else(|| anyhow!("the server does not offer PIR mode (ServerInfo lists {:?}); use --mode bucket or sync", self.info.modes))?;
        let shape = crate::pir::shape_of(info)?;
        let max = (info.max_batch as usize).max(1);
        let p = u8::try_from(self.info.bucket_prefix_bits).unwrap_or(32);
        let mut state = self.pir.lock().await;
        if state
            .as_ref()
            .is_none_or(|s| s.client.shape() != shape || s.epoch != self.info.key_epoch)
        {
            let dir = self.options.cache_dir.clone();
            let key = self.server_key_prefix();
            let epoch = self.info.key_epoch;
            *state =
                Some(on_cpu(move || crate::pir::PirState::open(&dir, &key, epoch, shape)).await??);
        }
        let state = state.as_mut().ok_or_else(|| anyhow!("PIR state missing"))?;
        let mut answers = Vec::with_capacity(records.len());
        for chunk in records.chunks(max) {
            let inputs: Vec<Vec<u8>> = chunk.iter().map(Record::encode).collect();
            let buckets: Vec<u32> = chunk.iter().map(|r| r.bucket(p)).collect();
            let client = Arc::clone(&state.client);
            let asked = buckets.clone();
            let queries = on_cpu(move || {
                asked
                    .iter()
                    .map(|&b| client.query(b))
                    .collect::<psi_pir::Result<Vec<_>>>()
            })
            .await??;
            let (inputs, blind_state, blinded) = self.blind(inputs).await?;
            let mut message = PirQueryRequest {
                key_epoch: self.info.key_epoch,
                keys_id: Vec::new(),
                blinded_elements: pack(blinded.iter().map(|b| &b.0)),
                queries,
            };
            let mut setups = 0;
            let response = loop {
                let Some(id) = state.keys_id.clone() else {
                    self.pir_setup(state, shape).await?;
                    setups += 1;
                    continue;
                };
                message.keys_id = id;
                let sent = with_retry("PIR query", || {
                    let mut grpc = self.grpc.clone();
                    let request = self.request(message.clone());
                    async move { grpc.pir_query(request).await }
                })
                .await;
                match sent {
                    Err(e)
                        if e.downcast_ref::<crate::pir::KeysUnknown>().is_some() && setups < 2 =>
                    {
                        tracing::info!("the server no longer holds this client's PIR parameters; sending them again");
                        state.keys_id = None;
                    }
                    other => break other?,
                }
            };
            let outputs = self
                .finalize(
                    blind_state,
                    inputs,
                    response.key_epoch,
                    &response.evaluated_elements,
                    &response.proof,
                )
                .await?;
            if response.answers.len() != buckets.len() {
                bail!(
                    "the server sent {} PIR answers for {} queries",
                    response.answers.len(),
                    buckets.len()
                );
            }
            let client = Arc::clone(&state.client);
            let epoch = response.key_epoch;
            let tags: Vec<u64> = outputs.iter().map(|o| o.tag().0).collect();
            let found = on_cpu(move || {
                buckets
                    .iter()
                    .zip(&response.answers)
                    .zip(&tags)
                    .map(|((&b, answer), &tag)| {
                        let fps = client.decode(b, epoch, answer)?;
                        Ok(client.contains(&fps, tag))
                    })
                    .collect::<psi_pir::Result<Vec<bool>>>()
            })
            .await?
            .context("reading the server's PIR answer (nothing is concluded from it)")?;
            answers.extend(found);
        }
        Ok(answers)
    }

    /// Registers this client's public parameters with the server.
    async fn pir_setup(
        &self,
        state: &mut crate::pir::PirState,
        shape: psi_pir::Shape,
    ) -> Result<()> {
        let started = std::time::Instant::now();
        let pp = on_cpu(state.public_parameters_task()).await??;
        let message = PirSetupRequest {
            key_epoch: self.info.key_epoch,
            nu1: shape.nu1.into(),
            nu2: shape.nu2.into(),
            public_parameters: pp,
        };
        let response = with_retry("registering PIR public parameters", || {
            let mut grpc = self.grpc.clone();
            let request = self.request(message.clone());
            async move { grpc.pir_setup(request).await }
        })
        .await?;
        tracing::info!(
            bytes = message.public_parameters.len(),
            ms = started.elapsed().as_millis() as u64,
            "PIR public parameters registered"
        );
        state.registered(response.keys_id)
    }

    fn server_key_prefix(&self) -> String {
        psi_core::PublicKey::from_bytes(&self.info.public_key)
            .map(|k| k.to_hex())
            .unwrap_or_default()
            .chars()
            .take(16)
            .collect()
    }

    /// Where this server's tag set is cached.
    #[must_use]
    pub fn cache_path(&self) -> PathBuf {
        let key = self.server_key_prefix();
        self.options.cache_dir.join(format!("tagset-{key}.bin"))
    }

    /// Fetches or refreshes the local tag set and replaces the cache
    /// atomically. With an intact cache of an older version the server sends
    /// the delta since that version; otherwise the cached shards' digests
    /// tell it which shards to send. Every shard is checked against the
    /// manifest: a damaged or truncated cache, or a delta that does not
    /// reproduce a shard, costs only a refetch of the shards that are wrong.
    ///
    /// # Errors
    /// RPC failures, a digest mismatch, or I/O errors.
    pub async fn sync(&self) -> Result<SyncOutcome> {
        let path = self.cache_path();
        let salvaged = std::fs::read(&path)
            .ok()
            .and_then(|bytes| TagSet::salvage(&bytes))
            .filter(|(h, _)| h.epoch == self.info.key_epoch);
        let intact: Option<TagSet> = salvaged.as_ref().and_then(|(header, shards)| {
            let shards: Option<Vec<Shard>> = shards.iter().cloned().collect();
            let shards = shards?;
            let digests: Vec<[u8; 32]> = shards.iter().map(|s| *s.digest()).collect();
            TagSet::from_parts(*header, shards, &digests).ok()
        });
        let damaged = salvaged.as_ref().map_or(0, |(_, shards)| {
            shards.iter().filter(|s| s.is_none()).count()
        });
        if damaged > 0 {
            tracing::warn!(
                "cached tag set {}: {damaged} damaged or missing shards; fetching only those",
                path.display()
            );
        }
        // An intact cache first asks for the delta alone, checked against
        // the root digest: no shard digests either way.
        let mut bytes_tried = 0;
        if let Some(set) = &intact {
            match self.sync_by_delta(set, &path).await? {
                ByDelta::Done(outcome) => return Ok(outcome),
                ByDelta::Fallback(bytes) => bytes_tried = bytes,
            }
        }
        let held: Vec<Option<Shard>> = salvaged.map(|(_, s)| s).unwrap_or_default();
        let first = self
            .fetch(
                intact.as_ref().map_or(0, |s| s.header().registry_version),
                &held,
                false,
            )
            .await?;
        let mut bytes_fetched = bytes_tried + first.bytes;
        let header = first.header;
        let digests = first.digests.clone();
        let same_params = |h: &TagSetHeader| h.params == header.params && h.epoch == header.epoch;
        // Start from what we hold: the cache patched by the delta, or the
        // cached shards; keep each only where it matches the manifest.
        let mut delta_applied = false;
        let base: Vec<Option<Shard>> = match (&first.delta, &intact) {
            (Some(delta), Some(set)) if same_params(set.header()) => {
                if delta.from_version != set.header().registry_version {
                    bail!(
                        "the server sent a delta from version {}, not the held {}",
                        delta.from_version,
                        set.header().registry_version
                    );
                }
                let added = unpack_tags(&delta.added)?;
                let removed = unpack_tags(&delta.removed)?;
                let patched = set
                    .apply_delta(&added, &removed, delta.to_version)
                    .context("applying the registry delta")?;
                delta_applied = true;
                patched.shards().iter().cloned().map(Some).collect()
            }
            // The set's parameters changed with the registry's size (or the
            // cache is gone): the delta cannot be applied; fetch the shards.
            (Some(_), _) => vec![None; digests.len()],
            (None, _)
                if held.len() == digests.len()
                    && intact.as_ref().is_none_or(|s| same_params(s.header())) =>
            {
                held
            }
            (None, _) => vec![None; digests.len()],
        };
        let mut shards: Vec<Option<Shard>> = base
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                s.filter(|s| digests.get(i) == Some(s.digest()))
                    .map(|s| Shard::new(&header, i, s.count(), s.data().to_vec()))
            })
            .collect();
        shards.resize(digests.len(), None);
        let mut fetched = 0;
        for data in first.shards {
            fetched += place(&mut shards, &header, data)?;
        }
        let missing = shards.iter().filter(|s| s.is_none()).count();
        if missing > 0 && first.delta.is_some() {
            // The delta did not reproduce some shards, or could not be
            // applied: fetch those.
            tracing::warn!(
                "{missing} shards differ from the manifest after the delta; fetching them"
            );
            let second = self.fetch(0, &shards, false).await?;
            if second.header != header || second.digests != digests {
                bail!("the registry changed during the sync; run it again");
            }
            bytes_fetched += second.bytes;
            for data in second.shards {
                fetched += place(&mut shards, &header, data)?;
            }
        }
        let shards: Vec<Shard> = shards
            .into_iter()
            .enumerate()
            .map(|(i, s)| s.ok_or_else(|| anyhow!("shard {i} is neither cached nor sent")))
            .collect::<Result<_>>()?;
        let total = shards.len();
        let set = TagSet::from_parts(header, shards, &digests).context("verifying the tag set")?;
        if set.root_digest().as_slice() != first.manifest.root_digest.as_slice() {
            bail!("the tag set's root digest does not match the manifest");
        }
        let unchanged = intact
            .as_ref()
            .is_some_and(|c| c.root_digest() == set.root_digest());
        if unchanged {
            // Confirmed current: the cache's age starts again.
            std::fs::File::options()
                .append(true)
                .open(&path)
                .and_then(|f| f.set_modified(std::time::SystemTime::now()))
                .with_context(|| format!("touching {}", path.display()))?;
        } else {
            std::fs::create_dir_all(&self.options.cache_dir)
                .with_context(|| format!("creating {}", self.options.cache_dir.display()))?;
            psi_files::atomic::write_atomically(&path, &set.to_bytes(), 0o600)?;
        }
        Ok(SyncOutcome {
            set,
            shards_fetched: fetched,
            shards_total: total,
            bytes_fetched,
            delta_applied,
        })
    }

    /// The cached tag set without contacting the server, if it was last
    /// confirmed current (synced) at most `max_age` ago.
    ///
    /// # Errors
    /// No usable cache for this key, or one older than `max_age`.
    pub fn cached(&self, max_age: std::time::Duration) -> Result<TagSet> {
        let path = self.cache_path();
        let bytes = std::fs::read(&path)
            .with_context(|| format!("no cached tag set at {}: sync first", path.display()))?;
        let set = TagSet::from_bytes(&bytes).with_context(|| {
            format!(
                "the cached tag set {} is damaged: sync again",
                path.display()
            )
        })?;
        if set.header().epoch != self.info.key_epoch {
            bail!(
                "the cached tag set is of key epoch {}, the server is at {}: sync again",
                set.header().epoch,
                self.info.key_epoch
            );
        }
        let age = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .unwrap_or_default();
        if age > max_age {
            bail!(
                "the cached tag set (registry version {}) was last confirmed {} ago, more than the maximum age of {}; sync again",
                set.header().registry_version,
                humantime::format_duration(std::time::Duration::from_secs(age.as_secs())),
                humantime::format_duration(max_age)
            );
        }
        Ok(set)
    }

    /// Brings the intact cached `set` up to date with a delta checked
    /// against the manifest's root digest (a `root_only` exchange: no shard
    /// digests either way), or says how many bytes the try cost when the
    /// server has no delta for it or the patched set does not match.
    async fn sync_by_delta(&self, set: &TagSet, path: &Path) -> Result<ByDelta> {
        let held_version = set.header().registry_version;
        let reply = self.fetch(held_version, &[], true).await?;
        let fallback = ByDelta::Fallback(reply.bytes);
        let same_params =
            set.header().params == reply.header.params && set.header().epoch == reply.header.epoch;
        let patched = match &reply.delta {
            None if reply.header == *set.header()
                && set.root_digest().as_slice() == reply.manifest.root_digest.as_slice() =>
            {
                // Nothing changed: no delta to send, the set is current.
                set.clone()
            }
            Some(delta) if same_params && delta.from_version == held_version => {
                let added = unpack_tags(&delta.added)?;
                let removed = unpack_tags(&delta.removed)?;
                match set.apply_delta(&added, &removed, delta.to_version) {
                    Ok(p) => p,
                    Err(_) => return Ok(fallback),
                }
            }
            _ => return Ok(fallback),
        };
        if patched.header() != &reply.header
            || patched.root_digest().as_slice() != reply.manifest.root_digest.as_slice()
        {
            tracing::warn!(
                "the delta did not reproduce the server's tag set; fetching the shards that differ"
            );
            return Ok(fallback);
        }
        let delta_applied = reply.delta.is_some();
        if delta_applied {
            std::fs::create_dir_all(&self.options.cache_dir)
                .with_context(|| format!("creating {}", self.options.cache_dir.display()))?;
            psi_files::atomic::write_atomically(path, &patched.to_bytes(), 0o600)?;
        } else {
            // Confirmed current: the cache's age starts again.
            std::fs::File::options()
                .append(true)
                .open(path)
                .and_then(|f| f.set_modified(std::time::SystemTime::now()))
                .with_context(|| format!("touching {}", path.display()))?;
        }
        let total = patched.shards().len();
        Ok(ByDelta::Done(SyncOutcome {
            set: patched,
            shards_fetched: 0,
            shards_total: total,
            bytes_fetched: reply.bytes,
            delta_applied,
        }))
    }

    /// One `SyncTagSet` exchange: the manifest, then the delta or the shards.
    async fn fetch(
        &self,
        held_version: u64,
        held: &[Option<Shard>],
        root_only: bool,
    ) -> Result<Fetched> {
        let held_digests = if held.is_empty() {
            Vec::new()
        } else {
            pack(
                held.iter()
                    .map(|s| s.as_ref().map_or(&[0u8; 32], Shard::digest)),
            )
        };
        let message = SyncTagSetRequest {
            key_epoch: self.info.key_epoch,
            held_digests,
            held_version,
            root_only,
        };
        let mut stream = with_retry("syncing the tag set", || {
            let mut grpc = self.grpc.clone();
            let request = self.request(message.clone());
            async move { grpc.sync_tag_set(request).await }
        })
        .await?;
        let first = stream
            .message()
            .await
            .map_err(|s| rpc_error(s, "syncing the tag set"))?
            .and_then(|m| m.item);
        let Some(sync_tag_set_response::Item::Manifest(manifest)) = first else {
            bail!("the server's sync stream did not start with a manifest");
        };
        let mut bytes = prost::Message::encoded_len(&manifest) as u64;
        let (header, digests) = manifest_parts(&manifest)?;
        self.check_epoch(header.epoch)?;
        let mut shards = Vec::new();
        let mut delta = None;
        while let Some(msg) = stream
            .message()
            .await
            .map_err(|s| rpc_error(s, "syncing the tag set"))?
        {
            match msg.item {
                Some(sync_tag_set_response::Item::Shard(data)) => {
                    bytes += prost::Message::encoded_len(&data) as u64;
                    shards.push(data);
                }
                Some(sync_tag_set_response::Item::Delta(d))
                    if delta.is_none() && shards.is_empty() =>
                {
                    bytes += prost::Message::encoded_len(&d) as u64;
                    if d.to_version != header.registry_version {
                        bail!(
                            "the server's delta leads to version {}, its manifest is of {}",
                            d.to_version,
                            header.registry_version
                        );
                    }
                    delta = Some(d);
                }
                _ => bail!("unexpected message in the sync stream"),
            }
        }
        Ok(Fetched {
            manifest,
            header,
            digests,
            shards,
            delta,
            bytes,
        })
    }
}

/// How a sync by delta ended.
enum ByDelta {
    /// The cache is current.
    Done(SyncOutcome),
    /// It could not be brought up to date this way; the bytes the try cost.
    Fallback(u64),
}

/// What one sync exchange brought.
struct Fetched {
    manifest: TagSetManifest,
    header: TagSetHeader,
    digests: Vec<[u8; 32]>,
    shards: Vec<ShardData>,
    delta: Option<TagSetDelta>,
    bytes: u64,
}

/// Puts a received shard in its slot; returns 1.
fn place(shards: &mut [Option<Shard>], header: &TagSetHeader, data: ShardData) -> Result<usize> {
    let i = data.index as usize;
    let slot = shards
        .get_mut(i)
        .ok_or_else(|| anyhow!("the server sent shard {i}, beyond the manifest"))?;
    *slot = Some(Shard::new(header, i, data.count, data.data));
    Ok(1)
}

/// Runs CPU-heavy work on the rayon pool and awaits it.
pub(crate) async fn on_cpu<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    rayon::spawn(move || {
        let _ = tx.send(work());
    });
    rx.await.map_err(|_| anyhow!("a worker thread failed"))
}
