//! Running the service: health and reflection, a snapshot that fails to
//! load, a restart mid-batch, metrics.

use super::common::*;

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
    registry::init_guarded(&Source::csv(&csv), &data, false, &LENIENT, None).unwrap();
    std::fs::write(
        psi_server::store::base_file(&data).unwrap(),
        b"PSIBKT\0\x01 truncated",
    )
    .unwrap();
    let running = start(&data, 0).await;
    let err = running.run_until(std::future::pending()).await.unwrap_err();
    assert!(format!("{err:#}").contains("base index"), "{err:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_mid_batch_is_ridden_out() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let csv = root.join("registry.csv");
    write_registry(&csv, 100);
    let data = root.join("data");
    registry::init_guarded(&Source::csv(&csv), &data, false, &LENIENT, None).unwrap();
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
            blinded_elements: psi_proto::pack([&curve25519_dalek_basepoint()]),
            ..Default::default()
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
    assert!(text.contains(r#"outcome="InvalidArgument""#), "{text}");
    assert!(text.contains("psi_serving 1"), "{text}");
    assert!(
        text.contains("psi_audit_write_duration_seconds_count"),
        "{text}"
    );
    assert!(!text.contains("张伟") && !text.contains("11010519491231002"));
    f.running.shutdown().await.unwrap();
}
