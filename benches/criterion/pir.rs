//! The server's work per PIR query (issues #11 and #24): one answer at the
//! shapes a registry of 10^6 and 10^7 entries gets, on one thread (the CPU
//! a check costs) and on the machine's pool (its latency), by Spiral
//! (spiral-rs's own `process_query`, the outside baseline, and this
//! crate's evaluation, on the same database) and by YPIR+SP.
//!
//! `cargo bench --bench pir`

// The benchmark harness: a run that cannot proceed stops with the reason.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use criterion::{criterion_group, criterion_main, Criterion};
use psi_bench::single_thread_pool;
use psi_pir::ypir::{YpirDatabase, YpirKeys, YpirPirClient, YpirShape};
use psi_pir::{Database, Keys, PirClient, Shape};
use std::hint::black_box;
use std::time::Duration;

/// The shapes `psi-server` derives for 10^6 and 10^7 entries (64 MiB and
/// 512 MiB databases).
fn shapes() -> [(&'static str, Shape); 2] {
    [
        (
            "1e6",
            Shape {
                nu1: 7,
                nu2: 2,
                instances: 2,
                bucket_shift: 1,
            },
        ),
        (
            "1e7",
            Shape {
                nu1: 7,
                nu2: 4,
                instances: 4,
                bucket_shift: 2,
            },
        ),
    ]
}

/// Pseudo-random tags for item `i`, `fill` of them.
fn tags(i: usize, fill: usize) -> Vec<u64> {
    (0..fill as u64)
        .map(|k| (i as u64 * 1_000_003 + k).wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .collect()
}

/// Items filled to 90% of their capacity with pseudo-random tags.
fn database(shape: Shape) -> Database {
    let fill = shape.capacity() * 9 / 10;
    Database::build(shape, 1, |i| tags(i, fill)).expect("database")
}

fn answer(c: &mut Criterion) {
    let one = single_thread_pool();
    let mut g = c.benchmark_group("pir_answer");
    for (name, shape) in shapes() {
        let db = database(shape);
        let mut client = PirClient::new(shape, &[5; 32]).expect("client");
        let keys = Keys::parse(shape, &client.public_parameters()).expect("keys");
        let query = client.query(3).expect("query");
        // The answer is right before it is timed.
        let a = db.answer(&keys, &query).expect("answer");
        client.decode(3, 1, &a).expect("decodes");
        on_one_and_pool(&mut g, &one, name, || {
            db.answer(&keys, black_box(&query)).expect("answer")
        });
        let theirs = db.answer_by_spiral_rs(&keys, &query).expect("answer");
        client.decode(3, 1, &theirs).expect("decodes");
        on_one_and_pool(&mut g, &one, &format!("{name}/spiral_rs"), || {
            db.answer_by_spiral_rs(&keys, black_box(&query))
                .expect("answer")
        });
    }
    g.finish();
}

/// The YPIR+SP shapes `psi-server` derives for the same registries (their
/// columns from the fullest item of `psi-bench`'s registries)
/// (BENCHMARKS.md "Beside Spiral at 10^6 and 10^7").
fn ypir_shapes() -> [(&'static str, YpirShape); 2] {
    [
        (
            "1e6",
            YpirShape {
                item_bits: 9,
                columns: 6_592,
                bucket_shift: 0,
            },
        ),
        (
            "1e7",
            YpirShape {
                item_bits: 13,
                columns: 4_160,
                bucket_shift: 0,
            },
        ),
    ]
}

/// One YPIR+SP answer (the pass, `n c_j`, modulus switching), a client's
/// packed `b` sides already made (its first query after a database change
/// makes them).
fn ypir_answer(c: &mut Criterion) {
    let one = single_thread_pool();
    let mut g = c.benchmark_group("ypir_answer");
    for (name, shape) in ypir_shapes() {
        let fill = psi_pir::item::capacity(shape.item_bytes()) * 9 / 10;
        let db = YpirDatabase::build(shape, 1, |i| tags(i, fill)).expect("database");
        let client = YpirPirClient::new(shape, 1, &[5; 32]).expect("client");
        let keys = YpirKeys::parse(shape, &client.public_parameters()).expect("keys");
        let query = client.query(3).expect("query");
        let a = db.answer(&keys, &query).expect("answer");
        client.decode(3, 1, &a).expect("decodes");
        on_one_and_pool(&mut g, &one, name, || {
            db.answer(&keys, black_box(&query)).expect("answer")
        });
    }
    g.finish();
}

/// Times `answer` as `NAME/one_thread` (inside `one`: its CPU) and
/// `NAME/pool` (on the machine's pool: its latency).
fn on_one_and_pool(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    one: &rayon::ThreadPool,
    name: &str,
    answer: impl Fn() -> Vec<u8> + Sync,
) {
    g.bench_function(format!("{name}/one_thread"), |b| {
        b.iter(|| one.install(&answer))
    });
    g.bench_function(format!("{name}/pool"), |b| b.iter(&answer));
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(5))
}

criterion_group! {
    name = benches;
    config = config();
    targets = answer, ypir_answer
}
criterion_main!(benches);
