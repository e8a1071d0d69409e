//! The two PIR schemes behind one face: Spiral (`shape`, `server`,
//! `client`) and YPIR+SP (`ypir`). The server picks one per database
//! (`PirShape`), advertises it in `ServerInfo`, and both sides then speak
//! it through these types; the item coding (`item`) is the same.

use std::fmt;

use crate::error::{Error, Result};
use crate::ypir::{YpirDatabase, YpirKeys, YpirPirClient, YpirShape};
use crate::{Database, Keys, PirClient, Shape};

/// Which scheme a server uses, as its setting names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SchemeChoice {
    /// The one whose database takes less memory for the registry.
    #[default]
    Auto,
    /// Spiral (IEEE S&P 2022).
    Spiral,
    /// YPIR+SP (USENIX Security 2024).
    Ypir,
}

impl std::str::FromStr for SchemeChoice {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "spiral" => Ok(Self::Spiral),
            "ypir" => Ok(Self::Ypir),
            other => Err(Error::Shape(format!(
                "PIR scheme `{other}`: auto, spiral or ypir"
            ))),
        }
    }
}

/// A database's shape under its scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PirShape {
    /// Spiral's.
    Spiral(Shape),
    /// YPIR+SP's.
    Ypir(YpirShape),
}

impl PirShape {
    /// The shape for a registry whose buckets have `prefix_bits` bits
    /// (`load(shift)`: the most entries an item of `2^shift` buckets would
    /// hold) under `choice`: `Auto` takes the scheme whose database is
    /// smaller, of those that hold the registry.
    ///
    /// # Errors
    /// [`Error::Shape`] when the chosen scheme (or, for `Auto`, neither)
    /// holds the fullest item.
    pub fn for_registry(
        choice: SchemeChoice,
        prefix_bits: u8,
        load: impl Fn(u8) -> usize,
    ) -> Result<Self> {
        let spiral = || Shape::for_registry(prefix_bits, &load).map(Self::Spiral);
        let ypir = || YpirShape::for_registry(prefix_bits, &load).map(Self::Ypir);
        match choice {
            SchemeChoice::Spiral => spiral(),
            SchemeChoice::Ypir => ypir(),
            SchemeChoice::Auto => match (spiral(), ypir()) {
                (Ok(s), Ok(y)) => Ok(if y.database_bytes() < s.database_bytes() {
                    y
                } else {
                    s
                }),
                (Ok(s), Err(_)) => Ok(s),
                (Err(_), y) => y,
            },
        }
    }

