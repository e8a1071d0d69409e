//! The institution's side: a secret key from a 32-byte seed the client
//! keeps, the public parameters it uploads once per key epoch, queries, and
//! the decoding of answers.

use std::fmt;

use spiral_rs::client::Client;
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::item;
use crate::shape::Shape;

/// Bytes of the seed a client's secret key is derived from.
pub const SEED_BYTES: usize = 32;

/// A PIR client for one shape.
pub struct PirClient {
    shape: Shape,
    seed: Zeroizing<[u8; SEED_BYTES]>,
    inner: Client<'static>,
}

impl fmt::Debug for PirClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PirClient")
            .field("shape", &self.shape)
            .finish_non_exhaustive()
    }
}

impl PirClient {
    /// The client whose secret key `seed` determines (keep the seed as
    /// secret as the key: whoever holds it can read the answers).
    ///
    /// # Errors
    /// [`Error::Shape`] for a shape out of range (from a faulty server).
    pub fn new(shape: Shape, seed: &[u8; SEED_BYTES]) -> Result<Self> {
        shape.validate()?;
        let mut inner = Client::init(shape.params());
        inner.generate_secret_keys_from_seed(*seed);
        Ok(Self {
            shape,
            seed: Zeroizing::new(*seed),
            inner,
        })
    }

    /// The shape.
    #[must_use]
    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// The public parameters to upload (fresh randomness each call, the
    /// same secret key).
    #[must_use]
    pub fn public_parameters(&mut self) -> Vec<u8> {
        self.inner.generate_keys_from_seed(*self.seed).serialize()
    }

    /// A query for the item holding `bucket`.
    ///
    /// # Errors
    /// [`Error::Item`] when the bucket lies outside the database.
    pub fn query(&self, bucket: u32) -> Result<Vec<u8>> {
        let index = self.item_of(bucket)?;
        Ok(self.inner.generate_query(index).serialize())
    }

    fn item_of(&self, bucket: u32) -> Result<usize> {
        item::within(self.shape.item_of(bucket), self.shape.items())
    }

    /// The sorted fingerprints of the item holding `bucket`, from the
    /// server's answer, checked against its checksum.
    ///
    /// # Errors
    /// [`Error::Length`] for an answer of the wrong length,
    /// [`Error::Integrity`] when it does not decrypt to the item asked.
    pub fn decode(&self, bucket: u32, epoch: u64, answer: &[u8]) -> Result<Vec<u64>> {
        let index = self.item_of(bucket)?;
        let want = self.shape.answer_bytes();
        if answer.len() != want {
            return Err(Error::Length {
                what: "PIR answer",
                got: answer.len(),
                want,
            });
        }
        let plain = self.inner.decode_response(answer);
        let bytes = plain
            .get(..self.shape.item_bytes())
            .ok_or(Error::Integrity)?;
        item::decode(bytes, index as u64, epoch)
    }

    /// Whether `tag` is in an item decoded by [`PirClient::decode`].
    #[must_use]
    pub fn contains(&self, fingerprints: &[u64], tag: u64) -> bool {
        item::contains(fingerprints, tag, self.shape.item_bytes())
    }
}
