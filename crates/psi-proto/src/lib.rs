//! The gRPC contract of `proto/psi/v1/psi.proto` (package `psi.v1`), generated
//! at build time, and conversions between its packed byte fields and
//! `psi-core` types.

pub mod codec;

pub mod v1 {
    //! Generated messages, client and server of package `psi.v1`.
    #![allow(
        missing_docs,
        clippy::all,
        clippy::pedantic,
        missing_debug_implementations
    )]
    tonic::include_proto!("psi.v1");
}

use psi_core::suite::ELEMENT_LEN;
use psi_core::tagset::{Shard, TagSetHeader, TagSetParams};
use psi_core::threshold::{Committee, Partial, PublicShare};
use psi_core::{BlindedElement, Error, EvaluatedElement, Proof, PublicKey};

/// The encoded `FileDescriptorSet` of `psi.v1`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/psi_v1_descriptor.bin"));

/// gRPC metadata key carrying a request's declared purpose code.
pub const PURPOSE_HEADER: &str = "x-psi-purpose";

/// Whether `code` is a well-formed purpose code (the `x-psi-purpose`
/// header's value): 1 to 32 of `a-z 0-9 _ -`.
#[must_use]
pub fn is_valid_purpose(code: &str) -> bool {
    (1..=32).contains(&code.len())
        && code
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'))
}

/// gRPC metadata key of the retry delay, in milliseconds, on `RESOURCE_EXHAUSTED`.
pub const RETRY_AFTER_MS: &str = "retry-after-ms";

/// Metadata of a `PirQuery` refusal whose cure is a new `PirSetup`: the
/// server does not hold the named public parameters (never registered,
/// evicted, a restart, or made for other dimensions). Value: `unknown`.
pub const PIR_KEYS_HEADER: &str = "x-psi-pir-keys";

/// Metadata of a `PirQuery` refusal whose cure is reading `ServerInfo`
/// again: the server's PIR shape changed (an update) since the one the
/// request's `shape_id` names. Value: `changed`.
pub const PIR_SHAPE_HEADER: &str = "x-psi-pir-shape";

/// Request metadata: the institution's commitment to the entries of its
/// own query log that the request answers (`psi_core::commitment`; 64 hex
/// digits), kept in the operator's audit record.
pub const LOG_COMMITMENT_HEADER: &str = "x-psi-log-commitment";

/// Response metadata of every answer and refusal of the `Match` service:
/// the request's id, the one its audit record holds, so that an
/// institution and the operator can speak of one request.
pub const REQUEST_ID_HEADER: &str = "x-psi-request-id";

/// The service name, for health checks.
pub const SERVICE_NAME: &str = "psi.v1.Match";

fn malformed(what: &'static str, reason: &'static str) -> Error {
    Error::Malformed { what, reason }
}

/// Packs 32-byte elements back to back.
pub fn pack<'a, I: IntoIterator<Item = &'a [u8; ELEMENT_LEN]>>(elements: I) -> Vec<u8> {
    elements.into_iter().flatten().copied().collect()
}

fn unpack<T>(bytes: &[u8], make: fn([u8; ELEMENT_LEN]) -> T) -> Result<Vec<T>, Error> {
    let chunks = bytes.chunks_exact(ELEMENT_LEN);
    if !chunks.remainder().is_empty() {
        return Err(malformed(
            "packed elements",
            "length is not a multiple of 32 bytes",
        ));
    }
    chunks
        .map(|c| {
            <[u8; ELEMENT_LEN]>::try_from(c)
                .map(make)
                .map_err(|_| malformed("packed elements", "short element"))
        })
        .collect()
}

/// Reads packed blinded elements (their encodings are checked by the server step).
///
/// # Errors
/// [`Error::Malformed`] if the length is not a multiple of 32.
pub fn unpack_blinded(bytes: &[u8]) -> Result<Vec<BlindedElement>, Error> {
    unpack(bytes, BlindedElement)
}

/// Reads packed evaluated elements.
///
/// # Errors
/// [`Error::Malformed`] if the length is not a multiple of 32.
pub fn unpack_evaluated(bytes: &[u8]) -> Result<Vec<EvaluatedElement>, Error> {
    unpack(bytes, EvaluatedElement)
}

/// Packs tags as 8-byte big-endian integers.
#[must_use]
pub fn pack_tags(tags: &[u64]) -> Vec<u8> {
    tags.iter().flat_map(|t| t.to_be_bytes()).collect()
}

