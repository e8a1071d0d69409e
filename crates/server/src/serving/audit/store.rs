//! Where an audit trail lives: an embedded SQLite file (the default, one
//! server), or a PostgreSQL database that several replicas append to as one
//! chain. Both hold the same tables; the chain, verification, export and
//! pruning above are written once against [`Db`].

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::Entry;
use psi_pg::{Pg, Use};

/// The advisory lock that serialises appends to one PostgreSQL chain (and
/// its schema's creation) across replicas: "psiaudit" in ASCII.
const CHAIN_LOCK: i64 = 0x7073_6961_7564_6974;

/// An audit trail's database.
#[derive(Clone, PartialEq, Eq)]
pub enum AuditStore {
    /// An SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL connection URL (`postgres://` or `postgresql://`).
    Postgres(String),
}

impl AuditStore {
    /// A PostgreSQL URL, or else a file path.
    #[must_use]
    pub fn parse(value: &str) -> Self {
        if value.starts_with("postgres://") || value.starts_with("postgresql://") {
            Self::Postgres(value.to_string())
        } else {
            Self::Sqlite(PathBuf::from(value))
        }
    }

    /// [`AuditStore::parse`] for clap.
    ///
    /// # Errors
    /// An empty value.
    pub fn from_arg(value: &str) -> Result<Self, String> {
        if value.trim().is_empty() {
            return Err("an audit database: a file path or a postgres:// URL".into());
        }
        Ok(Self::parse(value))
    }

    /// For messages: the file, or the database's host, port and name
    /// (never the user or password of the URL).
    #[must_use]
    pub fn describe(&self) -> String {
        match self {
            Self::Sqlite(path) => path.display().to_string(),
            Self::Postgres(url) => match url.parse::<postgres::Config>() {
                Ok(config) => {
                    let hosts: Vec<String> = config
                        .get_hosts()
                        .iter()
                        .map(|h| match h {
                            postgres::config::Host::Tcp(name) => name.clone(),
                            postgres::config::Host::Unix(path) => path.display().to_string(),
                        })
                        .collect();
                    let port = config.get_ports().first().copied().unwrap_or(5432);
                    format!(
                        "PostgreSQL database {} at {}:{port}",
                        config.get_dbname().unwrap_or("(default)"),
                        hosts.join(",")
                    )
                }
                Err(_) => "PostgreSQL (an unreadable URL)".to_string(),
            },
        }
    }

    /// The SQLite file, if that is what this is.
    #[must_use]
    pub fn sqlite_path(&self) -> Option<&Path> {
        match self {
            Self::Sqlite(p) => Some(p),
            Self::Postgres(_) => None,
        }
    }
}

impl std::fmt::Debug for AuditStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password: only its description.
        f.write_str(&self.describe())
    }
}

impl std::fmt::Display for AuditStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl From<&AuditStore> for AuditStore {
    fn from(s: &AuditStore) -> Self {
        s.clone()
    }
}

impl From<&Path> for AuditStore {
    fn from(p: &Path) -> Self {
        Self::Sqlite(p.to_path_buf())
    }
}

impl From<&PathBuf> for AuditStore {
    fn from(p: &PathBuf) -> Self {
        Self::Sqlite(p.clone())
    }
}

impl From<PathBuf> for AuditStore {
    fn from(p: PathBuf) -> Self {
        Self::Sqlite(p)
    }
}

/// A value bound to a statement's `$n` parameter.
#[derive(Debug, Clone)]
pub(crate) enum Val {
    Int(i64),
    Text(String),
    Bytes(Vec<u8>),
}

/// One record as stored: its sequence number, content and links.
#[derive(Debug)]
pub(crate) struct Row {
    pub seq: i64,
    pub entry: Entry,
    pub prev_hash: Vec<u8>,
    pub hash: Vec<u8>,
}

/// The columns of a [`Row`], in order, for `SELECT {ROW_COLUMNS} FROM audit`.
pub(crate) const ROW_COLUMNS: &str = "seq, time_unix_ms, institution, purpose, method, mode, elements, outcome, request_id, key_epoch, registry_version, prev_hash, hash, commitment";

/// An open audit database.
pub(crate) enum Db {
    Sqlite(rusqlite::Connection),
    Postgres(Box<Pg>),
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Db::Sqlite(_) => "Db::Sqlite",
            Db::Postgres(_) => "Db::Postgres",
        })
    }
}

const SQLITE_SCHEMA: &str = "PRAGMA journal_mode = WAL;
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
         hash BLOB NOT NULL,
         commitment TEXT NOT NULL DEFAULT ''
     );
     CREATE INDEX IF NOT EXISTS audit_by_institution ON audit (institution, time_unix_ms);
     CREATE TABLE IF NOT EXISTS audit_anchor (
         id INTEGER PRIMARY KEY CHECK (id = 1),
         next_seq INTEGER NOT NULL,
         prev_hash BLOB NOT NULL,
         pruned_at_unix_ms INTEGER NOT NULL
     );";

