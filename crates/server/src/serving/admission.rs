//! Admission of every request, before tonic buffers or decodes its body, and
//! its accounting until its response ends:
//!
//! - per-method body limits (an `Evaluate` can be no larger than
//!   `max_batch` elements, a `BucketQuery` than `max_bucket_batch`), counted
//!   frame by frame as the body arrives;
//! - a server-wide and a per-connection budget of request bytes held by
//!   requests in progress, refused with `RESOURCE_EXHAUSTED` and a retry
//!   delay when full, and checked before a request is admitted at all;
//! - the institution's concurrency slot, taken from the request headers
//!   (the TLS certificate), held until the response (stream) ends;
//! - a deadline for the body, one for the answer (`request_timeout`, or the
//!   client's `grpc-timeout` if sooner), and the connection-level deadline of
//!   the request's whole life (`stream_timeout`, see [`crate::serving::connection`]);
//! - an audit record for each refusal the handler never saw (oversized,
//!   malformed, over budget, over the concurrency limit, timed out,
//!   cancelled); the handler records the rest, and a request is never
//!   recorded twice ([`RequestNote`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::Frame;
use tokio::time::{Instant, Sleep};
use tonic::body::Body;
use tonic::{Code, Status};

use crate::serving::audit::Entry;
use crate::serving::connection::{peer_info, Conn, NetLimits, OpenRequest};
use crate::serving::error::ServiceError;
use crate::serving::service::{State, PURPOSE_HEADER};

/// What the admission layer and the handler share about one request: the
/// handler notes the element count and that it wrote the audit record.
#[derive(Debug, Default)]
pub struct RequestNote {
    /// The request's id: in its audit record and its response's
    /// `x-psi-request-id` metadata.
    pub request_id: String,
    reached: AtomicBool,
    audited: AtomicBool,
    elements: AtomicU64,
    deadline: Option<Instant>,
}

impl RequestNote {
    /// A note for a request that must be answered by `deadline`.
    #[must_use]
    pub fn new(deadline: Instant) -> Self {
        Self {
            request_id: crate::serving::audit::new_request_id(),
            deadline: Some(deadline),
            ..Self::default()
        }
    }

