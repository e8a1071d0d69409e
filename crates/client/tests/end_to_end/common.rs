//! What every end-to-end test uses: the registry, a server on loopback, a
//! connected session, batch options and readers of the outputs.

pub use std::path::{Path, PathBuf};
pub use std::time::Duration;

pub use psi_client::batch::{self, BatchOptions};
pub use psi_client::check::{check, CheckOutcome};
pub use psi_client::pin::Pinned;
pub use psi_client::{ConnectOptions, QueryMode, Session};
pub use psi_proto::v1::match_client::MatchClient;
pub use psi_proto::v1::{
    BucketQueryRequest, EvaluateRequest, PirQueryRequest, PirSetupRequest, SyncTagSetRequest,
};
pub use psi_server::registry;
pub use psi_server::registry::source::Source;
pub use psi_server::serving::config::ServeConfig;
pub use psi_server::serving::serve::{self, Running};
pub use psi_server::serving::service::Limits;
pub use psi_server::tools::synth::Generator;
pub use psi_testbed::fixture::{queries, registered};
pub use tonic::Code;

pub fn write_registry(path: &Path, extra: usize) {
    let mut w = csv::Writer::from_path(path).unwrap();
    w.write_record(["id", "name", "branch"]).unwrap();
    for (name, id) in registered() {
        w.write_record([id, name, "x"]).unwrap();
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
pub const LENIENT: registry::PublishGuard = registry::PublishGuard {
    max_rejected_fraction: 1.0,
    max_shrink_fraction: 1.0,
    force: false,
};

pub async fn start(data_dir: &Path, port: u16) -> Running {
    start_with_policy(data_dir, port, None).await
}

pub async fn start_with_policy(data_dir: &Path, port: u16, policy: Option<&str>) -> Running {
    start_with(data_dir, port, policy, test_limits()).await
}

/// The limits of the tests' servers: `max_batch` 64, the rest default.
pub fn test_limits() -> Limits {
    Limits {
        max_batch: 64,
        ..Limits::default()
    }
}

pub async fn start_with(
    data_dir: &Path,
    port: u16,
    policy: Option<&str>,
    limits: Limits,
) -> Running {
    let policy = policy.map(|text| {
        let path = data_dir.join("policy.toml");
        std::fs::write(&path, text).unwrap();
        let p = psi_server::serving::policy::Policy::load(&path).unwrap();
        (path, p)
    });
    serve::start(ServeConfig {
        listen: format!("127.0.0.1:{port}").parse().unwrap(),
        limits,
        reload_interval: Duration::from_millis(50),
        policy,
        admin_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..ServeConfig::local(data_dir)
    })
    .await
    .unwrap()
}

pub async fn connect(
    url: &str,
    cache: &Path,
    pin: Option<String>,
) -> Result<Session, psi_client::Error> {
    Session::connect_when_ready(client_options(url, cache, pin), Duration::from_secs(10)).await
}

/// The tests' connection options.
pub fn client_options(url: &str, cache: &Path, pin: Option<String>) -> ConnectOptions {
    ConnectOptions {
        server: url.to_string(),
        pin_key: pin,
        pin_exact: false,
        cache_dir: cache.to_path_buf(),
        blinding: psi_core::Blinding::Additive,
        concurrency: 3,
        tls: None,
        purpose: "kyc-onboarding".to_string(),
    }
}

pub struct Fixture {
    pub _dir: tempfile::TempDir,
    pub root: PathBuf,
    pub data_dir: PathBuf,
    pub running: Running,
    pub url: String,
}

pub async fn fixture(extra: usize) -> Fixture {
    fixture_with(extra, test_limits()).await
}

pub async fn fixture_with(extra: usize, limits: Limits) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let csv = root.join("registry.csv");
    write_registry(&csv, extra);
    let data_dir = root.join("data");
    let report =
        registry::init_guarded(&Source::csv(&csv), &data_dir, false, &LENIENT, None).unwrap();
    assert_eq!(report.counts.accepted, (registered().len() + extra) as u64);
    assert_eq!(report.counts.rejected_total(), 2);
    let running = start_with(&data_dir, 0, None, limits).await;
    let url = format!("http://{}", running.local_addr);
    Fixture {
        _dir: dir,
        root,
        data_dir,
        running,
        url,
    }
}

pub fn write_queries(path: &Path, repeat: usize) -> Vec<&'static str> {
    let mut w = csv::Writer::from_path(path).unwrap();
    w.write_record(["row", "name", "note", "id"]).unwrap();
    let mut expected = Vec::new();
    for r in 0..repeat {
        for (i, q) in queries().into_iter().enumerate() {
            w.write_record([format!("{r}-{i}").as_str(), q.name, q.what, q.id])
                .unwrap();
            expected.push(q.expected);
        }
    }
    w.flush().unwrap();
    expected
}

/// A batch from `input` to `output` in `mode`, `chunk_rows` rows a chunk.
pub fn options(input: &Path, output: &Path, mode: QueryMode, chunk_rows: usize) -> BatchOptions {
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
pub fn audit_records(path: &Path) -> Vec<serde_json::Value> {
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

pub fn read_output(path: &Path) -> Vec<csv::StringRecord> {
    let mut r = csv::Reader::from_path(path).unwrap();
    let headers = r.headers().unwrap().clone();
    assert_eq!(
        headers.iter().collect::<Vec<_>>(),
        ["row", "name", "note", "id", "result", "error"]
    );
    r.records().map(Result::unwrap).collect()
}

/// A raw request with a declared purpose, as every query must carry.
pub fn with_purpose<T>(message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut()
        .insert(psi_proto::PURPOSE_HEADER, "kyc-onboarding".parse().unwrap());
    r
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A synthetic person who is not in the fixture's registry.
pub fn newcomer() -> (String, String) {
    let p = Generator::new(4242, psi_core::CivilDate::today())
        .unwrap()
        .next()
        .unwrap();
    (p.name, p.id)
}

pub fn write_pairs(path: &Path, pairs: &[(&str, &str)]) {
    let mut w = csv::Writer::from_path(path).unwrap();
    w.write_record(["name", "id"]).unwrap();
    for (name, id) in pairs {
        w.write_record([*name, *id]).unwrap();
    }
    w.flush().unwrap();
}

pub async fn answers(
    session: &Session,
    pairs: &[(&str, &str)],
    mode: QueryMode,
) -> Vec<CheckOutcome> {
    let mut out = Vec::new();
    for (name, id) in pairs {
        out.push(check(session, name, id, mode).await.unwrap());
    }
    out
}

/// Waits until the server publishes `version` (its reload interval is 50 ms here).
pub async fn reconnect_at(session: &Session, version: u64) -> Session {
    for _ in 0..200 {
        let s = session.reconnect().await.unwrap();
        if s.info().registry_version >= version {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the server did not publish registry version {version}");
}

/// Reads the admin port's metrics page.
pub async fn metrics_text(running: &Running) -> String {
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

pub async fn start_with_limits(data_dir: &Path, limits: Limits) -> Running {
    serve::start(ServeConfig {
        limits,
        reload_interval: Duration::from_millis(50),
        ..ServeConfig::local(data_dir)
    })
    .await
    .unwrap()
}

pub fn curve25519_dalek_basepoint() -> [u8; 32] {
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
