"""Connectivity to the center's on-prem network: a Site-to-Site VPN (static routes or
BGP) or an attachment to an existing transit gateway, and routes for the on-prem CIDRs
in the private (internal + management) route tables. Only built when the stack sets
`onprem_cidrs` and a `hybrid` section; the VPC plan was already checked not to overlap.
"""

from __future__ import annotations

import pulumi
import pulumi_aws as aws

from .config import StackConfig
from .network import Network


class Hybrid(pulumi.ComponentResource):
    def __init__(self, name: str, cfg: StackConfig, network: Network, tags: dict[str, str],
                 opts: pulumi.ResourceOptions | None = None):
        super().__init__("hpc:network:Hybrid", name, None, opts)
        assert cfg.hybrid is not None
        h = cfg.hybrid
        child = pulumi.ResourceOptions(parent=self)
        self.gateway_id: pulumi.Output[str]
        vgw: aws.ec2.VpnGateway | None = None
        tgw_attachment: aws.ec2transitgateway.VpcAttachment | None = None
        if h.mode == "vpn":
            vgw = aws.ec2.VpnGateway(f"{name}-vgw", vpc_id=network.vpc.id, tags={**tags, "Name": f"{name}-vgw"},
                                     opts=child)
            cgw = aws.ec2.CustomerGateway(
                f"{name}-cgw", bgp_asn=str(h.bgp_asn or 65000), ip_address=h.customer_gateway_ip, type="ipsec.1",
                tags={**tags, "Name": f"{name}-cgw"}, opts=child)
            vpn = aws.ec2.VpnConnection(
                f"{name}-vpn", vpn_gateway_id=vgw.id, customer_gateway_id=cgw.id, type="ipsec.1",
                static_routes_only=h.bgp_asn is None, tags={**tags, "Name": f"{name}-vpn"}, opts=child)
            if h.bgp_asn is None:
                for i, cidr in enumerate(cfg.onprem_cidrs):
                    aws.ec2.VpnConnectionRoute(f"{name}-vpn-route-{i}", vpn_connection_id=vpn.id,
                                               destination_cidr_block=cidr, opts=pulumi.ResourceOptions(parent=vpn))
            self.vpn_connection_id = vpn.id
        else:
            tgw_attachment = aws.ec2transitgateway.VpcAttachment(
                f"{name}-tgw-attachment",
                transit_gateway_id=h.transit_gateway_id or "",
                vpc_id=network.vpc.id,
                subnet_ids=network.endpoint_subnet_ids,
                tags={**tags, "Name": f"{name}-tgw-attachment"},
                opts=child,
            )
        for az, rt in network.private_route_tables.items():
            for i, cidr in enumerate(cfg.onprem_cidrs):
                route_opts = pulumi.ResourceOptions(parent=rt)
                if vgw is not None:
                    aws.ec2.Route(f"{name}-{az[-1]}-onprem-{i}", route_table_id=rt.id, destination_cidr_block=cidr,
                                  gateway_id=vgw.id, opts=route_opts)
                else:
                    assert tgw_attachment is not None
                    aws.ec2.Route(f"{name}-{az[-1]}-onprem-{i}", route_table_id=rt.id, destination_cidr_block=cidr,
                                  transit_gateway_id=h.transit_gateway_id,
                                  opts=pulumi.ResourceOptions(parent=rt, depends_on=[tgw_attachment]))
        self.register_outputs({})
