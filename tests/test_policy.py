"""The policy pack's rules hold on every stack's mocked graph, and each rule fails on a
graph that breaks it. The pack's Pulumi wrappers hand the same rules the same dicts."""

from __future__ import annotations

import base64
import copy
import gzip
import importlib.util
from pathlib import Path
from typing import Any

import pytest
import yaml

from offline.harness import TEST_SECRETS
from policy import rules
from tests.conftest import program_run
from tools.aws_rules import from_run

ROOT = Path(__file__).resolve().parent.parent


def graph(stack: str = "prod", preview: bool = False) -> list[dict[str, Any]]:
    return copy.deepcopy(from_run(program_run(stack, preview))[0])


def named(res: list[dict[str, Any]], name: str, typ: str | None = None) -> dict[str, Any]:
    found = [r for r in res if r["name"] == name and (typ is None or r["type"] == typ)]
    assert len(found) == 1, name
    return found[0]


def violations(res: list[dict[str, Any]], rule: str) -> list[rules.Violation]:
    return [v for v in rules.check_all(res) if v.rule == rule]


def test_every_stack_passes_every_rule(stack_run, tally):
    res = from_run(stack_run)[0]
    tally.expect(len(rules.RULES) + 1)
    tally.check(len(res) > 100, "the graph is there")
    found = rules.check_all(res)
    for rule in rules.RULES:
        tally.check([v for v in found if v.rule == rule.name] == [], f"{stack_run.stack}: {rule.name}: "
                    + "; ".join(str(v) for v in found if v.rule == rule.name))


