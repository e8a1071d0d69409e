//! Per-element costs of the protocol steps on one core, beside the `voprf`
//! crate and the bare scalar multiplication (the floor).
//!
//! `cargo bench --bench protocol`; per-element time = reported time / batch.

// The benchmark harness: a run that cannot proceed stops with the reason.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use curve25519_dalek::ristretto::RistrettoPoint;
use curve25519_dalek::scalar::Scalar;
use psi_bench::{encoded_records, raw_pairs, single_thread_pool, TODAY};
use psi_core::record::Record;
use psi_core::suite::hash_to_group;
use psi_core::{Blinding, Client, Mode, Server, ServerKey, Tag, TagSet};
use rand_core::{OsRng, RngCore};
use std::hint::black_box;
use std::time::Duration;

const BATCHES: [usize; 2] = [1, 1000];

fn setup() -> (Server, Client) {
    let server = Server::new(Mode::Voprf, ServerKey::generate(&mut OsRng));
    let client = Client::new(Mode::Voprf, *server.public_key());
    (server, client)
}

fn primitives(c: &mut Criterion) {
    let mut g = c.benchmark_group("floor");
    let k = Scalar::from_bytes_mod_order_wide(&psi_bench::wide_random());
    let p = RistrettoPoint::from_uniform_bytes(&psi_bench::wide_random());
    let compressed = p.compress();
    g.bench_function("variable_base_scalar_mul", |b| {
        b.iter(|| black_box(k) * black_box(p))
    });
    g.bench_function("fixed_base_scalar_mul_table", |b| {
        let table = curve25519_dalek::ristretto::RistrettoBasepointTable::create(&p);
        b.iter(|| &table * &black_box(k))
    });
    g.bench_function("hash_to_group", |b| {
        b.iter(|| {
            hash_to_group(
                Mode::Voprf,
                black_box(b"0123456789012345678901234567890123456789"),
            )
        })
    });
    g.bench_function("compress", |b| b.iter(|| black_box(p).compress()));
    g.bench_function("decompress", |b| {
        b.iter(|| black_box(compressed).decompress())
    });
    g.finish();
}

fn client_steps(c: &mut Criterion) {
    let pool = single_thread_pool();
    let (server, client) = setup();
    let mut g = c.benchmark_group("client");
    for n in BATCHES {
        let inputs = encoded_records(n);
        g.throughput(Throughput::Elements(n as u64));
        for blinding in [Blinding::Additive, Blinding::Multiplicative] {
            g.bench_with_input(
                BenchmarkId::new(format!("blind_{blinding:?}"), n),
                &inputs,
                |b, inputs| {
                    pool.install(|| {
                        b.iter(|| {
                            client
                                .blind(inputs, blinding, &mut OsRng)
                                .map(|x| x.1.len())
                        })
                    })
                },
            );
            let prepare = || {
                let (state, blinded) = client.blind(&inputs, blinding, &mut OsRng).unwrap();
                let e = server.blind_evaluate(&blinded, &mut OsRng).unwrap();
                (state, e)
            };
            g.bench_function(
                BenchmarkId::new(format!("finalize_verified_{blinding:?}"), n),
                |b| {
                    pool.install(|| {
                        b.iter_batched(
                            prepare,
                            |(state, e)| {
                                client.finalize(state, &inputs, &e.elements, &e.proof.unwrap())
                            },
                            BatchSize::PerIteration,
                        )
                    })
                },
            );
            g.bench_function(
                BenchmarkId::new(format!("finalize_unverified_{blinding:?}"), n),
                |b| {
                    pool.install(|| {
                        b.iter_batched(
                            prepare,
                            |(state, e)| client.finalize_unverified(state, &inputs, &e.elements),
                            BatchSize::PerIteration,
                        )
                    })
                },
            );
        }
    }
    g.finish();
}

