"""Slurm tier: the rendered files are accepted by the Slurm daemons that read them.

Checked here with Debian 12's Slurm 22.05 (the hosts run Ubuntu 24.04's 23.11; the
configs use only keys and plugins both versions have):
- slurm.conf of every host parses (`scontrol show hostnames`);
- on each controller, slurmctld starts with that exact file, in a namespace with the
  controller's hostname and IP, munged, and slurmdbd with the rendered slurmdbd.conf
  completed by hpc-slurm-boot from a password secret (the primary with MariaDB: it
  registers the cluster; the backup's slurmdbd reaches standby as DbdBackupHost): the
  primary reaches "Running as primary controller", a backup reaches standby;
- the systemd units and drop-ins pass `systemd-analyze verify`;
- the rendered boot script passes shellcheck.
Each checker also rejects a deliberately broken rendering.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from cloud_init.templating import _ENV, SCRIPTS, TEMPLATES, render_template
from components.stackfile import stack_files
from offline.contexts import contexts
from tests.nsrun import can_isolate, run_isolated

STACKS = tuple(sorted(stack_files()))  # every Pulumi.<stack>.yaml
MANIFEST = TEMPLATES / "slurm" / "manifest.yaml"
needs_ns = pytest.mark.skipif(not can_isolate(), reason="needs root and unshare for namespaces")


def manifest() -> dict[str, Any]:
    return yaml.safe_load(MANIFEST.read_text())


def host_gets(entry: dict[str, Any], ctx: dict[str, Any]) -> bool:
    """The manifest's selection: any of the roles, and the `when` condition if any."""
    roles = set(entry["roles"])
    if not ("all" in roles or roles & set(ctx["host"]["roles"])):
        return False
    return bool(_ENV.compile_expression(entry["when"])(**ctx)) if "when" in entry else True


def rendered(src: str) -> list[tuple[str, str, dict[str, Any], str]]:
    """(stack, host, ctx, text) for every host that gets template `src`."""
    entry = next(f for f in manifest()["files"] if f.get("src") == src)
    out = []
    for stack in STACKS:
        for name, ctx in sorted(contexts(stack).items()):
            if host_gets(entry, ctx):
                out.append((stack, name, ctx, render_template(src, ctx)))
    return out


def slurm_or_app_hosts(stack: str) -> list[str]:
    return [n for n, c in contexts(stack).items() if {"slurm", "app"} & set(c["host"]["roles"])]


def controllers(stack: str) -> list[tuple[str, dict[str, Any]]]:
    ctxs = contexts(stack)
    names = [c["name"] for c in next(iter(ctxs.values()))["slurm"]["controllers"]]
    return [(n, ctxs[n]) for n in names]


def with_compute_nodes(ctx: dict[str, Any]) -> dict[str, Any]:
    """The same host with compute nodes and a partition in the stack config (the stacks
    in the repository have none yet, which renders a placeholder node instead)."""
    ctx = copy.deepcopy(ctx)
    ctx["slurm"]["nodes"] = [{"NodeName": "cn[001-004]", "CPUs": 32, "RealMemory": 128000, "State": "UNKNOWN"}]
    ctx["slurm"]["partitions"] = [{"PartitionName": "batch", "Nodes": "cn[001-004]", "Default": "YES",
                                   "MaxTime": "INFINITE", "State": "UP"}]
    return ctx


# ---------------------------------------------------------------------------- manifest


def test_manifest_lists_existing_files_with_known_roles():
    m = manifest()
    known_roles = {"all", "lb", "web", "app", "data", "slurm", "monitoring"}
    dests = set()
    assert len(m["files"]) > 0
    for f in m["files"]:
        if "src" in f:
            assert (TEMPLATES / f["src"]).is_file(), f["src"]
        else:
            assert (SCRIPTS / f["script"]).is_file(), f["script"]
            assert os.access(SCRIPTS / f["script"], os.X_OK), f"{f['script']} is not executable"
        assert set(f["roles"]) <= known_roles
        assert re.fullmatch(r"0[0-7]{3}", f["mode"])
        assert f["dest"] not in dests, f"two entries write {f['dest']}"
        dests.add(f["dest"])
    for c in m["commands"]:
        assert c["order"] == 70 and set(c["roles"]) <= known_roles


def test_no_secret_reaches_a_template():
    """slurmdbd.conf is rendered without StoragePass, for every controller (slurmdbd runs
    on each, active or standby); the munge key is never rendered."""
    hosts = []
    for stack, name, ctx, text in rendered("slurm/slurmdbd.conf"):
        assert "StoragePass" not in "\n".join(line for line in text.splitlines() if not line.startswith("#"))
        assert name in [c["name"] for c in ctx["slurm"]["controllers"]]
        hosts.append(f"{stack}/{name}")
    assert len(hosts) == sum(len(controllers(s)) for s in STACKS), hosts
    entry = next(f for f in manifest()["files"] if f.get("src") == "slurm/slurmdbd.conf")
    assert entry["mode"] == "0600" and entry["secret_placeholders"] is True


# ---------------------------------------------------------------------------- slurm.conf


