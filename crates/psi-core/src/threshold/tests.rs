//! Threshold mode: the RFC 9497 A.1 vectors through every subset of 2-of-3
//! and 3-of-5 holders, wrong partials named, committees checked, the DKG,
//! the refresh and the threshold endorsement.

use curve25519_dalek::scalar::Scalar;
use rand_core::OsRng;

use super::dkg::{self, Purpose, Round1Package, Round1Secret, Sealed, Session};
use super::sign::{self, Endorsed};
use super::*;
use crate::rotation;
use crate::tests::{parse_rfc, scalar};
use crate::{Blinding, Client, Server};

fn copy(share: &KeyShare) -> KeyShare {
    KeyShare::from_bytes(share.index(), &share.to_bytes()).unwrap()
}

fn committee_of(t: u16, pk: PublicKey, shares: &[KeyShare]) -> Committee {
    Committee::new(t, pk, shares.iter().map(KeyShare::public_share).collect()).unwrap()
}

fn partial(share: &KeyShare, blinded: &[BlindedElement]) -> Partial {
    let server = Server::new(Mode::Voprf, copy(share).into_key());
    let e = server.blind_evaluate(blinded, &mut OsRng).unwrap();
    Partial {
        index: share.index(),
        elements: e.elements,
        proof: e.proof.unwrap(),
    }
}

/// Every subset of `1..=n` with `t` members.
fn subsets(n: u16, t: u16) -> Vec<Vec<u16>> {
    (0u32..1 << n)
        .filter(|m| m.count_ones() == u32::from(t))
        .map(|m| (1..=n).filter(|i| m & (1 << (i - 1)) != 0).collect())
        .collect()
}

#[test]
fn rfc_vectors_through_every_subset_of_holders() {
    let (_, suite) = parse_rfc()
        .into_iter()
        .find(|(m, _)| *m == Mode::Voprf)
        .unwrap();
    let seed: [u8; 32] = suite.seed.as_slice().try_into().unwrap();
    let key = ServerKey::derive(Mode::Voprf, &seed, &suite.key_info).unwrap();
    let pk = *key.public_key();
    let client = Client::new(Mode::Voprf, pk);
    let mut runs = 0;
    for (t, n) in [(2, 3), (3, 5)] {
        let shares = split(&key, t, n, &mut OsRng).unwrap();
        let committee = committee_of(t, pk, &shares);
        for set in subsets(n, t) {
            for v in &suite.vectors {
                let inputs = v.get("Input");
                let blinds: Vec<Scalar> = v.get("Blind").iter().map(|b| scalar(b)).collect();
                let (state, blinded) = client
                    .blind_with(inputs, Blinding::Multiplicative, blinds)
                    .unwrap();
                let partials: Vec<Partial> = set
                    .iter()
                    .map(|i| partial(&shares[usize::from(*i) - 1], &blinded))
                    .collect();
                // The combination is the RFC's EvaluationElement ...
                let blinded_bytes: Vec<[u8; 32]> = blinded.iter().map(|b| b.0).collect();
                let points = state.blinded_points.clone();
                let combined =
                    verify_and_combine(&committee, &points, &blinded_bytes, &partials).unwrap();
                let got: Vec<Vec<u8>> = combined
                    .iter()
                    .map(|p| p.compress().to_bytes().to_vec())
                    .collect();
                assert_eq!(got, v.get("EvaluationElement"), "{t}-of-{n} {set:?}");
                // ... and the outputs are the RFC's Output.
                let outputs = client
                    .finalize_threshold(state, inputs, &committee, &partials)
                    .unwrap();
                let got: Vec<Vec<u8>> = outputs.iter().map(|o| o.0.to_vec()).collect();
                assert_eq!(got, v.get("Output"), "{t}-of-{n} {set:?}");
                runs += 1;
            }
        }
    }
    // 3 subsets of 3 and 10 of 5, three vectors each.
    assert_eq!(runs, (3 + 10) * 3);
}

