//! The key-holder role (threshold mode): a process holding one Shamir share
//! `k_i` of an epoch's OPRF key, evaluating blinded elements for serving
//! replicas and the encoding side with a proof against its public share, so
//! that the key is never whole on one host (see `psi_core::threshold`).
//!
//! - `share`: the holder's share file.
//! - `service`, `serve`: the `psi.v1.KeyHolder` service and its process.
//! - `pool`: how replicas and the encoding side reach `t` of the holders.
//! - `split`: the one-time migration of a single-key epoch into shares.
//! - `identity`: a holder's long-term identity for key generation.
//! - `ceremony`: key generation, refresh, endorsement and retirement, as
//!   the coordinator runs them.

pub mod ceremony;
pub mod identity;
pub mod pool;
pub mod serve;
pub mod service;
pub mod share;
pub mod split;
