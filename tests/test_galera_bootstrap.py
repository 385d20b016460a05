"""Galera bootstraps exactly once, and every other start joins (hpc-galera-start).

The guard is an SSM parameter created without Overwrite: whoever creates it bootstraps,
everyone else (including a replaced instance of the designated node) joins. Unit tests
drive the guard against moto; a live test starts the rendered prod config as a real
3-node cluster in a network namespace with the hosts' own IPs: data-1 bootstraps (moto
server as the SSM endpoint), creates the databases and users, and data-2 and data-3
join through a mariabackup SST that uses the provisioned sst account.

This module doubles as the driver that runs inside that namespace
(`python tests/test_galera_bootstrap.py live-galera SPEC.json`).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # also when run as the namespace driver
    sys.path.insert(0, str(REPO))

import boto3  # noqa: E402
import pytest  # noqa: E402
from botocore.exceptions import ClientError  # noqa: E402
from moto import mock_aws  # noqa: E402

from cloud_init.templating import render_template  # noqa: E402
from offline.contexts import contexts  # noqa: E402
from tests.loadfile import load_script  # noqa: E402
from tests.nsrun import can_isolate, run_isolated  # noqa: E402

SCRIPTS = REPO / "cloud_init" / "scripts"
GALERA_PROVIDER = "/usr/lib/galera/libgalera_smm.so"
SECRETS = {
    "redis_password": "redis-Pw-1",
    "mariadb_root_password": "root-Pw-1",
    "mariadb_app_password": "app-Pw-1",
    "mariadb_slurm_password": "slurm-Pw-1",
    "galera_sst_password": "sst-Pw-1",
    "clustercheck_password": "mon-Pw-1",
}


# --------------------------------------------------------------------------------------
# Driver that runs inside the namespace (stdlib + moto/boto3 only).
# --------------------------------------------------------------------------------------


def _sql(cnf: str, query: str, extra: list[str] | None = None) -> str:
    cp = subprocess.run(
        ["mariadb", f"--defaults-file={cnf}", "-uroot", "-N", "-B", *(extra or []), "-e", query],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if cp.returncode != 0:
        raise RuntimeError(f"{query!r}: {cp.stderr.strip()}")
    return cp.stdout


def _status(cnf: str) -> dict[str, str]:
    out = _sql(cnf, "SHOW GLOBAL STATUS LIKE 'wsrep_%'")
    return dict(line.split("\t", 1) for line in out.splitlines() if "\t" in line)


def _stop_all(pidfiles: list[str], grace: float = 5.0) -> None:
    """SIGTERM every mariadbd we started, SIGKILL what is left after `grace` seconds."""
    pids = []
    for pidfile in pidfiles:
        try:
            pids.append(int(Path(pidfile).read_text().strip()))
        except (OSError, ValueError):
            continue
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in pids:
            try:
                os.kill(pid, sig)
                alive.append(pid)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = [p for p in alive if os.path.exists(f"/proc/{p}")]
        pids = alive


def live_galera(spec: dict[str, Any]) -> dict[str, Any]:
    from moto.server import ThreadedMotoServer

    out: dict[str, Any] = {"runs": {}, "status": {}, "checks": {}}
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    _, port = server.get_host_and_port()
    env = dict(
        os.environ,
        HPC_AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION=spec["region"],
    )
    try:
        for name in spec["order"]:
            node = spec["nodes"][name]
            launch = (
                f"mariadbd --defaults-file={node['cnf']} {{extra}} >> {node['dir']}/mariadbd.out 2>&1 & "
                f"echo $! > {node['pidfile']}"
            )
            cmd = [
                spec["python"],
                spec["script"],
                "--config",
                node["galera_json"],
                "--secrets-dir",
                node["secrets"],
                "--bootstrap-cmd",
                "sh -c " + shlex.quote(launch.format(extra="--wsrep-new-cluster")),
                "--start-cmd",
                "sh -c " + shlex.quote(launch.format(extra="")),
                "--stop-cmd",
                "true",
                "--client-cmd",
                f"mariadb --defaults-file={node['cnf']} -uroot",
                "--install-cmd",
                "false",
                "--enable-marker",
                f"{node['dir']}/galera-initialized",
                "--provisioned-marker",
                f"{node['dir']}/galera-provisioned",
                "--peer-timeout",
                "20",
                "--sync-timeout",
                "60",
                "--poll",
                "0.3",
                "--join-attempts",
                "1",
            ]
            t0 = time.monotonic()
            cp = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
            out["runs"][name] = {"rc": cp.returncode, "log": cp.stderr[-3000:], "seconds": time.monotonic() - t0}
            if cp.returncode != 0:
                tail = Path(node["dir"], "mariadbd.out")
                out["runs"][name]["mariadbd"] = tail.read_text()[-4000:] if tail.exists() else ""
                return out
        for name in spec["order"]:
            st = _status(spec["nodes"][name]["cnf"])
            out["status"][name] = {
                k: st.get(k)
                for k in (
                    "wsrep_cluster_size",
                    "wsrep_cluster_status",
                    "wsrep_local_state",
                    "wsrep_ready",
                    "wsrep_cluster_state_uuid",
                )
            }
        last = spec["nodes"][spec["order"][-1]]
        out["checks"]["databases"] = sorted(_sql(last["cnf"], "SHOW DATABASES").split())
        out["checks"]["users"] = sorted(_sql(last["cnf"], "SELECT CONCAT(user, '@', host) FROM mysql.user").split())
        # the app account works over TCP from another data node's address
        first = spec["nodes"][spec["order"][0]]
        cp = subprocess.run(
            [
                "mariadb",
                "--no-defaults",
                "-h",
                last["ip"],
                "-P",
                "3306",
                "-u",
                "portal",
                f"-p{spec['secrets']['mariadb_app_password']}",
                "-N",
                "-B",
                "portal_api",
                "-e",
                "SELECT CURRENT_USER()",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        out["checks"]["app_login"] = [cp.returncode, cp.stdout.strip(), cp.stderr.strip(), first["ip"]]
        # clustercheck with the provisioned hpc_monitor account
        cp = subprocess.run(
            [spec["python"], spec["clustercheck"], "--once", "--defaults-file", last["monitor_cnf"]],
            capture_output=True,
            text=True,
            timeout=30,
        )
        out["checks"]["clustercheck"] = [cp.returncode, cp.stdout.strip()]
        # the marker exists in SSM
        import boto3

        ssm = boto3.client(
            "ssm",
            region_name=spec["region"],
            endpoint_url=env["HPC_AWS_ENDPOINT_URL"],
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        out["checks"]["marker"] = json.loads(ssm.get_parameter(Name=spec["marker"])["Parameter"]["Value"])
        # the mysqld exporter, started as its drop-in says, reads the cluster with hpc_monitor
        if spec.get("exporter"):
            exporter = subprocess.Popen(spec["exporter"]["argv"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                body = ""
                for _ in range(50):
                    try:
                        body = urllib.request.urlopen(spec["exporter"]["url"], timeout=2).read().decode()
                        if "mysql_up" in body:
                            break
                    except OSError:
                        pass
                    time.sleep(0.2)
                wanted = ("mysql_up ", "mysql_global_status_wsrep_cluster_size ", "mysql_global_status_wsrep_cluster_status ")
                out["checks"]["exporter"] = sorted(line for line in body.splitlines() if line.startswith(wanted))
            finally:
                exporter.terminate()
                exporter.wait(timeout=10)
        # a second run on the bootstrap node changes nothing
        name = spec["order"][0]
        node = spec["nodes"][name]
        cp = subprocess.run(
            [
                spec["python"],
                spec["script"],
                "--config",
                node["galera_json"],
                "--secrets-dir",
                node["secrets"],
                "--bootstrap-cmd",
                "false",
                "--start-cmd",
                "false",
                "--client-cmd",
                f"mariadb --defaults-file={node['cnf']} -uroot",
                "--enable-marker",
                f"{node['dir']}/galera-initialized",
                "--provisioned-marker",
                f"{node['dir']}/galera-provisioned",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        out["runs"]["rerun"] = {"rc": cp.returncode, "log": cp.stderr[-2000:]}
        return out
    finally:
        _stop_all([spec["nodes"][name]["pidfile"] for name in spec["order"]])
        server.stop()


# --------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------

gs = load_script("hpc-galera-start")


def _cfg(host: str = "data-1", **over: Any) -> dict[str, Any]:
    ctx = contexts("prod")[host]
    cfg = json.loads(render_template("data/galera.json", ctx))
    cfg.update(over)
    return cfg


@pytest.fixture()
def atomic_moto_ssm(monkeypatch: pytest.MonkeyPatch) -> None:
    """AWS's PutParameter is atomic; moto's in-memory backend checks and inserts in two
    Python steps. Serialise it the way the real service behaves."""
    from moto.ssm.models import SimpleSystemManagerBackend

    lock = threading.Lock()
    original = SimpleSystemManagerBackend.put_parameter

    def put_parameter(self: Any, *args: Any, **kwargs: Any) -> Any:
        with lock:
            return original(self, *args, **kwargs)

    monkeypatch.setattr(SimpleSystemManagerBackend, "put_parameter", put_parameter)


def test_five_concurrent_starters_exactly_one_bootstraps(fake_aws: None, atomic_moto_ssm: None) -> None:
    # Worst case: five processes all believe they are the designated node.
    cfg = _cfg()
    barrier = threading.Barrier(5)
    results: list[str] = []
    errors: list[BaseException] = []
    with mock_aws():

        def starter() -> None:
            try:
                ssm = boto3.client("ssm", region_name="ap-northeast-2")
                barrier.wait(timeout=10)
                results.append(gs.decide(cfg, ssm, None))
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=starter) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert not errors, errors
        assert len(results) == 5
        assert results.count(gs.BOOTSTRAP) == 1
        assert results.count(gs.JOIN) == 4
        value = boto3.client("ssm", region_name="ap-northeast-2").get_parameter(Name=cfg["bootstrap_marker"])
        assert json.loads(value["Parameter"]["Value"])["host"] == "data-1"


def test_replaced_designated_node_joins_when_the_marker_exists(fake_aws: None) -> None:
    cfg = _cfg()
    with mock_aws():
        ssm = boto3.client("ssm", region_name="ap-northeast-2")
        ssm.put_parameter(Name=cfg["bootstrap_marker"], Value="{}", Type="String")
        assert gs.decide(cfg, ssm, None) == gs.JOIN  # fresh datadir, but the cluster exists
        assert gs.decide(cfg, ssm, None) == gs.JOIN


def test_other_nodes_never_touch_the_marker() -> None:
    class NoSSM:
        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"SSM {name} called by a non-designated node")

    for host in ("data-2", "data-3"):
        assert gs.decide(_cfg(host), NoSSM(), None) == gs.JOIN


def test_designated_node_with_galera_history_joins(fake_aws: None) -> None:
    cfg = _cfg()
    grastate = {"uuid": "cad776eb-e96d-11f1-b18c-e32a0d92434b", "seqno": "-1", "safe_to_bootstrap": "0"}
    with mock_aws():
        ssm = boto3.client("ssm", region_name="ap-northeast-2")
        assert gs.decide(cfg, ssm, grastate) == gs.JOIN
        with pytest.raises(ClientError):  # and it did not create the marker
            ssm.get_parameter(Name=cfg["bootstrap_marker"])
    zero = {"uuid": gs.ZERO_UUID, "seqno": "-1", "safe_to_bootstrap": "0"}
    assert not gs.has_history(zero) and not gs.has_history(None) and gs.has_history(grastate)


def test_no_answer_from_ssm_means_no_bootstrap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gs.time, "sleep", lambda s: None)

    class Denied:
        calls = 0

        def put_parameter(self, **kw: Any) -> None:
            Denied.calls += 1
            raise ClientError({"Error": {"Code": "AccessDeniedException", "Message": "no"}}, "PutParameter")

    with pytest.raises(ClientError):
        gs.decide(_cfg(), Denied(), None)
    assert Denied.calls == 5  # retried, then gave up


# ---- main(): which command runs, with stand-in commands --------------------------


def _fake_client(tmp: Path) -> str:
    """A stand-in `mariadb` client: answers from tmp/state (absent: server down)."""
    script = tmp / "fake-mariadb"
    script.write_text(f"#!/bin/sh\n[ -f {tmp}/state ] || exit 1\ncat {tmp}/state\n")
    script.chmod(0o755)
    return str(script)


SYNCED = "wsrep_local_state\t4\nwsrep_ready\tON\nwsrep_cluster_size\t3\nwsrep_cluster_status\tPrimary\nwsrep_on\tON\n"


def _run_main(tmp: Path, cfg: dict[str, Any], ssm: Any, peer_timeout: float = 0.5) -> tuple[int, list[str]]:
    (tmp / "data" / "mysql").mkdir(parents=True, exist_ok=True)
    (tmp / "galera.json").write_text(json.dumps(cfg))
    calls = tmp / "calls"
    (tmp / "synced").write_text(SYNCED)

    def act(name: str) -> str:
        return f"sh -c 'echo {name} >> {calls}; cp {tmp}/synced {tmp}/state'"

    rc = gs.main(
        [
            "--config",
            str(tmp / "galera.json"),
            "--datadir",
            str(tmp / "data"),
            "--bootstrap-cmd",
            act("bootstrap"),
            "--start-cmd",
            act("start"),
            "--stop-cmd",
            f"sh -c 'echo stop >> {calls}; rm -f {tmp}/state'",
            "--client-cmd",
            _fake_client(tmp),
            "--install-cmd",
            f"sh -c 'echo install >> {calls}'",
            "--enable-marker",
            str(tmp / "enabled"),
            "--provisioned-marker",
            str(tmp / "provisioned"),
            "--peer-timeout",
            str(peer_timeout),
            "--sync-timeout",
            "2",
            "--poll",
            "0.05",
            "--join-attempts",
            "1",
            "--secrets-dir",
            str(tmp / "secrets"),
        ],
        ssm=ssm,
    )
    return rc, calls.read_text().split() if calls.exists() else []


def _secrets(tmp: Path) -> None:
    (tmp / "secrets").mkdir(exist_ok=True)
    for k, v in SECRETS.items():
        (tmp / "secrets" / k).write_text(v + "\n")


def test_designated_node_bootstraps_once_and_provisions(tmp_path: Path, fake_aws: None) -> None:
    _secrets(tmp_path)
    cfg = _cfg()
    with mock_aws():
        ssm = boto3.client("ssm", region_name="ap-northeast-2")
        rc, calls = _run_main(tmp_path, cfg, ssm)
    assert rc == 0
    # the fake client received the provisioning SQL on stdin (prints state, exits 0)
    assert calls == ["bootstrap"]
    assert (tmp_path / "enabled").exists() and (tmp_path / "provisioned").exists()


def test_joiner_waits_for_a_peer_and_gives_up_bounded(tmp_path: Path) -> None:
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    closed_port = free.getsockname()[1]
    free.close()
    cfg = _cfg(
        "data-2",
        nodes=[
            {"name": "data-1", "ip": "127.0.0.1", "galera_port": closed_port},
            {"name": "data-2", "ip": "127.0.0.1", "galera_port": closed_port},
        ],
    )
    t0 = time.monotonic()
    rc, calls = _run_main(tmp_path, cfg, ssm=None, peer_timeout=0.5)
    assert rc == 2 and calls == []  # nothing started without a peer
    assert time.monotonic() - t0 < 10


def test_joiner_joins_once_a_peer_listens(tmp_path: Path) -> None:
    peer = socket.socket()
    peer.bind(("127.0.0.1", 0))
    peer.listen(5)
    try:
        port = peer.getsockname()[1]
        cfg = _cfg(
            "data-3",
            nodes=[
                {"name": "data-1", "ip": "127.0.0.1", "galera_port": port},
                {"name": "data-3", "ip": "127.0.0.1", "galera_port": 1},
            ],
        )
        rc, calls = _run_main(tmp_path, cfg, ssm=None)
    finally:
        peer.close()
    assert rc == 0 and calls == ["start"]
    assert not (tmp_path / "provisioned").exists()  # only the designated node provisions


def test_already_synced_member_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "state").write_text(SYNCED)
    rc, calls = _run_main(tmp_path, _cfg("data-2"), ssm=None)
    assert rc == 0 and calls == []


def test_package_default_server_without_wsrep_is_stopped_first(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("wsrep_on\tOFF\n")
    peer = socket.socket()
    peer.bind(("127.0.0.1", 0))
    peer.listen(5)
    try:
        cfg = _cfg("data-2", nodes=[{"name": "data-1", "ip": "127.0.0.1", "galera_port": peer.getsockname()[1]}])
        rc, calls = _run_main(tmp_path, cfg, ssm=None)
    finally:
        peer.close()
    assert rc == 0 and calls == ["stop", "start"]


def test_provisioning_sql_quotes_secrets_and_scopes_accounts() -> None:
    cfg = _cfg()
    sql = gs.provision_sql(cfg, lambda name: "it's\\x" if name == "mariadb_app_password" else "pw")
    assert "IDENTIFIED BY 'it\\'s\\\\x'" in sql
    assert "'portal'@'10.40.0.0/255.255.0.0'" in sql
    assert "GRANT ALL PRIVILEGES ON `slurm_acct_db`.* TO 'slurm'@'10.40.0.0/255.255.0.0';" in sql
    assert "ON `slurm_acct_db`.* TO 'portal'" not in sql
    for db in cfg["databases"]:
        assert f"CREATE DATABASE IF NOT EXISTS `{db}`" in sql
    assert "GRANT RELOAD, PROCESS, LOCK TABLES, BINLOG MONITOR ON *.* TO 'sst'@'localhost';" in sql


# ---- live: a real 3-node cluster from the rendered prod configs --------------------


def _exec_start(dropin: str) -> list[str]:
    lines = [line.split("=", 1)[1] for line in dropin.splitlines() if line.startswith("ExecStart=")]
    assert lines[0] == "" and len(lines) == 2  # reset, then ours
    return lines[1].split()


def _node_files(base: Path, name: str, ctx: dict[str, Any]) -> dict[str, Any]:
    mem = load_script("hpc-memory-tune")
    sec = load_script("hpc-data-secrets")
    d = base / name
    (d / "data").mkdir(parents=True)
    (d / "secrets").mkdir()
    for k, v in SECRETS.items():
        (d / "secrets" / k).write_text(v + "\n")
    (d / "override.json").write_text(json.dumps({"total_mib": 1024}))
    assert (
        mem.main(
            [
                "--override",
                str(d / "override.json"),
                "--mysql-out",
                str(d / "70-hpc-memory.cnf"),
                "--redis-out",
                str(d / "hpc-memory.conf"),
            ]
        )
        == 0
    )
    sock = str(d / "mysqld.sock")
    assert (
        sec.main(
            [
                "--secrets-dir",
                str(d / "secrets"),
                "--redis-out",
                str(d / "hpc-secrets.conf"),
                "--sst-out",
                str(d / "99-hpc-sst-auth.cnf"),
                "--monitor-out",
                str(d / "hpc-monitor.cnf"),
                "--redis-env-out",
                str(d / "redis-exporter.env"),
                "--socket",
                sock,
            ]
        )
        == 0
    )
    ip = ctx["host"]["ip"]
    # Test-only paths; and, since all three nodes share one namespace here, Galera
    # listens on the node's own address instead of 0.0.0.0 (and a small gcache).
    local = (
        f"\n[mysqld]\ndatadir = {d}/data\nsocket = {sock}\npid-file = {d}/mysqld.pid\n"
        f"log_error = {d}/error.log\ntmpdir = {d}\n"
        f"[client]\nsocket = {sock}\n"
        f'[galera]\nwsrep_provider_options = "gcache.size=32M;gmcast.listen_addr=tcp://{ip}:4567"\n'
    )
    cnf = "".join(
        [
            render_template("data/65-hpc-galera.cnf", ctx),
            (d / "70-hpc-memory.cnf").read_text(),
            (d / "99-hpc-sst-auth.cnf").read_text(),
            local,
        ]
    )
    (d / "my.cnf").write_text(cnf)
    galera_json = json.loads(render_template("data/galera.json", ctx))
    galera_json["datadir"] = str(d / "data")
    (d / "galera.json").write_text(json.dumps(galera_json))
    for p in (d, d / "data"):
        shutil.chown(p, "mysql", "mysql")
    cp = subprocess.run(
        ["mariadb-install-db", f"--defaults-file={d}/my.cnf", "--user=mysql", f"--datadir={d}/data", "--skip-test-db"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cp.returncode == 0, cp.stdout[-2000:] + cp.stderr[-2000:]
    for p in d.iterdir():
        if p.is_file():
            p.chmod(p.stat().st_mode | stat.S_IROTH)
    (d / "hpc-monitor.cnf").chmod(0o644)
    return {
        "dir": str(d),
        "cnf": str(d / "my.cnf"),
        "galera_json": str(d / "galera.json"),
        "ip": ip,
        "secrets": str(d / "secrets"),
        "pidfile": str(d / "mariadbd.pid"),
        "monitor_cnf": str(d / "hpc-monitor.cnf"),
    }


@pytest.mark.daemons
@pytest.mark.skipif(
    not can_isolate() or shutil.which("mariadbd") is None or not os.path.exists(GALERA_PROVIDER),
    reason="needs root, unshare, mariadbd and galera-4",
)
def test_live_cluster_bootstraps_once_and_a_second_node_joins_by_sst() -> None:
    # The rendered prod configs (three nodes in gcomm://); data-1 and data-2 start. A third
    # joiner would prove nothing new and costs another 10 s: the mariabackup SST donor
    # script sleeps 10 s before streaming.
    ctxs = {n: c for n, c in contexts("prod").items() if "data" in c["host"]["roles"]}
    assert len(ctxs) == 3
    base = Path(tempfile.mkdtemp(prefix="hpc-galera-", dir="/tmp"))
    try:
        base.chmod(0o755)
        any_ctx = next(iter(ctxs.values()))
        first = any_ctx["galera"]["bootstrap_host"]
        order = [first, sorted(n for n in ctxs if n != first)[0]]
        nodes = {n: _node_files(base, n, ctxs[n]) for n in order}
        spec = {
            "python": sys.executable,
            "script": str(SCRIPTS / "hpc-galera-start"),
            "clustercheck": str(SCRIPTS / "hpc-clustercheck"),
            "order": order,
            "nodes": nodes,
            "region": any_ctx["region"],
            "marker": any_ctx["galera"]["bootstrap_marker"],
            "secrets": SECRETS,
        }
        from tests.conftest import tool  # not at the top: this file is also the namespace driver

        exe = tool("prometheus-mysqld-exporter", "prometheus-mysqld-exporter")
        if exe:
            node = nodes[order[-1]]
            argv = [
                a.replace("/usr/bin/prometheus-mysqld-exporter", exe).replace("/etc/mysql/hpc-monitor.cnf", node["monitor_cnf"])
                for a in _exec_start(render_template("data/hpc-mysqld-exporter.conf", ctxs[order[-1]]))
            ]
            spec["exporter"] = {"argv": argv, "url": f"http://{node['ip']}:9104/metrics"}
        (base / "spec.json").write_text(json.dumps(spec))
        cp = run_isolated(
            [sys.executable, __file__, "live-galera", str(base / "spec.json")],
            extra_ips=[c["host"]["ip"] for c in ctxs.values()],
            timeout=240,
        )
        assert cp.returncode == 0, cp.stderr[-3000:]
        res = json.loads(cp.stdout.strip().splitlines()[-1])
        for name in order:
            run = res["runs"][name]
            assert run["rc"] == 0, (name, run)
        assert "bootstrapping a new cluster" in res["runs"][order[0]]["log"]
        for name in order[1:]:
            assert "bootstrapping" not in res["runs"][name]["log"]
        assert len(res["status"]) == 2
        uuids = set()
        for name, st in res["status"].items():
            assert st["wsrep_cluster_size"] == "2", (name, st)
            assert st["wsrep_cluster_status"] == "Primary"
            assert st["wsrep_local_state"] == "4" and st["wsrep_ready"] == "ON"
            uuids.add(st["wsrep_cluster_state_uuid"])
        assert len(uuids) == 1  # one cluster, not three
        for db in any_ctx["galera"]["databases"]:
            assert db in res["checks"]["databases"]  # replicated to the last joiner
        users = res["checks"]["users"]
        for u in ("portal@10.40.0.0/255.255.0.0", "slurm@10.40.0.0/255.255.0.0", "hpc_monitor@localhost", "sst@localhost"):
            assert u in users
        rc, who, err, _ = res["checks"]["app_login"]
        assert rc == 0 and who == "portal@10.40.0.0/255.255.0.0", err
        assert res["checks"]["clustercheck"][0] == 0
        assert res["checks"]["clustercheck"][1].startswith("200")
        assert res["checks"]["marker"]["host"] == order[0]
        assert res["runs"]["rerun"]["rc"] == 0
        if "exporter" in spec:
            assert res["checks"]["exporter"] == [
                "mysql_global_status_wsrep_cluster_size 2",
                "mysql_global_status_wsrep_cluster_status 1",
                "mysql_up 1",
            ]
        assert "nothing to start" in res["runs"]["rerun"]["log"]
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "live-galera":
        result = live_galera(json.loads(Path(sys.argv[2]).read_text()))
        print(json.dumps(result))
        sys.exit(0)
    sys.exit(f"usage: {sys.argv[0]} live-galera SPEC.json")
