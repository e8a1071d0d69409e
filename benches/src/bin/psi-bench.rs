//! `psi-bench e2e`: the end-to-end harness. It generates a synthetic registry,
//! times `init`, serves it in this process on loopback, and measures the first
//! sync (time and bytes), a sync-mode batch (rows/s after the sync) and
//! single bucket-mode checks (latency percentiles of the request itself).
//! Client and server share the machine's cores, as they would in a test lab.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use psi_client::batch::{self, BatchOptions};
use psi_client::check::check;
use psi_client::{ConnectOptions, QueryMode, Session};
use psi_server::config::ServeConfig;
use psi_server::registry::{self, today};
use psi_server::service::Limits;
use psi_server::synth::Generator;
use serde::Serialize;

#[derive(Debug, Parser)]
#[command(
    name = "psi-bench",
    about = "End-to-end benchmark of the private match service"
)]
struct Args {
    /// Registry size.
    #[arg(long, default_value_t = 1_000_000)]
    registry_size: u64,
    /// Rows in the sync-mode batch (half registered, half not).
    #[arg(long, default_value_t = 100_000)]
    queries: u64,
    /// Single bucket-mode checks to time.
    #[arg(long, default_value_t = 300)]
    checks: usize,
    /// Working directory (the registry CSV is reused if present).
    #[arg(long, default_value = "target/psi-bench")]
    dir: PathBuf,
    /// Percentage of the registry removed, and the same number of new people
    /// added, in the update phase (0: skip the update and rotation phases).
    #[arg(long, default_value_t = 1.0)]
    update_percent: f64,
    /// Write the results as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Results {
    registry_size: u64,
    init_seconds: f64,
    init_rows_per_second: f64,
    snapshot_bytes: u64,
    first_sync_seconds: f64,
    first_sync_bytes: u64,
    sync_bytes_per_entry: f64,
    batch_rows: u64,
    batch_seconds: f64,
    batch_rows_per_second: f64,
    check_p50_ms: f64,
    check_p95_ms: f64,
    check_p99_ms: f64,
    update_removed: u64,
    update_added: u64,
    update_seconds: f64,
    update_publish_seconds: f64,
    update_sync_bytes: u64,
    update_sync_fraction_of_full: f64,
    update_sync_seconds: f64,
    rotation_seconds: f64,
    rotation_resync_bytes: u64,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.dir)?;
    let registry_csv = args
        .dir
        .join(format!("registry-{}.csv", args.registry_size));
    if !registry_csv.exists() {
        eprintln!("generating {} synthetic people", args.registry_size);
        psi_server::cli::generate(args.registry_size, 1, &registry_csv)?;
    }
    let data_dir = args.dir.join(format!("data-{}", args.registry_size));
    let _ = std::fs::remove_dir_all(&data_dir);
    eprintln!("init");
    let (csv_path, dd) = (registry_csv.clone(), data_dir.clone());
    let report = tokio::task::spawn_blocking(move || {
        registry::init(&psi_server::source::Source::csv(csv_path), &dd, false)
    })
    .await??;
    let init_seconds = report.elapsed.as_secs_f64();

    let running = psi_server::serve::start(ServeConfig {
        data_dir: data_dir.clone(),
        listen: "127.0.0.1:0".parse()?,
        limits: Limits::default(),
        request_timeout: Duration::from_secs(120),
        reload_interval: Duration::from_millis(200),
        tls: None,
        audit_db: data_dir.join(psi_server::audit::AUDIT_FILE),
        policy: None,
        admin_listen: None,
    })
    .await?;
    let url = format!("http://{}", running.local_addr);
    let cache_dir = args.dir.join("client-cache");
    let _ = std::fs::remove_dir_all(&cache_dir);
    let options = ConnectOptions {
        server: url,
        pin_key: None,
        cache_dir,
        blinding: psi_core::Blinding::Additive,
        concurrency: 4,
        tls: None,
        purpose: "benchmark".to_string(),
    };
    let session = Session::connect_when_ready(options.clone(), Duration::from_secs(60)).await?;

    eprintln!("first sync");
    let t = Instant::now();
    let synced = session.sync().await?;
    let first_sync_seconds = t.elapsed().as_secs_f64();

    // Half registered people (the registry's first rows), half outsiders.
    let input = args.dir.join("queries.csv");
    let output = args.dir.join("answers.csv");
    {
        let mut w = csv::Writer::from_path(&input)?;
        w.write_record(["name", "id"])?;
        let half = args.queries / 2;
        let mut reg = csv::Reader::from_path(&registry_csv)?;
        for rec in reg.records().take(usize::try_from(half)?) {
            let rec = rec?;
            w.write_record([rec.get(0).unwrap_or(""), rec.get(1).unwrap_or("")])?;
        }
        for p in Generator::new(999, today())?.take(usize::try_from(args.queries - half)?) {
            w.write_record([p.name.as_str(), p.id.as_str()])?;
        }
        w.flush()?;
    }
    eprintln!("batch of {} rows, sync mode", args.queries);
    let summary = batch::run(
        &session,
        &BatchOptions {
            input,
            output,
            mode: QueryMode::Sync,
            chunk_rows: 8192,
            chunks_in_flight: 2,
            progress: false,
            resume: false,
            max_cache_age: std::time::Duration::from_secs(24 * 3600),
            no_sync: false,
        },
    )
    .await?;
    eprintln!("{summary}");

    eprintln!("{} single checks, bucket mode", args.checks);
    let people: Vec<_> = Generator::new(1, today())?.take(args.checks).collect();
    let mut latencies = Vec::with_capacity(args.checks);
    for p in &people {
        let t = Instant::now();
        let outcome = check(&session, &p.name, &p.id, QueryMode::Bucket).await?;
        latencies.push(t.elapsed());
        anyhow::ensure!(
            outcome == psi_client::check::CheckOutcome::Match,
            "a registered person did not match"
        );
    }
    latencies.sort();

    let mut update = UpdatePhase::default();
    if args.update_percent > 0.0 {
        update = update_phase(
            &args,
            &registry_csv,
            &data_dir,
            &session,
            synced.bytes_fetched,
        )
        .await?;
    }
    running.shutdown().await?;

    let results = Results {
        registry_size: args.registry_size,
        init_seconds,
        init_rows_per_second: report.counts.rows as f64 / init_seconds,
        snapshot_bytes: std::fs::metadata(data_dir.join(registry::SNAPSHOT_FILE))?.len(),
        first_sync_seconds,
        first_sync_bytes: synced.bytes_fetched,
        sync_bytes_per_entry: synced.bytes_fetched as f64 / args.registry_size as f64,
        batch_rows: summary.rows,
        batch_seconds: summary.elapsed.as_secs_f64(),
        batch_rows_per_second: summary.rows as f64 / summary.elapsed.as_secs_f64(),
        check_p50_ms: percentile(&latencies, 0.50),
        check_p95_ms: percentile(&latencies, 0.95),
        check_p99_ms: percentile(&latencies, 0.99),
        update_removed: update.removed,
        update_added: update.added,
        update_seconds: update.seconds,
        update_publish_seconds: update.publish_seconds,
        update_sync_bytes: update.sync_bytes,
        update_sync_fraction_of_full: update.sync_bytes as f64 / synced.bytes_fetched as f64,
        update_sync_seconds: update.sync_seconds,
        rotation_seconds: update.rotation_seconds,
        rotation_resync_bytes: update.resync_bytes,
    };
    let json = serde_json::to_string_pretty(&results)?;
    println!("{json}");
    if let Some(path) = args.json {
        std::fs::write(&path, &json).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[derive(Debug, Default)]
struct UpdatePhase {
    removed: u64,
    added: u64,
    seconds: f64,
    publish_seconds: f64,
    sync_bytes: u64,
    sync_seconds: f64,
    rotation_seconds: f64,
    resync_bytes: u64,
}

/// Waits until the running server serves `pred`, returning a fresh session.
async fn until(session: &Session, pred: impl Fn(&Session) -> bool) -> Result<Session> {
    for _ in 0..6000 {
        let s = session.reconnect().await?;
        if pred(&s) {
            return Ok(s);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    anyhow::bail!("the server did not publish the change within 60 s")
}

/// Removes `update_percent`% of the registry and adds as many new people,
/// times the update, its publication by the running server and the
/// client's incremental sync; then rotates the key and times that and the
/// full re-sync it forces.
async fn update_phase(
    args: &Args,
    registry_csv: &std::path::Path,
    data_dir: &std::path::Path,
    session: &Session,
    full_bytes: u64,
) -> Result<UpdatePhase> {
    let n = ((args.registry_size as f64) * args.update_percent / 100.0).round() as usize;
    let add = args.dir.join("update-add.csv");
    let remove = args.dir.join("update-remove.csv");
    {
        let mut w = csv::Writer::from_path(&remove)?;
        w.write_record(["name", "id"])?;
        for rec in csv::Reader::from_path(registry_csv)?.records().take(n) {
            let rec = rec?;
            w.write_record([rec.get(0).unwrap_or(""), rec.get(1).unwrap_or("")])?;
        }
        w.flush()?;
        let mut w = csv::Writer::from_path(&add)?;
        w.write_record(["name", "id"])?;
        for p in Generator::new(2024, today())?.take(n) {
            w.write_record([p.name.as_str(), p.id.as_str()])?;
        }
        w.flush()?;
    }
    eprintln!("update: remove {n}, add {n}");
    let version = session.info().registry_version;
    let t = Instant::now();
    let dd = data_dir.to_path_buf();
    let report = tokio::task::spawn_blocking(move || {
        registry::update(
            Some(&psi_server::source::Source::csv(&add)),
            Some(&psi_server::source::Source::csv(&remove)),
            &dd,
            false,
        )
    })
    .await??;
    let seconds = t.elapsed().as_secs_f64();
    let published = until(session, |s| s.info().registry_version > version).await?;
    let publish_seconds = t.elapsed().as_secs_f64() - seconds;
    let t = Instant::now();
    let synced = published.sync().await?;
    let sync_seconds = t.elapsed().as_secs_f64();
    anyhow::ensure!(synced.delta_applied, "the update was not synced as a delta");
    eprintln!(
        "update: {} removed, {} added in {seconds:.2} s; delta sync {} bytes ({:.2}% of the full {full_bytes})",
        report.removed,
        report.added,
        synced.bytes_fetched,
        100.0 * synced.bytes_fetched as f64 / full_bytes as f64
    );

    eprintln!("rotate-key");
    let epoch = published.info().key_epoch;
    let t = Instant::now();
    let dd = data_dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        registry::rotate_key(&dd, Duration::from_secs(3600), false)
    })
    .await??;
    let rotation_seconds = t.elapsed().as_secs_f64();
    let rotated = until(&published, |s| s.info().key_epoch > epoch).await?;
    let resync = rotated.sync().await?;
    Ok(UpdatePhase {
        removed: report.removed,
        added: report.added,
        seconds,
        publish_seconds,
        sync_bytes: synced.bytes_fetched,
        sync_seconds,
        rotation_seconds,
        resync_bytes: resync.bytes_fetched,
    })
}
