"""Where everything of a rehearsal sits: hosts and subnets come from the real config model
and topology (the same `load_config` + `build_topology` the program uses); the rest are
the rehearsal's own stand-in addresses, all inside namespaces it creates.

    rh-vpc      the VPC router: one bridge per subnet (gateway .1), forwarding between
                them, DNAT of the Elastic IP to whichever ENI holds its association
    rh-aws      the AWS stand-ins: moto (EC2, SSM, S3) at ENDPOINT_IP:443 playing the VPC
                interface endpoints, the instance metadata service at 169.254.169.254
    rh-client   "the internet": the load generator, at CLIENT_IP (TEST-NET-3)
    rh-<host>   one per EC2 host, its ENI `ens5` with the plan's private IP
    rh-vpn      the Site-to-Site VPN (virtual private gateway, tunnel, customer gateway
                in one router): the VPC's internal and management subnets <-> on-prem
    rh-onprem   the center's compute network: the Slurm nodes' addresses (configured,
                slurmd not running)
"""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from components.config import StackConfig
from components.stackfile import ROOT, load_stack
from components.topology import Topology

from .image import DEFAULT_OS

AWS_NET = "10.255.0.0/24"
AWS_GW = "10.255.0.1"
ENDPOINT_IP = "10.255.0.2"  # moto: the VPC interface endpoints (security group "endpoints")
EFS_IP = "10.255.0.3"  # the EFS mount targets' address (security group "efs"); nothing listens
MIRROR_IP = "10.255.0.4"  # the package mirror stand-in (rehearsal/mirror.py): what a NAT would reach
ENDPOINT_PORT = 443  # plain HTTP on the endpoints' port, so the security groups' https rule applies
IMDS_IP = "169.254.169.254"
CLIENT_NET = "203.0.113.0/30"  # the client link; the Elastic IP (.10) is routed, not on it
CLIENT_GW = "203.0.113.1"
CLIENT_IP = "203.0.113.2"
EIP_PUBLIC_IP = "203.0.113.10"

DEFAULT_WORKDIR = Path(os.environ.get("HPC_REHEARSAL_DIR", "/var/tmp/hpc-rehearsal"))
LOCK_FILE = Path("/run/lock/hpc-rehearsal.lock")

# Memory each host's boot-time sizing sees (/etc/hpc/memory-override.json), so three
# MariaDB + Redis nodes and the rest fit in the rehearsal's 4 GiB.
MEMORY_MIB = {"data": 1024, "monitoring": 1024, "default": 1024}

NS_ROUTER, NS_AWS, NS_CLIENT = "rh-vpc", "rh-aws", "rh-client"
NS_VPN, NS_ONPREM = "rh-vpn", "rh-onprem"
VPN_NET = "10.255.1.0/30"  # the VPC router <-> the VPN's virtual private gateway
VGW_VPC_SIDE, VGW_VPN_SIDE = "10.255.1.1", "10.255.1.2"
ONPREM_SITE = Path(__file__).resolve().parent / "onprem-site.yaml"
# auto: the stack's own on-prem network, else the example site; none: only the stack's.
ONPREM_MODES = ("auto", "none")


@dataclass(frozen=True)
class OnPrem:
    """The on-prem site of a rehearsal: its networks and the compute nodes' addresses."""

    source: str  # "stack" or the site file laid over the stack
    cidrs: tuple[str, ...]
    compute_cidrs: tuple[str, ...]
    nodes: tuple[tuple[str, str], ...]  # (NodeName, address) for nodes with a literal address
    vnc_ports: str

    @property
    def addresses(self) -> list[str]:
        """Addresses on the on-prem namespace: the nodes', else one per compute network."""
        addrs = [a for _n, a in self.nodes]
        for c in self.compute_cidrs:
            net = ipaddress.IPv4Network(c)
            if not any(ipaddress.IPv4Address(a) in net for a in addrs):
                addrs.append(str(net.network_address + 10))
        return addrs

    @property
    def extra_addresses(self) -> list[str]:
        """Addresses on the on-prem namespace itself: one per compute network that has no
        node with a literal address (the nodes have their own namespaces, node_ns)."""
        return self.addresses[len(self.nodes):]

    def gateway(self, cidr: str) -> str:
        return str(ipaddress.IPv4Network(cidr).network_address + 1)

    def cidr_of(self, addr: str) -> str:
        return next(c for c in self.compute_cidrs if ipaddress.IPv4Address(addr) in ipaddress.IPv4Network(c))


def node_ns(node: str) -> str:
    """The network namespace of an on-prem compute node (a systemd container there)."""
    return f"rh-{node}"


