//! `psi-bench`: the benchmark harness.
//!
//! - `psi-bench sweep [--quick]`: the parameter sweep researchers run: every
//!   point in a process of its own against a real `psi-server` process,
//!   OpenMined PSI and the in-process baselines in the same run; writes
//!   JSON, CSV and SVG charts and rewrites the generated section of
//!   BENCHMARKS.md.
//! - `psi-bench point`: one point of the sweep (the sweep runs these).
//! - `psi-bench report`: regenerates the charts and BENCHMARKS.md from a
//!   sweep's JSON.
//! - `psi-bench e2e`: one registry served in this process: init, first sync,
//!   a sync-mode batch, bucket checks, then an update and a key rotation.
//! - `psi-bench threshold`: single-key against 2-of-3 key holders on one
//!   registry: encoding, a sync-mode batch, single checks.
//! - `psi-bench gateway`: single checks through the HTTP gateway.
//! - `psi-bench plain-pass`: the LWE family's pass over a plain database
//!   against the read bandwidth (issue #24).
//! - `psi-bench ypir`: YPIR+SP's build, patch, keys, queries, answers and
//!   decoding through the server's and client's API (issue #24).

// The benchmark harness: a run that cannot proceed stops with the reason.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use psi_bench::report::{OpenMined, Sweep};
use psi_bench::sweep::{percentile, PointSpec};
use psi_client::batch::{self, BatchOptions};
use psi_client::check::check;
use psi_client::{ConnectOptions, QueryMode, Session};
use psi_server::registry;
use psi_server::serving::config::ServeConfig;
use psi_server::tools::synth::Generator;
use serde::Serialize;

#[derive(Debug, Parser)]
#[command(
    name = "psi-bench",
    about = "Benchmarks of the private match service: sweeps, baselines, charts"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, clap::Subcommand)]
