//! The crash harness: every writer (`init`, `update`, `compact`,
//! `rotate-key`, `init` over a registry, `merge`, `publish`) run as the real
//! `psi-server` binary and killed with SIGKILL at each fsync, rename and
//! unlink it performs (fault injection by strace: `-e inject=SYSCALL:
//! signal=KILL:when=N` for N = 1, 2, ... until a run completes), and at
//! random delays. After every kill:
//! - the directory serves, and what it serves is the old version or the
//!   new one, whole (its size, and sampled pairs in and out, checked with
//!   the key it serves);
//! - the record store holds that version's records;
//! - the same command run again succeeds and leaves the new version;
//! - an update and a key rotation on top keep every committed record.
//!
//! Needs strace (`.ci/run` installs it); skipped with the reason where it
//! cannot trace.

// Integration tests: a failed unwrap, expect or index is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use psi_core::Record;
use psi_server::registry::{self, source::Source};
use psi_server::serving::snapshot::Snapshot;
use psi_server::store;
use psi_server::tools::synth::Generator;

/// The syscalls a kill is injected at: every durable step of a writer.
const SYSCALLS: &[&str] = &[
    "fsync",
    "fdatasync",
    "rename",
    "renameat",
    "renameat2",
    "unlink",
    "unlinkat",
];
/// Kills at random delays per command.
const RANDOM_KILLS: usize = 4;

fn server_bin() -> &'static str {
    env!("CARGO_BIN_EXE_psi-server")
}

fn people() -> &'static [(String, String)] {
    static POOL: OnceLock<Vec<(String, String)>> = OnceLock::new();
    POOL.get_or_init(|| {
        Generator::new(77, psi_core::CivilDate::today())
            .unwrap()
            .take(400)
            .map(|p| (p.name, p.id))
            .collect()
    })
}

fn write_csv(path: &Path, rows: impl IntoIterator<Item = usize>) {
    let mut out = String::from("name,id\n");
    for i in rows {
        let (name, id) = &people()[i];
        out.push_str(&format!("{name},{id}\n"));
    }
    std::fs::write(path, out).unwrap();
}

/// A committed state: its registry version, key epoch and members.
#[derive(Debug, Clone, PartialEq, Eq)]
struct State {
    version: u64,
    epoch: u64,
    members: BTreeSet<usize>,
}

/// Whether person `i` is in what `s` serves, asked with the key it serves.
fn served(s: &Snapshot, i: usize) -> bool {
    let (name, id) = &people()[i];
    let record = Record::parse(name, id, psi_core::CivilDate::today()).unwrap();
    let psi_server::serving::snapshot::Evaluator::Key(server) = &s.evaluator else {
        panic!("the crash tests run in single-key mode");
    };
    let tag = server.evaluate_batch(&[record.encode()]).unwrap()[0].tag();
    s.index
        .bucket(record.bucket(s.index.prefix_bits()))
        .is_some_and(|run| run.contains(tag.0))
}

/// Which of `allowed` the directory serves (`None`: no registry yet);
/// panics, saying what it found, when it is none of them or not whole.
fn check(dir: &Path, allowed: &[Option<&State>], what: &str, encoding: bool) -> Option<State> {
    if !store::has_registry(dir) {
        assert!(allowed.contains(&None), "{what}: no registry left");
        return None;
    }
    let s = Snapshot::load(dir).unwrap_or_else(|e| panic!("{what}: does not serve: {e:#}"));
    let (version, epoch) = (s.index.registry_version(), s.epoch);
    // A state of version u64::MAX stands for any version and epoch.
    let Some(state) = allowed
        .iter()
        .flatten()
        .find(|st| st.version == u64::MAX || (st.version == version && st.epoch == epoch))
    else {
        panic!(
            "{what}: serves version {version} of epoch {epoch}, neither old nor new {allowed:?}"
        );
    };
    assert_eq!(s.index.len(), state.members.len(), "{what}: size");
    for i in (0..people().len()).step_by(9) {
        assert_eq!(
            served(&s, i),
            state.members.contains(&i),
            "{what}: person {i} at version {version}"
        );
    }
    if encoding {
        let records =
            store::current_records(dir).unwrap_or_else(|e| panic!("{what}: records: {e:#}"));
        assert_eq!(
            records.len() as usize,
            state.members.len(),
            "{what}: records"
        );
    }
    Some(State {
        version,
        epoch,
        members: state.members.clone(),
    })
}

/// One writer run as the binary, from a prepared state to the next.
struct Case {
    name: &'static str,
    args: Vec<String>,
    /// The directory it writes and whether it is an encoding directory.
    target: &'static str,
    encoding: bool,
    before: Option<State>,
    after: State,
}

/// Copies the prepared `from` tree to a fresh `to`.
fn fresh_copy(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    psi_testbed::copy_dir(from, to);
}

