//! Real components on loopback, for the integration tests and the load
//! benchmark: a throwaway PostgreSQL server, `psi-server` processes that
//! can be killed and restarted on their ports, and haproxy in front of them.
//!
//! Nothing here is part of a deployment: the operator's binary does not
//! depend on this crate. PostgreSQL and haproxy are the Debian packages
//! (`.ci/run` installs them when missing); where they cannot run, the
//! functions say why and the caller skips with that reason.

// A test harness: a component that cannot start fails the test that needs it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

pub mod fixture;
pub mod raw_h2;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1 (free when asked; bind it soon).
#[must_use]
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding a loopback port")
}

/// Waits until `done` is true, checking every 100 ms; panics after `patience`
/// naming `what`.
pub fn wait_for(what: &str, patience: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < patience,
            "waited {patience:?} for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Copies the directory tree `from` to a new `to`, with its files' and
/// directories' modes, in this process. A child process (`cp -a`) would
/// inherit, between its fork and its exec, every file this test process has
/// open, among them the lock file of a data directory another test's
/// writer holds; that writer's next lock would then find it taken.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
    std::fs::set_permissions(to, std::fs::metadata(from).unwrap().permissions()).unwrap();
}

/// The body of `GET path` on `127.0.0.1:port` (HTTP/1.0), if it answered.
#[must_use]
pub fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
}

/// A running PostgreSQL server, stopped when dropped (if this process started it).
#[derive(Debug)]
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

fn postgres_bindir() -> Option<PathBuf> {
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

/// How a throwaway PostgreSQL server writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// `fsync=off`: fast, for tests of behaviour.
    Volatile,
    /// PostgreSQL's defaults (fsync on every commit): for measurements.
    Durable,
}

/// The server named by `PSI_TEST_POSTGRES_URL`, or a cluster created with
/// the installed binaries, listening on a free loopback port.
///
/// # Errors
/// Why PostgreSQL cannot run here (no binaries, initdb or start failed).
pub fn start_postgres(durability: Durability) -> Result<Postgres, String> {
    if let Ok(url) = std::env::var("PSI_TEST_POSTGRES_URL") {
        return Ok(Postgres { url, cluster: None });
    }
    start_cluster(durability, None)
}

/// A cluster created with the installed binaries that also offers TLS with
/// the server certificate and key in the PEM files `cert` and `key` (its
/// URL: TCP on loopback).
///
/// # Errors
/// As [`start_postgres`].
pub fn start_postgres_with_tls(
    durability: Durability,
    cert: &Path,
    key: &Path,
) -> Result<Postgres, String> {
    start_cluster(durability, Some((cert, key)))
}

fn start_cluster(durability: Durability, tls: Option<(&Path, &Path)>) -> Result<Postgres, String> {
    let bin =
        postgres_bindir().ok_or("no initdb/pg_ctl found (install Debian's postgresql package)")?;
    let dir = tempfile::Builder::new()
        .prefix("psi-pg-")
        .tempdir_in("/tmp")
        .map_err(|e| e.to_string())?;
    let data = dir.path().join("data");
    // The server's certificate and key, the key readable by its owner only
    // (PostgreSQL refuses it otherwise).
    if let Some((cert, key)) = tls {
        for (from, name, mode) in [(cert, "server.crt", 0o644), (key, "server.key", 0o600)] {
            let to = dir.path().join(name);
            std::fs::copy(from, &to).map_err(|e| format!("copying {}: {e}", from.display()))?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode))
                .map_err(|e| e.to_string())?;
        }
    }
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
    let port = free_port();
    let socket = dir.path().display().to_string();
    let mut options =
        format!("-p {port} -k {socket} -c listen_addresses=127.0.0.1 -c max_connections=200");
    if durability == Durability::Volatile {
        options.push_str(" -c fsync=off");
    }
    if tls.is_some() {
        options.push_str(&format!(
            " -c ssl=on -c ssl_cert_file={socket}/server.crt -c ssl_key_file={socket}/server.key"
        ));
    }
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

/// A server process on fixed ports (so it can be restarted on them); its
/// standard error appended to a log file; killed with SIGKILL when dropped.
#[derive(Debug)]
pub struct Process {
    child: Option<Child>,
    program: PathBuf,
    args: Vec<String>,
    log: PathBuf,
}

impl Process {
    /// Starts `program args...`.
    ///
    /// # Panics
    /// When the log cannot be opened or the program cannot be started.
    #[must_use]
    pub fn start(program: &Path, args: Vec<String>, log: PathBuf) -> Self {
        let mut p = Self {
            child: None,
            program: program.to_path_buf(),
            args,
            log,
        };
        p.spawn();
        p
    }

    /// Starts it again (after [`Process::kill_9`]).
    ///
    /// # Panics
    /// When the log cannot be opened or the program cannot be started.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("opening the process log");
        let child = Command::new(&self.program)
            .args(&self.args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.program.display()));
        self.child = Some(child);
    }

    /// SIGKILL: no drain, no flush.
    pub fn kill_9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-9", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for it to exit.
    pub fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill_9();
    }
}

