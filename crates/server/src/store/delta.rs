//! Registry version deltas: `DIR/deltas/epoch-E-vA-vB.delta` holds the tags
//! that version B added to and removed from version A under key epoch E,
//! each with its bucket. They serve twice:
//! - a sync client that holds version A's tag set downloads these instead of
//!   the shards, which a small change touches nearly all of;
//! - they are the registry's log: an `update` writes only its delta (and,
//!   on the encoding side, a records segment), and the current version is
//!   the base index `registry.bkt` with the chain of deltas from the base's
//!   version applied, until `compact` writes a new base (see `registry`).
//!
//! Format: magic, then 64-bit big-endian words: epoch, from, to, added
//! count, removed count, the added tags, the removed tags; an update's delta
//! (magic version 2) then has the bucket of each added and each removed tag.
//! A delta without buckets (an `init`'s, after which a new base follows)
//! serves sync clients only and never counts as part of the log.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use psi_core::Tag;
use rayon::prelude::*;

use crate::store::named_files;
use psi_files::atomic::write_atomically;

/// The delta directory's name inside the data directory.
pub const DELTA_DIR: &str = "deltas";
/// Deltas kept per epoch for sync clients: a client further behind
/// downloads the changed shards. Deltas not yet compacted into the base
/// index are always kept.
pub const KEEP_DELTAS: usize = 64;
const MAGIC_V1: &[u8; 8] = b"PSIDLT\x00\x01";
const MAGIC: &[u8; 8] = b"PSIDLT\x00\x02";

/// What one version changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta {
    /// Key epoch of the tags.
    pub epoch: u64,
    /// The version it starts from.
    pub from: u64,
    /// The version it leads to.
    pub to: u64,
    /// Tags added, sorted.
    pub added: Vec<u64>,
    /// Tags removed, sorted.
    pub removed: Vec<u64>,
    /// The bucket of each added and of each removed tag, in the same
    /// orders, when the delta is an update's (part of the log); `None` for
    /// the delta of an `init` or `merge`, which only serves sync clients.
    pub buckets: Option<(Vec<u32>, Vec<u32>)>,
}

impl Delta {
    /// The difference between two tag lists (any order, duplicates
    /// allowed), for sync clients only (no buckets: a new base follows).
    #[must_use]
    pub fn between(epoch: u64, from: u64, to: u64, old: &[Tag], new: &[Tag]) -> Self {
        let sorted = |tags: &[Tag]| {
            let mut v: Vec<u64> = tags.iter().map(|t| t.0).collect();
            v.par_sort_unstable();
            v.dedup();
            v
        };
        let (old, new) = (sorted(old), sorted(new));
        let removed = old
            .par_iter()
            .filter(|t| new.binary_search(t).is_err())
            .copied()
            .collect();
        let added = new
            .par_iter()
            .filter(|t| old.binary_search(t).is_err())
            .copied()
            .collect();
        Self {
            epoch,
            from,
            to,
            added,
            removed,
            buckets: None,
        }
    }

    /// The delta of a change already worked out: `added` and `removed`
    /// `(bucket, tag)` pairs, disjoint, in any order.
    #[must_use]
    pub fn of_change(
        epoch: u64,
        from: u64,
        to: u64,
        added: &[(u32, Tag)],
        removed: &[(u32, Tag)],
    ) -> Self {
        let split = |pairs: &[(u32, Tag)]| -> (Vec<u64>, Vec<u32>) {
            let mut v: Vec<(u64, u32)> = pairs.iter().map(|(b, t)| (t.0, *b)).collect();
            v.sort_unstable();
            v.dedup_by_key(|(t, _)| *t);
            v.into_iter().unzip()
        };
        let ((added, added_buckets), (removed, removed_buckets)) = (split(added), split(removed));
        Self {
            epoch,
            from,
            to,
            added,
            removed,
            buckets: Some((added_buckets, removed_buckets)),
        }
    }

    /// Whether the delta is an update's, with its tags' buckets (it can be
    /// applied to the bucket index).
    #[must_use]
    pub fn has_buckets(&self) -> bool {
        self.buckets
            .as_ref()
            .is_some_and(|(a, r)| a.len() == self.added.len() && r.len() == self.removed.len())
    }

