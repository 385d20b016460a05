"""The resource graph of every stack, from the real __main__.py under strict mocks."""

from __future__ import annotations

import base64
import gzip
import json
from collections import Counter
from typing import Any

import pytest

from components.stackfile import stack_files
from offline.harness import TEST_SECRETS, ProgramRun, Res, run_stack
from tests.conftest import program_run

STATEFUL = {"lb", "data", "slurm", "monitoring"}


def instances(run: ProgramRun) -> dict[str, Res]:
    out: dict[str, Res] = {}
    for r in run.of_type("aws:ec2/instance:Instance"):
        out[r.inputs["tags"]["Name"]] = r
    return out


def user_data(res: Res) -> bytes:
    return gzip.decompress(base64.b64decode(res.inputs["userDataBase64"]))


def test_every_stack_file_runs_in_preview_and_update_mode(tally):
    stacks = sorted(stack_files())
    tally.expect(2 * len(stacks) * 2)
    assert {"dev", "prod"} <= set(stacks)
    for stack in stacks:
        for preview in (True, False):
            run = program_run(stack, preview)
            tally.check(len(run.of_type("aws:ec2/instance:Instance")) >= 4, f"{stack} preview={preview}")
            tally.check(run.outputs["hosts"], f"{stack} preview={preview} exports hosts")


def test_prod_has_the_ha_layout(prod, tally):
    hosts = prod.outputs["hosts"]
    counts = Counter(r for h in hosts.values() for r in h["roles"])
    tally.check(counts == {"lb": 2, "web": 3, "app": 3, "data": 3, "slurm": 2, "monitoring": 1}, counts)
    tally.check(len(instances(prod)) == 11)
    tally.check(all(set(h["roles"]) == {"web", "app"} for n, h in hosts.items() if n.startswith("app-")),
                "web and app run together on the web/app hosts")


def test_dev_has_the_plans_four_servers(dev, tally):
    hosts = dev.outputs["hosts"]
    tally.check(sorted(hosts) == ["app-1", "app-2", "data-1", "lb-1"], sorted(hosts))
    tally.check(hosts["lb-1"]["roles"] == ["lb", "web"] and hosts["lb-1"]["network"] == "external")
    tally.check(hosts["app-1"]["roles"] == ["app", "slurm", "monitoring"])
    tally.check(hosts["app-2"]["roles"] == ["app"] and hosts["data-1"]["roles"] == ["data"])
    tally.check(all(hosts[n]["network"] == "internal" for n in ("app-1", "app-2", "data-1")))


def test_multi_node_roles_span_azs_and_primaries_are_staggered(stack_run, tally):
    hosts = stack_run.outputs["hosts"]
    by_role: dict[str, set[str]] = {}
    members: dict[str, int] = Counter()
    for h in hosts.values():
        for r in h["roles"]:
            by_role.setdefault(r, set()).add(h["az"])
            members[r] += 1
    for role, azs in by_role.items():
        if members[role] > 1:
            tally.check(len(azs) >= 2, f"{stack_run.stack}: {role} hosts all in {azs}")
    if stack_run.stack == "prod":
        tally.check(len(by_role["data"]) == 3, "Galera spans three AZs in prod")
        prim = stack_run.outputs["primaries"]
        primary_az = {k: hosts[v]["az"] for k, v in prim.items()}
        tally.check(len({primary_az["active_lb"], primary_az["galera_bootstrap"], primary_az["slurm_primary"]}) == 3,
                    primary_az)
    prim = stack_run.outputs["primaries"]
    tally.check(len({hosts[v]["az"] for v in prim.values()}) >= 2 or len(set(h["az"] for h in hosts.values())) == 1,
                "no AZ holds every primary")


def test_instances_require_imdsv2_encrypted_gp3_and_auto_recovery(stack_run, tally):
    tally.expect(5)
    for name, r in instances(stack_run).items():
        mo = r.inputs["metadataOptions"]
        tally.check(mo["httpTokens"] == "required" and mo["httpPutResponseHopLimit"] == 1, name)
        rb = r.inputs["rootBlockDevice"]
        tally.check(rb["encrypted"] is True and rb["volumeType"] == "gp3", name)
        tally.check(r.inputs["maintenanceOptions"]["autoRecovery"] == "default", name)
        tally.check(r.inputs["ami"].startswith("ami-"), name)
        tally.check(set(r.inputs["tags"]) >= {"Name", "Role", "Stack", "Phase"}, name)


