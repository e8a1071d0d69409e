//! The shape of a PIR database: how many items, how large, which buckets
//! each holds, and the Spiral parameters that follow.
//!
//! An item holds the fingerprints of `2^bucket_shift` consecutive buckets of
//! the bucket mode (bucket `b` is in item `b >> bucket_shift`). The item
//! count is `2^(nu1 + nu2)`: `nu1 = 7` fixed, `nu2 = dims - 7` with
//! `dims = clamp(prefix_bits - 2, 9, 13)`; an item is `instances` times
//! 8 KiB, with `instances` the fewest that hold the fullest item. The
//! other Spiral parameters are the authors' set for 8 KiB items
//! (`n = 2, p = 256, q2 = 20 bits, t_gsw = 8, t_conv = 4, t_exp = 8/56`,
//! `poly_len = 2048`, `q = 268369921 * 249561089`, sigma = 6.4): the same
//! ring, modulus and noise for every shape, so the same security estimate.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock, PoisonError};

use spiral_rs::params::Params;

use crate::error::{Error, Result};
use crate::item;

/// The scheme and parameter family, as `ServerInfo` names it.
pub const SCHEME: &str = "spiral-v1-n2-p256";
/// First-dimension bits: 128 ciphertexts expanded from the query.
pub const NU1: u8 = 7;
/// Fewest and most folding dimensions.
pub const MIN_NU2: u8 = 2;
/// Most folding dimensions (the authors' parameters go to 6).
pub const MAX_NU2: u8 = 6;
/// Most 8 KiB instances per item: answers up to 64 * 20 KiB.
pub const MAX_INSTANCES: u16 = 64;
/// Bytes of every query: a 32-byte seed and one ciphertext row of 2048
/// 64-bit coefficients (the server expands it).
pub const QUERY_BYTES: usize = 32 + 2048 * 8;
/// Plaintext bytes per instance: `n^2` polynomials of 2048 bytes.
pub const INSTANCE_BYTES: usize = 4 * 2048;

const POLY_LEN: usize = 2048;
const MODULI: [u64; 2] = [268_369_921, 249_561_089];
const NOISE_WIDTH: f64 = 6.4;
const N: usize = 2;
const PT_MODULUS: u64 = 256;
const Q2_BITS: u64 = 20;
const T_CONV: usize = 4;
const T_EXP_LEFT: usize = 8;
const T_EXP_RIGHT: usize = 56;
const T_GSW: usize = 8;

/// A database's shape: public, advertised in `ServerInfo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shape {
    /// First-dimension bits (always [`NU1`]).
    pub nu1: u8,
    /// Folding dimensions.
    pub nu2: u8,
    /// 8 KiB instances per item.
    pub instances: u16,
    /// Buckets per item, as a power of two.
    pub bucket_shift: u8,
}

impl Shape {
    /// The shape for a registry whose buckets have `prefix_bits` bits, with
    /// `load(shift)` the most entries any item would hold with
    /// `2^shift` buckets per item.
    ///
    /// # Errors
    /// [`Error::Shape`] when even [`MAX_INSTANCES`] cannot hold the fullest item.
    pub fn for_registry(prefix_bits: u8, load: impl Fn(u8) -> usize) -> Result<Self> {
        let dims = prefix_bits
            .saturating_sub(2)
            .clamp(NU1 + MIN_NU2, NU1 + MAX_NU2);
        let bucket_shift = prefix_bits.saturating_sub(dims);
        let most = load(bucket_shift);
        let instances = (1..=MAX_INSTANCES)
            .find(|&i| item::capacity(usize::from(i) * INSTANCE_BYTES) >= most)
            .ok_or_else(|| {
                Error::Shape(format!(
                    "an item would hold {most} entries, more than {MAX_INSTANCES} instances can"
                ))
            })?;
        Ok(Self {
            nu1: NU1,
            nu2: dims - NU1,
            instances,
            bucket_shift,
        })
    }

    /// Checks an advertised shape (a client does, before using it).
    ///
    /// # Errors
    /// [`Error::Shape`] for anything out of range.
    pub fn validate(&self) -> Result<()> {
        if self.nu1 != NU1
            || !(MIN_NU2..=MAX_NU2).contains(&self.nu2)
            || !(1..=MAX_INSTANCES).contains(&self.instances)
            || self.bucket_shift > 32
        {
            return Err(Error::Shape(format!(
                "nu1 {} nu2 {} instances {} bucket_shift {}",
                self.nu1, self.nu2, self.instances, self.bucket_shift
            )));
        }
        Ok(())
    }

    /// Items in the database.
    #[must_use]
    pub fn items(&self) -> usize {
        1 << (self.nu1 + self.nu2)
    }

