//! Where registry rows come from: a CSV file (the embedded default) or a
//! PostgreSQL query read through a server-side cursor, so that any number of
//! rows is imported in bounded memory.

use std::fmt;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

/// One input row: its position (CSV line, or 1-based row of the query's
/// result) and its two fields, `None` when missing or not valid UTF-8.
#[derive(Debug)]
pub struct Row {
    /// CSV line number, or the row's number in the query result.
    pub line: u64,
    /// The name field.
    pub name: Option<String>,
    /// The ID number field.
    pub id: Option<String>,
}

/// A registry source.
#[derive(Clone, PartialEq, Eq)]
pub enum Source {
    /// A CSV file with a header naming the name and ID columns.
    Csv {
        /// The file.
        path: PathBuf,
        /// Header of the name column.
        name_column: String,
        /// Header of the ID column.
        id_column: String,
        /// The file's encoding; `None` detects it (UTF-8 with or without a
        /// BOM, else GB18030) and refuses a file that is neither.
        encoding: Option<psi_files::Encoding>,
    },
    /// A PostgreSQL query whose first two columns are the name and the ID number.
    Postgres {
        /// libpq-style connection string or URL.
        url: String,
        /// A `SELECT` (or `WITH ... SELECT`) statement.
        query: String,
    },
}

impl fmt::Debug for Source {
    // The connection string may hold a password: never printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// The default column names.
pub const NAME_COLUMN: &str = "name";
/// The default column names.
pub const ID_COLUMN: &str = "id";

impl Source {
    /// A CSV file with the default `name` and `id` columns.
    #[must_use]
    pub fn csv(path: impl Into<PathBuf>) -> Self {
        Self::Csv {
            path: path.into(),
            name_column: NAME_COLUMN.into(),
            id_column: ID_COLUMN.into(),
            encoding: None,
        }
    }

    /// A CSV source read in `encoding` instead of the detected one (no
    /// effect on a query).
    #[must_use]
    pub fn with_encoding(mut self, named: Option<psi_files::Encoding>) -> Self {
        if let Self::Csv { encoding, .. } = &mut self {
            *encoding = named;
        }
        self
    }

    /// The source named on the command line: with `postgres` set, `value` is
    /// a query (it starts with `SELECT` or `WITH`) or a table name (optionally
    /// `schema.table`) whose `name_column` and `id_column` are read; without
    /// it, `value` is a CSV file whose header names those columns.
    ///
    /// # Errors
    /// An empty table or column name.
    pub fn from_arg(
        value: &str,
        postgres: Option<&str>,
        name_column: &str,
        id_column: &str,
    ) -> Result<Self> {
        let Some(url) = postgres else {
            return Ok(Self::Csv {
                path: value.into(),
                name_column: name_column.into(),
                id_column: id_column.into(),
                encoding: None,
            });
        };
        let first = value
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_lowercase();
        let query = if first == "select" || first == "with" {
            value.to_string()
        } else {
            format!(
                "SELECT {}::text, {}::text FROM {}",
                quote_ident(name_column)?,
                quote_ident(id_column)?,
                value
                    .split('.')
                    .map(quote_ident)
                    .collect::<Result<Vec<_>>>()?
                    .join(".")
            )
        };
        Ok(Self::Postgres {
            url: url.to_string(),
            query,
        })
    }

    /// A description for messages: the file, or the query without the
    /// connection string.
    #[must_use]
    pub fn describe(&self) -> String {
        match self {
            Self::Csv { path, .. } => path.display().to_string(),
            Self::Postgres { query, .. } => format!("PostgreSQL query `{query}`"),
        }
    }

    /// Opens the source for reading.
    ///
    /// # Errors
    /// An unreadable file or a header without the columns; a failed
    /// connection or query.
    pub fn open(&self) -> Result<Box<dyn RowReader>> {
        match self {
            Self::Csv {
                path,
                name_column,
                id_column,
                encoding,
            } => Ok(Box::new(CsvRows::open(
                path,
                name_column,
                id_column,
                *encoding,
            )?)),
            Self::Postgres { url, query } => Ok(Box::new(PgRows::open(url, query)?)),
        }
    }
}

fn quote_ident(name: &str) -> Result<String> {
    if name.is_empty() {
        bail!("empty table or column name");
    }
    Ok(format!("\"{}\"", name.replace('"', "\"\"")))
}

/// Reads rows in chunks.
pub trait RowReader: Send {
    /// Up to `max` further rows; empty at the end.
    ///
    /// # Errors
    /// Read or query errors.
    fn next_chunk(&mut self, max: usize) -> Result<Vec<Row>>;
    /// Progress: units done and the total if known (bytes for a file, rows
    /// for a query).
    fn progress(&self) -> (u64, Option<u64>);
}

type CsvInput = psi_files::rows::RowGuard<psi_files::encoding::Utf8Reader<Counted>>;

/// A file that counts the bytes read from it (progress in the file's own bytes).
struct Counted {
    file: std::fs::File,
    read: u64,
}

impl std::io::Read for Counted {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

struct CsvRows {
    reader: csv::Reader<CsvInput>,
    name_col: usize,
    id_col: usize,
    len: u64,
}

impl CsvRows {
    fn open(
        path: &std::path::Path,
        name_column: &str,
        id_column: &str,
        named: Option<psi_files::Encoding>,
    ) -> Result<Self> {
        let len = std::fs::metadata(path)
            .with_context(|| format!("reading {}", path.display()))?
            .len();
        let what = || format!("reading {}", path.display());
        // The whole file is checked before a row is encrypted.
        let encoding = match named {
            Some(e) => {
                let file = std::fs::File::open(path).with_context(what)?;
                psi_files::encoding::validate(file, e).with_context(what)?;
                e
            }
            None => psi_files::encoding::detect(path).with_context(what)?,
        };
        let file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut reader =
            csv::ReaderBuilder::new()
                .flexible(true)
                .from_reader(psi_files::rows::RowGuard::new(
                    psi_files::encoding::Utf8Reader::new(Counted { file, read: 0 }, encoding),
                    psi_files::rows::DEFAULT_MAX_ROW_BYTES,
                ));
        let headers = reader
            .byte_headers()
            .with_context(|| format!("reading the header of {}", path.display()))?
            .clone();
        let column = |want: &str| {
            headers
                .iter()
                .position(|h| h.trim_ascii().eq_ignore_ascii_case(want.as_bytes()))
                .with_context(|| {
                    format!(
                        "{} has no `{want}` column: its first line must name the columns `{name_column}` and `{id_column}`",
                        path.display()
                    )
                })
        };
        Ok(Self {
            name_col: column(name_column)?,
            id_col: column(id_column)?,
            reader,
            len,
        })
    }
}

impl RowReader for CsvRows {
    fn next_chunk(&mut self, max: usize) -> Result<Vec<Row>> {
        let mut rows = Vec::with_capacity(max.min(1 << 16));
        let mut record = csv::ByteRecord::new();
        while rows.len() < max && self.reader.read_byte_record(&mut record)? {
            let field = |i: usize| {
                record
                    .get(i)
                    .and_then(|f| std::str::from_utf8(f).ok().map(str::to_owned))
            };
            rows.push(Row {
                line: record.position().map_or(0, csv::Position::line),
                name: field(self.name_col),
                id: field(self.id_col),
            });
        }
        Ok(rows)
    }