fn server_steps(c: &mut Criterion) {
    let pool = single_thread_pool();
    let (server, client) = setup();
    let mut g = c.benchmark_group("server");
    for n in BATCHES {
        let inputs = encoded_records(n);
        let (_, blinded) = client
            .blind(&inputs, Blinding::Additive, &mut OsRng)
            .unwrap();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(
            BenchmarkId::new("blind_evaluate_with_proof", n),
            &blinded,
            |b, x| pool.install(|| b.iter(|| server.blind_evaluate(x, &mut OsRng).unwrap())),
        );
        g.bench_with_input(
            BenchmarkId::new("blind_evaluate_without_proof", n),
            &blinded,
            |b, x| pool.install(|| b.iter(|| server.blind_evaluate_without_proof(x).unwrap())),
        );
    }
    // Both cores, for the scaling figure.
    let inputs = encoded_records(1000);
    let (_, blinded) = client
        .blind(&inputs, Blinding::Additive, &mut OsRng)
        .unwrap();
    g.throughput(Throughput::Elements(1000));
    g.bench_with_input(
        BenchmarkId::new("blind_evaluate_with_proof_all_cores", 1000),
        &blinded,
        |b, x| b.iter(|| server.blind_evaluate(x, &mut OsRng).unwrap()),
    );
    g.finish();
}

fn registry_steps(c: &mut Criterion) {
    let pool = single_thread_pool();
    let (server, _) = setup();
    let mut g = c.benchmark_group("registry");
    let raw = raw_pairs(1000);
    g.throughput(Throughput::Elements(1000));
    g.bench_function(BenchmarkId::new("canonicalise", 1000), |b| {
        b.iter(|| {
            raw.iter()
                .filter_map(|(n, i)| Record::parse(n, i, TODAY).ok())
                .map(|r| r.encode().len())
                .sum::<usize>()
        })
    });
    g.bench_function(BenchmarkId::new("record_to_tag", 1000), |b| {
        pool.install(|| {
            b.iter(|| {
                let encoded: Vec<Vec<u8>> = raw
                    .iter()
                    .filter_map(|(n, i)| Record::parse(n, i, TODAY).ok())
                    .map(|r| r.encode())
                    .collect();
                server
                    .evaluate_batch(&encoded)
                    .unwrap()
                    .iter()
                    .map(|o| o.tag().0)
                    .fold(0, u64::wrapping_add)
            })
        })
    });
    for n in [1000usize, 100_000] {
        let tags: Vec<Tag> = (0..n).map(|_| Tag(OsRng.next_u64())).collect();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("tagset_build", n), &tags, |b, t| {
            pool.install(|| b.iter(|| TagSet::build(t, 1, 1).unwrap()))
        });
        let set = TagSet::build(&tags, 1, 1).unwrap();
        let lookup = set.lookup().unwrap();
        let probes: Vec<Tag> = (0..1000)
            .map(|_| Tag(OsRng.next_u64()))
            .chain(tags.iter().take(1000).copied())
            .collect();
        g.throughput(Throughput::Elements(probes.len() as u64));
        g.bench_with_input(
            BenchmarkId::new("tagset_lookup_decoded", n),
            &probes,
            |b, p| b.iter(|| p.iter().filter(|t| lookup.contains(**t)).count()),
        );
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(
            BenchmarkId::new("tagset_contains_one_shard_decode", n),
            &probes,
            |b, p| b.iter(|| set.contains(p[0]).unwrap()),
        );
    }
    g.finish();
}

fn voprf_crate(c: &mut Criterion) {
    use voprf::{BlindedElement, Ristretto255, VoprfClient, VoprfServer};
    let mut g = c.benchmark_group("voprf_crate");
    let server = VoprfServer::<Ristretto255>::new(&mut OsRng).unwrap();
    for n in BATCHES {
        let inputs = encoded_records(n);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("blind", n), &inputs, |b, inputs| {
            b.iter(|| {
                inputs
                    .iter()
                    .map(|x| VoprfClient::<Ristretto255>::blind(x, &mut OsRng).unwrap())
                    .collect::<Vec<_>>()
            })
        });
        let blinds: Vec<_> = inputs
            .iter()
            .map(|x| VoprfClient::<Ristretto255>::blind(x, &mut OsRng).unwrap())
            .collect();
        let messages: Vec<BlindedElement<Ristretto255>> =
            blinds.iter().map(|b| b.message.clone()).collect();
        g.bench_with_input(
            BenchmarkId::new("batch_blind_evaluate_with_proof", n),
            &messages,
            |b, m| b.iter(|| server.batch_blind_evaluate(&mut OsRng, m).unwrap()),
        );
        let result = server.batch_blind_evaluate(&mut OsRng, &messages).unwrap();
        let states: Vec<_> = blinds.iter().map(|b| b.state.clone()).collect();
        g.bench_function(BenchmarkId::new("batch_finalize_verified", n), |b| {
            b.iter(|| {
                VoprfClient::batch_finalize(
                    &inputs,
                    &states,
                    &result.messages,
                    &result.proof,
                    server.get_public_key(),
                )
                .unwrap()
                .count()
            })
        });
    }
    g.finish();
}

