"""Network namespaces of a rehearsal: the VPC router, the AWS stand-ins, the client, one
per host, and each host's security groups as nftables rules in its own namespace.

Security groups act per interface, also between hosts of one subnet, so the rules sit in
each host's namespace (input = ingress, output = egress), generated from the rules the
program registered, as the EC2 stand-in holds them after the deploy
(`rules_from_security`, `apply_security_groups`): a port the program forgot is dropped
here as it would be on AWS. Dropped flows are recorded in the sets `drop_in` / `drop_out` (shown by
`python -m rehearsal status`), so a missing rule is easy to see.
"""

from __future__ import annotations

import ipaddress
import re
import subprocess
from collections.abc import Iterable, Sequence
from typing import Any

from components.catalog import Rule, expand_matrix

from .layout import (
    AWS_GW,
    AWS_NET,
    CLIENT_GW,
    CLIENT_IP,
    CLIENT_NET,
    EFS_IP,
    EIP_PUBLIC_IP,
    ENDPOINT_IP,
    IMDS_IP,
    MIRROR_IP,
    NS_AWS,
    NS_CLIENT,
    NS_ONPREM,
    NS_ROUTER,
    NS_VPN,
    VGW_VPC_SIDE,
    VGW_VPN_SIDE,
    VPN_NET,
    Layout,
    RHost,
    node_ns,
)

NFT_HOST_TABLE = "rh_sg"
NFT_ROUTER_TABLE = "rh_router"
NFT_VPN_TABLE = "rh_vpn"


class NetError(RuntimeError):
    pass


