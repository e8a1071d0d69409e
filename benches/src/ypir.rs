//! `psi-bench ypir`: YPIR+SP (`psi_pir::ypir`) through the API the server
//! and client use, on a database of `2^item_bits` items of one group
//! (3,584 bytes) filled with fingerprints: building it (items, hint,
//! precomputation), the client's keys and queries, the server's answers
//! (the first after the keys arrive packs their `b` sides; later ones
//! reuse them; four queries share a pass), decoding, and the bytes on the
//! wire.

use std::time::Instant;

use anyhow::{ensure, Result};
use psi_pir::plain::PlainDatabase;
use psi_pir::ypir::{
    public_seed, Hint, Precomputed, YpirDatabase, YpirKeys, YpirPirClient, YpirShape,
};
use serde::Serialize;

/// Fingerprints per item: 3,200 bytes of a 3,584-byte item, as a bucket
/// of a registry at 8 bytes per entry fills it.
const TAGS_PER_ITEM: u64 = 400;

/// The run's figures.
#[derive(Debug, Clone, Serialize)]
pub struct YpirReport {
    /// Items (rows).
    pub rows: usize,
    /// Entries (fingerprints) in all.
    pub entries: u64,
    /// Bytes the server holds (items and precomputation).
    pub database_bytes: u64,
    /// Building it from tags: items coded, hint, precomputation, s.
    pub build_seconds: f64,
    /// An update re-coding 1% of the items (items, hint, precomputation), s.
    pub patch_one_percent_seconds: f64,
    /// The same for 0.1% of the items, s.
    pub patch_tenth_percent_seconds: f64,
    /// The hint made from the database, s.
    pub hint_seconds: f64,
    /// The hint patched for so many changed rows, s: `(rows, seconds)`.
    pub hint_patch_seconds: Vec<(usize, f64)>,
    /// The packing's precomputation from the hint, s.
    pub precompute_seconds: f64,
    /// The client's packing keys, s.
    pub keys_seconds: f64,
    /// Their bytes on the wire, once per key epoch.
    pub keys_bytes: u64,
    /// Making a query, s (median).
    pub query_seconds: f64,
    /// A query's bytes on the wire.
    pub query_bytes: u64,
    /// Threads the server's work ran on.
    pub threads: usize,
    /// The first answer after the keys arrive (packing their `b` sides), s.
    pub first_answer_seconds: f64,
    /// Later answers, one query a request, s (median).
    pub answer_seconds: f64,
    /// Four queries in one request (one pass), per query, s (median).
    pub answer_of_four_seconds_per_query: f64,
    /// An answer's bytes on the wire.
    pub answer_bytes: u64,
    /// Decoding it, s (median).
    pub decode_seconds: f64,
    /// Checks whose decoded item held the tag asked.
    pub found: usize,
    /// Checks made.
    pub checks: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn tag(item: u64, k: u64) -> u64 {
    (item * TAGS_PER_ITEM + k + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Runs it on `2^item_bits` items (18: the shape of ~10^8 entries), with
/// `checks` checks of spread-out items.
///
/// # Errors
/// A step failing, or a decoded item without the tag asked.
pub fn run(item_bits: u8, checks: usize) -> Result<YpirReport> {
    let shape = YpirShape {
        item_bits,
        columns: 2048,
        bucket_shift: 0,
    };
    let tags = |i: usize| (0..TAGS_PER_ITEM).map(|k| tag(i as u64, k)).collect();
    let t = Instant::now();
    let db = YpirDatabase::build(shape, 1, tags)?;
    let build_seconds = t.elapsed().as_secs_f64();
    // An update re-coding every `step`-th item (a new database; dropped
    // untimed).
    let update = |step: usize| -> Result<f64> {
        let changed: Vec<usize> = (0..shape.items()).step_by(step).collect();
        let t = Instant::now();
        let patched = db.patch(&changed, |i| {
            (0..TAGS_PER_ITEM).map(|k| tag(i as u64, k + 7)).collect()
        })?;
        let seconds = t.elapsed().as_secs_f64();
        drop(patched);
        Ok(seconds)
    };
    let patch_one_percent_seconds = update(100)?;
    let patch_tenth_percent_seconds = update(1000)?;
    let (hint_seconds, hint_patch_seconds, precompute_seconds) = hint_costs(shape)?;

    let client = YpirPirClient::new(shape, 1, &[1u8; 32])?;
    let t = Instant::now();
    let upload = client.public_parameters();
    let keys_seconds = t.elapsed().as_secs_f64();
    let keys = YpirKeys::parse(shape, &upload)?;

    let buckets: Vec<u32> = (0..checks.max(4))
        .map(|c| ((c * 104_729 + 17) % shape.items()) as u32)
        .collect();
    let (mut query_s, mut answer_s, mut decode_s) = (Vec::new(), Vec::new(), Vec::new());
    let mut queries = Vec::new();
    for &b in &buckets {
        let t = Instant::now();
        queries.push(client.query(b)?);
        query_s.push(t.elapsed().as_secs_f64());
    }
    let t = Instant::now();
    let first = db.answer(&keys, &queries[0])?;
    let first_answer_seconds = t.elapsed().as_secs_f64();
    let mut found = 0;
    for (q, &b) in queries.iter().zip(&buckets) {
        let t = Instant::now();
        let answer = db.answer(&keys, q)?;
        answer_s.push(t.elapsed().as_secs_f64());
        ensure!(b != buckets[0] || answer == first, "answers differ");
        let t = Instant::now();
        let fps = client.decode(b, 1, &answer)?;
        decode_s.push(t.elapsed().as_secs_f64());
        if client.contains(&fps, tag(u64::from(b), 0)) {
            found += 1;
        }
    }
    ensure!(found == buckets.len(), "{found} of {} found", buckets.len());
    let mut four_s = Vec::new();
    for chunk in queries.chunks_exact(4) {
        let refs: Vec<&[u8]> = chunk.iter().map(Vec::as_slice).collect();
        let t = Instant::now();
        db.answer_many(&keys, &refs)?;
        four_s.push(t.elapsed().as_secs_f64() / 4.0);
    }
    Ok(YpirReport {
        rows: shape.rows(),
        entries: shape.items() as u64 * TAGS_PER_ITEM,
        database_bytes: db.bytes() as u64,
        build_seconds,
        patch_one_percent_seconds,
        patch_tenth_percent_seconds,
        hint_seconds,
        hint_patch_seconds,
        precompute_seconds,
        keys_seconds,
        keys_bytes: upload.len() as u64,
        query_seconds: median(query_s),
        query_bytes: queries[0].len() as u64,
        threads: rayon::current_num_threads(),
        first_answer_seconds,
        answer_seconds: median(answer_s),
        answer_of_four_seconds_per_query: median(four_s),
        answer_bytes: first.len() as u64,
        decode_seconds: median(decode_s),
        found,
        checks: buckets.len(),
    })
}

/// Seconds: the hint made, patched for so many rows, the precomputation.
type HintCosts = (f64, Vec<(usize, f64)>, f64);

/// The hint made whole, patched for 64 to 4,096 changed rows, and the
/// precomputation: what decides `psi_pir::ypir::hint_patch_rows`.
fn hint_costs(shape: YpirShape) -> Result<HintCosts> {
    let seed = public_seed(1);
    let mut old = PlainDatabase::new(shape.rows(), psi_pir::ypir::RING)?;
    let items: Vec<Vec<u8>> = (0..shape.rows())
        .map(|i| {
            (0..old.item_bytes())
                .map(|b| (i * 31 + b * 7) as u8)
                .collect()
        })
        .collect();
    let refs: Vec<(usize, &[u8])> = items
        .iter()
        .enumerate()
        .map(|(i, b)| (i, b.as_slice()))
        .collect();
    old.patch(&refs)?;
    let t = Instant::now();
    let hint = Hint::new(&old, &seed)?;
    let hint_seconds = t.elapsed().as_secs_f64();
    let mut patches = Vec::new();
    for changed in [64, 256, 1024, 4096] {
        let rows: Vec<usize> = (0..changed).map(|c| c * shape.rows() / changed).collect();
        let mut new = old.clone();
        let fresh: Vec<u8> = vec![0x5a; new.item_bytes()];
        new.patch(
            &rows
                .iter()
                .map(|&r| (r, fresh.as_slice()))
                .collect::<Vec<_>>(),
        )?;
        let mut patched = hint.clone();
        let t = Instant::now();
        patched.patch(&old, &new, &rows, &seed)?;
        patches.push((changed, t.elapsed().as_secs_f64()));
    }
    let t = Instant::now();
    drop(Precomputed::new(&hint, &seed));
    Ok((hint_seconds, patches, t.elapsed().as_secs_f64()))
}
