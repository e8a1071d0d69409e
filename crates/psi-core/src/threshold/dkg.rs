//! Distributed key generation and proactive refresh (Pedersen's DKG with
//! Feldman commitments, as in the DKG that accompanies RFC 9591), run by `n`
//! holders through a coordinator that relays their messages and learns
//! nothing it could use.
//!
//! Round 1: holder `i` draws a polynomial `f_i` of degree `t - 1` (for a
//! refresh, with `f_i(0) = 0`), publishes [`Round1Package`]: the
//! commitments `a_ik * G`, a Schnorr proof of knowledge of `a_i0` (a new key
//! only), and an ephemeral Diffie-Hellman key, all signed with the holder's
//! long-term identity key, so the coordinator cannot stand in for a holder.
//! Round 2: holder `i` seals `f_i(j)` to each holder `j` ([`Sealed`], a pad
//! from their Diffie-Hellman secret). Finish: holder `j` checks every
//! package and every share it received against its dealer's commitments
//! (naming a dealer whose share does not match), and keeps
//! `k_j = Σ_i f_i(j)` (a refresh: `k_j + Σ_i f_i(j)`). Every holder ends
//! with the same [`Committee`]; the key `Σ_i a_i0` is never in one place.

use curve25519_dalek::ristretto::{CompressedRistretto, RistrettoPoint};
use curve25519_dalek::scalar::Scalar;
use curve25519_dalek::traits::Identity;
use rand_core::CryptoRngCore;
use sha2::{Digest, Sha512};
use zeroize::{Zeroize, Zeroizing};

use super::{
    base_mul, check_index, check_shape, eval_commitments, eval_poly, Committee, KeyShare,
    PublicShare,
};
use crate::error::{Error, Result};
use crate::key::{PublicKey, ServerKey};
use crate::schnorr;
use crate::suite::{decode_scalar, random_scalar};

const PACKAGE_DST: &[u8] = b"psi.v1.dkg-package-ristretto255-SHA512";
const POK_DST: &[u8] = b"psi.v1.dkg-pok-ristretto255-SHA512";
const SEAL_DST: &[u8] = b"psi.v1.dkg-seal-ristretto255-SHA512";

/// What a run makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A new key (a new epoch).
    NewKey,
    /// New shares of the current key (same public key).
    Refresh,
}

/// One run's parameters, the same at every holder: a fresh random id (so
/// no message of one run is accepted in another), `t`, `n`, the purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    /// Random, chosen by the coordinator for this run.
    pub id: [u8; 32],
    /// `t`.
    pub threshold: u16,
    /// `n`: holders 1..=n all take part.
    pub holders: u16,
    /// A new key or a refresh.
    pub purpose: Purpose,
}

impl Session {
    /// The bytes every signature and pad of the run is bound to.
    fn context(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(37);
        out.extend_from_slice(&self.id);
        out.extend_from_slice(&self.threshold.to_be_bytes());
        out.extend_from_slice(&self.holders.to_be_bytes());
        out.push(match self.purpose {
            Purpose::NewKey => 1,
            Purpose::Refresh => 2,
        });
        out
    }

    /// How many commitments a package carries: `t`, less the constant
    /// term (always 0) of a refresh.
    fn commitment_count(&self) -> usize {
        match self.purpose {
            Purpose::NewKey => usize::from(self.threshold),
            Purpose::Refresh => usize::from(self.threshold) - 1,
        }
    }
}

/// A holder's secret state between round 1 and the finish: its polynomial
/// and its Diffie-Hellman secret. Zeroized on drop; never serialised.
pub struct Round1Secret {
    session: Session,
    index: u16,
    coefficients: Vec<Scalar>,
    dh_secret: Scalar,
}

impl Drop for Round1Secret {
    fn drop(&mut self) {
        self.coefficients.zeroize();
        self.dh_secret.zeroize();
    }
}

