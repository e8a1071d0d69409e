//! Sync mode's tag set: fetched or refreshed from the server (a delta, or
//! only the shards that differ), verified against the manifest, and kept in
//! a cache file (0600) whose age bounds how stale an answer can be.

use std::path::{Path, PathBuf};

use psi_core::tagset::{Shard, TagSetHeader};
use psi_core::TagSet;
use psi_proto::v1::{
    sync_tag_set_response, ShardData, SyncTagSetRequest, TagSetDelta, TagSetManifest,
};
use psi_proto::{
    append_delta_part, append_manifest_part, is_root_only, manifest_parts, pack, shard_bitmap,
    unpack_tags,
};

use super::{Session, SyncOutcome};
use crate::error::{Error, Result};

impl Session {
    /// Replaces the cached tag set at `path` with `set` (0600, atomically).
    fn store_cache(&self, path: &Path, set: &TagSet) -> Result<()> {
        std::fs::create_dir_all(&self.options.cache_dir)
            .map_err(|e| Error::io(format!("creating {}", self.options.cache_dir.display()), e))?;
        psi_files::atomic::write_atomically(path, &set.to_bytes(), 0o600)
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))
    }

    /// Where this server's tag set is cached.
    #[must_use]
    pub fn cache_path(&self) -> PathBuf {
        let key = self.server_key_prefix();
        self.options.cache_dir.join(format!("tagset-{key}.bin"))
    }

    /// Fetches or refreshes the local tag set and replaces the cache
    /// atomically. With an intact cache of an older version the server sends
    /// the delta since that version; otherwise the cached shards' digests
    /// tell it which shards to send. Every shard is checked against the
    /// manifest: a damaged or truncated cache, or a delta that does not
    /// reproduce a shard, costs only a refetch of the shards that are wrong.
    ///
    /// # Errors
    /// RPC failures, a digest mismatch, or I/O errors.
    pub async fn sync(&self) -> Result<SyncOutcome> {
        let path = self.cache_path();
        let cache = Cache::read(&path, self.info.key_epoch);
        // An intact cache first asks for the delta alone, checked against
        // the root digest: no shard digests either way.
        let mut bytes_tried = 0;
        let mut known = None;
        if let Some(set) = &cache.intact {
            match self.sync_by_delta(set, &path).await? {
                ByDelta::Done(outcome) => return Ok(outcome),
                ByDelta::Fallback(reply) => {
                    bytes_tried = reply.bytes;
                    known = Some(*reply);
                }
            }
        }
        let first = self
            .fetch_changed(
                cache
                    .intact
                    .as_ref()
                    .map_or(0, |s| s.header().registry_version),
                &cache.held,
                known,
            )
            .await?;
        let mut bytes_fetched = bytes_tried + first.bytes;
        let header = first.header;
        let digests = first.digests.clone();
        let delta_applied = first.delta.is_some() && cache.takes_delta(&header);
        let mut shards = cache.starting_shards(&first)?;
        let mut fetched = 0;
        for data in first.shards {
            fetched += place(&mut shards, &header, data)?;
        }
        let missing = shards.iter().filter(|s| s.is_none()).count();
        if missing > 0 && first.delta.is_some() {
            // The delta did not reproduce some shards, or could not be
            // applied: fetch those.
            tracing::warn!(
                "{missing} shards differ from the manifest after the delta; fetching them"
            );
            let second = self.fetch_changed(0, &shards, None).await?;
            if second.header != header || second.digests != digests {
                return Err(Error::Invalid(
                    "the registry changed during the sync; run it again".into(),
                ));
            }
            bytes_fetched += second.bytes;
            for data in second.shards {
                fetched += place(&mut shards, &header, data)?;
            }
        }
        let shards: Vec<Shard> = shards
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                s.ok_or_else(|| Error::Invalid(format!("shard {i} is neither cached nor sent")))
            })
            .collect::<Result<_>>()?;
        let total = shards.len();
        let set = TagSet::from_parts(header, shards, &digests)
            .map_err(|e| Error::invalid("verifying the tag set", e))?;
        if set.root_digest().as_slice() != first.manifest.root_digest.as_slice() {
            return Err(Error::Invalid(
                "the tag set's root digest does not match the manifest".into(),
            ));
        }
        let unchanged = cache
            .intact
            .as_ref()
            .is_some_and(|c| c.root_digest() == set.root_digest());
        if unchanged {
            // Confirmed current: the cache's age starts again.
            confirm_current(&path)?;
        } else {
            self.store_cache(&path, &set)?;
        }
        Ok(SyncOutcome {
            set,
            shards_fetched: fetched,
            shards_total: total,
            bytes_fetched,
            delta_applied,
        })
    }

    /// The cached tag set without contacting the server, if it was last
    /// confirmed current (synced) at most `max_age` ago.
    ///
    /// # Errors
    /// No usable cache for this key, or one older than `max_age`.
    pub fn cached(&self, max_age: std::time::Duration) -> Result<TagSet> {
        let path = self.cache_path();
        let bytes = std::fs::read(&path).map_err(|e| {
            Error::Cache(format!(
                "no cached tag set at {} ({e}): sync first",
                path.display()
            ))
        })?;
        let set = TagSet::from_bytes(&bytes).map_err(|e| {
            Error::Cache(format!(
                "the cached tag set {} is damaged ({e}): sync again",
                path.display()
            ))
        })?;
        if set.header().epoch != self.info.key_epoch {
            return Err(Error::Cache(format!(
                "the cached tag set is of key epoch {}, the server is at {}: sync again",
                set.header().epoch,
                self.info.key_epoch
            )));
        }
        let age = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .unwrap_or_default();
        if age > max_age {
            return Err(Error::Cache(format!(
                "the cached tag set (registry version {}) was last confirmed {} ago, more than the maximum age of {}; sync again",
                set.header().registry_version,
                humantime::format_duration(std::time::Duration::from_secs(age.as_secs())),
                humantime::format_duration(max_age)
            )));
        }
        Ok(set)
    }

    /// Brings the intact cached `set` up to date with a delta checked
    /// against the manifest's root digest (a `root_only` exchange: no shard
    /// digests either way), or says how many bytes the try cost when the
    /// server has no delta for it or the patched set does not match.
    async fn sync_by_delta(&self, set: &TagSet, path: &Path) -> Result<ByDelta> {
        let held_version = set.header().registry_version;
        let reply = self.fetch(held_version, Held::Digests(&[]), true).await?;
        let same = same_params(set.header(), &reply.header);
        let patched = match &reply.delta {
            None if reply.header == *set.header()
                && set.root_digest().as_slice() == reply.manifest.root_digest.as_slice() =>
            {
                // Nothing changed: no delta to send, the set is current.
                set.clone()
            }
            Some(delta) if same && delta.from_version == held_version => {
                let (added, removed) = delta_tags(delta)?;
                match set.apply_delta(&added, &removed, delta.to_version) {
                    Ok(p) => p,
                    Err(_) => return Ok(ByDelta::Fallback(Box::new(reply))),
                }
            }
            _ => return Ok(ByDelta::Fallback(Box::new(reply))),
        };
        if patched.header() != &reply.header
            || patched.root_digest().as_slice() != reply.manifest.root_digest.as_slice()
        {
            tracing::warn!(
                "the delta did not reproduce the server's tag set; fetching the shards that differ"
            );
            return Ok(ByDelta::Fallback(Box::new(reply)));
        }
        let delta_applied = reply.delta.is_some();
        if delta_applied {
            self.store_cache(path, &patched)?;
        } else {
            // Confirmed current: the cache's age starts again.
            confirm_current(path)?;
        }
        let total = patched.shards().len();
        Ok(ByDelta::Done(SyncOutcome {
            set: patched,
            shards_fetched: 0,
            shards_total: total,
            bytes_fetched: reply.bytes,
            delta_applied,
        }))
    }

    /// The manifest and what differs from `held` (and, for a small set, a
    /// delta from `held_version` when the server has one). The held
    /// shards' digests go with the request while they fit in half a
    /// message; beyond (2^19 shards' are 16 MiB), the manifest comes first
    /// (in parts; `known`, when an earlier exchange brought the whole
    /// manifest already, and its bytes were counted) and the shards whose
    /// digests differ are asked for by a bitmap.
    async fn fetch_changed(
        &self,
        held_version: u64,
        held: &[Option<Shard>],
        known: Option<Fetched>,
    ) -> Result<Fetched> {
        let limit = usize::try_from(self.info.max_message_bytes / 2).unwrap_or(usize::MAX);
        if held.len() * 32 <= limit {
            return self.fetch(held_version, Held::Digests(held), false).await;
        }
        let first = match known.filter(|k| k.delta.is_none() && !is_root_only(&k.manifest)) {
            Some(k) => Fetched { bytes: 0, ..k },
            None => self.fetch(0, Held::Digests(&[]), true).await?,
        };
        let wanted = shard_bitmap(
            first.digests.len(),
            first.digests.iter().enumerate().filter_map(|(i, d)| {
                let have = held.get(i).and_then(Option::as_ref).map(Shard::digest);
                (have != Some(d)).then_some(i)
            }),
        );
        let second = self.fetch(0, Held::Wanted(wanted), false).await?;
        if second.header != first.header
            || second.manifest.root_digest != first.manifest.root_digest
        {
            return Err(Error::Invalid(
                "the registry changed during the sync; run it again".into(),
            ));
        }
        Ok(Fetched {
            shards: second.shards,
            bytes: first.bytes + second.bytes,
            ..first
        })
    }

    /// One `SyncTagSet` exchange: the manifest (its shard lists in parts
    /// when the server sends them so), then the delta (in one or more
    /// parts) or the shards.
    async fn fetch(&self, held_version: u64, held: Held<'_>, root_only: bool) -> Result<Fetched> {
        let (held_digests, wanted_shards) = match held {
            Held::Digests([]) => (Vec::new(), Vec::new()),
            Held::Digests(held) => (
                pack(
                    held.iter()
                        .map(|s| s.as_ref().map_or(&[0u8; 32], Shard::digest)),
                ),
                Vec::new(),
            ),
            Held::Wanted(bitmap) => (Vec::new(), bitmap),
        };
        let message = SyncTagSetRequest {
            key_epoch: self.info.key_epoch,
            held_digests,
            held_version,
            root_only,
            wanted_shards,
        };
        let mut stream = self
            .ask("syncing the tag set", || {
                let mut grpc = self.grpc.clone();
                let request = self.request(message.clone());
                async move { grpc.sync_tag_set(request).await }
            })
            .await?;
        let first = stream
            .message()
            .await
            .map_err(|s| Error::from_status(&s, "syncing the tag set"))?
            .and_then(|m| m.item);
        let Some(sync_tag_set_response::Item::Manifest(mut manifest)) = first else {
            return Err(Error::Invalid(
                "the server's sync stream did not start with a manifest".into(),
            ));
        };
        let mut bytes = prost::Message::encoded_len(&manifest) as u64;
        self.check_epoch(manifest.key_epoch)?;
        let mut shards = Vec::new();
        let mut delta: Option<TagSetDelta> = None;
        while let Some(msg) = stream
            .message()
            .await
            .map_err(|s| Error::from_status(&s, "syncing the tag set"))?
        {
            match msg.item {
                Some(sync_tag_set_response::Item::ManifestPart(part))
                    if manifest.lists_in_parts =>
                {
                    bytes += prost::Message::encoded_len(&part) as u64;
                    append_manifest_part(&mut manifest, part)
                        .map_err(|e| Error::invalid("the server's manifest", e))?;
                }
                Some(sync_tag_set_response::Item::Shard(data))
                    if !manifest.lists_in_parts && delta.is_none() =>
                {
                    bytes += prost::Message::encoded_len(&data) as u64;
                    shards.push(data);
                }
                Some(sync_tag_set_response::Item::Delta(d))
                    if !manifest.lists_in_parts && shards.is_empty() =>
                {
                    bytes += prost::Message::encoded_len(&d) as u64;
                    append_delta_part(&mut delta, d)
                        .map_err(|e| Error::invalid("the server's delta", e))?;
                }
                _ => {
                    return Err(Error::Invalid(
                        "unexpected message in the sync stream".into(),
                    ))
                }
            }
        }
        if manifest.lists_in_parts {
            return Err(Error::Invalid(
                "the server's manifest announced shard lists in parts that did not all come".into(),
            ));
        }
        let (header, digests) =
            manifest_parts(&manifest).map_err(|e| Error::invalid("the server's manifest", e))?;
        if let Some(d) = &delta {
            if d.to_version != header.registry_version {
                return Err(Error::Invalid(format!(
                    "the server's delta leads to version {}, its manifest is of {}",
                    d.to_version, header.registry_version
                )));
            }
        }
        Ok(Fetched {
            manifest,
            header,
            digests,
            shards,
            delta,
            bytes,
        })
    }
}

