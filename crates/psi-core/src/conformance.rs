//! `docs/vectors/name-conformance.txt`: what name canonicalisation does to
//! every code point of the BMP and of the CJK extension planes (2 and 3),
//! each inserted between two Chinese characters (`王?明`): removed, kept,
//! mapped to other characters, or the name rejected (with the reason). The
//! file is the normative definition of the character classes PROTOCOL.md
//! section 2 names, for a second implementation to check itself against
//! code point by code point. The test fails when the code and the file
//! part; after an intended change, `PSI_WRITE_VECTORS=1 cargo test -p
//! psi-core conformance` writes it anew (and the change is a new protocol
//! version: registered names would canonicalise differently).

use std::fmt::Write as _;

use crate::record::{normalize_name, NameError};

/// What canonicalisation does to one code point between two Chinese characters.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Removed,
    Kept,
    Mapped(String),
    Rejected(&'static str),
}

fn outcome(c: char) -> Outcome {
    let raw = format!("王{c}明");
    match normalize_name(&raw) {
        Ok(name) if name == "王明" => Outcome::Removed,
        Ok(name) if name == raw => Outcome::Kept,
        Ok(name) => Outcome::Mapped(
            name.trim_start_matches('王')
                .trim_end_matches('明')
                .chars()
                .map(|m| format!("{:04X}", u32::from(m)))
                .collect::<Vec<_>>()
                .join(" "),
        ),
        Err(e) => Outcome::Rejected(match e {
            NameError::LatinLetter { .. } => "latin-letter",
            NameError::Digit { .. } => "digit",
            NameError::Forbidden { .. } => "control-or-punctuation",
            NameError::MisplacedDot => "misplaced-dot",
            NameError::Empty => "empty",
            NameError::TooLong { .. } => "too-long",
        }),
    }
}

fn generate() -> String {
    let (major, minor, update) = unicode_normalization::UNICODE_VERSION;
    let (smajor, sminor, supdate) = char::UNICODE_VERSION;
    let mut out = format!(
        "# psi-match name conformance v1: every code point of the BMP (U+0000-FFFF, surrogates\n\
         # excepted) and of planes 2 and 3 (U+20000-3FFFF), inserted between two Chinese\n\
         # characters (U+738B U+660E) and canonicalised as PROTOCOL.md section 2 says.\n\
         # NFKC of Unicode {major}.{minor}.{update}; character properties (whitespace, numeric, alphabetic,\n\
         # control) of Unicode {smajor}.{sminor}.{supdate}.\n\
         # Columns (tab-separated): first, last (hex), outcome, then for `mapped` what each code\n\
         # point of the range becomes (hex, space-separated) and for `rejected` the reason.\n\
         # removed: the character disappears; kept: it stays as it is; mapped: it is replaced;\n\
         # rejected: the name is refused (latin-letter, digit, control-or-punctuation, ...).\n"
    );
    let points = (0u32..0x1_0000)
        .chain(0x2_0000..0x4_0000)
        .filter_map(char::from_u32);
    let mut run: Option<(char, char, Outcome)> = None;
    let flush = |out: &mut String, (first, last, o): (char, char, Outcome)| {
        let (a, b) = (u32::from(first), u32::from(last));
        let _ = match o {
            Outcome::Removed => writeln!(out, "{a:04X}\t{b:04X}\tremoved"),
            Outcome::Kept => writeln!(out, "{a:04X}\t{b:04X}\tkept"),
            Outcome::Mapped(m) => writeln!(out, "{a:04X}\t{b:04X}\tmapped\t{m}"),
            Outcome::Rejected(r) => writeln!(out, "{a:04X}\t{b:04X}\trejected\t{r}"),
        };
    };
    for c in points {
        let o = outcome(c);
        // A mapped code point is a line of its own; the others run.
        let extends = matches!(&run, Some((_, last, prev))
            if u32::from(*last) + 1 == u32::from(c) && *prev == o && !matches!(o, Outcome::Mapped(_)));
        if extends {
            if let Some(r) = run.as_mut() {
                r.1 = c;
            }
        } else {
            if let Some(done) = run.take() {
                flush(&mut out, done);
            }
            run = Some((c, c, o));
        }
    }
    if let Some(done) = run.take() {
        flush(&mut out, done);
    }
    out
}

#[test]
fn the_published_name_conformance_matches_the_code() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/vectors/name-conformance.txt"
    );
    let text = generate();
    if std::env::var_os("PSI_WRITE_VECTORS").is_some() {
        std::fs::write(path, &text).unwrap();
    }
    let published = std::fs::read_to_string(path).expect(
        "docs/vectors/name-conformance.txt is missing: PSI_WRITE_VECTORS=1 cargo test -p psi-core conformance",
    );
    assert!(
        published == text,
        "the code no longer canonicalises names as docs/vectors/name-conformance.txt says; if intended, rerun with PSI_WRITE_VECTORS=1: it is a new protocol version"
    );
    // A few entries a reader can check by eye.
    let said = |cp: u32| -> String {
        published
            .lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| {
                let mut f = l.split('\t');
                let first = u32::from_str_radix(f.next()?, 16).ok()?;
                let last = u32::from_str_radix(f.next()?, 16).ok()?;
                (first..=last)
                    .contains(&cp)
                    .then(|| f.collect::<Vec<_>>().join(" "))
            })
            .unwrap_or_default()
    };
    assert_eq!(said(0x4E2D), "kept", "中");
    assert_eq!(said(0x20BB7), "kept", "𠮷");
    assert_eq!(said(0x3000), "removed", "ideographic space");
    assert_eq!(said(0x200B), "removed", "zero-width space");
    assert_eq!(said(0x00B7), "kept", "middle dot");
    assert_eq!(said(0x30FB), "mapped 00B7", "katakana middle dot");
    assert_eq!(said(0xFF11), "rejected digit", "full-width 1");
    assert_eq!(said(0x0041), "rejected latin-letter");
    assert_eq!(said(0x3001), "rejected control-or-punctuation", "、");
}
