//! The real binaries: `psi-server generate`, `init`, `serve`, then
//! `psi-client batch`, `check` and `sync`, then SIGTERM and a clean exit.

// Integration tests: a failed unwrap, expect or index is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn client_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_psi-client"))
}

/// `psi-server` sits beside `psi-client` in the target directory when the
/// workspace is tested; build it if this crate is tested alone.
fn server_bin() -> PathBuf {
    let path = client_bin().with_file_name("psi-server");
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "psi-server", "--bin", "psi-server"])
            .status()
            .expect("running cargo build");
        assert!(status.success(), "building psi-server");
    }
    path
}

fn run(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.output().expect("spawning");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `psi-client ARGS` against `url` with a purpose and a cache directory.
fn client_command(args: &[&str], url: &str, cache: &Path) -> Command {
    let mut c = Command::new(client_bin());
    c.args(args)
        .args([
            "--server",
            url,
            "--purpose",
            "kyc-onboarding",
            "--cache-dir",
        ])
        .arg(cache);
    c
}

/// `psi-server init` of a registry CSV with `rows` (after the header
/// `name,id`) into `root/data`; returns the data directory.
fn init_registry(root: &Path, rows: &str) -> PathBuf {
    let registry = root.join("registry.csv");
    std::fs::write(&registry, format!("name,id\n{rows}")).unwrap();
    let data = root.join("data");
    let (code, out, err) = run(Command::new(server_bin())
        .args(["init", "--no-progress", "--registry"])
        .arg(&registry)
        .arg("--data-dir")
        .arg(&data));
    assert_eq!(code, 0, "{out}{err}");
    data
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
    }
}

/// Starts `psi-server serve` (with a policy file if given); its log goes to
/// `data_dir/../server.log`. Returns the process and the URL it listens at.
fn serve(data_dir: &Path, policy: Option<&Path>) -> (Server, String) {
    let log = std::fs::File::create(data_dir.with_file_name("server.log")).expect("log file");
    let mut command = Command::new(server_bin());
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir);
    if let Some(policy) = policy {
        command.arg("--policy").arg(policy);
    }
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("starting psi-server");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("reading the address");
    let addr = line.trim().rsplit(' ').next().expect("address").to_string();
    (Server(child), format!("http://{addr}"))
}

