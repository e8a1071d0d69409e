//! The server's snapshot file.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(index) = psi_core::BucketIndex::from_bytes(data) {
        let _ = index.bucket(0);
        let _ = index.bucket(u32::MAX);
        assert_eq!(psi_core::BucketIndex::from_bytes(&index.to_bytes()).as_ref(), Ok(&index));
    }
});
