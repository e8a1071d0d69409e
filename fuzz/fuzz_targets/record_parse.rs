//! A CSV row's name and ID fields (registry file or query file): parsing is
//! total, and normalisation is idempotent.
#![no_main]
use libfuzzer_sys::fuzz_target;
use psi_core::record::{normalize_name, CivilDate, Record};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (name, id) = text.split_once('\u{0}').unwrap_or((&text, ""));
    let today = CivilDate { year: 2026, month: 11, day: 22 };
    if let Ok(r) = Record::parse(name, id, today) {
        let again = Record::parse(r.name(), r.id().as_str(), today).expect("a normalised record parses");
        assert_eq!(again.encode(), r.encode());
    }
    if let Ok(n) = normalize_name(name) {
        assert_eq!(normalize_name(&n), Ok(n.clone()));
    }
});
