//! `psi-server audit check-openings`: a regulator checks an institution's
//! opened query-log entries for a period (`psi-client log open`) against
//! the operator's audit chain, without the operator having seen them:
//! every group of entries must hash to the commitment it claims
//! (`psi_core::commitment`), every request of that institution in the
//! period that evaluated elements must carry a commitment that is opened,
//! and every opened commitment must be one of its requests'. What is
//! checked: nothing missing, nothing added, nothing changed.

use std::collections::HashSet;

use anyhow::{bail, Context, Result};
use psi_core::commitment::{commit, CommittedEntry};
use serde::Deserialize;

use crate::serving::audit::store::{Db, Val, ROW_COLUMNS};
use crate::serving::audit::{verify, AuditStore};
use psi_pg::Use;

/// The openings file (`psi-client log open`), as the institution gives it.
#[derive(Debug, Deserialize)]
pub struct Openings {
    /// From (ms since the Unix epoch, inclusive).
    pub since_ms: i64,
    /// Until (exclusive).
    pub until_ms: i64,
    /// One group per commitment.
    pub groups: Vec<Group>,
}

/// The entries one commitment was made to.
#[derive(Debug, Deserialize)]
pub struct Group {
    /// The commitment (hex).
    pub commitment: String,
    /// The entries, in the order committed.
    pub records: Vec<Record>,
}

/// One opened entry (the answer and request id are carried but not
/// committed: they were not known when the request was sent).
#[derive(Debug, Deserialize)]
pub struct Record {
    /// The salt (hex).
    pub salt: String,
    /// Milliseconds since the Unix epoch.
    pub time_ms: i64,
    /// Who asked.
    pub staff: String,
    /// The calling system.
    pub caller: String,
    /// The declared purpose.
    pub purpose: String,
    /// The mode.
    pub mode: String,
    /// The name.
    pub name: String,
    /// The ID number.
    pub id: String,
    /// The answer the institution recorded (`error`: none came).
    pub result: String,
}

/// What the check found when everything held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpeningsCheck {
    /// The institution's requests in the period that evaluated elements.
    pub requests: u64,
    /// Groups of entries opened (distinct commitments).
    pub groups: u64,
    /// Entries opened.
    pub entries: u64,
}

/// Checks `openings` (JSON) for `institution` against the audit chain.
///
/// # Errors
/// A chain that does not verify; a malformed file; and, listed, every
/// group whose entries do not make its commitment, every request not
/// opened, every opened commitment no request carried.
pub fn check_openings(
    store: impl Into<AuditStore>,
    institution: &str,
    openings: &str,
) -> Result<OpeningsCheck> {
    let store = store.into();
    verify(store.clone())?;
    let openings: Openings = serde_json::from_str(openings)
        .context("the openings file is not the JSON `psi-client log open` writes")?;
    let mut problems = Vec::new();
    let mut opened = HashSet::new();
    let mut entries = 0u64;
    for (k, g) in openings.groups.iter().enumerate() {
        let records: Result<Vec<CommittedEntry>> = g
            .records
            .iter()
            .map(|r| {
                let salt: [u8; 32] = hex::decode(&r.salt)
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .context("a salt is not 32 bytes of hex")?;
                Ok(CommittedEntry {
                    salt,
                    time_ms: r.time_ms,
                    staff: r.staff.clone(),
                    caller: r.caller.clone(),
                    purpose: r.purpose.clone(),
                    mode: r.mode.clone(),
                    name: r.name.clone(),
                    id: r.id.clone(),
                })
            })
            .collect();
        let records = records.with_context(|| format!("group {}", k + 1))?;
        entries += records.len() as u64;
        if hex::encode(commit(&records)) != g.commitment.to_ascii_lowercase() {
            problems.push(format!(
                "group {} ({} entries): its entries do not make its commitment {}: changed, added or left out",
                k + 1,
                records.len(),
                g.commitment
            ));
        }
        opened.insert(g.commitment.to_ascii_lowercase());
    }
    let mut db = Db::open(&store, Use::Maintenance)?;
    let mut carried = HashSet::new();
    let mut requests = 0u64;
    db.for_each_row(
        &format!(
            "SELECT {ROW_COLUMNS} FROM audit WHERE institution = $1 AND time_unix_ms >= $2 AND time_unix_ms < $3 ORDER BY seq"
        ),
        &[
            Val::Text(institution.to_string()),
            Val::Int(openings.since_ms),
            Val::Int(openings.until_ms),
        ],
        |row| {
            let e = &row.entry;
            if e.elements == 0 {
                return Ok(());
            }
            requests += 1;
            if e.commitment.is_empty() {
                problems.push(format!(
                    "request {} ({} at {} ms) carried no commitment to log entries",
                    e.request_id, e.method, e.time_unix_ms
                ));
            } else if !opened.contains(&e.commitment) {
                problems.push(format!(
                    "request {} ({} at {} ms): its commitment is not opened (entries missing from the log or the openings)",
                    e.request_id, e.method, e.time_unix_ms
                ));
            }
            carried.insert(e.commitment.clone());
            Ok(())
        },
    )?;
    for g in &openings.groups {
        // A failed attempt that never reached the operator is no finding.
        let attempt = !g.records.is_empty() && g.records.iter().all(|r| r.result == "error");
        if !attempt && !carried.contains(&g.commitment.to_ascii_lowercase()) {
            problems.push(format!(
                "commitment {}: no request of {institution} in the period carried it (entries added)",
                g.commitment
            ));
        }
    }
    if !problems.is_empty() {
        let shown: Vec<String> = problems.iter().take(20).cloned().collect();
        bail!(
            "{} problems:\n  {}{}",
            problems.len(),
            shown.join("\n  "),
            if problems.len() > 20 { "\n  ..." } else { "" }
        );
    }
    Ok(OpeningsCheck {
        requests,
        groups: openings.groups.len() as u64,
        entries,
    })
}
