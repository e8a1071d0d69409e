//! A PostgreSQL connection for the shared audit trail and quotas, with every
//! wait bounded.
//!
//! A blocking API (the audit writer and the quota check run on their own
//! threads) over `tokio-postgres` on a private single-thread runtime, so
//! that each step can be given a time limit: the connection (TCP and the
//! start-up handshake: `connect_timeout` from the URL, else
//! [`DEFAULT_CONNECT_TIMEOUT`]), and, for a serving replica, each statement
//! (`statement_timeout`, enforced by the database: from the URL's
//! `options`, else [`DEFAULT_STATEMENT_TIMEOUT_MS`]) and the wait for its
//! answer (the statement timeout plus the connect timeout, enforced here, for
//! a database that stops answering altogether). A connection that ran out
//! of time is dropped; the next use connects again.
//!
//! The URL is never echoed: it may carry a password.
//!
//! Shared by the operator's side (audit trail, quotas, `init --postgres`,
//! the key holders' audit) and the institution's (its query log).

pub mod tls;

use std::time::Duration;

use anyhow::{anyhow, Result};
use futures::StreamExt;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Row;

/// How long connecting may take when the URL does not say
/// (`connect_timeout=` seconds in the URL).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one statement of a serving replica (an append waiting for the
/// chain, a quota update) may take when the URL does not set `options`
/// (`options=-c statement_timeout=MS`). `audit verify`, `export` and `prune`
/// run without one: they may read or delete millions of records.
pub const DEFAULT_STATEMENT_TIMEOUT_MS: u64 = 10_000;

/// Who connects: a serving replica (statements bounded) or a maintenance
/// command (statements unbounded).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Use {
    /// `serve`: requests wait on these statements.
    Serving,
    /// `audit verify|export|prune`.
    Maintenance,
}

