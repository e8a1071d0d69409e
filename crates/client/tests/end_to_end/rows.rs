//! Every kind of row answered in every mode, and the client's own checks:
//! a wrong proof, a damaged or stale tag-set cache.

use super::common::*;

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
            assert_eq!(&row[2], queries()[q].what, "pass-through column");
            assert_eq!(
                &row[4],
                *want,
                "{mode:?}: {} ({})",
                queries()[q].what,
                &row[5]
            );
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
        None,
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
    let records = psi_server::store::records_file(&f.data_dir).unwrap();
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
            for (name, id) in registered() {
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
