//! What the integration tests share: a throwaway PostgreSQL server.
//!
//! The server named by `PSI_TEST_POSTGRES_URL`, or a cluster created with
//! the installed binaries (`.ci/run` installs Debian's `postgresql` package
//! when they are missing), listening on a free loopback port.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// A running PostgreSQL server, stopped when dropped (if this test started it).
pub struct Postgres {
    /// A `postgres://` URL (TCP on loopback) or the server named by `PSI_TEST_POSTGRES_URL`.
    pub url: String,
    cluster: Option<(PathBuf, PathBuf, tempfile::TempDir)>,
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some((bin, data, _)) = &self.cluster {
            let _ = as_owner(&bin.join("pg_ctl"))
                .arg("-D")
                .arg(data)
                .args(["-m", "immediate", "stop"])
                .output();
        }
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// PostgreSQL refuses to run as root: as root, run it as `postgres`.
fn as_owner(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn bindir() -> Option<PathBuf> {
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let debian = std::fs::read_dir("/usr/lib/postgresql").ok().and_then(|d| {
        d.filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .find(|b| b.join("initdb").exists())
    });
    [from_pg_config, debian]
        .into_iter()
        .flatten()
        .find(|b| b.join("initdb").exists() && b.join("pg_ctl").exists())
}

pub fn start_postgres() -> Result<Postgres, String> {
    if let Ok(url) = std::env::var("PSI_TEST_POSTGRES_URL") {
        return Ok(Postgres { url, cluster: None });
    }
    let bin = bindir().ok_or("no initdb/pg_ctl found (install Debian's postgresql package)")?;
    let dir = tempfile::Builder::new()
        .prefix("psi-pg-")
        .tempdir_in("/tmp")
        .map_err(|e| e.to_string())?;
    let data = dir.path().join("data");
    if is_root() {
        let ok = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Err("cannot hand the cluster directory to the postgres user".into());
        }
    }
    let init = as_owner(&bin.join("initdb"))
        .arg("-D")
        .arg(&data)
        .args(["-A", "trust", "-U", "psi", "--no-sync", "-E", "UTF8"])
        .output()
        .map_err(|e| format!("initdb: {e}"))?;
    if !init.status.success() {
        return Err(format!(
            "initdb failed: {}",
            String::from_utf8_lossy(&init.stderr)
        ));
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let socket = dir.path().display().to_string();
    let options = format!(
        "-p {port} -k {socket} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
    );
    let started = as_owner(&bin.join("pg_ctl"))
        .arg("-D")
        .arg(&data)
        .args(["-o", &options, "-w", "-l"])
        .arg(dir.path().join("log"))
        .arg("start")
        .output()
        .map_err(|e| format!("pg_ctl: {e}"))?;
    if !started.status.success() {
        let log = std::fs::read_to_string(dir.path().join("log")).unwrap_or_default();
        return Err(format!("pg_ctl start failed: {log}"));
    }
    Ok(Postgres {
        url: format!("postgres://psi@127.0.0.1:{port}/postgres"),
        cluster: Some((bin, data, dir)),
    })
}
