//! Per-element costs on one core, ours beside the baselines, measured in
//! the same process on the same synthetic records: the scalar
//! multiplication floor, the `voprf` crate's plain per-element path, and an
//! insecure plain-hash lookup (what a verification API does today).

use std::collections::HashSet;
use std::hint::black_box;
use std::time::Instant;

use curve25519_dalek::ristretto::RistrettoPoint;
use curve25519_dalek::scalar::Scalar;
use psi_core::{Blinding, Client, Mode, Server, ServerKey};
use rand_core::OsRng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{encoded_records, single_thread_pool};

/// Microseconds per element, one core, medians over the repeats.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CoreCosts {
    /// Elements per timed batch.
    pub batch: usize,
    /// A bare ristretto255 variable-base scalar multiplication.
    pub floor_us: f64,
    /// Our server: blind evaluation with the batched DLEQ proof.
    pub server_with_proof_us: f64,
    /// Our server: blind evaluation without a proof.
    pub server_without_proof_us: f64,
    /// Our client, additive blinding: blind + verified finalize.
    pub client_additive_verified_us: f64,
    /// Our client, additive blinding, proof not verified.
    pub client_additive_unverified_us: f64,
    /// Our client, multiplicative blinding (RFC 9497): blind + verified finalize.
    pub client_multiplicative_verified_us: f64,
    /// Registry setup: record to tag (server-side full evaluation).
    pub setup_record_to_tag_us: f64,
    /// `voprf` crate: batch blind evaluate with proof.
    pub voprf_server_us: f64,
    /// `voprf` crate: blind + batch finalize (verified).
    pub voprf_client_us: f64,
    /// Plain-hash lookup, setup: SHA-256 of the record, insert in a hash set.
    pub plain_hash_setup_us: f64,
    /// Plain-hash lookup, query: SHA-256 of the record, look it up.
    pub plain_hash_query_us: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Runs `work` `repeats` times (after one warm-up), each over `n` elements,
/// and returns the median microseconds per element. `prepare` builds each
/// run's input outside the timing.
fn per_element<T>(
    repeats: usize,
    n: usize,
    mut prepare: impl FnMut() -> T,
    mut work: impl FnMut(T),
) -> f64 {
    work(prepare());
    let runs = (0..repeats.max(1))
        .map(|_| {
            let input = prepare();
            let t = Instant::now();
            work(input);
            t.elapsed().as_secs_f64() * 1e6 / n as f64
        })
        .collect();
    median(runs)
}