/// Reads packed tags.
///
/// # Errors
/// [`Error::Malformed`] if the length is not a multiple of 8.
pub fn unpack_tags(bytes: &[u8]) -> Result<Vec<u64>, Error> {
    let chunks = bytes.chunks_exact(8);
    if !chunks.remainder().is_empty() {
        return Err(malformed(
            "packed tags",
            "length is not a multiple of 8 bytes",
        ));
    }
    Ok(chunks
        .map(|c| <[u8; 8]>::try_from(c).map_or(0, u64::from_be_bytes))
        .collect())
}

/// The manifest of a tag set: its header and every shard's digest and count.
#[must_use]
pub fn manifest_of(set: &psi_core::TagSet) -> v1::TagSetManifest {
    let h = set.header();
    v1::TagSetManifest {
        key_epoch: h.epoch,
        registry_version: h.registry_version,
        count: h.count,
        tag_bits: h.params.tag_bits.into(),
        shard_bits: h.params.shard_bits.into(),
        rice_bits: h.params.rice_bits.into(),
        shard_digests: pack(set.shards().iter().map(Shard::digest)),
        shard_counts: set.shards().iter().map(Shard::count).collect(),
        root_digest: set.root_digest().to_vec(),
        lists_in_parts: false,
    }
}

/// Bytes one shard takes in a manifest's lists, at most: its digest and
/// its count (a varint of up to 5 bytes, and its share of the field tags).
const LISTED_SHARD_BYTES: usize = 32 + 6;

/// The manifest of a tag set for a stream whose messages carry at most
/// `part_bytes` of shard lists: the whole manifest when its lists fit,
/// else the manifest with `lists_in_parts` and the lists in parts.
#[must_use]
pub fn manifest_in_parts(
    set: &psi_core::TagSet,
    part_bytes: usize,
) -> (v1::TagSetManifest, Vec<v1::TagSetManifestPart>) {
    let shards = set.shards();
    if shards.len() * LISTED_SHARD_BYTES <= part_bytes {
        return (manifest_of(set), Vec::new());
    }
    let per_part = (part_bytes / LISTED_SHARD_BYTES).max(1);
    let parts = shards
        .chunks(per_part)
        .enumerate()
        .map(|(k, run)| v1::TagSetManifestPart {
            first_shard: u32::try_from(k * per_part).unwrap_or(u32::MAX),
            shard_digests: pack(run.iter().map(Shard::digest)),
            shard_counts: run.iter().map(Shard::count).collect(),
        })
        .collect();
    let head = v1::TagSetManifest {
        lists_in_parts: true,
        ..root_only_manifest(set)
    };
    (head, parts)
}

/// Appends `part` to the lists of `manifest` (announced with
/// `lists_in_parts`); true once the lists are whole.
///
/// # Errors
/// A part out of order, lists of different lengths, or more shards than
/// the manifest's parameters give.
pub fn append_manifest_part(
    manifest: &mut v1::TagSetManifest,
    part: v1::TagSetManifestPart,
) -> Result<bool, Error> {
    let total = 1usize
        .checked_shl(manifest.shard_bits)
        .filter(|_| manifest.shard_bits <= 24)
        .ok_or_else(|| malformed("manifest", "too many shards"))?;
    let have = manifest.shard_counts.len();
    if !manifest.lists_in_parts
        || usize::try_from(part.first_shard).ok() != Some(have)
        || part.shard_digests.len() != part.shard_counts.len() * 32
        || part.shard_counts.is_empty()
        || have + part.shard_counts.len() > total
    {
        return Err(malformed(
            "manifest part",
            "out of order or of the wrong size",
        ));
    }
    manifest
        .shard_digests
        .extend_from_slice(&part.shard_digests);
    manifest.shard_counts.extend(part.shard_counts);
    let whole = manifest.shard_counts.len() == total;
    if whole {
        manifest.lists_in_parts = false;
    }
    Ok(whole)
}

/// A bitmap of shard indices (`SyncTagSetRequest.wanted_shards`): bit
/// `i % 8` of byte `i / 8`, least significant first, for `n` shards.
#[must_use]
pub fn shard_bitmap(n: usize, wanted: impl Iterator<Item = usize>) -> Vec<u8> {
    let mut out = vec![0u8; n.div_ceil(8)];
    for i in wanted.filter(|&i| i < n) {
        if let Some(b) = out.get_mut(i / 8) {
            *b |= 1 << (i % 8);
        }
    }
    out
}

/// Whether shard `i` is in `bitmap`.
#[must_use]
pub fn in_bitmap(bitmap: &[u8], i: usize) -> bool {
    bitmap.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0)
}

/// A manifest without its shard lists (the answer to a `root_only` sync
/// that a delta follows): the header and root digest only.
#[must_use]
pub fn root_only_manifest(set: &psi_core::TagSet) -> v1::TagSetManifest {
    v1::TagSetManifest {
        shard_digests: Vec::new(),
        shard_counts: Vec::new(),
        ..manifest_of(set)
    }
}

