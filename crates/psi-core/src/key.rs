//! The server's OPRF key pair (RFC 9497 §3.2) and its public key.

use core::fmt;

use curve25519_dalek::constants::RISTRETTO_BASEPOINT_TABLE;
use curve25519_dalek::ristretto::{CompressedRistretto, RistrettoPoint};
use curve25519_dalek::scalar::Scalar;
use rand_core::CryptoRngCore;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::error::{Error, Result};
use crate::suite::{decode_scalar, hash_to_scalar_dst, random_scalar, Mode};

/// The server's secret OPRF key `skS`, with `skS / 2` kept for the fast
/// evaluation path and the public key `pkS = skS * G`.
///
/// Not `Clone`, not `Debug`-printable, zeroized on drop: the registry's secrecy
/// rests on this value.
pub struct ServerKey {
    // Boxed: moving a `ServerKey` (into a `Server`, a snapshot, an `Arc`)
    // moves a pointer, so the scalars live in one place that is zeroized
    // on drop, and no stale copy is left behind by a move.
    secret: Box<Secret>,
    public: PublicKey,
}

struct Secret {
    sk: Scalar,
    half_sk: Scalar,
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.sk.zeroize();
        self.half_sk.zeroize();
    }
}

impl ServerKey {
    /// A fresh random key (`RandomScalar`).
    pub fn generate<R: CryptoRngCore + ?Sized>(rng: &mut R) -> Self {
        Self::from_scalar(random_scalar(rng))
    }

    /// `DeriveKeyPair(seed, info)` of RFC 9497 §3.2.1.
    ///
    /// # Errors
    /// [`Error::InputTooLong`] if `info` exceeds 2^16 - 1 bytes;
    /// [`Error::DeriveKeyPair`] if no non-zero scalar is found (probability ~2^-8000).
    pub fn derive(mode: Mode, seed: &[u8; 32], info: &[u8]) -> Result<Self> {
        let info_len = crate::suite::check_input_len(info)?;
        let dst = mode.derive_key_pair_dst();
        for counter in 0..=255u8 {
            let mut sk = hash_to_scalar_dst(&[seed, &info_len, info, &[counter]], dst);
            if sk != Scalar::ZERO {
                let key = Self::from_scalar(sk);
                sk.zeroize();
                return Ok(key);
            }
        }
        Err(Error::DeriveKeyPair)
    }

    /// Reads a key from its 32-byte little-endian scalar encoding.
    ///
    /// # Errors
    /// [`Error::InvalidScalar`] unless the bytes are a canonical non-zero scalar.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self> {
        let mut sk = decode_scalar(bytes)?;
        if sk == Scalar::ZERO {
            return Err(Error::InvalidScalar);
        }
        let key = Self::from_scalar(sk);
        sk.zeroize();
        Ok(key)
    }

    fn from_scalar(mut sk: Scalar) -> Self {
        let mut secret = Box::new(Secret {
            sk,
            half_sk: Scalar::ZERO,
        });
        // `Scalar` is `Copy`: clear the caller's copy once it is boxed.
        sk.zeroize();
        secret.half_sk = secret.sk * Scalar::from(2u8).invert();
        let point = RISTRETTO_BASEPOINT_TABLE * &secret.sk;
        Self {
            secret,
            public: PublicKey::from_point(point),
        }
    }

    /// The 32-byte encoding, for the key file only. The buffer is zeroized when dropped.
    #[must_use]
    pub fn to_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.secret.sk.to_bytes())
    }

    /// The public key `pkS`.
    #[must_use]
    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    pub(crate) fn scalar(&self) -> &Scalar {
        &self.secret.sk
    }

    pub(crate) fn half_scalar(&self) -> &Scalar {
        &self.secret.half_sk
    }
}

impl ZeroizeOnDrop for ServerKey {}

impl fmt::Debug for ServerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerKey")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

/// The server's public key `pkS`, a non-identity ristretto255 element.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey {
    point: RistrettoPoint,
    bytes: [u8; 32],
}

impl PublicKey {
    fn from_point(point: RistrettoPoint) -> Self {
        Self {
            point,
            bytes: point.compress().to_bytes(),
        }
    }

    /// Reads a public key from its encoding.
    ///
    /// # Errors
    /// [`Error::InvalidPublicKey`] unless the bytes are a canonical non-identity element.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| Error::InvalidPublicKey)?;
        if bytes == [0; 32] {
            return Err(Error::InvalidPublicKey);
        }
        let point = CompressedRistretto(bytes)
            .decompress()
            .ok_or(Error::InvalidPublicKey)?;
        Ok(Self { point, bytes })
    }

    /// The 32-byte encoding.
    #[must_use]
    pub fn to_bytes(&self) -> [u8; 32] {
        self.bytes
    }

    /// A short fingerprint for display and pinning: the encoding in hex.
    #[must_use]
    pub fn to_hex(&self) -> String {
        self.bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub(crate) fn point(&self) -> &RistrettoPoint {
        &self.point
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_the_secret() {
        let key = ServerKey::from_bytes(&[7; 32]).unwrap();
        let secret_hex: String = key.to_bytes().iter().map(|b| format!("{b:02x}")).collect();
        let dbg = format!("{key:?}");
        assert!(!dbg.contains(&secret_hex));
        assert!(!dbg.contains("07, 07"));
        assert!(dbg.contains("PublicKey("));
    }

    #[test]
    fn key_bytes_round_trip_and_zero_is_rejected() {
        let key = ServerKey::generate(&mut rand_core::OsRng);
        let again = ServerKey::from_bytes(&key.to_bytes()).unwrap();
        assert_eq!(key.public_key(), again.public_key());
        assert!(ServerKey::from_bytes(&[0; 32]).is_err());
        assert!(ServerKey::from_bytes(&[0xff; 32]).is_err());
    }

    #[test]
    fn half_key_doubles_back() {
        let key = ServerKey::generate(&mut rand_core::OsRng);
        assert_eq!(key.half_scalar() + key.half_scalar(), *key.scalar());
    }

    #[test]
    fn public_key_rejects_identity_and_bad_lengths() {
        assert!(PublicKey::from_bytes(&[0; 32]).is_err());
        assert!(PublicKey::from_bytes(&[1; 31]).is_err());
        let key = ServerKey::generate(&mut rand_core::OsRng);
        let pk = PublicKey::from_bytes(&key.public_key().to_bytes()).unwrap();
        assert_eq!(&pk, key.public_key());
    }
}
