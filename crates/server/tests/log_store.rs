//! The log-structured registry store: updates write only their change (a
//! delta and a records segment), the current version is the base with the
//! log applied, and compaction folds the log into a new base. Whatever the
//! sequence of updates and compactions, the registry is the one a full
//! rebuild (`init` of the live rows with the same key) gives.

// Integration tests: a failed unwrap, expect or index is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::OnceLock;

use proptest::prelude::*;
use psi_core::BucketIndex;
use psi_server::registry::source::Source;
use psi_server::registry::{self, PublishGuard};
use psi_server::serving::snapshot::Snapshot;
use psi_server::store;
use psi_server::tools::synth::Generator;

const POOL: usize = 5200;
const START: usize = 4700;

fn pool() -> &'static [(String, String)] {
    static POOL_ROWS: OnceLock<Vec<(String, String)>> = OnceLock::new();
    POOL_ROWS.get_or_init(|| {
        Generator::new(23, psi_core::CivilDate::today())
            .unwrap()
            .take(POOL)
            .map(|p| (p.name, p.id))
            .collect()
    })
}

fn csv(path: &Path, rows: impl IntoIterator<Item = usize>) -> Source {
    let mut out = String::from("name,id\n");
    for i in rows {
        let (name, id) = &pool()[i];
        out.push_str(&format!("{name},{id}\n"));
    }
    std::fs::write(path, out).unwrap();
    Source::csv(path)
}

fn entries(index: &BucketIndex) -> Vec<(u32, u64)> {
    index.entries().map(|(b, t)| (b, t.0)).collect()
}

fn sorted_records(dir: &Path) -> Vec<Vec<u8>> {
    let mut r: Vec<Vec<u8>> = store::current_records(dir)
        .unwrap()
        .iter()
        .map(<[u8]>::to_vec)
        .collect();
    r.sort();
    r
}

/// A full rebuild of `live` with `dir`'s key.
fn rebuilt(dir: &Path, live: &BTreeSet<usize>) -> (tempfile::TempDir, BucketIndex) {
    let fresh = tempfile::tempdir().unwrap();
    let key = "oprf-epoch-1.key";
    std::fs::copy(dir.join(key), fresh.path().join(key)).unwrap();
    let source = csv(&fresh.path().join("live.csv"), live.iter().copied());
    registry::init_guarded(&source, fresh.path(), false, &PublishGuard::force(), None).unwrap();
    let index = Snapshot::load(fresh.path()).unwrap().index;
    (fresh, index)
}

#[derive(Debug, Clone)]
struct Step {
    add: Vec<usize>,
    remove: Vec<usize>,
    compact: bool,
}

