//! The ciphersuite of RFC 9497 §4.1, ristretto255-SHA512: context strings,
//! `HashToGroup`, `HashToScalar`, element and scalar (de)serialisation, and the
//! `Finalize` hash.

use core::fmt;

use curve25519_dalek::ristretto::{CompressedRistretto, RistrettoPoint};
use curve25519_dalek::scalar::Scalar;
use rand_core::CryptoRngCore;
use sha2::{Digest, Sha512};
use std::sync::OnceLock;

use crate::error::{Error, Result};

/// The ciphersuite identifier of RFC 9497 §4.1.
pub const SUITE_ID: &str = "ristretto255-SHA512";

/// Size of a serialised group element.
pub const ELEMENT_LEN: usize = 32;
/// Size of a serialised scalar.
pub const SCALAR_LEN: usize = 32;
/// Size of the protocol output (`Nh`, SHA-512).
pub const OUTPUT_LEN: usize = 64;
/// Longest OPRF input RFC 9497 can encode (its length is a 2-byte prefix).
pub const MAX_INPUT_LEN: usize = u16::MAX as usize;

/// The protocol variant of RFC 9497 §3. The product runs in [`Mode::Voprf`];
/// [`Mode::Oprf`] exists to check the RFC's OPRF vectors and for benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Base mode, `modeOPRF = 0x00`: no proof.
    Oprf,
    /// Verifiable mode, `modeVOPRF = 0x01`: every batch carries a DLEQ proof.
    Voprf,
}

impl Mode {
    /// `contextString = "OPRFV1-" || I2OSP(mode, 1) || "-" || identifier`.
    #[cfg(test)]
    pub(crate) fn context(self) -> &'static [u8] {
        match self {
            Mode::Oprf => b"OPRFV1-\x00-ristretto255-SHA512",
            Mode::Voprf => b"OPRFV1-\x01-ristretto255-SHA512",
        }
    }

    pub(crate) fn hash_to_group_dst(self) -> &'static [u8] {
        match self {
            Mode::Oprf => b"HashToGroup-OPRFV1-\x00-ristretto255-SHA512",
            Mode::Voprf => b"HashToGroup-OPRFV1-\x01-ristretto255-SHA512",
        }
    }

    pub(crate) fn hash_to_scalar_dst(self) -> &'static [u8] {
        match self {
            Mode::Oprf => b"HashToScalar-OPRFV1-\x00-ristretto255-SHA512",
            Mode::Voprf => b"HashToScalar-OPRFV1-\x01-ristretto255-SHA512",
        }
    }

    pub(crate) fn seed_dst(self) -> &'static [u8] {
        match self {
            Mode::Oprf => b"Seed-OPRFV1-\x00-ristretto255-SHA512",
            Mode::Voprf => b"Seed-OPRFV1-\x01-ristretto255-SHA512",
        }
    }

    pub(crate) fn derive_key_pair_dst(self) -> &'static [u8] {
        match self {
            Mode::Oprf => b"DeriveKeyPairOPRFV1-\x00-ristretto255-SHA512",
            Mode::Voprf => b"DeriveKeyPairOPRFV1-\x01-ristretto255-SHA512",
        }
    }
}

/// SHA-512 state after absorbing `Z_pad` (one all-zero 128-byte block), the
/// common prefix of every `expand_message_xmd` call.
fn zero_padded_sha512() -> &'static Sha512 {
    static STATE: OnceLock<Sha512> = OnceLock::new();
    STATE.get_or_init(|| Sha512::new().chain_update([0u8; 128]))
}

/// `expand_message_xmd` of RFC 9380 §5.3.1 with SHA-512 and
/// `len_in_bytes = 64`, the only length this ciphersuite uses (so `ell = 1`).
/// `msg` is given in parts, hashed as their concatenation.
///
/// Every DST used here is a constant of fewer than 256 bytes.
pub(crate) fn expand_message_xmd_64(msg: &[&[u8]], dst: &[u8]) -> [u8; 64] {
    debug_assert!(dst.len() < 256);
    // The cast cannot truncate: DSTs are short constants.
    let dst_len = [dst.len() as u8];
    let mut h = zero_padded_sha512().clone();
    for part in msg {
        h.update(part);
    }
    h.update([0, 64, 0]); // I2OSP(len_in_bytes, 2) || I2OSP(0, 1)
    h.update(dst);
    h.update(dst_len);
    let b0 = h.finalize();
    let b1 = Sha512::new()
        .chain_update(b0)
        .chain_update([1u8])
        .chain_update(dst)
        .chain_update(dst_len)
        .finalize();
    b1.into()
}

/// `HashToGroup` (hash_to_ristretto255 of RFC 9380 with the mode's DST).
#[must_use]
pub fn hash_to_group(mode: Mode, input: &[u8]) -> RistrettoPoint {
    RistrettoPoint::from_uniform_bytes(&expand_message_xmd_64(&[input], mode.hash_to_group_dst()))
}

/// `HashToScalar` with an explicit DST.
pub(crate) fn hash_to_scalar_dst(parts: &[&[u8]], dst: &[u8]) -> Scalar {
    Scalar::from_bytes_mod_order_wide(&expand_message_xmd_64(parts, dst))
}

/// `HashToScalar` with the default DST `"HashToScalar-" || contextString`.
pub(crate) fn hash_to_scalar(mode: Mode, parts: &[&[u8]]) -> Scalar {
    hash_to_scalar_dst(parts, mode.hash_to_scalar_dst())
}

