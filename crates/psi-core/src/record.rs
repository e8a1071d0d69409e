//! Canonical (name, resident ID number) records: the OPRF input.
//!
//! The same function runs on the registry side and the query side, so two
//! spellings of one pair (full-width digits, a lower-case `x`, a look-alike
//! middle dot, stray spaces, a legacy 15-digit number) give the same bytes,
//! and anything that is not a plausible pair is an error naming the field and
//! the reason, never a silent skip. See `docs/PROTOCOL.md` for the encoding.

use core::fmt;

use sha2::{Digest, Sha256};
use unicode_normalization::UnicodeNormalization;

use crate::error::{Error, Result};

/// Version byte that starts every encoded record.
pub const RECORD_VERSION: u8 = 1;
/// Longest accepted name, in Unicode scalar values after normalisation.
pub const MAX_NAME_CHARS: usize = 64;
/// Longest accepted raw name field, in bytes, before normalisation.
pub const MAX_RAW_NAME_BYTES: usize = 1024;
/// Longest accepted raw ID field, in bytes, before normalisation.
pub const MAX_RAW_ID_BYTES: usize = 256;
/// The official separator in transcribed minority and foreign names.
pub const MIDDLE_DOT: char = '\u{00B7}';
/// Length of a normalised ID number.
pub const ID_LEN: usize = 18;
/// Domain tag of the bucket hash (bucket mode).
pub const BUCKET_DOMAIN: &[u8] = b"psi.v1.bucket";

/// A proleptic Gregorian calendar date. `psi-core` reads no clock: callers
/// pass "today" in, so validation is reproducible.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CivilDate {
    /// Year, e.g. 1991.
    pub year: i32,
    /// Month, 1 to 12.
    pub month: u32,
    /// Day of month, 1 to 31.
    pub day: u32,
}

impl CivilDate {
    /// A date, if it exists in the calendar.
    #[must_use]
    pub fn new(year: i32, month: u32, day: u32) -> Option<Self> {
        let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
        let days = match month {
            1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
            4 | 6 | 9 | 11 => 30,
            2 if leap => 29,
            2 => 28,
            _ => return None,
        };
        (1..=days)
            .contains(&day)
            .then_some(Self { year, month, day })
    }

    /// The date `days` days after 1970-01-01 (negative: before).
    #[must_use]
    pub fn from_unix_days(days: i64) -> Self {
        // Howard Hinnant's civil_from_days.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        Self {
            year: year as i32,
            month: month as u32,
            day: day as u32,
        }
    }

    /// Today's date in China Standard Time (UTC+8), against which birth
    /// dates are validated on both sides (reads the system clock).
    #[must_use]
    pub fn today() -> Self {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        Self::from_unix_time(secs, 8 * 3600)
    }

    /// The civil date at `unix_seconds` in a zone `utc_offset_seconds` east of UTC
    /// (China Standard Time: `8 * 3600`).
    #[must_use]
    pub fn from_unix_time(unix_seconds: i64, utc_offset_seconds: i64) -> Self {
        Self::from_unix_days((unix_seconds + utc_offset_seconds).div_euclid(86_400))
    }
}

impl fmt::Display for CivilDate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }
}

/// Why a name was rejected. Messages name positions, never the name itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// Nothing left after removing spaces and invisible characters.
    #[error("name is empty")]
    Empty,
    /// Longer than [`MAX_NAME_CHARS`] characters (or [`MAX_RAW_NAME_BYTES`] raw bytes).
    #[error("name has {got} characters, more than the maximum of {max}")]
    TooLong {
        /// The limit.
        max: usize,
        /// The length found.
        got: usize,
    },
    /// A Latin letter: registry names are written in Chinese characters.
    #[error("name contains a Latin letter at position {position}; registered names are written in Chinese characters")]
    LatinLetter {
        /// 1-based character position in the normalised name.
        position: usize,
    },
    /// A digit.
    #[error("name contains a digit at position {position}")]
    Digit {
        /// 1-based character position in the normalised name.
        position: usize,
    },
    /// A control, format or punctuation character other than the middle dot.
    #[error("name contains a control or punctuation character at position {position}")]
    Forbidden {
        /// 1-based character position in the normalised name.
        position: usize,
    },
    /// A middle dot at the start or end, or two in a row.
    #[error("middle dot (·) must separate two parts of a name")]
    MisplacedDot,
}

