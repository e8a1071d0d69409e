//! Excel workbooks (`.xlsx`): a sheet read as rows of text, and rows
//! written back as a sheet of text cells (so that Excel never turns an ID
//! number into a rounded number). Reading is `calamine`'s, writing
//! `rust_xlsxwriter`'s.
//!
//! Excel stores a number typed into a cell as a floating-point number with
//! 15 significant digits: an 18-digit ID number entered without a text
//! format is already wrong in the file. Such a cell is kept as
//! [`Cell::Number`] so that the caller can say so, row by row; a whole
//! number of at most 15 digits (a legacy 15-digit ID) is exact and read as
//! its digits.

use std::path::Path;

use calamine::{Data, Reader};

/// One cell's content.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    /// Text (also dates and booleans, as Excel displays them, and whole
    /// numbers of at most 15 digits).
    Text(String),
    /// A number that is not exactly representable as its digits: an ID
    /// number typed into a cell without a text format.
    Number(f64),
}

impl Cell {
    /// The cell as text (a number in Excel's own rounding).
    #[must_use]
    pub fn text(&self) -> String {
        match self {
            Cell::Text(t) => t.clone(),
            Cell::Number(n) => format!("{n}"),
        }
    }
}

/// A sheet: its first row (the header) and the rest.
#[derive(Debug, Clone, PartialEq)]
pub struct Sheet {
    /// The sheet's name.
    pub name: String,
    /// The first row.
    pub header: Vec<String>,
    /// The other rows, each as long as its last non-empty cell.
    pub rows: Vec<Vec<Cell>>,
}

/// Why a workbook was refused.
#[derive(Debug, thiserror::Error)]
pub enum XlsxError {
    /// Not a readable workbook.
    #[error("not a readable .xlsx workbook: {0}")]
    Workbook(String),
    /// No such sheet.
    #[error("the workbook has no sheet `{wanted}` (its sheets: {available})")]
    NoSheet {
        /// The sheet asked for.
        wanted: String,
        /// The sheets there are.
        available: String,
    },
    /// Writing failed.
    #[error("writing the workbook: {0}")]
    Write(String),
}

const EXACT_DIGITS: f64 = 1e15;

fn cell(data: &Data) -> Cell {
    match data {
        Data::Empty => Cell::Text(String::new()),
        Data::String(s) => Cell::Text(s.clone()),
        Data::Int(i) if i.unsigned_abs() < 1_000_000_000_000_000 => Cell::Text(i.to_string()),
        Data::Int(i) => Cell::Number(*i as f64),
        Data::Float(f) if f.fract() == 0.0 && f.abs() < EXACT_DIGITS => {
            Cell::Text(format!("{f:.0}"))
        }
        Data::Float(f) => Cell::Number(*f),
        Data::Bool(b) => Cell::Text(if *b { "TRUE" } else { "FALSE" }.into()),
        Data::DateTime(d) => Cell::Text(d.to_string()),
        Data::DateTimeIso(s) | Data::DurationIso(s) => Cell::Text(s.clone()),
        Data::Error(e) => Cell::Text(format!("#{e:?}")),
    }
}

/// Reads the sheet named `sheet`, or the first one.
///
/// # Errors
/// An unreadable workbook, or no such sheet.
pub fn read(path: &Path, sheet: Option<&str>) -> Result<Sheet, XlsxError> {
    let mut book: calamine::Xlsx<_> = calamine::open_workbook(path)
        .map_err(|e: calamine::XlsxError| XlsxError::Workbook(e.to_string()))?;
    let names = book.sheet_names();
    let name = match sheet {
        Some(wanted) => names
            .iter()
            .find(|n| n.as_str() == wanted)
            .cloned()
            .ok_or_else(|| XlsxError::NoSheet {
                wanted: wanted.to_string(),
                available: names.join(", "),
            })?,
        None => names.first().cloned().ok_or_else(|| XlsxError::NoSheet {
            wanted: "(the first)".into(),
            available: String::new(),
        })?,
    };
    let range = book
        .worksheet_range(&name)
        .map_err(|e| XlsxError::Workbook(e.to_string()))?;
    // Rows and columns before the used range are empty in the sheet too.
    let (first_row, first_col) = range.start().unwrap_or((0, 0));
    let pad = usize::try_from(first_col).unwrap_or(0);
    let mut rows = (0..first_row)
        .map(|_| Vec::new())
        .collect::<Vec<Vec<Cell>>>();
    for r in range.rows() {
        let mut row: Vec<Cell> = std::iter::repeat_n(Cell::Text(String::new()), pad)
            .chain(r.iter().map(cell))
            .collect();
        while row.last() == Some(&Cell::Text(String::new())) {
            row.pop();
        }
        rows.push(row);
    }
    let mut rows = rows.into_iter();
    let header = rows
        .next()
        .unwrap_or_default()
        .iter()
        .map(Cell::text)
        .collect();
    Ok(Sheet {
        name,
        header,
        rows: rows.collect(),
    })
}

