//! `psi-load`: a bounded load test over loopback. N institutions, each with
//! its own client certificate from a fresh CA and its own policy entry, run
//! single bucket-mode checks back to back against one server (mutual TLS) for
//! a fixed time. Reports throughput, latency percentiles and errors, then
//! checks that the audit trail holds exactly one record per request and that
//! its chain verifies. Traffic stays on 127.0.0.1 and stops by itself.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clap::Parser;
use psi_client::check::{check, CheckOutcome};
use psi_client::session::ClientTls;
use psi_client::{ConnectOptions, QueryMode, Session};
use psi_server::config::{ServeConfig, TlsFiles};
use psi_server::registry::{self, today};
use psi_server::service::Limits;
use psi_server::synth::Generator;

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
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len().saturating_sub(1)) as f64 * p).round() as usize;
    sorted.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e3)
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
        &psi_server::source::Source::csv(&registry_csv),
        &data,
        false,
    )?;

    let ca = args.dir.join("ca");
    psi_server::ca::init(&ca, &["127.0.0.1".to_string()])?;
    let mut policy = String::new();
    let mut tls = Vec::new();
    for i in 0..args.institutions {
        let id = format!("inst-{i:03}");
        let (cert, key) = psi_server::ca::issue(&ca, &id, &ca, false)?;
        tls.push(ClientTls {
            ca: std::fs::read(ca.join("ca.pem"))?,
            cert: std::fs::read(cert)?,
            key: std::fs::read(key)?,
        });
        policy.push_str(&format!(
            "[institutions.{id}]\nmodes = [\"bucket\"]\npurposes = [\"load-test\"]\nrate_per_second = 1000000\ndaily_cap = 1000000000\nmax_batch = 64\n"
        ));
    }
    let policy_path = args.dir.join("policy.toml");
    std::fs::write(&policy_path, policy)?;
    let audit_db = args.dir.join("audit.sqlite");
    let running = psi_server::serve::start(ServeConfig {
        data_dir: data,
        listen: "127.0.0.1:0".parse()?,
        limits: Limits::default(),
        request_timeout: Duration::from_secs(30),
        reload_interval: Duration::from_millis(2000),
        tls: Some(TlsFiles {
            cert: std::fs::read(ca.join("server.pem"))?,
            key: std::fs::read(ca.join("server.key"))?,
            client_ca: std::fs::read(ca.join("ca.pem"))?,
        }),
        audit_db: audit_db.clone(),
        policy: Some((
            policy_path.clone(),
            psi_server::policy::Policy::load(&policy_path)?,
        )),
        admin_listen: None,
        net: Default::default(),
    })
    .await?;
    let url = format!("https://{}", running.local_addr);
    let people: Vec<_> = Generator::new(11, today())?.take(1000).collect();

    let mut sessions = Vec::new();
    for (i, t) in tls.into_iter().enumerate() {
        let opts = ConnectOptions {
            server: url.clone(),
            pin_key: None,
            cache_dir: args.dir.join(format!("cache-{i}")),
            blinding: psi_core::Blinding::Additive,
            concurrency: 1,
            tls: Some(t),
            purpose: "load-test".into(),
        };
        let session = Session::connect_when_ready(opts, Duration::from_secs(30)).await?;
        sessions.push(session);
    }
    eprintln!(
        "{} institutions querying for {} s",
        args.institutions, args.seconds
    );
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let workers = sessions.into_iter().enumerate().map(|(i, session)| {
        let people = people.clone();
        async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            let mut n = i;
            while Instant::now() < deadline {
                let p = &people[n % people.len()];
                n += args.institutions;
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
        }
    });
    let started = Instant::now();
    let results = futures::future::join_all(workers).await;
    let elapsed = started.elapsed().as_secs_f64();
    running.shutdown().await?;

    let mut all: Vec<Duration> = results.iter().flat_map(|r| r.0.iter().copied()).collect();
    let errors: u64 = results.iter().map(|r| r.1).sum();
    all.sort();
    let v = psi_server::audit::verify(&audit_db).context("verifying the audit trail")?;
    let requests = all.len() as u64 + errors;
    let report = serde_json::json!({
        "institutions": args.institutions,
        "seconds": elapsed,
        "checks": all.len(),
        "checks_per_second": all.len() as f64 / elapsed,
        "p50_ms": percentile(&all, 0.50),
        "p99_ms": percentile(&all, 0.99),
        "max_ms": all.last().map_or(0.0, |d| d.as_secs_f64() * 1e3),
        "errors": errors,
        "audit_records": v.records,
        "audit_chain": "intact",
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    ensure!(errors == 0, "{errors} errors");
    ensure!(
        v.records == requests,
        "audit trail has {} records for {requests} requests",
        v.records
    );
    Ok(())
}
