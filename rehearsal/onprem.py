"""The center's compute nodes behind the VPN, and the compute path through it.

Each on-prem node with a literal address is a systemd container (the host image, its
own network namespace `rh-<node>` on the site's switch behind `rh-vpn`), booted once the
controllers and the app hosts are up, running munged and slurmd from what a Slurm host of
the program holds: `/etc/slurm/slurm.conf` and `/etc/munge/munge.key` copied byte for
byte from an app host. Two things the program does not produce come from the site, as on
a real node: its `/etc/hosts`, and a node-local `cgroup.conf` (SITE_CGROUP_CONF).

The user jobs run as must exist, with the same uid and gid, on the controllers (slurmctld
resolves it to sign the job's credential: "_fill_cred_gids: getpwuid failed", the job
requeued forever otherwise) and on the nodes; on a site that is the center's directory
(LDAP/SSSD on every host). The program creates the portal's user on the app hosts only,
so the rehearsal plays the directory (directory_user): that user, as an app host holds
it, is added to the Slurm controllers and to every node.

nspawn mounts the cgroup v1 controllers read-only in a container without a user
namespace; Slurm's proctrack/cgroup, task/cgroup and jobacct_gather/cgroup need them
writable. Each node's controllers are remounted read-write in its own mount namespace
(`mount -o remount,bind,rw`) before slurmd starts; with nspawn's cgroup namespace and
the container's own cgroup in every hierarchy (rehearsal/container.py), Slurm's tree
lands under the node's cgroup, never at the machine's root.

What is checked (check()):
- from a compute node: `scontrol ping` sees every controller UP; `sinfo` lists every
  configured node, none down or invalid;
- a job submitted with sbatch from an app host (as the portal's user) runs on a node
  and completes, with its output on that node;
- each flow of the matrix toward or from the nodes: slurmd answers, a TCP connection that
  is refused (the SYN arrived, nothing listens) passes, one that times out was dropped;
- the flows the matrix does not allow time out (the probes that must fail).
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import container as C
from . import hosts as H
from .layout import NS_ONPREM, Layout, node_ns

# One TCP connection: prints open, refused or timeout.
PROBE = (
    "import socket,sys\n"
    "s=socket.socket(); s.settimeout(float(sys.argv[3]))\n"
    "try:\n"
    "    s.connect((sys.argv[1], int(sys.argv[2]))); print('open')\n"
    "except ConnectionRefusedError:\n"
    "    print('refused')\n"
    "except OSError:\n"
    "    print('timeout')\n"
)
PROBE_TIMEOUT = 3.0


@dataclass
class Check:
    name: str
    expect: str
    got: str
    ok: bool


# The node-local cgroup.conf of the site (the program renders none). Every value is
# Slurm's default; the file must exist: slurmd 22.05 without it fails proctrack/cgroup's
# init ("unable to create cgroup '/sys/fs/cgroup/freezer(null)'"), measured here.
SITE_CGROUP_CONF = """# The site's node-local cgroup.conf (the rehearsal's on-prem nodes; Slurm's defaults).
# slurmd 22.05 with ProctrackType=proctrack/cgroup fails to start without this file.
CgroupPlugin=autodetect
"""
CGROUP_V1 = ("freezer", "memory", "cpuacct", "cpu", "cpuset", "devices", "pids", "blkio")


class NodeError(RuntimeError):
    pass


def node_names(layout: Layout) -> list[str]:
    return [n for n, _a in layout.onprem.nodes] if layout.onprem else []


def node_run(node: str, argv: list[str], timeout: float = 60, input: bytes | None = None) -> tuple[int, str]:
    """Run a command as root on an on-prem node."""
    try:
        return C.exec(C.handle(node), argv, timeout=timeout, input=input)
    except C.ContainerError as e:
        return 1, str(e)


def _node_files(layout: Layout, node: str, addr: str) -> dict[str, str]:
    lines = ["127.0.0.1 localhost", f"{addr} {node}"]
    lines += [f"{a} {n}" for n, a in layout.onprem.nodes if n != node] if layout.onprem else []
    return {"/etc/hosts": "\n".join(lines) + "\n", "/etc/hostname": node + "\n",
            # an on-prem node is no cloud instance: no metadata service to wait for
            "/etc/cloud/cloud-init.disabled": "on-prem compute node\n",
            "/etc/resolv.conf": "nameserver 127.0.0.53\noptions timeout:1 attempts:1\n"}


def _slurm_host_files(layout: Layout) -> tuple[str, bytes, str]:
    """slurm.conf, the munge key and the portal user's passwd line, as an app host holds them."""
    app = layout.topo.role_hosts["app"][0]
    rc, conf = H.run(layout, app, ["cat", "/etc/slurm/slurm.conf"], timeout=30)
    if rc != 0:
        raise NodeError(f"{app}: reading /etc/slurm/slurm.conf: {conf.strip()[-300:]}")
    rc, key = H.run(layout, app, ["base64", "-w0", "/etc/munge/munge.key"], timeout=30)
    if rc != 0:
        raise NodeError(f"{app}: reading /etc/munge/munge.key: {key.strip()[-300:]}")
    rc, pw = H.run(layout, app, ["getent", "passwd", "portal"], timeout=30)
    if rc != 0:
        raise NodeError(f"{app}: no user 'portal' (getent: {pw.strip()[-200:]})")
    return conf, base64.b64decode(key.strip()), pw.strip()


