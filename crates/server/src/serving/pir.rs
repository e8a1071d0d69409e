//! PIR mode on the server: the database derived from the served bucket
//! index (patched item by item on an update, rebuilt on a rotation or a
//! new shape), the bounded cache of institutions' public parameters, and
//! the queue of queries waiting for a pass over the database ([`Passes`]:
//! concurrent requests' queries share passes).
//!
//! The database is a pure function of the published index and key epoch,
//! so it is never stored: every replica derives the same one when it loads
//! a snapshot, and it can never disagree with the other modes' answers.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use psi_core::bucket::BucketIndex;
use psi_pir::{PirDatabase, PirKeys, PirShape, PreparedQuery, SchemeChoice};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

use crate::serving::error::ServiceError;
use crate::serving::metrics::Metrics;
use crate::serving::snapshot::Snapshot;

/// Bytes of a public parameters' id.
pub const KEYS_ID_BYTES: usize = 16;
/// Public parameters kept per institution: a new upload beyond this evicts
/// the institution's least recently used, never another institution's.
pub const KEYS_PER_INSTITUTION: usize = 4;

/// The tags of item `i`: its buckets' tags.
fn item_tags(index: &BucketIndex, shape: PirShape, i: usize) -> Vec<u64> {
    let first = (i as u64) << shape.bucket_shift();
    let last = ((i as u64 + 1) << shape.bucket_shift()).min(index.bucket_count() as u64);
    (first..last)
        .filter_map(|b| index.bucket(u32::try_from(b).ok()?))
        .flat_map(|run| run.to_vec())
        .collect()
}

/// The fullest item's entry count with `2^shift` buckets per item.
fn fullest(index: &BucketIndex, shift: u8) -> usize {
    let mut most = 0;
    let mut current = 0;
    for b in 0..index.bucket_count() {
        if b % (1usize << shift) == 0 {
            current = 0;
        }
        current += u32::try_from(b)
            .ok()
            .and_then(|b| index.bucket(b))
            .map_or(0, |r| r.len());
        most = most.max(current);
    }
    most
}

/// The PIR database for `snap` under the scheme `choice` picks, from
/// `prev`'s when only some items changed; `None` when PIR mode is off
/// (`max_bytes` 0), the database would exceed `max_bytes`, or a client's
/// public parameters would not fit in a message of `max_message_bytes`
/// (both logged).
///
/// # Errors
/// An item that overflows the shape chosen for it (cannot happen: the
/// shape is chosen to hold the fullest item).
pub fn database_for(
    snap: &Snapshot,
    prev: Option<&Snapshot>,
    max_bytes: usize,
    max_message_bytes: usize,
    choice: SchemeChoice,
) -> anyhow::Result<Option<Arc<PirDatabase>>> {
    if max_bytes == 0 {
        return Ok(None);
    }
    let index = &snap.index;
    let shape = match PirShape::for_registry(choice, index.prefix_bits(), |s| fullest(index, s)) {
        Ok(shape) => shape,
        Err(e) => {
            tracing::warn!("PIR mode off for this registry: {e}");
            return Ok(None);
        }
    };
    if shape.database_bytes() > max_bytes {
        tracing::warn!(
            database_bytes = shape.database_bytes(),
            pir_max_database_bytes = max_bytes,
            "PIR mode off: the database would exceed pir_max_database_bytes"
        );
        return Ok(None);
    }
    // The public parameters and the protobuf framing around them.
    if shape.keys_bytes() + 1024 > max_message_bytes {
        tracing::warn!(
            keys_bytes = shape.keys_bytes(),
            max_message_bytes,
            "PIR mode off: clients' public parameters would not fit in max_message_bytes"
        );
        return Ok(None);
    }
    let started = std::time::Instant::now();
    let tags = |i: usize| item_tags(index, shape, i);
    let reusable = prev.and_then(|p| {
        let db = p.pir.as_ref()?;
        (db.shape() == shape
            && db.epoch() == snap.epoch
            && p.index.prefix_bits() == index.prefix_bits())
        .then_some((p, db))
    });
    let db = match reusable {
        Some((p, db)) => {
            let changed = changed_items(&p.index, index, shape);
            if changed.is_empty() {
                return Ok(Some(Arc::clone(db)));
            }
            if changed.len() < shape.items() / 4 {
                let patched = db.patch(&changed, tags)?;
                tracing::info!(
                    items = changed.len(),
                    ms = started.elapsed().as_millis() as u64,
                    "PIR database patched"
                );
                return Ok(Some(Arc::new(patched)));
            }
            PirDatabase::build(shape, snap.epoch, tags)?
        }
        None => PirDatabase::build(shape, snap.epoch, tags)?,
    };
    tracing::info!(
        scheme = shape.scheme(),
        items = shape.items(),
        item_bytes = shape.item_bytes(),
        bytes = db.bytes(),
        ms = started.elapsed().as_millis() as u64,
        "PIR database built"
    );
    Ok(Some(Arc::new(db)))
}

