"""Monthly on-demand cost of a planned stack, from a dated price table in the repository.

`monthly_cost(resources, prices)` prices the resources of an offline plan (plain dicts
with `type`, `name`, `inputs`, as in build/plan-<stack>.json) by resource class: EC2
instances, EBS volumes and snapshots, NAT gateways, public IPv4 addresses, VPC interface
endpoints, EFS, S3, Route 53, SSM advanced parameters and data transfer. What a plan
cannot know (traffic, stored GB) comes from the table's documented `usage:` section.

    .venv/bin/python tools/cost.py build/plan-prod.json            # table of one plan
    .venv/bin/python tools/cost.py build/plan-prod.json --prices my-prices.yaml

Prices: tools/prices/<region>.yaml; `--prices FILE` or HPC_PRICES=FILE merges a file of
overrides over it (only the keys it sets).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

PRICES_DIR = Path(__file__).resolve().parent / "prices"
PRICES_ENV = "HPC_PRICES"

# The order the classes are shown in.
CLASSES = (
    "ec2_instances", "ebs_volumes", "ebs_snapshots", "nat_gateways", "public_ipv4",
    "vpc_endpoints", "efs", "s3", "route53", "ssm_parameters", "cloudwatch", "hybrid", "data_transfer",
)

# Types that cost nothing by themselves (their cost is in a priced class: snapshots, the
# EFS file system, the VPN connection, ...) or only per request at negligible volume.
FREE_TYPES = {
    "aws:ec2/vpc:Vpc", "aws:ec2/internetGateway:InternetGateway", "aws:ec2/subnet:Subnet",
    "aws:ec2/routeTable:RouteTable", "aws:ec2/routeTableAssociation:RouteTableAssociation", "aws:ec2/route:Route",
    "aws:ec2/securityGroup:SecurityGroup", "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule",
    "aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule", "aws:ec2/networkInterface:NetworkInterface",
    "aws:ec2/volumeAttachment:VolumeAttachment", "aws:efs/mountTarget:MountTarget", "aws:efs/accessPoint:AccessPoint",
    "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock", "aws:s3/bucketOwnershipControls:BucketOwnershipControls",
    "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration",
    "aws:s3/bucketVersioning:BucketVersioning", "aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration",
    "aws:s3/bucketObjectv2:BucketObjectv2", "aws:iam/role:Role", "aws:iam/rolePolicy:RolePolicy",
    "aws:iam/rolePolicyAttachment:RolePolicyAttachment", "aws:iam/instanceProfile:InstanceProfile",
    "aws:iam/policy:Policy",
    "aws:dlm/lifecyclePolicy:LifecyclePolicy", "aws:route53/record:Record", "aws:ec2/customerGateway:CustomerGateway",
    "aws:ec2/vpnGateway:VpnGateway", "aws:ec2/vpnConnectionRoute:VpnConnectionRoute",
    "random:index/randomPassword:RandomPassword", "random:index/randomBytes:RandomBytes",
    "tls:index/privateKey:PrivateKey", "tls:index/selfSignedCert:SelfSignedCert", "command:local:Command",
}
PRICED_TYPES = {
    "aws:ec2/instance:Instance", "aws:ebs/volume:Volume", "aws:ec2/natGateway:NatGateway", "aws:ec2/eip:Eip",
    "aws:ec2/vpcEndpoint:VpcEndpoint", "aws:efs/fileSystem:FileSystem", "aws:efs/backupPolicy:BackupPolicy",
    "aws:s3/bucket:Bucket", "aws:route53/zone:Zone", "aws:route53/healthCheck:HealthCheck",
    "aws:ssm/parameter:Parameter", "aws:cloudwatch/metricAlarm:MetricAlarm", "aws:ec2/vpnConnection:VpnConnection",
    "aws:ec2transitgateway/vpcAttachment:VpcAttachment",
}


class PriceError(ValueError):
    pass


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_prices(region: str, override: str | Path | None = None) -> dict[str, Any]:
    """The region's table, with an override file (argument, else $HPC_PRICES) merged over it."""
    path = PRICES_DIR / f"{region}.yaml"
    if not path.exists():
        raise PriceError(f"no price table for region {region}: add tools/prices/{region}.yaml")
    prices = yaml.safe_load(path.read_text())
    override = override or os.environ.get(PRICES_ENV) or None
    if override:
        extra = yaml.safe_load(Path(override).read_text()) or {}
        if not isinstance(extra, dict):
            raise PriceError(f"{override}: a mapping of price keys")
        prices = _merge(prices, extra)
        prices["overridden_by"] = str(override)
    return prices


def _money(x: float) -> float:
    return round(x + 0.0, 2)


def _tags(r: dict[str, Any]) -> dict[str, str]:
    t = r.get("inputs", {}).get("tags") or {}
    return t if isinstance(t, dict) else {}


