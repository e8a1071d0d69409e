//! The scheme end to end on small databases.

use crate::{item, Database, Error, Keys, PirClient, Shape};

fn tags_of(i: usize) -> Vec<u64> {
    // A few synthetic tags per item; item 7 is empty.
    if i == 7 {
        return Vec::new();
    }
    (0..(i % 5 + 1) as u64)
        .map(|k| (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (k << 60))
        .collect()
}

fn small() -> Shape {
    Shape::for_registry(0, |_| 5).expect("shape")
}

#[test]
fn answers_hold_the_item_asked_and_nothing_is_lost() {
    let shape = small();
    let db = Database::build(shape, 3, tags_of).expect("build");
    assert_eq!(db.bytes(), shape.database_bytes());
    let mut client = PirClient::new(shape, &[7; 32]).expect("client");
    let keys = Keys::parse(shape, &client.public_parameters()).expect("keys");
    for bucket in [0u32, 1, 7, 200, 511] {
        let query = client.query(bucket).expect("query");
        assert_eq!(query.len(), shape.query_bytes());
        let answer = db.answer(&keys, &query).expect("answer");
        assert_eq!(answer.len(), shape.answer_bytes());
        let fps = client.decode(bucket, 3, &answer).expect("decode");
        let want = tags_of(bucket as usize);
        assert_eq!(fps.len(), want.len(), "bucket {bucket}");
        for t in want {
            assert!(client.contains(&fps, t));
        }
        assert!(!client.contains(&fps, 0x0123_4567_89ab_cdef));
        // spiral-rs's own evaluation (the benchmarks' baseline) answers
        // the same item.
        let theirs = db.answer_by_spiral_rs(&keys, &query).expect("answer");
        assert_eq!(client.decode(bucket, 3, &theirs).expect("decode"), fps);
    }
}

#[test]
fn a_client_restored_from_its_seed_reads_answers_to_keys_uploaded_before() {
    let shape = small();
    let db = Database::build(shape, 1, tags_of).expect("build");
    let keys = Keys::parse(
        shape,
        &PirClient::new(shape, &[9; 32])
            .expect("c")
            .public_parameters(),
    )
    .expect("keys");
    let later = PirClient::new(shape, &[9; 32]).expect("c");
    let answer = db.answer(&keys, &later.query(3).expect("q")).expect("a");
    assert!(later.decode(3, 1, &answer).is_ok());
    // Another seed cannot read it: an error, not an empty bucket.
    let other = PirClient::new(shape, &[10; 32]).expect("c");
    assert_eq!(other.decode(3, 1, &answer), Err(Error::Integrity));
}

#[test]
fn a_patch_changes_only_the_items_given() {
    let shape = small();
    let db = Database::build(shape, 1, tags_of).expect("build");
    let extra = 0xfeed_0000_0000_0000u64;
    let changed = db
        .patch(&[7], |i| {
            let mut t = tags_of(i);
            t.push(extra);
            t
        })
        .expect("patch");
    let mut client = PirClient::new(shape, &[1; 32]).expect("c");
    let keys = Keys::parse(shape, &client.public_parameters()).expect("keys");
    let ask = |db: &Database, bucket: u32| {
        let a = db
            .answer(&keys, &client.query(bucket).expect("q"))
            .expect("a");
        client.decode(bucket, 1, &a).expect("decode")
    };
    assert!(client.contains(&ask(&changed, 7), extra));
    assert!(!client.contains(&ask(&db, 7), extra));
    assert_eq!(ask(&changed, 8).len(), tags_of(8).len());
    assert!(matches!(
        db.patch(&[512], tags_of),
        Err(Error::Item { index: 512, .. })
    ));
}

#[test]
fn malformed_queries_and_keys_are_refused() {
    let shape = small();
    let db = Database::build(shape, 1, tags_of).expect("build");
    let mut client = PirClient::new(shape, &[2; 32]).expect("c");
    let pp = client.public_parameters();
    let keys = Keys::parse(shape, &pp).expect("keys");
    let query = client.query(1).expect("q");
    assert!(matches!(
        db.answer(&keys, &query[..100]),
        Err(Error::Length {
            what: "PIR query",
            ..
        })
    ));
    let mut bad = query.clone();
    bad[40..48].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        db.answer(&keys, &bad),
        Err(Error::Coefficient { index: 1, .. })
    ));
    assert!(matches!(
        Keys::parse(shape, &pp[1..]),
        Err(Error::Length { .. })
    ));
    let mut bad = pp.clone();
    let end = bad.len();
    bad[end - 8..].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        Keys::parse(shape, &bad),
        Err(Error::Coefficient { .. })
    ));
    // Keys for other dimensions.
    let wide = Shape {
        nu2: shape.nu2 + 1,
        ..shape
    };
    let other = Keys::parse(
        wide,
        &PirClient::new(wide, &[2; 32])
            .expect("c")
            .public_parameters(),
    )
    .expect("keys");
    assert!(matches!(db.answer(&other, &query), Err(Error::Shape(_))));
}

