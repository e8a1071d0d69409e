//! `psi-load`: a bounded load test over loopback. N institutions, each with
//! its own client certificate from a fresh CA and its own policy entry, run
//! single bucket-mode checks back to back against one server (mutual TLS) for
//! a fixed time. Reports throughput, latency percentiles and errors, then
//! checks that the audit trail holds exactly one record per request and that
//! its chain verifies. With `--attack KIND` an attacker (see
//! `psi_bench::attack`) runs from 127.0.0.2 for the same time, and the
//! report says what the honest institutions saw meanwhile. Traffic stays on
//! the loopback interface and stops by itself.

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

use psi_bench::attack::{self, Attack};

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
    // The attacker is an institution too (its certificate gets it past TLS),
    // with a generous policy: the service's own limits are what is tested.
    let (attacker_cert, attacker_key) = psi_server::ca::issue(&ca, "attacker", &ca, false)?;
    policy.push_str(
        "[institutions.attacker]\nmodes = [\"sync\", \"bucket\"]\npurposes = [\"load-test\"]\nrate_per_second = 1000000\ndaily_cap = 1000000000\nmax_batch = 4096\n",
    );
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
        audit_db: audit_db.clone().into(),
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
    let first = sessions.first().context("no institutions")?;
    let client = psi_core::Client::new(
        psi_core::Mode::Voprf,
        psi_core::PublicKey::from_bytes(&first.info().public_key)?,
    );
    let inputs: Vec<Vec<u8>> = (0..4096u32).map(|i| i.to_be_bytes().to_vec()).collect();
    let (_, blinded) =
        client.blind(&inputs, psi_core::Blinding::Additive, &mut rand_core::OsRng)?;
    let target = attack::Target {
        addr: running.local_addr,
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
    let _ = stop_tx.send(true);
    let tally = attacker.await.context("attacker task")??;
    running.shutdown().await?;

    let mut all: Vec<Duration> = results.iter().flat_map(|r| r.0.iter().copied()).collect();
    let errors: u64 = results.iter().map(|r| r.1).sum();
    all.sort();
    let v = psi_server::audit::verify(&audit_db).context("verifying the audit trail")?;
    let requests = all.len() as u64 + errors;
    let honest_records: u64 = {
        let mut out = Vec::new();
        psi_server::audit::export(
            &audit_db,
            &psi_server::audit::ExportFilter::default(),
            psi_server::audit::Format::Csv,
            &mut out,
        )?;
        csv::Reader::from_reader(out.as_slice())
            .records()
            .filter_map(Result::ok)
            .filter(|r| r.get(2).is_some_and(|i| i.starts_with("inst-")))
            .count() as u64
    };
    let report = serde_json::json!({
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
