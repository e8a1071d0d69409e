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
