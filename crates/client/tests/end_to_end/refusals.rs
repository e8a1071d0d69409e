//! Precise refusals: stale epochs, hostile and malformed requests, oversized
//! messages, floods, and the operator's policy.

use super::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_epochs_and_hostile_requests_get_precise_statuses() {
    let f = fixture(100).await;
    // A rotation first, so that there is a stale epoch (1) to ask under.
    registry::rotate_key(&f.data_dir, Duration::ZERO, false).unwrap();
    let mut session = connect(&f.url, &f.root.join("cache"), None).await.unwrap();
    for _ in 0..400 {
        if session.info().key_epoch == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        session = session.reconnect().await.unwrap();
    }
    let epoch = session.info().key_epoch;
    assert_eq!(epoch, 2);
    let mut raw = MatchClient::connect(f.url.clone()).await.unwrap();
    let good = psi_proto::pack([&curve25519_dalek_basepoint()]);

    // The epoch left out (0): a malformed request, said so; not "stale".
    let missing = raw
        .evaluate(with_purpose(EvaluateRequest {
            key_epoch: 0,
            blinded_elements: good.clone(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::InvalidArgument);
    assert!(
        missing.message().contains("key_epoch is 0"),
        "{}",
        missing.message()
    );
    // One element over max_batch and twice max_batch: the same refusal,
    // naming the limit (the second is refused by the body limit, before
    // the body is read in full).
    let max = session.info().max_batch as usize;
    for n in [max + 1, 2 * max] {
        let over = raw
            .evaluate(with_purpose(EvaluateRequest {
                key_epoch: epoch,
                blinded_elements: good.repeat(n),
                ..Default::default()
            }))
            .await
            .unwrap_err();
        assert_eq!(
            over.code(),
            Code::InvalidArgument,
            "{n}: {}",
            over.message()
        );
        assert!(
            over.message().contains(&format!("max_batch = {max}")),
            "{n}: {}",
            over.message()
        );
    }

    let stale = raw
        .evaluate(with_purpose(EvaluateRequest {
            key_epoch: epoch - 1,
            blinded_elements: good.clone(),
            ..Default::default()
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
            ..Default::default()
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
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition);
    let stale = raw
        .sync_tag_set(with_purpose(SyncTagSetRequest {
            key_epoch: epoch - 1,
            held_digests: vec![],
            held_version: 0,
            root_only: false,
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition);

    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![], "empty"),
        (vec![0u8; 33], "multiple of 32"),
        (vec![0u8; 32], "identity"),
        (vec![0xffu8; 32], "canonical"),
        (good.repeat(65), "max_batch = 64"),
    ];
    for (bytes, want) in cases {
        let e = raw
            .evaluate(with_purpose(EvaluateRequest {
                key_epoch: epoch,
                blinded_elements: bytes,
                ..Default::default()
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
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = raw
        .bucket_query(with_purpose(BucketQueryRequest {
            key_epoch: epoch,
            blinded_elements: good.clone(),
            buckets: vec![],
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    // No declared purpose: refused, and recorded as refused.
    let e = raw
        .evaluate(EvaluateRequest {
            key_epoch: epoch,
            blinded_elements: good.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("purpose"), "{}", e.message());
    let mut bad = with_purpose(EvaluateRequest {
        key_epoch: epoch,
        blinded_elements: good.clone(),
        ..Default::default()
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
            blinded_elements: good,
            ..Default::default()
        }))
        .await
        .is_ok());
    f.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_limits_modes_purposes_and_rates_and_the_client_waits_it_out() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let csv = root.join("registry.csv");
    write_registry(&csv, 200);
    let data = root.join("data");
    registry::init_guarded(&Source::csv(&csv), &data, false, &LENIENT, None).unwrap();
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
        ..Default::default()
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
                ..Default::default()
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
            ..Default::default()
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
                ..Default::default()
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_and_refusal_carries_the_request_id_of_its_audit_record() {
    let f = fixture(50).await;
    let session = connect(&f.url, &f.root.join("cache"), None).await.unwrap();
    let epoch = session.info().key_epoch;
    let mut raw = MatchClient::connect(f.url.clone()).await.unwrap();
    let good = psi_proto::pack([&curve25519_dalek_basepoint()]);
    let id_of = |m: &tonic::metadata::MetadataMap| {
        m.get(psi_proto::REQUEST_ID_HEADER)
            .expect("x-psi-request-id")
            .to_str()
            .unwrap()
            .to_string()
    };
    // An answer.
    let answered = raw
        .evaluate(with_purpose(EvaluateRequest {
            key_epoch: epoch,
            blinded_elements: good.clone(),
            ..Default::default()
        }))
        .await
        .unwrap();
    let answer_id = id_of(answered.metadata());
    // A refusal by the service, and one by the admission layer (the body
    // over its limit, refused before the service sees it).
    let refused = raw
        .evaluate(with_purpose(EvaluateRequest {
            key_epoch: 0,
            blinded_elements: good.clone(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    let refused_id = id_of(refused.metadata());
    let too_big = raw
        .evaluate(with_purpose(EvaluateRequest {
            key_epoch: epoch,
            blinded_elements: good.repeat(1000),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    let too_big_id = id_of(too_big.metadata());
    // psi-client says it with its errors, and in a batch's summary.
    let mut bad_purpose = client_options(&f.url, &f.root.join("cache"), None);
    bad_purpose.purpose = "NOT VALID".into();
    let bad = Session::connect(bad_purpose).await.unwrap();
    let err = bad.evaluate(vec![b"x".to_vec()]).await.unwrap_err();
    let said = err.to_string();
    let said_id = said
        .rsplit("request id ")
        .next()
        .filter(|_| said.contains("request id "))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("{said}"))
        .to_string();
    let input = f.root.join("queries.csv");
    write_queries(&input, 1);
    let summary = batch::run(
        &session,
        &options(&input, &f.root.join("out.csv"), QueryMode::Bucket, 4),
    )
    .await
    .unwrap();
    let (first, last) = summary.request_ids.clone().expect("request ids");
    assert!(
        summary
            .to_string()
            .contains(&format!("request ids {first} to {last}")),
        "{summary}"
    );
    // The operator's audit trail holds each id with its outcome.
    let audit = audit_records(&f.data_dir.join(psi_server::serving::audit::AUDIT_FILE));
    let outcome = |id: &str| {
        audit
            .iter()
            .find(|r| r["request_id"] == id)
            .map(|r| r["outcome"].as_str().unwrap().to_string())
            .unwrap_or_else(|| panic!("{id} not in the audit trail"))
    };
    assert_eq!(outcome(&answer_id), "ok");
    assert_eq!(outcome(&refused_id), "InvalidArgument");
    assert_eq!(outcome(&too_big_id), "InvalidArgument");
    assert_eq!(outcome(&said_id), "InvalidArgument");
    assert_eq!(outcome(&first), "ok");
    assert_eq!(outcome(&last), "ok");
    assert_ne!(first, last);
    f.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_refused_at_the_connection_limit_is_told_so_and_waits() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("r.csv");
    write_registry(&csv, 10);
    let data = dir.path().join("data");
    registry::init_guarded(&Source::csv(&csv), &data, false, &LENIENT, None).unwrap();
    let running = serve::start(ServeConfig {
        net: psi_server::serving::connection::NetLimits {
            max_connections_per_peer: 1,
            ..ServeConfig::local(&data).net
        },
        ..ServeConfig::local(&data)
    })
    .await
    .unwrap();
    let url = format!("http://{}", running.local_addr);
    // This address's one connection, held.
    let held = connect(&url, &dir.path().join("held"), None).await.unwrap();
    // A second connection from the same address: refused at accept with a
    // GOAWAY saying why; the client waits (not "did not speak HTTP/2")...
    let waiting = tokio::spawn({
        let (url, cache) = (url.clone(), dir.path().join("second"));
        async move { Session::connect(client_options(&url, &cache, None)).await }
    });
    tokio::time::sleep(Duration::from_millis(600)).await;
    if waiting.is_finished() {
        let gave_up = waiting.await.unwrap().map(|_| ()).unwrap_err();
        panic!("the refused client gave up at once: {gave_up}");
    }
    // ... and is served once the address has room again.
    drop(held);
    let second = tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("connected once there was room")
        .unwrap()
        .unwrap();
    assert_eq!(second.info().key_epoch, 1);
    running.shutdown().await.unwrap();
}
