//! Key rotation endorsements: when the operator rotates the OPRF key, the
//! retiring key signs the new public key and epoch, so that a client that
//! pinned the old key can accept the new one without trusting it on first
//! use again.
//!
//! The signature is a Schnorr signature over ristretto255 with the retiring
//! key: `R = r*G`, `c = H(DST || pk_old || epoch_old || pk_new || epoch_new || R)`,
//! `s = r + c*sk_old`; it verifies when `s*G == R + c*pk_old`. The challenge
//! hash uses its own domain separation tag, so no OPRF evaluation or DLEQ
//! proof the server ever produces can stand in for an endorsement.
//!
//! In threshold mode the retiring epoch's key holders make the same
//! signature together ([`crate::threshold::sign`]); it verifies here like
//! any other.

use rand_core::CryptoRngCore;

use crate::error::{Error, Result};
use crate::key::{PublicKey, ServerKey};
use crate::schnorr;

/// Serialised endorsement length: `R || s`.
pub const ENDORSEMENT_LEN: usize = schnorr::SIGNATURE_LEN;

pub(crate) const DST: &[u8] = b"psi.v1.key-rotation-ristretto255-SHA512";

/// One step of a key's history: the key of `epoch`, endorsed by the key of
/// the epoch before it (epoch 1 has no endorsement).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyStep {
    /// The epoch this key serves.
    pub epoch: u64,
    /// Its public key.
    pub public_key: PublicKey,
    /// The previous key's signature over this key and epoch.
    pub endorsement: [u8; ENDORSEMENT_LEN],
}

/// What an endorsement signs after the retiring key:
/// `I2OSP(old_epoch, 8) || pk_new || I2OSP(new_epoch, 8)`.
pub(crate) fn message(old_epoch: u64, new: &PublicKey, new_epoch: u64) -> [u8; 48] {
    let mut out = [0u8; 48];
    out[..8].copy_from_slice(&old_epoch.to_be_bytes());
    out[8..40].copy_from_slice(&new.to_bytes());
    out[40..].copy_from_slice(&new_epoch.to_be_bytes());
    out
}

/// The retiring key's signature over the new key and epoch.
pub fn endorse<R: CryptoRngCore + ?Sized>(
    old: &ServerKey,
    old_epoch: u64,
    new: &PublicKey,
    new_epoch: u64,
    rng: &mut R,
) -> [u8; ENDORSEMENT_LEN] {
    schnorr::sign(DST, old, &[&message(old_epoch, new, new_epoch)], rng)
}

/// Checks that `old` (the key of `old_epoch`) endorsed `new` for `new_epoch`.
///
/// # Errors
/// [`Error::ProofVerification`] for a wrong or malformed signature, or an
/// epoch that does not move forward.
pub fn verify(
    old: &PublicKey,
    old_epoch: u64,
    new: &PublicKey,
    new_epoch: u64,
    endorsement: &[u8],
) -> Result<()> {
    if new_epoch <= old_epoch {
        return Err(Error::ProofVerification);
    }
    schnorr::verify(
        DST,
        old,
        &[&message(old_epoch, new, new_epoch)],
        endorsement,
    )
}

