//! PostgreSQL as the registry source, against a real PostgreSQL server:
//! the one named by `PSI_TEST_POSTGRES_URL`, or a throwaway cluster this
//! test creates with the installed binaries (`.ci/run` installs Debian's
//! `postgresql` package when they are missing). Where neither works, the
//! test prints why and passes without running.

use std::path::{Path, PathBuf};
use std::process::Command;

use psi_server::records::Records;
use psi_server::registry::{self, today};
use psi_server::source::Source;
use psi_server::synth::Generator;

/// A running PostgreSQL server, stopped when dropped (if this test started it).
struct Postgres {
    url: String,
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

fn start() -> Result<Postgres, String> {
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
    let port = 20000 + std::process::id() % 20000;
    let socket = dir.path().display().to_string();
    let options = format!("-p {port} -k {socket} -c listen_addresses= -c fsync=off");
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
        url: format!("host={socket} port={port} user=psi dbname=postgres"),
        cluster: Some((bin, data, dir)),
    })
}

fn people(n: usize) -> Vec<(String, String)> {
    let mut rows: Vec<(String, String)> = Generator::new(11, today())
        .unwrap()
        .take(n)
        .map(|p| (p.name, p.id))
        .collect();
    // Rows the import must reject with the same reasons from both sources.
    rows.push(("短号".into(), "11010519491231002".into()));
    rows.push(("Zhang".into(), "11010519491231002X".into()));
    rows.push(("张伟".into(), String::new()));
    rows
}

fn sorted_records(dir: &Path) -> Vec<Vec<u8>> {
    let mut r: Vec<Vec<u8>> = Records::read(dir)
        .unwrap()
        .iter()
        .map(<[u8]>::to_vec)
        .collect();
    r.sort();
    r
}

#[test]
fn postgres_import_equals_csv_import_and_feeds_updates() {
    let pg = match start() {
        Ok(pg) => pg,
        Err(why) => {
            println!("SKIPPED: no PostgreSQL server could be started here: {why}");
            return;
        }
    };
    let rows = people(5000);
    let tmp = tempfile::tempdir().unwrap();
    let csv_path = tmp.path().join("registry.csv");
    let mut w = csv::Writer::from_path(&csv_path).unwrap();
    w.write_record(["full_name", "id_number"]).unwrap();
    for (name, id) in &rows {
        w.write_record([name, id]).unwrap();
    }
    w.flush().unwrap();

    let mut client = postgres::Client::connect(&pg.url, postgres::NoTls).unwrap();
    client
        .batch_execute(
            "DROP TABLE IF EXISTS psi_people, psi_changes;
             CREATE TABLE psi_people (full_name text, id_number text, row_no serial);
             CREATE TABLE psi_changes (full_name text, id_number text, change text);",
        )
        .unwrap();
    {
        use std::io::Write;
        let mut copy = client
            .copy_in("COPY psi_people (full_name, id_number) FROM STDIN (FORMAT csv)")
            .unwrap();
        let mut w = csv::Writer::from_writer(Vec::new());
        for (name, id) in &rows {
            w.write_record([name, id]).unwrap();
        }
        copy.write_all(&w.into_inner().unwrap()).unwrap();
        copy.finish().unwrap();
    }

    // The same rows from a CSV file and from a table (columns named as on
    // the command line) give the same records and the same rejections.
    let from_csv = tmp.path().join("a");
    let from_pg = tmp.path().join("b");
    let csv_source =
        Source::from_arg(csv_path.to_str().unwrap(), None, "full_name", "id_number").unwrap();
    let pg_source =
        Source::from_arg("psi_people", Some(&pg.url), "full_name", "id_number").unwrap();
    let a = registry::init(&csv_source, &from_csv, false).unwrap();
    let b = registry::init(&pg_source, &from_pg, false).unwrap();
    assert_eq!(a.counts.rows, rows.len() as u64);
    assert_eq!(
        (a.counts.rows, a.counts.accepted, &a.counts.rejected),
        (b.counts.rows, b.counts.accepted, &b.counts.rejected)
    );
    assert_eq!(a.counts.rejected_total(), 3);
    assert_eq!(sorted_records(&from_csv), sorted_records(&from_pg));
    // Rejected rows are reported by their row in the query's result.
    let report = std::fs::read_to_string(&b.report_path).unwrap();
    assert!(
        report.contains(&format!("registry,{},", rows.len() - 1)),
        "{report}"
    );

    // An update from queries: remove two people, add one.
    let newcomer = Generator::new(12, today()).unwrap().next().unwrap();
    client
        .execute(
            "INSERT INTO psi_changes VALUES ($1, $2, 'add'), ($3, $4, 'remove'), ($5, $6, 'remove')",
            &[
                &newcomer.name,
                &newcomer.id,
                &rows[0].0,
                &rows[0].1,
                &rows[1].0,
                &rows[1].1,
            ],
        )
        .unwrap();
    let query = |change: &str| {
        Source::from_arg(
            &format!("SELECT full_name, id_number FROM psi_changes WHERE change = '{change}'"),
            Some(&pg.url),
            "name",
            "id",
        )
        .unwrap()
    };
    let u = registry::update(Some(&query("add")), Some(&query("remove")), &from_pg, false).unwrap();
    assert_eq!((u.added, u.removed, u.records), (1, 2, b.records - 1));

    // A query that is not valid SQL is an error naming the query, never the
    // connection string.
    let bad = Source::Postgres {
        url: pg.url.clone(),
        query: "SELEKT nonsense".into(),
    };
    let err = format!(
        "{:#}",
        registry::init(&bad, &tmp.path().join("c"), false).unwrap_err()
    );
    assert!(err.contains("SELEKT nonsense"), "{err}");
    assert!(!err.contains(&pg.url), "{err}");
}
