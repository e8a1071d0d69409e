//! `serve` configuration from flags, environment variables (`PSI_*`) and an
//! optional TOML file, in that order of precedence. Every error is reported
//! before any port is bound.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::serving::connection::NetLimits;
use crate::serving::service::Limits;

/// Flags and environment variables of `psi-server serve`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// TOML configuration file: the keys of these flags in snake case
    /// (data_dir, listen, max_batch, ...), the connection limits in a `[net]` table.
    #[arg(long, env = "PSI_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory made by `psi-server init`.
    #[arg(long, env = "PSI_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:50051].
    #[arg(long, env = "PSI_LISTEN")]
    pub listen: Option<String>,
    /// Most elements per Evaluate request [default: 4096, at most 65536].
    #[arg(long, env = "PSI_MAX_BATCH")]
    pub max_batch: Option<usize>,
    /// Most elements per BucketQuery request [default: 64].
    #[arg(long, env = "PSI_MAX_BUCKET_BATCH")]
    pub max_bucket_batch: Option<usize>,
    /// Largest gRPC message in bytes [default: 16777216].
    #[arg(long, env = "PSI_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Per-request timeout in seconds [default: 60].
    #[arg(long, env = "PSI_REQUEST_TIMEOUT_SECS")]
    pub request_timeout_secs: Option<u64>,
    /// How often to look for a new registry version or key epoch in the
    /// data directory, in milliseconds [default: 2000].
    #[arg(long, env = "PSI_RELOAD_INTERVAL_MS")]
    pub reload_interval_ms: Option<u64>,
    /// Requests one institution may have in flight at once [default: 16].
    #[arg(long, env = "PSI_MAX_CONCURRENT_PER_INSTITUTION")]
    pub max_concurrent_per_institution: Option<usize>,
    /// Most elements per PirQuery request [default: 4, at most 64].
    #[arg(long, env = "PSI_PIR_MAX_BATCH")]
    pub pir_max_batch: Option<usize>,
    /// PirQuery requests admitted at once, server-wide; their queries share
    /// passes over the PIR database, one pass at a time [default: 8].
    #[arg(long, env = "PSI_PIR_MAX_CONCURRENT")]
    pub pir_max_concurrent: Option<usize>,
    /// Bytes of institutions' PIR public parameters kept in memory
    /// [default: 1073741824].
    #[arg(long, env = "PSI_PIR_KEYS_CACHE_BYTES")]
    pub pir_keys_cache_bytes: Option<usize>,
    /// Largest PIR database to build, in bytes; 0 turns PIR mode off
    /// [default: 4294967296].
    #[arg(long, env = "PSI_PIR_MAX_DATABASE_BYTES")]
    pub pir_max_database_bytes: Option<usize>,
    /// PIR scheme: `spiral`, `ypir` (YPIR+SP), or `auto`, the one whose
    /// database takes less memory for the registry [default: auto].
    #[arg(long, env = "PSI_PIR_SCHEME")]
    pub pir_scheme: Option<String>,
    /// At least 2^N shards in the sync tag set: more shards make a re-sync
    /// of a changed set finer-grained and its manifest larger (0 to 20)
    /// [default: 0, by the registry's size: 2^11 to 2^12 entries a shard].
    #[arg(long, env = "PSI_TAGSET_MIN_SHARD_BITS")]
    pub tagset_min_shard_bits: Option<u8>,
    /// Server certificate (PEM) for TLS; with --tls-key and --client-ca,
    /// every client must present a certificate issued by that CA.
    #[arg(long, env = "PSI_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, env = "PSI_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// CA certificate (PEM) that issues institutions' client certificates.
    #[arg(long, env = "PSI_CLIENT_CA")]
    pub client_ca: Option<PathBuf>,
    /// Policy file: which institutions may query, for which purposes, in
    /// which modes, how much (re-read on SIGHUP). Without it every caller
    /// that passes authentication is served without limits.
    #[arg(long, env = "PSI_POLICY")]
    pub policy: Option<PathBuf>,
    /// Address of the admin endpoint: Prometheus metrics at /metrics,
    /// readiness at /ready (200 once the snapshot is loaded and while not
    /// draining, 503 otherwise: for load balancers) (e.g. 127.0.0.1:9090);
    /// none by default.
    #[arg(long, env = "PSI_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// Load balancers whose connections start with a PROXY protocol v2
    /// header (haproxy `send-proxy-v2`): addresses or CIDR blocks,
    /// comma-separated (e.g. 10.0.0.5,10.1.0.0/16). Their connections are
    /// counted, limited and logged by the client address the header names;
    /// a connection from them without a valid header is closed. None by
    /// default: every connection is taken by the address it comes from.
    #[arg(long, env = "PSI_TRUSTED_PROXIES")]
    pub trusted_proxies: Option<String>,
    /// Audit database: an SQLite file, or a postgres:// URL shared by every
    /// replica (which then also keeps the institutions' quotas there)
    /// [default: DATA_DIR/audit.sqlite]. A URL without `connect_timeout=`
    /// (seconds) gets 5 s, and without `options=` gets
    /// `-c statement_timeout=10000` (ms): a database that stops answering
    /// fails requests (UNAVAILABLE, retried) instead of holding them.
    #[arg(long, env = "PSI_AUDIT_DB", value_parser = crate::serving::audit::AuditStore::from_arg)]
    pub audit_db: Option<crate::serving::audit::AuditStore>,
    /// Serve without TLS on an address other than loopback: anyone on the
    /// network can then query without an identity. For testing only.
    #[arg(long)]
    pub insecure_plaintext_non_loopback: bool,
    /// Connection, stream, buffer and time limits (the `[net]` table of the
    /// config file).
    #[command(flatten)]
    pub net: NetArgs,
    /// Threshold mode: the key holders (the `[holders]` table of the config
    /// file).
    #[command(flatten)]
    pub holders: crate::keyholder::pool::HolderLinkArgs,
}

