//! Damaged files and the leftovers of killed runs: a damaged delta, segment
//! or key file is refused wherever it is read (never skipped), nothing is
//! committed on top of it, a running server keeps serving the version it
//! has and says so, and what a killed run wrote but never committed is
//! neither served nor built on.

// Integration tests: a failed unwrap, expect or index is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use psi_server::registry::source::Source;
use psi_server::registry::{self};
use psi_server::serving::config::ServeConfig;
use psi_server::serving::snapshot::Snapshot;
use psi_server::store::{self, manifest::Manifest};
use psi_server::tools::synth::Generator;

fn pool() -> &'static [(String, String)] {
    static POOL: OnceLock<Vec<(String, String)>> = OnceLock::new();
    POOL.get_or_init(|| {
        Generator::new(31, psi_core::CivilDate::today())
            .unwrap()
            .take(400)
            .map(|p| (p.name, p.id))
            .collect()
    })
}

fn csv(path: &Path, rows: std::ops::Range<usize>) -> Source {
    let mut out = String::from("name,id\n");
    for (name, id) in &pool()[rows] {
        out.push_str(&format!("{name},{id}\n"));
    }
    std::fs::write(path, out).unwrap();
    Source::csv(path)
}

/// A registry of 300 at version 3: two updates of 10 added rows each.
fn three_versions(root: &Path) -> PathBuf {
    let d = root.join("data");
    registry::init(&csv(&root.join("a.csv"), 0..300), &d, false).unwrap();
    for n in 0..2 {
        let add = csv(&root.join("add.csv"), 300 + 10 * n..310 + 10 * n);
        registry::update(Some(&add), None, &d, false).unwrap();
    }
    d
}

fn manifest(d: &Path) -> Manifest {
    Manifest::read(d).unwrap().unwrap()
}

#[test]
fn a_damaged_or_missing_delta_is_refused_never_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let good = three_versions(tmp.path());
    let m = manifest(&good);
    assert_eq!(m.version, 3);
    let newest = good.join(&m.deltas.last().unwrap().name);
    let oldest = good.join(&m.deltas.first().unwrap().name);
    type Damage = fn(&Path);
    let damages: [(&str, &Path, Damage); 5] = [
        ("the newest delta truncated", &newest, |p| {
            let b = std::fs::read(p).unwrap();
            std::fs::write(p, &b[..b.len() - 8]).unwrap();
        }),
        ("an older delta truncated", &oldest, |p| {
            let b = std::fs::read(p).unwrap();
            std::fs::write(p, &b[..b.len() - 8]).unwrap();
        }),
        ("a tag byte flipped", &newest, |p| {
            let mut b = std::fs::read(p).unwrap();
            b[50] ^= 1;
            std::fs::write(p, &b).unwrap();
        }),
        ("a bucket byte flipped", &newest, |p| {
            let mut b = std::fs::read(p).unwrap();
            let at = b.len() - 1;
            b[at] ^= 1;
            std::fs::write(p, &b).unwrap();
        }),
        ("a delta removed", &oldest, |p| {
            std::fs::remove_file(p).unwrap()
        }),
    ];
    for (i, (what, file, damage)) in damages.into_iter().enumerate() {
        let d = tmp.path().join(format!("case-{i}"));
        psi_testbed::copy_dir(&good, &d);
        damage(&d.join(file.strip_prefix(&good).unwrap()));
        let err = format!("{:#}", Snapshot::load(&d).unwrap_err());
        assert!(err.contains("delta"), "{what}: {err}");
        // Nothing is built on it: no update, compaction or rotation.
        let add = csv(&tmp.path().join("more.csv"), 380..390);
        assert!(
            registry::update(Some(&add), None, &d, false).is_err(),
            "{what}"
        );
        assert!(registry::compact(&d).is_err(), "{what}");
        assert!(
            registry::rotate_key(&d, Duration::ZERO, false).is_err(),
            "{what}"
        );
        assert_eq!(manifest(&d), m, "{what}: nothing committed");
        // Put back, it all works again, every update there.
        std::fs::copy(file, d.join(file.strip_prefix(&good).unwrap())).unwrap();
        let loaded = Snapshot::load(&d).unwrap();
        assert_eq!(
            (loaded.index.registry_version(), loaded.index.len()),
            (3, 320),
            "{what}"
        );
    }
}