#[test]
fn init_serve_batch_check_with_the_real_binaries() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let registry = root.join("registry.csv");
    let data = root.join("data");

    let (code, out, err) = run(Command::new(server_bin())
        .args(["generate", "--count", "2000", "--seed", "9", "--out"])
        .arg(&registry));
    assert_eq!(code, 0, "{out}{err}");
    // Append a known pair and a bad row.
    let mut text = std::fs::read_to_string(&registry).unwrap();
    text.push_str("张伟,11010519491231002X\n坏行,123\n");
    std::fs::write(&registry, text).unwrap();

    let (code, out, err) = run(Command::new(server_bin())
        .args(["init", "--no-progress", "--registry"])
        .arg(&registry)
        .arg("--data-dir")
        .arg(&data));
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("2002 rows read, 2001 accepted, 1 rejected, 0 duplicates kept once"),
        "{out}"
    );
    assert!(
        !out.contains("坏行") && !out.contains("123,"),
        "no personal data in the summary: {out}"
    );

    let (mut server, url) = serve(&data, None);
    let cache = root.join("cache");
    let client = |args: &[&str]| client_command(args, &url, &cache);
    // Wait until the snapshot is loaded.
    let started = Instant::now();
    loop {
        let (code, _, err) = run(&mut client(&[
            "check",
            "--name",
            "张伟",
            "--id",
            "11010519491231002x",
        ]));
        if code == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "server never became ready: {err}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // With a query log: the check is recorded, and the chain verifies.
    let log = root.join("query-log.sqlite");
    let log_arg = log.display().to_string();
    let (code, out, _) = run(&mut client(&[
        "check",
        "--name",
        "张三",
        "--id",
        "11010519491231002X",
        "--query-log",
        &log_arg,
        "--staff",
        "clerk-9",
    ]));
    assert_eq!((code, out.trim()), (1, "no_match"));
    let (code, out, err) =
        run(Command::new(client_bin()).args(["log", "verify", "--log", &log_arg]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("1 records, the chain verifies"), "{out}");
    let (code, out, _) = run(&mut client(&[
        "check",
        "--name",
        "张伟",
        "--id",
        "110105194912310021",
    ]));
    assert_eq!(code, 2);
    assert!(out.contains("check character should be X"), "{out}");
    let (code, out, _) = run(&mut client(&[
        "check",
        "--mode",
        "sync",
        "--name",
        "张伟",
        "--id",
        "11010519491231002X",
    ]));
    assert_eq!((code, out.trim()), (0, "match"));
    // PIR mode: the first check registers the public parameters, the
    // second (another process) reuses the registration.
    for (name, id, want) in [
        ("张伟", "11010519491231002X", (0, "match")),
        ("张三", "11010519491231002X", (1, "no_match")),
    ] {
        let (code, out, err) = run(&mut client(&[
            "check", "--mode", "pir", "--name", name, "--id", id,
        ]));
        assert_eq!((code, out.trim()), want, "{err}");
    }

    let input = root.join("in.csv");
    let mut first_rows = String::from("name,id,ref\n");
    let reg = std::fs::read_to_string(&registry).unwrap();
    for line in reg.lines().skip(1).take(50) {
        first_rows.push_str(line);
        first_rows.push_str(",r\n");
    }
    first_rows.push_str("王小二,830000199201300022,r\n");
    std::fs::write(&input, first_rows).unwrap();
    for mode in ["sync", "bucket"] {
        let output = root.join(format!("out-{mode}.csv"));
        let (code, out, err) = run(&mut client(&[
            "batch",
            "--no-progress",
            "--mode",
            mode,
            "--input",
            input.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
            "--query-log",
            &log_arg,
            "--staff",
            "batch-clerk",
        ]));
        assert_eq!(code, 0, "{out}{err}");
        assert!(
            err.contains("51 rows: 50 match, 1 no_match, 0 invalid"),
            "{err}"
        );
        let answers = std::fs::read_to_string(&output).unwrap();
        assert_eq!(answers.lines().count(), 52);
        assert!(answers
            .lines()
            .next()
            .unwrap()
            .ends_with("name,id,ref,result,error"));
    }
    // The check above and both batches' rows, every one in the query log.
    let (code, out, err) =
        run(Command::new(client_bin()).args(["log", "verify", "--log", &log_arg]));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("{} records, the chain verifies", 1 + 2 * 51)),
        "{out}"
    );
    let (code, out, _) = run(&mut client(&["sync"]));
    assert_eq!(code, 0);
    assert!(out.contains("fetched 0 of"), "{out}");

    // Every request is in the audit trail, which verifies; no personal data in it.
    let audit_db = data.join("audit.sqlite");
    let (code, out, err) = run(Command::new(server_bin())
        .args(["audit", "verify", "--db"])
        .arg(&audit_db));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("audit chain intact"), "{out}");
    let (code, out, _) = run(Command::new(server_bin())
        .args([
            "audit",
            "export",
            "--format",
            "csv",
            "--institution",
            "local",
            "--db",
        ])
        .arg(&audit_db));
    assert_eq!(code, 0);
    assert!(
        out.lines()
            .skip(1)
            .all(|l| l.contains(",local,kyc-onboarding,")),
        "{out}"
    );
    assert!(
        out.contains(",Evaluate,sync,")
            && out.contains(",BucketQuery,bucket,")
            && out.contains(",PirQuery,pir,")
            && out.matches(",PirSetup,pir,").count() == 1,
        "{out}"
    );
    assert!(
        !out.contains("张伟") && !out.contains("11010519491231002"),
        "{out}"
    );

    // The server's log names institutions and counts, never a pair.
    let log = std::fs::read_to_string(root.join("server.log")).unwrap();
    assert!(log.contains("institution=\"local\""), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "no terminal colour codes in a log file"
    );
    for needle in [
        "张伟",
        "张三",
        "11010519491231002",
        "王小二",
        "830000199201300022",
    ] {
        assert!(!log.contains(needle), "the log holds {needle}");
    }
    for line in reg.lines().skip(1).take(50) {
        let (name, id) = line.split_once(',').unwrap();
        assert!(
            !log.contains(name) && !log.contains(id),
            "the log holds a registry pair"
        );
    }

    // SIGTERM: the server drains and exits cleanly.
    let pid = server.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = server.0.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(Instant::now() < deadline, "server did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn config_errors_are_reported_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = run(Command::new(server_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path()));
    assert_eq!(code, 1);
    assert!(err.contains("psi-server init"), "{err}");
    let (code, _, err) = run(Command::new(client_bin())
        .args([
            "check",
            "--server",
            "http://127.0.0.1:1",
            "--purpose",
            "kyc",
            "--name",
            "张伟",
            "--id",
            "11010519491231002X",
            "--cache-dir",
        ])
        .arg(dir.path()));
    assert_eq!(code, 2);
    assert!(err.contains("connecting to http://127.0.0.1:1"), "{err}");
}

