//! Running the server: bind, report NOT_SERVING while the snapshot loads,
//! serve `psi.v1.Match` with health and reflection, and on shutdown stop
//! accepting and drain in-flight requests.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use psi_proto::v1::match_server::MatchServer;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic_health::ServingStatus;

use crate::serving::config::ServeConfig;
use crate::serving::service::{MatchService, State};
use crate::serving::snapshot::Snapshot;

/// A server running in this process.
#[derive(Debug)]
pub struct Running {
    /// The bound address (useful with port 0).
    pub local_addr: SocketAddr,
    /// The bound admin (metrics) address, if configured.
    pub admin_addr: Option<SocketAddr>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<()>>,
}

impl Running {
    /// Stops accepting, drains in-flight requests, and waits for the end.
    ///
    /// # Errors
    /// If serving failed.
    pub async fn shutdown(mut self) -> Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.await.context("server task")?
    }

    /// Serves until `signal` resolves, then shuts down gracefully; returns
    /// early if serving stops by itself (a snapshot that fails to load).
    ///
    /// # Errors
    /// If loading the snapshot or serving failed.
    pub async fn run_until(mut self, signal: impl Future<Output = ()>) -> Result<()> {
        tokio::select! {
            () = signal => {
                if let Some(tx) = self.shutdown.take() {
                    let _ = tx.send(());
                }
                (&mut self.task).await.context("server task")?
            }
            r = &mut self.task => r.context("server task")?,
        }
    }
}

/// Binds and starts serving; the snapshot loads in the background.
///
/// # Errors
/// If the address cannot be bound.
pub async fn start(cfg: ServeConfig) -> Result<Running> {
    // The audit trail opens before the port binds: no unaudited answers.
    // (Off the async workers: PostgreSQL's client blocks.) With the trail
    // in PostgreSQL the quotas go there too, shared by every replica.
    let store = cfg.audit_db.clone();
    let policy = cfg.policy.as_ref().map(|(_, p)| p.clone());
    let (audit, enforcer) = tokio::task::spawn_blocking(move || -> Result<_> {
        let audit = crate::serving::audit::AuditLog::open(&store)?;
        let enforcer = match &store {
            crate::serving::audit::AuditStore::Postgres(url) => {
                crate::serving::policy::Enforcer::shared(policy, url)?
            }
            crate::serving::audit::AuditStore::Sqlite(_) => {
                crate::serving::policy::Enforcer::new(policy)
            }
        };
        Ok((audit, Arc::new(enforcer)))
    })
    .await
    .context("opening the audit trail")??;
    let listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    let local_addr = listener.local_addr()?;
    let metrics = Arc::new(crate::serving::metrics::Metrics::default());
    let (tx, rx) = oneshot::channel::<()>();
    let (admin_stop_tx, admin_stop_rx) = oneshot::channel::<()>();
    let admin_addr = match cfg.admin_listen {
        Some(addr) => Some(
            crate::serving::metrics::serve_admin(addr, Arc::clone(&metrics), async {
                let _ = admin_stop_rx.await;
            })
            .await?,
        ),
        None => None,
    };
    let task = tokio::spawn(async move {
        let result = run(cfg, listener, audit, enforcer, metrics, rx).await;
        let _ = admin_stop_tx.send(());
        result
    });
    Ok(Running {
        local_addr,
        admin_addr,
        shutdown: Some(tx),
        task,
    })
}

