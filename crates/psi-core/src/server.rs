//! The server's steps: `BlindEvaluate` on a batch (with one batched proof in
//! VOPRF mode) and the one-shot `Evaluate` used to encrypt the registry.
//!
//! Both compute `k * P` as `double((k/2) * P)` so that the doubling and the
//! encoding run through `double_and_compress_batch`, which shares one field
//! inversion across a chunk of points instead of paying one per point.

use curve25519_dalek::ristretto::RistrettoPoint;
use curve25519_dalek::scalar::Scalar;
use curve25519_dalek::traits::Identity;
use rand_core::CryptoRngCore;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::key::{PublicKey, ServerKey};
use crate::proof::{self, Proof, MAX_PROOF_BATCH};
use crate::suite::{
    check_input_len, decode_element, finalize_hash, hash_to_group, random_scalar, BlindedElement,
    EvaluatedElement, Mode, Output,
};

/// Points per `double_and_compress_batch` call: large enough to amortise the
/// shared inversion, small enough to spread across cores.
const CHUNK: usize = 256;

/// The server role: holds the OPRF key and evaluates.
#[derive(Debug)]
pub struct Server {
    mode: Mode,
    key: ServerKey,
}

/// The answer to one batch: one evaluated element per blinded element, in
/// order, and in VOPRF mode the proof covering all of them.
#[derive(Debug, Clone)]
pub struct Evaluation {
    /// `evaluatedElement` for each blinded element.
    pub elements: Vec<EvaluatedElement>,
    /// The batched DLEQ proof (VOPRF mode only).
    pub proof: Option<Proof>,
}

impl Server {
    /// A server in `mode` with `key`.
    #[must_use]
    pub fn new(mode: Mode, key: ServerKey) -> Self {
        Self { mode, key }
    }

    /// The protocol mode.
    #[must_use]
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The public key clients pin and verify proofs against.
    #[must_use]
    pub fn public_key(&self) -> &PublicKey {
        self.key.public_key()
    }

    /// The secret key, for writing the key file.
    #[must_use]
    pub fn key(&self) -> &ServerKey {
        &self.key
    }

    /// `BlindEvaluate` for a batch, in parallel across the current rayon pool;
    /// in VOPRF mode with one proof for the whole batch.
    ///
    /// # Errors
    /// [`Error::EmptyBatch`], [`Error::BatchTooLarge`] (over 2^16 elements),
    /// [`Error::InvalidPoint`] or [`Error::IdentityPoint`] naming an element.
    pub fn blind_evaluate<R: CryptoRngCore + ?Sized>(
        &self,
        blinded: &[BlindedElement],
        rng: &mut R,
    ) -> Result<Evaluation> {
        let r = match self.mode {
            Mode::Voprf => Some(random_scalar(rng)),
            Mode::Oprf => None,
        };
        self.blind_evaluate_with(blinded, r.as_ref(), &|| false)
    }

    /// [`Server::blind_evaluate`] that gives up when `stop` returns true: it
    /// is asked before each chunk of [`CHUNK`] elements and before the proof,
    /// so a cancelled request costs at most one chunk per core after `stop`
    /// turns true.
    ///
    /// # Errors
    /// As [`Server::blind_evaluate`], and [`Error::Cancelled`].
    pub fn blind_evaluate_until<R: CryptoRngCore + ?Sized>(
        &self,
        blinded: &[BlindedElement],
        rng: &mut R,
        stop: &(dyn Fn() -> bool + Sync),
    ) -> Result<Evaluation> {
        let r = match self.mode {
            Mode::Voprf => Some(random_scalar(rng)),
            Mode::Oprf => None,
        };
        self.blind_evaluate_with(blinded, r.as_ref(), stop)
    }

    /// `BlindEvaluate` without the proof, whatever the mode: the bare
    /// evaluation cost, for benchmarks and for OPRF-mode deployments.
    ///
    /// # Errors
    /// As [`Server::blind_evaluate`].
    pub fn blind_evaluate_without_proof(
        &self,
        blinded: &[BlindedElement],
    ) -> Result<Vec<EvaluatedElement>> {
        Ok(self.blind_evaluate_with(blinded, None, &|| false)?.elements)
    }

