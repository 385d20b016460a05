"""The data tier (Redis + Sentinel, MariaDB Galera) as rendered for every data host,
checked by the daemons that read the files.

- galera: `mariadbd --defaults-file=<combined cnf> --help --verbose` accepts the rendered
  fragments (65-hpc-galera.cnf + the 70-hpc-memory.cnf and 99-hpc-sst-auth.cnf the boot
  scripts write), with no "adjusted"/"not recognized" warnings; the package's
  !includedir order makes our values win.
- redis: redis-server and redis-sentinel start from the rendered files in a network
  namespace that owns the hosts' private IPs, answer PING only with the password, and the
  prod replicas and sentinels find each other. Sentinel's config is written once.
- systemd: the units and drop-ins pass `systemd-analyze verify`.
- failover settings: Galera starts with the rendered failure-detection timeouts (and
  refuses ones outside its limits), a live 3-node cluster keeps committing after its
  writer freezes; the durability and Redis/Sentinel timing settings are pinned with the
  reason in each test's name.
Each check has a negative twin that the same checker rejects.

This module doubles as the driver that runs inside the namespaces
(`python tests/test_tier_data.py live-redis|live-galera-failover SPEC.json`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # also when run as the namespace driver
    sys.path.insert(0, str(REPO))

import pytest  # noqa: E402
import yaml  # noqa: E402

from cloud_init.render import render_host  # noqa: E402
from cloud_init.templating import render_template  # noqa: E402
from offline.contexts import contexts  # noqa: E402
from tests.loadfile import load_script  # noqa: E402
from tests.nsrun import can_isolate, run_isolated  # noqa: E402

TEMPLATES = REPO / "cloud_init" / "templates"
SCRIPTS = REPO / "cloud_init" / "scripts"
DATA_SCRIPTS = [
    "hpc-memory-tune",
    "hpc-data-secrets",
    "hpc-redis-init",
    "hpc-galera-start",
    "hpc-galera-recover",
    "hpc-clustercheck",
    "hpc-mariadb-backup",
]
GALERA_PROVIDER = "/usr/lib/galera/libgalera_smm.so"
PASSWORD = "Redis-Pw-7x"
SECRETS = {
    "redis_password": PASSWORD,
    "galera_sst_password": "Sst-Pw-7x",
    "clustercheck_password": "Mon-Pw-7x",
}
SECRET_LINE = re.compile(r"^\s*(requirepass|masterauth|wsrep_sst_auth|password|sentinel\s+auth-pass)\b", re.I | re.M)


def redis_init_args(d: Path) -> list[str]:
    """hpc-redis-init's arguments for a host laid out under d (as the driver lays it out)."""
    return ["--template", str(d / "sentinel.conf.tmpl"), "--sentinel-conf", str(d / "sentinel.conf"),
            "--redis-conf", str(d / "redis.conf"), "--secrets-dir", str(d / "boot" / "secrets")]


# --------------------------------------------------------------------------------------
# Driver that runs inside the namespace (stdlib only, plus redis-cli).
# --------------------------------------------------------------------------------------


def _cli(host: str, port: int, *args: str, password: str | None = None) -> str:
    cmd = ["redis-cli", "-h", host, "-p", str(port), "--no-auth-warning"]
    if password is not None:
        cmd += ["-a", password]
    cp = subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=10)
    return (cp.stdout + cp.stderr).strip()


def _pairs(text: str) -> dict[str, str]:
    lines = text.splitlines()
    return dict(zip(lines[0::2], lines[1::2], strict=False))


def _info(text: str) -> dict[str, str]:
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line and not line.startswith("#"))


def _wait(pred: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.2)
    return bool(pred())