def _scontrol_parse(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["scontrol", "show", "hostnames", "x"], capture_output=True, text=True,
                          env={**os.environ, "SLURM_CONF": str(path)}, timeout=30)


def test_every_hosts_slurm_conf_parses(tmp_path):
    checked = 0
    for stack, name, ctx, text in rendered("slurm/slurm.conf"):
        with_nodes = render_template("slurm/slurm.conf", with_compute_nodes(ctx))
        for variant, conf in (("", text), ("-nodes", with_nodes)):
            path = tmp_path / f"{stack}-{name}{variant}.conf"
            path.write_text(conf)
            r = _scontrol_parse(path)
            assert r.returncode == 0 and r.stdout.strip() == "x", f"{stack}/{name}{variant}: {r.stderr}"
            checked += 1
    # Every slurm and app host, each with and without compute nodes.
    assert checked == 2 * sum(len(slurm_or_app_hosts(s)) for s in STACKS) and checked >= 14


def test_compute_nodes_and_partitions_render_as_configured():
    _, _, ctx, text = rendered("slurm/slurm.conf")[0]
    if not ctx["slurm"]["nodes"]:
        assert "NodeName=placeholder State=FUTURE" in text
        assert "PartitionName=batch Nodes=placeholder Default=YES MaxTime=INFINITE State=UP" in text
    text = render_template("slurm/slurm.conf", with_compute_nodes(ctx))
    assert "NodeName=cn[001-004] CPUs=32 RealMemory=128000 State=UNKNOWN\n" in text
    assert "PartitionName=batch Nodes=cn[001-004] Default=YES MaxTime=INFINITE State=UP\n" in text
    assert "placeholder" not in text


def test_slurm_conf_has_one_line_per_controller_and_the_contract_values():
    for stack, name, ctx, text in rendered("slurm/slurm.conf"):
        s = ctx["slurm"]
        lines = [line for line in text.splitlines() if line and not line.startswith("#")]
        hosts = [line for line in lines if line.startswith("SlurmctldHost=")]
        assert hosts == [f"SlurmctldHost={c['name']}({c['ip']})" for c in s["controllers"]]
        for want in (f"ClusterName={s['cluster_name']}", f"SlurmctldTimeout={s['ctld_timeout']}",
                     f"StateSaveLocation={s['state_dir']}", f"SrunPortRange={s['srun_port_range']}",
                     "AccountingStorageType=accounting_storage/slurmdbd",
                     f"AccountingStorageHost=slurmdbd.{ctx['domain']}", "AccountingStoragePort=6819",
                     "SlurmctldPort=6817", "SlurmdPort=6818", "AuthType=auth/munge",
                     "SelectType=select/cons_tres", "JobCompType=jobcomp/none"):
            assert want in lines, f"{stack}/{name}: {want} missing"
        assert any(line.startswith("NodeName=") for line in lines)
        assert any(line.startswith("PartitionName=") for line in lines)
        # Clients give up on a hung controller after 5 s; the portal looks its request id
        # up in sacct, which keeps job comments only with this flag.
        assert "MessageTimeout=5" in lines and "AccountingStoreFlags=job_comment" in lines
        backup = [line for line in lines if line.startswith("AccountingStorageBackupHost=")]
        fence = [line for line in lines if line.startswith("SlurmctldPrimaryOnProg=")]
        if len(s["controllers"]) == 2:
            # the standby slurmdbd, on the primary controller
            assert backup == [f"AccountingStorageBackupHost={s['controllers'][0]['name']}.{ctx['domain']}"]
            assert fence == ["SlurmctldPrimaryOnProg=/usr/local/sbin/hpc-slurm-fence"]
        else:  # a single controller has no peer to fence and no standby slurmdbd
            assert backup == [] and fence == []
    assert len(controllers("prod")) == 2 and len(controllers("dev")) == 1
    assert all(1 <= len(controllers(s)) <= 2 for s in STACKS)


def test_slurmdbd_conf_names_the_active_and_the_standby_slurmdbd():
    """DbdHost is the backup controller (the only one on a one-controller stack),
    DbdBackupHost the primary: a backup taking control must not wait on a slurmdbd on the
    host it replaces. The standby reaches the active one at DbdAddr, an address (short
    names do not resolve in the VPC); slurmdbd.<domain> is the active one's address."""
    checked = 0
    for stack, name, ctx, text in rendered("slurm/slurmdbd.conf"):
        ctls = ctx["slurm"]["controllers"]
        lines = [line for line in text.splitlines() if line and not line.startswith("#")]
        active = ctls[-1]
        assert f"DbdHost={active['name']}" in lines and f"DbdAddr={active['ip']}" in lines, f"{stack}/{name}"
        assert ctx["endpoints"][f"slurmdbd.{ctx['domain']}"] == active["ip"], f"{stack}/{name}"
        backup = [line for line in lines if line.startswith("DbdBackupHost=")]
        assert backup == ([f"DbdBackupHost={ctls[0]['name']}"] if len(ctls) == 2 else []), f"{stack}/{name}"
        # The standby notices a dead active one only when its idle connection breaks:
        # TCP keepalive within ~11 s (slurmdbd's own 30 s took 118 s in the slurm-host drill).
        keep = [line for line in lines if line.startswith("CommunicationParameters=")]
        assert keep == ["CommunicationParameters=keepalivetime=5,keepaliveinterval=2,keepaliveprobes=3"], \
            f"{stack}/{name}"
        checked += 1
    assert checked == sum(len(controllers(s)) for s in STACKS)


