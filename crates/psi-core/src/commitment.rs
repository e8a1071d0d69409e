//! Accountability without disclosure: an institution commits, in each
//! request it sends, to the entries of its own query log that the request
//! answers, and the operator's audit trail keeps the commitment. Later the
//! institution opens a period's entries to a regulator, who checks them
//! against the operator's chain: every request of that institution in the
//! period is opened, by entries that hash to its commitment. The operator
//! never learns the entries; the salts keep a commitment from being tested
//! against guessed pairs.
//!
//! `commit(entries) = SHA-256("psi.v1.log-commitment" || I2OSP(n, 4) ||
//! for each entry: salt (32) || I2OSP(time_ms, 8) || each of staff, caller,
//! purpose, mode, name, id as I2OSP(len, 8) || bytes)`.

use sha2::{Digest, Sha256};

/// What a committed log entry holds (its answer and request id are not
/// known when the request is sent, so they are not committed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedEntry {
    /// Random, per entry.
    pub salt: [u8; 32],
    /// Milliseconds since the Unix epoch.
    pub time_ms: i64,
    /// Who asked.
    pub staff: String,
    /// The calling system.
    pub caller: String,
    /// The declared purpose.
    pub purpose: String,
    /// `sync`, `bucket` or `pir`.
    pub mode: String,
    /// The name as given.
    pub name: String,
    /// The ID number as given.
    pub id: String,
}

/// The commitment to `entries`, in order.
#[must_use]
pub fn commit(entries: &[CommittedEntry]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"psi.v1.log-commitment");
    h.update(
        u32::try_from(entries.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    for e in entries {
        h.update(e.salt);
        h.update(e.time_ms.to_be_bytes());
        for field in [&e.staff, &e.caller, &e.purpose, &e.mode, &e.name, &e.id] {
            h.update((field.len() as u64).to_be_bytes());
            h.update(field.as_bytes());
        }
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commitment_binds_every_field_and_the_order() {
        let e = |salt: u8, name: &str| CommittedEntry {
            salt: [salt; 32],
            time_ms: 1,
            staff: "s".into(),
            caller: "c".into(),
            purpose: "p".into(),
            mode: "bucket".into(),
            name: name.into(),
            id: "11010519491231002X".into(),
        };
        let a = commit(&[e(1, "张伟"), e(2, "王芳")]);
        assert_ne!(a, commit(&[e(2, "王芳"), e(1, "张伟")]));
        assert_ne!(a, commit(&[e(1, "张伟"), e(3, "王芳")]));
        assert_ne!(a, commit(&[e(1, "张伟"), e(2, "王")]));
        assert_ne!(a, commit(&[e(1, "张伟")]));
        assert_eq!(a, commit(&[e(1, "张伟"), e(2, "王芳")]));
    }
}