    /// The added `(bucket, tag)` pairs (none without buckets).
    #[must_use]
    pub fn added_pairs(&self) -> Vec<(u32, Tag)> {
        self.buckets
            .as_ref()
            .map(|(a, _)| pairs(a, &self.added))
            .unwrap_or_default()
    }

    /// The removed `(bucket, tag)` pairs (none without buckets).
    #[must_use]
    pub fn removed_pairs(&self) -> Vec<(u32, Tag)> {
        self.buckets
            .as_ref()
            .map(|(_, r)| pairs(r, &self.removed))
            .unwrap_or_default()
    }

    /// The deltas that lead on from the base index's `version` without a
    /// gap, oldest first, each carrying its buckets: the log not yet
    /// compacted into the base. `deltas` are one epoch's, in any order.
    #[must_use]
    pub fn chain_from(deltas: &[Delta], version: u64) -> Vec<&Delta> {
        let mut by_from: Vec<&Delta> = deltas.iter().filter(|d| d.from >= version).collect();
        by_from.sort_by_key(|d| d.from);
        let mut chain = Vec::new();
        let mut at = version;
        for d in by_from {
            if d.from != at || d.to <= d.from || !d.has_buckets() {
                break;
            }
            at = d.to;
            chain.push(d);
        }
        chain
    }

    /// The net change from version `from` to version `to` (added, removed;
    /// each sorted), if the deltas lead from one to the other without a gap.
    #[must_use]
    pub fn compose(deltas: &[Delta], from: u64, to: u64) -> Option<(Vec<u64>, Vec<u64>)> {
        let mut net = crate::store::NetChange::new();
        let mut at = from;
        for d in deltas.iter().filter(|d| d.from >= from && d.to <= to) {
            if d.from != at {
                return None;
            }
            for t in &d.removed {
                net.remove(*t, ());
            }
            for t in &d.added {
                net.add(*t, ());
            }
            at = d.to;
        }
        let sorted = |set: std::collections::HashMap<u64, ()>| {
            let mut v: Vec<u64> = set.into_keys().collect();
            v.sort_unstable();
            v
        };
        (at == to && to != from).then(|| (sorted(net.added), sorted(net.removed)))
    }

    fn path(data_dir: &Path, epoch: u64, from: u64, to: u64) -> PathBuf {
        data_dir
            .join(DELTA_DIR)
            .join(format!("epoch-{epoch}-v{from}-v{to}.delta"))
    }

    /// Writes the delta and drops, beyond the newest [`KEEP_DELTAS`], the
    /// oldest ones not after `base` (the base index's version: later ones are
    /// the log, kept until compacted), and every delta of another epoch.
    ///
    /// # Errors
    /// I/O errors.
    pub fn store(&self, data_dir: &Path, base: u64) -> Result<()> {
        let dir = data_dir.join(DELTA_DIR);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let changes = self.added.len() + self.removed.len();
        let mut out = Vec::with_capacity(48 + 16 * changes);
        out.extend_from_slice(if self.has_buckets() { MAGIC } else { MAGIC_V1 });
        for n in [
            self.epoch,
            self.from,
            self.to,
            self.added.len() as u64,
            self.removed.len() as u64,
        ] {
            out.extend_from_slice(&n.to_be_bytes());
        }
        for t in self.added.iter().chain(&self.removed) {
            out.extend_from_slice(&t.to_be_bytes());
        }
        if let Some((added, removed)) = self.buckets.as_ref().filter(|_| self.has_buckets()) {
            for b in added.iter().chain(removed) {
                out.extend_from_slice(&u64::from(*b).to_be_bytes());
            }
        }
        write_atomically(
            &Self::path(data_dir, self.epoch, self.from, self.to),
            &out,
            0o600,
        )?;
        let mut all = list(data_dir)?;
        all.sort_by_key(|(e, from, _, _)| (*e != self.epoch, std::cmp::Reverse(*from)));
        let mut kept = 0;
        for (epoch, from, _, path) in all {
            if epoch == self.epoch && (kept < KEEP_DELTAS || from >= base) {
                kept += 1;
            } else {
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
            }
        }
        Ok(())
    }

