//! The deployment files in `deploy/` are parsed and checked against the
//! server they run, so a typo cannot land: every setting they pass is one
//! `psi-server serve` takes, the ports and labels they name agree with each
//! other, and the drain fits inside the time the platform gives it.

// Integration tests: a failed unwrap, expect or index is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::Deserialize;
use serde_yaml_ng::Value;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

/// The environment variables `psi-server serve` reads, from its help.
fn serve_env() -> BTreeSet<String> {
    env_of(&["serve"])
}

/// The environment variables a subcommand reads, from its help.
fn env_of(subcommand: &[&str]) -> BTreeSet<String> {
    let help = Command::new(env!("CARGO_BIN_EXE_psi-server"))
        .args(subcommand)
        .arg("--help")
        .output()
        .unwrap();
    let text = String::from_utf8(help.stdout).unwrap();
    let vars: BTreeSet<String> = text
        .split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split('=').next())
        .map(str::to_string)
        .collect();
    assert!(vars.contains("PSI_LISTEN"), "{text}");
    vars
}

fn duration(value: &str) -> Duration {
    humantime::parse_duration(value).unwrap_or_else(|e| panic!("{value:?}: {e}"))
}

fn get<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.')
        .fold(v, |v, key| match key.parse::<usize>() {
            Ok(i) => &v[i],
            Err(_) => &v[key],
        })
}

fn text(v: &Value, path: &str) -> String {
    match get(v, path) {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        other => panic!("{path}: expected text, got {other:?}"),
    }
}

#[test]
fn the_kubernetes_manifests_agree_with_the_server_and_each_other() {
    let yaml = std::fs::read_to_string(deploy().join("k8s/psi-server.yaml")).unwrap();
    let mut docs = BTreeMap::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&yaml) {
        let v = Value::deserialize(doc).expect("valid YAML");
        let kind = text(&v, "kind");
        assert!(
            docs.insert(kind.clone(), v).is_none(),
            "one {kind} in the file"
        );
    }
    let kinds: Vec<&str> = docs.keys().map(String::as_str).collect();
    assert_eq!(
        kinds,
        ["ConfigMap", "Deployment", "PodDisruptionBudget", "Service"]
    );
    let env = serve_env();
    let config = &docs["ConfigMap"];
    let Value::Mapping(data) = get(config, "data") else {
        panic!("ConfigMap data");
    };
    for (key, _) in data {
        let key = key.as_str().unwrap();
        assert!(
            env.contains(key),
            "ConfigMap sets {key}, which serve does not read"
        );
    }

    let deployment = &docs["Deployment"];
    let pod = get(deployment, "spec.template");
    let container = get(pod, "spec.containers.0");
    assert_eq!(text(container, "args.0"), "serve");
    assert_eq!(
        text(container, "envFrom.0.configMapRef.name"),
        text(config, "metadata.name")
    );
    for var in get(container, "env").as_sequence().unwrap() {
        let name = text(var, "name");
        assert!(
            env.contains(&name),
            "the container sets {name}, which serve does not read"
        );
    }
    // The ports: the one serve listens on is the one probed and served.
    let listen = text(config, "data.PSI_LISTEN");
    let admin = text(config, "data.PSI_ADMIN_LISTEN");
    let port_of = |addr: &str| addr.rsplit(':').next().unwrap().to_string();
    let ports: BTreeMap<String, String> = get(container, "ports")
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| (text(p, "name"), text(p, "containerPort")))
        .collect();
    assert_eq!(ports["grpc"], port_of(&listen));
    assert_eq!(ports["admin"], port_of(&admin));
    assert_eq!(text(container, "readinessProbe.grpc.port"), ports["grpc"]);
    assert_eq!(
        text(container, "readinessProbe.grpc.service"),
        "psi.v1.Match",
        "readiness is the Match service's health, which is NOT_SERVING while loading or draining"
    );
    // The drain fits in the grace period: every request ends within the
    // stream timeout, plus the preStop pause.
    let grace = get(pod, "spec.terminationGracePeriodSeconds")
        .as_u64()
        .unwrap();
    let stream = duration(&text(config, "data.PSI_STREAM_TIMEOUT"));
    let pause = get(container, "lifecycle.preStop.sleep.seconds")
        .as_u64()
        .unwrap();
    assert!(
        grace > stream.as_secs() + pause,
        "terminationGracePeriodSeconds {grace} must exceed the stream timeout {stream:?} plus the preStop {pause} s"
    );
    // Every volume mounted exists, and the TLS files live where the config says.
    let volumes: BTreeSet<String> = get(pod, "spec.volumes")
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| text(v, "name"))
        .collect();
    let mut mounts = BTreeMap::new();
    for m in get(container, "volumeMounts").as_sequence().unwrap() {
        assert!(
            volumes.contains(&text(m, "name")),
            "mount of a missing volume: {m:?}"
        );
        mounts.insert(text(m, "name"), text(m, "mountPath"));
    }
    for var in ["PSI_TLS_CERT", "PSI_TLS_KEY", "PSI_CLIENT_CA"] {
        assert!(text(config, &format!("data.{var}")).starts_with(&mounts["tls"]));
    }
    assert_eq!(text(config, "data.PSI_DATA_DIR"), mounts["data"]);

    // The Service and the budget select the Deployment's pods.
    let labels = get(pod, "metadata.labels");
    assert_eq!(get(deployment, "spec.selector.matchLabels"), labels);
    assert_eq!(get(&docs["Service"], "spec.selector"), labels);
    assert_eq!(
        get(&docs["PodDisruptionBudget"], "spec.selector.matchLabels"),
        labels
    );
    assert_eq!(text(&docs["Service"], "spec.ports.0.targetPort"), "grpc");
    let replicas = get(deployment, "spec.replicas").as_u64().unwrap();
    let min = get(&docs["PodDisruptionBudget"], "spec.minAvailable")
        .as_u64()
        .unwrap();
    assert!(min < replicas, "the budget must allow one disruption");
}

