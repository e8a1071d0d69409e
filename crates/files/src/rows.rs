//! The CSV row contract shared by the registry's source (`init`, `update`)
//! and the institution's batch input: a guard in front of the CSV parser
//! that bounds the bytes of one row and finds a quote that is never closed.
//!
//! Without it one long line makes the parser's buffers (and every row
//! copied after it) that long, and an unbalanced `"` silently turns the
//! rest of the file into one field. The guard follows the CSV dialect of
//! the `csv` crate's defaults (RFC 4180: `,` between fields, `"` quoting
//! with `""` for a quote, `\n`, `\r` or `\r\n` ending a row) byte by byte,
//! and fails the read, naming the line, instead.
//!
//! It transforms nothing and opens nothing: it wraps any [`std::io::Read`]
//! (of UTF-8: see [`crate::encoding`] for other encodings).

use std::io::{self, Read};

/// The default longest row, in bytes (all fields and separators).
pub const DEFAULT_MAX_ROW_BYTES: usize = 64 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    FieldStart,
    Unquoted,
    Quoted,
    /// A `"` inside a quoted field: the field's end, or the first half of `""`.
    QuoteInQuoted,
}

/// A reader that fails, naming the line, on a row longer than its limit or
/// on a quoted field still open at the end of the input.
#[derive(Debug)]
pub struct RowGuard<R> {
    inner: R,
    max_row_bytes: usize,
    state: State,
    row_bytes: usize,
    /// The current physical line, from 1.
    line: u64,
    row_line: u64,
    quote_line: u64,
}

impl<R: Read> RowGuard<R> {
    /// Guards `inner` with rows of at most `max_row_bytes`.
    pub fn new(inner: R, max_row_bytes: usize) -> Self {
        Self {
            inner,
            max_row_bytes,
            state: State::FieldStart,
            row_bytes: 0,
            line: 1,
            row_line: 1,
            quote_line: 0,
        }
    }

    /// The reader it wraps.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    fn scan(&mut self, bytes: &[u8]) -> io::Result<()> {
        for &b in bytes {
            self.row_bytes += 1;
            if self.row_bytes > self.max_row_bytes {
                return Err(self.too_long());
            }
            let end_of_row = matches!(b, b'\n' | b'\r');
            self.state = match (self.state, b) {
                (State::FieldStart, b'"') => {
                    self.quote_line = self.line;
                    State::Quoted
                }
                (State::Quoted, b'"') => State::QuoteInQuoted,
                (State::Quoted, _) => State::Quoted,
                (State::QuoteInQuoted, b'"') => State::Quoted,
                (_, b',') => State::FieldStart,
                (_, _) if end_of_row => {
                    self.row_bytes = 0;
                    self.row_line = self.line + u64::from(b == b'\n');
                    State::FieldStart
                }
                _ => State::Unquoted,
            };
            if b == b'\n' {
                self.line += 1;
            }
        }
        Ok(())
    }

    fn too_long(&self) -> io::Error {
        let why = if self.state == State::Quoted {
            format!(
                "a quoted field opened on line {} runs past {} bytes: is its closing quote missing?",
                self.quote_line, self.max_row_bytes
            )
        } else {
            format!(
                "the row is longer than {} bytes, the limit per row",
                self.max_row_bytes
            )
        };
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("line {}: {why}", self.row_line),
        )
    }
}

impl<R: Read> Read for RowGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.state == State::Quoted {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "line {}: a quoted field opened here is never closed: the rest of the file would be one field",
                    self.quote_line
                ),
            ));
        }
        self.scan(buf.get(..n).unwrap_or(&[]))?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(input: &str, max: usize) -> Result<usize, String> {
        let mut out = Vec::new();
        RowGuard::new(input.as_bytes(), max)
            .read_to_end(&mut out)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn well_formed_csv_passes_unchanged() {
        let text =
            "name,id,note\r\n张伟,11010519491231002X,\"a, b\"\n\"x\"\"y\",1,\"two\nlines\"\n";
        assert_eq!(read_all(text, 64), Ok(text.len()));
        assert_eq!(read_all("", 64), Ok(0));
    }

    #[test]
    fn an_unclosed_quote_is_found_with_its_line() {
        let text = "name,id\n张伟,1\n\"李四,2\n王五,3\n";
        let err = read_all(text, 1 << 10).unwrap_err();
        assert!(
            err.starts_with("line 3: a quoted field opened here is never closed"),
            "{err}"
        );
        // `""` inside a quoted field is a quote, not the field's end.
        let err = read_all("a,\"b\"\"\n", 64).unwrap_err();
        assert!(err.starts_with("line 1:"), "{err}");
    }

    /// RFC 4180 encoding of rows (what a spreadsheet writes).
    fn encode(rows: &[Vec<String>]) -> String {
        rows.iter()
            .map(|row| {
                let fields: Vec<String> = row
                    .iter()
                    .map(|f| {
                        if f.contains([',', '"', '\n', '\r']) || f.is_empty() {
                            format!("\"{}\"", f.replace('"', "\"\""))
                        } else {
                            f.clone()
                        }
                    })
                    .collect();
                fields.join(",") + "\r\n"
            })
            .collect()
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_any_limit_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512), max in 1usize..64) {
            let mut out = Vec::new();
            if RowGuard::new(bytes.as_slice(), max).read_to_end(&mut out).is_ok() {
                proptest::prop_assert_eq!(out, bytes);
            }
        }

        #[test]
        fn well_quoted_rows_are_let_through(rows in proptest::collection::vec(proptest::collection::vec("[a-c,\"\r\n张 ]{0,8}", 1..5), 0..20)) {
            let text = encode(&rows);
            proptest::prop_assert_eq!(read_all(&text, 1 << 10), Ok(text.len()));
        }

        #[test]
        fn one_stray_opening_quote_is_found(rows in proptest::collection::vec(proptest::collection::vec("[a-c ]{1,8}", 1..5), 1..20), at in 0usize..20) {
            let mut rows = rows;
            let at = at % rows.len();
            rows[at][0].insert(0, '"');
            // Written raw, not encoded: the quote opens a field never closed.
            let text: String = rows.iter().map(|r| r.join(",") + "\n").collect();
            let err = read_all(&text, 1 << 16).unwrap_err();
            let want = format!("line {}: a quoted field opened here is never closed", at + 1);
            proptest::prop_assert!(err.starts_with(&want), "{}", err);
        }
    }

    #[test]
    fn a_long_row_is_refused_by_its_line() {
        let text = format!("name,id\nshort,1\n{},2\nshort,3\n", "x".repeat(100));
        let err = read_all(&text, 50).unwrap_err();
        assert!(
            err.starts_with("line 3: the row is longer than 50 bytes"),
            "{err}"
        );
        let err = read_all("a,\"open\nand on and on and on", 12).unwrap_err();
        assert!(err.contains("opened on line 1 runs past 12 bytes"), "{err}");
        // Exactly at the limit is fine (the line break counts).
        assert_eq!(read_all("abcd\nefgh\n", 5), Ok(10));
    }
}