    /// The scheme's name in `ServerInfo` (`PirInfo.scheme`).
    #[must_use]
    pub fn scheme(&self) -> &'static str {
        match self {
            Self::Spiral(_) => crate::shape::SCHEME,
            Self::Ypir(_) => crate::ypir::SCHEME,
        }
    }

    /// The shape's id (`PirInfo.shape_id`): the first 8 bytes of
    /// `SHA-256("psi.v1.pir.shape" || scheme || dimensions)`, the dimensions
    /// as big-endian `u32`s (Spiral: nu1, nu2, instances, bucket_shift;
    /// YPIR+SP: item_bits, item_columns, bucket_shift). A query names the
    /// shape it was made for, so that a server whose shape changed with
    /// an update can say so instead of answering it.
    #[must_use]
    pub fn id(&self) -> [u8; 8] {
        use sha2::{Digest, Sha256};
        let dims: Vec<u32> = match self {
            Self::Spiral(s) => vec![
                s.nu1.into(),
                s.nu2.into(),
                s.instances.into(),
                s.bucket_shift.into(),
            ],
            Self::Ypir(s) => vec![s.item_bits.into(), s.columns, s.bucket_shift.into()],
        };
        let mut h = Sha256::new();
        h.update(b"psi.v1.pir.shape");
        h.update(self.scheme().as_bytes());
        for d in dims {
            h.update(d.to_be_bytes());
        }
        let digest = h.finalize();
        let mut id = [0u8; 8];
        id.copy_from_slice(digest.get(..8).unwrap_or(&[0; 8]));
        id
    }

    /// Checks an advertised shape.
    ///
    /// # Errors
    /// [`Error::Shape`] for anything out of range.
    pub fn validate(&self) -> Result<()> {
        match self {
            Self::Spiral(s) => s.validate(),
            Self::Ypir(s) => s.validate(),
        }
    }

    /// Items in the database.
    #[must_use]
    pub fn items(&self) -> usize {
        match self {
            Self::Spiral(s) => s.items(),
            Self::Ypir(s) => s.items(),
        }
    }

    /// The item that holds `bucket`.
    #[must_use]
    pub fn item_of(&self, bucket: u32) -> usize {
        match self {
            Self::Spiral(s) => s.item_of(bucket),
            Self::Ypir(s) => s.item_of(bucket),
        }
    }

    /// Buckets per item, as a power of two.
    #[must_use]
    pub fn bucket_shift(&self) -> u8 {
        match self {
            Self::Spiral(s) => s.bucket_shift,
            Self::Ypir(s) => s.bucket_shift,
        }
    }

    /// Bytes of one item.
    #[must_use]
    pub fn item_bytes(&self) -> usize {
        match self {
            Self::Spiral(s) => s.item_bytes(),
            Self::Ypir(s) => s.item_bytes(),
        }
    }

    /// Bits of a fingerprint.
    #[must_use]
    pub fn fingerprint_bits(&self) -> u32 {
        crate::item::fingerprint_bits(self.item_bytes())
    }

    /// The client's public parameters' length.
    #[must_use]
    pub fn keys_bytes(&self) -> usize {
        match self {
            Self::Spiral(s) => s.keys_bytes(),
            Self::Ypir(s) => s.keys_bytes(),
        }
    }

    /// One query's length.
    #[must_use]
    pub fn query_bytes(&self) -> usize {
        match self {
            Self::Spiral(s) => s.query_bytes(),
            Self::Ypir(s) => s.query_bytes(),
        }
    }

    /// One answer's length.
    #[must_use]
    pub fn answer_bytes(&self) -> usize {
        match self {
            Self::Spiral(s) => s.answer_bytes(),
            Self::Ypir(s) => s.answer_bytes(),
        }
    }

    /// Bytes the server holds for the database.
    #[must_use]
    pub fn database_bytes(&self) -> usize {
        match self {
            Self::Spiral(s) => s.database_bytes(),
            Self::Ypir(s) => s.database_bytes(),
        }
    }

    /// Whether public parameters made for `other` serve this shape too.
    #[must_use]
    pub fn same_keys(&self, other: &PirShape) -> bool {
        match (self, other) {
            (Self::Spiral(a), Self::Spiral(b)) => a.same_keys(b),
            // YPIR+SP's keys depend on the ring and the epoch only.
            (Self::Ypir(_), Self::Ypir(_)) => true,
            _ => false,
        }
    }
}

/// The longest query of either scheme: what admission allows per element.
pub const MAX_QUERY_BYTES: usize = {
    let spiral = crate::shape::QUERY_BYTES;
    let ypir = crate::ypir::MAX_ROWS * crate::ypir::VALUE_BYTES;
    if spiral > ypir {
        spiral
    } else {
        ypir
    }
};

/// A server's PIR database under its scheme.
#[derive(Debug)]
pub enum PirDatabase {
    /// Spiral's.
    Spiral(Database),
    /// YPIR+SP's.
    Ypir(YpirDatabase),
}

impl PirDatabase {
    /// Builds it; `tags(i)` gives the tags of item `i`.
    ///
    /// # Errors
    /// [`Error::Overflow`] when an item does not fit the shape.
    pub fn build(
        shape: PirShape,
        epoch: u64,
        tags: impl Fn(usize) -> Vec<u64> + Sync,
    ) -> Result<Self> {
        match shape {
            PirShape::Spiral(s) => Database::build(s, epoch, tags).map(Self::Spiral),
            PirShape::Ypir(s) => YpirDatabase::build(s, epoch, tags).map(Self::Ypir),
        }
    }

