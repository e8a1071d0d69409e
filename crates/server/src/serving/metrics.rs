//! Prometheus metrics, served on a separate admin address (`--admin-listen`)
//! at `/metrics`: requests, elements, latency and refusals by method,
//! institution and outcome, and the audit write latency. Institution ids are
//! labels; names, ID numbers and tags never are.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of a request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// gRPC method.
    pub method: String,
    /// Institution id.
    pub institution: String,
    /// `ok` or the status code.
    pub outcome: String,
}

/// Labels of a latency.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    /// gRPC method.
    pub method: String,
}

/// Labels of a connection event.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Which limit or timeout.
    pub reason: String,
}

/// Labels of a key holder's answer.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HolderLabels {
    /// The holder's index.
    pub holder: String,
    /// `ok`, `timeout`, `unreachable`, `refused` or `bad_proof`.
    pub outcome: String,
}

/// Labels of a key holder's latency.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HolderIndexLabels {
    /// The holder's index.
    pub holder: String,
}

/// The server's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    connections: Gauge,
    connections_refused: Family<ReasonLabels, Counter>,
    connections_closed: Family<ReasonLabels, Counter>,
    requests: Family<RequestLabels, Counter>,
    elements: Family<RequestLabels, Counter>,
    latency: Family<MethodLabels, Histogram>,
    audit_latency: Histogram,
    serving: Gauge,
    snapshot_load_failures: Counter,
    holder_answers: Family<HolderLabels, Counter>,
    holder_latency: Family<HolderIndexLabels, Histogram>,
    pir_passes: Counter,
    pir_pass_queries: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("psi");
        let requests = Family::<RequestLabels, Counter>::default();
        let elements = Family::<RequestLabels, Counter>::default();
        let latency = Family::<MethodLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
        });
        let audit_latency = Histogram::new(exponential_buckets(0.000_05, 2.0, 16));
        let connections = Gauge::default();
        let serving = Gauge::default();
        let snapshot_load_failures = Counter::default();
        let holder_answers = Family::<HolderLabels, Counter>::default();
        let holder_latency = Family::<HolderIndexLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
        });
        registry.register(
            "holder_answers",
            "Threshold mode: key holders' answers to partial evaluations, by holder and outcome (ok, timeout, unreachable, refused, bad_proof: a partial whose proof does not verify)",
            holder_answers.clone(),
        );
        registry.register(
            "holder_duration_seconds",
            "Threshold mode: time from asking a key holder to its verified answer, by holder",
            holder_latency.clone(),
        );
        let pir_passes = Counter::default();
        let pir_pass_queries = Counter::default();
        registry.register(
            "pir_passes",
            "PIR mode: passes over the database (YPIR+SP answers up to four queries, of any requests, with one pass; Spiral one)",
            pir_passes.clone(),
        );
        registry.register(
            "pir_pass_queries",
            "PIR mode: queries answered by those passes (over psi_pir_passes_total: queries a pass)",
            pir_pass_queries.clone(),
        );
        registry.register(
            "snapshot_load_failures",
            "Committed registry versions that failed to load (a damaged or missing file): the previous version is still served",
            snapshot_load_failures.clone(),
        );
        registry.register(
            "serving",
            "1 when the snapshot is loaded and the server is not draining (the gRPC health status of psi.v1.Match, also at /ready)",
            serving.clone(),
        );
        let connections_refused = Family::<ReasonLabels, Counter>::default();
        let connections_closed = Family::<ReasonLabels, Counter>::default();
        registry.register("connections", "Connections open", connections.clone());
        registry.register(
            "connections_refused",
            "Connections closed at accept, by the limit they were over (max_connections, max_connections_per_peer, accept_exhausted: out of file descriptors)",
            connections_refused.clone(),
        );
        registry.register(
            "connections_closed",
            "Connections closed by the server, by timeout (handshake_timeout, idle_timeout, stream_timeout)",
            connections_closed.clone(),
        );
        registry.register(
            "requests",
            "Requests by method, institution and outcome (refusals by status code, e.g. ResourceExhausted for quotas)",
            requests.clone(),
        );
        registry.register(
            "elements",
            "Elements (OPRF evaluations) requested, by method, institution and outcome",
            elements.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from receipt to answer, by method",
            latency.clone(),
        );
        registry.register(
            "audit_write_duration_seconds",
            "Time until a request's audit record is durable",
            audit_latency.clone(),
        );
        Self {
            registry,
            connections,
            connections_refused,
            connections_closed,
            requests,
            elements,
            latency,
            audit_latency,
            serving,
            snapshot_load_failures,
            holder_answers,
            holder_latency,
            pir_passes,
            pir_pass_queries,
        }
    }
}

