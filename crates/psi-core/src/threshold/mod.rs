//! Threshold mode: the epoch's OPRF key `k` exists only as Shamir shares
//! `k_i = f(i)` of a polynomial `f` of degree `t - 1` with `f(0) = k`, one
//! per key holder. A holder evaluates `k_i * B` with the ordinary VOPRF
//! server and proves it against its public share `P_i = k_i * G`; the client
//! verifies each partial evaluation and combines `t` of them with Lagrange
//! coefficients into `k * B`, then unblinds as usual. Outputs are those of
//! the single-key VOPRF under `k`, byte for byte.
//!
//! - [`split`]: a dealer's split of an existing key (the one-time migration
//!   of a single-key epoch).
//! - [`Committee`]: `t`, `n`, the public key and every public share, checked
//!   to lie on one polynomial through the public key.
//! - [`Partial`], [`verify_partial`], and `Client::finalize_threshold`.
//! - [`dkg`]: key generation and proactive refresh with no dealer.
//! - [`sign`]: the holders' threshold signature on the next epoch's key.

pub mod dkg;
pub mod sign;

use core::fmt;

use curve25519_dalek::constants::RISTRETTO_BASEPOINT_TABLE;
use curve25519_dalek::ristretto::RistrettoPoint;
use curve25519_dalek::scalar::Scalar;
use curve25519_dalek::traits::{Identity, VartimeMultiscalarMul};
use rand_core::CryptoRngCore;
use rayon::prelude::*;
use zeroize::{Zeroize, Zeroizing};

use crate::error::{Error, Result};
use crate::key::{PublicKey, ServerKey};
use crate::proof::{self, Proof};
use crate::suite::{decode_element, random_scalar, BlindedElement, EvaluatedElement, Mode};

/// The most holders a committee may have: indices are 1..=255.
pub const MAX_HOLDERS: u16 = 255;

/// One holder's share `k_i` of the epoch key, with its index `i` and public
/// share `P_i`. Not `Clone`; zeroized on drop (it is a [`ServerKey`]); its
/// `Debug` shows the index and public share only.
pub struct KeyShare {
    index: u16,
    key: ServerKey,
}

impl KeyShare {
    /// The share of holder `index` from its 32-byte scalar encoding.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for index 0 or above [`MAX_HOLDERS`];
    /// [`Error::InvalidScalar`] for a non-canonical or zero scalar.
    pub fn from_bytes(index: u16, bytes: &[u8; 32]) -> Result<Self> {
        check_index(index)?;
        Ok(Self {
            index,
            key: ServerKey::from_bytes(bytes)?,
        })
    }

    pub(crate) fn from_scalar(index: u16, scalar: Scalar) -> Result<Self> {
        let bytes = Zeroizing::new(scalar.to_bytes());
        Self::from_bytes(index, &bytes)
    }

    /// The holder's index `i` (the point the polynomial is evaluated at).
    #[must_use]
    pub fn index(&self) -> u16 {
        self.index
    }

    /// `P_i = k_i * G`.
    #[must_use]
    pub fn public_share(&self) -> PublicShare {
        PublicShare {
            index: self.index,
            key: *self.key.public_key(),
        }
    }

    /// The 32-byte encoding of `k_i`, for the holder's share file only.
    #[must_use]
    pub fn to_bytes(&self) -> Zeroizing<[u8; 32]> {
        self.key.to_bytes()
    }

    /// The share as a VOPRF server key: a holder evaluates with
    /// `Server::new(Mode::Voprf, share.into_key())`, and its proofs verify
    /// against `P_i`.
    #[must_use]
    pub fn into_key(self) -> ServerKey {
        self.key
    }

    pub(crate) fn scalar(&self) -> &Scalar {
        self.key.scalar()
    }
}

impl fmt::Debug for KeyShare {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyShare")
            .field("index", &self.index)
            .field("public_share", self.key.public_key())
            .finish_non_exhaustive()
    }
}

/// A holder's public share `P_i = k_i * G`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublicShare {
    /// The holder's index.
    pub index: u16,
    /// `P_i`.
    pub key: PublicKey,
}

fn check_index(index: u16) -> Result<()> {
    if index == 0 || index > MAX_HOLDERS {
        return Err(Error::InvalidParameter(
            "a holder's index is between 1 and 255",
        ));
    }
    Ok(())
}

/// The Lagrange coefficients `λ_i(x) = Π_{j≠i} (x - x_j) / (x_i - x_j)` that
/// interpolate, at `x`, a polynomial of degree `indices.len() - 1` from its
/// values at `indices`.
///
/// # Errors
/// [`Error::InvalidParameter`] for an empty list, an index of 0 or a repeated index.
pub fn lagrange(indices: &[u16], x: u16) -> Result<Vec<Scalar>> {
    if indices.is_empty() {
        return Err(Error::InvalidParameter("no holders to interpolate from"));
    }
    for (n, &i) in indices.iter().enumerate() {
        check_index(i)?;
        if indices.get(..n).is_some_and(|before| before.contains(&i)) {
            return Err(Error::InvalidParameter("a holder's index is repeated"));
        }
    }
    let x = Scalar::from(x);
    let mut numerators = Vec::with_capacity(indices.len());
    let mut denominators = Vec::with_capacity(indices.len());
    for &i in indices {
        let xi = Scalar::from(i);
        let mut num = Scalar::ONE;
        let mut den = Scalar::ONE;
        for &j in indices.iter().filter(|&&j| j != i) {
            let xj = Scalar::from(j);
            num *= x - xj;
            den *= xi - xj;
        }
        numerators.push(num);
        denominators.push(den);
    }
    // Distinct non-zero indices below the group order: no denominator is 0.
    Scalar::invert_batch_alloc(&mut denominators);
    Ok(numerators
        .into_iter()
        .zip(denominators)
        .map(|(n, d)| n * d)
        .collect())
}

