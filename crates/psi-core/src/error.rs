//! The one error type of `psi-core`.
//!
//! No variant carries secret material (keys, blinds) or personal data beyond
//! what the caller itself supplied and needs to fix its input.

use crate::record::{IdError, NameError};

/// Everything that can go wrong in the protocol steps, record canonicalisation
/// and tag-set handling.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A group element's encoding is not a canonical ristretto255 encoding.
    #[error("element {index} is not a canonical ristretto255 encoding")]
    InvalidPoint {
        /// Position of the element in its batch.
        index: usize,
    },
    /// A group element is the identity, which the protocol forbids.
    #[error("element {index} is the identity element")]
    IdentityPoint {
        /// Position of the element in its batch.
        index: usize,
    },
    /// A scalar's encoding is not canonical (not reduced modulo the group order) or is zero.
    #[error("scalar is not a canonical non-zero encoding")]
    InvalidScalar,
    /// A public key's encoding is invalid.
    #[error("public key is not a valid non-identity ristretto255 element")]
    InvalidPublicKey,
    /// A blinding state was finalized by a client for another public key.
    #[error("the blinding state was made for another server public key")]
    KeyMismatch,
    /// A batch holds more elements than the protocol or policy allows.
    #[error("batch of {got} elements exceeds the maximum of {max}")]
    BatchTooLarge {
        /// The largest batch accepted.
        max: usize,
        /// The batch size received.
        got: usize,
    },
    /// A batch is empty.
    #[error("batch is empty")]
    EmptyBatch,
    /// Two lists that must be of equal length are not.
    #[error("expected {expected} elements, got {got}")]
    LengthMismatch {
        /// The length required.
        expected: usize,
        /// The length received.
        got: usize,
    },
    /// An OPRF input is longer than the RFC 9497 encoding allows (2^16 - 1 bytes).
    #[error("input of {got} bytes exceeds the maximum of {max}")]
    InputTooLong {
        /// The longest input accepted.
        max: usize,
        /// The input length received.
        got: usize,
    },
    /// An input hashes to the identity element (probability about 2^-252).
    #[error("input hashes to the identity element")]
    InvalidInput,
    /// `DeriveKeyPair` found no non-zero scalar in 256 attempts.
    #[error("key derivation failed")]
    DeriveKeyPair,
    /// The server's batched DLEQ proof does not verify: the evaluations were not
    /// made with the key behind the pinned public key.
    #[error("the server's proof does not verify against its public key")]
    ProofVerification,
    /// The name field of a record is invalid.
    #[error("invalid name: {reason}")]
    InvalidName {
        /// Why the name was rejected.
        reason: NameError,
    },
    /// The ID number field of a record is invalid.
    #[error("invalid ID number: {reason}")]
    InvalidIdNumber {
        /// Why the ID number was rejected.
        reason: IdError,
    },
    /// A serialised tag set or bucket index is malformed.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// Which structure was being decoded.
        what: &'static str,
        /// What was wrong with it.
        reason: &'static str,
    },
    /// A serialised structure has a format version this build does not read.
    #[error("unsupported {what} format version {got} (this build reads {supported})")]
    UnsupportedVersion {
        /// Which structure was being decoded.
        what: &'static str,
        /// The version found.
        got: u16,
        /// The version this build reads.
        supported: u16,
    },
    /// A tag-set shard's content does not match its digest.
    #[error("tag-set shard {shard} does not match its digest")]
    DigestMismatch {
        /// Index of the shard.
        shard: usize,
    },
    /// A parameter is outside its allowed range.
    #[error("invalid parameter: {0}")]
    InvalidParameter(&'static str),
    /// A key holder's partial evaluation does not verify against its
    /// public share (or its elements are malformed).
    #[error("key holder {holder}'s partial evaluation does not verify against its public share")]
    PartialProof {
        /// The holder's index.
        holder: u16,
    },
    /// A holder index the committee does not have.
    #[error("key holder {holder} is not in the committee")]
    UnknownHolder {
        /// The index given.
        holder: u16,
    },
    /// Fewer verified partial answers than the threshold.
    #[error("{got} key holders answered correctly, {needed} are needed")]
    TooFewPartials {
        /// `t`.
        needed: u16,
        /// How many verified.
        got: u16,
    },
    /// Public shares that do not lie on one polynomial through the public
    /// key (holder 0: the public key itself does not match), or a DKG share
    /// from a dealer that does not match its commitments.
    #[error("key holder {holder}'s share does not match the committee's commitments")]
    ShareMismatch {
        /// The holder (dealer) whose share is off; 0 for the public key.
        holder: u16,
    },
    /// A DKG round-1 package that is missing, malformed, or not signed by
    /// its holder's identity key.
    #[error("key holder {holder}'s key-generation package does not check")]
    DkgPackage {
        /// The holder's index.
        holder: u16,
    },
    /// A signer's threshold-signature share is missing or wrong.
    #[error("key holder {holder}'s signature share does not verify")]
    BadSignatureShare {
        /// The signer's index.
        holder: u16,
    },
    /// The caller asked the work to stop (its peer went away or its deadline passed).
    #[error("the work was cancelled")]
    Cancelled,
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
