//! The client's steps: `Blind` a batch of inputs and `Finalize` the server's
//! evaluations, verifying its proof in VOPRF mode.
//!
//! Two blinding paths give identical outputs:
//! - [`Blinding::Multiplicative`], the RFC's reference: `B = r * H(x)`,
//!   unblinded with `r^-1 * E`; two variable-base multiplications.
//! - [`Blinding::Additive`]: `B = H(x) + r * G`, unblinded with `E - r * pkS`
//!   (because `E = k * B = k * H(x) + r * pkS`); two fixed-base multiplications
//!   with precomputed tables for `G` and `pkS`. `r * G` is uniform, so `B` is
//!   as perfectly hiding as in the reference path, and the server cannot tell
//!   the two apart.

use core::fmt;

use curve25519_dalek::constants::RISTRETTO_BASEPOINT_TABLE;
use curve25519_dalek::ristretto::{RistrettoBasepointTable, RistrettoPoint};
use curve25519_dalek::scalar::Scalar;
use curve25519_dalek::traits::Identity;
use rand_core::CryptoRngCore;
use rayon::prelude::*;
use zeroize::Zeroize;

use crate::error::{Error, Result};
use crate::key::PublicKey;
use crate::proof::{self, Proof};
use crate::server::check_batch_len;
use crate::suite::{
    check_input_len, decode_element, finalize_hash, hash_to_group, random_scalar, BlindedElement,
    EvaluatedElement, Mode, Output,
};
use crate::threshold::{self, Committee, Partial};

/// How the client blinds its inputs. Both give the RFC's outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Blinding {
    /// `B = r * H(x)`, the RFC 9497 reference.
    Multiplicative,
    /// `B = H(x) + r * G`, roughly half the client's work.
    #[default]
    Additive,
}

/// The client role for one server public key, with a precomputed fixed-base
/// table for that key (about 30 KiB, built in about a millisecond).
pub struct Client {
    mode: Mode,
    public_key: PublicKey,
    pk_table: Box<RistrettoBasepointTable>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("mode", &self.mode)
            .field("public_key", &self.public_key)
            .finish_non_exhaustive()
    }
}

/// The secret state between `Blind` and `Finalize` for one batch: the blinds
/// (zeroized on drop) and the blinded elements the proof covers. Consumed by
/// [`Client::finalize`], so a batch cannot be finalized twice.
pub struct BlindState {
    blinding: Blinding,
    public_key: PublicKey,
    blinds: Vec<Scalar>,
    pub(crate) blinded_points: Vec<RistrettoPoint>,
    blinded: Vec<[u8; 32]>,
}

impl BlindState {
    /// Number of inputs in the batch.
    #[must_use]
    pub fn len(&self) -> usize {
        self.blinds.len()
    }

    /// Whether the batch is empty (never, for a state made by [`Client::blind`]).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.blinds.is_empty()
    }
}

impl Drop for BlindState {
    fn drop(&mut self) {
        self.blinds.zeroize();
    }
}