#[test]
fn a_tampered_answer_is_an_error_never_an_empty_item() {
    let shape = small();
    let db = Database::build(shape, 1, tags_of).expect("build");
    let mut client = PirClient::new(shape, &[3; 32]).expect("c");
    let keys = Keys::parse(shape, &client.public_parameters()).expect("keys");
    let answer = db.answer(&keys, &client.query(2).expect("q")).expect("a");
    let right = client.decode(2, 1, &answer).expect("decode");
    // Small changes may be absorbed by the noise margin (then the item is
    // still right); anything else is an error. Never another item's content.
    for at in (0..answer.len() - 64).step_by(997) {
        let mut bad = answer.clone();
        for b in &mut bad[at..at + 64] {
            *b ^= 0xa5;
        }
        match client.decode(2, 1, &bad) {
            Ok(fps) => assert_eq!(fps, right, "bytes {at}.."),
            Err(e) => assert_eq!(e, Error::Integrity),
        }
    }
    let mut scrambled = answer.clone();
    for (i, b) in scrambled.iter_mut().enumerate() {
        *b = b.wrapping_mul(31).wrapping_add(i as u8);
    }
    assert_eq!(client.decode(2, 1, &scrambled), Err(Error::Integrity));
    assert_eq!(
        client.decode(2, 1, &vec![0; answer.len()]),
        Err(Error::Integrity)
    );
    assert!(matches!(
        client.decode(2, 1, &answer[1..]),
        Err(Error::Length { .. })
    ));
    // The answer for another item, or another epoch, does not pass either.
    assert_eq!(client.decode(3, 1, &answer), Err(Error::Integrity));
    assert_eq!(client.decode(2, 2, &answer), Err(Error::Integrity));
}

#[test]
fn an_item_that_overflows_fails_the_build() {
    let shape = small();
    let cap = shape.capacity();
    let err = Database::build(shape, 1, |i| {
        if i == 4 {
            (0..=cap as u64).map(|k| k << 30).collect()
        } else {
            Vec::new()
        }
    })
    .expect_err("overflow");
    assert!(matches!(err, Error::Overflow { index: 4, .. }), "{err}");
}

/// Known answer: an item's coding is fixed (docs/vectors/pir-item.json).
#[test]
fn item_coding_known_answer() {
    use sha2::{Digest, Sha256};
    let item =
        item::encode(&[0x8000_0000_0000_0000, 0x0123_4567_89ab_cdef], 5, 1, 8192).expect("encode");
    assert_eq!(hex(&item[..20]), ITEM_HEAD);
    assert_eq!(hex(&Sha256::digest(&item)), ITEM_DIGEST);
    // The published vector says the same.
    let published = include_str!("../../../docs/vectors/pir-item.json");
    assert!(published.contains(ITEM_HEAD) && published.contains(ITEM_DIGEST));
}

const ITEM_HEAD: &str = "00000002061c02fdc3f78a1f0123456789b00000";
const ITEM_DIGEST: &str = "7bf0572f89f6910193ded9901da4256b79cc14306bcd780572c91b88852efef7";

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

mod arbitrary_bytes {
    use super::*;
    use proptest::prelude::*;
    use std::sync::OnceLock;

    fn world() -> &'static (Shape, Database, Keys, PirClient) {
        static W: OnceLock<(Shape, Database, Keys, PirClient)> = OnceLock::new();
        W.get_or_init(|| {
            let shape = small();
            let db = Database::build(shape, 1, tags_of).expect("build");
            let mut client = PirClient::new(shape, &[4; 32]).expect("c");
            let keys = Keys::parse(shape, &client.public_parameters()).expect("keys");
            (shape, db, keys, client)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]

        /// Queries of any bytes are refused before the scheme sees them
        /// (random words are out of range w.h.p.), never a panic.
        #[test]
        fn queries_of_arbitrary_bytes_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..20_000), exact in any::<bool>()) {
            let (shape, db, keys, _) = world();
            let q: Vec<u8> = if exact {
                bytes.iter().copied().chain(std::iter::repeat(0xff)).take(shape.query_bytes()).collect()
            } else {
                bytes
            };
            prop_assert!(db.answer(keys, &q).is_err());
        }

        /// Answers of any bytes are an error, never an item.
        #[test]
        fn answers_of_arbitrary_bytes_are_errors(seed in any::<u64>(), bucket in 0u32..512) {
            let (shape, _, _, client) = world();
            let mut x = seed | 1;
            let answer: Vec<u8> = (0..shape.answer_bytes())
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            prop_assert_eq!(client.decode(bucket, 1, &answer), Err(Error::Integrity));
        }
    }
}

/// What the server holds per client (sizes the keys cache): the 10^7
/// shape and the widest.
#[test]
fn public_parameters_in_memory_stay_under_32_mib() {
    for nu2 in [2u8, 4, 6] {
        let shape = Shape { nu2, ..small() };
        let mut client = PirClient::new(shape, &[6; 32]).expect("c");
        let upload = client.public_parameters();
        let keys = Keys::parse(shape, &upload).expect("keys");
        println!(
            "nu2 {nu2}: upload {} B, held {} B",
            upload.len(),
            keys.memory_bytes()
        );
        assert!(keys.memory_bytes() < 32 << 20, "{}", keys.memory_bytes());
        assert!(upload.len() <= 16 << 20);
    }
}