    /// Whether the request's deadline has passed: an answer now would be
    /// one the client no longer waits for (a saturated machine can notice
    /// the deadline's timer late; this reads the clock).
    #[must_use]
    pub fn past_deadline(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// The handler has the decoded request.
    pub fn reached(&self) {
        self.reached.store(true, Ordering::Release);
    }

    /// The request's element count, once decoded.
    pub fn set_elements(&self, n: u64) {
        self.elements.store(n, Ordering::Relaxed);
    }

    /// The handler is writing the audit record (called before the write
    /// starts, so a request cancelled during it is not recorded twice).
    pub fn audited(&self) {
        self.audited.store(true, Ordering::Release);
    }
}

/// A `psi.v1.Match` method the audit trail records, and its mode.
fn audited_method(path: &str) -> Option<(&'static str, &'static str)> {
    match path {
        "/psi.v1.Match/Evaluate" => Some(("Evaluate", "sync")),
        "/psi.v1.Match/BucketQuery" => Some(("BucketQuery", "bucket")),
        "/psi.v1.Match/SyncTagSet" => Some(("SyncTagSet", "sync")),
        "/psi.v1.Match/PirSetup" => Some(("PirSetup", "pir")),
        "/psi.v1.Match/PirQuery" => Some(("PirQuery", "pir")),
        _ => None,
    }
}

/// How much earlier than the server's reckoning a client's own deadline can
/// pass (the request's transit): a cancellation within it of the deadline
/// is recorded `DeadlineExceeded`, not `Cancelled`.
const DEADLINE_TRANSIT_SLACK: Duration = Duration::from_millis(20);

/// gRPC framing (5 bytes) plus protobuf tags, lengths and the epoch.
const MESSAGE_OVERHEAD: usize = 64;
/// Body limit of methods without a payload worth the name (server info,
/// health, reflection).
const SMALL_BODY: usize = 64 << 10;

/// The largest request body accepted on `path`, with the setting it
/// follows from (named in the refusal).
fn body_limit(path: &str, limits: &crate::serving::service::Limits) -> (usize, String) {
    let batch = |setting: &str, n: usize, per: usize| {
        (
            n * per + MESSAGE_OVERHEAD,
            format!("a batch of at most {setting} = {n} elements"),
        )
    };
    let message = || {
        (
            limits.max_message_bytes + MESSAGE_OVERHEAD,
            format!("max_message_bytes = {}", limits.max_message_bytes),
        )
    };
    match path {
        "/psi.v1.Match/Evaluate" => batch("max_batch", limits.max_batch, 32),
        // 32 bytes per element and at most 5 per packed bucket number.
        "/psi.v1.Match/BucketQuery" => batch("max_bucket_batch", limits.max_bucket_batch, 32 + 5),
        "/psi.v1.Match/SyncTagSet" => message(),
        // The public parameters (Spiral's 6-7.9 MB, YPIR+SP's 0.5 MB), whole.
        "/psi.v1.Match/PirSetup" => message(),
        // Per element: 32 bytes, one query, and their framing.
        "/psi.v1.Match/PirQuery" => batch(
            "pir_max_batch",
            limits.pir_max_batch,
            32 + psi_pir::scheme::MAX_QUERY_BYTES + 8,
        ),
        _ => (SMALL_BODY, "a request without a payload".to_string()),
    }
}

/// The layer: wraps every service of the server.
#[derive(Debug, Clone)]
pub struct AdmissionLayer {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    state: Arc<State>,
    limits: NetLimits,
    request_timeout: Duration,
    /// Bytes of request bodies held server-wide.
    buffered: AtomicUsize,
}

impl AdmissionLayer {
    /// Admission for the service over `state`.
    #[must_use]
    pub fn new(state: Arc<State>, limits: NetLimits, request_timeout: Duration) -> Self {
        Self {
            shared: Arc::new(Shared {
                state,
                limits,
                request_timeout,
                buffered: AtomicUsize::new(0),
            }),
        }
    }
}

impl<S> tower_layer::Layer<S> for AdmissionLayer {
    type Service = Admission<S>;

    fn layer(&self, inner: S) -> Admission<S> {
        Admission {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

/// The service [`AdmissionLayer`] makes.
#[derive(Debug, Clone)]
pub struct Admission<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> tower_service::Service<Request<Body>> for Admission<S>
where
    S: tower_service::Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        // The clone takes the place of the service that was polled ready.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(Arc::clone(&self.shared).admit(inner, req))
    }
}

impl Shared {
    async fn admit<S>(
        self: Arc<Self>,
        mut inner: S,
        mut req: Request<Body>,
    ) -> Result<Response<Body>, S::Error>
    where
        S: tower_service::Service<Request<Body>, Response = Response<Body>>,
    {
        let started = Instant::now();
        let path = req.uri().path().to_string();
        let (limit, limit_setting) = body_limit(&path, &self.state.limits());
        let conn = peer_info(req.extensions()).map(|p| Arc::clone(&p.conn));
        // Capped: no deadline needs to reach past the request's whole life.
        let client_deadline =
            grpc_timeout(req.headers()).map(|d| started + d.min(self.limits.stream_timeout));
        let open = conn
            .as_ref()
            .map(|c| c.open_request(started + self.limits.stream_timeout));
        let deadline = client_deadline.map_or(started + self.request_timeout, |d| {
            d.min(started + self.request_timeout)
        });
        let note = Arc::new(RequestNote::new(deadline));
        let tracker = Arc::new(Tracker::new(
            Arc::clone(&self),
            &req,
            &path,
            conn,
            open,
            Arc::clone(&note),
            started,
            client_deadline,
        ));
        if tracker.audit.is_some() {
            // Admission before anything is buffered: the institution's
            // concurrency slot (from its certificate) and the byte budget.
            // (Health checks are exempt: a load balancer must not take the
            // server out because a peer filled the budget.)
            if let Some(institution) = tracker.institution.as_deref() {
                match self.state.slot(institution) {
                    Ok(slot) => tracker.hold(slot),
                    Err(e) => return Ok(identified(tracker.refuse(e.into()), &note)),
                }
            }
            if self.buffered.load(Ordering::Acquire) >= self.limits.buffer_budget_bytes {
                return Ok(identified(tracker.refuse(budget_refusal()), &note));
            }
        }
        req.extensions_mut().insert(Arc::clone(&note));
        if let Some(institution) = &tracker.institution {
            req.extensions_mut()
                .insert(Authenticated(institution.clone()));
        }
        let timer = Box::pin(tokio::time::sleep_until(started + self.limits.body_timeout));
        let req = req.map(|body| {
            Body::new(LimitedBody {
                inner: body,
                tracker: Arc::clone(&tracker),
                limit,
                limit_setting,
                seen: 0,
                timer,
            })
        });
        match tokio::time::timeout_at(deadline, inner.call(req)).await {
            Ok(Ok(response)) => {
                let response = identified(malformed_is_invalid(response, &path, &note), &note);
                tracker.saw_headers(response.headers());
                Ok(response.map(|body| {
                    Body::new(TrackedBody {
                        inner: body,
                        tracker,
                    })
                }))
            }
            Ok(Err(e)) => Err(e),
            // Dropping the handler's future stops its work.
            Err(_) => Ok(identified(
                tracker.refuse(Status::deadline_exceeded(format!(
                    "no answer within {} ms (request_timeout, or the client's deadline)",
                    deadline.duration_since(started).as_millis()
                ))),
                &note,
            )),
        }
    }