#[test]
fn sighup_reloads_the_policy_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let data = init_registry(root, "张伟,11010519491231002X\n");
    let policy = root.join("policy.toml");
    let rules = |purposes: &str| {
        format!("[institutions.local]\nmodes = [\"bucket\", \"sync\"]\npurposes = [{purposes}]\nrate_per_second = 1000\ndaily_cap = 100000\nmax_batch = 64\n")
    };
    std::fs::write(&policy, rules("\"kyc-onboarding\"")).unwrap();
    let (server, url) = serve(&data, Some(&policy));
    let check = |purpose: &str| {
        run(Command::new(client_bin())
            .args([
                "check",
                "--name",
                "张伟",
                "--id",
                "11010519491231002X",
                "--server",
                &url,
                "--purpose",
                purpose,
                "--cache-dir",
            ])
            .arg(root.join("cache")))
    };
    let started = Instant::now();
    while check("kyc-onboarding").0 != 0 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "server never became ready"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, _, err) = check("aml-recheck");
    assert_eq!(code, 2);
    assert!(
        err.contains("purpose aml-recheck is not authorised"),
        "{err}"
    );

    std::fs::write(&policy, rules("\"kyc-onboarding\", \"aml-recheck\"")).unwrap();
    let pid = server.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    let started = Instant::now();
    loop {
        let (code, out, _) = check("aml-recheck");
        if code == 0 {
            assert_eq!(out.trim(), "match");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the policy was not reloaded"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A broken file keeps the policy in force.
    std::fs::write(&policy, "not toml [").unwrap();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    // Wait for the server to have read the broken file (its log says so),
    // then check that the policy in force is still the reloaded one.
    let log = data.with_file_name("server.log");
    psi_testbed::wait_for("the broken policy refused", Duration::from_secs(10), || {
        std::fs::read_to_string(&log)
            .is_ok_and(|l| l.contains("policy not reloaded, the previous one stays in force"))
    });
    assert_eq!(check("aml-recheck").0, 0);
}

/// `count` synthetic people (`seed`) initialised in `root/data`, and an
/// input `root/in.csv` of the same people with a leading row number `n`.
fn numbered_registry(root: &Path, count: u64, seed: u64) -> (PathBuf, PathBuf) {
    let registry = root.join("registry.csv");
    let (code, _, err) = run(Command::new(server_bin())
        .args([
            "generate",
            "--count",
            &count.to_string(),
            "--seed",
            &seed.to_string(),
            "--out",
        ])
        .arg(&registry));
    assert_eq!(code, 0, "{err}");
    let data = root.join("data");
    let (code, _, err) = run(Command::new(server_bin())
        .args(["init", "--no-progress", "--registry"])
        .arg(&registry)
        .arg("--data-dir")
        .arg(&data));
    assert_eq!(code, 0, "{err}");
    let input = root.join("in.csv");
    let mut text = String::from("n,name,id\n");
    for (i, line) in std::fs::read_to_string(&registry)
        .unwrap()
        .lines()
        .skip(1)
        .enumerate()
    {
        text.push_str(&format!("{i},{line}\n"));
    }
    std::fs::write(&input, text).unwrap();
    (data, input)
}

#[test]
fn a_killed_batch_resumes_with_every_row_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // 400 registered people, and the same people numbered as the input.
    let (data, input) = numbered_registry(root, 400, 3);
    let policy = root.join("policy.toml");
    std::fs::write(&policy, "[institutions.local]\nmodes=[\"sync\"]\npurposes=[\"kyc-onboarding\"]\nrate_per_second=100\ndaily_cap=100000\nmax_batch=64\n").unwrap();
    let (_server, url) = serve(&data, Some(&policy));
    let output = root.join("out.csv");
    let partial = root.join("out.csv.partial");
    let batch = |resume: bool| {
        let mut c = Command::new(client_bin());
        c.args([
            "batch",
            "--no-progress",
            "--chunk-rows",
            "40",
            "--server",
            &url,
            "--purpose",
            "kyc-onboarding",
            "--input",
        ])
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .arg("--cache-dir")
        .arg(root.join("cache"));
        if resume {
            c.arg("--resume");
        }
        c
    };
    // Start, wait until some rows are on disk, then SIGKILL the client.
    let mut started = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while started.is_none() {
        let mut client = batch(false)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        loop {
            let lines = std::fs::read_to_string(&partial)
                .map(|t| t.lines().count())
                .unwrap_or(0);
            if lines > 41 {
                client.kill().unwrap();
                client.wait().unwrap();
                started = Some(lines);
                break;
            }
            if let Some(status) = client.try_wait().unwrap() {
                // Not ready yet (snapshot loading): try again.
                assert!(
                    !status.success(),
                    "the batch finished before it could be interrupted"
                );
                break;
            }
            assert!(Instant::now() < deadline, "no progress");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    assert!(!output.exists());
    // Without --resume the leftover is not silently overwritten.
    let (code, _, err) = run(&mut batch(false));
    assert_eq!(code, 2);
    assert!(err.contains("--resume"), "{err}");
    let (code, _, err) = run(&mut batch(true));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("resumed after"), "{err}");
    let mut r = csv::Reader::from_path(&output).unwrap();
    let rows: Vec<csv::StringRecord> = r.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 400);
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(&row[0], i.to_string(), "each row once, in order");
        assert_eq!(&row[3], "match");
    }
    assert!(!partial.exists());
}

