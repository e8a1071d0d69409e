//! `psi-client`: an institution's side of the private (name, ID) match
//! service, as a library and a command line.
//!
//! - [`session`]: connect, pin the server's key and epoch, evaluate with
//!   verified proofs, query buckets, sync the tag set.
//! - [`batch`]: answer a CSV file row by row with bounded memory.
//! - [`check`]: answer one pair.
//! - [`pin`]: trust on first use, or a key given by flag.
//! - [`pir`]: PIR mode's secret seed and registered public parameters.
//! - [`config`]: the configuration file (flags > environment > file > defaults).
//! - [`error`]: what can go wrong in a session, as variants a caller acts on.
//! - [`gateway`]: `psi-client serve`, the institution's HTTP/JSON gateway.
//! - [`querylog`]: the institution's hash-chained log of every check.

pub mod batch;
pub mod check;
pub mod cli;
pub mod config;
pub mod error;
pub mod gateway;
pub mod pin;
pub mod pir;
pub mod querylog;
pub mod session;

pub use error::Error;
pub use session::{Answers, ConnectOptions, Session};

/// How membership is tested.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QueryMode {
    /// Download the tag set once, refresh changed shards, test locally.
    Sync,
    /// No download: send the record's bucket, receive that bucket's tags.
    Bucket,
    /// No download, and the server learns not even the bucket: a private
    /// information retrieval of the bucket's fingerprints.
    Pir,
}
