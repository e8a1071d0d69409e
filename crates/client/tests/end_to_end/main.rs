//! The whole check over gRPC with the real server in this process on
//! 127.0.0.1:0: every kind of row in both modes, stale epochs, a wrong proof,
//! hostile requests.

// Integration tests: a failed unwrap, expect or index is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;
mod gateway;
mod operations;
mod pir;
mod refusals;
mod rows;
mod updates;
