//! `psi-client serve`: the institution's HTTP/JSON gateway. One warm
//! session with the operator (mutual TLS, pinned key, rotations followed on
//! a schedule), and a local HTTP API any system can call:
//!
//! - `POST /v1/check`: `{name, id, purpose?, mode?}` -> `{result, error,
//!   request_id, registry_version, key_epoch}` (sync mode against the tag
//!   set the gateway holds in memory, brought up to date at every renewal
//!   of the session: answers are at most `refresh_interval` behind);
//! - `POST /v1/batch`: `{rows: [{name, id}, ...], purpose?, mode?}` ->
//!   `{results: [{result, error}], request_ids, registry_version, key_epoch}`;
//!   or a CSV (`text/csv`) or `.xlsx` upload (`?purpose=&mode=`), answered
//!   as `psi-client batch` answers the file and sent back as a file;
//! - `GET /v1/status`, `GET /healthz`, `GET /metrics`, `GET /openapi.json`
//!   (`docs/openapi.json`, checked against [`ROUTES`] by a test);
//! - `GET /`: the front-desk page: one check at a time, PIR mode, the answer
//!   in Chinese and English; nothing stored in the browser.
//!
//! Every `/v1/` call names its system (`Authorization: Bearer TOKEN`, the
//! token's SHA-256 listed in the tokens file) and the person asking
//! (`X-Staff-Id`); both are required unless the gateway runs with
//! `--insecure-no-auth`. Every check is one record in the institution's
//! query log ([`crate::querylog`]) before its answer is returned, and its
//! request carries the commitment to that record; a call runs to its end
//! (and is recorded) even when its caller hangs up. Errors are JSON
//! `{"error": "..."}` with a status a caller can act on.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{RwLock, Semaphore};

use crate::check::{check, CheckOutcome};
use crate::querylog::{LogTarget, QueryLog};
use crate::session::{ConnectOptions, Session};
use crate::QueryMode;

/// The routes, as `docs/openapi.json` documents them.
pub const ROUTES: [(&str, &str); 7] = [
    ("get", "/"),
    ("post", "/v1/check"),
    ("post", "/v1/batch"),
    ("get", "/v1/status"),
    ("get", "/healthz"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
];

/// The OpenAPI 3 document of the API.
pub const OPENAPI: &str = include_str!("../../../docs/openapi.json");

/// The front-desk page (its purposes filled in where it says `<!--PURPOSES-->`).
const PAGE: &str = include_str!("gateway-page.html");

/// The front-desk page for `purposes`, and its Content-Security-Policy:
/// its one script allowed by hash, requests to this gateway only, nothing
/// framed, nothing else loaded.
fn page(purposes: &[String]) -> (String, String) {
    let list = serde_json::to_string(purposes).unwrap_or_else(|_| "[]".into());
    let html = PAGE.replace(
        "<!--PURPOSES-->",
        &format!("<script type=\"application/json\" id=\"purposes\">{list}</script>"),
    );
    let script = PAGE
        .rsplit_once("<script>")
        .and_then(|(_, rest)| rest.split_once("</script>"))
        .map_or("", |(body, _)| body);
    let hash = base64(&Sha256::digest(script.as_bytes()));
    let csp = format!(
        "default-src 'none'; script-src 'sha256-{hash}'; style-src 'unsafe-inline'; connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
    );
    (html, csp)
}

/// The gateway's settings.
#[derive(Clone)]
pub struct GatewaySettings {
    /// Where to listen (loopback by default).
    pub listen: SocketAddr,
    /// Callers by the SHA-256 (hex) of their token; `None`: no
    /// authentication (`--insecure-no-auth`, for a demonstration only).
    pub tokens: Option<HashMap<String, String>>,
    /// The query log: an SQLite file, or a PostgreSQL URL.
    pub query_log: PathBuf,
    /// Purposes a caller may declare; the first is the default.
    pub purposes: Vec<String>,
    /// The mode of a check that names none.
    pub default_mode: QueryMode,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Most rows in one `/v1/batch`.
    pub max_batch_rows: usize,
    /// Calls answered at once; more get 429.
    pub max_concurrent: usize,
    /// Time for one call's answer; past it, 504.
    pub request_timeout: Duration,
    /// Largest CSV or `.xlsx` upload to `/v1/batch`, in bytes.
    pub max_upload_bytes: usize,
    /// Most rows in one upload.
    pub max_upload_rows: u64,
    /// Time for an upload's answers; past it, 504 (the rows asked are
    /// recorded all the same).
    pub upload_timeout: Duration,
    /// How often the session is renewed (rotations followed, a restarted
    /// server reached again).
    pub refresh_interval: Duration,
}

impl std::fmt::Debug for GatewaySettings {
    /// Without the tokens' digests or the query log's URL (it may carry a
    /// password).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewaySettings")
            .field("listen", &self.listen)
            .field("callers", &self.tokens.as_ref().map(HashMap::len))
            .field("query_log", &crate::querylog::place(&self.query_log))
            .field("purposes", &self.purposes)
            .field("default_mode", &self.default_mode)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_batch_rows", &self.max_batch_rows)
            .field("max_concurrent", &self.max_concurrent)
            .field("request_timeout", &self.request_timeout)
            .field("max_upload_bytes", &self.max_upload_bytes)
            .field("max_upload_rows", &self.max_upload_rows)
            .field("upload_timeout", &self.upload_timeout)
            .field("refresh_interval", &self.refresh_interval)
            .finish()
    }
}