/// `Σ coefficients[k] * x^k` (Horner).
pub(crate) fn eval_poly(coefficients: &[Scalar], x: u16) -> Scalar {
    let x = Scalar::from(x);
    coefficients
        .iter()
        .rev()
        .fold(Scalar::ZERO, |acc, c| acc * x + c)
}

/// `Σ commitments[k] * x^k`: the public image of a polynomial at `x`.
pub(crate) fn eval_commitments(commitments: &[RistrettoPoint], x: u16) -> RistrettoPoint {
    let x = Scalar::from(x);
    let mut power = Scalar::ONE;
    let mut powers = Vec::with_capacity(commitments.len());
    for _ in commitments {
        powers.push(power);
        power *= x;
    }
    RistrettoPoint::vartime_multiscalar_mul(&powers, commitments)
}

/// A dealer's split of `key` into `n` shares, any `t` of which reconstruct
/// it: the one-time migration of a single-key epoch (same public key, so no
/// re-encoding; the key file is destroyed afterwards). New epochs are made
/// by [`dkg`], with no dealer.
///
/// # Errors
/// [`Error::InvalidParameter`] unless `1 <= t <= n <= 255`.
pub fn split<R: CryptoRngCore + ?Sized>(
    key: &ServerKey,
    t: u16,
    n: u16,
    rng: &mut R,
) -> Result<Vec<KeyShare>> {
    check_shape(t, n)?;
    let mut coefficients = Vec::with_capacity(usize::from(t));
    coefficients.push(*key.scalar());
    for _ in 1..t {
        coefficients.push(random_scalar(rng));
    }
    let shares = split_with(&coefficients, n);
    coefficients.zeroize();
    shares
}

/// The shares `f(1) .. f(n)` of the polynomial with `coefficients`.
pub(crate) fn split_with(coefficients: &[Scalar], n: u16) -> Result<Vec<KeyShare>> {
    (1..=n)
        .map(|i| KeyShare::from_scalar(i, eval_poly(coefficients, i)))
        .collect()
}

fn check_shape(t: u16, n: u16) -> Result<()> {
    if t == 0 || t > n || n > MAX_HOLDERS {
        return Err(Error::InvalidParameter(
            "a committee needs 1 <= t <= n <= 255",
        ));
    }
    Ok(())
}

/// The public side of a threshold epoch: `t`, the public key and the `n`
/// holders' public shares. [`Committee::new`] checks that the shares lie on
/// one polynomial of degree `t - 1` through the public key, so any `t`
/// holders' partial evaluations combine to the key's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committee {
    threshold: u16,
    public_key: PublicKey,
    shares: Vec<PublicShare>,
}

impl Committee {
    /// A committee of `shares.len()` holders, any `threshold` of which
    /// evaluate under `public_key`'s key.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a bad shape or index;
    /// [`Error::ShareMismatch`] when the shares do not interpolate to the
    /// public key, or one of them lies off the polynomial the first `t` fix.
    pub fn new(threshold: u16, public_key: PublicKey, shares: Vec<PublicShare>) -> Result<Self> {
        let n = u16::try_from(shares.len())
            .map_err(|_| Error::InvalidParameter("a committee has at most 255 holders"))?;
        check_shape(threshold, n)?;
        let indices: Vec<u16> = shares.iter().map(|s| s.index).collect();
        lagrange(&indices, 0)?;
        let (basis, rest) = shares.split_at(usize::from(threshold));
        let basis_indices: Vec<u16> = basis.iter().map(|s| s.index).collect();
        let basis_points: Vec<RistrettoPoint> = basis.iter().map(|s| *s.key.point()).collect();
        let at = |x: u16| -> Result<RistrettoPoint> {
            Ok(RistrettoPoint::vartime_multiscalar_mul(
                lagrange(&basis_indices, x)?,
                &basis_points,
            ))
        };
        if at(0)? != *public_key.point() {
            return Err(Error::ShareMismatch { holder: 0 });
        }
        for s in rest {
            if at(s.index)? != *s.key.point() {
                return Err(Error::ShareMismatch { holder: s.index });
            }
        }
        Ok(Self {
            threshold,
            public_key,
            shares,
        })
    }

    /// `t`: how many holders' partial evaluations make one evaluation.
    #[must_use]
    pub fn threshold(&self) -> u16 {
        self.threshold
    }

    /// The epoch's public key `pkS`.
    #[must_use]
    pub fn public_key(&self) -> &PublicKey {
        &self.public_key
    }