def sh(cmd: Sequence[str], *, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    cp = subprocess.run(list(cmd), capture_output=True, text=True, input=input)
    if check and cp.returncode != 0:
        raise NetError(f"{' '.join(cmd)}: {cp.stderr.strip() or cp.stdout.strip()}")
    return cp


def ip(ns: str | None, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh(["ip"] + (["-n", ns] if ns else []) + list(args), check=check)


def in_ns(ns: str, cmd: Sequence[str]) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{ns}", "--"] + list(cmd)


def nft(ns: str, script: str) -> None:
    sh(in_ns(ns, ["nft", "-f", "-"]), input=script)


def existing_namespaces() -> list[str]:
    cp = sh(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in cp.stdout.splitlines() if line.strip()]


def _sysctl(ns: str, key: str, value: str) -> None:
    sh(in_ns(ns, ["sysctl", "-q", "-w", f"{key}={value}"]))


# ----------------------------------------------------------------------------- setup


def create(layout: Layout) -> None:
    """Create every namespace, link and route. Raises if any exists already."""
    leftovers = [n for n in existing_namespaces() if n in layout.namespaces]
    if leftovers:
        raise NetError(f"namespaces of an earlier rehearsal still exist: {', '.join(leftovers)} "
                       "(run `make rehearse-down`)")
    for ns in layout.namespaces:
        sh(["ip", "netns", "add", ns])
        ip(ns, "link", "set", "lo", "up")

    # The VPC router: a bridge per subnet holding the subnet's gateway address.
    r = NS_ROUTER
    _sysctl(r, "net.ipv4.ip_forward", "1")
    for s in layout.subnets:
        ip(r, "link", "add", s.bridge, "type", "bridge")
        ip(r, "addr", "add", f"{s.gateway}/{s.prefixlen}", "dev", s.bridge)
        ip(r, "link", "set", s.bridge, "up")

    # AWS stand-ins: endpoints (moto) and the metadata service.
    ip(r, "link", "add", "rhaws", "type", "veth", "peer", "name", "eth0", "netns", NS_AWS)
    ip(r, "addr", "add", f"{AWS_GW}/{ipaddress.IPv4Network(AWS_NET).prefixlen}", "dev", "rhaws")
    ip(r, "link", "set", "rhaws", "up")
    ip(NS_AWS, "addr", "add", f"{ENDPOINT_IP}/24", "dev", "eth0")
    ip(NS_AWS, "addr", "add", f"{EFS_IP}/24", "dev", "eth0")
    ip(NS_AWS, "addr", "add", f"{MIRROR_IP}/24", "dev", "eth0")
    ip(NS_AWS, "link", "set", "eth0", "up")
    ip(NS_AWS, "addr", "add", f"{IMDS_IP}/32", "dev", "lo")
    ip(NS_AWS, "route", "add", "default", "via", AWS_GW)
    ip(r, "route", "add", f"{IMDS_IP}/32", "via", ENDPOINT_IP)

    # The internet side: the load generator's namespace.
    ip(r, "link", "add", "rhcl", "type", "veth", "peer", "name", "eth0", "netns", NS_CLIENT)
    ip(r, "addr", "add", f"{CLIENT_GW}/{ipaddress.IPv4Network(CLIENT_NET).prefixlen}", "dev", "rhcl")
    ip(r, "link", "set", "rhcl", "up")
    ip(NS_CLIENT, "addr", "add", f"{CLIENT_IP}/{ipaddress.IPv4Network(CLIENT_NET).prefixlen}", "dev", "eth0")
    ip(NS_CLIENT, "link", "set", "eth0", "up")
    ip(NS_CLIENT, "route", "add", "default", "via", CLIENT_GW)

    if layout.onprem:
        attach_onprem(layout)
    for h in layout.hosts:
        attach_host(layout, h)
    nft(r, router_rules(layout))


def attach_onprem(layout: Layout) -> None:
    """The VPN and the center's compute network behind it. The VPC router sends the
    on-prem ranges to the virtual private gateway (its rules keep them out of the public
    subnets, whose route table has no such route); the VPN carries only VPC <-> on-prem."""
    o = layout.onprem
    assert o is not None
    r, vpn, site = NS_ROUTER, NS_VPN, NS_ONPREM
    plen = ipaddress.IPv4Network(VPN_NET).prefixlen
    ip(r, "link", "add", "rhvgw", "type", "veth", "peer", "name", "vgw", "netns", vpn)
    ip(r, "addr", "add", f"{VGW_VPC_SIDE}/{plen}", "dev", "rhvgw")
    ip(r, "link", "set", "rhvgw", "up")
    ip(vpn, "addr", "add", f"{VGW_VPN_SIDE}/{plen}", "dev", "vgw")
    ip(vpn, "link", "set", "vgw", "up")
    _sysctl(vpn, "net.ipv4.ip_forward", "1")
    for c in o.cidrs:
        ip(r, "route", "add", c, "via", VGW_VPN_SIDE)
    ip(vpn, "route", "add", layout.cfg.network.vpc_cidr, "via", VGW_VPC_SIDE)
    # The customer gateway's side: one gateway address per compute network.
    ip(vpn, "link", "add", "cgw", "type", "veth", "peer", "name", "eth0", "netns", site)
    for c in o.compute_cidrs:
        ip(vpn, "addr", "add", f"{o.gateway(c)}/{ipaddress.IPv4Network(c).prefixlen}", "dev", "cgw")
    ip(vpn, "link", "set", "cgw", "up")
    # The site's switch: each compute node is a host of its own (its namespace, its
    # address); a compute network without such a node gets an address here.
    ip(site, "link", "add", "br0", "type", "bridge")
    ip(site, "link", "set", "eth0", "master", "br0")
    ip(site, "link", "set", "eth0", "up")
    ip(site, "link", "set", "br0", "up")
    for a in o.extra_addresses:
        ip(site, "addr", "add", f"{a}/{ipaddress.IPv4Network(o.cidr_of(a)).prefixlen}", "dev", "br0")
    if o.extra_addresses:
        ip(site, "route", "add", "default", "via", o.gateway(o.cidr_of(o.extra_addresses[0])))
    for name, a in o.nodes:
        ns, cidr = node_ns(name), o.cidr_of(a)
        ip(site, "link", "add", f"v{name}"[:15], "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip(site, "link", "set", f"v{name}"[:15], "master", "br0")
        ip(site, "link", "set", f"v{name}"[:15], "up")
        ip(ns, "addr", "add", f"{a}/{ipaddress.IPv4Network(cidr).prefixlen}", "dev", "eth0")
        ip(ns, "link", "set", "eth0", "up")
        ip(ns, "route", "add", "default", "via", o.gateway(cidr))
    nft(vpn, vpn_rules(layout))


def attach_host(layout: Layout, h: RHost) -> None:
    """The host's ENI: `ens5` with its private IP in its subnet, default route to the router."""
    ip(NS_ROUTER, "link", "add", h.veth, "type", "veth", "peer", "name", "ens5", "netns", h.ns)
    ip(NS_ROUTER, "link", "set", h.veth, "master", h.subnet.bridge)
    ip(NS_ROUTER, "link", "set", h.veth, "up")
    ip(h.ns, "addr", "add", f"{h.ip}/{h.subnet.prefixlen}", "dev", "ens5")
    ip(h.ns, "link", "set", "ens5", "up")
    ip(h.ns, "route", "add", "default", "via", h.subnet.gateway)
    # Until the deploy says what its security groups are, the interface passes nothing.
    nft(h.ns, f"table inet {NFT_HOST_TABLE} {{\n"
              "  chain input {\n    type filter hook input priority filter; policy drop;\n    iif lo accept\n  }\n"
              "  chain output {\n    type filter hook output priority filter; policy drop;\n    oif lo accept\n  }\n}\n")


def apply_security_groups(layout: Layout, security: dict[str, Any]) -> None:
    """Each host's nftables from the security groups its interface carries in the EC2
    stand-in and their rules there (see rehearsal/deploy.py security_view)."""
    rules, groups = rules_from_security(layout, security)
    for h in layout.hosts:
        ids = security["interfaces"].get(h.ip)
        if ids is None:
            raise NetError(f"{h.name}: no interface with {h.ip} in the EC2 stand-in")
        mine = {security["groups"][g] for g in ids}
        nft(h.ns, f"delete table inet {NFT_HOST_TABLE}\n" + host_rules(layout, h, rules, groups, mine))


def rules_from_security(layout: Layout, security: dict[str, Any]) -> tuple[list[Rule], dict[str, list[str]]]:
    """The EC2 stand-in's security groups as catalog rules (by the groups' Role tag) and
    the addresses carrying each group here: the hosts' interfaces, and the rehearsal's
    stand-in addresses for the EFS mount targets and the VPC endpoints."""
    role = security["groups"]
    rules = []
    for r in security["rules"]:
        peer = role.get(r["peer_group"], r["peer_group"]) if r.get("peer_group") else r["cidr"]
        rules.append(Rule("egress" if r["egress"] else "ingress", role.get(r["group"], r["group"]), peer,
                          str(r["protocol"]), int(r["from_port"]), int(r["to_port"]),
                          (r.get("description") or "rule").split(" ")[0]))
    groups: dict[str, list[str]] = {}
    for h in layout.hosts:  # in the plan's order, as group_addresses lists them
        for g in security["interfaces"].get(h.ip, []):
            groups.setdefault(role.get(g, g), []).append(h.ip)
    groups["efs"] = [EFS_IP]
    groups["endpoints"] = [ENDPOINT_IP]
    return rules, groups


def set_link(layout: Layout, host: str, up: bool) -> None:
    """Cut or restore a host's link at the router (a network partition of that host)."""
    ip(NS_ROUTER, "link", "set", layout.host(host).veth, "up" if up else "down")


NFT_PARTITION_TABLE = "partition"


def partition_rules(peer_ips: Sequence[str]) -> str:
    """nftables for one host that drop every packet to and from `peer_ips` (both
    directions, established connections too), ahead of its security groups."""
    if not peer_ips:
        raise ValueError("a partition needs at least one peer address")
    peers = ", ".join(peer_ips)
    return (f"table inet {NFT_PARTITION_TABLE} {{\n"
            f"  chain in {{ type filter hook input priority -10; policy accept; ip saddr {{ {peers} }} drop; }}\n"
            f"  chain out {{ type filter hook output priority -10; policy accept; ip daddr {{ {peers} }} drop; }}\n"
            "}\n")


def cut_from(layout: Layout, host: str, peers: Sequence[str]) -> None:
    """Cut `host` from `peers` only (everyone else still reaches it): an asymmetric
    partition, as when one AZ's link to another fails while the internet path holds."""
    heal(layout, host)
    nft(layout.host(host).ns, partition_rules([layout.host(p).ip for p in peers]))


def heal(layout: Layout, host: str) -> None:
    ns = layout.host(host).ns
    sh(in_ns(ns, ["nft", "delete", "table", "inet", NFT_PARTITION_TABLE]), check=False)


PROBE = ("import socket,sys\n"
         "s=socket.socket();s.settimeout(float(sys.argv[3]))\n"
         "try:\n s.connect((sys.argv[1],int(sys.argv[2])));print('open')\n"
         "except ConnectionRefusedError:\n print('refused')\n"
         "except OSError as e:\n print('cut', type(e).__name__)\n")


def reaches(layout: Layout, src: str, dst: str, port: int, timeout: float = 2.0) -> bool:
    """Whether a TCP connection from src's namespace to dst:port gets an answer (open or
    refused: the path works); a time-out or unreachable is a cut path."""
    cp = sh(in_ns(layout.host(src).ns, ["python3", "-c", PROBE, layout.host(dst).ip, str(port), str(timeout)]),
            check=False)
    return cp.stdout.strip() in ("open", "refused")


def destroy(names: Iterable[str]) -> list[str]:
    """Delete the given namespaces (their links, bridges and nftables tables go with them)."""
    gone = []
    present = set(existing_namespaces())
    for ns in names:
        if ns in present:
            cp = sh(["ip", "netns", "del", ns], check=False)
            if cp.returncode == 0:
                gone.append(ns)
    return gone


# ------------------------------------------------------------------------- nftables


def router_rules(layout: Layout | None = None) -> str:
    """DNAT of the Elastic IP: the `eip` map holds public IP -> private IP of the ENI the
    EC2 API says holds the association (kept current by the EIP watcher in awsd). With
    an on-prem site: only the internal and management subnets' route tables have the
    on-prem routes, so the public subnets do not reach it, nor it them."""
    onprem = ""
    if layout is not None and layout.onprem:
        public = ", ".join(s.cidr for s in layout.subnets if s.network == "external")
        site = ", ".join(layout.onprem.cidrs)
        onprem = (f"        ip saddr {{ {public} }} ip daddr {{ {site} }} counter drop comment \"no on-prem route\"\n"
                  f"        ip saddr {{ {site} }} ip daddr {{ {public} }} counter drop comment \"no on-prem route\"\n")
    return f"""table ip {NFT_ROUTER_TABLE} {{
    map eip {{
        type ipv4_addr : ipv4_addr
    }}
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        ip daddr {EIP_PUBLIC_IP} dnat to ip daddr map @eip
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        # An unassociated Elastic IP answers nothing.
        ip daddr {EIP_PUBLIC_IP} drop
{onprem}    }}
}}
"""


def vpn_rules(layout: Layout) -> str:
    """The tunnel carries the VPC's range to the on-prem ranges and back, nothing else."""
    assert layout.onprem is not None
    site = ", ".join(layout.onprem.cidrs)
    vpc = layout.cfg.network.vpc_cidr
    return f"""table ip {NFT_VPN_TABLE} {{
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ip saddr {vpc} ip daddr {{ {site} }} counter accept
        ip saddr {{ {site} }} ip daddr {vpc} counter accept
        counter
    }}
}}
"""


def set_eip_target(public_ip: str, private_ip: str | None) -> None:
    """Point the Elastic IP at `private_ip` (None: unassociated), for every packet from
    now on, as AWS's internet gateway does: its one-to-one NAT keeps no per-connection
    state, so after a re-association the packets of a connection made before it reach
    the new instance, which has no such connection and resets it (a client then opens a
    new one). The router's DNAT is conntrack's, decided once per connection: without
    forgetting the Elastic IP's connections, those made before the move would go on
    reaching the old instance (hanging while it is frozen, answered after a thaw), which
    no client on AWS sees."""
    script = f"flush map ip {NFT_ROUTER_TABLE} eip\n"
    if private_ip:
        script += f"add element ip {NFT_ROUTER_TABLE} eip {{ {public_ip} : {private_ip} }}\n"
    nft(NS_ROUTER, script)
    forget_connections(NS_ROUTER, public_ip, keep=private_ip)


def forget_connections(ns: str, dst: str, keep: str | None = None) -> int:
    """Delete `ns`'s conntrack entries of connections to `dst` (conntrack-tools) that
    were NATed to another address than `keep`: their next packet is NATed afresh
    (conntrack picks a connection up mid-stream). Those NATed to `keep` stay: they were
    made after the move, and without their entry the new target's answers would leave
    from its private address, not `dst` (AWS's NAT has no such state to lose; a browser's
    TLS handshake made in that instant hung until its 30 s time-out). The number deleted."""
    cp = sh(in_ns(ns, ["conntrack", "-L", "--orig-dst", dst]), check=False)
    # Each entry: the original direction's src=, dst=, ... then the reply's src= (where
    # the connection was NATed to).
    targets = {m.group(1) for m in re.finditer(r"src=\S+ dst=\S+ .*?src=(\S+) ", cp.stdout)}
    deleted = 0
    for target in sorted(targets - {keep}):
        cp = sh(in_ns(ns, ["conntrack", "-D", "--orig-dst", dst, "--reply-src", target]), check=False)
        # conntrack -D says "N flow entries have been deleted." and exits 1 when N is 0.
        m = re.search(r"(\d+) flow entr", cp.stdout + cp.stderr)
        if m is None:
            raise NetError(f"conntrack -D --orig-dst {dst} --reply-src {target} in {ns}: "
                           f"{cp.stderr.strip() or cp.stdout.strip()}")
        deleted += int(m.group(1))
    return deleted


def group_addresses(layout: Layout) -> dict[str, list[str]]:
    """Security group -> the addresses that carry it in the rehearsal."""
    out: dict[str, list[str]] = {}
    for role, names in layout.topo.role_hosts.items():
        out[role] = [layout.host(n).ip for n in names]
    out["efs"] = [EFS_IP]
    out["endpoints"] = [ENDPOINT_IP]
    return out


def _peer_expr(peer: str, groups: dict[str, list[str]]) -> str | None:
    if peer in groups:
        addrs = groups[peer]
        if not addrs:
            return None
        return "{ " + ", ".join(addrs) + " }"
    return peer  # a CIDR


def _rule_line(r: Rule, groups: dict[str, list[str]]) -> str | None:
    peer = _peer_expr(r.peer, groups)
    if peer is None:
        return None
    addr = f"ip saddr {peer}" if r.direction == "ingress" else f"ip daddr {peer}"
    if peer == "0.0.0.0/0":
        addr = ""
    if r.protocol == "-1":
        match = ""
    elif r.protocol in ("tcp", "udp"):
        ports = f"{r.from_port}" if r.from_port == r.to_port else f"{r.from_port}-{r.to_port}"
        match = f"{r.protocol} dport {ports}"
    else:
        match = f"meta l4proto {r.protocol}"
    return f"        {addr} {match} accept comment \"{r.port_name} {r.direction} {r.peer}\"".replace("  accept", " accept")


def host_rules(layout: Layout, h: RHost, rules: list[Rule] | None = None,
               groups: dict[str, list[str]] | None = None, mine: set[str] | None = None) -> str:
    """nftables for one host: its security groups, ingress and egress. By default the
    matrix's rules with one group per role; `apply_security_groups` passes the deployed
    ones."""
    rules = expand_matrix(layout.cfg) if rules is None else rules
    groups = group_addresses(layout) if groups is None else groups
    mine = set(h.roles) if mine is None else mine
    ingress = [r for r in rules if r.direction == "ingress" and r.group in mine]
    egress = [r for r in rules if r.direction == "egress" and r.group in mine]
    lines_in = sorted({x for r in ingress if (x := _rule_line(r, groups))})
    lines_out = sorted({x for r in egress if (x := _rule_line(r, groups))})
    nl = "\n"
    return f"""table inet {NFT_HOST_TABLE} {{
    # What the security groups dropped (address . port), for `rehearsal status`.
    set drop_in {{
        type ipv4_addr . inet_service
        size 1024
        flags dynamic,timeout
        timeout 1h
    }}
    set drop_out {{
        type ipv4_addr . inet_service
        size 1024
        flags dynamic,timeout
        timeout 1h
    }}
    chain input {{
        type filter hook input priority filter; policy drop;
        iif lo accept
        ct state established,related accept
        ct state invalid drop
{nl.join(lines_in)}
        meta l4proto tcp add @drop_in {{ ip saddr . tcp dport }}
        meta l4proto udp add @drop_in {{ ip saddr . udp dport }}
        counter
    }}
    chain output {{
        type filter hook output priority filter; policy drop;
        oif lo accept
        ct state established,related accept
        # Link-local AWS services are not subject to security groups: instance metadata.
        ip daddr {IMDS_IP} tcp dport 80 accept comment "IMDS"
{nl.join(lines_out)}
        meta l4proto tcp add @drop_out {{ ip daddr . tcp dport }}
        meta l4proto udp add @drop_out {{ ip daddr . udp dport }}
        counter
    }}
}}
"""


def dropped(ns: str) -> dict[str, list[str]]:
    """The flows a host's security groups dropped so far."""
    out: dict[str, list[str]] = {}
    for s in ("drop_in", "drop_out"):
        cp = sh(in_ns(ns, ["nft", "list", "set", "inet", NFT_HOST_TABLE, s]), check=False)
        elems: list[str] = []
        text = cp.stdout
        if "elements = {" in text:
            body = text.split("elements = {", 1)[1].split("}", 1)[0]
            for e in body.split(","):
                e = e.strip().split(" timeout")[0].split(" expires")[0].replace(" . ", ":")
                if e:
                    elems.append(e)
        out[s] = elems
    return out
