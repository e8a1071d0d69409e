//! The `psi-server` binary's own commands (its presence here also makes
//! `cargo test --workspace` build the binary that the client's end-to-end
//! tests drive).

// Integration tests: a failed unwrap, expect or index is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::process::Command;

fn server() -> Command {
    Command::new(env!("CARGO_BIN_EXE_psi-server"))
}

#[test]
fn generate_is_deterministic_for_a_seed() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for (name, seed) in [("a.csv", "5"), ("b.csv", "5"), ("c.csv", "6")] {
        let out = dir.path().join(name);
        let status = server()
            .args(["generate", "--count", "300", "--seed", seed, "--out"])
            .arg(&out)
            .status()
            .unwrap();
        assert!(status.success());
        files.push(std::fs::read_to_string(out).unwrap());
    }
    assert_eq!(files[0], files[1]);
    assert_ne!(files[0], files[2]);
    assert_eq!(files[0].lines().count(), 301);
    assert!(files[0].starts_with("name,id\n"));
}

#[test]
fn ca_commands_make_a_working_set_of_files() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let out = server()
        .args(["ca", "init", "--dir"])
        .arg(&ca)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = server()
        .args(["ca", "issue", "--institution", "bank-001", "--dir"])
        .arg(&ca)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "ca.pem",
        "ca.key",
        "server.pem",
        "server.key",
        "bank-001.pem",
        "bank-001.key",
    ] {
        assert!(ca.join(f).exists(), "{f}");
    }
    // A second init never overwrites the CA.
    let out = server()
        .args(["ca", "init", "--dir"])
        .arg(&ca)
        .output()
        .unwrap();
    assert!(!out.status.success());
    // Bad institution ids are refused with the rule.
    let out = server()
        .args(["ca", "issue", "--institution", "银行", "--dir"])
        .arg(&ca)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("letters, digits"));
    // An institution named like the CA's or the server's files: refused,
    // and the CA's key is untouched.
    let ca_key = std::fs::read(ca.join("ca.key")).unwrap();
    for reserved in ["ca", "server"] {
        let out = server()
            .args(["ca", "issue", "--institution", reserved, "--dir"])
            .arg(&ca)
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("is reserved"));
    }
    assert_eq!(std::fs::read(ca.join("ca.key")).unwrap(), ca_key);
    // Issuing again for an institution keeps its key unless told to replace it.
    let key = std::fs::read(ca.join("bank-001.key")).unwrap();
    let out = server()
        .args(["ca", "issue", "--institution", "bank-001", "--dir"])
        .arg(&ca)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--replace"));
    assert_eq!(std::fs::read(ca.join("bank-001.key")).unwrap(), key);
    let out = server()
        .args([
            "ca",
            "issue",
            "--institution",
            "bank-001",
            "--replace",
            "--dir",
        ])
        .arg(&ca)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_ne!(std::fs::read(ca.join("bank-001.key")).unwrap(), key);
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn init(registry: &std::path::Path, data: &std::path::Path, extra: &[&str]) -> (bool, String) {
    run(server()
        .args(["init", "--no-progress", "--registry"])
        .arg(registry)
        .arg("--data-dir")
        .arg(data)
        .args(extra))
}