/// Why an ID number was rejected, in words a person can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// Not 18 characters (nor 15 for a legacy number).
    #[error("ID number must have 18 characters (or 15 for a legacy number), found {got}")]
    Length {
        /// Characters found after removing spaces.
        got: usize,
    },
    /// A character that is not a digit (nor a final X).
    #[error("character {position} of the ID number is not a digit")]
    NotADigit {
        /// 1-based position.
        position: usize,
    },
    /// The check character does not match the first 17 digits.
    #[error("check character should be {expected}, not {got}")]
    CheckCharacter {
        /// The character ISO 7064 MOD 11-2 gives.
        expected: char,
        /// The character found.
        got: char,
    },
    /// The birth date is not a calendar date.
    #[error("birth date {year:04}-{month:02}-{day:02} does not exist")]
    NoSuchDate {
        /// Year digits.
        year: u32,
        /// Month digits.
        month: u32,
        /// Day digits.
        day: u32,
    },
    /// The birth date is after today.
    #[error("birth date {date} is in the future")]
    FutureDate {
        /// The birth date.
        date: CivilDate,
    },
    /// The birth year is before 1800.
    #[error("birth year {year} is implausible (before 1800)")]
    TooOld {
        /// The birth year.
        year: i32,
    },
    /// The first two digits are no province-level code that has existed, nor a
    /// residence or permanent-residence permit prefix.
    #[error("region code {prefix} is not a province-level code or permit prefix")]
    UnknownRegion {
        /// The first two digits.
        prefix: String,
    },
}

impl IdError {
    /// The reason without any digit of the number: for reports and logs that
    /// must not carry ID data.
    #[must_use]
    pub fn summary(&self) -> &'static str {
        match self {
            IdError::Length { .. } => "wrong length",
            IdError::NotADigit { .. } => "not a digit",
            IdError::CheckCharacter { .. } => "wrong check character",
            IdError::NoSuchDate { .. } => "birth date does not exist",
            IdError::FutureDate { .. } => "birth date in the future",
            IdError::TooOld { .. } => "birth year before 1800",
            IdError::UnknownRegion { .. } => "unknown region code",
        }
    }
}

fn is_dot_lookalike(c: char) -> bool {
    matches!(
        c,
        '\u{00B7}'
            | '\u{2022}'
            | '\u{30FB}'
            | '\u{FF65}'
            | '\u{FF0E}'
            | '\u{2027}'
            | '\u{0387}'
            | '\u{2219}'
            | '\u{22C5}'
            | '\u{2E31}'
            | '.'
    )
}

fn is_invisible(c: char) -> bool {
    c.is_whitespace()
        || matches!(
            c,
            '\u{200B}'..='\u{200D}'
                | '\u{2060}'
                | '\u{FEFF}'
                | '\u{180E}'
                | '\u{00AD}'
                | '\u{034F}'
                | '\u{FE00}'..='\u{FE0F}'
                | '\u{E0100}'..='\u{E01EF}'
        )
}

fn is_latin_letter(c: char) -> bool {
    c.is_ascii_alphabetic()
        || (c.is_alphabetic()
            && matches!(
                c,
                '\u{00C0}'..='\u{024F}'
                    | '\u{1E00}'..='\u{1EFF}'
                    | '\u{2C60}'..='\u{2C7F}'
                    | '\u{A720}'..='\u{A7FF}'
                    | '\u{AB30}'..='\u{AB6F}'
            ))
}

fn is_forbidden(c: char) -> bool {
    c.is_control()
        || c.is_ascii_punctuation()
        || matches!(
            c,
            '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{061C}'
        )
        || ('\u{2000}'..='\u{206F}').contains(&c) // general punctuation block
        || ('\u{3000}'..='\u{303F}').contains(&c) && c != '\u{3007}' // CJK punctuation, but 〇
        || ('\u{FF01}'..='\u{FF0F}').contains(&c)
}

