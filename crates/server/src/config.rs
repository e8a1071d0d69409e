//! `serve` configuration from flags, environment variables (`PSI_*`) and an
//! optional TOML file, in that order of precedence. Every error is reported
//! before any port is bound.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::service::Limits;

/// Flags and environment variables of `psi-server serve`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// TOML configuration file (keys: data_dir, listen, max_batch,
    /// max_bucket_batch, max_message_bytes, request_timeout_secs).
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
    /// Address of the admin endpoint serving Prometheus metrics at /metrics
    /// (e.g. 127.0.0.1:9090); none by default.
    #[arg(long, env = "PSI_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// Audit database [default: DATA_DIR/audit.sqlite].
    #[arg(long, env = "PSI_AUDIT_DB")]
    pub audit_db: Option<PathBuf>,
    /// Serve without TLS on an address other than loopback: anyone on the
    /// network can then query without an identity. For testing only.
    #[arg(long)]
    pub insecure_plaintext_non_loopback: bool,
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
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
    audit_db: Option<PathBuf>,
    policy: Option<PathBuf>,
    admin_listen: Option<String>,
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
    pub audit_db: PathBuf,
    /// The policy file and its content, if any.
    pub policy: Option<(PathBuf, crate::policy::Policy)>,
    /// The admin (metrics) address, if any.
    pub admin_listen: Option<SocketAddr>,
}

impl ServeArgs {
    /// Merges flags, environment and file, and validates the result.
    ///
    /// # Errors
    /// An unreadable or invalid file, a bad address, limits out of range, or a
    /// data directory without a key or snapshot.
    pub fn resolve(self) -> Result<ServeConfig> {
        let file = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading config file {}", path.display()))?;
                toml::from_str::<FileConfig>(&text)
                    .with_context(|| format!("parsing config file {}", path.display()))?
            }
            None => FileConfig::default(),
        };
        let defaults = Limits::default();
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
        let limits = Limits {
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
        };
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
        let timeout = self
            .request_timeout_secs
            .or(file.request_timeout_secs)
            .unwrap_or(60);
        if timeout == 0 {
            bail!("request_timeout_secs must be at least 1");
        }
        let reload_ms = self
            .reload_interval_ms
            .or(file.reload_interval_ms)
            .unwrap_or(2000);
        if reload_ms < 10 {
            bail!("reload_interval_ms must be at least 10");
        }
        {
            let p = data_dir.join(crate::registry::SNAPSHOT_FILE);
            if !p.exists() {
                bail!(
                    "{} is missing: run `psi-server init --registry FILE --data-dir {}` first",
                    p.display(),
                    data_dir.display()
                );
            }
        }
        let read =
            |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        let tls = match (
            self.tls_cert.or(file.tls_cert),
            self.tls_key.or(file.tls_key),
            self.client_ca.or(file.client_ca),
        ) {
            (Some(cert), Some(key), Some(ca)) => Some(TlsFiles {
                cert: read(&cert)?,
                key: read(&key)?,
                client_ca: read(&ca)?,
            }),
            (None, None, None) => None,
            _ => bail!("TLS needs all three of --tls-cert, --tls-key and --client-ca (see `psi-server ca init`)"),
        };
        if tls.is_none() && !listen.ip().is_loopback() && !self.insecure_plaintext_non_loopback {
            bail!(
                "refusing to serve plaintext on {listen}, which is not a loopback address: institutions would be unauthenticated. Pass --tls-cert, --tls-key and --client-ca (see `psi-server ca init`), or --insecure-plaintext-non-loopback for a test network"
            );
        }
        let audit_db = self
            .audit_db
            .or(file.audit_db)
            .unwrap_or_else(|| data_dir.join(crate::audit::AUDIT_FILE));
        let policy = match self.policy.or(file.policy) {
            Some(path) => {
                let p = crate::policy::Policy::load(&path)?;
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
        Ok(ServeConfig {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_dir() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(crate::registry::SNAPSHOT_FILE), b"x").unwrap();
        d
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
