//! The key-holder role: a process holding one share of an epoch's OPRF key
//! and evaluating blinded elements for serving replicas and the encoding
//! side, so that no single host holds the whole key. Not built yet: the
//! single-key mode keeps the key file in the data directory (`store::keystore`).
