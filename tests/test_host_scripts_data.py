"""The data tier's host scripts, each driven like the host runs it (paths redirected to a
temp dir): hpc-memory-tune, hpc-data-secrets, hpc-redis-init, hpc-clustercheck,
hpc-galera-recover and hpc-mariadb-backup (against moto's S3)."""

from __future__ import annotations

import datetime as dt
import gzip
import http.client
import json
import os
import re
import stat
import threading
import time
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws

from cloud_init.templating import render_template
from offline.contexts import contexts
from tests.conftest import not_installed, tool
from tests.loadfile import load_script

SCRIPTS = Path(__file__).resolve().parent.parent / "cloud_init" / "scripts"


def data_ctx(stack: str = "prod", name: str = "data-1") -> dict[str, Any]:
    return contexts(stack)[name]


# --------------------------------------------------------------------------------------
# hpc-memory-tune
# --------------------------------------------------------------------------------------

mem = load_script("hpc-memory-tune")


def _tune(tmp: Path, *extra: str) -> int:
    return mem.main(
        [
            "--override",
            str(tmp / "override.json"),
            "--meminfo",
            str(tmp / "meminfo"),
            "--mysql-out",
            str(tmp / "70-hpc-memory.cnf"),
            "--redis-out",
            str(tmp / "hpc-memory.conf"),
            *extra,
        ]
    )


@pytest.mark.parametrize(
    ("total", "pool", "maxmem"),
    [(2048, "1024M", "400mb"), (16384, "8192M", "3264mb"), (8192, "4096M", "1632mb"), (256, "128M", "64mb")],
)
def test_memory_tune_sizes_from_the_override(tmp_path: Path, total: int, pool: str, maxmem: str) -> None:
    (tmp_path / "override.json").write_text(json.dumps({"total_mib": total}))
    assert _tune(tmp_path) == 0
    cnf = (tmp_path / "70-hpc-memory.cnf").read_text()
    assert f"[mysqld]\ninnodb_buffer_pool_size = {pool}\n" in cnf
    assert f"\nmaxmemory {maxmem}\n" in (tmp_path / "hpc-memory.conf").read_text()


def test_memory_tune_second_run_changes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "override.json").write_text(json.dumps({"total_mib": 2048}))
    assert _tune(tmp_path) == 0
    stats = {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in tmp_path.glob("*.c*nf")}
    assert len(stats) == 2
    capsys.readouterr()
    assert _tune(tmp_path) == 0
    assert capsys.readouterr().out.count("unchanged") == 2
    assert {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in stats} == stats
    # a resized host rewrites both
    (tmp_path / "override.json").write_text(json.dumps({"total_mib": 4096}))
    assert _tune(tmp_path) == 0
    assert "innodb_buffer_pool_size = 2048M" in (tmp_path / "70-hpc-memory.cnf").read_text()


def test_memory_tune_reads_meminfo_without_override_and_rejects_bad_input(tmp_path: Path) -> None:
    (tmp_path / "meminfo").write_text("MemTotal:       16303836 kB\nMemFree:         1000 kB\n")
    assert _tune(tmp_path) == 0  # 15921 MiB -> 7936M (a multiple of 128) and 3184mb
    assert "innodb_buffer_pool_size = 7936M" in (tmp_path / "70-hpc-memory.cnf").read_text()
    assert "maxmemory 3184mb" in (tmp_path / "hpc-memory.conf").read_text()
    for bad in ({"total_mib": "2048"}, {"total_mib": 0}, {"total": 2048}, [2048]):
        (tmp_path / "override.json").write_text(json.dumps(bad))
        assert _tune(tmp_path) == 1


# --------------------------------------------------------------------------------------
# hpc-data-secrets
# --------------------------------------------------------------------------------------

sec = load_script("hpc-data-secrets")
NASTY = 'p#a;s s"q\\b$x`'


