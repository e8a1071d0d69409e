//! What can go wrong in a session with a server, as variants a caller can
//! act on: follow a rotation, register PIR parameters again, ask another
//! replica, wait, or stop. Retry decisions match on the variant, never on
//! a message's text. The command line wraps these in `anyhow` with its own
//! context; the library does not.

use crate::pin::OlderThanPinned;

/// A session's error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The server moved to a new key epoch (a key rotation): reconnect,
    /// follow the endorsed key history, re-sync, and ask again
    /// ([`crate::Session::follow_rotation`]).
    #[error("{what}: the server's key epoch changed ({message}); reconnect to follow the rotation and re-sync")]
    StaleEpoch {
        /// The exchange refused.
        what: String,
        /// The server's words.
        message: String,
    },
    /// The server no longer holds this client's PIR public parameters
    /// (evicted, or a restarted replica): register them again.
    #[error("{what}: the server does not hold this client's PIR public parameters ({message})")]
    PirKeysUnknown {
        /// The exchange refused.
        what: String,
        /// The server's words.
        message: String,
    },
    /// The server's PIR shape changed (a registry update) since the one the
    /// queries were made for: read `ServerInfo` again and make them anew
    /// (`Session::pir_check` does, by itself).
    #[error("{what}: the server's PIR shape changed ({message})")]
    PirShapeChanged {
        /// The exchange refused.
        what: String,
        /// The server's words.
        message: String,
    },
    /// The server presents an older key epoch than the one pinned: a
    /// replica behind a rotation. Another replica may be ahead.
    #[error(transparent)]
    OlderThanPinned(#[from] OlderThanPinned),
    /// The server's key is neither the pinned one nor reached from it by
    /// endorsed rotations. Never retried: the operator must confirm a new key.
    #[error("{0}")]
    KeyNotTrusted(String),
    /// No answer came from the server: the connection could not be made or
    /// broke (refused, reset, TLS, HTTP/2 framing).
    #[error("{what}: {message}")]
    Transport {
        /// The exchange tried.
        what: String,
        /// The transport's own account, with its causes.
        message: String,
    },
    /// The server answered that it is unavailable (starting, loading its
    /// snapshot, or its audit store is down).
    #[error("{what}: the server is unavailable ({message}); check the address or retry shortly")]
    Unavailable {
        /// The exchange refused.
        what: String,
        /// The server's words.
        message: String,
    },
    /// The server refused the request with another status.
    #[error("{what}: {message} ({code:?})")]
    Status {
        /// The exchange refused.
        what: String,
        /// The gRPC status code.
        code: tonic::Code,
        /// The server's words.
        message: String,
    },
    /// The server's answer failed a check (a proof, an epoch, a digest, a
    /// malformed message): nothing is concluded from it.
    #[error("{0}")]
    Invalid(String),
    /// The server does not offer what was asked (a ciphersuite, a mode).
    #[error("{0}")]
    Unsupported(String),
    /// The connection options are unusable (a malformed URL, TLS material).
    #[error("{0}")]
    Options(String),
    /// The local tag-set cache cannot serve (missing, damaged, of another
    /// epoch, or older than allowed): sync again.
    #[error("{0}")]
    Cache(String),
    /// This client's own work failed (a worker thread, a PIR query).
    #[error("{0}")]
    Internal(String),
    /// A local file could not be read or written.
    #[error("{what}: {error}")]
    Io {
        /// What was being done, naming the file.
        what: String,
        /// The system's error.
        error: std::io::Error,
    },
}