/// How haproxy passes gRPC to the replicas.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Balancing {
    /// HTTP/2 in and out, balanced per request (plaintext gRPC).
    Http2,
    /// TCP passthrough, balanced per connection: mutual TLS ends at the
    /// replicas, which read the institution from the client certificate.
    Tcp,
    /// As `Tcp`, each connection opened with a PROXY protocol v2 header
    /// naming the client (`send-proxy-v2`): the replicas trust 127.0.0.1.
    TcpProxyV2,
}

/// haproxy in front of replicas, each checked every 200 ms at its admin
/// port's `/ready` (200 exactly when its gRPC health status for
/// `psi.v1.Match` is SERVING; haproxy 2.6 cannot send the binary body of a
/// gRPC health request): out after two failures, back after two successes.
#[derive(Debug)]
pub struct Haproxy {
    child: Child,
    /// The port institutions connect to.
    pub front: u16,
    stats: u16,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Haproxy {
    /// The installed haproxy, if any.
    #[must_use]
    pub fn binary() -> Option<PathBuf> {
        ["/usr/sbin/haproxy", "/usr/local/sbin/haproxy"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
    }

    /// The configuration for `replicas` (gRPC port, admin port).
    #[must_use]
    pub fn config(balancing: Balancing, front: u16, stats: u16, replicas: &[(u16, u16)]) -> String {
        let servers: String = replicas
            .iter()
            .enumerate()
            .map(|(i, (port, admin))| {
                format!("  server r{} 127.0.0.1:{port} check port {admin}\n", i + 1)
            })
            .collect();
        let (mode, bind, backend) = match balancing {
            Balancing::Http2 => (
                "http",
                " proto h2",
                "  balance roundrobin\n  retry-on conn-failure empty-response response-timeout\n  default-server proto h2 inter 200ms fall 2 rise 2\n",
            ),
            Balancing::Tcp => (
                "tcp",
                "",
                "  balance roundrobin\n  default-server inter 200ms fall 2 rise 2 on-marked-down shutdown-sessions\n",
            ),
            Balancing::TcpProxyV2 => (
                "tcp",
                "",
                "  balance roundrobin\n  default-server send-proxy-v2 inter 200ms fall 2 rise 2 on-marked-down shutdown-sessions\n",
            ),
        };
        format!(
            "global
  maxconn 4000
defaults
  mode {mode}
  timeout connect 2s
  timeout client 120s
  timeout server 120s
frontend grpc
  bind 127.0.0.1:{front}{bind}
  default_backend replicas
backend replicas
  option httpchk GET /ready
  http-check expect status 200
{backend}{servers}listen stats
  mode http
  bind 127.0.0.1:{stats}
  stats enable
  stats uri /stats
"
        )
    }

    /// Validates the configuration (`haproxy -c`) and starts haproxy on free
    /// ports, writing its configuration and log into `dir`.
    ///
    /// # Errors
    /// Why haproxy cannot run: not installed, configuration refused.
    pub fn start(
        dir: &Path,
        balancing: Balancing,
        replicas: &[(u16, u16)],
    ) -> Result<Self, String> {
        let bin = Self::binary()
            .ok_or("haproxy is not installed (.ci/run installs Debian's haproxy package)")?;
        let (front, stats) = (free_port(), free_port());
        let config = dir.join("haproxy.cfg");
        std::fs::write(&config, Self::config(balancing, front, stats, replicas))
            .map_err(|e| e.to_string())?;
        let validated = Command::new(&bin)
            .args(["-c", "-f"])
            .arg(&config)
            .output()
            .map_err(|e| e.to_string())?;
        if !validated.status.success() {
            return Err(format!(
                "haproxy -c refused the configuration: {}",
                String::from_utf8_lossy(&validated.stderr)
            ));
        }
        let log = std::fs::File::create(dir.join("haproxy.log")).map_err(|e| e.to_string())?;
        let child = Command::new(&bin)
            .args(["-db", "-f"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            child,
            front,
            stats,
        })
    }

    /// Each replica's status (`UP`, `DOWN`, ...), from haproxy's CSV stats.
    #[must_use]
    pub fn status(&self) -> Vec<String> {
        let text = http_get(self.stats, "/stats;csv").unwrap_or_default();
        let mut status = Vec::new();
        for line in text.lines() {
            let fields: Vec<&str> = line.split(',').collect();
            if fields.first() == Some(&"replicas")
                && fields.get(1).is_some_and(|f| f.starts_with('r'))
            {
                status.push((*fields.get(17).unwrap_or(&"?")).to_string());
            }
        }
        status
    }

    /// Waits until every replica is UP.
    ///
    /// # Panics
    /// After `patience`.
    pub fn wait_all_up(&self, replicas: usize, patience: Duration) {
        wait_for("haproxy to see every replica up", patience, || {
            let s = self.status();
            s.len() == replicas && s.iter().all(|s| s == "UP")
        });
    }
}