#[test]
fn a_wrong_partial_is_named_or_replaced() {
    let key = ServerKey::generate(&mut OsRng);
    let pk = *key.public_key();
    let shares = split(&key, 2, 3, &mut OsRng).unwrap();
    let committee = committee_of(2, pk, &shares);
    let client = Client::new(Mode::Voprf, pk);
    let inputs = [b"a".as_slice(), b"b", b"c"];
    let want: Vec<_> = {
        let server = Server::new(Mode::Voprf, ServerKey::from_bytes(&key.to_bytes()).unwrap());
        inputs.iter().map(|x| server.evaluate(x).unwrap()).collect()
    };
    let (state, blinded) = client
        .blind(&inputs, Blinding::Additive, &mut OsRng)
        .unwrap();
    // Holder 2 evaluates with a key that is not its share.
    let liar = KeyShare::from_bytes(2, &ServerKey::generate(&mut OsRng).to_bytes()).unwrap();
    let good = [partial(&shares[0], &blinded), partial(&shares[2], &blinded)];
    let bad = partial(&liar, &blinded);
    // One element of holder 1's answer changed under its proof.
    let mut tampered = good[0].clone();
    tampered.elements.swap(0, 1);
    assert_eq!(
        verify_partial(&committee, &blinded, &tampered),
        Err(Error::PartialProof { holder: 1 })
    );
    assert_eq!(
        verify_partial(&committee, &blinded, &bad),
        Err(Error::PartialProof { holder: 2 })
    );
    verify_partial(&committee, &blinded, &good[1]).unwrap();
    // Only t answered and one is wrong: an error naming it.
    let blinded_bytes: Vec<[u8; 32]> = blinded.iter().map(|b| b.0).collect();
    let only_two = [good[0].clone(), bad.clone()];
    assert_eq!(
        verify_and_combine(&committee, &state.blinded_points, &blinded_bytes, &only_two),
        Err(Error::PartialProof { holder: 2 })
    );
    // A third answered: the wrong one is replaced.
    let three = [bad.clone(), good[0].clone(), good[1].clone()];
    let outputs = client
        .finalize_threshold(state, &inputs, &committee, &three)
        .unwrap();
    assert_eq!(outputs, want);
    // The same holder twice counts once; an unknown holder is named.
    let (state, _) = client
        .blind(&inputs, Blinding::Additive, &mut OsRng)
        .unwrap();
    let twice = [good[0].clone(), good[0].clone()];
    assert!(client
        .finalize_threshold(state, &inputs, &committee, &twice)
        .is_err());
    let mut stranger = good[1].clone();
    stranger.index = 9;
    assert_eq!(
        verify_partial(&committee, &blinded, &stranger),
        Err(Error::UnknownHolder { holder: 9 })
    );
}

#[test]
fn a_committee_is_checked_against_its_key() {
    let key = ServerKey::generate(&mut OsRng);
    let pk = *key.public_key();
    let shares = split(&key, 3, 5, &mut OsRng).unwrap();
    let public: Vec<PublicShare> = shares.iter().map(KeyShare::public_share).collect();
    Committee::new(3, pk, public.clone()).unwrap();
    // Another key, one share off the polynomial, a repeated index, t > n.
    let other = *ServerKey::generate(&mut OsRng).public_key();
    assert_eq!(
        Committee::new(3, other, public.clone()),
        Err(Error::ShareMismatch { holder: 0 })
    );
    let mut off = public.clone();
    off[4].key = other;
    assert_eq!(
        Committee::new(3, pk, off),
        Err(Error::ShareMismatch { holder: 5 })
    );
    let mut repeated = public.clone();
    repeated[1].index = 1;
    assert!(Committee::new(3, pk, repeated).is_err());
    assert!(Committee::new(6, pk, public.clone()).is_err());
    // Any t shares reconstruct the key; t - 1 with the key's image do not.
    for set in subsets(5, 3) {
        let chosen: Vec<&KeyShare> = set.iter().map(|i| &shares[usize::from(*i) - 1]).collect();
        assert_eq!(reconstruct(&chosen).unwrap(), *key.scalar());
    }
    let two: Vec<&KeyShare> = shares.iter().take(2).collect();
    assert_ne!(reconstruct(&two).unwrap(), *key.scalar());
    // Debug shows no secret.
    let hex: String = shares[0]
        .to_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert!(!format!("{:?}", shares[0]).contains(&hex));
}

