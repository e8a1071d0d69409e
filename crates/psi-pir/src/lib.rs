//! PIR mode of the private (name, ID) match service: the client learns
//! whether its pair is in the registry and the operator learns nothing
//! about which pair was asked, not even its bucket.
//!
//! - [`shape`]: how the registry's buckets become a database of equal-size
//!   items, and the parameters of the scheme for it.
//! - [`item`]: an item's coding (fingerprints, checksum) and lookup.
//! - [`server`]: the database, clients' public parameters, answers.
//! - [`client`]: secret key, public parameters, queries, decoding.
//! - [`plain`]: the plain database of the LWE family (YPIR+SP) and the
//!   answer's pass over it at memory speed.
//! - [`ypir`]: the scheme YPIR+SP over that database (queries, the hint,
//!   packing the answer, decoding), for large registries.
//! - [`scheme`]: both schemes behind one face, the one the server chose.
//!
//! Two schemes: Spiral (Menon and Wu, IEEE S&P 2022), through its authors'
//! implementation `spiral-rs`, except the server's evaluation of a query
//! (`answer`: the same inputs and a decodable answer, a fifth of the time),
//! for small registries; and YPIR+SP (Menon and Wu, USENIX Security 2024),
//! ours on spiral-rs's ring arithmetic, for large ones. Their NTTs are in
//! `ntt`, their hot loops in `kernels`, which has the crate's only
//! `unsafe` (calling the AVX2 and AVX-512 builds, the VNNI kernel's
//! loads, `dgemm` on slices checked against its strides). Everything that reaches them from a peer is checked here first
//! (exact lengths, every coefficient below the modulus); their code runs
//! under `catch_unwind` besides, so a fault refuses one request instead of
//! ending the server. Bytes in, bytes out: no I/O. See `docs/PROTOCOL.md`,
//! "PIR mode".

// The scheme's serialisation is the machine's byte order; ours is little-endian.
#[cfg(target_endian = "big")]
compile_error!("PIR mode needs a little-endian machine (x86-64, aarch64)");

mod answer;
pub mod client;
pub mod error;
pub mod item;
mod kernels;
mod ntt;
pub mod plain;
pub mod scheme;
pub mod server;
pub mod shape;
pub mod ypir;

pub use client::PirClient;
pub use error::{Error, Result};
pub use scheme::{PirDatabase, PirKeys, PirShape, PreparedQuery, SchemeChoice, SchemeClient};
pub use server::{Database, Keys};
pub use shape::Shape;

#[cfg(test)]
mod tests;