/// A PostgreSQL error's reason, without the connection string.
#[must_use]
pub fn reason(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// A connection (see the module documentation).
pub struct Pg {
    runtime: tokio::runtime::Runtime,
    client: tokio_postgres::Client,
    /// The longest wait for one answer (serving), or none (maintenance).
    patience: Option<Duration>,
    /// A wait ran out: the connection's state is unknown.
    broken: bool,
}

impl std::fmt::Debug for Pg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pg")
            .field("patience", &self.patience)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

/// Connects with `tls` and spawns the connection's driver on the current
/// runtime.
async fn connect_driven<T>(
    config: &tokio_postgres::Config,
    tls: T,
) -> Result<tokio_postgres::Client, tokio_postgres::Error>
where
    T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>,
    T::Stream: Send + 'static,
{
    let (client, connection) = config.connect(tls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// The statement timeout `options` sets (`-c statement_timeout=N`, in ms).
fn statement_timeout_ms(options: &str) -> Option<u64> {
    let (_, rest) = options.split_once("statement_timeout=")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

impl Pg {
    /// Connects for `what` (named in errors).
    ///
    /// # Errors
    /// A malformed URL, a refused or timed-out connection, a refused login.
    pub fn connect(url: &str, what: &str, usage: Use) -> Result<Self> {
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| anyhow!("the PostgreSQL URL for {what} is malformed: {e}"))?;
        let connect_timeout = *config
            .get_connect_timeout()
            .unwrap_or(&DEFAULT_CONNECT_TIMEOUT);
        config.connect_timeout(connect_timeout);
        let patience = match usage {
            Use::Maintenance => None,
            Use::Serving => {
                let statement_ms = match config.get_options() {
                    Some(options) => statement_timeout_ms(options),
                    None => {
                        config.options(format!(
                            "-c statement_timeout={DEFAULT_STATEMENT_TIMEOUT_MS}"
                        ));
                        Some(DEFAULT_STATEMENT_TIMEOUT_MS)
                    }
                };
                statement_ms.map(|ms| Duration::from_millis(ms) + connect_timeout)
            }
        };
        let (tls, ssl_mode) =
            crate::tls::connector(config.get_hosts(), config.get_ssl_mode(), what)?;
        config.ssl_mode(ssl_mode);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        // The handshake too: a server that accepts and never answers. The
        // connection is driven whenever a call below blocks on the runtime.
        let connected = runtime.block_on(async {
            tokio::time::timeout(connect_timeout, async {
                match tls {
                    Some(tls) => connect_driven(&config, tls).await,
                    None => connect_driven(&config, tokio_postgres::NoTls).await,
                }
            })
            .await
        });
        let client = match connected {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => bail_pg(what, &e)?,
            Err(_) => anyhow::bail!(
                "connecting to PostgreSQL for {what}: no answer within {} s (connect_timeout)",
                connect_timeout.as_secs_f64()
            ),
        };
        Ok(Self {
            runtime,
            client,
            patience,
            broken: false,
        })
    }

    /// Whether the connection is gone (a server restart, a wait that ran out).
    #[must_use]
    pub fn is_closed(&self) -> bool {
        self.broken || self.client.is_closed()
    }

    /// Runs statements without parameters.
    ///
    /// # Errors
    /// The database's refusal, a lost connection, no answer in time.
    pub fn batch_execute(&mut self, sql: &str) -> Result<()> {
        let Self {
            runtime,
            client,
            patience,
            broken,
        } = self;
        wait(runtime, *patience, broken, client.batch_execute(sql))
    }

    /// Runs one statement; returns the rows it changed.
    ///
    /// # Errors
    /// As [`Pg::batch_execute`].
    pub fn execute(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        let Self {
            runtime,
            client,
            patience,
            broken,
        } = self;
        wait(runtime, *patience, broken, client.execute(sql, params))
    }

    /// The first row, if any.
    ///
    /// # Errors
    /// As [`Pg::batch_execute`].
    pub fn query_opt(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Option<Row>> {
        let Self {
            runtime,
            client,
            patience,
            broken,
        } = self;
        wait(runtime, *patience, broken, client.query_opt(sql, params))
    }

    /// `BEGIN` and a statement returning one row, sent together (pipelined:
    /// one round trip). On an error the transaction may be open: roll back.
    ///
    /// The parameters carry their types: a typed statement goes out whole
    /// (parse, bind, execute) when first polled, so the two are sent in
    /// order without waiting for a separate prepare.
    ///
    /// # Errors
    /// As [`Pg::batch_execute`], or no row.
    pub fn begin_with(&mut self, sql: &str, params: &[(&(dyn ToSql + Sync), Type)]) -> Result<Row> {
        let Self {
            runtime,
            client,
            patience,
            broken,
        } = self;
        let both = async {
            let (begun, row) = futures::join!(
                client.batch_execute("BEGIN"),
                client.query_typed(sql, params)
            );
            begun?;
            Ok(row?.into_iter().next())
        };
        match wait(runtime, *patience, broken, both)? {
            Some(row) => Ok(row),
            None => Err(anyhow!("PostgreSQL returned no row")),
        }
    }

    /// A statement and `COMMIT`, sent together in this order (pipelined: one
    /// round trip; typed parameters as for [`Pg::begin_with`]).
    ///
    /// # Errors
    /// As [`Pg::batch_execute`]; the transaction is then rolled back.
    pub fn commit_with(&mut self, sql: &str, params: &[(&(dyn ToSql + Sync), Type)]) -> Result<()> {
        let Self {
            runtime,
            client,
            patience,
            broken,
        } = self;
        let both = async {
            let (done, committed) = futures::join!(
                client.execute_typed(sql, params),
                client.batch_execute("COMMIT")
            );
            done?;
            committed
        };
        wait(runtime, *patience, broken, both)
    }

    /// Streams the rows of `sql` to `each`, without holding them all.
    ///
    /// # Errors
    /// As [`Pg::batch_execute`], and `each`'s errors.
    pub fn for_each_row(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        mut each: impl FnMut(&Row) -> Result<()>,
    ) -> Result<()> {
        let Self {
            runtime,
            client,
            patience,
            broken,
        } = self;
        let rows = wait(
            runtime,
            *patience,
            broken,
            client.query_raw(sql, params.iter().copied()),
        )?;
        let mut rows = Box::pin(rows);
        loop {
            let next = async { rows.next().await.transpose() };
            match wait(runtime, *patience, broken, next)? {
                None => return Ok(()),
                Some(row) => each(&row)?,
            }
        }
    }
}

/// Blocks on `call`, for at most `patience`; a call that runs out of time
/// marks the connection `broken`.
fn wait<T>(
    runtime: &tokio::runtime::Runtime,
    patience: Option<Duration>,
    broken: &mut bool,
    call: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T> {
    let answered = match patience {
        None => Ok(runtime.block_on(call)),
        Some(limit) => runtime
            .block_on(async { tokio::time::timeout(limit, call).await })
            .map_err(|_| limit),
    };
    match answered {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(anyhow!("PostgreSQL: {}", reason(&e))),
        Err(limit) => {
            *broken = true;
            Err(anyhow!(
                "PostgreSQL did not answer within {} s; the connection is dropped",
                limit.as_secs_f64()
            ))
        }
    }
}

fn bail_pg<T>(what: &str, e: &tokio_postgres::Error) -> Result<T> {
    Err(anyhow!(
        "connecting to PostgreSQL for {what}: {}",
        reason(e)
    ))
}
