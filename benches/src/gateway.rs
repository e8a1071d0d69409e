//! `psi-bench gateway`: single checks through the institution's HTTP
//! gateway (`psi-client serve`) over one keep-alive HTTP/1.1 connection,
//! in each mode, against a server in the same process on loopback: checks
//! per second and latency percentiles, every check logged in the query
//! log (SQLite, synchronous FULL) before its answer.

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
pub async fn run(dir: &Path, registry_size: u64, checks: usize) -> Result<Vec<GatewayResult>> {
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
    let results = tokio::task::spawn_blocking(move || -> Result<Vec<GatewayResult>> {
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
    server.shutdown().await?;
    Ok(results)
}