impl GatewaySettings {
    /// The defaults for a session's purpose, listening on `listen`.
    #[must_use]
    pub fn new(listen: SocketAddr, purpose: &str, query_log: PathBuf) -> Self {
        Self {
            listen,
            tokens: Some(HashMap::new()),
            query_log,
            purposes: vec![purpose.to_string()],
            default_mode: QueryMode::Bucket,
            max_body_bytes: 64 << 10,
            max_batch_rows: 1000,
            max_concurrent: 32,
            request_timeout: Duration::from_secs(30),
            max_upload_bytes: 32 << 20,
            max_upload_rows: 200_000,
            upload_timeout: Duration::from_secs(600),
            refresh_interval: Duration::from_secs(60),
        }
    }
}

/// Reads a tokens file: one `NAME SHA256HEX` line per calling system
/// (`psi-client token new --name NAME` makes a token and its line).
///
/// # Errors
/// Unreadable, a malformed line, a repeated name.
pub fn load_tokens(path: &Path) -> Result<HashMap<String, String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = HashMap::new();
    for (n, line) in text.lines().map(str::trim).enumerate() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || format!("{} line {}: not `NAME SHA256HEX`", path.display(), n + 1);
        let mut parts = line.split_whitespace();
        let (Some(name), Some(digest), None) = (parts.next(), parts.next(), parts.next()) else {
            bail!(bad());
        };
        if digest.len() != 64
            || !digest.bytes().all(|b| b.is_ascii_hexdigit())
            || !valid_label(name)
        {
            bail!(bad());
        }
        if out.values().any(|v| v == name) {
            bail!("{}: {name} is listed twice", path.display());
        }
        out.insert(digest.to_ascii_lowercase(), name.to_string());
    }
    Ok(out)
}

/// A new random token and its tokens-file line for `name`.
///
/// # Errors
/// A name that is not 1 to 64 of `A-Z a-z 0-9 . _ -`.
pub fn new_token(name: &str) -> Result<(String, String)> {
    if !valid_label(name) {
        bail!("a caller's name is 1 to 64 of A-Z a-z 0-9 . _ -");
    }
    let mut raw = [0u8; 32];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut raw);
    let token = hex::encode(raw);
    let line = format!("{name} {}", hex::encode(Sha256::digest(token.as_bytes())));
    Ok((token, line))
}

