"""Rehearsal hosts seen from outside: prepare a host's disk, start it (its init becomes
PID 1 of the host's namespaces), talk to its init, kill -9 the whole host, reboot it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from components.hostctx import EFS_MOUNTS

from . import sockcall
from .layout import ENDPOINT_IP, ENDPOINT_PORT, Layout, RHost

HERE = Path(__file__).resolve().parent
CGROUP_BASE = Path("/sys/fs/cgroup/unified/hpc-rehearsal")
DATA_VOLUME_MOUNT = "/var/lib/hpc-data"  # where components.hostctx puts a host's data volume


class HostError(RuntimeError):
    pass


def _opaque(path: Path) -> None:
    """Hide the machine's own entries of this directory from the host (overlayfs opaque dir)."""
    path.mkdir(parents=True, exist_ok=True)
    os.setxattr(path, "trusted.overlay.opaque", b"y")


_PKG_UNITS: dict[str, list[str]] = {}


def package_enabled_units(packages: list[str]) -> list[str]:
    """Units the host's packages enable when installed (as on the machine's own install)."""
    wants = Path("/etc/systemd/system/multi-user.target.wants")
    enabled = {p.name for p in wants.iterdir()} if wants.is_dir() else set()
    out = []
    for pkg in packages:
        if pkg not in _PKG_UNITS:
            cp = subprocess.run(["dpkg", "-L", pkg], capture_output=True, text=True)
            _PKG_UNITS[pkg] = [Path(x).name for x in cp.stdout.splitlines()
                               if x.startswith(("/lib/systemd/system/", "/usr/lib/systemd/system/"))
                               and x.endswith(".service")]
        out += [u for u in _PKG_UNITS[pkg] if u in enabled]
    return sorted(set(out))


def prepare(layout: Layout, h: RHost, deploy: dict[str, Any]) -> Path:
    """A fresh instance disk: the host's own /etc/hosts (the private zone), resolver,
    hostname, memory budget and AWS endpoint override, and its packages' enabled units."""
    d = layout.hostdir(h.name)
    if d.exists():
        shutil.rmtree(d)
    upper = d / "upper"
    (d / "ctl").mkdir(parents=True)
    (d / "work").mkdir()
    etc = upper / "etc"
    (etc / "hpc").mkdir(parents=True)
    lines = ["127.0.0.1 localhost", f"{h.ip} {h.name}.{layout.cfg.domain} {h.name}"]
    names: dict[str, list[str]] = {}
    for fqdn, addr in layout.topo.endpoints.items():
        names.setdefault(addr, []).append(fqdn)
    lines += [f"{addr} {' '.join(sorted(n))}" for addr, n in sorted(names.items())]
    (etc / "hosts").write_text("\n".join(lines) + "\n")
    (etc / "hostname").write_text(h.name + "\n")
    # Nothing answers DNS in the rehearsal: lookups of unknown names fail at once.
    (etc / "resolv.conf").write_text("nameserver 127.0.0.53\noptions timeout:1 attempts:1\n")
    (etc / "hpc" / "memory-override.json").write_text(json.dumps({"total_mib": h.memory_mib}) + "\n")
    (etc / "hpc" / "aws-endpoint").write_text(f"http://{ENDPOINT_IP}:{ENDPOINT_PORT}\n")
    wants = etc / "systemd" / "system" / "multi-user.target.wants"
    _opaque(wants)
    _opaque(etc / "systemd" / "system" / "timers.target.wants")
    for unit in package_enabled_units(deploy["hosts"][h.name]["packages"]):
        target = f"/lib/systemd/system/{unit}"
        (wants / unit).symlink_to(target)
    # cloud-init's per-instance state starts empty on a new instance.
    _opaque(upper / "var" / "lib" / "cloud")
    install_ctl(d)
    return d


def install_ctl(d: Path) -> None:
    ctl = d / "ctl"
    ctl.mkdir(parents=True, exist_ok=True)
    for src, dest in (("hostinit.py", "hostinit.py"), ("systemctl_shim.py", "systemctl")):
        shutil.copyfile(HERE / src, ctl / dest)
        os.chmod(ctl / dest, 0o755)
    os.chmod(ctl, 0o755)


