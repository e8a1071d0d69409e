//! The institution's query log: one record per check (time, staff id,
//! calling system, purpose, the pair as given, the answer, the operator's
//! request id), kept by the institution in an embedded SQLite database
//! (mode 0600) or in its PostgreSQL (`--query-log postgres://...`, shared
//! by several gateways), hash-chained so that a record changed, deleted or
//! inserted is found by [`verify`] (`psi-client log verify`).
//!
//! This log holds personal data (the pairs asked about): it is the
//! institution's record of who asked about whom and why, which the law asks
//! it to keep; the operator never sees it.
//!
//! Record hash: `SHA-256("psi.v1.querylog" || prev || I2OSP(seq, 8) ||
//! I2OSP(time_ms, 8) || salt || each text field as I2OSP(len, 8) ||
//! bytes)`, fields in the order staff, caller, purpose, mode, name, id,
//! result, request_id, commitment; `prev` is the previous record's hash (32
//! zero bytes for the first).
//!
//! Each record has a random salt, and names the commitment
//! (`psi_core::commitment`) its request carried to the operator, whose audit
//! trail keeps it: [`open`] gives a regulator a period's records grouped by
//! commitment, to check against the operator's chain
//! (`psi-server audit check-openings`).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};

/// How long records are kept unless said otherwise: three years.
pub const DEFAULT_RETENTION_DAYS: u64 = 3 * 366;

/// One check, as logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    /// Milliseconds since the Unix epoch.
    pub time_ms: i64,
    /// Who at the institution asked (the gateway's `X-Staff-Id`).
    pub staff: String,
    /// Which internal system asked (its API token's name), or the command.
    pub caller: String,
    /// The declared purpose.
    pub purpose: String,
    /// `sync`, `bucket` or `pir`.
    pub mode: String,
    /// The name as given.
    pub name: String,
    /// The ID number as given.
    pub id: String,
    /// `match`, `no_match`, `invalid` or `error`.
    pub result: String,
    /// The operator's request id (empty when nothing was sent; for a row
    /// of a batch, the batch's first and last ids as `FIRST..LAST`).
    pub request_id: String,
    /// Random, per record: what keeps its commitment from being tested
    /// against guessed pairs.
    pub salt: [u8; 32],
    /// The commitment (hex) the request carried, to this record and those
    /// committed with it; empty when none was sent.
    pub commitment: String,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl LogRecord {
    /// A record stamped now.
    #[must_use]
    #[allow(clippy::too_many_arguments)]
    pub fn now(
        staff: &str,
        caller: &str,
        purpose: &str,
        mode: &str,
        name: &str,
        id: &str,
        result: &str,
        request_id: &str,
    ) -> Self {
        let mut salt = [0u8; 32];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut salt);
        Self {
            time_ms: now_ms(),
            staff: staff.into(),
            caller: caller.into(),
            purpose: purpose.into(),
            mode: mode.into(),
            name: name.into(),
            id: id.into(),
            result: result.into(),
            request_id: request_id.into(),
            salt,
            commitment: String::new(),
        }
    }

    /// What a request commits to of this record.
    #[must_use]
    pub fn entry(&self) -> psi_core::commitment::CommittedEntry {
        psi_core::commitment::CommittedEntry {
            salt: self.salt,
            time_ms: self.time_ms,
            staff: self.staff.clone(),
            caller: self.caller.clone(),
            purpose: self.purpose.clone(),
            mode: self.mode.clone(),
            name: self.name.clone(),
            id: self.id.clone(),
        }
    }

    fn hash(&self, prev: &[u8], seq: i64) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"psi.v1.querylog");
        h.update(prev);
        h.update(seq.to_be_bytes());
        h.update(self.time_ms.to_be_bytes());
        h.update(self.salt);
        for field in [
            &self.staff,
            &self.caller,
            &self.purpose,
            &self.mode,
            &self.name,
            &self.id,
            &self.result,
            &self.request_id,
            &self.commitment,
        ] {
            h.update((field.len() as u64).to_be_bytes());
            h.update(field.as_bytes());
        }
        h.finalize().into()
    }
}

