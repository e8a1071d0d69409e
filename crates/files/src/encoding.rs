//! The text encodings of the CSV files people really have: UTF-8, with or
//! without the byte-order mark Excel writes, and GB18030 (a superset of GBK
//! and GB2312: what Excel's "CSV (逗号分隔)" writes on a Chinese-language
//! Windows). Decoding and encoding are `encoding_rs`'s; this module finds
//! which one a file is in, refuses a file that is neither (naming the first
//! bad line), and streams between it and UTF-8.

use std::io::{self, Read, Write};
use std::path::Path;

use encoding_rs::{DecoderResult, GB18030, UTF_8};

/// A file's text encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// UTF-8 without a byte-order mark.
    Utf8,
    /// UTF-8 starting with the byte-order mark `EF BB BF` (Excel's "CSV UTF-8").
    Utf8Bom,
    /// GB18030, which also reads GBK and GB2312 files.
    Gb18030,
}

impl Encoding {
    /// Its name, as `--encoding` takes it.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Encoding::Utf8 => "utf-8",
            Encoding::Utf8Bom => "utf-8-bom",
            Encoding::Gb18030 => "gb18030",
        }
    }

    /// Parses a name: `utf-8`, `utf-8-bom`, `gb18030` (also `gbk`, `gb2312`).
    ///
    /// # Errors
    /// Any other name, with the list of names.
    pub fn parse(name: &str) -> Result<Self, String> {
        match name.to_ascii_lowercase().as_str() {
            "utf-8" | "utf8" => Ok(Encoding::Utf8),
            "utf-8-bom" | "utf8-bom" => Ok(Encoding::Utf8Bom),
            "gb18030" | "gbk" | "gb2312" => Ok(Encoding::Gb18030),
            _ => Err(format!(
                "unknown encoding `{name}`: use utf-8, utf-8-bom or gb18030 (which also reads GBK and GB2312)"
            )),
        }
    }

    fn decoder(self) -> encoding_rs::Decoder {
        match self {
            Encoding::Utf8 | Encoding::Utf8Bom => UTF_8.new_decoder_with_bom_removal(),
            Encoding::Gb18030 => GB18030.new_decoder_without_bom_handling(),
        }
    }
}

impl std::fmt::Display for Encoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a file's text was refused.
#[derive(Debug, thiserror::Error)]
pub enum EncodingError {
    /// Not valid in the encoding it was read as.
    #[error("line {line} is not valid {encoding}")]
    Invalid {
        /// The first bad line, from 1.
        line: u64,
        /// The encoding it was read as.
        encoding: Encoding,
    },
    /// Neither UTF-8 nor GB18030.
    #[error(
        "the file is neither UTF-8 (line {utf8_line} is not) nor GB18030 (line {gb18030_line} is not): save it as \"CSV UTF-8\" or as GBK/GB18030 text"
    )]
    Neither {
        /// The first line that is not UTF-8.
        utf8_line: u64,
        /// The first line that is not GB18030.
        gb18030_line: u64,
    },
    /// The file could not be read.
    #[error(transparent)]
    Io(#[from] io::Error),
}

const BOM: &[u8] = b"\xEF\xBB\xBF";
const BUF: usize = 64 << 10;

/// Reads all of `reader` as `encoding`: `Ok` or the first bad line.
///
/// # Errors
/// [`EncodingError::Invalid`], or the read's error.
pub fn validate(reader: impl Read, encoding: Encoding) -> Result<(), EncodingError> {
    let mut text = Utf8Reader::new(reader, encoding);
    let mut sink = vec![0u8; BUF];
    loop {
        match text.read(&mut sink) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) => {
                return Err(match text.bad_line.take() {
                    Some(line) => EncodingError::Invalid { line, encoding },
                    None => EncodingError::Io(e),
                })
            }
        }
    }
}