def test_fixed_addresses_live_on_persistent_interfaces(stack_run, tally):
    enis = {r.inputs["tags"]["Name"]: r for r in stack_run.of_type("aws:ec2/networkInterface:NetworkInterface")}
    for name, h in stack_run.outputs["hosts"].items():
        tally.check(enis[name].inputs["privateIps"] == [h["private_ip"]], name)
        inst = instances(stack_run)[name]
        tally.check(inst.inputs["primaryNetworkInterface"]["networkInterfaceId"] == enis[name].id, name)
        tally.check(inst.opts["delete_before_replace"] is True, f"{name}: replacement reuses the interface")


def test_stateful_hosts_ignore_template_changes_and_web_app_hosts_roll_one_at_a_time(stack_run, tally):
    insts = instances(stack_run)
    for name, r in insts.items():
        roles = set(stack_run.outputs["hosts"][name]["roles"])
        if roles & STATEFUL:
            tally.check(set(r.opts["ignore_changes"]) == {"user_data_base64", "ami"}, f"{name} {r.opts}")
            tally.check(r.inputs["userDataReplaceOnChange"] is False, name)
        else:
            # a new image only through the rolling command, user-data replaces
            tally.check(r.opts["ignore_changes"] == ["ami"], name)
            tally.check(r.inputs["userDataReplaceOnChange"] is True, name)
    # each web/app host after the first waits for the previous one: with gates (the ha
    # profile) for its put-back into HAProxy through its own drain, else for its instance
    app_only = sorted(n for n, h in stack_run.outputs["hosts"].items() if not set(h["roles"]) & STATEFUL)
    for prev, cur in zip(app_only, app_only[1:], strict=False):
        if stack_run.outputs["gates"]:
            tally.check(insts[cur].opts["depends_on"] == [f"{stack_run.stack}-{cur}-lb-drain"], (cur, insts[cur].opts))
            drain = stack_run.named(f"{stack_run.stack}-{cur}-lb-drain")
            tally.check(drain.opts["depends_on"][0] == f"{stack_run.stack}-{prev}-lb-ready", drain.opts)
        else:
            tally.check(insts[cur].opts["depends_on"] == [f"{stack_run.stack}-{prev}-instance"], (cur, insts[cur].opts))


def test_roll_host_lets_exactly_one_host_take_a_change(tally):
    run = program_run("prod", env={"HPC_ROLL_HOST": "data-2"})
    for name, r in instances(run).items():
        expected = ["ami"] if name == "data-2" or name.startswith("app-") else ["ami", "user_data_base64"]
        tally.check(r.opts["ignore_changes"] == expected, (name, r.opts["ignore_changes"]))
    # a new image only with HPC_ROLL_AMI, and never in the unprotect step
    ami = program_run("prod", env={"HPC_ROLL_HOST": "app-2", "HPC_ROLL_AMI": "1"})
    for name, r in instances(ami).items():
        tally.check(("ami" in r.opts["ignore_changes"]) == (name != "app-2"), name)
    unprotect = program_run("prod", env={"HPC_ROLL_HOST": "data-2", "HPC_ROLL_STEP": "unprotect", "HPC_ROLL_AMI": "1"})
    d2 = instances(unprotect)["data-2"]
    tally.check(d2.opts["ignore_changes"] == ["ami", "user_data_base64"] and d2.inputs["disableApiTermination"] is False,
                "the unprotect step lifts termination protection and nothing else")


def test_data_hosts_have_protected_encrypted_data_volumes_and_termination_protection(stack_run, tally):
    vols = {r.inputs["tags"]["Name"]: r for r in stack_run.of_type("aws:ebs/volume:Volume")}
    for name, h in stack_run.outputs["hosts"].items():
        inst = instances(stack_run)[name]
        if "data" in h["roles"]:
            tally.check(vols[f"{name}-data"].opts["protect"] and vols[f"{name}-data"].inputs["encrypted"], name)
            from offline.contexts import _load

            expected = _load(stack_run.stack)[0].group("data").data_gb
            tally.check(vols[f"{name}-data"].inputs["size"] == expected and vols[f"{name}-data"].inputs["type"] == "gp3")
            tally.check(inst.inputs["disableApiTermination"] is True, name)
        else:
            tally.check(inst.inputs["disableApiTermination"] is False, name)


