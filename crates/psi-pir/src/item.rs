//! A database item: the fingerprints of one or more buckets' tags, coded
//! to a fixed size.
//!
//! Layout (`bytes` long, all big-endian):
//!
//! | bytes   | content                                                          |
//! |---------|------------------------------------------------------------------|
//! | 0..4    | `count`: fingerprints in the item                                |
//! | 4..12   | checksum: the first 8 bytes of `SHA-256("psi.v1.pir.item" \|\| epoch \|\| index \|\| bytes 0..4 \|\| bytes 12..)` |
//! | 12..    | `count` fingerprints of `f` bits, sorted, packed MSB first; zeros after |
//!
//! A fingerprint is the first `f` bits of a 64-bit tag, with
//! `f = 32 + ceil(log2(capacity))`: comparing one tag against a full item
//! matches by chance with probability at most `capacity / 2^f <= 2^-32`.
//! The checksum binds the item to its index and key epoch and turns a
//! tampered or undecryptable answer into an error, not a "no match".

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

const HEADER_BYTES: usize = 12;
const DOMAIN: &[u8] = b"psi.v1.pir.item";

/// Fingerprint bits for an item of `bytes` bytes.
#[must_use]
pub fn fingerprint_bits(bytes: usize) -> u32 {
    let bits = bytes.saturating_sub(HEADER_BYTES) * 8;
    (33..=64)
        .find(|&f| {
            let cap = bits / f as usize;
            32 + ceil_log2(cap) <= f
        })
        .unwrap_or(64)
}

/// Fingerprints an item of `bytes` bytes holds.
#[must_use]
pub fn capacity(bytes: usize) -> usize {
    bytes.saturating_sub(HEADER_BYTES) * 8 / fingerprint_bits(bytes) as usize
}

fn ceil_log2(n: usize) -> u32 {
    if n <= 1 {
        0
    } else {
        usize::BITS - (n - 1).leading_zeros()
    }
}

/// `index` if it names one of `items` items.
///
/// # Errors
/// [`Error::Item`] otherwise (a bucket outside the database).
pub(crate) fn within(index: usize, items: usize) -> Result<usize> {
    if index >= items {
        return Err(Error::Item { index, items });
    }
    Ok(index)
}

/// A tag's fingerprint of `f` bits.
#[must_use]
pub fn fingerprint(tag: u64, f: u32) -> u64 {
    tag >> (64 - f)
}

fn checksum(item: &[u8], index: u64, epoch: u64) -> [u8; 8] {
    let mut h = Sha256::new();
    h.update(DOMAIN);
    h.update(epoch.to_be_bytes());
    h.update(index.to_be_bytes());
    h.update(item.get(..4).unwrap_or_default());
    h.update(item.get(HEADER_BYTES..).unwrap_or_default());
    let d = h.finalize();
    let mut out = [0u8; 8];
    out.copy_from_slice(d.get(..8).unwrap_or(&[0; 8]));
    out
}

/// Codes the tags of item `index` (any order, duplicates allowed) into
/// `bytes` bytes.
///
/// # Errors
/// [`Error::Overflow`] when their fingerprints do not fit.
pub fn encode(tags: &[u64], index: u64, epoch: u64, bytes: usize) -> Result<Vec<u8>> {
    let f = fingerprint_bits(bytes);
    let mut fps: Vec<u64> = tags.iter().map(|&t| fingerprint(t, f)).collect();
    fps.sort_unstable();
    fps.dedup();
    let cap = capacity(bytes);
    if fps.len() > cap {
        return Err(Error::Overflow {
            index: usize::try_from(index).unwrap_or(usize::MAX),
            count: fps.len(),
            capacity: cap,
        });
    }
    let mut out = vec![0u8; bytes];
    let count = u32::try_from(fps.len()).unwrap_or(u32::MAX);
    if let Some(head) = out.get_mut(..4) {
        head.copy_from_slice(&count.to_be_bytes());
    }
    if let Some(body) = out.get_mut(HEADER_BYTES..) {
        write_bits(body, &fps, f);
    }
    let sum = checksum(&out, index, epoch);
    if let Some(field) = out.get_mut(4..HEADER_BYTES) {
        field.copy_from_slice(&sum);
    }
    Ok(out)
}

