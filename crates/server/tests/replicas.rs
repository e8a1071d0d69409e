//! Several replicas as one service: one audit trail and one set of quotas in
//! a real PostgreSQL server, and three `psi-server` processes behind a real
//! load balancer (haproxy: HTTP/2 to the backends, gRPC health checks), one
//! of them killed with SIGKILL mid-batch and started again. Where PostgreSQL
//! or haproxy cannot run, a test prints why and passes without running.

// Integration tests: a failed unwrap, expect or index is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use psi_client::check::{check, CheckOutcome};
use psi_client::{ConnectOptions, QueryMode, Session};
use psi_server::registry::source::Source;
use psi_server::serving::audit::{self, AuditLog, AuditStore, Entry, ExportFilter, Format};
use psi_server::serving::policy::{Enforcer, Policy};
use psi_server::tools::synth::Generator;
use psi_testbed::{
    free_port, start_postgres, wait_for, Balancing, Durability, Haproxy, Postgres, Process,
};

const PURPOSE: &str = "kyc-onboarding";

fn postgres_or_skip(test: &str) -> Option<Postgres> {
    match start_postgres(Durability::Volatile) {
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

/// `psi-server serve` on fixed ports (so it can be restarted on them),
/// reading `data`, writing the audit trail to `audit`.
fn replica(data: &Path, (port, admin): (u16, u16), audit: &str, log: PathBuf) -> Process {
    let args = [
        "serve",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--data-dir",
        &data.display().to_string(),
        "--audit-db",
        audit,
        "--reload-interval-ms",
        "500",
        "--admin-listen",
        &format!("127.0.0.1:{admin}"),
    ]
    .map(String::from)
    .to_vec();
    Process::start(Path::new(env!("CARGO_BIN_EXE_psi-server")), args, log)
}

fn haproxy_or_skip(test: &str, dir: &Path, replicas: &[(u16, u16)]) -> Option<Haproxy> {
    match Haproxy::start(dir, Balancing::Http2, replicas) {
        Ok(h) => Some(h),
        Err(why) => {
            eprintln!("{test}: skipped: haproxy cannot run here: {why}");
            None
        }
    }
}

#[test]
fn three_replicas_behind_haproxy_survive_a_kill_9() {
    const TEST: &str = "three_replicas_behind_haproxy_survive_a_kill_9";
    let Some(pg) = postgres_or_skip(TEST) else {
        return;
    };
    // A registry of 5000 synthetic people, one data directory shared by the replicas.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let people: Vec<_> = Generator::new(23, psi_core::CivilDate::today())
        .unwrap()
        .take(6000)
        .collect();
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
    let mut replicas: Vec<Process> = ports
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            replica(
                &data,
                p,
                &pg.url,
                root.join(format!("replica-{}.log", i + 1)),
            )
        })
        .collect();
    let Some(balancer) = haproxy_or_skip(TEST, root, &ports) else {
        return;
    };
    balancer.wait_all_up(3, Duration::from_secs(60));

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
    let url = format!("http://127.0.0.1:{}", balancer.front);
    let options = |cache: &str| ConnectOptions {
        server: url.clone(),
        pin_key: None,
        pin_exact: false,
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
            balancer
                .status()
                .get(1)
                .is_some_and(|s| s.starts_with("DOWN"))
        },
    );
    // ... and back in once it is started again.
    std::thread::sleep(Duration::from_millis(500));
    replicas[1].spawn();
    balancer.wait_all_up(3, Duration::from_secs(60));

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