/// Writes `header` and `rows` as the one sheet `name` of a new workbook,
/// every cell as text, replacing `path` atomically with mode 0600 (the
/// workbook holds pairs).
///
/// # Errors
/// A cell Excel cannot hold, or I/O errors.
pub fn write(
    path: &Path,
    name: &str,
    header: &[String],
    rows: &[Vec<String>],
) -> Result<(), XlsxError> {
    let err = |e: rust_xlsxwriter::XlsxError| XlsxError::Write(e.to_string());
    let mut book = rust_xlsxwriter::Workbook::new();
    let sheet = book.add_worksheet();
    sheet.set_name(name).map_err(err)?;
    let text = rust_xlsxwriter::Format::new().set_num_format("@");
    for (r, row) in std::iter::once(header)
        .chain(rows.iter().map(Vec::as_slice))
        .enumerate()
    {
        let r =
            u32::try_from(r).map_err(|_| XlsxError::Write("too many rows for a sheet".into()))?;
        for (c, value) in row.iter().enumerate() {
            let c = u16::try_from(c)
                .map_err(|_| XlsxError::Write("too many columns for a sheet".into()))?;
            sheet
                .write_string_with_format(r, c, value, &text)
                .map_err(err)?;
        }
    }
    let bytes = book.save_to_buffer().map_err(err)?;
    crate::atomic::write_atomically(path, &bytes, 0o600)
        .map_err(|e| XlsxError::Write(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_cells_round_trip_and_numbers_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.xlsx");
        // A workbook as a clerk makes it: Chinese headers, one ID typed as
        // a number (Excel keeps 15 significant digits), a legacy 15-digit
        // number, text IDs.
        let mut book = rust_xlsxwriter::Workbook::new();
        let s = book.add_worksheet();
        s.set_name("客户").unwrap();
        s.write_string(0, 0, "姓名").unwrap();
        s.write_string(0, 1, "身份证号").unwrap();
        s.write_string(1, 0, "张伟").unwrap();
        s.write_string(1, 1, "11010519491231002X").unwrap();
        s.write_string(2, 0, "李秀英").unwrap();
        s.write_number(2, 1, 440524188001010014.0).unwrap();
        s.write_string(3, 0, "王五").unwrap();
        s.write_number(3, 1, 110105491231002.0).unwrap();
        book.save(&path).unwrap();

        let sheet = read(&path, None).unwrap();
        assert_eq!(sheet.name, "客户");
        assert_eq!(sheet.header, ["姓名", "身份证号"]);
        assert_eq!(sheet.rows[0][1], Cell::Text("11010519491231002X".into()));
        assert!(matches!(sheet.rows[1][1], Cell::Number(_)));
        assert_eq!(sheet.rows[2][1], Cell::Text("110105491231002".into()));
        assert!(matches!(
            read(&path, Some("Sheet9")).unwrap_err(),
            XlsxError::NoSheet { .. }
        ));
        assert!(matches!(
            read(&dir.path().join("missing.xlsx"), None).unwrap_err(),
            XlsxError::Workbook(_)
        ));

        let out = dir.path().join("out.xlsx");
        let header = vec!["姓名".to_string(), "result".to_string()];
        let rows = vec![vec!["张伟".to_string(), "match".to_string()]];
        write(&out, "answers", &header, &rows).unwrap();
        let back = read(&out, Some("answers")).unwrap();
        assert_eq!(back.header, header);
        assert_eq!(
            back.rows,
            vec![vec![Cell::Text("张伟".into()), Cell::Text("match".into())]]
        );
    }
}