    /// The evaluation with the proof's random scalar given (`None`: no proof).
    pub(crate) fn blind_evaluate_with(
        &self,
        blinded: &[BlindedElement],
        proof_r: Option<&Scalar>,
        stop: &(dyn Fn() -> bool + Sync),
    ) -> Result<Evaluation> {
        check_batch_len(blinded.len())?;
        let half = self.key.half_scalar();
        let chunks: Vec<(Vec<RistrettoPoint>, Vec<[u8; 32]>)> = blinded
            .par_chunks(CHUNK)
            .enumerate()
            .map(|(c, chunk)| {
                if stop() {
                    return Err(Error::Cancelled);
                }
                let points = chunk
                    .iter()
                    .enumerate()
                    .map(|(i, b)| decode_element(&b.0, c * CHUNK + i))
                    .collect::<Result<Vec<_>>>()?;
                let halves: Vec<RistrettoPoint> = points.iter().map(|p| half * p).collect();
                let encoded = RistrettoPoint::double_and_compress_batch(&halves)
                    .into_iter()
                    .map(|c| c.to_bytes())
                    .collect();
                Ok((points, encoded))
            })
            .collect::<Result<_>>()?;
        let mut points = Vec::with_capacity(blinded.len());
        let mut evaluated = Vec::with_capacity(blinded.len());
        for (p, e) in chunks {
            points.extend(p);
            evaluated.extend(e);
        }
        if stop() {
            return Err(Error::Cancelled);
        }
        let proof = match proof_r {
            Some(r) => {
                let blinded_bytes: Vec<[u8; 32]> = blinded.iter().map(|b| b.0).collect();
                Some(proof::generate(
                    self.mode,
                    &self.key,
                    &points,
                    &blinded_bytes,
                    &evaluated,
                    r,
                )?)
            }
            None => None,
        };
        Ok(Evaluation {
            elements: evaluated.into_iter().map(EvaluatedElement).collect(),
            proof,
        })
    }

    /// The one-shot `Evaluate(skS, input)` of RFC 9497.
    ///
    /// # Errors
    /// [`Error::InputTooLong`]; [`Error::InvalidInput`] if the input hashes to the identity.
    pub fn evaluate(&self, input: &[u8]) -> Result<Output> {
        let mut out = self.evaluate_batch(&[input])?;
        out.pop().ok_or(Error::EmptyBatch)
    }

    /// `Evaluate` for many inputs in parallel: how the registry is encrypted.
    ///
    /// # Errors
    /// As [`Server::evaluate`], for the first failing input.
    pub fn evaluate_batch<I: AsRef<[u8]> + Sync>(&self, inputs: &[I]) -> Result<Vec<Output>> {
        let half = self.key.half_scalar();
        let chunks: Vec<Vec<Output>> = inputs
            .par_chunks(CHUNK)
            .map(|chunk| {
                let lens = chunk
                    .iter()
                    .map(|x| check_input_len(x.as_ref()))
                    .collect::<Result<Vec<_>>>()?;
                let halves = chunk
                    .iter()
                    .map(|x| {
                        let p = hash_to_group(self.mode, x.as_ref());
                        if p == RistrettoPoint::identity() {
                            return Err(Error::InvalidInput);
                        }
                        Ok(half * p)
                    })
                    .collect::<Result<Vec<_>>>()?;
                let encoded = RistrettoPoint::double_and_compress_batch(&halves);
                Ok(chunk
                    .iter()
                    .zip(lens)
                    .zip(encoded)
                    .map(|((x, len), e)| finalize_hash(x.as_ref(), len, e.as_bytes()))
                    .collect())
            })
            .collect::<Result<_>>()?;
        Ok(chunks.into_iter().flatten().collect())
    }
}

/// A batch must hold between 1 and [`MAX_PROOF_BATCH`] elements.
pub(crate) fn check_batch_len(len: usize) -> Result<()> {
    if len == 0 {
        return Err(Error::EmptyBatch);
    }
    if len > MAX_PROOF_BATCH {
        return Err(Error::BatchTooLarge {
            max: MAX_PROOF_BATCH,
            got: len,
        });
    }
    Ok(())
}
