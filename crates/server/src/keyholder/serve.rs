//! Running a key holder: `psi-server keyholder serve`. It loads its shares
//! and committees, opens its own audit trail (SQLite beside its shares, or
//! PostgreSQL), and serves `psi.v1.KeyHolder` (with gRPC health) under
//! mutual TLS to the callers it lists, until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use psi_proto::v1::key_holder_server::KeyHolderServer;
use tokio::net::TcpListener;

use crate::keyholder::service::{load_identity, load_shares, HolderService, HolderState};
use crate::serving::audit::{AuditLog, AuditStore};
use crate::serving::config::TlsFiles;
use crate::serving::policy::{Enforcer, Policy};

/// The audit trail's file name in a holder's directory.
pub const HOLDER_AUDIT_FILE: &str = "holder-audit.sqlite";

/// Flags and environment variables of `psi-server keyholder serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct HolderArgs {
    /// The holder's directory: its share and committee files.
    #[arg(long, env = "PSI_HOLDER_DIR")]
    pub dir: PathBuf,
    /// Address to listen on.
    #[arg(long, env = "PSI_LISTEN", default_value = "127.0.0.1:7443")]
    pub listen: String,
    /// The holder's server certificate (PEM); with --tls-key and --client-ca.
    #[arg(long, env = "PSI_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, env = "PSI_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// The CA of the callers' client certificates.
    #[arg(long, env = "PSI_CLIENT_CA")]
    pub client_ca: Option<PathBuf>,
    /// Client-certificate names allowed to ask (the serving replicas and
    /// the encoding side), comma-separated; required with TLS.
    #[arg(long, env = "PSI_HOLDER_CALLERS", value_delimiter = ',')]
    pub callers: Vec<String>,
    /// Client-certificate names allowed to run key ceremonies (key
    /// generation, refresh, endorsement) and retire old shares: the
    /// operator's encoding host, comma-separated [default: none].
    #[arg(long, env = "PSI_HOLDER_OPERATORS", value_delimiter = ',')]
    pub operators: Vec<String>,
    /// Serve plaintext without TLS: only for a test's or a demo's loopback.
    #[arg(long)]
    pub insecure_plaintext: bool,
    /// Audit trail: a SQLite path or a postgres:// URL [default:
    /// holder-audit.sqlite in --dir].
    #[arg(long, env = "PSI_AUDIT_DB", value_parser = AuditStore::from_arg)]
    pub audit_db: Option<AuditStore>,
    /// Policy file (the serving side's format): per institution, modes
    /// (sync, bucket, pir, encode), purposes, rate and daily cap, counted
    /// here independently of the replicas.
    #[arg(long, env = "PSI_POLICY")]
    pub policy: Option<PathBuf>,
    /// Most elements per request [default: 65536, the proof's limit].
    #[arg(long, env = "PSI_MAX_BATCH", default_value_t = psi_core::proof::MAX_PROOF_BATCH)]
    pub max_batch: usize,
    /// Per-request timeout in seconds.
    #[arg(long, env = "PSI_REQUEST_TIMEOUT_SECS", default_value_t = 30)]
    pub request_timeout_secs: u64,
    /// Requests in flight per connection.
    #[arg(long, env = "PSI_MAX_CONCURRENT_PER_CONNECTION", default_value_t = 64)]
    pub max_concurrent_per_connection: usize,
}

impl HolderArgs {
    /// A holder of `dir` in this process on a free loopback port, in
    /// plaintext, with the defaults of every setting: for tests, benchmarks
    /// and demonstrations only. Change what differs with struct update.
    #[must_use]
    pub fn local(dir: &std::path::Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            listen: "127.0.0.1:0".into(),
            tls_cert: None,
            tls_key: None,
            client_ca: None,
            callers: Vec::new(),
            operators: Vec::new(),
            insecure_plaintext: true,
            audit_db: None,
            policy: None,
            max_batch: psi_core::proof::MAX_PROOF_BATCH,
            request_timeout_secs: 30,
            max_concurrent_per_connection: 64,
        }
    }
}

