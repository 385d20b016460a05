"""The named port catalog and the security matrix, expanded into concrete rules.

One table names every port once; the matrix file (data/security_matrix.yaml) says which
peer may reach which named port of which group. `expand_matrix` turns both into the
list of rules the Security component creates and the tests compare against. Pure.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .config import ROLES, StackConfig

MATRIX_FILE = Path(__file__).parent / "data" / "security_matrix.yaml"

# name -> (IP protocol, from port, to port). VRRP is IP protocol 112 with no ports.
PORTS: dict[str, tuple[str, int, int]] = {
    "ssh": ("tcp", 22, 22),
    "http": ("tcp", 80, 80),
    "https": ("tcp", 443, 443),
    "syslog": ("tcp", 514, 514),
    "nfs": ("tcp", 2049, 2049),
    "grafana": ("tcp", 3000, 3000),
    "mysql": ("tcp", 3306, 3306),
    "galera_sst": ("tcp", 4444, 4444),
    "galera": ("tcp", 4567, 4567),
    "galera_udp": ("udp", 4567, 4567),
    "galera_ist": ("tcp", 4568, 4568),
    "redis": ("tcp", 6379, 6379),
    "slurmctld": ("tcp", 6817, 6817),
    "slurmd": ("tcp", 6818, 6818),
    "slurmdbd": ("tcp", 6819, 6819),
    "nginx": ("tcp", 8080, 8080),
    "haproxy_metrics": ("tcp", 8404, 8404),
    "prometheus": ("tcp", 9090, 9090),
    "alertmanager": ("tcp", 9093, 9093),
    "node_exporter": ("tcp", 9100, 9100),
    "mysqld_exporter": ("tcp", 9104, 9104),
    "redis_exporter": ("tcp", 9121, 9121),
    "clustercheck": ("tcp", 9200, 9200),
    "sentinel": ("tcp", 26379, 26379),
    "vrrp": ("112", 0, 0),
}
# Ports that come from the stack config rather than the table.
CONFIG_PORTS = ("portal", "srun", "vnc")

GROUPS = ROLES + ("efs", "endpoints")
CIDR_ALIASES = ("internet", "management_net", "onprem", "onprem_compute")


@dataclass(frozen=True, order=True)
class Rule:
    """One security group rule as AWS stores it."""

    direction: str  # ingress | egress
    group: str  # the group the rule belongs to
    peer: str  # another group's name, or a CIDR
    protocol: str  # tcp | udp | 112
    from_port: int
    to_port: int
    port_name: str

    @property
    def key(self) -> str:
        proto = self.protocol if self.protocol != "112" else "vrrp"
        ports = f"{self.from_port}" if self.from_port == self.to_port else f"{self.from_port}-{self.to_port}"
        peer = self.peer.replace("/", "_").replace(".", "-")
        return f"{self.direction[:2]}-{self.group}-{peer}-{proto}-{ports}"


def load_matrix(path: Path = MATRIX_FILE) -> list[dict[str, Any]]:
    doc = yaml.safe_load(path.read_text())
    rules = doc["rules"]
    for i, r in enumerate(rules):
        for end in ("from", "to"):
            if r[end] not in GROUPS + CIDR_ALIASES:
                raise ValueError(f"{path.name} rules[{i}].{end}: {r[end]!r} is not a group or CIDR alias")
        for p in r["ports"]:
            if p not in PORTS and p not in CONFIG_PORTS:
                raise ValueError(f"{path.name} rules[{i}].ports: {p!r} is not in the port catalog")
        if r["from"] in CIDR_ALIASES and r["to"] in CIDR_ALIASES:
            raise ValueError(f"{path.name} rules[{i}]: a rule needs at least one group end")
    return rules


def _port_ranges(cfg: StackConfig, name: str) -> list[tuple[str, int, int]]:
    if name == "portal":
        ports = sorted({p for s in cfg.services for p in s.ports})
        ranges: list[tuple[str, int, int]] = []
        for p in ports:  # contiguous ports share one rule
            if ranges and ranges[-1][2] == p - 1:
                ranges[-1] = ("tcp", ranges[-1][1], p)
            else:
                ranges.append(("tcp", p, p))
        return ranges
    if name == "srun":
        lo, hi = (int(x) for x in cfg.slurm.srun_port_range.split("-"))
        return [("tcp", lo, hi)]
    if name == "vnc":
        if cfg.hybrid is None:
            return []
        lo, hi = (int(x) for x in cfg.hybrid.vnc_ports.split("-"))
        return [("tcp", lo, hi)]
    return [PORTS[name]]


def cidrs_for(cfg: StackConfig, alias: str) -> list[str]:
    if alias == "internet":
        return ["0.0.0.0/0"]
    if alias == "management_net":
        return list(cfg.network.subnets["management"])
    if alias == "onprem":
        return list(cfg.onprem_cidrs)
    if alias == "onprem_compute":
        return list(cfg.hybrid.compute_cidrs) if cfg.hybrid else []
    raise KeyError(alias)


def expand_matrix(cfg: StackConfig, rules: list[dict[str, Any]] | None = None) -> list[Rule]:
    """Every concrete rule for this stack, sorted and without duplicates."""
    settings = {"ssh_from_management": cfg.network.ssh_from_management}
    out: set[Rule] = set()
    for r in rules if rules is not None else load_matrix():
        if r.get("when") and not settings.get(r["when"], False):
            continue
        src, dst = r["from"], r["to"]
        for pname in r["ports"]:
            for proto, lo, hi in _port_ranges(cfg, pname):
                if src in GROUPS and dst in GROUPS:
                    out.add(Rule("ingress", dst, src, proto, lo, hi, pname))
                    out.add(Rule("egress", src, dst, proto, lo, hi, pname))
                elif src in GROUPS:
                    for c in cidrs_for(cfg, dst):
                        out.add(Rule("egress", src, c, proto, lo, hi, pname))
                else:
                    for c in cidrs_for(cfg, src):
                        out.add(Rule("ingress", dst, c, proto, lo, hi, pname))
    return sorted(out)
