"""The compute path through the VPN, checked as far as this machine allows.

slurmd cannot run in a namespace here, so the on-prem nodes are addresses with nothing
listening. What is checked:

- a compute node's view of the controllers: `scontrol ping` and `sinfo` run with an
  on-prem node's address (the network namespace `rh-onprem`) and a Slurm host's files
  and munge socket (the mount namespace of an app host: the same slurm.conf and munge key
  the nodes hold), through the VPN, the VPC router and the controllers' security groups;
- each flow of the matrix toward or from the nodes: a TCP connection that is refused
  (the SYN arrived, nothing listens) passes, one that times out was dropped on the way;
- the flows the matrix does not allow time out (the probes that must fail).
"""

from __future__ import annotations

import subprocess
from dataclasses import asdict, dataclass

from . import hosts as H
from .layout import NS_ONPREM, Layout

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


def init_pid(host: str) -> int:
    """The host's systemd (its container's PID 1), as seen from this machine."""
    return H.leader(host)


def from_site(layout: Layout, via_host: str, argv: list[str], timeout: float = 60) -> tuple[int, str]:
    """Run a command with an on-prem node's address and `via_host`'s files (slurm.conf,
    the munge socket): what a compute node would see."""
    pid = init_pid(via_host)
    cmd = ["nsenter", f"--target={pid}", "--mount", "--uts", "--root", "--wd",
           f"--net=/run/netns/{NS_ONPREM}", "--"] + argv
    try:
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {timeout:.0f}s"
    return cp.returncode, cp.stdout + cp.stderr


def probe_from_site(addr: str, port: int) -> str:
    cp = subprocess.run(["nsenter", f"--net=/run/netns/{NS_ONPREM}", "--", "python3", "-c", PROBE, addr, str(port),
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
    out: list[Check] = []

    def add(name: str, expect: str, got: str) -> None:
        out.append(Check(name, expect, got, got == expect))

    seen = controllers_seen_from_site(layout)
    for c in ctls:
        add(f"scontrol ping from {node_addr} (on-prem): {c}", "UP", seen.get(c, "no answer"))
    rc, text = from_site(layout, app, ["sinfo", "-h", "-N", "-o", "%N"], timeout=60)
    listed = sorted(set(text.split())) if rc == 0 else []
    want = sorted(n for n, _a in o.nodes)
    add("sinfo from on-prem lists the configured nodes", " ".join(want), " ".join(listed) if rc == 0 else text[-200:])
    for c in ctls:
        ip = layout.host(c).ip
        add(f"on-prem -> {c}:{slurmctld} slurmctld", "open", probe_from_site(ip, slurmctld))
        add(f"{c} -> {node_addr}:{slurmd} slurmd (nothing listens: slurmd cannot run here)", "refused",
            probe_from_host(layout, c, node_addr, slurmd))
        add(f"{c} -> {node_addr}:22 (not in the matrix)", "timeout", probe_from_host(layout, c, node_addr, 22))
    app_ip = layout.host(app).ip
    add(f"on-prem -> {app}:{srun_low} srun port range", "refused", probe_from_site(app_ip, srun_low))
    add(f"{app} -> {node_addr}:{vnc_low} VNC (websocket proxy)", "refused", probe_from_host(layout, app, node_addr, vnc_low))
    add(f"on-prem -> {app}:5010 (not in the matrix)", "timeout", probe_from_site(app_ip, 5010))
    data: list[str] = list(layout.topo.role_hosts.get("data", []))
    if data:
        add(f"on-prem -> {data[0]}:3306 (not in the matrix)", "timeout", probe_from_site(layout.host(data[0]).ip, 3306))
    return out


def as_json(checks: list[Check]) -> list[dict[str, object]]:
    return [asdict(c) for c in checks]