def writable_cgroups(node: str) -> None:
    """The node's cgroup v1 controllers read-write in its own mount namespace (see the
    module doc)."""
    leader = C.handle(node).leader
    for c in CGROUP_V1:
        cp = subprocess.run(["nsenter", "-t", str(leader), "-m", "mount", "-o", "remount,bind,rw,nosuid,nodev,noexec",
                             f"/sys/fs/cgroup/{c}"], capture_output=True, text=True)
        if cp.returncode != 0:
            raise NodeError(f"{node}: remounting /sys/fs/cgroup/{c} read-write: {cp.stderr.strip()}")


def directory_script(passwd: str) -> str:
    """Shell that adds the user of this passwd line with its uid and gid, as the site's
    directory would resolve it; fails if the host has another user or group there."""
    user, _x, uid, gid = passwd.split(":")[:4]
    return (
        "set -e\n"
        f"g=$(getent group {gid} | cut -d: -f1); [ -z \"$g\" ] && groupadd -g {gid} {user} && g={user}\n"
        f"[ \"$g\" = {user} ] || {{ echo \"gid {gid} is $g here, not {user}\"; exit 1; }}\n"
        f"u=$(getent passwd {uid} | cut -d: -f1); [ -z \"$u\" ] && "
        f"useradd -u {uid} -g {gid} -M -d /nonexistent -s /usr/sbin/nologin {user} 2>/dev/null && u={user}\n"
        f"[ \"$u\" = {user} ] || {{ echo \"uid {uid} is $u here, not {user}\"; exit 1; }}\n"
    )


def directory_user(layout: Layout, passwd: str) -> None:
    """The jobs' user on the Slurm controllers, as the site's directory would give it."""
    for host in layout.topo.role_hosts["slurm"]:
        rc, out = H.run(layout, host, ["sh", "-c", directory_script(passwd)], timeout=60)
        if rc != 0:
            raise NodeError(f"{host}: adding the jobs' user {passwd.split(':')[0]}: {out.strip()[-300:]}")


def _setup_node(layout: Layout, node: str, conf: str, key: bytes, passwd: str) -> dict[str, Any]:
    t0 = time.monotonic()
    h = C.handle(node)
    state = C.wait_running(h, timeout=300)
    writable_cgroups(node)
    rc, out = node_run(node, ["sh", "-c", "install -m 0644 /dev/stdin /etc/slurm/slurm.conf"], timeout=60,
                       input=conf.encode())
    if rc != 0:
        raise NodeError(f"{node}: installing slurm.conf: {out.strip()[-300:]}")
    rc, out = node_run(node, ["sh", "-c", directory_script(passwd)], timeout=60)
    if rc != 0:
        raise NodeError(f"{node}: adding the jobs' user: {out.strip()[-300:]}")
    rc, out = node_run(node, ["sh", "-c", "install -o munge -g munge -m 0400 /dev/stdin /etc/munge/munge.key"],
                       timeout=30, input=key)
    if rc != 0:
        raise NodeError(f"{node}: installing the munge key: {out.strip()[-300:]}")
    rc, out = node_run(node, ["sh", "-c", "install -m 0644 /dev/stdin /etc/slurm/cgroup.conf"], timeout=30,
                       input=SITE_CGROUP_CONF.encode())
    if rc != 0:
        raise NodeError(f"{node}: installing cgroup.conf: {out.strip()[-300:]}")
    rc, out = node_run(node, ["systemctl", "enable", "--now", "munge.service", "slurmd.service"], timeout=120)
    if rc != 0:
        raise NodeError(f"{node}: starting munge and slurmd: {out.strip()[-500:]}")
    _rc, active = node_run(node, ["systemctl", "is-active", "munge.service", "slurmd.service"], timeout=30)
    return {"systemd": state, "units": active.split(), "seconds": round(time.monotonic() - t0, 1)}


