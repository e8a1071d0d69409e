//! `psi-bench gateway`: single checks through the institution's HTTP
//! gateway (`psi-client serve`) over one keep-alive HTTP/1.1 connection,
//! in each mode, against a server in the same process on loopback: checks
//! per second and latency percentiles, every check logged in the query
//! log (SQLite, synchronous FULL) before its answer; and what the
//! commitment to the log records costs the operator (a request's bytes,
//! the audit write, a check's latency), with and without it interleaved.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use psi_client::gateway::{self, GatewaySettings};
use psi_client::ConnectOptions;
use psi_server::registry::{self, source::Source, PublishGuard};
use psi_server::serving::config::ServeConfig;
use psi_server::tools::synth::Generator;
use serde::Serialize;

use crate::sweep::percentile;

/// One mode's figures.
#[derive(Debug, Clone, Serialize)]
pub struct GatewayResult {
    /// `sync`, `bucket` or `pir`.
    pub mode: String,
    /// Checks timed.
    pub checks: usize,
    /// Checks per second, one after another on one connection.
    pub checks_per_second: f64,
    /// Median, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
}

/// What the commitment to the institution's log records costs.
#[derive(Debug, Clone, Serialize)]
pub struct CommitmentCost {
    /// The metadata a request carries: `x-psi-log-commitment` (20 bytes)
    /// and 64 hex digits, before HTTP/2 header compression.
    pub request_metadata_bytes: usize,
    /// Audit appends timed, each way (one after another, each waiting
    /// until durable: SQLite, synchronous FULL).
    pub audit_appends: usize,
    /// Median audit append without a commitment, us.
    pub audit_append_p50_us_without: f64,
    /// Median audit append with one, us.
    pub audit_append_p50_us_with: f64,
    /// Audit database bytes per record without commitments.
    pub audit_bytes_per_record_without: f64,
    /// With them.
    pub audit_bytes_per_record_with: f64,
    /// Bucket checks through the library timed, each way, interleaved.
    pub checks: usize,
    /// Median bucket check without a commitment, ms.
    pub check_p50_ms_without: f64,
    /// With one, ms.
    pub check_p50_ms_with: f64,
}

/// The gateway's figures per mode and the commitment's cost.
#[derive(Debug, Clone, Serialize)]
pub struct GatewayReport {
    /// Single checks through the gateway, per mode.
    pub modes: Vec<GatewayResult>,
    /// The commitment's cost.
    pub commitment: CommitmentCost,
}

/// A commitment's worth of random bytes (its cost does not depend on
/// what it commits to).
fn random_commitment() -> [u8; 32] {
    let mut c = [0u8; 32];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut c);
    c
}

/// Appends `n` audit records to a new database at `path`, each waiting
/// until durable: the median append in us, and the file's bytes per record.
async fn audit_appends(path: &Path, n: usize, commitment: bool) -> Result<(f64, f64)> {
    use psi_server::serving::audit::{AuditLog, Entry};
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    let audit = AuditLog::open(path)?;
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let mut entry = Entry::now("bench-bank", "benchmark", "BucketQuery", "bucket");
        entry.elements = 1;
        if commitment {
            entry.commitment = random_commitment()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
        }
        let t = Instant::now();
        audit.append(entry).await?;
        times.push(t.elapsed());
    }
    drop(audit);
    // The records in the main file and any still in the write-ahead log.
    let bytes: u64 = ["", "-wal"]
        .iter()
        .filter_map(|s| std::fs::metadata(format!("{}{s}", path.display())).ok())
        .map(|m| m.len())
        .sum();
    times.sort();
    Ok((percentile(&times, 0.50) * 1000.0, bytes as f64 / n as f64))
}

/// One keep-alive HTTP/1.1 POST; the response's status and body.
fn post(stream: &mut TcpStream, path: &str, token: &str, body: &str) -> Result<(u16, String)> {
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\nAuthorization: Bearer {token}\r\nX-Staff-Id: bench\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf)?;
        anyhow::ensure!(n > 0, "the gateway closed the connection");
        raw.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&raw).to_string();
        if let Some((head, rest)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_string())
                })
                .context("no content-length")?
                .parse()?;
            if rest.len() >= len {
                let status = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                return Ok((status, rest[..len].to_string()));
            }
        }
    }
}

