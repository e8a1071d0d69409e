//! The whole check over gRPC with the real server in this process on
//! 127.0.0.1:0: every kind of row in both modes, stale epochs, a wrong proof,
//! hostile requests.

// Integration tests: a failed unwrap, expect or index is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use psi_client::batch::{self, BatchOptions};
use psi_client::check::{check, CheckOutcome};
use psi_client::pin::Pinned;
use psi_client::{ConnectOptions, QueryMode, Session};
use psi_proto::v1::match_client::MatchClient;
use psi_proto::v1::{
    BucketQueryRequest, EvaluateRequest, PirQueryRequest, PirSetupRequest, SyncTagSetRequest,
};
use psi_server::registry;
use psi_server::registry::source::Source;
use psi_server::serving::config::ServeConfig;
use psi_server::serving::serve::{self, Running};
use psi_server::serving::service::Limits;
use psi_server::tools::synth::Generator;
use tonic::Code;

/// Registered pairs with synthetic names and the public specimen numbers.
const REGISTERED: &[(&str, &str)] = &[
    ("张伟", "11010519491231002X"),
    ("李秀英", "440524188001010014"),
    ("阿依古丽·买买提", "360426199101010071"),
    ("欧阳娜娜", "440308199901101512"),
    ("王𠮷", "810000199408230021"),
    ("赵敏", "610104196209276908"),
];

fn write_registry(path: &Path, extra: usize) {
    let mut w = csv::Writer::from_path(path).unwrap();
    w.write_record(["id", "name", "branch"]).unwrap();
    for (name, id) in REGISTERED {
        w.write_record([*id, *name, "x"]).unwrap();
    }
    for p in Generator::new(42, psi_core::CivilDate::today())
        .unwrap()
        .take(extra)
    {
        w.write_record([p.id.as_str(), p.name.as_str(), "y"])
            .unwrap();
    }
    // Rows the init must reject and report.
    w.write_record(["11010519491231002", "短号", "z"]).unwrap();
    w.write_record(["11010519491231002X", "Zhang", "z"])
        .unwrap();
    w.flush().unwrap();
}

/// The fixtures hold rows that must be rejected (to test the report); the
/// publication guard's own tests are in the server's CLI tests.
const LENIENT: registry::PublishGuard = registry::PublishGuard {
    max_rejected_fraction: 1.0,
    max_shrink_fraction: 1.0,
    force: false,
};

async fn start(data_dir: &Path, port: u16) -> Running {
    start_with_policy(data_dir, port, None).await
}

async fn start_with_policy(data_dir: &Path, port: u16, policy: Option<&str>) -> Running {
    let policy = policy.map(|text| {
        let path = data_dir.join("policy.toml");
        std::fs::write(&path, text).unwrap();
        let p = psi_server::serving::policy::Policy::load(&path).unwrap();
        (path, p)
    });
    serve::start(ServeConfig {
        listen: format!("127.0.0.1:{port}").parse().unwrap(),
        limits: Limits {
            max_batch: 64,
            ..Limits::default()
        },
        reload_interval: Duration::from_millis(50),
        policy,
        admin_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..ServeConfig::local(data_dir)
    })
    .await
    .unwrap()
}

async fn connect(url: &str, cache: &Path, pin: Option<String>) -> anyhow::Result<Session> {
    let opts = ConnectOptions {
        server: url.to_string(),
        pin_key: pin,
        cache_dir: cache.to_path_buf(),
        blinding: psi_core::Blinding::Additive,
        concurrency: 3,
        tls: None,
        purpose: "kyc-onboarding".to_string(),
    };
    Session::connect_when_ready(opts, Duration::from_secs(10)).await
}

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    data_dir: PathBuf,
    running: Running,
    url: String,
}

async fn fixture(extra: usize) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let csv = root.join("registry.csv");
    write_registry(&csv, extra);
    let data_dir = root.join("data");
    let report = registry::init_guarded(&Source::csv(&csv), &data_dir, false, &LENIENT).unwrap();
    assert_eq!(report.counts.accepted, (REGISTERED.len() + extra) as u64);
    assert_eq!(report.counts.rejected_total(), 2);
    let running = start(&data_dir, 0).await;
    let url = format!("http://{}", running.local_addr);
    Fixture {
        _dir: dir,
        root,
        data_dir,
        running,
        url,
    }
}

/// (note, name, id, expected result)
fn queries() -> Vec<(&'static str, String, String, &'static str)> {
    vec![
        ("exact", "张伟".into(), "11010519491231002X".into(), "match"),
        (
            "lower-case x",
            "张伟".into(),
            "11010519491231002x".into(),
            "match",
        ),
        (
            "full-width digits",
            "李秀英".into(),
            "４４０５２４１８８００１０１００１４".into(),
            "match",
        ),
        (
            "spaces everywhere",
            " 李 秀\u{3000}英 ".into(),
            " 440524 18800101 0014 ".into(),
            "match",
        ),
        (
            "katakana middle dot",
            "阿依古丽・买买提".into(),
            "360426199101010071".into(),
            "match",
        ),
        (
            "ascii dot",
            "阿依古丽.买买提".into(),
            "360426199101010071".into(),
            "match",
        ),
        (
            "outside the BMP",
            "王𠮷".into(),
            "810000199408230021".into(),
            "match",
        ),
        (
            "legacy 15 digits",
            "赵敏".into(),
            "610104620927690".into(),
            "match",
        ),
        (
            "same ID, other name",
            "张伟伟".into(),
            "11010519491231002X".into(),
            "no_match",
        ),
        (
            "traditional variant is another name",
            "歐陽娜娜".into(),
            "440308199901101512".into(),
            "no_match",
        ),
        (
            "unregistered",
            "钱多多".into(),
            "830000199201300022".into(),
            "no_match",
        ),
        (
            "bad check character",
            "张伟".into(),
            "110105194912310021".into(),
            "invalid",
        ),
        (
            "latin name",
            "Zhang Wei".into(),
            "11010519491231002X".into(),
            "invalid",
        ),
        (
            "no such date",
            "张伟".into(),
            "110105199902300027".into(),
            "invalid",
        ),
        ("empty id", "张伟".into(), String::new(), "invalid"),
    ]
}

fn write_queries(path: &Path, repeat: usize) -> Vec<&'static str> {
    let mut w = csv::Writer::from_path(path).unwrap();
    w.write_record(["row", "name", "note", "id"]).unwrap();
    let mut expected = Vec::new();
    for r in 0..repeat {
        for (i, (note, name, id, want)) in queries().into_iter().enumerate() {
            w.write_record([format!("{r}-{i}").as_str(), &name, note, &id])
                .unwrap();
            expected.push(want);
        }
    }
    w.flush().unwrap();
    expected
}