impl core::fmt::Debug for Round1Secret {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Round1Secret")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

/// Holder `index`'s public round-1 message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Round1Package {
    /// The dealer.
    pub index: u16,
    /// `a_ik * G` for k = 0..t (a refresh: k = 1..t), 32 bytes each.
    pub commitments: Vec<[u8; 32]>,
    /// Proof of knowledge of `a_i0` (`R || s`); all zero for a refresh.
    pub proof_of_knowledge: [u8; 64],
    /// The ephemeral Diffie-Hellman key shares are sealed with.
    pub dh_public: [u8; 32],
    /// The identity key's signature over all of the above and the session.
    pub signature: [u8; 64],
}

impl Round1Package {
    fn signed_bytes(&self, session: &Session) -> Vec<u8> {
        let mut out = session.context();
        out.extend_from_slice(&self.index.to_be_bytes());
        for c in &self.commitments {
            out.extend_from_slice(c);
        }
        out.extend_from_slice(&self.proof_of_knowledge);
        out.extend_from_slice(&self.dh_public);
        out
    }
}

/// A share `f_i(j)` sealed by dealer `from` to holder `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sealed {
    /// The dealer `i`.
    pub from: u16,
    /// The recipient `j`.
    pub to: u16,
    /// `f_i(j)` XOR the pad.
    pub bytes: [u8; 32],
}

/// Round 1 for holder `index`: draws its polynomial (with `f(0) = 0` for
/// a refresh) and returns the secret state and the signed package.
///
/// # Errors
/// [`Error::InvalidParameter`] for a bad shape or index.
pub fn start<R: CryptoRngCore + ?Sized>(
    session: &Session,
    index: u16,
    identity: &ServerKey,
    rng: &mut R,
) -> Result<(Round1Secret, Round1Package)> {
    check_shape(session.threshold, session.holders)?;
    check_index(index)?;
    if index > session.holders {
        return Err(Error::InvalidParameter(
            "a holder's index is above the committee size",
        ));
    }
    let mut coefficients = Vec::with_capacity(usize::from(session.threshold));
    coefficients.push(match session.purpose {
        Purpose::NewKey => random_scalar(rng),
        Purpose::Refresh => Scalar::ZERO,
    });
    for _ in 1..session.threshold {
        coefficients.push(random_scalar(rng));
    }
    let skip = usize::from(session.purpose == Purpose::Refresh);
    let commitments: Vec<[u8; 32]> = coefficients
        .iter()
        .skip(skip)
        .map(|a| base_mul(a).compress().to_bytes())
        .collect();
    let proof_of_knowledge = match (session.purpose, coefficients.first(), commitments.first()) {
        (Purpose::NewKey, Some(a0), Some(c0)) => {
            let secret = ServerKey::from_bytes(&Zeroizing::new(a0.to_bytes()))?;
            schnorr::sign(
                POK_DST,
                &secret,
                &[&session.context(), &index.to_be_bytes(), c0],
                rng,
            )
        }
        _ => [0; 64],
    };
    let dh_secret = random_scalar(rng);
    let mut package = Round1Package {
        index,
        commitments,
        proof_of_knowledge,
        dh_public: base_mul(&dh_secret).compress().to_bytes(),
        signature: [0; 64],
    };
    package.signature = schnorr::sign(
        PACKAGE_DST,
        identity,
        &[&package.signed_bytes(session)],
        rng,
    );
    Ok((
        Round1Secret {
            session: *session,
            index,
            coefficients,
            dh_secret,
        },
        package,
    ))
}

/// A package's checked content: its commitments as points.
struct Checked {
    index: u16,
    commitments: Vec<RistrettoPoint>,
    dh_public: RistrettoPoint,
}

