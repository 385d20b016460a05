"""The VPC: three networks as subnet roles (one subnet per role per AZ), internet and
NAT gateways, route tables, VPC endpoints and the private DNS zone with a stable name
for every role endpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from .config import NETWORKS, StackConfig
from .topology import Topology

INTERFACE_ENDPOINTS = ("ssm", "ssmmessages", "ec2messages", "ec2")


@dataclass
class NetworkArgs:
    cfg: StackConfig
    topo: Topology
    tags: dict[str, str]


class Network(pulumi.ComponentResource):
    vpc: aws.ec2.Vpc
    subnets: dict[str, dict[str, aws.ec2.Subnet]]  # network -> az -> subnet
    private_route_tables: dict[str, aws.ec2.RouteTable]  # az -> table (internal + management)
    public_route_table: aws.ec2.RouteTable
    zone: aws.route53.Zone

    def __init__(self, name: str, args: NetworkArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("hpc:network:Network", name, None, opts)
        cfg, net = args.cfg, args.cfg.network
        child = pulumi.ResourceOptions(parent=self)

        def tags(n: str, **extra: str) -> dict[str, str]:
            return {**args.tags, "Name": n, **extra}

        self.vpc = aws.ec2.Vpc(
            f"{name}-vpc",
            cidr_block=net.vpc_cidr,
            enable_dns_support=True,
            enable_dns_hostnames=True,  # EFS and the private zone need it
            tags=tags(f"{name}-vpc"),
            opts=child,
        )
        vpc_child = pulumi.ResourceOptions(parent=self.vpc)
        igw = aws.ec2.InternetGateway(f"{name}-igw", vpc_id=self.vpc.id, tags=tags(f"{name}-igw"), opts=vpc_child)

        self.subnets = {n: {} for n in NETWORKS}
        for n in NETWORKS:
            for az, cidr in zip(net.azs, net.subnets[n], strict=True):
                sn = f"{name}-{n}-{az[-1]}" if len(net.azs) <= 26 else f"{name}-{n}-{az}"
                self.subnets[n][az] = aws.ec2.Subnet(
                    sn,
                    vpc_id=self.vpc.id,
                    cidr_block=cidr,
                    availability_zone=az,
                    map_public_ip_on_launch=False,  # the LB's public address is the EIP
                    tags=tags(sn, Network=n),
                    opts=vpc_child,
                )

        self.public_route_table = aws.ec2.RouteTable(
            f"{name}-public-rt",
            vpc_id=self.vpc.id,
            routes=[{"cidr_block": "0.0.0.0/0", "gateway_id": igw.id}],
            tags=tags(f"{name}-public-rt", Network="external"),
            opts=vpc_child,
        )
        for az, sub in self.subnets["external"].items():
            aws.ec2.RouteTableAssociation(f"{name}-external-{az[-1]}-rta", subnet_id=sub.id,
                                          route_table_id=self.public_route_table.id, opts=pulumi.ResourceOptions(parent=sub))

        nat_azs = list(net.azs) if net.nat_gateways == "per_az" else [net.azs[0]]
        nats: dict[str, aws.ec2.NatGateway] = {}
        for az in nat_azs:
            eip = aws.ec2.Eip(f"{name}-nat-{az[-1]}-eip", domain="vpc", tags=tags(f"{name}-nat-{az[-1]}"), opts=vpc_child)
            nats[az] = aws.ec2.NatGateway(
                f"{name}-nat-{az[-1]}",
                allocation_id=eip.id,
                subnet_id=self.subnets["external"][az].id,
                tags=tags(f"{name}-nat-{az[-1]}"),
                opts=pulumi.ResourceOptions(parent=self.vpc, depends_on=[igw]),
            )
        self.private_route_tables = {}
        for az in net.azs:
            nat = nats.get(az) or nats[nat_azs[0]]
            rt = aws.ec2.RouteTable(
                f"{name}-private-{az[-1]}-rt",
                vpc_id=self.vpc.id,
                routes=[{"cidr_block": "0.0.0.0/0", "nat_gateway_id": nat.id}],
                tags=tags(f"{name}-private-{az[-1]}-rt", Network="internal+management"),
                opts=vpc_child,
            )
            self.private_route_tables[az] = rt
            for n in ("internal", "management"):
                sub = self.subnets[n][az]
                aws.ec2.RouteTableAssociation(f"{name}-{n}-{az[-1]}-rta", subnet_id=sub.id, route_table_id=rt.id,
                                              opts=pulumi.ResourceOptions(parent=sub))

        self.zone = aws.route53.Zone(
            f"{name}-zone",
            name=cfg.domain,
            comment=f"{cfg.project} {cfg.stack}: stable names for every role endpoint",
            vpcs=[{"vpc_id": self.vpc.id}],
            tags=tags(f"{name}-zone"),
            opts=vpc_child,
        )
        zone_child = pulumi.ResourceOptions(parent=self.zone)
        for fqdn, ip in args.topo.endpoints.items():
            label = fqdn[: -len(cfg.domain) - 1]
            aws.route53.Record(f"{name}-dns-{label}", zone_id=self.zone.zone_id, name=fqdn, type="A", ttl=60,
                               records=[ip], opts=zone_child)

        self.endpoint_subnet_ids = [self.subnets["internal"][az].id for az in net.azs]
        self.register_outputs({
            "vpc_id": self.vpc.id,
            "zone_id": self.zone.zone_id,
        })


class Endpoints(pulumi.ComponentResource):
    """Interface endpoints for SSM and EC2 (the EIP move must not depend on a NAT in a
    failed AZ) and an S3 gateway endpoint (bundles, backups)."""

    def __init__(self, name: str, cfg: StackConfig, network: Network, endpoint_sg: pulumi.Input[str],
                 opts: pulumi.ResourceOptions | None = None):
        super().__init__("hpc:network:Endpoints", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        self.interface_endpoints: dict[str, aws.ec2.VpcEndpoint] = {}
        for svc in INTERFACE_ENDPOINTS:
            self.interface_endpoints[svc] = aws.ec2.VpcEndpoint(
                f"{name}-{svc}",
                vpc_id=network.vpc.id,
                service_name=f"com.amazonaws.{cfg.region}.{svc}",
                vpc_endpoint_type="Interface",
                private_dns_enabled=True,
                subnet_ids=network.endpoint_subnet_ids,
                security_group_ids=[endpoint_sg],
                tags={"Name": f"{name}-{svc}"},
                opts=child,
            )
        self.s3 = aws.ec2.VpcEndpoint(
            f"{name}-s3",
            vpc_id=network.vpc.id,
            service_name=f"com.amazonaws.{cfg.region}.s3",
            vpc_endpoint_type="Gateway",
            route_table_ids=[network.public_route_table.id] + [rt.id for rt in network.private_route_tables.values()],
            tags={"Name": f"{name}-s3"},
            opts=child,
        )
        self.register_outputs({"s3": self.s3.id})
