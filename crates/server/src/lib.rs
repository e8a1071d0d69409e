//! `psi-server`: the registry operator's side of the private (name, ID) match
//! service. `main.rs` is thin; everything is here, one folder per role:
//!
//! - [`store`]: the data directory: its layout, the file formats (key files
//!   and key history, bucket index, deltas, canonical records), reading the
//!   current version, atomic writes and the writers' lock.
//! - [`registry`]: the registry-holding side: a source's rows encoded into a
//!   new registry (`init`, partitioned runs and `merge`), `update`,
//!   `compact`, `rotate-key`, and `publish` to a serving directory.
//! - [`serving`]: answering institutions: the served snapshot, the
//!   `psi.v1.Match` service and its status codes, PIR, admission and
//!   connection limits, policy and quotas, the hash-chained audit trail
//!   (SQLite or PostgreSQL), metrics, configuration and the life cycle.
//! - [`keyholder`]: the place for the key-holder role (a share of the
//!   epoch key, evaluating for serving replicas).
//! - [`tools`]: synthetic registries and the local certificate authority.
//! - [`cli`]: the command line over all of them.

pub mod cli;
pub mod keyholder;
pub mod registry;
pub mod serving;
pub mod store;
pub mod tools;
