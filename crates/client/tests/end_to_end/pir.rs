//! PIR mode: the same answers as the other modes, malformed requests, and
//! its limits.

use super::common::*;

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

    let expected = every_row_alike_in_three_modes(&f, &session).await;

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

    the_audit_trail_says_nothing_of_the_pair(&f, &session).await;
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
        scheme: String::new(),
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
        ..Default::default()
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
    let mut client = psi_pir::SchemeClient::new(shape, epoch, &[5; 32]).unwrap();
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
            "pir_max_batch = 4",
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
    let mut client = psi_pir::SchemeClient::new(shape, epoch, &[8; 32]).unwrap();
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
            scheme: String::new(),
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
            ..Default::default()
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ypir_sp_answers_every_row_like_the_other_modes_through_an_update_and_a_rotation() {
    let f = fixture_with(
        3000,
        Limits {
            pir_scheme: psi_pir::SchemeChoice::Ypir,
            ..test_limits()
        },
    )
    .await;
    let session = connect(&f.url, &f.root.join("cache"), None).await.unwrap();
    let info = session.info().pir.clone().expect("PIR mode offered");
    assert_eq!(info.scheme, psi_pir::ypir::SCHEME);
    // A registry this small has few buckets (each a whole item's worth):
    // items of several groups.
    assert_eq!((info.nu1, info.nu2), (0, 0));
    assert!(info.groups >= 1 && info.query_bytes <= 2_000_000);
    // 12 KiB a group: 2048 coefficients of 28 + 20 bits.
    assert_eq!(info.answer_bytes, u64::from(info.groups) * 2048 * 6);

    every_row_alike_in_three_modes(&f, &session).await;
    the_audit_trail_says_nothing_of_the_pair(&f, &session).await;

    // An update: the database patched, the answers follow.
    let (new_name, new_id) = newcomer();
    let pairs = [
        ("张伟", "11010519491231002X"),
        (new_name.as_str(), new_id.as_str()),
    ];
    let add = f.root.join("add.csv");
    let remove = f.root.join("remove.csv");
    write_pairs(&add, &[pairs[1]]);
    write_pairs(&remove, &[pairs[0]]);
    registry::update_guarded(
        Some(&Source::csv(&add)),
        Some(&Source::csv(&remove)),
        &f.data_dir,
        false,
        &LENIENT,
    )
    .unwrap();
    let session = reconnect_at(&session, 2).await;
    for mode in [QueryMode::Pir, QueryMode::Bucket] {
        assert_eq!(
            answers(&session, &pairs, mode).await,
            [CheckOutcome::NoMatch, CheckOutcome::Match],
            "{mode:?}"
        );
    }

    // An update that fills the items past their columns changes the shape.
    // A session that read the old one is refused (x-psi-pir-shape), reads
    // ServerInfo again by itself and answers right.
    let before = session.info().pir.clone().unwrap();
    let more: Vec<(String, String)> = Generator::new(777, psi_core::CivilDate::today())
        .unwrap()
        .take(3000)
        .map(|p| (p.name, p.id))
        .collect();
    let more: Vec<(&str, &str)> = more.iter().map(|(n, i)| (n.as_str(), i.as_str())).collect();
    write_pairs(&add, &more);
    registry::update_guarded(Some(&Source::csv(&add)), None, &f.data_dir, false, &LENIENT).unwrap();
    let after = reconnect_at(&session, 3).await.info().pir.clone().unwrap();
    assert!(
        after.item_columns > before.item_columns,
        "{before:?} {after:?}"
    );
    assert_ne!(after.shape_id, before.shape_id);
    assert_eq!(session.info().pir.as_ref(), Some(&before));
    assert_eq!(
        answers(
            &session,
            &[pairs[0], pairs[1], more[0], more[2999]],
            QueryMode::Pir
        )
        .await,
        [
            CheckOutcome::NoMatch,
            CheckOutcome::Match,
            CheckOutcome::Match,
            CheckOutcome::Match
        ]
    );

    // A rotation: a new epoch's database and public seed; the client's
    // keys are made again for it.
    registry::rotate_key(&f.data_dir, Duration::ZERO, false).unwrap();
    let mut session = session;
    for _ in 0..200 {
        session = session.reconnect().await.unwrap();
        if session.info().key_epoch == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(session.info().key_epoch, 2);
    assert_eq!(
        answers(&session, &pairs, QueryMode::Pir).await,
        [CheckOutcome::NoMatch, CheckOutcome::Match]
    );

    // Hostile bytes: refused with INVALID_ARGUMENT, the server answers on.
    let info = session.info().pir.clone().unwrap();
    let epoch = session.info().key_epoch;
    let mut raw = MatchClient::connect(f.url.clone())
        .await
        .unwrap()
        .max_encoding_message_size(64 << 20);
    let setup = |scheme: &str, bytes: Vec<u8>| PirSetupRequest {
        key_epoch: epoch,
        public_parameters: bytes,
        scheme: scheme.to_string(),
        ..Default::default()
    };
    let keys_bytes = info.keys_bytes as usize;
    for (req, want) in [
        (setup("", vec![0; keys_bytes]), "scheme"),
        (setup(&info.scheme, vec![0; keys_bytes - 7]), "bytes"),
        (setup(&info.scheme, vec![0xff; keys_bytes]), "out of range"),
    ] {
        let e = raw.pir_setup(with_purpose(req)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{want}: {e:?}");
        assert!(e.message().contains(want), "{}", e.message());
    }
    let shape = psi_client::pir::shape_of(&info).unwrap();
    let mut client = psi_pir::SchemeClient::new(shape, epoch, &[6; 32]).unwrap();
    let keys_id = raw
        .pir_setup(with_purpose(setup(
            &info.scheme,
            client.public_parameters(),
        )))
        .await
        .unwrap()
        .into_inner()
        .keys_id;
    let good = psi_proto::pack([&curve25519_dalek_basepoint()]);
    let query_bytes = info.query_bytes as usize;
    let mut out_of_range = vec![0u8; query_bytes];
    out_of_range[7..14].copy_from_slice(&[0xff; 7]);
    for (q, want) in [
        (vec![0; query_bytes - 1], "bytes"),
        (out_of_range, "out of range"),
    ] {
        let e = raw
            .pir_query(with_purpose(PirQueryRequest {
                key_epoch: epoch,
                keys_id: keys_id.clone(),
                blinded_elements: good.clone(),
                queries: vec![q],
                ..Default::default()
            }))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{want}: {e:?}");
        assert!(e.message().contains(want), "{}", e.message());
    }
    // Queries naming another shape: refused, saying the shape changed.
    let e = raw
        .pir_query(with_purpose(PirQueryRequest {
            key_epoch: epoch,
            keys_id: keys_id.clone(),
            blinded_elements: good.clone(),
            queries: vec![client.query(0).unwrap()],
            shape_id: before.shape_id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.metadata().get(psi_proto::PIR_SHAPE_HEADER).is_some());
    assert_eq!(
        answers(&session, &pairs, QueryMode::Pir).await,
        [CheckOutcome::NoMatch, CheckOutcome::Match]
    );
    f.running.shutdown().await.unwrap();
}

/// Every kind of row (formatting variants, non-members, invalid rows): the
/// same answers in PIR, bucket and sync mode; the answers expected.
async fn every_row_alike_in_three_modes(f: &Fixture, session: &Session) -> Vec<&'static str> {
    let input = f.root.join("queries.csv");
    let expected = write_queries(&input, 1);
    for mode in [QueryMode::Pir, QueryMode::Bucket, QueryMode::Sync] {
        let output = f.root.join(format!("out-{mode:?}.csv"));
        batch::run(session, &options(&input, &output, mode, 8))
            .await
            .unwrap();
        let got: Vec<String> = read_output(&output)
            .iter()
            .map(|r| r[4].to_string())
            .collect();
        assert_eq!(got, expected, "{mode:?}");
    }
    expected
}

/// Two PIR checks of different pairs (a member, a non-member) leave audit
/// records that differ only in time and request id; nothing in the
/// export, the metrics or the records depends on the pair asked.
async fn the_audit_trail_says_nothing_of_the_pair(f: &Fixture, session: &Session) {
    let audit_db = f.data_dir.join(psi_server::serving::audit::AUDIT_FILE);
    let before = audit_records(&audit_db).len();
    let member = check(session, "张伟", "11010519491231002X", QueryMode::Pir)
        .await
        .unwrap();
    let other = Generator::new(999, psi_core::CivilDate::today())
        .unwrap()
        .next()
        .unwrap();
    let stranger = check(session, &other.name, &other.id, QueryMode::Pir)
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
                "commitment",
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
        // No log commitment was sent here (and one would be salted).
        assert_eq!(r["commitment"], "");
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
        for (name, id) in registered()
            .into_iter()
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
}

/// A session's PIR checks run side by side: its PIR state is locked only
/// to find or register the public parameters. After a restart the server
/// holds none of them; concurrent checks then register them again once,
/// and the server may answer their queries with shared passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sessions_concurrent_checks_register_again_once_after_a_restart() {
    let limits = Limits {
        pir_scheme: psi_pir::SchemeChoice::Ypir,
        ..test_limits()
    };
    let f = fixture_with(3000, limits).await;
    let port = f.running.local_addr.port();
    let session = connect(&f.url, &f.root.join("cache"), None).await.unwrap();
    let people: Vec<(&str, &str)> = psi_testbed::fixture::registered()
        .into_iter()
        .take(6)
        .collect();
    let checks = |session| {
        futures::future::join_all(
            people
                .iter()
                .map(move |(name, id)| check(session, name, id, QueryMode::Pir)),
        )
    };
    for outcome in checks(&session).await {
        assert_eq!(outcome.unwrap(), CheckOutcome::Match);
    }
    f.running.shutdown().await.unwrap();
    let again = start_with(&f.data_dir, port, None, limits).await;
    for outcome in checks(&session).await {
        assert_eq!(outcome.unwrap(), CheckOutcome::Match);
    }
    again.shutdown().await.unwrap();
    let audit_db = f.data_dir.join(psi_server::serving::audit::AUDIT_FILE);
    let setups = audit_records(&audit_db)
        .iter()
        .filter(|r| r["method"] == "PirSetup")
        .count();
    assert_eq!(setups, 2, "once before the restart, once after");
}