/// Whether a manifest carries no shard lists (see [`root_only_manifest`]),
/// and none follow in parts.
#[must_use]
pub fn is_root_only(m: &v1::TagSetManifest) -> bool {
    m.shard_digests.is_empty() && m.shard_counts.is_empty() && !m.lists_in_parts
}

/// A manifest's header and shard digests, checked for consistent sizes;
/// no digests for a root-only manifest.
///
/// # Errors
/// [`Error::Malformed`] for out-of-range parameters or mismatched lists.
pub fn manifest_parts(m: &v1::TagSetManifest) -> Result<(TagSetHeader, Vec<[u8; 32]>), Error> {
    let bits =
        |v: u32| u8::try_from(v).map_err(|_| malformed("manifest", "parameter out of range"));
    let params = TagSetParams {
        tag_bits: bits(m.tag_bits)?,
        shard_bits: bits(m.shard_bits)?,
        rice_bits: bits(m.rice_bits)?,
    };
    if params.shard_bits > 24 {
        return Err(malformed("manifest", "too many shards"));
    }
    let digests = unpack(&m.shard_digests, |d| d)?;
    let listed = !is_root_only(m);
    if listed
        && (digests.len() != 1usize << params.shard_bits || m.shard_counts.len() != digests.len())
    {
        return Err(malformed(
            "manifest",
            "shard lists do not match the shard count",
        ));
    }
    let header = TagSetHeader {
        params,
        epoch: m.key_epoch,
        registry_version: m.registry_version,
        count: m.count,
    };
    Ok((header, digests))
}

/// A holder's partial evaluation on the wire, made with the share of
/// `generation`.
#[must_use]
pub fn partial_to_proto(p: &Partial, generation: u32) -> v1::PartialEvaluation {
    v1::PartialEvaluation {
        holder_index: u32::from(p.index),
        evaluated_elements: pack(p.elements.iter().map(EvaluatedElement::as_bytes)),
        proof: p.proof.to_bytes().to_vec(),
        generation,
    }
}

/// A partial evaluation read from the wire (not yet verified).
///
/// # Errors
/// An index above 255, elements of a wrong length, a malformed proof.
pub fn partial_from_proto(p: &v1::PartialEvaluation) -> Result<Partial, Error> {
    Ok(Partial {
        index: holder_index(p.holder_index)?,
        elements: unpack_evaluated(&p.evaluated_elements)?,
        proof: Proof::from_bytes(&p.proof)?,
    })
}

fn holder_index(index: u32) -> Result<u16, Error> {
    u16::try_from(index)
        .ok()
        .filter(|i| (1..=psi_core::threshold::MAX_HOLDERS).contains(i))
        .ok_or_else(|| malformed("holder share", "holder index outside 1..255"))
}

/// A committee's public data (of the sharing `generation`) on the wire.
#[must_use]
pub fn committee_to_proto(c: &Committee, generation: u32) -> v1::ThresholdInfo {
    v1::ThresholdInfo {
        generation,
        threshold: u32::from(c.threshold()),
        holders: c
            .shares()
            .iter()
            .map(|s| v1::HolderShare {
                index: u32::from(s.index),
                public_share: s.key.to_bytes().to_vec(),
            })
            .collect(),
    }
}