/// The connection, stream, buffer and time limits of `serve`: flags,
/// `PSI_*` variables, or keys of the config file's `[net]` table. Defaults
/// in [`NetLimits::default`]; docs/SECURITY.md has the table.
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetArgs {
    /// Connections open at once, in total [default: 512; lowered to fit the
    /// open-file limit].
    #[arg(long, env = "PSI_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Connections open at once from one IP address [default: 64].
    #[arg(long, env = "PSI_MAX_CONNECTIONS_PER_PEER")]
    pub max_connections_per_peer: Option<usize>,
    /// HTTP/2 streams (requests) open at once per connection [default: 32].
    #[arg(long, env = "PSI_MAX_CONCURRENT_STREAMS")]
    pub max_concurrent_streams: Option<u32>,
    /// Time from accepting a connection to its first request (TCP, TLS and
    /// HTTP/2 handshakes) [default: 10s].
    #[arg(long, env = "PSI_HANDSHAKE_TIMEOUT")]
    pub handshake_timeout: Option<String>,
    /// Time a connection may stay open with no request [default: 2m].
    #[arg(long, env = "PSI_IDLE_TIMEOUT")]
    pub idle_timeout: Option<String>,
    /// Time to receive a whole request body [default: 30s].
    #[arg(long, env = "PSI_BODY_TIMEOUT")]
    pub body_timeout: Option<String>,
    /// A request's whole life, its response stream and flow-control stalls
    /// included; past it the connection is closed [default: 5m].
    #[arg(long, env = "PSI_STREAM_TIMEOUT")]
    pub stream_timeout: Option<String>,
    /// Bytes of request bodies held by requests in progress, server-wide
    /// [default: 268435456].
    #[arg(long, env = "PSI_BUFFER_BUDGET_BYTES")]
    pub buffer_budget_bytes: Option<usize>,
    /// The same, per connection [default: 33554432].
    #[arg(long, env = "PSI_CONNECTION_BUFFER_BYTES")]
    pub connection_buffer_bytes: Option<usize>,
    /// Largest header list (all metadata) of one request [default: 16384].
    #[arg(long, env = "PSI_MAX_HEADER_LIST_BYTES")]
    pub max_header_list_bytes: Option<u32>,
    /// HTTP/2 receive window per stream [default: 262144].
    #[arg(long, env = "PSI_STREAM_WINDOW_BYTES")]
    pub stream_window_bytes: Option<u32>,
    /// HTTP/2 receive window per connection [default: 1048576].
    #[arg(long, env = "PSI_CONNECTION_WINDOW_BYTES")]
    pub connection_window_bytes: Option<u32>,
}

