//! Mutual TLS: only institutions holding a certificate from the operator's CA
//! get answers.

// Integration tests: a failed unwrap, expect or index is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::Path;
use std::time::Duration;

use psi_client::check::{check, CheckOutcome};
use psi_client::session::ClientTls;
use psi_client::{ConnectOptions, QueryMode, Session};
use psi_server::registry;
use psi_server::registry::source::Source;
use psi_server::serving::config::{ServeConfig, TlsFiles};
use psi_server::serving::serve;
use psi_server::tools::ca;

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

fn options(url: &str, cache: &Path, tls: Option<ClientTls>) -> ConnectOptions {
    ConnectOptions {
        server: url.to_string(),
        pin_key: None,
        pin_exact: false,
        cache_dir: cache.to_path_buf(),
        blinding: psi_core::Blinding::Additive,
        concurrency: 2,
        tls,
        purpose: "kyc-onboarding".to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_certificates_from_the_operators_ca_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ca_dir = root.join("ca");
    ca::init(&ca_dir, &["localhost".into(), "127.0.0.1".into()]).unwrap();
    let (cert, key) = ca::issue(&ca_dir, "bank-001", &root.join("bank"), false).unwrap();
    let rogue_dir = root.join("rogue-ca");
    ca::init(&rogue_dir, &["localhost".into()]).unwrap();
    let (rogue_cert, rogue_key) =
        ca::issue(&rogue_dir, "bank-001", &root.join("rogue"), false).unwrap();

    let csv = root.join("registry.csv");
    std::fs::write(&csv, "name,id\n张伟,11010519491231002X\n").unwrap();
    let data = root.join("data");
    registry::init(&Source::csv(&csv), &data, false).unwrap();
    let running = serve::start(ServeConfig {
        audit_db: root.join("audit.sqlite").into(),
        tls: Some(TlsFiles {
            cert: read(&ca_dir.join(ca::SERVER_CERT)),
            key: read(&ca_dir.join(ca::SERVER_KEY)),
            client_ca: read(&ca_dir.join(ca::CA_CERT)),
        }),
        ..ServeConfig::local(&data)
    })
    .await
    .unwrap();
    let port = running.local_addr.port();
    let url = format!("https://127.0.0.1:{port}");

    let good = ClientTls {
        ca: read(&ca_dir.join(ca::CA_CERT)),
        cert: read(&cert),
        key: read(&key),
    };
    let session = Session::connect_when_ready(
        options(&url, &root.join("cache"), Some(good.clone())),
        Duration::from_secs(10),
    )
    .await
    .expect("the institution with a valid certificate connects");
    assert_eq!(
        check(&session, "张伟", "11010519491231002X", QueryMode::Bucket)
            .await
            .unwrap(),
        CheckOutcome::Match
    );
    assert_eq!(
        check(&session, "张伟", "11010519491231002X", QueryMode::Sync)
            .await
            .unwrap(),
        CheckOutcome::Match
    );

    // A certificate from another CA (same institution name): refused.
    let rogue = ClientTls {
        ca: read(&ca_dir.join(ca::CA_CERT)),
        cert: read(&rogue_cert),
        key: read(&rogue_key),
    };
    assert!(
        Session::connect(options(&url, &root.join("c2"), Some(rogue)))
            .await
            .is_err()
    );

    // No client certificate at all: refused.
    let endpoint = tonic::transport::Endpoint::from_shared(url.clone())
        .unwrap()
        .tls_config(tonic::transport::ClientTlsConfig::new().ca_certificate(
            tonic::transport::Certificate::from_pem(read(&ca_dir.join(ca::CA_CERT))),
        ))
        .unwrap();
    let no_cert = match endpoint.connect().await {
        Ok(channel) => psi_proto::v1::match_client::MatchClient::new(channel)
            .get_server_info(psi_proto::v1::GetServerInfoRequest {})
            .await
            .is_err(),
        Err(_) => true,
    };
    assert!(no_cert, "a client without a certificate must be refused");

    // Plaintext to the TLS port: refused, saying what to do.
    let plain = format!("http://127.0.0.1:{port}");
    let err = Session::connect(options(&plain, &root.join("c3"), None))
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("use an https:// URL"),
        "{err:#}"
    );

    running.shutdown().await.unwrap();
}
