"""Phased rollout (raising the phase only adds), readiness gates, DNS cutover, and the
hybrid connectivity resources."""

from __future__ import annotations

from typing import Any

import pytest

from components.catalog import expand_matrix
from components.config import ConfigError, load_config
from offline.harness import ProgramFailed, run_stack
from tests.conftest import program_run

CUTOVER = {"zone_id": "Z0123456789ABC", "record_name": "portal.example.ac.kr", "old_server_ip": "110.15.177.120"}
PHASE_ROLES = {1: set(), 2: {"data"}, 3: {"data", "web", "app", "slurm"}, 4: {"data", "web", "app", "slurm", "lb"},
               5: {"data", "web", "app", "slurm", "lb", "monitoring"}}
PHASE_ROLES[6] = PHASE_ROLES[5]

# What must never change for a resource that already exists when the phase is raised.
STABLE_INPUTS = ("userDataBase64", "ami", "instanceType", "primaryNetworkInterface", "subnetId", "cidrBlock",
                 "privateIps", "contentBase64", "policy", "securityGroups")


def _phase_run(phase: int):
    overrides: dict[str, Any] = {"phase": phase}
    if phase == 6:
        overrides["cutover"] = CUTOVER
    return program_run("prod", overrides=overrides)


@pytest.fixture(scope="module")
def phase_runs():
    return {p: _phase_run(p) for p in range(1, 7)}


def test_each_phase_brings_up_its_roles(phase_runs, tally):
    for phase, run in phase_runs.items():
        roles = {r for h in run.outputs["hosts"].values() for r in h["roles"]}
        tally.check(roles == PHASE_ROLES[phase], f"phase {phase}: {roles}")
    p1 = phase_runs[1]
    for typ in ("aws:ec2/vpc:Vpc", "aws:efs/fileSystem:FileSystem", "aws:ssm/parameter:Parameter",
                "aws:ec2/securityGroup:SecurityGroup", "aws:ec2/vpcEndpoint:VpcEndpoint"):
        tally.check(p1.of_type(typ), f"phase 1 lacks {typ}")
    tally.check(len(p1.of_type("aws:s3/bucket:Bucket")) == 2, "bundle and backup buckets in phase 1")
    # every endpoint name exists from phase 1 on, so early hosts find later ones
    tally.check(p1.outputs["endpoints"] == phase_runs[6].outputs["endpoints"])
    tally.check(phase_runs[3].outputs["vip"] is None and phase_runs[4].outputs["vip"])
    tally.check(phase_runs[5].outputs["cutover"] is None and phase_runs[6].outputs["cutover"]["target"] == "vip")


def test_raising_the_phase_only_adds(phase_runs, tally):
    tally.expect(50)
    for phase in range(1, 6):
        before = {(r.type, r.name): r for r in phase_runs[phase].resources}
        after = {(r.type, r.name): r for r in phase_runs[phase + 1].resources}
        removed = set(before) - set(after)
        tally.check(not removed, f"phase {phase}->{phase + 1} removes {sorted(removed)[:3]}")
        for key, old in before.items():
            new = after[key]
            for prop in STABLE_INPUTS:
                if prop in old.inputs or prop in new.inputs:
                    tally.check(old.inputs.get(prop) == new.inputs.get(prop),
                                f"phase {phase}->{phase + 1}: {key[1]}.{prop} changes")


def test_cutover_points_at_the_vip_or_back_at_the_old_server(tally):
    run = _phase_run(6)
    rec = [r for r in run.of_type("aws:route53/record:Record") if r.name == "prod-cutover"][0]
    tally.check(rec.inputs["records"] == [run.outputs["vip"]["public_ip"]] and rec.inputs["ttl"] == 60)
    back = run_stack("prod", overrides={"cutover": {**CUTOVER, "target": "old"}})
    rec = [r for r in back.of_type("aws:route53/record:Record") if r.name == "prod-cutover"][0]
    tally.check(rec.inputs["records"] == ["110.15.177.120"])
    with pytest.raises(ProgramFailed) as info:
        run_stack("prod", overrides={"phase": 5, "cutover": CUTOVER})
    tally.check("cutover" in str(info.value.error) and "only at phase 6" in str(info.value.error))


def test_gates_wait_for_each_host_and_chain_web_app_replacements(tally):
    run = run_stack("prod", overrides={"gates": {"enabled": True, "timeout_s": 600}})
    cmds = {r.name: r for r in run.of_type("command:local:Command")}
    gates = {n: c for n, c in cmds.items() if n.endswith("-gate-ready")}
    tally.check(len(gates) == 11 and len(cmds) == 11 + 2 * 3, sorted(cmds))  # + drain and put-back per app host
    for c in cmds.values():
        tally.check(c.inputs["create"].startswith("python3 tools/gate.py --region ap-northeast-2 --host "), c.inputs)
        tally.check("--timeout 600" in c.inputs["create"] and len(c.inputs["triggers"]) in (2, 3))
    insts = {r.inputs["tags"]["Name"]: r for r in run.of_type("aws:ec2/instance:Instance")}
    tally.check(insts["app-2"].opts["depends_on"] == ["prod-app-2-lb-drain"])
    tally.check(cmds["prod-app-2-lb-drain"].opts["depends_on"][0] == "prod-app-1-lb-ready")
    tally.check(cmds["prod-app-1-lb-ready"].opts["depends_on"] == ["prod-app-1-gate-ready"])
    off = run_stack("prod", overrides={"gates": {"enabled": False}})
    tally.check(not off.of_type("command:local:Command"), "gates can be switched off")
    tally.check(insts["app-3"].opts["depends_on"] == ["prod-app-3-lb-drain"])
    tally.check({r.inputs["tags"]["Name"]: r for r in off.of_type("aws:ec2/instance:Instance")}["app-3"]
                .opts["depends_on"] == ["prod-app-2-instance"], "without gates, after the previous host exists")
    tally.check(not program_run("dev").of_type("command:local:Command"), "off by default for the minimal profile")