def test_fence_config_lists_the_controllers_in_slurm_conf_order():
    checked = 0
    for stack, name, ctx, text in rendered("slurm/fence.json"):
        doc = json.loads(text)
        assert doc["controllers"] == ctx["slurm"]["controllers"], f"{stack}/{name}"
        assert doc["stack"] == stack and doc["region"] == ctx["region"] and doc["slurmctld_port"] == 6817
        assert ("aws_endpoint_url" in doc) == bool(ctx["aws_endpoint_url"])
        checked += 1
    assert checked == sum(len(controllers(s)) for s in STACKS)


def test_broken_slurm_conf_is_rejected_by_scontrol(tmp_path):
    _, _, _, text = rendered("slurm/slurm.conf")[0]
    path = tmp_path / "broken.conf"
    path.write_text(text + "SlurmctldHostt=typo\n")
    r = _scontrol_parse(path)
    assert r.returncode != 0 and "unrecognized key" in r.stderr


# ------------------------------------------------------------- controllers, for real
#
# The driver runs as PID 1 of a fresh PID namespace (inside run_isolated's net, mount and
# UTS namespaces), so every daemon it starts dies with it. /run is a private tmpfs there.

DRIVER = textwrap.dedent(r"""
    set -euo pipefail
    W=$HPC_T_WORK
    mount -t tmpfs -o mode=0755 tmpfs /run
    mkdir -p /run/munge /run/mysqld /run/hpc/secrets
    chown munge:munge /run/munge
    chown mysql:mysql /run/mysqld
    cp "$W"/secrets/* /run/hpc/secrets/
    chmod 0600 /run/hpc/secrets/*

    wait_for() {  # file pattern seconds pid
        local i
        for ((i = 0; i < $3 * 10; i++)); do
            grep -qE "$2" "$1" 2>/dev/null && return 0
            kill -0 "$4" 2>/dev/null || { echo "EXITED before: $2"; return 1; }
            sleep 0.1
        done
        echo "TIMEOUT waiting for: $2"
        return 1
    }

    if [ "$HPC_T_FENCE" = yes ]; then
        # A syslog socket for hpc-slurm-fence (slurmctld closes its stdout and stderr).
        python3 -c '
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
os.chmod(sys.argv[1], 0o666)
with open(sys.argv[2], "ab", buffering=0) as f:
    while True:
        f.write(s.recv(65536) + b"\n")
' "$HPC_SYSLOG_SOCKET" "$W/syslog.log" &
        for ((i = 0; i < 50; i++)); do [ -S "$HPC_SYSLOG_SOCKET" ] && break; sleep 0.1; done
    fi

    "$HPC_T_SCRIPTS/hpc-munge-key"
    runuser -u munge -- munged --log-file="$W/munge/munged.log" --pid-file="$W/munge/munged.pid" \
        --seed-file="$W/munge/munged.seed"

    if [ "$HPC_T_ROLE" = broken ]; then
        slurmctld -D -c -f /etc/slurm/slurm.conf >"$W/slurmctld.log" 2>&1 && echo "RESULT accepted" || echo "RESULT rejected"
        exit 0
    fi
    if [ "$HPC_T_ROLE" = dbd-broken ]; then
        HPC_SLURMDBD_BASE="$W/slurmdbd.conf.base" bash "$W/hpc-slurm-boot" slurmdbd-conf
        slurmdbd -D >"$W/slurmdbd.log" 2>&1 && echo "RESULT accepted" || echo "RESULT rejected"
        exit 0
    fi

    start_mariadb() {  # what the dbwriter HAProxy leads to on a real controller
        mariadb-install-db --no-defaults --datadir="$W/db" --user=mysql --auth-root-authentication-method=normal \
            --skip-test-db >"$W/mariadb-install.log" 2>&1
        mariadbd --no-defaults --datadir="$W/db" --socket=/run/mysqld/mysqld.sock --bind-address=127.0.0.1 \
            --port=3306 --user=mysql --skip-log-bin >"$W/mariadb.log" 2>&1 &
        for ((i = 0; i < 100; i++)); do
            mariadb -uroot --socket=/run/mysqld/mysqld.sock -e 'SELECT 1' >/dev/null 2>&1 && break
            sleep 0.1
        done
        pw=$(cat /run/hpc/secrets/mariadb_slurm_password)
        pw_sql=${pw//\\/\\\\}
        pw_sql=${pw_sql//\'/\\\'}
        mariadb -uroot --socket=/run/mysqld/mysqld.sock -e \
            "CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pw_sql'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
    }

    be_the_active_dbd() {  # slurmdbd.conf naming this host the active one (DbdHost), no standby
        sed -i -e "s/^DbdHost=.*/DbdHost=$(hostname)/" -e '/^DbdBackupHost=/d' /etc/slurm/slurmdbd.conf
    }

    # This host's slurmdbd: the active one (DbdHost: the backup controller, or the only
    # one) or the standby (DbdBackupHost: the primary of two).
    if [ "$HPC_T_DBD" = active ]; then
        start_mariadb
        HPC_SLURMDBD_BASE="$W/slurmdbd.conf.base" bash "$W/hpc-slurm-boot" slurmdbd-conf
        stat -c 'slurmdbd.conf %U:%G %a' /etc/slurm/slurmdbd.conf
        grep -qx "DbdHost=$(hostname)" /etc/slurm/slurmdbd.conf && echo "RESULT dbd-host-is-me"
        slurmdbd -D >"$W/slurmdbd.log" 2>&1 &
        wait_for "$W/slurmdbd.log" 'slurmdbd version .* started' 30 $!
        echo "RESULT slurmdbd-started"
    elif [ "$HPC_T_DBD" = standby ]; then
        # The standby slurmdbd knows itself as DbdBackupHost. It never creates or converts
        # the accounting schema (the active one does), so on an empty database it exits
        # (systemd restarts it: hpc-restart.conf) ...
        start_mariadb
        HPC_SLURMDBD_BASE="$W/slurmdbd.conf.base" bash "$W/hpc-slurm-boot" slurmdbd-conf
        stat -c 'slurmdbd.conf %U:%G %a' /etc/slurm/slurmdbd.conf
        grep -qx "DbdBackupHost=$(hostname)" /etc/slurm/slurmdbd.conf && echo "RESULT dbd-backup-host-is-me"
        if timeout 30 slurmdbd -D >"$W/slurmdbd-empty.log" 2>&1; then :; fi
        grep -q 'Unable to initialize accounting_storage/mysql' "$W/slurmdbd-empty.log" && echo "RESULT standby-waits-for-schema"
        # ... until the active one has created it (done here by a slurmdbd that takes
        # this host as its DbdHost for a moment), then it accepts the same file and waits
        # for the active one in standby.
        cp -p /etc/slurm/slurmdbd.conf "$W/slurmdbd.conf.standby"
        be_the_active_dbd
        slurmdbd -D >"$W/slurmdbd-init.log" 2>&1 &
        init=$!
        wait_for "$W/slurmdbd-init.log" 'slurmdbd version .* started' 30 $init
        kill $init && wait $init || true
        cp -p "$W/slurmdbd.conf.standby" /etc/slurm/slurmdbd.conf
        slurmdbd -D >"$W/slurmdbd-standby.log" 2>&1 &
        standby=$!
        wait_for "$W/slurmdbd-standby.log" 'slurmdbd running in background mode' 30 $standby
        echo "RESULT slurmdbd-standby"
        if [ "$HPC_T_ROLE" = primary ]; then
            # The active slurmdbd is on the other controller, which is not in this
            # namespace: the primary slurmctld below needs one, so this host stands in
            # for it (slurmdbd.<domain> resolves to this host here).
            kill $standby && wait $standby || true
            be_the_active_dbd
            slurmdbd -D >"$W/slurmdbd.log" 2>&1 &
            wait_for "$W/slurmdbd.log" 'slurmdbd version .* started' 30 $!
        fi
    fi

    guard_args=(--state-dir /slurm/state --slurm-user slurm --first-init-record "$W/first-init")
    [ "$HPC_T_ROLE" = primary ] && guard_args+=(--allow-first-init)
    python3 "$HPC_T_SCRIPTS/hpc-slurm-state-guard" "${guard_args[@]}" || echo "RESULT guard-refused"

    slurmctld -D -c -f /etc/slurm/slurm.conf >"$W/slurmctld.log" 2>&1 &
    ctld=$!
    if [ "$HPC_T_ROLE" = primary ]; then
        wait_for "$W/slurmctld.log" 'Running as primary controller' 40 $ctld
        echo "RESULT primary"
        for ((i = 0; i < 50; i++)); do
            scontrol ping 2>/dev/null | grep -q "at $(hostname) is UP" && break
            sleep 0.2
        done
        python3 "$HPC_T_SCRIPTS/hpc-slurm-metrics" --output "$W/slurm.prom" --timeout 10
        echo "RESULT metrics"
        sacctmgr -n -P show cluster format=cluster 2>&1 | sed 's/^/CLUSTER /'
        if [ "$HPC_T_PORTAL" = yes ]; then
            python3 "$W/portal_check.py" "$HPC_T_SCRIPTS" 2>&1 | sed 's/^/PORTAL /'
        fi
        if [ "$HPC_T_FENCE" = yes ]; then
            # slurmctld ran SlurmctldPrimaryOnProg as the slurm user when it took control.
            wait_for "$W/slurmctld.log" 'SlurmctldPrimaryOnProg (exit status|completed)' 40 $ctld
            grep -a 'hpc-slurm-fence' "$W/syslog.log" | sed 's/^/FENCE /' || true
        fi
    else
        wait_for "$W/slurmctld.log" 'running in background mode|Running as backup' 40 $ctld
        echo "RESULT backup"
    fi
""")