/// A holder running in this process.
#[derive(Debug)]
pub struct RunningHolder {
    /// The bound address.
    pub local_addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl RunningHolder {
    /// Stops and waits.
    ///
    /// # Errors
    /// If serving failed.
    pub async fn shutdown(mut self) -> Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.await.context("key holder task")?
    }
}

/// Loads, binds and starts serving.
///
/// # Errors
/// No share, bad TLS material, TLS without callers, an unbindable address.
pub async fn start(args: HolderArgs) -> Result<RunningHolder> {
    if !(1..=psi_core::proof::MAX_PROOF_BATCH).contains(&args.max_batch) {
        bail!(
            "--max-batch must be 1 to {}",
            psi_core::proof::MAX_PROOF_BATCH
        );
    }
    let tls: Option<TlsFiles> = crate::serving::config::tls_files(
        args.tls_cert.clone(),
        args.tls_key.clone(),
        args.client_ca.clone(),
    )?;
    match (&tls, args.insecure_plaintext) {
        (None, false) => bail!(
            "a key holder serves only under mutual TLS (--tls-cert, --tls-key, --client-ca, --callers); --insecure-plaintext is for a test's loopback"
        ),
        (Some(_), true) => bail!("--insecure-plaintext and TLS both given"),
        (Some(_), false) if args.callers.is_empty() => bail!(
            "--callers must list the client-certificate names allowed to ask (the serving replicas and the encoding side)"
        ),
        _ => {}
    }
    let dir = args.dir.clone();
    let (shares, identity) = tokio::task::spawn_blocking(move || -> Result<_> {
        let shares = load_shares(&dir)?;
        let identity = load_identity(&dir)?;
        if shares.is_empty() && identity.is_none() {
            bail!(
                "{} holds no key share and no identity: run `psi-server keyholder init` (then a key generation) or `psi-server key split` first",
                dir.display()
            );
        }
        Ok((shares, identity))
    })
    .await??;
    let store = args
        .audit_db
        .clone()
        .unwrap_or_else(|| args.dir.join(HOLDER_AUDIT_FILE).into());
    let policy = args.policy.as_deref().map(Policy::load).transpose()?;
    let (audit, enforcer) = tokio::task::spawn_blocking(move || -> Result<_> {
        let audit = AuditLog::open(&store)?;
        let enforcer = match &store {
            AuditStore::Postgres(url) => Enforcer::shared(policy, url)?,
            AuditStore::Sqlite(_) => Enforcer::new(policy),
        };
        Ok((audit, Arc::new(enforcer)))
    })
    .await??;
    for ((epoch, generation), s) in &shares {
        tracing::info!(
            epoch,
            generation,
            holder = s.index,
            threshold = s.sharing.committee.threshold(),
            holders = s.sharing.committee.shares().len(),
            "key share loaded"
        );
    }
    let state = Arc::new(HolderState::new(
        args.dir.clone(),
        shares,
        identity,
        args.callers.clone(),
        args.operators.clone(),
        tls.is_some(),
        audit,
        enforcer,
        args.max_batch,
    ));
    let listener = TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let local_addr = listener.local_addr()?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let limit = args.max_batch * 32 + (1 << 16);
    let service = KeyHolderServer::new(HolderService::new(state))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<KeyHolderServer<HolderService>>()
        .await;
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &tls {
        builder = builder
            .tls_config(
                tonic::transport::ServerTlsConfig::new()
                    .identity(tonic::transport::Identity::from_pem(&tls.cert, &tls.key))
                    .client_ca_root(tonic::transport::Certificate::from_pem(&tls.client_ca)),
            )
            .context("configuring TLS")?;
    }
    let timeout = Duration::from_secs(args.request_timeout_secs.max(1));
    let per_connection = args.max_concurrent_per_connection.max(1);
    tracing::info!(addr = %local_addr, tls = tls.is_some(), "key holder listening");
    let task = tokio::spawn(async move {
        builder
            .timeout(timeout)
            .concurrency_limit_per_connection(per_connection)
            .add_service(health)
            .add_service(service)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = rx.await;
                },
            )
            .await
            .context("serving")
    });
    Ok(RunningHolder {
        local_addr,
        shutdown: Some(tx),
        task,
    })
}