    /// This database with items `changed` coded afresh.
    ///
    /// # Errors
    /// As the schemes' `patch`.
    pub fn patch(
        &self,
        changed: &[usize],
        tags: impl Fn(usize) -> Vec<u64> + Sync,
    ) -> Result<Self> {
        match self {
            Self::Spiral(d) => d.patch(changed, tags).map(Self::Spiral),
            Self::Ypir(d) => d.patch(changed, tags).map(Self::Ypir),
        }
    }

    /// The shape.
    #[must_use]
    pub fn shape(&self) -> PirShape {
        match self {
            Self::Spiral(d) => PirShape::Spiral(d.shape()),
            Self::Ypir(d) => PirShape::Ypir(d.shape()),
        }
    }

    /// The key epoch its items are coded for.
    #[must_use]
    pub fn epoch(&self) -> u64 {
        match self {
            Self::Spiral(d) => d.epoch(),
            Self::Ypir(d) => d.epoch(),
        }
    }

    /// Bytes held.
    #[must_use]
    pub fn bytes(&self) -> usize {
        match self {
            Self::Spiral(d) => d.bytes(),
            Self::Ypir(d) => d.bytes(),
        }
    }

    /// The answers to one client's `queries` with `keys`, every query
    /// checked before any work (YPIR+SP: up to four share a pass).
    ///
    /// # Errors
    /// Keys of the other scheme, and the schemes' own checks.
    pub fn answer_many(&self, keys: &PirKeys, queries: &[&[u8]]) -> Result<Vec<Vec<u8>>> {
        let prepared: Vec<PreparedQuery> = queries
            .iter()
            .map(|q| self.prepare(keys, q))
            .collect::<Result<_>>()?;
        let jobs: Vec<(&PirKeys, &PreparedQuery)> = prepared.iter().map(|q| (keys, q)).collect();
        self.answer_prepared(&jobs).into_iter().collect()
    }

    /// Queries one pass over the database answers at most: YPIR+SP's
    /// [`crate::plain::MAX_QUERIES_PER_PASS`], Spiral's one.
    #[must_use]
    pub fn queries_per_pass(&self) -> usize {
        match self {
            Self::Spiral(_) => 1,
            Self::Ypir(_) => crate::plain::MAX_QUERIES_PER_PASS,
        }
    }

    /// `query` checked against this database and `keys` (its length; for
    /// YPIR+SP every value too), ready for [`PirDatabase::answer_prepared`].
    ///
    /// # Errors
    /// Keys of the other scheme or key epoch, and the schemes' own checks.
    pub fn prepare(&self, keys: &PirKeys, query: &[u8]) -> Result<PreparedQuery> {
        match (self, keys) {
            (Self::Spiral(d), PirKeys::Spiral(_)) => {
                let want = d.shape().query_bytes();
                if query.len() != want {
                    return Err(Error::Length {
                        what: "a Spiral query",
                        got: query.len(),
                        want,
                    });
                }
                Ok(PreparedQuery::Spiral(query.to_vec()))
            }
            (Self::Ypir(d), PirKeys::Ypir { keys, epoch }) if *epoch == d.epoch() => {
                d.prepare(keys, query).map(PreparedQuery::Ypir)
            }
            _ => Err(other_keys()),
        }
    }

