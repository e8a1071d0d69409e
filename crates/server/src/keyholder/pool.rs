//! The way from a serving replica, or the encoding side, to the key
//! holders: a blinded batch goes to `t` holders at once; each answer is
//! verified against the holder's public share; a holder that fails (down,
//! past the timeout, refusing, or answering with a proof that does not
//! verify) is replaced by the next one not yet asked, until `t` verified
//! partial evaluations are in hand or every holder has been tried. The
//! starting holder rotates from batch to batch to spread the load.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::stream::{FuturesUnordered, StreamExt};
use psi_core::threshold::{verify_partial, Committee, Partial};
use psi_core::BlindedElement;
use psi_proto::v1::key_holder_client::KeyHolderClient;
use psi_proto::v1::PartialEvaluateRequest;
use psi_proto::{pack, partial_from_proto};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use zeroize::Zeroizing;

use crate::serving::error::ServiceError;
use crate::serving::metrics::Metrics;

/// How long a holder may take over one batch before the next is asked
/// instead, when nobody says otherwise.
pub const DEFAULT_HOLDER_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the holders are and how to reach them.
#[derive(Clone)]
pub struct HoldersConfig {
    /// Each holder's index and URL (`https://host:port`, or `http://` on a
    /// test's loopback).
    pub endpoints: Vec<(u16, String)>,
    /// The CA that issued the holders' server certificates, and this
    /// side's client certificate and key (mutual TLS); `None`: plaintext.
    pub tls: Option<HoldersTls>,
    /// Per holder and batch.
    pub timeout: Duration,
}

/// The client side of the holders' mutual TLS.
#[derive(Clone)]
pub struct HoldersTls {
    /// CA certificate (PEM) of the holders' server certificates.
    pub ca: Vec<u8>,
    /// This replica's (or encoder's) certificate (PEM).
    pub cert: Vec<u8>,
    /// Its private key (PEM).
    pub key: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for HoldersTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HoldersTls(..)")
    }
}

impl std::fmt::Debug for HoldersConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HoldersConfig")
            .field("endpoints", &self.endpoints)
            .field("tls", &self.tls)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl HoldersConfig {
    /// Parses `1=https://h1:7443,2=https://h2:7443,...`.
    ///
    /// # Errors
    /// A malformed entry, an index outside 1..255, a repeated index.
    pub fn parse_endpoints(text: &str) -> Result<Vec<(u16, String)>> {
        let mut out: Vec<(u16, String)> = Vec::new();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (index, url) = item.split_once('=').with_context(|| {
                format!("`{item}` is not `INDEX=URL` (e.g. 1=https://holder-1:7443)")
            })?;
            let index: u16 = index
                .trim()
                .parse()
                .ok()
                .filter(|i| (1..=psi_core::threshold::MAX_HOLDERS).contains(i))
                .with_context(|| format!("`{index}` is not a holder index (1 to 255)"))?;
            if out.iter().any(|(i, _)| *i == index) {
                bail!("holder {index} is listed twice");
            }
            out.push((index, url.trim().to_string()));
        }
        if out.is_empty() {
            bail!("no key holders listed");
        }
        Ok(out)
    }
}

/// On whose behalf a batch is evaluated: what the holders audit and
/// count against their quotas.
#[derive(Debug, Clone, Default)]
pub struct OnBehalf {
    /// The institution (or the encoding side's own name).
    pub institution: String,
    /// Its declared purpose.
    pub purpose: String,
    /// `sync`, `bucket`, `pir` or `encode`.
    pub mode: String,
    /// The request id of the replica's own audit record.
    pub request_id: String,
}

struct Holder {
    index: u16,
    url: String,
    client: KeyHolderClient<Channel>,
}

/// Connections to the holders (made lazily: a holder down at start is
/// tried, and skipped, batch by batch).
pub struct HolderPool {
    holders: Vec<Holder>,
    timeout: Duration,
    next: AtomicUsize,
    metrics: Option<Arc<Metrics>>,
}

impl std::fmt::Debug for HolderPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HolderPool")
            .field(
                "holders",
                &self
                    .holders
                    .iter()
                    .map(|h| (h.index, &h.url))
                    .collect::<Vec<_>>(),
            )
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Largest answer a holder may send: 2^16 elements and a proof, with room.
const MAX_HOLDER_MESSAGE: usize = (1 << 16) * 32 + (1 << 16);

