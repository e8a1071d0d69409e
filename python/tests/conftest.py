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

#: The registry: (name, ID number).
REGISTRY = [
    ("张伟", "11010519491231002X"),
    ("李秀英", "440524188001010014"),
    ("阿依古丽·买买提", "360426199101010071"),
    ("欧阳娜娜", "440308199901101512"),
    ("王𠮷", "810000199408230021"),
    ("赵敏", "610104196209276908"),
]

#: (what, name, id, expected result): the end-to-end rows of the Rust tests.
QUERIES = [
    ("exact", "张伟", "11010519491231002X", "match"),
    ("lower-case x", "张伟", "11010519491231002x", "match"),
    ("full-width digits", "李秀英", "４４０５２４１８８００１０１００１４", "match"),
    ("spaces everywhere", " 李 秀\u3000英 ", " 440524 18800101 0014 ", "match"),
    ("katakana middle dot", "阿依古丽・买买提", "360426199101010071", "match"),
    ("ascii dot", "阿依古丽.买买提", "360426199101010071", "match"),
    ("outside the BMP", "王𠮷", "810000199408230021", "match"),
    ("legacy 15 digits", "赵敏", "610104620927690", "match"),
    ("same ID, other name", "张伟伟", "11010519491231002X", "no_match"),
    ("traditional variant is another name", "歐陽娜娜", "440308199901101512", "no_match"),
    ("unregistered", "钱多多", "830000199201300022", "no_match"),
    ("bad check character", "张伟", "110105194912310021", "invalid"),
    ("latin name", "Zhang Wei", "11010519491231002X", "invalid"),
    ("no such date", "张伟", "110105199902300027", "invalid"),
    ("empty id", "张伟", "", "invalid"),
]

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

    def __init__(self, root: Path):
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
                "--client-ca", str(self.ca / "ca.pem"),
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