/// Items whose buckets differ between two indexes of the same prefix bits.
fn changed_items(before: &BucketIndex, after: &BucketIndex, shape: PirShape) -> Vec<usize> {
    let mut items: Vec<usize> = (0..after.bucket_count())
        .filter_map(|b| u32::try_from(b).ok())
        .filter(|&b| {
            let (x, y) = (before.bucket(b), after.bucket(b));
            match (x, y) {
                (Some(x), Some(y)) => x.len() != y.len() || x.to_vec() != y.to_vec(),
                (x, y) => x.is_some() != y.is_some(),
            }
        })
        .map(|b| shape.item_of(b))
        .collect();
    items.dedup();
    items
}

/// The id of public parameters: the first 16 bytes of their SHA-256.
#[must_use]
pub fn keys_id(bytes: &[u8]) -> [u8; KEYS_ID_BYTES] {
    let d = Sha256::digest(bytes);
    let mut id = [0u8; KEYS_ID_BYTES];
    id.copy_from_slice(d.get(..KEYS_ID_BYTES).unwrap_or(&[0; KEYS_ID_BYTES]));
    id
}

struct Cached {
    keys: Arc<PirKeys>,
    bytes: usize,
    last_used: u64,
}

#[derive(Default)]
struct Entries {
    map: HashMap<(String, [u8; KEYS_ID_BYTES]), Cached>,
    bytes: usize,
    clock: u64,
}

/// Institutions' public parameters, at most `max_bytes` in all and
/// [`KEYS_PER_INSTITUTION`] per institution, least recently used evicted
/// first. Each is used only for the institution that uploaded it.
pub struct KeysCache {
    max_bytes: usize,
    entries: Mutex<Entries>,
}

impl std::fmt::Debug for KeysCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let e = self.lock();
        f.debug_struct("KeysCache")
            .field("entries", &e.map.len())
            .field("bytes", &e.bytes)
            .field("max_bytes", &self.max_bytes)
            .finish()
    }
}

