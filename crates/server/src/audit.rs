//! The audit trail: one record per request (time, institution, purpose,
//! method, mode, element count, outcome, request id, key epoch, registry
//! version), in an embedded SQLite database, hash-chained so that editing or
//! deleting a record is detected by `psi-server audit verify`. Never a name,
//! an ID number, a blinded element or a tag: the server never has the first
//! two, and the last two are not recorded.
//!
//! Writes are group-committed by one writer thread: a request waits until its
//! record is durable (`synchronous = FULL`) before its answer is sent, and
//! concurrent requests share one transaction and one fsync.
//!
//! The server never prunes by itself. `psi-server audit prune --before T`
//! removes the oldest records only when all of them are older than the
//! retention (3 years by default); an anchor row keeps the sequence number and
//! hash the remaining chain continues from, so it still verifies. A chain
//! proves the order and integrity of the records it holds; a truncated tail
//! (or a forged anchor) is detected only against externally kept heads
//! (`audit verify` prints the head hash and count for the operator to log
//! elsewhere).

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use rusqlite::{params, Connection};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

/// The audit database's default file name inside the data directory.
pub const AUDIT_FILE: &str = "audit.sqlite";
/// Default retention: records younger than this are never pruned (3 years).
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(3 * 366 * 86_400);
const MAX_GROUP: usize = 512;

/// One request, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    /// Milliseconds since the Unix epoch.
    pub time_unix_ms: i64,
    /// Institution id (client certificate common name, or `local`).
    pub institution: String,
    /// Declared purpose code.
    pub purpose: String,
    /// gRPC method.
    pub method: String,
    /// `sync` or `bucket`.
    pub mode: String,
    /// Elements evaluated (0 for a sync).
    pub elements: u64,
    /// `ok` or the refusal's status code.
    pub outcome: String,
    /// Random request id, also in the server's log line.
    pub request_id: String,
    /// Key epoch at the time.
    pub key_epoch: u64,
    /// Registry version at the time.
    pub registry_version: u64,
}

impl Entry {
    /// An entry stamped with the current time.
    #[must_use]
    pub fn now(institution: &str, purpose: &str, method: &str, mode: &str) -> Self {
        let time_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let mut id = [0u8; 16];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut id);
        Self {
            time_unix_ms,
            institution: institution.to_string(),
            purpose: purpose.to_string(),
            method: method.to_string(),
            mode: mode.to_string(),
            elements: 0,
            outcome: "ok".to_string(),
            request_id: id.iter().map(|b| format!("{b:02x}")).collect(),
            key_epoch: 0,
            registry_version: 0,
        }
    }
}

/// `SHA-256("psi.v1.audit" || prev || seq || each field, length-prefixed)`.
fn chain_hash(prev: &[u8], seq: i64, e: &Entry) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"psi.v1.audit");
    h.update(prev);
    h.update(seq.to_be_bytes());
    h.update(e.time_unix_ms.to_be_bytes());
    for field in [
        &e.institution,
        &e.purpose,
        &e.method,
        &e.mode,
        &e.outcome,
        &e.request_id,
    ] {
        h.update((field.len() as u64).to_be_bytes());
        h.update(field.as_bytes());
    }
    h.update(e.elements.to_be_bytes());
    h.update(e.key_epoch.to_be_bytes());
    h.update(e.registry_version.to_be_bytes());
    h.finalize().into()
}