    /// The item that holds `bucket`.
    #[must_use]
    pub fn item_of(&self, bucket: u32) -> usize {
        (u64::from(bucket) >> self.bucket_shift) as usize
    }

    /// Bytes of one item.
    #[must_use]
    pub fn item_bytes(&self) -> usize {
        usize::from(self.instances) * INSTANCE_BYTES
    }

    /// Fingerprints one item holds.
    #[must_use]
    pub fn capacity(&self) -> usize {
        item::capacity(self.item_bytes())
    }

    /// Bits of a fingerprint (so that a lookup's false match stays at or
    /// below 2^-32: capacity * 2^-bits <= 2^-32).
    #[must_use]
    pub fn fingerprint_bits(&self) -> u32 {
        item::fingerprint_bits(self.item_bytes())
    }

    /// The client's public parameters' length (uploaded once per epoch).
    #[must_use]
    pub fn keys_bytes(&self) -> usize {
        self.params().setup_bytes()
    }

    /// One query's length.
    #[must_use]
    pub fn query_bytes(&self) -> usize {
        self.params().query_bytes()
    }

    /// One answer's length.
    #[must_use]
    pub fn answer_bytes(&self) -> usize {
        let q1_bits = 10; // log2(4 p)
        let bits = usize::from(self.instances)
            * (Q2_BITS as usize * N * POLY_LEN + q1_bits * N * N * POLY_LEN);
        bits.div_ceil(64) * 8
    }

    /// Bytes the server holds for the database: one 64-bit word per
    /// plaintext coefficient, in NTT form.
    #[must_use]
    pub fn database_bytes(&self) -> usize {
        self.items() * usize::from(self.instances) * N * N * POLY_LEN * 8
    }

    /// Whether public parameters made for `other` serve this shape too (the
    /// keys depend on the dimensions, not on the item size).
    #[must_use]
    pub fn same_keys(&self, other: &Shape) -> bool {
        self.nu1 == other.nu1 && self.nu2 == other.nu2
    }

    /// The Spiral parameters, built once per shape and kept for the
    /// process's life (a handful of shapes ever: dimensions 9 to 13, at
    /// most 64 instances).
    pub(crate) fn params(&self) -> &'static Params {
        static ALL: OnceLock<Mutex<HashMap<Shape, &'static Params>>> = OnceLock::new();
        let mut all = ALL
            .get_or_init(Mutex::default)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        all.entry(*self).or_insert_with(|| {
            Box::leak(Box::new(Params::init(
                POLY_LEN,
                &MODULI,
                NOISE_WIDTH,
                N,
                PT_MODULUS,
                Q2_BITS,
                T_CONV,
                T_EXP_LEFT,
                T_EXP_RIGHT,
                T_GSW,
                true,
                usize::from(self.nu1),
                usize::from(self.nu2),
                usize::from(self.instances),
                self.item_bytes(),
            )))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_follow_the_registry() {
        // 10^7 entries: 2^13 buckets of ~1220, four to an item.
        let s = Shape::for_registry(13, |shift| 1220 << shift).expect("shape");
        assert_eq!((s.nu1, s.nu2, s.bucket_shift), (7, 4, 2));
        assert_eq!(s.items(), 2048);
        assert!(s.capacity() >= 4880 && s.instances == 4, "{s:?}");
        // 10^6: one bucket an item, two instances.
        let s = Shape::for_registry(9, |_| 2100).expect("shape");
        assert_eq!((s.nu2, s.bucket_shift, s.instances), (2, 0, 2));
        // A tiny registry still gets the smallest shape.
        let s = Shape::for_registry(0, |_| 3).expect("shape");
        assert_eq!((s.items(), s.bucket_shift, s.instances), (512, 0, 1));
        // The largest registries merge more buckets per item.
        let s = Shape::for_registry(16, |shift| 1500 << shift).expect("shape");
        assert_eq!((s.nu2, s.bucket_shift, s.instances), (6, 3, 9));
        // 1.4 x 10^9 entries (20 bits) would need answers of over 64 instances.
        assert!(Shape::for_registry(20, |shift| 1500 << shift).is_err());
    }

    #[test]
    fn an_item_too_full_for_any_shape_is_refused() {
        let err = Shape::for_registry(13, |_| 10_000_000).expect_err("too full");
        assert!(matches!(err, Error::Shape(_)));
    }

    #[test]
    fn sizes_are_within_the_budget() {
        let s = Shape::for_registry(13, |shift| 1300 << shift).expect("shape");
        assert!(s.keys_bytes() <= 16 << 20, "{}", s.keys_bytes());
        assert!(s.query_bytes() <= 64 << 10);
        assert!(s.answer_bytes() <= 128 << 10);
        s.validate().expect("valid");
        let mut bad = s;
        bad.nu2 = 9;
        assert!(bad.validate().is_err());
    }
}