/// Two replicas read one data directory and switch versions on their own
/// schedule: one reloads every 500 ms, the other not until it restarts.
/// Through the balancer (HTTP/2, per-request round robin) a client's
/// requests alternate between them across an update and then a key
/// rotation, as single checks and as batches. Nothing fails; a row the
/// update did not touch gets its one right answer every time; a changed row
/// gets the answer of the version that served it (both are seen); once the
/// lagging replica restarts, every row gets the new version's answer.
#[test]
fn replicas_at_different_versions_answer_right_through_an_update_and_a_rotation() {
    const TEST: &str =
        "replicas_at_different_versions_answer_right_through_an_update_and_a_rotation";
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let people: Vec<_> = Generator::new(41, psi_core::CivilDate::today())
        .unwrap()
        .take(2600)
        .collect();
    let (members, strangers) = people.split_at(2000);
    let write_csv = |path: &Path, rows: &[psi_server::tools::synth::Person]| {
        let mut w = csv::Writer::from_path(path).unwrap();
        w.write_record(["name", "id"]).unwrap();
        for p in rows {
            w.write_record([p.name.as_str(), p.id.as_str()]).unwrap();
        }
        w.flush().unwrap();
    };
    let registry = root.join("registry.csv");
    write_csv(&registry, members);
    let data = root.join("data");
    psi_server::registry::init(&Source::csv(&registry), &data, false).unwrap();

    let ports: Vec<(u16, u16)> = (0..2).map(|_| (free_port(), free_port())).collect();
    let serve = |i: usize, reload_ms: &str| {
        let (port, admin) = ports[i];
        let args = [
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin-listen",
            &format!("127.0.0.1:{admin}"),
            "--data-dir",
            &data.display().to_string(),
            "--audit-db",
            &root.join(format!("audit-{i}.sqlite")).display().to_string(),
            "--reload-interval-ms",
            reload_ms,
        ]
        .map(String::from)
        .to_vec();
        Process::start(
            Path::new(env!("CARGO_BIN_EXE_psi-server")),
            args,
            root.join(format!("replica-{i}.log")),
        )
    };
    let mut lagging = serve(0, "3600000");
    let _prompt = serve(1, "500");
    let Some(balancer) = haproxy_or_skip(TEST, root, &ports) else {
        return;
    };
    balancer.wait_all_up(2, Duration::from_secs(60));

    let rt = runtime();
    let connect = |server: String, cache: &str| {
        rt.block_on(Session::connect_when_ready(
            ConnectOptions {
                server,
                pin_key: None,
                pin_exact: false,
                cache_dir: root.join(cache),
                blinding: psi_core::Blinding::Additive,
                concurrency: 2,
                tls: None,
                purpose: PURPOSE.into(),
            },
            Duration::from_secs(30),
        ))
        .unwrap()
    };
    let front = format!("http://127.0.0.1:{}", balancer.front);
    let bucket = connect(front.clone(), "bucket-cache");
    let sync = connect(front.clone(), "sync-cache");
    let prompt_info = |what: &str, done: &dyn Fn(&psi_proto::v1::ServerInfo) -> bool| {
        wait_for(what, Duration::from_secs(30), || {
            done(connect(format!("http://127.0.0.1:{}", ports[1].0), "probe-cache").info())
        });
    };

    // The update: 100 members leave, 100 strangers join.
    let (leaving, staying) = members.split_at(100);
    let (joining, never) = strangers.split_at(100);
    let removed = root.join("remove.csv");
    let added = root.join("add.csv");
    write_csv(&removed, leaving);
    write_csv(&added, joining);
    psi_server::registry::update(
        Some(&Source::csv(&added)),
        Some(&Source::csv(&removed)),
        &data,
        false,
    )
    .unwrap();
    prompt_info("the prompt replica to load version 2", &|i| {
        i.registry_version == 2
    });

    // (name, id, answer at version 1, answer at version 2)
    let rows: Vec<(&str, &str, bool, bool)> = leaving
        .iter()
        .take(40)
        .map(|p| (p.name.as_str(), p.id.as_str(), true, false))
        .chain(
            joining
                .iter()
                .take(40)
                .map(|p| (p.name.as_str(), p.id.as_str(), false, true)),
        )
        .chain(
            staying
                .iter()
                .take(40)
                .map(|p| (p.name.as_str(), p.id.as_str(), true, true)),
        )
        .chain(
            never
                .iter()
                .take(40)
                .map(|p| (p.name.as_str(), p.id.as_str(), false, false)),
        )
        .collect();
    let outcome = |found: bool| {
        if found {
            CheckOutcome::Match
        } else {
            CheckOutcome::NoMatch
        }
    };
    let pairs: Vec<(&str, &str)> = rows.iter().map(|r| (r.0, r.1)).collect();
    // Every row through both modes, as single checks or as a batch of small
    // chunks: `exact` demands the version-2 answer.
    let run = |phase: &str, exact: bool, single: bool| {
        let mut seen_old = 0;
        let mut seen_new = 0;
        for (session, mode) in [(&bucket, QueryMode::Bucket), (&sync, QueryMode::Sync)] {
            let answers: Vec<CheckOutcome> = if single {
                rows.iter()
                    .map(|(name, id, _, _)| {
                        rt.block_on(check(session, name, id, mode))
                            .unwrap_or_else(|e| panic!("{phase}, {mode:?}: a check failed: {e:#}"))
                    })
                    .collect()
            } else {
                let opts = psi_client::batch::PairOptions {
                    mode,
                    chunk_rows: 8,
                    ..Default::default()
                };
                rt.block_on(psi_client::batch::answer_pairs(session, &pairs, &opts))
                    .unwrap_or_else(|e| panic!("{phase}, {mode:?}: the batch failed: {e:#}"))
                    .0
            };
            for (got, (_, _, v1, v2)) in answers.into_iter().zip(&rows) {
                if got == outcome(*v2) {
                    seen_new += usize::from(v1 != v2);
                } else {
                    assert!(
                        !exact && got == outcome(*v1),
                        "{phase}, {mode:?}: {got:?} for a row that is {v1} at version 1 and {v2} at version 2"
                    );
                    seen_old += 1;
                }
            }
        }
        (seen_old, seen_new)
    };

    let (old, new) = run("versions 1 and 2 served", false, true);
    assert!(
        old > 0 && new > 0,
        "both replicas answered changed rows: {old} old answers, {new} new"
    );

    // A key rotation: the prompt replica serves epoch 2, the lagging one epoch 1.
    psi_server::registry::rotate_key(&data, Duration::from_secs(3600), false).unwrap();
    prompt_info("the prompt replica to load key epoch 2", &|i| {
        i.key_epoch == 2
    });
    run("key epochs 1 and 2 served", false, false);
    // A single check from a session of the old epoch follows the rotation.
    let (name, id, _, v2) = rows[rows.len() - 1];
    assert_eq!(
        rt.block_on(check(&bucket, name, id, QueryMode::Bucket))
            .unwrap(),
        outcome(v2)
    );

    // The lagging replica restarts and loads what is published.
    lagging.terminate();
    lagging.spawn();
    balancer.wait_all_up(2, Duration::from_secs(60));
    let (old, _) = run("both replicas at version 2", true, false);
    assert_eq!(old, 0);
}