/// The longest any timeout may be set to.
const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 86_400);
/// Default per-request timeout (`request_timeout_secs`).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Default interval between checks of the data directory, in milliseconds
/// (`reload_interval_ms`).
const DEFAULT_RELOAD_INTERVAL_MS: u64 = 2000;
/// Default interval between checks of the data directory.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_millis(DEFAULT_RELOAD_INTERVAL_MS);

impl NetArgs {
    /// These settings where given, else `file`'s, else the defaults, checked.
    ///
    /// # Errors
    /// A zero limit, an unreadable duration, or a window HTTP/2 does not allow.
    pub fn resolve(self, file: NetArgs, max_message_bytes: usize) -> Result<NetLimits> {
        let d = NetLimits::default();
        let duration = |flag: Option<String>,
                        file: Option<String>,
                        name: &str,
                        default: Duration| match flag.or(file) {
            None => Ok(default),
            Some(text) => {
                let v = humantime::parse_duration(&text).with_context(|| {
                    format!("{name} `{text}` is not a duration (e.g. 10s, 500ms, 2m)")
                })?;
                if v.is_zero() || v > MAX_TIMEOUT {
                    bail!("{name} must be more than zero and at most 7 days, got {text}");
                }
                Ok(v)
            }
        };
        let net = NetLimits {
            max_connections: self
                .max_connections
                .or(file.max_connections)
                .unwrap_or(d.max_connections),
            max_connections_per_peer: self
                .max_connections_per_peer
                .or(file.max_connections_per_peer)
                .unwrap_or(d.max_connections_per_peer),
            max_concurrent_streams: self
                .max_concurrent_streams
                .or(file.max_concurrent_streams)
                .unwrap_or(d.max_concurrent_streams),
            handshake_timeout: duration(
                self.handshake_timeout,
                file.handshake_timeout,
                "handshake_timeout",
                d.handshake_timeout,
            )?,
            idle_timeout: duration(
                self.idle_timeout,
                file.idle_timeout,
                "idle_timeout",
                d.idle_timeout,
            )?,
            body_timeout: duration(
                self.body_timeout,
                file.body_timeout,
                "body_timeout",
                d.body_timeout,
            )?,
            stream_timeout: duration(
                self.stream_timeout,
                file.stream_timeout,
                "stream_timeout",
                d.stream_timeout,
            )?,
            buffer_budget_bytes: self
                .buffer_budget_bytes
                .or(file.buffer_budget_bytes)
                .unwrap_or(d.buffer_budget_bytes),
            connection_buffer_bytes: self
                .connection_buffer_bytes
                .or(file.connection_buffer_bytes)
                .unwrap_or(d.connection_buffer_bytes),
            max_header_list_bytes: self
                .max_header_list_bytes
                .or(file.max_header_list_bytes)
                .unwrap_or(d.max_header_list_bytes),
            stream_window_bytes: self
                .stream_window_bytes
                .or(file.stream_window_bytes)
                .unwrap_or(d.stream_window_bytes),
            connection_window_bytes: self
                .connection_window_bytes
                .or(file.connection_window_bytes)
                .unwrap_or(d.connection_window_bytes),
        };
        for (name, v) in [
            ("max_connections", net.max_connections),
            ("max_connections_per_peer", net.max_connections_per_peer),
            (
                "max_concurrent_streams",
                net.max_concurrent_streams as usize,
            ),
        ] {
            if v == 0 {
                bail!("{name} must be at least 1");
            }
        }
        if net.connection_buffer_bytes < max_message_bytes
            || net.buffer_budget_bytes < max_message_bytes
        {
            bail!(
                "buffer_budget_bytes ({}) and connection_buffer_bytes ({}) must each hold at least one message of max_message_bytes ({})",
                net.buffer_budget_bytes, net.connection_buffer_bytes, max_message_bytes
            );
        }
        if net.max_header_list_bytes < 1024 {
            bail!("max_header_list_bytes must be at least 1024");
        }
        // HTTP/2 windows: at least the 16 KiB of one frame, at most 2^31 - 1.
        for (name, v) in [
            ("stream_window_bytes", net.stream_window_bytes),
            ("connection_window_bytes", net.connection_window_bytes),
        ] {
            if !(16_384..=0x7fff_ffff).contains(&v) {
                bail!("{name} must be between 16384 and 2147483647, got {v}");
            }
        }
        Ok(net)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    listen: Option<String>,
    max_batch: Option<usize>,
    max_bucket_batch: Option<usize>,
    max_message_bytes: Option<usize>,
    request_timeout_secs: Option<u64>,
    reload_interval_ms: Option<u64>,
    max_concurrent_per_institution: Option<usize>,
    pir_max_batch: Option<usize>,
    pir_max_concurrent: Option<usize>,
    pir_keys_cache_bytes: Option<usize>,
    pir_max_database_bytes: Option<usize>,
    pir_scheme: Option<String>,
    tagset_min_shard_bits: Option<u8>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
    audit_db: Option<String>,
    policy: Option<PathBuf>,
    admin_listen: Option<String>,
    trusted_proxies: Option<String>,
    #[serde(default)]
    net: NetArgs,
    #[serde(default)]
    holders: crate::keyholder::pool::HolderLinkArgs,
}

/// PEM contents for mutual TLS, read before anything binds.
#[derive(Clone)]
pub struct TlsFiles {
    /// Server certificate chain.
    pub cert: Vec<u8>,
    /// Server private key.
    pub key: Vec<u8>,
    /// CA of the institutions' client certificates.
    pub client_ca: Vec<u8>,
}

impl std::fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsFiles(..)")
    }
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Data directory.
    pub data_dir: PathBuf,
    /// Listen address (port 0: any free port).
    pub listen: SocketAddr,
    /// Request limits.
    pub limits: Limits,
    /// Per-request timeout.
    pub request_timeout: Duration,
    /// How often the data directory is checked for a new registry version.
    pub reload_interval: Duration,
    /// Mutual TLS; `None` serves plaintext (loopback unless explicitly allowed).
    pub tls: Option<TlsFiles>,
    /// The audit database.
    pub audit_db: crate::serving::audit::AuditStore,
    /// The policy file and its content, if any.
    pub policy: Option<(PathBuf, crate::serving::policy::Policy)>,
    /// The admin (metrics) address, if any.
    pub admin_listen: Option<SocketAddr>,
    /// Connection, stream, buffer and time limits.
    pub net: NetLimits,
    /// Balancers that send a PROXY protocol v2 header.
    pub trusted_proxies: crate::serving::connection::TrustedProxies,
    /// Threshold mode: how to reach the key holders.
    pub holders: Option<crate::keyholder::pool::HoldersConfig>,
}

