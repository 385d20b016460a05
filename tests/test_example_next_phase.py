"""The example consumer project reads this stack's outputs through a StackReference:
run it under mocks whose StackReference answers with the outputs of the real prod run."""

from __future__ import annotations

import runpy
from pathlib import Path

import pulumi
from pulumi.runtime import settings as pulumi_settings
from pulumi.runtime.stack import Stack, run_pulumi_func
from pulumi.runtime.sync_await import _sync_await

from offline.mocks import StrictMocks
from tests.conftest import program_run

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "next-phase"


class ReferenceMocks(StrictMocks):
    def __init__(self, stacks: dict[str, dict]):
        super().__init__()
        self.stacks = stacks
        self.referenced: list[str] = []

    def new_resource(self, args):
        if args.typ == "pulumi:pulumi:StackReference":
            name = args.inputs["name"]
            if name not in self.stacks:
                raise AssertionError(f"unknown stack reference {name}")
            self.referenced.append(name)
            return (name, {"name": name, "outputs": self.stacks[name], "secretOutputNames": []})
        return super().new_resource(args)


def test_next_phase_reads_the_portal_outputs(tally):
    prod = program_run("prod")
    mocks = ReferenceMocks({"organization/hpc-portal/prod": prod.outputs})
    pulumi_settings.ROOT.set(None)
    pulumi.runtime.set_all_config({"aws:region": "ap-northeast-2",
                                   "hpc-portal-next-phase:portal_stack": "organization/hpc-portal/prod"}, [])
    pulumi.runtime.set_mocks(mocks, project="hpc-portal-next-phase", stack="prod", preview=False)

    def run_example() -> None:
        runpy.run_path(str(EXAMPLE / "__main__.py"))

    _sync_await(run_pulumi_func(run_example))
    root = pulumi_settings.get_root_resource()
    assert isinstance(root, Stack), f"the mocks registered a root Stack for the example, not {root!r}"
    outputs = {k: _sync_await(pulumi.Output.from_input(v).future()) for k, v in root.outputs.items()}
    tally.check(mocks.referenced == ["organization/hpc-portal/prod"])
    tally.check(outputs["portal_url"] == f"https://{prod.outputs['vip']['public_ip']}/", outputs)
    tally.check(outputs["data_hosts"] == ["data-1", "data-2", "data-3"])
    hc = [r for r in mocks.resources if r.type == "aws:route53/healthCheck:HealthCheck"]
    tally.check(hc and hc[0].inputs["ipAddress"] == prod.outputs["vip"]["public_ip"])
    rule = [r for r in mocks.resources if r.type == "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"]
    tally.check(rule and rule[0].inputs["securityGroupId"] == prod.outputs["network"]["security_groups"]["monitoring"])