const POSTGRES_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS audit (
         seq BIGINT PRIMARY KEY,
         time_unix_ms BIGINT NOT NULL,
         institution TEXT NOT NULL,
         purpose TEXT NOT NULL,
         method TEXT NOT NULL,
         mode TEXT NOT NULL,
         elements BIGINT NOT NULL,
         outcome TEXT NOT NULL,
         request_id TEXT NOT NULL,
         key_epoch BIGINT NOT NULL,
         registry_version BIGINT NOT NULL,
         prev_hash BYTEA NOT NULL,
         hash BYTEA NOT NULL,
         commitment TEXT NOT NULL DEFAULT ''
     );
     ALTER TABLE audit ADD COLUMN IF NOT EXISTS commitment TEXT NOT NULL DEFAULT '';
     CREATE INDEX IF NOT EXISTS audit_by_institution ON audit (institution, time_unix_ms);
     CREATE TABLE IF NOT EXISTS audit_anchor (
         id INTEGER PRIMARY KEY CHECK (id = 1),
         next_seq BIGINT NOT NULL,
         prev_hash BYTEA NOT NULL,
         pruned_at_unix_ms BIGINT NOT NULL
     );";

impl Db {
    /// Opens the database and creates its tables if they are missing.
    pub fn open(store: &AuditStore, usage: Use) -> Result<Self> {
        match store {
            AuditStore::Sqlite(path) => {
                let conn = rusqlite::Connection::open(path)
                    .with_context(|| format!("opening audit database {}", path.display()))?;
                conn.execute_batch(SQLITE_SCHEMA)
                    .with_context(|| format!("preparing audit database {}", path.display()))?;
                // A trail written before records kept a log commitment.
                let has: i64 = conn.query_row(
                    "SELECT COUNT(*) FROM pragma_table_info('audit') WHERE name = 'commitment'",
                    [],
                    |r| r.get(0),
                )?;
                if has == 0 {
                    conn.execute_batch(
                        "ALTER TABLE audit ADD COLUMN commitment TEXT NOT NULL DEFAULT ''",
                    )?;
                }
                Ok(Db::Sqlite(conn))
            }
            AuditStore::Postgres(url) => {
                let mut c = Pg::connect(url, "the audit trail", usage)?;
                // Replicas starting together would race to create the tables.
                c.batch_execute("BEGIN")?;
                c.execute("SELECT pg_advisory_xact_lock($1)", &[&CHAIN_LOCK])?;
                c.batch_execute(POSTGRES_SCHEMA)?;
                c.batch_execute("COMMIT")?;
                Ok(Db::Postgres(Box::new(c)))
            }
        }
    }

    /// Whether the connection is gone (a PostgreSQL server restarted).
    pub fn is_closed(&self) -> bool {
        match self {
            Db::Sqlite(_) => false,
            Db::Postgres(c) => c.is_closed(),
        }
    }

    /// Starts a transaction that holds the chain: no other writer (thread,
    /// process or replica) appends until it ends.
    pub fn begin_chain(&mut self) -> Result<()> {
        match self {
            Db::Sqlite(c) => Ok(c.execute_batch("BEGIN IMMEDIATE")?),
            Db::Postgres(c) => {
                if let Err(e) = c.begin_with(
                    "SELECT pg_advisory_xact_lock($1)",
                    &[(&CHAIN_LOCK, tokio_postgres::types::Type::INT8)],
                ) {
                    // Waiting for the chain ran out of time: end the
                    // transaction so the connection stays usable.
                    let _ = c.batch_execute("ROLLBACK");
                    return Err(e);
                }
                Ok(())
            }
        }
    }

    /// Runs statements without parameters (`COMMIT`, `ROLLBACK`).
    pub fn batch(&mut self, sql: &str) -> Result<()> {
        match self {
            Db::Sqlite(c) => Ok(c.execute_batch(sql)?),
            Db::Postgres(c) => c.batch_execute(sql),
        }
    }

    /// Runs one statement with `$n` parameters; returns the rows it changed.
    pub fn execute(&mut self, sql: &str, vals: &[Val]) -> Result<u64> {
        match self {
            Db::Sqlite(c) => Ok(c.execute(&sqlite_sql(sql), sqlite_params(vals))? as u64),
            Db::Postgres(c) => c.execute(sql, &pg_params(vals)),
        }
    }

    /// The first column of the first row, if there is a row and it is not NULL.
    pub fn query_int(&mut self, sql: &str, vals: &[Val]) -> Result<Option<i64>> {
        match self {
            Db::Sqlite(c) => {
                match c.query_row(&sqlite_sql(sql), sqlite_params(vals), |r| r.get(0)) {
                    Ok(v) => Ok(v),
                    Err(rusqlite::Error::QueryReturnedNoRows) => Ok(None),
                    Err(e) => Err(e.into()),
                }
            }
            Db::Postgres(c) => Ok(c
                .query_opt(sql, &pg_params(vals))?
                .and_then(|r| r.get::<_, Option<i64>>(0))),
        }
    }