/// The 14 ideographs GB 18030-2005 still mapped to private-use code points,
/// with the standard code points Unicode 4.1 gave them and GB 18030-2022
/// maps them to (GBK bytes FE51, FE52, FE53, FE59, FE61, FE66, FE67, FE6C,
/// FE6D, FE76, FE7E, FE90, FE91, FEA0): a name typed in a system of either
/// standard is the same name.
const GB18030_PUA_IDEOGRAPHS: [(char, char); 14] = [
    ('\u{E816}', '\u{20087}'),
    ('\u{E817}', '\u{20089}'),
    ('\u{E818}', '\u{200CC}'),
    ('\u{E81E}', '\u{9FB4}'),
    ('\u{E826}', '\u{9FB5}'),
    ('\u{E82B}', '\u{9FB6}'),
    ('\u{E82C}', '\u{9FB7}'),
    ('\u{E831}', '\u{215D7}'),
    ('\u{E832}', '\u{9FB8}'),
    ('\u{E83B}', '\u{2298F}'),
    ('\u{E843}', '\u{9FB9}'),
    ('\u{E854}', '\u{9FBA}'),
    ('\u{E855}', '\u{241FE}'),
    ('\u{E864}', '\u{9FBB}'),
];

/// The standard code point of a GB 18030-2005 private-use ideograph.
fn gb18030_standard(c: char) -> char {
    GB18030_PUA_IDEOGRAPHS
        .iter()
        .find(|(pua, _)| *pua == c)
        .map_or(c, |(_, standard)| *standard)
}

/// One pass of the mapping: dot look-alikes to U+00B7, GB 18030-2005
/// private-use ideographs to their standard code points, invisible
/// characters removed.
fn map_dots_and_strip(s: &str) -> String {
    s.chars()
        .filter(|&c| !is_invisible(c))
        .map(|c| {
            if is_dot_lookalike(c) {
                MIDDLE_DOT
            } else {
                gb18030_standard(c)
            }
        })
        .collect()
}

/// Normalises a name: NFKC, every middle-dot look-alike to U+00B7, all
/// whitespace and zero-width characters removed (repeated until stable, so
/// the function is idempotent). Traditional and simplified characters are
/// never folded.
///
/// # Errors
/// A [`NameError`] saying what to fix.
pub fn normalize_name(raw: &str) -> Result<String, NameError> {
    if raw.len() > MAX_RAW_NAME_BYTES {
        return Err(NameError::TooLong {
            max: MAX_NAME_CHARS,
            got: raw.chars().count(),
        });
    }
    let mut name = map_dots_and_strip(&raw.nfkc().collect::<String>());
    // Removing a character can let NFKC compose its neighbours differently;
    // iterate to the fixed point (two rounds in practice).
    for _ in 0..4 {
        let again = map_dots_and_strip(&name.nfkc().collect::<String>());
        if again == name {
            break;
        }
        name = again;
    }
    let count = name.chars().count();
    if count == 0 {
        return Err(NameError::Empty);
    }
    if count > MAX_NAME_CHARS {
        return Err(NameError::TooLong {
            max: MAX_NAME_CHARS,
            got: count,
        });
    }
    for (i, c) in name.chars().enumerate() {
        let position = i + 1;
        if is_latin_letter(c) {
            return Err(NameError::LatinLetter { position });
        }
        if c.is_numeric() && c != '\u{3007}' {
            return Err(NameError::Digit { position });
        }
        if c != MIDDLE_DOT && is_forbidden(c) {
            return Err(NameError::Forbidden { position });
        }
    }
    if name.starts_with(MIDDLE_DOT) || name.ends_with(MIDDLE_DOT) || name.contains("\u{B7}\u{B7}") {
        return Err(NameError::MisplacedDot);
    }
    Ok(name)
}

const WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
const CHECK_CHARS: &[u8; 11] = b"10X98765432";