fn open(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)
        .with_context(|| format!("opening audit database {}", path.display()))?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = FULL;
         CREATE TABLE IF NOT EXISTS audit (
             seq INTEGER PRIMARY KEY,
             time_unix_ms INTEGER NOT NULL,
             institution TEXT NOT NULL,
             purpose TEXT NOT NULL,
             method TEXT NOT NULL,
             mode TEXT NOT NULL,
             elements INTEGER NOT NULL,
             outcome TEXT NOT NULL,
             request_id TEXT NOT NULL,
             key_epoch INTEGER NOT NULL,
             registry_version INTEGER NOT NULL,
             prev_hash BLOB NOT NULL,
             hash BLOB NOT NULL
         );
         CREATE INDEX IF NOT EXISTS audit_by_institution ON audit (institution, time_unix_ms);
         CREATE TABLE IF NOT EXISTS audit_anchor (
             id INTEGER PRIMARY KEY CHECK (id = 1),
             next_seq INTEGER NOT NULL,
             prev_hash BLOB NOT NULL,
             pruned_at_unix_ms INTEGER NOT NULL
         );",
    )
    .with_context(|| format!("preparing audit database {}", path.display()))?;
    Ok(conn)
}

/// Refuses a database that SQLite finds damaged, or whose last record does
/// not hash to itself: appending would extend a chain that no longer verifies.
fn check_before_appending(conn: &Connection) -> Result<()> {
    let mut stmt = conn.prepare("PRAGMA quick_check")?;
    let problems: Vec<String> = stmt
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<_>>()?;
    if problems.first().map(String::as_str) != Some("ok") {
        bail!(
            "SQLite integrity check: {}",
            problems.into_iter().take(3).collect::<Vec<_>>().join("; ")
        );
    }
    let last = conn.query_row(
        &format!("{SELECT} ORDER BY seq DESC LIMIT 1"),
        [],
        read_entry,
    );
    match last {
        Ok((seq, entry, prev_hash, hash)) => {
            if chain_hash(&prev_hash, seq, &entry).as_slice() != hash.as_slice() {
                bail!("the last record ({seq}) was changed");
            }
            Ok(())
        }
        Err(rusqlite::Error::QueryReturnedNoRows) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

type Job = (Entry, oneshot::Sender<Result<i64, String>>);

/// The append side of the audit trail, shared by all requests.
#[derive(Debug, Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Job>,
    path: PathBuf,
}

impl AuditLog {
    /// Opens (or creates) the database and starts the writer thread.
    ///
    /// # Errors
    /// An unopenable database.
    pub fn open(path: &Path) -> Result<Self> {
        let conn = open(path)?;
        check_before_appending(&conn).with_context(|| {
            format!(
                "the audit database {} is damaged: keep it as evidence (`psi-server audit verify --db {}` says where), and serve with a new --audit-db",
                path.display(),
                path.display()
            )
        })?;
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer(conn, &rx))
            .context("starting the audit writer")?;
        Ok(Self {
            tx,
            path: path.to_path_buf(),
        })
    }

    /// The database's path.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Hands a record to the writer without waiting for it: for refusals
    /// recorded when their request is already gone.
    pub fn submit(&self, entry: Entry) {
        let (done, _) = oneshot::channel();
        if self.tx.send((entry, done)).is_err() {
            tracing::error!("the audit writer has stopped: a refusal went unrecorded");
        }
    }

    /// Appends a record and waits until it is durable. Returns its sequence number.
    ///
    /// # Errors
    /// The writer failed: the request must not be answered.
    pub async fn append(&self, entry: Entry) -> Result<i64> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send((entry, done))
            .map_err(|_| anyhow::anyhow!("the audit writer has stopped"))?;
        wait.await
            .map_err(|_| anyhow::anyhow!("the audit writer has stopped"))?
            .map_err(|e| anyhow::anyhow!("audit write failed: {e}"))
    }
}

fn writer(mut conn: Connection, rx: &mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        let started = std::time::Instant::now();
        let result = write_group(&mut conn, &group);
        tracing::debug!(
            records = group.len(),
            micros = started.elapsed().as_micros() as u64,
            "audit group committed"
        );
        match result {
            Ok(seqs) => {
                for ((_, done), seq) in group.into_iter().zip(seqs) {
                    let _ = done.send(Ok(seq));
                }
            }
            Err(e) => {
                tracing::error!("audit write failed: {e:#}");
                for (_, done) in group {
                    let _ = done.send(Err(format!("{e:#}")));
                }
            }
        }
    }
}