/// An INI-like systemd unit: (section, key) -> values, with every line
/// required to be a section, a `key=value` pair, blank, or a comment.
fn unit(path: &Path) -> BTreeMap<(String, String), Vec<String>> {
    let mut out: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    let mut section = String::new();
    for (i, line) in std::fs::read_to_string(path).unwrap().lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("{}:{}: not key=value: {line}", path.display(), i + 1));
        assert!(
            !section.is_empty(),
            "{}:{}: outside a section",
            path.display(),
            i + 1
        );
        out.entry((section.clone(), key.to_string()))
            .or_default()
            .push(value.to_string());
    }
    out
}

#[test]
fn the_systemd_units_and_the_balancer_agree_with_the_server() {
    let dir = deploy().join("systemd");
    let service = unit(&dir.join("psi-server@.service"));
    // Directives this unit may use: a misspelt one would be ignored by
    // systemd with only a warning in the journal.
    let known: BTreeSet<(&str, &str)> = [
        ("Unit", "Description"),
        ("Unit", "Documentation"),
        ("Unit", "After"),
        ("Unit", "Wants"),
        ("Service", "Type"),
        ("Service", "User"),
        ("Service", "Group"),
        ("Service", "EnvironmentFile"),
        ("Service", "ExecStart"),
        ("Service", "ExecReload"),
        ("Service", "KillSignal"),
        ("Service", "TimeoutStopSec"),
        ("Service", "Restart"),
        ("Service", "RestartSec"),
        ("Service", "LimitNOFILE"),
        ("Service", "NoNewPrivileges"),
        ("Service", "ProtectSystem"),
        ("Service", "ProtectHome"),
        ("Service", "PrivateTmp"),
        ("Service", "PrivateDevices"),
        ("Service", "ProtectKernelTunables"),
        ("Service", "ProtectControlGroups"),
        ("Service", "RestrictAddressFamilies"),
        ("Service", "ReadWritePaths"),
        ("Service", "ReadOnlyPaths"),
        ("Install", "WantedBy"),
    ]
    .into_iter()
    .collect();
    for (section, key) in service.keys() {
        assert!(
            known.contains(&(section.as_str(), key.as_str())),
            "[{section}] {key} is not a directive this unit is meant to use"
        );
    }
    let exec = &service[&("Service".into(), "ExecStart".into())][0];
    let args: Vec<&str> = exec.split_whitespace().collect();
    assert!(
        args[0].ends_with("/psi-server") && args[1] == "serve",
        "{exec}"
    );
    assert_eq!(
        service[&("Service".into(), "KillSignal".into())],
        ["SIGTERM"]
    );

    // The environment files set only what serve reads.
    let env = serve_env();
    let read_env = |name: &str| -> BTreeMap<String, String> {
        std::fs::read_to_string(dir.join(name))
            .unwrap()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| {
                let (k, v) = l.split_once('=').unwrap_or_else(|| panic!("{name}: {l}"));
                assert!(
                    env.contains(k),
                    "{name} sets {k}, which serve does not read"
                );
                (k.to_string(), v.to_string())
            })
            .collect()
    };
    let shared = read_env("psi-server.env");
    let stop = duration(&format!(
        "{}s",
        service[&("Service".into(), "TimeoutStopSec".into())][0]
    ));
    assert!(
        stop > duration(&shared["PSI_STREAM_TIMEOUT"]),
        "TimeoutStopSec must outlast the drain (the stream timeout)"
    );
    assert!(
        shared["PSI_AUDIT_DB"].starts_with("postgres://"),
        "replicas share a PostgreSQL trail"
    );

    // haproxy sends to the replicas' ports and checks their admin ports.
    let cfg = std::fs::read_to_string(deploy().join("haproxy/haproxy.cfg")).unwrap();
    let servers: Vec<(String, String)> = cfg
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("server "))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let port = f[2].rsplit(':').next().unwrap().to_string();
            let check = f
                .iter()
                .position(|w| *w == "port")
                .map(|i| f[i + 1].to_string());
            (
                port,
                check.expect("each server is checked at its admin port"),
            )
        })
        .collect();
    let replicas: Vec<(String, String)> = ["replica-1.env", "replica-2.env"]
        .iter()
        .map(|f| {
            let e = read_env(f);
            let port = |k: &str| e[k].rsplit(':').next().unwrap().to_string();
            (port("PSI_LISTEN"), port("PSI_ADMIN_LISTEN"))
        })
        .collect();
    assert_eq!(servers, replicas);
    assert!(cfg.contains("option httpchk GET /ready"));

    match ["/usr/sbin/haproxy", "/usr/local/sbin/haproxy"]
        .into_iter()
        .find(|p| Path::new(p).exists())
    {
        Some(haproxy) => {
            let out = Command::new(haproxy)
                .args(["-c", "-f"])
                .arg(deploy().join("haproxy/haproxy.cfg"))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        None => eprintln!("haproxy -c skipped: haproxy is not installed"),
    }
    match Command::new("systemd-analyze").arg("--version").output() {
        Ok(o) if o.status.success() => {
            let out = Command::new("systemd-analyze")
                .args(["verify", "--man=no"])
                .arg(dir.join("psi-server@.service"))
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            // The binary and the env files are not installed here; anything
            // else it reports (an unknown directive, a bad value) fails.
            for line in err.lines() {
                assert!(
                    line.contains("/usr/local/bin/psi-server")
                        || line.contains("/etc/psi/")
                        || line.contains("Failed to prepare")
                        || line.contains("psi-server@.service: Unit")
                        || line.trim().is_empty(),
                    "systemd-analyze: {err}"
                );
            }
        }
        _ => eprintln!("systemd-analyze verify skipped: systemd-analyze is not installed"),
    }
}

