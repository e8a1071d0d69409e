"""The protocol's primitives: checked against docs/vectors/psi-v1.json (the
vectors the Rust tests check byte for byte), and against each other."""

import json
from pathlib import Path

import pytest

import psi_match

VECTORS = json.loads(
    (Path(__file__).resolve().parents[2] / "docs" / "vectors" / "psi-v1.json").read_text(encoding="utf-8")
)


def key():
    d = VECTORS["derive_key_pair"]
    return psi_match.ServerKey.derive(bytes.fromhex(d["seed"]), bytes.fromhex(d["info"]))


def test_the_derived_key_is_the_vectors_key():
    assert key().public_key.hex() == VECTORS["public_key"]


def test_the_secret_never_shows():
    k = key()
    secret = VECTORS["secret_key"]
    for text in (repr(k), str(k), repr(dir(k))):
        assert secret not in text
    assert not any("secret" in name or "to_bytes" in name for name in dir(k))


@pytest.mark.parametrize("row", VECTORS["rows"], ids=lambda r: r["raw_id"])
def test_each_row_through_every_step(row):
    k = key()
    encoded = psi_match.encode_record(row["raw_name"], row["raw_id"])
    assert encoded.hex() == row["encoding"]
    assert psi_match.bucket(encoded, 10) == row["bucket_at_10_bits"]
    assert psi_match.bucket(encoded, 32) == row["bucket_hash32"]
    assert k.evaluate(encoded).hex() == row["output"]
    assert f"{psi_match.tag(bytes.fromhex(row['output'])):016x}" == row["tag"]
    # Blind, evaluate, finalize with fresh blinds: the same output.
    state, blinded = psi_match.blind(k.public_key, [encoded])
    evaluated, proof = k.blind_evaluate(blinded)
    assert state.finalize(evaluated, proof)[0].hex() == row["output"]


def test_the_vectors_tag_set():
    want = VECTORS["tag_set"]
    tags = [int(r["tag"], 16) for r in VECTORS["rows"]]
    built = psi_match.TagSet(tags[: len(tags)], epoch=want["epoch"], registry_version=want["registry_version"])
    read = psi_match.TagSet.from_bytes(bytes.fromhex(want["bytes"]))
    assert read.root_digest.hex() == want["root_digest"]
    assert [d.hex() for d in read.shard_digests] == want["shard_digests"]
    assert (read.epoch, read.registry_version) == (want["epoch"], want["registry_version"])
    for t in tags:
        assert (t in read) == (t in built)
    if len(read) == len(built):
        assert built.to_bytes().hex() == want["bytes"]


def test_a_tampered_proof_is_an_error():
    k = key()
    inputs = [psi_match.encode_record("张伟", "11010519491231002X"), b"any bytes"]
    state, blinded = psi_match.blind(k.public_key, inputs)
    evaluated, proof = k.blind_evaluate(blinded)
    bad = bytes([proof[0] ^ 1]) + proof[1:]
    with pytest.raises(ValueError):
        state.finalize(evaluated, bad)
    with pytest.raises(ValueError, match="finalized already"):
        state.finalize(evaluated, proof)


def test_another_keys_evaluation_does_not_verify():
    k, other = key(), psi_match.ServerKey.generate()
    state, blinded = psi_match.blind(k.public_key, [b"x"])
    evaluated, proof = other.blind_evaluate(blinded)
    with pytest.raises(ValueError):
        state.finalize(evaluated, proof)


def test_oprf_mode_has_no_proof():
    k = psi_match.ServerKey.generate(mode="oprf")
    state, blinded = psi_match.blind(k.public_key, [b"x", b"y"], mode="oprf")
    evaluated, proof = k.blind_evaluate(blinded)
    assert proof is None
    assert state.finalize(evaluated, None) == [k.evaluate(b"x"), k.evaluate(b"y")]


def test_bad_bytes_are_value_errors():
    k = key()
    with pytest.raises(ValueError):
        k.blind_evaluate([b"\xff" * 32])
    with pytest.raises(ValueError):
        k.blind_evaluate([b"short"])
    with pytest.raises(ValueError):
        psi_match.blind(b"\x00" * 31, [b"x"])
    with pytest.raises(ValueError):
        psi_match.TagSet.from_bytes(b"PSITAGS\x01 not a tag set")
    with pytest.raises(ValueError, match="invalid|check|ID"):
        psi_match.encode_record("张伟", "123")
    with pytest.raises(ValueError):
        psi_match.tag(b"\x00" * 63)
    with pytest.raises(ValueError):
        psi_match.bucket(b"x", 0)


def test_a_tag_set_round_trips_and_answers():
    import random

    rng = random.Random(7)
    tags = [rng.getrandbits(64) for _ in range(20000)]
    ts = psi_match.TagSet(tags, epoch=3, registry_version=9)
    again = psi_match.TagSet.from_bytes(ts.to_bytes())
    assert again.root_digest == ts.root_digest and len(again) == len(tags)
    assert all(t in again for t in tags[:100])
