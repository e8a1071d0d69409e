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

mod openings;
mod store;

use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

pub use openings::{check_openings, OpeningsCheck};
use psi_pg::Use;
pub use store::AuditStore;
use store::{Db, Val, ROW_COLUMNS};

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
    /// The institution's commitment (hex) to the entries of its own query
    /// log this request answers (`x-psi-log-commitment`); empty if none.
    pub commitment: String,
}

impl Entry {
    /// An entry stamped with the current time.
    #[must_use]
    pub fn now(institution: &str, purpose: &str, method: &str, mode: &str) -> Self {
        let time_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        Self {
            time_unix_ms,
            institution: institution.to_string(),
            purpose: purpose.to_string(),
            method: method.to_string(),
            mode: mode.to_string(),
            elements: 0,
            outcome: "ok".to_string(),
            request_id: new_request_id(),
            key_epoch: 0,
            registry_version: 0,
            commitment: String::new(),
        }
    }
}

/// A fresh request id: 16 random bytes in hex.
#[must_use]
pub fn new_request_id() -> String {
    let mut id = [0u8; 16];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut id);
    hex::encode(id)
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
    // Records without a commitment hash as they always have.
    if !e.commitment.is_empty() {
        h.update(b"commitment");
        h.update((e.commitment.len() as u64).to_be_bytes());
        h.update(e.commitment.as_bytes());
    }
    h.finalize().into()
}

/// Refuses a database that SQLite finds damaged, or whose last record does
/// not hash to itself: appending would extend a chain that no longer verifies.
fn check_before_appending(db: &mut Db) -> Result<()> {
    db.integrity_check()?;
    let mut last = None;
    db.for_each_row(
        &format!("SELECT {ROW_COLUMNS} FROM audit ORDER BY seq DESC LIMIT 1"),
        &[],
        |row| {
            last = Some(row);
            Ok(())
        },
    )?;
    if let Some(row) = last {
        if chain_hash(&row.prev_hash, row.seq, &row.entry).as_slice() != row.hash.as_slice() {
            bail!("the last record ({}) was changed", row.seq);
        }
    }
    Ok(())
}

type Job = (Entry, oneshot::Sender<Result<i64, String>>);

/// The append side of the audit trail, shared by all requests.
#[derive(Debug, Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Job>,
    store: AuditStore,
}