#[test]
fn init_and_update_refuse_to_publish_a_registry_that_lost_its_rows() {
    let dir = tempfile::tempdir().unwrap();
    let people = dir.path().join("people.csv");
    let out = server()
        .args(["generate", "--count", "1000", "--seed", "3", "--out"])
        .arg(&people)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = std::fs::read_to_string(&people).unwrap();
    let data = dir.path().join("data");
    let (ok, out) = init(&people, &data, &[]);
    assert!(ok, "{out}");
    assert!(out.contains("1000 records"), "{out}");
    let snapshot = psi_server::store::base_file(&data).unwrap();
    let published = std::fs::read(&snapshot).unwrap();

    // The name and ID columns swapped: every row rejected, nothing published.
    let swapped = dir.path().join("swapped.csv");
    let mut lines = text.lines();
    lines.next();
    let mut w = String::from("id,name\n");
    for l in lines {
        w.push_str(l);
        w.push('\n');
    }
    std::fs::write(&swapped, w).unwrap();
    let (ok, out) = init(&swapped, &data, &[]);
    assert!(!ok);
    assert!(
        out.contains("refusing to publish: the registry source gave no valid row"),
        "{out}"
    );
    assert!(out.contains("nothing was published"), "{out}");
    assert_eq!(std::fs::read(&snapshot).unwrap(), published);
    assert!(data.join("rejected-rows.csv").exists());

    // A header-only export: refused too.
    let empty = dir.path().join("empty.csv");
    std::fs::write(&empty, "name,id\n").unwrap();
    let (ok, out) = init(&empty, &data, &[]);
    assert!(!ok && out.contains("gave no valid row"), "{out}");

    // Two bad rows in 102 (2%): over the 1% default, under a raised limit.
    let some_bad = dir.path().join("some-bad.csv");
    let mut w: String = text.lines().take(101).map(|l| format!("{l}\n")).collect();
    w.push_str("张三,123\n李四,456\n");
    std::fs::write(&some_bad, w).unwrap();
    let (ok, out) = init(&some_bad, &data, &["--max-shrink", "1"]);
    assert!(
        !ok && out.contains("2 of 102 rows of the registry source rejected"),
        "{out}"
    );
    // Losing 90% of the registry: refused without a larger --max-shrink.
    let (ok, out) = init(&some_bad, &data, &["--max-rejected-fraction", "0.05"]);
    assert!(
        !ok && out.contains("would fall from 1000 to 100 records"),
        "{out}"
    );
    assert_eq!(std::fs::read(&snapshot).unwrap(), published);
    let (ok, out) = init(
        &some_bad,
        &data,
        &["--max-rejected-fraction", "0.05", "--max-shrink", "0.95"],
    );
    assert!(ok, "{out}");
    assert!(
        out.contains("102 rows read, 100 accepted, 2 rejected"),
        "{out}"
    );

    // Duplicates are counted as such, not as records.
    let dup = dir.path().join("dup.csv");
    let body: String = text
        .lines()
        .skip(1)
        .take(100)
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&dup, format!("name,id\n{body}{body}{body}")).unwrap();
    let (ok, out) = init(&dup, &data, &[]);
    assert!(ok, "{out}");
    assert!(
        out.contains(
            "300 rows read, 300 accepted, 0 rejected, 200 duplicates kept once; 100 records"
        ),
        "{out}"
    );

    // An update that removes most of the registry is refused; --force publishes it.
    let remove = dir.path().join("remove.csv");
    let body: String = text
        .lines()
        .skip(1)
        .take(50)
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&remove, format!("name,id\n{body}")).unwrap();
    let update = |extra: &[&str]| {
        run(server()
            .args(["update", "--no-progress", "--remove"])
            .arg(&remove)
            .arg("--data-dir")
            .arg(&data)
            .args(extra))
    };
    let (ok, out) = update(&[]);
    assert!(
        !ok && out.contains("would fall from 100 to 50 records"),
        "{out}"
    );
    let (ok, out) = update(&["--force"]);
    assert!(ok && out.contains("50 removed"), "{out}");

    // A quote never closed: refused with its line, nothing published.
    let open = dir.path().join("open.csv");
    let mut w: String = text.lines().take(10).map(|l| format!("{l}\n")).collect();
    w.push_str("\"王五,11010519491231002X\n");
    w.extend(text.lines().skip(10).take(100).map(|l| format!("{l}\n")));
    std::fs::write(&open, w).unwrap();
    let snapshot = psi_server::store::base_file(&data).unwrap();
    let before = std::fs::read(&snapshot).unwrap();
    let (ok, out) = init(&open, &data, &["--force"]);
    assert!(!ok);
    assert!(
        out.contains("line 11: a quoted field opened here is never closed"),
        "{out}"
    );
    assert_eq!(psi_server::store::base_file(&data).unwrap(), snapshot);
    assert_eq!(std::fs::read(&snapshot).unwrap(), before);
}

#[test]
fn update_and_rotate_key_never_create_a_mistyped_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let typo = dir.path().join("srv").join("psi-typo");
    let add = dir.path().join("add.csv");
    std::fs::write(&add, "name,id\n张伟,11010519491231002X\n").unwrap();
    let (ok, out) = run(server()
        .args(["update", "--no-progress", "--add"])
        .arg(&add)
        .arg("--data-dir")
        .arg(&typo));
    assert!(!ok && out.contains("holds no registry"), "{out}");
    let (ok, out) = run(server()
        .args(["rotate-key", "--no-progress", "--data-dir"])
        .arg(&typo));
    assert!(!ok && out.contains("holds no registry"), "{out}");
    assert!(!typo.exists() && !typo.parent().unwrap().exists());
}