# The portal's idempotent submission against this controller: the request id becomes the
# job's comment, a second submission with it finds the job in squeue, and once the job has
# ended slurmctld sends the comment with its completion record (only with
# AccountingStoreFlags=job_comment), so sacct has it when squeue forgets the job.
PORTAL_CHECK = textwrap.dedent(r"""
    import json
    import sys
    import time
    from importlib.machinery import SourceFileLoader

    portal = SourceFileLoader("portal_standin", sys.argv[1] + "/portal_standin.py").load_module()
    first = portal.submit_job("req-ns-1", "portal-check", 60)
    again = portal.submit_job("req-ns-1", "portal-check", 60)
    pending = portal.slurm(["sacct", "--noheader", "--parsable2", "--allusers", "--allocations",
                            "--starttime=now-1days", "--format=JobID,Comment"])[1]
    portal.slurm(["scancel", first[1]["job_id"]])
    out = ""
    for _ in range(100):
        rc, out = portal.slurm(["sacct", "--noheader", "--parsable2", "--allusers", "--allocations",
                                "--starttime=now-1days", "--format=JobID,Comment"])
        if "|req-ns-1" in out:
            break
        time.sleep(0.2)
    print(json.dumps({"first": first, "again": again, "sacct_pending": pending, "sacct": out}))
""")