def test_stateful_resources_are_protected(stack_run, tally):
    for typ in ("aws:efs/fileSystem:FileSystem", "aws:ssm/parameter:Parameter", "aws:ebs/volume:Volume",
                "random:index/randomPassword:RandomPassword", "random:index/randomBytes:RandomBytes"):
        found = stack_run.of_type(typ)
        tally.check(found, f"no {typ}")
        for r in found:
            tally.check(r.opts["protect"], f"{r.name} is not protected")
    backups = [r for r in stack_run.of_type("aws:s3/bucket:Bucket") if r.name.endswith("-backups")]
    tally.check(len(backups) == 1 and backups[0].opts["protect"])
    vip = [r for r in stack_run.of_type("aws:ec2/eip:Eip") if r.name.endswith("-vip")]
    tally.check(len(vip) == 1 and vip[0].opts["protect"])


def test_storage_is_encrypted_and_efs_has_one_mount_target_per_az(stack_run, tally):
    efs = stack_run.of_type("aws:efs/fileSystem:FileSystem")
    tally.check(len(efs) == 1 and efs[0].inputs["encrypted"] is True)
    mts = stack_run.of_type("aws:efs/mountTarget:MountTarget")
    subnets = {r.id: r.inputs["availabilityZone"] for r in stack_run.of_type("aws:ec2/subnet:Subnet")}
    azs = [subnets[m.inputs["subnetId"]] for m in mts]
    tally.check(sorted(azs) == sorted(set(azs)) and len(azs) == len(set(subnets.values())), azs)
    aps = {r.inputs["rootDirectory"]["path"] for r in stack_run.of_type("aws:efs/accessPoint:AccessPoint")}
    tally.check(aps == {"/data", "/dist", "/slurm"}, aps)
    tally.check(stack_run.of_type("aws:efs/backupPolicy:BackupPolicy")[0].inputs["backupPolicy"]["status"] == "ENABLED")
    sse = stack_run.of_type("aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration")
    pab = stack_run.of_type("aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock")
    tally.check(len(sse) == 2 and len(pab) == 2)
    tally.check(all(all(p.inputs[k] for k in ("blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls",
                                                "restrictPublicBuckets")) for p in pab))
    lc = stack_run.of_type("aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration")
    tally.check(len(lc) == 1 and lc[0].inputs["rules"][0]["noncurrentVersionExpiration"]["noncurrentDays"] > 0)
    dlm = stack_run.of_type("aws:dlm/lifecyclePolicy:LifecyclePolicy")
    tally.check(len(dlm) == 1 and dlm[0].inputs["policyDetails"]["targetTags"]["Snapshot"] == "hpc-data")


def test_the_vip_is_allocated_but_never_associated_by_the_program(stack_run, tally):
    tally.check(not [r for r in stack_run.resources if "eipAssociation" in r.type], "managed EIP association")
    insts = instances(stack_run)
    tally.check(all("associatePublicIpAddress" not in r.inputs for r in insts.values()))
    tally.check(stack_run.outputs["vip"]["public_ip"].count(".") == 3)