    /// Removes every delta (a new key epoch makes them useless).
    ///
    /// # Errors
    /// I/O errors.
    pub fn remove_all(data_dir: &Path) -> Result<()> {
        for (_, _, _, path) in list(data_dir)? {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
        Ok(())
    }

    /// The deltas of `epoch` up to version `to`, oldest first. Unreadable
    /// delta files are skipped with a warning (clients then fetch shards).
    ///
    /// # Errors
    /// An unreadable directory.
    pub fn load(data_dir: &Path, epoch: u64, to: u64) -> Result<Vec<Delta>> {
        let mut out = Vec::new();
        for (e, from, t, path) in list(data_dir)? {
            if e != epoch || t > to {
                continue;
            }
            match std::fs::read(&path)
                .map_err(anyhow::Error::from)
                .and_then(|b| parse(&b))
            {
                Ok(d) if d.epoch == e && d.from == from && d.to == t => out.push(d),
                Ok(_) => {
                    tracing::warn!(path = %path.display(), "delta file does not match its name; ignored")
                }
                Err(err) => {
                    tracing::warn!(path = %path.display(), "unreadable delta file ignored: {err:#}")
                }
            }
        }
        out.sort_by_key(|d| d.from);
        Ok(out)
    }
}

/// The newest delta file's (epoch, from, to), if any: part of what a
/// watcher compares to see a new version.
#[must_use]
pub fn newest(data_dir: &Path) -> Option<(u64, u64, u64)> {
    list(data_dir)
        .ok()?
        .into_iter()
        .map(|(e, a, b, _)| (e, a, b))
        .max()
}

fn pairs(buckets: &[u32], tags: &[u64]) -> Vec<(u32, Tag)> {
    buckets
        .iter()
        .zip(tags)
        .map(|(b, t)| (*b, Tag(*t)))
        .collect()
}

fn parse(bytes: &[u8]) -> Result<Delta> {
    let with_buckets = match bytes.get(..8) {
        Some(m) if m == MAGIC => true,
        Some(m) if m == MAGIC_V1 => false,
        _ => bail!("not a delta file"),
    };
    if !(bytes.len() - 8).is_multiple_of(8) {
        bail!("delta file length is not whole words");
    }
    let mut words = bytes
        .get(8..)
        .unwrap_or(&[])
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])));
    let mut next = || words.next().context("truncated delta file");
    let (epoch, from, to, n_add, n_rem) = (next()?, next()?, next()?, next()?, next()?);
    let rest: Vec<u64> = words.collect();
    let changes = n_add.saturating_add(n_rem);
    let expected = if with_buckets {
        changes.saturating_mul(2)
    } else {
        changes
    };
    if rest.len() as u64 != expected {
        bail!("delta file length does not match its counts");
    }
    let (tags, buckets) = rest.split_at(usize::try_from(changes)?);
    let (added, removed) = tags.split_at(usize::try_from(n_add)?);
    let buckets: Vec<u32> = buckets
        .iter()
        .map(|&b| u32::try_from(b).context("bucket id out of range"))
        .collect::<Result<_>>()?;
    let buckets = with_buckets.then(|| {
        let (a, r) = buckets.split_at(added.len());
        (a.to_vec(), r.to_vec())
    });
    Ok(Delta {
        epoch,
        from,
        to,
        added: added.to_vec(),
        removed: removed.to_vec(),
        buckets,
    })
}

