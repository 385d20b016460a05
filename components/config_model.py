"""The stack configuration's typed model: the profiles and roles, the default sizing,
how each profile lays out its hosts, and the frozen dataclasses a validated `StackConfig`
is made of. No checks here (components/config_validation.py) and no Pulumi.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PROFILES = ("minimal", "ha")
ROLES = ("lb", "web", "app", "data", "slurm", "monitoring")
ARCHS = ("x86_64", "arm64")
# Canonical's public SSM parameter for the current Ubuntu 24.04 LTS server image (hvm,
# gp3 root) per architecture, in the naming scheme Canonical documents for its
# parameters: /aws/service/canonical/ubuntu/<product>/<release>/stable/current/<arch>/
# <virt>/<volume>/ami-id. Resolved at preview for an architecture the stack does not pin.
UBUNTU_AMI_PARAMETER = "/aws/service/canonical/ubuntu/server/24.04/stable/current/{arch}/hvm/ebs-gp3/ami-id"
UBUNTU_ARCH = {"x86_64": "amd64", "arm64": "arm64"}
NETWORKS = ("external", "internal", "management")
NAT_MODES = ("per_az", "single")


# --------------------------------------------------------------------------- sizing


@dataclass(frozen=True)
class RoleSizing:
    """Default size of a role's hosts and the smallest they can run on."""

    instance_type: dict[str, str]  # per architecture
    root_gb: int
    data_gb: int  # 0 = no separate data volume (the role keeps no state on the host)
    min_vcpus: int
    min_memory_mib: int
    min_root_gb: int
    min_data_gb: int = 0


# Defaults reproduce the plan's sizing: LB 4 vCPU / 8 GiB / 100 GB, app 8 / 16 / 200,
# data 4 / 16 / 500 GB SSD (gp3). Slurm controllers and the monitoring host are not
# sized by the plan; they get the smallest general-purpose size that runs them well.
SIZING: dict[str, RoleSizing] = {
    "lb": RoleSizing({"x86_64": "c7i.xlarge", "arm64": "c7g.xlarge"}, 100, 0, 2, 4096, 30),
    "web": RoleSizing({"x86_64": "c7i.xlarge", "arm64": "c7g.xlarge"}, 100, 0, 2, 4096, 30),
    "app": RoleSizing({"x86_64": "c7i.2xlarge", "arm64": "c7g.2xlarge"}, 200, 0, 2, 8192, 50),
    "data": RoleSizing({"x86_64": "m7i.xlarge", "arm64": "m7g.xlarge"}, 50, 500, 2, 8192, 30, 100),
    "slurm": RoleSizing({"x86_64": "m7i.large", "arm64": "m7g.large"}, 100, 0, 2, 4096, 30),
    "monitoring": RoleSizing({"x86_64": "m7i.large", "arm64": "m7g.large"}, 50, 100, 2, 4096, 30, 50),
}

# ------------------------------------------------------------------- host groups


@dataclass(frozen=True)
class GroupSpec:
    """How a profile lays out one kind of host.

    name: host name prefix (lb-1, app-2, ...); roles: the roles every host of the group
    runs; first_host_extra: roles only the first host also runs (minimal profile);
    network: the subnet role; sizing_role: the role whose sizing and overrides apply;
    counts: allowed host counts; spread: AZs the group must cover when it has more than
    one host; az_offset: where placement starts, staggered between groups so the
    primaries (active LB, first Galera node and Redis master, primary controller) do
    not share one AZ; ip_base: host part of the first address in each subnet.
    """

    name: str
    roles: tuple[str, ...]
    network: str
    sizing_role: str
    default_count: int
    min_count: int
    max_count: int
    spread: int
    az_offset: int
    ip_base: int
    first_host_extra: tuple[str, ...] = ()
    odd_count: bool = False