/// Where checks are recorded, and as whom: the log, the person asking, the
/// calling system and the declared purpose.
#[derive(Debug, Clone)]
pub struct LogTarget {
    /// The query log.
    pub log: QueryLog,
    /// Who asks (`--staff`, the gateway's `X-Staff-Id`).
    pub staff: String,
    /// The calling system (an API token's name, or the command).
    pub caller: String,
    /// The declared purpose.
    pub purpose: String,
}

impl LogTarget {
    /// The record of a check of (`name`, `id`) in `mode`, stamped now, its
    /// answer not yet known.
    #[must_use]
    pub fn record(&self, mode: crate::QueryMode, name: &str, id: &str) -> LogRecord {
        LogRecord::now(
            &self.staff,
            &self.caller,
            &self.purpose,
            crate::gateway::mode_name(mode),
            name,
            id,
            "",
            "",
        )
    }

    /// Appends `records` durably (one transaction), off the async threads.
    ///
    /// # Errors
    /// The log cannot be written (then none of them is).
    pub async fn append(&self, records: Vec<LogRecord>) -> Result<()> {
        let log = self.log.clone();
        tokio::task::spawn_blocking(move || log.append_all(&records).map(|_| ()))
            .await
            .context("the query log's writer")?
    }

    /// One check recorded: its record is made first, `ask` gets a session
    /// whose requests carry the commitment to it, and the record (with the
    /// answer, or `error` when `ask` failed) is durable before this
    /// returns. Returns what `ask` returned and the operator's request id
    /// (none when nothing was sent: an invalid pair).
    ///
    /// # Errors
    /// The log cannot be written: then the answer must not be given.
    pub async fn check<E, Fut>(
        &self,
        session: &crate::Session,
        name: &str,
        id: &str,
        mode: crate::QueryMode,
        ask: impl FnOnce(crate::Session) -> Fut,
    ) -> Result<(
        std::result::Result<crate::check::CheckOutcome, E>,
        Option<String>,
    )>
    where
        Fut: std::future::Future<Output = std::result::Result<crate::check::CheckOutcome, E>>,
    {
        let mut record = self.record(mode, name, id);
        let commitment = psi_core::commitment::commit(&[record.entry()]);
        let session = session
            .with_own_request_ids()
            .with_log_commitment(commitment);
        let outcome = ask(session.clone()).await;
        let request_id = session.request_ids().map(|(_, last)| last);
        record.result = outcome
            .as_ref()
            .map_or("error", crate::check::CheckOutcome::result)
            .into();
        if let Some(id) = &request_id {
            record.request_id.clone_from(id);
        }
        // Recorded when a request may have carried it: not for an invalid
        // pair, which is never sent (a failed attempt that never reached
        // the operator is no finding of `check-openings`).
        if request_id.is_some() || outcome.is_err() {
            record.commitment = hex::encode(commitment);
        }
        self.append(vec![record]).await?;
        Ok((outcome, request_id))
    }
}

/// Whether `path` names a PostgreSQL database (`postgres://` or
/// `postgresql://`) rather than an SQLite file.
fn postgres_url(path: &Path) -> Option<&str> {
    path.to_str()
        .filter(|s| s.starts_with("postgres://") || s.starts_with("postgresql://"))
}

/// Where a log is, as messages name it: the file, or "the PostgreSQL query
/// log" (a URL may carry a password; it is never echoed).
#[must_use]
pub fn place(path: &Path) -> String {
    match postgres_url(path) {
        Some(_) => "the PostgreSQL query log".into(),
        None => format!("the query log {}", path.display()),
    }
}

/// The database a log is kept in.
enum Backend {
    /// Embedded: one file, mode 0600.
    Sqlite(Connection),
    /// The institution's PostgreSQL (`--query-log postgres://...`): shared
    /// by its gateways, kept and backed up with its other records.
    Postgres(psi_pg::Pg),
}