#[test]
fn a_key_file_that_does_not_derive_the_committed_key_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = three_versions(tmp.path());
    let key = d.join("oprf-epoch-1.key");
    let good = std::fs::read(&key).unwrap();
    // One bit of the secret flipped.
    let mut bad = good.clone();
    bad[20] ^= 0x04;
    std::fs::write(&key, &bad).unwrap();
    let err = format!("{:#}", Snapshot::load(&d).unwrap_err());
    assert!(err.contains("damaged"), "{err}");
    let add = csv(&tmp.path().join("more.csv"), 380..390);
    assert!(registry::update(Some(&add), None, &d, false).is_err());
    // Another registry's (intact) key in its place.
    let other = tmp.path().join("other");
    registry::init(&csv(&tmp.path().join("o.csv"), 0..50), &other, false).unwrap();
    std::fs::copy(other.join("oprf-epoch-1.key"), &key).unwrap();
    let err = format!("{:#}", Snapshot::load(&d).unwrap_err());
    assert!(err.contains("manifest"), "{err}");
    assert!(registry::update(Some(&add), None, &d, false).is_err());
    assert_eq!(manifest(&d).version, 3);
    std::fs::write(&key, &good).unwrap();
    assert_eq!(Snapshot::load(&d).unwrap().index.len(), 320);
}

#[test]
fn what_a_killed_init_wrote_is_never_served_nor_built_on() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("data");
    registry::init(&csv(&tmp.path().join("a.csv"), 0..200), &d, false).unwrap();
    // A second init, killed before its commit: its new base and records
    // are on disk (made here by running it on a copy and taking every file
    // but the manifest), the manifest is the first init's.
    let copy = tmp.path().join("copy");
    psi_testbed::copy_dir(&d, &copy);
    registry::init(&csv(&tmp.path().join("b.csv"), 100..300), &copy, false).unwrap();
    for name in manifest(&copy).names() {
        if !d.join(name).exists() {
            std::fs::create_dir_all(d.join(name).parent().unwrap()).unwrap();
            std::fs::copy(copy.join(name), d.join(name)).unwrap();
        }
    }
    let served = Snapshot::load(&d).unwrap();
    assert_eq!(
        (served.index.registry_version(), served.index.len()),
        (1, 200)
    );
    // An update and a rotation build on the committed registry, and the
    // killed init's files are gone.
    let add = csv(&tmp.path().join("add.csv"), 300..310);
    registry::update(Some(&add), None, &d, false).unwrap();
    registry::rotate_key(&d, Duration::ZERO, false).unwrap();
    let served = Snapshot::load(&d).unwrap();
    assert_eq!(
        (served.index.registry_version(), served.index.len()),
        (3, 210)
    );
    assert_eq!(store::current_records(&d).unwrap().len(), 210);
    let names: Vec<String> = manifest(&d).names().map(str::to_string).collect();
    for entry in std::fs::read_dir(&d).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if name.ends_with(".bkt") || name.ends_with(".bin") {
            assert!(names.contains(&name), "{name} left behind");
        }
    }
}

#[test]
fn temporaries_a_killed_run_left_anywhere_are_cleaned_up() {
    let tmp = tempfile::tempdir().unwrap();
    let d = three_versions(tmp.path());
    // What a writer killed mid-write leaves, named as a process of this
    // very id would (a container's PID 1 runs every time under the same id).
    let pid = std::process::id();
    let leftovers = [
        d.join(format!("deltas/.epoch-1-v3-v4.delta.tmp-{pid}")),
        d.join(format!("records.d/.v3-v4.seg.tmp-{pid}")),
        d.join(format!(".MANIFEST.tmp-{pid}-12-0")),
    ];
    for p in &leftovers {
        std::fs::write(p, b"half").unwrap();
    }
    let add = csv(&tmp.path().join("add.csv"), 380..390);
    let r = registry::update(Some(&add), None, &d, false).unwrap();
    assert_eq!(r.registry_version, 4);
    for p in &leftovers {
        assert!(!p.exists(), "{} left", p.display());
    }
}

