"""Every check of the stack configuration, and the collection of its problems.

`validate_config` reads the project's config namespace (a plain dict, as in
`Pulumi.<stack>.yaml`) into the typed model of components/config_model.py and returns
the problems it found, one `key.path: value -> what is allowed` line each, and the
`StackConfig` when there are none. components/config.py's `load_config` turns the
problems into a ConfigError.
"""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path
from typing import Any

from .config_model import (
    ARCHS,
    DEFAULT_SERVICES,
    NAT_MODES,
    NETWORKS,
    PROFILE_GROUPS,
    PROFILES,
    ROLES,
    SIZING,
    CutoverConfig,
    GatesConfig,
    GroupConfig,
    HybridConfig,
    NetworkConfig,
    ServiceConfig,
    SlurmConfig,
    StackConfig,
)

AMI_RE = re.compile(r"^ami-(?:[0-9a-f]{8}|[0-9a-f]{17})$")
SERVICE_NAME_RE = re.compile(r"^[a-z][a-z0-9]{1,15}$")
PATH_RE = re.compile(r"^/[A-Za-z0-9._~/-]*$")
DOMAIN_RE = re.compile(r"^(?=.{1,200}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")

# Ports that may not be given to a portal service: they belong to other daemons on the
# same hosts (nginx 8080, exporters, HAProxy stats, DB writer, Redis, Slurm, ...).
RESERVED_PORTS = {22, 80, 443, 514, 2049, 3000, 3306, 4444, 4567, 4568, 6379, 6817, 6818,
                  6819, 8080, 8404, 9090, 9093, 9100, 9104, 9115, 9121, 9200, 26379}

# slurm.conf keys the template sets from the topology and the stack: not overridable.
SLURM_MANAGED_KEYS = {k.lower() for k in (
    "ClusterName", "SlurmctldHost", "ControlMachine", "BackupController", "SlurmUser", "AuthType", "CredType",
    "SlurmctldPort", "SlurmdPort", "SrunPortRange", "SlurmctldPidFile", "SlurmdPidFile", "SlurmdSpoolDir",
    "SlurmctldTimeout", "StateSaveLocation", "ProctrackType", "TaskPlugin", "SelectType",
    "AccountingStorageType", "AccountingStorageHost", "AccountingStoragePort", "JobCompType", "NodeName",
    "PartitionName", "Include", "MessageTimeout", "AccountingStorageBackupHost", "AccountingStoreFlags",
    "SlurmctldPrimaryOnProg", "SlurmctldPrimaryOffProg")}

_TYPES_FILE = Path(__file__).parent / "data" / "instance_types.json"
INSTANCE_TYPES: dict[str, dict[str, Any]] = json.loads(_TYPES_FILE.read_text())


# ------------------------------------------------------------------ validation

_KNOWN_TOP = {
    "profile", "phase", "network", "onprem_cidrs", "ami", "roles", "services", "domain",
    "tls", "alerts", "backup", "slurm", "app", "tags", "hybrid", "gates", "cutover",
}
# Secret keys live in the same namespace; they are read as Pulumi secrets, not here.
SECRET_KEYS = {
    "tls_cert", "tls_key", "slack_webhook_url", "redis_password", "mariadb_root_password",
    "mariadb_app_password", "mariadb_slurm_password", "galera_sst_password",
    "clustercheck_password", "munge_key", "grafana_admin_password",
}


class _Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, key: str, value: Any, allowed: str) -> None:
        self.items.append(f"{key}: {json.dumps(value, default=str)} -> {allowed}")