/// Threshold mode on one core: a holder's partial evaluation (its share as
/// the key: the single-key cost, per holder), the replica's check of one
/// partial, and the client's verification of `t` partials and combination.
fn threshold_steps(c: &mut Criterion) {
    use psi_core::threshold::{split, verify_partial, Committee, KeyShare, Partial};
    let pool = single_thread_pool();
    let key = ServerKey::generate(&mut OsRng);
    let client = Client::new(Mode::Voprf, *key.public_key());
    let mut g = c.benchmark_group("threshold");
    for (t, n) in [(2u16, 3u16), (3, 5)] {
        let shares = split(&key, t, n, &mut OsRng).unwrap();
        let committee = Committee::new(
            t,
            *key.public_key(),
            shares.iter().map(KeyShare::public_share).collect(),
        )
        .unwrap();
        let holders: Vec<(u16, Server)> = shares
            .iter()
            .take(usize::from(t))
            .map(|s| {
                let copy = KeyShare::from_bytes(s.index(), &s.to_bytes()).unwrap();
                (s.index(), Server::new(Mode::Voprf, copy.into_key()))
            })
            .collect();
        for batch in BATCHES {
            let inputs = encoded_records(batch);
            g.throughput(Throughput::Elements(batch as u64));
            let (_, blinded) = client
                .blind(&inputs, Blinding::Additive, &mut OsRng)
                .unwrap();
            let partials = || -> Vec<Partial> {
                holders
                    .iter()
                    .map(|(i, server)| {
                        let e = server.blind_evaluate(&blinded, &mut OsRng).unwrap();
                        Partial {
                            index: *i,
                            elements: e.elements,
                            proof: e.proof.unwrap(),
                        }
                    })
                    .collect()
            };
            if t == 2 {
                g.bench_function(BenchmarkId::new("holder_partial_evaluate", batch), |b| {
                    pool.install(|| {
                        b.iter(|| holders[0].1.blind_evaluate(&blinded, &mut OsRng).unwrap())
                    })
                });
                let one = partials().remove(0);
                g.bench_function(BenchmarkId::new("replica_verify_partial", batch), |b| {
                    pool.install(|| b.iter(|| verify_partial(&committee, &blinded, &one).unwrap()))
                });
            }
            g.bench_function(
                BenchmarkId::new(format!("client_finalize_{t}_of_{n}"), batch),
                |b| {
                    pool.install(|| {
                        b.iter_batched(
                            || {
                                let (state, blinded) = client
                                    .blind(&inputs, Blinding::Additive, &mut OsRng)
                                    .unwrap();
                                let p = holders
                                    .iter()
                                    .map(|(i, server)| {
                                        let e =
                                            server.blind_evaluate(&blinded, &mut OsRng).unwrap();
                                        Partial {
                                            index: *i,
                                            elements: e.elements,
                                            proof: e.proof.unwrap(),
                                        }
                                    })
                                    .collect::<Vec<_>>();
                                (state, p)
                            },
                            |(state, p)| {
                                client
                                    .finalize_threshold(state, &inputs, &committee, &p)
                                    .unwrap()
                            },
                            BatchSize::PerIteration,
                        )
                    })
                },
            );
        }
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = primitives, server_steps, client_steps, registry_steps, voprf_crate, threshold_steps
}
criterion_main!(benches);