fn check_package(
    session: &Session,
    identities: &[PublicKey],
    package: &Round1Package,
) -> Result<Checked> {
    let bad = Error::DkgPackage {
        holder: package.index,
    };
    check_index(package.index).map_err(|_| bad.clone())?;
    let identity = identities
        .get(usize::from(package.index) - 1)
        .ok_or_else(|| bad.clone())?;
    schnorr::verify(
        PACKAGE_DST,
        identity,
        &[&package.signed_bytes(session)],
        &package.signature,
    )
    .map_err(|_| bad.clone())?;
    if package.commitments.len() != session.commitment_count() {
        return Err(bad);
    }
    let decode = |b: &[u8; 32]| {
        CompressedRistretto(*b)
            .decompress()
            .ok_or_else(|| bad.clone())
    };
    let commitments = package
        .commitments
        .iter()
        .map(decode)
        .collect::<Result<Vec<_>>>()?;
    if session.purpose == Purpose::NewKey {
        let c0 = commitments.first().ok_or_else(|| bad.clone())?;
        if *c0 == RistrettoPoint::identity() {
            return Err(bad);
        }
        let c0_key = PublicKey::from_bytes(&c0.compress().to_bytes()).map_err(|_| bad.clone())?;
        schnorr::verify(
            POK_DST,
            &c0_key,
            &[
                &session.context(),
                &package.index.to_be_bytes(),
                &c0.compress().to_bytes(),
            ],
            &package.proof_of_knowledge,
        )
        .map_err(|_| bad.clone())?;
    }
    let dh_public = decode(&package.dh_public)?;
    if dh_public == RistrettoPoint::identity() {
        return Err(bad);
    }
    Ok(Checked {
        index: package.index,
        commitments,
        dh_public,
    })
}

/// The full commitment list of a package (a refresh's constant term is 0).
fn full_commitments(session: &Session, c: &Checked) -> Vec<RistrettoPoint> {
    match session.purpose {
        Purpose::NewKey => c.commitments.clone(),
        Purpose::Refresh => std::iter::once(RistrettoPoint::identity())
            .chain(c.commitments.iter().copied())
            .collect(),
    }
}

fn pad(
    session: &Session,
    from: u16,
    to: u16,
    shared: &RistrettoPoint,
    from_dh: &[u8; 32],
    to_dh: &[u8; 32],
) -> Zeroizing<[u8; 32]> {
    let digest = Zeroizing::new(
        Sha512::new()
            .chain_update(SEAL_DST)
            .chain_update(session.context())
            .chain_update(from.to_be_bytes())
            .chain_update(to.to_be_bytes())
            .chain_update(shared.compress().as_bytes())
            .chain_update(from_dh)
            .chain_update(to_dh)
            .finalize(),
    );
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(digest.get(..32).unwrap_or(&[0; 32]));
    out
}

/// Round 2: the dealer's share for each other holder, sealed to the
/// Diffie-Hellman key in that holder's package (checked first).
///
/// # Errors
/// [`Error::DkgPackage`] naming a holder whose package does not check.
pub fn seal(
    secret: &Round1Secret,
    identities: &[PublicKey],
    packages: &[Round1Package],
) -> Result<Vec<Sealed>> {
    let session = &secret.session;
    let own = base_mul(&secret.dh_secret).compress().to_bytes();
    let mut out = Vec::with_capacity(packages.len());
    for p in packages.iter().filter(|p| p.index != secret.index) {
        let checked = check_package(session, identities, p)?;
        let shared = secret.dh_secret * checked.dh_public;
        let pad = pad(session, secret.index, p.index, &shared, &own, &p.dh_public);
        let share = Zeroizing::new(eval_poly(&secret.coefficients, p.index).to_bytes());
        let mut bytes = [0u8; 32];
        for ((b, s), k) in bytes.iter_mut().zip(share.iter()).zip(pad.iter()) {
            *b = s ^ k;
        }
        out.push(Sealed {
            from: secret.index,
            to: p.index,
            bytes,
        });
    }
    Ok(out)
}

/// The finish at holder `j` of a new key: checks all `n` packages and the
/// shares sealed to it, and returns its share and the committee.
///
/// # Errors
/// [`Error::DkgPackage`] for a package that does not check or a missing
/// one; [`Error::ShareMismatch`] naming a dealer whose share does not match
/// its commitments.
pub fn finish(
    secret: &Round1Secret,
    identities: &[PublicKey],
    packages: &[Round1Package],
    sealed: &[Sealed],
) -> Result<(KeyShare, Committee)> {
    if secret.session.purpose != Purpose::NewKey {
        return Err(Error::InvalidParameter("a refresh finishes with `refresh`"));
    }
    let (sum, commitments) = collect(secret, identities, packages, sealed)?;
    combine(secret, sum, &commitments, None)
}