fn identities(n: u16) -> Vec<ServerKey> {
    (0..n).map(|_| ServerKey::generate(&mut OsRng)).collect()
}

/// One full run among `n` holders; returns each holder's secret state, the
/// packages and the sealed shares.
fn run(
    session: &Session,
    ids: &[ServerKey],
) -> (Vec<Round1Secret>, Vec<Round1Package>, Vec<Sealed>) {
    let public: Vec<PublicKey> = ids.iter().map(|k| *k.public_key()).collect();
    let (secrets, packages): (Vec<_>, Vec<_>) = ids
        .iter()
        .enumerate()
        .map(|(i, id)| dkg::start(session, i as u16 + 1, id, &mut OsRng).unwrap())
        .unzip();
    let sealed = secrets
        .iter()
        .flat_map(|s| dkg::seal(s, &public, &packages).unwrap())
        .collect();
    (secrets, packages, sealed)
}

#[test]
fn dkg_gives_shares_of_a_key_no_holder_had() {
    let ids = identities(3);
    let public: Vec<PublicKey> = ids.iter().map(|k| *k.public_key()).collect();
    let session = Session {
        id: [7; 32],
        threshold: 2,
        holders: 3,
        purpose: Purpose::NewKey,
    };
    let (secrets, packages, sealed) = run(&session, &ids);
    let results: Vec<(KeyShare, Committee)> = secrets
        .iter()
        .map(|s| dkg::finish(s, &public, &packages, &sealed).unwrap())
        .collect();
    let committee = results[0].1.clone();
    assert!(results.iter().all(|(_, c)| *c == committee));
    for set in subsets(3, 2) {
        let chosen: Vec<&KeyShare> = set
            .iter()
            .map(|i| &results[usize::from(*i) - 1].0)
            .collect();
        let k = reconstruct(&chosen).unwrap();
        assert_eq!(base_mul(&k), *committee.public_key().point());
    }
    // Evaluations through the new shares are the single-key VOPRF's.
    let chosen: Vec<&KeyShare> = results.iter().take(2).map(|(s, _)| s).collect();
    let key = ServerKey::from_bytes(&reconstruct(&chosen).unwrap().to_bytes()).unwrap();
    let client = Client::new(Mode::Voprf, *committee.public_key());
    let inputs = [b"x".as_slice(), b"y"];
    let (state, blinded) = client
        .blind(&inputs, Blinding::Additive, &mut OsRng)
        .unwrap();
    let partials = [
        partial(&results[1].0, &blinded),
        partial(&results[2].0, &blinded),
    ];
    let outputs = client
        .finalize_threshold(state, &inputs, &committee, &partials)
        .unwrap();
    let server = Server::new(Mode::Voprf, key);
    assert_eq!(outputs[1], server.evaluate(b"y").unwrap());

    // A tampered sealed share names its dealer; a package not signed by its
    // holder's identity is refused; a message of another run is refused.
    let mut bad = sealed.clone();
    let k = bad.iter().position(|s| s.from == 3 && s.to == 1).unwrap();
    bad[k].bytes[0] ^= 1;
    assert_eq!(
        dkg::finish(&secrets[0], &public, &packages, &bad).err(),
        Some(Error::ShareMismatch { holder: 3 })
    );
    let mut swapped = public.clone();
    swapped.swap(1, 2);
    assert_eq!(
        dkg::finish(&secrets[0], &swapped, &packages, &sealed).err(),
        Some(Error::DkgPackage { holder: 2 })
    );
    let other = Session {
        id: [8; 32],
        ..session
    };
    let (_, other_packages, _) = run(&other, &ids);
    let mut mixed = packages.clone();
    mixed[1] = other_packages[1].clone();
    assert_eq!(
        dkg::finish(&secrets[0], &public, &mixed, &sealed).err(),
        Some(Error::DkgPackage { holder: 2 })
    );
    assert_eq!(
        dkg::finish(&secrets[0], &public, &packages[..2], &sealed).err(),
        Some(Error::DkgPackage { holder: 3 })
    );
}