impl HolderPool {
    /// A pool for `cfg`; with `metrics`, each holder's latency and
    /// failures are counted there.
    ///
    /// # Errors
    /// A malformed URL or TLS material.
    pub fn new(cfg: &HoldersConfig, metrics: Option<Arc<Metrics>>) -> Result<Self> {
        let holders = cfg
            .endpoints
            .iter()
            .map(|(index, url)| {
                let mut endpoint = Endpoint::from_shared(url.clone())
                    .with_context(|| format!("`{url}` is not a holder URL"))?
                    .tcp_nodelay(true)
                    .connect_timeout(cfg.timeout);
                if let Some(tls) = &cfg.tls {
                    endpoint = endpoint
                        .tls_config(
                            ClientTlsConfig::new()
                                .ca_certificate(Certificate::from_pem(&tls.ca))
                                .identity(Identity::from_pem(&tls.cert, tls.key.as_slice())),
                        )
                        .with_context(|| format!("TLS for holder {index} at {url}"))?;
                }
                Ok(Holder {
                    index: *index,
                    url: url.clone(),
                    client: KeyHolderClient::new(endpoint.connect_lazy())
                        .max_decoding_message_size(MAX_HOLDER_MESSAGE)
                        .max_encoding_message_size(MAX_HOLDER_MESSAGE),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            holders,
            timeout: cfg.timeout,
            next: AtomicUsize::new(0),
            metrics,
        })
    }

    /// Each holder's index and client, holder by holder (for ceremonies,
    /// which every holder takes part in).
    pub(crate) fn clients(&self) -> Vec<(u16, KeyHolderClient<Channel>)> {
        self.holders
            .iter()
            .map(|h| (h.index, h.client.clone()))
            .collect()
    }

    /// The per-holder timeout.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `t` verified partial evaluations of `blinded` under `committee`'s
    /// key of `epoch`, sharing `generation`.
    ///
    /// # Errors
    /// `Unavailable` (naming each holder and what went wrong) when fewer
    /// than `t` holders gave a verified answer; `ResourceExhausted` when
    /// the holders' quotas refused; `InvalidArgument` when the holders
    /// found the batch itself malformed.
    pub async fn evaluate(
        &self,
        committee: &Arc<Committee>,
        (epoch, generation): (u64, u32),
        blinded: &Arc<Vec<BlindedElement>>,
        on_behalf: &OnBehalf,
    ) -> Result<Vec<Partial>, ServiceError> {
        let t = usize::from(committee.threshold());
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.holders.len();
        let mut order = (0..n)
            .map(|k| (start + k) % n)
            .filter_map(|k| self.holders.get(k))
            .filter(|h| committee.share(h.index).is_some());
        let request = PartialEvaluateRequest {
            key_epoch: epoch,
            blinded_elements: pack(blinded.iter().map(BlindedElement::as_bytes)),
            institution: on_behalf.institution.clone(),
            purpose: on_behalf.purpose.clone(),
            mode: on_behalf.mode.clone(),
            request_id: on_behalf.request_id.clone(),
            generation,
        };
        let mut pending = FuturesUnordered::new();
        for h in order.by_ref().take(t) {
            pending.push(self.ask(h, request.clone(), committee, blinded));
        }
        let mut good: Vec<Partial> = Vec::with_capacity(t);
        let mut failures: Vec<(u16, Failure)> = Vec::new();
        while let Some((index, answer)) = pending.next().await {
            match answer {
                Ok(p) => good.push(p),
                Err(f) => {
                    tracing::warn!(holder = index, request_id = %on_behalf.request_id, "key holder failed: {f}");
                    failures.push((index, f));
                    if let Some(h) = order.next() {
                        pending.push(self.ask(h, request.clone(), committee, blinded));
                    }
                }
            }
            if good.len() == t {
                return Ok(good);
            }
        }
        let listed = failures
            .iter()
            .map(|(i, f)| format!("holder {i}: {f}"))
            .collect::<Vec<_>>()
            .join("; ");
        if let Some((_, Failure::Refused(status))) = failures.iter().find(
            |(_, f)| matches!(f, Failure::Refused(s) if s.code() == tonic::Code::ResourceExhausted),
        ) {
            return Err(ServiceError::QuotaExhausted {
                what: format!("the key holders' quota: {}", status.message()),
                retry_after: Duration::from_secs(1),
            });
        }
        if let Some((_, Failure::Refused(status))) = failures.iter().find(
            |(_, f)| matches!(f, Failure::Refused(s) if s.code() == tonic::Code::InvalidArgument),
        ) {
            return Err(ServiceError::InvalidArgument(status.message().to_string()));
        }
        Err(ServiceError::Unavailable(format!(
            "{} of the {t} key holders needed answered ({listed})",
            good.len()
        )))
    }

    /// One holder's verified answer, or why not.
    async fn ask(
        &self,
        holder: &Holder,
        request: PartialEvaluateRequest,
        committee: &Arc<Committee>,
        blinded: &Arc<Vec<BlindedElement>>,
    ) -> (u16, Result<Partial, Failure>) {
        let started = Instant::now();
        let mut client = holder.client.clone();
        let mut req = tonic::Request::new(request);
        req.set_timeout(self.timeout);
        let answer = match tokio::time::timeout(self.timeout, client.partial_evaluate(req)).await {
            Err(_) => Err(Failure::Timeout(self.timeout)),
            Ok(Err(status)) if is_unreachable(&status) => Err(Failure::Unreachable(status)),
            Ok(Err(status)) => Err(Failure::Refused(status)),
            Ok(Ok(response)) => {
                let answer = response.into_inner();
                let committee = Arc::clone(committee);
                let blinded = Arc::clone(blinded);
                let expected = holder.index;
                tokio::task::spawn_blocking(move || {
                    let partial = partial_from_proto(&answer).map_err(|_| Failure::BadProof)?;
                    if partial.index != expected {
                        return Err(Failure::WrongIndex(partial.index));
                    }
                    verify_partial(&committee, &blinded, &partial)
                        .map_err(|_| Failure::BadProof)?;
                    Ok(partial)
                })
                .await
                .unwrap_or(Err(Failure::BadProof))
            }
        };
        if let Some(m) = &self.metrics {
            let outcome = match &answer {
                Ok(_) => "ok",
                Err(f) => f.label(),
            };
            m.holder_answer(holder.index, outcome, started.elapsed());
        }
        (holder.index, answer)
    }
}

fn is_unreachable(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable
        || std::error::Error::source(status).is_some_and(|s| {
            s.downcast_ref::<tonic::transport::Error>().is_some()
                || s.downcast_ref::<std::io::Error>().is_some()
        })
}

/// Why a holder's answer was not used.
#[derive(Debug)]
enum Failure {
    Timeout(Duration),
    Unreachable(tonic::Status),
    Refused(tonic::Status),
    BadProof,
    WrongIndex(u16),
}

impl Failure {
    fn label(&self) -> &'static str {
        match self {
            Failure::Timeout(_) => "timeout",
            Failure::Unreachable(_) => "unreachable",
            Failure::Refused(_) => "refused",
            Failure::BadProof | Failure::WrongIndex(_) => "bad_proof",
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Timeout(t) => write!(f, "no answer within {:.1} s", t.as_secs_f64()),
            Failure::Unreachable(s) => write!(f, "unreachable ({})", s.message()),
            Failure::Refused(s) => write!(f, "refused: {:?}: {}", s.code(), s.message()),
            Failure::BadProof => {
                f.write_str("its partial evaluation does not verify against its public share")
            }
            Failure::WrongIndex(i) => write!(f, "it answered as holder {i}"),
        }
    }
}

/// The settings of the way to the key holders, shared by `serve` (a
/// replica in threshold mode) and the encoding commands: flags, `PSI_*`
/// variables, or keys of the config file's `[holders]` table.
#[derive(Debug, Clone, Default, clap::Args, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HolderLinkArgs {
    /// Threshold mode: the key holders, `INDEX=URL` comma-separated (e.g.
    /// 1=https://holder-1:7443,2=https://holder-2:7443,3=https://holder-3:7443).
    #[arg(long = "holders", env = "PSI_HOLDERS")]
    pub endpoints: Option<String>,
    /// CA certificate (PEM) of the holders' server certificates.
    #[arg(long = "holders-ca", env = "PSI_HOLDERS_CA")]
    pub ca: Option<std::path::PathBuf>,
    /// This side's client certificate (PEM) for the holders.
    #[arg(long = "holders-cert", env = "PSI_HOLDERS_CERT")]
    pub cert: Option<std::path::PathBuf>,
    /// Its private key (PEM).
    #[arg(long = "holders-key", env = "PSI_HOLDERS_KEY")]
    pub key: Option<std::path::PathBuf>,
    /// How long one holder may take over one batch before another is asked
    /// instead, in milliseconds [default: 5000].
    #[arg(long = "holder-timeout-ms", env = "PSI_HOLDER_TIMEOUT_MS")]
    pub timeout_ms: Option<u64>,
}