fn valid_label(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    route: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

struct Gateway {
    settings: GatewaySettings,
    session: RwLock<Session>,
    /// Sync mode's tag set, decoded, with its key epoch: synced at the
    /// first sync-mode check and again at every renewal of the session.
    tags: RwLock<Option<(u64, Arc<psi_core::TagLookup>)>>,
    log: QueryLog,
    slots: Arc<Semaphore>,
    registry: Registry,
    calls: Family<CallLabels, Counter>,
    latency: Family<RouteLabels, Histogram>,
}

/// A gateway running in this process.
#[derive(Debug)]
pub struct RunningGateway {
    /// The bound address.
    pub local_addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl RunningGateway {
    /// Stops accepting, finishes the calls in flight, and waits.
    ///
    /// # Errors
    /// If serving failed.
    pub async fn shutdown(mut self) -> Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.await.context("gateway task")?
    }
}

/// Connects to the operator, opens the query log, binds and serves.
///
/// # Errors
/// The operator unreachable (at start the gateway waits up to a minute),
/// the query log unusable, the address unbindable.
pub async fn start(options: ConnectOptions, settings: GatewaySettings) -> Result<RunningGateway> {
    if settings.purposes.is_empty() {
        bail!("the gateway needs at least one allowed purpose");
    }
    let session = Session::connect_when_ready(options, Duration::from_secs(60)).await?;
    let log = QueryLog::opened(&settings.query_log).await?;
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("binding {}", settings.listen))?;
    let local_addr = listener.local_addr()?;
    let mut registry = Registry::with_prefix("psi_gateway");
    let calls = Family::<CallLabels, Counter>::default();
    let latency = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
        Histogram::new(exponential_buckets(0.000_5, 2.0, 16))
    });
    registry.register("calls", "Calls by route and HTTP status", calls.clone());
    registry.register(
        "call_duration_seconds",
        "Time from a call's receipt to its answer, by route",
        latency.clone(),
    );
    let gateway = Arc::new(Gateway {
        slots: Arc::new(Semaphore::new(settings.max_concurrent.max(1))),
        session: RwLock::new(session),
        tags: RwLock::new(None),
        log,
        registry,
        calls,
        latency,
        settings,
    });
    let refresher = tokio::spawn(refresh(Arc::clone(&gateway)));
    let app = Router::new()
        .route("/", get(page_route))
        .route("/v1/check", post(check_route))
        .route(
            "/v1/batch",
            post(batch_route).layer(DefaultBodyLimit::max(
                gateway
                    .settings
                    .max_upload_bytes
                    .max(gateway.settings.max_body_bytes),
            )),
        )
        .route("/v1/status", get(status_route))
        .route("/healthz", get(health_route))
        .route("/metrics", get(metrics_route))
        .route("/openapi.json", get(openapi_route))
        .layer(DefaultBodyLimit::max(gateway.settings.max_body_bytes))
        .with_state(Arc::clone(&gateway));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = rx.await;
            })
            .await
            .context("serving");
        refresher.abort();
        served
    });
    tracing::info!(addr = %local_addr, "gateway listening");
    Ok(RunningGateway {
        local_addr,
        shutdown: Some(tx),
        task,
    })
}

/// Renews the session on a schedule: a rotation is followed along its
/// endorsements, a restarted server is reached again; a failure keeps the
/// session in use and is logged.
async fn refresh(g: Arc<Gateway>) {
    let mut tick = tokio::time::interval(g.settings.refresh_interval);
    tick.tick().await;
    loop {
        tick.tick().await;
        let current = g.session.read().await.clone();
        match current.reconnect().await {
            Ok(next) => *g.session.write().await = next,
            Err(e) => tracing::warn!("renewing the session with the operator: {e}"),
        }
        // Sync mode's tag set, once a check has asked for it: brought up
        // to date (a delta, usually) so that checks need no sync of their own.
        if g.tags.read().await.is_some() {
            let session = g.session.read().await.clone();
            if let Err(e) = g.sync_tags(&session).await {
                tracing::warn!("refreshing the tag set: {e}");
            }
        }
    }
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response {
    let text = serde_json::to_string(body).unwrap_or_else(|_| "{}".to_string());
    (status, [(header::CONTENT_TYPE, "application/json")], text).into_response()
}

/// A refusal: its status and what to tell the caller.
struct Refusal(StatusCode, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        #[derive(Serialize)]
        struct Body {
            error: String,
        }
        json(self.0, &Body { error: self.1 })
    }
}

fn refuse(status: StatusCode, message: impl Into<String>) -> Refusal {
    Refusal(status, message.into())
}

/// The calling system and the person asking.
struct Caller {
    system: String,
    staff: String,
}

