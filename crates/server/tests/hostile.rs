//! Hostile peers against the real `psi-server` binary over real sockets:
//! partial bodies, stalled response streams, idle and half-open connections
//! (plaintext and TLS), a low open-file limit, cancelled work, malformed and
//! oversized messages. Each test is one class of fault from the hardening
//! issue, and fails on a server without the corresponding limit.
//!
//! Attackers connect from 127.0.0.2 so that the per-address connection
//! limit leaves the honest client on 127.0.0.1 alone.

// Integration tests: a failed unwrap, expect or index is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use psi_client::{ConnectOptions, Session};
use psi_core::Record;
use psi_server::registry::source::Source;
use psi_server::tools::synth::Generator;
use psi_testbed::raw_h2::{
    framed, grpc_status, health_request, match_request, send_all, tcp_from, wait_closed, ATTACKER,
};
use tokio::net::TcpStream;

const PURPOSE: &str = "kyc-onboarding";

/// A data directory with a synthetic registry of `n` people; returns the
/// directory and one registered pair.
fn registry(n: usize) -> (tempfile::TempDir, PathBuf, (String, String)) {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("registry.csv");
    let mut w = csv::Writer::from_path(&csv).unwrap();
    w.write_record(["name", "id"]).unwrap();
    let people: Vec<_> = Generator::new(11, psi_core::CivilDate::today())
        .unwrap()
        .take(n)
        .collect();
    for p in &people {
        w.write_record([p.name.as_str(), p.id.as_str()]).unwrap();
    }
    w.flush().unwrap();
    let data = dir.path().join("data");
    psi_server::registry::init(&Source::csv(&csv), &data, false).unwrap();
    let first = (people[0].name.clone(), people[0].id.clone());
    (dir, data, first)
}

struct Server {
    child: Child,
    addr: SocketAddr,
    data: PathBuf,
}

impl Server {
    /// `psi-server serve` on a free loopback port, with `args` added; waits
    /// until it answers.
    async fn start(data: &Path, args: &[&str]) -> Self {
        Self::start_with(data, args, None).await
    }

    async fn start_with(data: &Path, args: &[&str], open_files: Option<u32>) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let bin = env!("CARGO_BIN_EXE_psi-server");
        let mut cmd = match open_files {
            // The open-file limit is set by the shell the server replaces.
            Some(n) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                    .arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.args(["serve", "--listen", &addr.to_string(), "--data-dir"])
            .arg(data)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(data.join("server.log")).unwrap());
        let child = cmd.spawn().unwrap();
        let server = Self {
            child,
            addr,
            data: data.to_path_buf(),
        };
        for _ in 0..400 {
            if TcpStream::connect(addr).await.is_ok() {
                return server;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the server did not start: {}", server.log());
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.data.join("server.log")).unwrap_or_default()
    }

    /// Resident memory now and at its peak, in KiB.
    fn memory_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap()
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// CPU time used so far (user + system).
    fn cpu(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        Duration::from_millis(ticks * 10)
    }

    /// Waits until the server is idle (under 20 ms of CPU in 300 ms: no
    /// loading, no database build, no request work left), so that CPU
    /// measured from now on is the test's alone.
    async fn settled(&self) {
        let started = std::time::Instant::now();
        loop {
            let before = self.cpu();
            tokio::time::sleep(Duration::from_millis(300)).await;
            if self.cpu().saturating_sub(before) < Duration::from_millis(20) {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the server never went idle"
            );
        }
    }

    /// The audit trail's records as (method, outcome, elements).
    fn audit(&self) -> Vec<(String, String, u64)> {
        let mut out = Vec::new();
        psi_server::serving::audit::export(
            self.data.join(psi_server::serving::audit::AUDIT_FILE),
            &psi_server::serving::audit::ExportFilter::default(),
            psi_server::serving::audit::Format::Csv,
            &mut out,
        )
        .unwrap();
        let mut r = csv::Reader::from_reader(out.as_slice());
        r.records()
            .map(|rec| {
                let rec = rec.unwrap();
                (
                    rec[4].to_string(),
                    rec[7].to_string(),
                    rec[6].parse().unwrap(),
                )
            })
            .collect()
    }

