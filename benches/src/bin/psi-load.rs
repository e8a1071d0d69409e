//! `psi-load`: a bounded load test over loopback. N institutions, each with
//! its own client certificate from a fresh CA and its own policy entry, run
//! single bucket-mode checks back to back against one server (mutual TLS) for
//! a fixed time. Reports throughput, latency percentiles and errors, then
//! checks that the audit trail holds exactly one record per request and that
//! its chain verifies. With `--attack KIND` an attacker (see
//! `psi_bench::attack`) runs from 127.0.0.2 for the same time, and the
//! report says what the honest institutions saw meanwhile. Traffic stays on
//! the loopback interface and stops by itself.
//!
//! By default the server runs inside this process. With `--replicas N` it is
//! N `psi-server serve` processes (the binary beside this one) behind haproxy
//! (TCP passthrough: mutual TLS ends at the replicas), as deployed; with
//! `--audit-db postgres` the replicas share one audit trail and one set of
//! quotas in a throwaway PostgreSQL server on loopback (fsync on). The report
//! includes the time each request's audit record took to become durable
//! (`psi_audit_write_duration_seconds`, read from the admin port).

// The benchmark harness: a run that cannot proceed stops with the reason.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clap::Parser;
use psi_client::check::{check, CheckOutcome};
use psi_client::session::ClientTls;
use psi_client::{ConnectOptions, QueryMode, Session};
use psi_server::registry;
use psi_server::serving::config::{ServeConfig, TlsFiles};
use psi_server::tools::synth::Generator;

use psi_bench::attack::{self, Attack};
use psi_testbed::{Balancing, Durability, Haproxy, Postgres, Process};

/// Where the audit trail (and, with PostgreSQL, the shared quotas) live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
enum AuditDb {
    /// A SQLite file in the working directory (the embedded default).
    Sqlite,
    /// A throwaway PostgreSQL server on loopback, started for the run.
    Postgres,
}

#[derive(Debug, Parser)]
#[command(
    name = "psi-load",
    about = "Bounded load test: many institutions, one server, loopback only"
)]
struct Args {
    /// Institutions querying at once.
    #[arg(long, default_value_t = 32)]
    institutions: usize,
    /// How long they query.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Registry size.
    #[arg(long, default_value_t = 100_000)]
    registry_size: u64,
    /// Working directory.
    #[arg(long, default_value = "target/psi-load")]
    dir: PathBuf,
    /// An attacker running beside the honest load.
    #[arg(long, value_enum, default_value_t = Attack::None)]
    attack: Attack,
    /// 0: the server runs in this process, no balancer. N >= 1: N
    /// `psi-server` processes behind haproxy (TCP passthrough).
    #[arg(long, default_value_t = 0)]
    replicas: usize,
    /// The audit trail's store.
    #[arg(long, value_enum, default_value_t = AuditDb::Sqlite)]
    audit_db: AuditDb,
}

/// The servers under load: one in this process, or replicas behind haproxy.
enum Servers {
    InProcess(psi_server::serving::serve::Running),
    Replicas {
        processes: Vec<Process>,
        _balancer: Haproxy,
    },
}

/// The audit write latency histogram summed over the admin ports' `/metrics`:
/// count, mean, and the upper bounds of the buckets holding p50 and p99.
fn audit_write_latency(admin_ports: &[u16]) -> serde_json::Value {
    const NAME: &str = "psi_audit_write_duration_seconds";
    let mut buckets: Vec<(f64, u64)> = Vec::new();
    let (mut sum, mut count) = (0.0, 0u64);
    for &port in admin_ports {
        let Some(text) = psi_testbed::http_get(port, "/metrics") else {
            continue;
        };
        for line in text.lines() {
            let Some((key, value)) = line.rsplit_once(' ') else {
                continue;
            };
            if let Some(le) = key
                .strip_prefix(NAME)
                .and_then(|k| k.strip_prefix("_bucket{le=\""))
                .and_then(|k| k.strip_suffix("\"}"))
            {
                let le: f64 = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap_or(f64::INFINITY)
                };
                let n: u64 = value.parse().unwrap_or(0);
                match buckets.iter_mut().find(|(b, _)| *b == le) {
                    Some(b) => b.1 += n,
                    None => buckets.push((le, n)),
                }
            } else if key == format!("{NAME}_sum") {
                sum += value.parse::<f64>().unwrap_or(0.0);
            } else if key == format!("{NAME}_count") {
                count += value.parse::<u64>().unwrap_or(0);
            }
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Prometheus buckets are cumulative: the first whose count reaches the rank.
    let upper = |p: f64| {
        let rank = (count as f64 * p).ceil() as u64;
        buckets
            .iter()
            .find(|(_, n)| *n >= rank.max(1))
            .map_or(f64::NAN, |(le, _)| le * 1e3)
    };
    serde_json::json!({
        "records": count,
        "mean_ms": if count == 0 { 0.0 } else { sum / count as f64 * 1e3 },
        "p50_at_most_ms": upper(0.50),
        "p99_at_most_ms": upper(0.99),
    })
}

/// Peak resident memory of this process (server and clients), in MiB.
fn peak_rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib / 1024)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len().saturating_sub(1)) as f64 * p).round() as usize;
    sorted.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

