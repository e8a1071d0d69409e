"""A real psi-server for the tests: a registry of synthetic people (the
public specimen ID numbers), served with mutual TLS on loopback, and an
institution's certificate from the operator's CA."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

import psi_match

ROOT = Path(__file__).resolve().parents[2]

FIXTURES = ROOT / "crates" / "testbed" / "fixtures"


def _rows(name: str) -> list:
    """A fixture file's tab-separated rows (the Rust suites read the same files)."""
    lines = (FIXTURES / name).read_text(encoding="utf-8").split("\n")
    return [tuple(line.split("\t")) for line in lines if line and not line.startswith("#")]


#: The registry: (name, ID number).
REGISTRY = _rows("registered.tsv")

#: (what, name, id, expected result): the end-to-end rows of the Rust tests.
QUERIES = _rows("queries.tsv")
assert REGISTRY and all(len(r) == 2 for r in REGISTRY)
assert QUERIES and all(len(q) == 4 for q in QUERIES)

PURPOSE = "kyc-onboarding"


def binary(name: str) -> Path:
    """A workspace binary (PSI_BIN_DIR, else target/debug), built if missing."""
    bin_dir = Path(os.environ.get("PSI_BIN_DIR", ROOT / "target" / "debug"))
    path = bin_dir / name
    if not path.exists():
        subprocess.run(
            ["cargo", "build", "-p", "psi-server", "-p", "psi-client"], cwd=ROOT, check=True
        )
    assert path.exists(), f"{path} is missing: build it with cargo build -p {name}"
    return path


def run(*args, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{args}: {done.stdout}{done.stderr}"
    return done


class Server:
    """`psi-server serve` with TLS; stopped at the end of the session."""

    def __init__(self, root: Path, serve_args=()):
        self.root = root
        server = binary("psi-server")
        registry = root / "registry.csv"
        registry.write_text(
            "name,id\n" + "".join(f"{n},{i}\n" for n, i in REGISTRY), encoding="utf-8"
        )
        self.data = root / "data"
        run(server, "init", "--no-progress", "--registry", registry, "--data-dir", self.data)
        self.ca = root / "ca"
        run(server, "ca", "init", "--dir", self.ca)
        run(server, "ca", "issue", "--dir", self.ca, "--institution", "bank-001")
        self.tls = psi_match.Tls(
            ca=self.ca / "ca.pem", cert=self.ca / "bank-001.pem", key=self.ca / "bank-001.key"
        )
        self.log = open(root / "server.log", "w")
        self.process = subprocess.Popen(
            [
                str(server), "serve", "--listen", "127.0.0.1:0", "--data-dir", str(self.data),
                "--tls-cert", str(self.ca / "server.pem"), "--tls-key", str(self.ca / "server.key"),
                "--client-ca", str(self.ca / "ca.pem"), *serve_args,
            ],
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        line = self.process.stdout.readline()
        assert line, f"psi-server did not start: {(root / 'server.log').read_text()}"
        self.url = "https://" + line.split()[-1]
        self.wait_until_serving()

    def wait_until_serving(self):
        deadline = time.monotonic() + 30
        while True:
            try:
                self.client(cache_dir=self.root / "ready-cache")
                return
            except psi_match.PsiError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def client(self, **settings) -> psi_match.Client:
        settings.setdefault("cache_dir", self.root / "cache")
        return psi_match.Client(server=self.url, purpose=PURPOSE, tls=self.tls, **settings)

    def audit(self) -> list:
        import json

        out = run(
            binary("psi-server"), "audit", "export", "--format", "json",
            "--db", self.data / "audit.sqlite",
        ).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("psi")
    s = Server(root)
    yield s
    s.stop()


@pytest.fixture(scope="session")
def ypir_server(tmp_path_factory):
    """The same registry served with PIR mode's YPIR+SP scheme."""
    root = tmp_path_factory.mktemp("psi-ypir")
    s = Server(root, serve_args=("--pir-scheme", "ypir"))
    yield s
    s.stop()


@pytest.fixture
def client(server, tmp_path):
    # Each test its own cache: sync mode starts from nothing.
    return server.client(cache_dir=tmp_path / "cache")


@pytest.fixture(autouse=True)
def no_psi_environment(monkeypatch, tmp_path):
    """The caller's PSI_* variables and config file never leak into a test."""
    for name in list(os.environ):
        if name.startswith("PSI_") and name != "PSI_BIN_DIR":
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-config"))


def cli_batch(server: Server, rows, tmp_path: Path, mode: str) -> list:
    """The same rows through `psi-client batch`: its (result, error) per row."""
    import csv

    source = tmp_path / f"cli-{mode}.csv"
    with open(source, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["name", "id"])
        w.writerows(rows)
    out = tmp_path / f"cli-{mode}-out.csv"
    run(
        binary("psi-client"), "batch", "--no-progress", "--mode", mode,
        "--input", source, "--output", out,
        "--server", server.url, "--purpose", PURPOSE,
        "--tls-ca", server.tls.ca, "--tls-cert", server.tls.cert, "--tls-key", server.tls.key,
        "--cache-dir", tmp_path / "cli-cache",
    )
    with open(out, newline="", encoding="utf-8") as f:
        return [(r["result"], r["error"] or None) for r in csv.DictReader(f)]