impl Gateway {
    fn caller(&self, headers: &HeaderMap) -> Result<Caller, Refusal> {
        let Some(tokens) = &self.settings.tokens else {
            let staff = headers
                .get("x-staff-id")
                .and_then(|v| v.to_str().ok())
                .filter(|s| valid_label(s))
                .unwrap_or("unnamed");
            return Ok(Caller {
                system: "local".into(),
                staff: staff.into(),
            });
        };
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                refuse(
                    StatusCode::UNAUTHORIZED,
                    "an `Authorization: Bearer TOKEN` header is required (a token from `psi-client token new`)",
                )
            })?;
        let digest = hex::encode(Sha256::digest(token.trim().as_bytes()));
        let system = tokens
            .get(&digest)
            .ok_or_else(|| refuse(StatusCode::UNAUTHORIZED, "unknown token"))?;
        let staff = headers
            .get("x-staff-id")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                refuse(
                    StatusCode::BAD_REQUEST,
                    "an `X-Staff-Id` header naming who asks is required",
                )
            })?;
        if !valid_label(staff) {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "X-Staff-Id is 1 to 64 of A-Z a-z 0-9 . _ -",
            ));
        }
        Ok(Caller {
            system: system.clone(),
            staff: staff.to_string(),
        })
    }

    fn purpose(&self, asked: Option<&str>) -> Result<String, Refusal> {
        match asked {
            None => Ok(self.settings.purposes.first().cloned().unwrap_or_default()),
            Some(p) if self.settings.purposes.iter().any(|a| a == p) => Ok(p.to_string()),
            Some(p) => Err(refuse(
                StatusCode::BAD_REQUEST,
                format!(
                    "purpose `{p}` is not one this gateway allows ({})",
                    self.settings.purposes.join(", ")
                ),
            )),
        }
    }

    fn mode(&self, asked: Option<&str>) -> Result<QueryMode, Refusal> {
        match asked {
            None => Ok(self.settings.default_mode),
            Some("sync") => Ok(QueryMode::Sync),
            Some("bucket") => Ok(QueryMode::Bucket),
            Some("pir") => Ok(QueryMode::Pir),
            Some(m) => Err(refuse(
                StatusCode::BAD_REQUEST,
                format!("mode `{m}` is not sync, bucket or pir"),
            )),
        }
    }

    /// The session for one call, with its own request-id record and the
    /// call's purpose.
    async fn session_for(&self, purpose: &str) -> Session {
        self.session
            .read()
            .await
            .with_own_request_ids()
            .with_purpose(purpose)
    }

    /// Syncs the tag set and keeps it decoded.
    async fn sync_tags(&self, session: &Session) -> Result<Arc<psi_core::TagLookup>, crate::Error> {
        let synced = session.sync().await?;
        let epoch = synced.set.header().epoch;
        let lookup = Arc::new(synced.set.lookup().map_err(crate::Error::lookup)?);
        *self.tags.write().await = Some((epoch, Arc::clone(&lookup)));
        Ok(lookup)
    }

    /// A check: in sync mode against the tag set held in memory (synced at
    /// most `refresh_interval` ago), so that a check is one evaluation;
    /// otherwise as `psi-client check`.
    async fn check(
        &self,
        session: &Session,
        name: &str,
        id: &str,
        mode: QueryMode,
    ) -> Result<CheckOutcome, crate::Error> {
        if mode != QueryMode::Sync {
            return check(session, name, id, mode).await;
        }
        let record = match psi_core::Record::parse(name, id, psi_core::CivilDate::today()) {
            Ok(r) => r,
            Err(e) => return Ok(CheckOutcome::Invalid(e.to_string())),
        };
        let held = self
            .tags
            .read()
            .await
            .clone()
            .filter(|(epoch, _)| *epoch == session.info().key_epoch);
        let lookup = match held {
            Some((_, l)) => l,
            None => self.sync_tags(session).await?,
        };
        match session.evaluate(vec![record.encode()]).await {
            Ok(out) => Ok(if out.first().is_some_and(|o| lookup.contains(o.tag())) {
                CheckOutcome::Match
            } else {
                CheckOutcome::NoMatch
            }),
            // A rotation: the library follows it (and syncs the new set);
            // the next renewal brings the gateway's session and set along.
            Err(e) if e.is_stale_epoch() => check(session, name, id, mode).await,
            Err(e) => Err(e),
        }
    }

    /// One of the `max_concurrent` slots, or a 429.
    fn slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Refusal> {
        Arc::clone(&self.slots).try_acquire_owned().map_err(|_| {
            refuse(
                StatusCode::TOO_MANY_REQUESTS,
                "the gateway is answering max_concurrent calls; retry shortly",
            )
        })
    }

    /// `work` within the request timeout, its failure as the status a
    /// caller acts on.
    async fn within_timeout<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, crate::Error>>,
    ) -> Result<T, Refusal> {
        match tokio::time::timeout(self.settings.request_timeout, work).await {
            Err(_) => Err(refuse(
                StatusCode::GATEWAY_TIMEOUT,
                "no answer within the gateway's request_timeout",
            )),
            Ok(Err(e)) if e.is_not_reached() => Err(refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the operator's server cannot be reached now: {e}"),
            )),
            Ok(Err(e)) => Err(refuse(StatusCode::BAD_GATEWAY, format!("{e}"))),
            Ok(Ok(v)) => Ok(v),
        }
    }

    /// Where a call's checks are recorded, and as whom.
    fn target(&self, caller: &Caller, purpose: &str) -> LogTarget {
        LogTarget {
            log: self.log.clone(),
            staff: caller.staff.clone(),
            caller: caller.system.clone(),
            purpose: purpose.into(),
        }
    }

    /// The response to a call on `route`, counted and timed.
    fn respond<T: Serialize>(
        &self,
        route: &str,
        started: Instant,
        result: Result<T, Refusal>,
    ) -> Response {
        let response = match result {
            Ok(r) => json(StatusCode::OK, &r),
            Err(refusal) => refusal.into_response(),
        };
        self.record(route, response.status(), started);
        response
    }

    fn record(&self, route: &str, status: StatusCode, started: Instant) {
        self.calls
            .get_or_create(&CallLabels {
                route: route.into(),
                status: status.as_u16().to_string(),
            })
            .inc();
        self.latency
            .get_or_create(&RouteLabels {
                route: route.into(),
            })
            .observe(started.elapsed().as_secs_f64());
    }
}