impl ServeConfig {
    /// Serving `data_dir` in one process on this machine: a free loopback
    /// port, plaintext, the defaults of every setting, the audit trail in
    /// `data_dir`, no policy, no admin address. Change what differs with
    /// `ServeConfig { field: ..., ..ServeConfig::local(dir) }`.
    #[must_use]
    pub fn local(data_dir: &Path) -> Self {
        Self {
            data_dir: data_dir.to_path_buf(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            limits: Limits::default(),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            reload_interval: DEFAULT_RELOAD_INTERVAL,
            tls: None,
            audit_db: data_dir.join(crate::serving::audit::AUDIT_FILE).into(),
            policy: None,
            admin_listen: None,
            net: NetLimits::default(),
            trusted_proxies: crate::serving::connection::TrustedProxies::default(),
            holders: None,
        }
    }
}

impl ServeArgs {
    /// Merges flags, environment and file, and validates the result.
    ///
    /// # Errors
    /// An unreadable or invalid file, a bad address, limits out of range, or a
    /// data directory without a key or snapshot.
    pub fn resolve(self) -> Result<ServeConfig> {
        let file = match &self.config {
            Some(path) => FileConfig::read(path)?,
            None => FileConfig::default(),
        };
        let limits = self.limits(&file)?;
        check_limits(&limits)?;
        let data_dir = self
            .data_dir
            .or(file.data_dir)
            .context("no data directory: pass --data-dir, set PSI_DATA_DIR, or set data_dir in the config file")?;
        let listen_text = self
            .listen
            .or(file.listen)
            .unwrap_or_else(|| "127.0.0.1:50051".to_string());
        let listen: SocketAddr = listen_text.parse().with_context(|| {
            format!("listen address `{listen_text}` is not IP:PORT (e.g. 127.0.0.1:50051)")
        })?;
        let timeout = self
            .request_timeout_secs
            .or(file.request_timeout_secs)
            .unwrap_or(DEFAULT_REQUEST_TIMEOUT.as_secs());
        if timeout == 0 || timeout > MAX_TIMEOUT.as_secs() {
            bail!(
                "request_timeout_secs must be between 1 and {}",
                MAX_TIMEOUT.as_secs()
            );
        }
        let reload_ms = self
            .reload_interval_ms
            .or(file.reload_interval_ms)
            .unwrap_or(DEFAULT_RELOAD_INTERVAL_MS);
        if reload_ms < 10 {
            bail!("reload_interval_ms must be at least 10");
        }
        if !crate::store::has_registry(&data_dir) {
            bail!(
                "{} holds no registry ({} is missing): run `psi-server init --registry FILE --data-dir {}` first",
                data_dir.display(),
                crate::store::manifest::MANIFEST_FILE,
                data_dir.display()
            );
        }
        let tls = tls_files(
            self.tls_cert.or(file.tls_cert),
            self.tls_key.or(file.tls_key),
            self.client_ca.or(file.client_ca),
        )?;
        if tls.is_none() && !listen.ip().is_loopback() && !self.insecure_plaintext_non_loopback {
            bail!(
                "refusing to serve plaintext on {listen}, which is not a loopback address: institutions would be unauthenticated. Pass --tls-cert, --tls-key and --client-ca (see `psi-server ca init`), or --insecure-plaintext-non-loopback for a test network"
            );
        }
        let audit_db = self
            .audit_db
            .or_else(|| {
                file.audit_db
                    .as_deref()
                    .map(crate::serving::audit::AuditStore::parse)
            })
            .unwrap_or_else(|| data_dir.join(crate::serving::audit::AUDIT_FILE).into());
        let policy = match self.policy.or(file.policy) {
            Some(path) => {
                let p = crate::serving::policy::Policy::load(&path)?;
                Some((path, p))
            }
            None => None,
        };
        let admin_listen = match self.admin_listen.or(file.admin_listen) {
            Some(text) => Some(text.parse::<SocketAddr>().with_context(|| {
                format!("admin address `{text}` is not IP:PORT (e.g. 127.0.0.1:9090)")
            })?),
            None => None,
        };
        let trusted_proxies = match self.trusted_proxies.or(file.trusted_proxies) {
            Some(list) => crate::serving::connection::TrustedProxies::parse(&list)
                .map_err(|e| anyhow::anyhow!("trusted_proxies: {e}"))?,
            None => crate::serving::connection::TrustedProxies::default(),
        };
        let net = self.net.resolve(file.net, limits.max_message_bytes)?;
        let holders = self.holders.resolve(file.holders)?;
        Ok(ServeConfig {
            holders,
            trusted_proxies,
            net,
            data_dir,
            listen,
            limits,
            request_timeout: Duration::from_secs(timeout),
            reload_interval: Duration::from_millis(reload_ms),
            tls,
            audit_db,
            policy,
            admin_listen,
        })
    }