def test_network_has_three_subnet_roles_per_az_nat_and_endpoints(stack_run, tally):
    subnets = stack_run.of_type("aws:ec2/subnet:Subnet")
    azs = sorted({s.inputs["availabilityZone"] for s in subnets})
    by_net = Counter(s.inputs["tags"]["Network"] for s in subnets)
    tally.check(by_net == {"external": len(azs), "internal": len(azs), "management": len(azs)}, by_net)
    vpc = stack_run.of_type("aws:ec2/vpc:Vpc")[0]
    tally.check(vpc.inputs["enableDnsHostnames"] is True and vpc.inputs["enableDnsSupport"] is True)
    nats = stack_run.of_type("aws:ec2/natGateway:NatGateway")
    tally.check(len(nats) == (len(azs) if stack_run.stack == "prod" else 1), len(nats))
    eps = {r.inputs["serviceName"].rsplit(".", 1)[1]: r.inputs["vpcEndpointType"]
           for r in stack_run.of_type("aws:ec2/vpcEndpoint:VpcEndpoint")}
    tally.check(eps == {"ssm": "Interface", "ssmmessages": "Interface", "ec2messages": "Interface",
                        "ec2": "Interface", "s3": "Gateway"}, eps)
    zone = stack_run.of_type("aws:route53/zone:Zone")
    tally.check(len(zone) == 1 and zone[0].inputs["vpcs"], "private zone attached to the VPC")
    records = {r.inputs["name"]: r.inputs["records"] for r in stack_run.of_type("aws:route53/record:Record")}
    tally.check(records == {k: [v] for k, v in stack_run.outputs["endpoints"].items()})
    for alias in ("galera-1", "sentinel-1", "slurmctld-1", "slurmdbd", "loghost", "prometheus"):
        tally.check(any(n.startswith(alias + ".") for n in records), alias)


def test_user_data_is_gzipped_cloud_config_within_16kb_and_identical_across_runs(stack_run, tally):
    # the preview run is a second, independent run of the program
    again = {n: r.inputs["userDataBase64"] for n, r in instances(program_run(stack_run.stack, True)).items()}
    for name, r in instances(stack_run).items():
        raw = base64.b64decode(r.inputs["userDataBase64"])
        tally.check(len(raw) <= 16 * 1024, f"{name}: {len(raw)} bytes")
        tally.check(user_data(r).startswith(b"#cloud-config\n"), name)
        tally.check(again[name] == r.inputs["userDataBase64"], f"{name}: user-data differs between runs")


def secret_values(run: ProgramRun) -> list[str]:
    vals = [r.outputs["result"] for r in run.of_type("random:index/randomPassword:RandomPassword")]
    vals += [r.outputs["base64"][:40] for r in run.of_type("random:index/randomBytes:RandomBytes")]
    vals += [v.splitlines()[1] for v in TEST_SECRETS.values()]
    vals += [r.outputs["privateKeyPem"].splitlines()[1] for r in run.of_type("tls:index/privateKey:PrivateKey")]
    return vals


def test_no_secret_reaches_user_data_bundles_or_plain_outputs(stack_run, tally):
    secrets = secret_values(stack_run)
    tally.expect(len(secrets) * 3)
    blobs = {n: user_data(r).decode() for n, r in instances(stack_run).items()}
    for o in stack_run.of_type("aws:s3/bucketObjectv2:BucketObjectv2"):
        blobs[o.name] = gzip.decompress(base64.b64decode(o.inputs["contentBase64"])).decode("latin-1")
    outputs = json.dumps(stack_run.outputs)
    for s in secrets:
        tally.check(all(s not in b for b in blobs.values()), "a secret value is in user-data or a bundle")
        tally.check(s not in outputs, "a secret value is in a stack output")
        params = [p for p in stack_run.of_type("aws:ssm/parameter:Parameter") if s in str(p.inputs["value"])]
        tally.check(all(p.inputs["type"] == "SecureString" for p in params))
    tally.check(all(p.inputs["name"].startswith(f"/hpc-portal/{stack_run.stack}/secrets/")
                    for p in stack_run.of_type("aws:ssm/parameter:Parameter")))


def test_outputs_are_the_contract_for_the_next_phase(stack_run, tally):
    o = stack_run.outputs
    for key in ("vip", "hosts", "role_hosts", "network", "efs", "secrets", "endpoints", "inventory", "env_files",
                "primaries", "buckets"):
        tally.check(o.get(key), f"output {key} missing or empty")
    tally.check(set(o["network"]["security_groups"]) >= {"lb", "web", "app", "data", "slurm", "monitoring", "efs"})
    tally.check(set(o["network"]["subnets"]) == {"external", "internal", "management"})
    tally.check(o["efs"]["dns_name"].startswith(o["efs"]["id"]))
    tally.check(o["secrets"]["path"] == f"/hpc-portal/{stack_run.stack}/secrets")
    import yaml

    inv = yaml.safe_load(o["inventory"])
    tally.check(set(inv["all"]["hosts"]) == set(o["hosts"]))
    tally.check(set(inv["all"]["children"]["data"]["hosts"]) == set(o["role_hosts"]["data"]))