/// Peak resident memory (KiB) of `cmd` while it runs, sampled from /proc.
fn run_measuring_peak(cmd: &mut Command) -> (i32, String, u64) {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning");
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak = 0;
    let code = loop {
        if let Ok(status) = std::fs::read_to_string(&status_file) {
            if let Some(hwm) = status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
            {
                peak = peak.max(hwm);
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status.code().unwrap_or(-1);
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (code, err, peak)
}

#[test]
fn batch_inputs_with_long_rows_open_quotes_and_extra_fields() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let data = init_registry(root, "张伟,11010519491231002X\n李秀英,440524188001010014\n");
    let (_server, url) = serve(&data, None);
    let cache = root.join("cache");
    let batch = |input: &Path, output: &Path, extra: &[&str]| {
        let mut c = client_command(
            &["batch", "--no-progress", "--mode", "bucket"],
            &url,
            &cache,
        );
        c.arg("--input")
            .arg(input)
            .arg("--output")
            .arg(output)
            .args(extra);
        c
    };

    // One 1 MiB pass-through field, then 500 short rows.
    let long = root.join("long.csv");
    let mut text = format!(
        "name,id,note\n张伟,11010519491231002X,{}\n",
        "x".repeat(1 << 20)
    );
    for _ in 0..500 {
        text.push_str("李秀英,440524188001010014,n\n");
    }
    std::fs::write(&long, &text).unwrap();
    // Over the default limit: stopped, naming the line.
    let (code, _, err) = run(&mut batch(&long, &root.join("long-out.csv"), &[]));
    assert_ne!(code, 0);
    assert!(
        err.contains("line 2: the row is longer than 65536 bytes"),
        "{err}"
    );
    // Allowed: memory stays near that of one such row, not one per row.
    let (code, err, peak_kib) = run_measuring_peak(&mut batch(
        &long,
        &root.join("long-out2.csv"),
        &["--max-row-bytes", "2000000"],
    ));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("501 rows: 501 match"), "{err}");
    assert!(
        peak_kib < 200 * 1024,
        "psi-client peaked at {} MiB for a 1.5 MiB input",
        peak_kib / 1024
    );

    // An unclosed quote on line 3 would swallow the rest of the file.
    let open = root.join("open.csv");
    let mut text = String::from("name,id\n张伟,11010519491231002X\n\"李秀英,440524188001010014\n");
    for _ in 0..100 {
        text.push_str("张伟,11010519491231002X\n");
    }
    std::fs::write(&open, &text).unwrap();
    let (code, _, err) = run(&mut batch(&open, &root.join("open-out.csv"), &[]));
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("line 3: a quoted field opened here is never closed"),
        "{err}"
    );
    assert!(!root.join("open-out.csv").exists());

    // A row with an extra field is answered `invalid`; the rest go on.
    let extra = root.join("extra.csv");
    std::fs::write(
        &extra,
        "name,id,ref\n张伟,11010519491231002X,a\n李秀英,440524188001010014,b,surplus\n张伟,11010519491231002X,c\n",
    )
    .unwrap();
    let output = root.join("extra-out.csv");
    let (code, _, err) = run(&mut batch(&extra, &output, &[]));
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("3 rows: 2 match, 0 no_match, 1 invalid"),
        "{err}"
    );
    let answers = std::fs::read_to_string(&output).unwrap();
    let lines: Vec<&str> = answers.lines().collect();
    assert_eq!(lines.len(), 4);
    assert!(
        lines[2].starts_with(
            "李秀英,440524188001010014,b,invalid,the row has 4 fields but the header names 3"
        ),
        "{answers}"
    );
}

