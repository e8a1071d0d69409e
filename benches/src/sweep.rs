//! One point of the sweep: a real `psi-server` process over loopback, with
//! this process as the client, and a byte-counting TCP relay between them.
//! Server CPU and memory are read from `/proc/PID`, the client's from
//! `/proc/self`; bytes are counted on the wire (gRPC, HTTP/2 and all).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use psi_client::batch::{self, BatchOptions};
use psi_client::check::{check, CheckOutcome};
use psi_client::{ConnectOptions, QueryMode, Session};
use psi_server::tools::synth::Generator;
use serde::{Deserialize, Serialize};

/// What to measure.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PointSpec {
    /// Registry size N.
    pub registry_size: u64,
    /// Rows in the batch (half registered, half not).
    pub queries: u64,
    /// `sync`, `bucket` or `pir`.
    pub mode: String,
    /// Rayon threads of the server process.
    pub server_threads: usize,
    /// Rayon threads of the client (this process).
    pub client_threads: usize,
    /// `additive` or `multiplicative`.
    pub blinding: String,
    /// Single bucket-mode checks to time.
    pub checks: usize,
    /// PIR mode's scheme (`--pir-scheme`: `auto`, `spiral`, `ypir`);
    /// empty: the server's default.
    #[serde(default)]
    pub pir_scheme: String,
}

/// What was measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PointResult {
    /// The point.
    pub registry_size: u64,
    /// Rows in the batch.
    pub queries: u64,
    /// Mode of the batch.
    pub mode: String,
    /// Server threads.
    pub server_threads: usize,
    /// Client threads.
    pub client_threads: usize,
    /// Client blinding path.
    pub blinding: String,
    /// `psi-server init` wall time (0 when the data directory was reused).
    pub init_seconds: f64,
    /// Snapshot file bytes per registry entry.
    pub disk_bytes_per_entry: f64,
    /// Server resident memory after loading, per registry entry.
    pub memory_bytes_per_entry: f64,
    /// Bytes on the wire (both ways) of the first sync (sync mode).
    pub sync_bytes: u64,
    /// Wall time of the first sync.
    pub sync_seconds: f64,
    /// End-to-end rows per second of the batch.
    pub rows_per_second: f64,
    /// Server CPU time (user + system) per batch row, in microseconds.
    pub server_cpu_us_per_element: f64,
    /// Client CPU time per batch row, in microseconds.
    pub client_cpu_us_per_element: f64,
    /// Bytes on the wire (both ways) per batch row.
    pub wire_bytes_per_query: f64,
    /// Single-check latency, bucket mode.
    pub check_p50_ms: f64,
    /// 95th percentile.
    pub check_p95_ms: f64,
    /// 99th percentile.
    pub check_p99_ms: f64,
    /// Bytes on the wire per single check.
    pub check_wire_bytes: f64,
    /// Peak resident memory of the server process.
    pub server_peak_rss_bytes: u64,
    /// Peak resident memory of the client (this process, reset at the start).
    pub client_peak_rss_bytes: u64,
    /// Of `check_wire_bytes`, the bytes from client to server.
    #[serde(default)]
    pub check_bytes_up: f64,
    /// Server CPU per single check, in milliseconds (both cores' time).
    #[serde(default)]
    pub check_server_cpu_ms: f64,
    /// PIR mode: bytes of the first check, which registers the client's
    /// public parameters (once per institution and key epoch).
    #[serde(default)]
    pub pir_first_check_bytes: u64,
    /// PIR mode: wall time of that first check.
    #[serde(default)]
    pub pir_first_check_seconds: f64,
    /// PIR mode: bytes the server holds for the database.
    #[serde(default)]
    pub pir_database_bytes: u64,
    /// PIR mode: the scheme the server chose (`PirInfo.scheme`).
    #[serde(default)]
    pub pir_scheme: String,
    /// PIR mode: building the database from the loaded index, seconds.
    #[serde(default)]
    pub pir_build_seconds: f64,
    /// PIR mode: the server's resident memory growth while building it.
    #[serde(default)]
    pub pir_build_rss_bytes: u64,
    /// Median of single checks run as `psi-client check` processes (process
    /// start, connection and pinning included).
    #[serde(default)]
    pub cli_check_p50_ms: f64,
    /// PIR mode: single checks a second with eight in flight at once (the
    /// server answers concurrent requests' queries with shared passes).
    #[serde(default)]
    pub pir_concurrent_checks_per_second: f64,
    /// PIR mode: queries a pass over the database answered in that run
    /// (the server's `psi_pir_pass_queries_total` over `psi_pir_passes_total`).
    #[serde(default)]
    pub pir_concurrent_queries_per_pass: f64,
}