def test_every_resource_has_a_parent_component(stack_run, tally):
    for r in stack_run.resources:
        if r.type.startswith("hpc:"):
            continue
        tally.check(r.parent is not None, f"{r.type} {r.name} has no parent")


def _registrations(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """(URN, request) of every resource the program registers, as the engine receives them
    (the harness records inputs and options, not aliases)."""
    from pulumi.runtime import mocks

    seen: list[tuple[str, Any]] = []
    register = mocks.MockMonitor.RegisterResource

    def recording(self: Any, request: Any) -> Any:
        response = register(self, request)
        seen.append((response.urn, request))
        return response

    monkeypatch.setattr(mocks.MockMonitor, "RegisterResource", recording)
    return seen


def _root_alias_urns(urn: str, request: Any) -> list[str]:
    """The URNs of a resource's parent-less aliases (`noParent`), as the engine builds
    them for a resource of the stack's top level: no parent type in the URN."""
    stack, project = urn.split(":")[2], urn.split("::")[1]
    return [f"urn:pulumi:{stack}::{project}::{a.spec.type or request.type}::{a.spec.name or request.name}"
            for a in request.aliases if a.HasField("spec") and a.spec.noParent]


def test_the_vip_and_the_cutover_record_keep_their_urns_inside_their_components(monkeypatch, tally):
    """Both were created at the stack's top level before they moved into components: an
    alias to the parent-less URN makes the engine adopt them (the protected EIP is never
    replaced, the public record never recreated)."""
    seen = _registrations(monkeypatch)
    CUTOVER = {"zone_id": "Z0123456789ABC", "record_name": "portal.example.ac.kr", "old_server_ip": "110.15.177.120"}
    run_stack("prod", overrides={"cutover": CUTOVER})
    by_name = {request.name: (urn, request) for urn, request in seen}
    for name, typ, component in (("prod-vip", "aws:ec2/eip:Eip", "hpc:vip:Vip"),
                                 ("prod-cutover", "aws:route53/record:Record", "hpc:cutover:Cutover")):
        urn, request = by_name[name]
        tally.check(request.type == typ, request.type)
        tally.check(urn == f"urn:pulumi:prod::hpc-portal::{component}${typ}::{name}", urn)
        tally.check(request.parent.endswith(f"{component}::prod"), request.parent)
        old = f"urn:pulumi:prod::hpc-portal::{typ}::{name}"
        tally.check(old in _root_alias_urns(urn, request), f"{name}: no alias to {old}: {list(request.aliases)}")
    tally.check(by_name["prod-vip"][1].protect is True)


def test_template_tests_render_the_bytes_the_program_renders(stack_run, tally):
    """offline.contexts (what the template tests render from) takes the values AWS
    assigns from the mocks, through the program's own Deployed.from_outputs: every host's
    user-data is the program's, byte for byte."""
    from cloud_init.render import render_host
    from offline.contexts import contexts

    ctxs = contexts(stack_run.stack)
    hosts = stack_run.of_type("aws:ec2/instance:Instance")
    tally.expect(len(hosts))
    for res in hosts:
        name = res.inputs["tags"]["Name"]
        tally.check(base64.b64decode(res.inputs["userDataBase64"]) == render_host(ctxs[name]).user_data, name)


@pytest.mark.parametrize("stack", ["prod", "dev"])
def test_invokes_are_only_the_known_ones(stack, tally):
    run = program_run(stack)
    tokens = {t for t, _ in run.calls}
    tally.check(tokens <= {"aws:index/getCallerIdentity:getCallerIdentity", "aws:index/getPartition:getPartition",
                           "aws:ssm/getParameter:getParameter"}, tokens)
    # the only parameters read are Canonical's AMI ids, one per architecture the stack runs
    params = sorted(a["name"] for t, a in run.calls if t == "aws:ssm/getParameter:getParameter")
    archs = {h["arch"] for h in run.outputs["hosts"].values()}
    tally.check(params == sorted(f"/aws/service/canonical/ubuntu/server/24.04/stable/current/"
                                 f"{'amd64' if a == 'x86_64' else 'arm64'}/hvm/ebs-gp3/ami-id" for a in archs), params)
