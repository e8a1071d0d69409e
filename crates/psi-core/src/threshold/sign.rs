//! The retiring epoch's holders endorse the next epoch's key together: a
//! two-round threshold Schnorr signature as in FROST (RFC 9591), whose
//! result is an ordinary endorsement ([`crate::rotation::verify`]), so
//! clients verify a key history exactly as before.
//!
//! Round 1 ([`commit`]): each signer draws two nonces `(d_i, e_i)` and
//! publishes `D_i = d_i*G`, `E_i = e_i*G`. Round 2 ([`sign`]): given the
//! signing set's commitments (at least `t`, sorted by index), each signer
//! computes the binding factors `ρ_i = HashToScalar(pk || msg ||
//! commitments || I2OSP(i, 2))` under `psi.v1.frost-binding-...`, the group
//! commitment `R = Σ (D_i + ρ_i*E_i)`, the endorsement challenge `c` over
//! `R`, and `z_i = d_i + ρ_i*e_i + λ_i*k_i*c`. [`aggregate`] checks each
//! `z_i` against the signer's public share (naming a signer whose share is
//! wrong) and returns `R || Σ z_i`. Nonces are consumed by signing, so
//! none is used twice.

use curve25519_dalek::ristretto::{CompressedRistretto, RistrettoPoint};
use curve25519_dalek::scalar::Scalar;
use curve25519_dalek::traits::Identity;
use rand_core::CryptoRngCore;
use zeroize::Zeroize;

use super::{base_mul, lagrange, Committee, KeyShare};
use crate::error::{Error, Result};
use crate::key::PublicKey;
use crate::rotation::{self, ENDORSEMENT_LEN};
use crate::schnorr;
use crate::suite::{decode_scalar, hash_to_scalar_dst, random_scalar};

const BINDING_DST: &[u8] = b"psi.v1.frost-binding-ristretto255-SHA512";

/// A signer's secret nonces for one signature. Not `Clone`; zeroized on
/// drop; consumed by [`sign`].
pub struct Nonces {
    hiding: Scalar,
    binding: Scalar,
}

impl Drop for Nonces {
    fn drop(&mut self) {
        self.hiding.zeroize();
        self.binding.zeroize();
    }
}

impl core::fmt::Debug for Nonces {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Nonces(..)")
    }
}

/// A signer's public commitment to its nonces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commitment {
    /// The signer's index.
    pub index: u16,
    /// `D_i`.
    pub hiding: [u8; 32],
    /// `E_i`.
    pub binding: [u8; 32],
}

/// A signer's share `z_i` of the signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignatureShare {
    /// The signer's index.
    pub index: u16,
    /// `z_i`.
    pub z: [u8; 32],
}

/// What the holders endorse: the next epoch and its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endorsed {
    /// The retiring epoch (the committee's).
    pub old_epoch: u64,
    /// The next epoch's public key.
    pub new_key: PublicKey,
    /// The next epoch.
    pub new_epoch: u64,
}

/// Round 1 for one signer.
pub fn commit<R: CryptoRngCore + ?Sized>(share: &KeyShare, rng: &mut R) -> (Nonces, Commitment) {
    commit_with(share, random_scalar(rng), random_scalar(rng))
}

/// Round 1 with the nonces given (the vectors fix them).
pub(crate) fn commit_with(
    share: &KeyShare,
    hiding: Scalar,
    binding: Scalar,
) -> (Nonces, Commitment) {
    let nonces = Nonces { hiding, binding };
    let commitment = Commitment {
        index: share.index(),
        hiding: base_mul(&nonces.hiding).compress().to_bytes(),
        binding: base_mul(&nonces.binding).compress().to_bytes(),
    };
    (nonces, commitment)
}

/// The signing set's checked commitments, binding factors, Lagrange
/// coefficients, `R` and `c`.
struct Setup {
    points: Vec<(RistrettoPoint, RistrettoPoint)>,
    rho: Vec<Scalar>,
    lambda: Vec<Scalar>,
    r: [u8; 32],
    c: Scalar,
}

