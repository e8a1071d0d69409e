//! `psi-bench threshold`: single-key against threshold mode (2-of-3 key
//! holders in this process, on loopback) on one registry: encoding, a
//! sync-mode batch, and single bucket-mode checks, end to end.
//!
//! The holders, the replica and the client share this machine's cores and
//! one rayon pool, as in `psi-bench e2e`: the figures are end-to-end costs
//! on one host, not a deployment's (where each holder has cores of its
//! own). The per-holder and per-client CPU costs are the criterion group
//! `threshold` of `cargo bench --bench protocol`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use psi_client::batch::{self, BatchOptions};
use psi_client::check::{check, CheckOutcome};
use psi_client::{ConnectOptions, QueryMode, Session};
use psi_server::keyholder::pool::HoldersConfig;
use psi_server::keyholder::serve::{HolderArgs, RunningHolder};
use psi_server::registry::{self, source::Source, PublishGuard};
use psi_server::serving::config::ServeConfig;
use psi_server::tools::synth::Generator;
use serde::Serialize;

use crate::sweep::percentile;

/// One mode's figures.
#[derive(Debug, Clone, Serialize)]
pub struct ModeResult {
    /// `single-key` or `2-of-3`.
    pub mode: String,
    /// Encoding the whole registry (`init`), seconds.
    pub encode_seconds: f64,
    /// Records per second.
    pub encode_records_per_second: f64,
    /// Rows of the sync-mode batch.
    pub batch_rows: u64,
    /// Rows per second.
    pub batch_rows_per_second: f64,
    /// Single bucket-mode checks: median, 95th, 99th percentile, ms.
    pub check_p50_ms: f64,
    /// 95th percentile.
    pub check_p95_ms: f64,
    /// 99th percentile.
    pub check_p99_ms: f64,
}

/// Runs both modes on `registry_size` synthetic people.
///
/// # Errors
/// Any step failing.
pub async fn run(
    dir: &Path,
    registry_size: u64,
    queries: u64,
    checks: usize,
) -> Result<Vec<ModeResult>> {
    std::fs::create_dir_all(dir)?;
    let csv = dir.join(format!("registry-{registry_size}.csv"));
    if !csv.exists() {
        psi_server::cli::generate(registry_size, 1, &csv)?;
    }
    let data = dir.join(format!("threshold-data-{registry_size}"));
    let _ = std::fs::remove_dir_all(&data);
    let single = measure("single-key", dir, &csv, &data, None, queries, checks).await?;

    // The same registry's key split 2-of-3; the holders in this process.
    let holders_dir = dir.join("threshold-holders");
    let _ = std::fs::remove_dir_all(&holders_dir);
    let split = psi_server::keyholder::split::split(&data, 2, 3, &holders_dir)?;
    let mut running: Vec<RunningHolder> = Vec::new();
    for d in &split.holder_dirs {
        running.push(
            psi_server::keyholder::serve::start(HolderArgs {
                request_timeout_secs: 120,
                ..HolderArgs::local(d)
            })
            .await?,
        );
    }
    let link = HoldersConfig {
        endpoints: running
            .iter()
            .enumerate()
            .map(|(i, r)| (i as u16 + 1, format!("http://{}", r.local_addr)))
            .collect(),
        tls: None,
        timeout: Duration::from_secs(60),
    };
    let threshold = measure("2-of-3", dir, &csv, &data, Some(link), queries, checks).await?;
    for r in running {
        r.shutdown().await?;
    }
    Ok(vec![single, threshold])
}

async fn measure(
    mode: &str,
    dir: &Path,
    csv: &Path,
    data: &Path,
    holders: Option<HoldersConfig>,
    queries: u64,
    checks: usize,
) -> Result<ModeResult> {
    eprintln!("{mode}: encoding");
    let (c, d, h) = (csv.to_path_buf(), data.to_path_buf(), holders.clone());
    let report = tokio::task::spawn_blocking(move || {
        registry::init_guarded(
            &Source::csv(c),
            &d,
            false,
            &PublishGuard::force(),
            h.as_ref(),
        )
    })
    .await??;
    let encode_seconds = report.elapsed.as_secs_f64();
    let running = psi_server::serving::serve::start(ServeConfig {
        request_timeout: Duration::from_secs(120),
        holders,
        ..ServeConfig::local(data)
    })
    .await?;
    let cache_dir: PathBuf = dir.join(format!("threshold-cache-{mode}"));
    let _ = std::fs::remove_dir_all(&cache_dir);
    let session = Session::connect_when_ready(
        ConnectOptions {
            server: format!("http://{}", running.local_addr),
            pin_key: None,
            pin_exact: false,
            cache_dir,
            blinding: psi_core::Blinding::Additive,
            concurrency: 4,
            tls: None,
            purpose: "benchmark".to_string(),
        },
        Duration::from_secs(120),
    )
    .await?;
    let input = dir.join("threshold-queries.csv");
    let output = dir.join(format!("threshold-answers-{mode}.csv"));
    crate::sweep::write_queries(csv, queries, &input)?;
    eprintln!("{mode}: batch of {queries} rows, sync mode");
    let summary = batch::run(
        &session,
        &BatchOptions {
            input,
            output,
            mode: QueryMode::Sync,
            chunk_rows: 8192,
            file: psi_client::batch::FileFormat::default(),
            chunks_in_flight: 2,
            progress: false,
            resume: false,
            max_cache_age: Duration::from_secs(24 * 3600),
            no_sync: false,
        },
    )
    .await?;
    eprintln!("{mode}: {checks} single checks, bucket mode");
    let mut latencies = Vec::with_capacity(checks);
    for p in Generator::new(1, psi_core::CivilDate::today())?.take(checks) {
        let t = Instant::now();
        let outcome = check(&session, &p.name, &p.id, QueryMode::Bucket).await?;
        latencies.push(t.elapsed());
        anyhow::ensure!(
            outcome == CheckOutcome::Match,
            "a registered person did not match"
        );
    }
    latencies.sort();
    running.shutdown().await.context("stopping the replica")?;
    Ok(ModeResult {
        mode: mode.to_string(),
        encode_seconds,
        encode_records_per_second: report.counts.rows as f64 / encode_seconds,
        batch_rows: summary.rows,
        batch_rows_per_second: summary.rows as f64 / summary.elapsed.as_secs_f64(),
        check_p50_ms: percentile(&latencies, 0.50),
        check_p95_ms: percentile(&latencies, 0.95),
        check_p99_ms: percentile(&latencies, 0.99),
    })
}
