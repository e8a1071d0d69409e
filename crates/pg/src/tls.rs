//! TLS for PostgreSQL connections (the audit trail, quotas, and `init
//! --postgres`, which carries every name and ID): rustls, the server's
//! certificate verified against the CA named by `PSI_PG_CA_FILE` (its host
//! name checked too). A database that is not on this host (loopback or a
//! Unix socket) is reached only over TLS, unless
//! `PSI_PG_INSECURE_PLAINTEXT=1` says otherwise for a test network.

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::{bail, Context as _, Result};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

/// The environment variable naming the CA certificate (PEM) that signed
/// the PostgreSQL server's certificate.
pub const CA_FILE_ENV: &str = "PSI_PG_CA_FILE";
/// The environment variable that allows a PostgreSQL server elsewhere than
/// on this host without TLS (`1`): for a test network only.
pub const INSECURE_ENV: &str = "PSI_PG_INSECURE_PLAINTEXT";

/// How to reach the database: over TLS with this connector, or in the
/// clear (`None`: on this host, or allowed by [`INSECURE_ENV`]).
///
/// # Errors
/// A database elsewhere without a CA file (and not allowed in the clear),
/// `sslmode=require` without a CA file, an unreadable CA file.
pub fn connector(
    hosts: &[Host],
    ssl_mode: SslMode,
    what: &str,
) -> Result<(Option<RustlsConnect>, SslMode)> {
    // No host named: the client library refuses the URL itself.
    let local = hosts.iter().all(|h| match h {
        Host::Unix(_) => true,
        Host::Tcp(name) => {
            name == "localhost"
                || name
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
    });
    let insecure = std::env::var(INSECURE_ENV).is_ok_and(|v| v == "1" || v == "true");
    match std::env::var_os(CA_FILE_ENV) {
        Some(ca) => {
            if ssl_mode == SslMode::Disable && !local && !insecure {
                bail!(
                    "refusing sslmode=disable for {what}: the PostgreSQL server is not on this host; drop sslmode=disable (TLS is used with {CA_FILE_ENV}), or set {INSECURE_ENV}=1 on a test network"
                );
            }
            let mode = if ssl_mode == SslMode::Disable {
                SslMode::Disable
            } else {
                // A server that does not offer TLS is refused, never
                // fallen back from.
                SslMode::Require
            };
            Ok((Some(RustlsConnect::from_ca_file(Path::new(&ca))?), mode))
        }
        None if ssl_mode == SslMode::Require => bail!(
            "sslmode=require for {what} needs the CA that signed the PostgreSQL server's certificate: set {CA_FILE_ENV}"
        ),
        None if local => Ok((None, SslMode::Disable)),
        None if insecure => {
            tracing::warn!(
                "{what}: PostgreSQL at a non-loopback address WITHOUT TLS ({INSECURE_ENV}=1): names, ID numbers or audit records cross the network in the clear"
            );
            Ok((None, SslMode::Disable))
        }
        None => bail!(
            "refusing to reach PostgreSQL for {what} at a non-loopback address without TLS: set {CA_FILE_ENV} to the CA that signed its certificate (or {INSECURE_ENV}=1 on a test network)"
        ),
    }
}

/// A `tokio-postgres` TLS connector over rustls.
#[derive(Clone)]
pub struct RustlsConnect(Arc<rustls::ClientConfig>);

impl std::fmt::Debug for RustlsConnect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RustlsConnect(..)")
    }
}

impl RustlsConnect {
    /// Verifies servers against the CA certificates in the PEM file `path`.
    ///
    /// # Errors
    /// An unreadable file, or one with no certificate rustls accepts.
    pub fn from_ca_file(path: &Path) -> Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(path)
            .with_context(|| format!("reading {} ({CA_FILE_ENV})", path.display()))?;
        for cert in certs {
            let cert =
                cert.with_context(|| format!("{} holds a malformed certificate", path.display()))?;
            roots.add(cert).with_context(|| {
                format!("{} holds a certificate rustls refuses", path.display())
            })?;
        }
        if roots.is_empty() {
            bail!("{} holds no certificate ({CA_FILE_ENV})", path.display());
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .context("configuring TLS")?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(Self(Arc::new(config)))
    }
}

impl<S> MakeTlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsTlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> io::Result<RustlsTlsConnect> {
        let name = ServerName::try_from(domain.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok(RustlsTlsConnect {
            config: Arc::clone(&self.0),
            name,
        })
    }
}

/// One connection's TLS handshake.
#[derive(Debug)]
pub struct RustlsTlsConnect {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

impl<S> TlsConnect<S> for RustlsTlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let tls = tokio_rustls::TlsConnector::from(self.config)
                .connect(self.name, stream)
                .await?;
            Ok(RustlsStream(tls))
        })
    }
}

/// A TLS stream to PostgreSQL.
#[derive(Debug)]
pub struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}