def start(layout: Layout, h: RHost) -> int:
    """Boot the host: its init becomes PID 1 of new PID/mount/UTS namespaces inside the
    host's network namespace. Returns the pid of the `unshare` that waits for it."""
    d = layout.hostdir(h.name)
    install_ctl(d)
    cg = CGROUP_BASE / h.name
    (cg / "init").mkdir(parents=True, exist_ok=True)
    mounts = " ".join(f"{p}:{n}" for n, p, roles in EFS_MOUNTS if set(roles) & set(h.roles))
    volume = DATA_VOLUME_MOUNT if layout.topo.host(h.name).data_gb else ""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOSTDIR": str(d), "HOST_NAME": h.name, "DATA_VOLUME": volume,
           "WORKROOT": str(layout.workdir), "SHARED": str(layout.shared), "EFS_MOUNTS": mounts, "CGROUP": str(cg)}
    sock = d / "ctl" / "init.sock"
    if sock.exists():
        sock.unlink()
    layout.shared.mkdir(parents=True, exist_ok=True)
    log = open(d / "console.log", "ab")
    p = subprocess.Popen(["nsenter", f"--net=/run/netns/{h.ns}", "--", "unshare", "--pid", "--fork", "--mount",
                          "--uts", "--propagation", "private", "--kill-child", "--", "/bin/sh",
                          str(HERE / "hostsetup.sh")],
                         env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if sock.exists():
            try:
                call(layout, h.name, {"op": "status"}, timeout=5)
                return p.pid
            except OSError:
                pass
        if p.poll() is not None:
            break
        time.sleep(0.1)
    raise HostError(f"{h.name} did not come up: see {d / 'console.log'} and {d / 'ctl' / 'init.log'}")


def call(layout: Layout, host: str, req: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    resp = sockcall.call(layout.hostdir(host) / "ctl" / "init.sock", req, timeout)
    if resp is None:
        raise HostError(f"{host}: init closed the connection")
    return dict(resp)


def run(layout: Layout, host: str, argv: list[str], timeout: float = 120) -> tuple[int, str]:
    """Run a command as root inside the host (its init spawns it)."""
    resp = call(layout, host, {"op": "run", "argv": argv, "timeout": timeout}, timeout=timeout + 10)
    return int(resp.get("rc", 1)), resp.get("out", "")


def put_file(layout: Layout, host: str, name: str, data: bytes) -> str:
    """Hand a file to the host through its control directory; returns its path there."""
    (layout.hostdir(host) / "ctl" / name).write_bytes(data)
    return f"/run/rehearsal/{name}"


def pids(host: str) -> list[int]:
    out: list[int] = []
    base = CGROUP_BASE / host
    if not base.exists():
        return out
    for root, _d, files in os.walk(base):
        if "cgroup.procs" in files:
            try:
                out += [int(x) for x in Path(root, "cgroup.procs").read_text().split()]
            except OSError:
                pass
    return out


def kill(host: str, timeout: float = 10) -> list[int]:
    """kill -9 every process of the host at once (the instance dies)."""
    victims = pids(host)
    base = CGROUP_BASE / host
    if base.exists():
        try:
            (base / "cgroup.kill").write_text("1")
        except OSError:
            for pid in victims:
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and pids(host):
        time.sleep(0.05)
    return victims


def remove_cgroups(host: str, timeout: float = 10) -> bool:
    """Remove the host's cgroups, deepest first. A cgroup whose last process was just
    killed can stay busy for a moment (EBUSY): retried until `timeout`. True when gone."""
    base = CGROUP_BASE / host
    deadline = time.monotonic() + timeout
    while base.exists():
        for root, _dirs, _f in sorted(os.walk(base, topdown=False), key=lambda x: -len(x[0])):
            try:
                os.rmdir(root)
            except OSError:
                pass
        if not base.exists() or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    return not base.exists()


def alive(host: str) -> bool:
    return bool(pids(host))


def rss_bytes(host: str) -> int:
    """Resident memory of the host's processes (proportional set size, so shared pages
    of the same binaries count once across hosts)."""
    return pss_bytes(pids(host))


def pss_bytes(pids: list[int]) -> int:
    """The proportional set size of these processes, from /proc/<pid>/smaps_rollup."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            pass
    return total