/// The service under load: in this process (`--replicas 0`), or replica
/// processes behind haproxy. Returns the servers, the address institutions
/// connect to, and the admin ports.
async fn start_servers(
    args: &Args,
    data: &Path,
    ca: &Path,
    policy_path: &Path,
    audit_store: &psi_server::serving::audit::AuditStore,
    postgres: Option<&Postgres>,
) -> Result<(Servers, std::net::SocketAddr, Vec<u16>)> {
    if args.replicas == 0 {
        let running = psi_server::serving::serve::start(ServeConfig {
            request_timeout: Duration::from_secs(30),
            tls: Some(TlsFiles {
                cert: std::fs::read(ca.join("server.pem"))?,
                key: std::fs::read(ca.join("server.key"))?,
                client_ca: std::fs::read(ca.join("ca.pem"))?,
            }),
            audit_db: audit_store.clone(),
            policy: Some((
                policy_path.to_path_buf(),
                psi_server::serving::policy::Policy::load(policy_path)?,
            )),
            admin_listen: Some("127.0.0.1:0".parse()?),
            ..ServeConfig::local(data)
        })
        .await?;
        let front = running.local_addr;
        let admin: Vec<u16> = running.admin_addr.map(|a| a.port()).into_iter().collect();
        Ok((Servers::InProcess(running), front, admin))
    } else {
        let server_bin = std::env::current_exe()?.with_file_name("psi-server");
        ensure!(
            server_bin.exists(),
            "{} is missing: build it beside psi-load (cargo build --release -p psi-server -p psi-bench)",
            server_bin.display()
        );
        let audit_arg = match postgres {
            Some(pg) => pg.url.clone(),
            None => args.dir.join("audit.sqlite").display().to_string(),
        };
        let ports: Vec<(u16, u16)> = (0..args.replicas)
            .map(|_| (psi_testbed::free_port(), psi_testbed::free_port()))
            .collect();
        let path = |p: PathBuf| p.display().to_string();
        let processes = ports
            .iter()
            .enumerate()
            .map(|(i, (port, admin))| {
                let serve_args = vec![
                    "serve".into(),
                    "--listen".into(),
                    format!("127.0.0.1:{port}"),
                    "--admin-listen".into(),
                    format!("127.0.0.1:{admin}"),
                    "--data-dir".into(),
                    path(data.to_path_buf()),
                    "--audit-db".into(),
                    audit_arg.clone(),
                    "--policy".into(),
                    path(policy_path.to_path_buf()),
                    "--tls-cert".into(),
                    path(ca.join("server.pem")),
                    "--tls-key".into(),
                    path(ca.join("server.key")),
                    "--client-ca".into(),
                    path(ca.join("ca.pem")),
                ];
                Process::start(
                    &server_bin,
                    serve_args,
                    args.dir.join(format!("replica-{}.log", i + 1)),
                )
            })
            .collect();
        let balancer = Haproxy::start(&args.dir, Balancing::Tcp, &ports)
            .map_err(|why| anyhow::anyhow!("haproxy cannot run here: {why}"))?;
        balancer.wait_all_up(args.replicas, Duration::from_secs(120));
        let front: std::net::SocketAddr = format!("127.0.0.1:{}", balancer.front).parse()?;
        let admin: Vec<u16> = ports.iter().map(|p| p.1).collect();
        Ok((
            Servers::Replicas {
                processes,
                _balancer: balancer,
            },
            front,
            admin,
        ))
    }
}

