//! Shared pieces of the benchmarks: deterministic synthetic inputs, a
//! one-thread pool for per-core figures, and the sweep harness behind
//! `psi-bench` ([`sweep`] points, [`costs`] per element beside the
//! baselines, [`report`] tables, charts and BENCHMARKS.md), the attackers
//! `psi-load --attack` runs beside its honest load ([`attack`]), and
//! single-key against threshold mode end to end ([`threshold`]), single
//! checks through the institution's HTTP gateway ([`gateway`]), and the
//! LWE family's pass over a plain database against the read bandwidth
//! ([`plainpass`]), and YPIR+SP over it ([`ypir`]).

// The benchmark harness: a run that cannot proceed stops with the reason.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

pub mod attack;
pub mod costs;
pub mod gateway;
pub mod plainpass;
pub mod report;
pub mod sweep;
pub mod threshold;
pub mod ypir;

use psi_core::record::{CivilDate, IdNumber, Record};

/// The date the benchmarks validate birth dates against.
pub const TODAY: CivilDate = CivilDate {
    year: 2026,
    month: 11,
    day: 22,
};

const SURNAMES: [&str; 8] = ["王", "李", "张", "刘", "陈", "欧阳", "肖", "闫"];
const GIVEN: [&str; 8] = ["伟", "芳", "娜", "秀英", "敏", "静", "丽", "强"];

/// `n` distinct synthetic raw (name, ID) pairs, deterministic.
#[must_use]
pub fn raw_pairs(n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            let name = format!(
                "{}{}{}",
                SURNAMES[i % SURNAMES.len()],
                GIVEN[(i / 8) % GIVEN.len()],
                GIVEN[(i / 64) % GIVEN.len()]
            );
            let days = 7000 + (i as i64 * 7919) % 20_000;
            let date = CivilDate::from_unix_days(days - 10_000);
            let seq = (i % 1000) as u16;
            let address = 110_101 + ((i / 1000) % 800) as u32;
            let id = IdNumber::from_parts(address, date, seq, TODAY)
                .map(|id| id.as_str().to_string())
                .unwrap_or_default();
            (name, id)
        })
        .collect()
}

/// Canonical encodings of `n` synthetic records.
#[must_use]
pub fn encoded_records(n: usize) -> Vec<Vec<u8>> {
    raw_pairs(n)
        .iter()
        .filter_map(|(name, id)| Record::parse(name, id, TODAY).ok())
        .map(|r| r.encode())
        .collect()
}

/// A rayon pool with one thread: run work inside it for per-core figures.
///
/// # Panics
/// If the thread cannot be spawned.
#[must_use]
pub fn single_thread_pool() -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("a one-thread pool")
}

/// 64 random bytes: a uniform scalar (`Scalar::from_bytes_mod_order_wide`)
/// or point (`RistrettoPoint::from_uniform_bytes`) for the floor
/// measurements (curve25519-dalek 5 takes a `rand_core` 0.10 RNG directly).
#[must_use]
pub fn wide_random() -> [u8; 64] {
    use rand_core::RngCore;
    let mut bytes = [0u8; 64];
    rand_core::OsRng.fill_bytes(&mut bytes);
    bytes
}
