//! Several replicas as one service: one audit trail and one set of quotas in
//! a real PostgreSQL server, and three `psi-server` processes behind a real
//! load balancer (haproxy: HTTP/2 to the backends, gRPC health checks), one
//! of them killed with SIGKILL mid-batch and started again. Where PostgreSQL
//! or haproxy cannot run, a test prints why and passes without running.

mod support;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use psi_client::check::{check, CheckOutcome};
use psi_client::{ConnectOptions, QueryMode, Session};
use psi_server::audit::{self, AuditLog, AuditStore, Entry, ExportFilter, Format};
use psi_server::policy::{Enforcer, Policy};
use psi_server::registry::today;
use psi_server::source::Source;
use psi_server::synth::Generator;

const PURPOSE: &str = "kyc-onboarding";

fn postgres_or_skip(test: &str) -> Option<support::Postgres> {
    match support::start_postgres() {
        Ok(pg) => Some(pg),
        Err(why) => {
            eprintln!("{test}: skipped: PostgreSQL cannot run here: {why}");
            None
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn three_replicas_append_one_chain_to_postgres() {
    let Some(pg) = postgres_or_skip("three_replicas_append_one_chain_to_postgres") else {
        return;
    };
    let store = AuditStore::parse(&pg.url);
    // Three writers, each with its own connection and group commit, as three
    // replicas would have.
    let logs: Vec<AuditLog> = (0..3).map(|_| AuditLog::open(&store).unwrap()).collect();
    let rt = runtime();
    let mut seqs: Vec<i64> = rt.block_on(async {
        let appends = (0..900).map(|i| {
            let log = logs[i % 3].clone();
            let mut e = Entry::now(
                ["bank-a", "bank-b", "bank-c"][i % 3],
                "kyc",
                "Evaluate",
                "sync",
            );
            e.elements = i as u64;
            async move { log.append(e).await.unwrap() }
        });
        futures::future::join_all(appends).await
    });
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        (1..=900).collect::<Vec<_>>(),
        "one chain, no gaps, no repeats"
    );
    let v = audit::verify(&store).unwrap();
    assert_eq!(v.records, 900);

    let mut out = Vec::new();
    let filter = ExportFilter {
        institution: Some("bank-b".into()),
        ..ExportFilter::default()
    };
    assert_eq!(
        audit::export(&store, &filter, Format::Json, &mut out).unwrap(),
        300
    );

    // A record edited in the database is found, as in SQLite.
    let mut client = postgres::Client::connect(&pg.url, postgres::NoTls).unwrap();
    client
        .execute(
            "UPDATE audit SET elements = elements + 1 WHERE seq = 100",
            &[],
        )
        .unwrap();
    let err = audit::verify(&store).unwrap_err().to_string();
    assert!(err.contains("record 100: its content was changed"), "{err}");
    // So is one that a replica tries to extend: a damaged end is refused.
    client
        .execute(
            "UPDATE audit SET elements = elements - 1 WHERE seq = 100",
            &[],
        )
        .unwrap();
    client
        .execute("UPDATE audit SET outcome = 'ok!' WHERE seq = 900", &[])
        .unwrap();
    let err = format!("{:#}", AuditLog::open(&store).unwrap_err());
    assert!(err.contains("last record (900) was changed"), "{err}");
    assert!(
        !err.contains("127.0.0.1:") || !err.contains("psi@"),
        "no credentials: {err}"
    );
    client
        .execute("UPDATE audit SET outcome = 'ok' WHERE seq = 900", &[])
        .unwrap();

    // Pruning everything leaves an anchor the next record continues from.
    let now = SystemTime::now() + Duration::from_secs(1);
    assert_eq!(audit::prune(&store, now, Duration::ZERO, now).unwrap(), 900);
    let log = AuditLog::open(&store).unwrap();
    let seq = rt
        .block_on(log.append(Entry::now("bank-a", "kyc", "Evaluate", "sync")))
        .unwrap();
    assert_eq!(seq, 901);
    assert_eq!(audit::verify(&store).unwrap().records, 1);
}

#[test]
fn a_daily_cap_holds_across_replicas() {
    let Some(pg) = postgres_or_skip("a_daily_cap_holds_across_replicas") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    std::fs::write(
        &path,
        "[institutions.bank-001]\nmodes = [\"sync\", \"bucket\"]\npurposes = [\"kyc\"]\nrate_per_second = 1000000000\ndaily_cap = 1000\nmax_batch = 100\n",
    )
    .unwrap();
    let policy = Policy::load(&path).unwrap();
    let replicas: Vec<Arc<Enforcer>> = (0..3)
        .map(|_| Arc::new(Enforcer::shared(Some(policy.clone()), &pg.url).unwrap()))
        .collect();
    let admitted = Arc::new(AtomicU64::new(0));
    runtime().block_on(async {
        // Nine callers over three replicas, ten elements a request, until refused.
        let callers = (0..9).map(|i| {
            let enforcer = Arc::clone(&replicas[i % 3]);
            let admitted = Arc::clone(&admitted);
            tokio::spawn(async move {
                loop {
                    match enforcer.admit("bank-001", "sync", "kyc", 10).await {
                        Ok(()) => {
                            admitted.fetch_add(10, Ordering::Relaxed);
                        }
                        Err(e) => {
                            assert!(e.to_string().contains("daily cap"), "{e}");
                            break;
                        }
                    }
                }
            })
        });
        for c in futures::future::join_all(callers).await {
            c.unwrap();
        }
    });
    assert_eq!(
        admitted.load(Ordering::Relaxed),
        1000,
        "a cap of 1000 across three replicas admits exactly 1000"
    );

    // The rate holds across replicas too: 200 per second, burst 200.
    std::fs::write(
        &path,
        "[institutions.bank-002]\nmodes = [\"sync\"]\npurposes = [\"kyc\"]\nrate_per_second = 200\ndaily_cap = 1000000\nmax_batch = 100\n",
    )
    .unwrap();
    let policy = Policy::load(&path).unwrap();
    for r in &replicas {
        r.replace(policy.clone());
    }
    let started = Instant::now();
    let mut taken = 0u64;
    runtime().block_on(async {
        for i in 0..30 {
            if replicas[i % 3]
                .admit("bank-002", "sync", "kyc", 50)
                .await
                .is_ok()
            {
                taken += 50;
            }
        }
    });
    let allowed = 200.0 + started.elapsed().as_secs_f64() * 200.0;
    assert!(
        (taken as f64) <= allowed + 50.0,
        "{taken} elements admitted; the rate allows {allowed:.0}"
    );
    assert!(taken >= 200, "the burst is available: {taken}");
}

/// A `psi-server serve` process on a fixed port (so it can be restarted on it).
struct Replica {
    child: Option<Child>,
    port: u16,
    admin: u16,
    data: PathBuf,
    audit: String,
    log: PathBuf,
}

impl Replica {
    fn start(data: &Path, (port, admin): (u16, u16), audit: &str, log: PathBuf) -> Self {
        let mut r = Self {
            child: None,
            port,
            admin,
            data: data.to_path_buf(),
            audit: audit.to_string(),
            log,
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_psi-server"))
            .args(["serve", "--listen", &format!("127.0.0.1:{}", self.port)])
            .arg("--data-dir")
            .arg(&self.data)
            .args(["--audit-db", &self.audit, "--reload-interval-ms", "500"])
            .args(["--admin-listen", &format!("127.0.0.1:{}", self.admin)])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn kill_9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-9", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill_9();
    }
}

struct Haproxy(Child);

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The balancer: HTTP/2 in, HTTP/2 to the replicas, each checked every
/// 200 ms (out after two failures, back after two successes) at its admin
/// port's `/ready`, which is 200 exactly when its gRPC health status for
/// `psi.v1.Match` is SERVING (haproxy 2.6 cannot send the binary body of a
/// gRPC health request).
fn haproxy_config(front: u16, stats: u16, replicas: &[(u16, u16)]) -> String {
    let servers: String = replicas
        .iter()
        .enumerate()
        .map(|(i, (port, admin))| {
            format!("  server r{} 127.0.0.1:{port} check port {admin}\n", i + 1)
        })
        .collect();
    format!(
        "global
  maxconn 2000
defaults
  mode http
  timeout connect 2s
  timeout client 120s
  timeout server 120s
frontend grpc
  bind 127.0.0.1:{front} proto h2
  default_backend replicas
backend replicas
  balance roundrobin
  retry-on conn-failure empty-response response-timeout
  option httpchk GET /ready
  http-check expect status 200
  default-server proto h2 inter 200ms fall 2 rise 2
{servers}listen stats
  bind 127.0.0.1:{stats}
  stats enable
  stats uri /stats
"
    )
}

/// Each replica's status in haproxy (`UP`, `DOWN`, ...), from its CSV stats.
fn balancer_status(stats: u16) -> Vec<String> {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", stats)) else {
        return Vec::new();
    };
    let _ = s.write_all(b"GET /stats;csv HTTP/1.0\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let mut status = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(',').collect();
        if fields.first() == Some(&"replicas") && fields.get(1).is_some_and(|f| f.starts_with('r'))
        {
            status.push(fields.get(17).unwrap_or(&"?").to_string());
        }
    }
    status
}

fn wait_for(what: &str, patience: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < patience,
            "waited {patience:?} for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn three_replicas_behind_haproxy_survive_a_kill_9() {
    const TEST: &str = "three_replicas_behind_haproxy_survive_a_kill_9";
    let Some(pg) = postgres_or_skip(TEST) else {
        return;
    };
    let haproxy_bin = ["/usr/sbin/haproxy", "/usr/local/sbin/haproxy"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    let Some(haproxy_bin) = haproxy_bin else {
        eprintln!(
            "{TEST}: skipped: haproxy is not installed (.ci/run installs Debian's haproxy package)"
        );
        return;
    };

    // A registry of 5000 synthetic people, one data directory shared by the replicas.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let people: Vec<_> = Generator::new(23, today()).unwrap().take(6000).collect();
    let (members, strangers) = people.split_at(5000);
    let csv = root.join("registry.csv");
    let mut w = csv::Writer::from_path(&csv).unwrap();
    w.write_record(["name", "id"]).unwrap();
    for p in members {
        w.write_record([p.name.as_str(), p.id.as_str()]).unwrap();
    }
    w.flush().unwrap();
    let data = root.join("data");
    psi_server::registry::init(&Source::csv(&csv), &data, false).unwrap();

    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
    let mut replicas: Vec<Replica> = ports
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            Replica::start(
                &data,
                p,
                &pg.url,
                root.join(format!("replica-{}.log", i + 1)),
            )
        })
        .collect();
    let (front, stats) = (free_port(), free_port());
    let config = root.join("haproxy.cfg");
    std::fs::write(&config, haproxy_config(front, stats, &ports)).unwrap();
    let validated = Command::new(&haproxy_bin)
        .args(["-c", "-f"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        validated.status.success(),
        "haproxy -c: {}",
        String::from_utf8_lossy(&validated.stderr)
    );
    let _balancer = Haproxy(
        Command::new(&haproxy_bin)
            .args(["-db", "-f"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(root.join("haproxy.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_for(
        "haproxy to see three replicas up",
        Duration::from_secs(60),
        || balancer_status(stats) == ["UP", "UP", "UP"],
    );

    // 10^5 rows: members and strangers, each answer known.
    let rows: Vec<(String, String, bool)> = (0..100_000)
        .map(|i| {
            if i % 3 == 2 {
                let p = &strangers[i % strangers.len()];
                (p.name.clone(), p.id.clone(), false)
            } else {
                let p = &members[i % members.len()];
                (p.name.clone(), p.id.clone(), true)
            }
        })
        .collect();
    let pairs: Vec<(String, String)> = rows
        .iter()
        .map(|(n, i, _)| (n.clone(), i.clone()))
        .collect();
    let url = format!("http://127.0.0.1:{front}");
    let options = |cache: &str| ConnectOptions {
        server: url.clone(),
        pin_key: None,
        cache_dir: root.join(cache),
        blinding: psi_core::Blinding::Additive,
        concurrency: 4,
        tls: None,
        purpose: PURPOSE.into(),
    };

    let rt = runtime();
    let batch_session = rt
        .block_on(Session::connect_when_ready(
            options("batch-cache"),
            Duration::from_secs(30),
        ))
        .unwrap();
    let checks_session = rt
        .block_on(Session::connect_when_ready(
            options("check-cache"),
            Duration::from_secs(30),
        ))
        .unwrap();
    let stop_checks = Arc::new(std::sync::atomic::AtomicBool::new(false));

    let batch = rt.spawn({
        let session = batch_session.clone();
        async move {
            let opts = psi_client::batch::PairOptions {
                mode: QueryMode::Bucket,
                chunk_rows: 1000,
                ..Default::default()
            };
            psi_client::batch::answer_pairs(&session, &pairs, &opts).await
        }
    });
    let singles = rt.spawn({
        let stop = Arc::clone(&stop_checks);
        let rows: Vec<_> = rows.iter().step_by(997).cloned().collect();
        async move {
            let mut answered = 0u64;
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let (name, id, member) = &rows[i % rows.len()];
                let got = check(&checks_session, name, id, QueryMode::Bucket).await?;
                let want = if *member {
                    CheckOutcome::Match
                } else {
                    CheckOutcome::NoMatch
                };
                anyhow::ensure!(got == want, "single check {i}: {got:?}, expected {want:?}");
                answered += 1;
                i += 1;
            }
            Ok::<_, anyhow::Error>(answered)
        }
    });

    // Kill replica 2 once the batch is under way; the balancer takes it out.
    let audited = || {
        let mut out = Vec::new();
        audit::export(
            AuditStore::parse(&pg.url),
            &ExportFilter::default(),
            Format::Csv,
            &mut out,
        )
        .unwrap()
    };
    wait_for("the batch to get going", Duration::from_secs(120), || {
        audited() >= 20
    });
    replicas[1].kill_9();
    let killed_at = audited();
    wait_for(
        "haproxy to take the dead replica out",
        Duration::from_secs(30),
        || {
            balancer_status(stats)
                .get(1)
                .is_some_and(|s| s.starts_with("DOWN"))
        },
    );
    // ... and back in once it is started again.
    std::thread::sleep(Duration::from_millis(500));
    replicas[1].spawn();
    wait_for(
        "haproxy to put the restarted replica back",
        Duration::from_secs(60),
        || balancer_status(stats) == ["UP", "UP", "UP"],
    );

    let (answers, summary) = rt.block_on(batch).unwrap().expect("every row answered");
    stop_checks.store(true, Ordering::Relaxed);
    let singles_answered = rt
        .block_on(singles)
        .unwrap()
        .expect("every single check right");
    assert_eq!(answers.len(), rows.len());
    for (i, (answer, (_, _, member))) in answers.iter().zip(&rows).enumerate() {
        let want = if *member {
            CheckOutcome::Match
        } else {
            CheckOutcome::NoMatch
        };
        assert_eq!(answer, &want, "row {i}");
    }
    assert!(
        audited() > killed_at,
        "requests were answered after the kill"
    );
    assert!(singles_answered > 0);

    // One chain, every record once; the rows' requests recorded as answered
    // once each, but for those a killed replica recorded and could not send.
    let store = AuditStore::parse(&pg.url);
    let v = audit::verify(&store).unwrap();
    let mut out = Vec::new();
    audit::export(&store, &ExportFilter::default(), Format::Csv, &mut out).unwrap();
    let mut reader = csv::Reader::from_reader(out.as_slice());
    let mut request_ids = std::collections::HashSet::new();
    let mut bucket_elements_ok = 0u64;
    for record in reader.records() {
        let r = record.unwrap();
        assert!(
            request_ids.insert(r[8].to_string()),
            "request {} recorded twice",
            &r[8]
        );
        if &r[4] == "BucketQuery" && &r[7] == "ok" {
            bucket_elements_ok += r[6].parse::<u64>().unwrap();
        }
    }
    assert_eq!(request_ids.len() as u64, v.records);
    let asked = rows.len() as u64 + singles_answered;
    assert!(
        bucket_elements_ok >= asked,
        "every row answered by an audited request: {bucket_elements_ok} < {asked}"
    );
    // At most the requests in flight on the killed replica (4 batch chunks
    // of 1000 and one single check) were recorded there and never received.
    assert!(
        bucket_elements_ok <= asked + 4 * 1000 + 1,
        "{bucket_elements_ok} elements recorded as answered for {asked} asked"
    );
    eprintln!(
        "{TEST}: {summary}; {singles_answered} single checks; {} audit records",
        v.records
    );
}
