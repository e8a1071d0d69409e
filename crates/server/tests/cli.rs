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