/// The wire name of a mode, as the query log records it.
#[must_use]
pub fn mode_name(mode: QueryMode) -> &'static str {
    match mode {
        QueryMode::Sync => "sync",
        QueryMode::Bucket => "bucket",
        QueryMode::Pir => "pir",
    }
}

/// A request's body, or why it cannot be read.
fn body_of(body: Result<Bytes, BytesRejection>) -> Result<Bytes, Refusal> {
    body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                "the request body is over the gateway's limit for this route (max_body_bytes, or max_upload_bytes for /v1/batch)",
            )
        } else {
            refuse(r.status(), r.body_text())
        }
    })
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, Refusal> {
    serde_json::from_slice(body).map_err(|e| {
        refuse(
            StatusCode::BAD_REQUEST,
            format!("the body is not the JSON this route takes: {e}"),
        )
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckRequest {
    name: String,
    id: String,
    purpose: Option<String>,
    mode: Option<String>,
}

#[derive(Serialize)]
struct CheckResponse {
    result: &'static str,
    error: Option<String>,
    request_id: Option<String>,
    registry_version: u64,
    key_epoch: u64,
}

async fn check_route(
    State(g): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let result = check_call(g.clone(), &headers, body).await;
    g.respond("/v1/check", started, result)
}

/// The query log could not record a call: nothing is answered.
fn unrecorded(e: &anyhow::Error) -> Refusal {
    tracing::error!("query log: {e:#}");
    refuse(
        StatusCode::SERVICE_UNAVAILABLE,
        "the query log cannot record this now; nothing was answered",
    )
}

/// Runs `work` as a task of its own: a caller that hangs up or times out
/// does not cut it short, so what it asked the operator is recorded.
async fn detached<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, Refusal>> + Send + 'static,
) -> Result<T, Refusal> {
    tokio::spawn(work)
        .await
        .map_err(|_| refuse(StatusCode::INTERNAL_SERVER_ERROR, "the call failed"))?
}

async fn check_call(
    g: Arc<Gateway>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<CheckResponse, Refusal> {
    let caller = g.caller(headers)?;
    let req: CheckRequest = parse(&body_of(body)?)?;
    let purpose = g.purpose(req.purpose.as_deref())?;
    let mode = g.mode(req.mode.as_deref())?;
    let slot = g.slot()?;
    detached(async move {
        let _slot = slot;
        let session = g.session_for(&purpose).await;
        let target = g.target(&caller, &purpose);
        let (outcome, request_id) = target
            .check(&session, &req.name, &req.id, mode, |s| {
                let g = &g;
                let req = &req;
                async move {
                    g.within_timeout(g.check(&s, &req.name, &req.id, mode))
                        .await
                }
            })
            .await
            .map_err(|e| unrecorded(&e))?;
        let outcome = outcome?;
        let info = session.info();
        Ok(CheckResponse {
            result: outcome.result(),
            error: outcome.reason().map(str::to_string),
            request_id,
            registry_version: info.registry_version,
            key_epoch: info.key_epoch,
        })
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchRequest {
    rows: Vec<Row>,
    purpose: Option<String>,
    mode: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Row {
    name: String,
    id: String,
}

#[derive(Serialize)]
struct RowAnswer {
    result: &'static str,
    error: Option<String>,
}

#[derive(Serialize)]
struct BatchResponse {
    results: Vec<RowAnswer>,
    request_ids: Option<(String, String)>,
    registry_version: u64,
    key_epoch: u64,
}

/// Where a file upload's purpose and mode are given: `?purpose=&mode=`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct BatchQuery {
    purpose: Option<String>,
    mode: Option<String>,
}

/// The kinds of file `/v1/batch` takes, by `Content-Type`, and the file
/// name their answers come back as.
const UPLOADS: [(&str, &str); 2] = [
    ("text/csv", "answers.csv"),
    (
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        "answers.xlsx",
    ),
];

async fn batch_route(
    State(g): State<Arc<Gateway>>,
    headers: HeaderMap,
    query: Result<Query<BatchQuery>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase());
    let response = match content_type.as_deref() {
        None | Some("application/json") => match batch_call(Arc::clone(&g), &headers, body).await
        {
            Ok(r) => json(StatusCode::OK, &r),
            Err(refusal) => refusal.into_response(),
        },
        Some(kind) => match UPLOADS.iter().find(|(k, _)| *k == kind) {
            Some(&(kind, file_name)) => {
                upload_call(Arc::clone(&g), &headers, query, body, (kind, file_name))
                    .await
                    .unwrap_or_else(IntoResponse::into_response)
            }
            None => refuse(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "/v1/batch takes application/json, text/csv or an .xlsx workbook ({}), not {kind}",
                    UPLOADS[1].0
                ),
            )
            .into_response(),
        },
    };
    g.record("/v1/batch", response.status(), started);
    response
}

/// Waits for detached `work` at most `limit`: past it the caller gets 504
/// and the work goes on to record what it asked.
async fn awaited<T: Send + 'static>(
    limit: Duration,
    work: impl std::future::Future<Output = Result<T, Refusal>> + Send + 'static,
) -> Result<T, Refusal> {
    tokio::time::timeout(limit, detached(work))
        .await
        .unwrap_or_else(|_| {
            Err(refuse(
                StatusCode::GATEWAY_TIMEOUT,
                "no answer within the gateway's time limit for this call",
            ))
        })
}

/// A batch that failed after its input was accepted, as the status a
/// caller acts on.
fn batch_failed(e: &anyhow::Error) -> Refusal {
    match e.downcast_ref::<crate::Error>() {
        Some(e) if e.is_not_reached() => refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the operator's server cannot be reached now: {e}"),
        ),
        _ => refuse(StatusCode::BAD_GATEWAY, format!("{e:#}")),
    }
}

async fn batch_call(
    g: Arc<Gateway>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<BatchResponse, Refusal> {
    let caller = g.caller(headers)?;
    let body = body_of(body)?;
    if body.len() > g.settings.max_body_bytes {
        return Err(refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            "the request body is over the gateway's max_body_bytes",
        ));
    }
    let req: BatchRequest = parse(&body)?;
    if req.rows.is_empty() || req.rows.len() > g.settings.max_batch_rows {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            format!(
                "a batch holds 1 to max_batch_rows = {} rows, not {}",
                g.settings.max_batch_rows,
                req.rows.len()
            ),
        ));
    }
    let purpose = g.purpose(req.purpose.as_deref())?;
    let mode = g.mode(req.mode.as_deref())?;
    let slot = g.slot()?;
    let limit = g.settings.request_timeout;
    awaited(limit, async move {
        let _slot = slot;
        let session = g.session_for(&purpose).await;
        let target = g.target(&caller, &purpose);
        let pairs: Vec<(&str, &str)> = req
            .rows
            .iter()
            .map(|r| (r.name.as_str(), r.id.as_str()))
            .collect();
        let opts = crate::batch::PairOptions {
            mode,
            max_cache_age: g.settings.refresh_interval,
            ..crate::batch::PairOptions::default()
        };
        let (answers, summary) =
            crate::batch::answer_pairs_logged(&session, &pairs, &opts, Some(&target))
                .await
                .map_err(|e| batch_failed(&e))?;
        Ok(BatchResponse {
            results: answers
                .iter()
                .map(|a| RowAnswer {
                    result: a.result(),
                    error: a.reason().map(str::to_string),
                })
                .collect(),
            request_ids: summary.request_ids,
            registry_version: summary.registry_version,
            key_epoch: summary.key_epoch,
        })
    })
    .await
}