impl HolderLinkArgs {
    /// These settings over `file`'s; `None` when no holders are listed.
    ///
    /// # Errors
    /// Malformed endpoints, unreadable TLS files, TLS files given in part,
    /// plaintext to a holder that is not on loopback, a zero timeout.
    pub fn resolve(self, file: Self) -> Result<Option<HoldersConfig>> {
        let Some(endpoints) = self.endpoints.or(file.endpoints) else {
            return Ok(None);
        };
        let endpoints = HoldersConfig::parse_endpoints(&endpoints)?;
        let read = |p: &std::path::PathBuf| {
            std::fs::read(p).with_context(|| format!("reading {}", p.display()))
        };
        let tls = match (
            self.ca.or(file.ca),
            self.cert.or(file.cert),
            self.key.or(file.key),
        ) {
            (Some(ca), Some(cert), Some(key)) => Some(HoldersTls {
                ca: read(&ca)?,
                cert: read(&cert)?,
                key: Zeroizing::new(read(&key)?),
            }),
            (None, None, None) => {
                if let Some((i, url)) = endpoints.iter().find(|(_, u)| !is_loopback_url(u)) {
                    bail!(
                        "holder {i} at {url} is not on loopback: give --holders-ca, --holders-cert and --holders-key (mutual TLS)"
                    );
                }
                None
            }
            _ => bail!("mutual TLS to the holders needs all three of --holders-ca, --holders-cert and --holders-key"),
        };
        let ms = self
            .timeout_ms
            .or(file.timeout_ms)
            .unwrap_or(DEFAULT_HOLDER_TIMEOUT.as_millis() as u64);
        if ms == 0 {
            bail!("holder_timeout_ms must be at least 1");
        }
        Ok(Some(HoldersConfig {
            endpoints,
            tls,
            timeout: Duration::from_millis(ms),
        }))
    }
}