    /// The answers to prepared queries of any clients, each with its
    /// client's keys, in order, one result each. YPIR+SP answers up to
    /// [`crate::plain::MAX_QUERIES_PER_PASS`] with one pass over its
    /// database; Spiral answers them one by one.
    #[must_use]
    pub fn answer_prepared(&self, jobs: &[(&PirKeys, &PreparedQuery)]) -> Vec<Result<Vec<u8>>> {
        match self {
            Self::Spiral(d) => jobs
                .iter()
                .map(|job| match job {
                    (PirKeys::Spiral(k), PreparedQuery::Spiral(q)) => d.answer(k, q),
                    _ => Err(other_keys()),
                })
                .collect(),
            Self::Ypir(d) => {
                let ypir: Vec<(&YpirKeys, &crate::ypir::PreparedQuery)> = jobs
                    .iter()
                    .filter_map(|job| match job {
                        (PirKeys::Ypir { keys, .. }, PreparedQuery::Ypir(q)) => Some((keys, q)),
                        _ => None,
                    })
                    .collect();
                let mut answers = match d.answer_prepared(&ypir) {
                    Ok(answers) => answers.into_iter().map(Ok).collect(),
                    Err(e) => vec![Err(e); ypir.len()],
                }
                .into_iter();
                jobs.iter()
                    .map(|job| match job {
                        (PirKeys::Ypir { .. }, PreparedQuery::Ypir(_)) => {
                            answers.next().unwrap_or(Err(Error::Scheme))
                        }
                        _ => Err(other_keys()),
                    })
                    .collect()
            }
        }
    }
}

fn other_keys() -> Error {
    Error::Shape("public parameters made for another scheme or key epoch".into())
}

/// A query checked by [`PirDatabase::prepare`].
#[derive(Debug)]
pub enum PreparedQuery {
    /// Spiral's bytes, of the right length (their values are checked as
    /// each is answered alone).
    Spiral(Vec<u8>),
    /// YPIR+SP's words, every value checked.
    Ypir(crate::ypir::PreparedQuery),
}

/// A client's public parameters as the server keeps them.
pub enum PirKeys {
    /// Spiral's.
    Spiral(Keys),
    /// YPIR+SP's, for one key epoch (its public seed).
    Ypir {
        /// The keys.
        keys: YpirKeys,
        /// The epoch they were made for.
        epoch: u64,
    },
}

impl fmt::Debug for PirKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PirKeys")
            .field("shape", &self.shape())
            .finish_non_exhaustive()
    }
}

impl PirKeys {
    /// Parses an upload for `shape` and key epoch `epoch` (length, then
    /// every value, before any work).
    ///
    /// # Errors
    /// [`Error::Length`] or [`Error::Coefficient`].
    pub fn parse(shape: PirShape, epoch: u64, bytes: &[u8]) -> Result<Self> {
        match shape {
            PirShape::Spiral(s) => Keys::parse(s, bytes).map(Self::Spiral),
            PirShape::Ypir(s) => YpirKeys::parse(s, bytes).map(|keys| Self::Ypir { keys, epoch }),
        }
    }

    /// The shape they were parsed for (for YPIR+SP, any: they fit all).
    #[must_use]
    pub fn shape(&self) -> Option<PirShape> {
        match self {
            Self::Spiral(k) => Some(PirShape::Spiral(k.shape())),
            Self::Ypir { .. } => None,
        }
    }

    /// Whether they serve `db`.
    #[must_use]
    pub fn serve(&self, db: &PirDatabase) -> bool {
        match (self, db) {
            (Self::Spiral(k), _) => PirShape::Spiral(k.shape()).same_keys(&db.shape()),
            (Self::Ypir { epoch, .. }, PirDatabase::Ypir(d)) => *epoch == d.epoch(),
            _ => false,
        }
    }

    /// Bytes held.
    #[must_use]
    pub fn memory_bytes(&self) -> usize {
        match self {
            Self::Spiral(k) => k.memory_bytes(),
            Self::Ypir { keys, .. } => keys.memory_bytes(),
        }
    }
}

/// An institution's client under the server's scheme.
pub enum SchemeClient {
    /// Spiral's (boxed: spiral-rs's client is large).
    Spiral(Box<PirClient>),
    /// YPIR+SP's.
    Ypir(YpirPirClient),
}

impl fmt::Debug for SchemeClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SchemeClient")
            .field("shape", &self.shape())
            .finish_non_exhaustive()
    }
}

impl SchemeClient {
    /// The client whose secret key `seed` determines, for `shape` and the
    /// databases of key epoch `epoch`.
    ///
    /// # Errors
    /// [`Error::Shape`] for a shape out of range.
    pub fn new(shape: PirShape, epoch: u64, seed: &[u8; 32]) -> Result<Self> {
        match shape {
            PirShape::Spiral(s) => PirClient::new(s, seed).map(|c| Self::Spiral(Box::new(c))),
            PirShape::Ypir(s) => YpirPirClient::new(s, epoch, seed).map(Self::Ypir),
        }
    }