def onprem_of(cfg: StackConfig, source: str) -> OnPrem | None:
    if cfg.hybrid is None:
        return None
    compute = cfg.hybrid.compute_cidrs
    nodes = []
    for n in cfg.slurm.nodes:
        addr = str(n.get("NodeAddr", ""))
        try:
            ip = ipaddress.IPv4Address(addr)
        except ValueError:
            continue  # a name (resolved on-prem): nothing to place here
        if any(ip in ipaddress.IPv4Network(c) for c in compute):
            nodes.append((str(n["NodeName"]), addr))
    return OnPrem(source, tuple(cfg.onprem_cidrs), tuple(compute), tuple(nodes), cfg.hybrid.vnc_ports)


@dataclass(frozen=True)
class Subnet:
    cidr: str
    network: str  # external | internal | management
    az: str
    bridge: str

    @property
    def gateway(self) -> str:
        return str(ipaddress.IPv4Network(self.cidr).network_address + 1)

    @property
    def prefixlen(self) -> int:
        return ipaddress.IPv4Network(self.cidr).prefixlen


@dataclass(frozen=True)
class RHost:
    name: str
    roles: tuple[str, ...]
    ip: str
    az: str
    network: str
    subnet: Subnet
    index: int

    @property
    def ns(self) -> str:
        return f"rh-{self.name}"

    @property
    def veth(self) -> str:  # router side; the host side is always ens5
        return f"rhv{self.index}"

    @property
    def memory_mib(self) -> int:
        for role in ("data", "monitoring"):
            if role in self.roles:
                return MEMORY_MIB[role]
        return MEMORY_MIB["default"]


@dataclass
class Layout:
    stack: str
    cfg: StackConfig
    topo: Topology
    subnets: list[Subnet]
    hosts: list[RHost]
    workdir: Path
    onprem: OnPrem | None = None
    os_name: str = DEFAULT_OS  # the hosts' OS (rehearsal/image.py OSES)
    extra: dict[str, Any] = field(default_factory=dict)

    def host(self, name: str) -> RHost:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(f"no host {name!r} in stack {self.stack} (hosts: {', '.join(h.name for h in self.hosts)})")

    def with_role(self, role: str) -> list[RHost]:
        return [h for h in self.hosts if role in h.roles]

    @property
    def namespaces(self) -> list[str]:
        site = [NS_VPN, NS_ONPREM] + [node_ns(n) for n, _a in self.onprem.nodes] if self.onprem else []
        return [NS_ROUTER, NS_AWS, NS_CLIENT] + site + [h.ns for h in self.hosts]

    def hostdir(self, name: str) -> Path:
        return self.workdir / "hosts" / name

    @property
    def shared(self) -> Path:  # the EFS stand-in
        return self.workdir / "efs"


def state_path(workdir: Path) -> Path:
    """What a rehearsal started (pids, namespaces, choices), written by `up`."""
    return workdir / "state.json"


def read_state(workdir: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(state_path(workdir).read_text()))
    except (OSError, ValueError):
        return {}


def onprem_mode(workdir: Path) -> str:
    """The on-prem choice of the rehearsal in `workdir` (recorded by `up`), else
    $HPC_REHEARSAL_ONPREM, else auto."""
    mode = read_state(workdir).get("onprem_mode") or os.environ.get("HPC_REHEARSAL_ONPREM", "auto")
    if mode not in ONPREM_MODES:
        raise ValueError(f"HPC_REHEARSAL_ONPREM={mode!r}: one of {', '.join(ONPREM_MODES)}")
    return str(mode)


def os_of(workdir: Path) -> str:
    """The hosts' OS of the rehearsal in `workdir` (recorded by `up`), else the default."""
    return str(read_state(workdir).get("os") or DEFAULT_OS)


def build_layout(stack: str, workdir: Path = DEFAULT_WORKDIR, onprem: str | None = None,
                 os_name: str | None = None) -> Layout:
    """The stack's hosts and subnets; with onprem `auto` (the default) and a stack that
    routes no on-prem network, the example site (onprem-site.yaml) is laid over it. The
    hosts' OS is `os_name`, else the one the rehearsal in `workdir` was brought up with."""
    cfg, topo = load_stack(stack)
    mode = onprem or onprem_mode(workdir)
    source = "stack"
    if cfg.hybrid is None and mode == "auto":
        site = yaml.safe_load(ONPREM_SITE.read_text())["config"]
        cfg, topo = load_stack(stack, overlay=site)
        source = str(ONPREM_SITE.relative_to(ROOT))
    subnets: list[Subnet] = []
    for network in ("external", "internal", "management"):
        for az_index, cidr in enumerate(cfg.network.subnets[network]):
            subnets.append(Subnet(cidr, network, cfg.network.azs[az_index], f"rhbr{len(subnets)}"))
    by_cidr = {s.cidr: s for s in subnets}
    hosts = [RHost(h.name, tuple(h.roles), h.ip, h.az, h.network, by_cidr[h.subnet], i)
             for i, h in enumerate(topo.hosts)]
    return Layout(stack, cfg, topo, subnets, hosts, workdir, onprem_of(cfg, source), os_name or os_of(workdir))


def repo_root() -> Path:
    return ROOT
