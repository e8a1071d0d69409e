//! PIR mode on the server: the database derived from the served bucket
//! index (patched item by item on an update, rebuilt on a rotation or a
//! new shape), the bounded cache of institutions' public parameters, and
//! the bound on concurrent answers.
//!
//! The database is a pure function of the published index and key epoch,
//! so it is never stored: every replica derives the same one when it loads
//! a snapshot, and it can never disagree with the other modes' answers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use psi_core::bucket::BucketIndex;
use psi_pir::{PirDatabase, PirKeys, PirShape, SchemeChoice};
use sha2::{Digest, Sha256};

use crate::serving::error::ServiceError;
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
}