/// A database that accepts connections and never answers (a hung server, a
/// black-holed network) does not hang start-up: the connection attempt gives
/// up after the default `connect_timeout` of 5 s, naming the reason.
#[test]
fn an_unresponsive_database_is_given_up_on_after_the_connect_timeout() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let held = std::thread::spawn(move || {
        // Accept and hold the connections, answering nothing.
        silent.incoming().take(2).collect::<Vec<_>>()
    });
    let url = format!("postgres://psi@127.0.0.1:{port}/postgres");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(AuditLog::open(AuditStore::parse(&url)).map(|_| ()));
    });
    let outcome = rx
        .recv_timeout(psi_pg::DEFAULT_CONNECT_TIMEOUT * 6)
        .expect("the connection attempt gave up");
    let err = format!("{:#}", outcome.unwrap_err());
    assert!(
        err.contains("timed out") || err.contains("timeout"),
        "{err}"
    );
    assert!(
        !err.contains(&port.to_string()),
        "no address in the error: {err}"
    );
    drop(held);
}

/// A serving replica's statements are bounded (`statement_timeout`, 10 s by
/// default, here 300 ms from the URL): an append that cannot get the chain
/// because another session holds it fails (the request is refused, the
/// client retries) instead of waiting forever; once the chain is free,
/// appends go on and the chain verifies.
#[test]
fn an_append_waiting_too_long_for_the_chain_fails_and_the_next_one_succeeds() {
    let Some(pg) = postgres_or_skip(
        "an_append_waiting_too_long_for_the_chain_fails_and_the_next_one_succeeds",
    ) else {
        return;
    };
    let bounded = format!("{}?options=-c%20statement_timeout%3D300", pg.url);
    let store = AuditStore::parse(&bounded);
    let log = AuditLog::open(&store).unwrap();
    let rt = runtime();
    let entry = || Entry::now("bank-a", "kyc", "BucketQuery", "bucket");
    assert_eq!(rt.block_on(log.append(entry())).unwrap(), 1);

    // Another session (a stuck replica, an operator's open transaction) holds the chain.
    let mut holder = postgres::Client::connect(&pg.url, postgres::NoTls).unwrap();
    holder
        .execute("SELECT pg_advisory_lock(x'7073696175646974'::bigint)", &[])
        .unwrap();
    let err = rt.block_on(log.append(entry())).unwrap_err().to_string();
    assert!(err.contains("statement timeout"), "{err}");
    holder
        .execute(
            "SELECT pg_advisory_unlock(x'7073696175646974'::bigint)",
            &[],
        )
        .unwrap();
    assert_eq!(rt.block_on(log.append(entry())).unwrap(), 2);
    assert_eq!(audit::verify(&store).unwrap().records, 2);
}

