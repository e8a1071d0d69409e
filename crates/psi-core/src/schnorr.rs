//! Schnorr signatures over ristretto255 with SHA-512, domain-separated by a
//! tag: `R = r*G`, `c = HashToScalar(pk || parts... || R)` under the tag's
//! DST, `s = r + c*sk`; the signature `R || s` verifies when
//! `s*G - c*pk == R`. Used by key-rotation endorsements, the key holders'
//! identity signatures and the DKG's proofs of knowledge; each use has its
//! own tag, so no signature of one kind stands for another.

use curve25519_dalek::constants::RISTRETTO_BASEPOINT_TABLE;
use curve25519_dalek::ristretto::{CompressedRistretto, RistrettoPoint};
use curve25519_dalek::scalar::Scalar;
use rand_core::CryptoRngCore;
use zeroize::Zeroize;

use crate::error::{Error, Result};
use crate::key::{PublicKey, ServerKey};
use crate::suite::{decode_scalar, hash_to_scalar_dst, random_scalar};

/// Serialised signature length: `R || s`.
pub const SIGNATURE_LEN: usize = 64;

/// `c = HashToScalar(pk || parts... || R)` with `dst`.
pub(crate) fn challenge(dst: &[u8], pk: &PublicKey, parts: &[&[u8]], r: &[u8; 32]) -> Scalar {
    let pk = pk.to_bytes();
    let mut all: Vec<&[u8]> = Vec::with_capacity(parts.len() + 2);
    all.push(&pk);
    all.extend_from_slice(parts);
    all.push(r);
    hash_to_scalar_dst(&all, dst)
}

/// `R || s` by `key` over `parts`.
pub(crate) fn sign<R: CryptoRngCore + ?Sized>(
    dst: &[u8],
    key: &ServerKey,
    parts: &[&[u8]],
    rng: &mut R,
) -> [u8; SIGNATURE_LEN] {
    let mut r = random_scalar(rng);
    let big_r = (RISTRETTO_BASEPOINT_TABLE * &r).compress().to_bytes();
    let c = challenge(dst, key.public_key(), parts, &big_r);
    let s = r + c * key.scalar();
    r.zeroize();
    let mut out = [0u8; SIGNATURE_LEN];
    out[..32].copy_from_slice(&big_r);
    out[32..].copy_from_slice(s.as_bytes());
    out
}

/// Checks `signature` by `pk` over `parts`.
///
/// # Errors
/// [`Error::ProofVerification`] for a wrong or malformed signature.
pub(crate) fn verify(dst: &[u8], pk: &PublicKey, parts: &[&[u8]], signature: &[u8]) -> Result<()> {
    let (r_bytes, s_bytes) = split(signature)?;
    let big_r = CompressedRistretto(r_bytes)
        .decompress()
        .ok_or(Error::ProofVerification)?;
    let s = decode_scalar(&s_bytes).map_err(|_| Error::ProofVerification)?;
    let c = challenge(dst, pk, parts, &r_bytes);
    let lhs = RistrettoPoint::vartime_double_scalar_mul_basepoint(&(-c), pk.point(), &s);
    if lhs == big_r {
        Ok(())
    } else {
        Err(Error::ProofVerification)
    }
}

/// `R`'s and `s`'s encodings.
pub(crate) fn split(signature: &[u8]) -> Result<([u8; 32], [u8; 32])> {
    if signature.len() != SIGNATURE_LEN {
        return Err(Error::ProofVerification);
    }
    let (r, s) = signature.split_at(32);
    Ok((
        r.try_into().map_err(|_| Error::ProofVerification)?,
        s.try_into().map_err(|_| Error::ProofVerification)?,
    ))
}