/// CPU seconds (user + system) of a process, from `/proc/PID/stat`.
fn cpu_seconds(pid: &str) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces), 1-based in proc(5):
    // utime is field 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // USER_HZ is 100 on Linux.
    Ok((ticks(11) + ticks(12)) / 100.0)
}

/// A `VmHWM`/`VmRSS` style field of `/proc/PID/status`, in bytes.
fn status_bytes(pid: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Counts bytes relayed between clients and `upstream`.
#[derive(Debug, Default)]
pub struct Relay {
    /// Client to server.
    pub up: AtomicU64,
    /// Server to client.
    pub down: AtomicU64,
}

impl Relay {
    /// Both directions.
    pub fn total(&self) -> u64 {
        self.up.load(Relaxed) + self.down.load(Relaxed)
    }

    /// Listens on a loopback port and relays each connection to `upstream`.
    ///
    /// # Errors
    /// If it cannot bind.
    pub async fn start(
        upstream: std::net::SocketAddr,
    ) -> Result<(Arc<Self>, std::net::SocketAddr)> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let relay = Arc::new(Self::default());
        let counters = Arc::clone(&relay);
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let counters = Arc::clone(&counters);
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (mut ri, mut wi) = inbound.split();
                    let (mut ro, mut wo) = outbound.split();
                    let up = copy_counting(&mut ri, &mut wo, &counters.up);
                    let down = copy_counting(&mut ro, &mut wi, &counters.down);
                    let _ = tokio::join!(up, down);
                });
            }
        });
        Ok((relay, addr))
    }
}

async fn copy_counting<R, W>(from: &mut R, to: &mut W, count: &AtomicU64) -> std::io::Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        to.write_all(buf.get(..n).unwrap_or(&[])).await?;
        count.fetch_add(n as u64, Relaxed);
    }
}

/// The `psi-server` binary beside this one (built by `cargo build -p psi-server`).
///
/// # Errors
/// If it is not there.
pub fn server_binary() -> Result<PathBuf> {
    sibling_binary("psi-server")
}

/// The `psi-client` binary built beside this one.
///
/// # Errors
/// When it has not been built.
pub fn client_binary() -> Result<PathBuf> {
    sibling_binary("psi-client")
}

fn sibling_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe
        .parent()
        .map(|d| d.join(name))
        .with_context(|| format!("locating {name}"))?;
    if !path.exists() {
        bail!(
            "{} is missing: build it with the same profile (`cargo build --release -p {name}`)",
            path.display()
        );
    }
    Ok(path)
}