/// A session's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whether the server rotated its key (follow it and ask again).
    #[must_use]
    pub fn is_stale_epoch(&self) -> bool {
        matches!(self, Self::StaleEpoch { .. })
    }

    /// Whether the server may answer if asked again shortly: it was not
    /// reached, or said it is unavailable.
    #[must_use]
    pub fn is_not_reached(&self) -> bool {
        matches!(self, Self::Transport { .. } | Self::Unavailable { .. })
    }

    /// An I/O error while `what`.
    pub(crate) fn io(what: impl Into<String>, error: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            error,
        }
    }

    /// A verified tag set whose index could not be built.
    pub(crate) fn lookup(e: psi_core::Error) -> Self {
        Self::Internal(format!("indexing the tag set: {e}"))
    }

    /// The server's answer failed a check: `what`, with its cause.
    pub(crate) fn invalid(what: &str, cause: impl std::fmt::Display) -> Self {
        Self::Invalid(format!("{what}: {cause}"))
    }

    /// The error for a status of the exchange `what`.
    pub(crate) fn from_status(status: &tonic::Status, what: &str) -> Self {
        let what = what.to_string();
        // The server's id of the request (its audit record's), for speaking
        // with the operator about it.
        let message = match status
            .metadata()
            .get(psi_proto::REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok())
        {
            Some(id) => format!("{}; request id {id}", status.message()),
            None => status.message().to_string(),
        };
        if status.metadata().get(psi_proto::PIR_KEYS_HEADER).is_some() {
            return Self::PirKeysUnknown { what, message };
        }
        if status.metadata().get(psi_proto::PIR_SHAPE_HEADER).is_some() {
            return Self::PirShapeChanged { what, message };
        }
        if let Some(cause) = std::error::Error::source(status) {
            return Self::Transport {
                what,
                message: format!("{message}: {}", with_causes(cause)),
            };
        }
        match status.code() {
            tonic::Code::FailedPrecondition => Self::StaleEpoch { what, message },
            tonic::Code::Unavailable => Self::Unavailable { what, message },
            code => Self::Status {
                what,
                code,
                message,
            },
        }
    }

    /// A connection that could not be made to `server`.
    pub(crate) fn connecting(server: &str, error: &tonic::transport::Error) -> Self {
        Self::Transport {
            what: format!("connecting to {server}"),
            message: with_causes(error),
        }
    }
}

/// Whether `status` came from the transport (the connection, TLS or
/// HTTP/2 framing), not from the server's answer: a status the server sent
/// carries no source error; one made by tonic from a connection's failure does.
pub(crate) fn is_transport(status: &tonic::Status) -> bool {
    std::error::Error::source(status).is_some()
}

/// An error's text followed by its causes', as `a: b: c`.
fn with_causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        let next = c.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_sorted_by_what_the_caller_does_next() {
        let status = tonic::Status::failed_precondition("key epoch 1 is not current");
        assert!(Error::from_status(&status, "evaluating").is_stale_epoch());

        let mut status = tonic::Status::failed_precondition("unknown parameters");
        status
            .metadata_mut()
            .insert(psi_proto::PIR_KEYS_HEADER, "unknown".parse().unwrap());
        assert!(matches!(
            Error::from_status(&status, "PIR query"),
            Error::PirKeysUnknown { .. }
        ));

        let status = tonic::Status::unavailable("loading");
        let e = Error::from_status(&status, "evaluating");
        assert!(matches!(e, Error::Unavailable { .. }) && e.is_not_reached());

        let status = tonic::Status::invalid_argument("bad purpose");
        let e = Error::from_status(&status, "evaluating");
        assert!(matches!(
            e,
            Error::Status {
                code: tonic::Code::InvalidArgument,
                ..
            }
        ));
        assert!(!e.is_not_reached() && !e.is_stale_epoch());
    }

    #[test]
    fn a_status_made_from_a_broken_connection_is_a_transport_error() {
        // What tonic makes of an I/O error under the call: the status has a
        // source, whatever its code and text say.
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset");
        let status = tonic::Status::from_error(Box::new(io));
        let e = Error::from_status(&status, "evaluating");
        assert!(matches!(e, Error::Transport { .. }), "{e:?}");
        assert!(e.is_not_reached());
        assert!(e.to_string().contains("connection reset"), "{e}");
    }
}
