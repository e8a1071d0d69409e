//! `psi-bench plain-pass`: the LWE family's answer pass over a plain
//! database (`psi_pir::plain`) against this machine's read bandwidth,
//! measured in the same run by a STREAM-like probe (a summing loop over a
//! buffer as large as the database), on one thread and on all of them;
//! each kernel the CPU has, 1 to 4 queries a pass; and building the
//! database from items and patching items in place.

use std::hint::black_box;
use std::time::{Duration, Instant};

use anyhow::Result;
use psi_pir::plain::{Kernel, PlainDatabase, MAX_QUERIES_PER_PASS};
use serde::Serialize;

/// YPIR's CRT primes, the residues the queries' words carry.
const MODULI: (u64, u64) = (268_369_921, 249_561_089);

/// Words per item: one ring element of YPIR+SP (2048 x 14 bits = 3,584
/// bytes of item).
const COLUMNS: usize = 2048;

/// One pass configuration's figures.
#[derive(Debug, Clone, Serialize)]
pub struct PassResult {
    /// `Portable`, `Avx2` or `Avx512`.
    pub kernel: String,
    /// Threads the pass ran on.
    pub threads: usize,
    /// Queries answered by the pass.
    pub queries: usize,
    /// Median pass, ms.
    pub median_ms: f64,
    /// The database read per second at the median, GB/s (10^9 bytes).
    pub gb_per_s: f64,
    /// That as a share of the probe's bandwidth on as many threads.
    pub share_of_probe: f64,
    /// Core-seconds per query (threads x median / queries).
    pub core_seconds_per_query: f64,
}

/// The run's figures.
#[derive(Debug, Clone, Serialize)]
pub struct PlainPassReport {
    /// Items (rows).
    pub rows: usize,
    /// Bytes of items they hold (3,584 each).
    pub item_bytes: u64,
    /// Bytes the database takes in memory.
    pub database_bytes: u64,
    /// Writing every item into an empty database, s.
    pub build_seconds: f64,
    /// Items patched in place.
    pub patched_items: usize,
    /// Patching them, s.
    pub patch_seconds: f64,
    /// The probe's read bandwidth on one thread, GB/s (median of 5).
    pub probe_gb_per_s_one_thread: f64,
    /// On every thread.
    pub probe_gb_per_s_all_threads: f64,
    /// Threads of "every thread".
    pub threads: usize,
    /// Each kernel, thread count and queries per pass.
    pub passes: Vec<PassResult>,
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// The probe: sums `buf` on `threads` threads, `reps` times; the median
/// bandwidth in GB/s.
fn probe(buf: &[u64], threads: usize, reps: usize) -> Result<f64> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let mut times = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        let sum: u64 = pool.install(|| {
            use rayon::prelude::*;
            buf.par_chunks(buf.len().div_ceil(threads))
                .map(|c| c.iter().fold(0u64, |a, &x| a.wrapping_add(x)))
                .reduce(|| 0, u64::wrapping_add)
        });
        times.push(t.elapsed());
        black_box(sum);
    }
    Ok((buf.len() * 8) as f64 / median(times).as_secs_f64() / 1e9)
}

/// Pseudo-random item bytes (xorshift), the same from run to run.
#[derive(Debug)]
pub struct Filler(u64);

impl Default for Filler {
    fn default() -> Self {
        Self(0x9e37_79b9_7f4a_7c15)
    }
}

impl Filler {
    /// Fills `bytes`.
    pub fn fill(&mut self, bytes: &mut [u8]) {
        let x = &mut self.0;
        for b in bytes.iter_mut() {
            *x ^= *x << 13;
            *x ^= *x >> 7;
            *x ^= *x << 17;
            *b = *x as u8;
        }
    }
}

