//! A tag set from a server (sync) or the client's cache: decoding and every
//! lookup path must never panic, whatever the bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(set) = psi_core::TagSet::from_bytes(data) {
        let _ = set.contains(psi_core::Tag(0x0123_4567_89ab_cdef));
        if let Ok(lookup) = set.lookup() {
            let _ = lookup.contains(psi_core::Tag(u64::MAX));
        }
        assert_eq!(psi_core::TagSet::from_bytes(&set.to_bytes()).as_ref(), Ok(&set));
    }
});