/// The registry CSV and data directory for `n`, made once and reused.
/// Returns the data directory and the init wall time (0 if reused).
///
/// # Errors
/// Generation or init failures.
pub fn prepare_registry(dir: &Path, n: u64) -> Result<(PathBuf, PathBuf, f64)> {
    std::fs::create_dir_all(dir)?;
    let csv = dir.join(format!("registry-{n}.csv"));
    if !csv.exists() {
        psi_server::cli::generate(n, 1, &csv)?;
    }
    // Per build profile: a cached init time must come from the same build.
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let data = dir.join(format!("data-{n}-{profile}"));
    let timing = data.join("init-seconds.txt");
    if let Ok(t) = std::fs::read_to_string(&timing) {
        if psi_server::store::has_registry(&data) {
            return Ok((csv, data, t.trim().parse().unwrap_or(0.0)));
        }
    }
    let _ = std::fs::remove_dir_all(&data);
    let t = Instant::now();
    let out = Command::new(server_binary()?)
        .args(["init", "--no-progress", "--registry"])
        .arg(&csv)
        .arg("--data-dir")
        .arg(&data)
        .output()?;
    if !out.status.success() {
        bail!(
            "psi-server init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let seconds = t.elapsed().as_secs_f64();
    std::fs::write(&timing, seconds.to_string())?;
    Ok((csv, data, seconds))
}

struct ServerProcess(Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Writes a batch input of `queries` rows: the registry's first half of them
/// (registered people), then as many synthetic outsiders.
///
/// # Errors
/// I/O or CSV errors.
pub fn write_queries(registry_csv: &Path, queries: u64, path: &Path) -> Result<()> {
    let mut w = csv::Writer::from_path(path)?;
    w.write_record(["name", "id"])?;
    let half = queries / 2;
    for rec in csv::Reader::from_path(registry_csv)?
        .records()
        .take(usize::try_from(half)?)
    {
        let rec = rec?;
        w.write_record([rec.get(0).unwrap_or(""), rec.get(1).unwrap_or("")])?;
    }
    for p in
        Generator::new(999, psi_core::CivilDate::today())?.take(usize::try_from(queries - half)?)
    {
        w.write_record([p.name.as_str(), p.id.as_str()])?;
    }
    w.flush()?;
    Ok(())
}

/// The `p` quantile of sorted latencies, in milliseconds.
#[must_use]
pub fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

/// Measures one point. Run it in a process of its own (`psi-bench point`)
/// so that thread pools and peak memory belong to the point.
///
/// # Errors
/// Any failure of the server, the client or the files.
pub async fn run_point(dir: &Path, spec: &PointSpec) -> Result<PointResult> {
    // Peak RSS counts from here (clear_refs 5 resets VmHWM).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let (csv, data, init_seconds) = prepare_registry(dir, spec.registry_size)?;
    let cache = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let listen = format!("127.0.0.1:{port}");
    let admin_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let server = ServerProcess(
        Command::new(server_binary()?)
            .args([
                "serve",
                "--listen",
                &listen,
                "--reload-interval-ms",
                "3600000",
                "--data-dir",
            ])
            .arg(&data)
            // PIR mode's database only where it is measured: the other
            // modes' memory figures stay those of the index and tag set.
            .args(if spec.mode != "pir" {
                vec!["--pir-max-database-bytes", "0"]
            } else if spec.pir_scheme.is_empty() {
                Vec::new()
            } else {
                vec!["--pir-scheme", spec.pir_scheme.as_str()]
            })
            .arg("--audit-db")
            .arg(cache.path().join("audit.sqlite"))
            .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
            .env("RAYON_NUM_THREADS", spec.server_threads.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting psi-server")?,
    );
    let pid = server.0.id().to_string();
    // Wait for the listener (the snapshot then loads; the client waits for that).
    let ready = Instant::now();
    while tokio::net::TcpStream::connect(&listen).await.is_err() {
        if ready.elapsed() > Duration::from_secs(60) {
            bail!("psi-server did not listen on {listen} within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (relay, relay_addr) = Relay::start(listen.parse()?).await?;
    let options = ConnectOptions {
        server: format!("http://{relay_addr}"),
        pin_key: None,
        pin_exact: false,
        cache_dir: cache.path().to_path_buf(),
        blinding: match spec.blinding.as_str() {
            "multiplicative" => psi_core::Blinding::Multiplicative,
            _ => psi_core::Blinding::Additive,
        },
        concurrency: 4,
        tls: None,
        purpose: "benchmark".into(),
    };
    let session = Session::connect_when_ready(options, Duration::from_secs(600)).await?;
    let mut r = PointResult {
        registry_size: spec.registry_size,
        queries: spec.queries,
        mode: spec.mode.clone(),
        server_threads: spec.server_threads,
        client_threads: spec.client_threads,
        blinding: spec.blinding.clone(),
        init_seconds,
        disk_bytes_per_entry: std::fs::metadata(psi_server::store::base_file(&data)?)?.len() as f64
            / spec.registry_size as f64,
        memory_bytes_per_entry: status_bytes(&pid, "VmRSS:") as f64 / spec.registry_size as f64,
        ..PointResult::default()
    };
    let mode = match spec.mode.as_str() {
        "bucket" => QueryMode::Bucket,
        "pir" => QueryMode::Pir,
        _ => QueryMode::Sync,
    };
    // The first PIR check registers the client's public parameters: timed
    // and counted apart (once per institution and key epoch).
    let people: Vec<_> = Generator::new(1, psi_core::CivilDate::today())?
        .take(spec.checks + 1)
        .collect();
    if mode == QueryMode::Pir {
        let first = people.last().context("no people")?;
        let (before, t) = (relay.total(), Instant::now());
        if check(&session, &first.name, &first.id, mode).await? != CheckOutcome::Match {
            bail!("a registered person did not match");
        }
        r.pir_first_check_seconds = t.elapsed().as_secs_f64();
        r.pir_first_check_bytes = relay.total() - before;
    }
    if mode == QueryMode::Sync {
        let before = relay.total();
        let t = Instant::now();
        session.sync().await?;
        r.sync_seconds = t.elapsed().as_secs_f64();
        r.sync_bytes = relay.total() - before;
    }

    let input = cache.path().join("queries.csv");
    write_queries(&csv, spec.queries, &input)?;
    let (server_cpu, client_cpu, bytes) = (cpu_seconds(&pid)?, cpu_seconds("self")?, relay.total());
    let summary = batch::run(
        &session,
        &BatchOptions {
            input,
            output: cache.path().join("answers.csv"),
            mode,
            chunk_rows: 8192,
            file: psi_client::batch::FileFormat::default(),
            chunks_in_flight: 2,
            progress: false,
            resume: false,
            max_cache_age: Duration::from_secs(24 * 3600),
            no_sync: mode == QueryMode::Sync,
        },
    )
    .await?;
    if summary.matched != spec.queries / 2 || summary.invalid != 0 {
        bail!("wrong answers: {summary}");
    }
    let rows = summary.rows.max(1) as f64;
    r.rows_per_second = rows / summary.elapsed.as_secs_f64();
    r.server_cpu_us_per_element = (cpu_seconds(&pid)? - server_cpu) * 1e6 / rows;
    r.client_cpu_us_per_element = (cpu_seconds("self")? - client_cpu) * 1e6 / rows;
    r.wire_bytes_per_query = (relay.total() - bytes) as f64 / rows;

    let single = if mode == QueryMode::Pir {
        QueryMode::Pir
    } else {
        QueryMode::Bucket
    };
    let mut latencies = Vec::with_capacity(spec.checks);
    let (bytes, up, server_cpu) = (relay.total(), relay.up.load(Relaxed), cpu_seconds(&pid)?);
    for p in people.iter().take(spec.checks) {
        let t = Instant::now();
        let outcome = check(&session, &p.name, &p.id, single).await?;
        latencies.push(t.elapsed());
        if outcome != CheckOutcome::Match {
            bail!("a registered person did not match");
        }
    }
    latencies.sort();
    r.check_wire_bytes = (relay.total() - bytes) as f64 / spec.checks.max(1) as f64;
    r.check_bytes_up = (relay.up.load(Relaxed) - up) as f64 / spec.checks.max(1) as f64;
    r.check_server_cpu_ms = (cpu_seconds(&pid)? - server_cpu) * 1e3 / spec.checks.max(1) as f64;
    if mode == QueryMode::Pir {
        r.cli_check_p50_ms = cli_checks(&relay_addr.to_string(), cache.path(), &people, 10)?;
        use futures::StreamExt;
        let passes = || -> Result<(f64, f64)> {
            let text = psi_testbed::http_get(admin_port, "/metrics").context("no metrics")?;
            let value = |name: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            Ok((
                value("psi_pir_passes_total "),
                value("psi_pir_pass_queries_total "),
            ))
        };
        let before = passes()?;
        let t = Instant::now();
        let outcomes: Vec<_> = futures::stream::iter(people.iter().take(spec.checks))
            .map(|p| check(&session, &p.name, &p.id, single))
            .buffer_unordered(8)
            .collect()
            .await;
        for outcome in outcomes {
            if outcome? != CheckOutcome::Match {
                bail!("a registered person did not match");
            }
        }
        r.pir_concurrent_checks_per_second = spec.checks as f64 / t.elapsed().as_secs_f64();
        let after = passes()?;
        r.pir_concurrent_queries_per_pass = (after.1 - before.1) / (after.0 - before.0).max(1.0);
    }
    r.check_p50_ms = percentile(&latencies, 0.50);
    r.check_p95_ms = percentile(&latencies, 0.95);
    r.check_p99_ms = percentile(&latencies, 0.99);
    r.server_peak_rss_bytes = status_bytes(&pid, "VmHWM:");
    r.client_peak_rss_bytes = status_bytes("self", "VmHWM:");
    drop(server);
    if mode == QueryMode::Pir {
        // The database as the server builds it, from the loaded snapshot.
        let snap = psi_server::serving::snapshot::Snapshot::load(&data)?;
        let rss = status_bytes("self", "VmRSS:");
        let t = Instant::now();
        let choice = if spec.pir_scheme.is_empty() {
            psi_pir::SchemeChoice::default()
        } else {
            spec.pir_scheme.parse()?
        };
        let db =
            psi_server::serving::pir::database_for(&snap, None, usize::MAX, usize::MAX, choice)?
                .context("no PIR database for this registry")?;
        r.pir_scheme = db.shape().scheme().to_string();
        r.pir_build_seconds = t.elapsed().as_secs_f64();
        r.pir_database_bytes = db.bytes() as u64;
        r.pir_build_rss_bytes = status_bytes("self", "VmRSS:").saturating_sub(rss);
    }
    Ok(r)
}

/// The median of `n` single checks in PIR mode, each a `psi-client check`
/// process of its own (start, connect, pin, check, exit), sharing the
/// cache directory where the registered parameters' id is kept.
fn cli_checks(
    server: &str,
    cache: &Path,
    people: &[psi_server::tools::synth::Person],
    n: usize,
) -> Result<f64> {
    let client = client_binary()?;
    let mut latencies = Vec::with_capacity(n);
    for p in people.iter().take(n) {
        let t = Instant::now();
        let out = Command::new(&client)
            .args([
                "check",
                "--mode",
                "pir",
                "--purpose",
                "benchmark",
                "--server",
            ])
            .arg(format!("http://{server}"))
            .arg("--cache-dir")
            .arg(cache)
            .args(["--name", &p.name, "--id", &p.id])
            .stderr(Stdio::null())
            .output()
            .context("running psi-client check")?;
        latencies.push(t.elapsed());
        if !out.status.success() {
            bail!(
                "psi-client check --mode pir failed: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }
    latencies.sort();
    Ok(percentile(&latencies, 0.50))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_relay_counts_bytes_both_ways() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // An upstream that answers every 10 bytes with 25.
        let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = upstream.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = upstream.accept().await.unwrap();
            let mut buf = [0u8; 10];
            while s.read_exact(&mut buf).await.is_ok() {
                s.write_all(&[7u8; 25]).await.unwrap();
            }
        });
        let (relay, relay_addr) = Relay::start(addr).await.unwrap();
        let mut c = tokio::net::TcpStream::connect(relay_addr).await.unwrap();
        let mut back = [0u8; 25];
        for _ in 0..4 {
            c.write_all(&[1u8; 10]).await.unwrap();
            c.read_exact(&mut back).await.unwrap();
        }
        assert_eq!(relay.up.load(Relaxed), 40);
        assert_eq!(relay.down.load(Relaxed), 100);
        assert_eq!(relay.total(), 140);
    }

    #[test]
    fn cpu_and_memory_of_this_process_are_read_from_proc() {
        let before = cpu_seconds("self").unwrap();
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(200) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        assert!(cpu_seconds("self").unwrap() - before >= 0.1);
        let rss = status_bytes("self", "VmRSS:");
        assert!(status_bytes("self", "VmHWM:") >= rss);
        assert!(status_bytes("self", "VmRSS:") > 1 << 20);
    }
}
