//! Tags: the part of a PRF output that the registry and the client compare.

/// A tag: the first 8 bytes of a 64-byte PRF output, big-endian. The
/// registry's encrypted form is the set of its records' tags; the tag set and
/// bucket index keep prefixes of it (see `docs/PROTOCOL.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tag(pub u64);

impl Tag {
    /// The tag of a PRF output.
    #[must_use]
    pub fn from_output(output: &[u8; 64]) -> Self {
        let (first, _) = output.split_first_chunk::<8>().unwrap_or((&[0; 8], &[]));
        Tag(u64::from_be_bytes(*first))
    }

    /// The first `bits` bits of the tag (1 to 64), as an integer.
    #[must_use]
    pub fn prefix(self, bits: u8) -> u64 {
        match bits {
            0 => 0,
            64.. => self.0,
            b => self.0 >> (64 - u32::from(b)),
        }
    }
}