impl AuditLog {
    /// Opens (or creates) the database and starts the writer thread.
    ///
    /// # Errors
    /// An unopenable database, or one whose chain is damaged at its end.
    pub fn open(store: impl Into<AuditStore>) -> Result<Self> {
        let store = store.into();
        let mut db = Db::open(&store, Use::Serving)?;
        check_before_appending(&mut db).with_context(|| {
            format!(
                "the audit database {store} is damaged: keep it as evidence (`psi-server audit verify --db ...` says where), and serve with a new --audit-db"
            )
        })?;
        let (tx, rx) = mpsc::channel::<Job>();
        let reopen = store.clone();
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer(db, &reopen, &rx))
            .context("starting the audit writer")?;
        Ok(Self { tx, store })
    }

    /// Where the records go.
    #[must_use]
    pub fn store(&self) -> &AuditStore {
        &self.store
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

fn writer(mut db: Db, store: &AuditStore, rx: &mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        // Records that arrived while the last group was being committed
        // share the next commit (group commit).
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        if db.is_closed() {
            // The database server restarted: connect again for this group.
            match Db::open(store, Use::Serving) {
                Ok(fresh) => db = fresh,
                Err(e) => tracing::error!("audit database unreachable: {e:#}"),
            }
        }
        let started = std::time::Instant::now();
        let entries: Vec<&Entry> = group.iter().map(|(e, _)| e).collect();
        let result = write_group(&mut db, &entries);
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

/// Appends `group` to the chain in one transaction, holding the chain so
/// that no other writer (another replica on PostgreSQL) appends between
/// reading its end and committing.
fn write_group(db: &mut Db, group: &[&Entry]) -> Result<Vec<i64>> {
    holding_chain(db, |db| append_locked(db, group))
}

/// Runs `work` in one transaction holding the chain (see [`Db::begin_chain`]):
/// committed if it succeeds, rolled back if not.
fn holding_chain<T>(db: &mut Db, work: impl FnOnce(&mut Db) -> Result<T>) -> Result<T> {
    db.begin_chain()?;
    match work(db) {
        Ok(done) => {
            db.batch("COMMIT")?;
            Ok(done)
        }
        Err(e) => {
            let _ = db.batch("ROLLBACK");
            Err(e)
        }
    }
}

/// Columns of one inserted record.
const INSERT_COLUMNS: usize = 14;

fn append_locked(db: &mut Db, group: &[&Entry]) -> Result<Vec<i64>> {
    // The chain continues from its last record, or from the anchor a prune
    // left (which may have removed every record), or from the start.
    let (mut seq, mut prev) =
        match db.query_link("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1", &[])? {
            Some(last) => last,
            None => anchor(db)?
                .map(|(next, prev)| (next - 1, prev))
                .unwrap_or((0, vec![0u8; 32])),
        };
    let mut seqs = Vec::with_capacity(group.len());
    let mut vals = Vec::with_capacity(group.len() * INSERT_COLUMNS);
    let mut rows = Vec::with_capacity(group.len());
    for e in group {
        seq += 1;
        let hash = chain_hash(&prev, seq, e);
        let base = vals.len();
        rows.push(format!(
            "({})",
            (1..=INSERT_COLUMNS)
                .map(|i| format!("${}", base + i))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        let int = |v: u64| Val::Int(i64::try_from(v).unwrap_or(i64::MAX));
        vals.extend([
            Val::Int(seq),
            Val::Int(e.time_unix_ms),
            Val::Text(e.institution.clone()),
            Val::Text(e.purpose.clone()),
            Val::Text(e.method.clone()),
            Val::Text(e.mode.clone()),
            int(e.elements),
            Val::Text(e.outcome.clone()),
            Val::Text(e.request_id.clone()),
            int(e.key_epoch),
            int(e.registry_version),
            Val::Bytes(prev),
            Val::Bytes(hash.to_vec()),
            Val::Text(e.commitment.clone()),
        ]);
        prev = hash.to_vec();
        seqs.push(seq);
    }
    db.execute(
        &format!(
            "INSERT INTO audit ({ROW_COLUMNS}) VALUES {}",
            rows.join(", ")
        ),
        &vals,
    )?;
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

/// The anchor left by a prune: the first sequence number kept and the hash
/// the chain continues from.
fn anchor(db: &mut Db) -> Result<Option<(i64, Vec<u8>)>> {
    db.query_link(
        "SELECT next_seq, prev_hash FROM audit_anchor WHERE id = 1",
        &[],
    )
}

/// Removes the records older than `before`, if all of them are older than
/// `retention` at `now`, keeping the chain verifiable. Returns how many it removed.
///
/// # Errors
/// `before` inside the retention period (nothing is removed), or database errors.
pub fn prune(
    store: impl Into<AuditStore>,
    before: SystemTime,
    retention: Duration,
    now: SystemTime,
) -> Result<u64> {
    let oldest_allowed = now.checked_sub(retention).unwrap_or(UNIX_EPOCH);
    if before > oldest_allowed {
        bail!(
            "refusing to prune records from the last {} days (the retention period): choose a time before {}",
            retention.as_secs() / 86_400,
            humantime::format_rfc3339_seconds(oldest_allowed)
        );
    }
    let mut db = Db::open(&store.into(), Use::Maintenance)?;
    // Holding the chain: no replica appends while the prefix goes.
    holding_chain(&mut db, |db| prune_locked(db, before, now))
}

fn prune_locked(db: &mut Db, before: SystemTime, now: SystemTime) -> Result<u64> {
    // The records to remove are the prefix of the chain before the first
    // record at or after `before` (all of them if there is none).
    let first_kept = db.query_int(
        "SELECT MIN(seq) FROM audit WHERE time_unix_ms >= $1",
        &[Val::Int(unix_ms(before))],
    )?;
    let last_removed = match first_kept {
        Some(kept) => db.query_int(
            "SELECT MAX(seq) FROM audit WHERE seq < $1",
            &[Val::Int(kept)],
        )?,
        None => db.query_int("SELECT MAX(seq) FROM audit", &[])?,
    };
    let Some(last_seq) = last_removed else {
        return Ok(0);
    };
    let Some((_, last_hash)) = db.query_link(
        "SELECT seq, hash FROM audit WHERE seq = $1",
        &[Val::Int(last_seq)],
    )?
    else {
        bail!("record {last_seq} vanished during the prune");
    };
    let removed = db.execute("DELETE FROM audit WHERE seq <= $1", &[Val::Int(last_seq)])?;
    db.execute(
        "INSERT INTO audit_anchor (id, next_seq, prev_hash, pruned_at_unix_ms) VALUES (1, $1, $2, $3)
         ON CONFLICT (id) DO UPDATE SET next_seq = excluded.next_seq, prev_hash = excluded.prev_hash,
                                        pruned_at_unix_ms = excluded.pruned_at_unix_ms",
        &[
            Val::Int(last_seq + 1),
            Val::Bytes(last_hash),
            Val::Int(unix_ms(now)),
        ],
    )?;
    Ok(removed)
}

/// Walks the chain from the first record (or the anchor a prune left).
///
/// # Errors
/// The first record that was edited, deleted or reordered, by sequence number.
pub fn verify(store: impl Into<AuditStore>) -> Result<Verification> {
    let store = store.into();
    if let Some(path) = store.sqlite_path() {
        if !path.exists() {
            bail!("no audit database at {}", path.display());
        }
    }
    let mut db = Db::open(&store, Use::Maintenance)?;
    let (mut expected_seq, mut prev) = anchor(&mut db)?.unwrap_or((1, vec![0u8; 32]));
    let mut records = 0u64;
    db.for_each_row(
        &format!("SELECT {ROW_COLUMNS} FROM audit ORDER BY seq"),
        &[],
        |row| {
            let seq = row.seq;
            if seq != expected_seq {
                bail!("audit chain broken: record {expected_seq} is missing (next is {seq})");
            }
            if row.prev_hash != prev {
                bail!(
                    "audit chain broken at record {seq}: it does not follow record {}",
                    seq - 1
                );
            }
            if chain_hash(&prev, seq, &row.entry).as_slice() != row.hash.as_slice() {
                bail!("audit chain broken at record {seq}: its content was changed");
            }
            prev = row.hash;
            expected_seq += 1;
            records += 1;
            Ok(())
        },
    )?;
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
    store: impl Into<AuditStore>,
    filter: &ExportFilter,
    format: Format,
    out: &mut dyn std::io::Write,
) -> Result<u64> {
    let mut db = Db::open(&store.into(), Use::Maintenance)?;
    let mut sql =
        format!("SELECT {ROW_COLUMNS} FROM audit WHERE time_unix_ms >= $1 AND time_unix_ms < $2");
    let mut vals = vec![
        Val::Int(filter.since.map_or(i64::MIN, unix_ms)),
        Val::Int(filter.until.map_or(i64::MAX, unix_ms)),
    ];
    if let Some(institution) = &filter.institution {
        sql.push_str(" AND institution = $3");
        vals.push(Val::Text(institution.clone()));
    }
    sql.push_str(" ORDER BY seq");
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
    db.for_each_row(&sql, &vals, |row| {
        let (seq, e, hash) = (row.seq, row.entry, row.hash);
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
                    "registry_version": e.registry_version, "commitment": e.commitment, "hash": hash,
                });
                serde_json::to_writer(&mut **w, &line)?;
                w.write_all(b"\n")?;
            }
        }
        n += 1;
        Ok(())
    })?;
    match &mut sink {
        Sink::Csv(w) => w.flush()?,
        Sink::Json(w) => w.flush()?,
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;
    use std::path::Path;

    /// A trail written before records kept a log commitment gains the
    /// column in place: its old records verify unchanged, and new ones
    /// with a commitment chain on (the commitment in their hash).
    #[tokio::test]
    async fn a_trail_without_the_commitment_column_is_migrated_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.sqlite");
        filled(&path, 3).await;
        Connection::open(&path)
            .unwrap()
            .execute_batch("ALTER TABLE audit DROP COLUMN commitment")
            .unwrap();
        assert_eq!(verify(&path).unwrap().records, 3);
        let log = AuditLog::open(&path).unwrap();
        let mut e = Entry::now("bank-a", "kyc", "Evaluate", "sync");
        e.elements = 1;
        e.commitment = "ab".repeat(32);
        log.append(e).await.unwrap();
        drop(log);
        assert_eq!(verify(&path).unwrap().records, 4);
        // The commitment is covered by the chain.
        Connection::open(&path)
            .unwrap()
            .execute(
                "UPDATE audit SET commitment = ?1 WHERE seq = 4",
                ["cd".repeat(32)],
            )
            .unwrap();
        assert!(verify(&path).is_err());
    }

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