def live_redis(spec: dict[str, Any]) -> dict[str, Any]:
    procs: list[subprocess.Popen[bytes]] = []
    out: dict[str, Any] = {"nodes": {}}
    pw, port, sport, master = spec["password"], spec["port"], spec["sentinel_port"], spec["master_name"]
    try:
        redis_procs = {}
        for n in spec["nodes"]:
            redis_procs[n["name"]] = subprocess.Popen(n["redis_argv"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(redis_procs[n["name"]])
        for n in spec["nodes"]:
            ok = _wait(lambda n=n: _cli(n["ip"], port, "PING", password=pw) == "PONG", 10)
            out["nodes"][n["name"]] = {"redis_up": ok}
        for n in spec["nodes"]:
            procs.append(subprocess.Popen(n["sentinel_argv"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        others = len(spec["nodes"]) - 1

        def converged() -> bool:
            for n in spec["nodes"]:
                m = _pairs(_cli(n["ip"], sport, "SENTINEL", "MASTER", master, password=pw))
                if m.get("num-slaves") != str(others) or m.get("num-other-sentinels") != str(others):
                    return False
                if m.get("flags") != "master":
                    return False
                repl = _info(_cli(n["ip"], port, "INFO", "replication", password=pw))
                if repl.get("role") == "slave" and repl.get("master_link_status") != "up":
                    return False  # a diskless full sync waits repl-diskless-sync-delay (5 s)
            return True

        out["converged"] = _wait(converged, spec.get("converge_timeout", 15))
        for n in spec["nodes"]:
            r = out["nodes"][n["name"]]
            ip = n["ip"]
            r["ping_with_password"] = _cli(ip, port, "PING", password=pw)
            r["ping_loopback"] = _cli("127.0.0.1", port, "PING", password=pw) if n.get("loopback") else None
            r["ping_without_password"] = _cli(ip, port, "PING")
            r["ping_wrong_password"] = _cli(ip, port, "PING", password="wrong")
            r["replication"] = _info(_cli(ip, port, "INFO", "replication", password=pw))
            r["maxmemory"] = _cli(ip, port, "CONFIG", "GET", "maxmemory", password=pw).splitlines()[-1:]
            r["appendonly"] = _cli(ip, port, "CONFIG", "GET", "appendonly", password=pw).splitlines()[-1:]
            r["protected_mode"] = _cli(ip, port, "CONFIG", "GET", "protected-mode", password=pw).splitlines()[-1:]
            r["sentinel_ping"] = _cli(ip, sport, "PING", password=pw)
            r["sentinel_ping_without_password"] = _cli(ip, sport, "PING")
            r["sentinel_master"] = _pairs(_cli(ip, sport, "SENTINEL", "MASTER", master, password=pw))
            r["sentinel_master_addr"] = _cli(ip, sport, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", master, password=pw)
        exporter = spec.get("exporter")
        if exporter:
            procs.append(
                subprocess.Popen(
                    exporter["argv"],
                    env=dict(os.environ, REDIS_PASSWORD=pw),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            body = ""
            for _ in range(50):
                try:
                    body = urllib.request.urlopen(exporter["url"], timeout=2).read().decode()
                    if "redis_up" in body:
                        break
                except OSError:
                    pass
                time.sleep(0.2)
            out["exporter"] = [line for line in body.splitlines() if line.startswith(("redis_up ", "redis_connected_slaves"))]
        if spec.get("failover"):
            # kill -9 the master: the sentinels (authenticating to each other and to the
            # replicas) must agree on a replica and promote it.
            old = spec["initial_master"]
            t0 = time.monotonic()
            redis_procs[old["name"]].kill()
            survivors = [n for n in spec["nodes"] if n["name"] != old["name"]]

            def promoted() -> str | None:
                addrs = {_cli(n["ip"], sport, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", master, password=pw) for n in survivors}
                if len(addrs) != 1:
                    return None
                ip = next(iter(addrs)).split()[0] if next(iter(addrs)) else ""
                if ip == old["ip"] or ip not in {n["ip"] for n in survivors}:
                    return None
                if _info(_cli(ip, port, "INFO", "replication", password=pw)).get("role") != "master":
                    return None
                return ip

            ok = _wait(lambda: promoted() is not None, spec.get("failover_timeout", 45))
            new_ip = promoted()
            out["failover"] = {"ok": ok, "new_master": new_ip, "seconds": round(time.monotonic() - t0, 1)}
            if new_ip:
                out["failover"]["new_master_replication"] = _info(_cli(new_ip, port, "INFO", "replication", password=pw))
                out["failover"]["write"] = _cli(new_ip, port, "SET", "session:x", "1", "EX", "60", password=pw)
        return out
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def data_hosts(stack: str) -> dict[str, dict[str, Any]]:
    return {n: c for n, c in contexts(stack).items() if "data" in c["host"]["roles"]}


def all_data_hosts() -> list[tuple[str, str, dict[str, Any]]]:
    return [(st, n, c) for st in ("prod", "dev") for n, c in sorted(data_hosts(st).items())]


def manifest() -> dict[str, Any]:
    return yaml.safe_load((TEMPLATES / "data" / "manifest.yaml").read_text())


def write_secrets(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for k, v in SECRETS.items():
        (d / k).write_text(v + "\n")
    return d


def boot_files(d: Path, total_mib: int = 2048, socket: str = "/run/mysqld/mysqld.sock") -> dict[str, Path]:
    """What hpc-memory-tune and hpc-data-secrets write at boot, into `d`."""
    mem, sec = load_script("hpc-memory-tune"), load_script("hpc-data-secrets")
    d.mkdir(parents=True, exist_ok=True)
    (d / "override.json").write_text(json.dumps({"total_mib": total_mib}))
    files = {
        "mysql_mem": d / "70-hpc-memory.cnf",
        "redis_mem": d / "hpc-memory.conf",
        "redis_secrets": d / "hpc-secrets.conf",
        "sst": d / "99-hpc-sst-auth.cnf",
        "monitor": d / "hpc-monitor.cnf",
        "redis_env": d / "redis-exporter.env",
    }
    assert (
        mem.main(
            [
                "--override",
                str(d / "override.json"),
                "--mysql-out",
                str(files["mysql_mem"]),
                "--redis-out",
                str(files["redis_mem"]),
            ]
        )
        == 0
    )
    assert (
        sec.main(
            [
                "--secrets-dir",
                str(write_secrets(d / "secrets")),
                "--redis-out",
                str(files["redis_secrets"]),
                "--sst-out",
                str(files["sst"]),
                "--monitor-out",
                str(files["monitor"]),
                "--redis-env-out",
                str(files["redis_env"]),
                "--socket",
                socket,
            ]
        )
        == 0
    )
    for f in files.values():
        f.chmod(0o644)  # the checkers here run as root or mysql
    return files


def combined_cnf(ctx: dict[str, Any], boot: dict[str, Path]) -> str:
    return "".join([render_template("data/65-hpc-galera.cnf", ctx), boot["mysql_mem"].read_text(), boot["sst"].read_text()])


# Warnings about this machine, not about the configuration: the checker runs as root
# with this machine's limits and without the (empty) datadir the config names.
CHECK_NOISE = ("max_open_files", "Could not open mysql.plugin table", "Changed limits")


def mariadbd_check(cnf_path: Path) -> tuple[bool, str, dict[str, str]]:
    """(accepted, stderr, effective values) from `mariadbd --help --verbose`."""
    cp = subprocess.run(
        ["mariadbd", f"--defaults-file={cnf_path}", "--help", "--verbose"], capture_output=True, text=True, timeout=60
    )
    problems = [
        line
        for line in cp.stderr.splitlines()
        if "[ERROR]" in line or ("[Warning]" in line and not any(n in line for n in CHECK_NOISE))
    ]
    values: dict[str, str] = {}
    for line in cp.stdout.splitlines():
        m = re.match(r"^([a-z0-9][a-z0-9-]+)\s{2,}(.*)$", line)
        if m:
            values[m.group(1)] = m.group(2).strip()
    return cp.returncode == 0 and not problems, cp.stderr, values


# --------------------------------------------------------------------------------------
# Manifest and rendering
# --------------------------------------------------------------------------------------


def test_manifest_lists_every_template_and_script_of_the_tier() -> None:
    m = manifest()
    srcs = {f["src"] for f in m["files"] if "src" in f}
    scripts = {f["script"] for f in m["files"] if "script" in f}
    templates = {f"data/{p.name}" for p in (TEMPLATES / "data").iterdir() if p.is_file() and p.name != "manifest.yaml"}
    assert srcs == templates
    assert scripts == set(DATA_SCRIPTS)
    dests = [f["dest"] for f in m["files"]]
    assert len(dests) == len(set(dests)) == len(m["files"]) > 0
    for f in m["files"]:
        assert f["roles"] == ["data"], f
        assert re.fullmatch(r"0[0-7]{3}", f["mode"]), f
        assert f["owner"] == "root:root", f  # written before any daemon user need exist
        assert f["check"] and isinstance(f["secret_placeholders"], bool)
        if "script" in f:
            assert (SCRIPTS / f["script"]).stat().st_mode & 0o111
            assert f["mode"] == "0755" and f["dest"] == f"/usr/local/sbin/{f['script']}"
    assert [c["order"] for c in m["commands"]] == [40] * len(m["commands"])
    runs = [c["run"][0] for c in m["commands"]]
    assert runs.index("/usr/local/sbin/hpc-data-secrets") < runs.index("/usr/local/sbin/hpc-galera-start")
    assert runs.index("/usr/local/sbin/hpc-redis-init") < runs.index("/usr/local/sbin/hpc-galera-start")


def test_every_data_host_renders_and_no_file_holds_a_secret() -> None:
    hosts = all_data_hosts()
    assert len(hosts) == 4  # prod data-1..3, dev data-1
    checked = 0
    for stack, name, ctx in hosts:
        rendered = render_host(ctx)
        for f in manifest()["files"]:
            content = rendered.file(f["dest"]).content.decode()
            if "script" in f:
                assert content == (SCRIPTS / f["script"]).read_text()  # copied verbatim
                continue
            assert not SECRET_LINE.search(content), (stack, name, f["dest"])
            for value in SECRETS.values():
                assert value not in content
            checked += 1
        assert "/usr/local/sbin/hpc-galera-start" in [c[0] for c in rendered.commands]
    assert checked == len(hosts) * len([f for f in manifest()["files"] if "src" in f]) > 0
    non_data = [c for c in contexts("prod").values() if "data" not in c["host"]["roles"]]
    assert non_data and all("/etc/hpc/galera.json" not in [f.path for f in render_host(c).files] for c in non_data)


def test_the_redis_master_and_the_galera_writer_start_and_stay_on_different_hosts() -> None:
    """One data host's failure fails over one tier, not both: the initial Redis master is
    not the preferred Galera writer (dbwriter.cfg's first server), and Sentinel promotes
    that host last (the highest replica-priority)."""
    checked = 0
    for stack in ("prod", "dev"):
        hosts = data_hosts(stack)
        for name, ctx in hosts.items():
            writer = ctx["galera"]["nodes"][0]["name"]
            dbwriter = render_template("dbwriter/dbwriter.cfg", ctx)
            assert re.search(rf"^    server {writer} \S+ check rise 40 ", dbwriter, re.M), (stack, writer)
            prio = int(re.search(r"^replica-priority (\d+)$", render_template("data/redis.conf", ctx),
                                 re.M).group(1))  # type: ignore[union-attr]
            if len(hosts) > 1:
                assert ctx["redis"]["initial_master"]["name"] != writer, stack
                assert prio == (150 if name == writer else 100), (stack, name)
                checked += 1
            else:
                assert prio == 100
    assert checked == 3  # prod's three data hosts (dev has one)


def test_redis_topology_follows_the_context() -> None:
    for stack in ("prod", "dev"):
        hosts = data_hosts(stack)
        for name, ctx in hosts.items():
            conf = render_template("data/redis.conf", ctx)
            r = ctx["redis"]
            assert f"\nbind {ctx['host']['ip']} 127.0.0.1\n" in conf
            assert f"\nport {r['port']}\n" in conf and "\nprotected-mode yes\n" in conf
            assert "\nappendonly yes\n" in conf
            assert conf.rstrip().endswith("include /etc/redis/hpc-secrets.conf\ninclude /etc/redis/hpc-memory.conf")
            replicaof = re.findall(r"^replicaof (\S+) (\d+)$", conf, re.M)
            if name == r["initial_master"]["name"]:
                assert replicaof == []
            else:
                assert replicaof == [(r["initial_master"]["ip"], str(r["port"]))]
            has_min = "min-replicas-to-write 1" in conf and "min-replicas-max-lag 2" in conf
            assert has_min == (len(r["nodes"]) > 1)
            tmpl = render_template("data/sentinel.conf.tmpl", ctx)
            quorum = 2 if len(r["nodes"]) >= 3 else 1
            assert f"sentinel monitor {r['master_name']} {r['initial_master']['ip']} {r['port']} {quorum}\n" in tmpl
            for line in (
                "sentinel down-after-milliseconds {m} 2000",
                "sentinel failover-timeout {m} 6000",
                "sentinel parallel-syncs {m} 1",
                "sentinel resolve-hostnames no",
                f"bind {ctx['host']['ip']}",
                f"port {r['sentinel_port']}",
            ):
                assert line.format(m=r["master_name"]) + "\n" in tmpl
            assert tmpl.startswith("# hpc-managed")
    assert len(data_hosts("dev")) == 1 and len(data_hosts("prod")) == 3


def test_galera_config_follows_the_context() -> None:
    for _stack, name, ctx in all_data_hosts():
        cnf = render_template("data/65-hpc-galera.cnf", ctx)
        g = ctx["galera"]
        ips = ",".join(n["ip"] for n in g["nodes"])
        for line in (
            f"wsrep_cluster_address = gcomm://{ips}",
            f"wsrep_cluster_name = {g['cluster_name']}",
            f"wsrep_node_address = {ctx['host']['ip']}",
            f"wsrep_node_name = {name}",
            f"bind-address = {ctx['host']['ip']}",
            "wsrep_sst_method = mariabackup",
            f"wsrep_provider = {GALERA_PROVIDER}",
            "binlog_format = ROW",
            "innodb_autoinc_lock_mode = 2",
            "transaction_isolation = READ-COMMITTED",
            "innodb_lock_wait_timeout = 900",
            "max_allowed_packet = 64M",
            "user = mysql",
            "default_storage_engine = InnoDB",
        ):
            assert f"\n{line}\n" in cnf, (name, line)
        assert "wsrep_sst_auth" not in cnf
        doc = json.loads(render_template("data/galera.json", ctx))
        assert doc["nodes"] == g["nodes"] and doc["bootstrap_marker"] == g["bootstrap_marker"]
        assert doc["bootstrap_host"] == g["bootstrap_host"] and doc["host"] == name
        assert doc["backup"]["host"] == g["nodes"][-1]["name"]  # not the writer (first node)
        assert sorted(doc["users"]["app"]["databases"] + doc["users"]["slurm"]["databases"]) == sorted(g["databases"])


# --------------------------------------------------------------------------------------
# mariadbd reads the combined configuration
# --------------------------------------------------------------------------------------

needs_mariadbd = pytest.mark.skipif(
    shutil.which("mariadbd") is None or not os.path.exists(GALERA_PROVIDER), reason="needs mariadbd and galera-4"
)


@needs_mariadbd
def test_mariadbd_accepts_the_rendered_galera_config_of_every_data_host(tmp_path: Path) -> None:
    checked = 0
    for stack, name, ctx in all_data_hosts():
        boot = boot_files(tmp_path / stack / name / "boot")
        cnf = tmp_path / stack / name / "my.cnf"
        cnf.write_text(combined_cnf(ctx, boot))
        ok, err, values = mariadbd_check(cnf)
        assert ok, (stack, name, err)
        ips = ",".join(n["ip"] for n in ctx["galera"]["nodes"])
        assert values["wsrep-cluster-address"] == f"gcomm://{ips}"
        assert values["wsrep-on"] == "TRUE"
        assert values["bind-address"] == ctx["host"]["ip"]
        assert values["transaction-isolation"] == "READ-COMMITTED"
        assert values["innodb-buffer-pool-size"] == str(1024 * 1024 * 1024)  # 2048 MiB host -> 1024M, not the 256M placeholder
        assert values["wsrep-sst-auth"] == f"sst:{SECRETS['galera_sst_password']}"
        assert values["max-allowed-packet"] == str(64 * 1024 * 1024)
        checked += 1
    assert checked == 4


@needs_mariadbd
@pytest.mark.parametrize(
    "broken",
    [
        "innodb_bogus_option = 1",  # unknown option: an error
        "binlog_format = ROWS",  # bad enum value: an error
        "wsrep_on = MAYBE",  # mariadbd only warns and turns wsrep OFF: the check must still fail
        "innodb_autoinc_lock_mode = 9",  # silently "adjusted": the check must still fail
    ],
)
def test_mariadbd_check_rejects_a_broken_galera_config(tmp_path: Path, broken: str) -> None:
    ctx = data_hosts("prod")["data-2"]
    boot = boot_files(tmp_path / "boot")
    cnf = tmp_path / "my.cnf"
    cnf.write_text(combined_cnf(ctx, boot).replace("[galera]\n", f"[galera]\n{broken}\n", 1))
    ok, err, _ = mariadbd_check(cnf)
    assert not ok, err


@needs_mariadbd
def test_includedir_order_lets_the_boot_files_win_over_package_defaults(tmp_path: Path) -> None:
    # As on the host: my.cnf includes mariadb.conf.d/, where the package's 50-server.cnf
    # binds 127.0.0.1 and our files follow in name order (65 < 70 < 99).
    ctx = data_hosts("prod")["data-3"]
    boot = boot_files(tmp_path / "boot", total_mib=16384)
    confd = tmp_path / "mariadb.conf.d"
    confd.mkdir()
    (confd / "50-server.cnf").write_text("[mysqld]\nbind-address = 127.0.0.1\ninnodb_buffer_pool_size = 128M\n")
    (confd / "65-hpc-galera.cnf").write_text(render_template("data/65-hpc-galera.cnf", ctx))
    shutil.copy(boot["mysql_mem"], confd / "70-hpc-memory.cnf")
    shutil.copy(boot["sst"], confd / "99-hpc-sst-auth.cnf")
    (confd / "README").write_text("[mysqld]\nbind-address = 0.0.0.0\n")  # not *.cnf: ignored
    my = tmp_path / "my.cnf"
    my.write_text(f"[client-server]\nsocket = /run/mysqld/mysqld.sock\n!includedir {confd}/\n")
    ok, err, values = mariadbd_check(my)
    assert ok, err
    assert values["bind-address"] == ctx["host"]["ip"]
    assert values["innodb-buffer-pool-size"] == str(8192 * 1024 * 1024)
    assert values["wsrep-sst-auth"].startswith("sst:")


# --------------------------------------------------------------------------------------
# Redis and Sentinel start from the rendered files
# --------------------------------------------------------------------------------------

needs_redis = pytest.mark.skipif(
    not can_isolate() or shutil.which("redis-server") is None or shutil.which("redis-sentinel") is None,
    reason="needs root, unshare, redis-server and redis-sentinel",
)


def _exec_start(dropin: str) -> list[str]:
    lines = [line.split("=", 1)[1] for line in dropin.splitlines() if line.startswith("ExecStart=")]
    assert lines[0] == "" and len(lines) == 2  # reset, then ours
    return lines[1].split()


def _redis_node(base: Path, ctx: dict[str, Any], drop_loopback: bool) -> dict[str, Any]:
    name = ctx["host"]["name"]
    d = base / name
    d.mkdir(parents=True)
    boot = boot_files(d / "boot")
    paths = {  # test-only relocation of paths outside the repository's control
        "/etc/redis/hpc-secrets.conf": str(boot["redis_secrets"]),
        "/etc/redis/hpc-memory.conf": str(boot["redis_mem"]),
        "/etc/redis/redis.conf": str(d / "redis.conf"),
        "/var/lib/redis": str(d / "redis-data"),
        "/run/redis/redis-server.pid": str(d / "redis.pid"),
        "/run/sentinel/redis-sentinel.pid": str(d / "sentinel.pid"),
        "/var/log/redis/redis-server.log": str(d / "redis.log"),
        "/var/log/redis/redis-sentinel.log": str(d / "sentinel.log"),
    }

    def localize(text: str) -> str:
        for src in sorted(paths, key=len, reverse=True):
            text = text.replace(src, paths[src])
        return text

    conf = localize(render_template("data/redis.conf", ctx))
    tmpl = localize(render_template("data/sentinel.conf.tmpl", ctx))
    if drop_loopback:
        # Test-only: the three nodes share one namespace, so 127.0.0.1:6379 would collide
        # and every connection between them leaves from the same local address; announce
        # each node's own address as separate hosts do by themselves.
        conf = conf.replace(f"bind {ctx['host']['ip']} 127.0.0.1\n", f"bind {ctx['host']['ip']}\n")
        conf += f"replica-announce-ip {ctx['host']['ip']}\n"
        tmpl += f"sentinel announce-ip {ctx['host']['ip']}\n"
    (d / "redis.conf").write_text(conf)
    (d / "sentinel.conf.tmpl").write_text(tmpl)
    init = load_script("hpc-redis-init")
    assert init.main(redis_init_args(d)) == 0
    assert (d / "redis-data").is_dir()  # created from redis.conf's dir
    redis_argv = [localize(a) for a in _exec_start(render_template("data/hpc-redis.conf", ctx))]
    return {
        "name": name,
        "ip": ctx["host"]["ip"],
        "loopback": not drop_loopback,
        "dir": str(d),
        "redis_argv": redis_argv,
        "sentinel_argv": ["redis-sentinel", str(d / "sentinel.conf"), "--supervised", "systemd", "--daemonize", "no"],
    }


def _run_redis(stack: str, tmp_path: Path, failover: bool = False) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    hosts = data_hosts(stack)
    ctx0 = next(iter(hosts.values()))
    nodes = [_redis_node(tmp_path, c, drop_loopback=len(hosts) > 1) for _, c in sorted(hosts.items())]
    spec: dict[str, Any] = {
        "nodes": nodes,
        "password": PASSWORD,
        "port": ctx0["redis"]["port"],
        "sentinel_port": ctx0["redis"]["sentinel_port"],
        "master_name": ctx0["redis"]["master_name"],
    }
    master = ctx0["redis"]["initial_master"]
    spec["initial_master"] = master
    spec["failover"] = failover
    from tests.conftest import tool  # not at the top: this file is also the namespace driver

    exporter = tool("prometheus-redis-exporter", "prometheus-redis-exporter")
    if exporter:
        mctx = hosts[master["name"]]
        argv = _exec_start(render_template("data/hpc-redis-exporter.conf", mctx))
        argv[0] = exporter
        spec["exporter"] = {"argv": argv, "url": f"http://{master['ip']}:9121/metrics"}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    cp = run_isolated(
        [sys.executable, __file__, "live-redis", str(tmp_path / "spec.json")],
        extra_ips=[c["host"]["ip"] for c in hosts.values()],
        timeout=90,
    )
    assert cp.returncode == 0, cp.stderr[-3000:]
    return json.loads(cp.stdout.strip().splitlines()[-1]), nodes, master


@pytest.mark.daemons
@needs_redis
def test_dev_redis_and_sentinel_start_from_the_rendered_files_and_require_the_password(tmp_path: Path) -> None:
    res, nodes, master = _run_redis("dev", tmp_path)
    assert len(nodes) == 1
    r = res["nodes"][nodes[0]["name"]]
    assert r["redis_up"] and r["ping_with_password"] == "PONG"
    assert r["ping_loopback"] == "PONG"  # bind <private ip> 127.0.0.1
    assert "NOAUTH" in r["ping_without_password"]
    assert "WRONGPASS" in r["ping_wrong_password"] or "invalid" in r["ping_wrong_password"]
    assert r["replication"]["role"] == "master"
    assert r["maxmemory"] == [str(400 * 1024 * 1024)]  # hpc-memory.conf (2048 MiB host) via include
    assert r["appendonly"] == ["yes"] and r["protected_mode"] == ["yes"]
    assert r["sentinel_ping"] == "PONG" and "NOAUTH" in r["sentinel_ping_without_password"]
    assert r["sentinel_master_addr"].split() == [master["ip"], "6379"]
    assert r["sentinel_master"]["quorum"] == "1"
    assert res["converged"]
    if "exporter" in res:
        assert "redis_up 1" in res["exporter"]


@pytest.mark.daemons
@needs_redis
def test_prod_replicas_follow_the_initial_master_and_sentinels_find_each_other(tmp_path: Path) -> None:
    res, nodes, master = _run_redis("prod", tmp_path, failover=True)
    assert len(nodes) == 3
    assert res["converged"], res
    for n in nodes:
        r = res["nodes"][n["name"]]
        assert r["ping_with_password"] == "PONG" and "NOAUTH" in r["ping_without_password"]
        assert r["sentinel_master"]["quorum"] == "2"
        assert r["sentinel_master_addr"].split() == [master["ip"], "6379"]
        if n["name"] == master["name"]:
            assert r["replication"]["role"] == "master"
            assert r["replication"]["connected_slaves"] == "2"  # masterauth works
        else:
            assert r["replication"]["role"] == "slave"
            assert r["replication"]["master_host"] == master["ip"]
            assert r["replication"]["master_link_status"] == "up"
    if "exporter" in res:
        assert "redis_up 1" in res["exporter"] and "redis_connected_slaves 2" in res["exporter"]
    spec_master_name = next(iter(data_hosts("prod").values()))["redis"]["master_name"]
    # kill -9 of the master: quorum 2 of 3 password-protected sentinels promote a replica
    fo = res["failover"]
    assert fo["ok"], fo
    # kill -9 -> a replica is master for all sentinels: ~3.5 s here with down-after 2 s
    # (6.5 s with the former 5 s); the ceiling only catches a failover gone badly wrong.
    assert fo["seconds"] <= 15, fo
    assert fo["new_master"] in {n["ip"] for n in nodes} - {master["ip"]}
    assert fo["new_master_replication"]["connected_slaves"] == "1"  # the other replica follows
    assert fo["write"] == "OK"  # min-replicas-to-write 1 is met by that replica
    # Sentinel rewrote its file (myid, known replicas and sentinels): a second init leaves it.
    init = load_script("hpc-redis-init")
    checked = 0
    for n in nodes:
        d = Path(n["dir"])
        before = (d / "sentinel.conf").read_text()
        assert "sentinel myid" in before and before.startswith("# hpc-managed")
        assert f"sentinel monitor {spec_master_name} {fo['new_master']} 6379 2" in before  # after the failover
        assert init.main(redis_init_args(d)) == 0
        assert (d / "sentinel.conf").read_text() == before
        checked += 1
    assert checked == 3


def _start(argv: list[str], tmp_path: Path, ready: Any) -> tuple[int | None, str]:
    """Start a daemon; (None, "") once ready() holds (then stopped), else (exit code, output)."""
    log = (tmp_path / "daemon.out").open("w+")
    p = subprocess.Popen(argv, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if p.poll() is not None:
                log.seek(0)
                return p.returncode, log.read()
            if ready():
                return None, ""
            time.sleep(0.05)
        log.seek(0)
        return -1, "neither ready nor exited: " + log.read()
    finally:
        if p.poll() is None:
            p.terminate()
            p.wait(timeout=10)
        log.close()


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_redis_server_rejects_an_invalid_directive(tmp_path: Path) -> None:
    ctx = data_hosts("prod")["data-2"]
    boot = boot_files(tmp_path / "boot")
    conf = render_template("data/redis.conf", ctx)
    conf = conf.replace("/etc/redis/hpc-secrets.conf", str(boot["redis_secrets"]))
    conf = conf.replace("/etc/redis/hpc-memory.conf", str(boot["redis_mem"]))
    conf = re.sub(r"(?m)^(bind|port|dir|logfile|pidfile) .*$", "", conf)
    (tmp_path / "good.conf").write_text(conf + "bind 127.0.0.1\nport 0\nunixsocket " + str(tmp_path / "r.sock") + "\n")
    (tmp_path / "bad.conf").write_text(conf + "bind 127.0.0.1\nport 0\nreplica-frobnicate yes\n")
    ready = (tmp_path / "r.sock").exists
    rc, out = _start(["redis-server", str(tmp_path / "bad.conf")], tmp_path, ready)
    assert rc not in (None, 0) and "Bad directive" in out
    rc, out = _start(["redis-server", str(tmp_path / "good.conf")], tmp_path, ready)
    assert rc is None, out  # the same file without the bad line starts


@pytest.mark.skipif(shutil.which("redis-sentinel") is None, reason="needs redis-sentinel")
def test_redis_sentinel_rejects_an_invalid_directive(tmp_path: Path) -> None:
    ctx = data_hosts("prod")["data-1"]
    tmpl = render_template("data/sentinel.conf.tmpl", ctx)
    tmpl = re.sub(r"(?m)^(bind|port|dir|logfile|pidfile) .*$", "", tmpl)
    with socket.socket() as probe:  # a throwaway loopback port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base = tmpl + f"bind 127.0.0.1\nport {port}\ndir {tmp_path}\n"
    (tmp_path / "bad.conf").write_text(base + f"sentinel frobnicate {ctx['redis']['master_name']} 1\n")
    (tmp_path / "good.conf").write_text(base)
    rc, out = _start(["redis-sentinel", str(tmp_path / "bad.conf")], tmp_path, lambda: _port_open(port))
    assert rc not in (None, 0) and "Unrecognized sentinel configuration statement" in out, out
    rc, out = _start(["redis-sentinel", str(tmp_path / "good.conf")], tmp_path, lambda: _port_open(port))
    assert rc is None, out


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_dropin_include_wins_over_values_a_config_rewrite_copied(tmp_path: Path) -> None:
    # Sentinel makes Redis CONFIG REWRITE redis.conf; the rewrite copies requirepass and
    # maxmemory into it, after the include lines. The drop-in passes the include files
    # again on the command line, so the files written at boot still win.
    ctx = data_hosts("prod")["data-1"]
    boot = boot_files(tmp_path / "boot")
    conf = render_template("data/redis.conf", ctx)
    conf = re.sub(r"(?m)^(bind|port|dir|logfile|pidfile) .*$", "", conf)
    conf = conf.replace("/etc/redis/hpc-secrets.conf", str(boot["redis_secrets"]))
    conf = conf.replace("/etc/redis/hpc-memory.conf", str(boot["redis_mem"]))
    conf += f"bind 127.0.0.1\nport 0\nunixsocket {tmp_path}/r.sock\ndir {tmp_path}\n"
    conf += '\n# Generated by CONFIG REWRITE\nmaxmemory 1mb\nrequirepass "stale"\nmasterauth "stale"\n'
    (tmp_path / "redis.conf").write_text(conf)
    argv = _exec_start(render_template("data/hpc-redis.conf", ctx))
    argv = [
        a.replace("/etc/redis/redis.conf", str(tmp_path / "redis.conf"))
        .replace("/etc/redis/hpc-secrets.conf", str(boot["redis_secrets"]))
        .replace("/etc/redis/hpc-memory.conf", str(boot["redis_mem"]))
        for a in argv
    ]
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        sock = ["redis-cli", "-s", str(tmp_path / "r.sock"), "--no-auth-warning"]
        assert _wait(lambda: (tmp_path / "r.sock").exists(), 5)
        ping = subprocess.run(sock + ["-a", PASSWORD, "PING"], capture_output=True, text=True).stdout.strip()
        stale = subprocess.run(sock + ["-a", "stale", "PING"], capture_output=True, text=True).stdout.strip()
        mm = subprocess.run(sock + ["-a", PASSWORD, "CONFIG", "GET", "maxmemory"], capture_output=True, text=True)
        assert ping == "PONG" and stale != "PONG"
        assert mm.stdout.split()[-1] == str(400 * 1024 * 1024)
    finally:
        p.terminate()
        p.wait(timeout=10)
    # negative twin: started without the command-line includes, the stale values win
    p = subprocess.Popen(argv[:2], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _wait(
            lambda: subprocess.run(
                ["redis-cli", "-s", str(tmp_path / "r.sock"), "--no-auth-warning", "-a", "stale", "PING"],
                capture_output=True,
                text=True,
            ).stdout.strip()
            == "PONG",
            5,
        )
    finally:
        p.terminate()
        p.wait(timeout=10)


# --------------------------------------------------------------------------------------
# systemd units and drop-ins
# --------------------------------------------------------------------------------------

BASE_UNITS = [
    "mariadb.service",
    "redis-server.service",
    "redis-sentinel.service",
    "prometheus-mysqld-exporter.service",
    "prometheus-redis-exporter.service",
]


def _verify(units_dir: Path, sbin: Path, names: list[str]) -> tuple[int, str]:
    cp = run_isolated(
        ["systemd-analyze", "verify", *names],
        binds={str(sbin): "/usr/local/sbin"},
        env={"SYSTEMD_UNIT_PATH": f"{units_dir}:"},
        timeout=60,
    )
    noise = ("Failed to connect to", "Cannot add dependency job")
    bad = [line for line in (cp.stdout + cp.stderr).splitlines() if line.strip() and not line.startswith(noise)]
    return cp.returncode, "\n".join(bad)


UNIT_PACKAGES = {"mariadb.service": "mariadb-server"}  # the others' package is the unit's name


def _units_tree(tmp_path: Path, ctx: dict[str, Any]) -> tuple[Path, Path, list[str]]:
    from tests.conftest import not_installed, tool

    units, sbin = tmp_path / "units", tmp_path / "sbin"
    units.mkdir()
    sbin.mkdir()
    for s in DATA_SCRIPTS:
        shutil.copy(SCRIPTS / s, sbin / s)
    names = []
    for f in manifest()["files"]:
        if not f["dest"].startswith("/etc/systemd/system/"):
            continue
        rel = f["dest"][len("/etc/systemd/system/") :]
        text = render_template(f["src"], ctx)
        for exe in ("/usr/bin/prometheus-mysqld-exporter", "/usr/bin/prometheus-redis-exporter"):
            if exe in text and tool(exe, os.path.basename(exe)) is None:  # not installed here: same check, another binary
                text = text.replace(exe, "/bin/true")
        (units / rel).parent.mkdir(parents=True, exist_ok=True)
        (units / rel).write_text(text)
        if "/" not in rel:
            names.append(rel)
    for base in BASE_UNITS:  # the packages' units the drop-ins extend
        src = Path("/lib/systemd/system") / base
        package = UNIT_PACKAGES.get(base, base.removesuffix(".service"))
        if not src.exists():
            not_installed(str(src), package)
        text = src.read_text() if src.exists() else "[Service]\nExecStart=/bin/true\n"
        for exe in re.findall(r"ExecStart=(/\S+)", text):
            if tool(exe, package) is None:
                text = text.replace(exe, "/bin/true")
        (units / base).write_text(text)
        names.append(base)
    return units, sbin, names


@pytest.mark.skipif(shutil.which("systemd-analyze") is None or not can_isolate(), reason="needs systemd-analyze, root")
def test_units_and_dropins_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    ctx = data_hosts("prod")["data-1"]
    units, sbin, names = _units_tree(tmp_path, ctx)
    assert len(names) >= 9
    rc, bad = _verify(units, sbin, names)
    assert rc == 0 and not bad, bad
    # negative twin: a misspelt key in a drop-in is reported
    dropin = units / "redis-server.service.d" / "hpc-redis.conf"
    dropin.write_text(dropin.read_text().replace("ConditionPathExists=", "ConditionPathExist="))
    rc, bad = _verify(units, sbin, ["redis-server.service"])
    assert "Unknown key" in bad and "ConditionPathExist" in bad


def test_host_scripts_compile_and_answer_help() -> None:
    for s in DATA_SCRIPTS:
        path = SCRIPTS / s
        assert path.read_text().startswith("#!/usr/bin/env python3\n")
        cp = subprocess.run(["python3", str(path), "--help"], capture_output=True, text=True, timeout=30)
        assert cp.returncode == 0 and "usage:" in cp.stdout, (s, cp.stderr)
    assert len(DATA_SCRIPTS) == 7


# --------------------------------------------------------------------------------------
# Failover settings: each value and why
# --------------------------------------------------------------------------------------


def _period(value: str) -> float:
    """An ISO 8601 period as Galera writes it (PT3S, PT0.5S, PT1M) in seconds."""
    m = re.fullmatch(r"PT(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?", value)
    assert m and value != "PT", f"not a Galera period: {value!r}"
    return int(m.group(1) or 0) * 60 + float(m.group(2) or 0)


def provider_options(cnf: str) -> dict[str, str]:
    m = re.search(r'^wsrep_provider_options = "(.*)"$', cnf, re.M)
    assert m, "wsrep_provider_options missing"
    return dict(kv.split("=", 1) for kv in m.group(1).split(";"))


def test_galera_drops_a_silent_node_within_4s_with_timeouts_inside_galeras_limits() -> None:
    for _stack, name, ctx in all_data_hosts():
        opts = provider_options(render_template("data/65-hpc-galera.cnf", ctx))
        keepalive, suspect = _period(opts["evs.keepalive_period"]), _period(opts["evs.suspect_timeout"])
        check, inactive = _period(opts["evs.inactive_check_period"]), _period(opts["evs.inactive_timeout"])
        install = _period(opts["evs.install_timeout"])
        # Galera's own range checks (gcomm evs::Proto) and its documented ordering
        assert 0.1 <= keepalive <= suspect / 3, name
        assert check <= suspect / 2, name
        assert suspect <= inactive, name
        assert keepalive <= install <= inactive, name
        # the writer target is 5 s: detection + one check period leaves room for the view change
        assert suspect + check <= 4, name
        assert opts["gcache.size"] == "1G" and opts["gcache.recover"] == "yes"  # IST after a false suspicion


def test_galera_flushes_every_commit_because_nodes_crashing_in_quick_succession_lose_acked_writes() -> None:
    for _stack, name, ctx in all_data_hosts():
        cnf = render_template("data/65-hpc-galera.cnf", ctx)
        mysqld = cnf.split("[galera]")[0]
        for line in ("innodb_flush_log_at_trx_commit = 1", "sync_binlog = 1", "innodb_doublewrite = 1"):
            assert f"\n{line}\n" in mysqld, (name, line)
        assert not re.search(r"^log[_-]bin\b", cnf, re.M)  # binary log off: Galera does not need it


@needs_mariadbd
def test_mariadbd_sees_the_durability_settings_after_every_fragment(tmp_path: Path) -> None:
    """The effective values after 70-hpc-memory.cnf and 99-hpc-sst-auth.cnf: no later file
    weakens them."""
    ctx = data_hosts("prod")["data-2"]
    boot = boot_files(tmp_path / "boot", total_mib=16384)
    cnf = tmp_path / "my.cnf"
    cnf.write_text(combined_cnf(ctx, boot))
    ok, err, values = mariadbd_check(cnf)
    assert ok, err
    assert values["innodb-flush-log-at-trx-commit"] == "1"
    assert values["sync-binlog"] == "1"
    assert values["innodb-doublewrite"] == "TRUE"
    # room for every app host's share of connections (portal.env DB_CONNECTIONS_PER_HOST)
    assert values["max-connections"] == str(ctx["galera"]["max_connections"]) != "151"
    assert values["wsrep-provider-options"] == re.search(
        r'^wsrep_provider_options = "(.*)"$', render_template("data/65-hpc-galera.cnf", ctx), re.M
    ).group(1)  # type: ignore[union-attr]
    # negative twin: a later fragment that relaxes the flush is what this check would see
    cnf.write_text(combined_cnf(ctx, boot) + "[mysqld]\ninnodb_flush_log_at_trx_commit = 2\n")
    assert mariadbd_check(cnf)[2]["innodb-flush-log-at-trx-commit"] == "2"


def test_sentinel_fails_over_after_2s_because_redis_never_stalls_that_long() -> None:
    for _stack, name, ctx in all_data_hosts():
        tmpl = render_template("data/sentinel.conf.tmpl", ctx)
        m = ctx["redis"]["master_name"]
        down = int(re.search(rf"^sentinel down-after-milliseconds {m} (\d+)$", tmpl, re.M).group(1))  # type: ignore[union-attr]
        timeout = int(re.search(rf"^sentinel failover-timeout {m} (\d+)$", tmpl, re.M).group(1))  # type: ignore[union-attr]
        assert down == 2000, name
        assert 3 * down <= timeout <= 10000, name  # promotion fits; a failed attempt retries within 2 x timeout
        conf = render_template("data/redis.conf", ctx)
        # what keeps the main thread answering PING within 2 s: fsync off the main
        # thread, none while a fork child writes, the children sync as they go
        for line in ("appendfsync everysec", "no-appendfsync-on-rewrite yes",
                     "aof-rewrite-incremental-fsync yes", "rdb-save-incremental-fsync yes"):
            assert f"\n{line}\n" in conf, (name, line)


def test_isolated_redis_master_refuses_writes_within_4s_but_not_while_replicas_ack_each_second() -> None:
    for _stack, name, ctx in all_data_hosts():
        conf = render_template("data/redis.conf", ctx)
        if len(ctx["redis"]["nodes"]) == 1:
            assert "min-replicas-to-write" not in conf, name  # no replica to wait for
            continue
        lag = int(re.search(r"^min-replicas-max-lag (\d+)$", conf, re.M).group(1))  # type: ignore[union-attr]
        assert "\nmin-replicas-to-write 1\n" in conf
        # isolated master: refuses after max-lag, whole seconds (+1), and the 1 s recount (+1);
        # the drills' documented session window (rehearsal/drills/base.py) ends there
        assert lag + 2 <= 4, name
        assert lag >= 2, name  # replicas ack every second: an ack age of 1 s is normal


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_redis_server_accepts_the_stall_avoiding_settings(tmp_path: Path) -> None:
    ctx = data_hosts("prod")["data-1"]
    boot = boot_files(tmp_path / "boot")
    conf = render_template("data/redis.conf", ctx)
    conf = re.sub(r"(?m)^(bind|port|dir|logfile|pidfile|replicaof) .*$", "", conf)
    conf = conf.replace("/etc/redis/hpc-secrets.conf", str(boot["redis_secrets"]))
    conf = conf.replace("/etc/redis/hpc-memory.conf", str(boot["redis_mem"]))
    conf += f"bind 127.0.0.1\nport 0\nunixsocket {tmp_path}/r.sock\ndir {tmp_path}\n"
    (tmp_path / "redis.conf").write_text(conf)
    p = subprocess.Popen(["redis-server", str(tmp_path / "redis.conf")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _wait(lambda: (tmp_path / "r.sock").exists(), 5)
        cli = ["redis-cli", "-s", str(tmp_path / "r.sock"), "--no-auth-warning", "-a", PASSWORD]
        got = {}
        for key in ("no-appendfsync-on-rewrite", "appendfsync", "min-replicas-max-lag", "min-replicas-to-write",
                    "aof-rewrite-incremental-fsync", "rdb-save-incremental-fsync"):
            out = subprocess.run(cli + ["CONFIG", "GET", key], capture_output=True, text=True, timeout=10).stdout.split()
            got[key] = out[-1] if out else None
        assert got == {"no-appendfsync-on-rewrite": "yes", "appendfsync": "everysec", "min-replicas-max-lag": "2",
                       "min-replicas-to-write": "1", "aof-rewrite-incremental-fsync": "yes",
                       "rdb-save-incremental-fsync": "yes"}
    finally:
        p.terminate()
        p.wait(timeout=10)


def _mysql(sock: str, query: str, timeout: float = 60) -> tuple[int, str]:
    cp = subprocess.run(["mariadb", "--no-defaults", "-S", sock, "-uroot", "-N", "-B", "-e", query],
                        capture_output=True, text=True, timeout=timeout)
    return cp.returncode, (cp.stdout + cp.stderr).strip()


def _wsrep(sock: str, var: str) -> str | None:
    try:
        rc, out = _mysql(sock, f"SHOW GLOBAL STATUS LIKE '{var}'", timeout=10)
    except subprocess.TimeoutExpired:
        return None
    return out.split("\t")[-1] if rc == 0 and "\t" in out else None


def live_galera_failover(spec: dict[str, Any]) -> dict[str, Any]:
    """Inside the namespace: the broken twin must not start; then a 3-node cluster, the
    writer frozen with SIGSTOP (a host that vanishes: no FIN, no RST), and the time until a
    write on the next node commits and that node sees 2 members."""
    out: dict[str, Any] = {}
    broken = spec["broken"]
    log = Path(broken["dir"], "error.log")
    out["broken"] = {"rcs": [], "log": ""}
    # Galera reports the range error from its gcomm thread; now and then the main thread
    # reports that thread's exit instead ("Failed to read thread schedparams"). Each start
    # fails either way; a few tries show the range error itself.
    for _ in range(5):
        log.unlink(missing_ok=True)
        cp = subprocess.run(["mariadbd", f"--defaults-file={broken['cnf']}", "--user=mysql", "--wsrep-new-cluster"],
                            capture_output=True, text=True, timeout=120)
        out["broken"]["rcs"].append(cp.returncode)
        out["broken"]["log"] = log.read_text()[-3000:] if log.exists() else cp.stderr[-3000:]
        if "out of range" in out["broken"]["log"]:
            break
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i, n in enumerate(spec["nodes"]):
            argv = ["mariadbd", f"--defaults-file={n['cnf']}", "--user=mysql"] + (["--wsrep-new-cluster"] if i == 0 else [])
            with open(Path(n["dir"], "mariadbd.out"), "w") as f:
                procs.append(subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT))
            if not _wait(lambda n=n: _wsrep(n["sock"], "wsrep_local_state") == "4", 120):
                out["error"] = f"{n['name']} not Synced: " + Path(n["dir"], "error.log").read_text()[-3000:]
                return out
        writer, nxt = spec["nodes"][0]["sock"], spec["nodes"][1]["sock"]
        out["options"] = _mysql(nxt, "SELECT @@wsrep_provider_options")[1]
        out["size_before"] = _wsrep(nxt, "wsrep_cluster_size")
        rc, msg = _mysql(writer, "CREATE DATABASE fo; CREATE TABLE fo.t (id INT AUTO_INCREMENT PRIMARY KEY, v INT)")
        assert rc == 0, msg
        time.sleep(2)
        t0 = time.monotonic()
        procs[0].send_signal(signal.SIGSTOP)
        out["write"] = _mysql(nxt, "INSERT INTO fo.t (v) VALUES (1)")
        out["write_s"] = round(time.monotonic() - t0, 2)
        _wait(lambda: _wsrep(nxt, "wsrep_cluster_size") == "2", 60)
        out["size2_s"] = round(time.monotonic() - t0, 2)
        out["status_after"] = _wsrep(nxt, "wsrep_cluster_status")
        return out
    finally:
        if procs:
            procs[0].kill()
        for p in procs[1:]:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _galera_node(base: Path, ctx: dict[str, Any], options: dict[str, str] | None = None) -> dict[str, str]:
    """The rendered 65-hpc-galera.cnf plus test-only paths. The three nodes share one
    namespace, so Galera listens on the node's own address; rsync SST (no SST account
    needed) and a small gcache and buffer pool keep the test short."""
    name, ip = ctx["host"]["name"], ctx["host"]["ip"]
    d = base / name
    (d / "data").mkdir(parents=True)
    cnf = render_template("data/65-hpc-galera.cnf", ctx)
    opts = options or provider_options(cnf)
    opts = {**opts, "gcache.size": "32M", "gmcast.listen_addr": f"tcp://{ip}:4567"}
    joined = ";".join(f"{k}={v}" for k, v in opts.items())
    cnf += (f"\n[mysqld]\ndatadir = {d}/data\nsocket = {d}/mysqld.sock\npid-file = {d}/mysqld.pid\n"
            f"log_error = {d}/error.log\ntmpdir = {d}\ninnodb_buffer_pool_size = 64M\n"
            f'[galera]\nwsrep_provider_options = "{joined}"\nwsrep_sst_method = rsync\n')
    (d / "my.cnf").write_text(cnf)
    for p in (base, d, d / "data"):
        shutil.chown(p, "mysql", "mysql")
    return {"name": name, "dir": str(d), "cnf": str(d / "my.cnf"), "sock": str(d / "mysqld.sock")}


def _install_db(node: dict[str, str]) -> None:
    cp = subprocess.run(["mariadb-install-db", f"--defaults-file={node['cnf']}", "--user=mysql",
                         f"--datadir={node['dir']}/data", "--skip-test-db"], capture_output=True, text=True, timeout=180)
    assert cp.returncode == 0, cp.stdout[-2000:] + cp.stderr[-2000:]


@pytest.mark.daemons
@pytest.mark.skipif(
    not can_isolate() or shutil.which("mariadbd") is None or not os.path.exists(GALERA_PROVIDER)
    or shutil.which("rsync") is None,
    reason="needs root, unshare, mariadbd, galera-4 and rsync",
)
def test_live_galera_keeps_committing_within_5s_after_the_writer_freezes() -> None:
    ctxs = data_hosts("prod")
    assert len(ctxs) == 3
    # mariadbd runs as mysql: a directory it can reach (pytest's tmp_path is root-only)
    base = Path(tempfile.mkdtemp(prefix="hpc-galera-failover-", dir="/tmp"))
    try:
        base.chmod(0o755)
        res = _galera_failover_run(base, ctxs)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    first = ctxs[sorted(ctxs)[0]]
    assert all(rc != 0 for rc in res["broken"]["rcs"]), res["broken"]
    assert "parameter 'evs.keepalive_period' value PT2S is out of range" in res["broken"]["log"], res["broken"]
    assert "error" not in res, res["error"]
    want = provider_options(render_template("data/65-hpc-galera.cnf", first))
    for key in ("evs.keepalive_period", "evs.suspect_timeout", "evs.inactive_check_period",
                "evs.inactive_timeout", "evs.install_timeout"):
        assert f"{key} = {want[key]};" in res["options"], key  # Galera runs with the rendered value
    assert res["size_before"] == "3"
    assert res["write"][0] == 0, res["write"]
    assert res["status_after"] == "Primary" and res["size2_s"] < 30, res
    # ~3.5 s here (5.2-5.4 s with Galera's default 5 s suspect timeout); the ceiling only
    # catches a cluster that waits for the frozen node much longer than it should.
    assert res["write_s"] <= 10, res


def _galera_failover_run(base: Path, ctxs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (base / "cluster").mkdir()
    (base / "broken").mkdir()
    nodes = [_galera_node(base / "cluster", ctxs[n]) for n in sorted(ctxs)]
    _install_db(nodes[0])
    # negative twin: a keepalive longer than a third of the suspect timeout is refused by
    # Galera at start-up (mariadbd --help does not load the provider, so only this sees it)
    first = ctxs[sorted(ctxs)[0]]
    bad = {**provider_options(render_template("data/65-hpc-galera.cnf", first)), "evs.keepalive_period": "PT2S"}
    broken = _galera_node(base / "broken", first, bad)
    _install_db(broken)
    spec = base / "spec.json"
    spec.write_text(json.dumps({"nodes": nodes, "broken": broken}))
    cp = run_isolated([sys.executable, __file__, "live-galera-failover", str(spec)],
                      extra_ips=[c["host"]["ip"] for c in ctxs.values()], timeout=400)
    assert cp.returncode == 0, cp.stderr[-3000:]
    return dict(json.loads(cp.stdout.strip().splitlines()[-1]))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] in ("live-redis", "live-galera-failover"):
        driver = {"live-redis": live_redis, "live-galera-failover": live_galera_failover}[sys.argv[1]]
        print(json.dumps(driver(json.loads(Path(sys.argv[2]).read_text()))))
        sys.exit(0)
    sys.exit(f"usage: {sys.argv[0]} live-redis|live-galera-failover SPEC.json")