fn write_group(conn: &mut Connection, group: &[Job]) -> Result<Vec<i64>> {
    let tx = conn.transaction()?;
    let (mut seq, mut prev): (i64, Vec<u8>) = tx
        .query_row(
            "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok((0, vec![0u8; 32])),
            other => Err(other),
        })?;
    let mut seqs = Vec::with_capacity(group.len());
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO audit (seq, time_unix_ms, institution, purpose, method, mode, elements,
                                outcome, request_id, key_epoch, registry_version, prev_hash, hash)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
        )?;
        for (e, _) in group {
            seq += 1;
            let hash = chain_hash(&prev, seq, e);
            insert.execute(params![
                seq,
                e.time_unix_ms,
                e.institution,
                e.purpose,
                e.method,
                e.mode,
                i64::try_from(e.elements).unwrap_or(i64::MAX),
                e.outcome,
                e.request_id,
                i64::try_from(e.key_epoch).unwrap_or(i64::MAX),
                i64::try_from(e.registry_version).unwrap_or(i64::MAX),
                prev,
                hash.to_vec(),
            ])?;
            prev = hash.to_vec();
            seqs.push(seq);
        }
    }
    tx.commit()?;
    Ok(seqs)
}

/// What `verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    /// Records checked.
    pub records: u64,
    /// Hash of the last record (hex), to be kept outside the database.
    pub head: String,
}

fn read_entry(r: &rusqlite::Row<'_>) -> rusqlite::Result<(i64, Entry, Vec<u8>, Vec<u8>)> {
    Ok((
        r.get(0)?,
        Entry {
            time_unix_ms: r.get(1)?,
            institution: r.get(2)?,
            purpose: r.get(3)?,
            method: r.get(4)?,
            mode: r.get(5)?,
            elements: u64::try_from(r.get::<_, i64>(6)?).unwrap_or(0),
            outcome: r.get(7)?,
            request_id: r.get(8)?,
            key_epoch: u64::try_from(r.get::<_, i64>(9)?).unwrap_or(0),
            registry_version: u64::try_from(r.get::<_, i64>(10)?).unwrap_or(0),
        },
        r.get(11)?,
        r.get(12)?,
    ))
}

const SELECT: &str =
    "SELECT seq, time_unix_ms, institution, purpose, method, mode, elements, outcome,
                             request_id, key_epoch, registry_version, prev_hash, hash FROM audit";