PROFILE_GROUPS: dict[str, tuple[GroupSpec, ...]] = {
    # The plan's 4 servers: LB+web (external), app+Slurm controller+monitoring, an app
    # replica, data (internal).
    "minimal": (
        GroupSpec("lb", ("lb", "web"), "external", "lb", 1, 1, 1, 1, 0, 10),
        GroupSpec("app", ("app",), "internal", "app", 2, 1, 50, 1, 0, 64,
                  first_host_extra=("slurm", "monitoring")),
        GroupSpec("data", ("data",), "internal", "data", 1, 1, 1, 1, 1, 30),
    ),
    # The plan's recommended layout, corrected: Galera needs 3 voters, the Slurm
    # controllers and the monitoring/log host get hosts of their own.
    "ha": (
        GroupSpec("lb", ("lb",), "external", "lb", 2, 2, 2, 2, 0, 10),
        # At most 400 web/app hosts: their bundle grants must fit the 9 managed IAM
        # policies a role can take besides SSM core (components/iam.py).
        GroupSpec("app", ("web", "app"), "internal", "app", 3, 2, 400, 2, 0, 64),
        GroupSpec("data", ("data",), "internal", "data", 3, 3, 9, 3, 1, 30, odd_count=True),
        GroupSpec("slurm", ("slurm",), "internal", "slurm", 2, 2, 2, 2, 2, 20),
        GroupSpec("mon", ("monitoring",), "management", "monitoring", 1, 1, 1, 1, 2, 10),
    ),
}


# --------------------------------------------------------------------- the model


@dataclass(frozen=True)
class ServiceConfig:
    """A portal service behind the LB: one backend, one systemd unit per port."""

    name: str
    ports: tuple[int, ...]
    health: str
    path_beg: str | None = None
    websocket: bool = False
    balance: str = "roundrobin"
    sticky: bool = False
    db: str = ""


DEFAULT_SERVICES: tuple[ServiceConfig, ...] = (
    ServiceConfig("api", (5010,), "/api/health", path_beg="/api", balance="leastconn", db="portal_api"),
    ServiceConfig("auth", (4430, 4431), "/auth/health", path_beg="/auth", db="portal_auth"),
    ServiceConfig("ws", (5011,), "/ws/health", websocket=True, sticky=True, db="portal_ws"),
    ServiceConfig("cae", (5000, 5001), "/health", path_beg="/cae", db="portal_cae"),
)


@dataclass(frozen=True)
class GroupConfig:
    spec: GroupSpec
    count: int
    instance_type: str
    arch: str
    root_gb: int
    data_gb: int


@dataclass(frozen=True)
class NetworkConfig:
    vpc_cidr: str
    azs: tuple[str, ...]
    subnets: dict[str, tuple[str, ...]]  # network -> one CIDR per AZ (same order as azs)
    nat_gateways: str
    ssh_from_management: bool


@dataclass(frozen=True)
class SlurmConfig:
    cluster_name: str
    nodes: tuple[dict[str, Any], ...]
    partitions: tuple[dict[str, Any], ...]
    srun_port_range: str
    ctld_timeout: int
    settings: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class HybridConfig:
    """Connectivity to the center's on-prem network (Slurm compute nodes, old server)."""

    mode: str  # vpn | tgw
    customer_gateway_ip: str | None
    bgp_asn: int | None  # None: static routes for onprem_cidrs
    transit_gateway_id: str | None
    compute_cidrs: tuple[str, ...]
    vnc_ports: str


@dataclass(frozen=True)
class GatesConfig:
    enabled: bool
    timeout_s: int


@dataclass(frozen=True)
class CutoverConfig:
    zone_id: str
    record_name: str
    ttl: int
    target: str  # vip | old
    old_server_ip: str


@dataclass(frozen=True)
class StackConfig:
    project: str
    stack: str
    region: str
    profile: str
    phase: int
    network: NetworkConfig
    onprem_cidrs: tuple[str, ...]
    amis: dict[str, str]
    groups: tuple[GroupConfig, ...]
    services: tuple[ServiceConfig, ...]
    domain: str
    require_tls_config: bool
    tls_configured: bool
    slack_channel: str
    backup_retention_days: int
    slurm: SlurmConfig
    app_artifact: dict[str, str] | None
    tags: dict[str, str] = field(default_factory=dict)
    hybrid: HybridConfig | None = None
    gates: GatesConfig = GatesConfig(False, 900)
    cutover: CutoverConfig | None = None
    # uid and gid of the portal's account (app hosts submit jobs as it; the Slurm
    # controllers must resolve it to sign the job's credential; the compute nodes get it
    # from the center's directory with the same ids)
    portal_uid: int = 2500

    @property
    def ssm_path(self) -> str:
        return f"/{self.project}/{self.stack}"

    def group(self, name: str) -> GroupConfig:
        for g in self.groups:
            if g.spec.name == name:
                return g
        raise KeyError(name)