#[test]
fn gb18030_and_bom_files_in_and_out_and_a_file_in_neither_refused() {
    use psi_files::encoding::{decode, encode, Encoding};
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // The registry itself as Excel on a Chinese-language Windows saves it.
    let registry = root.join("registry.csv");
    std::fs::write(
        &registry,
        encode(
            "姓名,身份证号\n张伟,11010519491231002X\n阿依古丽·买买提,360426199101010071\n",
            Encoding::Gb18030,
        ),
    )
    .unwrap();
    let data = root.join("data");
    let (code, out, err) = run(Command::new(server_bin())
        .args([
            "init",
            "--no-progress",
            "--name-column",
            "姓名",
            "--id-column",
            "身份证号",
            "--registry",
        ])
        .arg(&registry)
        .arg("--data-dir")
        .arg(&data));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("2 rows read, 2 accepted, 0 rejected"), "{out}");
    let (_server, url) = serve(&data, None);
    let cache = root.join("cache");
    let batch = |input: &Path, output: &Path, extra: &[&str]| {
        let mut c = client_command(
            &["batch", "--no-progress", "--mode", "bucket"],
            &url,
            &cache,
        );
        c.arg("--input")
            .arg(input)
            .arg("--output")
            .arg(output)
            .args(extra);
        run(&mut c)
    };
    let rows = "name,id,备注\n张伟,11010519491231002X,老客户\n阿依古丽·买买提,360426199101010071,新\n李四,11010519491231002X,x\n";

    // GBK in, GBK out (the input's encoding), answers right.
    let gbk_in = root.join("gbk.csv");
    std::fs::write(&gbk_in, encode(rows, Encoding::Gb18030)).unwrap();
    let gbk_out = root.join("gbk-out.csv");
    let (code, _, err) = batch(&gbk_in, &gbk_out, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("3 rows: 2 match, 1 no_match, 0 invalid"),
        "{err}"
    );
    let answers = decode(&std::fs::read(&gbk_out).unwrap(), Encoding::Gb18030).unwrap();
    assert!(
        answers.contains("张伟,11010519491231002X,老客户,match,"),
        "{answers}"
    );
    assert!(
        answers.contains("李四,11010519491231002X,x,no_match,"),
        "{answers}"
    );

    // GBK in, UTF-8 with a BOM out (for Excel).
    let bom_out = root.join("bom-out.csv");
    let (code, _, err) = batch(&gbk_in, &bom_out, &["--output-encoding", "utf-8-bom"]);
    assert_eq!(code, 0, "{err}");
    let bytes = std::fs::read(&bom_out).unwrap();
    assert!(bytes.starts_with(b"\xEF\xBB\xBF"));
    assert_eq!(
        String::from_utf8(bytes[3..].to_vec()).unwrap(),
        decode(&std::fs::read(&gbk_out).unwrap(), Encoding::Gb18030).unwrap()
    );

    // UTF-8 with a BOM in: the header is still recognised.
    let bom_in = root.join("bom.csv");
    std::fs::write(
        &bom_in,
        [b"\xEF\xBB\xBF".as_slice(), rows.as_bytes()].concat(),
    )
    .unwrap();
    let (code, _, err) = batch(&bom_in, &root.join("bom-in-out.csv"), &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("3 rows: 2 match, 1 no_match, 0 invalid"),
        "{err}"
    );

    // Neither UTF-8 nor GB18030: refused before any request, naming the line.
    let bad = root.join("bad.csv");
    let mut bytes = encode(rows, Encoding::Gb18030);
    bytes.extend_from_slice(b"caf\xE9\xFF,1,2\n");
    std::fs::write(&bad, bytes).unwrap();
    let (code, _, err) = batch(&bad, &root.join("bad-out.csv"), &[]);
    assert_ne!(code, 0);
    assert!(
        err.contains("neither UTF-8 (line 1 is not) nor GB18030 (line 5 is not)"),
        "{err}"
    );
    assert!(!root.join("bad-out.csv").exists() && !root.join("bad-out.csv.partial").exists());
    // Named wrongly: the first line that is not what it was said to be.
    let (code, _, err) = batch(&gbk_in, &root.join("wrong.csv"), &["--encoding", "utf-8"]);
    assert_ne!(code, 0);
    assert!(err.contains("line 1 is not valid utf-8"), "{err}");
}