/// The flags `psi-server SUBCOMMAND` takes, from its help.
fn flags_of(subcommand: &str) -> BTreeSet<String> {
    let help = Command::new(env!("CARGO_BIN_EXE_psi-server"))
        .args([subcommand, "--help"])
        .output()
        .unwrap();
    assert!(help.status.success(), "psi-server {subcommand} exists");
    String::from_utf8(help.stdout)
        .unwrap()
        .split_whitespace()
        .filter(|w| w.starts_with("--"))
        .map(|w| {
            w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
                .to_string()
        })
        .collect()
}

#[test]
fn the_partitioned_encoding_jobs_agree_with_the_server_and_the_deployment() {
    let yaml = std::fs::read_to_string(deploy().join("k8s/encode-job.yaml")).unwrap();
    let jobs: BTreeMap<String, Value> = serde_yaml_ng::Deserializer::from_str(&yaml)
        .map(|doc| {
            let v = Value::deserialize(doc).expect("valid YAML");
            assert_eq!(text(&v, "kind"), "Job");
            (text(&v, "metadata.name"), v)
        })
        .collect();
    let names: Vec<&str> = jobs.keys().map(String::as_str).collect();
    assert_eq!(names, ["psi-encode", "psi-keygen", "psi-merge"]);

    // Every container runs a real subcommand with real flags.
    let mut args_of = BTreeMap::new();
    for job in jobs.values() {
        let spec = get(job, "spec.template.spec");
        for list in ["initContainers", "containers"] {
            let Value::Sequence(containers) = &spec[list] else {
                continue;
            };
            for c in containers {
                let Value::Sequence(args) = &c["args"] else {
                    panic!("args of {}", text(c, "name"));
                };
                let args: Vec<String> = args
                    .iter()
                    .map(|a| a.as_str().unwrap().to_string())
                    .collect();
                let known = flags_of(&args[0]);
                for flag in args.iter().filter(|a| a.starts_with("--")) {
                    assert!(known.contains(flag), "psi-server {} has no {flag}", args[0]);
                }
                args_of.insert(args[0].clone(), args);
            }
        }
    }
    let names: Vec<&str> = args_of.keys().map(String::as_str).collect();
    assert_eq!(names, ["init", "keygen", "merge", "publish"]);
    let value_after = |sub: &str, flag: &str| {
        let args = &args_of[sub];
        let i = args.iter().position(|a| a == flag).unwrap();
        args[i + 1].clone()
    };

    // N agrees: completions, parallelism, the partition's denominator, the merge.
    let encode = &jobs["psi-encode"];
    assert_eq!(text(encode, "spec.completionMode"), "Indexed");
    let n = text(encode, "spec.completions");
    assert_eq!(text(encode, "spec.parallelism"), n);
    assert_eq!(
        value_after("init", "--partition"),
        format!("$(JOB_COMPLETION_INDEX)/{n}")
    );
    assert_eq!(value_after("merge", "--partitions"), n);
    assert_eq!(
        text(
            encode,
            "spec.template.spec.containers.0.env.0.valueFrom.fieldRef.fieldPath"
        ),
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    );
    // The parts and the key are where keygen, the partitions and merge look.
    for sub in ["keygen", "init", "merge", "publish"] {
        assert_eq!(value_after(sub, "--data-dir"), "/encoding", "{sub}");
    }
    assert_eq!(
        value_after("init", "--parts-dir"),
        value_after("merge", "--parts-dir")
    );

    // Publication lands where the replicas serve from.
    let deployment = std::fs::read_to_string(deploy().join("k8s/psi-server.yaml")).unwrap();
    assert!(
        deployment.contains(&format!("PSI_DATA_DIR: {}", value_after("publish", "--to"))),
        "the replicas serve what psi-merge publishes"
    );
    assert!(deployment.contains("claimName: psi-data"));
    assert!(yaml.contains("claimName: psi-data"));
}