    fn progress(&self) -> (u64, Option<u64>) {
        (
            self.reader.get_ref().get_ref().get_ref().read,
            Some(self.len),
        )
    }
}

/// A read-only transaction with a `NO SCROLL` cursor over the query,
/// fetched a chunk at a time.
struct PgRows {
    client: postgres::Client,
    rows: u64,
    done: bool,
}

const CURSOR: &str = "psi_registry_import";

impl PgRows {
    fn open(url: &str, query: &str) -> Result<Self> {
        // The connection string is not echoed: it may carry a password.
        let mut config: postgres::Config = url.parse().map_err(|e| {
            anyhow::anyhow!("the PostgreSQL URL of the registry source is malformed: {e}")
        })?;
        let (tls, ssl_mode) = psi_pg::tls::connector(
            config.get_hosts(),
            config.get_ssl_mode(),
            "the registry source",
        )?;
        config.ssl_mode(ssl_mode);
        let mut client = match tls {
            Some(tls) => config.connect(tls),
            None => config.connect(postgres::NoTls),
        }
        .context("connecting to PostgreSQL")?;
        client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .context("starting a read-only transaction")?;
        client
            .batch_execute(&format!("DECLARE {CURSOR} NO SCROLL CURSOR FOR {query}"))
            .with_context(|| format!("declaring a cursor for `{query}`"))?;
        Ok(Self {
            client,
            rows: 0,
            done: false,
        })
    }
}

impl RowReader for PgRows {
    fn next_chunk(&mut self, max: usize) -> Result<Vec<Row>> {
        if self.done {
            return Ok(Vec::new());
        }
        let fetched = self
            .client
            .query(&format!("FETCH FORWARD {max} FROM {CURSOR}"), &[])
            .context("fetching registry rows")?;
        if let Some(first) = fetched.first() {
            if first.len() < 2 {
                bail!("the query must return the name and the ID number as its first two columns");
            }
        }
        let mut rows = Vec::with_capacity(fetched.len());
        for r in &fetched {
            self.rows += 1;
            // NULL is an empty field, as in a CSV file.
            let text = |i: usize| -> Result<Option<String>> {
                r.try_get::<_, Option<String>>(i)
                    .map(|v| Some(v.unwrap_or_default()))
                    .with_context(|| {
                        format!(
                            "column {} of the query is not text: cast it with ::text",
                            i + 1
                        )
                    })
            };
            rows.push(Row {
                line: self.rows,
                name: text(0)?,
                id: text(1)?,
            });
        }
        if fetched.len() < max {
            self.done = true;
            self.client
                .batch_execute(&format!("CLOSE {CURSOR}; COMMIT"))
                .context("closing the cursor")?;
        }
        Ok(rows)
    }

    fn progress(&self) -> (u64, Option<u64>) {
        (self.rows, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_name_a_file_a_query_or_a_table() {
        assert_eq!(
            Source::from_arg("people.csv", None, "name", "id").unwrap(),
            Source::csv("people.csv")
        );
        let q = Source::from_arg("select a, b from t", Some("host=x"), "name", "id").unwrap();
        assert!(matches!(q, Source::Postgres { ref query, .. } if query == "select a, b from t"));
        let t = Source::from_arg("reg.people", Some("host=x"), "full\"name", "id").unwrap();
        assert!(
            matches!(t, Source::Postgres { ref query, .. } if query == "SELECT \"full\"\"name\"::text, \"id\"::text FROM \"reg\".\"people\""),
            "{t:?}"
        );
        assert!(Source::from_arg("people", Some("host=x"), "", "id").is_err());
        // The connection string (and its password) is never printed.
        let secret = Source::from_arg("t", Some("postgres://u:hunter2@h/db"), "n", "i").unwrap();
        assert!(!format!("{secret:?}").contains("hunter2"));
    }
}