impl Metrics {
    /// Counts a pass over the PIR database answering `queries` queries.
    pub fn pir_pass(&self, queries: usize) {
        self.pir_passes.inc();
        self.pir_pass_queries.inc_by(queries as u64);
    }

    /// Counts a committed version that failed to load.
    pub fn snapshot_load_failed(&self) {
        self.snapshot_load_failures.inc();
    }

    /// Records whether the server is serving (kept with the gRPC health status).
    pub fn set_serving(&self, serving: bool) {
        self.serving.set(i64::from(serving));
    }

    /// Whether the server is serving: the snapshot loaded, not draining.
    #[must_use]
    pub fn is_serving(&self) -> bool {
        self.serving.get() == 1
    }

    /// Records one request.
    pub fn request(
        &self,
        method: &str,
        institution: &str,
        outcome: &str,
        elements: u64,
        took: Duration,
    ) {
        let labels = RequestLabels {
            method: method.to_string(),
            institution: institution.to_string(),
            outcome: outcome.to_string(),
        };
        self.requests.get_or_create(&labels).inc();
        self.elements.get_or_create(&labels).inc_by(elements);
        self.latency
            .get_or_create(&MethodLabels {
                method: method.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    /// A connection opened (`1`) or closed (`-1`).
    pub fn connections_open(&self, change: i64) {
        self.connections.inc_by(change);
    }

    /// A connection refused at accept.
    pub fn connection_refused(&self, reason: &str) {
        self.connections_refused
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// A connection closed by a timeout.
    pub fn connection_closed(&self, reason: &str) {
        self.connections_closed
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Records one key holder's answer (threshold mode).
    pub fn holder_answer(&self, holder: u16, outcome: &str, took: Duration) {
        let holder = holder.to_string();
        self.holder_answers
            .get_or_create(&HolderLabels {
                holder: holder.clone(),
                outcome: outcome.to_string(),
            })
            .inc();
        self.holder_latency
            .get_or_create(&HolderIndexLabels { holder })
            .observe(took.as_secs_f64());
    }

    /// Records one audit write.
    pub fn audit_write(&self, took: Duration) {
        self.audit_latency.observe(took.as_secs_f64());
    }

    /// The text exposition format.
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Serves `/metrics` and `/ready` on `addr` until `stop` resolves. Returns the bound address.
///
/// # Errors
/// If the address cannot be bound.
pub async fn serve_admin(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the admin address {addr}"))?;
    let bound = listener.local_addr()?;
    let ready = Arc::clone(&metrics);
    let app = axum::Router::new()
        // For load balancers that cannot send a gRPC health check (haproxy
        // 2.6 cannot send its binary body): 200 exactly when the gRPC health
        // status of psi.v1.Match is SERVING, else 503.
        .route(
            "/ready",
            axum::routing::get(move || {
                let serving = ready.is_serving();
                async move {
                    if serving {
                        (axum::http::StatusCode::OK, "serving\n")
                    } else {
                        (axum::http::StatusCode::SERVICE_UNAVAILABLE, "not serving\n")
                    }
                }
            }),
        )
        .route(
            "/metrics",
            axum::routing::get(move || {
                let metrics = Arc::clone(&metrics);
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        metrics.render(),
                    )
                }
            }),
        );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::error!("admin server failed: {e}");
        }
    });
    Ok(bound)
}
