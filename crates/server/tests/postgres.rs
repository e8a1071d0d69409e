//! PostgreSQL as the registry source, against a real PostgreSQL server:
//! the one named by `PSI_TEST_POSTGRES_URL`, or a throwaway cluster this
//! test creates with the installed binaries (`.ci/run` installs Debian's
//! `postgresql` package when they are missing). Where neither works, the
//! test prints why and passes without running.

// Integration tests: a failed unwrap, expect or index is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::Path;

use psi_testbed::{start_postgres, Durability};

use psi_server::registry;
use psi_server::registry::source::Source;
use psi_server::tools::synth::Generator;

fn people(n: usize) -> Vec<(String, String)> {
    let mut rows: Vec<(String, String)> = Generator::new(11, psi_core::CivilDate::today())
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
    let mut r: Vec<Vec<u8>> = psi_server::store::current_records(dir)
        .unwrap()
        .iter()
        .map(<[u8]>::to_vec)
        .collect();
    r.sort();
    r
}

#[test]
fn postgres_import_equals_csv_import_and_feeds_updates() {
    let pg = match start_postgres(Durability::Volatile) {
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
    let newcomer = Generator::new(12, psi_core::CivilDate::today())
        .unwrap()
        .next()
        .unwrap();
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

/// The registry source (every name and ID) and the audit trail reach
/// PostgreSQL over TLS, the server's certificate verified against
/// `PSI_PG_CA_FILE`; a database elsewhere than on this host is refused in
/// the clear.
#[test]
fn postgres_is_reached_over_verified_tls_and_never_in_the_clear_across_the_network() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("ca");
    psi_server::tools::ca::init(&ca, &["127.0.0.1".into(), "localhost".into()]).unwrap();
    let pg = match psi_testbed::start_postgres_with_tls(
        Durability::Volatile,
        &ca.join("server.pem"),
        &ca.join("server.key"),
    ) {
        Ok(pg) => pg,
        Err(why) => {
            println!("SKIPPED: no PostgreSQL server could be started here: {why}");
            return;
        }
    };
    let mut client = postgres::Client::connect(&pg.url, postgres::NoTls).unwrap();
    client
        .batch_execute("CREATE TABLE psi_people (name text, id text)")
        .unwrap();
    for (name, id) in people(20) {
        client
            .execute("INSERT INTO psi_people VALUES ($1, $2)", &[&name, &id])
            .unwrap();
    }
    let other = tmp.path().join("other-ca");
    psi_server::tools::ca::init(&other, &["127.0.0.1".into()]).unwrap();
    let init = |url: &str, ca_file: Option<&Path>, dir: &str| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_psi-server"));
        c.args([
            "init",
            "--no-progress",
            "--force",
            "--registry",
            "psi_people",
            "--postgres",
            url,
        ])
        .arg("--data-dir")
        .arg(tmp.path().join(dir))
        .env_remove("PSI_PG_CA_FILE")
        .env_remove("PSI_PG_INSECURE_PLAINTEXT");
        if let Some(ca_file) = ca_file {
            c.env("PSI_PG_CA_FILE", ca_file);
        }
        let out = c.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let require = format!("{}?sslmode=require", pg.url);
    // Verified TLS: the import runs.
    let (ok, err) = init(&require, Some(&ca.join("ca.pem")), "a");
    assert!(ok, "{err}");
    // TLS asked for without a CA to verify against: refused, saying what to set.
    let (ok, err) = init(&require, None, "b");
    assert!(!ok && err.contains("PSI_PG_CA_FILE"), "{err}");
    // A server certificate another CA signed: refused.
    let (ok, err) = init(&require, Some(&other.join("ca.pem")), "c");
    assert!(!ok, "a certificate of another CA was accepted: {err}");
    // A database elsewhere than on this host, without TLS: refused before
    // a byte is sent (the address is not even reachable).
    let (ok, err) = init("postgres://psi@192.0.2.1:5432/postgres", None, "d");
    assert!(!ok && err.contains("without TLS"), "{err}");
    // The audit trail too.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_psi-server"))
        .args(["audit", "verify", "--db", &require])
        .env("PSI_PG_CA_FILE", ca.join("ca.pem"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
