//! `docs/vectors/psi-v1.json`: a fixed key and a few records through every
//! step, for a second implementation to check itself against: canonical
//! encodings, bucket numbers, blinds, blinded and evaluated elements, the
//! batch proof, outputs, tags, tag-set values, and a small tag set's bytes
//! and digests. The test fails when the code and the file part; after an
//! intended change, `PSI_WRITE_VECTORS=1 cargo test -p psi-core vectors`
//! writes the file anew.

use curve25519_dalek::scalar::Scalar;
use sha2::{Digest, Sha512};

use crate::record::{bucket_of_encoding, CivilDate, Record};
use crate::{Blinding, Client, Mode, Server, ServerKey, TagSet};

/// Raw rows as an institution's file may hold them (with the spellings
/// that normalise to the same record), all public specimen numbers.
const ROWS: [(&str, &str); 4] = [
    ("张伟", "11010519491231002X"),
    ("张 伟", "１１０１０５１９４９１２３１００２ｘ"),
    ("阿依古丽.买买提", "360426199101010071"),
    ("王𠮷", "810000199408230021"),
];

fn scalar(label: &str, i: usize) -> Scalar {
    let mut h = Sha512::new();
    h.update(b"psi-match vectors v1 ");
    h.update(label.as_bytes());
    h.update((i as u64).to_be_bytes());
    Scalar::from_bytes_mod_order_wide(&h.finalize().into())
}

fn generate() -> String {
    let today = CivilDate {
        year: 2026,
        month: 11,
        day: 23,
    };
    let seed = [0x5a_u8; 32];
    let info = b"psi-match vectors v1";
    let key = ServerKey::derive(Mode::Voprf, &seed, info).unwrap();
    let public = *key.public_key();
    let server = Server::new(Mode::Voprf, key);
    let client = Client::new(Mode::Voprf, public);
    let records: Vec<Record> = ROWS
        .iter()
        .map(|(n, id)| Record::parse(n, id, today).unwrap())
        .collect();
    let inputs: Vec<Vec<u8>> = records.iter().map(Record::encode).collect();
    let blinds: Vec<Scalar> = (0..inputs.len()).map(|i| scalar("blind", i)).collect();
    let (state, blinded) = client
        .blind_with(&inputs, Blinding::Multiplicative, blinds.clone())
        .unwrap();
    let r = scalar("proof", 0);
    let evaluation = server
        .blind_evaluate_with(&blinded, Some(&r), &|| false)
        .unwrap();
    let proof = evaluation.proof.unwrap();
    let outputs = client
        .finalize(state, &inputs, &evaluation.elements, &proof)
        .unwrap();
    let tags: Vec<crate::Tag> = outputs.iter().map(crate::Output::tag).collect();
    // The registry holds each record once.
    let mut distinct = tags.clone();
    distinct.sort_unstable_by_key(|t| t.0);
    distinct.dedup();
    let set = TagSet::build(&distinct, 1, 1).unwrap();
    let params = set.header().params;
    let rows: Vec<serde_json::Value> = ROWS
        .iter()
        .enumerate()
        .map(|(i, (name, id))| {
            serde_json::json!({
                "raw_name": name,
                "raw_id": id,
                "canonical_name": records[i].name(),
                "canonical_id": records[i].id().as_str(),
                "encoding": hex::encode(&inputs[i]),
                "bucket_hash32": bucket_of_encoding(&inputs[i], 32),
                "bucket_at_10_bits": bucket_of_encoding(&inputs[i], 10),
                "blind": hex::encode(blinds[i].to_bytes()),
                "blinded_element": hex::encode(blinded[i].0),
                "evaluated_element": hex::encode(evaluation.elements[i].0),
                "output": hex::encode(outputs[i].0),
                "tag": format!("{:016x}", tags[i].0),
                "tag_set_value": format!("{:x}", params.value(tags[i])),
            })
        })
        .collect();
    let doc = serde_json::json!({
        "about": "psi-match wire vectors v1: RFC 9497 VOPRF, ristretto255-SHA512, multiplicative blinding; all hex, numbers decimal; records are public specimen numbers with synthetic names; `today` is the date ID numbers are validated against (a birth date after it is refused)",
        "today": format!("{:04}-{:02}-{:02}", today.year, today.month, today.day),
        "suite": crate::suite::SUITE_ID,
        "derive_key_pair": {"seed": hex::encode(seed), "info": hex::encode(info)},
        "secret_key": hex::encode(*server.key().to_bytes()),
        "public_key": hex::encode(public.to_bytes()),
        "proof_random_scalar": hex::encode(r.to_bytes()),
        "rows": rows,
        "batch_proof": hex::encode(proof.to_bytes()),
        "tag_set": {
            "epoch": 1,
            "registry_version": 1,
            "tag_bits": params.tag_bits,
            "shard_bits": params.shard_bits,
            "rice_bits": params.rice_bits,
            "bytes": hex::encode(set.to_bytes()),
            "shard_digests": set.shards().iter().map(|s| hex::encode(s.digest())).collect::<Vec<_>>(),
            "root_digest": hex::encode(set.root_digest()),
        },
    });
    serde_json::to_string_pretty(&doc).unwrap() + "\n"
}

#[test]
fn the_published_vectors_match_the_code() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/vectors/psi-v1.json"
    );
    let json = generate();
    if std::env::var_os("PSI_WRITE_VECTORS").is_some() {
        std::fs::write(path, &json).unwrap();
    }
    let published = std::fs::read_to_string(path).expect(
        "docs/vectors/psi-v1.json is missing: PSI_WRITE_VECTORS=1 cargo test -p psi-core vectors",
    );
    assert!(
        published == json,
        "the code no longer produces docs/vectors/psi-v1.json; if the change is intended, rerun with PSI_WRITE_VECTORS=1 and say so in docs/PROTOCOL.md"
    );
    // The raw spellings of one person normalise to one record.
    let doc: serde_json::Value = serde_json::from_str(&published).unwrap();
    // The validation date is a field, not only prose.
    assert_eq!(doc["today"], "2026-11-23");
    assert_eq!(doc["rows"][0]["encoding"], doc["rows"][1]["encoding"]);
    assert_eq!(doc["rows"][0]["tag"], doc["rows"][1]["tag"]);
}