    /// Waits until the audit trail holds `n` records with `method` and
    /// `outcome` (refusals are written as their requests end).
    async fn audited(&self, method: &str, outcome: &str, n: usize) -> Vec<(String, String, u64)> {
        let mut found = Vec::new();
        for _ in 0..200 {
            found = self
                .audit()
                .into_iter()
                .filter(|(m, o, _)| m == method && o == outcome)
                .collect();
            if found.len() >= n {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "{} {method} records with outcome {outcome}, expected {n}; all: {:?}",
            found.len(),
            self.audit()
        );
    }

    async fn session(&self, cache: &Path) -> Session {
        Session::connect_when_ready(
            ConnectOptions {
                server: self.url(),
                pin_key: None,
                pin_exact: false,
                cache_dir: cache.to_path_buf(),
                blinding: psi_core::Blinding::Additive,
                concurrency: 2,
                tls: None,
                purpose: PURPOSE.into(),
            },
            Duration::from_secs(20),
        )
        .await
        .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An honest bucket-mode check of a registered pair.
async fn honest_check(server: &Server, cache: &Path, pair: &(String, String)) -> bool {
    let session = server.session(cache).await;
    let record = Record::parse(&pair.0, &pair.1, psi_core::CivilDate::today()).unwrap();
    session.bucket_check(&[record]).await.unwrap().found[0]
}

/// Whether the server closes `s` within 20 s (whatever it sends first).
async fn closed_by_peer(s: TcpStream) -> bool {
    tokio::time::timeout(Duration::from_secs(20), wait_closed(s))
        .await
        .is_ok()
}

/// An honest check that retries for up to 20 s while it is refused at the
/// connection level (as a client behind a full server would).
async fn honest_check_eventually(server: &Server, cache: &Path, pair: &(String, String)) -> bool {
    let record = Record::parse(&pair.0, &pair.1, psi_core::CivilDate::today()).unwrap();
    let started = std::time::Instant::now();
    loop {
        let opts = ConnectOptions {
            server: server.url(),
            pin_key: None,
            pin_exact: false,
            cache_dir: cache.to_path_buf(),
            blinding: psi_core::Blinding::Additive,
            concurrency: 1,
            tls: None,
            purpose: PURPOSE.into(),
        };
        let attempt = async {
            let session = Session::connect(opts).await?;
            session.bucket_check(std::slice::from_ref(&record)).await
        };
        match attempt.await {
            Ok(answers) => return answers.found[0],
            Err(e) if started.elapsed() < Duration::from_secs(20) => {
                eprintln!("honest check refused, retrying: {e:#}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!("honest check failed for 20 s: {e:#}"),
        }
    }
}

/// An HTTP/2 connection from the attacker's address; `window` is the
/// receive window it advertises per stream. The handle resolves when the
/// server closes the connection.
async fn h2_from(
    to: SocketAddr,
    window: Option<u32>,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tcp = tcp_from(ATTACKER, to).await.unwrap();
    let mut builder = h2::client::Builder::new();
    if let Some(w) = window {
        builder.initial_window_size(w);
    }
    let (send, conn) = builder.handshake(tcp).await.unwrap();
    (send, tokio::spawn(conn))
}

const RESOURCE_EXHAUSTED: i32 = 8;
const INVALID_ARGUMENT: i32 = 3;
const DEADLINE_EXCEEDED: i32 = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partial_request_bodies_stay_within_the_buffer_budget() {
    let (dir, data, pair) = registry(2_000);
    // 32 MiB server-wide, 8 MiB per connection, 4 MiB messages.
    let server = Server::start(
        &data,
        &[
            "--max-message-bytes",
            "4194304",
            "--buffer-budget-bytes",
            "33554432",
            "--connection-buffer-bytes",
            "8388608",
            "--body-timeout",
            "20s",
        ],
    )
    .await;
    assert!(honest_check(&server, &dir.path().join("c1"), &pair).await);
    let (before, _) = server.memory_kib();

    // 500 streams on 16 connections (32 streams each, the per-connection
    // limit), each a SyncTagSet whose prefix claims 4 MiB - 64 bytes and
    // which sends all but the last byte, and never ends.
    let claimed = (4 << 20) - 64;
    let mut message = vec![0u8; claimed + 5];
    message[1..5].copy_from_slice(&u32::try_from(claimed).unwrap().to_be_bytes());
    message.pop();
    let message = Bytes::from(message);
    let mut held = Vec::new();
    let mut refused = Vec::new();
    for _ in 0..16 {
        let (send, conn) = h2_from(server.addr, None).await;
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let mut send = send.clone().ready().await.unwrap();
            let (response, mut stream) = send
                .send_request(match_request("http", "SyncTagSet", PURPOSE).unwrap(), false)
                .unwrap();
            let message = message.clone();
            tasks.push(tokio::spawn(async move {
                send_all(&mut stream, message, false).await;
                (grpc_status(response).await, stream)
            }));
        }
        held.push((send, conn, tasks));
    }
    // Wait until every stream has sent what it could or been refused.
    for (_, _, tasks) in &mut held {
        for t in tasks.drain(..) {
            let (status, stream) = tokio::time::timeout(Duration::from_secs(60), t)
                .await
                .expect("a stream neither sent its body nor was refused")
                .unwrap();
            refused.push(status);
            drop(stream);
        }
    }
    let (_, peak) = server.memory_kib();
    let grown_mib = peak.saturating_sub(before) / 1024;
    eprintln!("500 partial bodies: resident memory {before} KiB before, peak {peak} KiB");
    // The bound: the 32 MiB budget, tonic's copy of what it holds (x2), and
    // the HTTP/2 windows of 16 connections (1 MiB each), with 32 MiB to spare.
    assert!(
        grown_mib <= 32 * 2 + 16 + 32,
        "resident memory grew by {grown_mib} MiB under 500 partial bodies"
    );
    let over_budget = refused
        .iter()
        .filter(|s| **s == Some(RESOURCE_EXHAUSTED))
        .count();
    assert!(
        over_budget >= 400,
        "{over_budget} of 500 partial bodies refused as over the budget: {refused:?}"
    );
    let records = server
        .audited("SyncTagSet", "ResourceExhausted", over_budget)
        .await;
    assert_eq!(records.len(), over_budget);
    drop(held);
    // With the attacker gone the budget is free again.
    assert!(honest_check(&server, &dir.path().join("c2"), &pair).await);

    // A BucketQuery is refused as soon as it passes its own small limit:
    // a mistake in the request (as one element over the batch limit is).
    let (send, _conn) = h2_from(server.addr, None).await;
    let mut send = send.ready().await.unwrap();
    let (response, mut stream) = send
        .send_request(
            match_request("http", "BucketQuery", PURPOSE).unwrap(),
            false,
        )
        .unwrap();
    let big = Bytes::from(vec![0u8; 1 << 20]);
    send_all(&mut stream, big, false).await;
    assert_eq!(grpc_status(response).await, Some(INVALID_ARGUMENT));
    server.audited("BucketQuery", "InvalidArgument", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_response_streams_hold_a_slot_and_are_cut_at_the_stream_timeout() {
    let (dir, data, pair) = registry(20_000);
    let server = Server::start(
        &data,
        &[
            "--max-concurrent-per-institution",
            "16",
            "--stream-timeout",
            "4s",
            "--idle-timeout",
            "5s",
        ],
    )
    .await;
    assert!(honest_check(&server, &dir.path().join("c0"), &pair).await);
    let (before, _) = server.memory_kib();
    // 500 SyncTagSet requests with 1 MiB of held digests each, on 16
    // connections that advertise a receive window of 0: the server can send
    // headers but no data, so an admitted stream stalls.
    let request = psi_proto::v1::SyncTagSetRequest {
        key_epoch: 1,
        held_version: 0,
        held_digests: vec![7u8; 1 << 20],
        root_only: false,
        ..Default::default()
    };
    let body = framed(&prost::Message::encode_to_vec(&request));
    let mut connections = Vec::new();
    let mut pending = Vec::new();
    for _ in 0..16 {
        let (send, conn) = h2_from(server.addr, Some(0)).await;
        for _ in 0..32 {
            if pending.len() == 500 {
                break;
            }
            let mut send = send.clone().ready().await.unwrap();
            let (response, mut stream) = send
                .send_request(match_request("http", "SyncTagSet", PURPOSE).unwrap(), false)
                .unwrap();
            let body = body.clone();
            pending.push(tokio::spawn(async move {
                // Refused streams are reset before all of it is sent.
                send_all(&mut stream, body, true).await;
                let headers = tokio::time::timeout(Duration::from_secs(10), response)
                    .await
                    .expect("no response headers")
                    .map(|r| r.headers().get("grpc-status").cloned());
                (headers, stream)
            }));
        }
        connections.push((send, conn));
    }
    let mut refused = 0;
    let mut stalled = 0;
    let mut streams = Vec::new();
    for p in pending {
        let (headers, stream) = p.await.unwrap();
        streams.push(stream);
        match headers {
            // Trailers-only: refused at once, over the institution's slots.
            Ok(Some(code)) => {
                assert_eq!(code, "8");
                refused += 1;
            }
            Ok(None) => stalled += 1,
            Err(e) => panic!("unexpected: {e}"),
        }
    }
    // 16 streams hold the institution's 16 slots while stalled; the other
    // 484 are refused before their bodies are read.
    assert_eq!((stalled, refused), (16, 484));
    let (_, peak) = server.memory_kib();
    let grown_mib = peak.saturating_sub(before) / 1024;
    eprintln!("500 stalled streams: resident memory {before} KiB before, peak {peak} KiB");
    // The bound: 16 admitted bodies of 1 MiB (x2 for tonic's decoded copy),
    // 16 connection windows of 1 MiB, and 32 MiB to spare.
    assert!(
        grown_mib <= 32 + 16 + 32,
        "resident memory grew by {grown_mib} MiB under 500 stalled streams"
    );
    // At the stream timeout the server closes the connections that carry
    // stalled streams (the others, whose streams were refused, at the idle
    // timeout).
    for (_, conn) in connections {
        let closed = tokio::time::timeout(Duration::from_secs(30), conn).await;
        assert!(closed.is_ok(), "a stalled connection was never closed");
    }
    drop(streams);
    server.audited("SyncTagSet", "ResourceExhausted", 484).await;
    // The slots are free again.
    assert!(honest_check(&server, &dir.path().join("c"), &pair).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_connections_are_closed_and_do_not_keep_out_honest_checks() {
    let (dir, data, pair) = registry(2_000);
    let server = Server::start(
        &data,
        &[
            "--handshake-timeout",
            "2s",
            "--idle-timeout",
            "2s",
            "--max-connections-per-peer",
            "600",
            "--max-connections",
            "700",
        ],
    )
    .await;
    // An honest session used, left idle past the idle timeout, used again.
    let session = server.session(&dir.path().join("c0")).await;
    let record = Record::parse(&pair.0, &pair.1, psi_core::CivilDate::today()).unwrap();
    assert!(
        session
            .bucket_check(std::slice::from_ref(&record))
            .await
            .unwrap()
            .found[0]
    );
    let mut idle = Vec::new();
    for _ in 0..500 {
        idle.push(tcp_from(ATTACKER, server.addr).await.unwrap());
    }
    // An honest check while the 500 are held.
    let started = std::time::Instant::now();
    assert!(honest_check(&server, &dir.path().join("c"), &pair).await);
    eprintln!(
        "honest check with 500 idle connections held: {:?}",
        started.elapsed()
    );
    // Every idle connection is closed by the server (EOF or reset) after
    // the server's SETTINGS frame.
    for s in idle {
        assert!(closed_by_peer(s).await, "an idle connection was left open");
    }
    // A connection that made a request and went quiet is closed too.
    let (send, conn) = h2_from(server.addr, None).await;
    let mut send = send.ready().await.unwrap();
    let (response, _stream) = send.send_request(health_request("http"), false).unwrap();
    drop(response);
    drop(_stream);
    let closed = tokio::time::timeout(Duration::from_secs(30), conn).await;
    assert!(closed.is_ok(), "an idle HTTP/2 connection was never closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn half_open_tls_handshakes_are_closed() {
    let (_dir, data, _) = registry(200);
    let ca = data.join("ca");
    psi_server::tools::ca::init(&ca, &["127.0.0.1".to_string()]).unwrap();
    let server = Server::start(
        &data,
        &[
            "--tls-cert",
            ca.join("server.pem").to_str().unwrap(),
            "--tls-key",
            ca.join("server.key").to_str().unwrap(),
            "--client-ca",
            ca.join("ca.pem").to_str().unwrap(),
            "--handshake-timeout",
            "2s",
        ],
    )
    .await;
    let mut held = Vec::new();
    for i in 0..100 {
        let mut s = tcp_from(ATTACKER, server.addr).await.unwrap();
        if i % 2 == 0 {
            // The first bytes of a ClientHello, then nothing.
            use tokio::io::AsyncWriteExt;
            s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
                .await
                .unwrap();
        }
        held.push(s);
    }
    for s in held {
        assert!(
            closed_by_peer(s).await,
            "a half-open TLS connection was left open"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_low_open_file_limit_neither_spins_nor_crashes_the_server() {
    let (dir, data, pair) = registry(2_000);
    // 128 descriptors: max_connections is fitted to 128 - 64 = 64.
    let server = Server::start_with(
        &data,
        &[
            "--handshake-timeout",
            "3s",
            "--max-connections-per-peer",
            "1000",
        ],
        Some(128),
    )
    .await;
    server.settled().await;
    let cpu_before = server.cpu();
    let mut held = Vec::new();
    for _ in 0..150 {
        if let Ok(s) = tcp_from(ATTACKER, server.addr).await {
            held.push(s);
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let spent = server.cpu().saturating_sub(cpu_before);
    // A spinning accept loop burns the whole 2 s on one core.
    assert!(
        spent < Duration::from_millis(1000),
        "the server used {spent:?} of CPU in 2 s while 150 connections were held"
    );
    assert!(
        server.log().contains("max_connections lowered"),
        "{}",
        server.log()
    );
    // Honest checks get through once the handshake timeout frees the slots.
    assert!(honest_check_eventually(&server, &dir.path().join("c"), &pair).await);
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelled_evaluations_stop_and_are_recorded() {
    let (dir, data, pair) = registry(2_000);
    let server = Server::start(&data, &[]).await;
    let session = server.session(&dir.path().join("c")).await;
    let epoch = session.info().key_epoch;
    // 4096 valid blinded elements, reused by every request.
    let client = psi_core::Client::new(
        psi_core::Mode::Voprf,
        psi_core::PublicKey::from_bytes(&session.info().public_key).unwrap(),
    );
    let inputs: Vec<Vec<u8>> = (0..4096u32).map(|i| i.to_be_bytes().to_vec()).collect();
    let refs: Vec<&[u8]> = inputs.iter().map(Vec::as_slice).collect();
    let (_, blinded) = client
        .blind(&refs, psi_core::Blinding::Additive, &mut rand_core::OsRng)
        .unwrap();
    let request = psi_proto::v1::EvaluateRequest {
        key_epoch: epoch,
        blinded_elements: psi_proto::pack(blinded.iter().map(|b| &b.0)),
        ..Default::default()
    };
    let mut channel = psi_proto::v1::match_client::MatchClient::connect(server.url())
        .await
        .unwrap()
        .max_decoding_message_size(64 << 20);
    let evaluate = || {
        let mut req = tonic::Request::new(request.clone());
        req.metadata_mut()
            .insert(psi_proto::PURPOSE_HEADER, PURPOSE.parse().unwrap());
        req
    };
    // What one Evaluate(4096) costs in full, on this machine.
    server.settled().await;
    let before_full = server.cpu();
    for _ in 0..2 {
        channel.evaluate(evaluate()).await.unwrap();
    }
    let full = server.cpu().saturating_sub(before_full) / 2;
    server.settled().await;
    let cpu_before = server.cpu();
    for _ in 0..40 {
        // Dropped after 15 ms: the client cancels the stream.
        let _ = tokio::time::timeout(Duration::from_millis(15), channel.evaluate(evaluate())).await;
    }
    // An honest check right behind them.
    let record = Record::parse(&pair.0, &pair.1, psi_core::CivilDate::today()).unwrap();
    assert!(session.bucket_check(&[record]).await.unwrap().found[0]);
    let records = server.audited("Evaluate", "Cancelled", 40).await;
    assert!(records.iter().all(|(_, _, n)| *n == 4096), "{records:?}");
    // Whatever work of theirs was still running has ended once the server
    // is idle again.
    server.settled().await;
    let spent = server.cpu().saturating_sub(cpu_before);
    eprintln!(
        "one Evaluate(4096) in full: {full:?} of server CPU; 40 cancelled after 15 ms and one honest check: {spent:?}"
    );
    // Run to the end they would cost 40 x `full`; stopped within a chunk
    // of their cancellation they cost a fraction of it.
    assert!(
        spent * 4 < full * 40 * 3,
        "40 cancelled evaluations cost {spent:?} of server CPU, one in full {full:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_oversized_and_late_requests_are_refused_precisely_and_recorded() {
    let (_dir, data, _) = registry(200);
    let server = Server::start(&data, &["--body-timeout", "2s", "--max-batch", "64"]).await;
    let (send, _conn) = h2_from(server.addr, None).await;
    let call = |method: &str, body: Bytes, end: bool| {
        let send = send.clone();
        let req = match_request("http", method, PURPOSE).unwrap();
        async move {
            let mut send = send.ready().await.unwrap();
            let (response, mut stream) = send.send_request(req, false).unwrap();
            send_all(&mut stream, body, end).await;
            let status = grpc_status(response).await;
            drop(stream);
            status
        }
    };
    // Not protobuf: field 2 claims 100 bytes, 1 follows.
    assert_eq!(
        call("Evaluate", framed(&[0x12, 100, 0]), true).await,
        Some(INVALID_ARGUMENT)
    );
    // The body ends inside the message its prefix announced.
    let mut truncated = framed(&[0u8; 100]).to_vec();
    truncated.truncate(40);
    assert_eq!(
        call("Evaluate", truncated.into(), true).await,
        Some(INVALID_ARGUMENT)
    );
    // 65 elements when the limit is 64: refused before it is all read,
    // with the status a batch just over the limit gets.
    let over = psi_proto::v1::EvaluateRequest {
        key_epoch: 1,
        blinded_elements: vec![1u8; 32 * 65 + 200],
        ..Default::default()
    };
    assert_eq!(
        call(
            "Evaluate",
            framed(&prost::Message::encode_to_vec(&over)),
            true
        )
        .await,
        Some(INVALID_ARGUMENT)
    );
    // Half a body, then silence: refused at the body timeout.
    let half = framed(&[0u8; 1000]).slice(..500);
    assert_eq!(
        call("BucketQuery", half, false).await,
        Some(DEADLINE_EXCEEDED)
    );
    server.audited("Evaluate", "InvalidArgument", 3).await;
    server.audited("BucketQuery", "DeadlineExceeded", 1).await;

    // A client deadline shorter than the work: the answer is not waited
    // for, and the request is recorded as past its deadline.
    let session = server.session(&_dir.path().join("c")).await;
    let valid = psi_core::Client::new(
        psi_core::Mode::Voprf,
        psi_core::PublicKey::from_bytes(&session.info().public_key).unwrap(),
    )
    .blind(
        &[b"x".as_slice(); 64],
        psi_core::Blinding::Additive,
        &mut rand_core::OsRng,
    )
    .unwrap()
    .1;
    let mut client = psi_proto::v1::match_client::MatchClient::connect(server.url())
        .await
        .unwrap();
    let mut req = tonic::Request::new(psi_proto::v1::EvaluateRequest {
        key_epoch: session.info().key_epoch,
        blinded_elements: psi_proto::pack(valid.iter().map(|b| &b.0)),
        ..Default::default()
    });
    req.metadata_mut()
        .insert(psi_proto::PURPOSE_HEADER, PURPOSE.parse().unwrap());
    req.set_timeout(Duration::from_micros(200));
    assert!(client.evaluate(req).await.is_err());
    server.audited("Evaluate", "DeadlineExceeded", 1).await;

    // Every refusal is in the audit trail and nowhere did the server fall over.
    let verified =
        psi_server::serving::audit::verify(data.join(psi_server::serving::audit::AUDIT_FILE))
            .unwrap();
    assert_eq!(verified.records, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_and_metadata_per_connection_are_limited() {
    let (_dir, data, _) = registry(200);
    let server = Server::start(&data, &["--max-concurrent-streams", "4"]).await;
    let (send, _conn) = h2_from(server.addr, None).await;
    let mut send = send.ready().await.unwrap();
    // The limit is advertised in the server's SETTINGS (received by the
    // time a first request is answered).
    let (response, mut stream) = send.send_request(health_request("http"), false).unwrap();
    send_all(&mut stream, framed(&[]), true).await;
    assert_eq!(grpc_status(response).await, Some(0));
    assert_eq!(send.current_max_send_streams(), 4);
    // Four open streams (bodies not yet sent) use them up: a fifth request
    // waits until one of them ends.
    let mut open = Vec::new();
    for _ in 0..4 {
        let mut s = send.clone().ready().await.unwrap();
        open.push(
            s.send_request(
                match_request("http", "BucketQuery", PURPOSE).unwrap(),
                false,
            )
            .unwrap(),
        );
    }
    let mut s = send.clone().ready().await.unwrap();
    let (fifth, mut stream) = s.send_request(health_request("http"), false).unwrap();
    // Buffered by h2 until the stream may open (no waiting for capacity).
    stream.send_data(framed(&[]), true).unwrap();
    let mut fifth = Box::pin(grpc_status(fifth));
    assert!(
        tokio::time::timeout(Duration::from_secs(1), &mut fifth)
            .await
            .is_err(),
        "a fifth concurrent stream was served"
    );
    drop(open);
    assert_eq!(fifth.await, Some(0));
    // A request whose metadata is over 16 KiB is refused, the connection kept.
    let (send, conn) = h2_from(server.addr, None).await;
    let mut send = send.ready().await.unwrap();
    let mut big = match_request("http", "BucketQuery", PURPOSE).unwrap();
    big.headers_mut()
        .insert("x-padding", "a".repeat(20_000).parse().unwrap());
    let (response, _stream) = send.send_request(big, true).unwrap();
    // Refused by the server, with an HTTP status or a stream reset, never
    // served; an error of our own h2 client's would prove nothing.
    match response.await {
        Ok(r) => assert_ne!(r.status(), 200, "{r:?}"),
        Err(e) => assert!(
            e.is_remote() && (e.is_reset() || e.is_go_away()),
            "not a refusal by the server: {e:?}"
        ),
    }
    assert!(!conn.is_finished());
}
