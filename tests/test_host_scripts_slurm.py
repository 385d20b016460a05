"""Host scripts of the Slurm tier, run for real against temporary files.

- hpc-slurm-state-guard: refuses a state directory on the root filesystem, a read-only
  or non-empty unmarked one, and an empty one unless first initialisation is allowed
  (once per host); accepts a marked directory on its own mount.
- hpc-slurm-metrics: turns scontrol/sinfo/squeue output (fakes on PATH) into textfile
  metrics that promtool accepts, written atomically.
- hpc-munge-key: decodes the secret into a 0600 key, idempotently, and refuses bad keys.
- hpc-slurm-boot (rendered): writes slurmdbd.conf with an escaped StoragePass and starts
  the right daemons for the host's position.
- hpc-slurm-fence: against moto's EC2 and an IMDSv2 stand-in, with `scontrol ping` faked
  on PATH: stops the peer controller's instance only when it is DOWN and its port does
  not refuse connections, never this host's own instance, is harmless when run again,
  and says what is missing on AccessDenied.
"""

from __future__ import annotations

import ast
import base64
import http.server
import json
import os
import re
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

from cloud_init.templating import SCRIPTS, render_template
from offline.contexts import contexts
from tests.loadfile import load_file
from tests.nsrun import can_isolate, run_isolated

GUARD = SCRIPTS / "hpc-slurm-state-guard"
METRICS = SCRIPTS / "hpc-slurm-metrics"
MUNGE_KEY = SCRIPTS / "hpc-munge-key"


def run(cmd: list[str], env: dict[str, str] | None = None, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=60, **kw)


# ------------------------------------------------------------------ hpc-slurm-state-guard


def mountinfo(tmp_path: Path, *mount_points: str) -> Path:
    """A mountinfo file with the root filesystem and the given mount points (as nfs4)."""
    lines = ["22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/root rw"]
    for i, mp in enumerate(mount_points, 30):
        escaped = mp.replace(" ", "\\040")
        lines.append(f"{i} 22 0:{i} / {escaped} rw,relatime shared:{i} - nfs4 fs-1.efs:/ rw,vers=4.1")
    p = tmp_path / "mountinfo"
    p.write_text("\n".join(lines) + "\n")
    return p


def guard(tmp_path: Path, state: Path, mounts: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, str(GUARD), "--state-dir", str(state), "--slurm-user", "",
                "--first-init-record", str(tmp_path / "record"), "--mountinfo", str(mounts), *extra])


def test_guard_refuses_a_state_dir_on_the_root_filesystem(tmp_path):
    state = tmp_path / "slurm" / "state"
    state.mkdir(parents=True)
    (state / ".hpc-slurm-state").write_text("{}")
    r = guard(tmp_path, state, mountinfo(tmp_path), "--allow-first-init")
    assert r.returncode == 1 and "root filesystem" in r.stderr


def test_guard_accepts_a_marked_state_dir_on_its_mount(tmp_path):
    state = tmp_path / "slurm" / "state"
    state.mkdir(parents=True)
    (state / ".hpc-slurm-state").write_text("{}")
    (state / "job_state").write_text("x")
    r = guard(tmp_path, state, mountinfo(tmp_path, str(tmp_path / "slurm")))
    assert r.returncode == 0, r.stderr
    assert "has its marker" in r.stdout


def test_guard_initialises_an_empty_dir_only_when_allowed_and_only_once(tmp_path):
    state = tmp_path / "slurm" / "state"
    state.mkdir(parents=True)
    mounts = mountinfo(tmp_path, str(tmp_path / "slurm"))
    r = guard(tmp_path, state, mounts)  # the backup: may not initialise
    assert r.returncode == 1 and "may not initialise" in r.stderr
    assert not (state / ".hpc-slurm-state").exists()

    r = guard(tmp_path, state, mounts, "--allow-first-init")  # the primary, first boot
    assert r.returncode == 0, r.stderr
    marker = json.loads((state / ".hpc-slurm-state").read_text())
    assert marker["state_dir"] == str(state)
    assert (tmp_path / "record").is_file()

    assert guard(tmp_path, state, mounts).returncode == 0  # now the backup may start too

    # The state vanishes later (wrong access point, deleted files): refused even on the
    # primary, because this host already initialised it once.
    (state / ".hpc-slurm-state").unlink()
    r = guard(tmp_path, state, mounts, "--allow-first-init")
    assert r.returncode == 1 and "already initialised" in r.stderr


def test_guard_creates_a_missing_state_dir_on_first_init(tmp_path):
    (tmp_path / "slurm").mkdir()
    state = tmp_path / "slurm" / "state"
    r = guard(tmp_path, state, mountinfo(tmp_path, str(tmp_path / "slurm")), "--allow-first-init")
    assert r.returncode == 0, r.stderr
    assert (state / ".hpc-slurm-state").is_file()


def test_guard_refuses_a_non_empty_dir_without_marker_and_a_file(tmp_path):
    state = tmp_path / "slurm" / "state"
    state.mkdir(parents=True)
    (state / "job_state").write_text("someone else's")
    mounts = mountinfo(tmp_path, str(tmp_path / "slurm"))
    r = guard(tmp_path, state, mounts, "--allow-first-init")
    assert r.returncode == 1 and "no marker" in r.stderr
    other = tmp_path / "slurm" / "file"
    other.write_text("")
    r = guard(tmp_path, other, mounts, "--allow-first-init")
    assert r.returncode == 1 and "not a directory" in r.stderr


def test_guard_reads_escaped_mount_points(tmp_path):
    state = tmp_path / "shared dir" / "state"
    state.mkdir(parents=True)
    (state / ".hpc-slurm-state").write_text("{}")
    r = guard(tmp_path, state, mountinfo(tmp_path, str(tmp_path / "shared dir")))
    assert r.returncode == 0, r.stderr
    mod = load_file(GUARD)
    assert mod._unescape("/a\\040b\\134c") == "/a b\\c"


