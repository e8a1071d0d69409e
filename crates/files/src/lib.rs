//! The files operators and institutions hold, read and written the same way
//! on both sides (the registry's CSV source for `init`/`update`, the
//! institution's batch input and output):
//!
//! - [`encoding`]: UTF-8 (with or without a BOM) and GB18030/GBK text,
//!   detected from the bytes, a file in neither refused by its first bad line;
//! - [`rows`]: CSV rows bounded in length, a quote never closed named by its line;
//! - `xlsx` (feature `xlsx`): Excel workbooks read as text rows and written
//!   as text cells, ID numbers Excel stored as numbers told apart.
//!
//! - [`atomic`]: files replaced atomically, with their mode, on both sides.
//!
//! Wrappers around readers and writers; opening files is the caller's, except
//! for [`encoding::detect`], which reads the file it is given, and [`atomic`].

pub mod atomic;
pub mod encoding;
pub mod rows;
#[cfg(feature = "xlsx")]
pub mod xlsx;

pub use encoding::{Encoding, EncodingError};