/// A CSV or `.xlsx` upload, answered as `psi-client batch` answers a file
/// (the same row contract: the input's columns plus `result` and `error`),
/// every row in the query log, the answered file sent back.
async fn upload_call(
    g: Arc<Gateway>,
    headers: &HeaderMap,
    query: Result<Query<BatchQuery>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
    (kind, file_name): (&'static str, &'static str),
) -> Result<Response, Refusal> {
    let caller = g.caller(headers)?;
    let Query(query) = query.map_err(|r| {
        refuse(
            StatusCode::BAD_REQUEST,
            format!("an upload's query is `?purpose=&mode=`: {}", r.body_text()),
        )
    })?;
    let body = body_of(body)?;
    let purpose = g.purpose(query.purpose.as_deref())?;
    let mode = g.mode(query.mode.as_deref())?;
    let slot = g.slot()?;
    let limit = g.settings.upload_timeout;
    let max_rows = g.settings.max_upload_rows;
    awaited(limit, async move {
        let _slot = slot;
        let failed = |what: &str, e: std::io::Error| {
            tracing::error!("upload: {what}: {e}");
            refuse(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the upload could not be stored",
            )
        };
        // A private directory (0700), the upload in it 0600: it holds pairs.
        let dir = tempfile::tempdir().map_err(|e| failed("a directory", e))?;
        let extension = if kind == UPLOADS[0].0 { "csv" } else { "xlsx" };
        let input = dir.path().join(format!("upload.{extension}"));
        let output = dir.path().join(file_name);
        write_private(&input, &body).map_err(|e| failed("writing", e))?;
        drop(body);
        let opts = crate::batch::BatchOptions {
            input,
            output: output.clone(),
            mode,
            chunk_rows: 4096,
            file: crate::batch::FileFormat::default(),
            chunks_in_flight: 2,
            progress: false,
            resume: false,
            max_cache_age: g.settings.refresh_interval,
            no_sync: false,
        };
        let rows = crate::batch::count_rows(&opts).await.map_err(|e| {
            refuse(
                StatusCode::BAD_REQUEST,
                format!("the upload is not a batch file this gateway reads: {e:#}"),
            )
        })?;
        if rows == 0 {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "the upload holds no rows under its header",
            ));
        }
        if rows > max_rows {
            return Err(refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("an upload holds at most max_upload_rows = {max_rows} rows, not {rows}"),
            ));
        }
        let session = g.session_for(&purpose).await;
        let target = g.target(&caller, &purpose);
        let summary = crate::batch::run_logged(&session, &opts, Some(&target))
            .await
            .map_err(|e| batch_failed(&e))?;
        // Opened before the directory goes: the answers are read from the
        // open file, and nothing of the upload stays on disk.
        let file = tokio::fs::File::open(&output)
            .await
            .map_err(|e| failed("reading the answers", e))?;
        let mut response =
            axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(file)).into_response();
        let h = response.headers_mut();
        let mut set = |name: &'static str, value: String| {
            if let Ok(v) = value.parse() {
                h.insert(name, v);
            }
        };
        set("content-type", kind.to_string());
        set(
            "content-disposition",
            format!("attachment; filename=\"{file_name}\""),
        );
        set("cache-control", "no-store".into());
        set("x-psi-rows", summary.rows.to_string());
        set(
            "x-psi-registry-version",
            summary.registry_version.to_string(),
        );
        set("x-psi-key-epoch", summary.key_epoch.to_string());
        if let Some((first, last)) = &summary.request_ids {
            set("x-psi-request-ids", format!("{first}..{last}"));
        }
        Ok(response)
    })
    .await
}