/// `RandomScalar`: a uniformly random non-zero scalar.
pub(crate) fn random_scalar<R: CryptoRngCore + ?Sized>(rng: &mut R) -> Scalar {
    loop {
        // 64 uniform bytes reduced mod the group order (bias < 2^-250), as
        // curve25519-dalek's own `Scalar::random` does.
        let mut wide = zeroize::Zeroizing::new([0u8; 64]);
        rng.fill_bytes(wide.as_mut());
        let s = Scalar::from_bytes_mod_order_wide(&wide);
        if s != Scalar::ZERO {
            return s;
        }
    }
}

/// Checks an input's length against the 2-byte length prefix of RFC 9497.
pub(crate) fn check_input_len(input: &[u8]) -> Result<[u8; 2]> {
    u16::try_from(input.len())
        .map(u16::to_be_bytes)
        .map_err(|_| Error::InputTooLong {
            max: MAX_INPUT_LEN,
            got: input.len(),
        })
}

/// `DeserializeElement`: canonical encoding, not the identity.
pub(crate) fn decode_element(bytes: &[u8; 32], index: usize) -> Result<RistrettoPoint> {
    if bytes.iter().all(|&b| b == 0) {
        return Err(Error::IdentityPoint { index });
    }
    CompressedRistretto(*bytes)
        .decompress()
        .ok_or(Error::InvalidPoint { index })
}

/// `DeserializeScalar`: canonical encoding (less than the group order).
pub(crate) fn decode_scalar(bytes: &[u8; 32]) -> Result<Scalar> {
    Option::from(Scalar::from_canonical_bytes(*bytes)).ok_or(Error::InvalidScalar)
}

/// The `Finalize` hash: `Hash(I2OSP(len(input), 2) || input ||
/// I2OSP(len(element), 2) || element || "Finalize")`.
pub(crate) fn finalize_hash(input: &[u8], input_len: [u8; 2], element: &[u8; 32]) -> Output {
    let out = Sha512::new()
        .chain_update(input_len)
        .chain_update(input)
        .chain_update([0u8, 32])
        .chain_update(element)
        .chain_update(b"Finalize")
        .finalize();
    Output(out.into())
}

macro_rules! element_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash)]
        pub struct $name(pub [u8; ELEMENT_LEN]);

        impl $name {
            /// Reads an element from a byte slice of exactly 32 bytes. The
            /// encoding itself is checked when the element is used.
            ///
            /// # Errors
            /// [`Error::InvalidPoint`] (at `index`) if the slice is not 32 bytes long.
            pub fn from_slice(bytes: &[u8], index: usize) -> Result<Self> {
                <[u8; ELEMENT_LEN]>::try_from(bytes)
                    .map(Self)
                    .map_err(|_| Error::InvalidPoint { index })
            }

            /// The 32-byte encoding.
            #[must_use]
            pub fn as_bytes(&self) -> &[u8; ELEMENT_LEN] {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "("))?;
                for b in &self.0 {
                    write!(f, "{b:02x}")?;
                }
                write!(f, ")")
            }
        }
    };
}

element_type!(
    /// A blinded element sent by the client (`blindedElement`). It is
    /// perfectly hiding: it reveals nothing about the client's input.
    BlindedElement
);
element_type!(
    /// An evaluated element returned by the server (`evaluatedElement`).
    EvaluatedElement
);

/// The 64-byte PRF output (`Finalize`). Outputs are compared, truncated to
/// tags, and never logged.
#[derive(Clone, PartialEq, Eq)]
pub struct Output(pub [u8; OUTPUT_LEN]);

impl Output {
    /// The 64-byte output.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8; OUTPUT_LEN] {
        &self.0
    }

    /// The tag of this output: its first 8 bytes, big-endian.
    #[must_use]
    pub fn tag(&self) -> crate::tag::Tag {
        crate::tag::Tag::from_output(&self.0)
    }
}

impl fmt::Debug for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Output(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The 64-byte expand_message_xmd is checked end to end by the RFC 9497
    // vectors (HashToGroup, HashToScalar and DeriveKeyPair all run on it).

    #[test]
    fn dsts_are_built_from_the_context_string() {
        for mode in [Mode::Oprf, Mode::Voprf] {
            let ctx = mode.context();
            assert_eq!(mode.hash_to_group_dst(), [b"HashToGroup-", ctx].concat());
            assert_eq!(mode.hash_to_scalar_dst(), [b"HashToScalar-", ctx].concat());
            assert_eq!(mode.seed_dst(), [b"Seed-", ctx].concat());
            assert_eq!(mode.derive_key_pair_dst(), [b"DeriveKeyPair", ctx].concat());
        }
    }

    #[test]
    fn expand_message_parts_hash_as_their_concatenation() {
        let dst = Mode::Voprf.hash_to_group_dst();
        assert_eq!(
            expand_message_xmd_64(&[b"ab", b"", b"cd"], dst),
            expand_message_xmd_64(&[b"abcd"], dst)
        );
    }

    #[test]
    fn identity_and_non_canonical_encodings_are_rejected() {
        assert_eq!(
            decode_element(&[0; 32], 3),
            Err(Error::IdentityPoint { index: 3 })
        );
        // 2^255 - 1 is not a field element in canonical form.
        assert_eq!(
            decode_element(&[0xff; 32], 1),
            Err(Error::InvalidPoint { index: 1 })
        );
        assert_eq!(decode_scalar(&[0xff; 32]), Err(Error::InvalidScalar));
    }
}
