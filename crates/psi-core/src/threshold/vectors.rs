//! `docs/vectors/threshold.json`: threshold mode's known answers, for a
//! second implementation: RFC 9497 A.1's VOPRF key split 2-of-3 and 3-of-5
//! with fixed coefficients; the A.1 vector's blinded element evaluated by a
//! subset of holders (partial evaluations, per-holder proofs with fixed
//! randomness), the Lagrange coefficients, the combination (A.1's
//! `EvaluationElement`) and the output (A.1's `Output`); a three-holder key
//! generation with fixed polynomials (commitments, every `f_i(j)`, the
//! shares, public shares and key); a refresh with fixed zero-polynomials;
//! and an endorsement made by two holders with fixed nonces. The test fails
//! when code and file part; `PSI_WRITE_VECTORS=1 cargo test -p psi-core
//! vectors` writes it anew.

use curve25519_dalek::ristretto::RistrettoPoint;
use curve25519_dalek::scalar::Scalar;
use serde_json::{json, Value};
use sha2::{Digest, Sha512};

use super::sign::{self, Endorsed};
use super::*;
use crate::tests::{parse_rfc, scalar as rfc_scalar};
use crate::{Blinding, Client, Server};

fn scalar(label: &str, i: usize) -> Scalar {
    let mut h = Sha512::new();
    h.update(b"psi-match threshold vectors v1 ");
    h.update(label.as_bytes());
    h.update((i as u64).to_be_bytes());
    Scalar::from_bytes_mod_order_wide(&h.finalize().into())
}

fn hx(b: impl AsRef<[u8]>) -> String {
    hex::encode(b)
}

fn point(p: &RistrettoPoint) -> String {
    hx(p.compress().to_bytes())
}

fn evaluation(t: u16, n: u16, subset: &[u16], key: &ServerKey) -> Value {
    let (_, suite) = parse_rfc()
        .into_iter()
        .find(|(m, _)| *m == Mode::Voprf)
        .unwrap();
    let v = &suite.vectors[0];
    let input = &v.get("Input")[0];
    let blind = rfc_scalar(&v.get("Blind")[0]);
    let coefficients: Vec<Scalar> = std::iter::once(*key.scalar())
        .chain((1..t).map(|k| scalar(&format!("split {t}-of-{n} a"), usize::from(k))))
        .collect();
    let shares = split_with(&coefficients, n).unwrap();
    let committee = Committee::new(
        t,
        *key.public_key(),
        shares.iter().map(KeyShare::public_share).collect(),
    )
    .unwrap();
    let client = Client::new(Mode::Voprf, *key.public_key());
    let (state, blinded) = client
        .blind_with(&[input], Blinding::Multiplicative, vec![blind])
        .unwrap();
    let partials: Vec<Partial> = subset
        .iter()
        .map(|&i| {
            let share = &shares[usize::from(i) - 1];
            let server = Server::new(
                Mode::Voprf,
                KeyShare::from_bytes(i, &share.to_bytes())
                    .unwrap()
                    .into_key(),
            );
            let r = scalar(&format!("proof {t}-of-{n}"), usize::from(i));
            let e = server
                .blind_evaluate_with(&blinded, Some(&r), &|| false)
                .unwrap();
            Partial {
                index: i,
                elements: e.elements,
                proof: e.proof.unwrap(),
            }
        })
        .collect();
    let lambdas = lagrange(subset, 0).unwrap();
    let blinded_bytes: Vec<[u8; 32]> = blinded.iter().map(|b| b.0).collect();
    let combined =
        verify_and_combine(&committee, &state.blinded_points, &blinded_bytes, &partials).unwrap();
    assert_eq!(point(&combined[0]), hx(&v.get("EvaluationElement")[0]));
    let output = client
        .finalize_threshold(state, &[input], &committee, &partials)
        .unwrap();
    assert_eq!(hx(output[0].0), hx(&v.get("Output")[0]));
    json!({
        "threshold": t,
        "holders": n,
        "polynomial": coefficients.iter().map(|c| hx(c.to_bytes())).collect::<Vec<_>>(),
        "shares": shares.iter().map(|s| json!({
            "index": s.index(),
            "share": hx(*s.to_bytes()),
            "public_share": s.public_share().key.to_hex(),
        })).collect::<Vec<_>>(),
        "input": hx(input),
        "blind": hx(blind.to_bytes()),
        "blinded_element": hx(blinded[0].0),
        "subset": subset,
        "partials": partials.iter().map(|p| json!({
            "index": p.index,
            "proof_random_scalar": hx(scalar(&format!("proof {t}-of-{n}"), usize::from(p.index)).to_bytes()),
            "evaluated_element": hx(p.elements[0].0),
            "proof": hx(p.proof.to_bytes()),
        })).collect::<Vec<_>>(),
        "lagrange_at_zero": lambdas.iter().map(|l| hx(l.to_bytes())).collect::<Vec<_>>(),
        "combined_element": point(&combined[0]),
        "output": hx(output[0].0),
    })
}

