//! The client's configuration file: the settings an institution would
//! otherwise repeat on every command (server, pinned key, TLS files,
//! purpose, cache directory, concurrency), in TOML.
//!
//! Found at `--config FILE` (or `PSI_CLIENT_CONFIG`), else at
//! `$XDG_CONFIG_HOME/psi-client/config.toml` (`~/.config/psi-client/config.toml`)
//! if that exists. Flags beat environment variables, which beat the file,
//! which beats the defaults; relative paths in the file are relative to the
//! file's directory.
//!
//! ```toml
//! server = "https://psi.registry.example:50051"
//! purpose = "kyc-onboarding"
//! pin_key = "e6a1...f0"          # as the operator published it
//! tls_ca = "ca.pem"
//! tls_cert = "bank-001.pem"
//! tls_key = "bank-001.key"
//! cache_dir = "/var/cache/psi-client"
//! concurrency = 4
//! ```

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Deserialize;

/// The file's keys, all optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Server URL.
    pub server: Option<String>,
    /// The server's public key (hex).
    pub pin_key: Option<String>,
    /// Accept only `pin_key` itself, not keys endorsed from it.
    pub pin_exact: Option<bool>,
    /// The declared purpose code.
    pub purpose: Option<String>,
    /// Cache directory.
    pub cache_dir: Option<PathBuf>,
    /// Requests in flight at once.
    pub concurrency: Option<usize>,
    /// The operator's CA certificate.
    pub tls_ca: Option<PathBuf>,
    /// The institution's certificate.
    pub tls_cert: Option<PathBuf>,
    /// The institution's private key.
    pub tls_key: Option<PathBuf>,
}

/// Where the file is looked for when no `--config` is given.
#[must_use]
pub fn default_path() -> Option<PathBuf> {
    std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .map(|d| d.join("psi-client").join("config.toml"))
}

/// Reads the file named, or the default one if it exists. Returns where it
/// was read from, if anywhere.
///
/// # Errors
/// A named file that cannot be read, or any file that does not parse (an
/// unknown key included).
pub fn load(named: Option<&Path>) -> Result<(Option<PathBuf>, FileConfig)> {
    let path = match named {
        Some(p) => p.to_path_buf(),
        None => match default_path().filter(|p| p.is_file()) {
            Some(p) => p,
            None => return Ok((None, FileConfig::default())),
        },
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading the config file {}", path.display()))?;
    let mut config: FileConfig = toml::from_str(&text)
        .with_context(|| format!("parsing the config file {}", path.display()))?;
    // Relative paths are the file's neighbours.
    let base = path.parent().unwrap_or(Path::new("."));
    for p in [
        &mut config.cache_dir,
        &mut config.tls_ca,
        &mut config.tls_cert,
        &mut config.tls_key,
    ]
    .into_iter()
    .flatten()
    {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    }
    Ok((Some(path), config))
}

/// Where a setting's value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A flag or an environment variable.
    Command,
    /// The config file.
    File,
    /// The built-in default.
    Default,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Source::Command => "flag or environment",
            Source::File => "config file",
            Source::Default => "default",
        })
    }
}

/// The command's value, else the file's, with where it came from.
pub fn pick<T>(command: Option<T>, file: Option<T>) -> Option<(T, Source)> {
    command
        .map(|v| (v, Source::Command))
        .or_else(|| file.map(|v| (v, Source::File)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_are_the_files_neighbours_and_unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(
            &path,
            "server = \"https://x:1\"\ntls_ca = \"ca.pem\"\ncache_dir = \"/abs\"\nconcurrency = 2\n",
        )
        .unwrap();
        let (found, c) = load(Some(&path)).unwrap();
        assert_eq!(found.as_deref(), Some(path.as_path()));
        assert_eq!(c.tls_ca.unwrap(), dir.path().join("ca.pem"));
        assert_eq!(c.cache_dir.unwrap(), PathBuf::from("/abs"));
        assert_eq!(c.concurrency, Some(2));
        std::fs::write(&path, "sever = \"x\"\n").unwrap();
        let err = load(Some(&path)).unwrap_err();
        assert!(
            format!("{err:#}").contains("unknown field `sever`"),
            "{err:#}"
        );
        assert!(load(Some(&dir.path().join("missing.toml"))).is_err());
        assert_eq!(pick(Some(1), Some(2)), Some((1, Source::Command)));
        assert_eq!(pick(None, Some(2)), Some((2, Source::File)));
        assert_eq!(pick::<u8>(None, None), None);
    }
}