impl KeysCache {
    /// An empty cache of at most `max_bytes`.
    #[must_use]
    pub fn new(max_bytes: usize) -> Self {
        Self {
            max_bytes,
            entries: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps `keys` for `institution` under `id`, evicting as needed.
    ///
    /// # Errors
    /// When one entry alone exceeds the cache.
    pub fn insert(
        &self,
        institution: &str,
        id: [u8; KEYS_ID_BYTES],
        keys: PirKeys,
    ) -> Result<(), ServiceError> {
        let bytes = keys.memory_bytes();
        if bytes > self.max_bytes {
            return Err(ServiceError::Unavailable(format!(
                "this server keeps at most {} bytes of PIR public parameters (pir_keys_cache_bytes) and these take {bytes}",
                self.max_bytes
            )));
        }
        let mut e = self.lock();
        e.clock += 1;
        let now = e.clock;
        if let Some(old) = e.map.remove(&(institution.to_string(), id)) {
            e.bytes -= old.bytes;
        }
        // The institution's own oldest first, then anyone's.
        while e.map.keys().filter(|(i, _)| i == institution).count() >= KEYS_PER_INSTITUTION {
            evict_oldest(&mut e, Some(institution));
        }
        while e.bytes + bytes > self.max_bytes && !e.map.is_empty() {
            evict_oldest(&mut e, None);
        }
        e.bytes += bytes;
        e.map.insert(
            (institution.to_string(), id),
            Cached {
                keys: Arc::new(keys),
                bytes,
                last_used: now,
            },
        );
        Ok(())
    }

    /// The keys `institution` uploaded under `id`, if still held.
    #[must_use]
    pub fn get(&self, institution: &str, id: &[u8]) -> Option<Arc<PirKeys>> {
        let id: [u8; KEYS_ID_BYTES] = id.try_into().ok()?;
        let mut e = self.lock();
        e.clock += 1;
        let now = e.clock;
        let c = e.map.get_mut(&(institution.to_string(), id))?;
        c.last_used = now;
        Some(Arc::clone(&c.keys))
    }

    /// Entries and bytes held.
    #[must_use]
    pub fn usage(&self) -> (usize, usize) {
        let e = self.lock();
        (e.map.len(), e.bytes)
    }
}

fn evict_oldest(e: &mut Entries, institution: Option<&str>) {
    let oldest = e
        .map
        .iter()
        .filter(|((i, _), _)| institution.is_none_or(|want| i == want))
        .min_by_key(|(_, c)| c.last_used)
        .map(|(k, _)| k.clone());
    if let Some(k) = oldest {
        if let Some(c) = e.map.remove(&k) {
            e.bytes -= c.bytes;
        }
    }
}

/// A query's answer, or why the scheme could not make it.
pub type PassAnswer = oneshot::Receiver<psi_pir::Result<Vec<u8>>>;

/// Queries of concurrent `PirQuery` requests waiting for a pass over their
/// PIR database. One pass runs at a time, on rayon's pool (the pass itself
/// spreads over every core); the queries that arrive while it runs wait
/// and share the next one, up to `PirDatabase::queries_per_pass` of them
/// on the same database (YPIR+SP: four; Spiral answers one at a time),
/// whatever request or institution they come from (each is packed with
/// its own client's keys). A query arriving at an idle server starts its
/// pass at once. Queries whose request was cancelled or timed
/// out are dropped unanswered. How many can wait is bounded by the
/// requests admitted (`pir_max_concurrent`) times their queries
/// (`pir_max_batch`).
#[derive(Debug)]
pub struct Passes {
    state: Mutex<Waiting>,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct Waiting {
    jobs: VecDeque<PassJob>,
    /// A drainer is taking jobs.
    running: bool,
}

impl std::fmt::Debug for Waiting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waiting")
            .field("jobs", &self.jobs.len())
            .field("running", &self.running)
            .finish()
    }
}

struct PassJob {
    db: Arc<PirDatabase>,
    keys: Arc<PirKeys>,
    query: PreparedQuery,
    reply: oneshot::Sender<psi_pir::Result<Vec<u8>>>,
}

impl Passes {
    /// An empty queue counting its passes in `metrics`.
    #[must_use]
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            state: Mutex::new(Waiting::default()),
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `queries`, prepared against `db` and `keys`; their answers
    /// arrive, in order, on the receivers returned.
    pub fn submit(
        self: &Arc<Self>,
        db: &Arc<PirDatabase>,
        keys: &Arc<PirKeys>,
        queries: Vec<PreparedQuery>,
    ) -> Vec<PassAnswer> {
        let mut answers = Vec::with_capacity(queries.len());
        let start = {
            let mut waiting = self.lock();
            for query in queries {
                let (reply, answer) = oneshot::channel();
                waiting.jobs.push_back(PassJob {
                    db: Arc::clone(db),
                    keys: Arc::clone(keys),
                    query,
                    reply,
                });
                answers.push(answer);
            }
            !std::mem::replace(&mut waiting.running, true)
        };
        if start {
            let passes = Arc::clone(self);
            rayon::spawn(move || passes.drain());
        }
        answers
    }