def as_preview(res: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The graph as a first `pulumi preview` sees it: ids, references to them and
    computed documents (user-data, bundles, policies) unknown."""
    ids = {r["id"] for r in res if r.get("id")}
    computed = {"userDataBase64", "contentBase64", "policy", "bucket"}

    def blank(v: Any, key: str = "") -> Any:
        if key in computed or (isinstance(v, str) and v in ids):
            return "<unknown>"
        if isinstance(v, dict):
            return {k: blank(x, k) for k, x in v.items()}
        if isinstance(v, list):
            return [blank(x) for x in v]
        return v

    return [{**r, "id": None, "inputs": blank(r["inputs"])} for r in res]


def test_rules_skip_values_unknown_in_a_preview(tally):
    for stack in ("dev", "prod"):
        res = as_preview(graph(stack))
        tally.check(all(rules.unknown(r["inputs"]["userDataBase64"]) for r in res if r["type"] == rules.INSTANCE))
        tally.check(rules.check_all(res) == [], f"{stack} preview: {rules.check_all(res)[:3]}")
    # What is still known is still judged: the data tier by address, world-open by parent.
    res = as_preview(graph())
    eni = named(res, "prod-data-3-eni")
    eni["inputs"]["privateIps"] = ["10.40.0.30"]
    tally.check([v.resource for v in violations(res, "data-tier-private")] == ["data-3"])


# ------------------------------------------------------------------ one per rule


def _ingress(sg_parent: str, proto: str, lo: int, hi: int, cidr: str = "0.0.0.0/0") -> dict[str, Any]:
    return {"type": rules.SG_INGRESS, "name": f"bad-{sg_parent}-{lo}", "parent": sg_parent, "id": "sgr-bad",
            "opts": {"protect": False},
            "inputs": {"ipProtocol": proto, "fromPort": lo, "toPort": hi, "cidrIpv4": cidr}}


def test_world_open_fails_on_anything_but_lb_80_443(tally):
    res = graph()
    sg = {r["name"]: r for r in res if r["type"] == rules.SG}
    tally.check(violations(res, "world-open") == [])
    for parent, proto, lo, hi in (("prod-sg-data", "tcp", 3306, 3306), ("prod-sg-lb", "tcp", 8404, 8404),
                                  ("prod-sg-lb", "tcp", 0, 65535), ("prod-sg-app", "tcp", 443, 443),
                                  ("prod-sg-lb", "-1", 0, 0)):
        bad = res + [_ingress(parent, proto, lo, hi)]
        bad[-1]["inputs"]["securityGroupId"] = sg[parent]["id"]
        tally.check(len(violations(bad, "world-open")) == 1, f"{parent} {proto} {lo}-{hi} open to the world passed")
    ipv6 = res + [_ingress("prod-sg-slurm", "tcp", 22, 22)]
    ipv6[-1]["inputs"] = {"ipProtocol": "tcp", "fromPort": 22, "toPort": 22, "cidrIpv6": "::/0"}
    tally.check(len(violations(ipv6, "world-open")) == 1, "::/0 counts as the world")
    ok = res + [_ingress("prod-sg-lb", "tcp", 443, 443)]
    tally.check(violations(ok, "world-open") == [], "the LB's 443 is allowed")


def test_imdsv2_fails_on_optional_tokens(tally):
    res = graph()
    inst = named(res, "prod-app-1-instance")
    inst["inputs"]["metadataOptions"]["httpTokens"] = "optional"
    tally.check([v.resource for v in violations(res, "imdsv2")] == ["prod-app-1-instance"])
    inst["inputs"]["metadataOptions"] = {"httpTokens": "required", "httpPutResponseHopLimit": 5}
    tally.check(len(violations(res, "imdsv2")) == 1, "hop limit 5 passed")


def test_encryption_fails_on_each_unencrypted_store(tally):
    base = graph()
    cases = {
        "prod-data-1-data": lambda r: r["inputs"].update(encrypted=False),
        "prod-storage-efs": lambda r: r["inputs"].pop("encrypted"),
        "prod-lb-1-instance": lambda r: r["inputs"]["rootBlockDevice"].update(encrypted=False),
    }
    for name, breaks in cases.items():
        res = copy.deepcopy(base)
        breaks(named(res, name))
        tally.check([v.resource for v in violations(res, "encryption")] == [name], name)
    res = [r for r in copy.deepcopy(base) if r["name"] != "prod-storage-backups-sse"]
    tally.check([v.resource for v in violations(res, "encryption")] == ["prod-storage-backups"], "bucket without SSE")
    res = copy.deepcopy(base)
    named(res, "prod-storage-bundles-sse")["inputs"]["rules"] = [{"applyServerSideEncryptionByDefault": {"sseAlgorithm": "none"}}]
    tally.check([v.resource for v in violations(res, "encryption")] == ["prod-storage-bundles"], "SSE of an unknown kind")


def test_s3_private_fails_without_a_full_public_access_block(tally):
    res = [r for r in graph() if r["name"] != "prod-storage-backups-public-access"]
    tally.check([v.resource for v in violations(res, "s3-private")] == ["prod-storage-backups"])
    res = graph()
    named(res, "prod-storage-bundles-public-access")["inputs"]["restrictPublicBuckets"] = False
    tally.check([v.resource for v in violations(res, "s3-private")] == ["prod-storage-bundles"])


def test_data_tier_private_fails_when_a_data_host_moves_to_an_external_subnet(tally):
    res = graph()
    ext = named(res, "prod-external-a")
    eni = named(res, "prod-data-3-eni")
    eni["inputs"]["subnetId"] = ext["id"]
    eni["inputs"]["privateIps"] = ["10.40.0.30"]
    found = violations(res, "data-tier-private")
    tally.check([v.resource for v in found] == ["data-3"], found)
    # Known only by address (ids unknown in a preview): still found.
    eni["inputs"]["subnetId"] = "<unknown>"
    tally.check([v.resource for v in violations(res, "data-tier-private")] == ["data-3"], "by address")
    res = graph()
    named(res, "prod-data-1-instance")["inputs"]["associatePublicIpAddress"] = True
    tally.check(len(violations(res, "data-tier-private")) == 1, "public IP on a data host")


def _move_eni(res: list[dict[str, Any]], host: str, subnet: str, ip: str) -> None:
    eni = named(res, f"prod-{host}-eni")
    eni["inputs"]["subnetId"] = named(res, subnet)["id"]
    eni["inputs"]["privateIps"] = [ip]


def test_multi_az_fails_on_one_az_roles_and_an_unsafe_galera(tally):
    res = graph()
    _move_eni(res, "app-2", "prod-internal-a", "10.40.8.65")
    _move_eni(res, "app-3", "prod-internal-a", "10.40.8.66")
    found = violations(res, "multi-az")
    tally.check([v.resource for v in found] == ["app", "web"], found)
    res = graph()
    _move_eni(res, "data-2", "prod-internal-b", "10.40.9.31")
    found = violations(res, "multi-az")
    tally.check(len(found) == 1 and "AZs" in found[0].message, f"Galera over 2 of 3 AZs: {found}")
    res = [r for r in graph() if not r["name"].startswith("prod-data-3-")]
    found = violations(res, "multi-az")
    tally.check(any("odd count" in v.message for v in found), f"2 Galera nodes: {found}")


def _with_user_data_line(res: list[dict[str, Any]], name: str, line: str) -> None:
    i = named(res, name)["inputs"]
    text = gzip.decompress(base64.b64decode(i["userDataBase64"])).decode()
    i["userDataBase64"] = base64.b64encode(gzip.compress((text + line + "\n").encode())).decode()


def test_user_data_secrets_finds_secret_like_text(tally):
    known = [TEST_SECRETS["tls_key"]] + [r.outputs["result"] for r in program_run("prod").resources
                                          if r.type == "random:index/randomPassword:RandomPassword"]
    tally.check(rules.user_data_secrets(graph(), known) == [], "the program's user-data holds no secret")
    bad_lines = [
        "requirepass Sup3rS3cretValue42",
        "  DB_PASSWORD=Xk2jq9LmP0wZr7Tt",
        "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC",
        "aws_access_key_id = AKIAIOSFODNN7EXAMPLE",
        "url: https://hooks.slack.com/services/T0000/B0000/XXXXXXXXXXXXXXXXXXXXXXXX",
    ]
    for line in bad_lines:
        res = graph()
        _with_user_data_line(res, "prod-data-1-instance", line)
        tally.check(len(rules.user_data_secrets(res)) >= 1, f"not found: {line!r}")
    res = graph()
    _with_user_data_line(res, "prod-app-1-instance", f"# {known[1]}")
    tally.check(len(rules.user_data_secrets(res, known)) == 1, "a generated secret value")
    for harmless in ("requirepass ${REDIS_PASSWORD}", "password_file: /run/hpc/secrets/redis_password",
                     "masterauth {{ redis_password }}", "StoragePass=$(cat /run/hpc/secrets/x)"):
        res = graph()
        _with_user_data_line(res, "prod-data-1-instance", harmless)
        tally.check(rules.user_data_secrets(res) == [], f"false positive: {harmless!r}")


def test_user_data_secrets_reads_bundles_too(tally):
    import io
    import tarfile

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        data = b"[client]\npassword = Zq8wPlm3Nd9rTx2v\n"
        info = tarfile.TarInfo("etc/mysql/debian.cnf")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    res = graph()
    bundle = next(r for r in res if r["type"] == rules.BUCKET_OBJECT)
    bundle["inputs"]["contentBase64"] = base64.b64encode(raw.getvalue()).decode()
    found = rules.user_data_secrets(res)
    tally.check(len(found) == 1 and "etc/mysql/debian.cnf" in found[0].message, found)


def test_stateful_resources_must_be_protected(tally):
    base = graph()
    for name, typ in (("prod-data-2-data", rules.VOLUME), ("prod-storage-efs", rules.EFS),
                      ("prod-storage-backups", rules.BUCKET), ("prod-secrets-munge-key", None),
                      ("prod-secrets-redis_password", "random:index/randomPassword:RandomPassword"),
                      ("prod-secrets-redis_password", "aws:ssm/parameter:Parameter")):
        res = copy.deepcopy(base)
        named(res, name, typ)["opts"]["protect"] = False
        tally.check([v.resource for v in violations(res, "stateful-protected")] == [name], name)
    tally.check(not named(base, "prod-storage-bundles")["opts"]["protect"]
                and violations(base, "stateful-protected") == [], "the regenerated bundle bucket is exempt")


def test_iam_fails_on_wildcards_beyond_ec2_describe(tally):
    import json

    def with_statement(st: dict[str, Any]) -> list[dict[str, Any]]:
        res = graph()
        p = named(res, "prod-app-policy")
        doc = json.loads(p["inputs"]["policy"])
        doc["Statement"].append(st)
        p["inputs"]["policy"] = json.dumps(doc)
        return res

    bad: list[dict[str, Any]] = [
        {"Effect": "Allow", "Action": "s3:*", "Resource": ["arn:aws:s3:::b/k"]},
        {"Effect": "Allow", "Action": ["ssm:GetParameter"], "Resource": "*"},
        {"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": "arn:aws:s3:::bucket/*"},
        {"Effect": "Allow", "NotAction": ["iam:*"], "Resource": "arn:aws:s3:::b/k"},
        {"Effect": "Allow", "Action": "*", "Resource": "*"},
    ]
    for st in bad:
        tally.check(len(violations(with_statement(st), "iam-least-privilege")) >= 1, f"passed: {st}")
    ok = {"Effect": "Allow", "Action": ["ec2:DescribeInstances", "ec2:Describe*"], "Resource": "*"}
    tally.check(violations(with_statement(ok), "iam-least-privilege") == [], "EC2 Describe on * is allowed")
    deny = {"Effect": "Deny", "Action": "*", "Resource": "*"}
    tally.check(violations(with_statement(deny), "iam-least-privilege") == [], "a Deny may be broad")
    res = graph()
    named(res, "prod-app-ssm-core")["inputs"]["policyArn"] = "arn:aws:iam::aws:policy/AdministratorAccess"
    tally.check([v.resource for v in violations(res, "iam-least-privilege")] == ["prod-app-ssm-core"])


# ------------------------------------------------------------------ the pack itself


def _load_pack() -> Any:
    try:
        import pulumi_policy  # noqa: F401
    except ImportError:  # pragma: no cover
        pytest.fail("pulumi-policy is not installed: add pulumi-policy==1.21.0 to requirements-dev.txt")
    spec = importlib.util.spec_from_file_location("hpc_policy_pack", ROOT / "policy" / "__main__.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _policy_resource(r: dict[str, Any], parents: dict[str, Any]) -> Any:
    from pulumi_policy import PolicyCustomTimeouts, PolicyResource, PolicyResourceOptions

    opts = PolicyResourceOptions(protect=bool(r["opts"].get("protect")), ignore_changes=[], delete_before_replace=False,
                                 aliases=[], custom_timeouts=PolicyCustomTimeouts(0, 0, 0),
                                 additional_secret_outputs=[], parent=None)
    urn = f"urn:pulumi:prod::hpc-portal::{r['type']}::{r['name']}"
    # Outputs as the engine hands them: the inputs plus computed values, no separate id.
    return PolicyResource(r["type"], dict(r["inputs"]), urn, r["name"], opts, None, parents.get(r.get("parent") or ""),
                          [], {})


def test_policy_pack_wraps_each_rule_and_reports_through_pulumi(tally):
    from pulumi_policy import ResourceValidationArgs, ResourceValidationPolicy, StackValidationArgs, StackValidationPolicy

    pack = _load_pack()
    tally.check([p.name for p in pack.POLICIES] == [r.name for r in rules.RULES], "one policy per rule")
    tally.check(all(isinstance(p, ResourceValidationPolicy if r.scope == "resource" else StackValidationPolicy)
                    for p, r in zip(pack.POLICIES, rules.RULES, strict=True)))
    doc = yaml.safe_load((ROOT / "policy" / "PulumiPolicy.yaml").read_text())
    tally.check(doc["runtime"]["name"] == "python" and (ROOT / "policy" / "requirements.txt").exists())

    res = graph()
    world = _ingress("prod-sg-data", "tcp", 3306, 3306)
    world["inputs"]["securityGroupId"] = "<unknown>"  # as in a preview: found through the parent
    res.append(world)
    parents: dict[str, Any] = {}
    for r in sorted(res, key=lambda r: r["parent"] is not None):  # parents first
        parents[r["name"]] = _policy_resource(r, parents)
    for r in res:  # children whose parent came later
        parents[r["name"]].parent = parents.get(r.get("parent") or "")
    by_name = {p.name: p for p in pack.POLICIES}
    reported: list[tuple[str, str | None]] = []
    args = StackValidationArgs(list(parents.values()))
    by_name["world-open"].validate(args, lambda msg, urn=None: reported.append((msg, urn)))
    tally.check(len(reported) == 1 and reported[0][1] and reported[0][1].endswith("::bad-prod-sg-data-3306"), reported)

    reported.clear()
    by_name["multi-az"].validate(args, lambda msg, urn=None: reported.append((msg, urn)))
    tally.check(reported == [], f"multi-az on the pack's view of prod: {reported}")

    inst = named(graph(), "prod-app-1-instance")
    inst["inputs"]["metadataOptions"]["httpTokens"] = "optional"
    pr = _policy_resource(inst, {})
    rargs = ResourceValidationArgs(inst["type"], pr.props, pr.urn, inst["name"], pr.opts, None)
    reported.clear()
    by_name["imdsv2"].validate(rargs, lambda msg, urn=None: reported.append((msg, urn)))
    tally.check(len(reported) == 1 and "httpTokens" in reported[0][0], reported)
