"""AWS's own rules that the Pulumi mocks would let through, checked on the mocked graph.

The mocks accept any input; AWS refuses, at `pulumi up` time, subnets outside their VPC
or overlapping each other, a second EFS mount target in one AZ, an instance type that
does not exist for the AMI's architecture or is not offered in the AZ, an IAM policy
naming an action that does not exist, an inline policy over the size limit, more rules
per security group or more Elastic IPs than the default quotas. These functions find
them offline, from:

- moto's copy of EC2's DescribeInstanceTypes and DescribeInstanceTypeOfferings data
  (moto/ec2/resources/instance_types.json.gz, instance_type_offerings/availability-zone/);
- botocore's service models (every API operation name of ec2, ssm, s3, sts, kms, ...),
  plus the IAM actions that are not API operation names (IAM_ONLY_ACTIONS).

Each function takes the plain resource dicts of policy/rules.py and returns Violations.

    .venv/bin/python tools/aws_rules.py --stack prod
"""

from __future__ import annotations

import argparse
import fnmatch
import functools
import gzip
import ipaddress
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from policy.rules import (  # noqa: E402
    EFS,
    ENI,
    INSTANCE,
    POLICY_ATTACHMENT,
    ROLE_POLICY,
    SG,
    SG_INGRESS,
    SUBNET,
    Resource,
    Violation,
    as_list,
    by_id,
    by_name,
    hosts,
    inputs,
    of_type,
    policy_documents,
    unknown,
)

VPC = "aws:ec2/vpc:Vpc"
MOUNT_TARGET = "aws:efs/mountTarget:MountTarget"
EIP = "aws:ec2/eip:Eip"
SG_EGRESS = "aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule"

# Default quotas (Service Quotas can raise them; a plan over them needs that first).
SG_RULES_PER_DIRECTION = 60
EIPS_PER_REGION = 5
SGS_PER_ENI = 5
# IAM: the inline policies of one role together, whitespace not counted.
ROLE_INLINE_POLICY_CHARS = 10_240

# IAM action prefixes whose API has no (public) botocore model, with their actions.
IAM_ONLY_SERVICES = {
    "ssmmessages": {"CreateControlChannel", "CreateDataChannel", "OpenControlChannel", "OpenDataChannel"},
    "ec2messages": {"AcknowledgeMessage", "DeleteMessage", "FailMessage", "GetEndpoint", "GetMessages", "SendReply"},
}
# IAM actions that are not the name of an API operation of their service.
IAM_ONLY_ACTIONS = {
    "s3": {"ListBucket", "ListBucketVersions", "ListBucketMultipartUploads", "ListAllMyBuckets",
           "GetObjectVersion", "GetObjectVersionAcl", "GetObjectVersionTagging", "GetObjectVersionAttributes",
           "DeleteObjectVersion", "DeleteObjectVersionTagging", "PutObjectVersionAcl", "PutObjectVersionTagging",
           "ListMultipartUploadParts", "GetBucketObjectLockConfiguration", "PutBucketObjectLockConfiguration",
           "BypassGovernanceRetention", "GetObjectVersionForReplication", "ReplicateObject", "ReplicateDelete"},
    "iam": {"PassRole"},
    "sts": {"TagSession", "SetSourceIdentity", "SetContext"},
    "kms": {"ReEncryptFrom", "ReEncryptTo", "GenerateDataKey*"},
    "ec2": {"CreateTags"},
}
ARN_RE = re.compile(r"^arn:aws[a-z-]*:[a-z0-9-]+:[a-z0-9-]*:(\d{12})?:.+$")


def _moto_resources() -> Path:
    import moto

    return Path(moto.__file__).parent / "ec2" / "resources"


@functools.cache
def instance_type_data() -> dict[str, Any]:
    return json.loads(gzip.decompress((_moto_resources() / "instance_types.json.gz").read_bytes()))


@functools.cache
def offerings(region: str) -> dict[str, set[str]]:
    """AZ -> instance types offered there (moto's copy of DescribeInstanceTypeOfferings)."""
    path = _moto_resources() / "instance_type_offerings" / "availability-zone" / f"{region}.json.gz"
    if not path.exists():
        raise ValueError(f"no instance type offerings for region {region} in moto's data")
    out: dict[str, set[str]] = defaultdict(set)
    for item in json.loads(gzip.decompress(path.read_bytes())):
        out[item["Location"]].add(item["InstanceType"])
    return dict(out)


