"""psi_match.Client against a real psi-server with mutual TLS."""

import subprocess

import pytest

import psi_match
from conftest import PURPOSE, QUERIES, cli_batch

PAIRS = [(name, id_) for _, name, id_, _ in QUERIES]
EXPECTED = [expected for *_, expected in QUERIES]


@pytest.mark.parametrize("mode", ["bucket", "sync", "pir"])
def test_check_answers_every_row_right(client, mode):
    for what, name, id_, expected in QUERIES:
        answer = client.check(name, id_, mode=mode)
        assert answer.result == expected, what
        assert answer.matched == (expected == "match")
        assert (answer.error is not None) == (expected == "invalid"), what


def test_pir_checks_through_ypir_sp_answer_every_row_right(ypir_server, tmp_path):
    # A server whose PIR mode is YPIR+SP: the package speaks it unchanged.
    client = ypir_server.client(cache_dir=tmp_path / "cache")
    for what, name, id_, expected in QUERIES:
        assert client.check(name, id_, mode="pir").result == expected, what
    rows = PAIRS * 2
    assert [a.result for a in client.batch(rows, mode="pir")] == EXPECTED * 2


@pytest.mark.parametrize("mode", ["bucket", "sync"])
def test_batch_gives_the_clis_answers(server, client, tmp_path, mode):
    # Enough rows for several requests, in order.
    rows = PAIRS * 40
    answers = client.batch(rows, mode=mode, chunk_rows=100)
    assert [a.result for a in answers] == EXPECTED * 40
    assert [(a.result, a.error) for a in answers] == cli_batch(server, rows, tmp_path, mode)
    assert client.last_summary.startswith(f"{len(rows)} rows: ")


def test_batch_of_nothing_is_nothing(client):
    assert client.batch([]) == []


def test_an_invalid_pair_says_why(client):
    answer = client.check("张伟", "110105194912310021")
    assert answer.result == "invalid" and not answer.valid
    assert "check" in answer.error


def test_an_answer_is_not_a_truth_value(client):
    answer = client.check("钱多多", "830000199201300022")
    with pytest.raises(TypeError, match="matched"):
        bool(answer)


def test_dataframe_in_dataframe_out(client):
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame(
        {
            "客户编号": [f"c{i}" for i in range(len(QUERIES))],
            "姓名": [name for _, name, _, _ in QUERIES],
            "身份证号": [id_ for _, _, id_, _ in QUERIES],
        }
    )
    out = client.batch(frame)
    assert list(out.columns) == ["客户编号", "姓名", "身份证号", "result", "error"]
    assert out["result"].tolist() == EXPECTED
    assert out["客户编号"].tolist() == frame["客户编号"].tolist()
    assert "result" not in frame.columns, "the caller's frame is left as it was"
    assert (out["error"] != "").tolist() == [e == "invalid" for e in EXPECTED]


def test_dataframe_ids_read_as_numbers(client):
    pd = pytest.importorskip("pandas")
    # What pandas gives for an ID column typed as numbers: exact int64 for
    # digits-only IDs, float64 (digits lost) once a cell is missing.
    ints = pd.DataFrame({"name": ["李秀英", "欧阳娜娜"], "id": [440524188001010014, 440308199901101512]})
    assert ints["id"].dtype == "int64"
    assert client.batch(ints)["result"].tolist() == ["match", "match"]

    floats = pd.DataFrame({"name": ["李秀英", "欧阳娜娜", "张伟"], "id": [440524188001010014, None, None]})
    floats.loc[2, "id"] = float("nan")
    assert floats["id"].dtype == "float64"
    out = client.batch(floats)
    assert out["result"].tolist() == ["invalid", "invalid", "invalid"]
    assert "floating-point number" in out["error"][0] and "dtype=str" in out["error"][0]


def test_dataframe_columns_named_or_refused(client):
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"客户": ["张伟"], "证件号": ["11010519491231002X"]})
    with pytest.raises(ValueError, match="name_column"):
        client.batch(frame)
    out = client.batch(frame, name_column="客户", id_column="证件号")
    assert out["result"].tolist() == ["match"]
    with pytest.raises(ValueError, match="already has a 'result' column"):
        client.batch(out, name_column="客户", id_column="证件号")


def test_rows_that_are_not_pairs(client):
    with pytest.raises(TypeError, match="row 1 is not a"):
        client.batch([("张伟", "11010519491231002X"), "张伟"])
    # A cell that is not text is that row's answer, not the batch's end.
    answers = client.batch([("张伟", "11010519491231002X"), (["张伟"], "11010519491231002X")])
    assert [a.result for a in answers] == ["match", "invalid"]
    assert "must be text" in answers[1].error


def test_requests_are_audited_with_the_institution_and_purpose(server, tmp_path):
    client = server.client(cache_dir=tmp_path / "cache")
    before = len(server.audit())
    client.check("张伟", "11010519491231002X", mode="bucket")
    records = server.audit()[before:]
    assert records, "one record per request"
    assert {r["institution"] for r in records} == {"bank-001"}
    assert {r["purpose"] for r in records} == {PURPOSE}
    text = repr(records)
    assert "张伟" not in text and "11010519491231002X" not in text