/// The ISO 7064 MOD 11-2 check character of the first 17 digits.
fn check_character(body: &[u8; 17]) -> char {
    let sum: u32 = body
        .iter()
        .zip(WEIGHTS)
        .map(|(d, w)| u32::from(d - b'0') * w)
        .sum();
    CHECK_CHARS
        .get((sum % 11) as usize)
        .map_or('?', |&c| c as char)
}

/// Province-level codes that have existed (GB/T 2260), and the 81/82/83
/// residence-permit prefixes; a leading 9 is the 2023 permanent-residence card.
fn region_is_plausible(d0: u8, d1: u8) -> bool {
    if d0 == b'9' {
        return true;
    }
    let code = u32::from(d0 - b'0') * 10 + u32::from(d1 - b'0');
    matches!(
        code,
        11..=15 | 21..=23 | 31..=37 | 41..=46 | 50..=54 | 61..=65 | 71 | 81..=83
    )
}

/// A normalised, validated 18-character resident ID number. Its `Debug`
/// prints nothing of the number.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct IdNumber([u8; ID_LEN]);

impl IdNumber {
    /// Normalises and validates an ID number against `today`'s date: NFKC (so
    /// full-width digits and `Ｘ` are read), spaces removed, `x` read as `X`,
    /// a legacy 15-digit number upgraded (with `19` inserted for the century,
    /// never guessed otherwise), then length, digits, check character, birth
    /// date and region checked.
    ///
    /// # Errors
    /// An [`IdError`] saying what to fix.
    pub fn parse(raw: &str, today: CivilDate) -> Result<Self, IdError> {
        if raw.len() > MAX_RAW_ID_BYTES {
            return Err(IdError::Length {
                got: raw.chars().count(),
            });
        }
        let chars: Vec<char> = raw
            .nfkc()
            .filter(|&c| !is_invisible(c))
            .map(|c| c.to_ascii_uppercase())
            .collect();
        let mut id = [0u8; ID_LEN];
        match chars.len() {
            18 => {
                for (i, (slot, &c)) in id.iter_mut().zip(&chars).enumerate() {
                    let ok = c.is_ascii_digit() || (i == 17 && c == 'X');
                    if !ok {
                        return Err(IdError::NotADigit { position: i + 1 });
                    }
                    *slot = c as u8;
                }
            }
            15 => {
                for (i, &c) in chars.iter().enumerate() {
                    if !c.is_ascii_digit() {
                        return Err(IdError::NotADigit { position: i + 1 });
                    }
                    let at = if i < 6 { i } else { i + 2 };
                    if let Some(slot) = id.get_mut(at) {
                        *slot = c as u8;
                    }
                }
                id[6] = b'1';
                id[7] = b'9';
                let body: [u8; 17] = body_of(&id);
                id[17] = check_character(&body) as u8;
            }
            got => return Err(IdError::Length { got }),
        }
        let body = body_of(&id);
        let expected = check_character(&body);
        let got = id[17] as char;
        if expected != got {
            return Err(IdError::CheckCharacter { expected, got });
        }
        if !region_is_plausible(id[0], id[1]) {
            return Err(IdError::UnknownRegion {
                prefix: String::from_utf8_lossy(&id[..2]).into_owned(),
            });
        }
        let digits = |r: core::ops::Range<usize>| -> u32 {
            id.get(r)
                .unwrap_or(&[])
                .iter()
                .fold(0, |acc, d| acc * 10 + u32::from(d - b'0'))
        };
        let (year, month, day) = (digits(6..10), digits(10..12), digits(12..14));
        // The cast cannot wrap: at most 9999.
        let date = CivilDate::new(year as i32, month, day).ok_or(IdError::NoSuchDate {
            year,
            month,
            day,
        })?;
        if date.year < 1800 {
            return Err(IdError::TooOld { year: date.year });
        }
        if date > today {
            return Err(IdError::FutureDate { date });
        }
        Ok(Self(id))
    }