@functools.cache
def _service_index() -> dict[str, str]:
    """IAM action prefix -> botocore service name, for every service botocore models."""
    import botocore.loaders

    loader = botocore.loaders.Loader()
    index: dict[str, str] = {}
    for name in loader.list_available_services("service-2"):
        index.setdefault(name, name)
    # Where the IAM prefix differs from botocore's name (signing name / endpoint prefix).
    index.update({"elasticfilesystem": "efs", "monitoring": "cloudwatch", "logs": "logs", "states": "stepfunctions",
                  "execute-api": "apigateway", "es": "opensearch"})
    return index


@functools.cache
def real_actions(prefix: str) -> frozenset[str]:
    """Every IAM action of a service prefix that exists: the API operation names in
    botocore's model, plus the IAM-only actions. Empty for an unknown prefix."""
    if prefix in IAM_ONLY_SERVICES:
        return frozenset(IAM_ONLY_SERVICES[prefix])
    service = _service_index().get(prefix)
    if service is None:
        return frozenset()
    import botocore.loaders

    try:
        model = botocore.loaders.Loader().load_service_model(service, "service-2")
    except Exception:
        return frozenset()
    return frozenset(model["operations"]) | frozenset(IAM_ONLY_ACTIONS.get(prefix, ()))


# ------------------------------------------------------------------------------ rules


def subnets_fit_vpc(resources: list[Resource]) -> list[Violation]:
    """Every subnet lies inside its VPC's CIDR, no two subnets of a VPC overlap, prefixes
    are /16 to /28 (AWS's limits)."""
    out = []
    vpcs = {r.get("id"): r for r in of_type(resources, VPC)}
    single = next(iter(vpcs.values())) if len(vpcs) == 1 else None
    seen: dict[str, list[tuple[ipaddress.IPv4Network, str]]] = defaultdict(list)
    for s in sorted(of_type(resources, SUBNET), key=lambda r: r["name"]):
        i = inputs(s)
        cidr = i.get("cidrBlock")
        if cidr is None or unknown(cidr):
            continue
        try:
            net = ipaddress.IPv4Network(str(cidr))
        except ValueError:
            out.append(Violation("subnet-in-vpc", s["name"], f"cidrBlock {cidr} is not an IPv4 network"))
            continue
        if not 16 <= net.prefixlen <= 28:
            out.append(Violation("subnet-in-vpc", s["name"], f"{cidr}: AWS allows /16 to /28"))
        vpc = vpcs.get(i.get("vpcId")) or single
        if vpc is None:
            continue
        vcidr = inputs(vpc).get("cidrBlock")
        if vcidr and not unknown(vcidr) and not net.subnet_of(ipaddress.IPv4Network(str(vcidr))):
            out.append(Violation("subnet-in-vpc", s["name"], f"{cidr} is outside VPC {vpc['name']} {vcidr}"))
        for other, oname in seen[vpc["name"]]:
            if net.overlaps(other):
                out.append(Violation("subnet-in-vpc", s["name"], f"{cidr} overlaps {oname} {other}"))
        seen[vpc["name"]].append((net, s["name"]))
    return out


def azs_exist(resources: list[Resource], region: str) -> list[Violation]:
    """Subnets and volumes name availability zones of the region."""
    azs = set(offerings(region))
    out = []
    for r in resources:
        az = inputs(r).get("availabilityZone")
        if az and not unknown(az) and az not in azs:
            out.append(Violation("az-exists", r["name"], f"availability zone {az} is not one of {region}'s {sorted(azs)}"))
    return out


def efs_mount_targets(resources: list[Resource]) -> list[Violation]:
    """Per file system: at most one mount target per AZ (AWS refuses a second), and one in
    every AZ where the stack runs instances (else mounts cross AZs and die with them)."""
    out = []
    ids, names = by_id(resources), by_name(resources)
    subnets = by_id(of_type(resources, SUBNET))
    host_azs = {h["az"] for h in hosts(resources).values() if h["az"]}
    per_fs: dict[str, Counter[str]] = defaultdict(Counter)
    for mt in of_type(resources, MOUNT_TARGET):
        i = inputs(mt)
        fs = ids.get(str(i.get("fileSystemId"))) or names.get(mt.get("parent") or "")
        sub = subnets.get(str(i.get("subnetId")))
        if fs is None or sub is None:
            continue
        per_fs[fs["name"]][str(inputs(sub).get("availabilityZone"))] += 1
    for fs in of_type(resources, EFS):
        counts = per_fs.get(fs["name"], Counter())
        for az, n in sorted(counts.items()):
            if n > 1:
                out.append(Violation("efs-mount-targets", fs["name"], f"{n} mount targets in {az}: AWS allows one per AZ"))
        for az in sorted(host_azs - set(counts)):
            out.append(Violation("efs-mount-targets", fs["name"], f"no mount target in {az}, where instances run"))
    return out


