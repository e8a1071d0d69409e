//! Tools around the roles: synthetic registries for tests, demos and
//! benchmarks, and a local certificate authority for mutual TLS.

pub mod ca;
pub mod synth;