@pytest.fixture(scope="module")
def state_mountpoint():
    """The namespaces bind private directories over /slurm/state (named by slurm.conf),
    /etc/slurm and /etc/munge, so those paths must exist on this machine. Whatever is
    missing is created here and removed afterwards."""
    created = []
    for p in (Path("/slurm"), Path("/slurm/state"), Path("/etc/slurm"), Path("/etc/munge")):
        if not p.exists():
            p.mkdir()
            created.append(p)
    yield Path("/slurm/state")
    for p in reversed(created):
        p.rmdir()


class Controller:
    """A world-readable scratch tree for one namespace (the daemons run as slurm, munge
    and mysql users, which cannot enter pytest's 0700 tmp directories)."""

    def __init__(self, ctx: dict[str, Any], slurm_conf: str, role: str, dbd_base: str | None = None):
        self.ctx, self.role = ctx, role
        self.work = Path(tempfile.mkdtemp(prefix="hpc-slurm-check-", dir="/tmp"))
        self.work.chmod(0o755)
        for d in ("secrets", "etc-slurm", "etc-munge", "state", "db", "munge"):
            (self.work / d).mkdir()
            (self.work / d).chmod(0o755)
        shutil.chown(self.work / "state", "slurm", "slurm")
        shutil.chown(self.work / "db", "mysql", "mysql")
        shutil.chown(self.work / "munge", "munge", "munge")
        (self.work / "etc-slurm" / "slurm.conf").write_text(slurm_conf)
        (self.work / "secrets" / "munge_key").write_text(
            subprocess.run(["base64"], input=os.urandom(1024), capture_output=True, check=True).stdout.decode())
        # A password that needs every escape slurmdbd.conf has: '#', a backslash, a space.
        (self.work / "secrets" / "mariadb_slurm_password").write_text("Sl#rm\\pa ss-7\n")
        (self.work / "slurmdbd.conf.base").write_text(dbd_base or render_template("slurm/slurmdbd.conf", ctx))
        (self.work / "hpc-slurm-boot").write_text(render_template("slurm/hpc-slurm-boot", ctx))

    def run(self, state_dir: Path) -> subprocess.CompletedProcess[str]:
        s = self.ctx["slurm"]
        # hpc-slurm-fence at the path slurm.conf names (SlurmctldPrimaryOnProg), its
        # config where the environment says (slurmctld passes no arguments).
        sbin = self.work / "sbin"
        sbin.mkdir(exist_ok=True)
        sbin.chmod(0o755)
        shutil.copy(SCRIPTS / "hpc-slurm-fence", sbin / "hpc-slurm-fence")
        (self.work / "fence.json").write_text(render_template("slurm/fence.json", self.ctx))
        (self.work / "portal_check.py").write_text(PORTAL_CHECK)
        hosts = {h["name"]: h["ip"] for h in self.ctx["hosts"]}
        hosts.update(self.ctx["endpoints"])  # the private zone's names (slurmdbd.<domain>, ...)
        if self.role == "primary" and self.dbd_role() == "standby":
            # The driver makes this host's slurmdbd stand in for the active one (on the
            # backup controller, not in this namespace).
            hosts[f"slurmdbd.{self.ctx['domain']}"] = self.ctx["host"]["ip"]
        # Compute nodes get addresses too: slurmctld resolves them at startup.
        for n in s["nodes"]:
            expanded = subprocess.run(["scontrol", "show", "hostnames", n["NodeName"]],
                                      capture_output=True, text=True, check=True,
                                      env={**os.environ, "SLURM_CONF": str(self.work / "etc-slurm" / "slurm.conf")},
                                      ).stdout.split()
            for i, node in enumerate(expanded):
                hosts.setdefault(node, f"10.250.0.{i + 1}")
        (self.work / "driver.sh").write_text(DRIVER)
        cmd = ["timeout", "-s", "KILL", "90", "unshare", "--pid", "--fork", "--kill-child", "--mount-proc",
               "bash", str(self.work / "driver.sh")]
        return run_isolated(
            cmd, hosts=hosts, hostname=self.ctx["host"]["name"], extra_ips=[self.ctx["host"]["ip"]],
            binds={str(self.work / "state"): str(state_dir), str(self.work / "etc-slurm"): "/etc/slurm",
                   str(self.work / "etc-munge"): "/etc/munge", str(sbin): "/usr/local/sbin"},
            env={"HPC_T_WORK": str(self.work), "HPC_T_SCRIPTS": str(SCRIPTS), "HPC_T_ROLE": self.role,
                 "HPC_SLURMDBD_OWNER": "slurm:slurm",
                 "HPC_T_DBD": self.dbd_role(),
                 "HPC_T_FENCE": "yes" if len(s["controllers"]) > 1 else "no",
                 # jobs are accepted only with real compute nodes configured
                 "HPC_T_PORTAL": "yes" if s["nodes"] else "no",
                 "HPC_SLURM_FENCE_CONFIG": str(self.work / "fence.json"),
                 "HPC_SYSLOG_SOCKET": str(self.work / "syslog.sock"),
                 # hpc_aws.py (/usr/local/lib/hpc on a host); no IMDS in the namespace
                 "PYTHONPATH": str(SCRIPTS), "HPC_IMDS_URL": "http://127.0.0.1:1"},
            timeout=120,
        )

    def dbd_role(self) -> str:
        """This host's slurmdbd as the context says: active, standby or none."""
        s, me = self.ctx["slurm"], self.ctx["host"]["name"]
        if s["slurmdbd_standby"] and s["slurmdbd_standby"]["name"] == me:
            return "standby"
        return "active" if s["slurmdbd_host"]["name"] == me else "none"

    def log(self, name: str) -> str:
        p = self.work / name
        return p.read_text(errors="replace")[-4000:] if p.exists() else f"({name} missing)"

    def cleanup(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)