def monthly_cost(resources: list[dict[str, Any]], prices: dict[str, Any]) -> dict[str, Any]:
    """Cost per resource class and in total, per month, with the lines that make it up."""
    h = float(prices["hours_per_month"])
    use = prices["usage"]
    lines: dict[str, list[dict[str, Any]]] = {c: [] for c in CLASSES}

    def add(cls: str, what: str, qty: float, unit: str, unit_price: float) -> None:
        lines[cls].append({"item": what, "quantity": round(qty, 3), "unit": unit,
                           "unit_price": unit_price, "monthly": _money(qty * unit_price)})

    by_type: dict[str, list[dict[str, Any]]] = {}
    for r in resources:
        by_type.setdefault(r["type"], []).append(r)

    # EC2 instances and their root volumes.
    itypes: Counter[str] = Counter()
    gp3_gb = 0.0
    other_ebs: Counter[str] = Counter()
    for r in by_type.get("aws:ec2/instance:Instance", []):
        i = r["inputs"]
        itypes[str(i.get("instanceType"))] += 1
        root = i.get("rootBlockDevice") or {}
        size = float(root.get("volumeSize") or 8)
        if (root.get("volumeType") or "gp3") == "gp3":
            gp3_gb += size
        else:
            other_ebs[str(root.get("volumeType"))] += int(size)
        for dev in i.get("ebsBlockDevices") or []:
            gp3_gb += float(dev.get("volumeSize") or 0)
    missing = sorted(t for t in itypes if t not in prices["ec2_hourly"])
    if missing:
        raise PriceError(f"no hourly price for instance type(s) {', '.join(missing)} in the {prices['region']} table "
                         f"(tools/prices/{prices['region']}.yaml ec2_hourly, or an override file)")
    for t, n in sorted(itypes.items()):
        add("ec2_instances", f"{t} x{n}", n * h, "instance-hour", float(prices["ec2_hourly"][t]))

    for r in by_type.get("aws:ebs/volume:Volume", []):
        i = r["inputs"]
        if (i.get("type") or "gp3") == "gp3":
            gp3_gb += float(i.get("size") or 0)
        else:
            other_ebs[str(i.get("type"))] += int(i.get("size") or 0)
    if other_ebs:
        raise PriceError(f"only gp3 volumes are priced; found {dict(other_ebs)}")
    if gp3_gb:
        add("ebs_volumes", "gp3 (root and data volumes)", gp3_gb, "GB-month", float(prices["ebs"]["gp3_gb_month"]))
    if by_type.get("aws:dlm/lifecyclePolicy:LifecyclePolicy"):
        add("ebs_snapshots", "data volume snapshots (assumed usage)", float(use["ebs_snapshot_gb"]), "GB-month",
            float(prices["ebs"]["snapshot_gb_month"]))

    nats = by_type.get("aws:ec2/natGateway:NatGateway", [])
    if nats:
        add("nat_gateways", f"NAT gateway x{len(nats)}", len(nats) * h, "hour", float(prices["nat_gateway"]["hour"]))
        add("nat_gateways", "NAT data processed (assumed usage)", float(use["nat_gb"]), "GB",
            float(prices["nat_gateway"]["gb_processed"]))

    eips = by_type.get("aws:ec2/eip:Eip", [])
    if eips:
        add("public_ipv4", f"public IPv4 address x{len(eips)} (Elastic IPs: VIP and NAT)", len(eips) * h, "hour",
            float(prices["public_ipv4"]["hour"]))

    az_hours = 0.0
    n_if = 0
    for r in by_type.get("aws:ec2/vpcEndpoint:VpcEndpoint", []):
        i = r["inputs"]
        if (i.get("vpcEndpointType") or "Gateway") == "Interface":
            n_if += 1
            az_hours += len(i.get("subnetIds") or []) * h
    if n_if:
        add("vpc_endpoints", f"interface endpoint x{n_if}, one ENI per AZ", az_hours, "endpoint-AZ-hour",
            float(prices["vpc_endpoint"]["interface_hour_per_az"]))
        add("vpc_endpoints", "endpoint data processed (assumed usage)", float(use["endpoint_gb"]), "GB",
            float(prices["vpc_endpoint"]["interface_gb_processed"]))

    n_efs = len(by_type.get("aws:efs/fileSystem:FileSystem", []))
    if n_efs:
        add("efs", "EFS Standard storage (assumed usage)", n_efs * float(use["efs_gb"]), "GB-month",
            float(prices["efs"]["standard_gb_month"]))
        add("efs", "EFS elastic throughput reads (assumed usage)", n_efs * float(use["efs_read_gb"]), "GB",
            float(prices["efs"]["elastic_read_gb"]))
        add("efs", "EFS elastic throughput writes (assumed usage)", n_efs * float(use["efs_write_gb"]), "GB",
            float(prices["efs"]["elastic_write_gb"]))
    if by_type.get("aws:efs/backupPolicy:BackupPolicy"):
        add("efs", "AWS Backup of EFS (assumed usage)", float(use["efs_backup_gb"]), "GB-month",
            float(prices["backup"]["efs_warm_gb_month"]))

    if by_type.get("aws:s3/bucket:Bucket"):
        add("s3", f"S3 Standard, {len(by_type['aws:s3/bucket:Bucket'])} buckets (assumed usage)", float(use["s3_gb"]),
            "GB-month", float(prices["s3"]["standard_gb_month"]))

    zones = by_type.get("aws:route53/zone:Zone", [])
    if zones:
        add("route53", f"hosted zone x{len(zones)}", len(zones), "zone-month", float(prices["route53"]["hosted_zone_month"]))

    checks = by_type.get("aws:route53/healthCheck:HealthCheck", [])
    if checks:
        add("route53", f"health check x{len(checks)}", len(checks), "check-month", float(prices["route53"]["health_check_month"]))
        options = sum(1 for r in checks if str(r["inputs"].get("type", "")).startswith("HTTPS")
                      or "STR_MATCH" in str(r["inputs"].get("type", "")))
        if options:
            add("route53", f"health check options (HTTPS, string match) x{options}", options, "option-month",
                float(prices["route53"]["health_check_option_month"]))

    alarms = by_type.get("aws:cloudwatch/metricAlarm:MetricAlarm", [])
    if alarms:
        add("cloudwatch", f"metric alarm x{len(alarms)}", len(alarms), "alarm-month", float(prices["cloudwatch"]["alarm_month"]))

    vpns = by_type.get("aws:ec2/vpnConnection:VpnConnection", [])
    if vpns:
        add("hybrid", f"Site-to-Site VPN connection x{len(vpns)}", len(vpns) * h, "connection-hour",
            float(prices["vpn"]["connection_hour"]))
    tgw = by_type.get("aws:ec2transitgateway/vpcAttachment:VpcAttachment", [])
    if tgw:
        add("hybrid", f"transit gateway attachment x{len(tgw)}", len(tgw) * h, "attachment-hour",
            float(prices["transit_gateway"]["attachment_hour"]))
        add("hybrid", "transit gateway data processed (assumed usage)", float(use["tgw_gb"]), "GB",
            float(prices["transit_gateway"]["gb_processed"]))

    adv = [r for r in by_type.get("aws:ssm/parameter:Parameter", []) if r["inputs"].get("tier") == "Advanced"]
    if adv:
        add("ssm_parameters", f"advanced parameter x{len(adv)}", len(adv), "parameter-month",
            float(prices["ssm"]["advanced_parameter_month"]))

    if any(_tags(r).get("Role") for r in by_type.get("aws:ec2/instance:Instance", [])):
        add("data_transfer", "internet egress (assumed usage)", float(use["internet_out_gb"]), "GB",
            float(prices["data_transfer"]["internet_out_gb"]))
        azs = {str(r["inputs"].get("availabilityZone")) for r in by_type.get("aws:ec2/subnet:Subnet", [])}
        if len(azs) > 1:
            add("data_transfer", "inter-AZ replication and traffic (assumed usage)", float(use["inter_az_gb"]), "GB",
                float(prices["data_transfer"]["inter_az_gb"]))

    unpriced = sorted(t for t in by_type if t not in FREE_TYPES | PRICED_TYPES and not t.startswith("hpc:"))
    classes: dict[str, dict[str, Any]] = {
        c: {"monthly": _money(sum(x["monthly"] for x in ls)), "lines": ls} for c, ls in lines.items() if ls}
    total = _money(sum(c["monthly"] for c in classes.values()))
    low, high = float(prices["budget"]["low"]), float(prices["budget"]["high"])
    status = "within" if low <= total <= high else ("over" if total > high else "under")
    return {
        "currency": prices.get("currency", "USD"),
        "region": prices["region"],
        "price_date": str(prices["date"]),
        "price_source": prices["source"],
        "prices_overridden_by": prices.get("overridden_by"),
        "hours_per_month": h,
        "usage_assumed": dict(sorted(use.items())),
        "classes": classes,
        "total": total,
        "unpriced_types": unpriced,
        "budget": {"low": low, "high": high, "status": status,
                   "note": f"the plan's budget is ${low:,.0f}-{high:,.0f} a month on-demand"},
    }


def cost_table(cost: dict[str, Any]) -> str:
    """A markdown table: one row per class, then the total and the budget check."""
    rows = ["| class | monthly (USD) | made of |", "|---|---:|---|"]
    for cls in CLASSES:
        c = cost["classes"].get(cls)
        if not c:
            continue
        made = "; ".join(f"{x['item']}: {x['quantity']:g} {x['unit']} x ${x['unit_price']:g}" for x in c["lines"])
        rows.append(f"| {cls} | {c['monthly']:,.2f} | {made} |")
    b = cost["budget"]
    rows.append(f"| **total** | **{cost['total']:,.2f}** | {b['status']} the budget (${b['low']:,.0f}-{b['high']:,.0f}) |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("plan", help="build/plan-<stack>.json")
    ap.add_argument("--prices", help="a price override file (merged over the region's table)")
    args = ap.parse_args()
    plan = json.loads(Path(args.plan).read_text())
    prices = load_prices(plan["outputs"]["region"], args.prices)
    cost = monthly_cost(plan["resources"], prices)
    print(f"{plan['stack']}: prices of {cost['region']} dated {cost['price_date']}")
    print(cost_table(cost))
    return 0


if __name__ == "__main__":
    sys.exit(main())