/// The anchor left by a prune: the first sequence number kept and the hash
/// the chain continues from.
fn anchor(conn: &Connection) -> Result<Option<(i64, Vec<u8>)>> {
    match conn.query_row(
        "SELECT next_seq, prev_hash FROM audit_anchor WHERE id = 1",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    ) {
        Ok(a) => Ok(Some(a)),
        Err(rusqlite::Error::QueryReturnedNoRows) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Removes the records older than `before`, if all of them are older than
/// `retention` at `now`, keeping the chain verifiable. Returns how many it removed.
///
/// # Errors
/// `before` inside the retention period (nothing is removed), or database errors.
pub fn prune(path: &Path, before: SystemTime, retention: Duration, now: SystemTime) -> Result<u64> {
    let oldest_allowed = now.checked_sub(retention).unwrap_or(UNIX_EPOCH);
    if before > oldest_allowed {
        bail!(
            "refusing to prune records from the last {} days (the retention period): choose a time before {}",
            retention.as_secs() / 86_400,
            humantime::format_rfc3339_seconds(oldest_allowed)
        );
    }
    let mut conn = open(path)?;
    let tx = conn.transaction()?;
    // The records to remove are the prefix of the chain before the first
    // record at or after `before` (all of them if there is none).
    let first_kept: Option<i64> = tx.query_row(
        "SELECT MIN(seq) FROM audit WHERE time_unix_ms >= ?1",
        params![unix_ms(before)],
        |r| r.get(0),
    )?;
    let last_removed: Option<i64> = match first_kept {
        Some(kept) => tx.query_row(
            "SELECT MAX(seq) FROM audit WHERE seq < ?1",
            params![kept],
            |r| r.get(0),
        )?,
        None => tx.query_row("SELECT MAX(seq) FROM audit", [], |r| r.get(0))?,
    };
    let Some(last_seq) = last_removed else {
        return Ok(0);
    };
    let last_hash: Vec<u8> = tx.query_row(
        "SELECT hash FROM audit WHERE seq = ?1",
        params![last_seq],
        |r| r.get(0),
    )?;
    let removed = tx.execute("DELETE FROM audit WHERE seq <= ?1", params![last_seq])?;
    tx.execute(
        "INSERT INTO audit_anchor (id, next_seq, prev_hash, pruned_at_unix_ms) VALUES (1, ?1, ?2, ?3)
         ON CONFLICT (id) DO UPDATE SET next_seq = excluded.next_seq, prev_hash = excluded.prev_hash,
                                        pruned_at_unix_ms = excluded.pruned_at_unix_ms",
        params![last_seq + 1, last_hash, unix_ms(now)],
    )?;
    tx.commit()?;
    Ok(removed as u64)
}

/// Walks the chain from the first record.
///
/// # Errors
/// The first record that was edited, deleted or reordered, by sequence number.
pub fn verify(path: &Path) -> Result<Verification> {
    if !path.exists() {
        bail!("no audit database at {}", path.display());
    }
    let conn = open(path)?;
    let (mut expected_seq, mut prev) = anchor(&conn)?.unwrap_or((1, vec![0u8; 32]));
    let mut stmt = conn.prepare(&format!("{SELECT} ORDER BY seq"))?;
    let mut rows = stmt.query([])?;
    let mut records = 0u64;
    while let Some(row) = rows.next()? {
        let (seq, entry, prev_hash, hash) = read_entry(row)?;
        if seq != expected_seq {
            bail!("audit chain broken: record {expected_seq} is missing (next is {seq})");
        }
        if prev_hash != prev {
            bail!(
                "audit chain broken at record {seq}: it does not follow record {}",
                seq - 1
            );
        }
        if chain_hash(&prev, seq, &entry).as_slice() != hash.as_slice() {
            bail!("audit chain broken at record {seq}: its content was changed");
        }
        prev = hash;
        expected_seq += 1;
        records += 1;
    }
    Ok(Verification {
        records,
        head: prev.iter().map(|b| format!("{b:02x}")).collect(),
    })
}

/// Filters for `export`.
#[derive(Debug, Clone, Default)]
pub struct ExportFilter {
    /// Only this institution.
    pub institution: Option<String>,
    /// From this time on (inclusive).
    pub since: Option<SystemTime>,
    /// Before this time (exclusive).
    pub until: Option<SystemTime>,
}

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Export format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// CSV with a header.
    Csv,
    /// One JSON object per line.
    Json,
}

/// Writes the matching records, oldest first, with RFC 3339 times.
///
/// # Errors
/// Database or I/O errors.
pub fn export(
    path: &Path,
    filter: &ExportFilter,
    format: Format,
    out: &mut dyn std::io::Write,
) -> Result<u64> {
    let conn = open(path)?;
    let mut stmt = conn.prepare(&format!(
        "{SELECT} WHERE (?1 IS NULL OR institution = ?1) AND time_unix_ms >= ?2 AND time_unix_ms < ?3 ORDER BY seq"
    ))?;
    let since = filter.since.map_or(i64::MIN, unix_ms);
    let until = filter.until.map_or(i64::MAX, unix_ms);
    let mut rows = stmt.query(params![filter.institution, since, until])?;
    enum Sink<'a> {
        Csv(Box<csv::Writer<&'a mut dyn std::io::Write>>),
        Json(&'a mut dyn std::io::Write),
    }
    const HEADER: [&str; 12] = [
        "seq",
        "time",
        "institution",
        "purpose",
        "method",
        "mode",
        "elements",
        "outcome",
        "request_id",
        "key_epoch",
        "registry_version",
        "hash",
    ];
    let mut sink = match format {
        Format::Csv => {
            let mut w = csv::Writer::from_writer(out);
            w.write_record(HEADER)?;
            Sink::Csv(Box::new(w))
        }
        Format::Json => Sink::Json(out),
    };
    let mut n = 0;
    while let Some(row) = rows.next()? {
        let (seq, e, _, hash) = read_entry(row)?;
        let time = humantime::format_rfc3339_millis(
            UNIX_EPOCH + Duration::from_millis(u64::try_from(e.time_unix_ms).unwrap_or(0)),
        )
        .to_string();
        let hash: String = hash.iter().map(|b| format!("{b:02x}")).collect();
        match &mut sink {
            Sink::Csv(w) => w.write_record([
                seq.to_string(),
                time,
                e.institution,
                e.purpose,
                e.method,
                e.mode,
                e.elements.to_string(),
                e.outcome,
                e.request_id,
                e.key_epoch.to_string(),
                e.registry_version.to_string(),
                hash,
            ])?,
            Sink::Json(w) => {
                let line = serde_json::json!({
                    "seq": seq, "time": time, "institution": e.institution, "purpose": e.purpose,
                    "method": e.method, "mode": e.mode, "elements": e.elements, "outcome": e.outcome,
                    "request_id": e.request_id, "key_epoch": e.key_epoch,
                    "registry_version": e.registry_version, "hash": hash,
                });
                serde_json::to_writer(&mut **w, &line)?;
                w.write_all(b"\n")?;
            }
        }
        n += 1;
    }
    match &mut sink {
        Sink::Csv(w) => w.flush()?,
        Sink::Json(w) => w.flush()?,
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Appends `n` records concurrently; returns their sequence numbers, sorted.
    async fn filled(path: &Path, n: usize) -> Vec<i64> {
        let log = AuditLog::open(path).unwrap();
        let appends = (0..n).map(|i| {
            let mut e = Entry::now(
                if i % 2 == 0 { "bank-a" } else { "bank-b" },
                "kyc",
                "Evaluate",
                "sync",
            );
            e.elements = i as u64;
            let log = log.clone();
            async move { log.append(e).await.unwrap() }
        });
        let mut seqs = futures::future::join_all(appends).await;
        seqs.sort_unstable();
        seqs
    }

    #[tokio::test]
    async fn a_damaged_database_is_not_appended_to() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(AUDIT_FILE);
        filled(&path, 2000).await;
        // Checkpoint the WAL into the main file, then damage pages in its middle.
        Connection::open(&path)
            .unwrap()
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
            .unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        for b in &mut bytes[mid..mid + 4096] {
            *b = 0x5a;
        }
        std::fs::write(&path, &bytes).unwrap();
        let err = AuditLog::open(&path).unwrap_err();
        assert!(format!("{err:#}").contains("is damaged"), "{err:#}");

        // An edited last record is refused too.
        let other = dir.path().join("b.sqlite");
        filled(&other, 5).await;
        Connection::open(&other)
            .unwrap()
            .execute("UPDATE audit SET elements = 999 WHERE seq = 5", [])
            .unwrap();
        let err = AuditLog::open(&other).unwrap_err();
        assert!(
            format!("{err:#}").contains("last record (5) was changed"),
            "{err:#}"
        );
    }

    #[tokio::test]
    async fn chain_verifies_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(AUDIT_FILE);
        assert_eq!(filled(&path, 50).await, (1..=50).collect::<Vec<_>>());
        // A restart continues the chain where it ended.
        assert_eq!(filled(&path, 10).await, (51..=60).collect::<Vec<_>>());
        let v = verify(&path).unwrap();
        assert_eq!(v.records, 60);
        assert_eq!(v.head.len(), 64);
    }

    #[tokio::test]
    async fn edits_deletions_and_reorderings_are_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(AUDIT_FILE);
        filled(&path, 20).await;
        let conn = Connection::open(&path).unwrap();
        conn.execute("UPDATE audit SET elements = 999 WHERE seq = 7", [])
            .unwrap();
        assert!(verify(&path)
            .unwrap_err()
            .to_string()
            .contains("record 7: its content was changed"));
        conn.execute("UPDATE audit SET elements = 6 WHERE seq = 7", [])
            .unwrap();
        verify(&path).unwrap();
        conn.execute("DELETE FROM audit WHERE seq = 12", [])
            .unwrap();
        assert!(verify(&path)
            .unwrap_err()
            .to_string()
            .contains("record 12 is missing"));
        // Renumbering to hide the gap breaks the links instead.
        conn.execute("UPDATE audit SET seq = seq - 1 WHERE seq > 12", [])
            .unwrap();
        assert!(verify(&path)
            .unwrap_err()
            .to_string()
            .contains("audit chain broken at record 12"));
    }

    #[tokio::test]
    async fn prune_respects_retention_and_keeps_the_chain_verifiable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(AUDIT_FILE);
        let log = AuditLog::open(&path).unwrap();
        // Ten records a day apart, starting 2020-01-01.
        let t0 = UNIX_EPOCH + Duration::from_secs(1_577_836_800);
        for day in 0..10u64 {
            let mut e = Entry::now("bank-a", "kyc", "Evaluate", "sync");
            e.time_unix_ms = unix_ms(t0 + Duration::from_secs(day * 86_400));
            log.append(e).await.unwrap();
        }
        let now = t0 + Duration::from_secs(4 * 366 * 86_400);
        // Inside the retention period: refused, nothing removed.
        let recent = now - Duration::from_secs(86_400);
        assert!(prune(&path, recent, DEFAULT_RETENTION, now)
            .unwrap_err()
            .to_string()
            .contains("retention"));
        assert_eq!(verify(&path).unwrap().records, 10);
        // The first four days go; the chain still verifies from record 5.
        let before = t0 + Duration::from_secs(4 * 86_400);
        assert_eq!(prune(&path, before, DEFAULT_RETENTION, now).unwrap(), 4);
        assert_eq!(verify(&path).unwrap().records, 6);
        assert_eq!(prune(&path, before, DEFAULT_RETENTION, now).unwrap(), 0);
        // Appending continues the chain after the prune.
        log.append(Entry::now("bank-a", "kyc", "Evaluate", "sync"))
            .await
            .unwrap();
        assert_eq!(verify(&path).unwrap().records, 7);
        // Deleting the first kept record is still detected.
        let conn = Connection::open(&path).unwrap();
        conn.execute("DELETE FROM audit WHERE seq = 5", []).unwrap();
        assert!(verify(&path)
            .unwrap_err()
            .to_string()
            .contains("record 5 is missing"));
    }

    #[tokio::test]
    async fn export_filters_by_institution_and_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(AUDIT_FILE);
        filled(&path, 10).await;
        let mut out = Vec::new();
        let filter = ExportFilter {
            institution: Some("bank-a".into()),
            ..ExportFilter::default()
        };
        assert_eq!(export(&path, &filter, Format::Csv, &mut out).unwrap(), 5);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("seq,time,institution"));
        assert!(!text.contains("bank-b"));
        let mut out = Vec::new();
        let future = ExportFilter {
            since: Some(SystemTime::now() + Duration::from_secs(60)),
            ..ExportFilter::default()
        };
        assert_eq!(export(&path, &future, Format::Json, &mut out).unwrap(), 0);
        let mut out = Vec::new();
        assert_eq!(
            export(&path, &ExportFilter::default(), Format::Json, &mut out).unwrap(),
            10
        );
        let first: serde_json::Value =
            serde_json::from_str(String::from_utf8(out).unwrap().lines().next().unwrap()).unwrap();
        assert_eq!(first["seq"], 1);
    }
}
