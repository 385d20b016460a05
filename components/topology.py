"""Where every host goes: names, roles, AZ, subnet, fixed private address, endpoints.

Pure functions of the validated `StackConfig`. The Pulumi components, the cloud-init
contexts, the offline plan and the rehearsal all read this one layout, so an address is
decided in exactly one place.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from .config import ROLES, ConfigError, StackConfig

# Which phase of the migration (plan-digest.md) brings each role up. Phase 1 holds the
# network, endpoint names, security groups, EFS, buckets and secrets; phase 6 the DNS
# cutover.
ROLE_PHASE = {"data": 2, "app": 3, "web": 3, "slurm": 3, "lb": 4, "monitoring": 5}


@dataclass(frozen=True)
class Host:
    name: str
    group: str
    roles: tuple[str, ...]
    ordinal: int  # 1-based within the group
    az: str
    az_index: int
    network: str
    subnet: str
    ip: str
    instance_type: str
    arch: str
    root_gb: int
    data_gb: int

    @property
    def phase(self) -> int:
        return min(ROLE_PHASE[r] for r in self.roles)

    def has(self, role: str) -> bool:
        return role in self.roles


@dataclass(frozen=True)
class Topology:
    hosts: tuple[Host, ...]
    role_hosts: dict[str, tuple[str, ...]]
    primaries: dict[str, str]  # active LB, galera bootstrap node, redis master, primary controller
    endpoints: dict[str, str]  # fqdn -> ip (A records of the private zone)

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    def with_role(self, role: str) -> tuple[Host, ...]:
        return tuple(h for h in self.hosts if role in h.roles)


def slurmdbd_placement(controllers: Sequence[str]) -> tuple[str, str | None]:
    """(active slurmdbd, standby slurmdbd or None) among the Slurm controllers: the active
    one on the backup (the last), the standby on the primary, so a backup taking control
    never waits on a slurmdbd on the host it replaces (docs/slurm-cutover.md)."""
    return controllers[-1], (controllers[0] if len(controllers) > 1 else None)


def build_topology(cfg: StackConfig) -> Topology:
    net = cfg.network
    n_azs = len(net.azs)
    hosts: list[Host] = []
    used: dict[str, str] = {}
    problems: list[str] = []
    for g in cfg.groups:
        spec = g.spec
        per_az_seen: dict[int, int] = {}
        for i in range(g.count):
            ordinal = i + 1
            az_index = (spec.az_offset + i) % n_azs
            slot = per_az_seen.get(az_index, 0)
            per_az_seen[az_index] = slot + 1
            subnet = ipaddress.IPv4Network(net.subnets[spec.network][az_index])
            host_part = spec.ip_base + slot
            # AWS reserves the first four addresses and the last one of every subnet.
            if host_part < 4 or host_part >= subnet.num_addresses - 1:
                problems.append(
                    f"roles.{spec.sizing_role}.count: {g.count} -> at most "
                    f"{max(0, subnet.num_addresses - 1 - spec.ip_base) * n_azs} {spec.name} hosts fit "
                    f"the {spec.network} subnets ({subnet} is too small); widen network.subnet_prefix"
                )
                break
            ip = str(subnet.network_address + host_part)
            name = f"{spec.name}-{ordinal}"
            if ip in used:
                problems.append(
                    f"roles.{spec.sizing_role}.count: {g.count} -> {name} would take {ip}, already "
                    f"{used[ip]}'s; lower the count or widen network.subnet_prefix"
                )
                break
            used[ip] = name
            roles = spec.roles + (spec.first_host_extra if ordinal == 1 else ())
            hosts.append(Host(name, spec.name, roles, ordinal, net.azs[az_index], az_index,
                              spec.network, str(subnet), ip, g.instance_type, g.arch,
                              g.root_gb, g.data_gb))
    if problems:
        raise ConfigError(problems)

    role_hosts = {r: tuple(h.name for h in hosts if r in h.roles) for r in ROLES}
    primaries = {
        "active_lb": role_hosts["lb"][0],
        "galera_bootstrap": role_hosts["data"][0],
        # Not on the preferred Galera writer (the first data host): one host's failure
        # then fails over one tier, not both at once. With both there, a frozen data-1
        # kept every portal request waiting for the Redis promotion (5-10 s) although
        # the writes had moved in 2 s (the freeze-galera drill, 7.95 s against 5).
        "redis_master": role_hosts["data"][1 if len(role_hosts["data"]) > 1 else 0],
        "slurm_primary": role_hosts["slurm"][0],
    }
    d = cfg.domain
    endpoints: dict[str, str] = {}
    by_name = {h.name: h for h in hosts}
    for h in hosts:
        endpoints[f"{h.name}.{d}"] = h.ip
    for i, n in enumerate(role_hosts["data"], 1):
        endpoints[f"galera-{i}.{d}"] = by_name[n].ip
        endpoints[f"redis-{i}.{d}"] = by_name[n].ip
        endpoints[f"sentinel-{i}.{d}"] = by_name[n].ip
    for i, n in enumerate(role_hosts["slurm"], 1):
        endpoints[f"slurmctld-{i}.{d}"] = by_name[n].ip
    endpoints[f"slurmdbd.{d}"] = by_name[slurmdbd_placement(role_hosts["slurm"])[0]].ip
    mon = by_name[role_hosts["monitoring"][0]]
    for alias in ("loghost", "prometheus", "alertmanager", "grafana"):
        endpoints[f"{alias}.{d}"] = mon.ip
    for i, n in enumerate(role_hosts["lb"], 1):
        endpoints[f"lb-{i}.{d}"] = by_name[n].ip
    return Topology(tuple(hosts), role_hosts, primaries, dict(sorted(endpoints.items())))


def primaries_by_az(topo: Topology) -> dict[str, list[str]]:
    """AZ -> the primaries it holds (used by tests and the plan to show the stagger)."""
    out: dict[str, list[str]] = {}
    for what, name in topo.primaries.items():
        out.setdefault(topo.host(name).az, []).append(what)
    return out
