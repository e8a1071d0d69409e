//! PIR mode on the client: the secret seed kept beside the other caches
//! (mode 0600), the public parameters registered once per server, key
//! epoch and dimensions, and checks whose bucket the server never learns.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use psi_pir::ypir::YpirShape;
use psi_pir::{PirShape, SchemeClient, Shape};
use psi_proto::v1::PirInfo;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::error::{Error, Result};

/// The shape a server advertises, checked: a scheme this client speaks,
/// its shape in range, and the lengths it says matching the shape's.
///
/// # Errors
/// An unknown scheme or a shape out of range.
pub fn shape_of(info: &PirInfo) -> Result<PirShape> {
    let narrow = |v: u32, what: &str| -> Result<u8> {
        u8::try_from(v)
            .map_err(|_| Error::Invalid(format!("the server's PIR {what} {v} is out of range")))
    };
    let wide = |v: u32, what: &str| -> Result<u16> {
        u16::try_from(v)
            .map_err(|_| Error::Invalid(format!("the server's PIR {what} {v} is out of range")))
    };
    let ypir = || -> Result<YpirShape> {
        let shape = YpirShape {
            item_bits: narrow(info.item_bits, "item_bits")?,
            columns: info.item_columns,
            bucket_shift: narrow(info.bucket_shift, "bucket_shift")?,
        };
        if shape.groups() != info.groups as usize {
            return Err(Error::Invalid(format!(
                "the server says a PIR item spans {} groups; its {} columns make {}",
                info.groups,
                info.item_columns,
                shape.groups()
            )));
        }
        Ok(shape)
    };
    let shape = if info.scheme == psi_pir::shape::SCHEME {
        PirShape::Spiral(Shape {
            nu1: narrow(info.nu1, "nu1")?,
            nu2: narrow(info.nu2, "nu2")?,
            instances: wide(info.instances, "instances")?,
            bucket_shift: narrow(info.bucket_shift, "bucket_shift")?,
        })
    } else if info.scheme == psi_pir::ypir::SCHEME {
        PirShape::Ypir(ypir()?)
    } else {
        return Err(Error::Unsupported(format!(
            "the server's PIR scheme `{}` is not one this client speaks ({}, {})",
            info.scheme,
            psi_pir::shape::SCHEME,
            psi_pir::ypir::SCHEME
        )));
    };
    shape
        .validate()
        .map_err(|e| Error::invalid("the server's PIR shape", e))?;
    for (what, said, is) in [
        ("query", info.query_bytes, shape.query_bytes()),
        ("answer", info.answer_bytes, shape.answer_bytes()),
        ("public parameters", info.keys_bytes, shape.keys_bytes()),
    ] {
        if said != is as u64 {
            return Err(Error::Invalid(format!(
                "the server says a PIR {what} is {said} bytes; its shape makes it {is}"
            )));
        }
    }
    Ok(shape)
}

/// A client's PIR state for one server, key epoch and dimensions. Its
/// `Debug` shows the shape, epoch and whether parameters are registered,
/// never the seed.
pub struct PirState {
    /// The scheme's client (its secret key from the seed).
    pub client: Arc<SchemeClient>,
    /// The id of the public parameters the server holds, if registered.
    pub keys_id: Option<Vec<u8>>,
    /// The key epoch they were made for.
    pub epoch: u64,
    seed: Zeroizing<[u8; 32]>,
    id_path: PathBuf,
}

impl std::fmt::Debug for PirState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PirState")
            .field("shape", &self.client.shape())
            .field("epoch", &self.epoch)
            .field("registered", &self.keys_id.is_some())
            .finish_non_exhaustive()
    }
}

