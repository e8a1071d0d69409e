//! The one mapping from the server's errors to gRPC status codes. Details
//! that help the peer act go into the message; nothing secret or personal
//! ever does (the service never sees names or ID numbers).

use psi_proto::RETRY_AFTER_MS;
use tonic::{Code, Status};

/// Why a request was refused.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The snapshot is still loading.
    #[error("the registry is loading; retry shortly")]
    Loading,
    /// The request names another key epoch than the server's.
    #[error("key epoch {client} is stale: the server is at epoch {server}; fetch ServerInfo, re-pin and re-sync")]
    StaleEpoch {
        /// Epoch in the request.
        client: u64,
        /// The server's epoch.
        server: u64,
    },
    /// This replica cannot answer now but another one (or this one a
    /// moment later) can: a newer key epoch not loaded here yet, or the
    /// shared quota database out of reach.
    #[error("{0}; retry")]
    Unavailable(String),
    /// No valid client certificate under mutual TLS.
    #[error(
        "a client certificate issued by the operator's CA, naming the institution, is required"
    )]
    Unauthenticated,
    /// The institution may not do this (unknown, or a mode or purpose not allowed).
    #[error("{0}")]
    PermissionDenied(String),
    /// A quota is used up; retry after the delay.
    #[error("quota exhausted: {what}; retry in {:.1} s", retry_after.as_secs_f64())]
    QuotaExhausted {
        /// Which limit.
        what: String,
        /// When to retry.
        retry_after: std::time::Duration,
    },
    /// A malformed request.
    #[error("{0}")]
    InvalidArgument(String),
    /// A protocol step rejected the request's content.
    #[error(transparent)]
    Core(#[from] psi_core::Error),
    /// The PIR public parameters a query names are not held (never sent,
    /// evicted, a restart, or made for other dimensions): send them again.
    #[error("the PIR public parameters this query names are not held here (evicted, restarted, or for other dimensions); send them again with PirSetup")]
    PirKeysUnknown,
    /// The queries were made for another PIR shape than the database's
    /// (an update changed it): read ServerInfo again.
    #[error("the PIR database's shape changed since these queries were made (a registry update); read ServerInfo again and make them anew")]
    PirShapeChanged,
    /// The answer was ready only after the request's deadline (the
    /// client's, or `request_timeout`): the client has given up on it.
    #[error("no answer within the request's deadline")]
    DeadlineExceeded,
    /// Threshold mode, and a request from a client that does not say it
    /// combines partial evaluations.
    #[error("this server runs in threshold mode: the key exists only as shares on key holders, and each evaluation comes as their partial evaluations, to verify against ServerInfo.threshold and combine (docs/PROTOCOL.md, \"Threshold mode\"); this client does not combine them (combines_partials is unset): upgrade it")]
    ThresholdMode,
    /// The server failed internally.
    #[error("internal error")]
    Internal,
}

impl ServiceError {
    /// The gRPC status code of this error.
    #[must_use]
    pub fn code(&self) -> Code {
        match self {
            ServiceError::Loading | ServiceError::Unavailable(_) => Code::Unavailable,
            ServiceError::StaleEpoch { .. }
            | ServiceError::PirKeysUnknown
            | ServiceError::PirShapeChanged
            | ServiceError::ThresholdMode => Code::FailedPrecondition,
            ServiceError::Core(psi_core::Error::Cancelled) => Code::Cancelled,
            ServiceError::InvalidArgument(_) | ServiceError::Core(_) => Code::InvalidArgument,
            ServiceError::Unauthenticated => Code::Unauthenticated,
            ServiceError::PermissionDenied(_) => Code::PermissionDenied,
            ServiceError::QuotaExhausted { .. } => Code::ResourceExhausted,
            ServiceError::DeadlineExceeded => Code::DeadlineExceeded,
            ServiceError::Internal => Code::Internal,
        }
    }
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Self {
        let mut status = Status::new(e.code(), e.to_string());
        if let ServiceError::PirKeysUnknown = &e {
            status.metadata_mut().insert(
                psi_proto::PIR_KEYS_HEADER,
                tonic::metadata::MetadataValue::from_static("unknown"),
            );
        }
        if let ServiceError::PirShapeChanged = &e {
            status.metadata_mut().insert(
                psi_proto::PIR_SHAPE_HEADER,
                tonic::metadata::MetadataValue::from_static("changed"),
            );
        }
        if let ServiceError::QuotaExhausted { retry_after, .. } = &e {
            if let Ok(v) = retry_after.as_millis().max(1).to_string().parse() {
                status.metadata_mut().insert(RETRY_AFTER_MS, v);
            }
        }
        status
    }
}