@needs_ns
@pytest.mark.daemons
@pytest.mark.parametrize("stack,nodes", [(s, False) for s in STACKS] + [("prod", True)],
                         ids=[*STACKS, "prod-with-compute-nodes"])
def test_controllers_start_with_the_rendered_configs(stack, nodes, state_mountpoint):
    ctxs = contexts(stack)
    ctls = controllers(stack)
    if nodes:
        ctxs = {n: with_compute_nodes(c) for n, c in ctxs.items()}
        ctls = [(n, ctxs[n]) for n, _ in ctls]
    primary_name, primary_ctx = ctls[0]
    # slurmdbd.conf names the backup controller (the last) as the active slurmdbd, the
    # primary as the standby.
    dbd = render_template("slurm/slurmdbd.conf", primary_ctx)
    assert f"DbdHost={ctls[-1][0]}\n" in dbd
    assert (f"DbdBackupHost={primary_name}\n" in dbd) == (len(ctls) == 2)
    started = 0
    for i, (name, ctx) in enumerate(ctls):
        slurm_conf = render_template("slurm/slurm.conf", ctxs[name])
        c = Controller(ctx, slurm_conf, "primary" if i == 0 else "backup")
        try:
            r = c.run(state_mountpoint)
            detail = f"{stack}/{name}\n{r.stdout}\n{r.stderr}\nslurmctld:\n{c.log('slurmctld.log')}"
            assert "slurmdbd.conf slurm:slurm 600" in r.stdout, detail
            if c.dbd_role() == "active":
                detail += f"\nslurmdbd:\n{c.log('slurmdbd.log')}"
                assert "RESULT dbd-host-is-me" in r.stdout, detail
                assert "RESULT slurmdbd-started" in r.stdout, detail
            else:
                detail += f"\nslurmdbd:\n{c.log('slurmdbd-empty.log')}\n{c.log('slurmdbd-standby.log')}"
                assert c.dbd_role() == "standby" and i == 0 and len(ctls) == 2, detail
                assert "RESULT dbd-backup-host-is-me" in r.stdout, detail
                assert "RESULT standby-waits-for-schema" in r.stdout, detail
                assert "RESULT slurmdbd-standby" in r.stdout, detail
            if i == 0:
                assert "RESULT primary" in r.stdout, detail
                assert "RESULT guard-refused" not in r.stdout, detail
                assert (c.work / "state" / ".hpc-slurm-state").is_file(), "the guard wrote no marker"
                # The metrics collector read the real commands' output.
                prom = (c.work / "slurm.prom").read_text()
                if nodes:  # four configured nodes, none has registered yet
                    assert 'hpc_slurm_nodes{state="unknown"} 4' in prom, prom
                assert f'hpc_slurm_controller_up{{controller="{name}",position="primary"}} 1' in prom, prom
                for source in ("ping", "sinfo", "squeue"):
                    assert f'hpc_slurm_collector_success{{source="{source}"}} 1' in prom, prom
                # slurmdbd registered the cluster in MariaDB.
                assert f"CLUSTER {ctx['slurm']['cluster_name']}" in r.stdout, detail
                if nodes:
                    line = next((x for x in r.stdout.splitlines() if x.startswith("PORTAL {")), None)
                    assert line, detail
                    got = json.loads(line.removeprefix("PORTAL "))
                    first, again = got["first"], got["again"]
                    assert first[0] == 200 and first[1]["created"] is True, got
                    assert again[0] == 200 and again[1] == {**first[1], "created": False, "found_in": "squeue"}, got
                    assert f"{first[1]['job_id']}|req-ns-1" in got["sacct"].splitlines(), got
                if len(ctls) > 1:
                    # On taking control, slurmctld ran the fence program as SlurmUser: it
                    # found the backup DOWN (not started in this namespace) and its
                    # address unreachable, so it went on to fence, and stopped at the
                    # instance metadata, which does not exist here (exit 2).
                    backup_name, backup_ctx = ctls[1]
                    assert "SlurmctldPrimaryOnProg exit status 2:0" in c.log("slurmctld.log"), detail
                    assert (f"{backup_name} is DOWN in scontrol ping and its port {backup_ctx['host']['ip']}:6817 "
                            "is silent: fencing it") in r.stdout, detail
                    assert "instance metadata unavailable, cannot tell this instance from the peer" in r.stdout, detail
            else:
                # A backup on an uninitialised state directory is refused by the guard;
                # here the directory is the backup's own empty one, so that is expected.
                assert "RESULT guard-refused" in r.stdout, detail
                assert "RESULT backup" in r.stdout, detail
            started += 1
        finally:
            c.cleanup()
    assert started == len(ctls) > 0


