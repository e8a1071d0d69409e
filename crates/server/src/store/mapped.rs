//! The base bucket index, memory-mapped: a server reads its tags in place
//! instead of holding a decoded copy (8 bytes per entry), so a restart does
//! not parse the whole file and the resident set holds only the pages that
//! lookups touch; the kernel keeps the rest in its page cache, or not.
//!
//! One of the two modules of the workspace that use `unsafe` (the lint is
//! `deny`; the other is psi-pir's kernels, docs/SECURITY.md).
#![allow(unsafe_code)]

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};

/// A file mapped read-only.
pub struct MappedFile(memmap2::Mmap);

impl std::fmt::Debug for MappedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MappedFile({} bytes)", self.0.len())
    }
}

impl AsRef<[u8]> for MappedFile {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl MappedFile {
    /// Maps `path` read-only.
    ///
    /// # Errors
    /// The file cannot be opened or mapped.
    pub fn open(path: &Path) -> Result<Arc<Self>> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: the mapping is read-only, and no file of a data directory
        // is ever written in place: init, update, compact, rotate-key and
        // publish (and rsync, as the README has it) write a temporary file
        // and rename it over the old one, so the inode mapped here keeps its
        // bytes until the last index reading them is dropped. Truncating the
        // file in place by hand would make reads fault (SIGBUS), never read
        // other memory; docs/SECURITY.md says not to.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("mapping {}", path.display()))?;
        // Lookups are scattered: no read-ahead around each one.
        let _ = map.advise(memmap2::Advice::Random);
        Ok(Arc::new(Self(map)))
    }

    /// Lets go of the pages read so far (a load verifies every byte): they
    /// leave this process's resident set and stay in the page cache, and
    /// the next lookup that needs one faults it back in from there.
    pub fn release(&self) {
        // SAFETY: MADV_DONTNEED on a read-only shared file mapping only
        // drops this process's page-table entries; the mapping stays valid
        // and reads return the file's bytes as before. No memory this
        // process wrote is discarded (the mapping was never writable).
        if let Err(e) = unsafe { self.0.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) } {
            tracing::debug!("releasing the mapped index's pages: {e}");
        }
    }
}