    /// The limits: each from the flag (or environment), else the file, else the default.
    fn limits(&self, file: &FileConfig) -> Result<Limits> {
        let defaults = Limits::default();
        let pir_scheme = match self.pir_scheme.clone().or(file.pir_scheme.clone()) {
            Some(text) => text
                .parse()
                .map_err(|e| anyhow::anyhow!("pir_scheme: {e}"))?,
            None => defaults.pir_scheme,
        };
        Ok(Limits {
            pir_scheme,
            max_batch: self
                .max_batch
                .or(file.max_batch)
                .unwrap_or(defaults.max_batch),
            max_bucket_batch: self
                .max_bucket_batch
                .or(file.max_bucket_batch)
                .unwrap_or(defaults.max_bucket_batch),
            max_message_bytes: self
                .max_message_bytes
                .or(file.max_message_bytes)
                .unwrap_or(defaults.max_message_bytes),
            max_concurrent_per_institution: self
                .max_concurrent_per_institution
                .or(file.max_concurrent_per_institution)
                .unwrap_or(defaults.max_concurrent_per_institution),
            pir_max_batch: self
                .pir_max_batch
                .or(file.pir_max_batch)
                .unwrap_or(defaults.pir_max_batch),
            pir_max_concurrent: self
                .pir_max_concurrent
                .or(file.pir_max_concurrent)
                .unwrap_or(defaults.pir_max_concurrent),
            pir_keys_cache_bytes: self
                .pir_keys_cache_bytes
                .or(file.pir_keys_cache_bytes)
                .unwrap_or(defaults.pir_keys_cache_bytes),
            pir_max_database_bytes: self
                .pir_max_database_bytes
                .or(file.pir_max_database_bytes)
                .unwrap_or(defaults.pir_max_database_bytes),
            tagset_min_shard_bits: self
                .tagset_min_shard_bits
                .or(file.tagset_min_shard_bits)
                .unwrap_or(defaults.tagset_min_shard_bits),
        })
    }
}

/// Checks that `limits` are within their bounds.
fn check_limits(limits: &Limits) -> Result<()> {
    if limits.tagset_min_shard_bits > 20 {
        bail!(
            "tagset_min_shard_bits must be between 0 and 20, got {}",
            limits.tagset_min_shard_bits
        );
    }
    if !(1..=64).contains(&limits.pir_max_batch) {
        bail!(
            "pir_max_batch must be between 1 and 64, got {}",
            limits.pir_max_batch
        );
    }
    if limits.pir_max_concurrent == 0 {
        bail!("pir_max_concurrent must be at least 1");
    }
    // One institution's parameters (24-31 MB in memory) must fit.
    if limits.pir_keys_cache_bytes < 64 << 20 {
        bail!(
            "pir_keys_cache_bytes must be at least 67108864 (64 MiB), got {}",
            limits.pir_keys_cache_bytes
        );
    }
    if limits.max_concurrent_per_institution == 0 {
        bail!("max_concurrent_per_institution must be at least 1");
    }
    if !(1..=psi_core::proof::MAX_PROOF_BATCH).contains(&limits.max_batch) {
        bail!(
            "max_batch must be between 1 and 65536, got {}",
            limits.max_batch
        );
    }
    if !(1..=1024).contains(&limits.max_bucket_batch) {
        bail!(
            "max_bucket_batch must be between 1 and 1024, got {}",
            limits.max_bucket_batch
        );
    }
    let needed = limits.max_batch * 32 + 1024;
    if limits.max_message_bytes < needed.max(1 << 20) {
        bail!(
            "max_message_bytes {} is too small: at least {} for max_batch {} (and 1 MiB)",
            limits.max_message_bytes,
            needed.max(1 << 20),
            limits.max_batch
        );
    }
    Ok(())
}

/// Reads the TLS files: all three, or none (plaintext).
pub(crate) fn tls_files(
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    ca: Option<PathBuf>,
) -> Result<Option<TlsFiles>> {
    let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    Ok(match (cert, key, ca) {
        (Some(cert), Some(key), Some(ca)) => Some(TlsFiles {
            cert: read(&cert)?,
            key: read(&key)?,
            client_ca: read(&ca)?,
        }),
        (None, None, None) => None,
        _ => bail!("TLS needs all three of --tls-cert, --tls-key and --client-ca (see `psi-server ca init`)"),
    })
}

impl FileConfig {
    /// Reads and parses the configuration file at `path`. Relative paths in
    /// it are the file's neighbours (as in psi-client's config file), not
    /// relative to the working directory.
    fn read(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        let mut config: Self = toml::from_str(&text)
            .with_context(|| format!("parsing config file {}", path.display()))?;
        let base = path.parent().unwrap_or(std::path::Path::new("."));
        for p in [
            &mut config.data_dir,
            &mut config.tls_cert,
            &mut config.tls_key,
            &mut config.client_ca,
            &mut config.policy,
            &mut config.holders.ca,
            &mut config.holders.cert,
            &mut config.holders.key,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if let Some(db) = &mut config.audit_db {
            if let crate::serving::audit::AuditStore::Sqlite(p) =
                crate::serving::audit::AuditStore::parse(db)
            {
                if p.is_relative() {
                    *db = base.join(p).display().to_string();
                }
            }
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_dir() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(crate::store::manifest::MANIFEST_FILE), b"x").unwrap();
        d
    }

    #[test]
    fn pir_settings_have_safe_defaults_and_bounds() {
        let d = data_dir();
        let base = ServeArgs {
            data_dir: Some(d.path().into()),
            ..ServeArgs::default()
        };
        let cfg = base.clone().resolve().unwrap();
        assert_eq!(
            (
                cfg.limits.pir_max_batch,
                cfg.limits.pir_max_concurrent,
                cfg.limits.pir_keys_cache_bytes,
                cfg.limits.pir_max_database_bytes
            ),
            (4, 8, 1 << 30, 4 << 30)
        );
        let err = |args: ServeArgs| args.resolve().unwrap_err().to_string();
        assert!(err(ServeArgs {
            pir_max_batch: Some(0),
            ..base.clone()
        })
        .contains("pir_max_batch"));
        assert!(err(ServeArgs {
            pir_max_batch: Some(65),
            ..base.clone()
        })
        .contains("pir_max_batch"));
        assert!(err(ServeArgs {
            pir_max_concurrent: Some(0),
            ..base.clone()
        })
        .contains("pir_max_concurrent"));
        assert!(err(ServeArgs {
            pir_keys_cache_bytes: Some(1 << 20),
            ..base.clone()
        })
        .contains("pir_keys_cache_bytes"));
        // The scheme: auto unless said; a name not known is refused.
        assert_eq!(cfg.limits.pir_scheme, psi_pir::SchemeChoice::Auto);
        let ypir = ServeArgs {
            pir_scheme: Some("ypir".into()),
            ..base.clone()
        };
        assert_eq!(
            ypir.resolve().unwrap().limits.pir_scheme,
            psi_pir::SchemeChoice::Ypir
        );
        assert!(err(ServeArgs {
            pir_scheme: Some("simplepir".into()),
            ..base.clone()
        })
        .contains("pir_scheme"));
        // Messages too small for PIR's public parameters: the server starts
        // without PIR mode (see pir::database_for), it does not refuse.
        assert!(ServeArgs {
            max_message_bytes: Some(4 << 20),
            ..base
        }
        .resolve()
        .is_ok());
    }

    #[test]
    fn flags_override_the_file_and_errors_are_specific() {
        let d = data_dir();
        let cfg_path = d.path().join("psi.toml");
        std::fs::write(
            &cfg_path,
            format!(
                "data_dir = {:?}\nlisten = \"127.0.0.1:7000\"\nmax_batch = 100\n",
                d.path()
            ),
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(cfg_path.clone()),
            max_batch: Some(200),
            ..ServeArgs::default()
        };
        let cfg = args.resolve().unwrap();
        assert_eq!(cfg.listen.port(), 7000);
        assert_eq!(cfg.limits.max_batch, 200);
        // Relative paths in the file are the file's neighbours, wherever
        // the server is started from.
        std::fs::write(
            &cfg_path,
            "data_dir = \".\"\naudit_db = \"audit/trail.sqlite\"\n",
        )
        .unwrap();
        let cfg = ServeArgs {
            config: Some(cfg_path.clone()),
            ..ServeArgs::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(cfg.data_dir, d.path().join("."));
        assert_eq!(
            cfg.audit_db,
            crate::serving::audit::AuditStore::from(d.path().join("audit/trail.sqlite"))
        );

        let bad = ServeArgs {
            listen: Some("localhost".into()),
            data_dir: Some(d.path().into()),
            ..ServeArgs::default()
        };
        assert!(bad
            .resolve()
            .unwrap_err()
            .to_string()
            .contains("is not IP:PORT"));
        let bad = ServeArgs {
            max_batch: Some(70_000),
            data_dir: Some(d.path().into()),
            ..ServeArgs::default()
        };
        assert!(bad.resolve().unwrap_err().to_string().contains("max_batch"));
        std::fs::write(&cfg_path, "listen_on = 1\n").unwrap();
        let bad = ServeArgs {
            config: Some(cfg_path.clone()),
            ..ServeArgs::default()
        };
        assert!(format!("{:#}", bad.resolve().unwrap_err()).contains("unknown field"));
        let open = ServeArgs {
            listen: Some("0.0.0.0:7000".into()),
            data_dir: Some(d.path().into()),
            ..ServeArgs::default()
        };
        assert!(open
            .clone()
            .resolve()
            .unwrap_err()
            .to_string()
            .contains("not a loopback address"));
        let allowed = ServeArgs {
            insecure_plaintext_non_loopback: true,
            ..open
        };
        assert!(allowed.resolve().is_ok());
        let half_tls = ServeArgs {
            tls_cert: Some(cfg_path.clone()),
            data_dir: Some(d.path().into()),
            ..ServeArgs::default()
        };
        assert!(half_tls
            .resolve()
            .unwrap_err()
            .to_string()
            .contains("all three"));
        // Network limits: flags over the file's [net] table, checked.
        std::fs::write(
            &cfg_path,
            format!(
                "data_dir = {:?}\n[net]\nidle_timeout = \"30s\"\nmax_connections = 9\n",
                d.path()
            ),
        )
        .unwrap();
        let cfg = ServeArgs {
            config: Some(cfg_path.clone()),
            net: NetArgs {
                max_connections: Some(10),
                ..NetArgs::default()
            },
            ..ServeArgs::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(cfg.net.max_connections, 10);
        assert_eq!(cfg.net.idle_timeout, Duration::from_secs(30));
        assert_eq!(cfg.net.stream_timeout, NetLimits::default().stream_timeout);
        for (bad, want) in [
            (
                NetArgs {
                    idle_timeout: Some("soon".into()),
                    ..NetArgs::default()
                },
                "is not a duration",
            ),
            (
                NetArgs {
                    stream_timeout: Some("30d".into()),
                    ..NetArgs::default()
                },
                "at most 7 days",
            ),
            (
                NetArgs {
                    max_concurrent_streams: Some(0),
                    ..NetArgs::default()
                },
                "max_concurrent_streams must be at least 1",
            ),
            (
                NetArgs {
                    connection_buffer_bytes: Some(1 << 20),
                    ..NetArgs::default()
                },
                "must each hold at least one message",
            ),
            (
                NetArgs {
                    stream_window_bytes: Some(100),
                    ..NetArgs::default()
                },
                "stream_window_bytes must be between",
            ),
        ] {
            let err = ServeArgs {
                data_dir: Some(d.path().into()),
                net: bad,
                ..ServeArgs::default()
            }
            .resolve()
            .unwrap_err();
            assert!(format!("{err:#}").contains(want), "{err:#}");
        }
        let err = ServeArgs {
            data_dir: Some(d.path().into()),
            request_timeout_secs: Some(u64::MAX),
            ..ServeArgs::default()
        }
        .resolve()
        .unwrap_err();
        assert!(err.to_string().contains("request_timeout_secs"), "{err}");
        std::fs::write(&cfg_path, "[net]\nidle_timeot = \"1s\"\n").unwrap();
        let bad = ServeArgs {
            config: Some(cfg_path.clone()),
            data_dir: Some(d.path().into()),
            ..ServeArgs::default()
        };
        assert!(format!("{:#}", bad.resolve().unwrap_err()).contains("unknown field"));
        let empty = tempfile::tempdir().unwrap();
        let bad = ServeArgs {
            data_dir: Some(empty.path().into()),
            ..ServeArgs::default()
        };
        assert!(bad
            .resolve()
            .unwrap_err()
            .to_string()
            .contains("psi-server init"));
    }
}