/// A runtime handle for code that runs outside async code (the encoding
/// commands): the current runtime's when there is one (on a blocking
/// thread), else one of its own, returned with it to keep alive.
///
/// # Errors
/// The runtime cannot start.
pub(crate) fn runtime_handle() -> Result<(tokio::runtime::Handle, Option<tokio::runtime::Runtime>)>
{
    match tokio::runtime::Handle::try_current() {
        Ok(h) => Ok((h, None)),
        Err(_) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .context("starting the runtime that talks to the key holders")?;
            Ok((rt.handle().clone(), Some(rt)))
        }
    }
}

fn is_loopback_url(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let host = rest.split('/').next().unwrap_or("");
    let host = host
        .rsplit_once(':')
        .map_or(host, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_and_plaintext_stays_on_loopback() {
        let e = HoldersConfig::parse_endpoints("1=http://127.0.0.1:1, 3=http://[::1]:2").unwrap();
        assert_eq!(
            e,
            vec![
                (1, "http://127.0.0.1:1".into()),
                (3, "http://[::1]:2".into())
            ]
        );
        for bad in ["", "1", "0=http://x", "256=http://x", "1=a,1=b"] {
            assert!(HoldersConfig::parse_endpoints(bad).is_err(), "{bad}");
        }
        let args = |e: &str| HolderLinkArgs {
            endpoints: Some(e.into()),
            ..HolderLinkArgs::default()
        };
        assert!(args("1=http://localhost:7443")
            .resolve(HolderLinkArgs::default())
            .unwrap()
            .is_some());
        let err = args("1=http://10.0.0.5:7443")
            .resolve(HolderLinkArgs::default())
            .unwrap_err();
        assert!(err.to_string().contains("not on loopback"), "{err}");
        assert!(HolderLinkArgs::default()
            .resolve(HolderLinkArgs::default())
            .unwrap()
            .is_none());
    }
}