def test_settings_from_the_environment_and_the_config_file(server, tmp_path, monkeypatch):
    config = tmp_path / "client.toml"
    config.write_text(
        f'server = "{server.url}"\n'
        f'tls_ca = "{server.tls.ca}"\ntls_cert = "{server.tls.cert}"\ntls_key = "{server.tls.key}"\n'
        'purpose = "aml-recheck"\n',
        encoding="utf-8",
    )
    monkeypatch.setenv("PSI_PURPOSE", PURPOSE)
    client = psi_match.Client(config=config, cache_dir=tmp_path / "cache")
    assert client.check("张伟", "11010519491231002X").matched
    settings = client.settings
    assert f"purpose       {PURPOSE} (flag or environment)" in settings, settings
    assert f"server        {server.url} (config file)" in settings, settings
    assert "BEGIN" not in settings, "no key material"
    # An argument beats both.
    client = psi_match.Client(config=config, purpose="audit-sample", cache_dir=tmp_path / "cache")
    assert "purpose       audit-sample (flag or environment)" in client.settings


def test_server_info_and_trust_on_first_use(server, tmp_path):
    first = server.client(cache_dir=tmp_path / "cache")
    assert first.trusted_on_first_use
    info = first.info
    assert info["registry_size"] == 6 and len(info["public_key"]) == 64
    assert info["modes"] == ["sync", "bucket", "pir"]
    again = server.client(cache_dir=tmp_path / "cache")
    assert not again.trusted_on_first_use
    pinned = server.client(cache_dir=tmp_path / "other", pin_key=info["public_key"])
    assert not pinned.trusted_on_first_use
    with pytest.raises(psi_match.PsiError):
        server.client(cache_dir=tmp_path / "third", pin_key="00" * 32)


def test_evaluate_and_sync_for_research(client):
    encoded = [psi_match.encode_record(n, i) for n, i in [("张伟", "11010519491231002X"), ("钱多多", "830000199201300022")]]
    outputs = client.evaluate(encoded)
    assert [len(o) for o in outputs] == [64, 64]
    tags = client.sync()
    assert len(tags) == 6
    assert [psi_match.tag(o) in tags for o in outputs] == [True, False]


def test_bad_settings_are_value_errors(server, tmp_path):
    with pytest.raises(ValueError, match="purpose"):
        psi_match.Client(server=server.url, tls=server.tls, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="three"):
        psi_match.Client(server=server.url, purpose=PURPOSE, tls=(server.tls.ca,))
    with pytest.raises(ValueError, match="missing key"):
        psi_match.Client(server=server.url, purpose=PURPOSE, tls={"ca": server.tls.ca, "cert": server.tls.cert})
    with pytest.raises(ValueError, match="mode"):
        psi_match.Client(server=server.url, purpose=PURPOSE, tls=server.tls, mode="psi")
    with pytest.raises(ValueError, match="reading"):
        psi_match.Client(server=server.url, purpose=PURPOSE, tls=(tmp_path / "no.pem",) * 3)


def test_failures_are_psi_errors_never_answers(server, tmp_path):
    # Without a certificate the operator's server does not serve us.
    with pytest.raises(psi_match.PsiError):
        psi_match.Client(server=server.url, purpose=PURPOSE, cache_dir=tmp_path)
    # Nothing listens there.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(psi_match.PsiError):
        psi_match.Client(server=f"http://127.0.0.1:{port}", purpose=PURPOSE, cache_dir=tmp_path)


def test_a_query_log_records_every_check_for_the_regulator(server, tmp_path):
    import datetime
    import json
    import sqlite3
    import stat
    import time

    from conftest import binary, run

    def stamp(t: float) -> str:
        return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime(
            "%Y-%m-%dT%H:%M:%S.%fZ"
        )

    # This test's requests alone in the window: the others' carry no commitment.
    time.sleep(1.1)
    since = time.time()
    log = tmp_path / "query-log.sqlite"
    client = server.client(cache_dir=tmp_path / "cache", query_log=log, staff="desk-3")
    for mode in ("bucket", "pir"):
        for what, name, id_, expected in QUERIES:
            assert client.check(name, id_, mode=mode).result == expected, what
    rows = PAIRS * 3 + [("张伟", 1.1010519491231002e17)]
    answers = client.batch(rows, mode="sync", chunk_rows=10)
    assert [a.result for a in answers] == EXPECTED * 3 + ["invalid"]
    until = time.time() + 1
    time.sleep(1.1)

    assert psi_match.verify_log(log) == 2 * len(QUERIES) + len(rows)
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    db = sqlite3.connect(log)
    callers = set(db.execute("SELECT DISTINCT staff || '/' || caller FROM querylog"))
    assert callers == {("desk-3/psi_match",)}
    db.close()

    # The regulator's check: every request in the window opened, nothing added.
    openings = tmp_path / "openings.json"
    run(
        binary("psi-client"), "log", "open", "--log", log,
        "--since", stamp(since), "--until", stamp(until), "--out", openings,
    )
    done = run(
        binary("psi-server"), "audit", "check-openings",
        "--db", server.data / "audit.sqlite", "--institution", "bank-001",
        "--openings", openings,
    )
    assert "nothing missing, added or changed" in done.stdout
    opened = json.loads(openings.read_text(encoding="utf-8"))
    opened["groups"][0]["records"][0]["name"] += "x"
    openings.write_text(json.dumps(opened), encoding="utf-8")
    failed = subprocess.run(
        [
            str(binary("psi-server")), "audit", "check-openings",
            "--db", str(server.data / "audit.sqlite"), "--institution", "bank-001",
            "--openings", str(openings),
        ],
        capture_output=True,
        text=True,
    )
    assert failed.returncode != 0 and "do not make its commitment" in failed.stderr
