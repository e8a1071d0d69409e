//! One pair, one answer.

use psi_core::Record;

use crate::error::{Error, Result};
use crate::session::Session;
use crate::QueryMode;

/// The answer for one pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckOutcome {
    /// The pair is in the registry.
    Match,
    /// It is not.
    NoMatch,
    /// The input is not a valid pair; nothing was sent.
    Invalid(String),
}

impl CheckOutcome {
    /// The word the CLI prints and writes in a batch's `result` column.
    #[must_use]
    pub fn result(&self) -> &'static str {
        match self {
            CheckOutcome::Match => "match",
            CheckOutcome::NoMatch => "no_match",
            CheckOutcome::Invalid(_) => "invalid",
        }
    }

    /// Why the input is invalid, if it is.
    #[must_use]
    pub fn reason(&self) -> Option<&str> {
        match self {
            CheckOutcome::Invalid(reason) => Some(reason),
            _ => None,
        }
    }
}

/// Checks one (name, ID) pair. In sync mode the local tag set is refreshed first.
///
/// # Errors
/// RPC or proof failures (an invalid input is an outcome, not an error).
pub async fn check(
    session: &Session,
    name: &str,
    id: &str,
    mode: QueryMode,
) -> Result<CheckOutcome> {
    let record = match Record::parse(name, id, psi_core::CivilDate::today()) {
        Ok(r) => r,
        Err(e) => return Ok(CheckOutcome::Invalid(e.to_string())),
    };
    match check_record(session, &record, mode).await {
        // The server rotated its key: follow the endorsed rotation, ask again.
        Err(e) if e.is_stale_epoch() => {
            check_record(&session.follow_rotation().await?, &record, mode).await
        }
        answered => answered,
    }
}

async fn check_record(session: &Session, record: &Record, mode: QueryMode) -> Result<CheckOutcome> {
    let found = match mode {
        QueryMode::Bucket => {
            session
                .bucket_check(std::slice::from_ref(record))
                .await?
                .found
        }
        QueryMode::Pir => session.pir_check(std::slice::from_ref(record)).await?.found,
        QueryMode::Sync => {
            let lookup = session.sync().await?.set.lookup().map_err(Error::lookup)?;
            let outputs = session.evaluate(vec![record.encode()]).await?;
            outputs.iter().map(|o| lookup.contains(o.tag())).collect()
        }
    };
    Ok(if found.first() == Some(&true) {
        CheckOutcome::Match
    } else {
        CheckOutcome::NoMatch
    })
}