/// Writes `bytes` to a new file at `path`, mode 0600.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)
}

#[derive(Serialize)]
struct Status {
    server: String,
    key_epoch: u64,
    registry_version: u64,
    registry_size: u64,
    public_key: String,
    modes: Vec<&'static str>,
    purposes: Vec<String>,
    default_mode: &'static str,
}

async fn status_route(State(g): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    let started = Instant::now();
    let response = match g.caller(&headers) {
        Err(r) => r.into_response(),
        Ok(_) => {
            let session = g.session.read().await.clone();
            let info = session.info();
            let modes = info
                .modes
                .iter()
                .filter_map(|m| match psi_proto::v1::QueryMode::try_from(*m) {
                    Ok(psi_proto::v1::QueryMode::Sync) => Some("sync"),
                    Ok(psi_proto::v1::QueryMode::Bucket) => Some("bucket"),
                    Ok(psi_proto::v1::QueryMode::Pir) => Some("pir"),
                    _ => None,
                })
                .collect();
            json(
                StatusCode::OK,
                &Status {
                    server: session.server().to_string(),
                    key_epoch: info.key_epoch,
                    registry_version: info.registry_version,
                    registry_size: info.registry_size,
                    public_key: hex::encode(&info.public_key),
                    modes,
                    purposes: g.settings.purposes.clone(),
                    default_mode: mode_name(g.settings.default_mode),
                },
            )
        }
    };
    g.record("/v1/status", response.status(), started);
    response
}