/// Measures every cost over batches of `batch` elements on one core.
///
/// # Panics
/// If a protocol step fails on valid input (a bug).
#[must_use]
pub fn measure(batch: usize, repeats: usize) -> CoreCosts {
    use voprf::{BlindedElement, Ristretto255, VoprfClient, VoprfServer};
    let pool = single_thread_pool();
    pool.install(|| {
        let inputs = encoded_records(batch);
        let n = inputs.len();
        let server = Server::new(Mode::Voprf, ServerKey::generate(&mut OsRng));
        let client = Client::new(Mode::Voprf, *server.public_key());
        let k = Scalar::from_bytes_mod_order_wide(&crate::wide_random());
        let points: Vec<RistrettoPoint> = (0..n)
            .map(|_| RistrettoPoint::from_uniform_bytes(&crate::wide_random()))
            .collect();
        let blinded = || {
            client
                .blind(&inputs, Blinding::Additive, &mut OsRng)
                .unwrap()
                .1
        };
        // The client's own steps, timed apart from the server's evaluation.
        let client_cost = |blinding: Blinding, verify: bool| {
            let runs = (0..=repeats.max(1))
                .map(|_| {
                    let t = Instant::now();
                    let (state, b) = client.blind(&inputs, blinding, &mut OsRng).unwrap();
                    let blind = t.elapsed();
                    let e = server.blind_evaluate(&b, &mut OsRng).unwrap();
                    let t = Instant::now();
                    let out = if verify {
                        client.finalize(state, &inputs, &e.elements, &e.proof.unwrap())
                    } else {
                        client.finalize_unverified(state, &inputs, &e.elements)
                    };
                    black_box(out.unwrap());
                    (blind + t.elapsed()).as_secs_f64() * 1e6 / n as f64
                })
                .skip(1)
                .collect();
            median(runs)
        };
        let server_with_proof_us = per_element(repeats, n, blinded, |b| {
            black_box(server.blind_evaluate(&b, &mut OsRng).unwrap());
        });
        let server_without_proof_us = per_element(repeats, n, blinded, |b| {
            black_box(server.blind_evaluate_without_proof(&b).unwrap());
        });
        let voprf_server = VoprfServer::<Ristretto255>::new(&mut OsRng).unwrap();
        let voprf_messages = || {
            inputs
                .iter()
                .map(|x| {
                    VoprfClient::<Ristretto255>::blind(x, &mut OsRng)
                        .unwrap()
                        .message
                })
                .collect::<Vec<BlindedElement<Ristretto255>>>()
        };
        let voprf_server_us = per_element(repeats, n, voprf_messages, |m| {
            black_box(voprf_server.batch_blind_evaluate(&mut OsRng, &m).unwrap());
        });
        let voprf_client_us = median(
            (0..=repeats.max(1))
                .map(|_| {
                    let t = Instant::now();
                    let blinds: Vec<_> = inputs
                        .iter()
                        .map(|x| VoprfClient::<Ristretto255>::blind(x, &mut OsRng).unwrap())
                        .collect();
                    let blind = t.elapsed();
                    let messages: Vec<_> = blinds.iter().map(|b| b.message.clone()).collect();
                    let states: Vec<_> = blinds.iter().map(|b| b.state.clone()).collect();
                    let result = voprf_server
                        .batch_blind_evaluate(&mut OsRng, &messages)
                        .unwrap();
                    let t = Instant::now();
                    let outputs = VoprfClient::batch_finalize(
                        &inputs,
                        &states,
                        &result.messages,
                        &result.proof,
                        voprf_server.get_public_key(),
                    )
                    .unwrap()
                    .count();
                    black_box(outputs);
                    (blind + t.elapsed()).as_secs_f64() * 1e6 / n as f64
                })
                .skip(1)
                .collect(),
        );
        let hashes = |inputs: &[Vec<u8>]| -> Vec<[u8; 32]> {
            inputs.iter().map(|x| Sha256::digest(x).into()).collect()
        };
        let registry: HashSet<[u8; 32]> = hashes(&inputs).into_iter().collect();
        CoreCosts {
            batch: n,
            floor_us: per_element(
                repeats,
                n,
                || (),
                |()| {
                    for p in &points {
                        black_box(black_box(k) * p);
                    }
                },
            ),
            server_with_proof_us,
            server_without_proof_us,
            client_additive_verified_us: client_cost(Blinding::Additive, true),
            client_additive_unverified_us: client_cost(Blinding::Additive, false),
            client_multiplicative_verified_us: client_cost(Blinding::Multiplicative, true),
            setup_record_to_tag_us: per_element(
                repeats,
                n,
                || (),
                |()| {
                    black_box(server.evaluate_batch(&inputs).unwrap());
                },
            ),
            voprf_server_us,
            voprf_client_us,
            plain_hash_setup_us: per_element(
                repeats,
                n,
                || (),
                |()| {
                    black_box(hashes(&inputs).into_iter().collect::<HashSet<_>>());
                },
            ),
            plain_hash_query_us: per_element(
                repeats,
                n,
                || (),
                |()| {
                    let found = inputs
                        .iter()
                        .filter(|x| registry.contains(&<[u8; 32]>::from(Sha256::digest(x))))
                        .count();
                    black_box(found);
                },
            ),
        }
    })
}