/// What the cache file held for this key epoch.
struct Cache {
    /// Every shard, as read (a damaged or missing one is `None`).
    held: Vec<Option<Shard>>,
    /// The whole set, when every shard was read intact.
    intact: Option<TagSet>,
}

impl Cache {
    /// Reads the cache at `path`, keeping what belongs to `epoch`.
    fn read(path: &Path, epoch: u64) -> Self {
        let salvaged = std::fs::read(path)
            .ok()
            .and_then(|bytes| TagSet::salvage(&bytes))
            .filter(|(h, _)| h.epoch == epoch);
        let Some((header, held)) = salvaged else {
            return Self {
                held: Vec::new(),
                intact: None,
            };
        };
        let intact = held
            .iter()
            .cloned()
            .collect::<Option<Vec<Shard>>>()
            .and_then(|shards| {
                let digests: Vec<[u8; 32]> = shards.iter().map(|s| *s.digest()).collect();
                TagSet::from_parts(header, shards, &digests).ok()
            });
        let damaged = held.iter().filter(|s| s.is_none()).count();
        if damaged > 0 {
            tracing::warn!(
                "cached tag set {}: {damaged} damaged or missing shards; fetching only those",
                path.display()
            );
        }
        Self { held, intact }
    }

    /// Whether the held set has `header`'s parameters and epoch, so that a
    /// delta can patch it.
    fn takes_delta(&self, header: &TagSetHeader) -> bool {
        self.intact
            .as_ref()
            .is_some_and(|s| same_params(s.header(), header))
    }