#[test]
fn init_killed_at_any_point_leaves_a_loadable_snapshot_and_reruns() {
    use psi_server::serving::snapshot::Snapshot;
    let dir = tempfile::tempdir().unwrap();
    let registry = dir.path().join("registry.csv");
    let data = dir.path().join("data");
    let status = server()
        .args(["generate", "--count", "30000", "--seed", "1", "--out"])
        .arg(&registry)
        .status()
        .unwrap();
    assert!(status.success());
    let init = || {
        let mut c = server();
        c.args(["init", "--no-progress", "--registry"])
            .arg(&registry)
            .arg("--data-dir")
            .arg(&data)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        c
    };
    assert!(init().status().unwrap().success());
    let first = Snapshot::load(&data).unwrap();
    let pk = first.evaluator.public_key().to_bytes();
    for delay_ms in [5u64, 40, 120, 300, 600] {
        let mut child = init().spawn().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        // Whatever point it died at: the key is intact and a whole snapshot loads.
        let snap = Snapshot::load(&data)
            .unwrap_or_else(|e| panic!("after a kill at {delay_ms} ms: {e:#}"));
        assert_eq!(
            snap.evaluator.public_key().to_bytes(),
            pk,
            "the key never changes"
        );
        assert_eq!(snap.index.len(), 30_000);
    }
    // A rerun completes and cleans up what the killed runs left behind.
    assert!(init().status().unwrap().success());
    let last = Snapshot::load(&data).unwrap();
    assert!(last.index.registry_version() > first.index.registry_version());
    let leftovers: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn update_and_rotate_key_from_the_command_line_survive_a_kill() {
    use psi_server::serving::snapshot::Snapshot;
    let dir = tempfile::tempdir().unwrap();
    let (registry, add, remove) = (
        dir.path().join("registry.csv"),
        dir.path().join("add.csv"),
        dir.path().join("remove.csv"),
    );
    let data = dir.path().join("data");
    for (out, count, seed) in [(&registry, "20000", "1"), (&add, "100", "2")] {
        let status = server()
            .args(["generate", "--count", count, "--seed", seed, "--out"])
            .arg(out)
            .status()
            .unwrap();
        assert!(status.success());
    }
    let text = std::fs::read_to_string(&registry).unwrap();
    let first_100: Vec<&str> = text.lines().take(101).collect();
    std::fs::write(&remove, first_100.join("\n") + "\n").unwrap();
    let run = |args: &[&str]| {
        let out = server()
            .args(args)
            .arg("--data-dir")
            .arg(&data)
            .arg("--no-progress")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{args:?}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    run(&["init", "--registry", registry.to_str().unwrap()]);
    let v1 = Snapshot::load(&data).unwrap();
    let out = run(&[
        "update",
        "--add",
        add.to_str().unwrap(),
        "--remove",
        remove.to_str().unwrap(),
    ]);
    assert!(
        out.contains("registry version 2 (key epoch 1): 100 added, 0 already present, 100 removed, 0 not found; 20000 records"),
        "{out}"
    );

    // Killed at any point, a rotation leaves a whole snapshot of the old or
    // the new epoch, each loadable with its own key.
    for delay_ms in [5u64, 60, 200] {
        let mut child = server()
            .args([
                "rotate-key",
                "--grace-period",
                "0s",
                "--no-progress",
                "--data-dir",
            ])
            .arg(&data)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = child.kill();
        let _ = child.wait();
        let snap = Snapshot::load(&data)
            .unwrap_or_else(|e| panic!("after a kill at {delay_ms} ms: {e:#}"));
        assert_eq!(snap.index.len(), 20_000);
    }
    let before = Snapshot::load(&data).unwrap().epoch;
    let out = run(&["rotate-key", "--grace-period", "0s"]);
    assert!(
        out.contains(&format!("key epoch {before} -> {}", before + 1)),
        "{out}"
    );
    let now = Snapshot::load(&data).unwrap();
    assert_eq!(now.epoch, before + 1);
    assert_eq!(now.index.len(), 20_000);
    // Every key since the first is endorsed by its predecessor.
    psi_core::rotation::verify_chain(
        &v1.evaluator.public_key(),
        1,
        &now.evaluator.public_key(),
        now.epoch,
        &now.history,
    )
    .unwrap();
    // With no grace the retired keys are gone; only the current key is left.
    let keys: Vec<String> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("oprf-epoch-") || n.contains(".tmp-"))
        .collect();
    assert_eq!(keys, [format!("oprf-epoch-{}.key", now.epoch)]);
}

#[test]
fn publish_from_the_command_line_writes_a_serving_directory_without_records() {
    let dir = tempfile::tempdir().unwrap();
    let people = dir.path().join("people.csv");
    let (ok, out) = run(server()
        .args(["generate", "--count", "500", "--seed", "9", "--out"])
        .arg(&people));
    assert!(ok, "{out}");
    let (encoding, serving) = (dir.path().join("encoding"), dir.path().join("serving"));
    let (ok, out) = init(&people, &encoding, &[]);
    assert!(ok, "{out}");
    let (ok, out) = run(server()
        .arg("publish")
        .arg("--data-dir")
        .arg(&encoding)
        .arg("--to")
        .arg(&serving));
    assert!(ok, "{out}");
    assert!(
        out.contains("published registry version 1 (key epoch 1)"),
        "{out}"
    );
    assert!(psi_server::store::base_file(&serving).unwrap().is_file());
    assert!(psi_server::store::records_file(&serving).is_err());
    assert!(!psi_server::store::holds_records(&serving));
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&serving), 0o700);
    assert_eq!(mode(&serving.join("oprf-epoch-1.key")), 0o600);
    // The wrong way round is refused, saying why.
    let (ok, out) = run(server()
        .arg("publish")
        .arg("--data-dir")
        .arg(&serving)
        .arg("--to")
        .arg(&encoding));
    assert!(!ok);
    assert!(out.contains("it is an encoding directory"), "{out}");
}

