//! Attackers for `psi-load --attack`: each runs against the live server from
//! its own loopback address (127.0.0.2) beside the honest load, re-opening
//! whatever the server closes or refuses (after a pause: a persistent
//! attacker, not a flood), until told to stop. Traffic stays on the
//! loopback interface, in loops bounded by the load test's duration.
//!
//! - `idle`: 500 TCP connections that send nothing.
//! - `half-tls`: 500 connections that send the first bytes of a ClientHello.
//! - `partial-body`: an authenticated institution keeps 512 `SyncTagSet`
//!   streams whose bodies claim 16 MiB and never end.
//! - `stalled-stream`: an authenticated institution keeps `SyncTagSet`
//!   streams open on connections that advertise a receive window of 0.
//! - `cancel`: an authenticated institution sends `Evaluate` of 4096
//!   elements, 8 at a time, and cancels each after 30 ms.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use psi_testbed::raw_h2::{framed, match_request, tcp_from, wait_closed, ATTACKER};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::rustls;

/// Which attack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Attack {
    /// No attacker.
    None,
    /// Idle TCP connections.
    Idle,
    /// Unfinished TLS handshakes.
    HalfTls,
    /// Request bodies that never end.
    PartialBody,
    /// Response streams the client never reads.
    StalledStream,
    /// Evaluations cancelled after 30 ms.
    Cancel,
}

/// What the attacker did.
#[derive(Debug, Default)]
pub struct Tally {
    /// TCP connections opened.
    pub connections: AtomicU64,
    /// Requests (streams) started.
    pub requests: AtomicU64,
    /// Requests the server refused or cut.
    pub refused: AtomicU64,
}

impl Tally {
    /// As JSON.
    #[must_use]
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "connections": self.connections.load(Ordering::Relaxed),
            "requests": self.requests.load(Ordering::Relaxed),
            "refused_or_cut": self.refused.load(Ordering::Relaxed),
        })
    }
}

/// What the attacker needs: the server, and an institution's credentials
/// (PEM) for the attacks that need to pass authentication.
#[derive(Debug, Clone)]
pub struct Target {
    /// The server's address.
    pub addr: SocketAddr,
    /// The operator's CA certificate.
    pub ca_pem: Vec<u8>,
    /// The attacking institution's certificate.
    pub cert_pem: Vec<u8>,
    /// Its private key.
    pub key_pem: Vec<u8>,
    /// The purpose it declares.
    pub purpose: String,
    /// The server's key epoch.
    pub epoch: u64,
    /// 4096 valid blinded elements, packed.
    pub blinded: Vec<u8>,
}