def _secrets(tmp: Path, value: str = NASTY, skip: str = "") -> Path:
    d = tmp / "secrets"
    d.mkdir(exist_ok=True)
    for n in ("redis_password", "galera_sst_password", "clustercheck_password"):
        if n != skip:
            (d / n).write_text(value + "\n")
    return d


def _write_secrets(tmp: Path) -> int:
    return sec.main(
        [
            "--secrets-dir",
            str(tmp / "secrets"),
            "--redis-out",
            str(tmp / "hpc-secrets.conf"),
            "--sst-out",
            str(tmp / "99-hpc-sst-auth.cnf"),
            "--monitor-out",
            str(tmp / "hpc-monitor.cnf"),
            "--redis-env-out",
            str(tmp / "redis-exporter.env"),
        ]
    )


GROUP_PACKAGES = {"redis": "redis-server", "mysql": "mariadb-server", "prometheus": "prometheus", "root": "base-passwd"}


def test_data_secrets_files_have_owners_modes_and_round_trip_quoting(tmp_path: Path) -> None:
    import subprocess

    _secrets(tmp_path)
    assert _write_secrets(tmp_path) == 0
    expect = {
        "hpc-secrets.conf": (0o640, "redis"),
        "99-hpc-sst-auth.cnf": (0o640, "mysql"),
        "hpc-monitor.cnf": (0o640, "prometheus"),
        "redis-exporter.env": (0o600, "root"),
    }
    import grp

    for name, (mode, group) in expect.items():
        st = (tmp_path / name).stat()
        assert stat.S_IMODE(st.st_mode) == mode, name
        if os.geteuid() == 0:
            try:
                assert st.st_gid == grp.getgrnam(group).gr_gid, name
            except KeyError:
                not_installed(f"group {group}", GROUP_PACKAGES[group])
                assert st.st_gid == 0  # group not on this machine: root
    # MariaDB reads back exactly the secret (quotes, #, ;, spaces, backslash survive)
    if tool("my_print_defaults", "mariadb-client-core"):
        out = subprocess.run(
            ["my_print_defaults", f"--defaults-file={tmp_path / '99-hpc-sst-auth.cnf'}", "galera"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert out.strip() == f"--wsrep_sst_auth=sst:{NASTY}"
        out = subprocess.run(
            ["my_print_defaults", f"--defaults-file={tmp_path / 'hpc-monitor.cnf'}", "client"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert f"--password={NASTY}" in out.splitlines() and "--user=hpc_monitor" in out.splitlines()
    # systemd's EnvironmentFile= syntax: double quotes with \\, \", \$ and \` escaped
    env_line = (tmp_path / "redis-exporter.env").read_text().splitlines()[-1]
    assert env_line == 'REDIS_PASSWORD="p#a;s s\\"q\\\\b\\$x\\`"'


def test_data_secrets_idempotent_and_missing_secret_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _secrets(tmp_path, value="Plain-Pw-1")
    assert _write_secrets(tmp_path) == 0
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir() if p.is_file()}
    capsys.readouterr()
    assert _write_secrets(tmp_path) == 0
    assert capsys.readouterr().out.count("unchanged") == 4
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir() if p.is_file()} == before
    other = tmp_path / "other"
    other.mkdir()
    _secrets(other, skip="galera_sst_password")
    assert _write_secrets(other) == 1
    assert not (other / "hpc-secrets.conf").exists()  # nothing half-written


# --------------------------------------------------------------------------------------
# hpc-redis-init
# --------------------------------------------------------------------------------------

rinit = load_script("hpc-redis-init")
PACKAGE_SENTINEL = "port 26379\ndaemonize yes\nsentinel monitor mymaster 127.0.0.1 6379 2\n"


def _redis_init(tmp: Path) -> int:
    return rinit.main(
        [
            "--template",
            str(tmp / "sentinel.conf.tmpl"),
            "--sentinel-conf",
            str(tmp / "sentinel.conf"),
            "--redis-conf",
            str(tmp / "redis.conf"),
            "--secrets-dir",
            str(tmp / "secrets"),
        ]
    )


def test_sentinel_conf_written_once_over_the_package_default(tmp_path: Path) -> None:
    ctx = data_ctx("prod", "data-2")
    (tmp_path / "sentinel.conf.tmpl").write_text(render_template("data/sentinel.conf.tmpl", ctx))
    (tmp_path / "redis.conf").write_text(f"port 6379\ndir {tmp_path / 'redis-data'}\n")
    _secrets(tmp_path, value="Sentinel-Pw-1")
    (tmp_path / "sentinel.conf").write_text(PACKAGE_SENTINEL)  # what redis-sentinel installs
    assert _redis_init(tmp_path) == 0
    text = (tmp_path / "sentinel.conf").read_text()
    assert text.startswith(render_template("data/sentinel.conf.tmpl", ctx))
    assert text.endswith('sentinel auth-pass mymaster "Sentinel-Pw-1"\nrequirepass "Sentinel-Pw-1"\n')
    assert stat.S_IMODE((tmp_path / "sentinel.conf").stat().st_mode) == 0o640
    assert (tmp_path / "redis-data").is_dir()
    # Sentinel rewrote it (new master after a failover, its id): the next run leaves it.
    rewritten = text.replace(ctx["redis"]["initial_master"]["ip"], "10.40.8.30") + "sentinel myid abc\n"
    (tmp_path / "sentinel.conf").write_text(rewritten)
    assert _redis_init(tmp_path) == 0
    assert (tmp_path / "sentinel.conf").read_text() == rewritten
    # negative twin: without our header (the package default again) it is replaced
    (tmp_path / "sentinel.conf").write_text(PACKAGE_SENTINEL)
    assert _redis_init(tmp_path) == 0
    assert (tmp_path / "sentinel.conf").read_text() == text


def test_sentinel_init_fails_without_the_secret(tmp_path: Path) -> None:
    (tmp_path / "sentinel.conf.tmpl").write_text(render_template("data/sentinel.conf.tmpl", data_ctx()))
    (tmp_path / "secrets").mkdir()
    assert _redis_init(tmp_path) == 1
    assert not (tmp_path / "sentinel.conf").exists()


# --------------------------------------------------------------------------------------
# hpc-clustercheck
# --------------------------------------------------------------------------------------

cc = load_script("hpc-clustercheck")


def _st(state: str, ready: str = "ON", cluster: str = "Primary") -> dict[str, str]:
    return {"wsrep_local_state": state, "wsrep_ready": ready, "wsrep_cluster_status": cluster}


@pytest.mark.parametrize(
    ("status", "donor_ok", "code"),
    [
        (_st("4"), False, 200),
        (_st("2"), False, 503),  # donor, available_when_donor=0
        (_st("2"), True, 200),  # donor, available_when_donor=1
        (_st("1"), False, 503),  # joining
        (_st("3"), False, 503),  # joined, not yet synced
        (_st("4", ready="OFF"), False, 503),
        (_st("4", cluster="non-Primary"), False, 503),  # a partitioned minority
        (None, False, 503),  # server does not answer
        ({}, False, 503),
    ],
)
def test_clustercheck_verdicts(status: dict[str, str] | None, donor_ok: bool, code: int) -> None:
    assert cc.evaluate(status, donor_ok)[0] == code


def test_clustercheck_serves_http_from_a_fake_status_source() -> None:
    state: dict[str, dict[str, str] | None] = {"value": _st("4")}
    calls = {"n": 0}

    def source() -> dict[str, str] | None:
        calls["n"] += 1
        return state["value"]

    checker = cc.Checker(source, available_when_donor=False, cache=0)
    srv = cc.make_server("127.0.0.1", 0, checker)
    port = srv.server_address[1]
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()

    def ask(method: str = "GET", path: str = "/") -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request(method, path)
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        return resp.status, body

    try:
        assert ask() == (200, b"Galera node is synced.\r\n")
        assert ask("OPTIONS", "/anything")[0] == 200
        assert ask("HEAD") == (200, b"")
        state["value"] = _st("2")
        assert ask()[0] == 503
        state["value"] = None
        status, body = ask()
        assert status == 503 and b"not reachable" in body
        assert calls["n"] == 5
    finally:
        srv.shutdown()
        srv.server_close()


def test_clustercheck_is_silent_about_a_check_that_resets_before_its_answer(capfd: pytest.CaptureFixture[str]) -> None:
    """HAProxy's checks close with a reset once they have the status line; a client gone
    before the answer is counted, not logged as a traceback."""
    import socket
    import struct

    def source() -> dict[str, str] | None:
        time.sleep(0.3)  # the client resets meanwhile
        return _st("4")

    srv = cc.make_server("127.0.0.1", 0, cc.Checker(source, available_when_donor=False, cache=0))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        host, port = str(srv.server_address[0]), int(srv.server_address[1])
        s = socket.create_connection((host, port), timeout=5)
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()  # a reset, as HAProxy's check closes
        deadline = time.time() + 10
        while srv.clients_gone == 0 and time.time() < deadline:
            time.sleep(0.05)
        assert srv.clients_gone == 1
        conn = http.client.HTTPConnection(host, port, timeout=5)
        conn.request("GET", "/")
        assert conn.getresponse().status == 200  # and it goes on serving
        conn.close()
    finally:
        srv.shutdown()
        srv.server_close()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception occurred" not in err, err


def test_clustercheck_caches_the_status_between_checks() -> None:
    calls = {"n": 0}

    def source() -> dict[str, str]:
        calls["n"] += 1
        return _st("4")

    checker = cc.Checker(source, cache=60)
    for _ in range(5):
        assert checker.verdict()[0] == 200
    assert calls["n"] == 1


def test_clustercheck_answers_at_once_from_its_thread_and_a_stale_verdict_is_503() -> None:
    """Served (start()): a check never waits for the query; a query that takes longer
    than max_age (the server hangs) turns the verdict into a 503."""
    gate = threading.Event()
    gate.set()
    calls = {"n": 0}

    def source() -> dict[str, str]:
        calls["n"] += 1
        gate.wait()  # cleared: the query hangs, as on a hung mariadbd
        return _st("4")

    checker = cc.Checker(source, cache=0.05, max_age=0.5)
    stop = threading.Event()
    try:
        checker.start(stop)
        deadline = time.monotonic() + 5
        while checker.verdict()[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert checker.verdict()[0] == 200
        gate.clear()
        t0 = time.monotonic()
        assert checker.verdict()[0] == 200 and time.monotonic() - t0 < 0.1, "answered at once, not after the query"
        time.sleep(0.8)
        code, message = checker.verdict()
        assert code == 503 and "old" in message, message
        gate.set()
        deadline = time.monotonic() + 5
        while checker.verdict()[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert checker.verdict()[0] == 200 and calls["n"] >= 2
    finally:
        stop.set()
        gate.set()


def test_clustercheck_dbwriter_check_timeout_fits_an_answer_at_once() -> None:
    """The service runs the thread (main() starts it before serving): the DB writer's
    1 s check time-out relies on it."""
    text = (Path(__file__).resolve().parents[1] / "cloud_init" / "scripts" / "hpc-clustercheck").read_text()
    main_body = text[text.index("def main("):]
    assert main_body.index("checker.start(") < main_body.index("make_server(")


def test_clustercheck_mariadb_source_parses_the_client_output(tmp_path: Path) -> None:
    fake = tmp_path / "mariadb"
    fake.write_text("#!/bin/sh\nprintf 'wsrep_cluster_status\\tPrimary\\nwsrep_local_state\\t4\\nwsrep_ready\\tON\\n'\n")
    fake.chmod(0o755)
    assert cc.evaluate(cc.mariadb_source(str(tmp_path / "x.cnf"), str(fake))())[0] == 200
    failing = tmp_path / "failing"
    failing.write_text("#!/bin/sh\necho 'ERROR 2002' >&2\nexit 1\n")
    failing.chmod(0o755)
    assert cc.mariadb_source(str(tmp_path / "x.cnf"), str(failing))() is None


# --------------------------------------------------------------------------------------
# hpc-galera-recover
# --------------------------------------------------------------------------------------

rec = load_script("hpc-galera-recover")
UUID = "cad776eb-e96d-11f1-b18c-e32a0d92434b"


def _grastate(d: Path, seqno: int, safe: int, uuid: str = UUID) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "grastate.dat").write_text(
        f"# GALERA saved state\nversion: 2.1\nuuid:    {uuid}\nseqno:   {seqno}\nsafe_to_bootstrap: {safe}\n"
    )
    return d


def _report(tmp: Path, host: str, datadir: Path, recover_cmd: str = "false") -> dict[str, Any]:
    cfg = tmp / f"{host}.json"
    cfg.write_text(json.dumps({"host": host, "datadir": str(datadir)}))
    out = tmp / f"{host}.out"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert rec.main(["--config", str(cfg), "--recover-cmd", recover_cmd, "report"]) == 0
    out.write_text(buf.getvalue())
    return json.loads(buf.getvalue())


def test_recover_reports_grastate_and_picks_safe_to_bootstrap(tmp_path: Path) -> None:
    r1 = _report(tmp_path, "data-1", _grastate(tmp_path / "d1", 41, 0))
    r2 = _report(tmp_path, "data-2", _grastate(tmp_path / "d2", 42, 1))
    r3 = _report(tmp_path, "data-3", _grastate(tmp_path / "d3", 40, 0))
    assert r2 == {"host": "data-2", "uuid": UUID, "seqno": 42, "safe_to_bootstrap": 1, "source": "grastate.dat"}
    assert rec.choose([r1, r2, r3])["host"] == "data-2"
    # nobody safe (all crashed at once): the highest seqno wins, ties go to the bootstrap host
    r2["safe_to_bootstrap"] = 0
    assert rec.choose([r1, r2, r3])["host"] == "data-2"
    r1["seqno"] = 42
    assert rec.choose([r1, r2, r3], preferred="data-1")["host"] == "data-1"


def test_recover_runs_wsrep_recover_when_seqno_is_unknown(tmp_path: Path) -> None:
    d = _grastate(tmp_path / "d1", -1, 0)
    fake = tmp_path / "fake-mariadbd"
    fake.write_text(
        "#!/bin/sh\n"
        f'[ "$1" = "{d}" ] || exit 3\n'
        f"echo '2026-01-01  0:00:00 0 [Note] WSREP: Recovered position: {UUID}:1234' >&2\n"
    )
    fake.chmod(0o755)
    r = _report(tmp_path, "data-1", d, recover_cmd=f"{fake} {{datadir}}")
    assert r["seqno"] == 1234 and r["source"] == "wsrep-recover" and r["uuid"] == UUID
    # a recover run that prints no position is an error, not a guess
    cfg = tmp_path / "data-1.json"
    assert rec.main(["--config", str(cfg), "--recover-cmd", "true", "report"]) == 1


def test_recover_refuses_two_histories_and_marks_safe(tmp_path: Path) -> None:
    a = {"host": "data-1", "uuid": UUID, "seqno": 5, "safe_to_bootstrap": 0}
    b = {"host": "data-2", "uuid": "11111111-e96d-11f1-b18c-e32a0d92434b", "seqno": 9, "safe_to_bootstrap": 0}
    with pytest.raises(ValueError, match="different cluster histories"):
        rec.choose([a, b])
    d = _grastate(tmp_path / "d", 7, 0)
    assert rec.mark_safe(str(d)) is True
    assert "safe_to_bootstrap: 1\n" in (d / "grastate.dat").read_text()
    assert rec.mark_safe(str(d)) is False  # second run: nothing to change


def test_mark_safe_refuses_while_mariadbd_runs_here_or_a_peer_answers(tmp_path: Path) -> None:
    """A node that re-formed a primary component by itself must not get a second,
    bootstrapped cluster beside it."""
    import socket as pysocket

    d = _grastate(tmp_path / "d", 7, 0)
    listener = pysocket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]
    cfg = {"host": "data-1", "galera_port": port, "datadir": str(d),
           "nodes": [{"name": "data-1", "ip": "127.0.0.1"}, {"name": "data-2", "ip": "127.0.0.1"},
                     {"name": "data-3", "ip": "127.0.0.9"}]}
    cfg_path = tmp_path / "galera.json"
    cfg_path.write_text(json.dumps(cfg))
    try:
        assert rec.peers_answering(cfg) == [f"data-2 (127.0.0.1:{port})"]
        assert rec.main(["--config", str(cfg_path), "mark-safe"]) == 1
        assert "safe_to_bootstrap: 0" in (d / "grastate.dat").read_text(), "must not have changed"
        assert rec.main(["--config", str(cfg_path), "mark-safe", "--force"]) == 0
        assert "safe_to_bootstrap: 1" in (d / "grastate.dat").read_text()
    finally:
        listener.close()
    assert rec.peers_answering(cfg) == []
    # A local mariadbd, found by its process name.
    proc = tmp_path / "proc"
    for pid, comm in ((12, "bash"), (345, "mariadbd"), (7, "mysqld-exporter")):
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "comm").write_text(comm + "\n")
    (proc / "self").mkdir()
    assert rec.mariadbd_pids(str(proc)) == [345]
    assert rec.bootstrap_blockers(cfg, str(proc)) == ["mariadbd runs on this node (pid 345): stop it first"]


def test_recover_choose_cli_names_missing_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = json.loads(render_template("data/galera.json", data_ctx()))
    (tmp_path / "galera.json").write_text(json.dumps(cfg))
    files = []
    for host, seqno, safe in (("data-1", 10, 0), ("data-2", 12, 0)):
        p = tmp_path / f"{host}.report"
        p.write_text(json.dumps({"host": host, "uuid": UUID, "seqno": seqno, "safe_to_bootstrap": safe}))
        files.append(str(p))
    assert rec.main(["--config", str(tmp_path / "galera.json"), "choose", *files]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"bootstrap": "data-2", "seqno": 12, "uuid": UUID, "missing_reports": ["data-3"]}


# --------------------------------------------------------------------------------------
# hpc-mariadb-backup
# --------------------------------------------------------------------------------------

bk = load_script("hpc-mariadb-backup")


@pytest.fixture()
def s3_env(fake_aws: None) -> Any:
    with mock_aws():
        yield boto3.client("s3", region_name="ap-northeast-2")


def _backup_cfg(tmp: Path, s3: Any = None, host: str = "data-3") -> tuple[Path, dict[str, Any]]:
    cfg = json.loads(render_template("data/galera.json", data_ctx("prod", host)))
    path = tmp / "galera.json"
    path.write_text(json.dumps(cfg))
    if s3 is not None:  # like the program's bucket: versioned, one fixed key per host
        bucket = cfg["backup"]["bucket"]
        s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "ap-northeast-2"})
        s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    return path, cfg