def start_nodes(layout: Layout, image: Path, say: Any = print) -> dict[str, Any]:
    """Boot every on-prem node with a literal address and start munged and slurmd there
    (the controllers and the app hosts must be up: their files are the nodes')."""
    o = layout.onprem
    if not o or not o.nodes:
        return {}
    conf, key, passwd = _slurm_host_files(layout)
    directory_user(layout, passwd)
    for node, addr in o.nodes:
        d = layout.hostdir(node)
        if d.exists():
            shutil.rmtree(d)
        C.start(node, image, d, node_ns(node), files=_node_files(layout, node, addr))
    results: dict[str, Any] = {}

    def one(node: str) -> None:
        try:
            results[node] = _setup_node(layout, node, conf, key, passwd)
        except Exception as e:  # noqa: BLE001 - reported per node
            results[node] = {"error": f"{type(e).__name__}: {e}"}

    threads = [threading.Thread(target=one, args=(n,), daemon=True) for n, _a in o.nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for node, r in results.items():
        say(f"  {node}: " + (r["error"] if "error" in r else
                             f"systemd {r['systemd']}, munge+slurmd {'/'.join(r['units'])}, {r['seconds']}s"))
    return results


def from_site(layout: Layout, via_host: str, argv: list[str], timeout: float = 60) -> tuple[int, str]:
    """Run a command on the first on-prem compute node: what a compute node sees.
    (`via_host` is kept for callers; the node holds its own slurm.conf and munge key.)"""
    nodes = node_names(layout)
    if not nodes:
        raise NodeError("no on-prem compute node with an address in this rehearsal")
    return node_run(nodes[0], argv, timeout=timeout)


def probe_from_site(addr: str, port: int, layout: Layout | None = None) -> str:
    """A TCP probe from the site: from the first compute node's namespace, else from the
    site's own address."""
    nodes = node_names(layout) if layout is not None else []
    ns = node_ns(nodes[0]) if nodes else NS_ONPREM
    cp = subprocess.run(["nsenter", f"--net=/run/netns/{ns}", "--", "python3", "-c", PROBE, addr, str(port),
                         str(PROBE_TIMEOUT)], capture_output=True, text=True, timeout=PROBE_TIMEOUT + 10)
    return cp.stdout.strip() or cp.stderr.strip()[-200:]


def probe_from_host(layout: Layout, host: str, addr: str, port: int) -> str:
    _rc, out = H.run(layout, host, ["python3", "-c", PROBE, addr, str(port), str(PROBE_TIMEOUT)],
                     timeout=PROBE_TIMEOUT + 10)
    return out.strip()


def controllers_seen_from_site(layout: Layout) -> dict[str, str]:
    """controller -> UP/DOWN as `scontrol ping` on a compute node reports it."""
    client = layout.topo.role_hosts["app"][0]
    _rc, out = from_site(layout, client, ["scontrol", "ping"], timeout=60)
    seen: dict[str, str] = {}
    for line in out.splitlines():
        if line.startswith("Slurmctld(") and " at " in line:
            seen[line.split(" at ", 1)[1].split()[0]] = line.rsplit(" ", 1)[-1]
    return seen


def submit(layout: Layout, client: str, script: str, extra: str = "") -> str:
    """sbatch from an app host as the portal's user (as the portal submits); the job id.
    Output goes to /tmp/hpc-job-<id>.out on the node that runs it."""
    cmd = (f"cd /tmp && runuser -u portal -- sbatch --parsable --chdir=/tmp --output=/tmp/hpc-job-%j.out {extra} "
           f"--wrap {_quote(script)}")
    rc, out = H.run(layout, client, ["sh", "-c", cmd], timeout=60)
    job = out.strip().split(";")[0].splitlines()[-1] if out.strip() else ""
    if rc != 0 or not job.isdigit():
        raise NodeError(f"sbatch on {client}: rc {rc}: {out.strip()[-300:]}")
    return job


def _quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def job_info(layout: Layout, client: str, job: str) -> dict[str, str]:
    """JobState, NodeList, ExitCode... of a job as `scontrol show job` (MinJobAge keeps
    finished ones) or, once gone from there, sacct reports it; {} if Slurm knows none."""
    rc, out = H.run(layout, client, ["scontrol", "-o", "show", "job", job], timeout=30)
    if rc == 0 and "JobId=" in out:
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)
    rc, out = H.run(layout, client, ["sacct", "-n", "-X", "-P", "-j", job, "-o", "State,NodeList,ExitCode"], timeout=30)
    line = out.strip().splitlines()[0] if rc == 0 and out.strip() else ""
    if not line:
        return {}
    state, nodes, code = (line.split("|") + ["", "", ""])[:3]
    return {"JobState": state.split()[0], "NodeList": nodes, "ExitCode": code}


