//! `psi-server`: the registry operator's side of the private (name, ID) match
//! service. `main.rs` is thin; everything is here.
//!
//! - [`synth`]: synthetic registries for tests, demos and benchmarks.
//! - [`keystore`], [`atomic_file`]: the OPRF key files per epoch (mode 0600),
//!   their retirement after a rotation, and the endorsed key history.
//! - [`source`]: registry rows from a CSV file or a PostgreSQL cursor.
//! - [`registry`], [`records`], [`delta`]: `init`, `update` and `rotate_key`
//!   (new registry versions and key epochs), the canonical record store, the
//!   per-version deltas for incremental sync, and snapshot loading.
//! - [`service`], [`error`], [`audit`]: the `psi.v1.Match` gRPC service, its status
//!   codes, and the hash-chained audit trail of every request.
//! - [`connection`], [`admission`]: every peer bounded: connections, streams,
//!   bytes buffered, handshake/idle/body/answer/stream deadlines, cancelled
//!   work stopped, and every refusal audited.
//! - [`policy`]: per-institution modes, purposes, rates and daily caps.
//! - [`metrics`]: Prometheus metrics on the admin address.
//! - [`config`], [`serve`], [`ca`]: configuration, mutual TLS, and the server's life cycle.
//! - [`cli`], [`demo`]: the command line and the end-to-end demo.

#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod admission;
pub mod atomic_file;
pub mod audit;
pub mod ca;
pub mod cli;
pub mod config;
pub mod connection;
pub mod delta;
pub mod demo;
pub mod error;
pub mod keystore;
pub mod mapped;
pub mod metrics;
pub mod partition;
pub mod pg;
pub mod pir;
pub mod policy;
pub mod publish;
pub mod records;
pub mod registry;
pub mod serve;
pub mod service;
pub mod source;
pub mod synth;