@needs_ns
@pytest.mark.daemons
def test_broken_slurm_conf_is_rejected_by_slurmctld(state_mountpoint):
    name, ctx = controllers("prod")[0]
    text = render_template("slurm/slurm.conf", ctx).replace("SelectType=select/cons_tres", "SelectType=select/no_such")
    c = Controller(ctx, text, "broken")
    try:
        r = c.run(state_mountpoint)
        assert "RESULT rejected" in r.stdout, f"{r.stdout}\n{r.stderr}\n{c.log('slurmctld.log')}"
        assert "select/no_such" in c.log("slurmctld.log")
    finally:
        c.cleanup()


@needs_ns
@pytest.mark.daemons
def test_broken_slurmdbd_conf_is_rejected_by_slurmdbd(state_mountpoint):
    name, ctx = controllers("prod")[0]
    base = render_template("slurm/slurmdbd.conf", ctx) + "StorageTypo=oops\n"
    c = Controller(ctx, render_template("slurm/slurm.conf", ctx), "dbd-broken", dbd_base=base)
    try:
        r = c.run(state_mountpoint)
        assert "RESULT rejected" in r.stdout, f"{r.stdout}\n{r.stderr}\n{c.log('slurmdbd.log')}"
        assert "StorageTypo" in c.log("slurmdbd.log")
    finally:
        c.cleanup()


# ---------------------------------------------------------------------- systemd units

UNIT_FILES = {
    "slurm/hpc-state-guard.conf": "slurmctld.service.d/hpc-state-guard.conf",
    "slurm/hpc-liveness.conf": "slurmctld.service.d/hpc-liveness.conf",
    "slurm/hpc-restart.conf": "slurmdbd.service.d/hpc-restart.conf",
    "slurm/hpc-slurm-metrics.service": "hpc-slurm-metrics.service",
    "slurm/hpc-slurm-metrics.timer": "hpc-slurm-metrics.timer",
}


def _verify_units(unit_dir: Path, units: list[str]) -> subprocess.CompletedProcess[str]:
    """systemd-analyze verify with the host scripts present at their install paths
    (bind-mounted in a namespace), so a missing command or an unknown key fails it."""
    bin_dir = unit_dir / "bin"
    bin_dir.mkdir(exist_ok=True)
    for script in ("hpc-slurm-state-guard", "hpc-slurm-metrics"):
        shutil.copy(SCRIPTS / script, bin_dir / script)
    r = run_isolated(["systemd-analyze", "verify", "--man=no", *units],
                     binds={str(bin_dir): "/usr/local/sbin", str(bin_dir) + "/": "/usr/local/bin"})
    if re.search(r"Unknown (key|section)|Invalid|Failed to parse", r.stderr):
        r = subprocess.CompletedProcess(r.args, 1, r.stdout, r.stderr)
    return r


def _write_units(unit_dir: Path, ctx: dict[str, Any], extra: str = "") -> list[str]:
    for src, rel in UNIT_FILES.items():
        p = unit_dir / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(render_template(src, ctx) + extra)
    # The packaged units the drop-ins extend (Debian 12's here).
    for unit in ("slurmctld.service", "slurmdbd.service"):
        shutil.copy(Path("/lib/systemd/system") / unit, unit_dir / unit)
    return [str(unit_dir / u) for u in ("slurmctld.service", "slurmdbd.service",
                                        "hpc-slurm-metrics.service", "hpc-slurm-metrics.timer")]