    /// The first row's first two columns, as a sequence number and a hash.
    pub fn query_link(&mut self, sql: &str, vals: &[Val]) -> Result<Option<(i64, Vec<u8>)>> {
        match self {
            Db::Sqlite(c) => match c.query_row(&sqlite_sql(sql), sqlite_params(vals), |r| {
                Ok((r.get(0)?, r.get(1)?))
            }) {
                Ok(v) => Ok(Some(v)),
                Err(rusqlite::Error::QueryReturnedNoRows) => Ok(None),
                Err(e) => Err(e.into()),
            },
            Db::Postgres(c) => Ok(c
                .query_opt(sql, &pg_params(vals))?
                .map(|r| (r.get(0), r.get(1)))),
        }
    }

    /// Streams the records `sql` selects (its columns [`ROW_COLUMNS`]) to
    /// `each`, without holding them all.
    pub fn for_each_row(
        &mut self,
        sql: &str,
        vals: &[Val],
        mut each: impl FnMut(Row) -> Result<()>,
    ) -> Result<()> {
        match self {
            Db::Sqlite(c) => {
                let mut stmt = c.prepare(&sqlite_sql(sql))?;
                let mut rows = stmt.query(sqlite_params(vals))?;
                while let Some(r) = rows.next()? {
                    each(Row {
                        seq: r.get(0)?,
                        entry: Entry {
                            time_unix_ms: r.get(1)?,
                            institution: r.get(2)?,
                            purpose: r.get(3)?,
                            method: r.get(4)?,
                            mode: r.get(5)?,
                            elements: unsigned(r.get(6)?),
                            outcome: r.get(7)?,
                            request_id: r.get(8)?,
                            key_epoch: unsigned(r.get(9)?),
                            registry_version: unsigned(r.get(10)?),
                            commitment: r.get(13)?,
                        },
                        prev_hash: r.get(11)?,
                        hash: r.get(12)?,
                    })?;
                }
                Ok(())
            }
            Db::Postgres(c) => c.for_each_row(sql, &pg_params(vals), |r| {
                let text = |i: usize| r.try_get::<_, String>(i).map_err(pg);
                let int = |i: usize| r.try_get::<_, i64>(i).map_err(pg);
                each(Row {
                    seq: int(0)?,
                    entry: Entry {
                        time_unix_ms: int(1)?,
                        institution: text(2)?,
                        purpose: text(3)?,
                        method: text(4)?,
                        mode: text(5)?,
                        elements: unsigned(int(6)?),
                        outcome: text(7)?,
                        request_id: text(8)?,
                        key_epoch: unsigned(int(9)?),
                        registry_version: unsigned(int(10)?),
                        commitment: text(13)?,
                    },
                    prev_hash: r.try_get(11).map_err(pg)?,
                    hash: r.try_get(12).map_err(pg)?,
                })
            }),
        }
    }

    /// SQLite's own consistency check (PostgreSQL checks its pages itself).
    pub fn integrity_check(&mut self) -> Result<()> {
        let Db::Sqlite(c) = self else {
            return Ok(());
        };
        let mut stmt = c.prepare("PRAGMA quick_check")?;
        let problems: Vec<String> = stmt
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<rusqlite::Result<_>>()?;
        if problems.first().map(String::as_str) != Some("ok") {
            bail!(
                "SQLite integrity check: {}",
                problems.into_iter().take(3).collect::<Vec<_>>().join("; ")
            );
        }
        Ok(())
    }
}

fn unsigned(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn pg(e: tokio_postgres::Error) -> anyhow::Error {
    anyhow::anyhow!("PostgreSQL: {}", psi_pg::reason(&e))
}

/// `$n` parameters as SQLite's numbered `?n`.
fn sqlite_sql(sql: &str) -> String {
    sql.replace('$', "?")
}

fn sqlite_params(vals: &[Val]) -> rusqlite::ParamsFromIter<Vec<rusqlite::types::Value>> {
    use rusqlite::types::Value;
    rusqlite::params_from_iter(
        vals.iter()
            .map(|v| match v {
                Val::Int(i) => Value::Integer(*i),
                Val::Text(s) => Value::Text(s.clone()),
                Val::Bytes(b) => Value::Blob(b.clone()),
            })
            .collect::<Vec<_>>(),
    )
}

fn pg_params(vals: &[Val]) -> Vec<&(dyn postgres::types::ToSql + Sync)> {
    vals.iter()
        .map(|v| -> &(dyn postgres::types::ToSql + Sync) {
            match v {
                Val::Int(i) => i,
                Val::Text(s) => s,
                Val::Bytes(b) => b,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_postgres_url_is_described_without_its_credentials() {
        let store = AuditStore::parse("postgres://psi:hunter2@db.internal:6432/audit");
        assert!(matches!(store, AuditStore::Postgres(_)));
        let shown = format!("{store} {store:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("psi:"),
            "{shown}"
        );
        assert!(shown.contains("audit at db.internal:6432"), "{shown}");
        assert_eq!(
            AuditStore::parse("/srv/psi/audit.sqlite"),
            AuditStore::Sqlite("/srv/psi/audit.sqlite".into())
        );
    }
}