    /// The shards to start from, one slot per digest of `first`'s manifest:
    /// the cache patched by the delta, or the cached shards; each kept only
    /// where it matches the manifest, the others `None` (to be fetched).
    fn starting_shards(&self, first: &Fetched) -> Result<Vec<Option<Shard>>> {
        let header = &first.header;
        let digests = &first.digests;
        let base: Vec<Option<Shard>> = match (&first.delta, &self.intact) {
            (Some(delta), Some(set)) if same_params(set.header(), header) => {
                if delta.from_version != set.header().registry_version {
                    return Err(Error::Invalid(format!(
                        "the server sent a delta from version {}, not the held {}",
                        delta.from_version,
                        set.header().registry_version
                    )));
                }
                let (added, removed) = delta_tags(delta)?;
                let patched = set
                    .apply_delta(&added, &removed, delta.to_version)
                    .map_err(|e| Error::invalid("applying the registry delta", e))?;
                patched.shards().iter().cloned().map(Some).collect()
            }
            // The set's parameters changed with the registry's size (or the
            // cache is gone): the delta cannot be applied; fetch the shards.
            (Some(_), _) => Vec::new(),
            (None, _)
                if self.held.len() == digests.len()
                    && self
                        .intact
                        .as_ref()
                        .is_none_or(|s| same_params(s.header(), header)) =>
            {
                self.held.clone()
            }
            (None, _) => Vec::new(),
        };
        let mut shards: Vec<Option<Shard>> = base
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                s.filter(|s| digests.get(i) == Some(s.digest()))
                    .map(|s| Shard::new(header, i, s.count(), s.data().to_vec()))
            })
            .collect();
        shards.resize(digests.len(), None);
        Ok(shards)
    }
}