@pytest.mark.skipif(not can_isolate(), reason="needs root and unshare for namespaces")
def test_guard_with_the_real_mount_table(tmp_path):
    """In a mount namespace: a plain directory (on /) is refused, the same directory
    bind-mounted is accepted, and read-only it is refused."""
    state = tmp_path / "state"
    state.mkdir()
    (state / ".hpc-slurm-state").write_text("{}")
    g = f"{sys.executable} {GUARD} --state-dir {state} --slurm-user '' --first-init-record {tmp_path}/record"
    script = f"""
        {g} >/dev/null 2>&1 && echo plain=accepted || echo plain=refused
        mount --bind {state} {state}
        {g} >/dev/null 2>&1 && echo bound=accepted || echo bound=refused
        mount -o remount,ro,bind {state}
        {g} 2>&1 | grep -q read-only && echo readonly=refused || echo readonly=accepted
    """
    r = run_isolated(["bash", "-c", script])
    # tmp_path may itself sit on a separate mount (a tmpfs /tmp): then "plain" is on that
    # mount, not on /, and is accepted.
    on_root = subprocess.run(["findmnt", "-n", "-o", "TARGET", "-T", str(tmp_path)],
                             capture_output=True, text=True).stdout.strip() == "/"
    assert ("plain=refused" if on_root else "plain=accepted") in r.stdout, r.stdout + r.stderr
    assert "bound=accepted" in r.stdout and "readonly=refused" in r.stdout, r.stdout + r.stderr


# --------------------------------------------------------------------- hpc-slurm-metrics

PING_UP = "Slurmctld(primary) at slurm-1 is UP\nSlurmctld(backup) at slurm-2 is DOWN\n"
PING_DOWN = "Slurmctld(primary) at slurm-1 is DOWN\nSlurmctld(backup) at slurm-2 is DOWN\n"
SINFO = "cn001 idle\ncn001 idle\ncn002 mixed\ncn003 down*\ncn004 idle~\ncn005 drained\ncn006 allocated+\n"
SQUEUE = "PENDING\nPENDING\nRUNNING\nCOMPLETING\n"


def fake_bin(tmp_path: Path, ping: str, sinfo: str = SINFO, squeue: str = SQUEUE, ping_rc: int = 0) -> Path:
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    for name, out, rc in (("scontrol", ping, ping_rc), ("sinfo", sinfo, 0), ("squeue", squeue, 0)):
        (d / f"{name}.out").write_text(out)
        p = d / name
        p.write_text(f'#!/bin/sh\necho "$*" >> "{d}/{name}.calls"\ncat "{d}/{name}.out"\nexit {rc}\n')
        p.chmod(0o755)
    return d