#[test]
fn a_config_file_supplies_the_settings_and_flags_override_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let data = init_registry(root, "张伟,11010519491231002X\n");
    let (_server, url) = serve(&data, None);
    let config = root.join("psi-client.toml");
    std::fs::write(
        &config,
        format!("server = \"{url}\"\npurpose = \"kyc-onboarding\"\ncache_dir = \"cache\"\nconcurrency = 2\n"),
    )
    .unwrap();
    let client = |args: &[&str]| {
        let mut c = Command::new(client_bin());
        c.args(args)
            .arg("--config")
            .arg(&config)
            .env_remove("PSI_SERVER")
            .env_remove("PSI_PURPOSE");
        run(&mut c)
    };
    // Nothing but the file: a check works, the cache is the file's neighbour.
    let (code, out, err) = client(&["check", "--name", "张伟", "--id", "11010519491231002X"]);
    assert_eq!((code, out.trim()), (0, "match"), "{err}");
    assert!(root.join("cache").join("known-servers.txt").exists());
    // config check: the settings and their sources, then the connection.
    let (code, out, err) = client(&["config", "check", "--concurrency", "3"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("server        {url} (config file)")),
        "{out}"
    );
    assert!(
        out.contains("concurrency   3 (flag or environment)"),
        "{out}"
    );
    assert!(
        out.contains("purpose       kyc-onboarding (config file)"),
        "{out}"
    );
    assert!(out.contains("connection    ok"), "{out}");
    // A flag beats the file.
    let (code, _, err) = client(&[
        "check",
        "--server",
        "http://127.0.0.1:9",
        "--name",
        "张伟",
        "--id",
        "11010519491231002X",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("127.0.0.1:9"), "{err}");
    // A misspelt key is refused with its name.
    std::fs::write(&config, "sever = \"x\"\n").unwrap();
    let (code, _, err) = client(&["config", "check"]);
    assert_eq!(code, 2);
    assert!(err.contains("unknown field `sever`"), "{err}");
}