async fn run(
    cfg: ServeConfig,
    listener: TcpListener,
    audit: crate::serving::audit::AuditLog,
    enforcer: Arc<crate::serving::policy::Enforcer>,
    metrics: Arc<crate::serving::metrics::Metrics>,
    stop: oneshot::Receiver<()>,
) -> Result<()> {
    match &cfg.policy {
        Some((path, _)) => {
            tokio::spawn(reload_on_sighup(path.clone(), Arc::clone(&enforcer)));
        }
        None => {
            tracing::warn!("no policy file: every authenticated caller is served without limits")
        }
    }
    if crate::store::holds_records(&cfg.data_dir) {
        tracing::info!(
            "serving an all-in-one directory: it holds the plaintext records; a host institutions connect to should serve a directory made by `psi-server publish`"
        );
    }
    let holders = cfg
        .holders
        .as_ref()
        .map(|h| crate::keyholder::pool::HolderPool::new(h, Some(Arc::clone(&metrics))))
        .transpose()?
        .map(Arc::new);
    let state = Arc::new(
        State::new(cfg.limits, cfg.tls.is_some(), audit, enforcer, metrics).with_holders(holders),
    );
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_not_serving::<MatchServer<MatchService>>()
        .await;
    reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(psi_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service")?;
    let limit = cfg.limits.max_message_bytes;
    let service = MatchServer::new(MatchService::new(Arc::clone(&state)))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);

    let (load_failed_tx, load_failed_rx) = oneshot::channel::<anyhow::Error>();
    let data_dir = cfg.data_dir.clone();
    let loader_state = Arc::clone(&state);
    let loader_reporter = reporter.clone();
    let reload_interval = cfg.reload_interval;
    let loader = tokio::spawn(async move {
        let stamp = crate::store::snapshot_stamp(&data_dir);
        match load(&data_dir, None, loader_state.limits()).await {
            Ok(snapshot) => {
                loader_state.publish(snapshot);
                loader_reporter
                    .set_serving::<MatchServer<MatchService>>()
                    .await;
                loader_reporter
                    .set_service_status("", ServingStatus::Serving)
                    .await;
                loader_state.metrics().set_serving(true);
                watch(data_dir, loader_state, stamp, reload_interval).await;
            }
            Err(e) => {
                let _ = load_failed_tx.send(e);
            }
        }
    });

    let (failure_tx, mut failure_rx) = tokio::sync::mpsc::channel::<anyhow::Error>(1);
    let stop_reporter = reporter.clone();
    let stop_state = Arc::clone(&state);
    let signal = async move {
        tokio::select! {
            _ = stop => {}
            Ok(e) = load_failed_rx => { let _ = failure_tx.send(e).await; }
        }
        // Tell load balancers first, then stop accepting; tonic drains in-flight calls.
        stop_state.metrics().set_serving(false);
        stop_reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
        stop_reporter
            .set_not_serving::<MatchServer<MatchService>>()
            .await;
        tracing::info!("shutting down: draining in-flight requests");
    };
    tracing::info!(addr = %listener.local_addr()?, tls = cfg.tls.is_some(), "listening");
    let net = cfg.net.fitted_to_open_file_limit();
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &cfg.tls {
        builder = builder
            .tls_config(
                tonic::transport::ServerTlsConfig::new()
                    .identity(tonic::transport::Identity::from_pem(&tls.cert, &tls.key))
                    .client_ca_root(tonic::transport::Certificate::from_pem(&tls.client_ca))
                    .timeout(net.handshake_timeout),
            )
            .context("configuring TLS")?;
    }
    let metrics = state.metrics_arc();
    let served = builder
        .max_concurrent_streams(net.max_concurrent_streams)
        .http2_max_header_list_size(net.max_header_list_bytes)
        .initial_stream_window_size(net.stream_window_bytes)
        .initial_connection_window_size(net.connection_window_bytes)
        // Stalled peers: ping idle connections, drop those that do not answer.
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        // Body limits, byte budgets, concurrency slots, deadlines and the
        // audit of refusals, before tonic buffers anything.
        .layer(crate::serving::admission::AdmissionLayer::new(
            Arc::clone(&state),
            net,
            cfg.request_timeout,
        ))
        .add_service(health)
        .add_service(reflection)
        .add_service(service)
        .serve_with_incoming_shutdown(
            crate::serving::connection::incoming(
                listener,
                cfg.tls.is_none(),
                net,
                cfg.trusted_proxies.clone(),
                metrics,
            ),
            signal,
        )
        .await
        .context("serving");
    // The loader turned watcher stops with the server.
    loader.abort();
    served?;
    if let Ok(e) = failure_rx.try_recv() {
        return Err(e.context("loading the registry snapshot"));
    }
    Ok(())
}