    /// Builds a number from a 6-digit address code, a birth date and a
    /// 3-digit sequence (odd for men, even for women), computing the check
    /// character: how synthetic registries are made.
    ///
    /// # Errors
    /// An [`IdError`] if a part is out of range or the result does not validate.
    pub fn from_parts(
        address: u32,
        birth: CivilDate,
        sequence: u16,
        today: CivilDate,
    ) -> Result<Self, IdError> {
        if address > 999_999 || sequence > 999 || !(0..=9999).contains(&birth.year) {
            return Err(IdError::Length { got: 0 });
        }
        let body = format!(
            "{address:06}{:04}{:02}{:02}{sequence:03}",
            birth.year, birth.month, birth.day
        );
        let body: [u8; 17] = body
            .as_bytes()
            .try_into()
            .map_err(|_| IdError::Length { got: body.len() })?;
        let mut raw = String::with_capacity(ID_LEN);
        raw.push_str(core::str::from_utf8(&body).unwrap_or_default());
        raw.push(check_character(&body));
        Self::parse(&raw, today)
    }

    /// The 18 ASCII characters.
    #[must_use]
    pub fn as_str(&self) -> &str {
        // Only ASCII digits and 'X' are ever stored.
        core::str::from_utf8(&self.0).unwrap_or_default()
    }
}

fn body_of(id: &[u8; ID_LEN]) -> [u8; 17] {
    let mut body = [0u8; 17];
    body.copy_from_slice(&id[..17]);
    body
}

impl fmt::Debug for IdNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IdNumber(..)")
    }
}

/// A canonical (name, ID number) pair, the OPRF input. `Debug` prints neither field.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Record {
    name: String,
    id: IdNumber,
}

impl Record {
    /// Normalises and validates both fields.
    ///
    /// # Errors
    /// [`Error::InvalidName`] or [`Error::InvalidIdNumber`] with the reason
    /// (the name is checked first).
    pub fn parse(name: &str, id: &str, today: CivilDate) -> Result<Self> {
        let name = normalize_name(name).map_err(|reason| Error::InvalidName { reason })?;
        let id = IdNumber::parse(id, today).map_err(|reason| Error::InvalidIdNumber { reason })?;
        Ok(Self { name, id })
    }

    /// The normalised name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The normalised ID number.
    #[must_use]
    pub fn id(&self) -> &IdNumber {
        &self.id
    }

    /// The canonical encoding:
    /// `0x01 || u16be(len(name)) || name (UTF-8) || u16be(18) || id (ASCII)`.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + 2 + self.name.len() + 2 + ID_LEN);
        self.encode_into(&mut out);
        out
    }

    /// Appends the canonical encoding to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        // At most MAX_NAME_CHARS * 4 bytes, far below 2^16.
        let name_len = self.name.len() as u16;
        out.push(RECORD_VERSION);
        out.extend_from_slice(&name_len.to_be_bytes());
        out.extend_from_slice(self.name.as_bytes());
        out.extend_from_slice(&(ID_LEN as u16).to_be_bytes());
        out.extend_from_slice(&self.id.0);
    }

    /// The bucket of this record for bucket mode: the first `prefix_bits`
    /// bits (0 to 32) of `SHA-256(BUCKET_DOMAIN || encoding)`.
    #[must_use]
    pub fn bucket(&self, prefix_bits: u8) -> u32 {
        bucket_of_encoding(&self.encode(), prefix_bits)
    }
}

/// The bucket of an encoded record; see [`Record::bucket`].
#[must_use]
pub fn bucket_of_encoding(encoded: &[u8], prefix_bits: u8) -> u32 {
    let digest = Sha256::new()
        .chain_update(BUCKET_DOMAIN)
        .chain_update(encoded)
        .finalize();
    let v = digest
        .first_chunk::<4>()
        .map_or(0, |first| u32::from_be_bytes(*first));
    match prefix_bits {
        0 => 0,
        32.. => v,
        b => v >> (32 - u32::from(b)),
    }
}