#[test]
fn a_running_server_keeps_serving_when_a_committed_version_is_damaged() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("data");
    registry::init(&csv(&tmp.path().join("a.csv"), 0..200), &d, false).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let running = rt
        .block_on(psi_server::serving::serve::start(ServeConfig {
            reload_interval: Duration::from_millis(50),
            admin_listen: Some("127.0.0.1:0".parse().unwrap()),
            ..ServeConfig::local(&d)
        }))
        .unwrap();
    let admin = running.admin_addr.unwrap().port();
    let metric = |name: &str| -> Option<f64> {
        let text = psi_testbed::http_get(admin, "/metrics")?;
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    };
    psi_testbed::wait_for("the server to load", Duration::from_secs(20), || {
        metric("psi_serving") == Some(1.0)
    });
    // An update committed elsewhere whose delta arrives damaged: the new
    // manifest is seen, the load refused, the old version kept.
    let copy = tmp.path().join("copy");
    psi_testbed::copy_dir(&d, &copy);
    let add = csv(&tmp.path().join("add.csv"), 300..310);
    registry::update(Some(&add), None, &copy, false).unwrap();
    let m = manifest(&copy);
    for e in &m.deltas {
        let mut b = std::fs::read(copy.join(&e.name)).unwrap();
        b[60] ^= 1;
        std::fs::create_dir_all(d.join(&e.name).parent().unwrap()).unwrap();
        std::fs::write(d.join(&e.name), &b).unwrap();
    }
    for s in &m.segments {
        std::fs::create_dir_all(d.join(&s.name).parent().unwrap()).unwrap();
        std::fs::copy(copy.join(&s.name), d.join(&s.name)).unwrap();
    }
    std::fs::copy(copy.join("MANIFEST"), d.join("MANIFEST")).unwrap();
    psi_testbed::wait_for("the failed load counted", Duration::from_secs(20), || {
        metric("psi_snapshot_load_failures_total") == Some(1.0)
    });
    assert_eq!(metric("psi_serving"), Some(1.0), "still serving");
    rt.block_on(running.shutdown()).unwrap();
    // And a restart refuses to serve it.
    assert!(Snapshot::load(&d).is_err());
}

#[test]
fn a_reader_racing_commits_always_loads_a_whole_version() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("data");
    registry::init(&csv(&tmp.path().join("a.csv"), 0..200), &d, false).unwrap();
    let writer = {
        let (d, root) = (d.clone(), tmp.path().to_path_buf());
        std::thread::spawn(move || {
            for n in 0..12 {
                let add = csv(&root.join("add.csv"), 200 + n * 10..210 + n * 10);
                registry::update_with(
                    Some(&add),
                    None,
                    &d,
                    false,
                    &registry::PublishGuard::default(),
                    2,
                    None,
                )
                .unwrap();
                if n % 3 == 0 {
                    registry::compact(&d).unwrap();
                }
                if n % 5 == 4 {
                    registry::rotate_key(&d, Duration::ZERO, false).unwrap();
                }
            }
        })
    };
    // Each load sees a version whole (its size is that version's), while
    // bases are replaced, deltas pruned and keys retired under it.
    let mut loads = 0;
    while !writer.is_finished() {
        let s = Snapshot::load(&d).unwrap_or_else(|e| panic!("load {loads}: {e:#}"));
        let v = s.index.registry_version();
        let updates = v - 1 - (s.epoch - 1); // each rotation is a version too
        assert_eq!(s.index.len() as u64, 200 + 10 * updates, "version {v}");
        loads += 1;
    }
    writer.join().unwrap();
    assert!(loads > 0);
}