/// The encoding of the file at `path`: UTF-8 if it starts with the BOM or
/// is valid UTF-8 throughout, else GB18030 if it is valid GB18030
/// throughout (each a pass over the file, in bounded memory).
///
/// # Errors
/// [`EncodingError::Neither`], [`EncodingError::Invalid`] for a file with
/// a BOM that is not UTF-8 after all, or I/O errors.
pub fn detect(path: &Path) -> Result<Encoding, EncodingError> {
    let mut head = [0u8; 3];
    let n = read_up_to(&mut std::fs::File::open(path)?, &mut head)?;
    if head.get(..n) == Some(BOM) {
        validate(std::fs::File::open(path)?, Encoding::Utf8Bom)?;
        return Ok(Encoding::Utf8Bom);
    }
    let utf8_line = match validate(std::fs::File::open(path)?, Encoding::Utf8) {
        Ok(()) => return Ok(Encoding::Utf8),
        Err(EncodingError::Invalid { line, .. }) => line,
        Err(e) => return Err(e),
    };
    match validate(std::fs::File::open(path)?, Encoding::Gb18030) {
        Ok(()) => Ok(Encoding::Gb18030),
        Err(EncodingError::Invalid { line, .. }) => Err(EncodingError::Neither {
            utf8_line,
            gb18030_line: line,
        }),
        Err(e) => Err(e),
    }
}

