//! RFC 9497 Appendix A.1 vectors (ristretto255-SHA512, OPRF and VOPRF modes)
//! for every step, parsed from the RFC's text; agreement of the two blinding
//! paths with the one-shot `Evaluate`; cross-checks against the `voprf` crate.

use curve25519_dalek::scalar::Scalar;
use proptest::prelude::*;
use rand_core::OsRng;

use crate::suite::decode_scalar;
use crate::{
    BlindedElement, Blinding, Client, Error, EvaluatedElement, Mode, Proof, Server, ServerKey,
};

const RFC_TEXT: &str = include_str!("../../../docs/vectors/rfc9497-a1.txt");

#[derive(Debug, Default)]
pub(crate) struct Suite {
    pub(crate) seed: Vec<u8>,
    pub(crate) key_info: Vec<u8>,
    sk: Vec<u8>,
    pk: Option<Vec<u8>>,
    pub(crate) vectors: Vec<Vector>,
}

#[derive(Debug, Default)]
pub(crate) struct Vector {
    fields: Vec<(String, Vec<Vec<u8>>)>,
}

impl Vector {
    pub(crate) fn get(&self, key: &str) -> &[Vec<u8>] {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_slice())
            .unwrap_or_else(|| panic!("vector has no {key}"))
    }

    fn opt(&self, key: &str) -> Option<&[Vec<u8>]> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_slice())
    }
}

/// Parses the RFC's layout: `Key = hex[,hex...]` with the value wrapped onto
/// following indented lines; sections `A.1.1.  OPRF Mode`, `A.1.2.  VOPRF
/// Mode`, each test vector under a `Test Vector N` heading.
pub(crate) fn parse_rfc() -> Vec<(Mode, Suite)> {
    // Join wrapped values first.
    let mut logical: Vec<String> = Vec::new();
    for line in RFC_TEXT.lines() {
        let t = line.trim();
        if t.is_empty() {
            continue;
        }
        let continuation = line.starts_with("   ")
            && !t.contains(" = ")
            && t.chars().all(|c| c.is_ascii_hexdigit() || c == ',');
        match logical.last_mut() {
            Some(prev) if continuation => prev.push_str(t),
            _ => logical.push(t.to_string()),
        }
    }
    let mut suites: Vec<(Mode, Suite)> = Vec::new();
    for line in logical {
        if line.ends_with("OPRF Mode") && line.starts_with("A.1.") {
            let mode = if line.contains("VOPRF") {
                Mode::Voprf
            } else {
                Mode::Oprf
            };
            suites.push((mode, Suite::default()));
            continue;
        }
        let Some((_, suite)) = suites.last_mut() else {
            continue;
        };
        if line.contains("Test Vector") {
            suite.vectors.push(Vector::default());
            continue;
        }
        let Some((key, value)) = line.split_once(" = ") else {
            continue;
        };
        let values: Vec<Vec<u8>> = value
            .split(',')
            .map(|h| hex::decode(h).expect("hex in the RFC text"))
            .collect();
        match (key, suite.vectors.last_mut()) {
            ("Seed", None) => suite.seed = values[0].clone(),
            ("KeyInfo", None) => suite.key_info = values[0].clone(),
            ("skSm", None) => suite.sk = values[0].clone(),
            ("pkSm", None) => suite.pk = Some(values[0].clone()),
            (_, Some(v)) => v.fields.push((key.to_string(), values)),
            _ => panic!("unexpected line {line}"),
        }
    }
    suites
}

pub(crate) fn scalar(bytes: &[u8]) -> Scalar {
    decode_scalar(bytes.try_into().unwrap()).unwrap()
}

#[test]
fn rfc_text_parses_into_all_vectors() {
    let suites = parse_rfc();
    let counts: Vec<(Mode, usize)> = suites.iter().map(|(m, s)| (*m, s.vectors.len())).collect();
    assert_eq!(counts, [(Mode::Oprf, 2), (Mode::Voprf, 3)]);
    for (_, s) in &suites {
        assert!(!s.seed.is_empty() && !s.sk.is_empty());
    }
}

