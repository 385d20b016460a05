"""AMIs someone verified: the committed stack files pin no id nobody could look up;
without a pin the program reads Canonical's public SSM parameter for Ubuntu 24.04 per
architecture; a pin wins; instances ignore later AMI changes; tools/ami_latest.py checks
what the parameter names with DescribeImages before it writes a pin (botocore's Stubber
holds it to the real API shapes)."""

from __future__ import annotations

import re

import boto3
import pytest
from botocore.stub import Stubber

from components.stackfile import ROOT, load_stack
from offline.harness import run_stack
from offline.mocks import stand_in_ami
from tests.conftest import STACKS, program_run
from tests.loadfile import load_tool

ami_latest = load_tool("ami_latest")
PARAM = "/aws/service/canonical/ubuntu/server/24.04/stable/current/{}/hvm/ebs-gp3/ami-id"
# ids that sat in the stack files without anyone having looked them up
INVENTED = ("ami-0c3c7a4b8e1f2d5a6", "ami-0e8d2f1a9b7c6d5e4")


@pytest.mark.parametrize("stack", STACKS)
def test_stack_files_carry_no_unverified_ids(stack, tally):
    text = (ROOT / f"Pulumi.{stack}.yaml").read_text()
    tally.check(not any(i in text for i in INVENTED), f"Pulumi.{stack}.yaml still carries an invented AMI id")
    cfg, _ = load_stack(stack)
    ids = re.findall(r"ami-[0-9a-f]{8,17}", text)
    # a pin comes only from tools/ami_latest.py --write, which names the image it checked
    tally.check(not ids or "checked by tools/ami_latest.py" in text, f"Pulumi.{stack}.yaml: {ids} without a check")
    tally.check(set(cfg.amis.values()) <= set(ids))


@pytest.mark.parametrize("stack", STACKS)
def test_unpinned_architectures_use_canonicals_parameter(stack, tally):
    run = program_run(stack)
    cfg, _ = load_stack(stack)
    by_arch: dict[str, set[str]] = {}
    for r in run.of_type("aws:ec2/instance:Instance"):
        arch = run.outputs["hosts"][r.inputs["tags"]["Name"]]["arch"]
        by_arch.setdefault(arch, set()).add(r.inputs["ami"])
        tally.check("ami" in r.opts["ignore_changes"], f"{r.name} would follow a new image")
    for arch, amis in by_arch.items():
        expected = cfg.amis.get(arch) or stand_in_ami(PARAM.format("amd64" if arch == "x86_64" else "arm64"))
        tally.check(amis == {expected}, (arch, amis))
        tally.check(run.outputs["amis"][arch] == expected, "the stack outputs (and so the plan) show the id")


def test_a_pin_wins_and_no_parameter_is_read_for_it(tally):
    run = run_stack("prod", overrides={"ami": {"x86_64": "ami-0123456789abcdef0"}})
    tally.check({r.inputs["ami"] for r in run.of_type("aws:ec2/instance:Instance")} == {"ami-0123456789abcdef0"})
    tally.check(not [a for t, a in run.calls if t == "aws:ssm/getParameter:getParameter"], run.calls)
    arm = run_stack("prod", overrides={"ami": {"x86_64": "ami-0123456789abcdef0"}, "roles": {"lb": {"arch": "arm64"}}})
    params = [a["name"] for t, a in arm.calls if t == "aws:ssm/getParameter:getParameter"]
    tally.check(params == [PARAM.format("arm64")], "an arm64 role without an arm64 pin resolves Canonical's arm64 id")


def _image(ami: str, arch: str, **over: str) -> dict:
    return {"ImageId": ami, "OwnerId": ami_latest.CANONICAL_OWNER, "State": "available", "Architecture": arch,
            "Name": f"ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-{'amd64' if arch == 'x86_64' else 'arm64'}-server-20261120",
            **over}


def _stubbed(images: dict[str, dict]) -> tuple:
    ssm = boto3.client("ssm", region_name="ap-northeast-2", aws_access_key_id="x", aws_secret_access_key="x")
    ec2 = boto3.client("ec2", region_name="ap-northeast-2", aws_access_key_id="x", aws_secret_access_key="x")
    s_ssm, s_ec2 = Stubber(ssm), Stubber(ec2)
    for arch, canonical in ami_latest.UBUNTU_ARCH.items():
        img = images[arch]
        s_ssm.add_response("get_parameter", {"Parameter": {"Name": PARAM.format(canonical), "Value": img["ImageId"],
                                                           "Type": "String"}},
                           {"Name": PARAM.format(canonical)})
        s_ec2.add_response("describe_images", {"Images": [img]}, {"ImageIds": [img["ImageId"]]})
    s_ssm.activate()
    s_ec2.activate()
    return ssm, ec2


def test_ami_latest_checks_each_image_and_writes_the_pins(tally):
    good = {"x86_64": _image("ami-0aaaaaaaaaaaaaaa1", "x86_64"), "arm64": _image("ami-0bbbbbbbbbbbbbbb2", "arm64")}
    found = ami_latest.resolve(*_stubbed(good))
    tally.check({a: v["id"] for a, v in found.items()} == {"x86_64": "ami-0aaaaaaaaaaaaaaa1", "arm64": "ami-0bbbbbbbbbbbbbbb2"})
    prod = (ROOT / "Pulumi.prod.yaml").read_text()
    pinned = ami_latest.write_pins(prod, found)
    import yaml

    doc = yaml.safe_load(pinned)["config"]
    tally.check(doc["hpc-portal:ami"] == {"x86_64": "ami-0aaaaaaaaaaaaaaa1", "arm64": "ami-0bbbbbbbbbbbbbbb2"})
    tally.check({k: v for k, v in doc.items() if k != "hpc-portal:ami"}
                == {k: v for k, v in yaml.safe_load(prod)["config"].items()}, "every other key kept")
    tally.check("No AMI pin" not in pinned and "checked by tools/ami_latest.py" in pinned)
    again = ami_latest.write_pins(pinned, {**found, "arm64": {**found["arm64"], "id": "ami-0ccccccccccccccc3"}})
    tally.check(yaml.safe_load(again)["config"]["hpc-portal:ami"]["arm64"] == "ami-0ccccccccccccccc3"
                and again.count("hpc-portal:ami:") == 1, "a second run replaces the pins")
    for bad, why in ((_image("ami-0aaaaaaaaaaaaaaa1", "x86_64", OwnerId="111122223333"), "not Canonical"),
                     (_image("ami-0aaaaaaaaaaaaaaa1", "arm64"), "architecture arm64"),
                     (_image("ami-0aaaaaaaaaaaaaaa1", "x86_64", Name="ubuntu/images/ubuntu-jammy-22.04-amd64-server-1"),
                      "not an Ubuntu 24.04")):
        with pytest.raises(SystemExit) as info:
            ami_latest.resolve(*_stubbed({**good, "x86_64": bad}))
        tally.check(why in str(info.value) and "ebs-gp3/ami-id" in str(info.value), str(info.value))