/// Whether two headers share the set's parameters and key epoch.
fn same_params(a: &TagSetHeader, b: &TagSetHeader) -> bool {
    a.params == b.params && a.epoch == b.epoch
}

/// How a sync by delta ended.
enum ByDelta {
    /// The cache is current.
    Done(SyncOutcome),
    /// It could not be brought up to date this way: the server's reply
    /// (whose bytes the try cost; the whole manifest, when no delta came).
    Fallback(Box<Fetched>),
}

/// What a sync request says the client holds.
enum Held<'a> {
    /// The digests of the shards it holds (a missing one: zeros); none: nothing.
    Digests(&'a [Option<Shard>]),
    /// The shards it wants, as a bitmap (it has the manifest).
    Wanted(Vec<u8>),
}

/// What one sync exchange brought.
struct Fetched {
    manifest: TagSetManifest,
    header: TagSetHeader,
    digests: Vec<[u8; 32]>,
    shards: Vec<ShardData>,
    delta: Option<TagSetDelta>,
    bytes: u64,
}

/// Puts a received shard in its slot; returns 1.
fn place(shards: &mut [Option<Shard>], header: &TagSetHeader, data: ShardData) -> Result<usize> {
    let i = data.index as usize;
    let slot = shards
        .get_mut(i)
        .ok_or_else(|| Error::Invalid(format!("the server sent shard {i}, beyond the manifest")))?;
    *slot = Some(Shard::new(header, i, data.count, data.data));
    Ok(1)
}

/// A delta's added and removed tags.
fn delta_tags(delta: &TagSetDelta) -> Result<(Vec<u64>, Vec<u64>)> {
    let tags =
        |bytes: &[u8]| unpack_tags(bytes).map_err(|e| Error::invalid("the server's delta", e));
    Ok((tags(&delta.added)?, tags(&delta.removed)?))
}

/// Marks the cached tag set at `path` as confirmed current: its age starts again.
fn confirm_current(path: &Path) -> Result<()> {
    std::fs::File::options()
        .append(true)
        .open(path)
        .and_then(|f| f.set_modified(std::time::SystemTime::now()))
        .map_err(|e| Error::io(format!("touching {}", path.display()), e))
}