/// The sorted fingerprints of item `index`, after checking it.
///
/// # Errors
/// [`Error::Length`] for the wrong length, [`Error::Integrity`] when the
/// checksum or the count is wrong.
pub fn decode(item: &[u8], index: u64, epoch: u64) -> Result<Vec<u64>> {
    let bytes = item.len();
    if bytes <= HEADER_BYTES {
        return Err(Error::Length {
            what: "PIR item",
            got: bytes,
            want: HEADER_BYTES + 1,
        });
    }
    let field = item.get(4..HEADER_BYTES).ok_or(Error::Integrity)?;
    if field != checksum(item, index, epoch) {
        return Err(Error::Integrity);
    }
    let mut head = [0u8; 4];
    head.copy_from_slice(item.get(..4).ok_or(Error::Integrity)?);
    let count = u32::from_be_bytes(head) as usize;
    if count > capacity(bytes) {
        return Err(Error::Integrity);
    }
    let f = fingerprint_bits(bytes);
    Ok(read_bits(
        item.get(HEADER_BYTES..).unwrap_or_default(),
        count,
        f,
    ))
}

/// Whether `tag`'s fingerprint is among an item's sorted fingerprints.
#[must_use]
pub fn contains(fingerprints: &[u64], tag: u64, item_bytes: usize) -> bool {
    fingerprints
        .binary_search(&fingerprint(tag, fingerprint_bits(item_bytes)))
        .is_ok()
}

fn write_bits(out: &mut [u8], values: &[u64], f: u32) {
    let mut acc: u128 = 0;
    let mut held = 0u32;
    let mut pos = 0usize;
    for &v in values {
        acc = (acc << f) | u128::from(v);
        held += f;
        while held >= 8 {
            held -= 8;
            if let Some(b) = out.get_mut(pos) {
                *b = (acc >> held) as u8;
            }
            pos += 1;
        }
    }
    if held > 0 {
        if let Some(b) = out.get_mut(pos) {
            *b = (acc << (8 - held)) as u8;
        }
    }
}

fn read_bits(data: &[u8], count: usize, f: u32) -> Vec<u64> {
    let mut out = Vec::with_capacity(count);
    let mut acc: u128 = 0;
    let mut held = 0u32;
    let mut bytes = data.iter();
    let mask = if f == 64 { u64::MAX } else { (1u64 << f) - 1 };
    while out.len() < count {
        while held < f {
            acc = (acc << 8) | u128::from(bytes.next().copied().unwrap_or(0));
            held += 8;
        }
        held -= f;
        out.push((acc >> held) as u64 & mask);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fingerprints_keep_false_matches_under_2_to_the_minus_32() {
        for instances in 1..=64usize {
            let bytes = instances * 8192;
            let (f, cap) = (fingerprint_bits(bytes), capacity(bytes));
            // capacity / 2^f <= 2^-32
            assert!(
                cap as f64 / 2f64.powi(f as i32) <= 2f64.powi(-32),
                "{instances}"
            );
            assert!(f < 64);
        }
        assert_eq!((fingerprint_bits(8192), capacity(8192)), (43, 1521));
    }

    #[test]
    fn an_overfull_item_is_refused() {
        let tags: Vec<u64> = (0..=1521u64).map(|i| i << 40).collect();
        assert!(matches!(
            encode(&tags, 0, 1, 8192),
            Err(Error::Overflow {
                count: 1522,
                capacity: 1521,
                ..
            })
        ));
        assert!(encode(tags.get(..1521).unwrap(), 0, 1, 8192).is_ok());
    }

    #[test]
    fn a_changed_byte_index_or_epoch_fails_the_check() {
        let item = encode(&[1 << 63, 5 << 40], 3, 7, 8192).unwrap();
        assert!(decode(&item, 3, 7).is_ok());
        assert_eq!(decode(&item, 4, 7), Err(Error::Integrity));
        assert_eq!(decode(&item, 3, 8), Err(Error::Integrity));
        for at in [0usize, 5, 12, 8191] {
            let mut bad = item.clone();
            bad[at] ^= 1;
            assert_eq!(decode(&bad, 3, 7), Err(Error::Integrity), "byte {at}");
        }
    }

    proptest! {
        #[test]
        fn round_trip(tags in proptest::collection::vec(any::<u64>(), 0..1500), other in any::<u64>()) {
            let item = encode(&tags, 9, 2, 8192).unwrap();
            let fps = decode(&item, 9, 2).unwrap();
            for &t in &tags {
                prop_assert!(contains(&fps, t, 8192));
            }
            let f = fingerprint_bits(8192);
            let expected = tags.iter().any(|&t| fingerprint(t, f) == fingerprint(other, f));
            prop_assert_eq!(contains(&fps, other, 8192), expected);
        }
    }
}
