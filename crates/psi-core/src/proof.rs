//! The batched DLEQ proof of RFC 9497 §2.2: `GenerateProof` with
//! `ComputeCompositesFast` on the server, `VerifyProof` with `ComputeComposites`
//! on the client. Composites are computed with one multiscalar multiplication
//! per core instead of one scalar multiplication per element.

use core::fmt;

use curve25519_dalek::constants::RISTRETTO_BASEPOINT_TABLE;
use curve25519_dalek::ristretto::RistrettoPoint;
use curve25519_dalek::scalar::Scalar;
use curve25519_dalek::traits::{Identity, VartimeMultiscalarMul};
use rayon::prelude::*;
use sha2::{Digest, Sha512};
use subtle::ConstantTimeEq;

use crate::error::{Error, Result};
use crate::key::{PublicKey, ServerKey};
use crate::suite::{decode_scalar, hash_to_scalar, Mode};

/// Serialised proof length: `c || s`.
pub const PROOF_LEN: usize = 64;

/// The largest batch one proof can cover: the composite transcript encodes
/// the element index in two bytes.
pub const MAX_PROOF_BATCH: usize = 1 << 16;

/// A DLEQ proof `(c, s)` that every evaluated element is `skS` times its
/// blinded element, for the `skS` behind `pkS`. Public data.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Proof {
    c: Scalar,
    s: Scalar,
}

impl Proof {
    /// `SerializeScalar(c) || SerializeScalar(s)`.
    #[must_use]
    pub fn to_bytes(&self) -> [u8; PROOF_LEN] {
        let mut out = [0u8; PROOF_LEN];
        out[..32].copy_from_slice(self.c.as_bytes());
        out[32..].copy_from_slice(self.s.as_bytes());
        out
    }

    /// Reads a proof, rejecting non-canonical scalars.
    ///
    /// # Errors
    /// [`Error::InvalidScalar`] for a wrong length or a non-canonical scalar.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let (c, s) = match (bytes.get(..32), bytes.get(32..)) {
            (Some(c), Some(s)) if bytes.len() == PROOF_LEN => (c, s),
            _ => return Err(Error::InvalidScalar),
        };
        let c = decode_scalar(c.try_into().map_err(|_| Error::InvalidScalar)?)?;
        let s = decode_scalar(s.try_into().map_err(|_| Error::InvalidScalar)?)?;
        Ok(Self { c, s })
    }
}

impl fmt::Debug for Proof {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Proof(")?;
        for b in self.to_bytes() {
            write!(f, "{b:02x}")?;
        }
        f.write_str(")")
    }
}

/// `seed = Hash(I2OSP(len(Bm), 2) || Bm || I2OSP(len(seedDST), 2) || seedDST)`.
fn composite_seed(mode: Mode, pk: &PublicKey) -> [u8; 64] {
    let dst = mode.seed_dst();
    // The cast cannot truncate: a short constant.
    let dst_len = (dst.len() as u16).to_be_bytes();
    Sha512::new()
        .chain_update([0u8, 32])
        .chain_update(pk.to_bytes())
        .chain_update(dst_len)
        .chain_update(dst)
        .finalize()
        .into()
}

/// The composite weights `d_i` for every `(C_i, D_i)` pair.
fn composite_weights(
    mode: Mode,
    pk: &PublicKey,
    blinded: &[[u8; 32]],
    evaluated: &[[u8; 32]],
) -> Result<Vec<Scalar>> {
    if blinded.len() > MAX_PROOF_BATCH {
        return Err(Error::BatchTooLarge {
            max: MAX_PROOF_BATCH,
            got: blinded.len(),
        });
    }
    if blinded.len() != evaluated.len() {
        return Err(Error::LengthMismatch {
            expected: blinded.len(),
            got: evaluated.len(),
        });
    }
    let seed = composite_seed(mode, pk);
    Ok(blinded
        .par_iter()
        .zip(evaluated.par_iter())
        .enumerate()
        .with_min_len(64)
        .map(|(i, (c, d))| {
            // The cast cannot truncate: i < 2^16, checked above.
            let index = (i as u16).to_be_bytes();
            hash_to_scalar(
                mode,
                &[
                    &[0, 64],
                    &seed,
                    &index,
                    &[0, 32],
                    c,
                    &[0, 32],
                    d,
                    b"Composite",
                ],
            )
        })
        .collect())
}

