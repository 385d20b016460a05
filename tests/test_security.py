"""The security groups are exactly the committed matrix, ingress and egress."""

from __future__ import annotations

from components.catalog import PORTS, expand_matrix, load_matrix
from offline.contexts import _load


def created_rules(run) -> set[tuple]:
    sg_by_id = {r.id: r.inputs["tags"]["Role"] for r in run.of_type("aws:ec2/securityGroup:SecurityGroup")}
    out = set()
    for typ, direction in (("aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule", "ingress"),
                           ("aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule", "egress")):
        for r in run.of_type(typ):
            i = r.inputs
            peer = sg_by_id[i["referencedSecurityGroupId"]] if "referencedSecurityGroupId" in i else i["cidrIpv4"]
            out.add((direction, sg_by_id[i["securityGroupId"]], peer, i["ipProtocol"],
                     int(i.get("fromPort", 0)), int(i.get("toPort", 0))))
    return out


def test_security_groups_equal_the_committed_matrix(stack_run, tally):
    cfg, _ = _load(stack_run.stack)
    expected = {(r.direction, r.group, r.peer, r.protocol, r.from_port, r.to_port) for r in expand_matrix(cfg)}
    created = created_rules(stack_run)
    tally.check(len(created) > 50)
    tally.check(created == expected, f"missing {sorted(expected - created)[:5]} extra {sorted(created - expected)[:5]}")


def test_only_lb_80_and_443_are_open_to_the_world(stack_run, tally):
    world = {r for r in created_rules(stack_run) if r[0] == "ingress" and r[2] == "0.0.0.0/0"}
    tally.check(world == {("ingress", "lb", "0.0.0.0/0", "tcp", 80, 80), ("ingress", "lb", "0.0.0.0/0", "tcp", 443, 443)}, world)


def _has(rules, direction, group, peer, port_name, proto=None):
    p, lo, hi = PORTS[port_name] if port_name in PORTS else (proto, None, None)
    return any(r[0] == direction and r[1] == group and r[2] == peer and r[3] == p and (lo is None or (r[4], r[5]) == (lo, hi))
               for r in rules)


# The cells the tiers need, written out once more by hand: a matrix edit that drops one
# fails here even though the groups would still "equal the matrix".
REQUIRED = [
    ("lb", "lb", "vrrp"), ("lb", "web", "nginx"),
    ("app", "data", "redis"), ("app", "data", "sentinel"), ("app", "data", "mysql"), ("app", "data", "clustercheck"),
    ("slurm", "data", "redis"), ("slurm", "data", "sentinel"), ("slurm", "data", "mysql"), ("slurm", "data", "clustercheck"),
    ("app", "slurm", "slurmctld"), ("app", "slurm", "slurmdbd"),
    ("data", "data", "galera"), ("data", "data", "galera_udp"), ("data", "data", "galera_ist"), ("data", "data", "galera_sst"),
    ("data", "data", "redis"), ("data", "data", "sentinel"),
    ("app", "efs", "nfs"), ("web", "efs", "nfs"), ("slurm", "efs", "nfs"),
    ("monitoring", "lb", "node_exporter"), ("monitoring", "lb", "haproxy_metrics"),
    ("monitoring", "data", "mysqld_exporter"), ("monitoring", "data", "redis_exporter"),
    ("monitoring", "app", "node_exporter"), ("monitoring", "slurm", "node_exporter"),
    ("lb", "monitoring", "syslog"), ("app", "monitoring", "syslog"), ("data", "monitoring", "syslog"),
    ("lb", "endpoints", "https"), ("data", "endpoints", "https"),
]


def test_the_tiers_can_reach_what_they_need(prod, tally):
    rules = created_rules(prod)
    for src, dst, port in REQUIRED:
        tally.check(_has(rules, "ingress", dst, src, port), f"ingress {src} -> {dst} {port}")
        tally.check(_has(rules, "egress", src, dst, port), f"egress {src} -> {dst} {port}")
    cfg, _ = _load("prod")
    for s in cfg.services:
        for service_port in s.ports:
            tally.check(any(r[:3] == ("ingress", "app", "lb") and r[4] <= service_port <= r[5] for r in rules),
                        service_port)
    # VRRP is IP protocol 112 between the LB peers only
    vrrp = {r for r in rules if r[3] == "112"}
    tally.check(vrrp == {("ingress", "lb", "lb", "112", 0, 0), ("egress", "lb", "lb", "112", 0, 0)}, vrrp)


def test_ssh_only_from_the_management_network_and_only_when_enabled(tally):
    from offline.harness import run_stack
    from tests.conftest import program_run

    off = created_rules(program_run("dev"))
    tally.check(not any(r[4] == 22 for r in off), "SSH open by default")
    net = {"vpc_cidr": "10.41.0.0/16", "azs": ["ap-northeast-2a", "ap-northeast-2b"], "nat_gateways": "single",
           "ssh_from_management": True}
    on = created_rules(run_stack("dev", overrides={"network": net}))
    ssh = {r for r in on if r[4] == 22}
    tally.check(ssh and all(r[2] in ("10.41.16.0/24", "10.41.17.0/24") and r[0] == "ingress" for r in ssh), ssh)


def test_role_to_role_rules_reference_groups_not_cidrs(stack_run, tally):
    groups = {"lb", "web", "app", "data", "slurm", "monitoring", "efs", "endpoints"}
    for r in created_rules(stack_run):
        if r[2] not in groups:
            tally.check(r[2] in ("0.0.0.0/0",) or r[2].startswith("10."), r)
    matrix = load_matrix()
    tally.check(all(("why" in m) for m in matrix), "every matrix rule says why")
