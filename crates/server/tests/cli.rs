//! The `psi-server` binary's own commands (its presence here also makes
//! `cargo test --workspace` build the binary that the client's end-to-end
//! tests drive).

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
}

#[test]
fn init_killed_at_any_point_leaves_a_loadable_snapshot_and_reruns() {
    use psi_server::registry::Snapshot;
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
    let pk = first.server.public_key().to_bytes();
    for delay_ms in [5u64, 40, 120, 300, 600] {
        let mut child = init().spawn().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        // Whatever point it died at: the key is intact and a whole snapshot loads.
        let snap = Snapshot::load(&data)
            .unwrap_or_else(|e| panic!("after a kill at {delay_ms} ms: {e:#}"));
        assert_eq!(
            snap.server.public_key().to_bytes(),
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
fn the_readme_demo_runs_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let out = server()
        .args(["demo", "--count", "3000", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("all answers as expected."), "{stdout}");
    assert!(stdout.contains("chain intact"), "{stdout}");
}

#[test]
fn update_and_rotate_key_from_the_command_line_survive_a_kill() {
    use psi_server::registry::Snapshot;
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
        v1.server.public_key(),
        1,
        now.server.public_key(),
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