/// `sum(scalars[i] * points[i])`, variable time (public inputs only), one
/// multiscalar multiplication per core.
pub(crate) fn multiscalar_mul(scalars: &[Scalar], points: &[RistrettoPoint]) -> RistrettoPoint {
    let threads = rayon::current_num_threads().max(1);
    let chunk = scalars.len().div_ceil(threads).max(256);
    scalars
        .par_chunks(chunk)
        .zip(points.par_chunks(chunk))
        .map(|(s, p)| RistrettoPoint::vartime_multiscalar_mul(s, p))
        .reduce(RistrettoPoint::identity, |a, b| a + b)
}

/// `c = HashToScalar(I2OSP(32, 2) || Bm || ... || a3 || "Challenge")`.
fn challenge(
    mode: Mode,
    pk: &PublicKey,
    m: &RistrettoPoint,
    z: &RistrettoPoint,
    t2: &RistrettoPoint,
    t3: &RistrettoPoint,
) -> Scalar {
    let [a0, a1, a2, a3] = [m, z, t2, t3].map(|p| p.compress().to_bytes());
    let len: &[u8] = &[0, 32];
    hash_to_scalar(
        mode,
        &[
            len,
            &pk.to_bytes(),
            len,
            &a0,
            len,
            &a1,
            len,
            &a2,
            len,
            &a3,
            b"Challenge",
        ],
    )
}

/// `GenerateProof(k, G, pkS, C, D)` with `ComputeCompositesFast`, where the
/// blinded elements `C` are given both decoded and encoded and `D = k * C`.
pub(crate) fn generate(
    mode: Mode,
    key: &ServerKey,
    blinded_points: &[RistrettoPoint],
    blinded: &[[u8; 32]],
    evaluated: &[[u8; 32]],
    r: &Scalar,
) -> Result<Proof> {
    let pk = key.public_key();
    let d = composite_weights(mode, pk, blinded, evaluated)?;
    let m = multiscalar_mul(&d, blinded_points);
    let z = key.scalar() * m;
    let t2 = RISTRETTO_BASEPOINT_TABLE * r;
    let t3 = r * m;
    let c = challenge(mode, pk, &m, &z, &t2, &t3);
    let s = r - c * key.scalar();
    Ok(Proof { c, s })
}

/// `VerifyProof(G, pkS, C, D, proof)` with `ComputeComposites`.
pub(crate) fn verify(
    mode: Mode,
    pk: &PublicKey,
    blinded_points: &[RistrettoPoint],
    blinded: &[[u8; 32]],
    evaluated_points: &[RistrettoPoint],
    evaluated: &[[u8; 32]],
    proof: &Proof,
) -> Result<()> {
    let d = composite_weights(mode, pk, blinded, evaluated)?;
    let (m, z) = rayon::join(
        || multiscalar_mul(&d, blinded_points),
        || multiscalar_mul(&d, evaluated_points),
    );
    let t2 = RistrettoPoint::vartime_double_scalar_mul_basepoint(&proof.c, pk.point(), &proof.s);
    let t3 = RistrettoPoint::vartime_multiscalar_mul([proof.s, proof.c], [m, z]);
    let expected = challenge(mode, pk, &m, &z, &t2, &t3);
    if bool::from(expected.ct_eq(&proof.c)) {
        Ok(())
    } else {
        Err(Error::ProofVerification)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proof_bytes_round_trip_and_reject_non_canonical() {
        let p = Proof {
            c: Scalar::from(5u8),
            s: Scalar::from(9u8),
        };
        assert_eq!(Proof::from_bytes(&p.to_bytes()).unwrap(), p);
        assert!(Proof::from_bytes(&[0xff; 64]).is_err());
        assert!(Proof::from_bytes(&[0; 63]).is_err());
        assert!(Proof::from_bytes(&[0; 65]).is_err());
    }
}
