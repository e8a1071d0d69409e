//! The protocol core of the private (name, resident ID number) match service.
//!
//! Bytes in, bytes out: no files, sockets, clocks or async. Randomness is
//! passed in as `&mut impl CryptoRngCore`.
//!
//! - [`suite`], [`key`], [`client`], [`server`], [`proof`]: the OPRF and VOPRF
//!   of RFC 9497 with ciphersuite ristretto255-SHA512, in batches, with a fast
//!   additive blinding path for the client and a batched-encoding evaluation
//!   path for the server.
//! - [`record`]: canonical (name, ID number) records, the OPRF input.
//! - [`rotation`]: the retiring key's endorsement of its successor.
//! - [`commitment`]: an institution's commitment to the log entries a
//!   request answers, which the operator's audit trail keeps.
//! - [`threshold`]: the key as t-of-n shares on key holders (partial
//!   evaluations, their combination, distributed key generation, refresh,
//!   threshold endorsements), with outputs identical to the single key's.
//! - [`tag`], [`tagset`], [`bucket`]: how the server's encrypted registry is
//!   held and shipped in the sync and bucket modes.
//!
//! See `docs/PROTOCOL.md` for the protocol and its false-positive arithmetic.

pub mod bucket;
pub mod client;
pub mod commitment;
pub mod error;
pub mod key;
pub mod proof;
pub mod record;
mod rice;
pub mod rotation;
mod schnorr;
pub mod server;
pub mod suite;
pub mod tag;
pub mod tagset;
pub mod threshold;

#[cfg(test)]
mod conformance;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod vectors;

pub use bucket::BucketIndex;
pub use client::{BlindState, Blinding, Client};
pub use error::{Error, Result};
pub use key::{PublicKey, ServerKey};
pub use proof::Proof;
pub use record::{CivilDate, IdNumber, Record};
pub use server::{Evaluation, Server};
pub use suite::{BlindedElement, EvaluatedElement, Mode, Output};
pub use tag::Tag;
pub use tagset::{TagLookup, TagSet};
pub use threshold::{Committee, KeyShare, Partial, PublicShare};