/// Three holders' fixed polynomials, summed: what `dkg` computes.
fn key_generation() -> (Value, Vec<KeyShare>, Committee) {
    let (t, n) = (2u16, 3u16);
    let polys: Vec<Vec<Scalar>> = (1..=n)
        .map(|i| {
            (0..t)
                .map(|k| scalar(&format!("dkg f_{i}"), usize::from(k)))
                .collect()
        })
        .collect();
    let commitments: Vec<Vec<RistrettoPoint>> = polys
        .iter()
        .map(|p| p.iter().map(base_mul).collect())
        .collect();
    let key: Scalar = polys.iter().map(|p| p[0]).sum();
    let shares: Vec<KeyShare> = (1..=n)
        .map(|j| {
            let s: Scalar = polys.iter().map(|p| eval_poly(p, j)).sum();
            KeyShare::from_scalar(j, s).unwrap()
        })
        .collect();
    let group: Vec<RistrettoPoint> = (0..usize::from(t))
        .map(|k| commitments.iter().map(|c| c[k]).sum())
        .collect();
    let committee = Committee::new(
        t,
        PublicKey::from_bytes(&group[0].compress().to_bytes()).unwrap(),
        (1..=n)
            .map(|m| PublicShare {
                index: m,
                key: PublicKey::from_bytes(&eval_commitments(&group, m).compress().to_bytes())
                    .unwrap(),
            })
            .collect(),
    )
    .unwrap();
    assert_eq!(base_mul(&key), *committee.public_key().point());
    let doc = json!({
        "threshold": t,
        "holders": n,
        "dealers": (1..=n).map(|i| {
            let p = &polys[usize::from(i) - 1];
            json!({
                "index": i,
                "polynomial": p.iter().map(|c| hx(c.to_bytes())).collect::<Vec<_>>(),
                "commitments": commitments[usize::from(i) - 1].iter().map(point).collect::<Vec<_>>(),
                "shares_dealt": (1..=n).map(|j| hx(eval_poly(p, j).to_bytes())).collect::<Vec<_>>(),
            })
        }).collect::<Vec<_>>(),
        "shares": shares.iter().map(|s| json!({
            "index": s.index(),
            "share": hx(*s.to_bytes()),
            "public_share": s.public_share().key.to_hex(),
        })).collect::<Vec<_>>(),
        "public_key": committee.public_key().to_hex(),
    });
    (doc, shares, committee)
}

fn refresh(shares: &[KeyShare], committee: &Committee) -> Value {
    let n = u16::try_from(shares.len()).unwrap();
    let zero_polys: Vec<Vec<Scalar>> = (1..=n)
        .map(|i| vec![Scalar::ZERO, scalar(&format!("refresh g_{i}"), 1)])
        .collect();
    let fresh: Vec<KeyShare> = shares
        .iter()
        .map(|s| {
            let add: Scalar = zero_polys.iter().map(|p| eval_poly(p, s.index())).sum();
            KeyShare::from_scalar(s.index(), s.scalar() + add).unwrap()
        })
        .collect();
    let again = Committee::new(
        committee.threshold(),
        *committee.public_key(),
        fresh.iter().map(KeyShare::public_share).collect(),
    )
    .unwrap();
    assert_eq!(again.public_key(), committee.public_key());
    json!({
        "zero_polynomials": zero_polys.iter().map(|p| p.iter().map(|c| hx(c.to_bytes())).collect::<Vec<_>>()).collect::<Vec<_>>(),
        "shares": fresh.iter().map(|s| json!({
            "index": s.index(),
            "share": hx(*s.to_bytes()),
            "public_share": s.public_share().key.to_hex(),
        })).collect::<Vec<_>>(),
    })
}

