//! Threshold mode end to end: a single-key registry split 2-of-3 (same
//! public key), three `psi-server keyholder` processes under mutual TLS, a
//! replica that holds no key, institutions answered right in sync, bucket
//! and PIR mode through the holders, with any two of the three, through a
//! holder killed with SIGKILL mid-batch, and a holder answering with a
//! wrong share named; updates encoded through the holders; no key or share
//! on the replica's disk; each holder's audit trail.

// Integration tests: a failed unwrap, expect or index is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use psi_client::batch::{answer_pairs, PairOptions};
use psi_client::check::check;
use psi_client::{ConnectOptions, QueryMode, Session};
use psi_server::keyholder::pool::{HoldersConfig, HoldersTls};
use psi_server::registry::{self, source::Source, PublishGuard};
use psi_server::serving::audit::{self, AuditStore, ExportFilter, Format};
use psi_server::serving::config::ServeConfig;
use psi_server::serving::serve;
use psi_server::tools::{ca, synth::Generator};
use psi_testbed::fixture::{queries, registered};
use psi_testbed::{free_port, wait_for, Process};
use zeroize::Zeroizing;

const PURPOSE: &str = "kyc-onboarding";

struct Holders {
    procs: Vec<Process>,
    ports: Vec<u16>,
}

fn holder_args(dir: &Path, port: u16, ca_dir: &Path) -> Vec<String> {
    [
        "keyholder",
        "serve",
        "--dir",
        &dir.display().to_string(),
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--tls-cert",
        &ca_dir.join(ca::SERVER_CERT).display().to_string(),
        "--tls-key",
        &ca_dir.join(ca::SERVER_KEY).display().to_string(),
        "--client-ca",
        &ca_dir.join(ca::CA_CERT).display().to_string(),
        "--callers",
        "replica,encoder",
        "--operators",
        "encoder",
    ]
    .into_iter()
    .map(String::from)
    .collect()
}