impl PirState {
    /// The state for `server_key` (hex prefix), `epoch` and `shape`, with the
    /// seed from `cache_dir` (made on first use, mode 0600) and the keys id
    /// registered before, if any.
    ///
    /// # Errors
    /// An unreadable or unwritable seed file.
    pub fn open(cache_dir: &Path, server_key: &str, epoch: u64, shape: PirShape) -> Result<Self> {
        let master = master_seed(&cache_dir.join(format!("pir-{server_key}.seed")))?;
        // A secret key per epoch and scheme (Spiral: and dimensions), from
        // the one seed.
        let mut h = Sha256::new();
        h.update(b"psi.v1.pir.seed");
        h.update(master.as_slice());
        h.update(epoch.to_be_bytes());
        let keys_for = match shape {
            PirShape::Spiral(s) => {
                h.update([s.nu1, s.nu2]);
                format!("{}x{}", s.nu1, s.nu2)
            }
            PirShape::Ypir(_) => {
                h.update(psi_pir::ypir::SCHEME.as_bytes());
                "ypir".to_string()
            }
        };
        let mut seed = Zeroizing::new([0u8; 32]);
        seed.copy_from_slice(&h.finalize());
        let client = Arc::new(new_client(shape, epoch, &seed)?);
        let id_path = cache_dir.join(format!("pir-{server_key}-e{epoch}-{keys_for}.id"));
        let keys_id = std::fs::read(&id_path).ok().filter(|id| id.len() == 16);
        Ok(Self {
            client,
            keys_id,
            epoch,
            seed,
            id_path,
        })
    }

    /// Work that makes fresh public parameters for this state's secret key
    /// (Spiral: about a second of CPU; run it off the async threads).
    pub fn public_parameters_task(&self) -> impl FnOnce() -> Result<Vec<u8>> + Send + 'static {
        let shape = self.client.shape();
        let seed = self.seed.clone();
        let epoch = self.epoch;
        move || Ok(new_client(shape, epoch, &seed)?.public_parameters())
    }

    /// Records the id the server gave the public parameters.
    ///
    /// # Errors
    /// The cache directory cannot be written.
    pub fn registered(&mut self, id: Vec<u8>) -> Result<()> {
        psi_files::atomic::write_atomically(&self.id_path, &id, 0o600)
            .map_err(|e| Error::io(format!("writing {}", self.id_path.display()), e))?;
        self.keys_id = Some(id);
        Ok(())
    }
}

fn new_client(shape: PirShape, epoch: u64, seed: &[u8; 32]) -> Result<SchemeClient> {
    SchemeClient::new(shape, epoch, seed)
        .map_err(|e| Error::Internal(format!("making PIR keys: {e}")))
}

/// The 32-byte secret in `path`, made (mode 0600) if absent.
fn master_seed(path: &Path) -> Result<Zeroizing<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(bytes) if bytes.len() == 32 => return Ok(Zeroizing::new(bytes)),
        Ok(_) => {
            return Err(Error::Cache(format!(
                "{} is not a PIR seed (32 bytes); delete it to make a new one",
                path.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    }
    let mut seed = Zeroizing::new(vec![0u8; 32]);
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut seed);
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| {
                f.write_all(&seed)?;
                f.sync_all()
            })
            .map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
    }
    // Another process may have made one meanwhile: the first one stays.
    match std::fs::hard_link(&tmp, path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::io(format!("creating {}", path.display()), e));
        }
    }
    let _ = std::fs::remove_file(&tmp);
    let bytes =
        std::fs::read(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    if bytes.len() != 32 {
        return Err(Error::Cache(format!(
            "{} is not a PIR seed (32 bytes)",
            path.display()
        )));
    }
    Ok(Zeroizing::new(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_state_never_shows_its_seed() {
        let dir = tempfile::tempdir().unwrap();
        let shape = PirShape::Spiral(psi_pir::Shape {
            nu1: 7,
            nu2: 2,
            instances: 1,
            bucket_shift: 0,
        });
        let state = PirState::open(dir.path(), "abcd", 1, shape).unwrap();
        let shown = format!("{state:?}");
        let seed_hex = hex::encode(state.seed.as_slice());
        assert!(!shown.contains(&seed_hex), "{shown}");
        let bytes: Vec<String> = state.seed.iter().map(u8::to_string).collect();
        assert!(!shown.contains(&bytes.join(", ")), "{shown}");
        assert!(shown.contains("epoch: 1"), "{shown}");
    }

    #[test]
    fn the_seed_is_made_once_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("pir-x.seed");
        let first = master_seed(&path).unwrap();
        assert_eq!(first.len(), 32);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(*master_seed(&path).unwrap(), *first);
        std::fs::write(&path, b"short").unwrap();
        assert!(master_seed(&path)
            .unwrap_err()
            .to_string()
            .contains("not a PIR seed"));
        // A path that cannot be read is an error, not a new seed.
        let dir_path = dir.path().join("sub");
        assert!(master_seed(&dir_path).is_err());
    }
}
