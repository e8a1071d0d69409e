//! Registry version deltas: `DIR/deltas/epoch-E-vA-vB.delta` holds the tags
//! that version B added to and removed from version A under key epoch E,
//! each with its bucket. They serve twice:
//! - a sync client that holds version A's tag set downloads these instead of
//!   the shards, which a small change touches nearly all of;
//! - they are the registry's log: an `update` writes only its delta (and,
//!   on the encoding side, a records segment), and the current version is
//!   the base index (`registry-G.bkt`) with the chain of deltas from the base's
//!   version applied, until `compact` writes a new base (see `registry`).
//!
//! Format: magic, then 64-bit big-endian words: epoch, from, to, added
//! count, removed count, the added tags, the removed tags; an update's delta
//! (magic version 2) then has the bucket of each added and each removed tag.
//! A delta without buckets (an `init`'s, after which a new base follows)
//! serves sync clients only and never counts as part of the log.

use std::path::Path;

use anyhow::{bail, Context, Result};
use psi_core::Tag;
use rayon::prelude::*;

use crate::store::manifest::Entry;

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

    /// Its file name inside the data directory (`deltas/epoch-E-vA-vB.delta`).
    #[must_use]
    pub fn name(&self) -> String {
        format!(
            "{DELTA_DIR}/epoch-{}-v{}-v{}.delta",
            self.epoch, self.from, self.to
        )
    }

    /// Its file's bytes.
    #[must_use]
    pub fn to_bytes(&self) -> Vec<u8> {
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
        out
    }

    /// Reads the delta the manifest names by `entry` from `data_dir`: its
    /// length and checksum verified, its content matching its name.
    ///
    /// # Errors
    /// A missing, damaged or malformed file.
    pub fn read(data_dir: &Path, entry: &Entry) -> Result<Self> {
        let bytes = entry.read(data_dir)?;
        let d = parse(&bytes).with_context(|| format!("{} is malformed", entry.name))?;
        if d.name() != entry.name {
            bail!("{} holds the delta {}", entry.name, d.name());
        }
        Ok(d)
    }
}

/// `(epoch, from, to)` of a delta file's name (`deltas/epoch-E-vA-vB.delta`).
#[must_use]
pub fn parse_name(name: &str) -> Option<(u64, u64, u64)> {
    let n = name
        .strip_prefix(DELTA_DIR)?
        .strip_prefix('/')?
        .strip_prefix("epoch-")?
        .strip_suffix(".delta")?;
    let (e, rest) = n.split_once("-v")?;
    let (a, b) = rest.split_once("-v")?;
    Some((e.parse().ok()?, a.parse().ok()?, b.parse().ok()?))
}

/// Of one epoch's deltas, `(from, item)` in any order, those kept with the
/// base index at version `base`: every one from the base on (the log, kept
/// until compacted), and beyond those the newest, up to [`KEEP_DELTAS`] in all.
#[must_use]
pub fn retained<T>(mut deltas: Vec<(u64, T)>, base: u64) -> Vec<T> {
    deltas.sort_by_key(|(from, _)| std::cmp::Reverse(*from));
    deltas
        .into_iter()
        .enumerate()
        .filter(|(rank, (from, _))| *rank < KEEP_DELTAS || *from >= base)
        .map(|(_, (_, item))| item)
        .collect()
}

fn pairs(buckets: &[u32], tags: &[u64]) -> Vec<(u32, Tag)> {
    buckets
        .iter()
        .zip(tags)
        .map(|(b, t)| (*b, Tag(*t)))
        .collect()
}

/// A delta from its file's bytes.
///
/// # Errors
/// Not a delta file, or one whose length does not match its counts.
pub fn parse(bytes: &[u8]) -> Result<Delta> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_round_trip_and_compose() {
        let t = |v: &[u64]| {
            v.iter()
                .map(|&x| ((x % 4) as u32, Tag(x)))
                .collect::<Vec<_>>()
        };
        let d1 = Delta::of_change(3, 1, 2, &t(&[4]), &t(&[1]));
        assert_eq!((d1.added.clone(), d1.removed.clone()), (vec![4], vec![1]));
        assert_eq!((d1.added_pairs(), d1.removed_pairs()), (t(&[4]), t(&[1])));
        let d2 = Delta::of_change(3, 2, 3, &t(&[1, 5]), &t(&[2, 4]));
        let loaded: Vec<Delta> = [&d1, &d2]
            .iter()
            .map(|d| parse(&d.to_bytes()).unwrap())
            .collect();
        assert_eq!(loaded, vec![d1.clone(), d2.clone()]);
        assert_eq!(parse_name(&d2.name()), Some((3, 2, 3)));
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
        let d3 = Delta::between(3, 3, 4, &plain(&[1, 3, 5]), &plain(&[1, 3, 5, 9]));
        let d3 = parse(&d3.to_bytes()).unwrap();
        assert_eq!(d3.added, vec![9]);
        assert!(!d3.has_buckets());
        let with_v1 = vec![d1, d2, d3];
        assert!(Delta::chain_from(&with_v1, 3).is_empty());
        assert_eq!(Delta::compose(&with_v1, 3, 4).unwrap().0, vec![9]);
        // Garbage and truncations are errors.
        assert!(parse(b"junk").is_err());
        let bytes = with_v1[1].to_bytes();
        for cut in [8, 16, bytes.len() - 8] {
            assert!(parse(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn the_log_after_the_base_is_never_pruned() {
        let n = KEEP_DELTAS as u64 + 10;
        let all: Vec<(u64, u64)> = (1..=n).map(|v| (v, v)).collect();
        // Everything from the base (version 5) on is kept, whatever the window.
        let kept = retained(all.clone(), 5);
        assert_eq!(kept.iter().min(), Some(&5));
        assert_eq!(kept.len() as u64, n - 4);
        // With the base at the newest version, only the window remains.
        assert_eq!(retained(all, n + 1).len(), KEEP_DELTAS);
    }
}