/// Runs `attack` until `stop` turns true.
///
/// # Errors
/// Bad credentials; the attacks themselves count failures instead.
pub async fn run(
    attack: Attack,
    target: Target,
    stop: watch::Receiver<bool>,
) -> Result<Arc<Tally>> {
    let tally = Arc::new(Tally::default());
    let tls = Arc::new(tls_config(&target)?);
    let mut tasks = Vec::new();
    let lanes = match attack {
        Attack::None => 0,
        Attack::Idle | Attack::HalfTls => 500,
        Attack::PartialBody => 16,
        Attack::StalledStream => 4,
        Attack::Cancel => 8,
    };
    for _ in 0..lanes {
        let (target, tally, tls, mut stop) = (
            target.clone(),
            Arc::clone(&tally),
            Arc::clone(&tls),
            stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !*stop.borrow() {
                let round = lane(attack, &target, &tally, &tls);
                tokio::select! {
                    _ = stop.changed() => break,
                    _ = round => {
                        // Closed or refused: a persistent attacker comes
                        // back, not a flood (which is the balancer's to cut).
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    Ok(tally)
}

/// One connection's worth of an attack, until the server closes it.
async fn lane(
    attack: Attack,
    target: &Target,
    tally: &Tally,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<()> {
    let tcp = tcp_from(ATTACKER, target.addr).await?;
    tally.connections.fetch_add(1, Ordering::Relaxed);
    match attack {
        Attack::None => Ok(()),
        Attack::Idle => {
            wait_closed(tcp).await;
            Ok(())
        }
        Attack::HalfTls => {
            let mut tcp = tcp;
            tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
                .await?;
            wait_closed(tcp).await;
            Ok(())
        }
        Attack::PartialBody => {
            let io = handshake(tcp, tls).await?;
            partial_bodies(io, target, tally).await
        }
        Attack::StalledStream => {
            let io = handshake(tcp, tls).await?;
            stalled_streams(io, target, tally).await
        }
        Attack::Cancel => {
            drop(tcp);
            cancelled_evaluations(target, tally).await
        }
    }
}

fn tls_config(target: &Target) -> Result<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&target.ca_pem) {
        roots.add(cert.context("the CA certificate")?)?;
    }
    let chain = CertificateDer::pem_slice_iter(&target.cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .context("the attacker's certificate")?;
    let key = PrivateKeyDer::from_pem_slice(&target.key_pem).context("the attacker's key")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

async fn handshake(
    tcp: TcpStream,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(tls));
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?;
    Ok(connector.connect(name, tcp).await?)
}

/// 32 streams on one connection (its limit), each a `SyncTagSet` whose
/// length prefix claims 16 MiB - 64 bytes and whose body never ends; a
/// refused stream is replaced until the connection closes.
async fn partial_bodies(
    io: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
    target: &Target,
    tally: &Tally,
) -> Result<()> {
    let (send, conn) = h2::client::handshake(io).await?;
    let mut conn = tokio::spawn(conn);
    let claimed: u32 = (16 << 20) - 64;
    let mut prefix = vec![0u8];
    prefix.extend_from_slice(&claimed.to_be_bytes());
    let chunk = Bytes::from(vec![0u8; 64 << 10]);
    let mut streams = tokio::task::JoinSet::new();
    loop {
        while streams.len() < 32 {
            let mut send = send.clone().ready().await?;
            let (response, mut stream) = send.send_request(
                match_request("https", "SyncTagSet", &target.purpose)?,
                false,
            )?;
            tally.requests.fetch_add(1, Ordering::Relaxed);
            let (prefix, chunk) = (Bytes::from(prefix.clone()), chunk.clone());
            streams.spawn(async move {
                let _ = stream.send_data(prefix, false);
                let mut sent = 0u64;
                while sent + (64 << 10) < u64::from(claimed) {
                    stream.reserve_capacity(chunk.len());
                    match std::future::poll_fn(|cx| stream.poll_capacity(cx)).await {
                        Some(Ok(n)) if n > 0 => {
                            if stream
                                .send_data(chunk.slice(..n.min(chunk.len())), false)
                                .is_err()
                            {
                                break;
                            }
                            sent += n as u64;
                        }
                        Some(Ok(_)) => {}
                        _ => break,
                    }
                }
                // Hold the stream open until the server answers (a refusal).
                let _ = response.await;
                drop(stream);
            });
        }
        tokio::select! {
            _ = &mut conn => return Ok(()),
            Some(_) = streams.join_next() => {
                tally.refused.fetch_add(1, Ordering::Relaxed);
                // Replace it after a pause: a persistent attacker, not a
                // flood of refusals.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// `SyncTagSet` requests on a connection whose receive window is 0: the
/// server can send no data, so each stream stays open until the server cuts it.
async fn stalled_streams(
    io: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
    target: &Target,
    tally: &Tally,
) -> Result<()> {
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake(io)
        .await?;
    let msg = psi_proto::v1::SyncTagSetRequest {
        key_epoch: target.epoch,
        held_version: 0,
        held_digests: Vec::new(),
        root_only: false,
        ..Default::default()
    };
    let framed = framed(&prost::Message::encode_to_vec(&msg));
    let mut held = Vec::new();
    for _ in 0..8 {
        let mut send = send.clone().ready().await?;
        let (response, mut stream) = send.send_request(
            match_request("https", "SyncTagSet", &target.purpose)?,
            false,
        )?;
        tally.requests.fetch_add(1, Ordering::Relaxed);
        let _ = stream.send_data(framed.clone(), true);
        held.push((response, stream));
    }
    let _ = conn.await;
    tally
        .refused
        .fetch_add(held.len() as u64, Ordering::Relaxed);
    Ok(())
}

/// `Evaluate` of 4096 elements over a real gRPC channel, cancelled after 30 ms.
async fn cancelled_evaluations(target: &Target, tally: &Tally) -> Result<()> {
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&target.ca_pem))
        .identity(tonic::transport::Identity::from_pem(
            &target.cert_pem,
            &target.key_pem,
        ));
    // One authenticated connection (from 127.0.0.1: the per-address
    // connection limit is not what this attack tests).
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", target.addr))?
        .tls_config(tls)?
        .connect()
        .await?;
    let mut client = psi_proto::v1::match_client::MatchClient::new(channel);
    for _ in 0..100 {
        let mut req = tonic::Request::new(psi_proto::v1::EvaluateRequest {
            key_epoch: target.epoch,
            blinded_elements: target.blinded.clone(),
            combines_partials: false,
        });
        req.metadata_mut()
            .insert(psi_proto::PURPOSE_HEADER, target.purpose.parse()?);
        tally.requests.fetch_add(1, Ordering::Relaxed);
        if tokio::time::timeout(Duration::from_millis(30), client.evaluate(req))
            .await
            .is_err()
        {
            tally.refused.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}
