//! The CSV row guard in front of every CSV reader (registry source, batch
//! input): total on arbitrary bytes and read sizes, and a row it lets
//! through is never longer than its limit.
#![no_main]
use std::io::Read;

use libfuzzer_sys::fuzz_target;
use psi_files::rows::RowGuard;

fuzz_target!(|data: &[u8]| {
    let (head, body) = data.split_at(data.len().min(2));
    let max = usize::from(head.first().copied().unwrap_or(0)) + 1;
    let step = usize::from(head.get(1).copied().unwrap_or(0)) % 7 + 1;
    let mut guard = RowGuard::new(body, max);
    let mut buf = vec![0u8; step];
    let mut out = Vec::new();
    loop {
        match guard.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => return,
        }
    }
    assert_eq!(out, body);
});
