//! Registry version deltas: `DIR/deltas/epoch-E-vA-vB.delta` holds the tags
//! that version B added to and removed from version A under key epoch E. A
//! client that holds version A's tag set downloads these instead of the
//! shards, which a small change touches nearly all of.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use psi_core::Tag;

use crate::atomic_file::write_atomically;

/// The delta directory's name inside the data directory.
pub const DELTA_DIR: &str = "deltas";
/// Deltas kept per epoch: a client further behind downloads the changed shards.
pub const KEEP_DELTAS: usize = 64;
const MAGIC: &[u8; 8] = b"PSIDLT\x00\x01";

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
}

impl Delta {
    /// The difference between two tag lists (any order, duplicates allowed).
    #[must_use]
    pub fn between(epoch: u64, from: u64, to: u64, old: &[Tag], new: &[Tag]) -> Self {
        let sorted = |tags: &[Tag]| {
            let mut v: Vec<u64> = tags.iter().map(|t| t.0).collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        let (old, new) = (sorted(old), sorted(new));
        let removed = old
            .iter()
            .filter(|t| new.binary_search(t).is_err())
            .copied()
            .collect();
        let added = new
            .iter()
            .filter(|t| old.binary_search(t).is_err())
            .copied()
            .collect();
        Self {
            epoch,
            from,
            to,
            added,
            removed,
        }
    }

    /// The net change from version `from` to version `to` (added, removed;
    /// each sorted), if the deltas lead from one to the other without a gap.
    #[must_use]
    pub fn compose(deltas: &[Delta], from: u64, to: u64) -> Option<(Vec<u64>, Vec<u64>)> {
        let mut added: HashSet<u64> = HashSet::new();
        let mut removed: HashSet<u64> = HashSet::new();
        let mut at = from;
        for d in deltas.iter().filter(|d| d.from >= from && d.to <= to) {
            if d.from != at {
                return None;
            }
            for t in &d.removed {
                if !added.remove(t) {
                    removed.insert(*t);
                }
            }
            for t in &d.added {
                if !removed.remove(t) {
                    added.insert(*t);
                }
            }
            at = d.to;
        }
        let sorted = |set: HashSet<u64>| {
            let mut v: Vec<u64> = set.into_iter().collect();
            v.sort_unstable();
            v
        };
        (at == to && to != from).then(|| (sorted(added), sorted(removed)))
    }

    fn path(data_dir: &Path, epoch: u64, from: u64, to: u64) -> PathBuf {
        data_dir
            .join(DELTA_DIR)
            .join(format!("epoch-{epoch}-v{from}-v{to}.delta"))
    }

    /// Writes the delta and drops the oldest beyond [`KEEP_DELTAS`] and every
    /// delta of another epoch.
    ///
    /// # Errors
    /// I/O errors.
    pub fn store(&self, data_dir: &Path) -> Result<()> {
        let dir = data_dir.join(DELTA_DIR);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut out = Vec::with_capacity(48 + 8 * (self.added.len() + self.removed.len()));
        out.extend_from_slice(MAGIC);
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
        write_atomically(
            &Self::path(data_dir, self.epoch, self.from, self.to),
            &out,
            0o600,
        )?;
        let mut all = list(data_dir)?;
        all.sort_by_key(|(e, from, _, _)| (*e != self.epoch, std::cmp::Reverse(*from)));
        let mut kept = 0;
        for (epoch, _, _, path) in all {
            if epoch == self.epoch && kept < KEEP_DELTAS {
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

fn parse(bytes: &[u8]) -> Result<Delta> {
    let mut words = bytes
        .get(8..)
        .unwrap_or(&[])
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])));
    if bytes.get(..8) != Some(MAGIC.as_slice()) || !(bytes.len() - 8).is_multiple_of(8) {
        bail!("not a delta file");
    }
    let mut next = || words.next().context("truncated delta file");
    let (epoch, from, to, n_add, n_rem) = (next()?, next()?, next()?, next()?, next()?);
    let rest: Vec<u64> = words.collect();
    if rest.len() as u64 != n_add.saturating_add(n_rem) {
        bail!("delta file length does not match its counts");
    }
    let (added, removed) = rest.split_at(usize::try_from(n_add)?);
    Ok(Delta {
        epoch,
        from,
        to,
        added: added.to_vec(),
        removed: removed.to_vec(),
    })
}

fn list(data_dir: &Path) -> Result<Vec<(u64, u64, u64, PathBuf)>> {
    let dir = data_dir.join(DELTA_DIR);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let parsed = name
            .to_str()
            .and_then(|n| n.strip_prefix("epoch-")?.strip_suffix(".delta"))
            .and_then(|n| {
                let (e, rest) = n.split_once("-v")?;
                let (a, b) = rest.split_once("-v")?;
                Some((e.parse().ok()?, a.parse().ok()?, b.parse().ok()?))
            });
        if let Some((e, a, b)) = parsed {
            out.push((e, a, b, entry.path()));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_round_trip_compose_and_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let t = |v: &[u64]| v.iter().map(|&x| Tag(x)).collect::<Vec<_>>();
        let d1 = Delta::between(3, 1, 2, &t(&[1, 2, 3]), &t(&[2, 3, 4]));
        assert_eq!((d1.added.clone(), d1.removed.clone()), (vec![4], vec![1]));
        let d2 = Delta::between(3, 2, 3, &t(&[2, 3, 4]), &t(&[1, 3, 5]));
        d1.store(dir.path()).unwrap();
        d2.store(dir.path()).unwrap();
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
        // A new epoch's delta removes the old epoch's.
        Delta::between(4, 3, 4, &[], &t(&[9]))
            .store(dir.path())
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
}
