//! Golomb-Rice coding of strictly increasing integer sequences: each gap is
//! written as its quotient by `2^k` in unary (ones closed by a zero) and its
//! remainder in `k` bits, most significant bit first.

use crate::error::{Error, Result};

const WHAT: &str = "tag-set shard";

/// Encodes strictly increasing `values` (each below `2^63`) with parameter `k` (0 to 63).
pub(crate) fn encode(values: &[u64], k: u8) -> Vec<u8> {
    let mut w = BitWriter::with_capacity(values.len() * (usize::from(k) + 2) / 8 + 8);
    let mut prev = 0u64;
    for (i, &v) in values.iter().enumerate() {
        let gap = if i == 0 { v } else { v - prev - 1 };
        prev = v;
        let mut q = gap >> k;
        while q >= 48 {
            w.push_bits(u64::MAX, 48);
            q -= 48;
        }
        // q ones and the closing zero (q < 48).
        w.push_bits(((1u64 << q) - 1) << 1, q as u8 + 1);
        w.push_bits(gap, k);
    }
    w.finish()
}

/// Decodes `count` values, each below `limit`, rejecting truncated input,
/// non-zero padding and trailing bytes.
pub(crate) fn decode(data: &[u8], count: usize, k: u8, limit: u64) -> Result<Vec<u64>> {
    let malformed = |reason| Error::Malformed { what: WHAT, reason };
    // Each value takes at least k + 1 bits.
    if count.saturating_mul(usize::from(k) + 1) > data.len().saturating_mul(8) {
        return Err(malformed("more values than the data can hold"));
    }
    let mut r = BitReader::new(data);
    let mut out = Vec::with_capacity(count);
    let mut prev: Option<u64> = None;
    for _ in 0..count {
        let q = r.read_unary().ok_or(malformed("truncated"))?;
        let rem = r.read_bits(k).ok_or(malformed("truncated"))?;
        let gap = q
            .checked_mul(1u64 << k)
            .and_then(|g| g.checked_add(rem))
            .ok_or(malformed("gap overflows"))?;
        let v = match prev {
            None => gap,
            Some(p) => p
                .checked_add(gap)
                .and_then(|v| v.checked_add(1))
                .ok_or(malformed("value overflows"))?,
        };
        if v >= limit {
            return Err(malformed("value out of range"));
        }
        out.push(v);
        prev = Some(v);
    }
    if !r.rest_is_zero_padding() {
        return Err(malformed("trailing data"));
    }
    Ok(out)
}

struct BitWriter {
    out: Vec<u8>,
    acc: u64,
    used: u32,
}

impl BitWriter {
    fn with_capacity(bytes: usize) -> Self {
        Self {
            out: Vec::with_capacity(bytes),
            acc: 0,
            used: 0,
        }
    }

    /// Appends the low `n` bits of `v` (n <= 64), most significant first.
    fn push_bits(&mut self, v: u64, n: u8) {
        let mut n = u32::from(n);
        while n > 0 {
            let take = n.min(56 - self.used);
            let chunk = (v >> (n - take)) & ((1u64 << take) - 1);
            self.acc = (self.acc << take) | chunk;
            self.used += take;
            n -= take;
            while self.used >= 8 {
                self.out.push((self.acc >> (self.used - 8)) as u8);
                self.used -= 8;
            }
            self.acc &= (1u64 << self.used) - 1;
        }
    }

    fn finish(mut self) -> Vec<u8> {
        if self.used > 0 {
            self.out.push((self.acc << (8 - self.used)) as u8);
        }
        self.out
    }
}

struct BitReader<'a> {
    data: &'a [u8],
    pos: usize, // in bits
}

impl<'a> BitReader<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self { data, pos: 0 }
    }

    fn bits_left(&self) -> usize {
        self.data.len() * 8 - self.pos
    }

    /// Up to 57 bits starting at `pos`, left-aligned in a u64 (zeros past the end).
    fn window(&self) -> u64 {
        let byte = self.pos / 8;
        let mut buf = [0u8; 8];
        let avail = self.data.get(byte..).unwrap_or(&[]);
        let n = avail.len().min(8);
        if let (Some(dst), Some(src)) = (buf.get_mut(..n), avail.get(..n)) {
            dst.copy_from_slice(src);
        }
        u64::from_be_bytes(buf) << (self.pos % 8)
    }

    fn read_unary(&mut self) -> Option<u64> {
        let mut q = 0u64;
        loop {
            let left = self.bits_left();
            if left == 0 {
                return None;
            }
            // Bits of the window that are data (the rest are zero fill).
            let valid = left.min(64 - self.pos % 8);
            let ones = (!self.window()).leading_zeros() as usize;
            if ones < valid {
                self.pos += ones + 1;
                return Some(q + ones as u64);
            }
            self.pos += valid;
            q += valid as u64;
        }
    }

    fn read_bits(&mut self, n: u8) -> Option<u64> {
        let n = usize::from(n);
        if n > self.bits_left() {
            return None;
        }
        let mut v = 0u64;
        let mut left = n;
        while left > 0 {
            let take = left.min(56);
            v = (v << take) | (self.window() >> (64 - take));
            self.pos += take;
            left -= take;
        }
        Some(v)
    }

    fn rest_is_zero_padding(&self) -> bool {
        let left = self.bits_left();
        left < 8 && (left == 0 || self.window() == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn small_sequences_round_trip() {
        for k in [0u8, 1, 5, 32, 44] {
            if k < 10 {
                let values = [0u64, 1, 2, 10, 1000, 1500];
                let enc = encode(&values, k);
                assert_eq!(decode(&enc, values.len(), k, 2000).unwrap(), values);
                continue;
            }
            let values = [0u64, 1, 2, 10, 1000, 1 << 40, (1 << 40) + 1];
            let limit = 1u64 << 45;
            let enc = encode(&values, k);
            assert_eq!(decode(&enc, values.len(), k, limit).unwrap(), values);
        }
        assert_eq!(
            decode(&encode(&[], 32), 0, 32, 1).unwrap(),
            Vec::<u64>::new()
        );
    }

    #[test]
    fn truncation_padding_and_range_are_checked() {
        let values = [3u64, 70, 5000];
        let enc = encode(&values, 4);
        assert!(decode(&enc[..enc.len() - 1], 3, 4, 1 << 20).is_err());
        let mut extra = enc.clone();
        extra.push(0);
        assert!(decode(&extra, 3, 4, 1 << 20).is_err());
        assert!(decode(&enc, 3, 4, 5000).is_err());
        assert!(decode(&enc, 4, 4, 1 << 20).is_err());
    }

    proptest! {
        #[test]
        fn round_trip(mut values in proptest::collection::vec(0u64..(1 << 44), 0..300), k in 30u8..44) {
            values.sort_unstable();
            values.dedup();
            let enc = encode(&values, k);
            prop_assert_eq!(decode(&enc, values.len(), k, 1 << 44).unwrap(), values);
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..64), count in 0usize..40, k in 0u8..64) {
            let _ = decode(&data, count, k, u64::MAX);
        }
    }
}