fn setup(committee: &Committee, message: &Endorsed, commitments: &[Commitment]) -> Result<Setup> {
    if commitments.len() < usize::from(committee.threshold()) {
        return Err(Error::TooFewPartials {
            needed: committee.threshold(),
            got: u16::try_from(commitments.len()).unwrap_or(u16::MAX),
        });
    }
    if commitments.windows(2).any(|w| match w {
        [a, b] => a.index >= b.index,
        _ => false,
    }) {
        return Err(Error::InvalidParameter(
            "signing commitments are sorted by index, each signer once",
        ));
    }
    let mut list = Vec::with_capacity(commitments.len() * 66);
    let mut points = Vec::with_capacity(commitments.len());
    for c in commitments {
        if committee.share(c.index).is_none() {
            return Err(Error::UnknownHolder { holder: c.index });
        }
        let decode = |b: &[u8; 32]| {
            CompressedRistretto(*b)
                .decompress()
                .filter(|p| *p != RistrettoPoint::identity())
                .ok_or(Error::BadSignatureShare { holder: c.index })
        };
        points.push((decode(&c.hiding)?, decode(&c.binding)?));
        list.extend_from_slice(&c.index.to_be_bytes());
        list.extend_from_slice(&c.hiding);
        list.extend_from_slice(&c.binding);
    }
    let msg = rotation::message(message.old_epoch, &message.new_key, message.new_epoch);
    let pk = committee.public_key().to_bytes();
    let rho: Vec<Scalar> = commitments
        .iter()
        .map(|c| hash_to_scalar_dst(&[&pk, &msg, &list, &c.index.to_be_bytes()], BINDING_DST))
        .collect();
    let big_r: RistrettoPoint = points
        .iter()
        .zip(&rho)
        .map(|((d, e), rho)| d + rho * e)
        .sum();
    let r = big_r.compress().to_bytes();
    let c = schnorr::challenge(rotation::DST, committee.public_key(), &[&msg], &r);
    let indices: Vec<u16> = commitments.iter().map(|c| c.index).collect();
    Ok(Setup {
        points,
        rho,
        lambda: lagrange(&indices, 0)?,
        r,
        c,
    })
}

/// Round 2 for one signer, consuming its nonces.
///
/// # Errors
/// [`Error::InvalidParameter`] when the signer's own commitment is not in
/// the set or differs from its nonces; as [`aggregate`] for a bad set.
pub fn sign(
    share: &KeyShare,
    nonces: Nonces,
    committee: &Committee,
    message: &Endorsed,
    commitments: &[Commitment],
) -> Result<SignatureShare> {
    let s = setup(committee, message, commitments)?;
    let position = commitments
        .iter()
        .position(|c| c.index == share.index())
        .ok_or(Error::InvalidParameter(
            "the signer is not in the signing set",
        ))?;
    let own = commitments.get(position).copied();
    if own.map(|c| (c.hiding, c.binding))
        != Some((
            base_mul(&nonces.hiding).compress().to_bytes(),
            base_mul(&nonces.binding).compress().to_bytes(),
        ))
    {
        return Err(Error::InvalidParameter(
            "the signer's commitment is not the one its nonces make",
        ));
    }
    let (rho, lambda) = match (s.rho.get(position), s.lambda.get(position)) {
        (Some(r), Some(l)) => (r, l),
        _ => {
            return Err(Error::InvalidParameter(
                "the signer is not in the signing set",
            ))
        }
    };
    let mut z = nonces.hiding + rho * nonces.binding + lambda * share.scalar() * s.c;
    let out = SignatureShare {
        index: share.index(),
        z: z.to_bytes(),
    };
    z.zeroize();
    Ok(out)
}

/// Checks every signer's share and returns the endorsement `R || z`.
///
/// # Errors
/// [`Error::BadSignatureShare`] naming a signer whose share is wrong or
/// missing; [`Error::TooFewPartials`]; [`Error::UnknownHolder`].
pub fn aggregate(
    committee: &Committee,
    message: &Endorsed,
    commitments: &[Commitment],
    shares: &[SignatureShare],
) -> Result<[u8; ENDORSEMENT_LEN]> {
    let s = setup(committee, message, commitments)?;
    let mut z = Scalar::ZERO;
    for (k, c) in commitments.iter().enumerate() {
        let bad = Error::BadSignatureShare { holder: c.index };
        let share = shares
            .iter()
            .find(|x| x.index == c.index)
            .ok_or_else(|| bad.clone())?;
        let zi = decode_scalar(&share.z).map_err(|_| bad.clone())?;
        let public = committee.share(c.index).ok_or_else(|| bad.clone())?;
        let ((d, e), rho, lambda) = match (s.points.get(k), s.rho.get(k), s.lambda.get(k)) {
            (Some(p), Some(r), Some(l)) => (p, r, l),
            _ => return Err(bad),
        };
        if base_mul(&zi) != d + rho * e + (lambda * s.c) * public.key.point() {
            return Err(bad);
        }
        z += zi;
    }
    let mut out = [0u8; ENDORSEMENT_LEN];
    out[..32].copy_from_slice(&s.r);
    out[32..].copy_from_slice(z.as_bytes());
    rotation::verify(
        committee.public_key(),
        message.old_epoch,
        &message.new_key,
        message.new_epoch,
        &out,
    )?;
    Ok(out)
}
