//! The serving host holds no personal data: `publish` copies what `serve`
//! reads out of the encoding directory, and a server on the serving
//! directory answers right, picks up published updates and rotations live,
//! and the directory never holds a name or an ID number (scanned after each
//! publication: every file, byte by byte).

// Integration tests: a failed unwrap, expect or index is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use psi_client::check::{check, CheckOutcome};
use psi_client::{ConnectOptions, QueryMode, Session};
use psi_server::registry;
use psi_server::registry::publish::publish;
use psi_server::registry::source::Source;
use psi_server::serving::config::ServeConfig;
use psi_server::tools::synth::{Generator, Person};

fn write_csv(path: &Path, rows: &[Person]) {
    let mut w = csv::Writer::from_path(path).unwrap();
    w.write_record(["name", "id"]).unwrap();
    for p in rows {
        w.write_record([p.name.as_str(), p.id.as_str()]).unwrap();
    }
    w.flush().unwrap();
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// Fails if any file under `dir` holds any of `people`'s names or ID
/// numbers (an ID number is inside every canonical record, so the records
/// are covered too). Returns the file names relative to `dir`.
fn assert_no_personal_data(dir: &Path, people: &[Person]) -> Vec<String> {
    let ids: HashSet<&[u8]> = people.iter().map(|p| p.id.as_bytes()).collect();
    let names: HashSet<&[u8]> = people.iter().map(|p| p.name.as_bytes()).collect();
    let name_lengths: HashSet<usize> = names.iter().map(|n| n.len()).collect();
    let mut listed = Vec::new();
    for path in files_under(dir) {
        let bytes = std::fs::read(&path).unwrap();
        let found_id = bytes.windows(18).find(|w| ids.contains(w));
        assert!(found_id.is_none(), "{} holds an ID number", path.display());
        for &n in &name_lengths {
            assert!(
                !bytes.windows(n).any(|w| names.contains(w)),
                "{} holds a name",
                path.display()
            );
        }
        listed.push(
            path.strip_prefix(dir)
                .unwrap()
                .to_string_lossy()
                .into_owned(),
        );
    }
    listed.sort();
    listed
}

#[test]
fn a_published_serving_directory_holds_no_personal_data_and_serves_updates_live() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let people: Vec<Person> = Generator::new(5, psi_core::CivilDate::today())
        .unwrap()
        .take(2400)
        .collect();
    let (members, strangers) = people.split_at(2000);
    let csv = root.join("registry.csv");
    write_csv(&csv, members);
    let encoding = root.join("encoding");
    let serving = root.join("serving");
    registry::init(&Source::csv(&csv), &encoding, false).unwrap();
    // The encoding directory does hold the records (the check can see them).
    assert!(
        std::fs::read(psi_server::store::records_file(&encoding).unwrap())
            .unwrap()
            .windows(18)
            .any(|w| w == members[0].id.as_bytes())
    );

    let report = publish(&encoding, &serving).unwrap();
    assert_eq!((report.epoch, report.registry_version), (1, 1));
    assert_eq!(
        assert_no_personal_data(&serving, &people),
        [".lock", "MANIFEST", "oprf-epoch-1.key", "registry-1.bkt"]
    );
    // Publishing the same snapshot again rewrites only the key.
    assert_eq!(publish(&encoding, &serving).unwrap().files_written, 1);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = rt
        .block_on(psi_server::serving::serve::start(ServeConfig {
            reload_interval: Duration::from_millis(50),
            audit_db: root.join("audit.sqlite").into(),
            ..ServeConfig::local(&serving)
        }))
        .unwrap();
    let options = ConnectOptions {
        server: format!("http://{}", server.local_addr),
        pin_key: None,
        pin_exact: false,
        cache_dir: root.join("client-cache"),
        blinding: psi_core::Blinding::Additive,
        concurrency: 2,
        tls: None,
        purpose: "kyc-onboarding".into(),
    };
    let ask = |p: &Person, mode: QueryMode| {
        rt.block_on(async {
            let session = Session::connect(options.clone()).await.unwrap();
            check(&session, &p.name, &p.id, mode).await.unwrap()
        })
    };
    let (leaving, joining) = (&members[0], &strangers[0]);
    for mode in [QueryMode::Bucket, QueryMode::Sync] {
        assert_eq!(ask(leaving, mode), CheckOutcome::Match);
        assert_eq!(ask(joining, mode), CheckOutcome::NoMatch);
    }
    let version = || {
        rt.block_on(Session::connect(options.clone()))
            .unwrap()
            .info()
            .clone()
    };

    // An update, published: the running server picks it up.
    let (add, remove) = (root.join("add.csv"), root.join("remove.csv"));
    write_csv(&add, &strangers[..100]);
    write_csv(&remove, &members[..100]);
    registry::update(
        Some(&Source::csv(&add)),
        Some(&Source::csv(&remove)),
        &encoding,
        false,
    )
    .unwrap();
    assert_eq!(version().registry_version, 1, "not published yet");
    publish(&encoding, &serving).unwrap();
    assert_eq!(
        assert_no_personal_data(&serving, &people),
        [
            ".lock",
            "MANIFEST",
            "deltas/epoch-1-v1-v2.delta",
            "oprf-epoch-1.key",
            "registry-1.bkt"
        ]
    );
    psi_testbed::wait_for("version 2 served", Duration::from_secs(10), || {
        version().registry_version == 2
    });
    for mode in [QueryMode::Bucket, QueryMode::Sync] {
        assert_eq!(ask(leaving, mode), CheckOutcome::NoMatch);
        assert_eq!(ask(joining, mode), CheckOutcome::Match);
    }

    // A rotation (no grace: the old key is destroyed on both sides).
    registry::rotate_key(&encoding, Duration::ZERO, false).unwrap();
    let report = publish(&encoding, &serving).unwrap();
    assert_eq!(report.epoch, 2);
    assert_eq!(
        report.files_removed, 3,
        "the old key, the old delta and the old base"
    );
    assert_eq!(
        assert_no_personal_data(&serving, &people),
        [
            ".lock",
            "MANIFEST",
            "key-history.txt",
            "oprf-epoch-2.key",
            "registry-2.bkt"
        ]
    );
    psi_testbed::wait_for("key epoch 2 served", Duration::from_secs(10), || {
        version().key_epoch == 2
    });
    for mode in [QueryMode::Bucket, QueryMode::Sync] {
        assert_eq!(ask(leaving, mode), CheckOutcome::NoMatch);
        assert_eq!(ask(joining, mode), CheckOutcome::Match);
        assert_eq!(ask(&members[1999], mode), CheckOutcome::Match);
    }
    rt.block_on(server.shutdown()).unwrap();

    // Neither the encoding directory nor another encoding directory is a target.
    let err = publish(&encoding, &encoding).unwrap_err().to_string();
    assert!(err.contains("must not be the encoding directory"), "{err}");
    let other = root.join("other");
    registry::init(&Source::csv(&csv), &other, false).unwrap();
    let err = publish(&encoding, &other).unwrap_err().to_string();
    assert!(err.contains("it is an encoding directory"), "{err}");
}