    /// Takes `n` bytes from the server's and the connection's budgets.
    fn try_buffer(&self, conn: Option<&Conn>, n: usize) -> bool {
        let before = self.buffered.fetch_add(n, Ordering::AcqRel);
        if before.saturating_add(n) > self.limits.buffer_budget_bytes {
            self.buffered.fetch_sub(n, Ordering::AcqRel);
            return false;
        }
        if let Some(conn) = conn {
            if !conn.try_buffer(n, self.limits.connection_buffer_bytes) {
                self.buffered.fetch_sub(n, Ordering::AcqRel);
                return false;
            }
        }
        true
    }
}

/// tonic answers `INTERNAL` to a body that ends inside a message (or a bad
/// compression flag) before any handler runs; for our methods that is a
/// malformed request: `INVALID_ARGUMENT`.
/// `response` with the request's id in its `x-psi-request-id` metadata
/// (requests of the `Match` service, the ones audited).
fn identified(mut response: Response<Body>, note: &RequestNote) -> Response<Body> {
    if let Ok(value) = http::HeaderValue::from_str(&note.request_id) {
        if !note.request_id.is_empty() {
            response
                .headers_mut()
                .insert(psi_proto::REQUEST_ID_HEADER, value);
        }
    }
    response
}

fn malformed_is_invalid(
    response: Response<Body>,
    path: &str,
    note: &RequestNote,
) -> Response<Body> {
    if !path.starts_with("/psi.v1.Match/") || note.reached.load(Ordering::Acquire) {
        return response;
    }
    match Status::from_header_map(response.headers()) {
        Some(status) if status.code() == Code::Internal => {
            Status::invalid_argument(format!("malformed request: {}", status.message())).into_http()
        }
        _ => response,
    }
}

fn budget_refusal() -> Status {
    ServiceError::QuotaExhausted {
        what: "the server's buffer for request bodies is full".into(),
        retry_after: Duration::from_secs(1),
    }
    .into()
}

/// The client's deadline from the `grpc-timeout` header (`<digits><unit>`).
fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[derive(Debug)]
struct Audited {
    method: &'static str,
    mode: &'static str,
    purpose: String,
    received: std::time::SystemTime,
}

/// The institution the admission layer authenticated, for the handler (so
/// the certificate is parsed once per request).
#[derive(Debug, Clone)]
pub struct Authenticated(pub String);

/// One request's accounting; when the last reference goes (the response
/// ended or was dropped), its holds are released and, if the handler did
/// not record it, its audit record is written.
#[derive(Debug)]
struct Tracker {
    shared: Arc<Shared>,
    conn: Option<Arc<Conn>>,
    _open: Option<OpenRequest>,
    note: Arc<RequestNote>,
    /// What the audit record of an audited method needs, written at the
    /// end only if the handler did not write one.
    audit: Option<Audited>,
    institution: Option<String>,
    method: String,
    started: Instant,
    client_deadline: Option<Instant>,
    stream_deadline: Instant,
    buffered: AtomicUsize,
    slot: Mutex<Option<tokio::sync::OwnedSemaphorePermit>>,
    /// The status the request ended with, once known.
    outcome: Mutex<Option<Code>>,
}

impl Tracker {
    #[allow(clippy::too_many_arguments)]
    fn new(
        shared: Arc<Shared>,
        req: &Request<Body>,
        path: &str,
        conn: Option<Arc<Conn>>,
        open: Option<OpenRequest>,
        note: Arc<RequestNote>,
        started: Instant,
        client_deadline: Option<Instant>,
    ) -> Self {
        let institution = shared.state.institution_of(req.extensions()).ok();
        let audit = audited_method(path).map(|(method, mode)| Audited {
            method,
            mode,
            purpose: req
                .headers()
                .get(PURPOSE_HEADER)
                .and_then(|v| v.to_str().ok())
                .filter(|p| crate::serving::service::is_valid_purpose(p))
                .unwrap_or("")
                .to_string(),
            received: std::time::SystemTime::now(),
        });
        let method = audited_method(path).map_or_else(
            || path.rsplit('/').next().unwrap_or("").to_string(),
            |(m, _)| m.to_string(),
        );
        let stream_deadline = started + shared.limits.stream_timeout;
        Self {
            shared,
            conn,
            _open: open,
            note,
            audit,
            institution,
            method,
            started,
            client_deadline,
            stream_deadline,
            buffered: AtomicUsize::new(0),
            slot: Mutex::new(None),
            outcome: Mutex::new(None),
        }
    }

