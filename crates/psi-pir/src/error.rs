//! The one error type of `psi-pir`. No variant carries keys, queries'
//! contents or fingerprints: only sizes and positions, which are public.

/// Everything that can go wrong building, asking or answering.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A shape the scheme does not support (a server's advertisement out of
    /// range, or a registry too large for the widest item).
    #[error("unsupported PIR shape: {0}")]
    Shape(String),
    /// Bytes of the wrong length for the shape.
    #[error("{what} is {got} bytes; the shape needs exactly {want}")]
    Length {
        /// What was measured.
        what: &'static str,
        /// Its length.
        got: usize,
        /// The length the shape needs.
        want: usize,
    },
    /// A coefficient outside `[0, q)`: not something an honest client sends.
    #[error("{what} holds a coefficient out of range at word {index}")]
    Coefficient {
        /// What was checked.
        what: &'static str,
        /// The first word out of range.
        index: usize,
    },
    /// An item index outside the database.
    #[error("item {index} is outside the database of {items} items")]
    Item {
        /// The index asked.
        index: usize,
        /// Items in the database.
        items: usize,
    },
    /// A decrypted answer failed its checksum: tampered, corrupted, or a
    /// decryption failure. Never read as "no match".
    #[error("the PIR answer failed its integrity check (tampered, damaged, or not decryptable)")]
    Integrity,
    /// More fingerprints for one item than the shape holds.
    #[error("item {index} holds {count} entries; the shape holds at most {capacity}")]
    Overflow {
        /// The item.
        index: usize,
        /// Its entries.
        count: usize,
        /// The shape's capacity.
        capacity: usize,
    },
    /// The scheme's code panicked on input that passed every check (a bug
    /// in it or here); the request is refused, the process goes on.
    #[error("the PIR scheme failed on this input")]
    Scheme,
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