/// A batch from `input` to `output` in `mode`, `chunk_rows` rows a chunk.
fn options(input: &Path, output: &Path, mode: QueryMode, chunk_rows: usize) -> BatchOptions {
    BatchOptions {
        input: input.to_path_buf(),
        output: output.to_path_buf(),
        mode,
        chunk_rows,
        file: psi_client::batch::FileFormat::default(),
        chunks_in_flight: 2,
        progress: false,
        resume: false,
        max_cache_age: Duration::from_secs(3600),
        no_sync: false,
    }
}

/// Every audit record, oldest first, as JSON objects.
fn audit_records(path: &Path) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    psi_server::serving::audit::export(
        path,
        &Default::default(),
        psi_server::serving::audit::Format::Json,
        &mut out,
    )
    .unwrap();
    String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn read_output(path: &Path) -> Vec<csv::StringRecord> {
    let mut r = csv::Reader::from_path(path).unwrap();
    let headers = r.headers().unwrap().clone();
    assert_eq!(
        headers.iter().collect::<Vec<_>>(),
        ["row", "name", "note", "id", "result", "error"]
    );
    r.records().map(Result::unwrap).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_answers_every_row_in_both_modes() {
    let f = fixture(3000).await;
    let session = connect(&f.url, &f.root.join("cache"), None).await.unwrap();
    let input = f.root.join("queries.csv");
    // Enough rows for several chunks and several requests per chunk.
    let expected = write_queries(&input, 20);
    for mode in [QueryMode::Sync, QueryMode::Bucket] {
        let output = f.root.join(format!("out-{mode:?}.csv"));
        let summary = batch::run(
            &session,
            &BatchOptions {
                input: input.clone(),
                output: output.clone(),
                mode,
                chunk_rows: 100,
                file: psi_client::batch::FileFormat::default(),
                chunks_in_flight: 2,
                progress: false,
                resume: false,
                max_cache_age: std::time::Duration::from_secs(24 * 3600),
                no_sync: false,
            },
        )
        .await
        .unwrap();
        let rows = read_output(&output);
        assert_eq!(rows.len(), expected.len());
        assert_eq!(summary.rows as usize, expected.len());
        for (i, (row, want)) in rows.iter().zip(&expected).enumerate() {
            let (r, q) = (i / 15, i % 15);
            assert_eq!(&row[0], format!("{r}-{q}"), "row order and pass-through");
            assert_eq!(&row[2], queries()[q].0, "pass-through column");
            assert_eq!(&row[4], *want, "{mode:?}: {} ({})", queries()[q].0, &row[5]);
            assert_eq!(row[5].is_empty(), *want != "invalid");
        }
        assert!(!f.root.join(format!("out-{mode:?}.csv.partial")).exists());
    }
    // One audit record per request, durable before the answer: the Evaluate
    // records add up to the valid rows, and the chain verifies.
    let audit_db = f.data_dir.join(psi_server::serving::audit::AUDIT_FILE);
    let v = psi_server::serving::audit::verify(&audit_db).unwrap();
    let records = audit_records(&audit_db);
    assert_eq!(records.len() as u64, v.records);
    let valid_rows = expected.iter().filter(|w| **w != "invalid").count() as u64;
    let evaluated: u64 = records
        .iter()
        .filter(|r| r["method"] == "Evaluate")
        .map(|r| r["elements"].as_u64().unwrap())
        .sum();
    let bucketed: u64 = records
        .iter()
        .filter(|r| r["method"] == "BucketQuery")
        .map(|r| r["elements"].as_u64().unwrap())
        .sum();
    assert_eq!((evaluated, bucketed), (valid_rows, valid_rows));
    assert!(records.iter().all(|r| r["institution"] == "local"
        && r["purpose"] == "kyc-onboarding"
        && r["outcome"] == "ok"));

    // The second sync fetches nothing: the cache is current.
    let again = session.sync().await.unwrap();
    assert_eq!(again.shards_fetched, 0);
    // Single checks.
    assert_eq!(
        check(&session, "张伟", "11010519491231002x", QueryMode::Bucket)
            .await
            .unwrap(),
        CheckOutcome::Match
    );
    assert_eq!(
        check(&session, "张伟", "11010519491231002x", QueryMode::Sync)
            .await
            .unwrap(),
        CheckOutcome::Match
    );
    assert_eq!(
        check(&session, "张三", "11010519491231002X", QueryMode::Bucket)
            .await
            .unwrap(),
        CheckOutcome::NoMatch
    );
    assert!(matches!(
        check(&session, "张伟", "123", QueryMode::Bucket)
            .await
            .unwrap(),
        CheckOutcome::Invalid(_)
    ));
    f.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_epochs_and_hostile_requests_get_precise_statuses() {
    let f = fixture(100).await;
    let session = connect(&f.url, &f.root.join("cache"), None).await.unwrap();
    let epoch = session.info().key_epoch;
    let mut raw = MatchClient::connect(f.url.clone()).await.unwrap();
    let good = psi_proto::pack([&curve25519_dalek_basepoint()]);

    let stale = raw
        .evaluate(with_purpose(EvaluateRequest {
            key_epoch: epoch - 1,
            blinded_elements: good.clone(),
        }))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition);
    assert!(stale.message().contains("stale"));
    // A newer epoch than the server's: a replica that has not loaded a
    // rotation yet; the client is to retry (another replica, or later).
    let ahead = raw
        .evaluate(with_purpose(EvaluateRequest {
            key_epoch: epoch + 1,
            blinded_elements: good.clone(),
        }))
        .await
        .unwrap_err();
    assert_eq!(ahead.code(), Code::Unavailable);
    assert!(
        ahead.message().contains("not loaded on this replica yet"),
        "{}",
        ahead.message()
    );
    let stale = raw
        .bucket_query(with_purpose(BucketQueryRequest {
            key_epoch: epoch - 1,
            blinded_elements: good.clone(),
            buckets: vec![0],
        }))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition);
    let stale = raw
        .sync_tag_set(with_purpose(SyncTagSetRequest {
            key_epoch: 0,
            held_digests: vec![],
            held_version: 0,
            root_only: false,
        }))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition);

    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![], "empty"),
        (vec![0u8; 33], "multiple of 32"),
        (vec![0u8; 32], "identity"),
        (vec![0xffu8; 32], "canonical"),
        (good.repeat(65), "exceeds the maximum of 64"),
    ];
    for (bytes, want) in cases {
        let e = raw
            .evaluate(with_purpose(EvaluateRequest {
                key_epoch: epoch,
                blinded_elements: bytes,
            }))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{want}");
        assert!(
            e.message().contains(want),
            "{} should mention {want}",
            e.message()
        );
    }
    let e = raw
        .bucket_query(with_purpose(BucketQueryRequest {
            key_epoch: epoch,
            blinded_elements: good.clone(),
            buckets: vec![1 << 20],
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = raw
        .bucket_query(with_purpose(BucketQueryRequest {
            key_epoch: epoch,
            blinded_elements: good.clone(),
            buckets: vec![],
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    // No declared purpose: refused, and recorded as refused.
    let e = raw
        .evaluate(EvaluateRequest {
            key_epoch: epoch,
            blinded_elements: good.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("purpose"), "{}", e.message());
    let mut bad = with_purpose(EvaluateRequest {
        key_epoch: epoch,
        blinded_elements: good.clone(),
    });
    bad.metadata_mut()
        .insert(psi_proto::PURPOSE_HEADER, "Not A Code!".parse().unwrap());
    assert_eq!(
        raw.evaluate(bad).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    // The server is still up and answering.
    assert!(raw
        .evaluate(with_purpose(EvaluateRequest {
            key_epoch: epoch,
            blinded_elements: good
        }))
        .await
        .is_ok());
    f.running.shutdown().await.unwrap();
}

/// A raw request with a declared purpose, as every query must carry.
fn with_purpose<T>(message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut()
        .insert(psi_proto::PURPOSE_HEADER, "kyc-onboarding".parse().unwrap());
    r
}

fn curve25519_dalek_basepoint() -> [u8; 32] {
    // Any valid non-identity element: the encoding of a record's blinded element.
    let server = psi_core::Server::new(
        psi_core::Mode::Voprf,
        psi_core::ServerKey::generate(&mut rand_core::OsRng),
    );
    let client = psi_core::Client::new(psi_core::Mode::Voprf, *server.public_key());
    let (_, blinded) = client
        .blind(&[b"x"], psi_core::Blinding::Additive, &mut rand_core::OsRng)
        .unwrap();
    blinded[0].0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_proof_is_an_error_never_a_no_match() {
    // The session pins server A's key; then another server with another key
    // (same epoch number) takes A's port. Its proofs cannot verify.
    let f = fixture(50).await;
    let session = connect(&f.url, &f.root.join("cache"), None).await.unwrap();
    let port = f.running.local_addr.port();
    f.running.shutdown().await.unwrap();

    let other = tempfile::tempdir().unwrap();
    let csv = other.path().join("r.csv");
    write_registry(&csv, 50);
    registry::init_guarded(
        &Source::csv(&csv),
        &other.path().join("data"),
        false,
        &LENIENT,
    )
    .unwrap();
    let impostor = start(&other.path().join("data"), port).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let record =
        psi_core::Record::parse("张伟", "11010519491231002X", psi_core::CivilDate::today())
            .unwrap();
    let err = session.evaluate(vec![record.encode()]).await.unwrap_err();
    assert!(
        format!("{err:#}").contains("proof does not verify"),
        "{err:#}"
    );
    let err = session.bucket_check(&[record]).await.unwrap_err();
    assert!(
        format!("{err:#}").contains("proof does not verify"),
        "{err:#}"
    );
    // A fresh connection notices the changed key at once.
    let err = connect(&f.url, &f.root.join("cache"), None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("pinned key"), "{err:#}");
    impostor.shutdown().await.unwrap();
    drop(f.data_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_cache_is_refetched_and_reports_hold_no_personal_data() {
    let f = fixture(3000).await;
    let cache = f.root.join("cache");
    let session = connect(&f.url, &cache, None).await.unwrap();
    let first = session.sync().await.unwrap();
    assert_eq!(first.shards_fetched, first.shards_total);
    let path = session.cache_path();
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&path, bytes).unwrap();
    let repaired = session.sync().await.unwrap();
    assert_eq!(repaired.set.root_digest(), first.set.root_digest());
    assert_eq!(
        repaired.shards_fetched, 1,
        "only the damaged shard is fetched"
    );
    // Truncated: only the shards past the cut are fetched again.
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
    let repaired = session.sync().await.unwrap();
    assert_eq!(repaired.set.root_digest(), first.set.root_digest());
    assert_eq!(repaired.shards_fetched, 1);

    // The canonical records are kept for updates and rotation, readable by
    // the operator only; no other file of the data directory, and nothing
    // in the client cache, holds a name or an ID.
    let records = f.data_dir.join(psi_server::store::records::RECORDS_FILE);
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&records).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    for dir in [&f.data_dir, &cache] {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path == records || path.is_dir() {
                continue;
            }
            let content = std::fs::read(&path).unwrap();
            for (name, id) in REGISTERED {
                assert!(
                    !contains(&content, name.as_bytes()),
                    "a name in {}",
                    dir.display()
                );
                assert!(
                    !contains(&content, id.as_bytes()),
                    "an ID in {}",
                    dir.display()
                );
            }
        }
    }
    let report = std::fs::read_to_string(f.data_dir.join(registry::REPORT_FILE)).unwrap();
    assert!(
        report.contains("wrong length") && report.contains("Latin letter"),
        "{report}"
    );
    f.running.shutdown().await.unwrap();
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_work_out_of_the_box() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let f = fixture(10).await;
    let _ready = connect(&f.url, &f.root.join("cache"), None).await.unwrap();
    let channel = tonic::transport::Endpoint::from_shared(f.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());
    for service in ["", psi_proto::SERVICE_NAME] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "service {service:?}");
    }
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        responses.message().await.unwrap().unwrap().message_response
    else {
        panic!("not a list of services");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&psi_proto::SERVICE_NAME.to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );
    f.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_that_fails_to_load_stops_the_server_with_the_reason() {
    // The server binds first (health NOT_SERVING), loads in the background,
    // and stops by itself with the load error.
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("r.csv");
    write_registry(&csv, 10);
    let data = dir.path().join("data");
    registry::init_guarded(&Source::csv(&csv), &data, false, &LENIENT).unwrap();
    std::fs::write(
        data.join(psi_server::store::SNAPSHOT_FILE),
        b"PSIBKT\0\x01 truncated",
    )
    .unwrap();
    let running = start(&data, 0).await;
    let err = running.run_until(std::future::pending()).await.unwrap_err();
    assert!(format!("{err:#}").contains("bucket index"), "{err:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_limits_modes_purposes_and_rates_and_the_client_waits_it_out() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let csv = root.join("registry.csv");
    write_registry(&csv, 200);
    let data = root.join("data");
    registry::init_guarded(&Source::csv(&csv), &data, false, &LENIENT).unwrap();
    let policy = r#"
[institutions.local]
modes = ["sync"]
purposes = ["kyc-onboarding"]
rate_per_second = 60
daily_cap = 100000
max_batch = 64
"#;
    let running = start_with_policy(&data, 0, Some(policy)).await;
    let url = format!("http://{}", running.local_addr);
    let session = connect(&url, &root.join("cache"), None).await.unwrap();

    // 240 valid rows at 60 elements per second: the client is told to wait,
    // waits, and still answers every row exactly once, in order.
    let input = root.join("q.csv");
    let expected = write_queries(&input, 20);
    let output = root.join("out.csv");
    batch::run(
        &session,
        &BatchOptions {
            input,
            output: output.clone(),
            mode: QueryMode::Sync,
            chunk_rows: 64,
            file: psi_client::batch::FileFormat::default(),
            chunks_in_flight: 2,
            progress: false,
            resume: false,
            max_cache_age: std::time::Duration::from_secs(24 * 3600),
            no_sync: false,
        },
    )
    .await
    .unwrap();
    let rows = read_output(&output);
    assert_eq!(rows.len(), expected.len());
    for (row, want) in rows.iter().zip(&expected) {
        assert_eq!(&row[4], *want);
    }
    // The audit trail shows the refusals and that each valid row was
    // evaluated exactly once.
    let records = audit_records(&data.join(psi_server::serving::audit::AUDIT_FILE));
    assert!(
        records.iter().any(|r| r["outcome"] == "ResourceExhausted"),
        "the rate limit must have applied"
    );
    let answered: u64 = records
        .iter()
        .filter(|r| r["method"] == "Evaluate" && r["outcome"] == "ok")
        .map(|r| r["elements"].as_u64().unwrap())
        .sum();
    assert_eq!(
        answered,
        expected.iter().filter(|w| **w != "invalid").count() as u64
    );

    // Bucket mode is not allowed for this institution.
    let err = check(&session, "张伟", "11010519491231002X", QueryMode::Bucket)
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("may not use bucket mode"),
        "{err:#}"
    );
    // Nor another purpose.
    let mut raw = MatchClient::connect(url.clone()).await.unwrap();
    let mut req = with_purpose(EvaluateRequest {
        key_epoch: session.info().key_epoch,
        blinded_elements: psi_proto::pack([&curve25519_dalek_basepoint()]),
    });
    req.metadata_mut()
        .insert(psi_proto::PURPOSE_HEADER, "marketing".parse().unwrap());
    let e = raw.evaluate(req).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("purpose marketing is not authorised"));
    // Exhausting the rate by hand shows the retry delay to the peer.
    let many =
        psi_proto::pack(std::iter::repeat_n(&curve25519_dalek_basepoint(), 64).collect::<Vec<_>>());
    let mut exhausted = None;
    for _ in 0..4 {
        let r = raw
            .evaluate(with_purpose(EvaluateRequest {
                key_epoch: session.info().key_epoch,
                blinded_elements: many.clone(),
            }))
            .await;
        if let Err(e) = r {
            exhausted = Some(e);
            break;
        }
    }
    let e = exhausted.expect("the rate limit is reached");
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(e.metadata().get(psi_proto::RETRY_AFTER_MS).is_some());
    running.shutdown().await.unwrap();

    // An institution missing from the policy is refused outright.
    let running = start_with_policy(&data, 0, Some("[institutions.bank-001]\nmodes=[\"sync\"]\npurposes=[\"kyc-onboarding\"]\nrate_per_second=10\ndaily_cap=10\nmax_batch=10\n")).await;
    let url = format!("http://{}", running.local_addr);
    let session = connect(&url, &root.join("cache"), None).await.unwrap();
    let err = session.sync().await.unwrap_err();
    assert!(
        format!("{err:#}").contains("institution local is not authorised"),
        "{err:#}"
    );
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_mid_batch_is_ridden_out() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let csv = root.join("registry.csv");
    write_registry(&csv, 100);
    let data = root.join("data");
    registry::init_guarded(&Source::csv(&csv), &data, false, &LENIENT).unwrap();
    // A slow rate keeps the batch running for a few seconds.
    let slow = "[institutions.local]\nmodes=[\"sync\"]\npurposes=[\"kyc-onboarding\"]\nrate_per_second=60\ndaily_cap=100000\nmax_batch=64\n";
    let first = start_with_policy(&data, 0, Some(slow)).await;
    let port = first.local_addr.port();
    let url = format!("http://{}", first.local_addr);
    let session = connect(&url, &root.join("cache"), None).await.unwrap();
    let input = root.join("q.csv");
    let expected = write_queries(&input, 20);
    let output = root.join("out.csv");
    let opts = BatchOptions {
        input,
        output: output.clone(),
        mode: QueryMode::Sync,
        chunk_rows: 32,
        file: psi_client::batch::FileFormat::default(),
        chunks_in_flight: 2,
        progress: false,
        resume: false,
        max_cache_age: std::time::Duration::from_secs(24 * 3600),
        no_sync: false,
    };
    let batch = tokio::spawn(async move { batch::run(&session, &opts).await });

    tokio::time::sleep(Duration::from_millis(500)).await;
    first.shutdown().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The same data directory (same key and epoch) on the same port, with its
    // own audit database so that we can see it served the rest.
    let policy_path = data.join("policy.toml");
    let second = serve::start(ServeConfig {
        listen: format!("127.0.0.1:{port}").parse().unwrap(),
        limits: Limits {
            max_batch: 64,
            ..Limits::default()
        },
        reload_interval: Duration::from_millis(50),
        audit_db: root.join("second-audit.sqlite").into(),
        policy: Some((
            policy_path.clone(),
            psi_server::serving::policy::Policy::load(&policy_path).unwrap(),
        )),
        ..ServeConfig::local(&data)
    })
    .await
    .unwrap();
    let summary = batch.await.unwrap().unwrap();
    assert_eq!(summary.rows as usize, expected.len());
    let rows = read_output(&output);
    for (row, want) in rows.iter().zip(&expected) {
        assert_eq!(&row[4], *want);
    }
    second.shutdown().await.unwrap();
    let v = psi_server::serving::audit::verify(root.join("second-audit.sqlite")).unwrap();
    assert!(
        v.records > 0,
        "the restarted server answered part of the batch"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_and_request_floods_are_refused_and_the_server_stays_up() {
    let f = fixture(10).await;
    let session = connect(&f.url, &f.root.join("cache"), None).await.unwrap();
    let epoch = session.info().key_epoch;
    let mut raw = MatchClient::connect(f.url.clone()).await.unwrap();
    // 17 MiB: over the server's 16 MiB message limit.
    let huge = vec![1u8; 17 << 20];
    let e = raw
        .evaluate(with_purpose(EvaluateRequest {
            key_epoch: epoch,
            blinded_elements: huge,
        }))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e.code(),
            Code::OutOfRange | Code::ResourceExhausted | Code::InvalidArgument
        ),
        "{e:?}"
    );
    // 128 requests at once from one institution (limit 16): some are refused
    // with RESOURCE_EXHAUSTED and a retry delay, none fails otherwise.
    let good =
        psi_proto::pack(std::iter::repeat_n(&curve25519_dalek_basepoint(), 64).collect::<Vec<_>>());
    let calls = (0..128).map(|_| {
        let mut c = raw.clone();
        let body = good.clone();
        async move {
            c.evaluate(with_purpose(EvaluateRequest {
                key_epoch: epoch,
                blinded_elements: body,
            }))
            .await
        }
    });
    let results = futures::future::join_all(calls).await;
    let refused: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        refused.iter().all(|e| e.code() == Code::ResourceExhausted
            && e.metadata().get(psi_proto::RETRY_AFTER_MS).is_some()),
        "{refused:?}"
    );
    assert!(
        !refused.is_empty(),
        "the per-institution limit must have applied"
    );
    assert!(results.iter().any(Result::is_ok));
    // Still serving.
    assert_eq!(
        check(&session, "张伟", "11010519491231002X", QueryMode::Bucket)
            .await
            .unwrap(),
        CheckOutcome::Match
    );
    f.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_elements_and_refusals_on_the_admin_port() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f = fixture(10).await;
    let session = connect(&f.url, &f.root.join("cache"), None).await.unwrap();
    check(&session, "张伟", "11010519491231002X", QueryMode::Bucket)
        .await
        .unwrap();
    let mut raw = MatchClient::connect(f.url.clone()).await.unwrap();
    let _ = raw
        .evaluate(with_purpose(EvaluateRequest {
            key_epoch: 0,
            blinded_elements: vec![],
        }))
        .await;
    let admin = f.running.admin_addr.expect("admin address");
    let mut ready = tokio::net::TcpStream::connect(admin).await.unwrap();
    ready
        .write_all(b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    ready.read_to_string(&mut answer).await.unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("serving\n"),
        "{answer}"
    );
    let mut stream = tokio::net::TcpStream::connect(admin).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains(
            r#"psi_requests_total{method="BucketQuery",institution="local",outcome="ok"} 1"#
        ),
        "{text}"
    );
    assert!(
        text.contains(
            r#"psi_elements_total{method="BucketQuery",institution="local",outcome="ok"} 1"#
        ),
        "{text}"
    );
    assert!(text.contains(r#"outcome="FailedPrecondition""#), "{text}");
    assert!(text.contains("psi_serving 1"), "{text}");
    assert!(
        text.contains("psi_audit_write_duration_seconds_count"),
        "{text}"
    );
    assert!(!text.contains("张伟") && !text.contains("11010519491231002"));
    f.running.shutdown().await.unwrap();
}

/// Sends raw bytes as a gRPC message body, to test what the server does with
/// bytes that are not a protobuf message.
#[derive(Debug, Clone, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf;
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_protobuf_is_refused_and_the_server_stays_up() {
    let f = fixture(10).await;
    let session = connect(&f.url, &f.root.join("cache"), None).await.unwrap();
    let channel = tonic::transport::Endpoint::from_shared(f.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    for garbage in [
        vec![0xff; 7],
        vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f],
        b"not protobuf at all".to_vec(),
    ] {
        grpc.ready().await.unwrap();
        let e = grpc
            .unary::<Vec<u8>, Vec<u8>, _>(
                with_purpose(garbage),
                tonic::codegen::http::uri::PathAndQuery::from_static("/psi.v1.Match/Evaluate"),
                RawCodec,
            )
            .await
            .unwrap_err();
        // tonic reports undecodable messages as INTERNAL "failed to decode".
        assert!(e.message().contains("decode"), "{e:?}");
    }
    assert_eq!(
        check(&session, "张伟", "11010519491231002X", QueryMode::Bucket)
            .await
            .unwrap(),
        CheckOutcome::Match
    );
    f.running.shutdown().await.unwrap();
}

/// A synthetic person who is not in the fixture's registry.
fn newcomer() -> (String, String) {
    let p = Generator::new(4242, psi_core::CivilDate::today())
        .unwrap()
        .next()
        .unwrap();
    (p.name, p.id)
}

fn write_pairs(path: &Path, pairs: &[(&str, &str)]) {
    let mut w = csv::Writer::from_path(path).unwrap();
    w.write_record(["name", "id"]).unwrap();
    for (name, id) in pairs {
        w.write_record([*name, *id]).unwrap();
    }
    w.flush().unwrap();
}

async fn answers(session: &Session, pairs: &[(&str, &str)], mode: QueryMode) -> Vec<CheckOutcome> {
    let mut out = Vec::new();
    for (name, id) in pairs {
        out.push(check(session, name, id, mode).await.unwrap());
    }
    out
}

/// Waits until the server publishes `version` (its reload interval is 50 ms here).
async fn reconnect_at(session: &Session, version: u64) -> Session {
    for _ in 0..200 {
        let s = session.reconnect().await.unwrap();
        if s.info().registry_version >= version {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the server did not publish registry version {version}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_are_published_live_and_synced_as_deltas() {
    let f = fixture(3000).await;
    let cache = f.root.join("cache");
    let session = connect(&f.url, &cache, None).await.unwrap();
    let full = session.sync().await.unwrap();
    let (new_name, new_id) = newcomer();
    let pairs = [
        ("张伟", "11010519491231002X"),
        (new_name.as_str(), new_id.as_str()),
    ];
    for mode in [QueryMode::Sync, QueryMode::Bucket, QueryMode::Pir] {
        assert_eq!(
            answers(&session, &pairs, mode).await,
            [CheckOutcome::Match, CheckOutcome::NoMatch]
        );
    }

    // Add the newcomer, remove 张伟, plus a row already present, one not
    // registered and one invalid.
    let add = f.root.join("add.csv");
    let remove = f.root.join("remove.csv");
    write_pairs(
        &add,
        &[pairs[1], ("赵敏", "610104196209276908"), ("Zhang", "x")],
    );
    let stranger = Generator::new(999, psi_core::CivilDate::today())
        .unwrap()
        .next()
        .unwrap();
    write_pairs(&remove, &[pairs[0], (&stranger.name, &stranger.id)]);
    let r = registry::update_guarded(
        Some(&Source::csv(&add)),
        Some(&Source::csv(&remove)),
        &f.data_dir,
        false,
        &LENIENT,
    )
    .unwrap();
    assert_eq!(
        (
            r.added,
            r.already_present,
            r.removed,
            r.not_found,
            r.registry_version
        ),
        (1, 1, 1, 1, 2)
    );
    assert_eq!(r.add.rejected_total(), 1);
    let report = std::fs::read_to_string(&r.report_path).unwrap();
    assert!(
        report.starts_with("source,row,field,reason\nadd,4,name,"),
        "{report}"
    );

    // The running server publishes version 2 by itself: every mode sees it
    // (PIR mode's database patched, the client's parameters still held).
    let session = reconnect_at(&session, 2).await;
    for mode in [QueryMode::Bucket, QueryMode::Pir] {
        assert_eq!(
            answers(&session, &pairs, mode).await,
            [CheckOutcome::NoMatch, CheckOutcome::Match],
            "{mode:?}"
        );
    }
    let synced = session.sync().await.unwrap();
    assert!(synced.delta_applied);
    assert_eq!(synced.set.header().registry_version, 2);
    assert_eq!(synced.shards_fetched, 0);
    assert!(
        synced.bytes_fetched * 20 < full.bytes_fetched,
        "{} bytes for the delta, {} for the whole set",
        synced.bytes_fetched,
        full.bytes_fetched
    );
    // The delta came with the root digest alone, no shard digests: the
    // manifest's header and root (< 64 bytes) and 8 bytes per change.
    assert!(
        synced.bytes_fetched < 64 + 2 * 8 + 16,
        "{} bytes for a delta of 2 changes",
        synced.bytes_fetched
    );
    // Synced again with nothing new: the root digest confirms the cache.
    let again = session.sync().await.unwrap();
    assert!(!again.delta_applied);
    assert_eq!(again.set.root_digest(), synced.set.root_digest());
    assert!(again.bytes_fetched < 64, "{} bytes", again.bytes_fetched);
    assert_eq!(
        answers(&session, &pairs, QueryMode::Sync).await,
        [CheckOutcome::NoMatch, CheckOutcome::Match]
    );
    // A client two versions behind gets both deltas composed.
    write_pairs(&add, &[pairs[0]]);
    registry::update_guarded(Some(&Source::csv(&add)), None, &f.data_dir, false, &LENIENT).unwrap();
    let session = reconnect_at(&session, 3).await;
    let v3 = session.sync().await.unwrap();
    assert!(v3.delta_applied);
    assert!(v3.set.lookup().is_ok());
    assert_eq!(
        answers(&session, &pairs, QueryMode::Sync).await,
        [CheckOutcome::Match, CheckOutcome::Match]
    );
    f.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_during_updates_answers_every_row_correctly() {
    let f = fixture(2000).await;
    let session = connect(&f.url, &f.root.join("cache"), None).await.unwrap();
    let input = f.root.join("queries.csv");
    let expected = write_queries(&input, 40);
    let data_dir = f.data_dir.clone();
    let root = f.root.clone();
    // Updates that touch none of the queried people, while the batch runs
    // and re-syncs before every chunk (maximum age zero).
    let updater = tokio::task::spawn_blocking(move || {
        let people: Vec<_> = Generator::new(77, psi_core::CivilDate::today())
            .unwrap()
            .take(50)
            .collect();
        for (i, p) in people.iter().enumerate() {
            let add = root.join(format!("add-{i}.csv"));
            write_pairs(&add, &[(p.name.as_str(), p.id.as_str())]);
            registry::update_guarded(Some(&Source::csv(&add)), None, &data_dir, false, &LENIENT)
                .unwrap();
        }
    });
    let summary = batch::run(
        &session,
        &BatchOptions {
            input,
            output: f.root.join("out.csv"),
            mode: QueryMode::Sync,
            chunk_rows: 32,
            file: psi_client::batch::FileFormat::default(),
            chunks_in_flight: 2,
            progress: false,
            resume: false,
            max_cache_age: Duration::ZERO,
            no_sync: false,
        },
    )
    .await
    .unwrap();
    updater.await.unwrap();
    let got: Vec<String> = read_output(&f.root.join("out.csv"))
        .iter()
        .map(|r| r.get(r.len() - 2).unwrap().to_string())
        .collect();
    assert_eq!(got, expected);
    assert!(summary.registry_version >= summary.first_registry_version);
    assert!(summary
        .to_string()
        .contains("answered against registry version"));
    f.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_rotation_is_followed_by_checks_and_batches() {
    let f = fixture(1500).await;
    let cache = f.root.join("cache");
    let session = connect(&f.url, &cache, None).await.unwrap();
    session.sync().await.unwrap();
    let old_key = session.info().public_key.clone();
    // Rotate with no grace: the retired key is destroyed at the server's next sweep.
    let r = registry::rotate_key(&f.data_dir, Duration::ZERO, false).unwrap();
    assert_eq!((r.old_epoch, r.epoch), (1, 2));
    let input = f.root.join("queries.csv");
    let expected = write_queries(&input, 10);
    for _ in 0..200 {
        if session.reconnect().await.unwrap().info().key_epoch == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // The session still holds epoch 1: the server refuses it, the batch
    // reconnects, follows the endorsement, re-syncs and answers correctly.
    let summary = batch::run(
        &session,
        &options(&input, &f.root.join("out.csv"), QueryMode::Sync, 16),
    )
    .await
    .unwrap();
    assert_eq!(summary.key_epoch, 2);
    let got: Vec<String> = read_output(&f.root.join("out.csv"))
        .iter()
        .map(|r| r.get(r.len() - 2).unwrap().to_string())
        .collect();
    assert_eq!(got, expected);
    // Single checks in both modes follow it too.
    let pairs = [
        ("张伟", "11010519491231002X"),
        ("张三", "11010519491231002X"),
    ];
    for mode in [QueryMode::Bucket, QueryMode::Sync, QueryMode::Pir] {
        assert_eq!(
            answers(&session, &pairs, mode).await,
            [CheckOutcome::Match, CheckOutcome::NoMatch],
            "{mode:?}"
        );
    }
    // The pin moved to the new key; the old key file is gone.
    let fresh = connect(&f.url, &cache, None).await.unwrap();
    assert_eq!(fresh.pinned, Pinned::Known);
    assert_ne!(fresh.info().public_key, old_key);
    assert_eq!(fresh.info().key_history.len(), 1);
    let mut gone = false;
    for _ in 0..200 {
        gone = !std::fs::read_dir(&f.data_dir).unwrap().any(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("oprf-epoch-1")
        });
        if gone {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(gone, "the retired key outlived its grace period");
    f.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_older_than_the_maximum_age_is_refused() {
    let f = fixture(500).await;
    let session = connect(&f.url, &f.root.join("cache"), None).await.unwrap();
    session.sync().await.unwrap();
    let input = f.root.join("queries.csv");
    let expected = write_queries(&input, 1);
    let opts = |no_sync: bool| BatchOptions {
        input: input.clone(),
        output: f.root.join("out.csv"),
        mode: QueryMode::Sync,
        chunk_rows: 64,
        file: psi_client::batch::FileFormat::default(),
        chunks_in_flight: 1,
        progress: false,
        resume: false,
        max_cache_age: Duration::from_secs(3600),
        no_sync,
    };
    // Fresh enough: answered from the cache without a sync.
    let summary = batch::run(&session, &opts(true)).await.unwrap();
    assert_eq!(summary.bytes_synced, 0);
    assert_eq!(read_output(&f.root.join("out.csv")).len(), expected.len());
    // Two hours old: refused, naming the age and the limit.
    let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(7200);
    std::fs::File::options()
        .append(true)
        .open(session.cache_path())
        .unwrap()
        .set_modified(two_hours_ago)
        .unwrap();
    let err = batch::run(&session, &opts(true)).await.unwrap_err();
    assert!(
        format!("{err:#}").contains("more than the maximum age of 1h"),
        "{err:#}"
    );
    // Syncing confirms it current again.
    let summary = batch::run(&session, &opts(false)).await.unwrap();
    assert!(summary.bytes_synced > 0);
    batch::run(&session, &opts(true)).await.unwrap();
    f.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_outgrows_its_tag_parameters_is_synced_in_full() {
    // 3,006 entries keep 44-bit values; past 4,096 they become 45-bit, so
    // the delta cannot be applied to the cached set: the shards are fetched.
    let f = fixture(3000).await;
    let session = connect(&f.url, &f.root.join("cache"), None).await.unwrap();
    let before = session.sync().await.unwrap();
    let add = f.root.join("add.csv");
    let people: Vec<_> = Generator::new(31, psi_core::CivilDate::today())
        .unwrap()
        .take(1200)
        .collect();
    let pairs: Vec<(&str, &str)> = people
        .iter()
        .map(|p| (p.name.as_str(), p.id.as_str()))
        .collect();
    write_pairs(&add, &pairs);
    let r = registry::update_guarded(Some(&Source::csv(&add)), None, &f.data_dir, false, &LENIENT)
        .unwrap();
    assert!(r.records > 4096, "{}", r.records);
    let session = reconnect_at(&session, 2).await;
    let after = session.sync().await.unwrap();
    assert_ne!(after.set.header().params, before.set.header().params);
    assert_eq!(after.shards_fetched, after.shards_total);
    assert_eq!(
        answers(&session, &pairs[..3], QueryMode::Sync).await,
        [
            CheckOutcome::Match,
            CheckOutcome::Match,
            CheckOutcome::Match
        ]
    );
    f.running.shutdown().await.unwrap();
}

/// Reads the admin port's metrics page.
async fn metrics_text(running: &Running) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let admin = running.admin_addr.expect("admin address");
    let mut stream = tokio::net::TcpStream::connect(admin).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pir_mode_answers_like_the_other_modes_and_the_operator_learns_nothing_of_the_pair() {
    let f = fixture(3000).await;
    let session = connect(&f.url, &f.root.join("cache"), None).await.unwrap();
    let info = session.info().pir.clone().expect("PIR mode offered");
    assert!(session
        .info()
        .modes
        .contains(&(psi_proto::v1::QueryMode::Pir as i32)));
    assert_eq!(info.scheme, psi_pir::shape::SCHEME);
    assert!(info.fingerprint_bits >= 43);

    // Every kind of row (formatting variants, non-members, invalid rows):
    // the same answers in all three modes.
    let input = f.root.join("queries.csv");
    let expected = write_queries(&input, 1);
    let mut results = Vec::new();
    for mode in [QueryMode::Pir, QueryMode::Bucket, QueryMode::Sync] {
        let output = f.root.join(format!("out-{mode:?}.csv"));
        batch::run(&session, &options(&input, &output, mode, 8))
            .await
            .unwrap();
        let got: Vec<String> = read_output(&output)
            .iter()
            .map(|r| r[4].to_string())
            .collect();
        assert_eq!(got, expected, "{mode:?}");
        results.push(got);
    }
    assert_eq!(results[0], results[1]);

    // The audit trail: PIR requests say `pir` and their element count. The
    // public parameters went up once for this institution and epoch.
    let audit_db = f.data_dir.join(psi_server::serving::audit::AUDIT_FILE);
    let records = audit_records(&audit_db);
    let valid_rows = expected.iter().filter(|w| **w != "invalid").count() as u64;
    let pir: Vec<_> = records.iter().filter(|r| r["mode"] == "pir").collect();
    assert_eq!(
        pir.iter().filter(|r| r["method"] == "PirSetup").count(),
        1,
        "{pir:?}"
    );
    let asked: u64 = pir
        .iter()
        .filter(|r| r["method"] == "PirQuery")
        .map(|r| r["elements"].as_u64().unwrap())
        .sum();
    assert_eq!(asked, valid_rows);

    // Two checks of different pairs (a member, a non-member) leave records
    // that differ only in time and request id; nothing in the export,
    // the metrics or the records depends on the pair asked.
    let before = audit_records(&audit_db).len();
    let member = check(&session, "张伟", "11010519491231002X", QueryMode::Pir)
        .await
        .unwrap();
    let other = Generator::new(999, psi_core::CivilDate::today())
        .unwrap()
        .next()
        .unwrap();
    let stranger = check(&session, &other.name, &other.id, QueryMode::Pir)
        .await
        .unwrap();
    assert_eq!(
        (member, stranger),
        (CheckOutcome::Match, CheckOutcome::NoMatch)
    );
    let after = audit_records(&audit_db);
    assert_eq!(after.len(), before + 2);
    let strip = |r: &serde_json::Value| {
        let mut r = r.as_object().unwrap().clone();
        let keys: Vec<String> = r.keys().cloned().collect();
        assert_eq!(
            keys,
            [
                "elements",
                "hash",
                "institution",
                "key_epoch",
                "method",
                "mode",
                "outcome",
                "purpose",
                "registry_version",
                "request_id",
                "seq",
                "time"
            ],
            "an audit record holds these fields and nothing else"
        );
        for k in ["hash", "request_id", "seq", "time"] {
            r.remove(k);
        }
        r
    };
    assert_eq!(strip(&after[before]), strip(&after[before + 1]));
    let mut export = Vec::new();
    psi_server::serving::audit::export(
        &audit_db,
        &Default::default(),
        psi_server::serving::audit::Format::Csv,
        &mut export,
    )
    .unwrap();
    let metrics = metrics_text(&f.running).await;
    for text in [String::from_utf8(export).unwrap(), metrics.clone()] {
        for (name, id) in REGISTERED
            .iter()
            .copied()
            .chain([(other.name.as_str(), other.id.as_str())])
        {
            assert!(!text.contains(name) && !text.contains(&id[..17]), "{name}");
        }
    }
    assert!(
        metrics
            .contains(r#"psi_elements_total{method="PirQuery",institution="local",outcome="ok"}"#),
        "{metrics}"
    );
    f.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_pir_requests_are_refused_and_the_server_stays_up() {
    let f = fixture(100).await;
    let session = connect(&f.url, &f.root.join("cache"), None).await.unwrap();
    let epoch = session.info().key_epoch;
    let info = session.info().pir.clone().expect("PIR mode offered");
    let mut raw = MatchClient::connect(f.url.clone())
        .await
        .unwrap()
        .max_encoding_message_size(64 << 20);
    let good = psi_proto::pack([&curve25519_dalek_basepoint()]);
    let query_bytes = info.query_bytes as usize;

    // Public parameters: wrong dimensions, wrong length, a coefficient
    // out of range.
    let setup = |nu2: u32, bytes: Vec<u8>| PirSetupRequest {
        key_epoch: epoch,
        nu1: info.nu1,
        nu2,
        public_parameters: bytes,
    };
    let keys_bytes = info.keys_bytes as usize;
    for (req, want) in [
        (setup(info.nu2 + 1, vec![0; keys_bytes]), "dimensions"),
        (setup(info.nu2, vec![0; keys_bytes - 8]), "bytes"),
        (setup(info.nu2, vec![0xff; keys_bytes]), "out of range"),
    ] {
        let e = raw.pir_setup(with_purpose(req)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{want}: {e:?}");
        assert!(e.message().contains(want), "{}", e.message());
    }
    // A query naming parameters the server does not hold: the cure is
    // another PirSetup, said in the metadata.
    let query = |keys_id: Vec<u8>, queries: Vec<Vec<u8>>, blinded: Vec<u8>| PirQueryRequest {
        key_epoch: epoch,
        keys_id,
        blinded_elements: blinded,
        queries,
    };
    let e = raw
        .pir_query(with_purpose(query(
            vec![7; 16],
            vec![vec![0; query_bytes]],
            good.clone(),
        )))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(
        e.metadata().get(psi_proto::PIR_KEYS_HEADER).unwrap(),
        "unknown"
    );
    // Register real parameters, then send malformed queries under them.
    let shape = psi_client::pir::shape_of(&info).unwrap();
    let mut client = psi_pir::PirClient::new(shape, &[5; 32]).unwrap();
    let keys_id = raw
        .pir_setup(with_purpose(setup(info.nu2, client.public_parameters())))
        .await
        .unwrap()
        .into_inner()
        .keys_id;
    let mut out_of_range = vec![0u8; query_bytes];
    out_of_range[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
    let max = info.max_batch as usize;
    for (req, want) in [
        (
            query(
                keys_id.clone(),
                vec![vec![0; query_bytes - 1]],
                good.clone(),
            ),
            "bytes",
        ),
        (
            query(keys_id.clone(), vec![out_of_range], good.clone()),
            "out of range",
        ),
        (
            query(keys_id.clone(), vec![], good.clone()),
            "0 PIR queries for 1",
        ),
        (
            query(
                keys_id.clone(),
                vec![vec![0; 1]; max + 1],
                good.repeat(max + 1),
            ),
            "exceeds the maximum",
        ),
    ] {
        let e = raw.pir_query(with_purpose(req)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{want}: {e:?}");
        assert!(e.message().contains(want), "{}", e.message());
    }
    // Larger than the PirQuery body limit: refused before it is read whole.
    let e = raw
        .pir_query(with_purpose(query(
            keys_id.clone(),
            vec![vec![0; 4 << 20]],
            good.clone(),
        )))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e.code(),
            Code::ResourceExhausted | Code::OutOfRange | Code::InvalidArgument
        ),
        "{e:?}"
    );
    // A well-formed query under those parameters is answered: one answer
    // of the advertised length, which that client can read.
    let bucket = 3u32.min((1u32 << session.info().bucket_prefix_bits) - 1);
    let answer = raw
        .pir_query(with_purpose(query(
            keys_id,
            vec![client.query(bucket).unwrap()],
            good.clone(),
        )))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.answers.len(), 1);
    assert_eq!(answer.answers[0].len(), info.answer_bytes as usize);
    assert!(client.decode(bucket, epoch, &answer.answers[0]).is_ok());
    // Still serving every mode.
    assert_eq!(
        check(&session, "张伟", "11010519491231002X", QueryMode::Pir)
            .await
            .unwrap(),
        CheckOutcome::Match
    );
    f.running.shutdown().await.unwrap();
}

async fn start_with_limits(data_dir: &Path, limits: Limits) -> Running {
    serve::start(ServeConfig {
        limits,
        reload_interval: Duration::from_millis(50),
        ..ServeConfig::local(data_dir)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pir_limits_hold_concurrent_answers_and_the_database_size() {
    let f = fixture(100).await;
    f.running.shutdown().await.unwrap();

    // A database over pir_max_database_bytes: served without PIR mode, and
    // a PIR request says so.
    let running = start_with_limits(
        &f.data_dir,
        Limits {
            pir_max_database_bytes: 1 << 20,
            ..Limits::default()
        },
    )
    .await;
    let url = format!("http://{}", running.local_addr);
    let session = connect(&url, &f.root.join("cache"), None).await.unwrap();
    assert!(session.info().pir.is_none());
    assert!(!session
        .info()
        .modes
        .contains(&(psi_proto::v1::QueryMode::Pir as i32)));
    let e = check(&session, "张伟", "11010519491231002X", QueryMode::Pir)
        .await
        .unwrap_err();
    assert!(
        format!("{e:#}").contains("does not offer PIR mode"),
        "{e:#}"
    );
    running.shutdown().await.unwrap();

    // One PIR answer at a time: of several sent at once, the others are
    // refused with RESOURCE_EXHAUSTED and a retry delay; the client's own
    // checks wait it out and all answer.
    let running = start_with_limits(
        &f.data_dir,
        Limits {
            pir_max_concurrent: 1,
            ..Limits::default()
        },
    )
    .await;
    let url = format!("http://{}", running.local_addr);
    let session = connect(&url, &f.root.join("cache"), None).await.unwrap();
    let info = session.info().pir.clone().unwrap();
    let epoch = session.info().key_epoch;
    let shape = psi_client::pir::shape_of(&info).unwrap();
    let mut client = psi_pir::PirClient::new(shape, &[8; 32]).unwrap();
    let raw = MatchClient::connect(url.clone())
        .await
        .unwrap()
        .max_encoding_message_size(64 << 20);
    let keys_id = raw
        .clone()
        .pir_setup(with_purpose(PirSetupRequest {
            key_epoch: epoch,
            nu1: info.nu1,
            nu2: info.nu2,
            public_parameters: client.public_parameters(),
        }))
        .await
        .unwrap()
        .into_inner()
        .keys_id;
    let good = psi_proto::pack([&curve25519_dalek_basepoint()]);
    let calls = (0..4).map(|_| {
        let mut c = raw.clone();
        let req = PirQueryRequest {
            key_epoch: epoch,
            keys_id: keys_id.clone(),
            blinded_elements: good.clone(),
            queries: vec![client.query(0).unwrap()],
        };
        async move { c.pir_query(with_purpose(req)).await }
    });
    let results = futures::future::join_all(calls).await;
    let refused: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(results.iter().any(Result::is_ok));
    assert!(!refused.is_empty(), "pir_max_concurrent must have applied");
    assert!(
        refused.iter().all(|e| e.code() == Code::ResourceExhausted
            && e.metadata().get(psi_proto::RETRY_AFTER_MS).is_some()),
        "{refused:?}"
    );
    let pairs = [
        ("张伟", "11010519491231002X"),
        ("赵敏", "610104196209276908"),
    ];
    let both = futures::future::join_all(
        pairs
            .iter()
            .map(|(n, i)| check(&session, n, i, QueryMode::Pir)),
    )
    .await;
    assert!(both.into_iter().all(|a| a.unwrap() == CheckOutcome::Match));
    running.shutdown().await.unwrap();
}