/// Loads the snapshot off the async threads (from `prev` when only updates
/// were logged since it: see `Snapshot::reload`) and logs what it is.
async fn load(
    data_dir: &std::path::Path,
    prev: Option<Arc<Snapshot>>,
    limits: crate::serving::service::Limits,
) -> Result<Snapshot> {
    let started = std::time::Instant::now();
    let dir = data_dir.to_path_buf();
    let snapshot = tokio::task::spawn_blocking(move || -> Result<Snapshot> {
        let mut next = match &prev {
            Some(prev) => Snapshot::reload(prev, &dir),
            None => Snapshot::load_with(&dir, limits.tagset_min_shard_bits),
        }?;
        // PIR mode's database, from the previous one's where it can.
        next.pir = crate::serving::pir::database_for(
            &next,
            prev.as_deref(),
            limits.pir_max_database_bytes,
            limits.max_message_bytes,
            limits.pir_scheme,
        )?;
        Ok(next)
    })
    .await
    .map_err(|e| anyhow::anyhow!("loading task failed: {e}"))??;
    tracing::info!(
        epoch = snapshot.epoch,
        registry_version = snapshot.index.registry_version(),
        entries = snapshot.index.len(),
        deltas = snapshot.deltas.len(),
        load_ms = started.elapsed().as_millis() as u64,
        "registry loaded; serving"
    );
    Ok(snapshot)
}

/// Watches the data directory: when `update`, `init` or `rotate-key` commits
/// a new snapshot, loads and publishes it (requests in flight finish on the
/// one they started with; the previous key is dropped, and zeroized, with
/// the last of them). A snapshot that fails to load is logged and the
/// current one kept. Also destroys retired keys whose grace period is over.
async fn watch(
    data_dir: std::path::PathBuf,
    state: Arc<State>,
    mut stamp: Option<crate::store::Stamp>,
    interval: std::time::Duration,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = crate::store::snapshot_stamp(&data_dir);
        if now.is_some() && now != stamp {
            stamp = now;
            match load(&data_dir, state.snapshot(), state.limits()).await {
                Ok(snapshot) => state.publish(snapshot),
                Err(e) => {
                    state.metrics().snapshot_load_failed();
                    tracing::error!(
                        "a new registry snapshot failed to load; still serving the previous one: {e:#}"
                    );
                }
            }
        }
        if let Ok(current) = state.current_epoch() {
            let dir = data_dir.clone();
            let swept = tokio::task::spawn_blocking(move || {
                crate::store::keystore::sweep(&dir, current, std::time::SystemTime::now())
            })
            .await;
            match swept {
                Ok(Ok(destroyed)) => {
                    for epoch in destroyed {
                        tracing::info!(epoch, "retired key destroyed after its grace period");
                    }
                }
                Ok(Err(e)) => tracing::error!("sweeping retired keys: {e:#}"),
                Err(e) => tracing::error!("sweeping retired keys: {e}"),
            }
        }
    }
}

/// Re-reads the policy on every SIGHUP; a bad file keeps the policy in force.
async fn reload_on_sighup(
    path: std::path::PathBuf,
    enforcer: Arc<crate::serving::policy::Enforcer>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot listen for SIGHUP: the policy will not be reloaded");
        return;
    };
    while hup.recv().await.is_some() {
        match crate::serving::policy::Policy::load(&path) {
            Ok(p) => {
                enforcer.replace(p);
                tracing::info!(path = %path.display(), "policy reloaded");
            }
            Err(e) => {
                tracing::error!("policy not reloaded, the previous one stays in force: {e:#}")
            }
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn termination_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
