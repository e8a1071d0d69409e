//! The registry changing under clients: live updates synced as deltas, a
//! batch during updates, a key rotation, tag parameters outgrown.

use super::common::*;

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

    // Bucket mode with the session of version 1: the server answers with
    // the version it serves now, and the summary names that version, not
    // the one the session connected at.
    let latest = reconnect_at(&session, 51).await.info().registry_version;
    assert_eq!(session.info().registry_version, 1);
    let summary = batch::run(
        &session,
        &options(
            &f.root.join("queries.csv"),
            &f.root.join("out-bucket.csv"),
            QueryMode::Bucket,
            32,
        ),
    )
    .await
    .unwrap();
    assert_eq!(
        (summary.first_registry_version, summary.registry_version),
        (latest, latest)
    );
    // And the audit records of those requests name it too.
    let audit = audit_records(&f.data_dir.join(psi_server::serving::audit::AUDIT_FILE));
    let bucket: Vec<&serde_json::Value> = audit
        .iter()
        .filter(|r| r["method"] == "BucketQuery")
        .collect();
    assert!(!bucket.is_empty());
    assert!(bucket.iter().all(|r| r["registry_version"] == latest));
    f.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_rotation_is_followed_by_checks_and_batches() {
    let f = fixture(1500).await;
    let cache = f.root.join("cache");
    let session = connect(&f.url, &cache, None).await.unwrap();
    session.sync().await.unwrap();
    let old_key = session.info().public_key.clone();
    // An institution that configured the key the operator published (the
    // README's quick start), with a cache of its own.
    let published = psi_core::PublicKey::from_bytes(&old_key).unwrap().to_hex();
    let configured = connect(&f.url, &f.root.join("configured"), Some(published.clone()))
        .await
        .unwrap();
    assert_eq!(configured.pinned, Pinned::ByFlag);
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
    // The configured key is a root of trust: the rotation it endorsed is
    // followed, and a check answered.
    let followed = configured.follow_rotation().await.unwrap();
    assert_eq!(followed.pinned, Pinned::EndorsedFromFlag { from_epoch: 1 });
    assert_eq!(
        answers(
            &followed,
            &[("张伟", "11010519491231002X")],
            QueryMode::Bucket
        )
        .await,
        [CheckOutcome::Match]
    );
    // Asked for exactly that key, it is refused, saying so.
    let exact = Session::connect(ConnectOptions {
        pin_exact: true,
        ..client_options(&f.url, &f.root.join("exact"), Some(published))
    })
    .await
    .unwrap_err();
    assert!(
        matches!(exact, psi_client::Error::KeyNotTrusted(_)),
        "{exact}"
    );
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

/// A tag set of 2^19 shards, as 1.4x10^9 entries have, forced on a small
/// registry: the manifest (2^19 digests and counts, about 20 MB) comes in
/// parts within the message limit; an update comes as a delta; a client
/// whose held digests would not fit in a request (16 MiB) asks for the
/// shards that differ by a bitmap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_population_sized_tag_set_syncs_within_the_message_limit() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let csv = root.join("registry.csv");
    // 2^11 to 2^12 entries before and after the updates: the same tag
    // parameters throughout (outgrowing them is another test's).
    write_registry(&csv, 2200);
    let data_dir = root.join("data");
    registry::init_guarded(&Source::csv(&csv), &data_dir, false, &LENIENT, None).unwrap();
    let limits = Limits {
        max_batch: 64,
        tagset_min_shard_bits: 19,
        ..Limits::default()
    };
    let running = start_with_limits(&data_dir, limits).await;
    let url = format!("http://{}", running.local_addr);
    let cache = root.join("cache");
    let session = connect(&url, &cache, None).await.unwrap();

    let full = session.sync().await.unwrap();
    assert_eq!(full.shards_total, 1 << 19);
    assert!(
        full.bytes_fetched > limits.max_message_bytes as u64,
        "the manifest alone is over one message: {} bytes",
        full.bytes_fetched
    );
    let (newcomer_name, newcomer_id) = newcomer();
    let pairs = [
        ("张伟", "11010519491231002X"),
        (newcomer_name.as_str(), newcomer_id.as_str()),
    ];
    assert_eq!(
        answers(&session, &pairs, QueryMode::Sync).await,
        [CheckOutcome::Match, CheckOutcome::NoMatch]
    );

    // A small update: a delta, checked against the root digest.
    let add = root.join("add.csv");
    write_pairs(&add, &[pairs[1]]);
    registry::update_guarded(Some(&Source::csv(&add)), None, &data_dir, false, &LENIENT).unwrap();
    let session = reconnect_at(&session, 2).await;
    let step = session.sync().await.unwrap();
    assert!(step.delta_applied && step.shards_fetched == 0);
    assert!(step.bytes_fetched < 1 << 16, "{} bytes", step.bytes_fetched);
    assert_eq!(
        answers(&session, &pairs, QueryMode::Sync).await,
        [CheckOutcome::Match, CheckOutcome::Match]
    );

    // A change too large for a delta: the client holds 2^19 shards, whose
    // digests do not fit in a request; it asks for the changed ones by bitmap.
    let many: Vec<(String, String)> = Generator::new(777, psi_core::CivilDate::today())
        .unwrap()
        .take(1500)
        .map(|p| (p.name, p.id.as_str().to_string()))
        .collect();
    let more = root.join("more.csv");
    let refs: Vec<(&str, &str)> = many.iter().map(|(n, i)| (n.as_str(), i.as_str())).collect();
    write_pairs(&more, &refs);
    registry::update_guarded(Some(&Source::csv(&more)), None, &data_dir, false, &LENIENT).unwrap();
    let session = reconnect_at(&session, 3).await;
    let step = session.sync().await.unwrap();
    assert!(!step.delta_applied);
    assert!(
        (1..=1500).contains(&step.shards_fetched),
        "only the changed shards: {}",
        step.shards_fetched
    );
    assert!(
        step.bytes_fetched < 2 * full.bytes_fetched,
        "one manifest and the changed shards: {} bytes",
        step.bytes_fetched
    );
    let some: Vec<(&str, &str)> = refs.iter().step_by(100).copied().collect();
    assert!(answers(&session, &some, QueryMode::Sync)
        .await
        .iter()
        .all(|a| *a == CheckOutcome::Match));
    running.shutdown().await.unwrap();
}