/// The audit trail verified, and how many records the honest institutions have in it.
fn audit_summary(
    audit_store: &psi_server::serving::audit::AuditStore,
) -> Result<(psi_server::serving::audit::Verification, u64)> {
    let v = psi_server::serving::audit::verify(audit_store).context("verifying the audit trail")?;
    let mut out = Vec::new();
    psi_server::serving::audit::export(
        audit_store,
        &psi_server::serving::audit::ExportFilter::default(),
        psi_server::serving::audit::Format::Csv,
        &mut out,
    )?;
    let honest = csv::Reader::from_reader(out.as_slice())
        .records()
        .filter_map(Result::ok)
        .filter(|r| r.get(2).is_some_and(|i| i.starts_with("inst-")))
        .count() as u64;
    Ok((v, honest))
}

/// Each institution checks registered people in bucket mode until
/// `deadline`; per institution, the latencies of the right answers and the
/// count of errors (a wrong answer is one).
async fn honest_load(
    sessions: Vec<Session>,
    people: &[psi_server::tools::synth::Person],
    institutions: usize,
    deadline: Instant,
) -> Vec<(Vec<Duration>, u64)> {
    let workers = sessions
        .into_iter()
        .enumerate()
        .map(|(i, session)| async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            let mut n = i;
            while Instant::now() < deadline {
                let p = &people[n % people.len()];
                n += institutions;
                let t = Instant::now();
                match check(&session, &p.name, &p.id, QueryMode::Bucket).await {
                    Ok(CheckOutcome::Match) => latencies.push(t.elapsed()),
                    Ok(other) => {
                        eprintln!("wrong answer for a registered person: {other:?}");
                        errors += 1;
                    }
                    Err(e) => {
                        eprintln!("error: {e:#}");
                        errors += 1;
                    }
                }
            }
            (latencies, errors)
        });
    futures::future::join_all(workers).await
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let _ = std::fs::remove_dir_all(&args.dir);
    std::fs::create_dir_all(&args.dir)?;
    let registry_csv = args.dir.join("registry.csv");
    psi_server::cli::generate(args.registry_size, 11, &registry_csv)?;
    let data = args.dir.join("data");
    registry::init(
        &psi_server::registry::source::Source::csv(&registry_csv),
        &data,
        false,
    )?;

    let ca = args.dir.join("ca");
    psi_server::tools::ca::init(&ca, &["127.0.0.1".to_string()])?;
    let mut policy = String::new();
    let mut tls = Vec::new();
    for i in 0..args.institutions {
        let id = format!("inst-{i:03}");
        let (cert, key) = psi_server::tools::ca::issue(&ca, &id, &ca, false)?;
        tls.push(ClientTls {
            ca: std::fs::read(ca.join("ca.pem"))?,
            cert: std::fs::read(cert)?,
            key: std::fs::read(key)?,
        });
        policy.push_str(&format!(
            "[institutions.{id}]\nmodes = [\"bucket\"]\npurposes = [\"load-test\"]\nrate_per_second = 1000000\ndaily_cap = 1000000000\nmax_batch = 64\n"
        ));
    }
    // The attacker is an institution too (its certificate gets it past TLS),
    // with a generous policy: the service's own limits are what is tested.
    let (attacker_cert, attacker_key) = psi_server::tools::ca::issue(&ca, "attacker", &ca, false)?;
    policy.push_str(
        "[institutions.attacker]\nmodes = [\"sync\", \"bucket\"]\npurposes = [\"load-test\"]\nrate_per_second = 1000000\ndaily_cap = 1000000000\nmax_batch = 4096\n",
    );
    let policy_path = args.dir.join("policy.toml");
    std::fs::write(&policy_path, policy)?;
    let postgres: Option<Postgres> = match args.audit_db {
        AuditDb::Sqlite => None,
        AuditDb::Postgres => Some(
            psi_testbed::start_postgres(Durability::Durable)
                .map_err(|why| anyhow::anyhow!("PostgreSQL cannot run here: {why}"))?,
        ),
    };
    let audit_store: psi_server::serving::audit::AuditStore = match &postgres {
        Some(pg) => psi_server::serving::audit::AuditStore::parse(&pg.url),
        None => args.dir.join("audit.sqlite").into(),
    };
    let (servers, front, admin_ports) = start_servers(
        &args,
        &data,
        &ca,
        &policy_path,
        &audit_store,
        postgres.as_ref(),
    )
    .await?;
    let url = format!("https://{front}");
    let people: Vec<_> = Generator::new(11, psi_core::CivilDate::today())?
        .take(1000)
        .collect();

    let mut sessions = Vec::new();
    for (i, t) in tls.into_iter().enumerate() {
        let opts = ConnectOptions {
            server: url.clone(),
            pin_key: None,
            pin_exact: false,
            cache_dir: args.dir.join(format!("cache-{i}")),
            blinding: psi_core::Blinding::Additive,
            concurrency: 1,
            tls: Some(t),
            purpose: "load-test".into(),
        };
        let session = Session::connect_when_ready(opts, Duration::from_secs(30)).await?;
        sessions.push(session);
    }
    let first = sessions.first().context("no institutions")?;
    let client = psi_core::Client::new(
        psi_core::Mode::Voprf,
        psi_core::PublicKey::from_bytes(&first.info().public_key)?,
    );
    let inputs: Vec<Vec<u8>> = (0..4096u32).map(|i| i.to_be_bytes().to_vec()).collect();
    let (_, blinded) =
        client.blind(&inputs, psi_core::Blinding::Additive, &mut rand_core::OsRng)?;
    let target = attack::Target {
        addr: front,
        ca_pem: std::fs::read(ca.join("ca.pem"))?,
        cert_pem: std::fs::read(attacker_cert)?,
        key_pem: std::fs::read(attacker_key)?,
        purpose: "load-test".into(),
        epoch: first.info().key_epoch,
        blinded: psi_proto::pack(blinded.iter().map(|b| &b.0)),
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let attacker = tokio::spawn(attack::run(args.attack, target, stop_rx));
    if args.attack != Attack::None {
        // Let the attack take hold before the honest load starts.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    eprintln!(
        "{} institutions querying for {} s, attack: {:?}",
        args.institutions, args.seconds, args.attack
    );
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let started = Instant::now();
    let results = honest_load(sessions, &people, args.institutions, deadline).await;
    let elapsed = started.elapsed().as_secs_f64();
    let _ = stop_tx.send(true);
    let tally = attacker.await.context("attacker task")??;
    let audit_write = audit_write_latency(&admin_ports);
    match servers {
        Servers::InProcess(running) => running.shutdown().await?,
        Servers::Replicas { mut processes, .. } => {
            for p in &mut processes {
                p.terminate();
            }
        }
    }

    let mut all: Vec<Duration> = results.iter().flat_map(|r| r.0.iter().copied()).collect();
    let errors: u64 = results.iter().map(|r| r.1).sum();
    all.sort();
    // The audit stores' clients block: off the async workers.
    let (v, honest_records) = tokio::task::block_in_place(|| audit_summary(&audit_store))?;
    let requests = all.len() as u64 + errors;
    let report = serde_json::json!({
        "replicas": args.replicas,
        "audit_db": args.audit_db,
        "audit_write": audit_write,
        "attack": args.attack,
        "attacker": tally.to_json(),
        "peak_rss_mib": peak_rss_mib(),
        "institutions": args.institutions,
        "seconds": elapsed,
        "checks": all.len(),
        "checks_per_second": all.len() as f64 / elapsed,
        "p50_ms": percentile(&all, 0.50),
        "p99_ms": percentile(&all, 0.99),
        "max_ms": all.last().map_or(0.0, |d| d.as_secs_f64() * 1e3),
        "errors": errors,
        "audit_records": v.records,
        "honest_audit_records": honest_records,
        "audit_chain": "intact",
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    ensure!(errors == 0, "{errors} errors");
    ensure!(
        honest_records == requests,
        "audit trail has {honest_records} records of the honest institutions for {requests} requests"
    );
    Ok(())
}