/// Runs `checks` single checks per mode on a registry of `registry_size`.
///
/// # Errors
/// Any step failing, or a wrong answer.
pub async fn run(dir: &Path, registry_size: u64, checks: usize) -> Result<GatewayReport> {
    std::fs::create_dir_all(dir)?;
    let csv = dir.join(format!("registry-{registry_size}.csv"));
    if !csv.exists() {
        psi_server::cli::generate(registry_size, 1, &csv)?;
    }
    let data = dir.join(format!("gateway-data-{registry_size}"));
    let _ = std::fs::remove_dir_all(&data);
    let (c, d) = (csv.clone(), data.clone());
    tokio::task::spawn_blocking(move || {
        registry::init_guarded(&Source::csv(c), &d, false, &PublishGuard::force(), None)
    })
    .await??;
    let server = psi_server::serving::serve::start(ServeConfig::local(&data)).await?;
    let (token, line) = gateway::new_token("bench")?;
    let tokens = dir.join("gateway-tokens.txt");
    std::fs::write(&tokens, format!("{line}\n"))?;
    let log = dir.join("gateway-query-log.sqlite");
    let _ = std::fs::remove_file(&log);
    let cache = dir.join("gateway-cache");
    let _ = std::fs::remove_dir_all(&cache);
    let running = gateway::start(
        ConnectOptions {
            server: format!("http://{}", server.local_addr),
            pin_key: None,
            pin_exact: false,
            cache_dir: cache,
            blinding: psi_core::Blinding::Additive,
            concurrency: 4,
            tls: None,
            purpose: "benchmark".into(),
        },
        GatewaySettings {
            tokens: Some(gateway::load_tokens(&tokens)?),
            ..GatewaySettings::new("127.0.0.1:0".parse()?, "benchmark", log)
        },
    )
    .await?;
    let addr = running.local_addr;
    let people: Vec<_> = Generator::new(1, psi_core::CivilDate::today())?
        .take(checks)
        .collect();
    let token2 = token.clone();
    let asked = people.clone();
    let results = tokio::task::spawn_blocking(move || -> Result<Vec<GatewayResult>> {
        let people = asked;
        let mut out = Vec::new();
        for mode in ["sync", "bucket", "pir"] {
            let mut stream = TcpStream::connect(addr)?;
            stream.set_nodelay(true)?;
            stream.set_read_timeout(Some(Duration::from_secs(60)))?;
            // One warm-up check (the first sync, PIR registration).
            let warm = serde_json::json!({"name": people[0].name, "id": people[0].id.as_str(), "mode": mode});
            post(&mut stream, "/v1/check", &token2, &warm.to_string())?;
            let n = if mode == "pir" { checks.min(50) } else { checks };
            let mut latencies = Vec::with_capacity(n);
            let started = Instant::now();
            for p in people.iter().take(n) {
                let body = serde_json::json!({"name": p.name, "id": p.id.as_str(), "mode": mode}).to_string();
                let t = Instant::now();
                let (status, text) = post(&mut stream, "/v1/check", &token2, &body)?;
                latencies.push(t.elapsed());
                anyhow::ensure!(
                    status == 200 && text.contains("\"result\":\"match\""),
                    "{mode}: {status} {text}"
                );
            }
            let total = started.elapsed();
            latencies.sort();
            out.push(GatewayResult {
                mode: mode.into(),
                checks: n,
                checks_per_second: n as f64 / total.as_secs_f64(),
                p50_ms: percentile(&latencies, 0.50),
                p99_ms: percentile(&latencies, 0.99),
            });
        }
        Ok(out)
    })
    .await??;
    running.shutdown().await?;

    // The commitment's cost to a check: bucket checks through the library,
    // with and without one, interleaved so that drift falls on both.
    let session = psi_client::Session::connect(ConnectOptions {
        server: format!("http://{}", server.local_addr),
        pin_key: None,
        pin_exact: false,
        cache_dir: dir.join("gateway-commitment-cache"),
        blinding: psi_core::Blinding::Additive,
        concurrency: 4,
        tls: None,
        purpose: "benchmark".into(),
    })
    .await?;
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for (i, p) in people.iter().enumerate() {
        let committed = i % 2 == 1;
        let s = if committed {
            session.with_log_commitment(random_commitment())
        } else {
            session.clone()
        };
        let t = Instant::now();
        let outcome =
            psi_client::check::check(&s, &p.name, p.id.as_str(), psi_client::QueryMode::Bucket)
                .await?;
        let took = t.elapsed();
        anyhow::ensure!(
            outcome == psi_client::check::CheckOutcome::Match,
            "bucket: {outcome:?}"
        );
        if i > 0 {
            if committed {
                with.push(took)
            } else {
                without.push(took)
            }
        }
    }
    with.sort();
    without.sort();
    server.shutdown().await?;

    let appends = checks.max(100) * 4;
    let audit = dir.join("gateway-audit-cost.sqlite");
    let (p50_without, bytes_without) = audit_appends(&audit, appends, false).await?;
    let (p50_with, bytes_with) = audit_appends(&audit, appends, true).await?;
    let commitment = CommitmentCost {
        request_metadata_bytes: psi_proto::LOG_COMMITMENT_HEADER.len() + 64,
        audit_appends: appends,
        audit_append_p50_us_without: p50_without,
        audit_append_p50_us_with: p50_with,
        audit_bytes_per_record_without: bytes_without,
        audit_bytes_per_record_with: bytes_with,
        checks: with.len().min(without.len()),
        check_p50_ms_without: percentile(&without, 0.50),
        check_p50_ms_with: percentile(&with, 0.50),
    };
    Ok(GatewayReport {
        modes: results,
        commitment,
    })
}