/// An open query log. Cloning shares the connection; appends are serialised.
#[derive(Clone)]
pub struct QueryLog {
    place: String,
    db: Arc<Mutex<Backend>>,
}

impl std::fmt::Debug for QueryLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryLog")
            .field("place", &self.place)
            .finish()
    }
}

const SQLITE_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS querylog (
    seq INTEGER PRIMARY KEY,
    time_ms INTEGER NOT NULL,
    staff TEXT NOT NULL,
    caller TEXT NOT NULL,
    purpose TEXT NOT NULL,
    mode TEXT NOT NULL,
    name TEXT NOT NULL,
    id TEXT NOT NULL,
    result TEXT NOT NULL,
    request_id TEXT NOT NULL,
    salt BLOB NOT NULL,
    commitment TEXT NOT NULL,
    hash BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS querylog_anchor (seq INTEGER NOT NULL, hash BLOB NOT NULL)";

const POSTGRES_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS querylog (
    seq BIGINT PRIMARY KEY,
    time_ms BIGINT NOT NULL,
    staff TEXT NOT NULL,
    caller TEXT NOT NULL,
    purpose TEXT NOT NULL,
    mode TEXT NOT NULL,
    name TEXT NOT NULL,
    id TEXT NOT NULL,
    result TEXT NOT NULL,
    request_id TEXT NOT NULL,
    salt BYTEA NOT NULL,
    commitment TEXT NOT NULL,
    hash BYTEA NOT NULL
);
CREATE TABLE IF NOT EXISTS querylog_anchor (seq BIGINT NOT NULL, hash BYTEA NOT NULL)";

const COLUMNS: &str =
    "seq, time_ms, staff, caller, purpose, mode, name, id, result, request_id, salt, commitment, hash";

const INSERT: &str = "INSERT INTO querylog (seq, time_ms, staff, caller, purpose, mode, name, id, result, request_id, salt, commitment, hash)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)";

type Row = (i64, LogRecord, Vec<u8>);

impl Backend {
    /// Opens the log at `path` (a file, created 0600, or a PostgreSQL URL),
    /// its tables created if missing; `create` false opens only a log that
    /// exists, read-only when it is a file.
    fn open(path: &Path, create: bool) -> Result<Self> {
        if let Some(url) = postgres_url(path) {
            let mut pg = psi_pg::Pg::connect(url, "the query log", psi_pg::Use::Maintenance)?;
            if create {
                pg.batch_execute(POSTGRES_SCHEMA)?;
            }
            return Ok(Self::Postgres(pg));
        }
        if !create {
            let db = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .with_context(|| format!("opening the query log {}", path.display()))?;
            return Ok(Self::Sqlite(db));
        }
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        // Created 0600 before SQLite opens it: it holds the pairs asked about.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("opening the query log {}", path.display()))?;
        let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            bail!(
                "the query log {} has mode {mode:o}: it holds names and ID numbers; chmod 600 it",
                path.display()
            );
        }
        let db = Connection::open(path)
            .with_context(|| format!("opening the query log {}", path.display()))?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        db.execute_batch(SQLITE_SCHEMA)?;
        Ok(Self::Sqlite(db))
    }

    /// The records `tail` selects (`ORDER BY ...`, `LIMIT ...`).
    fn rows(&mut self, tail: &str) -> Result<Vec<Row>> {
        let sql = format!("SELECT {COLUMNS} FROM querylog {tail}");
        let salt = |b: Vec<u8>| b.try_into().unwrap_or([0u8; 32]);
        match self {
            Self::Sqlite(db) => {
                let mut stmt = db.prepare(&sql)?;
                let rows = stmt
                    .query_map([], |r| {
                        Ok((
                            r.get(0)?,
                            LogRecord {
                                time_ms: r.get(1)?,
                                staff: r.get(2)?,
                                caller: r.get(3)?,
                                purpose: r.get(4)?,
                                mode: r.get(5)?,
                                name: r.get(6)?,
                                id: r.get(7)?,
                                result: r.get(8)?,
                                request_id: r.get(9)?,
                                salt: salt(r.get(10)?),
                                commitment: r.get(11)?,
                            },
                            r.get(12)?,
                        ))
                    })?
                    .collect::<rusqlite::Result<Vec<Row>>>()?;
                Ok(rows)
            }
            Self::Postgres(pg) => {
                let mut out = Vec::new();
                pg.for_each_row(&sql, &[], |r| {
                    out.push((
                        r.try_get(0)?,
                        LogRecord {
                            time_ms: r.try_get(1)?,
                            staff: r.try_get(2)?,
                            caller: r.try_get(3)?,
                            purpose: r.try_get(4)?,
                            mode: r.try_get(5)?,
                            name: r.try_get(6)?,
                            id: r.try_get(7)?,
                            result: r.try_get(8)?,
                            request_id: r.try_get(9)?,
                            salt: salt(r.try_get(10)?),
                            commitment: r.try_get(11)?,
                        },
                        r.try_get(12)?,
                    ));
                    Ok(())
                })?;
                Ok(out)
            }
        }
    }

    /// The last record removed by pruning, if any: where the chain starts.
    fn anchor(&mut self) -> Result<Option<(i64, Vec<u8>)>> {
        const SQL: &str = "SELECT seq, hash FROM querylog_anchor LIMIT 1";
        match self {
            Self::Sqlite(db) => Ok(db
                .query_row(SQL, [], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
                // A log never pruned, written before the table existed.
                .unwrap_or(None)),
            Self::Postgres(pg) => Ok(match pg.query_opt(SQL, &[])? {
                Some(r) => Some((r.try_get(0)?, r.try_get(1)?)),
                None => None,
            }),
        }
    }

    /// Appends `records` after the last one, in one transaction; returns
    /// the last sequence number.
    fn append(&mut self, records: &[LogRecord]) -> Result<i64> {
        match self {
            Self::Sqlite(db) => {
                let tx = db.transaction()?;
                let last: Option<(i64, Vec<u8>)> = tx
                    .query_row(
                        "SELECT seq, hash FROM querylog ORDER BY seq DESC LIMIT 1",
                        [],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
                let (mut seq, mut prev) = last.unwrap_or((0, vec![0u8; 32]));
                for record in records {
                    seq += 1;
                    let hash = record.hash(&prev, seq);
                    tx.execute(
                        INSERT,
                        params![
                            seq,
                            record.time_ms,
                            record.staff,
                            record.caller,
                            record.purpose,
                            record.mode,
                            record.name,
                            record.id,
                            record.result,
                            record.request_id,
                            record.salt.as_slice(),
                            record.commitment,
                            hash.as_slice()
                        ],
                    )?;
                    prev = hash.to_vec();
                }
                tx.commit()?;
                Ok(seq)
            }
            Self::Postgres(pg) => {
                // Gateways sharing the database take turns at the chain's end.
                pg.batch_execute("BEGIN; LOCK TABLE querylog IN EXCLUSIVE MODE")?;
                let appended = (|| -> Result<i64> {
                    let last = pg.query_opt(
                        "SELECT seq, hash FROM querylog ORDER BY seq DESC LIMIT 1",
                        &[],
                    )?;
                    let (mut seq, mut prev): (i64, Vec<u8>) = match last {
                        Some(r) => (r.try_get(0)?, r.try_get(1)?),
                        None => (0, vec![0u8; 32]),
                    };
                    for record in records {
                        seq += 1;
                        let hash = record.hash(&prev, seq).to_vec();
                        let salt = record.salt.to_vec();
                        pg.execute(
                            INSERT,
                            &[
                                &seq,
                                &record.time_ms,
                                &record.staff,
                                &record.caller,
                                &record.purpose,
                                &record.mode,
                                &record.name,
                                &record.id,
                                &record.result,
                                &record.request_id,
                                &salt,
                                &record.commitment,
                                &hash,
                            ],
                        )?;
                        prev = hash;
                    }
                    pg.batch_execute("COMMIT")?;
                    Ok(seq)
                })();
                if appended.is_err() {
                    let _ = pg.batch_execute("ROLLBACK");
                }
                appended
            }
        }
    }

    /// Removes the records before `cutoff_ms` from the chain's front,
    /// keeping the last removed one's hash as the anchor; returns how many.
    fn prune(&mut self, cutoff_ms: i64) -> Result<u64> {
        const LAST_OLD: &str =
            "SELECT seq, hash FROM querylog WHERE time_ms < $1 ORDER BY seq DESC LIMIT 1";
        match self {
            Self::Sqlite(db) => {
                let tx = db.transaction()?;
                let anchor: Option<(i64, Vec<u8>)> = tx
                    .query_row(LAST_OLD, [cutoff_ms], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?;
                let Some((seq, hash)) = anchor else {
                    return Ok(0);
                };
                tx.execute("DELETE FROM querylog_anchor", [])?;
                tx.execute(
                    "INSERT INTO querylog_anchor (seq, hash) VALUES ($1, $2)",
                    params![seq, hash],
                )?;
                let n = tx.execute("DELETE FROM querylog WHERE seq <= $1", [seq])?;
                tx.commit()?;
                Ok(n as u64)
            }
            Self::Postgres(pg) => {
                pg.batch_execute("BEGIN; LOCK TABLE querylog IN EXCLUSIVE MODE")?;
                let pruned = (|| -> Result<u64> {
                    let Some(r) = pg.query_opt(LAST_OLD, &[&cutoff_ms])? else {
                        pg.batch_execute("COMMIT")?;
                        return Ok(0);
                    };
                    let (seq, hash): (i64, Vec<u8>) = (r.try_get(0)?, r.try_get(1)?);
                    pg.execute("DELETE FROM querylog_anchor", &[])?;
                    pg.execute(
                        "INSERT INTO querylog_anchor (seq, hash) VALUES ($1, $2)",
                        &[&seq, &hash],
                    )?;
                    let n = pg.execute("DELETE FROM querylog WHERE seq <= $1", &[&seq])?;
                    pg.batch_execute("COMMIT")?;
                    Ok(n)
                })();
                if pruned.is_err() {
                    let _ = pg.batch_execute("ROLLBACK");
                }
                pruned
            }
        }
    }
}

impl QueryLog {
    /// Opens the log at `path`: an SQLite file (created mode 0600) or a
    /// PostgreSQL URL (`postgres://...`; TLS to a database off this host
    /// as for the operator's audit trail). A log whose last record does
    /// not hash to itself is refused: appending would extend a chain that
    /// no longer verifies.
    ///
    /// Blocks (PostgreSQL is reached on a runtime of its own): call it off
    /// async threads ([`QueryLog::opened`]).
    ///
    /// # Errors
    /// An unreadable, damaged, or group- or world-readable file; an
    /// unreachable or refusing database.
    pub fn open(path: &Path) -> Result<Self> {
        let log = Self {
            place: place(path),
            db: Arc::new(Mutex::new(Backend::open(path, true)?)),
        };
        log.check_tail()?;
        Ok(log)
    }

    /// [`QueryLog::open`] from async code.
    ///
    /// # Errors
    /// As [`QueryLog::open`].
    pub async fn opened(path: &Path) -> Result<Self> {
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || Self::open(&path))
            .await
            .context("opening the query log")?
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Backend> {
        self.db
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn check_tail(&self) -> Result<()> {
        let rows = self.lock().rows("ORDER BY seq DESC LIMIT 2")?;
        if let Some((seq, record, hash)) = rows.first() {
            let prev = rows.get(1).map_or(vec![0u8; 32], |r| r.2.clone());
            if record.hash(&prev, *seq).as_slice() != hash.as_slice() {
                bail!(
                    "{}: its last record ({seq}) was changed; `psi-client log verify` says more",
                    self.place
                );
            }
        }
        Ok(())
    }

    /// Appends `record` durably; returns its sequence number.
    ///
    /// # Errors
    /// The database cannot be written.
    pub fn append(&self, record: &LogRecord) -> Result<i64> {
        self.append_all(std::slice::from_ref(record))
    }

    /// Appends `records` durably, in one transaction (a batch's chunk);
    /// returns the last one's sequence number (0 for none).
    ///
    /// # Errors
    /// The database cannot be written (then none of them is).
    pub fn append_all(&self, records: &[LogRecord]) -> Result<i64> {
        self.lock()
            .append(records)
            .with_context(|| format!("appending to {}", self.place))
    }

    /// Removes the records older than `retention_days` from the front of
    /// the chain (the first kept record's `prev` is then the last removed's
    /// hash: [`verify`] starts from the first record's stored predecessor).
    ///
    /// # Errors
    /// The database cannot be written.
    pub fn prune(&self, retention_days: u64) -> Result<u64> {
        let cutoff = now_ms().saturating_sub(
            i64::try_from(retention_days.saturating_mul(86_400_000)).unwrap_or(i64::MAX),
        );
        self.lock().prune(cutoff)
    }
}

/// Walks the whole chain of the log at `path` (a file or a PostgreSQL
/// URL); returns how many records it holds. Blocks.
///
/// # Errors
/// The first record that was changed, or a gap (a record deleted or
/// inserted), named by its sequence number.
pub fn verify(path: &Path) -> Result<u64> {
    let mut db = Backend::open(path, false)?;
    let (mut expected_seq, mut prev) = db.anchor()?.map_or((1, vec![0u8; 32]), |(s, h)| (s + 1, h));
    let mut n = 0;
    for (seq, record, hash) in db.rows("ORDER BY seq")? {
        if seq != expected_seq {
            bail!("record {expected_seq} is missing (the next one is {seq}): records were deleted");
        }
        if record.hash(&prev, seq).as_slice() != hash.as_slice() {
            bail!("record {seq}: its content was changed, or a record was inserted before it");
        }
        prev = hash;
        expected_seq += 1;
        n += 1;
    }
    Ok(n)
}

/// A period's records, grouped by the commitment their requests carried:
/// what a regulator checks against the operator's audit trail.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Openings {
    /// From (ms since the Unix epoch, inclusive).
    pub since_ms: i64,
    /// Until (exclusive).
    pub until_ms: i64,
    /// One group per commitment, in log order.
    pub groups: Vec<OpenedGroup>,
}

/// The records one commitment was made to, with what opens it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OpenedGroup {
    /// The commitment (hex), as the operator's audit record holds it.
    pub commitment: String,
    /// The records, in the order committed.
    pub records: Vec<OpenedRecord>,
}

/// One opened record.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OpenedRecord {
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
    /// The name as given.
    pub name: String,
    /// The ID number as given.
    pub id: String,
    /// The answer.
    pub result: String,
    /// The operator's request id.
    pub request_id: String,
}

impl OpenedRecord {
    /// What was committed of it.
    ///
    /// # Errors
    /// A salt that is not 32 bytes of hex.
    pub fn entry(&self) -> Result<psi_core::commitment::CommittedEntry> {
        let salt: [u8; 32] = hex::decode(&self.salt)
            .ok()
            .and_then(|b| b.try_into().ok())
            .context("a salt is not 32 bytes of hex")?;
        Ok(psi_core::commitment::CommittedEntry {
            salt,
            time_ms: self.time_ms,
            staff: self.staff.clone(),
            caller: self.caller.clone(),
            purpose: self.purpose.clone(),
            mode: self.mode.clone(),
            name: self.name.clone(),
            id: self.id.clone(),
        })
    }
}

/// The openings of the log at `path` for `[since_ms, until_ms)`: every
/// commitment made in that period with all its records (a group begun in
/// the period is given whole). Checks the chain first.
///
/// # Errors
/// A log whose chain does not verify.
pub fn open(path: &Path, since_ms: i64, until_ms: i64) -> Result<Openings> {
    verify(path)?;
    let mut groups: Vec<OpenedGroup> = Vec::new();
    let mut in_period = std::collections::HashSet::new();
    let rows = Backend::open(path, false)?.rows("ORDER BY seq")?;
    for (_, r, _) in &rows {
        if !r.commitment.is_empty() && (since_ms..until_ms).contains(&r.time_ms) {
            in_period.insert(r.commitment.clone());
        }
    }
    for (_, r, _) in rows {
        if !in_period.contains(&r.commitment) {
            continue;
        }
        let record = OpenedRecord {
            salt: hex::encode(r.salt),
            time_ms: r.time_ms,
            staff: r.staff,
            caller: r.caller,
            purpose: r.purpose,
            mode: r.mode,
            name: r.name,
            id: r.id,
            result: r.result,
            request_id: r.request_id,
        };
        match groups.iter_mut().find(|g| g.commitment == r.commitment) {
            Some(g) => g.records.push(record),
            None => groups.push(OpenedGroup {
                commitment: r.commitment,
                records: vec![record],
            }),
        }
    }
    Ok(Openings {
        since_ms,
        until_ms,
        groups,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn record(i: usize) -> LogRecord {
        LogRecord::now(
            "staff-7",
            "onboarding",
            "kyc-onboarding",
            "bucket",
            "张伟",
            "11010519491231002X",
            if i.is_multiple_of(2) {
                "match"
            } else {
                "no_match"
            },
            &format!("{i:032x}"),
        )
    }

    #[test]
    fn the_chain_finds_a_changed_a_deleted_and_an_inserted_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.sqlite");
        let log = QueryLog::open(&path).unwrap();
        for i in 0..5 {
            assert_eq!(log.append(&record(i)).unwrap(), i as i64 + 1);
        }
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(verify(&path).unwrap(), 5);
        let db = Connection::open(&path).unwrap();
        db.execute("UPDATE querylog SET result = 'match' WHERE seq = 2", [])
            .unwrap();
        let err = verify(&path).unwrap_err().to_string();
        assert!(err.contains("record 2"), "{err}");
        db.execute("UPDATE querylog SET result = 'no_match' WHERE seq = 2", [])
            .unwrap();
        verify(&path).unwrap();
        db.execute("DELETE FROM querylog WHERE seq = 3", [])
            .unwrap();
        let err = verify(&path).unwrap_err().to_string();
        assert!(err.contains("record 3 is missing"), "{err}");
        // A record slipped in with a plausible hash of its own is found.
        let fake = record(9);
        let h = fake.hash(&[0u8; 32], 3);
        db.execute(
            "INSERT INTO querylog VALUES (3, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            params![
                fake.time_ms,
                fake.staff,
                fake.caller,
                fake.purpose,
                fake.mode,
                fake.name,
                fake.id,
                fake.result,
                fake.request_id,
                fake.salt.as_slice(),
                fake.commitment,
                h.as_slice()
            ],
        )
        .unwrap();
        assert!(verify(&path).is_err());
        // An edited last record: the log refuses to extend it.
        db.execute("UPDATE querylog SET staff = 'x' WHERE seq = 5", [])
            .unwrap();
        drop(log);
        assert!(QueryLog::open(&path).is_err());
    }

    #[test]
    fn pruning_keeps_the_rest_verifiable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.sqlite");
        let log = QueryLog::open(&path).unwrap();
        for i in 0..4 {
            let mut r = record(i);
            if i < 2 {
                r.time_ms -= 10 * 86_400_000;
            }
            log.append(&r).unwrap();
        }
        assert_eq!(log.prune(5).unwrap(), 2);
        assert_eq!(verify(&path).unwrap(), 2);
        log.append(&record(5)).unwrap();
        assert_eq!(verify(&path).unwrap(), 3);
    }
}