def instance_types(resources: list[Resource], region: str, ami_arch: dict[str, str] | None = None) -> list[Violation]:
    """Each instance type exists, supports the AMI's architecture, and is offered in the
    AZ the instance lands in."""
    out = []
    data = instance_type_data()
    offered = offerings(region)
    hs = hosts(resources)
    az_of = {res: h["az"] for h in hs.values() for res in h["resources"]}
    for r in of_type(resources, INSTANCE):
        i = inputs(r)
        itype = i.get("instanceType")
        if itype is None or unknown(itype):
            continue
        info = data.get(itype)
        if info is None:
            out.append(Violation("instance-type", r["name"], f"{itype} is not an EC2 instance type"))
            continue
        arch = (ami_arch or {}).get(str(i.get("ami")))
        archs = info["ProcessorInfo"]["SupportedArchitectures"]
        if arch and arch not in archs:
            out.append(Violation("instance-type", r["name"], f"{itype} runs {', '.join(archs)}, the AMI {i.get('ami')} is {arch}"))
        az = az_of.get(r["name"])
        if az and itype not in offered.get(az, set()):
            out.append(Violation("instance-type", r["name"], f"{itype} is not offered in {az}"))
    return out


def iam_documents(resources: list[Resource]) -> list[Violation]:
    """IAM documents parse, have Version 2012-10-17, Effect Allow/Deny, real actions
    (wildcards must match one), ARNs of the right shape; a role's inline policies stay
    under IAM's size limit."""
    out = []
    docs = list(policy_documents(resources))
    for r in of_type(resources, "aws:iam/role:Role"):
        trust = inputs(r).get("assumeRolePolicy")
        if trust is not None and not unknown(trust):
            try:
                docs.append((r, json.loads(trust) if isinstance(trust, str) else trust))
            except ValueError:
                docs.append((r, {"__unparsable__": trust}))
    for r, doc in docs:
        if not isinstance(doc, dict) or "__unparsable__" in doc:
            out.append(Violation("iam-document", r["name"], "policy document is not a JSON object"))
            continue
        if doc.get("Version") != "2012-10-17":
            out.append(Violation("iam-document", r["name"], f"Version {doc.get('Version')!r}: use 2012-10-17 "
                                 "(older versions do not expand policy variables)"))
        statements = as_list(doc.get("Statement"))
        if not statements:
            out.append(Violation("iam-document", r["name"], "no Statement"))
        for j, st in enumerate(statements):
            where = (st or {}).get("Sid") or f"Statement[{j}]"
            if not isinstance(st, dict) or st.get("Effect") not in ("Allow", "Deny"):
                out.append(Violation("iam-document", r["name"], f"{where}: Effect must be Allow or Deny"))
                continue
            for a in as_list(st.get("Action")) + as_list(st.get("NotAction")):
                problem = _action_problem(str(a))
                if problem:
                    out.append(Violation("iam-document", r["name"], f"{where}: {problem}"))
            for res in as_list(st.get("Resource")) + as_list(st.get("NotResource")):
                if res != "*" and not unknown(res) and not ARN_RE.match(str(res)):
                    out.append(Violation("iam-document", r["name"], f"{where}: resource {res!r} is not an ARN"))
    # Size: all inline policies of one role together.
    by_role: dict[str, int] = Counter()
    for r in of_type(resources, ROLE_POLICY):
        doc = inputs(r).get("policy")
        if isinstance(doc, str) and not unknown(doc):
            by_role[r.get("parent") or str(inputs(r).get("role"))] += len(re.sub(r"\s", "", doc))
    for role, size in sorted(by_role.items()):
        if size > ROLE_INLINE_POLICY_CHARS:
            out.append(Violation("iam-document", role, f"inline policies total {size} characters; IAM allows "
                                 f"{ROLE_INLINE_POLICY_CHARS} per role (use wildcard-free prefixes or a managed policy)"))
    for r in of_type(resources, POLICY_ATTACHMENT):
        arn = inputs(r).get("policyArn")
        if arn and not unknown(arn) and not ARN_RE.match(str(arn).replace("::aws:", "::000000000000:")):
            out.append(Violation("iam-document", r["name"], f"policyArn {arn!r} is not an ARN"))
    return out


