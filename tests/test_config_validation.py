"""Invalid stack config is refused with one message naming the key, the value and what
is allowed, before any resource is registered."""

from __future__ import annotations

import pytest

from components.config import ConfigError, load_config
from offline.harness import ProgramFailed, run_stack

PROD_NET = {"vpc_cidr": "10.40.0.0/16", "azs": ["ap-northeast-2a", "ap-northeast-2b", "ap-northeast-2c"]}

CASES = [
    # (id, stack, overrides, expected text in the message)
    ("unknown-profile", "prod", {"profile": "huge"}, 'profile: "huge" -> one of minimal, ha'),
    ("unknown-role", "prod", {"roles": {"cache": {"count": 2}}}, "roles.cache"),
    ("unknown-arch", "prod", {"roles": {"app": {"arch": "sparc"}}}, 'roles.app.arch: "sparc" -> one of x86_64, arm64'),
    ("even-galera", "prod", {"roles": {"data": {"count": 4}}}, "roles.data.count: 4 -> an odd count of 3 or more"),
    ("too-few-galera", "prod", {"roles": {"data": {"count": 1}}}, "roles.data.count: 1 -> 3 to 9 in profile ha"),
    ("type-below-minimum", "prod", {"roles": {"data": {"instance_type": "t3.small"}}},
     'roles.data.instance_type: "t3.small" -> at least 2 vCPU and 8 GiB'),
    ("type-wrong-arch", "prod", {"roles": {"app": {"arch": "arm64", "instance_type": "c7i.2xlarge"}}},
     "an instance type for architecture arm64"),
    ("type-unknown", "prod", {"roles": {"lb": {"instance_type": "c99.huge"}}}, 'roles.lb.instance_type: "c99.huge"'),
    ("too-few-azs", "prod", {"network": {**PROD_NET, "azs": ["ap-northeast-2a", "ap-northeast-2b"]}},
     "at least 3 AZs for 3 data hosts"),
    ("one-az-for-ha", "prod", {"network": {**PROD_NET, "azs": ["ap-northeast-2a"]}}, "at least 2 AZs for 2 lb hosts"),
    ("malformed-vpc", "prod", {"network": {**PROD_NET, "vpc_cidr": "10.40.0.1/16"}},
     'network.vpc_cidr: "10.40.0.1/16" -> an IPv4 network in CIDR form'),
    ("vpc-too-small", "prod", {"network": {**PROD_NET, "vpc_cidr": "10.40.0.0/22"}}, "large enough for 3 networks"),
    ("out-of-vpc-subnet", "prod", {"network": {**PROD_NET, "address_plan": {
        "external": ["10.40.0.0/24", "10.40.1.0/24", "10.99.2.0/24"],
        "internal": ["10.40.8.0/24", "10.40.9.0/24", "10.40.10.0/24"],
        "management": ["10.40.16.0/24", "10.40.17.0/24", "10.40.18.0/24"]}}},
     'network.address_plan.external[2]: "10.99.2.0/24" -> a subnet inside network.vpc_cidr'),
    ("overlapping-subnets", "prod", {"network": {**PROD_NET, "address_plan": {
        "external": ["10.40.0.0/24", "10.40.1.0/24", "10.40.2.0/24"],
        "internal": ["10.40.8.0/24", "10.40.9.0/24", "10.40.0.0/23"],
        "management": ["10.40.16.0/24", "10.40.17.0/24", "10.40.18.0/24"]}}},
     "network.address_plan.internal[2]: \"10.40.0.0/23\" -> a subnet that does not overlap"),
    ("malformed-address-plan", "prod", {"network": {**PROD_NET, "address_plan": {"external": ["10.40.0.0/24"]}}},
     "network.address_plan.external: [\"10.40.0.0/24\"] -> a list of 3 CIDRs"),
    ("vpc-overlaps-onprem", "prod", {"onprem_cidrs": ["10.40.128.0/17"]},
     'network.vpc_cidr: "10.40.0.0/16" -> a VPC range that does not overlap onprem_cidrs[0] 10.40.128.0/17'),
    ("ami-not-pinned", "prod", {"ami": {"x86_64": "ubuntu-24.04-latest"}},
     'ami.x86_64: "ubuntu-24.04-latest" -> a verified AMI id'),
    ("gates-not-boolean", "prod", {"gates": {"enabled": "yes"}}, 'gates.enabled: "yes" -> true or false'),
    ("typo-top-level-key", "prod", {"profle": "ha"}, 'profle: "ha" -> unknown key'),
    ("override-colocated-role", "prod", {"roles": {"web": {"count": 4}}},
     "in profile ha the web role runs on the app hosts; set roles.app instead"),
    ("minimal-fixed-lb", "dev", {"roles": {"lb": {"count": 2}}}, "roles.lb.count: 2 -> exactly 1 in profile minimal"),
    ("service-port-reserved", "prod", {"services": [{"name": "api", "ports": [3306], "health": "/h", "path_beg": "/api"}]},
     "services[0].ports[0]: 3306 -> a port not used by another daemon"),
    ("prod-needs-tls", "prod", None, "tls_cert: null -> secret config tls_cert and tls_key"),
    ("phase-out-of-range", "prod", {"phase": 9}, "phase: 9 -> an integer from 1 to 6"),
    ("data-disk-below-min", "prod", {"roles": {"data": {"data_gb": 20}}}, "roles.data.data_gb: 20 -> an integer from 100"),
    ("slurm-setting-managed-by-stack", "prod", {"slurm": {"settings": {"SlurmctldPort": 7000}}},
     "slurm.settings.SlurmctldPort: 7000 -> an extra slurm.conf setting"),
    ("too-many-app-hosts", "prod", {"roles": {"app": {"count": 401}}}, "roles.app.count: 401 -> 2 to 400 in profile ha"),
    ("portal-uid-system-range", "prod", {"app": {"portal_uid": 999}}, "app.portal_uid: 999 -> an integer from 1000 to 59999"),
    ("portal-uid-not-int", "prod", {"app": {"portal_uid": "portal"}}, 'app.portal_uid: "portal" -> an integer from 1000'),
    ("too-many-app-hosts-for-subnet", "prod", {"network": {**PROD_NET, "subnet_prefix": 26}, "roles": {"app": {"count": 30}}},
     "roles.app.count: 30 -> at most"),
]