#[test]
fn partitioned_init_merged_is_byte_identical_to_a_single_init() {
    let dir = tempfile::tempdir().unwrap();
    let people = dir.path().join("people.csv");
    let (ok, out) = run(server()
        .args(["generate", "--count", "3000", "--seed", "21", "--out"])
        .arg(&people));
    assert!(ok, "{out}");
    // Rows to reject and a repeated person, spread through the source.
    let text = std::fs::read_to_string(&people).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    let repeated = lines[10].to_string();
    lines.insert(500, "张三,11010519491231002");
    lines.insert(1500, &repeated);
    lines.insert(2500, ",11010519491231002X");
    std::fs::write(&people, lines.join("\n") + "\n").unwrap();

    let (parted, single) = (dir.path().join("parted"), dir.path().join("single"));
    let parts = dir.path().join("parts");
    // Without a key, a partition says how to make one.
    let (ok, out) = run(server()
        .args(["init", "--no-progress", "--partition", "0/3", "--registry"])
        .arg(&people)
        .arg("--data-dir")
        .arg(&parted)
        .arg("--parts-dir")
        .arg(&parts));
    assert!(!ok);
    assert!(out.contains("psi-server keygen"), "{out}");
    let (ok, out) = run(server().arg("keygen").arg("--data-dir").arg(&parted));
    assert!(ok, "{out}");

    // Three partitions at once, as an Indexed Job runs them.
    let children: Vec<_> = (0..3)
        .map(|i| {
            server()
                .args(["init", "--no-progress", "--partition", &format!("{i}/3")])
                .arg("--registry")
                .arg(&people)
                .arg("--data-dir")
                .arg(&parted)
                .arg("--parts-dir")
                .arg(&parts)
                .output()
                .unwrap()
        })
        .collect();
    for c in &children {
        assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stderr));
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&parts).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "the parts hold canonical records");
    // A merge missing a part refuses, naming it.
    let merge = |n: &str| {
        run(server()
            .args(["merge", "--partitions", n, "--data-dir"])
            .arg(&parted)
            .arg("--parts-dir")
            .arg(&parts))
    };
    let (part, aside) = (parts.join("part-1-of-3.bin"), parts.join("aside"));
    std::fs::rename(&part, &aside).unwrap();
    let (ok, out) = merge("3");
    assert!(!ok);
    assert!(out.contains("part-1-of-3.bin"), "{out}");
    std::fs::rename(&aside, &part).unwrap();
    let (ok, out) = merge("3");
    assert!(ok, "{out}");
    assert!(
        out.contains("3003 rows read, 3001 accepted, 2 rejected, 1 duplicates"),
        "{out}"
    );

    // A damaged part is refused, naming it; nothing is published.
    let bytes = std::fs::read(parts.join("part-2-of-3.bin")).unwrap();
    std::fs::write(parts.join("part-2-of-3.bin"), &bytes[..bytes.len() - 7]).unwrap();
    let base = psi_server::store::base_file(&parted).unwrap();
    let published = std::fs::read(&base).unwrap();
    let (ok, out) = merge("3");
    assert!(!ok);
    assert!(
        out.contains("part-2-of-3.bin is truncated or damaged"),
        "{out}"
    );
    assert_eq!(psi_server::store::base_file(&parted).unwrap(), base);
    assert!(std::fs::read(&base).unwrap() == published);

    // One process, the same key, the same rows.
    std::fs::create_dir(&single).unwrap();
    std::fs::copy(
        parted.join("oprf-epoch-1.key"),
        single.join("oprf-epoch-1.key"),
    )
    .unwrap();
    let (ok, out) = init(&people, &single, &[]);
    assert!(ok, "{out}");
    let files = |dir: &std::path::Path| {
        [
            psi_server::store::base_file(dir).unwrap(),
            psi_server::store::records_file(dir).unwrap(),
            dir.join("rejected-rows.csv"),
        ]
    };
    for (a, b) in files(&parted).iter().zip(files(&single)) {
        assert!(
            std::fs::read(a).unwrap() == std::fs::read(&b).unwrap(),
            "{} differs",
            a.display()
        );
    }
}