def _as_dict(p: _Problems, key: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        p.add(key, value, "a mapping")
        return {}
    return value


def _unknown_keys(p: _Problems, key: str, value: dict[str, Any], allowed: set[str]) -> None:
    for k in sorted(set(value) - allowed):
        p.add(f"{key}.{k}" if key else k, value[k], "unknown key; allowed: " + ", ".join(sorted(allowed)))


def _int(p: _Problems, key: str, value: Any, lo: int, hi: int) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        else:
            p.add(key, value, f"an integer from {lo} to {hi}")
            return None
    if not lo <= value <= hi:
        p.add(key, value, f"an integer from {lo} to {hi}")
        return None
    return int(value)


def _network(p: _Problems, key: str, value: Any, lo: int = 16, hi: int = 28) -> ipaddress.IPv4Network | None:
    try:
        net = ipaddress.IPv4Network(str(value), strict=True)
    except ValueError:
        p.add(key, value, "an IPv4 network in CIDR form with no host bits set, e.g. 10.40.0.0/16")
        return None
    if not lo <= net.prefixlen <= hi:
        p.add(key, value, f"a prefix length from /{lo} to /{hi} (AWS limits)")
        return None
    return net


def derive_subnets(vpc: ipaddress.IPv4Network, n_azs: int, prefix: int) -> dict[str, tuple[str, ...]] | None:
    """The default address plan: one block of 8 AZ slots per network, in order.

    10.40.0.0/16 with /24 subnets gives external 10.40.0-2.0/24, internal
    10.40.8-10.0/24, management 10.40.16-18.0/24 for three AZs.
    """
    stride = 8
    if prefix < vpc.prefixlen or 2 ** (prefix - vpc.prefixlen) < stride * len(NETWORKS):
        return None
    subs = list(vpc.subnets(new_prefix=prefix))
    return {
        net: tuple(str(subs[i * stride + a]) for a in range(n_azs))
        for i, net in enumerate(NETWORKS)
    }


def _validate_network(p: _Problems, raw: dict[str, Any], profile: str) -> NetworkConfig | None:
    net = _as_dict(p, "network", raw.get("network"))
    _unknown_keys(p, "network", net, {"vpc_cidr", "azs", "nat_gateways", "subnet_prefix",
                                      "address_plan", "ssh_from_management"})
    vpc = _network(p, "network.vpc_cidr", net.get("vpc_cidr", "10.40.0.0/16"))
    azs_raw = net.get("azs")
    azs: tuple[str, ...] = ()
    if not isinstance(azs_raw, list) or not azs_raw or not all(isinstance(a, str) for a in azs_raw):
        p.add("network.azs", azs_raw, "a non-empty list of availability zone names, e.g. [ap-northeast-2a]")
    elif len(set(azs_raw)) != len(azs_raw):
        p.add("network.azs", azs_raw, "distinct availability zones")
    elif len(azs_raw) > 8:
        p.add("network.azs", azs_raw, "at most 8 availability zones")
    else:
        azs = tuple(azs_raw)
    nat = net.get("nat_gateways", "per_az" if profile == "ha" else "single")
    if nat not in NAT_MODES:
        p.add("network.nat_gateways", nat, "one of " + ", ".join(NAT_MODES))
    ssh = net.get("ssh_from_management", False)
    if not isinstance(ssh, bool):
        p.add("network.ssh_from_management", ssh, "true or false")
    prefix = _int(p, "network.subnet_prefix", net.get("subnet_prefix", 24), 16, 28)
    if vpc is None or not azs or prefix is None:
        return None

    plan_raw = net.get("address_plan")
    subnets: dict[str, tuple[str, ...]] = {}
    if plan_raw is None:
        derived = derive_subnets(vpc, len(azs), prefix)
        if derived is None:
            p.add("network.vpc_cidr", str(vpc),
                  f"a network large enough for 3 networks x 8 AZ slots of /{prefix} subnets "
                  f"(/{prefix - 5} or larger), or set network.subnet_prefix / network.address_plan")
            return None
        subnets = derived
    else:
        plan = _as_dict(p, "network.address_plan", plan_raw)
        _unknown_keys(p, "network.address_plan", plan, set(NETWORKS))
        seen: list[tuple[str, ipaddress.IPv4Network]] = []
        for name in NETWORKS:
            key = f"network.address_plan.{name}"
            cidrs = plan.get(name)
            if not isinstance(cidrs, list) or len(cidrs) != len(azs):
                p.add(key, cidrs, f"a list of {len(azs)} CIDRs, one per AZ in network.azs order")
                continue
            ok: list[str] = []
            for i, c in enumerate(cidrs):
                sub = _network(p, f"{key}[{i}]", c, 16, 28)
                if sub is None:
                    continue
                if not sub.subnet_of(vpc):
                    p.add(f"{key}[{i}]", c, f"a subnet inside network.vpc_cidr {vpc}")
                    continue
                for other_key, other in seen:
                    if sub.overlaps(other):
                        p.add(f"{key}[{i}]", c, f"a subnet that does not overlap {other_key} {other}")
                seen.append((f"{key}[{i}]", sub))
                ok.append(str(sub))
            subnets[name] = tuple(ok)
        if any(len(v) != len(azs) for v in subnets.values()) or len(subnets) != len(NETWORKS):
            return None
    return NetworkConfig(str(vpc), azs, subnets, nat, bool(ssh))


def _validate_groups(
    p: _Problems, raw: dict[str, Any], profile: str, amis: dict[str, str], n_azs: int
) -> tuple[GroupConfig, ...]:
    roles_raw = _as_dict(p, "roles", raw.get("roles"))
    specs = PROFILE_GROUPS[profile]
    by_sizing_role = {s.sizing_role: s for s in specs}
    for role in sorted(roles_raw):
        if role not in ROLES:
            p.add(f"roles.{role}", roles_raw[role], "a role: " + ", ".join(ROLES))
        elif role not in by_sizing_role:
            host = next(s for s in specs if role in s.roles or role in s.first_host_extra)
            p.add(f"roles.{role}", roles_raw[role],
                  f"no override: in profile {profile} the {role} role runs on the "
                  f"{host.name} hosts; set roles.{host.sizing_role} instead")
    groups: list[GroupConfig] = []
    for spec in specs:
        key = f"roles.{spec.sizing_role}"
        ov = _as_dict(p, key, roles_raw.get(spec.sizing_role))
        _unknown_keys(p, key, ov, {"count", "instance_type", "root_gb", "data_gb", "arch"})
        sizing = SIZING[spec.sizing_role]
        count = spec.default_count
        if "count" in ov:
            c = _int(p, f"{key}.count", ov["count"], 0, 10_000)
            if c is not None and not spec.min_count <= c <= spec.max_count:
                allowed = (f"exactly {spec.min_count}" if spec.min_count == spec.max_count
                           else f"{spec.min_count} to {spec.max_count}")
                p.add(f"{key}.count", c, f"{allowed} in profile {profile}")
            elif c is not None and spec.odd_count and c % 2 == 0:
                p.add(f"{key}.count", c,
                      "an odd count of 3 or more: Galera needs a majority of voters to survive a node loss")
            elif c is not None:
                count = c
        arch = ov.get("arch", "x86_64")
        if arch not in ARCHS:
            p.add(f"{key}.arch", arch, "one of " + ", ".join(ARCHS))
            arch = "x86_64"
        itype = ov.get("instance_type", sizing.instance_type[arch])
        roles_here = spec.roles + spec.first_host_extra
        min_vcpu = max(SIZING[r].min_vcpus for r in roles_here)
        min_mem = max(SIZING[r].min_memory_mib for r in roles_here)
        info = INSTANCE_TYPES.get(itype) if isinstance(itype, str) else None
        if info is None:
            p.add(f"{key}.instance_type", itype, "a current-generation EC2 instance type, e.g. " + sizing.instance_type[arch])
        elif arch not in info["archs"]:
            p.add(f"{key}.instance_type", itype,
                  f"an instance type for architecture {arch} (it supports {', '.join(info['archs'])})")
        elif info["vcpus"] < min_vcpu or info["memory_mib"] < min_mem:
            p.add(f"{key}.instance_type", itype,
                  f"at least {min_vcpu} vCPU and {min_mem // 1024} GiB for {'+'.join(roles_here)} "
                  f"(it has {info['vcpus']} vCPU, {info['memory_mib'] / 1024:g} GiB)")
        root = _int(p, f"{key}.root_gb", ov.get("root_gb", sizing.root_gb), sizing.min_root_gb, 16384)
        data = sizing.data_gb
        if "data_gb" in ov:
            if sizing.data_gb == 0:
                p.add(f"{key}.data_gb", ov["data_gb"], f"not set: the {spec.sizing_role} role keeps no state on its hosts")
            else:
                d = _int(p, f"{key}.data_gb", ov["data_gb"], sizing.min_data_gb, 16384)
                data = d if d is not None else data
        if count > 1 and n_azs and n_azs < min(spec.spread, count):
            p.add("network.azs", f"{n_azs} AZs",
                  f"at least {min(spec.spread, count)} AZs for {count} {spec.name} hosts "
                  f"({'+'.join(spec.roles)} must survive the loss of one AZ)")
        groups.append(GroupConfig(spec, count, str(itype), arch, root or sizing.root_gb, data))
    return tuple(groups)


def _validate_services(p: _Problems, raw: Any) -> tuple[ServiceConfig, ...]:
    if raw is None:
        return DEFAULT_SERVICES
    if not isinstance(raw, list) or not raw:
        p.add("services", raw, "a non-empty list of portal services")
        return DEFAULT_SERVICES
    out: list[ServiceConfig] = []
    ports_seen: dict[int, str] = {}
    names: set[str] = set()
    ws_count = 0
    for i, s in enumerate(raw):
        key = f"services[{i}]"
        s = _as_dict(p, key, s)
        _unknown_keys(p, key, s, {"name", "ports", "health", "path_beg", "websocket", "balance", "sticky", "db"})
        name = s.get("name")
        if not isinstance(name, str) or not SERVICE_NAME_RE.match(name) or name in names:
            p.add(f"{key}.name", name, "a unique lowercase name of 2-16 letters/digits")
            continue
        names.add(name)
        ports = s.get("ports")
        if not isinstance(ports, list) or not ports:
            p.add(f"{key}.ports", ports, "a non-empty list of TCP ports")
            continue
        good_ports: list[int] = []
        for j, port in enumerate(ports):
            pv = _int(p, f"{key}.ports[{j}]", port, 1024, 65535)
            if pv is None:
                continue
            if pv in RESERVED_PORTS:
                p.add(f"{key}.ports[{j}]", pv, "a port not used by another daemon (reserved: "
                      + ", ".join(str(x) for x in sorted(RESERVED_PORTS)) + ")")
            elif pv in ports_seen:
                p.add(f"{key}.ports[{j}]", pv, f"a port not already used by service {ports_seen[pv]}")
            else:
                ports_seen[pv] = name
                good_ports.append(pv)
        health = s.get("health")
        if not isinstance(health, str) or not PATH_RE.match(health):
            p.add(f"{key}.health", health, "an absolute URL path such as /api/health")
            continue
        ws = s.get("websocket", False)
        path_beg = s.get("path_beg")
        if ws is True:
            ws_count += 1
        elif not isinstance(path_beg, str) or not PATH_RE.match(path_beg) or path_beg == "/":
            p.add(f"{key}.path_beg", path_beg, "a URL path prefix such as /api (the default route goes to nginx)")
            continue
        balance = s.get("balance", "roundrobin")
        if balance not in ("roundrobin", "leastconn"):
            p.add(f"{key}.balance", balance, "roundrobin or leastconn")
        db = s.get("db", f"portal_{name}")
        if not isinstance(db, str) or not re.match(r"^[a-z][a-z0-9_]{0,63}$", db):
            p.add(f"{key}.db", db, "a MariaDB database name (lowercase letters, digits, _)")
        out.append(ServiceConfig(name, tuple(good_ports), health, path_beg if not ws else None,
                                 bool(ws), str(balance), bool(s.get("sticky", bool(ws))), str(db)))
    if ws_count > 1:
        p.add("services", [s.name for s in out if s.websocket], "at most one websocket service")
    return tuple(out)


def _validate_slurm(p: _Problems, raw: Any) -> SlurmConfig:
    s = _as_dict(p, "slurm", raw)
    _unknown_keys(p, "slurm", s, {"cluster_name", "nodes", "partitions", "srun_port_range", "ctld_timeout",
                                  "settings"})
    name = s.get("cluster_name", "hpc")
    if not isinstance(name, str) or not re.match(r"^[a-z][a-z0-9_]{0,39}$", name):
        p.add("slurm.cluster_name", name, "a lowercase Slurm cluster name")
    rng = str(s.get("srun_port_range", "60001-63000"))
    m = re.match(r"^(\d+)-(\d+)$", rng)
    if not m or not 1024 < int(m.group(1)) < int(m.group(2)) <= 65535:
        p.add("slurm.srun_port_range", rng, "a port range LOW-HIGH above 1024, e.g. 60001-63000")
    # 20 s: with the clients' 10 s wait on the dead primary, the portal is back within the
    # 40 s target (SchedMD's default of 120 s would keep job submission down for minutes).
    timeout = _int(p, "slurm.ctld_timeout", s.get("ctld_timeout", 15), 10, 300) or 15
    nodes, parts = s.get("nodes", []), s.get("partitions", [])
    for key, items, first in (("slurm.nodes", nodes, "NodeName"), ("slurm.partitions", parts, "PartitionName")):
        if not isinstance(items, list) or not all(isinstance(n, dict) and first in n for n in items):
            p.add(key, items, f"a list of mappings of slurm.conf keys, each with {first}")
    settings_raw = _as_dict(p, "slurm.settings", s.get("settings"))
    settings: dict[str, str] = {}
    for k, v in sorted(settings_raw.items()):
        if not re.match(r"^[A-Z][A-Za-z]{2,40}$", str(k)) or str(k).lower() in SLURM_MANAGED_KEYS:
            p.add(f"slurm.settings.{k}", v, "an extra slurm.conf setting such as GresTypes; keys the stack manages "
                  "itself (controllers, ports, state, accounting, plugins) are refused")
        elif not isinstance(v, (str, int)) or "\n" in str(v) or str(v).strip() == "":
            p.add(f"slurm.settings.{k}", v, "a single-line value")
        else:
            settings[str(k)] = str(v)
    return SlurmConfig(str(name), tuple(nodes if isinstance(nodes, list) else ()),
                       tuple(parts if isinstance(parts, list) else ()), rng, timeout, settings)


def _port_range(p: _Problems, key: str, value: Any, example: str) -> str:
    rng = str(value)
    m = re.match(r"^(\d+)-(\d+)$", rng)
    if not m or not 1024 <= int(m.group(1)) <= int(m.group(2)) <= 65535:
        p.add(key, value, f"a port range LOW-HIGH from 1024 to 65535, e.g. {example}")
    return rng


def _validate_hybrid(p: _Problems, raw: Any, onprem: list[str]) -> HybridConfig | None:
    if raw is None:
        if onprem:
            p.add("hybrid", None, "a hybrid section (mode: vpn or tgw) to route onprem_cidrs; see README 'Hybrid'")
        return None
    h = _as_dict(p, "hybrid", raw)
    _unknown_keys(p, "hybrid", h, {"mode", "customer_gateway_ip", "bgp_asn", "transit_gateway_id",
                                    "compute_cidrs", "vnc_ports"})
    if not onprem:
        p.add("hybrid", raw, "no hybrid section while onprem_cidrs is empty (there is nothing to route)")
        return None
    mode = h.get("mode")
    cgw = h.get("customer_gateway_ip")
    asn = h.get("bgp_asn")
    tgw = h.get("transit_gateway_id")
    if mode not in ("vpn", "tgw"):
        p.add("hybrid.mode", mode, "vpn (Site-to-Site VPN) or tgw (an existing transit gateway)")
    elif mode == "vpn":
        try:
            ip = ipaddress.IPv4Address(str(cgw))
            rfc1918 = any(ip in ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))
            if rfc1918 or ip.is_loopback or ip.is_unspecified or ip.is_link_local or ip.is_multicast:
                raise ValueError
        except ValueError:
            p.add("hybrid.customer_gateway_ip", cgw, "the on-prem VPN device's public IPv4 address")
        if asn is not None:
            _int(p, "hybrid.bgp_asn", asn, 1, 4294967294)
    elif not isinstance(tgw, str) or not re.match(r"^tgw-[0-9a-f]{8,17}$", tgw):
        p.add("hybrid.transit_gateway_id", tgw, "an existing transit gateway id, e.g. tgw-0123456789abcdef0")
    compute_raw = h.get("compute_cidrs", onprem)
    compute: list[str] = []
    if not isinstance(compute_raw, list) or not compute_raw:
        p.add("hybrid.compute_cidrs", compute_raw, "a non-empty list of CIDRs inside onprem_cidrs")
    else:
        nets = [ipaddress.IPv4Network(c) for c in onprem]
        for i, c in enumerate(compute_raw):
            n = _network(p, f"hybrid.compute_cidrs[{i}]", c, 8, 32)
            if n is not None and not any(n.subnet_of(o) for o in nets):
                p.add(f"hybrid.compute_cidrs[{i}]", c, "a network inside one of onprem_cidrs")
            elif n is not None:
                compute.append(str(n))
    vnc = _port_range(p, "hybrid.vnc_ports", h.get("vnc_ports", "5900-5999"), "5900-5999")
    return HybridConfig(str(mode), str(cgw) if mode == "vpn" else None,
                        int(asn) if isinstance(asn, int) and mode == "vpn" else None,
                        str(tgw) if mode == "tgw" else None, tuple(compute), vnc)