/// The systemd unit lets the server write its data directory (the sweep of
/// retired keys destroys them there) and nothing else of the system.
#[test]
fn the_systemd_unit_lets_the_server_sweep_retired_keys() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/systemd");
    let unit = std::fs::read_to_string(root.join("psi-server@.service")).unwrap();
    let env = std::fs::read_to_string(root.join("psi-server.env")).unwrap();
    let data_dir = env
        .lines()
        .find_map(|l| l.strip_prefix("PSI_DATA_DIR="))
        .expect("the unit's environment names the data directory");
    let paths = |key: &str| -> Vec<String> {
        unit.lines()
            .filter_map(|l| l.strip_prefix(key))
            .flat_map(|v| v.split_whitespace().map(str::to_string))
            .collect()
    };
    assert!(unit.contains("ProtectSystem=strict"), "{unit}");
    assert!(
        paths("ReadWritePaths=").iter().any(|p| p == data_dir),
        "{data_dir} must be writable: {unit}"
    );
    assert!(
        !paths("ReadOnlyPaths=").iter().any(|p| p == data_dir),
        "{data_dir} is read-only: {unit}"
    );
}

#[test]
fn the_key_holders_statefulset_agrees_with_the_server_and_the_replicas() {
    let yaml = std::fs::read_to_string(deploy().join("k8s/keyholders.yaml")).unwrap();
    let docs: BTreeMap<(String, String), Value> = serde_yaml_ng::Deserializer::from_str(&yaml)
        .map(|doc| {
            let v = Value::deserialize(doc).expect("valid YAML");
            ((text(&v, "kind"), text(&v, "metadata.name")), v)
        })
        .collect();
    let doc = |kind: &str, name: &str| &docs[&(kind.to_string(), name.to_string())];
    let holder_env = env_of(&["keyholder", "serve"]);
    let config = doc("ConfigMap", "psi-keyholder");
    let Value::Mapping(data) = get(config, "data") else {
        panic!("ConfigMap data");
    };
    for (key, _) in data {
        let key = key.as_str().unwrap();
        assert!(
            holder_env.contains(key),
            "ConfigMap sets {key}, which keyholder serve does not read"
        );
    }
    let set = doc("StatefulSet", "psi-keyholder");
    let container = get(set, "spec.template.spec.containers.0");
    assert_eq!(text(container, "args.0"), "keyholder");
    assert_eq!(text(container, "args.1"), "serve");
    let port = text(container, "ports.0.containerPort");
    assert!(text(config, "data.PSI_LISTEN").ends_with(&format!(":{port}")));
    let mounts: BTreeMap<String, String> = get(container, "volumeMounts")
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| (text(m, "name"), text(m, "mountPath")))
        .collect();
    assert_eq!(text(config, "data.PSI_HOLDER_DIR"), mounts["holder"]);
    for var in ["PSI_TLS_CERT", "PSI_TLS_KEY", "PSI_CLIENT_CA"] {
        assert!(text(config, &format!("data.{var}")).starts_with(&mounts["tls"]));
    }
    assert_eq!(
        text(set, "spec.volumeClaimTemplates.0.metadata.name"),
        "holder",
        "each holder keeps its own volume"
    );
    // The replicas' settings name every holder by its stable DNS name, in
    // index order, at the port it listens on; and serve reads them.
    let replicas = get(set, "spec.replicas").as_u64().unwrap();
    let service = text(set, "spec.serviceName");
    let link = doc("ConfigMap", "psi-server-holders");
    let serve = serve_env();
    let Value::Mapping(data) = get(link, "data") else {
        panic!("ConfigMap data");
    };
    for (key, _) in data {
        let key = key.as_str().unwrap();
        assert!(serve.contains(key), "{key} is not a serve setting");
    }
    let expected: Vec<String> = (0..replicas)
        .map(|i| format!("{}=https://psi-keyholder-{i}.{service}:{port}", i + 1))
        .collect();
    assert_eq!(text(link, "data.PSI_HOLDERS"), expected.join(","));
    // Callers are the replicas and the encoder; the NetworkPolicy lets in
    // just their pods.
    assert_eq!(text(config, "data.PSI_HOLDER_CALLERS"), "replica,encoder");
    let policy = doc("NetworkPolicy", "psi-keyholder");
    let from: Vec<String> = get(policy, "spec.ingress.0.from")
        .as_sequence()
        .unwrap()
        .iter()
        .map(|f| {
            f["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(from, ["psi-server", "psi-encode"]);
    assert_eq!(
        text(doc("Service", "psi-keyholder"), "spec.clusterIP"),
        "None"
    );
    // The pods named there carry those labels.
    let jobs = std::fs::read_to_string(deploy().join("k8s/encode-job.yaml")).unwrap();
    for doc in serde_yaml_ng::Deserializer::from_str(&jobs) {
        let job = Value::deserialize(doc).unwrap();
        assert_eq!(
            job["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"].as_str(),
            Some("psi-encode")
        );
    }
    let servers = std::fs::read_to_string(deploy().join("k8s/psi-server.yaml")).unwrap();
    assert!(servers.contains("labels: {app.kubernetes.io/name: psi-server}"));
}