#[test]
fn the_public_key_to_publish_is_printed_and_a_header_only_update_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let people = dir.path().join("people.csv");
    let (ok, out) = run(server()
        .args(["generate", "--count", "200", "--seed", "4", "--out"])
        .arg(&people));
    assert!(ok, "{out}");
    let data = dir.path().join("data");
    let (ok, out) = init(&people, &data, &[]);
    assert!(ok, "{out}");
    // init prints the key to publish; `key show` prints the same.
    let key_of = |text: &str| -> String {
        let at = text.find("public key ").expect("a public key line") + "public key ".len();
        text[at..at + 64].to_string()
    };
    let printed = key_of(&out);
    assert!(printed.bytes().all(|b| b.is_ascii_hexdigit()), "{out}");
    let show = |data: &std::path::Path| run(server().args(["key", "show", "--data-dir"]).arg(data));
    let (ok, shown) = show(&data);
    assert!(ok, "{shown}");
    assert!(shown.starts_with("key epoch 1: public key "), "{shown}");
    assert_eq!(key_of(&shown), printed);
    assert!(shown.contains("fingerprint "), "{shown}");
    // After a rotation: epoch 2, and the endorsed step in the history.
    let (ok, out) = run(server()
        .args(["rotate-key", "--no-progress", "--data-dir"])
        .arg(&data));
    assert!(ok, "{out}");
    let (ok, shown) = show(&data);
    assert!(ok, "{shown}");
    assert!(shown.starts_with("key epoch 2: public key "), "{shown}");
    assert_ne!(key_of(&shown), printed);
    assert!(
        shown.contains("epoch 2: public key ") && shown.contains("endorsed by the key of epoch 1"),
        "{shown}"
    );
    // A header-only add file is a slip: refused, nothing published.
    let empty = dir.path().join("empty.csv");
    std::fs::write(&empty, "name,id\n").unwrap();
    let update = |extra: &[&str]| {
        run(server()
            .args(["update", "--no-progress", "--add"])
            .arg(&empty)
            .arg("--data-dir")
            .arg(&data)
            .args(extra))
    };
    let (ok, out) = update(&[]);
    assert!(!ok, "{out}");
    assert!(out.contains("the add source gave no valid row"), "{out}");
    assert!(out.contains("nothing was published"), "{out}");
    let (ok, out) = update(&["--force"]);
    assert!(ok, "{out}");
}

/// What the help says matches what the commands do.
#[test]
fn help_texts_say_what_the_commands_do() {
    let help = |args: &[&str]| {
        let out = server().args(args).arg("--help").output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let serve = help(&["serve"]);
    assert!(
        serve.contains("/metrics") && serve.contains("/ready"),
        "{serve}"
    );
    let ca = help(&["ca", "init"]);
    assert!(ca.contains("repeat the flag"), "{ca}");
    let key = help(&["key", "show"]);
    assert!(key.contains("public key"), "{key}");
}