def run_metrics(tmp_path: Path, bin_dir: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path / "textfile" / "slurm.prom"
    r = run([sys.executable, str(METRICS), "--output", str(out), "--timeout", "5"],
            env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    return r, out


def promtool_check_metrics(text: str) -> subprocess.CompletedProcess[str]:
    return run(["promtool", "check", "metrics"], input=text)


def test_metrics_from_a_running_cluster(tmp_path):
    bin_dir = fake_bin(tmp_path, PING_UP, ping_rc=1)  # scontrol ping exits 1 when one is down
    r, out = run_metrics(tmp_path, bin_dir)
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    for line in (
        'hpc_slurm_controller_up{controller="slurm-1",position="primary"} 1',
        'hpc_slurm_controller_up{controller="slurm-2",position="backup"} 0',
        'hpc_slurm_nodes{state="idle"} 2',  # cn001 (listed twice: two partitions) + cn004
        'hpc_slurm_nodes{state="mixed"} 1',
        'hpc_slurm_nodes{state="down"} 1',
        'hpc_slurm_nodes{state="drained"} 1',
        'hpc_slurm_nodes{state="allocated"} 1',
        'hpc_slurm_nodes{state="draining"} 0',
        'hpc_slurm_jobs{state="pending"} 2',
        'hpc_slurm_jobs{state="running"} 1',
        'hpc_slurm_jobs{state="completing"} 1',
        'hpc_slurm_jobs{state="suspended"} 0',
        'hpc_slurm_collector_success{source="ping"} 1',
        'hpc_slurm_collector_success{source="sinfo"} 1',
        'hpc_slurm_collector_success{source="squeue"} 1',
    ):
        assert line in text.splitlines(), f"{line} missing in\n{text}"
    ts = next(line for line in text.splitlines() if line.startswith("hpc_slurm_collector_last_run_timestamp_seconds "))
    assert abs(float(ts.split()[1]) - __import__("time").time()) < 60
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert [p.name for p in out.parent.iterdir()] == ["slurm.prom"], "temp file left behind"
    assert (bin_dir / "sinfo.calls").read_text().strip() == "-h -N -o %N %T"
    c = promtool_check_metrics(text)
    assert c.returncode == 0, c.stdout + c.stderr


def test_metrics_when_no_controller_answers(tmp_path):
    bin_dir = fake_bin(tmp_path, PING_DOWN, ping_rc=1)
    r, out = run_metrics(tmp_path, bin_dir)
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert 'hpc_slurm_controller_up{controller="slurm-1",position="primary"} 0' in text
    assert 'hpc_slurm_collector_success{source="ping"} 1' in text
    assert 'hpc_slurm_collector_success{source="sinfo"} 0' in text
    assert "hpc_slurm_nodes{" not in text and "hpc_slurm_jobs{" not in text
    assert not (bin_dir / "sinfo.calls").exists(), "sinfo should not wait on a dead controller"
    assert promtool_check_metrics(text).returncode == 0


def test_metrics_when_scontrol_is_missing(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "slurm.prom"
    r = run([sys.executable, str(METRICS), "--output", str(out)], env={"PATH": str(empty)})
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert 'hpc_slurm_collector_success{source="ping"} 0' in text
    assert "hpc_slurm_controller_up{" not in text


def test_metrics_replace_the_previous_file_atomically(tmp_path):
    bin_dir = fake_bin(tmp_path, PING_UP)
    out = tmp_path / "textfile" / "slurm.prom"
    out.parent.mkdir()
    out.write_text("old\n")
    inode = out.stat().st_ino
    r, out = run_metrics(tmp_path, bin_dir)
    assert r.returncode == 0
    assert out.stat().st_ino != inode, "written in place instead of renamed over"
    assert "old" not in out.read_text()


def test_state_dir_probe_is_written_first_and_tells_a_stalled_share(tmp_path):
    """--state-dir: a share that answers gives 1 (and the probe leaves no file); one where
    the probe's open blocks (a FIFO at its path: open for writing waits for a reader, as
    on a hard NFS mount whose server is gone) gives 0 after the probe time-out, the
    child killed; a missing state directory gives 0 at once. The Slurm metrics follow."""
    import socket
    import time

    bin_dir = fake_bin(tmp_path, PING_UP)
    state = tmp_path / "state"
    state.mkdir()
    probe_out = tmp_path / "textfile" / "slurm-statedir.prom"

    def metrics(state_dir: Path, timeout: str = "2") -> tuple[str, float]:
        t = time.monotonic()
        r = run([sys.executable, str(METRICS), "--output", str(tmp_path / "textfile" / "slurm.prom"),
                 "--timeout", "5", "--state-dir", str(state_dir), "--probe-timeout", timeout,
                 "--state-output", str(probe_out)], env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
        assert r.returncode == 0, r.stderr
        assert "hpc_slurm_controller_up" in (tmp_path / "textfile" / "slurm.prom").read_text()
        return probe_out.read_text(), time.monotonic() - t

    text, _ = metrics(state)
    assert f'hpc_slurm_state_dir_up{{dir="{state}"}} 1' in text.splitlines(), text
    assert list(state.iterdir()) == [], "the probe left its file"
    assert promtool_check_metrics(text).returncode == 0

    os.mkfifo(state / f".hpc-probe.{socket.gethostname()}")
    text, took = metrics(state)
    assert f'hpc_slurm_state_dir_up{{dir="{state}"}} 0' in text.splitlines(), text
    assert 2.0 <= took < 30, f"the blocked probe was not ended at its time-out: {took:.1f}s"
    probe_s = next(float(line.split()[1]) for line in text.splitlines()
                   if line.startswith("hpc_slurm_state_dir_probe_seconds{"))
    assert probe_s == 2.0

    text, _ = metrics(tmp_path / "missing")
    assert 'hpc_slurm_state_dir_up{dir="' + str(tmp_path / "missing") + '"} 0' in text


def test_local_slurmctld_state_is_written_at_once_without_asking_slurm(tmp_path):
    """ExecStartPost/ExecStopPost record the local controller; no Slurm command runs
    (a dead controller would make them wait)."""
    bin_dir = fake_bin(tmp_path, PING_UP)
    out = tmp_path / "textfile" / "slurmctld.prom"
    for state, value in (("running", 1), ("stopped", 0)):
        r = run([sys.executable, str(METRICS), "--slurmctld", state, "--controller", "slurm-1", "--position", "primary",
                 "--output", str(out)], env={"PATH": f"{bin_dir}:/usr/bin:/bin"})
        assert r.returncode == 0, r.stderr
        text = out.read_text()
        assert f'hpc_slurmctld_running{{controller="slurm-1",position="primary"}} {value}' in text.splitlines()
        assert "hpc_slurm_controller_up" not in text
        assert promtool_check_metrics(text).returncode == 0
    assert not (bin_dir / "scontrol.calls").exists() and not (bin_dir / "sinfo.calls").exists()
    assert [p.name for p in out.parent.iterdir()] == ["slurmctld.prom"]
    bad = run([sys.executable, str(METRICS), "--slurmctld", "stopped", "--output", str(out)])
    assert bad.returncode == 2 and "--slurmctld needs --controller and --position" in bad.stderr


def test_metrics_parsers_and_label_escaping():
    mod = load_file(METRICS)
    assert mod.base_state("IDLE+DRAIN") == "idle"
    assert mod.base_state("down*") == "down"
    assert mod.parse_ping("Slurmctld(primary) at a is UP\nnoise\n") == [("a", "primary", 1)]
    text = mod.render([('we"ird\\', "primary", 1)], None, None, {"ping": 1}, 0.0)
    assert 'controller="we\\"ird\\\\"' in text


def test_promtool_rejects_broken_metrics_text():
    """The negative twin of the format check above."""
    r = promtool_check_metrics('hpc_slurm_jobs{state="pending" 2\n')
    assert r.returncode != 0


# ------------------------------------------------------------------------- hpc-munge-key


def munge_env(tmp_path: Path, key_bytes: bytes | None = None, raw: str | None = None) -> dict[str, str]:
    secret = tmp_path / "munge_key"
    secret.write_text(raw if raw is not None else base64.encodebytes(key_bytes or os.urandom(1024)).decode())
    (tmp_path / "etc-munge").mkdir(exist_ok=True)
    log = tmp_path / "systemctl.log"
    stub = tmp_path / "systemctl"
    stub.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\n')
    stub.chmod(0o755)
    return {"HPC_MUNGE_KEY_SECRET": str(secret), "HPC_MUNGE_KEY_FILE": str(tmp_path / "etc-munge" / "munge.key"),
            "HPC_MUNGE_OWNER": "root:root", "HPC_SYSTEMCTL": str(stub)}


def test_munge_key_is_written_once_and_restarts_munge_only_on_change(tmp_path):
    key = os.urandom(1024)
    env = munge_env(tmp_path, key)
    r = run(["bash", str(MUNGE_KEY), "--restart"], env)
    assert r.returncode == 0 and r.stdout.strip() == "changed", r.stderr
    path = Path(env["HPC_MUNGE_KEY_FILE"])
    assert path.read_bytes() == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert (tmp_path / "systemctl.log").read_text() == "restart munge.service\n"

    mtime = path.stat().st_mtime_ns
    r = run(["bash", str(MUNGE_KEY), "--restart"], env)
    assert r.stdout.strip() == "unchanged" and path.stat().st_mtime_ns == mtime
    assert (tmp_path / "systemctl.log").read_text() == "restart munge.service\n"

    path.chmod(0o644)  # wrong mode is repaired
    assert run(["bash", str(MUNGE_KEY)], env).stdout.strip() == "changed"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert list(path.parent.iterdir()) == [path], "temp file left behind"


@pytest.mark.parametrize("raw,why", [
    ("", "missing or empty"),
    ("not base64 at all!!", "not valid base64"),
    (base64.b64encode(b"short").decode(), "32 to 1024"),
    (base64.b64encode(os.urandom(2048)).decode(), "32 to 1024"),
])
def test_munge_key_refuses_bad_secrets_and_keeps_the_old_key(tmp_path, raw, why):
    env = munge_env(tmp_path, raw=raw)
    path = Path(env["HPC_MUNGE_KEY_FILE"])
    path.write_bytes(b"old-key" * 10)
    r = run(["bash", str(MUNGE_KEY)], env)
    assert r.returncode == 1 and why in r.stderr, r.stderr
    assert path.read_bytes() == b"old-key" * 10
    assert [p.name for p in path.parent.iterdir()] == ["munge.key"]


# ------------------------------------------------------------------------ hpc-slurm-boot


def boot_env(tmp_path: Path, ctx: dict[str, Any], password: str) -> tuple[Path, dict[str, str]]:
    script = tmp_path / "hpc-slurm-boot"
    script.write_text(render_template("slurm/hpc-slurm-boot", ctx))
    secrets = tmp_path / "secrets"
    secrets.mkdir(exist_ok=True)
    (secrets / "mariadb_slurm_password").write_text(password + "\n")
    (tmp_path / "etc-slurm").mkdir(exist_ok=True)
    base = tmp_path / "slurmdbd.conf.base"
    base.write_text(render_template("slurm/slurmdbd.conf", ctx))
    log = tmp_path / "calls.log"
    for name, out in (("systemctl", ""), ("munge-key", "unchanged")):
        stub = tmp_path / name
        stub.write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\n[ -z "{out}" ] || echo {out}\n')
        stub.chmod(0o755)
    return script, {
        "HPC_SECRETS_DIR": str(secrets), "HPC_SLURMDBD_BASE": str(base),
        "HPC_SLURMDBD_CONF": str(tmp_path / "etc-slurm" / "slurmdbd.conf"), "HPC_SLURMDBD_OWNER": "root:root",
        "HPC_SLURM_READY": str(tmp_path / "ready"), "HPC_SYSTEMCTL": str(tmp_path / "systemctl"),
        "HPC_MUNGE_KEY_CMD": str(tmp_path / "munge-key"), "HPC_ACTIVE_DBD_WAIT": "0",
    }


def slurm_host(stack: str, position: str) -> dict[str, Any]:
    ctxs = contexts(stack)
    names = [c["name"] for c in next(iter(ctxs.values()))["slurm"]["controllers"]]
    if position == "primary":
        return ctxs[names[0]]
    if position == "backup":
        return ctxs[names[1]]
    return next(c for n, c in sorted(ctxs.items()) if "app" in c["host"]["roles"] and n not in names)


def test_slurmdbd_conf_gets_an_escaped_password_and_is_rewritten_only_on_change(tmp_path):
    script, env = boot_env(tmp_path, slurm_host("prod", "primary"), "a#b\\c d")
    r = run(["bash", str(script), "slurmdbd-conf"], env)
    assert r.returncode == 0 and r.stdout.strip() == "changed", r.stderr
    conf = Path(env["HPC_SLURMDBD_CONF"])
    text = conf.read_text()
    assert text.startswith(Path(env["HPC_SLURMDBD_BASE"]).read_text())
    assert text.splitlines()[-1] == 'StoragePass="a\\#b\\\\c d"'
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600
    assert run(["bash", str(script), "slurmdbd-conf"], env).stdout.strip() == "unchanged"
    (Path(env["HPC_SECRETS_DIR"]) / "mariadb_slurm_password").write_text("rotated")
    assert run(["bash", str(script), "slurmdbd-conf"], env).stdout.strip() == "changed"
    assert conf.read_text().splitlines()[-1] == 'StoragePass="rotated"'
    assert sorted(p.name for p in conf.parent.iterdir()) == ["slurmdbd.conf"]


@pytest.mark.parametrize("password", ['with"quote', "two\nlines", ""])
def test_slurmdbd_conf_refuses_passwords_it_cannot_hold(tmp_path, password):
    script, env = boot_env(tmp_path, slurm_host("prod", "primary"), password)
    if not password:
        (Path(env["HPC_SECRETS_DIR"]) / "mariadb_slurm_password").write_text("")
    r = run(["bash", str(script), "slurmdbd-conf"], env)
    assert r.returncode == 1, r.stdout
    assert not Path(env["HPC_SLURMDBD_CONF"]).exists()
    assert sorted(p.name for p in Path(env["HPC_SLURMDBD_CONF"]).parent.iterdir()) == []


@pytest.mark.parametrize("position,expect,absent", [
    ("primary", ["systemctl enable slurmdbd.service", "systemctl restart slurmdbd.service",
                 "systemctl start --no-block slurmctld.service", "systemctl enable --now hpc-slurm-metrics.timer"], []),
    # slurmdbd runs on both controllers (active on the backup, standby on the primary).
    ("backup", ["systemctl enable slurmdbd.service", "systemctl restart slurmdbd.service",
                "systemctl start --no-block slurmctld.service"], []),
    ("none", ["munge-key ", "systemctl start munge.service"], ["slurmdbd", "slurmctld", "metrics"]),
])
def test_boot_starts_what_the_host_runs(tmp_path, position, expect, absent):
    script, env = boot_env(tmp_path, slurm_host("prod", position), "pw")
    r = run(["bash", str(script)], env)
    assert r.returncode == 0, r.stderr
    calls = (tmp_path / "calls.log").read_text()
    for line in expect:
        assert line in calls.splitlines(), f"{line!r} not in\n{calls}"
    for word in absent:
        assert word not in calls, f"{word} in\n{calls}"
    assert (tmp_path / "ready").exists() == (position != "none")
    if position == "primary":  # the second run restarts nothing
        (tmp_path / "calls.log").unlink()
        assert run(["bash", str(script)], env).returncode == 0
        assert "restart" not in (tmp_path / "calls.log").read_text()


def test_the_standby_slurmdbd_starts_after_the_active_one_answers(tmp_path):
    """Two slurmdbds creating the schema of a new database at once leave its TRES table
    short and slurmctld refuses to start: the standby's host (the primary controller)
    waits for the active one's port (on the backup controller)."""
    import socket
    import threading
    import time

    script, env = boot_env(tmp_path, slurm_host("prod", "primary"), "pw")
    assert "DBD_ROLE=standby" in script.read_text()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base = Path(env["HPC_SLURMDBD_BASE"])
    text = re.sub(r"(?m)^DbdAddr=.*$", "DbdAddr=127.0.0.1", base.read_text())
    base.write_text(re.sub(r"(?m)^DbdPort=.*$", f"DbdPort={port}", text))
    env["HPC_ACTIVE_DBD_WAIT"] = "60"
    opened: list[float] = []
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

    def active_comes_up() -> None:
        time.sleep(4)
        listener.bind(("127.0.0.1", port))
        listener.listen()
        opened.append(time.monotonic())

    t = threading.Thread(target=active_comes_up)
    t0 = time.monotonic()
    t.start()
    try:
        r = run(["bash", str(script)], env)
    finally:
        t.join()
        listener.close()
    done = time.monotonic()
    assert r.returncode == 0, r.stderr
    assert opened and opened[0] - t0 >= 3.5 and done >= opened[0], "the standby slurmdbd waited for the active one"
    assert "systemctl restart slurmdbd.service" in (tmp_path / "calls.log").read_text().splitlines()
    # Nobody answers: it starts its own after the wait, and says why.
    (tmp_path / "calls.log").unlink()
    env["HPC_ACTIVE_DBD_WAIT"] = "2"
    r = run(["bash", str(script)], env)
    assert r.returncode == 0 and "did not answer within 2s" in r.stderr, r.stderr
    assert "systemctl start slurmdbd.service" in (tmp_path / "calls.log").read_text()


# ----------------------------------------------------------------------------- linters


def test_shell_scripts_pass_shellcheck_and_python_scripts_compile():
    r = run(["shellcheck", "-s", "bash", str(MUNGE_KEY)])
    assert r.returncode == 0, r.stdout
    for script in (GUARD, METRICS):
        r = run([sys.executable, "-m", "py_compile", str(script)])
        assert r.returncode == 0, r.stderr
        assert script.read_text().startswith("#!/usr/bin/env python3\n")


def test_shellcheck_rejects_a_broken_munge_key_script(tmp_path):
    broken = tmp_path / "hpc-munge-key"
    broken.write_text(MUNGE_KEY.read_text().replace('cmp -s "$tmp" "$key"', "cmp -s $tmp $key"))
    r = run(["shellcheck", "-s", "bash", str(broken)])
    assert r.returncode != 0 and "SC2086" in r.stdout


# ------------------------------------------------------------------------ hpc-slurm-fence

FENCE = SCRIPTS / "hpc-slurm-fence"
REGION = "ap-northeast-2"
IMDS_TOKEN = "fence-test-token"
PING_PRIMARY_DOWN = "Slurmctld(primary) at slurm-1 is DOWN\nSlurmctld(backup) at slurm-2 is UP\n"
PING_BOTH_UP = "Slurmctld(primary) at slurm-1 is UP\nSlurmctld(backup) at slurm-2 is UP\n"


class Imds:
    """IMDSv2 with tokens required, answering only this instance's id."""

    def __init__(self) -> None:
        self.instance_id = ""
        imds = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def _send(self, code: int, body: str = "") -> None:
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

            def do_PUT(self) -> None:
                ok = self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
                self._send(200, IMDS_TOKEN) if ok else self._send(400)

            def do_GET(self) -> None:
                if self.headers.get("X-aws-ec2-metadata-token") != IMDS_TOKEN:
                    return self._send(401)
                if self.path != "/latest/meta-data/instance-id":
                    return self._send(404)
                self._send(200, imds.instance_id)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fence_world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_aws: None) -> Iterator[dict[str, Any]]:
    """The prod controllers as moto instances (plus a non-Slurm host of the same stack and
    a controller of another stack at the peer's address), the script loaded as a module
    running on slurm-2 (the backup that just took control), a fake scontrol on PATH, and
    the TCP probe of the peer's port answered by the test (no packet leaves loopback)."""
    monkeypatch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
    imds = Imds()
    monkeypatch.setenv("HPC_IMDS_URL", imds.url)
    ctx = slurm_host("prod", "backup")
    cfg = tmp_path / "fence.json"
    cfg.write_text(render_template("slurm/fence.json", ctx))
    ctls = {c["name"]: c["ip"] for c in ctx["slurm"]["controllers"]}
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    with mock_aws():
        ec2 = boto3.client("ec2", region_name=REGION)
        vpc = ec2.create_vpc(CidrBlock="10.40.0.0/16")["Vpc"]["VpcId"]
        subnets = {net: ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.40.{net}.0/24")["Subnet"]["SubnetId"]
                   for net in (8, 9, 10)}
        other_vpc = ec2.create_vpc(CidrBlock="10.40.0.0/16")["Vpc"]["VpcId"]
        other_subnet = ec2.create_subnet(VpcId=other_vpc, CidrBlock="10.40.10.0/24")["Subnet"]["SubnetId"]

        def launch(ip: str, tags: dict[str, str], subnet: str | None = None) -> str:
            net = int(ip.split(".")[2])
            inst = ec2.run_instances(
                ImageId="ami-12c6146b", MinCount=1, MaxCount=1, InstanceType="m7i.large",
                SubnetId=subnet or subnets[net], PrivateIpAddress=ip,
                TagSpecifications=[{"ResourceType": "instance",
                                    "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}])
            return str(inst["Instances"][0]["InstanceId"])

        ids = {name: launch(ip, {"Name": name, "Role": "slurm", "Stack": "prod"}) for name, ip in ctls.items()}
        ids["app-1"] = launch("10.40.9.64", {"Name": "app-1", "Role": "web+app", "Stack": "prod"})
        ids["other-stack"] = launch(ctls["slurm-1"], {"Name": "slurm-1", "Role": "slurm", "Stack": "budget"},
                                    subnet=other_subnet)
        imds.instance_id = ids["slurm-2"]
        mod: Any = load_file(FENCE)
        mod.AWS_ENDPOINT_FILE = str(tmp_path / "no-aws-endpoint")
        mod.IMDS_URL_FILE = str(tmp_path / "no-imds-url")
        mod.SYSLOG_SOCKET = str(tmp_path / "no-syslog")
        mod.this_host = lambda: "slurm-2"
        probes: list[tuple[str, int]] = []
        world = {"mod": mod, "ec2": ec2, "ids": ids, "ctls": ctls, "cfg": cfg, "imds": imds, "bin": bin_dir,
                 "probes": probes, "port": "accepts", "calls": tmp_path / "scontrol-calls"}

        def probe(ip: str, port: int, timeout: float = 3.0) -> str:
            probes.append((ip, port))
            return str(world["port"])

        mod.port_state = probe
        mod._sleep = lambda s: None
        mod.BOOT_GRACE_S = 0.0  # moto's instances were launched just now
        try:
            yield world
        finally:
            imds.stop()


def fake_ping(world: Any, out: str, rc: int = 1) -> None:
    p = world["bin"] / "scontrol"
    p.write_text(f"#!/bin/sh\necho \"$*\" >> '{world['calls']}'\nprintf '%s' '{out}'\nexit {rc}\n")
    p.chmod(0o755)


def state_of(world: Any, name: str) -> str:
    r = world["ec2"].describe_instances(InstanceIds=[world["ids"][name]])
    return str(r["Reservations"][0]["Instances"][0]["State"]["Name"])


def fence_run(world: Any, caplog: pytest.LogCaptureFixture) -> tuple[int, str]:
    caplog.clear()
    with caplog.at_level("INFO", logger="hpc-slurm-fence"):
        world["mod"].log.propagate = True  # setup_logging turns it off; caplog listens at the root
        orig = world["mod"].setup_logging
        world["mod"].setup_logging = lambda: None
        try:
            rc = world["mod"].main(["--config", str(world["cfg"])])
        finally:
            world["mod"].setup_logging = orig
    return rc, caplog.text


def test_fence_stops_the_peer_only_when_it_is_down_and_holds_its_port(fence_world, caplog):
    w = fence_world
    fake_ping(w, PING_BOTH_UP, rc=0)
    rc, text = fence_run(w, caplog)
    assert rc == 0 and "slurm-1 answers scontrol ping (UP): not fencing" in text
    assert w["probes"] == [] and state_of(w, "slurm-1") == "running"

    fake_ping(w, PING_PRIMARY_DOWN)
    w["port"] = "refused"  # slurmctld not running there: systemd restarts it, no split brain
    rc, text = fence_run(w, caplog)
    assert rc == 0 and "nothing listens on 10.40.10.20:6817" in text
    assert state_of(w, "slurm-1") == "running"

    w["port"] = "accepts"  # paused: the kernel still completes the handshake
    rc, text = fence_run(w, caplog)
    assert rc == 0, text
    assert f"stopping slurm-1 ({w['ids']['slurm-1']}, 10.40.10.20, running) with force" in text
    assert state_of(w, "slurm-1") in ("stopping", "stopped")
    # Only the peer: this host, the app host and the other stack's instance at the same
    # address keep running.
    for name in ("slurm-2", "app-1", "other-stack"):
        assert state_of(w, name) == "running", name
    assert w["probes"] == [("10.40.10.20", 6817)] * 2
    assert (w["calls"]).read_text() == "ping\n" * 3


def test_fence_a_silent_peer_and_running_it_again_is_harmless(fence_world, caplog):
    w = fence_world
    fake_ping(w, PING_PRIMARY_DOWN)
    w["port"] = "silent"  # cut off: connection time-out
    assert fence_run(w, caplog)[0] == 0
    w["ec2"].stop_instances(InstanceIds=[w["ids"]["slurm-1"]])  # moto: make sure it reached stopped
    rc, text = fence_run(w, caplog)
    assert rc == 0 and "is already stopped: nothing to do" in text
    assert "stopping slurm-1" not in text and state_of(w, "slurm-1") == "stopped"


def test_fence_never_stops_this_hosts_own_instance(fence_world, caplog):
    w = fence_world
    fake_ping(w, PING_PRIMARY_DOWN)
    # A wrong config (or a moved address) that makes the peer's address this instance's.
    w["imds"].instance_id = w["ids"]["slurm-1"]
    rc, text = fence_run(w, caplog)
    assert rc == 4 and "is this host's own instance" in text
    assert state_of(w, "slurm-1") == "running"
    # This host's own entry is never a peer, whatever scontrol says about it.
    w["imds"].instance_id = w["ids"]["slurm-2"]
    fake_ping(w, "Slurmctld(primary) at slurm-1 is UP\nSlurmctld(backup) at slurm-2 is DOWN\n")
    rc, text = fence_run(w, caplog)
    assert rc == 0 and state_of(w, "slurm-2") == "running" and state_of(w, "slurm-1") == "running"


def test_fence_leaves_a_peer_that_is_still_booting_alone(fence_world, caplog):
    w = fence_world
    fake_ping(w, PING_PRIMARY_DOWN)
    w["port"] = "silent"  # a kernel not up yet does not answer either
    w["mod"].BOOT_GRACE_S = 300.0
    rc, text = fence_run(w, caplog)
    assert rc == 4 and "is booting (running, launched" in text and "has not been in control" in text
    assert state_of(w, "slurm-1") == "running"


def test_fence_refuses_a_host_that_is_not_a_slurm_controller(fence_world, caplog):
    w = fence_world
    fake_ping(w, PING_PRIMARY_DOWN)
    w["ec2"].create_tags(Resources=[w["ids"]["slurm-1"]], Tags=[{"Key": "Role", "Value": "web+app"}])
    rc, text = fence_run(w, caplog)
    assert rc == 4 and "is not a Slurm controller (Role='web+app')" in text
    assert state_of(w, "slurm-1") == "running"


@pytest.mark.parametrize("out,why", [
    ("", "named no controller"),
    ("Slurmctld(primary) at slurm-9 is DOWN\n", "scontrol ping did not report it"),
])
def test_fence_does_nothing_when_it_cannot_tell(fence_world, caplog, out, why):
    w = fence_world
    fake_ping(w, out)
    rc, text = fence_run(w, caplog)
    assert rc == 4 and why in text and w["probes"] == []
    assert state_of(w, "slurm-1") == "running"


def test_fence_access_denied_is_a_clear_error_at_once(fence_world, caplog):
    w = fence_world
    fake_ping(w, PING_PRIMARY_DOWN)
    calls = []
    real_client = w["mod"].ec2_client

    def denying_client(cfg: Any) -> Any:
        client = real_client(cfg)

        def stop_instances(**kw: Any) -> Any:
            calls.append(kw)
            raise ClientError({"Error": {"Code": "UnauthorizedOperation",
                                         "Message": "You are not authorized to perform this operation."}},
                              "StopInstances")

        client.stop_instances = stop_instances
        return client

    w["mod"].ec2_client = denying_client
    rc, text = fence_run(w, caplog)
    assert rc == 3, text
    assert len(calls) == 1 and calls[0] == {"InstanceIds": [w["ids"]["slurm-1"]], "Force": True}
    assert "UnauthorizedOperation" in text and "not retryable" in text
    assert "needs ec2:DescribeInstances and ec2:StopInstances" in text
    assert state_of(w, "slurm-1") == "running"


def test_fence_single_controller_and_config_errors(tmp_path, caplog, fence_world):
    w = fence_world
    single = tmp_path / "single.json"
    single.write_text(render_template("slurm/fence.json", slurm_host("dev", "primary")))
    w["mod"].this_host = lambda: "app-1"
    w["cfg"] = single
    rc, text = fence_run(w, caplog)
    assert rc == 0 and "single controller: nothing to fence" in text
    w["mod"].this_host = lambda: "slurm-9"
    w["cfg"] = tmp_path / "fence.json"
    rc, text = fence_run(w, caplog)
    assert rc == 1 and "this host (slurm-9) is not one of the controllers" in text
    bad = tmp_path / "bad.json"
    bad.write_text('{"stack": "prod", "region": "ap-northeast-2", "slurmctld_port": 6817, "controllers": []}')
    w["cfg"] = bad
    rc, text = fence_run(w, caplog)
    assert rc == 1 and "'controllers' must be a non-empty list" in text


def watch_world(w: Any, tmp_path: Path, heartbeat_age_s: float, here: bool = True) -> Any:
    """The fence module set up for --watch: a state dir whose heartbeat was written
    `heartbeat_age_s` ago, this host's slurmctld running or not, a fake clock that each
    round's wait advances."""
    import json as _json

    mod = w["mod"]
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    hb = state / "heartbeat"
    hb.write_bytes(b"\0" * 16)
    t = time.time() - heartbeat_age_s
    os.utime(hb, (t, t))
    doc = _json.loads(w["cfg"].read_text())
    assert doc["ctld_timeout"] == 15 and doc["state_dir"] == "/slurm/state"  # rendered from slurm.conf's values
    doc["state_dir"] = str(state)
    w["cfg"].write_text(_json.dumps(doc))
    clock = [0.0]
    mod._clock = lambda: clock[0]

    def sleep(s: float) -> None:
        clock[0] += s
    mod._sleep = sleep
    mod.slurmctld_runs = lambda: here
    w["clock"] = clock
    return mod


def watch_run(w: Any, caplog: pytest.LogCaptureFixture, rounds: int) -> tuple[int, str]:
    mod = w["mod"]
    caplog.clear()
    with caplog.at_level("INFO", logger="hpc-slurm-fence"):
        mod.log.propagate = True
        cfg = mod.load_config(str(w["cfg"]))
        peers = [c for c in cfg["controllers"] if c["name"] != "slurm-2"]
        rc = mod.watch(cfg, "slurm-2", peers, rounds=rounds)
    return rc, caplog.text


def test_watch_fences_a_hung_primary_at_slurmctld_timeout_not_after_the_takeover(fence_world, caplog, tmp_path):
    """slurmctld runs SlurmctldPrimaryOnProg only after its takeover reached slurmdbd,
    which the frozen host held 40 s (freeze-slurm drill: fenced 62 s after the freeze).
    The watcher fences once the peer has been DOWN for SlurmctldTimeout + 2 s with no
    heartbeat, and not a round before."""
    w = fence_world
    mod = watch_world(w, tmp_path, heartbeat_age_s=300)
    fake_ping(w, PING_PRIMARY_DOWN)
    limit = 15 + mod.WATCH_MARGIN_S
    rounds_before = int(limit // mod.WATCH_EVERY_S)  # the last of them ends just short of the limit
    rc, text = watch_run(w, caplog, rounds_before)
    assert rc == 0 and state_of(w, "slurm-1") == "running" and w["probes"] == [], text
    rc, text = watch_run(w, caplog, rounds_before + 2)
    assert rc == 0 and state_of(w, "slurm-1") in ("stopping", "stopped"), text
    assert "watch: slurm-1 DOWN for 18 s, heartbeat 300 s old, slurmctld runs here: fencing" in text
    assert w["probes"] == [("10.40.10.20", 6817)]
    for name in ("slurm-2", "app-1", "other-stack"):
        assert state_of(w, name) == "running", name


@pytest.mark.parametrize("seen_up", [True, False])
def test_watch_fences_a_young_peer_only_when_it_saw_it_answer(fence_world, caplog, tmp_path, seen_up):
    """The boot grace spares a peer nobody has seen running yet (a later phase may start
    it after this controller); a peer the watcher saw answer has been running, however
    young its instance (measured: the first drill after a boot froze a 269 s old primary
    and the fence refused it, costing a minute)."""
    w = fence_world
    mod = watch_world(w, tmp_path, heartbeat_age_s=300)
    mod.BOOT_GRACE_S = 300.0  # moto launched the instances just now
    down = {"slurm-1": "DOWN", "slurm-2": "UP"}
    answers = iter(([{"slurm-1": "UP", "slurm-2": "UP"}] if seen_up else []) + [down] * 40)
    mod.ping_states = lambda: next(answers)
    rc, text = watch_run(w, caplog, 14)
    assert rc == 0
    if seen_up:
        assert state_of(w, "slurm-1") in ("stopping", "stopped"), text
    else:
        assert state_of(w, "slurm-1") == "running" and "is booting (running, launched" in text, text


def test_watch_leaves_a_replaced_peer_alone_while_it_boots(fence_world, caplog, tmp_path):
    """Seen answering counts for the instance that answered: a rolled controller's
    replacement, launched after the watcher last saw the old one, gets the boot grace
    (it reports DOWN and its port is silent until its OS is up)."""
    w = fence_world
    mod = watch_world(w, tmp_path, heartbeat_age_s=300)
    mod.BOOT_GRACE_S = 300.0
    mod._wall = lambda: time.time() - 60  # the old slurm-1 answered a minute ago
    w["ec2"].terminate_instances(InstanceIds=[w["ids"]["slurm-1"]])
    # moto keeps a terminated instance's address taken in its subnet: the replacement
    # gets the same address in a subnet of the same range.
    vpc = w["ec2"].create_vpc(CidrBlock="10.40.0.0/16")["Vpc"]["VpcId"]
    net = w["ctls"]["slurm-1"].rsplit(".", 1)[0] + ".0/24"
    new = w["ec2"].run_instances(
        ImageId="ami-12c6146b", MinCount=1, MaxCount=1, InstanceType="m7i.large",
        SubnetId=w["ec2"].create_subnet(VpcId=vpc, CidrBlock=net)["Subnet"]["SubnetId"],
        PrivateIpAddress=w["ctls"]["slurm-1"],
        TagSpecifications=[{"ResourceType": "instance", "Tags": [
            {"Key": "Name", "Value": "slurm-1"}, {"Key": "Role", "Value": "slurm"}, {"Key": "Stack", "Value": "prod"}]}],
    )["Instances"][0]["InstanceId"]
    w["ids"]["slurm-1"] = new
    w["port"] = "silent"
    answers = iter([{"slurm-1": "UP", "slurm-2": "UP"}] + [{"slurm-1": "DOWN", "slurm-2": "UP"}] * 40)
    mod.ping_states = lambda: next(answers)
    rc, text = watch_run(w, caplog, 14)
    assert rc == 0 and "watch: slurm-1 DOWN" in text, text
    assert state_of(w, "slurm-1") == "running" and f"{new} is booting (running, launched" in text, text
    # The same instance, seen answering after its launch, is fenced as before.
    mod._wall = time.time
    answers = iter([{"slurm-1": "UP", "slurm-2": "UP"}] + [{"slurm-1": "DOWN", "slurm-2": "UP"}] * 40)
    rc, text = watch_run(w, caplog, 14)
    assert rc == 0 and state_of(w, "slurm-1") in ("stopping", "stopped"), text


@pytest.mark.parametrize(("heartbeat", "here", "ping", "why"), [
    (1.0, True, PING_PRIMARY_DOWN, "someone in control still writes the heartbeat (cut off from here only)"),
    (300.0, False, PING_PRIMARY_DOWN, "no slurmctld here would take control"),
    (300.0, True, PING_BOTH_UP, "the peer answers"),
])
def test_watch_leaves_the_peer_alone(fence_world, caplog, tmp_path, heartbeat, here, ping, why):
    w = fence_world
    watch_world(w, tmp_path, heartbeat_age_s=heartbeat, here=here)
    fake_ping(w, ping, rc=0 if ping == PING_BOTH_UP else 1)
    rc, text = watch_run(w, caplog, 30)
    assert rc == 0 and "watch: slurm-1 DOWN" not in text, why
    assert state_of(w, "slurm-1") == "running" and w["probes"] == [], why


@pytest.mark.parametrize(("runs", "answers_after_s", "restarts"), [
    (True, None, 1),     # wedged: running, never answers -> one restart at WEDGED_S
    (True, 60.0, 0),     # a slow hand-back that answers again in time is left alone
    (False, None, 0),    # not running: systemd's business, nothing to restart
])
def test_watch_restarts_its_own_slurmctld_only_when_it_is_wedged(fence_world, caplog, tmp_path, runs,
                                                                  answers_after_s, restarts):
    """A backup whose hand-back was interrupted (the primary died again while it
    relinquished control) stayed running and silent, leaving no controller: the watcher
    restarts it after WEDGED_S of its own ping saying DOWN, once, and not a slow one."""
    w = fence_world
    mod = watch_world(w, tmp_path, heartbeat_age_s=1.0, here=runs)  # the peer is fine: no fencing here
    calls: list[float] = []

    def restart() -> bool:
        calls.append(w["clock"][0])
        return True
    mod.restart_slurmctld = restart

    def ping() -> dict[str, str]:
        me_up = answers_after_s is not None and w["clock"][0] >= answers_after_s
        return {"slurm-1": "UP", "slurm-2": "UP" if me_up else "DOWN"}
    mod.ping_states = ping
    rounds = int((mod.WEDGED_S + 10) // mod.WATCH_EVERY_S)
    rc, text = watch_run(w, caplog, rounds)
    assert rc == 0 and len(calls) == restarts, text
    if restarts:
        assert mod.WEDGED_S <= calls[0] <= mod.WEDGED_S + mod.WATCH_EVERY_S, calls
        assert "has not answered scontrol ping for 90 s (wedged): restarting it" in text
    assert state_of(w, "slurm-1") == "running"


def test_a_wedged_slurmctld_is_killed_before_it_is_started_again(fence_world, tmp_path, monkeypatch):
    """A wedged slurmctld ignores SIGTERM: `systemctl restart` alone waited out
    TimeoutStopSec (90 s) first. The watcher kills it with SIGKILL, then restarts."""
    mod = watch_world(fence_world, tmp_path, heartbeat_age_s=1.0)
    calls: list[list[str]] = []

    def run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 0, "", "")
    monkeypatch.setattr(mod.subprocess, "run", run)
    assert mod.restart_slurmctld() is True
    assert calls == [["systemctl", "kill", "--signal=SIGKILL", "slurmctld.service"],
                     ["systemctl", "restart", "slurmctld.service"]]


@pytest.mark.parametrize(("writer", "fenced"), [(1, True), (0, False)])
def test_watch_fences_when_the_fresh_heartbeat_is_its_own(fence_world, caplog, tmp_path, writer, fenced):
    """A fresh heartbeat written by this host (slurm-2, index 1: its slurmctld already took
    control) is no sign of the peer: the watcher fences the DOWN peer. One written by the
    peer (index 0) means the peer is in control and only cut off from here: left alone."""
    w = fence_world
    mod = watch_world(w, tmp_path, heartbeat_age_s=1.0)
    hb = Path(mod.load_config(str(w["cfg"]))["state_dir"]) / "heartbeat"
    hb.write_bytes(int(time.time()).to_bytes(8, "big") + writer.to_bytes(8, "big"))
    assert mod.heartbeat_writer(str(hb.parent)) == writer
    fake_ping(w, PING_PRIMARY_DOWN)
    rc, text = watch_run(w, caplog, 14)
    assert rc == 0
    if fenced:
        assert state_of(w, "slurm-1") in ("stopping", "stopped"), text
        assert "heartbeat written by this host (in control), slurmctld runs here: fencing" in text
    else:
        assert state_of(w, "slurm-1") == "running" and "watch: slurm-1 DOWN" not in text, text


def test_watch_needs_the_timeout_and_the_state_dir(fence_world, caplog):
    import json as _json

    w = fence_world
    doc = _json.loads(w["cfg"].read_text())
    del doc["state_dir"]
    w["cfg"].write_text(_json.dumps(doc))
    rc, text = watch_run(w, caplog, 1)
    assert rc == 1 and "--watch needs 'ctld_timeout' and 'state_dir'" in text
    doc["state_dir"] = "relative"
    w["cfg"].write_text(_json.dumps(doc))
    with pytest.raises(ValueError, match="'state_dir' must be StateSaveLocation"):
        w["mod"].load_config(str(w["cfg"]))


def test_fence_port_probe_tells_refused_from_accepted():
    """Against loopback: a socket that listens but never accepts (like a paused
    slurmctld) still completes the handshake; a closed port refuses."""
    mod = load_file(FENCE)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        port = s.getsockname()[1]
        assert mod.port_state("127.0.0.1", port, timeout=2) == "accepts"
    assert mod.port_state("127.0.0.1", port, timeout=2) == "refused"


def test_fence_script_is_executable_python_using_stdlib_boto3_and_hpc_aws():
    text = FENCE.read_text()
    assert text.startswith("#!/usr/bin/python3\n") and os.access(FENCE, os.X_OK)
    assert run([sys.executable, "-m", "py_compile", str(FENCE)]).returncode == 0
    imported = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported - set(sys.stdlib_module_names) == {"hpc_aws"}, imported