fn endorsement(shares: &[KeyShare], committee: &Committee, next: &PublicKey) -> Value {
    let message = Endorsed {
        old_epoch: 1,
        new_key: *next,
        new_epoch: 2,
    };
    let signers = [&shares[0], &shares[2]];
    let (nonces, commitments): (Vec<_>, Vec<_>) = signers
        .iter()
        .map(|s| {
            sign::commit_with(
                s,
                scalar("nonce d", usize::from(s.index())),
                scalar("nonce e", usize::from(s.index())),
            )
        })
        .unzip();
    let z: Vec<_> = signers
        .iter()
        .zip(nonces)
        .map(|(s, n)| sign::sign(s, n, committee, &message, &commitments).unwrap())
        .collect();
    let signature = sign::aggregate(committee, &message, &commitments, &z).unwrap();
    crate::rotation::verify(committee.public_key(), 1, next, 2, &signature).unwrap();
    json!({
        "old_epoch": 1,
        "new_public_key": next.to_hex(),
        "new_epoch": 2,
        "signers": signers.iter().zip(&commitments).zip(&z).map(|((s, c), z)| json!({
            "index": s.index(),
            "hiding_nonce": hx(scalar("nonce d", usize::from(s.index())).to_bytes()),
            "binding_nonce": hx(scalar("nonce e", usize::from(s.index())).to_bytes()),
            "hiding_commitment": hx(c.hiding),
            "binding_commitment": hx(c.binding),
            "signature_share": hx(z.z),
        })).collect::<Vec<_>>(),
        "endorsement": hx(signature),
    })
}

fn generate() -> String {
    let (_, suite) = parse_rfc()
        .into_iter()
        .find(|(m, _)| *m == Mode::Voprf)
        .unwrap();
    let seed: [u8; 32] = suite.seed.as_slice().try_into().unwrap();
    let key = ServerKey::derive(Mode::Voprf, &seed, &suite.key_info).unwrap();
    let (dkg, shares, committee) = key_generation();
    let next = *ServerKey::derive(Mode::Voprf, &[0x33; 32], b"next epoch")
        .unwrap()
        .public_key();
    let doc = json!({
        "about": "psi-match threshold-mode vectors v1: RFC 9497 VOPRF ristretto255-SHA512 (A.1's key, input and blind) through t-of-n holders; scalars are 32-byte little-endian, elements 32-byte encodings, all hex; see docs/PROTOCOL.md section 11",
        "key": {
            "derive_key_pair": {"seed": hx(seed), "info": hx(&suite.key_info)},
            "secret_key": hx(*key.to_bytes()),
            "public_key": key.public_key().to_hex(),
        },
        "evaluations": [evaluation(2, 3, &[1, 3], &key), evaluation(3, 5, &[2, 4, 5], &key)],
        "key_generation": dkg,
        "refresh": refresh(&shares, &committee),
        "endorsement": endorsement(&shares, &committee, &next),
    });
    serde_json::to_string_pretty(&doc).unwrap() + "\n"
}

#[test]
fn the_published_threshold_vectors_match_the_code() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/vectors/threshold.json"
    );
    let json = generate();
    if std::env::var_os("PSI_WRITE_VECTORS").is_some() {
        std::fs::write(path, &json).unwrap();
    }
    let published = std::fs::read_to_string(path).expect(
        "docs/vectors/threshold.json is missing: PSI_WRITE_VECTORS=1 cargo test -p psi-core vectors",
    );
    assert!(
        published == json,
        "the code no longer produces docs/vectors/threshold.json; if the change is intended, rerun with PSI_WRITE_VECTORS=1 and say so in docs/PROTOCOL.md"
    );
}