impl fmt::Debug for BlindState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlindState")
            .field("blinding", &self.blinding)
            .field("len", &self.blinds.len())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client for the server whose public key is `public_key`.
    #[must_use]
    pub fn new(mode: Mode, public_key: PublicKey) -> Self {
        let pk_table = Box::new(RistrettoBasepointTable::create(public_key.point()));
        Self {
            mode,
            public_key,
            pk_table,
        }
    }

    /// The public key this client verifies proofs against.
    #[must_use]
    pub fn public_key(&self) -> &PublicKey {
        &self.public_key
    }

    /// `Blind` for a batch of inputs, in parallel across the current rayon pool.
    ///
    /// # Errors
    /// [`Error::EmptyBatch`], [`Error::BatchTooLarge`], [`Error::InputTooLong`],
    /// [`Error::InvalidInput`] (an input hashing to the identity).
    pub fn blind<I, R>(
        &self,
        inputs: &[I],
        blinding: Blinding,
        rng: &mut R,
    ) -> Result<(BlindState, Vec<BlindedElement>)>
    where
        I: AsRef<[u8]> + Sync,
        R: CryptoRngCore + ?Sized,
    {
        check_batch_len(inputs.len())?;
        let blinds = (0..inputs.len()).map(|_| random_scalar(rng)).collect();
        self.blind_with(inputs, blinding, blinds)
    }

    /// `Blind` with the blinds given (the RFC vectors fix them).
    pub(crate) fn blind_with<I: AsRef<[u8]> + Sync>(
        &self,
        inputs: &[I],
        blinding: Blinding,
        blinds: Vec<Scalar>,
    ) -> Result<(BlindState, Vec<BlindedElement>)> {
        check_batch_len(inputs.len())?;
        let blinded_points = inputs
            .par_iter()
            .zip(blinds.par_iter())
            .with_min_len(16)
            .map(|(x, r)| {
                let x = x.as_ref();
                check_input_len(x)?;
                let p = hash_to_group(self.mode, x);
                if p == RistrettoPoint::identity() {
                    return Err(Error::InvalidInput);
                }
                Ok(match blinding {
                    Blinding::Multiplicative => r * p,
                    Blinding::Additive => p + RISTRETTO_BASEPOINT_TABLE * r,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let blinded: Vec<[u8; 32]> = blinded_points
            .par_iter()
            .with_min_len(16)
            .map(|p| p.compress().to_bytes())
            .collect();
        let elements = blinded.iter().copied().map(BlindedElement).collect();
        Ok((
            BlindState {
                blinding,
                public_key: self.public_key,
                blinds,
                blinded_points,
                blinded,
            },
            elements,
        ))
    }

    /// `Finalize` in VOPRF mode: verifies the server's proof over the whole
    /// batch, then unblinds and hashes. `inputs` are the same inputs, in the
    /// same order, as given to [`Client::blind`].
    ///
    /// # Errors
    /// [`Error::ProofVerification`] if the proof fails (never read as a
    /// non-match); [`Error::LengthMismatch`]; [`Error::InvalidPoint`] or
    /// [`Error::IdentityPoint`] for a bad evaluated element.
    pub fn finalize<I: AsRef<[u8]> + Sync>(
        &self,
        state: BlindState,
        inputs: &[I],
        evaluated: &[EvaluatedElement],
        proof: &Proof,
    ) -> Result<Vec<Output>> {
        let points = self.check_and_decode(&state, inputs, evaluated)?;
        let evaluated_bytes: Vec<[u8; 32]> = evaluated.iter().map(|e| e.0).collect();
        proof::verify(
            self.mode,
            &self.public_key,
            &state.blinded_points,
            &state.blinded,
            &points,
            &evaluated_bytes,
            proof,
        )?;
        self.unblind(&state, inputs, &points)
    }

    /// `Finalize` in threshold mode: verifies each key holder's partial
    /// evaluation against its public share in `committee`, combines `t` of
    /// them into the key's evaluation, then unblinds and hashes. The
    /// outputs are those of [`Client::finalize`] under the committee's key.
    /// A partial that does not verify is passed over while `t` others do.
    ///
    /// # Errors
    /// [`Error::KeyMismatch`] when the committee's key is not this client's;
    /// [`Error::PartialProof`] naming a holder when fewer than `t` verify;
    /// [`Error::TooFewPartials`]; [`Error::LengthMismatch`].
    pub fn finalize_threshold<I: AsRef<[u8]> + Sync>(
        &self,
        state: BlindState,
        inputs: &[I],
        committee: &Committee,
        partials: &[Partial],
    ) -> Result<Vec<Output>> {
        if *committee.public_key() != self.public_key || state.public_key != self.public_key {
            return Err(Error::KeyMismatch);
        }
        if inputs.len() != state.len() {
            return Err(Error::LengthMismatch {
                expected: state.len(),
                got: inputs.len(),
            });
        }
        let points = threshold::verify_and_combine(
            committee,
            &state.blinded_points,
            &state.blinded,
            partials,
        )?;
        self.unblind(&state, inputs, &points)
    }

    /// `Finalize` without a proof: OPRF mode, or measuring the bare cost. A
    /// VOPRF-mode product must call [`Client::finalize`].
    ///
    /// # Errors
    /// As [`Client::finalize`], less the proof.
    pub fn finalize_unverified<I: AsRef<[u8]> + Sync>(
        &self,
        state: BlindState,
        inputs: &[I],
        evaluated: &[EvaluatedElement],
    ) -> Result<Vec<Output>> {
        let points = self.check_and_decode(&state, inputs, evaluated)?;
        self.unblind(&state, inputs, &points)
    }

    fn check_and_decode<I>(
        &self,
        state: &BlindState,
        inputs: &[I],
        evaluated: &[EvaluatedElement],
    ) -> Result<Vec<RistrettoPoint>> {
        if state.public_key != self.public_key {
            return Err(Error::KeyMismatch);
        }
        for got in [inputs.len(), evaluated.len()] {
            if got != state.len() {
                return Err(Error::LengthMismatch {
                    expected: state.len(),
                    got,
                });
            }
        }
        evaluated
            .par_iter()
            .enumerate()
            .with_min_len(16)
            .map(|(i, e)| decode_element(&e.0, i))
            .collect()
    }

    fn unblind<I: AsRef<[u8]> + Sync>(
        &self,
        state: &BlindState,
        inputs: &[I],
        points: &[RistrettoPoint],
    ) -> Result<Vec<Output>> {
        let unblind_chunk = |blinds: &[Scalar], points: &[RistrettoPoint]| -> Vec<RistrettoPoint> {
            match state.blinding {
                Blinding::Additive => blinds
                    .iter()
                    .zip(points)
                    .map(|(r, e)| e - &*self.pk_table * r)
                    .collect(),
                Blinding::Multiplicative => {
                    let mut inverses = blinds.to_vec();
                    Scalar::invert_batch_alloc(&mut inverses);
                    let out = inverses.iter().zip(points).map(|(r, e)| r * e).collect();
                    inverses.zeroize();
                    out
                }
            }
        };
        let unblinded: Vec<RistrettoPoint> = state
            .blinds
            .par_chunks(64)
            .zip(points.par_chunks(64))
            .flat_map_iter(|(b, p)| unblind_chunk(b, p))
            .collect();
        inputs
            .par_iter()
            .zip(unblinded.par_iter())
            .with_min_len(16)
            .map(|(x, n)| {
                let x = x.as_ref();
                Ok(finalize_hash(
                    x,
                    check_input_len(x)?,
                    n.compress().as_bytes(),
                ))
            })
            .collect()
    }
}