/// A database of about `database_mib` MiB of items of 2,048 words, rows a
/// multiple of `psi_pir::ypir::RING`, filled as an update patches it (items
/// in batches of 32,768); the seconds it took.
///
/// # Errors
/// A database too small for one block of rows.
pub fn build(database_mib: usize, fill: &mut Filler) -> Result<(PlainDatabase, f64)> {
    let ring = psi_pir::ypir::RING;
    let rows = (database_mib << 20) / (2 * COLUMNS) / ring * ring;
    let mut db = PlainDatabase::new(rows, COLUMNS)?;
    let item_len = db.item_bytes();
    let batch = 1 << 15;
    let mut items = vec![0u8; batch * item_len];
    let t = Instant::now();
    for first in (0..rows).step_by(batch) {
        let n = batch.min(rows - first);
        fill.fill(&mut items[..n * item_len]);
        let refs: Vec<(usize, &[u8])> = items
            .chunks_exact(item_len)
            .take(n)
            .enumerate()
            .map(|(i, b)| (first + i, b))
            .collect();
        db.patch(&refs)?;
    }
    Ok((db, t.elapsed().as_secs_f64()))
}

/// Runs it on a database of about `database_mib` MiB.
///
/// # Errors
/// A pass failing.
pub fn run(database_mib: usize, reps: usize, patched: usize) -> Result<PlainPassReport> {
    let mut fill = Filler::default();
    let (mut db, build_seconds) = build(database_mib, &mut fill)?;
    let rows = db.rows();
    let item_len = db.item_bytes();
    // An update's changed items, scattered over the rows, in one patch.
    let mut changed = vec![0u8; patched * item_len];
    fill.fill(&mut changed);
    let refs: Vec<(usize, &[u8])> = changed
        .chunks_exact(item_len)
        .enumerate()
        .map(|(k, b)| ((k * 7_919) % rows, b))
        .collect();
    let t = Instant::now();
    db.patch(&refs)?;
    let patch_seconds = t.elapsed().as_secs_f64();

    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let buf = vec![1u64; db.memory_bytes() / 8];
    let probe_one = probe(&buf, 1, reps)?;
    let probe_all = probe(&buf, threads, reps)?;
    drop(buf);

    let queries: Vec<Vec<u64>> = (0..MAX_QUERIES_PER_PASS as u64)
        .map(|s| {
            (0..rows as u64)
                .map(|i| {
                    let v = (i + 1).wrapping_mul(0x2545_f491_4f6c_dd1d ^ s);
                    (v % MODULI.0) | ((v >> 29) % MODULI.1) << 32
                })
                .collect()
        })
        .collect();
    let mut passes = Vec::new();
    for kernel in [Kernel::Portable, Kernel::Avx2, Kernel::Avx512] {
        if !kernel.available() {
            continue;
        }
        for t in [1, threads] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(t).build()?;
            for k in [1, 2, MAX_QUERIES_PER_PASS] {
                let refs: Vec<&[u64]> = queries.iter().take(k).map(Vec::as_slice).collect();
                let mut times = Vec::new();
                for _ in 0..reps {
                    let started = Instant::now();
                    let out = pool.install(|| db.first_pass(&refs, MODULI, kernel))?;
                    times.push(started.elapsed());
                    black_box(out);
                }
                let m = median(times).as_secs_f64();
                let gb = db.memory_bytes() as f64 / m / 1e9;
                passes.push(PassResult {
                    kernel: format!("{kernel:?}"),
                    threads: t,
                    queries: k,
                    median_ms: m * 1e3,
                    gb_per_s: gb,
                    share_of_probe: gb / if t == 1 { probe_one } else { probe_all },
                    core_seconds_per_query: m * t as f64 / k as f64,
                });
            }
            if threads == 1 {
                break;
            }
        }
    }
    Ok(PlainPassReport {
        rows,
        item_bytes: (rows * item_len) as u64,
        database_bytes: db.memory_bytes() as u64,
        build_seconds,
        patched_items: patched,
        patch_seconds,
        probe_gb_per_s_one_thread: probe_one,
        probe_gb_per_s_all_threads: probe_all,
        threads,
        passes,
    })
}