fn list(data_dir: &Path) -> Result<Vec<(u64, u64, u64, PathBuf)>> {
    let found = named_files(&data_dir.join(DELTA_DIR), |name| {
        let n = name.strip_prefix("epoch-")?.strip_suffix(".delta")?;
        let (e, rest) = n.split_once("-v")?;
        let (a, b) = rest.split_once("-v")?;
        Some((e.parse().ok()?, a.parse().ok()?, b.parse().ok()?))
    })?;
    Ok(found
        .into_iter()
        .map(|((e, a, b), p)| (e, a, b, p))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_round_trip_compose_and_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let t = |v: &[u64]| {
            v.iter()
                .map(|&x| ((x % 4) as u32, Tag(x)))
                .collect::<Vec<_>>()
        };
        let d1 = Delta::of_change(3, 1, 2, &t(&[4]), &t(&[1]));
        assert_eq!((d1.added.clone(), d1.removed.clone()), (vec![4], vec![1]));
        assert_eq!((d1.added_pairs(), d1.removed_pairs()), (t(&[4]), t(&[1])));
        let d2 = Delta::of_change(3, 2, 3, &t(&[1, 5]), &t(&[2, 4]));
        d1.store(dir.path(), 0).unwrap();
        d2.store(dir.path(), 0).unwrap();
        let loaded = Delta::load(dir.path(), 3, 3).unwrap();
        assert_eq!(loaded, vec![d1.clone(), d2.clone()]);
        assert_eq!(Delta::load(dir.path(), 3, 2).unwrap(), vec![d1.clone()]);
        let (add, rem) = Delta::compose(&loaded, 1, 3).unwrap();
        // 1 removed then re-added: no change; 2 and 4 gone in the end.
        assert_eq!((add, rem), (vec![5], vec![2]));
        assert_eq!(Delta::compose(&loaded, 2, 3).unwrap().0, vec![1, 5]);
        assert!(Delta::compose(&loaded, 3, 3).is_none(), "nothing to send");
        assert!(
            Delta::compose(&loaded[1..], 1, 3).is_none(),
            "a gap at the start"
        );
        assert!(
            Delta::compose(&loaded[..1], 1, 3).is_none(),
            "short of the target"
        );
        // The log from a base version: consecutive deltas from it.
        assert_eq!(Delta::chain_from(&loaded, 1).len(), 2);
        assert_eq!(Delta::chain_from(&loaded, 2), vec![&d2]);
        assert!(Delta::chain_from(&loaded, 3).is_empty());
        assert!(Delta::chain_from(&loaded[1..], 1).is_empty(), "a gap");
        // A delta without buckets (an init's) serves sync but is no log.
        let plain = |v: &[u64]| v.iter().map(|&x| Tag(x)).collect::<Vec<_>>();
        Delta::between(3, 3, 4, &plain(&[1, 3, 5]), &plain(&[1, 3, 5, 9]))
            .store(dir.path(), 0)
            .unwrap();
        let with_v1 = Delta::load(dir.path(), 3, 4).unwrap();
        assert_eq!(with_v1.len(), 3);
        assert_eq!(with_v1[2].added, vec![9]);
        assert!(!with_v1[2].has_buckets());
        assert!(Delta::chain_from(&with_v1, 3).is_empty());
        assert_eq!(Delta::compose(&with_v1, 3, 4).unwrap().0, vec![9]);
        // A new epoch's delta removes the old epoch's.
        Delta::of_change(4, 3, 4, &t(&[9]), &[])
            .store(dir.path(), 0)
            .unwrap();
        assert!(Delta::load(dir.path(), 3, 9).unwrap().is_empty());
        assert_eq!(Delta::load(dir.path(), 4, 9).unwrap().len(), 1);
        // Garbage is skipped.
        std::fs::write(
            dir.path().join(DELTA_DIR).join("epoch-4-v4-v5.delta"),
            b"junk",
        )
        .unwrap();
        assert_eq!(Delta::load(dir.path(), 4, 9).unwrap().len(), 1);
    }

    #[test]
    fn the_log_after_the_base_is_never_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let n = KEEP_DELTAS as u64 + 10;
        for v in 1..=n {
            Delta::of_change(1, v, v + 1, &[(0, Tag(v))], &[])
                .store(dir.path(), 5)
                .unwrap();
        }
        // Everything from the base (version 5) on is kept, whatever the window.
        let kept = Delta::load(dir.path(), 1, u64::MAX).unwrap();
        assert_eq!(kept.first().map(|d| d.from), Some(5));
        assert_eq!(kept.len() as u64, n - 4);
        // With the base at the newest version, only the window remains.
        Delta::of_change(1, n + 1, n + 2, &[], &[(0, Tag(1))])
            .store(dir.path(), n + 2)
            .unwrap();
        assert_eq!(
            Delta::load(dir.path(), 1, u64::MAX).unwrap().len(),
            KEEP_DELTAS
        );
    }
}