/// The finish at holder `j` of a refresh: as [`finish`], then adds the
/// zero-sharing to its current share and to every public share. The public
/// key is unchanged; a share from before the refresh is of no use with
/// shares from after it.
///
/// # Errors
/// As [`finish`], and [`Error::InvalidParameter`] when `current` is
/// another holder's share or another committee's.
pub fn refresh(
    secret: &Round1Secret,
    identities: &[PublicKey],
    packages: &[Round1Package],
    sealed: &[Sealed],
    current: &KeyShare,
    committee: &Committee,
) -> Result<(KeyShare, Committee)> {
    let session = &secret.session;
    if session.purpose != Purpose::Refresh
        || current.index() != secret.index
        || committee.threshold() != session.threshold
        || committee.shares().len() != usize::from(session.holders)
        || committee.share(current.index()) != Some(&current.public_share())
    {
        return Err(Error::InvalidParameter(
            "a refresh needs this holder's current share and the committee it belongs to",
        ));
    }
    let (sum, commitments) = collect(secret, identities, packages, sealed)?;
    combine(
        secret,
        sum + current.scalar(),
        &commitments,
        Some(committee),
    )
}

/// Checks everything holder `j` received; returns `Σ_i f_i(j)` and the
/// summed commitments `Σ_i C_ik`.
fn collect(
    secret: &Round1Secret,
    identities: &[PublicKey],
    packages: &[Round1Package],
    sealed: &[Sealed],
) -> Result<(Scalar, Vec<RistrettoPoint>)> {
    let session = &secret.session;
    let j = secret.index;
    let own_dh = base_mul(&secret.dh_secret).compress().to_bytes();
    let mut sum = eval_poly(&secret.coefficients, j);
    let mut commitments = vec![RistrettoPoint::identity(); usize::from(session.threshold)];
    for i in 1..=session.holders {
        let package = packages
            .iter()
            .find(|p| p.index == i)
            .ok_or(Error::DkgPackage { holder: i })?;
        let checked = check_package(session, identities, package)?;
        let full = full_commitments(session, &checked);
        for (acc, c) in commitments.iter_mut().zip(&full) {
            *acc += c;
        }
        if i == j {
            continue;
        }
        let s = sealed
            .iter()
            .find(|s| s.from == i && s.to == j)
            .ok_or(Error::ShareMismatch { holder: i })?;
        let shared = secret.dh_secret * checked.dh_public;
        let pad = pad(session, i, j, &shared, &package.dh_public, &own_dh);
        let mut bytes = Zeroizing::new([0u8; 32]);
        for ((b, c), k) in bytes.iter_mut().zip(s.bytes.iter()).zip(pad.iter()) {
            *b = c ^ k;
        }
        let mut share = decode_scalar(&bytes).map_err(|_| Error::ShareMismatch {
            holder: checked.index,
        })?;
        if base_mul(&share) != eval_commitments(&full, j) {
            share.zeroize();
            return Err(Error::ShareMismatch {
                holder: checked.index,
            });
        }
        sum += share;
        share.zeroize();
    }
    Ok((sum, commitments))
}

fn combine(
    secret: &Round1Secret,
    mut share: Scalar,
    commitments: &[RistrettoPoint],
    before: Option<&Committee>,
) -> Result<(KeyShare, Committee)> {
    let session = &secret.session;
    let own = KeyShare::from_scalar(secret.index, share);
    share.zeroize();
    let own = own?;
    let public_key = match before {
        Some(c) => *c.public_key(),
        None => PublicKey::from_bytes(
            &commitments
                .first()
                .map_or([0; 32], |c| c.compress().to_bytes()),
        )?,
    };
    let shares = (1..=session.holders)
        .map(|m| {
            let mut point = eval_commitments(commitments, m);
            if let Some(c) = before {
                point += c
                    .share(m)
                    .map_or_else(RistrettoPoint::identity, |s| *s.key.point());
            }
            Ok(PublicShare {
                index: m,
                key: PublicKey::from_bytes(&point.compress().to_bytes())?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let committee = Committee::new(session.threshold, public_key, shares)?;
    if committee.share(own.index()) != Some(&own.public_share()) {
        return Err(Error::ShareMismatch {
            holder: own.index(),
        });
    }
    Ok((own, committee))
}