def _action_problem(action: str) -> str | None:
    if action == "*":
        return None  # a wildcard question for the policy rules, not a syntax error
    prefix, sep, name = action.partition(":")
    if not sep or not name or not re.match(r"^[a-z0-9-]+$", prefix):
        return f"action {action!r} is not service:Action"
    known = real_actions(prefix)
    if not known:
        return f"action {action!r}: unknown service prefix {prefix!r}"
    if "*" in name or "?" in name:
        if not any(fnmatch.fnmatchcase(k, name) for k in known):
            return f"action {action!r} matches no {prefix} action"
        return None
    if name not in known:
        close = sorted(k for k in known if k.lower() == name.lower())
        return f"action {action!r} does not exist" + (f" (did you mean {prefix}:{close[0]}?)" if close else "")
    return None


def quotas(resources: list[Resource]) -> list[Violation]:
    """Default quotas: rules per security group and direction, groups per interface,
    Elastic IPs per region."""
    out = []
    count: Counter[tuple[str, str]] = Counter()
    for r in of_type(resources, SG_INGRESS, SG_EGRESS):
        direction = "ingress" if r["type"] == SG_INGRESS else "egress"
        count[(r.get("parent") or str(inputs(r).get("securityGroupId")), direction)] += 1
    for (group, direction), n in sorted(count.items()):
        if n > SG_RULES_PER_DIRECTION:
            out.append(Violation("quota", group, f"{n} {direction} rules; the default quota is {SG_RULES_PER_DIRECTION}"))
    for e in of_type(resources, ENI):
        n = len(as_list(inputs(e).get("securityGroups")))
        if n > SGS_PER_ENI:
            out.append(Violation("quota", e["name"], f"{n} security groups; the default quota is {SGS_PER_ENI} per interface"))
    eips = of_type(resources, EIP)
    if len(eips) > EIPS_PER_REGION:
        out.append(Violation("quota", "Elastic IPs", f"{len(eips)} Elastic IPs; the default quota is {EIPS_PER_REGION} "
                             "per region: request more before `pulumi up`"))
    for r in of_type(resources, SG):
        if len(str(inputs(r).get("description", ""))) > 255:
            out.append(Violation("quota", r["name"], "security group description over 255 characters"))
    return out


def check_all(resources: list[Resource], region: str, ami_arch: dict[str, str] | None = None) -> list[Violation]:
    return sorted(subnets_fit_vpc(resources) + azs_exist(resources, region) + efs_mount_targets(resources)
                  + instance_types(resources, region, ami_arch) + iam_documents(resources) + quotas(resources))


def from_run(run: Any) -> tuple[list[Resource], str, dict[str, str]]:
    """Plain resources, region and AMI -> architecture of a offline.harness ProgramRun."""
    resources = [{"type": r.type, "name": r.name, "inputs": r.inputs, "opts": r.opts, "parent": r.parent, "id": r.id}
                 for r in run.resources]
    arch_by_host = {n: h["arch"] for n, h in run.outputs["hosts"].items()}
    ami_arch = {}
    for r in run.resources:
        if r.type == INSTANCE:
            name = (r.inputs.get("tags") or {}).get("Name")
            if name in arch_by_host:
                ami_arch[str(r.inputs.get("ami"))] = arch_by_host[name]
    return resources, run.outputs["region"], ami_arch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stack", default="prod")
    ap.add_argument("--overrides", default=None, help="JSON of project config keys to override")
    args = ap.parse_args()
    from offline.harness import run_stack

    run = run_stack(args.stack, overrides=json.loads(args.overrides) if args.overrides else None)
    resources, region, ami_arch = from_run(run)
    found = check_all(resources, region, ami_arch)
    for v in found:
        print(v)
    print(f"{args.stack}: {len(found)} problem(s) AWS would refuse")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