#[test]
fn excel_workbooks_in_and_out_with_chinese_headers_and_numeric_ids() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let data = init_registry(root, "张伟,11010519491231002X\n李秀英,440524188001010014\n");
    let (_server, url) = serve(&data, None);
    let cache = root.join("cache");

    // A clerk's workbook: Chinese headers, a remark column, one ID typed as
    // a number (Excel rounds it to 15 significant digits).
    let input = root.join("客户.xlsx");
    let mut book = rust_xlsxwriter::Workbook::new();
    let s = book.add_worksheet();
    s.set_name("名单").unwrap();
    for (c, h) in ["姓名", "身份证号", "备注"].iter().enumerate() {
        s.write_string(0, c as u16, *h).unwrap();
    }
    s.write_string(1, 0, "张伟").unwrap();
    s.write_string(1, 1, "11010519491231002X").unwrap();
    s.write_string(1, 2, "老客户").unwrap();
    s.write_string(2, 0, "李秀英").unwrap();
    s.write_number(2, 1, 440524188001010014.0).unwrap();
    s.write_string(3, 0, "王五").unwrap();
    s.write_string(3, 1, "440524188001010014").unwrap();
    book.save(&input).unwrap();

    let output = root.join("answers.xlsx");
    let mut c = client_command(
        &["batch", "--no-progress", "--mode", "bucket"],
        &url,
        &cache,
    );
    c.arg("--input").arg(&input).arg("--output").arg(&output);
    let (code, _, err) = run(&mut c);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("3 rows: 1 match, 1 no_match, 1 invalid"),
        "{err}"
    );
    let answers = psi_files::xlsx::read(&output, None).unwrap();
    assert_eq!(
        answers.header,
        ["姓名", "身份证号", "备注", "result", "error"]
    );
    let text = |r: usize, c: usize| answers.rows[r][c].text();
    assert_eq!((text(0, 0), text(0, 3)), ("张伟".into(), "match".into()));
    assert_eq!(text(0, 1), "11010519491231002X");
    assert_eq!(text(1, 3), "invalid");
    assert!(
        text(1, 4).contains("stored in the workbook as the number"),
        "{}",
        text(1, 4)
    );
    assert_eq!((text(2, 0), text(2, 3)), ("王五".into(), "no_match".into()));

    // The same workbook to CSV (UTF-8 with a BOM, for Excel), another sheet
    // name refused with the list, headers named explicitly.
    let csv_out = root.join("answers.csv");
    let mut c = client_command(
        &["batch", "--no-progress", "--mode", "bucket"],
        &url,
        &cache,
    );
    c.arg("--input").arg(&input).arg("--output").arg(&csv_out);
    let (code, _, err) = run(&mut c);
    assert_eq!(code, 0, "{err}");
    assert!(std::fs::read(&csv_out)
        .unwrap()
        .starts_with(b"\xEF\xBB\xBF"));
    let mut c = client_command(
        &[
            "batch",
            "--no-progress",
            "--mode",
            "bucket",
            "--sheet",
            "Sheet1",
        ],
        &url,
        &cache,
    );
    c.arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(root.join("x.xlsx"));
    let (code, _, err) = run(&mut c);
    assert_ne!(code, 0);
    assert!(
        err.contains("no sheet `Sheet1` (its sheets: 名单)"),
        "{err}"
    );
    let mut c = client_command(
        &[
            "batch",
            "--no-progress",
            "--mode",
            "bucket",
            "--id-column",
            "证件号",
        ],
        &url,
        &cache,
    );
    c.arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(root.join("y.xlsx"));
    let (code, _, err) = run(&mut c);
    assert_ne!(code, 0);
    assert!(err.contains("the ID column (证件号)"), "{err}");
}

#[test]
fn a_server_killed_mid_batch_is_ridden_out() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // 3000 registered people, and the same people numbered as the input.
    let (data, input) = numbered_registry(root, 3000, 5);
    let port = psi_testbed::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let args = |a: &[&str]| a.iter().map(|s| (*s).to_string()).collect::<Vec<_>>();
    let mut server = psi_testbed::Process::start(
        &server_bin(),
        args(&[
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
            data.to_str().unwrap(),
        ]),
        root.join("server.log"),
    );
    psi_testbed::wait_for("the server to listen", Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let output = root.join("out.csv");
    let partial = root.join("out.csv.partial");
    let client = Command::new(client_bin())
        .args([
            "batch",
            "--no-progress",
            "--chunk-rows",
            "200",
            "--server",
            &url,
            "--purpose",
            "kyc-onboarding",
            "--input",
        ])
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .arg("--cache-dir")
        .arg(root.join("cache"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Requests follow each other without pause, so one is in flight when,
    // once some rows are answered, the server is killed (SIGKILL: no
    // drain); it starts again on the same port a moment later.
    psi_testbed::wait_for("the first answers", Duration::from_secs(60), || {
        std::fs::read_to_string(&partial).is_ok_and(|t| t.lines().count() > 201)
    });
    server.kill_9();
    std::thread::sleep(Duration::from_millis(500));
    server.spawn();
    let out = client.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("retrying"), "the batch saw the outage: {err}");
    let mut r = csv::Reader::from_path(&output).unwrap();
    let rows: Vec<csv::StringRecord> = r.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 3000);
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(&row[0], i.to_string(), "each row once, in order");
        assert_eq!(&row[3], "match");
    }
}

/// `check --help` names all three answers.
#[test]
fn check_help_names_every_answer() {
    let out = Command::new(client_bin())
        .args(["check", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for word in ["match", "no_match", "invalid"] {
        assert!(help.contains(word), "{word}: {help}");
    }
}