    /// The shape.
    #[must_use]
    pub fn shape(&self) -> PirShape {
        match self {
            Self::Spiral(c) => PirShape::Spiral(c.shape()),
            Self::Ypir(c) => PirShape::Ypir(c.shape()),
        }
    }

    /// The public parameters to upload (fresh randomness each call).
    #[must_use]
    pub fn public_parameters(&mut self) -> Vec<u8> {
        match self {
            Self::Spiral(c) => c.public_parameters(),
            Self::Ypir(c) => c.public_parameters(),
        }
    }

    /// A query for the item holding `bucket`.
    ///
    /// # Errors
    /// [`Error::Item`] when the bucket lies outside the database.
    pub fn query(&self, bucket: u32) -> Result<Vec<u8>> {
        match self {
            Self::Spiral(c) => c.query(bucket),
            Self::Ypir(c) => c.query(bucket),
        }
    }

    /// The sorted fingerprints of the item holding `bucket`, checked.
    ///
    /// # Errors
    /// As the schemes' `decode`: never a silent "no match".
    pub fn decode(&self, bucket: u32, epoch: u64, answer: &[u8]) -> Result<Vec<u64>> {
        match self {
            Self::Spiral(c) => c.decode(bucket, epoch, answer),
            Self::Ypir(c) => c.decode(bucket, epoch, answer),
        }
    }

    /// Whether `tag` is in a decoded item.
    #[must_use]
    pub fn contains(&self, fingerprints: &[u64], tag: u64) -> bool {
        match self {
            Self::Spiral(c) => c.contains(fingerprints, tag),
            Self::Ypir(c) => c.contains(fingerprints, tag),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_takes_the_smaller_database_and_a_choice_is_kept() {
        // About 2x10^4 entries: Spiral's 32 MiB beat YPIR+SP's fixed
        // precomputation.
        let small = |s: u8| 20usize << s;
        let auto = PirShape::for_registry(SchemeChoice::Auto, 10, small).unwrap();
        assert!(matches!(auto, PirShape::Spiral(_)), "{auto:?}");
        let forced = PirShape::for_registry(SchemeChoice::Ypir, 10, small).unwrap();
        assert!(matches!(forced, PirShape::Ypir(_)));
        assert!(forced.database_bytes() > auto.database_bytes());
        // About 10^8: YPIR+SP's plain items are smaller.
        let large = |s: u8| 24usize << s;
        let auto = PirShape::for_registry(SchemeChoice::Auto, 22, large).unwrap();
        assert!(matches!(auto, PirShape::Ypir(_)), "{auto:?}");
        let spiral = PirShape::for_registry(SchemeChoice::Spiral, 22, large).unwrap();
        assert!(spiral.database_bytes() > 3 * auto.database_bytes());
        assert_eq!(auto.scheme(), crate::ypir::SCHEME);
        // Keys of one scheme never serve the other.
        assert!(!auto.same_keys(&spiral) && auto.same_keys(&auto));
        assert!("sealpir".parse::<SchemeChoice>().is_err());
    }

    #[test]
    fn a_shapes_id_names_its_scheme_and_every_dimension() {
        let ypir = |item_bits, columns, bucket_shift| {
            PirShape::Ypir(crate::ypir::YpirShape {
                item_bits,
                columns,
                bucket_shift,
            })
        };
        let base = ypir(16, 5_184, 0);
        assert_eq!(base.id(), ypir(16, 5_184, 0).id());
        for other in [ypir(16, 5_248, 0), ypir(17, 5_184, 0), ypir(16, 5_184, 1)] {
            assert_ne!(base.id(), other.id(), "{other:?}");
        }
        let spiral = PirShape::for_registry(SchemeChoice::Spiral, 10, |s| 20usize << s).unwrap();
        assert_ne!(spiral.id(), base.id());
    }
}