def test_vpn_and_routes_for_onprem_cidrs(tally):
    run = run_stack("prod", overrides={"onprem_cidrs": ["172.16.0.0/16", "192.168.100.0/24"],
                                       "hybrid": {"mode": "vpn", "customer_gateway_ip": "198.51.100.7",
                                                  "compute_cidrs": ["172.16.8.0/22"]}})
    tally.check(len(run.of_type("aws:ec2/vpnConnection:VpnConnection")) == 1)
    tally.check(run.of_type("aws:ec2/vpnConnection:VpnConnection")[0].inputs["staticRoutesOnly"] is True)
    tally.check(len(run.of_type("aws:ec2/vpnConnectionRoute:VpnConnectionRoute")) == 2)
    routes = run.of_type("aws:ec2/route:Route")
    private_rts = {r.id for r in run.of_type("aws:ec2/routeTable:RouteTable") if "private" in r.name}
    tally.check(len(routes) == 2 * 3 and {r.inputs["routeTableId"] for r in routes} == private_rts)
    bgp = run_stack("prod", overrides={"onprem_cidrs": ["172.16.0.0/16"],
                                       "hybrid": {"mode": "vpn", "customer_gateway_ip": "198.51.100.7", "bgp_asn": 65010}})
    tally.check(bgp.of_type("aws:ec2/vpnConnection:VpnConnection")[0].inputs["staticRoutesOnly"] is False)
    tally.check(not bgp.of_type("aws:ec2/vpnConnectionRoute:VpnConnectionRoute"))
    tgw = run_stack("prod", overrides={"onprem_cidrs": ["172.16.0.0/16"],
                                       "hybrid": {"mode": "tgw", "transit_gateway_id": "tgw-0123456789abcdef0"}})
    tally.check(len(tgw.of_type("aws:ec2transitgateway/vpcAttachment:VpcAttachment")) == 1)
    tally.check(all(r.inputs["transitGatewayId"] == "tgw-0123456789abcdef0" for r in tgw.of_type("aws:ec2/route:Route")))
    tally.check(not program_run("dev").of_type("aws:ec2/route:Route"), "no hybrid resources by default")


def test_hybrid_matrix_cells_open_exactly_the_compute_paths(tally):
    base = {"profile": "ha", "network": {"vpc_cidr": "10.40.0.0/16", "azs": ["a1", "a2", "a3"]},
            "ami": {"x86_64": "ami-0c3c7a4b8e1f2d5a6"}, "onprem_cidrs": ["172.16.0.0/16"],
            "hybrid": {"mode": "vpn", "customer_gateway_ip": "198.51.100.7", "compute_cidrs": ["172.16.8.0/22"]}}
    cfg = load_config(base, stack="t", project="hpc-portal", region="ap-northeast-2",
                      configured_secrets=frozenset({"tls_cert", "tls_key"}))
    onprem = {(r.direction, r.group, r.peer, r.from_port, r.to_port) for r in expand_matrix(cfg)
              if r.peer.startswith("172.16.")}
    tally.check(onprem == {
        ("ingress", "slurm", "172.16.8.0/22", 6817, 6817),
        ("egress", "slurm", "172.16.8.0/22", 6818, 6818),
        ("ingress", "app", "172.16.8.0/22", 60001, 63000),
        ("egress", "app", "172.16.8.0/22", 5900, 5999),
    }, onprem)


@pytest.mark.parametrize("hybrid,onprem,expected", [
    (None, ["172.16.0.0/16"], "hybrid: null -> a hybrid section"),
    ({"mode": "vpn"}, [], "no hybrid section while onprem_cidrs is empty"),
    ({"mode": "vpn", "customer_gateway_ip": "10.1.2.3"}, ["172.16.0.0/16"], "the on-prem VPN device's public IPv4"),
    ({"mode": "tgw", "transit_gateway_id": "tgw-x"}, ["172.16.0.0/16"], "an existing transit gateway id"),
    ({"mode": "gre"}, ["172.16.0.0/16"], 'hybrid.mode: "gre" -> vpn'),
    ({"mode": "vpn", "customer_gateway_ip": "198.51.100.7", "compute_cidrs": ["10.9.0.0/16"]}, ["172.16.0.0/16"],
     "a network inside one of onprem_cidrs"),
])
def test_invalid_hybrid_settings_are_refused(hybrid, onprem, expected):
    raw = {"profile": "ha", "network": {"vpc_cidr": "10.40.0.0/16", "azs": ["a1", "a2", "a3"]},
           "ami": {"x86_64": "ami-0c3c7a4b8e1f2d5a6"}, "onprem_cidrs": onprem}
    if hybrid is not None:
        raw["hybrid"] = hybrid
    with pytest.raises(ConfigError) as info:
        load_config(raw, stack="t", project="hpc-portal", region="ap-northeast-2",
                    configured_secrets=frozenset({"tls_cert", "tls_key"}))
    assert expected in str(info.value)