def _validate_gates(p: _Problems, raw: Any, profile: str) -> GatesConfig:
    """Gates (and the HAProxy drain around a web/app replacement) are on by default for
    the `ha` profile: an approved `pulumi up` of a production-like stack must never
    replace a serving host before the previous one serves again."""
    g = _as_dict(p, "gates", raw)
    _unknown_keys(p, "gates", g, {"enabled", "timeout_s"})
    enabled = g.get("enabled", profile == "ha")
    if not isinstance(enabled, bool):
        p.add("gates.enabled", enabled, "true or false")
        enabled = False
    timeout = _int(p, "gates.timeout_s", g.get("timeout_s", 900), 60, 7200) or 900
    return GatesConfig(bool(enabled), timeout)


def _validate_cutover(p: _Problems, raw: Any, phase: int) -> CutoverConfig | None:
    if raw is None:
        return None
    c = _as_dict(p, "cutover", raw)
    _unknown_keys(p, "cutover", c, {"zone_id", "record_name", "ttl", "target", "old_server_ip"})
    zone = c.get("zone_id")
    if not isinstance(zone, str) or not re.match(r"^Z[A-Z0-9]{5,31}$", zone):
        p.add("cutover.zone_id", zone, "the public Route53 hosted zone id of the portal's name, e.g. Z0123456789ABC")
    name = c.get("record_name")
    if not isinstance(name, str) or not DOMAIN_RE.match(name.lower().rstrip(".")):
        p.add("cutover.record_name", name, "the portal's DNS name, e.g. portal.example.ac.kr")
    ttl = _int(p, "cutover.ttl", c.get("ttl", 60), 30, 86400) or 60
    target = c.get("target", "vip")
    if target not in ("vip", "old"):
        p.add("cutover.target", target, "vip (the new portal) or old (rollback to the old server)")
    old = c.get("old_server_ip")
    try:
        ipaddress.IPv4Address(str(old))
    except ValueError:
        p.add("cutover.old_server_ip", old, "the old server's public IPv4 address (the rollback target)")
    if phase < 6:
        p.add("cutover", raw, "only at phase 6 (set phase 6 to switch DNS)")
    return CutoverConfig(str(zone), str(name), ttl, str(target), str(old))