/// Behind haproxy in TCP mode every connection comes from the balancer's
/// address; with its PROXY protocol v2 header trusted, the server counts
/// and limits connections by the client's own address: more clients than
/// the per-address limit all get in, one address still gets only its share.
#[test]
fn behind_a_trusted_balancer_connections_are_limited_by_the_clients_address() {
    const TEST: &str = "behind_a_trusted_balancer_connections_are_limited_by_the_clients_address";
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let registry = root.join("registry.csv");
    let mut text = String::from("name,id\n");
    for p in Generator::new(9, psi_core::CivilDate::today())
        .unwrap()
        .take(50)
    {
        text.push_str(&format!("{},{}\n", p.name, p.id));
    }
    std::fs::write(&registry, text).unwrap();
    let data = root.join("data");
    psi_server::registry::init(&Source::csv(&registry), &data, false).unwrap();
    let (port, admin) = (psi_testbed::free_port(), psi_testbed::free_port());
    let args = [
        "serve",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--data-dir",
        &data.display().to_string(),
        "--admin-listen",
        &format!("127.0.0.1:{admin}"),
        "--max-connections-per-peer",
        "4",
        "--trusted-proxies",
        "127.0.0.1",
    ]
    .map(String::from)
    .to_vec();
    let _server = Process::start(
        Path::new(env!("CARGO_BIN_EXE_psi-server")),
        args,
        root.join("server.log"),
    );
    let balancer = match Haproxy::start(root, Balancing::TcpProxyV2, &[(port, admin)]) {
        Ok(h) => h,
        Err(why) => {
            eprintln!("{TEST}: skipped: haproxy cannot run here: {why}");
            return;
        }
    };
    balancer.wait_all_up(1, Duration::from_secs(60));
    let metric = |name: &str| -> f64 {
        psi_testbed::http_get(admin, "/metrics")
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with(name))
                    .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            })
            .unwrap_or(0.0)
    };
    let rt = runtime();
    let front = balancer.front;
    // Ten clients with addresses of their own (127.0.0.10 .. 19), one
    // connection each, and one client (127.0.0.2) with eight.
    let connect_from = |source: [u8; 4]| async move {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket
            .bind(std::net::SocketAddr::from((source, 0)))
            .unwrap();
        socket
            .connect(std::net::SocketAddr::from(([127, 0, 0, 1], front)))
            .await
            .unwrap()
    };
    let held = rt.block_on(async {
        let mut held = Vec::new();
        for last in 10..20u8 {
            held.push(connect_from([127, 0, 0, last]).await);
        }
        for _ in 0..8 {
            held.push(connect_from([127, 0, 0, 2]).await);
        }
        held
    });
    psi_testbed::wait_for("the connections counted", Duration::from_secs(20), || {
        metric("psi_connections ") >= 14.0
    });
    std::thread::sleep(Duration::from_millis(500));
    // 10 + 4 admitted (more than the per-address limit in all), the other
    // 4 of 127.0.0.2 refused by its own limit.
    assert_eq!(metric("psi_connections "), 14.0);
    assert_eq!(
        metric(r#"psi_connections_refused_total{reason="max_connections_per_peer"}"#),
        4.0
    );
    drop(held);
}
