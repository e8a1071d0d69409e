//! `psi-bench ypir`: YPIR+SP (`psi_pir::ypir`) on a plain database of a
//! given size, in this process: the hint's build, the client's keys and
//! query, the server's answer (the pass, then the packing) on one thread
//! and on all of them, decoding, and the bytes each would take on the wire
//! (values mod q at 7 bytes, the keys' `a` halves from a public seed).

use std::hint::black_box;
use std::time::Instant;

use anyhow::{ensure, Result};
use psi_pir::plain::Kernel;
use psi_pir::ypir::{answer, Hint, Precomputed, YpirClient, MODULI, RING};
use serde::Serialize;

use crate::plainpass::{build, Filler};

/// Bytes of a value mod q (56 bits) on the wire.
const VALUE_BYTES: usize = 7;

/// The run's figures.
#[derive(Debug, Clone, Serialize)]
pub struct YpirReport {
    /// Items (rows).
    pub rows: usize,
    /// Bytes the database takes in memory.
    pub database_bytes: u64,
    /// Building it from items, s.
    pub build_seconds: f64,
    /// The hint `D^T A` (all threads), s.
    pub hint_seconds: f64,
    /// The packing's precomputation from the hint (all threads), s.
    pub precompute_seconds: f64,
    /// Bytes the precomputation holds (the hint itself is not kept).
    pub precomputed_bytes: u64,
    /// The client's packing keys, s.
    pub keys_seconds: f64,
    /// Their bytes on the wire (the `b` halves), once per session.
    pub keys_bytes: u64,
    /// Making a query, s (median).
    pub query_seconds: f64,
    /// A query's bytes on the wire.
    pub query_bytes: u64,
    /// Threads the answers below ran on.
    pub threads: usize,
    /// The answer's pass alone on all threads, s (median).
    pub pass_seconds: f64,
    /// The whole answer (pass and packing) on one thread, s (median).
    pub answer_seconds_one_thread: f64,
    /// On all threads, s (median).
    pub answer_seconds_all_threads: f64,
    /// An answer's bytes on the wire.
    pub answer_bytes: u64,
    /// Decoding it, s (median).
    pub decode_seconds: f64,
    /// Checks whose decoded item equalled the database's row.
    pub decoded_right: usize,
    /// Checks made.
    pub checks: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs it on a database of about `database_mib` MiB, `checks` checks of
/// spread-out rows.
///
/// # Errors
/// A step failing, or a decoded item differing from its row.
pub fn run(database_mib: usize, checks: usize) -> Result<YpirReport> {
    let (db, build_seconds) = build(database_mib, &mut Filler::default())?;
    let rows = db.rows();
    let public = [7u8; 32];
    let t = Instant::now();
    let hint = Hint::new(&db, &public)?;
    let hint_seconds = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let pre = Precomputed::new(&hint, &public);
    let precompute_seconds = t.elapsed().as_secs_f64();

    let client = YpirClient::new(&[1u8; 32]);
    let t = Instant::now();
    let keys = client.packing_keys(&public, &[2u8; 32]);
    let keys_seconds = t.elapsed().as_secs_f64();

    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    let kernel = Kernel::best();
    let (mut query_s, mut pass_s, mut one_s, mut all_s, mut decode_s) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut decoded_right = 0;
    let mut answer_bytes = 0;
    for c in 0..checks.max(1) {
        let row = (c * 104_729 + 17) % rows;
        let t = Instant::now();
        let query = client.query(row, rows, &public, &[c as u8; 32])?;
        query_s.push(t.elapsed().as_secs_f64());

        let t = Instant::now();
        black_box(db.first_pass(&[&query], MODULI, kernel)?);
        pass_s.push(t.elapsed().as_secs_f64());

        let t = Instant::now();
        let reply = one.install(|| answer(&db, &pre, &query, &keys, kernel))?;
        one_s.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let reply_all = answer(&db, &pre, &query, &keys, kernel)?;
        all_s.push(t.elapsed().as_secs_f64());
        ensure!(reply == reply_all, "the answer depends on the threads");
        answer_bytes = reply.iter().map(|g| g.len() * VALUE_BYTES).sum::<usize>();

        let t = Instant::now();
        let item = client.decode(&reply, db.item_bytes())?;
        decode_s.push(t.elapsed().as_secs_f64());
        if item == db.item(row)? {
            decoded_right += 1;
        }
    }
    ensure!(
        decoded_right == checks.max(1),
        "{} of {} checks decoded a wrong item",
        checks.max(1) - decoded_right,
        checks.max(1)
    );
    Ok(YpirReport {
        rows,
        database_bytes: db.memory_bytes() as u64,
        build_seconds,
        hint_seconds,
        precompute_seconds,
        precomputed_bytes: pre.memory_bytes() as u64,
        keys_seconds,
        keys_bytes: (11 * 3 * RING * VALUE_BYTES) as u64,
        query_seconds: median(query_s),
        query_bytes: (rows * VALUE_BYTES) as u64,
        threads,
        pass_seconds: median(pass_s),
        answer_seconds_one_thread: median(one_s),
        answer_seconds_all_threads: median(all_s),
        answer_bytes: answer_bytes as u64,
        decode_seconds: median(decode_s),
        decoded_right,
        checks: checks.max(1),
    })
}