fn read_up_to(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match reader.read(buf.get_mut(n..).unwrap_or_default())? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Reads a text in `encoding` as UTF-8 (a BOM dropped); bytes that are not
/// valid in it fail the read, naming the line.
#[derive(Debug)]
pub struct Utf8Reader<R> {
    inner: R,
    decoder: encoding_rs::Decoder,
    encoding: Encoding,
    input: Vec<u8>,
    in_start: usize,
    in_end: usize,
    output: Vec<u8>,
    out_start: usize,
    out_end: usize,
    eof: bool,
    done: bool,
    /// Line breaks decoded so far.
    lines: u64,
    bad_line: Option<u64>,
}

impl<R: Read> Utf8Reader<R> {
    /// Reads `inner`, in `encoding`.
    pub fn new(inner: R, encoding: Encoding) -> Self {
        Self {
            inner,
            decoder: encoding.decoder(),
            encoding,
            input: vec![0u8; BUF],
            in_start: 0,
            in_end: 0,
            // Room for the worst expansion of a full input buffer.
            output: vec![0u8; BUF * 3 + 16],
            out_start: 0,
            out_end: 0,
            eof: false,
            done: false,
            lines: 0,
            bad_line: None,
        }
    }

    /// The reader it wraps.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// Decodes the next piece into `output`; false at the end.
    fn refill(&mut self) -> io::Result<bool> {
        while !self.done {
            if self.in_start == self.in_end && !self.eof {
                self.in_start = 0;
                self.in_end = self.inner.read(&mut self.input)?;
                self.eof = self.in_end == 0;
            }
            let src = self
                .input
                .get(self.in_start..self.in_end)
                .unwrap_or_default();
            let (result, read, written) =
                self.decoder
                    .decode_to_utf8_without_replacement(src, &mut self.output, self.eof);
            self.in_start += read;
            let out = self.output.get(..written).unwrap_or_default();
            let breaks = out.iter().filter(|&&b| b == b'\n').count() as u64;
            self.out_start = 0;
            self.out_end = written;
            match result {
                DecoderResult::InputEmpty => {
                    self.lines += breaks;
                    if self.eof {
                        self.done = true;
                    }
                }
                DecoderResult::OutputFull => self.lines += breaks,
                DecoderResult::Malformed(_, _) => {
                    let line = self.lines + breaks + 1;
                    self.bad_line = Some(line);
                    self.done = true;
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("line {line} is not valid {}", self.encoding),
                    ));
                }
            }
            if written > 0 {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

impl<R: Read> Read for Utf8Reader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.out_start == self.out_end && !self.refill()? {
            return Ok(0);
        }
        let available = self
            .output
            .get(self.out_start..self.out_end)
            .unwrap_or_default();
        let n = available.len().min(buf.len());
        if let (Some(to), Some(from)) = (buf.get_mut(..n), available.get(..n)) {
            to.copy_from_slice(from);
        }
        self.out_start += n;
        Ok(n)
    }
}

/// Takes UTF-8 and writes it in `encoding` (the BOM first for
/// [`Encoding::Utf8Bom`]). Call [`EncodingWriter::finish`] at the end.
#[derive(Debug)]
pub struct EncodingWriter<W: Write> {
    inner: W,
    encoder: Option<encoding_rs::Encoder>,
    bom: bool,
    /// The start of a character split across two writes.
    carry: Vec<u8>,
}

impl<W: Write> EncodingWriter<W> {
    /// Writes to `inner` in `encoding`. `bom`: the file is new, so a
    /// UTF-8-with-BOM file gets its mark.
    pub fn new(inner: W, encoding: Encoding, new_file: bool) -> Self {
        Self {
            inner,
            encoder: (encoding == Encoding::Gb18030).then(|| GB18030.new_encoder()),
            bom: new_file && encoding == Encoding::Utf8Bom,
            carry: Vec::new(),
        }
    }

    /// Flushes and returns the inner writer.
    ///
    /// # Errors
    /// A character left incomplete, or the inner writer's errors.
    pub fn finish(mut self) -> io::Result<W> {
        if !self.carry.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the text ended inside a UTF-8 character",
            ));
        }
        self.inner.flush()?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for EncodingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.bom {
            self.inner.write_all(BOM)?;
            self.bom = false;
        }
        let Some(encoder) = &mut self.encoder else {
            self.inner.write_all(buf)?;
            return Ok(buf.len());
        };
        self.carry.extend_from_slice(buf);
        let valid = match std::str::from_utf8(&self.carry) {
            Ok(s) => s.len(),
            // An incomplete character at the end waits for the next write.
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "output text that is not UTF-8",
                ))
            }
        };
        let text = std::str::from_utf8(self.carry.get(..valid).unwrap_or_default())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let mut out = Vec::with_capacity(text.len() * 2 + 16);
        let mut rest = text;
        loop {
            out.reserve(
                encoder
                    .max_buffer_length_from_utf8_without_replacement(rest.len())
                    .unwrap_or(rest.len() * 4 + 16),
            );
            let (result, read) =
                encoder.encode_from_utf8_to_vec_without_replacement(rest, &mut out, false);
            rest = rest.get(read..).unwrap_or_default();
            match result {
                encoding_rs::EncoderResult::InputEmpty => break,
                encoding_rs::EncoderResult::OutputFull => {}
                // GB18030 encodes every character.
                encoding_rs::EncoderResult::Unmappable(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a character GB18030 cannot encode",
                    ))
                }
            }
        }
        self.inner.write_all(&out)?;
        self.carry.drain(..valid);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The text of `bytes`, in `encoding`, as UTF-8.
///
/// # Errors
/// [`EncodingError::Invalid`] naming the first bad line.
pub fn decode(bytes: &[u8], encoding: Encoding) -> Result<String, EncodingError> {
    let mut out = String::new();
    let mut reader = Utf8Reader::new(bytes, encoding);
    match reader.read_to_string(&mut out) {
        Ok(_) => Ok(out),
        Err(e) => Err(match reader.bad_line {
            Some(line) => EncodingError::Invalid { line, encoding },
            None => EncodingError::Io(e),
        }),
    }
}