def _versions(s3: Any, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    return s3.list_object_versions(Bucket=cfg["backup"]["bucket"]).get("Versions", [])


def test_backup_streams_to_its_fixed_key_and_writes_the_metric(tmp_path: Path, s3_env: Any) -> None:
    s3 = s3_env
    cfg_path, cfg = _backup_cfg(tmp_path, s3)
    bucket, key = cfg["backup"]["bucket"], cfg["backup"]["key"]
    assert key == "mariadb/data-3/latest.xbstream.gz"  # the key the instance role may write
    textfile = tmp_path / "textfile"
    for night in (b"first-night", b"second-night"):
        rc = bk.main(
            [
                "--config",
                str(cfg_path),
                "--backup-cmd",
                f"printf {night.decode()}",
                "--status-cmd",
                "printf 'wsrep_local_state\\t4\\n'",
                "--textfile-dir",
                str(textfile),
            ],
            s3=s3,
        )
        assert rc == 0
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert gzip.decompress(body) == b"second-night"
    assert len(_versions(s3, cfg)) == 2  # the earlier night lives on as a noncurrent version
    metric = (textfile / "hpc_backup.prom").read_text()
    assert f'hpc_backup_last_success_timestamp_seconds{{cluster="{cfg["cluster_name"]}"}} ' in metric
    assert f'hpc_backup_last_size_bytes{{cluster="{cfg["cluster_name"]}"}} {len(body)}\n' in metric
    stamp_line = re.search(r"^hpc_backup_last_success_timestamp_seconds\{.*\} (\d+)$", metric, re.M)
    assert stamp_line, f"no last-success timestamp in the metrics file:\n{metric}"
    stamp = int(stamp_line.group(1))
    assert abs(stamp - dt.datetime.now(dt.UTC).timestamp()) < 60
    assert list(textfile.iterdir()) == [textfile / "hpc_backup.prom"]  # no temp file left


def test_backup_streams_more_than_one_multipart_chunk(tmp_path: Path, s3_env: Any) -> None:
    s3 = s3_env
    cfg_path, cfg = _backup_cfg(tmp_path, s3)
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(9 * 1024 * 1024))  # incompressible, above the 8 MiB threshold
    rc = bk.main(
        ["--config", str(cfg_path), "--backup-cmd", f"cat {blob}", "--force", "--textfile-dir", str(tmp_path / "tf")], s3=s3
    )
    assert rc == 0
    body = s3.get_object(Bucket=cfg["backup"]["bucket"], Key=cfg["backup"]["key"])["Body"].read()
    assert gzip.decompress(body) == blob.read_bytes()


