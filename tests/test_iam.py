"""Least privilege: no `*` in an action or resource except EC2 Describe actions; the LB
may move only the stack's EIP; hosts read only their stack's parameters and objects."""

from __future__ import annotations

import json


def statements(run):
    """Every statement of the program's own policies: inline and managed."""
    for typ in ("aws:iam/rolePolicy:RolePolicy", "aws:iam/policy:Policy"):
        for p in run.of_type(typ):
            doc = json.loads(p.inputs["policy"])
            for st in doc["Statement"]:
                yield p.name, st


def as_list(v):
    return v if isinstance(v, list) else [v]


def test_no_wildcards_beyond_ec2_describe(stack_run, tally):
    tally.expect(10)
    for name, st in statements(stack_run):
        actions, resources = as_list(st["Action"]), as_list(st["Resource"])
        for a in actions:
            tally.check("*" not in a, f"{name}: action {a}")
        if any("*" in r for r in resources):
            tally.check(all(a.startswith("ec2:Describe") for a in actions), f"{name}: {st}")


def test_lb_may_move_only_the_stack_eip_onto_its_own_interfaces(stack_run, tally):
    vip = stack_run.outputs["vip"]["allocation_id"]
    lb_enis = {h["network_interface_id"] for h in stack_run.outputs["hosts"].values() if "lb" in h["roles"]}
    found = 0
    for name, st in statements(stack_run):
        if "ec2:AssociateAddress" in as_list(st["Action"]):
            found += 1
            tally.check("-lb-" in name, f"{name} may associate addresses")
            res = as_list(st["Resource"])
            tally.check([r for r in res if ":elastic-ip/" in r] == [f"arn:aws:ec2:ap-northeast-2:123456789012:elastic-ip/{vip}"])
            tally.check({r.rsplit("/", 1)[1] for r in res if ":network-interface/" in r} == lb_enis)
    tally.check(found == 1)


def test_hosts_read_only_their_stack_parameters_and_data_hosts_write_only_the_marker(stack_run, tally):
    prefix = f"arn:aws:ssm:ap-northeast-2:123456789012:parameter/hpc-portal/{stack_run.stack}/"
    for name, st in statements(stack_run):
        for r in as_list(st["Resource"]):
            if ":ssm:" in r:
                tally.check(r.startswith(prefix), r)
        if "ssm:PutParameter" in as_list(st["Action"]):
            tally.check("-data-" in name and as_list(st["Resource"]) == [prefix + "galera/bootstrapped"], st)
        if "s3:PutObject" in as_list(st["Action"]):
            tally.check("-data-" in name, name)


def test_every_instance_role_has_ssm_core(stack_run, tally):
    roles = [r for r in stack_run.of_type("aws:iam/role:Role") if "ec2.amazonaws.com" in r.inputs["assumeRolePolicy"]]
    attached = {a.inputs["role"] for a in stack_run.of_type("aws:iam/rolePolicyAttachment:RolePolicyAttachment")
                if a.inputs["policyArn"].endswith("AmazonSSMManagedInstanceCore")}
    tally.check(roles)
    for r in roles:
        tally.check(r.outputs["name"] in attached, r.name)


def test_each_host_may_read_exactly_its_groups_bundles_within_iam_size_limits(tally):
    from tests.conftest import program_run

    for stack, count in (("prod", None), ("prod", 400)):
        run = program_run(stack, overrides={"roles": {"app": {"count": count}}}) if count else program_run(stack)
        granted: dict[str, set[str]] = {}
        attached = {(a.inputs["role"], a.inputs["policyArn"]) for a in
                    run.of_type("aws:iam/rolePolicyAttachment:RolePolicyAttachment")}
        roles = {r.name: r.outputs["name"] for r in run.of_type("aws:iam/role:Role")}
        per_role: dict[str, int] = {}
        for p in run.of_type("aws:iam/policy:Policy"):
            tally.check(len(p.inputs["policy"]) <= 6144, f"{p.name}: {len(p.inputs['policy'])} chars")
            role = roles[p.name.rsplit("-bundles-", 1)[0] + "-role"]
            tally.check((role, p.outputs["arn"]) in attached, f"{p.name} not attached to {role}")
            per_role[role] = per_role.get(role, 0) + 1
            for res in json.loads(p.inputs["policy"])["Statement"][0]["Resource"]:
                granted.setdefault(role, set()).add(res.split("/")[-2])
        tally.check(max(per_role.values()) + 1 <= 10, per_role)  # + SSM core; IAM allows 10 by default
        for r in run.of_type("aws:iam/rolePolicy:RolePolicy"):
            tally.check(len(r.inputs["policy"]) <= 10240, r.name)
        hosts = run.outputs["hosts"]
        all_granted = set().union(*granted.values())
        tally.check(all_granted == set(hosts), sorted(set(hosts) ^ all_granted)[:5])