/// The committee `info` describes for `public_key`, checked: the shares must
/// lie on one polynomial of degree `t - 1` through the public key.
///
/// # Errors
/// A malformed share, a bad shape, or shares that do not interpolate to the key.
pub fn committee_from_proto(
    public_key: &PublicKey,
    info: &v1::ThresholdInfo,
) -> Result<Committee, Error> {
    let shares = info
        .holders
        .iter()
        .map(|h| {
            Ok(PublicShare {
                index: holder_index(h.index)?,
                key: PublicKey::from_bytes(&h.public_share)?,
            })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    let t = u16::try_from(info.threshold)
        .map_err(|_| malformed("threshold info", "threshold above 255"))?;
    Committee::new(t, *public_key, shares)
}

/// `delta` as messages of at most `part_bytes` of tags each, in order (a
/// delta too large for one message; `append_delta_part` puts it back).
#[must_use]
pub fn delta_parts(delta: v1::TagSetDelta, part_bytes: usize) -> Vec<v1::TagSetDelta> {
    let per = (part_bytes / 8).max(1) * 8;
    if delta.added.len() + delta.removed.len() <= per {
        return vec![delta];
    }
    let part = |added: &[u8], removed: &[u8]| v1::TagSetDelta {
        from_version: delta.from_version,
        to_version: delta.to_version,
        added: added.to_vec(),
        removed: removed.to_vec(),
    };
    delta
        .added
        .chunks(per)
        .map(|a| part(a, &[]))
        .chain(delta.removed.chunks(per).map(|r| part(&[], r)))
        .collect()
}

/// Adds one part of a delta to what came before it.
///
/// # Errors
/// A part of other versions than the first.
pub fn append_delta_part(
    so_far: &mut Option<v1::TagSetDelta>,
    part: v1::TagSetDelta,
) -> Result<(), Error> {
    match so_far {
        None => *so_far = Some(part),
        Some(d) if (d.from_version, d.to_version) == (part.from_version, part.to_version) => {
            d.added.extend_from_slice(&part.added);
            d.removed.extend_from_slice(&part.removed);
        }
        Some(_) => {
            return Err(malformed(
                "delta part",
                "the parts of a delta are of different versions",
            ))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_round_trips_and_rejects_ragged_input() {
        let elems = [[1u8; 32], [2u8; 32]];
        let packed = pack(elems.iter());
        assert_eq!(packed.len(), 64);
        let back = unpack_blinded(&packed).unwrap();
        assert_eq!(back, vec![BlindedElement([1; 32]), BlindedElement([2; 32])]);
        assert!(unpack_blinded(&packed[..63]).is_err());
        assert_eq!(
            unpack_tags(&pack_tags(&[1, u64::MAX])).unwrap(),
            vec![1, u64::MAX]
        );
        assert!(unpack_tags(&[0; 9]).is_err());
    }

    #[test]
    fn manifest_round_trips() {
        let tags: Vec<psi_core::Tag> = (0..5000u64)
            .map(|i| psi_core::Tag(i.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
            .collect();
        let set = psi_core::TagSet::build(&tags, 3, 4).unwrap();
        let m = manifest_of(&set);
        let (header, digests) = manifest_parts(&m).unwrap();
        assert_eq!(&header, set.header());
        assert_eq!(digests.len(), set.shards().len());
        let mut bad = m.clone();
        bad.shard_counts.pop();
        assert!(manifest_parts(&bad).is_err());
    }

    #[test]
    fn descriptor_set_is_embedded() {
        assert!(!FILE_DESCRIPTOR_SET.is_empty());
    }

    #[test]
    fn manifests_and_deltas_in_parts_come_back_whole() {
        let tags: Vec<psi_core::Tag> = (0..5000u64)
            .map(|i| psi_core::Tag(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
            .collect();
        let params = TagSetParams::for_count_at_least(5000, 12).unwrap();
        let set = psi_core::TagSet::build_with(params, &tags, 1, 1).unwrap();
        let whole = manifest_of(&set);
        // Fits: one message.
        let (head, parts) = manifest_in_parts(&set, 1 << 20);
        assert!(parts.is_empty() && head == whole);
        // Does not fit: parts, in order, and back to the whole manifest.
        let (mut head, parts) = manifest_in_parts(&set, 10_000);
        assert!(head.lists_in_parts && head.shard_counts.is_empty() && parts.len() > 10);
        assert!(!is_root_only(&head));
        let mut done = false;
        for p in parts.clone() {
            assert!(!done);
            done = append_manifest_part(&mut head, p).unwrap();
        }
        assert!(done);
        assert_eq!(head, whole);
        // Out of order, repeated, or after the lists are whole: refused.
        let (mut head, _) = manifest_in_parts(&set, 10_000);
        assert!(append_manifest_part(&mut head, parts[1].clone()).is_err());
        let (mut head, _) = manifest_in_parts(&set, 10_000);
        append_manifest_part(&mut head, parts[0].clone()).unwrap();
        assert!(append_manifest_part(&mut head, parts[0].clone()).is_err());

        let delta = v1::TagSetDelta {
            from_version: 3,
            to_version: 9,
            added: pack_tags(&(0..1000).collect::<Vec<u64>>()),
            removed: pack_tags(&(5000..5300).collect::<Vec<u64>>()),
        };
        let pieces = delta_parts(delta.clone(), 1000);
        assert!(pieces.len() > 5);
        assert!(pieces
            .iter()
            .all(|p| p.added.len() + p.removed.len() <= 1000));
        let mut back = None;
        for p in pieces {
            append_delta_part(&mut back, p).unwrap();
        }
        assert_eq!(back, Some(delta.clone()));
        let mut other = Some(delta);
        let stray = v1::TagSetDelta {
            from_version: 4,
            ..v1::TagSetDelta::default()
        };
        assert!(append_delta_part(&mut other, stray).is_err());
        assert_eq!(
            shard_bitmap(10, [0, 3, 9, 12].into_iter()),
            vec![0b0000_1001, 0b0000_0010]
        );
        assert!(in_bitmap(&[0b0000_1001, 0b10], 9) && !in_bitmap(&[0b1001, 0b10], 8));
    }
}