#[test]
fn rfc_vectors_every_step() {
    let mut checked = 0;
    for (mode, suite) in parse_rfc() {
        // DeriveKeyPair
        let seed: [u8; 32] = suite.seed.as_slice().try_into().unwrap();
        let key = ServerKey::derive(mode, &seed, &suite.key_info).unwrap();
        assert_eq!(
            key.to_bytes().as_slice(),
            suite.sk.as_slice(),
            "{mode:?} skSm"
        );
        if let Some(pk) = &suite.pk {
            assert_eq!(
                &key.public_key().to_bytes()[..],
                pk.as_slice(),
                "{mode:?} pkSm"
            );
        }
        let server = Server::new(mode, key);
        let client = Client::new(mode, *server.public_key());
        for v in &suite.vectors {
            let inputs = v.get("Input");
            // Blind (multiplicative, the RFC's path, with the vector's blinds)
            let blinds: Vec<Scalar> = v.get("Blind").iter().map(|b| scalar(b)).collect();
            let (state, blinded) = client
                .blind_with(inputs, Blinding::Multiplicative, blinds)
                .unwrap();
            let want: Vec<&[u8]> = v.get("BlindedElement").iter().map(Vec::as_slice).collect();
            let got: Vec<&[u8]> = blinded.iter().map(|b| &b.0[..]).collect();
            assert_eq!(got, want, "{mode:?} BlindedElement");
            // BlindEvaluate (with the vector's proof randomness in VOPRF mode)
            let r = v.opt("ProofRandomScalar").map(|r| scalar(&r[0]));
            let evaluation = server
                .blind_evaluate_with(&blinded, r.as_ref(), &|| false)
                .unwrap();
            let want: Vec<&[u8]> = v
                .get("EvaluationElement")
                .iter()
                .map(Vec::as_slice)
                .collect();
            let got: Vec<&[u8]> = evaluation.elements.iter().map(|e| &e.0[..]).collect();
            assert_eq!(got, want, "{mode:?} EvaluationElement");
            let outputs = match mode {
                Mode::Voprf => {
                    let proof = evaluation.proof.unwrap();
                    assert_eq!(&proof.to_bytes()[..], v.get("Proof")[0].as_slice(), "Proof");
                    let parsed = Proof::from_bytes(&v.get("Proof")[0]).unwrap();
                    client
                        .finalize(state, inputs, &evaluation.elements, &parsed)
                        .unwrap()
                }
                Mode::Oprf => {
                    assert!(evaluation.proof.is_none());
                    client
                        .finalize_unverified(state, inputs, &evaluation.elements)
                        .unwrap()
                }
            };
            // Finalize and the one-shot Evaluate
            for ((out, want), input) in outputs.iter().zip(v.get("Output")).zip(inputs) {
                assert_eq!(&out.0[..], want.as_slice(), "{mode:?} Output");
                assert_eq!(
                    &server.evaluate(input).unwrap().0[..],
                    want.as_slice(),
                    "Evaluate"
                );
            }
            // The additive path gives the same outputs.
            let (state, blinded) = client
                .blind(inputs, Blinding::Additive, &mut OsRng)
                .unwrap();
            let evaluation = server.blind_evaluate(&blinded, &mut OsRng).unwrap();
            let outputs = match evaluation.proof {
                Some(p) => client.finalize(state, inputs, &evaluation.elements, &p),
                None => client.finalize_unverified(state, inputs, &evaluation.elements),
            }
            .unwrap();
            for (out, want) in outputs.iter().zip(v.get("Output")) {
                assert_eq!(&out.0[..], want.as_slice(), "{mode:?} additive Output");
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 5);
}

fn voprf_pair() -> (Server, Client) {
    let server = Server::new(Mode::Voprf, ServerKey::generate(&mut OsRng));
    let client = Client::new(Mode::Voprf, *server.public_key());
    (server, client)
}

#[test]
fn tampered_evaluation_or_proof_is_rejected() {
    let (server, client) = voprf_pair();
    let inputs = [b"a".as_slice(), b"b", b"c"];
    let fresh = || {
        client
            .blind(&inputs, Blinding::Additive, &mut OsRng)
            .unwrap()
    };

    // An evaluation under another key, with a valid proof for that key.
    let (state, blinded) = fresh();
    let other = Server::new(Mode::Voprf, ServerKey::generate(&mut OsRng));
    let e = other.blind_evaluate(&blinded, &mut OsRng).unwrap();
    let err = client.finalize(state, &inputs, &e.elements, &e.proof.unwrap());
    assert_eq!(err.unwrap_err(), Error::ProofVerification);

    // One element swapped for another valid element.
    let (state, blinded) = fresh();
    let mut e = server.blind_evaluate(&blinded, &mut OsRng).unwrap();
    e.elements.swap(0, 1);
    let err = client.finalize(state, &inputs, &e.elements, &e.proof.unwrap());
    assert_eq!(err.unwrap_err(), Error::ProofVerification);

    // A proof with one bit flipped (still canonical).
    let (state, blinded) = fresh();
    let e = server.blind_evaluate(&blinded, &mut OsRng).unwrap();
    let mut bytes = e.proof.unwrap().to_bytes();
    bytes[40] ^= 1;
    let proof = Proof::from_bytes(&bytes).unwrap();
    let err = client.finalize(state, &inputs, &e.elements, &proof);
    assert_eq!(err.unwrap_err(), Error::ProofVerification);

    // A proof for another batch.
    let (state, blinded) = fresh();
    let e = server.blind_evaluate(&blinded, &mut OsRng).unwrap();
    let (_, blinded2) = fresh();
    let e2 = server.blind_evaluate(&blinded2, &mut OsRng).unwrap();
    let err = client.finalize(state, &inputs, &e.elements, &e2.proof.unwrap());
    assert_eq!(err.unwrap_err(), Error::ProofVerification);
}

#[test]
fn server_rejects_bad_elements_with_their_index() {
    let (server, _) = voprf_pair();
    let good =
        BlindedElement(curve25519_dalek::constants::RISTRETTO_BASEPOINT_COMPRESSED.to_bytes());
    let batch = [good, good, BlindedElement([0; 32])];
    assert_eq!(
        server.blind_evaluate(&batch, &mut OsRng).unwrap_err(),
        Error::IdentityPoint { index: 2 }
    );
    let batch = [good, BlindedElement([0xff; 32])];
    assert_eq!(
        server.blind_evaluate(&batch, &mut OsRng).unwrap_err(),
        Error::InvalidPoint { index: 1 }
    );
    assert_eq!(
        server.blind_evaluate(&[], &mut OsRng).unwrap_err(),
        Error::EmptyBatch
    );
    let too_many = vec![good; crate::proof::MAX_PROOF_BATCH + 1];
    assert!(matches!(
        server.blind_evaluate(&too_many, &mut OsRng),
        Err(Error::BatchTooLarge { .. })
    ));
}

#[test]
fn moving_a_key_moves_no_scalar() {
    // The scalars live behind one pointer, zeroized on drop: a move (into a
    // `Server`, a snapshot, an `Arc`) copies the pointer, never the secret.
    assert_eq!(
        std::mem::size_of::<ServerKey>(),
        std::mem::size_of::<usize>() + std::mem::size_of::<crate::PublicKey>()
    );
}

#[test]
fn a_stopped_evaluation_gives_up_between_chunks() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (server, _) = voprf_pair();
    let good =
        BlindedElement(curve25519_dalek::constants::RISTRETTO_BASEPOINT_COMPRESSED.to_bytes());
    let batch = vec![good; 4096];
    assert_eq!(
        server
            .blind_evaluate_until(&batch, &mut OsRng, &|| true)
            .unwrap_err(),
        Error::Cancelled
    );
    // Asked once per chunk and once before the proof; stopping after the
    // first answer leaves the rest of the batch undone.
    let asked = AtomicUsize::new(0);
    let stop = || asked.fetch_add(1, Ordering::SeqCst) >= 1;
    assert_eq!(
        server
            .blind_evaluate_until(&batch, &mut OsRng, &stop)
            .unwrap_err(),
        Error::Cancelled
    );
    let asked = AtomicUsize::new(0);
    let count = || {
        asked.fetch_add(1, Ordering::SeqCst);
        false
    };
    let done = server
        .blind_evaluate_until(&batch, &mut OsRng, &count)
        .unwrap();
    assert_eq!(done.elements.len(), 4096);
    assert_eq!(asked.load(Ordering::SeqCst), 4096 / 256 + 1);
}

#[test]
fn client_rejects_mismatched_answers() {
    let (server, client) = voprf_pair();
    let inputs = [b"x".as_slice(), b"y"];
    let (state, blinded) = client
        .blind(&inputs, Blinding::Additive, &mut OsRng)
        .unwrap();
    let e = server.blind_evaluate(&blinded, &mut OsRng).unwrap();
    let err = client.finalize(state, &inputs, &e.elements[..1], &e.proof.unwrap());
    assert!(matches!(err, Err(Error::LengthMismatch { .. })));

    let (state, _) = client
        .blind(&inputs, Blinding::Additive, &mut OsRng)
        .unwrap();
    let identity = [EvaluatedElement([0; 32]); 2];
    let err = client.finalize_unverified(state, &inputs, &identity);
    assert_eq!(err.unwrap_err(), Error::IdentityPoint { index: 0 });

    let (_, other) = voprf_pair();
    let (state, blinded) = other
        .blind(&inputs, Blinding::Additive, &mut OsRng)
        .unwrap();
    let e = server.blind_evaluate(&blinded, &mut OsRng).unwrap();
    assert_eq!(
        client
            .finalize_unverified(state, &inputs, &e.elements)
            .unwrap_err(),
        Error::KeyMismatch
    );
}

#[test]
fn outputs_agree_with_the_voprf_crate() {
    use voprf::{Ristretto255, VoprfClient, VoprfServer};
    let (server, client) = voprf_pair();
    let theirs = VoprfServer::<Ristretto255>::new_with_key(&server.key().to_bytes()[..]).unwrap();
    let inputs: Vec<Vec<u8>> = (0u8..20).map(|i| vec![i; usize::from(i) * 7]).collect();
    for input in &inputs {
        assert_eq!(
            &theirs.evaluate(input).unwrap()[..],
            &server.evaluate(input).unwrap().0[..]
        );
    }
    // Their client, our server and proof.
    let blinds: Vec<_> = inputs
        .iter()
        .map(|x| VoprfClient::<Ristretto255>::blind(x, &mut OsRng).unwrap())
        .collect();
    let blinded: Vec<BlindedElement> = blinds
        .iter()
        .map(|b| BlindedElement::from_slice(&b.message.serialize(), 0).unwrap())
        .collect();
    let ours = server.blind_evaluate(&blinded, &mut OsRng).unwrap();
    let messages: Vec<_> = ours
        .elements
        .iter()
        .map(|e| voprf::EvaluationElement::<Ristretto255>::deserialize(&e.0).unwrap())
        .collect();
    let proof = voprf::Proof::<Ristretto255>::deserialize(&ours.proof.unwrap().to_bytes()).unwrap();
    let states: Vec<_> = blinds.iter().map(|b| b.state.clone()).collect();
    let outs: Vec<_> =
        VoprfClient::batch_finalize(&inputs, &states, &messages, &proof, theirs.get_public_key())
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
    // Our client, their server and proof.
    let (state, blinded) = client
        .blind(&inputs, Blinding::Additive, &mut OsRng)
        .unwrap();
    let their_blinded: Vec<_> = blinded
        .iter()
        .map(|b| voprf::BlindedElement::<Ristretto255>::deserialize(&b.0).unwrap())
        .collect();
    let result = theirs
        .batch_blind_evaluate(&mut OsRng, &their_blinded)
        .unwrap();
    let evaluated: Vec<EvaluatedElement> = result
        .messages
        .iter()
        .map(|m| EvaluatedElement::from_slice(&m.serialize(), 0).unwrap())
        .collect();
    let their_proof = Proof::from_bytes(&result.proof.serialize()).unwrap();
    let mine = client
        .finalize(state, &inputs, &evaluated, &their_proof)
        .unwrap();
    for ((a, b), x) in outs.iter().zip(&mine).zip(&inputs) {
        assert_eq!(&a[..], &b.0[..]);
        assert_eq!(b, &server.evaluate(x).unwrap());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn both_blinding_paths_equal_evaluate(inputs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..80), 1..12)) {
        let (server, client) = voprf_pair();
        for blinding in [Blinding::Additive, Blinding::Multiplicative] {
            let (state, blinded) = client.blind(&inputs, blinding, &mut OsRng).unwrap();
            let e = server.blind_evaluate(&blinded, &mut OsRng).unwrap();
            let outs = client.finalize(state, &inputs, &e.elements, &e.proof.unwrap()).unwrap();
            for (o, x) in outs.iter().zip(&inputs) {
                prop_assert_eq!(o, &server.evaluate(x).unwrap());
            }
        }
    }

    #[test]
    fn server_never_panics_on_arbitrary_elements(raw in proptest::collection::vec(any::<[u8; 32]>(), 1..8)) {
        let (server, _) = voprf_pair();
        let batch: Vec<BlindedElement> = raw.into_iter().map(BlindedElement).collect();
        let _ = server.blind_evaluate(&batch, &mut OsRng);
    }
}
