//! Answering institutions: the served snapshot and the `psi.v1.Match`
//! service, with every limit, policy, audit record and metric around it.
//!
//! - [`snapshot`]: the current version loaded for serving, brought forward
//!   by the updates logged since.
//! - [`service`], [`error`], [`pir`]: the gRPC service, its status codes and
//!   PIR mode's database and public-parameter cache.
//! - [`connection`], [`admission`]: every peer bounded: connections, streams,
//!   bytes buffered, handshake/idle/body/answer/stream deadlines, cancelled
//!   work stopped, and every refusal audited.
//! - [`policy`], [`audit`]: per-institution modes, purposes, rates
//!   and daily caps; the hash-chained audit trail (PostgreSQL connections:
//!   `psi_pg`).
//! - [`metrics`]: Prometheus metrics on the admin address.
//! - [`config`], [`serve`]: settings, mutual TLS and the server's life cycle.

pub mod admission;
pub mod audit;
pub mod config;
pub mod connection;
pub mod error;
pub mod metrics;
pub mod pir;
pub mod policy;
pub mod serve;
pub mod service;
pub mod snapshot;