/// `text` in `encoding` (without a BOM).
#[must_use]
pub fn encode(text: &str, encoding: Encoding) -> Vec<u8> {
    match encoding {
        Encoding::Utf8 | Encoding::Utf8Bom => text.as_bytes().to_vec(),
        Encoding::Gb18030 => GB18030.encode(text).0.into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gbk(text: &str) -> Vec<u8> {
        encode(text, Encoding::Gb18030)
    }

    fn file(bytes: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.csv");
        std::fs::write(&path, bytes).unwrap();
        (dir, path)
    }

    const TEXT: &str = "姓名,身份证号\n张伟,11010519491231002X\n阿依古丽·买买提,360426199101010071\n王𠮷,810000199408230021\n";

    #[test]
    fn utf8_with_and_without_bom_and_gb18030_are_detected() {
        let (_d, p) = file(TEXT.as_bytes());
        assert_eq!(detect(&p).unwrap(), Encoding::Utf8);
        let (_d, p) = file(&[BOM, TEXT.as_bytes()].concat());
        assert_eq!(detect(&p).unwrap(), Encoding::Utf8Bom);
        let (_d, p) = file(&gbk(TEXT));
        assert_eq!(detect(&p).unwrap(), Encoding::Gb18030);
        // ASCII only is UTF-8.
        let (_d, p) = file(b"name,id\n");
        assert_eq!(detect(&p).unwrap(), Encoding::Utf8);
    }

    #[test]
    fn a_file_in_neither_is_refused_naming_the_lines() {
        // Line 3 has a byte that starts no character in either encoding.
        let mut bytes = b"name,id\nok,1\n".to_vec();
        bytes.extend_from_slice(b"caf\xE9 \xFF,2\n");
        let (_d, p) = file(&bytes);
        let err = detect(&p).unwrap_err();
        assert!(
            matches!(
                err,
                EncodingError::Neither {
                    utf8_line: 3,
                    gb18030_line: 3
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("neither UTF-8"), "{err}");
        // A BOM followed by GBK bytes is not UTF-8.
        let (_d, p) = file(&[BOM, &gbk("name\n张伟\n")].concat());
        assert!(matches!(
            detect(&p).unwrap_err(),
            EncodingError::Invalid { line: 2, .. }
        ));
    }

    #[test]
    fn reading_decodes_in_any_piece_sizes() {
        for encoding in [Encoding::Utf8, Encoding::Utf8Bom, Encoding::Gb18030] {
            let raw = match encoding {
                Encoding::Utf8Bom => [BOM, TEXT.as_bytes()].concat(),
                other => encode(TEXT, other),
            };
            for piece in [1, 2, 3, 7, 4096] {
                let mut reader = Utf8Reader::new(raw.as_slice(), encoding);
                let mut out = Vec::new();
                let mut buf = vec![0u8; piece];
                loop {
                    let n = reader.read(&mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    out.extend_from_slice(&buf[..n]);
                }
                assert_eq!(
                    String::from_utf8(out).unwrap(),
                    TEXT,
                    "{encoding} by {piece}"
                );
            }
        }
    }

    #[test]
    fn writing_encodes_characters_split_across_writes() {
        for encoding in [Encoding::Utf8, Encoding::Utf8Bom, Encoding::Gb18030] {
            let mut w = EncodingWriter::new(Vec::new(), encoding, true);
            for chunk in TEXT.as_bytes().chunks(2) {
                w.write_all(chunk).unwrap();
            }
            let bytes = w.finish().unwrap();
            let want = match encoding {
                Encoding::Utf8Bom => [BOM, TEXT.as_bytes()].concat(),
                other => encode(TEXT, other),
            };
            assert_eq!(bytes, want, "{encoding}");
            assert_eq!(decode(&bytes, encoding).unwrap(), TEXT);
        }
        // Appending to an existing UTF-8-with-BOM file adds no second mark.
        let mut w = EncodingWriter::new(Vec::new(), Encoding::Utf8Bom, false);
        w.write_all(b"x").unwrap();
        assert_eq!(w.finish().unwrap(), b"x");
    }

    #[test]
    fn names_parse() {
        assert_eq!(Encoding::parse("GBK"), Ok(Encoding::Gb18030));
        assert_eq!(Encoding::parse("utf-8-bom"), Ok(Encoding::Utf8Bom));
        assert!(Encoding::parse("latin1").unwrap_err().contains("gb18030"));
    }
}
