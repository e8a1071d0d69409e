//! PIR mode's peer input: a client's public parameters and queries at the
//! server, a server's answer at the client. Each is refused precisely or
//! processed; nothing panics, and a garbled answer is never read as an item.
//!
//! The first byte picks the decoder. Inputs of the exact length are rare,
//! so the rest of the input is also stretched (cycled) to the exact length
//! with every word reduced below 2^56, which reaches the scheme itself:
//! about 0.3 s an execution there, so run this target for hours.
#![no_main]
use libfuzzer_sys::fuzz_target;
use psi_pir::{Database, Keys, PirClient, Shape};
use std::sync::OnceLock;

struct World {
    shape: Shape,
    db: Database,
    keys: Keys,
    client: PirClient,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let shape = Shape::for_registry(0, |_| 4).expect("a shape");
        let db = Database::build(shape, 1, |i| vec![(i as u64) << 40]).expect("a database");
        let mut client = PirClient::new(shape, &[1; 32]).expect("a client");
        let keys = Keys::parse(shape, &client.public_parameters()).expect("keys");
        World { shape, db, keys, client }
    })
}

fn stretched(data: &[u8], len: usize) -> Vec<u8> {
    let mut out: Vec<u8> = data.iter().copied().cycle().take(len).collect();
    out.resize(len, 0);
    for w in out.get_mut(32..).unwrap_or_default().chunks_exact_mut(8) {
        w[7] = 0;
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else { return };
    let w = world();
    match pick % 4 {
        0 => {
            let _ = w.db.answer(&w.keys, rest);
        }
        1 if !rest.is_empty() => {
            let q = stretched(rest, w.shape.query_bytes());
            let _ = w.db.answer(&w.keys, &q);
        }
        2 => {
            let _ = Keys::parse(w.shape, rest);
            if !rest.is_empty() {
                let _ = Keys::parse(w.shape, &stretched(rest, w.shape.keys_bytes()));
            }
        }
        _ => {
            let _ = w.client.decode(0, 1, rest);
            let answer: Vec<u8> = rest.iter().copied().cycle().take(w.shape.answer_bytes()).collect();
            if answer.len() == w.shape.answer_bytes() {
                // Arbitrary bytes never decode to an item (a 2^-64 chance).
                assert!(w.client.decode(0, 1, &answer).is_err());
            }
        }
    }
});