def job_output(node: str, job: str) -> str:
    rc, out = node_run(node, ["cat", f"/tmp/hpc-job-{job}.out"], timeout=30)
    return out if rc == 0 else ""


def run_job(layout: Layout, client: str, timeout: float = 90) -> tuple[str, str]:
    """A short job through sbatch to completion: (its final state and node, its output)."""
    job = submit(layout, client, "echo ran on $(hostname)")
    deadline = time.monotonic() + timeout
    info: dict[str, str] = {}
    while time.monotonic() < deadline:
        info = job_info(layout, client, job)
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            break
        time.sleep(1)
    node = info.get("NodeList", "")
    return f"{info.get('JobState', 'unknown')} on {node or '-'}", job_output(node, job).strip() if node else ""


def check(layout: Layout) -> list[Check]:
    o = layout.onprem
    assert o is not None, "no on-prem site in this rehearsal"
    from components.catalog import PORTS

    slurmctld, slurmd = PORTS["slurmctld"][1], PORTS["slurmd"][1]
    srun_low = int(layout.cfg.slurm.srun_port_range.split("-")[0])
    vnc_low = int(o.vnc_ports.split("-")[0])
    ctls = layout.topo.role_hosts["slurm"]
    app = layout.topo.role_hosts["app"][0]
    node_addr = o.addresses[0]
    nodes = node_names(layout)
    out: list[Check] = []

    def add(name: str, expect: str, got: str) -> None:
        out.append(Check(name, expect, got, got == expect))

    def probe(addr: str, port: int) -> str:
        return probe_from_site(addr, port, layout)

    if nodes:
        seen = controllers_seen_from_site(layout)
        for c in ctls:
            add(f"scontrol ping on {nodes[0]} (on-prem): {c}", "UP", seen.get(c, "no answer"))
        rc, text = from_site(layout, app, ["sinfo", "-h", "-N", "-o", "%N %t"], timeout=60)
        states = dict(line.split()[:2] for line in text.splitlines() if len(line.split()) >= 2) if rc == 0 else {}
        want = sorted(n for n, _a in o.nodes)
        add("sinfo on a node lists the configured nodes", " ".join(want), " ".join(sorted(states)) or text[-200:])
        bad = sorted(f"{n}={t}" for n, t in states.items() if t.rstrip("*~#!%$@^-") not in ("idle", "mix", "alloc"))
        add("no node down, drained or invalid", "", " ".join(bad))
        state, output = run_job(layout, app)
        node = state.split(" on ")[-1]
        add(f"a job sbatch'ed on {app} as the portal's user runs to completion on a node", f"COMPLETED on {node}",
            state)
        add("its output on that node", f"ran on {node}", output)
    for c in ctls:
        ip = layout.host(c).ip
        add(f"on-prem -> {c}:{slurmctld} slurmctld", "open", probe(ip, slurmctld))
        add(f"{c} -> {node_addr}:{slurmd} slurmd", "open" if nodes else "refused",
            probe_from_host(layout, c, node_addr, slurmd))
        add(f"{c} -> {node_addr}:22 (not in the matrix)", "timeout", probe_from_host(layout, c, node_addr, 22))
    app_ip = layout.host(app).ip
    add(f"on-prem -> {app}:{srun_low} srun port range", "refused", probe(app_ip, srun_low))
    add(f"{app} -> {node_addr}:{vnc_low} VNC (websocket proxy)", "refused", probe_from_host(layout, app, node_addr, vnc_low))
    add(f"on-prem -> {app}:5010 (not in the matrix)", "timeout", probe(app_ip, 5010))
    data: list[str] = list(layout.topo.role_hosts.get("data", []))
    if data:
        add(f"on-prem -> {data[0]}:3306 (not in the matrix)", "timeout", probe(layout.host(data[0]).ip, 3306))
    return out


def as_json(checks: list[Check]) -> list[dict[str, object]]:
    return [asdict(c) for c in checks]