@pytest.mark.parametrize("size", [10, 9 * 1024 * 1024])
def test_failed_backup_never_becomes_latest_and_keeps_the_old_metric(tmp_path: Path, s3_env: Any, size: int) -> None:
    s3 = s3_env
    cfg_path, cfg = _backup_cfg(tmp_path, s3)
    s3.put_object(Bucket=cfg["backup"]["bucket"], Key=cfg["backup"]["key"], Body=b"last good")
    textfile = tmp_path / "textfile"
    textfile.mkdir()
    (textfile / "hpc_backup.prom").write_text("previous\n")
    blob = tmp_path / "partial"
    blob.write_bytes(os.urandom(size))
    rc = bk.main(
        [
            "--config",
            str(cfg_path),
            "--backup-cmd",
            f"sh -c 'cat {blob}; echo boom >&2; exit 3'",
            "--force",
            "--textfile-dir",
            str(textfile),
        ],
        s3=s3,
    )
    assert rc == 1
    assert len(_versions(s3, cfg)) == 1  # the truncated stream was not stored
    assert s3.get_object(Bucket=cfg["backup"]["bucket"], Key=cfg["backup"]["key"])["Body"].read() == b"last good"
    assert (textfile / "hpc_backup.prom").read_text() == "previous\n"


def test_backup_runs_only_on_the_backup_host_and_only_when_synced(tmp_path: Path) -> None:
    cfg_path, cfg = _backup_cfg(tmp_path, host="data-1")
    assert cfg["backup"]["host"] == "data-3"

    class NoS3:
        def __getattr__(self, name: str) -> Any:
            raise AssertionError("S3 used on a node that does not take backups")

    assert bk.main(["--config", str(cfg_path), "--textfile-dir", str(tmp_path)], s3=NoS3()) == 0
    cfg_path, _ = _backup_cfg(tmp_path, host="data-3")
    rc = bk.main(
        ["--config", str(cfg_path), "--status-cmd", "printf 'wsrep_local_state\\t2\\n'", "--textfile-dir", str(tmp_path)],
        s3=NoS3(),
    )
    assert rc == 1  # a donor / joiner is not backed up
    assert not (tmp_path / "hpc_backup.prom").exists()