@needs_ns
def test_units_and_drop_ins_pass_systemd_analyze(tmp_path):
    checked = 0
    for stack in STACKS:
        for name, ctx in controllers(stack):
            d = tmp_path / f"{stack}-{name}"
            d.mkdir()
            r = _verify_units(d, _write_units(d, ctx))
            assert r.returncode == 0, f"{stack}/{name}: {r.stdout}{r.stderr}"
            checked += 1
    assert checked == sum(len(controllers(s)) for s in STACKS) >= 3


@needs_ns
def test_broken_drop_in_is_rejected_by_systemd_analyze(tmp_path):
    _, ctx = controllers("prod")[0]
    r = _verify_units(tmp_path, _write_units(tmp_path, ctx, extra="RestartSecc=5\n"))
    assert r.returncode != 0 and "RestartSecc" in r.stderr


def test_guard_and_first_init_only_on_the_primary():
    for stack in STACKS:
        for i, (name, ctx) in enumerate(controllers(stack)):
            text = render_template("slurm/hpc-state-guard.conf", ctx)
            assert f"RequiresMountsFor={ctx['slurm']['state_dir']}" in text
            assert "ExecStartPre=+/usr/local/sbin/hpc-slurm-state-guard" in text
            assert ("--allow-first-init" in text) == (i == 0), f"{stack}/{name}"


def test_each_controller_records_its_own_slurmctld_under_the_name_scontrol_ping_uses():
    """SlurmctldDown joins hpc_slurmctld_running with hpc_slurm_controller_up by
    (controller, position): both must use scontrol ping's names (primary, backup)."""
    checked = 0
    for stack in STACKS:
        ctls = controllers(stack)
        for i, (name, ctx) in enumerate(ctls):
            text = render_template("slurm/hpc-liveness.conf", ctx)
            position = "primary" if i == 0 else ("backup" if len(ctls) == 2 else f"backup{i}")
            for state, key in (("running", "ExecStartPost"), ("stopped", "ExecStopPost")):
                line = (f"{key}=-+/usr/local/bin/hpc-slurm-metrics --slurmctld {state} "
                        f"--controller {name} --position {position}")
                assert line in text.splitlines(), f"{stack}/{name}: {line}\n{text}"
                checked += 1
    assert checked == 2 * sum(len(controllers(s)) for s in STACKS)


# ------------------------------------------------------------------- boot script


def _shellcheck(text: str, tmp_path: Path, name: str) -> subprocess.CompletedProcess[str]:
    p = tmp_path / name
    p.write_text(text)
    return subprocess.run(["shellcheck", "-s", "bash", str(p)], capture_output=True, text=True)


def test_rendered_boot_script_passes_shellcheck(tmp_path):
    checked = 0
    for stack, name, ctx, text in rendered("slurm/hpc-slurm-boot"):
        assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
        r = _shellcheck(text, tmp_path, f"{stack}-{name}")
        assert r.returncode == 0, f"{stack}/{name}: {r.stdout}"
        m_position = re.search(r"^CONTROLLER_POSITION=(\w+)$", text, re.M)
        m_dbd = re.search(r"^RUN_SLURMDBD=(\w+)$", text, re.M)
        assert m_position and m_dbd, f"{stack}/{name}"
        position, dbd = m_position[1], m_dbd[1]
        ctl_names = [c["name"] for c in ctx["slurm"]["controllers"]]
        want = "primary" if name == ctl_names[0] else "backup" if name in ctl_names else "none"
        assert position == want, f"{stack}/{name}"
        assert dbd == ("yes" if name in ctl_names else "no")
        checked += 1
    assert checked == sum(len(slurm_or_app_hosts(s)) for s in STACKS) >= 7


def test_broken_boot_script_is_rejected_by_shellcheck(tmp_path):
    _, _, _, text = rendered("slurm/hpc-slurm-boot")[0]
    r = _shellcheck(text.replace('[ -f "$dbd_base" ]', "[ -f $dbd_base ]"), tmp_path, "broken")
    assert r.returncode != 0 and "SC2086" in r.stdout


def test_portal_account_has_one_uid_on_app_hosts_and_controllers():
    """slurmctld signs a job's credential with the submitting uid's passwd entry: the
    portal's account must exist with the same ids where jobs are submitted (app hosts) and
    where they are signed (controllers), and nowhere else."""
    from cloud_init.render import render_host

    checked = 0
    for stack in ("prod", "dev"):
        for name, ctx in contexts(stack).items():
            roles = set(ctx["host"]["roles"])
            cmds = [c for c in render_host(ctx).commands if any("u=portal" in a for a in c)]
            if roles & {"app", "slurm"}:
                assert len(cmds) == 1, (stack, name, cmds)
                script = cmds[0][-1]
                uid = ctx["app"]["portal_uid"]
                assert f"id={uid};" in script and "--uid $id --gid $id" in script, script
                checked += 1
            else:
                assert cmds == [], (stack, name)
    assert checked >= 5