fn step() -> impl Strategy<Value = Step> {
    (
        proptest::collection::vec(0..POOL, 0..40),
        proptest::collection::vec(0..POOL, 0..40),
        proptest::bool::weighted(0.2),
    )
        .prop_map(|(add, remove, compact)| Step {
            add,
            remove,
            compact,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

    #[test]
    fn any_sequence_of_updates_and_compactions_equals_a_full_rebuild(
        steps in proptest::collection::vec(step(), 1..6),
        compact_after in 1usize..4,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut live: BTreeSet<usize> = (0..START).collect();
        registry::init(&csv(&d.join("start.csv"), live.iter().copied()), d, false).unwrap();
        let mut version = 1;
        let mut prev = Snapshot::load(d).unwrap();
        for s in &steps {
            let base_before = store::base_file(d).unwrap();
            let add = (!s.add.is_empty()).then(|| csv(&d.join("add.csv"), s.add.iter().copied()));
            let remove =
                (!s.remove.is_empty()).then(|| csv(&d.join("remove.csv"), s.remove.iter().copied()));
            if add.is_some() || remove.is_some() {
                let r = registry::update_with(
                    add.as_ref(),
                    remove.as_ref(),
                    d,
                    false,
                    &PublishGuard::force(),
                    compact_after,
                    None,
                )
                .unwrap();
                let before = live.len();
                for i in &s.remove {
                    live.remove(i);
                }
                let removed = before - live.len();
                for i in &s.add {
                    // Listed in both files: the removal wins.
                    if !s.remove.contains(i) {
                        live.insert(*i);
                    }
                }
                version += 1;
                prop_assert_eq!(r.registry_version, version);
                prop_assert_eq!(r.removed as usize, removed);
                prop_assert_eq!(r.records as usize, live.len());
            }
            if s.compact {
                let c = registry::compact(d).unwrap();
                prop_assert_eq!(c.registry_version, version);
                prop_assert_eq!(c.records as usize, live.len());
            }
            // What a server loads now is what a full rebuild gives.
            let served = Snapshot::load(d).unwrap();
            prop_assert_eq!(served.index.registry_version(), version);
            let (_fresh, full) = rebuilt(d, &live);
            prop_assert_eq!(served.index.prefix_bits(), full.prefix_bits());
            prop_assert_eq!(entries(&served.index), entries(&full));
            prop_assert_eq!(served.tagset.len(), full.len() as u64);
            // A running server applies just the new updates to what it
            // serves, and gets the same snapshot.
            let base_same = store::base_file(d).unwrap() == base_before;
            let applied = Snapshot::apply_log(&prev, d).unwrap();
            let logged = version > prev.index.registry_version();
            prop_assert_eq!(applied.is_some(), base_same && logged);
            let next = Snapshot::reload(&prev, d).unwrap();
            prop_assert_eq!(entries(&next.index), entries(&served.index));
            prop_assert_eq!(next.index.registry_version(), version);
            prop_assert_eq!(next.tagset.root_digest(), served.tagset.root_digest());
            prop_assert_eq!(&next.deltas, &served.deltas);
            prev = next;
        }
        // The records the next rotation re-encrypts are the live rows.
        let (fresh, _) = rebuilt(d, &live);
        prop_assert_eq!(sorted_records(d), sorted_records(fresh.path()));
        // And a rotation on top of the log keeps the same registry.
        registry::rotate_key(d, std::time::Duration::ZERO, false).unwrap();
        prop_assert_eq!(Snapshot::load(d).unwrap().index.len(), live.len());
        prop_assert_eq!(sorted_records(d), sorted_records(fresh.path()));
    }
}

fn files(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|e| {
            e.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn an_update_writes_only_its_change_and_the_log_is_compacted_at_its_limit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    registry::init(&csv(&d.join("start.csv"), 0..START), d, false).unwrap();
    let base_file = store::base_file(d).unwrap();
    let base_bytes = std::fs::read(&base_file).unwrap();
    let records_bytes = std::fs::read(store::records_file(d).unwrap()).unwrap();
    let base = |d: &Path| {
        BucketIndex::from_bytes(&std::fs::read(store::base_file(d).unwrap()).unwrap())
            .unwrap()
            .registry_version()
    };
    let update = |n: usize| {
        let add = csv(&d.join("add.csv"), START + 10 * n..START + 10 * n + 10);
        let remove = csv(&d.join("remove.csv"), 10 * n..10 * n + 5);
        registry::update_with(
            Some(&add),
            Some(&remove),
            d,
            false,
            &PublishGuard::default(),
            2,
            None,
        )
        .unwrap()
    };
    // Two updates: the base index and record store are untouched; each
    // update left a delta and a segment of its own size.
    for n in 0..2 {
        let r = update(n);
        assert_eq!((r.added, r.removed), (10, 5));
    }
    assert_eq!(store::base_file(d).unwrap(), base_file);
    assert_eq!(std::fs::read(&base_file).unwrap(), base_bytes);
    assert_eq!(
        std::fs::read(store::records_file(d).unwrap()).unwrap(),
        records_bytes
    );
    assert_eq!(
        files(&d.join("records.d")),
        ["v1-v2.seg", "v2-v3.seg"].map(String::from).into()
    );
    assert!(files(&d.join("deltas")).contains("epoch-1-v2-v3.delta"));
    let delta_len = std::fs::metadata(d.join("deltas/epoch-1-v2-v3.delta"))
        .unwrap()
        .len();
    assert_eq!(
        delta_len,
        48 + 15 * 16,
        "header, then tag and bucket per change"
    );
    assert_eq!(Snapshot::load(d).unwrap().index.registry_version(), 3);
    assert_eq!(base(d), 1);
    // The third finds the log at its limit (2): it is folded into a new
    // base of version 3 first, then the update is logged on top.
    let r = update(2);
    assert_eq!(r.registry_version, 4);
    assert_eq!(base(d), 3);
    assert_eq!(
        files(&d.join("records.d")),
        ["v3-v4.seg"].map(String::from).into()
    );
    let served = Snapshot::load(d).unwrap();
    assert_eq!(served.index.registry_version(), 4);
    assert_eq!(served.index.len(), START + 3 * 5);
    // Sync clients still get every version's delta.
    assert_eq!(
        served.deltas.iter().map(|x| x.to).collect::<Vec<_>>(),
        [2, 3, 4]
    );
    // `compact` by hand: same registry, a new base, no segments.
    let c = registry::compact(d).unwrap();
    assert_eq!((c.registry_version, c.updates_folded), (4, 1));
    assert_eq!(base(d), 4);
    assert!(files(&d.join("records.d")).is_empty());
    assert_eq!(
        entries(&Snapshot::load(d).unwrap().index),
        entries(&served.index)
    );
    assert_eq!(registry::compact(d).unwrap().updates_folded, 0);
    // The setting's range is enforced.
    let add = csv(&d.join("add.csv"), 0..1);
    for bad in [0, 65] {
        let err = registry::update_with(
            Some(&add),
            None,
            d,
            false,
            &PublishGuard::default(),
            bad,
            None,
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("--compact-after"), "{err:#}");
    }
}

#[test]
fn a_damaged_segment_stops_compaction_and_rotation_but_not_serving() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    registry::init(&csv(&d.join("start.csv"), 0..START), d, false).unwrap();
    let add = csv(&d.join("add.csv"), START..START + 20);
    registry::update(Some(&add), None, d, false).unwrap();
    let seg = d.join("records.d/v1-v2.seg");
    let bytes = std::fs::read(&seg).unwrap();
    std::fs::write(&seg, &bytes[..bytes.len() - 3]).unwrap();
    // The served registry needs no records: it still loads, at version 2.
    assert_eq!(Snapshot::load(d).unwrap().index.len(), START + 20);
    // What needs the records refuses, and leaves the registry as it was.
    let err = registry::compact(d).unwrap_err();
    assert!(format!("{err:#}").contains("v1-v2.seg"), "{err:#}");
    assert!(registry::rotate_key(d, std::time::Duration::ZERO, false).is_err());
    assert_eq!(Snapshot::load(d).unwrap().index.registry_version(), 2);
    assert_eq!(Snapshot::load(d).unwrap().epoch, 1);
}