impl fmt::Debug for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Record(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A name typed under GB 18030-2005 (a private-use code point) and under
    /// GB 18030-2022 (the standard one) is one name.
    #[test]
    fn gb18030_private_use_ideographs_are_their_standard_characters() {
        for (pua, standard) in GB18030_PUA_IDEOGRAPHS {
            let old = normalize_name(&format!("王{pua}")).unwrap();
            let new = normalize_name(&format!("王{standard}")).unwrap();
            assert_eq!(old, new, "U+{:04X}", u32::from(pua));
            assert_eq!(old, format!("王{standard}"));
        }
        // Other private-use code points are kept as they are.
        assert_eq!(normalize_name("王\u{E000}").unwrap(), "王\u{E000}");
    }

    /// The province-level prefixes PROTOCOL.md section 2 lists, exactly.
    #[test]
    fn the_documented_province_prefixes_are_the_accepted_ones() {
        let documented: Vec<u32> = (11..=15)
            .chain(21..=23)
            .chain(31..=37)
            .chain(41..=46)
            .chain(50..=54)
            .chain(61..=65)
            .chain([71, 81, 82, 83])
            .chain(90..=99)
            .collect();
        let protocol = include_str!("../../../docs/PROTOCOL.md");
        assert!(protocol.contains("11-15 (Beijing, Tianjin, Hebei, Shanxi, Inner Mongolia), 21-23"));
        for code in 0..100u32 {
            let d = |x: u32| u8::try_from(x).unwrap() + b'0';
            assert_eq!(
                region_is_plausible(d(code / 10), d(code % 10)),
                documented.contains(&code),
                "prefix {code:02}"
            );
        }
    }
    use proptest::prelude::*;

    const TODAY: CivilDate = CivilDate {
        year: 2026,
        month: 11,
        day: 22,
    };

    fn id(raw: &str) -> Result<String, IdError> {
        IdNumber::parse(raw, TODAY).map(|i| i.as_str().to_string())
    }

    #[test]
    fn public_specimens_validate() {
        for s in [
            "11010519491231002X",
            "440524188001010014",
            "360426199101010071",
            "440308199901101512",
            "810000199408230021",
            "830000199201300022",
        ] {
            assert_eq!(id(s).as_deref(), Ok(s), "{s}");
        }
        let body: [u8; 17] = *b"11010519491231002";
        assert_eq!(check_character(&body), 'X');
    }

    #[test]
    fn spellings_of_one_number_agree() {
        let want = Ok("11010519491231002X".to_string());
        assert_eq!(id("11010519491231002x"), want);
        assert_eq!(id(" 110105 1949 1231 002X\u{3000}"), want);
        assert_eq!(id("１１０１０５１９４９１２３１００２ｘ"), want);
        assert_eq!(id("\u{200B}11010519491231002X\u{A0}"), want);
    }

    #[test]
    fn legacy_numbers_get_19_and_a_check_character() {
        assert_eq!(id("610104620927690").as_deref(), Ok("610104196209276908"));
        assert_eq!(
            id("61010462092769X"),
            Err(IdError::NotADigit { position: 15 })
        );
    }

    #[test]
    fn errors_say_what_to_fix() {
        let msg = |raw: &str| id(raw).unwrap_err().to_string();
        assert_eq!(
            msg("110105194912310021"),
            "check character should be X, not 1"
        );
        assert_eq!(
            msg("1101051949123100"),
            "ID number must have 18 characters (or 15 for a legacy number), found 16"
        );
        assert_eq!(
            msg("11010519491231002Y"),
            "character 18 of the ID number is not a digit"
        );
        // 1999-02-30 with a correct check character.
        let body = *b"11010519990230002";
        let raw = format!(
            "{}{}",
            std::str::from_utf8(&body).unwrap(),
            check_character(&body)
        );
        assert_eq!(msg(&raw), "birth date 1999-02-30 does not exist");
        let body = *b"11010520301231002";
        let raw = format!(
            "{}{}",
            std::str::from_utf8(&body).unwrap(),
            check_character(&body)
        );
        assert_eq!(msg(&raw), "birth date 2030-12-31 is in the future");
        let body = *b"99010519491231002";
        let raw = format!(
            "{}{}",
            std::str::from_utf8(&body).unwrap(),
            check_character(&body)
        );
        assert!(id(&raw).is_ok(), "leading 9: permanent-residence card");
        let body = *b"01010519491231002";
        let raw = format!(
            "{}{}",
            std::str::from_utf8(&body).unwrap(),
            check_character(&body)
        );
        assert_eq!(
            msg(&raw),
            "region code 01 is not a province-level code or permit prefix"
        );
        assert_eq!(
            IdError::CheckCharacter {
                expected: '7',
                got: '1'
            }
            .summary(),
            "wrong check character"
        );
    }

    #[test]
    fn leap_days_and_today() {
        assert!(CivilDate::new(2000, 2, 29).is_some());
        assert!(CivilDate::new(1900, 2, 29).is_none());
        assert!(CivilDate::new(2024, 2, 29).is_some());
        assert!(CivilDate::new(2023, 13, 1).is_none());
        let born_today = IdNumber::from_parts(110105, TODAY, 1, TODAY);
        assert!(born_today.is_ok());
        assert_eq!(
            CivilDate::from_unix_days(0),
            CivilDate::new(1970, 1, 1).unwrap()
        );
        assert_eq!(CivilDate::from_unix_days(20_779), TODAY);
        assert_eq!(
            CivilDate::from_unix_days(-1),
            CivilDate::new(1969, 12, 31).unwrap()
        );
        // 2026-11-21T16:00:00Z is midnight in Beijing; a second earlier is still the 21st.
        assert_eq!(CivilDate::from_unix_time(1_795_276_799, 8 * 3600).day, 21);
        assert_eq!(CivilDate::from_unix_time(1_795_276_800, 8 * 3600), TODAY);
    }

    #[test]
    fn dot_lookalikes_map_to_the_middle_dot() {
        let want = "阿依古丽·买买提";
        for dot in [
            '\u{00B7}', '\u{2022}', '\u{30FB}', '\u{FF65}', '\u{FF0E}', '\u{2027}', '\u{0387}',
            '\u{2219}', '\u{22C5}', '\u{2E31}', '.',
        ] {
            let raw = format!("阿依古丽{dot}买买提");
            assert_eq!(
                normalize_name(&raw).as_deref(),
                Ok(want),
                "U+{:04X}",
                dot as u32
            );
        }
    }

    #[test]
    fn invisible_characters_go_and_characters_are_never_folded() {
        assert_eq!(
            normalize_name(" 张\u{3000}三\u{A0}\u{200B}\u{FEFF} ").as_deref(),
            Ok("张三")
        );
        assert_ne!(normalize_name("于明"), normalize_name("於明"));
        assert_ne!(normalize_name("肖红"), normalize_name("萧红"));
        assert_ne!(normalize_name("阎军"), normalize_name("闫军"));
        // Outside the BMP (CJK Extension B) is kept whole.
        assert_eq!(normalize_name("𠮷野家").as_deref(), Ok("𠮷野家"));
        // Full-width compatibility forms are unified by NFKC, not by folding.
        assert_eq!(
            normalize_name("欧阳\u{FE0F}娜娜").as_deref(),
            Ok("欧阳娜娜")
        );
    }

    #[test]
    fn bad_names_are_rejected_with_a_reason() {
        assert_eq!(normalize_name(" \u{3000}"), Err(NameError::Empty));
        assert_eq!(
            normalize_name("张San"),
            Err(NameError::LatinLetter { position: 2 })
        );
        assert_eq!(
            normalize_name("张ｓ"),
            Err(NameError::LatinLetter { position: 2 })
        );
        assert_eq!(normalize_name("王2"), Err(NameError::Digit { position: 2 }));
        assert_eq!(
            normalize_name("王\u{7}"),
            Err(NameError::Forbidden { position: 2 })
        );
        assert_eq!(
            normalize_name("王,五"),
            Err(NameError::Forbidden { position: 2 })
        );
        assert_eq!(normalize_name("·王"), Err(NameError::MisplacedDot));
        assert_eq!(normalize_name("王··五"), Err(NameError::MisplacedDot));
        let long = "龘".repeat(MAX_NAME_CHARS);
        assert!(normalize_name(&long).is_ok());
        let longer = format!("{long}龘");
        assert_eq!(
            normalize_name(&longer),
            Err(NameError::TooLong {
                max: MAX_NAME_CHARS,
                got: MAX_NAME_CHARS + 1
            })
        );
        assert!(normalize_name(&"王".repeat(2000)).is_err());
    }

    #[test]
    fn record_encoding_is_versioned_and_length_prefixed() {
        let r = Record::parse("张三", "11010519491231002x", TODAY).unwrap();
        let enc = r.encode();
        let mut want = vec![1u8, 0, 6];
        want.extend_from_slice("张三".as_bytes());
        want.extend_from_slice(&[0, 18]);
        want.extend_from_slice(b"11010519491231002X");
        assert_eq!(enc, want);
        assert_eq!(format!("{r:?}"), "Record(..)");
        assert!(matches!(
            Record::parse("", "11010519491231002X", TODAY),
            Err(Error::InvalidName { .. })
        ));
        assert!(matches!(
            Record::parse("张三", "1", TODAY),
            Err(Error::InvalidIdNumber { .. })
        ));
        assert!(r.bucket(10) < 1024);
        assert_eq!(r.bucket(0), 0);
    }

    fn name_strategy() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("王".to_string()),
            Just("李".to_string()),
            Just("欧阳".to_string()),
            Just("𠮷".to_string()),
            Just("·".to_string()),
            Just("\u{2022}".to_string()),
            Just(" ".to_string()),
            Just("\u{3000}".to_string()),
            Just("\u{200B}".to_string()),
            Just("ａ".to_string()),
            Just("\u{0301}".to_string()),
            Just("é".to_string()),
            Just("\u{00A8}".to_string()),
            Just("于".to_string()),
            Just("於".to_string()),
        ];
        proptest::collection::vec(piece, 0..8).prop_map(|v| v.concat())
    }

    proptest! {
        #[test]
        fn name_normalisation_is_idempotent(raw in name_strategy()) {
            if let Ok(n) = normalize_name(&raw) {
                prop_assert_eq!(normalize_name(&n), Ok(n.clone()));
            }
        }

        #[test]
        fn normalisation_of_arbitrary_text_is_idempotent_or_an_error(raw in "\\PC{0,20}") {
            if let Ok(n) = normalize_name(&raw) {
                prop_assert_eq!(normalize_name(&n), Ok(n.clone()));
            }
        }

        #[test]
        fn parsers_never_panic(name in "\\PC{0,40}", raw_id in "[0-9xX \u{3000}０-９]{0,24}") {
            let _ = Record::parse(&name, &raw_id, TODAY);
            let _ = IdNumber::parse(&name, TODAY);
        }

        #[test]
        fn encoding_is_injective(
            a in name_strategy(), b in name_strategy(),
            da in 0u32..40_000, db in 0u32..40_000, sa in 0u16..1000, sb in 0u16..1000,
        ) {
            let mk = |name: &str, days: u32, seq: u16| {
                let date = CivilDate::from_unix_days(i64::from(days) - 10_000);
                let id = IdNumber::from_parts(110105, date, seq, TODAY).ok()?;
                Record::parse(name, id.as_str(), TODAY).ok()
            };
            if let (Some(x), Some(y)) = (mk(&a, da, sa), mk(&b, db, sb)) {
                let same = x.name() == y.name() && x.id() == y.id();
                prop_assert_eq!(same, x.encode() == y.encode());
            }
        }

        #[test]
        fn generated_ids_always_validate(days in 0i64..40_000, seq in 0u16..1000, region in prop::sample::select(vec![110105u32, 440524, 650102, 810000, 830000, 910000])) {
            let date = CivilDate::from_unix_days(days - 20_000);
            prop_assert!(IdNumber::from_parts(region, date, seq, TODAY).is_ok());
        }
    }
}
