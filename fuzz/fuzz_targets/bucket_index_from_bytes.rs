//! The server's snapshot file, decoded into memory and read in place (as a
//! server maps it), and a change applied beside it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use psi_core::{BucketIndex, Tag};

fuzz_target!(|data: &[u8]| {
    let decoded = BucketIndex::from_bytes(data);
    let shared = BucketIndex::from_shared(std::sync::Arc::new(data.to_vec()));
    assert_eq!(decoded.is_ok(), shared.is_ok());
    if let (Ok(index), Ok(shared)) = (decoded, shared) {
        assert_eq!(index, shared);
        let _ = index.bucket(0);
        let _ = index.bucket(u32::MAX);
        assert_eq!(BucketIndex::from_bytes(&index.to_bytes()).as_ref(), Ok(&index));
        // A change kept beside the base serialises as the changed index.
        let first = shared.entries().next();
        let added = [(0, Tag(u64::from_le_bytes([7; 8])))];
        let removed: Vec<(u32, Tag)> = first.into_iter().collect();
        if let Ok(changed) = shared.apply(&added, &removed, 2) {
            assert_eq!(BucketIndex::from_bytes(&changed.to_bytes()).as_ref(), Ok(&changed));
        }
    }
});