enum Cmd {
    /// The parameter sweep with baselines, charts and BENCHMARKS.md.
    Sweep(SweepArgs),
    /// One point of the sweep, printed as JSON (the sweep runs these).
    Point {
        /// The point, as JSON.
        #[arg(long)]
        spec: String,
        /// Working directory (registries and data directories are reused).
        #[arg(long, default_value = "target/psi-bench")]
        dir: PathBuf,
    },
    /// Regenerate the charts and BENCHMARKS.md from a sweep's JSON.
    Report {
        /// The sweep's output directory (holding sweep.json).
        #[arg(long, default_value = "benches/results")]
        out: PathBuf,
        /// The file whose generated section is rewritten.
        #[arg(long, default_value = "BENCHMARKS.md")]
        benchmarks_md: PathBuf,
    },
    /// One registry served in this process, with the update and rotation phases.
    E2e(E2eArgs),
    /// Single checks through the institution's HTTP gateway, each mode.
    Gateway {
        /// Registry size.
        #[arg(long, default_value_t = 100_000)]
        registry_size: u64,
        /// Checks timed per mode (PIR: at most 50).
        #[arg(long, default_value_t = 500)]
        checks: usize,
        /// Working directory.
        #[arg(long, default_value = "target/psi-bench")]
        dir: PathBuf,
    },
    /// The LWE family's answer pass over a plain database (issue #24)
    /// against a STREAM-like read-bandwidth probe in the same run.
    PlainPass {
        /// The database's size in MiB (2 bytes per 14 bits of items).
        #[arg(long, default_value_t = 1024)]
        database_mib: usize,
        /// Passes timed per configuration (the median is reported).
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Items patched in place after the build.
        #[arg(long, default_value_t = 100_000)]
        patched: usize,
    },
    /// YPIR+SP (issue #24) through the server's and client's API, in this
    /// process: build, patch, keys, queries, answers, decoding.
    Ypir {
        /// Items as a power of two (18: 1 GiB, the shape of ~10^8 entries).
        #[arg(long, default_value_t = 18)]
        item_bits: u8,
        /// Checks timed (the medians are reported; at least 4).
        #[arg(long, default_value_t = 8)]
        checks: usize,
    },
    /// Single-key against threshold mode (2-of-3 holders in this process).
    Threshold {
        /// Registry size.
        #[arg(long, default_value_t = 1_000_000)]
        registry_size: u64,
        /// Rows in the sync-mode batch (half registered).
        #[arg(long, default_value_t = 100_000)]
        queries: u64,
        /// Single bucket-mode checks to time.
        #[arg(long, default_value_t = 300)]
        checks: usize,
        /// Working directory.
        #[arg(long, default_value = "target/psi-bench")]
        dir: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct SweepArgs {
    /// The smoke-test profile: small registries, few queries (< 3 min).
    #[arg(long)]
    quick: bool,
    /// Registry sizes [default: 1000,10000,100000,1000000,10000000; quick: 1000,10000].
    #[arg(long, value_delimiter = ',')]
    sizes: Vec<u64>,
    /// Batch rows per point, at most N [default: 100000; quick: 1000].
    #[arg(long)]
    queries: Option<u64>,
    /// Rows of the bucket-mode batch (it downloads a bucket per row) [default: 10000; quick: 200].
    #[arg(long)]
    bucket_queries: Option<u64>,
    /// Rows of the PIR-mode batch (each costs a pass over the PIR database)
    /// [default: 20; quick: 4].
    #[arg(long)]
    pir_queries: Option<u64>,
    /// Single PIR-mode checks timed per point [default: 20; quick: 5].
    #[arg(long)]
    pir_checks: Option<usize>,
    /// Thread counts (server and client alike) swept at the thread-sweep size.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    threads: Vec<usize>,
    /// Single checks timed per point [default: 300; quick: 50].
    #[arg(long)]
    checks: Option<usize>,
    /// Largest registry OpenMined PSI is run at (its setup costs ~95 us per entry)
    /// [default: 1000000; quick: 1000].
    #[arg(long)]
    openmined_max: Option<u64>,
    /// Elements per batch of the one-core cost measurements [default: the
    /// server's default max_batch, the chunk size clients send].
    #[arg(long)]
    core_batch: Option<usize>,
    /// Skip OpenMined PSI (it needs Python 3 and PyPI for its venv).
    #[arg(long)]
    no_openmined: bool,
    /// Working directory for registries and data directories.
    #[arg(long, default_value = "target/psi-bench")]
    dir: PathBuf,
    /// Where sweep.json, points.csv and the charts go [default:
    /// benches/results; quick: target/psi-bench/quick].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Rewrite this file's generated section [default: BENCHMARKS.md; quick: none].
    #[arg(long)]
    benchmarks_md: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct E2eArgs {
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

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Point { spec, dir } => {
            let spec: PointSpec = serde_json::from_str(&spec).context("parsing --spec")?;
            // The client's threads: this process's rayon pool.
            rayon::ThreadPoolBuilder::new()
                .num_threads(spec.client_threads.max(1))
                .build_global()
                .context("sizing the thread pool")?;
            let result = tokio::runtime::Runtime::new()?
                .block_on(psi_bench::sweep::run_point(&dir, &spec))?;
            println!("{}", serde_json::to_string(&result)?);
            Ok(())
        }
        Cmd::Sweep(args) => sweep(&args),
        Cmd::Report { out, benchmarks_md } => {
            let sweep: Sweep = serde_json::from_str(
                &std::fs::read_to_string(out.join("sweep.json"))
                    .with_context(|| format!("reading {}", out.join("sweep.json").display()))?,
            )?;
            publish(&sweep, &out, Some(&benchmarks_md))
        }
        Cmd::E2e(args) => tokio::runtime::Runtime::new()?.block_on(e2e(args)),
        Cmd::Gateway {
            registry_size,
            checks,
            dir,
        } => {
            let results = tokio::runtime::Runtime::new()?.block_on(psi_bench::gateway::run(
                &dir,
                registry_size,
                checks,
            ))?;
            println!("{}", serde_json::to_string_pretty(&results)?);
            Ok(())
        }
        Cmd::PlainPass {
            database_mib,
            reps,
            patched,
        } => {
            let report = psi_bench::plainpass::run(database_mib, reps.max(1), patched)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        Cmd::Ypir { item_bits, checks } => {
            let report = psi_bench::ypir::run(item_bits, checks)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        Cmd::Threshold {
            registry_size,
            queries,
            checks,
            dir,
        } => {
            let results = tokio::runtime::Runtime::new()?.block_on(psi_bench::threshold::run(
                &dir,
                registry_size,
                queries,
                checks,
            ))?;
            println!("{}", serde_json::to_string_pretty(&results)?);
            Ok(())
        }
    }
}

async fn e2e(args: E2eArgs) -> Result<()> {
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
        registry::init(
            &psi_server::registry::source::Source::csv(csv_path),
            &dd,
            false,
        )
    })
    .await??;
    let init_seconds = report.elapsed.as_secs_f64();

    let running = psi_server::serving::serve::start(ServeConfig {
        request_timeout: Duration::from_secs(120),
        reload_interval: Duration::from_millis(200),
        ..ServeConfig::local(&data_dir)
    })
    .await?;
    let url = format!("http://{}", running.local_addr);
    let cache_dir = args.dir.join("client-cache");
    let _ = std::fs::remove_dir_all(&cache_dir);
    let options = ConnectOptions {
        server: url,
        pin_key: None,
        pin_exact: false,
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
    psi_bench::sweep::write_queries(&registry_csv, args.queries, &input)?;
    eprintln!("batch of {} rows, sync mode", args.queries);
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
            max_cache_age: std::time::Duration::from_secs(24 * 3600),
            no_sync: false,
        },
    )
    .await?;
    eprintln!("{summary}");

    eprintln!("{} single checks, bucket mode", args.checks);
    let people: Vec<_> = Generator::new(1, psi_core::CivilDate::today())?
        .take(args.checks)
        .collect();
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
        snapshot_bytes: std::fs::metadata(psi_server::store::base_file(&data_dir)?)?.len(),
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
    args: &E2eArgs,
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
        for p in Generator::new(2024, psi_core::CivilDate::today())?.take(n) {
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
            Some(&psi_server::registry::source::Source::csv(&add)),
            Some(&psi_server::registry::source::Source::csv(&remove)),
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

/// Writes the outputs and, if asked, the generated section of BENCHMARKS.md.
fn publish(
    sweep: &Sweep,
    out: &std::path::Path,
    benchmarks_md: Option<&std::path::Path>,
) -> Result<()> {
    sweep.write(out)?;
    print!("{}", sweep.ratio_lines());
    println!("{}", sweep.communication_model());
    if let Some(md) = benchmarks_md {
        // Chart links relative to the Markdown file.
        let base = md.parent().unwrap_or(std::path::Path::new(""));
        let rel = out.strip_prefix(base).unwrap_or(out);
        let charts: String = ["throughput", "latency", "bytes", "modes", "per-element"]
            .iter()
            .map(|c| format!("![{c}]({}/{c}.svg)\n", rel.display()))
            .collect();
        psi_bench::report::rewrite_benchmarks(md, &sweep.markdown(&charts))?;
        println!("rewrote the generated section of {}", md.display());
    }
    println!("results in {}", out.display());
    Ok(())
}

fn sweep(args: &SweepArgs) -> Result<()> {
    let started = Instant::now();
    let quick = args.quick;
    let sizes = if args.sizes.is_empty() {
        if quick {
            vec![1_000, 10_000]
        } else {
            vec![1_000, 10_000, 100_000, 1_000_000, 10_000_000]
        }
    } else {
        args.sizes.clone()
    };
    let queries = args.queries.unwrap_or(if quick { 1_000 } else { 100_000 });
    let bucket_queries = args
        .bucket_queries
        .unwrap_or(if quick { 200 } else { 10_000 });
    let checks = args.checks.unwrap_or(if quick { 50 } else { 300 });
    let pir_queries = args.pir_queries.unwrap_or(if quick { 4 } else { 20 });
    let pir_checks = args.pir_checks.unwrap_or(if quick { 5 } else { 20 });
    let openmined_max = args
        .openmined_max
        .unwrap_or(if quick { 1_000 } else { 1_000_000 });
    let out = args.out.clone().unwrap_or_else(|| {
        if quick {
            args.dir.join("quick")
        } else {
            PathBuf::from("benches/results")
        }
    });
    let benchmarks_md = args
        .benchmarks_md
        .clone()
        .or_else(|| (!quick).then(|| PathBuf::from("BENCHMARKS.md")));
    let max_threads = args.threads.iter().copied().max().unwrap_or(1);
    let thread_size = sizes
        .iter()
        .copied()
        .filter(|&n| n <= 100_000)
        .max()
        .unwrap_or(sizes[0]);

    // Every (N, mode) at full threads; the thread sweep and the other
    // blinding path at one size.
    let mut specs = Vec::new();
    for &n in &sizes {
        for mode in ["sync", "bucket"] {
            let q = if mode == "sync" {
                queries
            } else {
                bucket_queries
            };
            specs.push(PointSpec {
                registry_size: n,
                queries: q.min(n).max(2),
                mode: mode.into(),
                server_threads: max_threads,
                client_threads: max_threads,
                blinding: "additive".into(),
                checks,
                pir_scheme: String::new(),
            });
        }
        specs.push(PointSpec {
            registry_size: n,
            queries: pir_queries.min(n).max(2),
            mode: "pir".into(),
            server_threads: max_threads,
            client_threads: max_threads,
            blinding: "additive".into(),
            checks: pir_checks,
            pir_scheme: String::new(),
        });
    }
    for &t in args.threads.iter().filter(|&&t| t != max_threads) {
        specs.push(PointSpec {
            registry_size: thread_size,
            queries: queries.min(thread_size).max(2),
            mode: "sync".into(),
            server_threads: t,
            client_threads: t,
            blinding: "additive".into(),
            checks,
            pir_scheme: String::new(),
        });
    }
    specs.push(PointSpec {
        registry_size: thread_size,
        queries: queries.min(thread_size).max(2),
        mode: "sync".into(),
        server_threads: max_threads,
        client_threads: max_threads,
        blinding: "multiplicative".into(),
        checks,
        pir_scheme: String::new(),
    });

    let om_sizes: Vec<u64> = sizes
        .iter()
        .copied()
        .filter(|&n| n <= openmined_max)
        .collect();
    let bar = indicatif::ProgressBar::new((specs.len() + om_sizes.len() + 1) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} {msg} ({elapsed}, ETA {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let exe = std::env::current_exe()?;
    let mut points = Vec::new();
    for spec in &specs {
        bar.set_message(format!(
            "N={} {} threads {} {}",
            spec.registry_size, spec.mode, spec.server_threads, spec.blinding
        ));
        let output = std::process::Command::new(&exe)
            .args(["point", "--spec", &serde_json::to_string(spec)?, "--dir"])
            .arg(&args.dir)
            .output()?;
        if !output.status.success() {
            anyhow::bail!(
                "point {spec:?} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        // The result is the last line (generating a registry prints a line first).
        let stdout = String::from_utf8_lossy(&output.stdout);
        let last = stdout.lines().last().unwrap_or("");
        points.push(serde_json::from_str(last).context("reading a point's result")?);
        bar.inc(1);
    }

    bar.set_message("one-core costs, ours and the in-process baselines");
    let core_batch = args
        .core_batch
        .unwrap_or(psi_server::serving::service::Limits::default().max_batch);
    let core = psi_bench::costs::measure(core_batch, if quick { 3 } else { 9 });
    bar.inc(1);

    let mut openmined = Vec::new();
    let mut openmined_skipped = args.no_openmined.then(|| "--no-openmined".to_string());
    let script = PathBuf::from("benches/baselines/run-openmined.sh");
    if openmined_skipped.is_none() && !script.exists() {
        openmined_skipped = Some(format!(
            "{} not found (run from the repository root)",
            script.display()
        ));
    }
    for &n in &om_sizes {
        if openmined_skipped.is_some() {
            break;
        }
        bar.set_message(format!("OpenMined PSI at N={n}"));
        let q = queries.min(n).clamp(2, 10_000).to_string();
        let output = std::process::Command::new("bash")
            .arg(&script)
            .args([
                "--registry",
                &n.to_string(),
                "--queries",
                &q,
                "--repeats",
                if quick { "1" } else { "3" },
            ])
            .output();
        match output {
            Ok(o) if o.status.success() => {
                openmined.push(serde_json::from_slice::<OpenMined>(&o.stdout)?)
            }
            Ok(o) => {
                openmined_skipped = Some(format!(
                    "the OpenMined script failed: {}",
                    String::from_utf8_lossy(&o.stderr)
                        .lines()
                        .last()
                        .unwrap_or("")
                ));
            }
            Err(e) => openmined_skipped = Some(format!("cannot run bash: {e}")),
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    if let Some(why) = &openmined_skipped {
        eprintln!("OpenMined PSI not measured: {why}");
    }

    let command = std::env::args()
        .enumerate()
        .map(|(i, a)| if i == 0 { "psi-bench".to_string() } else { a })
        .collect::<Vec<_>>()
        .join(" ");
    let sweep = Sweep {
        command: format!(
            "cargo run --release -p psi-bench --bin psi-bench -- {}",
            command.trim_start_matches("psi-bench ")
        ),
        date: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        machine: psi_bench::report::machine(),
        points,
        core,
        openmined,
        openmined_skipped,
        seconds: started.elapsed().as_secs_f64(),
    };
    publish(&sweep, &out, benchmarks_md.as_deref())
}
