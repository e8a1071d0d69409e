//! PIR mode's peer input, for both schemes (Spiral, YPIR+SP): a client's
//! public parameters and queries at the server, a server's answer at the
//! client. Each is refused precisely or processed; nothing panics, and a
//! garbled answer is never read as an item.
//!
//! The first byte picks the scheme and the decoder. Inputs of the exact length are rare,
//! so the rest of the input is also stretched (cycled) to the exact length
//! with every word reduced below 2^56, which reaches the scheme itself:
//! about 0.3 s an execution there, so run this target for hours.
#![no_main]
use libfuzzer_sys::fuzz_target;
use psi_pir::ypir::{YpirDatabase, YpirKeys, YpirPirClient, YpirShape};
use psi_pir::{Database, Keys, PirClient, Shape};
use std::sync::OnceLock;

struct World {
    shape: Shape,
    db: Database,
    keys: Keys,
    client: PirClient,
    ypir_shape: YpirShape,
    ypir_db: YpirDatabase,
    ypir_keys: YpirKeys,
    ypir_client: YpirPirClient,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let shape = Shape::for_registry(0, |_| 4).expect("a shape");
        let db = Database::build(shape, 1, |i| vec![(i as u64) << 40]).expect("a database");
        let mut client = PirClient::new(shape, &[1; 32]).expect("a client");
        let keys = Keys::parse(shape, &client.public_parameters()).expect("keys");
        let ypir_shape = YpirShape::for_registry(0, |_| 4).expect("a shape");
        let ypir_db =
            YpirDatabase::build(ypir_shape, 1, |i| vec![(i as u64) << 40]).expect("a database");
        let ypir_client = YpirPirClient::new(ypir_shape, 1, &[1; 32]).expect("a client");
        let ypir_keys =
            YpirKeys::parse(ypir_shape, &ypir_client.public_parameters()).expect("keys");
        World { shape, db, keys, client, ypir_shape, ypir_db, ypir_keys, ypir_client }
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
    match pick % 8 {
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
        4 => {
            let _ = w.ypir_db.answer(&w.ypir_keys, rest);
        }
        5 if !rest.is_empty() => {
            // 7-byte values, the top one cleared (below 2^48 < q).
            let mut q: Vec<u8> = rest.iter().copied().cycle().take(w.ypir_shape.query_bytes()).collect();
            for v in q.chunks_exact_mut(7) {
                v[6] = 0;
            }
            let _ = w.ypir_db.answer(&w.ypir_keys, &q);
        }
        6 => {
            let _ = YpirKeys::parse(w.ypir_shape, rest);
        }
        7 => {
            let _ = w.ypir_client.decode(0, 1, rest);
            let answer: Vec<u8> =
                rest.iter().copied().cycle().take(w.ypir_shape.answer_bytes()).collect();
            if answer.len() == w.ypir_shape.answer_bytes() {
                assert!(w.ypir_client.decode(0, 1, &answer).is_err());
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