@pytest.mark.parametrize("case_id,stack,overrides,expected", CASES, ids=[c[0] for c in CASES])
def test_invalid_config_is_refused_before_any_resource(case_id, stack, overrides, expected):
    secrets: dict[str, str] | None = {} if case_id == "prod-needs-tls" else None
    with pytest.raises(ProgramFailed) as info:
        run_stack(stack, overrides=overrides or {}, secrets=secrets)
    assert isinstance(info.value.error, ConfigError), info.value.error
    message = str(info.value.error)
    assert expected in message, message
    assert info.value.registered == [], f"{len(info.value.registered)} resources registered before the error"


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        load_config({"profile": "ha", "network": {"vpc_cidr": "nope", "azs": []}, "ami": {"x86_64": "latest"}},
                    stack="t", project="hpc-portal", region="ap-northeast-2")
    problems = info.value.problems
    assert any(p.startswith("network.vpc_cidr:") for p in problems)
    assert any(p.startswith("network.azs:") for p in problems)
    assert any(p.startswith("ami.x86_64:") for p in problems)


def test_defaults_reproduce_the_plans_sizing():
    from components.config import INSTANCE_TYPES, SIZING

    def spec(role: str) -> tuple[int, int]:
        t = INSTANCE_TYPES[SIZING[role].instance_type["x86_64"]]
        return t["vcpus"], t["memory_mib"] // 1024

    assert spec("lb") == (4, 8) and SIZING["lb"].root_gb == 100
    assert spec("app") == (8, 16) and SIZING["app"].root_gb == 200
    assert spec("data") == (4, 16) and SIZING["data"].data_gb == 500
    for role, s in SIZING.items():  # the minimum is separate from (and below) the default
        for arch, itype in s.instance_type.items():
            t = INSTANCE_TYPES[itype]
            assert arch in t["archs"], (role, arch)
            assert t["vcpus"] >= s.min_vcpus and t["memory_mib"] >= s.min_memory_mib, role