#[test]
fn a_refresh_changes_every_share_and_keeps_the_key() {
    let key = ServerKey::generate(&mut OsRng);
    let pk = *key.public_key();
    let shares = split(&key, 2, 3, &mut OsRng).unwrap();
    let committee = committee_of(2, pk, &shares);
    let ids = identities(3);
    let public: Vec<PublicKey> = ids.iter().map(|k| *k.public_key()).collect();
    let session = Session {
        id: [9; 32],
        threshold: 2,
        holders: 3,
        purpose: Purpose::Refresh,
    };
    let (secrets, packages, sealed) = run(&session, &ids);
    let fresh: Vec<(KeyShare, Committee)> = secrets
        .iter()
        .zip(&shares)
        .map(|(s, old)| dkg::refresh(s, &public, &packages, &sealed, old, &committee).unwrap())
        .collect();
    let new_committee = fresh[0].1.clone();
    assert_eq!(new_committee.public_key(), &pk);
    assert!(fresh.iter().all(|(_, c)| *c == new_committee));
    for ((new, _), old) in fresh.iter().zip(&shares) {
        assert_ne!(*new.to_bytes(), *old.to_bytes());
        assert_ne!(new.public_share(), old.public_share());
    }
    for set in subsets(3, 2) {
        let chosen: Vec<&KeyShare> = set.iter().map(|i| &fresh[usize::from(*i) - 1].0).collect();
        assert_eq!(reconstruct(&chosen).unwrap(), *key.scalar());
    }
    // A share stolen before the refresh, with shares from after it, gives nothing.
    assert_ne!(
        reconstruct(&[&shares[0], &fresh[1].0]).unwrap(),
        *key.scalar()
    );
    assert_ne!(
        reconstruct(&[&fresh[0].0, &shares[2]]).unwrap(),
        *key.scalar()
    );
    // Another holder's current share is refused.
    assert!(dkg::refresh(
        &secrets[0],
        &public,
        &packages,
        &sealed,
        &shares[1],
        &committee
    )
    .is_err());
}

#[test]
fn holders_endorse_the_next_key_together() {
    let old = ServerKey::generate(&mut OsRng);
    let shares = split(&old, 2, 3, &mut OsRng).unwrap();
    let committee = committee_of(2, *old.public_key(), &shares);
    let next = *ServerKey::generate(&mut OsRng).public_key();
    let message = Endorsed {
        old_epoch: 4,
        new_key: next,
        new_epoch: 5,
    };
    for set in [vec![1u16, 3], vec![1, 2, 3]] {
        let signers: Vec<&KeyShare> = set.iter().map(|i| &shares[usize::from(*i) - 1]).collect();
        let (nonces, commitments): (Vec<_>, Vec<_>) =
            signers.iter().map(|s| sign::commit(s, &mut OsRng)).unzip();
        let sig_shares: Vec<_> = signers
            .iter()
            .zip(nonces)
            .map(|(s, n)| sign::sign(s, n, &committee, &message, &commitments).unwrap())
            .collect();
        let endorsement = sign::aggregate(&committee, &message, &commitments, &sig_shares).unwrap();
        rotation::verify(old.public_key(), 4, &next, 5, &endorsement).unwrap();
        assert!(rotation::verify(old.public_key(), 4, &next, 6, &endorsement).is_err());
        // A wrong share is named.
        let mut bad = sig_shares.clone();
        bad[0].z[0] ^= 1;
        assert_eq!(
            sign::aggregate(&committee, &message, &commitments, &bad).err(),
            Some(Error::BadSignatureShare { holder: set[0] })
        );
    }
    // Fewer than t signers: refused.
    let (n1, c1) = sign::commit(&shares[0], &mut OsRng);
    assert!(sign::sign(&shares[0], n1, &committee, &message, &[c1]).is_err());
}

#[test]
fn lagrange_interpolates() {
    // f(x) = 3 + 2x: f(1) = 5, f(2) = 7, f(0) = 3, f(4) = 11.
    let at = |x| {
        let l = lagrange(&[1, 2], x).unwrap();
        l[0] * Scalar::from(5u8) + l[1] * Scalar::from(7u8)
    };
    assert_eq!(at(0), Scalar::from(3u8));
    assert_eq!(at(4), Scalar::from(11u8));
    assert!(lagrange(&[], 0).is_err());
    assert!(lagrange(&[0, 1], 0).is_err());
    assert!(lagrange(&[2, 2], 0).is_err());
}