fn args_in(root: &Path, args: &[&str]) -> Vec<String> {
    args.iter()
        .map(|a| {
            a.strip_prefix('@').map_or_else(
                || (*a).to_string(),
                |rel| root.join(rel).display().to_string(),
            )
        })
        .collect()
}

/// Why strace cannot inject here, if it cannot.
fn strace_unusable() -> Option<String> {
    let out = Command::new("strace")
        .args(["-f", "-qq", "-o", "/dev/null", "-e", "trace=fsync"])
        .args(["-e", "inject=fsync:signal=KILL:when=1", "true"])
        .output();
    match out {
        Err(e) => Some(format!(
            "strace is not installed ({e}); .ci/run installs it"
        )),
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "strace cannot trace here: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
    }
}

/// Runs the case's command in `work`, killed at the `n`-th `syscall`
/// (or not at all); whether it was killed.
fn run(work: &Path, case: &Case, inject: Option<(&str, usize)>) -> bool {
    let args = args_in(
        work,
        &case.args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let mut cmd = match inject {
        Some((syscall, n)) => {
            let mut c = Command::new("strace");
            c.args(["-f", "-qq", "-o", "/dev/null"])
                .arg(format!("-etrace={syscall}"))
                .arg(format!("-einject={syscall}:signal=KILL:when={n}"))
                .arg(server_bin());
            c
        }
        None => Command::new(server_bin()),
    };
    let out = cmd
        .args(&args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .output()
        .unwrap();
    if out.status.success() {
        return false;
    }
    use std::os::unix::process::ExitStatusExt;
    let killed = out.status.signal() == Some(9) || out.status.code() == Some(137);
    assert!(
        killed,
        "{} ({inject:?}) failed without being killed: {}",
        case.name,
        String::from_utf8_lossy(&out.stderr)
    );
    true
}

/// After a kill: the old or new state served; the command again; then an
/// update and a rotation on top keep every committed record.
fn after_kill(work: &Path, case: &Case, what: &str) {
    let target = work.join(case.target);
    let allowed = [case.before.as_ref(), Some(&case.after)];
    check(&target, &allowed, what, case.encoding);
    assert!(!run(work, case, None), "{what}: the rerun was killed?");
    // Run again: the new state's members (a run that had committed before
    // it was killed makes one more version, or epoch, of the same).
    let rerun = check(
        &target,
        &[Some(&State {
            version: u64::MAX,
            ..case.after.clone()
        })],
        &format!("{what}, rerun"),
        case.encoding,
    )
    .unwrap();
    assert!(
        rerun.version >= case.after.version && rerun.epoch >= case.after.epoch,
        "{what}, rerun: {rerun:?}"
    );
    if case.encoding {
        let add = work.join("later.csv");
        write_csv(&add, 390..395);
        registry::update(Some(&Source::csv(&add)), None, &target, false)
            .unwrap_or_else(|e| panic!("{what}: a later update: {e:#}"));
        registry::rotate_key(&target, Duration::ZERO, false)
            .unwrap_or_else(|e| panic!("{what}: a later rotation: {e:#}"));
        let mut members = case.after.members.clone();
        members.extend(390..395);
        let later = State {
            version: rerun.version + 2,
            epoch: rerun.epoch + 1,
            members,
        };
        check(
            &target,
            &[Some(&later)],
            &format!("{what}, after a later update and rotation"),
            true,
        );
    }
}

/// Kills `case` at every injection point and at random delays, from the
/// prepared tree `prepared`; returns how many kills were checked.
fn kill_everywhere(prepared: &Path, scratch: &Path, case: &Case) -> usize {
    let work = scratch.join("work");
    let mut kills = 0;
    // How long the command takes, for the random delays.
    fresh_copy(prepared, &work);
    let started = Instant::now();
    assert!(!run(&work, case, None), "{}: the plain run", case.name);
    let took = started.elapsed();
    check(
        &work.join(case.target),
        &[Some(&case.after)],
        case.name,
        case.encoding,
    );
    for syscall in SYSCALLS {
        for n in 1.. {
            fresh_copy(prepared, &work);
            if !run(&work, case, Some((syscall, n))) {
                break;
            }
            kills += 1;
            after_kill(
                &work,
                case,
                &format!("{} killed at {syscall} #{n}", case.name),
            );
        }
    }
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64 ^ case.name.len() as u64;
    for k in 0..RANDOM_KILLS {
        fresh_copy(prepared, &work);
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = took.mul_f64((seed % 1000) as f64 / 1000.0);
        let args = args_in(
            &work,
            &case.args.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        let mut child = Command::new(server_bin())
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        let _ = child.kill();
        let _ = child.wait();
        kills += 1;
        after_kill(
            &work,
            case,
            &format!("{} killed after {delay:?} (random kill {k})", case.name),
        );
    }
    kills
}

#[test]
fn every_writer_killed_at_every_durable_step_leaves_the_old_or_the_new_version() {
    if let Some(why) = strace_unusable() {
        eprintln!("skipped: {why}");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let prepared = root.join("prepared");
    let scratch = root.join("scratch");
    std::fs::create_dir_all(&prepared).unwrap();
    std::fs::create_dir_all(&scratch).unwrap();
    write_csv(&prepared.join("a.csv"), 0..150);
    write_csv(&prepared.join("add.csv"), 150..160);
    write_csv(&prepared.join("remove.csv"), 0..5);
    write_csv(&prepared.join("b.csv"), 50..200);
    let set = |r: std::ops::Range<usize>| r.collect::<BTreeSet<usize>>();
    let v1 = State {
        version: 1,
        epoch: 1,
        members: set(0..150),
    };
    let mut v2 = v1.clone();
    v2.version = 2;
    v2.members.extend(150..160);
    for i in 0..5 {
        v2.members.remove(&i);
    }
    let v3 = State {
        version: 3,
        epoch: 2,
        members: v2.members.clone(),
    };
    let v4 = State {
        version: 4,
        epoch: 2,
        members: set(50..200),
    };
    let v5 = State {
        version: 5,
        epoch: 2,
        members: set(0..150),
    };
    let bin = |args: &[&str]| {
        let args = args_in(&prepared, args);
        let out = Command::new(server_bin()).args(&args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let strings = |a: &[&str]| a.iter().map(|s| (*s).to_string()).collect::<Vec<_>>();
    let mut total = 0;
    let mut step = |case: Case, advance: bool, then: &dyn Fn()| {
        let kills = kill_everywhere(&prepared, &scratch, &case);
        eprintln!("{}: {kills} kills checked", case.name);
        total += kills;
        // The prepared tree moves on to the case's new state (when later
        // cases start from it), then takes what else they need.
        if advance {
            bin(&case.args.iter().map(String::as_str).collect::<Vec<_>>());
        }
        then();
    };
    let data_case =
        |name: &'static str, args: &[&str], before: Option<&State>, after: &State| Case {
            name,
            args: strings(args),
            target: "data",
            encoding: true,
            before: before.cloned(),
            after: after.clone(),
        };
    step(
        data_case(
            "init",
            &[
                "init",
                "--no-progress",
                "--registry",
                "@a.csv",
                "--data-dir",
                "@data",
            ],
            None,
            &v1,
        ),
        true,
        &|| {},
    );
    step(
        data_case(
            "update",
            &[
                "update",
                "--no-progress",
                "--add",
                "@add.csv",
                "--remove",
                "@remove.csv",
                "--data-dir",
                "@data",
            ],
            Some(&v1),
            &v2,
        ),
        true,
        // The serving directory starts at version 2 of epoch 1.
        &|| bin(&["publish", "--data-dir", "@data", "--to", "@serving"]),
    );
    step(
        data_case(
            "compact",
            &["compact", "--data-dir", "@data"],
            Some(&v2),
            &v2,
        ),
        true,
        &|| {},
    );
    step(
        data_case(
            "rotate-key",
            &[
                "rotate-key",
                "--no-progress",
                "--grace-period",
                "0s",
                "--data-dir",
                "@data",
            ],
            Some(&v2),
            &v3,
        ),
        true,
        &|| {},
    );
    step(
        data_case(
            "init over a registry",
            &[
                "init",
                "--no-progress",
                "--registry",
                "@b.csv",
                "--data-dir",
                "@data",
                "--force",
            ],
            Some(&v3),
            &v4,
        ),
        true,
        // Two partitions of a.csv encoded under the registry's key, for
        // the merge.
        &|| {
            for slice in ["0/2", "1/2"] {
                bin(&[
                    "init",
                    "--no-progress",
                    "--registry",
                    "@a.csv",
                    "--data-dir",
                    "@data",
                    "--partition",
                    slice,
                    "--parts-dir",
                    "@parts",
                ]);
            }
        },
    );
    // The tree stays at version 4 for the publication below.
    step(
        data_case(
            "merge",
            &[
                "merge",
                "--data-dir",
                "@data",
                "--parts-dir",
                "@parts",
                "--partitions",
                "2",
                "--force",
            ],
            Some(&v4),
            &v5,
        ),
        false,
        &|| {},
    );
    // A publication of a new epoch over a serving directory of the old one:
    // the old key must stay until the new base is committed.
    step(
        Case {
            name: "publish",
            args: strings(&["publish", "--data-dir", "@data", "--to", "@serving"]),
            target: "serving",
            encoding: false,
            before: Some(v2.clone()),
            after: v4.clone(),
        },
        false,
        &|| {},
    );
    eprintln!("{total} kills, each followed by the checks");
    assert!(
        total > 50,
        "{total} kills: the injection did not reach the writers"
    );
}