/// Standard base64 with padding (RFC 4648 section 4): the CSP's hash source.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk.first().copied().unwrap_or(0),
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (k, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if k <= chunk.len() {
                let i = usize::try_from((n >> shift) & 63).unwrap_or(0);
                out.push(char::from(ALPHABET.get(i).copied().unwrap_or(b'=')));
            } else {
                out.push('=');
            }
        }
    }
    out
}

async fn page_route(State(g): State<Arc<Gateway>>) -> Response {
    let (html, csp) = page(&g.settings.purposes);
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8".to_string()),
            (header::CONTENT_SECURITY_POLICY, csp),
            (header::CACHE_CONTROL, "no-store".to_string()),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_string()),
        ],
        html,
    )
        .into_response()
}

async fn health_route() -> &'static str {
    "ok\n"
}

async fn metrics_route(State(g): State<Arc<Gateway>>) -> Response {
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &g.registry).is_err() {
        return refuse(StatusCode::INTERNAL_SERVER_ERROR, "metrics").into_response();
    }
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

async fn openapi_route() -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        OPENAPI,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_is_rfc_4648() {
        for (raw, want) in [
            (&b""[..], ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg=="),
            (b"fooba", "Zm9vYmE="),
            (b"foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(raw), want);
        }
    }

    #[test]
    fn the_page_lists_the_purposes_and_allows_only_its_own_script() {
        let (html, csp) = page(&["kyc-onboarding".into(), "aml-recheck".into()]);
        assert!(html.contains(r#"id="purposes">["kyc-onboarding","aml-recheck"]</script>"#));
        assert!(!html.contains("<!--PURPOSES-->"));
        assert!(csp.contains("script-src 'sha256-") && csp.contains("connect-src 'self'"));
        assert!(!html.contains("localStorage") && !html.contains("sessionStorage"));
    }
}