fn listening(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

fn start_holders(dirs: &[PathBuf], ca_dir: &Path, logs: &Path) -> Holders {
    let ports: Vec<u16> = dirs.iter().map(|_| free_port()).collect();
    let procs = dirs
        .iter()
        .zip(&ports)
        .enumerate()
        .map(|(i, (d, p))| {
            Process::start(
                Path::new(env!("CARGO_BIN_EXE_psi-server")),
                holder_args(d, *p, ca_dir),
                logs.join(format!("holder-{}.log", i + 1)),
            )
        })
        .collect();
    for p in &ports {
        wait_for("a key holder", Duration::from_secs(30), || listening(*p));
    }
    Holders { procs, ports }
}

fn link(holders: &Holders, ca_dir: &Path, who: &str) -> HoldersConfig {
    HoldersConfig {
        endpoints: holders
            .ports
            .iter()
            .enumerate()
            .map(|(i, p)| (i as u16 + 1, format!("https://127.0.0.1:{p}")))
            .collect(),
        tls: Some(HoldersTls {
            ca: std::fs::read(ca_dir.join(ca::CA_CERT)).unwrap(),
            cert: std::fs::read(ca_dir.join(format!("{who}.pem"))).unwrap(),
            key: Zeroizing::new(std::fs::read(ca_dir.join(format!("{who}.key"))).unwrap()),
        }),
        timeout: Duration::from_secs(3),
    }
}

fn write_registry(path: &Path, extra: usize) {
    let mut w = csv::Writer::from_path(path).unwrap();
    w.write_record(["name", "id"]).unwrap();
    for (name, id) in registered() {
        w.write_record([name, id]).unwrap();
    }
    for p in Generator::new(7, psi_core::CivilDate::today())
        .unwrap()
        .take(extra)
    {
        w.write_record([p.name.as_str(), p.id.as_str()]).unwrap();
    }
    w.flush().unwrap();
}

/// An Evaluate request of one (arbitrary, valid) blinded element.
fn evaluate_request(
    key_epoch: u64,
    combines_partials: bool,
) -> tonic::Request<psi_proto::v1::EvaluateRequest> {
    let element = psi_core::suite::hash_to_group(psi_core::Mode::Voprf, b"x")
        .compress()
        .to_bytes();
    let mut r = tonic::Request::new(psi_proto::v1::EvaluateRequest {
        key_epoch,
        blinded_elements: element.to_vec(),
        combines_partials,
    });
    r.metadata_mut()
        .insert(psi_proto::PURPOSE_HEADER, PURPOSE.parse().unwrap());
    r
}

/// A registry of the fixture's people and `extra` synthetic ones, encoded
/// under one key, then split 2-of-3: the data directory and the split.
fn split_registry(
    root: &Path,
    extra: usize,
) -> (PathBuf, psi_server::keyholder::split::SplitReport) {
    let data = root.join("data");
    let csv = root.join("registry.csv");
    write_registry(&csv, extra);
    registry::init_guarded(
        &Source::csv(&csv),
        &data,
        false,
        &PublishGuard::force(),
        None,
    )
    .unwrap();
    let split = psi_server::keyholder::split::split(&data, 2, 3, &root.join("holders")).unwrap();
    (data, split)
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The fixture's rows answered in `mode`: each as expected.
fn rows_right(rt: &tokio::runtime::Runtime, session: &Session, mode: QueryMode, phase: &str) {
    let qs = queries();
    let got: Vec<&'static str> = if mode == QueryMode::Pir {
        qs.iter()
            .map(|q| {
                rt.block_on(check(session, q.name, q.id, mode))
                    .unwrap_or_else(|e| panic!("{phase}, {mode:?}: {}: {e:#}", q.what))
                    .result()
            })
            .collect()
    } else {
        let pairs: Vec<(&str, &str)> = qs.iter().map(|q| (q.name, q.id)).collect();
        let opts = PairOptions {
            mode,
            chunk_rows: 5,
            ..PairOptions::default()
        };
        rt.block_on(answer_pairs(session, &pairs, &opts))
            .unwrap_or_else(|e| panic!("{phase}, {mode:?}: {e:#}"))
            .0
            .iter()
            .map(psi_client::check::CheckOutcome::result)
            .collect()
    };
    for (q, got) in qs.iter().zip(got) {
        assert_eq!(got, q.expected, "{phase}, {mode:?}: {}", q.what);
    }
}

#[test]
fn a_split_registry_is_answered_through_any_two_of_three_holders() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let data = root.join("data");
    let serving = root.join("serving");
    let ca_dir = root.join("ca");
    let csv = root.join("registry.csv");
    write_registry(&csv, 400);
    registry::init_guarded(
        &Source::csv(&csv),
        &data,
        false,
        &PublishGuard::force(),
        None,
    )
    .unwrap();
    let key_file = psi_server::store::keystore::key_path(&data, 1);
    let key_bytes = psi_server::store::keystore::load(&data, 1)
        .unwrap()
        .key
        .to_bytes();
    let pk_before = psi_server::store::public_key(&data).unwrap().1;

    // The split: same public key, the key file gone, three holder directories.
    let split = psi_server::keyholder::split::split(&data, 2, 3, &root.join("holders")).unwrap();
    assert_eq!(split.public_key_hex, pk_before.to_hex());
    assert!(
        !key_file.exists(),
        "the key file is destroyed after a split"
    );
    assert!(psi_server::keyholder::split::split(&data, 2, 3, &root.join("again")).is_err());

    ca::init(&ca_dir, &["127.0.0.1".to_string()]).unwrap();
    for who in ["replica", "encoder", "bank-a"] {
        ca::issue(&ca_dir, who, &ca_dir, false).unwrap();
    }
    let logs = root.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let mut holders = start_holders(&split.holder_dirs, &ca_dir, &logs);

    // Without the holders, the encoding side cannot encode (it has no key).
    let add = root.join("add.csv");
    {
        let mut w = csv::Writer::from_path(&add).unwrap();
        w.write_record(["name", "id"]).unwrap();
        for p in Generator::new(99, psi_core::CivilDate::today())
            .unwrap()
            .take(50)
        {
            w.write_record([p.name.as_str(), p.id.as_str()]).unwrap();
        }
        w.flush().unwrap();
    }
    let err = registry::update(Some(&Source::csv(&add)), None, &data, false).unwrap_err();
    assert!(format!("{err:#}").contains("threshold mode"), "{err:#}");
    // Through them it can: the update's records are then found.
    let encoder = link(&holders, &ca_dir, "encoder");
    let r = registry::update_with(
        Some(&Source::csv(&add)),
        None,
        &data,
        false,
        &PublishGuard::force(),
        registry::DEFAULT_COMPACT_AFTER,
        Some(&encoder),
    )
    .unwrap();
    assert_eq!(r.added, 50);
    psi_server::registry::publish::publish(&data, &serving).unwrap();

    // No file on the serving side (nor left on the encoding side) holds the
    // key or a share, or is a key or share file.
    let shares: Vec<Zeroizing<[u8; 32]>> = split
        .holder_dirs
        .iter()
        .map(|d| {
            psi_server::keyholder::share::load(d, 1, 0)
                .unwrap()
                .to_bytes()
        })
        .collect();
    for f in files(&serving).into_iter().chain(files(&data)) {
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        assert!(
            !name.ends_with(".key"),
            "{name} on the serving or encoding host"
        );
        let bytes = std::fs::read(&f).unwrap();
        for secret in std::iter::once(&key_bytes).chain(&shares) {
            assert!(
                !bytes.windows(32).any(|w| w == secret.as_slice()),
                "{} holds key material",
                f.display()
            );
        }
    }

    let rt = runtime();
    let port = free_port();
    let running = rt
        .block_on(serve::start(ServeConfig {
            listen: format!("127.0.0.1:{port}").parse().unwrap(),
            holders: Some(link(&holders, &ca_dir, "replica")),
            admin_listen: Some("127.0.0.1:0".parse().unwrap()),
            ..ServeConfig::local(&serving)
        }))
        .unwrap();
    let admin = running.admin_addr.unwrap();
    let options = |cache: &str| ConnectOptions {
        server: format!("http://127.0.0.1:{port}"),
        pin_key: Some(pk_before.to_hex()),
        pin_exact: false,
        cache_dir: root.join(cache),
        blinding: psi_core::Blinding::Additive,
        concurrency: 2,
        tls: None,
        purpose: PURPOSE.into(),
    };
    let session = rt
        .block_on(Session::connect_when_ready(
            options("cache"),
            Duration::from_secs(30),
        ))
        .unwrap();
    for mode in [QueryMode::Sync, QueryMode::Bucket, QueryMode::Pir] {
        rows_right(&rt, &session, mode, "all three holders up");
    }
    // An added record is found (its tag was made through the holders).
    let first_added = Generator::new(99, psi_core::CivilDate::today())
        .unwrap()
        .next()
        .unwrap();
    let got = rt
        .block_on(check(
            &session,
            &first_added.name,
            first_added.id.as_str(),
            QueryMode::Bucket,
        ))
        .unwrap();
    assert_eq!(got.result(), "match");

    // Any two of the three suffice: each holder down in turn.
    for down in 0..3 {
        holders.procs[down].kill_9();
        rows_right(
            &rt,
            &session,
            QueryMode::Bucket,
            &format!("holder {} down", down + 1),
        );
        holders.procs[down].spawn();
        let p = holders.ports[down];
        wait_for("a restarted key holder", Duration::from_secs(30), || {
            listening(p)
        });
    }

    // A holder killed with SIGKILL mid-batch: every row still right.
    let people: Vec<(String, String)> = Generator::new(7, psi_core::CivilDate::today())
        .unwrap()
        .take(400)
        .map(|p| (p.name, p.id.as_str().to_string()))
        .collect();
    let people: Vec<(String, String)> = people.iter().cycle().take(2000).cloned().collect();
    let (batch, finished, killed) = std::thread::scope(|s| {
        let job = s.spawn(|| {
            let opts = PairOptions {
                mode: QueryMode::Bucket,
                chunk_rows: 8,
                chunks_in_flight: 2,
                ..PairOptions::default()
            };
            let answers = rt.block_on(answer_pairs(&session, &people, &opts));
            (answers, std::time::Instant::now())
        });
        std::thread::sleep(Duration::from_millis(150));
        holders.procs[1].kill_9();
        let killed = std::time::Instant::now();
        let (answers, finished) = job.join().unwrap();
        (answers.unwrap(), finished, killed)
    });
    assert!(
        finished > killed,
        "the holder was killed while the batch ran"
    );
    assert!(
        batch.0.iter().all(|o| o.result() == "match"),
        "every registered person found through the kill"
    );
    holders.procs[1].spawn();
    let p1 = holders.ports[1];
    wait_for("a restarted key holder", Duration::from_secs(30), || {
        listening(p1)
    });

    // A holder that answers with another share (a compromised or broken
    // host) is caught by its proof and named; with another holder up, the
    // answers stay right.
    let liar_dir = root.join("liar");
    {
        let other = psi_core::ServerKey::generate(&mut rand_core::OsRng);
        let shares = psi_core::threshold::split(&other, 2, 3, &mut rand_core::OsRng).unwrap();
        let committee = psi_core::Committee::new(
            2,
            *other.public_key(),
            shares
                .iter()
                .map(psi_core::KeyShare::public_share)
                .collect(),
        )
        .unwrap();
        std::fs::create_dir_all(&liar_dir).unwrap();
        psi_server::keyholder::share::store(&liar_dir, 1, 0, &shares[0]).unwrap();
        psi_server::store::committee::store(&liar_dir, 1, &committee).unwrap();
    }
    holders.procs[0].kill_9();
    let mut liar = Process::start(
        Path::new(env!("CARGO_BIN_EXE_psi-server")),
        holder_args(&liar_dir, holders.ports[0], &ca_dir),
        logs.join("liar.log"),
    );
    let p0 = holders.ports[0];
    wait_for("the lying holder", Duration::from_secs(30), || {
        listening(p0)
    });
    rows_right(&rt, &session, QueryMode::Bucket, "holder 1 lying");
    let metrics = psi_testbed::http_get(admin.port(), "/metrics").unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("psi_holder_answers_total{holder=\"1\",outcome=\"bad_proof\"}")),
        "bad proofs counted by holder:\n{metrics}"
    );
    // With only the liar and one honest holder, nothing is answered wrong:
    // the refusal names the liar.
    // (Asked without the client's retries of UNAVAILABLE.)
    holders.procs[2].kill_9();
    let status = rt.block_on(async {
        let mut raw =
            psi_proto::v1::match_client::MatchClient::connect(format!("http://127.0.0.1:{port}"))
                .await
                .unwrap();
        raw.evaluate(evaluate_request(1, true)).await.unwrap_err()
    });
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(
        status.message().contains("holder 1") && status.message().contains("does not verify"),
        "{}",
        status.message()
    );
    liar.kill_9();

    rt.block_on(running.shutdown()).unwrap();
    for p in &mut holders.procs {
        p.terminate();
    }
    // Each holder's audit trail: an intact chain, a record for every
    // evaluation it answered, on behalf of the institution or the encoder.
    let answered = |holder: u16| -> u64 {
        metrics
            .lines()
            .filter(|l| {
                l.starts_with(&format!(
                    "psi_holder_answers_total{{holder=\"{holder}\",outcome=\"ok\"}}"
                ))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    for (i, dir) in split.holder_dirs.iter().enumerate() {
        let store = AuditStore::parse(
            &dir.join(psi_server::keyholder::serve::HOLDER_AUDIT_FILE)
                .display()
                .to_string(),
        );
        audit::verify(&store).unwrap();
        let mut out = Vec::new();
        audit::export(&store, &ExportFilter::default(), Format::Json, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let ok = text
            .lines()
            .filter(|l| l.contains("\"outcome\":\"ok\""))
            .count() as u64;
        assert!(
            ok >= answered(i as u16 + 1) && ok > 0,
            "holder {}: {ok} records, {} answers used",
            i + 1,
            answered(i as u16 + 1)
        );
        assert!(
            text.contains("\"institution\":\"local\"")
                || text.contains("\"institution\":\"encoding\"")
        );
    }
}

#[test]
fn a_replica_without_holders_and_an_old_client_are_refused_saying_why() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let (data, _) = split_registry(root, 10);
    let rt = runtime();
    let running = rt
        .block_on(serve::start(ServeConfig::local(&data)))
        .unwrap();
    let url = format!("http://{}", running.local_addr);
    rt.block_on(async {
        let mut raw = psi_proto::v1::match_client::MatchClient::connect(url.clone())
            .await
            .unwrap();
        let info = loop {
            match raw
                .get_server_info(psi_proto::v1::GetServerInfoRequest {})
                .await
            {
                Ok(i) => break i.into_inner(),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let t = info.threshold.expect("ServerInfo announces threshold mode");
        assert_eq!((t.threshold, t.holders.len()), (2, 3));
        let ask = |combines_partials| evaluate_request(info.key_epoch, combines_partials);
        // A client that does not combine partials: refused, saying so.
        let old = raw.evaluate(ask(false)).await.unwrap_err();
        assert_eq!(old.code(), tonic::Code::FailedPrecondition);
        assert!(
            old.message().contains("threshold mode"),
            "{}",
            old.message()
        );
        // A replica with no holders configured: unavailable, saying so.
        let none = raw.evaluate(ask(true)).await.unwrap_err();
        assert_eq!(none.code(), tonic::Code::Unavailable);
        assert!(none.message().contains("--holders"), "{}", none.message());
    });
    rt.block_on(running.shutdown()).unwrap();
}

#[test]
fn holders_generate_refresh_rotate_and_retire_without_a_dealer() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let data = root.join("data");
    let serving = root.join("serving");
    let ca_dir = root.join("ca");
    ca::init(&ca_dir, &["127.0.0.1".to_string()]).unwrap();
    for who in ["replica", "encoder"] {
        ca::issue(&ca_dir, who, &ca_dir, false).unwrap();
    }
    // Three holders, each with its identity, each told the others'.
    let dirs: Vec<PathBuf> = (1..=3).map(|i| root.join(format!("holder-{i}"))).collect();
    let identities: Vec<psi_core::PublicKey> = dirs
        .iter()
        .map(|d| {
            std::fs::create_dir_all(d).unwrap();
            psi_server::keyholder::identity::create(d).unwrap()
        })
        .collect();
    for d in &dirs {
        psi_server::keyholder::identity::store_holders(
            &d.join(psi_server::keyholder::identity::HOLDERS_FILE),
            &identities,
        )
        .unwrap();
    }
    let logs = root.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let holders = start_holders(&dirs, &ca_dir, &logs);
    let encoder = link(&holders, &ca_dir, "encoder");
    let rt = runtime();

    // Epoch 1 made by the holders: no key anywhere, shares on the holders.
    let first = rt
        .block_on(psi_server::keyholder::ceremony::new_deployment(
            &data, 2, &encoder,
        ))
        .unwrap();
    let pk1 = *first.committee.public_key();
    let replica = link(&holders, &ca_dir, "replica");
    let csv = root.join("registry.csv");
    write_registry(&csv, 200);
    {
        let (data, csv, encoder) = (data.clone(), csv.clone(), encoder.clone());
        rt.block_on(rt.spawn_blocking(move || {
            registry::init_guarded(
                &Source::csv(&csv),
                &data,
                false,
                &PublishGuard::force(),
                Some(&encoder),
            )
        }))
        .unwrap()
        .unwrap();
    }
    assert!(files(&data)
        .iter()
        .all(|f| !f.to_string_lossy().ends_with(".key")));
    // A replica is not an operator: it runs no ceremony.
    let refused = rt
        .block_on(psi_server::keyholder::ceremony::refresh(&data, &replica))
        .unwrap_err();
    assert!(
        format!("{refused:#}").contains("--operators"),
        "{refused:#}"
    );
    psi_server::registry::publish::publish(&data, &serving).unwrap();
    let port = free_port();
    let running = rt
        .block_on(serve::start(ServeConfig {
            listen: format!("127.0.0.1:{port}").parse().unwrap(),
            holders: Some(replica.clone()),
            reload_interval: Duration::from_millis(50),
            ..ServeConfig::local(&serving)
        }))
        .unwrap();
    let options = |cache: &str| ConnectOptions {
        server: format!("http://127.0.0.1:{port}"),
        pin_key: Some(pk1.to_hex()),
        pin_exact: false,
        cache_dir: root.join(cache),
        blinding: psi_core::Blinding::Additive,
        concurrency: 2,
        tls: None,
        purpose: PURPOSE.into(),
    };
    let session = rt
        .block_on(Session::connect_when_ready(
            options("cache"),
            Duration::from_secs(30),
        ))
        .unwrap();
    rows_right(&rt, &session, QueryMode::Bucket, "epoch 1");
    rows_right(&rt, &session, QueryMode::Sync, "epoch 1");

    // A refresh: new shares, same key; the open session follows it.
    let before: Vec<Zeroizing<[u8; 32]>> = dirs
        .iter()
        .map(|d| {
            psi_server::keyholder::share::load(d, 1, 0)
                .unwrap()
                .to_bytes()
        })
        .collect();
    let (epoch, refreshed) = rt
        .block_on(psi_server::keyholder::ceremony::refresh(&data, &encoder))
        .unwrap();
    assert_eq!((epoch, refreshed.generation), (1, 1));
    assert_eq!(refreshed.committee.public_key(), &pk1);
    for (d, old) in dirs.iter().zip(&before) {
        let new = psi_server::keyholder::share::load(d, 1, 1)
            .unwrap()
            .to_bytes();
        assert_ne!(*new, **old, "every share changes");
    }
    psi_server::registry::publish::publish(&data, &serving).unwrap();
    let info = || {
        rt.block_on(async {
            let mut raw = psi_proto::v1::match_client::MatchClient::connect(format!(
                "http://127.0.0.1:{port}"
            ))
            .await
            .unwrap();
            raw.get_server_info(psi_proto::v1::GetServerInfoRequest {})
                .await
                .unwrap()
                .into_inner()
        })
    };
    wait_for(
        "the replica to load the refresh",
        Duration::from_secs(30),
        || info().threshold.is_some_and(|t| t.generation == 1),
    );
    rows_right(&rt, &session, QueryMode::Bucket, "after the refresh");
    // Retired: the pre-refresh shares are destroyed on every holder.
    let retired = rt
        .block_on(psi_server::keyholder::ceremony::retire_old(&data, &encoder))
        .unwrap();
    assert!(retired
        .iter()
        .all(|(_, gone)| gone == &vec!["1.0".to_string()]));
    for d in &dirs {
        assert!(!psi_server::keyholder::share::path(d, 1, 0).exists());
    }

    // A rotation: the holders make epoch 2's key; epoch 1's endorse it.
    {
        let (data, encoder) = (data.clone(), encoder.clone());
        rt.block_on(rt.spawn_blocking(move || {
            registry::rotate_key_with(&data, Duration::ZERO, false, Some(&encoder))
        }))
        .unwrap()
        .unwrap();
    }
    psi_server::registry::publish::publish(&data, &serving).unwrap();
    wait_for(
        "the replica to load epoch 2",
        Duration::from_secs(30),
        || info().key_epoch == 2,
    );
    // A client that pinned epoch 1's key follows the endorsement.
    let next = rt
        .block_on(Session::connect_when_ready(
            options("cache-2"),
            Duration::from_secs(30),
        ))
        .unwrap();
    assert_eq!(next.info().key_epoch, 2);
    rows_right(&rt, &next, QueryMode::Bucket, "epoch 2");
    rows_right(&rt, &next, QueryMode::Pir, "epoch 2");
    let retired = rt
        .block_on(psi_server::keyholder::ceremony::retire_old(&data, &encoder))
        .unwrap();
    assert!(retired
        .iter()
        .all(|(_, gone)| gone == &vec!["1.1".to_string()]));
    rt.block_on(running.shutdown()).unwrap();
    // The ceremonies are in each holder's audit trail.
    for d in &dirs {
        let store = AuditStore::parse(
            &d.join(psi_server::keyholder::serve::HOLDER_AUDIT_FILE)
                .display()
                .to_string(),
        );
        audit::verify(&store).unwrap();
        let mut out = Vec::new();
        audit::export(&store, &ExportFilter::default(), Format::Json, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        for step in ["DkgStart", "DkgDeal", "DkgFinish", "RetireShares"] {
            assert!(text.contains(step), "{step} audited");
        }
    }
}

#[test]
fn a_silent_holder_is_replaced_within_its_timeout_and_batches_over_a_holders_limit_are_refused() {
    use psi_server::keyholder::pool::HolderPool;
    use psi_server::keyholder::serve::HolderArgs;
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let (data, split) = split_registry(root, 10);
    let committee = std::sync::Arc::new(
        psi_server::store::committee::load(&data, 1)
            .unwrap()
            .unwrap(),
    );
    // Holder 3 accepts connections and never says a word.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in silent.incoming() {
            held.push(c);
        }
    });
    let rt = runtime();
    rt.block_on(async {
        let mut holders = Vec::new();
        for d in &split.holder_dirs[..2] {
            holders.push(
                psi_server::keyholder::serve::start(HolderArgs {
                    max_batch: 4,
                    ..HolderArgs::local(d)
                })
                .await
                .unwrap(),
            );
        }
        let metrics = std::sync::Arc::new(psi_server::serving::metrics::Metrics::default());
        let pool = HolderPool::new(
            &HoldersConfig {
                endpoints: vec![
                    (1, format!("http://{}", holders[0].local_addr)),
                    (2, format!("http://{}", holders[1].local_addr)),
                    (3, format!("http://{silent_addr}")),
                ],
                tls: None,
                timeout: Duration::from_millis(300),
            },
            Some(std::sync::Arc::clone(&metrics)),
        )
        .unwrap();
        let client = psi_core::Client::new(psi_core::Mode::Voprf, *committee.public_key());
        let inputs: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i]).collect();
        let (_, five) = client
            .blind(&inputs, psi_core::Blinding::Additive, &mut rand_core::OsRng)
            .unwrap();
        let four = std::sync::Arc::new(five[..4].to_vec());
        let who = psi_server::keyholder::pool::OnBehalf {
            institution: "bank-a".into(),
            purpose: PURPOSE.into(),
            mode: "bucket".into(),
            request_id: "00".repeat(16),
        };
        // Each batch starts at another holder: twice the silent one is
        // asked, times out, and the next holder answers in its place.
        let started = std::time::Instant::now();
        for _ in 0..3 {
            let partials = pool
                .evaluate(&committee, (1, 0), &four, &who)
                .await
                .unwrap();
            let mut got: Vec<u16> = partials.iter().map(|p| p.index).collect();
            got.sort_unstable();
            assert_eq!(got, vec![1, 2]);
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "a silent holder does not hold a batch past its timeout"
        );
        // (Its connection never completes the HTTP/2 handshake: the connect
        // timeout or the request's, the same setting, cuts it first.)
        let text = metrics.render();
        let failed: u64 = ["unreachable", "timeout"]
            .iter()
            .filter_map(|outcome| {
                let key =
                    format!("psi_holder_answers_total{{holder=\"3\",outcome=\"{outcome}\"}} ");
                text.lines()
                    .find_map(|l| l.strip_prefix(key.as_str()))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            })
            .sum();
        assert_eq!(failed, 2, "{text}");
        // Over the holders' max_batch: refused, naming the setting.
        let over = pool
            .evaluate(&committee, (1, 0), &std::sync::Arc::new(five), &who)
            .await
            .unwrap_err();
        assert!(over.to_string().contains("max_batch = 4"), "{over}");
        for h in holders {
            h.shutdown().await.unwrap();
        }
    });
}
