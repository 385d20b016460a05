"""AWS's own rules the mocks would let through: every stack keeps them, and each check
fails on a graph AWS would refuse."""

from __future__ import annotations

import copy
import json
from typing import Any

from tests.conftest import program_run
from tools import aws_rules
from tools.aws_rules import check_all, from_run

REGION = "ap-northeast-2"


def graph(stack: str = "prod") -> tuple[list[dict[str, Any]], dict[str, str]]:
    res, _region, ami_arch = from_run(program_run(stack))
    return copy.deepcopy(res), dict(ami_arch)


def named(res: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found = [r for r in res if r["name"] == name]
    assert len(found) == 1, name
    return found[0]


def test_every_stack_keeps_awss_rules(stack_run, tally):
    res, region, ami_arch = from_run(stack_run)
    tally.expect(3)
    tally.check(region == REGION and ami_arch, "region and the AMI architectures come from the run")
    tally.check(set(ami_arch.values()) <= {"x86_64", "arm64"})
    found = check_all(res, region, ami_arch)
    tally.check(found == [], f"{stack_run.stack}: " + "; ".join(map(str, found)))


def test_subnets_outside_the_vpc_or_overlapping_fail(tally):
    res, _ = graph()
    named(res, "prod-internal-a")["inputs"]["cidrBlock"] = "10.99.8.0/24"
    found = aws_rules.subnets_fit_vpc(res)
    tally.check([v.resource for v in found] == ["prod-internal-a"] and "outside" in found[0].message, found)
    res, _ = graph()
    named(res, "prod-internal-b")["inputs"]["cidrBlock"] = "10.40.8.128/25"  # inside internal-a's /24
    found = aws_rules.subnets_fit_vpc(res)
    tally.check(len(found) == 1 and "overlaps" in found[0].message, found)
    res, _ = graph()
    named(res, "prod-management-c")["inputs"]["cidrBlock"] = "10.40.18.0/29"
    tally.check(len(aws_rules.subnets_fit_vpc(res)) == 1, "a /29 subnet")


def test_availability_zones_must_exist_in_the_region(tally):
    res, _ = graph()
    named(res, "prod-internal-c")["inputs"]["availabilityZone"] = "ap-northeast-2z"
    tally.check([v.resource for v in aws_rules.azs_exist(res, REGION)] == ["prod-internal-c"])
    tally.check(aws_rules.azs_exist(graph()[0], REGION) == [])


def test_efs_needs_exactly_one_mount_target_per_az(tally):
    res, _ = graph()
    extra = copy.deepcopy(named(res, "prod-storage-efs-mt-a"))
    extra["name"] = "prod-storage-efs-mt-a2"
    res.append(extra)
    found = aws_rules.efs_mount_targets(res)
    tally.check(len(found) == 1 and "2 mount targets in ap-northeast-2a" in found[0].message, found)
    res = [r for r in graph()[0] if r["name"] != "prod-storage-efs-mt-b"]
    found = aws_rules.efs_mount_targets(res)
    tally.check(len(found) == 1 and "no mount target in ap-northeast-2b" in found[0].message, found)


def _not_offered_in(az: str) -> str:
    offered = aws_rules.offerings(REGION)
    everywhere = set().union(*offered.values())
    data = aws_rules.instance_type_data()
    candidates = sorted(t for t in data if t not in offered.get(az, set()) and t in everywhere)
    assert candidates, f"moto's data offers every type in {az}"
    return candidates[0]


def test_instance_types_must_exist_match_the_ami_and_be_offered(tally):
    res, ami_arch = graph()
    named(res, "prod-app-1-instance")["inputs"]["instanceType"] = "c7i.huge"
    found = aws_rules.instance_types(res, REGION, ami_arch)
    tally.check([v.resource for v in found] == ["prod-app-1-instance"] and "not an EC2" in found[0].message, found)
    res, ami_arch = graph()
    inst = named(res, "prod-lb-1-instance")
    inst["inputs"]["instanceType"] = "c7g.xlarge"  # arm64 type, x86_64 AMI
    found = aws_rules.instance_types(res, REGION, ami_arch)
    tally.check(len(found) == 1 and "arm64" in found[0].message, found)
    res, ami_arch = graph()
    inst = named(res, "prod-app-1-instance")  # app-1 is in ap-northeast-2a
    itype = _not_offered_in("ap-northeast-2a")
    inst["inputs"]["instanceType"] = itype
    ami_arch = {}  # only the offering is under test here
    found = aws_rules.instance_types(res, REGION, ami_arch)
    tally.check(len(found) == 1 and "not offered in ap-northeast-2a" in found[0].message, f"{itype}: {found}")


def test_real_actions_come_from_botocores_models(tally):
    for action in ("ec2:AssociateAddress", "ec2:DescribeNetworkInterfaces", "ssm:GetParametersByPath",
                   "ssm:PutParameter", "s3:GetObject", "s3:ListBucket", "s3:GetObjectVersion", "sts:AssumeRole",
                   "kms:Decrypt", "ssmmessages:OpenDataChannel", "ec2:Describe*", "s3:Get*"):
        tally.check(aws_rules._action_problem(action) is None, action)
    for action, expect in (("ec2:AssociateAdress", "does not exist"), ("ssm:getparameter", "did you mean"),
                           ("s3:Frobnicate*", "matches no"), ("foo:Bar", "unknown service"), ("GetObject", "not service")):
        problem = aws_rules._action_problem(action)
        tally.check(problem is not None and expect in problem, f"{action}: {problem}")
    tally.check(len(aws_rules.real_actions("ec2")) > 500, "EC2's API has hundreds of operations")


def _add_statement(res: list[dict[str, Any]], st: dict[str, Any], version: str = "2012-10-17") -> None:
    p = named(res, "prod-data-policy")
    doc = json.loads(p["inputs"]["policy"])
    doc["Version"] = version
    doc["Statement"].append(st)
    p["inputs"]["policy"] = json.dumps(doc)


def test_iam_documents_must_parse_and_name_real_actions(tally):
    cases = [
        ({"Effect": "Allow", "Action": ["ssm:GetParameterz"], "Resource": ["arn:aws:ssm:ap-northeast-2:123456789012:parameter/x"]},
         "does not exist"),
        ({"Effect": "Permit", "Action": ["ssm:GetParameter"], "Resource": "*"}, "Effect"),
        ({"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": ["my-bucket/key"]}, "not an ARN"),
    ]
    for st, expect in cases:
        res, _ = graph()
        _add_statement(res, st)
        found = aws_rules.iam_documents(res)
        tally.check(len(found) == 1 and expect in found[0].message, f"{st}: {found}")
    res, _ = graph()
    _add_statement(res, {"Effect": "Allow", "Action": "ssm:GetParameter",
                         "Resource": "arn:aws:ssm:ap-northeast-2:123456789012:parameter/x"}, version="2008-10-17")
    tally.check(len(aws_rules.iam_documents(res)) == 1, "an old policy version")
    res, _ = graph()
    named(res, "prod-app-policy")["inputs"]["policy"] = "{not json"
    tally.check(len(aws_rules.iam_documents(res)) == 1, "unparsable JSON")
    res, _ = graph()
    named(res, "prod-app-role")["inputs"]["assumeRolePolicy"] = json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRol", "Principal": {}}]})
    tally.check(len(aws_rules.iam_documents(res)) == 1, "a trust policy with a typo")


def test_a_roles_inline_policies_must_fit_iams_size_limit(tally):
    res, _ = graph()
    arns = [f"arn:aws:s3:::prod-storage-bundles-0123456789ab/prod/app-{i}/bundle.tar.gz" for i in range(300)]
    _add_statement(res, {"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": arns})
    found = aws_rules.iam_documents(res)
    tally.check(len(found) == 1 and "10240" in found[0].message, found)


def test_default_quotas(tally):
    res, _ = graph()
    rules = [r for r in res if r["type"] == aws_rules.SG_EGRESS and r["parent"] == "prod-sg-app"]
    for i in range(61 - len(rules)):
        extra = copy.deepcopy(rules[0])
        extra["name"] += f"-x{i}"
        res.append(extra)
    found = aws_rules.quotas(res)
    tally.check([v.resource for v in found] == ["prod-sg-app"], found)
    res, _ = graph()
    eip = next(r for r in res if r["type"] == aws_rules.EIP)
    res += [{**copy.deepcopy(eip), "name": f"extra-eip-{i}"} for i in range(5)]
    tally.check(any("Elastic IPs" in v.message for v in aws_rules.quotas(res)))
    res, _ = graph()
    named(res, "prod-app-1-eni")["inputs"]["securityGroups"] = [f"sg-{i}" for i in range(6)]
    tally.check(len(aws_rules.quotas(res)) == 1, "six groups on one interface")