    /// Runs passes until no query waits.
    fn drain(&self) {
        while let Some(jobs) = self.next_pass() {
            let Some(db) = jobs.first().map(|j| Arc::clone(&j.db)) else {
                continue;
            };
            let pairs: Vec<(&PirKeys, &PreparedQuery)> =
                jobs.iter().map(|j| (&*j.keys, &j.query)).collect();
            let answers = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                db.answer_prepared(&pairs)
            }))
            .unwrap_or_else(|_| {
                tracing::error!("a PIR pass panicked (its queries refused, still serving)");
                vec![Err(psi_pir::Error::Scheme); pairs.len()]
            });
            drop(pairs);
            self.metrics.pir_pass(jobs.len());
            for (job, answer) in jobs.into_iter().zip(answers) {
                let _ = job.reply.send(answer);
            }
        }
    }

    /// The next pass's queries: the oldest one still awaited and as many
    /// more on its database as one pass answers, in the order they came;
    /// `None`, the drainer stopping, when none waits.
    fn next_pass(&self) -> Option<Vec<PassJob>> {
        let mut waiting = self.lock();
        waiting.jobs.retain(|j| !j.reply.is_closed());
        let Some(first) = waiting.jobs.pop_front() else {
            waiting.running = false;
            return None;
        };
        let most = first.db.queries_per_pass();
        let mut jobs = vec![first];
        let mut i = 0;
        while jobs.len() < most && i < waiting.jobs.len() {
            let same = waiting
                .jobs
                .get(i)
                .is_some_and(|j| jobs.first().is_some_and(|f| Arc::ptr_eq(&j.db, &f.db)));
            match same.then(|| waiting.jobs.remove(i)).flatten() {
                Some(job) => jobs.push(job),
                None => i += 1,
            }
        }
        Some(jobs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use psi_pir::SchemeClient;

    fn keys(shape: PirShape, seed: u8) -> (PirKeys, [u8; KEYS_ID_BYTES]) {
        let pp = SchemeClient::new(shape, 1, &[seed; 32])
            .unwrap()
            .public_parameters();
        (PirKeys::parse(shape, 1, &pp).unwrap(), keys_id(&pp))
    }

    #[test]
    fn the_cache_is_bounded_per_institution_and_in_bytes() {
        let shape = PirShape::for_registry(SchemeChoice::Spiral, 0, |_| 1).unwrap();
        let (k, _) = keys(shape, 1);
        let one = k.memory_bytes();
        let cache = KeysCache::new(3 * one);
        // One institution fills its own share only.
        let mut ids = Vec::new();
        for seed in 0..5u8 {
            let (k, id) = keys(shape, seed);
            cache.insert("bank-a", id, k).unwrap();
            ids.push(id);
        }
        assert_eq!(cache.usage(), (3, 3 * one));
        assert!(cache.get("bank-a", &ids[0]).is_none(), "evicted");
        assert!(cache.get("bank-a", &ids[4]).is_some());
        // Keys are only ever found for the institution that sent them.
        assert!(cache.get("bank-b", &ids[4]).is_none());
        // The byte bound evicts the least recently used.
        assert!(cache.get("bank-a", &ids[2]).is_some());
        let (k, id) = keys(shape, 9);
        cache.insert("clinic", id, k).unwrap();
        assert_eq!(cache.usage().0, 3);
        assert!(
            cache.get("bank-a", &ids[3]).is_none(),
            "least recently used went"
        );
        assert!(cache.get("bank-a", &ids[2]).is_some());
        // An entry larger than the whole cache is refused.
        let tiny = KeysCache::new(one - 1);
        let (k, id) = keys(shape, 3);
        assert!(tiny.insert("x", id, k).is_err());
    }

    #[test]
    fn queries_of_several_requests_share_passes_and_cancelled_ones_are_dropped() {
        // A YPIR+SP database of 2^11 items, one bucket each; another one
        // like it (as after an update).
        let shape = PirShape::Ypir(psi_pir::ypir::YpirShape {
            item_bits: 11,
            columns: 2048,
            bucket_shift: 0,
        });
        let tags = |i: usize| vec![(i as u64 + 1) << 40];
        let db = Arc::new(PirDatabase::build(shape, 1, tags).unwrap());
        let other = Arc::new(PirDatabase::build(shape, 1, tags).unwrap());
        let mut clients: Vec<SchemeClient> = (0..2u8)
            .map(|s| SchemeClient::new(shape, 1, &[s; 32]).unwrap())
            .collect();
        let keys: Vec<Arc<PirKeys>> = clients
            .iter_mut()
            .map(|c| Arc::new(PirKeys::parse(shape, 1, &c.public_parameters()).unwrap()))
            .collect();
        let metrics = Arc::new(Metrics::default());
        let passes = Arc::new(Passes::new(Arc::clone(&metrics)));
        // A pass is running: what is submitted now waits for the next.
        passes.lock().running = true;
        let ask = |c: usize, db: &Arc<PirDatabase>, buckets: &[u32]| {
            let queries = buckets
                .iter()
                .map(|&b| db.prepare(&keys[c], &clients[c].query(b).unwrap()).unwrap())
                .collect();
            passes.submit(db, &keys[c], queries)
        };
        let first = ask(0, &db, &[3, 700, 2047]);
        let on_other = ask(0, &other, &[5]);
        let second = ask(1, &db, &[9, 10]);
        drop(ask(1, &db, &[11]));
        passes.drain();
        // One pass for the first request's three and the second's first
        // query, one for the other database's, one for the second's last;
        // the cancelled query is not answered.
        let rendered = metrics.render();
        assert!(rendered.contains("psi_pir_passes_total 3"), "{rendered}");
        assert!(
            rendered.contains("psi_pir_pass_queries_total 6"),
            "{rendered}"
        );
        let asked = [(0, 3u32), (0, 700), (0, 2047), (0, 5), (1, 9), (1, 10)];
        for (mut answer, (c, bucket)) in first.into_iter().chain(on_other).chain(second).zip(asked)
        {
            let answer = answer.try_recv().unwrap().unwrap();
            let fps = clients[c].decode(bucket, 1, &answer).unwrap();
            assert!(
                clients[c].contains(&fps, (u64::from(bucket) + 1) << 40),
                "{bucket}"
            );
        }
        assert!(
            !passes.lock().running,
            "the drainer stopped with nothing left"
        );
    }
}