    /// Every holder's public share, in the order given.
    #[must_use]
    pub fn shares(&self) -> &[PublicShare] {
        &self.shares
    }

    /// Holder `index`'s public share.
    #[must_use]
    pub fn share(&self, index: u16) -> Option<&PublicShare> {
        self.shares.iter().find(|s| s.index == index)
    }
}

/// One holder's answer to a batch: `k_i * B` for each blinded element, and
/// the batched DLEQ proof against its public share `P_i`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partial {
    /// The holder's index.
    pub index: u16,
    /// `k_i * B_j` for each blinded element, in order.
    pub elements: Vec<EvaluatedElement>,
    /// The proof (RFC 9497's batched DLEQ proof, with `P_i` as the public key).
    pub proof: Proof,
}

/// Checks one holder's partial evaluation of `blinded` against its public
/// share, for a party that holds only the encodings (a serving replica
/// choosing which partials to forward).
///
/// # Errors
/// [`Error::UnknownHolder`], [`Error::LengthMismatch`], a bad element, or
/// [`Error::PartialProof`] naming the holder.
pub fn verify_partial(
    committee: &Committee,
    blinded: &[BlindedElement],
    partial: &Partial,
) -> Result<()> {
    let points: Vec<RistrettoPoint> = blinded
        .par_iter()
        .enumerate()
        .with_min_len(16)
        .map(|(i, b)| decode_element(&b.0, i))
        .collect::<Result<_>>()?;
    let bytes: Vec<[u8; 32]> = blinded.iter().map(|b| b.0).collect();
    check_partial(committee, &points, &bytes, partial).map(|_| ())
}

/// Verifies `partial` over the blinded batch and returns its decoded points.
pub(crate) fn check_partial(
    committee: &Committee,
    blinded_points: &[RistrettoPoint],
    blinded: &[[u8; 32]],
    partial: &Partial,
) -> Result<Vec<RistrettoPoint>> {
    let share = committee.share(partial.index).ok_or(Error::UnknownHolder {
        holder: partial.index,
    })?;
    if partial.elements.len() != blinded.len() {
        return Err(Error::LengthMismatch {
            expected: blinded.len(),
            got: partial.elements.len(),
        });
    }
    let bad = |_| Error::PartialProof {
        holder: partial.index,
    };
    let points: Vec<RistrettoPoint> = partial
        .elements
        .par_iter()
        .enumerate()
        .with_min_len(16)
        .map(|(i, e)| decode_element(&e.0, i))
        .collect::<Result<_>>()
        .map_err(bad)?;
    let evaluated: Vec<[u8; 32]> = partial.elements.iter().map(|e| e.0).collect();
    proof::verify(
        Mode::Voprf,
        &share.key,
        blinded_points,
        blinded,
        &points,
        &evaluated,
        &partial.proof,
    )
    .map_err(bad)?;
    Ok(points)
}

/// Verifies every partial and combines the first `t` that verify into
/// `k * B_j` for each element. A partial that fails is skipped while enough
/// others verify; otherwise the error names the first holder that failed.
pub(crate) fn verify_and_combine(
    committee: &Committee,
    blinded_points: &[RistrettoPoint],
    blinded: &[[u8; 32]],
    partials: &[Partial],
) -> Result<Vec<RistrettoPoint>> {
    let t = usize::from(committee.threshold);
    let mut good: Vec<(u16, Vec<RistrettoPoint>)> = Vec::with_capacity(t);
    let mut first_error = None;
    for p in partials {
        if good.len() == t {
            break;
        }
        if good.iter().any(|(i, _)| *i == p.index) {
            continue;
        }
        match check_partial(committee, blinded_points, blinded, p) {
            Ok(points) => good.push((p.index, points)),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if good.len() < t {
        return Err(first_error.unwrap_or(Error::TooFewPartials {
            needed: committee.threshold,
            got: u16::try_from(good.len()).unwrap_or(u16::MAX),
        }));
    }
    let indices: Vec<u16> = good.iter().map(|(i, _)| *i).collect();
    let lambdas = lagrange(&indices, 0)?;
    Ok((0..blinded.len())
        .into_par_iter()
        .with_min_len(64)
        .map(|j| {
            let points = good
                .iter()
                .map(|(_, pts)| pts.get(j).copied().unwrap_or_else(RistrettoPoint::identity));
            RistrettoPoint::vartime_multiscalar_mul(&lambdas, points)
        })
        .collect())
}

/// `k * G` from `t` shares: only for tests and the migration's self-check.
#[cfg(test)]
pub(crate) fn reconstruct(shares: &[&KeyShare]) -> Result<Scalar> {
    let indices: Vec<u16> = shares.iter().map(|s| s.index).collect();
    let lambdas = lagrange(&indices, 0)?;
    Ok(lambdas
        .iter()
        .zip(shares)
        .map(|(l, s)| l * s.scalar())
        .sum())
}

/// `x * G`.
pub(crate) fn base_mul(x: &Scalar) -> RistrettoPoint {
    RISTRETTO_BASEPOINT_TABLE * x
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod vectors;