    fn hold(&self, slot: tokio::sync::OwnedSemaphorePermit) {
        *self.slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(slot);
    }

    /// Records the first outcome seen.
    fn ended(&self, code: Code) {
        let mut outcome = self.outcome.lock().unwrap_or_else(PoisonError::into_inner);
        if outcome.is_none() {
            *outcome = Some(code);
        }
    }

    /// A refusal raised here: recorded, and returned for the body or response.
    fn refused(&self, status: Status) -> Status {
        self.ended(status.code());
        status
    }

    /// A trailers-only response carrying `status`.
    fn refuse(&self, status: Status) -> Response<Body> {
        self.refused(status).into_http()
    }

    fn saw_headers(&self, headers: &HeaderMap) {
        // A trailers-only response: the status is in the headers.
        if let Some(status) = Status::from_header_map(headers) {
            self.ended(status.code());
        }
    }

    fn charge(&self, n: usize) -> bool {
        if !self.shared.try_buffer(self.conn.as_deref(), n) {
            return false;
        }
        self.buffered.fetch_add(n, Ordering::AcqRel);
        true
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        let held = *self.buffered.get_mut();
        self.shared.buffered.fetch_sub(held, Ordering::AcqRel);
        if let Some(conn) = &self.conn {
            conn.release(held);
        }
        let Some(audited) = self.audit.take() else {
            return;
        };
        if self.note.audited.load(Ordering::Acquire) {
            return;
        }
        let mut entry = Entry::now(
            self.institution.as_deref().unwrap_or("unauthenticated"),
            &audited.purpose,
            audited.method,
            audited.mode,
        );
        entry.time_unix_ms = crate::serving::audit::unix_ms(audited.received);
        entry.request_id.clone_from(&self.note.request_id);
        let now = Instant::now();
        // The client's deadline runs on its clock from when it sent the
        // request; ours from when it arrived: a client that gave up at its
        // deadline cancels up to a transit time before ours passes.
        let late = self
            .client_deadline
            .is_some_and(|d| now + DEADLINE_TRANSIT_SLACK >= d)
            || now >= self.stream_deadline;
        // Dropped before it ended (no outcome), or its work stopped because
        // the client went away (Cancelled): past its deadline if one has
        // passed, whichever of the two noticed first.
        let code = match *self
            .outcome
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
        {
            Some(Code::Cancelled) | None if late => Code::DeadlineExceeded,
            Some(code) => code,
            None => Code::Cancelled,
        };
        entry.elements = self.note.elements.load(Ordering::Relaxed);
        entry.outcome = if code == Code::Ok {
            "ok".to_string()
        } else {
            format!("{code:?}")
        };
        if let Ok(epoch) = self.shared.state.current_epoch() {
            entry.key_epoch = epoch;
            entry.registry_version = self.shared.state.registry_version().unwrap_or(0);
        }
        tracing::warn!(
            institution = %entry.institution,
            method = %self.method,
            elements = entry.elements,
            request_id = %entry.request_id,
            outcome = %entry.outcome,
            "request refused before its answer"
        );
        self.shared.state.metrics().request(
            &self.method,
            &entry.institution,
            &entry.outcome,
            entry.elements,
            self.started.elapsed(),
        );
        self.shared.state.audit().submit(entry);
    }
}

/// A request body, counted against its method's limit and the budgets as
/// it arrives, and given up when it takes longer than `body_timeout`.
struct LimitedBody {
    inner: Body,
    tracker: Arc<Tracker>,
    limit: usize,
    /// What the limit follows from, for the refusal.
    limit_setting: String,
    seen: usize,
    timer: Pin<Box<Sleep>>,
}

impl http_body::Body for LimitedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if this.timer.as_mut().poll(cx).is_ready() {
            let secs = this.tracker.shared.limits.body_timeout.as_secs_f64();
            return Poll::Ready(Some(Err(this.tracker.refused(Status::deadline_exceeded(
                format!("the request body did not arrive within {secs} s (body_timeout)"),
            )))));
        }
        let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        if let Some(data) = frame.data_ref() {
            let n = data.len();
            this.seen = this.seen.saturating_add(n);
            if this.seen > this.limit {
                // The same refusal as a batch the service counts over its
                // limit: a mistake in the request, never resent unchanged.
                return Poll::Ready(Some(Err(this.tracker.refused(Status::invalid_argument(
                    format!(
                        "the request body is over the limit of {} bytes for {} ({}); split it",
                        this.limit, this.tracker.method, this.limit_setting
                    ),
                )))));
            }
            if !this.tracker.charge(n) {
                return Poll::Ready(Some(Err(this.tracker.refused(budget_refusal()))));
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that reports how the request ended (its trailers) and
/// keeps the request's holds until it is done.
struct TrackedBody {
    inner: Body,
    tracker: Arc<Tracker>,
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(trailers) = frame.trailers_ref() {
                this.tracker.saw_headers(trailers);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_per_the_spec() {
        let mut h = HeaderMap::new();
        for (v, want) in [
            ("5S", Some(Duration::from_secs(5))),
            ("250m", Some(Duration::from_millis(250))),
            ("2M", Some(Duration::from_secs(120))),
            ("1H", Some(Duration::from_secs(3600))),
            ("7u", Some(Duration::from_micros(7))),
            ("9n", Some(Duration::from_nanos(9))),
            ("S", None),
            ("123456789S", None),
            ("5s", None),
            ("", None),
        ] {
            h.insert("grpc-timeout", v.parse().unwrap());
            assert_eq!(grpc_timeout(&h), want, "{v}");
        }
    }

    #[test]
    fn body_limits_follow_the_batch_limits() {
        let limits = crate::serving::service::Limits::default();
        assert_eq!(
            body_limit("/psi.v1.Match/Evaluate", &limits).0,
            4096 * 32 + 64
        );
        assert!(body_limit("/psi.v1.Match/Evaluate", &limits)
            .1
            .contains("max_batch = 4096"));
        assert_eq!(
            body_limit("/psi.v1.Match/BucketQuery", &limits).0,
            64 * 37 + 64
        );
        assert_eq!(
            body_limit("/psi.v1.Match/SyncTagSet", &limits).0,
            (16 << 20) + 64
        );
        assert_eq!(
            body_limit("/grpc.health.v1.Health/Check", &limits).0,
            SMALL_BODY
        );
    }
}