/// Walks `history` from the pinned key of `pinned_epoch` to the key of
/// `target_epoch`, checking every endorsement. Returns `Ok` only if each
/// step from the pinned key to the target is endorsed by its predecessor.
///
/// # Errors
/// [`Error::ProofVerification`] if a step is missing or does not verify.
pub fn verify_chain(
    pinned: &PublicKey,
    pinned_epoch: u64,
    target: &PublicKey,
    target_epoch: u64,
    history: &[KeyStep],
) -> Result<()> {
    let mut key = *pinned;
    let mut epoch = pinned_epoch;
    while epoch < target_epoch {
        let next = history
            .iter()
            .filter(|s| s.epoch > epoch)
            .min_by_key(|s| s.epoch)
            .ok_or(Error::ProofVerification)?;
        verify(&key, epoch, &next.public_key, next.epoch, &next.endorsement)?;
        key = next.public_key;
        epoch = next.epoch;
    }
    if epoch == target_epoch && key == *target {
        Ok(())
    } else {
        Err(Error::ProofVerification)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::OsRng;

    fn step(old: &ServerKey, old_epoch: u64, new: &ServerKey, epoch: u64) -> KeyStep {
        KeyStep {
            epoch,
            public_key: *new.public_key(),
            endorsement: endorse(old, old_epoch, new.public_key(), epoch, &mut OsRng),
        }
    }

    #[test]
    fn endorsements_verify_and_bind_everything() {
        let k1 = ServerKey::generate(&mut OsRng);
        let k2 = ServerKey::generate(&mut OsRng);
        let k3 = ServerKey::generate(&mut OsRng);
        let e = endorse(&k1, 1, k2.public_key(), 2, &mut OsRng);
        verify(k1.public_key(), 1, k2.public_key(), 2, &e).unwrap();
        // Another new key, epoch or signer: refused.
        assert!(verify(k1.public_key(), 1, k3.public_key(), 2, &e).is_err());
        assert!(verify(k1.public_key(), 1, k2.public_key(), 3, &e).is_err());
        assert!(verify(k1.public_key(), 2, k2.public_key(), 3, &e).is_err());
        assert!(verify(k3.public_key(), 1, k2.public_key(), 2, &e).is_err());
        // Every flipped bit: refused.
        for i in 0..ENDORSEMENT_LEN * 8 {
            let mut bad = e;
            bad[i / 8] ^= 1 << (i % 8);
            assert!(verify(k1.public_key(), 1, k2.public_key(), 2, &bad).is_err());
        }
        // Epochs only move forward.
        let back = endorse(&k1, 2, k2.public_key(), 1, &mut OsRng);
        assert!(verify(k1.public_key(), 2, k2.public_key(), 1, &back).is_err());
    }

    #[test]
    fn endorsements_keep_the_byte_format_of_earlier_releases() {
        // The formula of section 7 of docs/PROTOCOL.md, computed by hand:
        // key histories written before this code still verify.
        use crate::suite::hash_to_scalar_dst;
        use curve25519_dalek::constants::RISTRETTO_BASEPOINT_TABLE;
        let old = ServerKey::from_bytes(&[3; 32]).unwrap();
        let new = *ServerKey::from_bytes(&[4; 32]).unwrap().public_key();
        let r = curve25519_dalek::scalar::Scalar::from(77u8);
        let big_r = (RISTRETTO_BASEPOINT_TABLE * &r).compress().to_bytes();
        let c = hash_to_scalar_dst(
            &[
                &old.public_key().to_bytes(),
                &5u64.to_be_bytes(),
                &new.to_bytes(),
                &6u64.to_be_bytes(),
                &big_r,
            ],
            DST,
        );
        let s = r + c * old.scalar();
        let mut e = [0u8; ENDORSEMENT_LEN];
        e[..32].copy_from_slice(&big_r);
        e[32..].copy_from_slice(s.as_bytes());
        verify(old.public_key(), 5, &new, 6, &e).unwrap();
    }

    #[test]
    fn chains_verify_step_by_step() {
        let k1 = ServerKey::generate(&mut OsRng);
        let k2 = ServerKey::generate(&mut OsRng);
        let k3 = ServerKey::generate(&mut OsRng);
        let history = [step(&k1, 1, &k2, 2), step(&k2, 2, &k3, 3)];
        verify_chain(k1.public_key(), 1, k3.public_key(), 3, &history).unwrap();
        verify_chain(k2.public_key(), 2, k3.public_key(), 3, &history).unwrap();
        verify_chain(k3.public_key(), 3, k3.public_key(), 3, &history).unwrap();
        // A gap, a foreign key, or a target the chain does not reach.
        assert!(verify_chain(k1.public_key(), 1, k3.public_key(), 3, &history[1..]).is_err());
        let k4 = ServerKey::generate(&mut OsRng);
        assert!(verify_chain(k1.public_key(), 1, k4.public_key(), 3, &history).is_err());
        let forged = [history[0], step(&k4, 2, &k3, 3)];
        assert!(verify_chain(k1.public_key(), 1, k3.public_key(), 3, &forged).is_err());
    }
}