def validate_config(
    raw: dict[str, Any],
    *,
    stack: str,
    project: str,
    region: str,
    configured_secrets: frozenset[str] = frozenset(),
) -> tuple[list[str], StackConfig | None]:
    """Every problem of the project's config namespace, and the StackConfig when there is none."""
    p = _Problems()
    for k in sorted(set(raw) - _KNOWN_TOP - SECRET_KEYS):
        p.add(k, raw[k], "unknown key; allowed: " + ", ".join(sorted(_KNOWN_TOP)))
    profile = raw.get("profile")
    if profile not in PROFILES:
        p.add("profile", profile, "one of " + ", ".join(PROFILES))
        return p.items, None
    phase = _int(p, "phase", raw.get("phase", 6), 1, 6) or 6
    if profile == "minimal" and phase != 6:
        p.add("phase", phase, "6 (a minimal stack combines roles of several phases on one host and deploys whole)")

    ami_raw = _as_dict(p, "ami", raw.get("ami"))
    amis: dict[str, str] = {}
    for arch, ami in sorted(ami_raw.items()):
        if arch not in ARCHS:
            p.add(f"ami.{arch}", ami, "an architecture key: " + ", ".join(ARCHS))
        elif not isinstance(ami, str) or not AMI_RE.match(ami):
            p.add(f"ami.{arch}", ami, "a verified AMI id (ami- and 8 or 17 hex digits), or no key: "
                  "Canonical's current Ubuntu 24.04 id is then resolved at preview (`make ami-latest` prints it)")
        else:
            amis[arch] = ami

    network = _validate_network(p, raw, profile)
    n_azs = len(network.azs) if network else 0
    groups = _validate_groups(p, raw, profile, amis, n_azs)

    onprem: list[str] = []
    op_raw = raw.get("onprem_cidrs", [])
    if not isinstance(op_raw, list):
        p.add("onprem_cidrs", op_raw, "a list of CIDRs (empty when there is no on-prem network)")
        op_raw = []
    for i, c in enumerate(op_raw):
        n = _network(p, f"onprem_cidrs[{i}]", c, 8, 32)
        if n is None:
            continue
        if network and n.overlaps(ipaddress.IPv4Network(network.vpc_cidr)):
            p.add("network.vpc_cidr", network.vpc_cidr,
                  f"a VPC range that does not overlap onprem_cidrs[{i}] {n} (routes to it would be unreachable)")
        onprem.append(str(n))

    domain = raw.get("domain", f"{project}.internal")
    if not isinstance(domain, str) or not DOMAIN_RE.match(domain):
        p.add("domain", domain, "a DNS name for the private zone, e.g. hpc-portal.internal")

    tls = _as_dict(p, "tls", raw.get("tls"))
    _unknown_keys(p, "tls", tls, {"require_configured"})
    require_tls = tls.get("require_configured", stack == "prod")
    if not isinstance(require_tls, bool):
        p.add("tls.require_configured", require_tls, "true or false")
        require_tls = True
    tls_configured = {"tls_cert", "tls_key"} <= configured_secrets
    if require_tls and not tls_configured:
        p.add("tls_cert", None, "secret config tls_cert and tls_key (PEM) for this stack: "
              "`pulumi config set --secret tls_cert < cert.pem` (self-signed certificates are for non-prod stacks)")

    alerts = _as_dict(p, "alerts", raw.get("alerts"))
    _unknown_keys(p, "alerts", alerts, {"slack_channel"})
    channel = alerts.get("slack_channel", "#alerts")
    if not isinstance(channel, str) or not channel.startswith("#"):
        p.add("alerts.slack_channel", channel, "a Slack channel name starting with #")

    backup = _as_dict(p, "backup", raw.get("backup"))
    _unknown_keys(p, "backup", backup, {"retention_days"})
    retention = _int(p, "backup.retention_days", backup.get("retention_days", 14), 1, 3650) or 14

    app = raw.get("app")
    artifact: dict[str, str] | None = None
    portal_uid = 2500
    if app is not None:
        app_d = _as_dict(p, "app", app)
        _unknown_keys(p, "app", app_d, {"artifact", "portal_uid"})
        portal_uid = _int(p, "app.portal_uid", app_d.get("portal_uid", 2500), 1000, 59999) or 2500
        art = app_d.get("artifact")
        if art is not None:
            art = _as_dict(p, "app.artifact", art)
            kind = art.get("kind")
            if kind == "efs" and isinstance(art.get("path"), str) and art["path"].startswith("/dist/"):
                artifact = {"kind": "efs", "path": art["path"]}
            elif kind == "git" and isinstance(art.get("url"), str) and isinstance(art.get("ref"), str):
                artifact = {"kind": "git", "url": art["url"], "ref": art["ref"]}
            else:
                p.add("app.artifact", art, "{kind: efs, path: /dist/...} or {kind: git, url: ..., ref: ...}")

    tags_raw = _as_dict(p, "tags", raw.get("tags"))
    tags = {str(k): str(v) for k, v in sorted(tags_raw.items())}

    services = _validate_services(p, raw.get("services"))
    slurm = _validate_slurm(p, raw.get("slurm"))
    hybrid = _validate_hybrid(p, raw.get("hybrid"), onprem)
    gates = _validate_gates(p, raw.get("gates"), profile)
    cutover = _validate_cutover(p, raw.get("cutover"), phase)

    if p.items or network is None:
        if not p.items:
            p.add("network", raw.get("network"), "a valid network section")
        return p.items, None
    return [], StackConfig(
        project=project, stack=stack, region=region, profile=str(profile), phase=phase,
        network=network, onprem_cidrs=tuple(onprem), amis=amis, groups=groups,
        services=services, domain=str(domain), require_tls_config=bool(require_tls),
        tls_configured=tls_configured, slack_channel=str(channel),
        backup_retention_days=retention, slurm=slurm, app_artifact=artifact, portal_uid=portal_uid, tags=tags,
        hybrid=hybrid, gates=gates, cutover=cutover,
    )
