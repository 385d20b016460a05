"""The offline plan (make plan): its sections, that it hides secrets and blobs, that the
cost comes from the dated price table, that it is byte-identical across runs, and that
the committed budget profile fits the users' $1,000 a month while prod does not."""

from __future__ import annotations

import base64
import gzip
import hashlib
import html
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from offline.harness import TEST_SECRETS
from tests.conftest import program_run
from tools import plan as planmod

ROOT = Path(__file__).resolve().parent.parent
costmod = planmod.costmod
_PLANS: dict[str, dict] = {}


def plan_of(stack: str) -> dict:
    if stack not in _PLANS:
        _PLANS[stack] = planmod.build_plan(program_run(stack), stack)
    return _PLANS[stack]


def test_the_plan_has_every_section(stack_run, tally):
    p = plan_of(stack_run.stack)
    tally.expect(8)
    for key in ("resources", "hosts", "amis", "address_plan", "security_matrix", "outputs", "monthly_cost", "diagram"):
        tally.check(key in p, key)
    r = p["resources"][0]
    tally.check({"type", "name", "parent", "inputs", "protect"} <= set(r), r.keys())
    tally.check(p["outputs"]["hosts"] and "rendered" not in p["outputs"], "outputs without the render digests")


def test_hosts_carry_placement_and_every_rendered_file_hash(prod, tally):
    p = plan_of("prod")
    tally.check(sorted(p["hosts"]) == sorted(prod.outputs["hosts"]))
    for name, h in p["hosts"].items():
        tally.check(ipaddress.ip_address(h["ip"]) in ipaddress.ip_network(h["subnet"]), name)
        tally.check(h["az"].startswith("ap-northeast-2") and h["instance_type"] and h["roles"], name)
        tally.check(len(h["files"]) >= 5 and all(re.fullmatch(r"[0-9a-f]{64}", s) for s in h["files"].values()), name)
        tally.check(set(h["files"]) == set(prod.outputs["rendered"][name]["files"]), name)


def test_blobs_are_hashed_and_secrets_never_appear(prod, tally):
    p = plan_of("prod")
    text = planmod.dumps(p)
    instances = {r.name: r for r in prod.resources if r.type == "aws:ec2/instance:Instance"}
    planned = {r["name"]: r for r in p["resources"] if r["type"] == "aws:ec2/instance:Instance"}
    tally.check(len(instances) == len(planned) == 11)
    for name, res in instances.items():
        raw = base64.b64decode(res.inputs["userDataBase64"])
        host = res.inputs["tags"]["Name"]
        tally.check(planned[name]["inputs"]["userDataBase64"] == "sha256:" + hashlib.sha256(raw).hexdigest(), name)
        tally.check(p["hosts"][host]["user_data"]["sha256"] == hashlib.sha256(raw).hexdigest(), "same hash as rendered")
        tally.check(gzip.decompress(raw)[:13] == b"#cloud-config", name)
    secrets = [TEST_SECRETS["tls_key"], "TESTPRIVATEKEYVALUE"]
    secrets += [r.outputs["result"] for r in prod.resources if r.type == "random:index/randomPassword:RandomPassword"]
    secrets += [r.outputs["base64"] for r in prod.resources if r.type == "random:index/randomBytes:RandomBytes"]
    tally.check(len(secrets) >= 8)
    for s in secrets:
        tally.check(s not in text, f"a secret value is in the plan: {s[:6]}...")
    tally.check('"<secret>"' in text, "secret parameters are shown as <secret>")
    tally.check(len(text) < 2_000_000, f"plan is {len(text)} bytes")


def test_clean_hides_secrets_and_hashes_blobs(tally):
    tally.check(planmod.clean({"value": {planmod.SECRET_SIG: "x", "value": "hunter2"}}) == {"value": "<secret>"})
    tally.check(planmod.clean("-----BEGIN PRIVATE KEY-----\nabc") == "<secret>")
    blob = base64.b64encode(b"hello").decode()
    tally.check(planmod.clean({"contentBase64": blob}) == {"contentBase64": "sha256:" + hashlib.sha256(b"hello").hexdigest()})
    tally.check(planmod.clean({"fromPort": 80.0, "b": [1.5]}) == {"b": [1.5], "fromPort": 80})


def test_address_plan_lists_every_subnet_and_host_once(tally):
    p = plan_of("prod")
    ap = p["address_plan"]
    tally.check(set(ap["networks"]) == {"external", "internal", "management"})
    seen = []
    for network, per_az in ap["networks"].items():
        tally.check(len(per_az) == 3, network)
        for az, s in per_az.items():
            for name, ip in s["hosts"].items():
                tally.check(ipaddress.ip_address(ip) in ipaddress.ip_network(s["cidr"]) and p["hosts"][name]["az"] == az)
                seen.append(name)
    tally.check(sorted(seen) == sorted(p["hosts"]), "each host in exactly one subnet")


def test_security_matrix_comes_from_the_created_rules(prod, tally):
    m = plan_of("prod")["security_matrix"]
    n_rules = len([r for r in prod.resources if r.type in planmod.RULE_TYPES])
    tally.check(len(m["cells"]) == n_rules, "one cell per rule resource")
    tally.check(m["ingress"]["0.0.0.0/0"] == {"tcp/443": ["lb"], "tcp/80": ["lb"]}, m["ingress"]["0.0.0.0/0"])
    tally.check("data" in m["ingress"]["app"]["tcp/3306"], "app reaches the data tier's 3306")
    tally.check("lb" in m["ingress"]["lb"]["vrrp"], "VRRP between the LB pair")
    tally.check("endpoints" in m["egress"]["data"]["tcp/443"], "egress: data -> VPC endpoints")
    tally.check(not any(c["group"] == "data" and c["peer"] == "0.0.0.0/0" and c["direction"] == "ingress"
                        for c in m["cells"]), "no world ingress to the data tier")


def test_monthly_cost_adds_up_and_is_dated(tally):
    c = plan_of("prod")["monthly_cost"]
    tally.check(c["region"] == "ap-northeast-2" and re.fullmatch(r"\d{4}-\d{2}-\d{2}", c["price_date"]))
    tally.check(c["price_source"].startswith(("https://aws.amazon.com/", "https://pricing.us-east-1.amazonaws.com/")), c["price_source"])
    tally.check(abs(sum(x["monthly"] for x in c["classes"].values()) - c["total"]) < 0.011)
    for cls, x in c["classes"].items():
        tally.check(abs(sum(line["monthly"] for line in x["lines"]) - x["monthly"]) < 0.011, cls)
    tally.check({"ec2_instances", "ebs_volumes", "nat_gateways", "public_ipv4", "vpc_endpoints", "efs"} <= set(c["classes"]))
    nat = c["classes"]["nat_gateways"]["lines"][0]
    tally.check(nat["item"] == "NAT gateway x3" and nat["quantity"] == 3 * 730, "prod: one NAT per AZ")


def test_cost_of_a_known_graph(tally):
    prices = costmod.load_prices("ap-northeast-2")
    res = [
        {"type": "aws:ec2/instance:Instance", "name": "a", "inputs": {"instanceType": "m7g.large", "tags": {"Role": "app"},
                                                                     "rootBlockDevice": {"volumeSize": 50, "volumeType": "gp3"}}},
        {"type": "aws:ec2/instance:Instance", "name": "b", "inputs": {"instanceType": "m7g.large", "tags": {"Role": "app"},
                                                                     "rootBlockDevice": {"volumeSize": 50, "volumeType": "gp3"}}},
        {"type": "aws:ec2/natGateway:NatGateway", "name": "n", "inputs": {}},
        {"type": "aws:ec2/eip:Eip", "name": "e", "inputs": {}},
        {"type": "aws:ec2/vpcEndpoint:VpcEndpoint", "name": "v", "inputs": {"vpcEndpointType": "Interface", "subnetIds": ["a", "b"]}},
        {"type": "aws:ec2/vpcEndpoint:VpcEndpoint", "name": "s3", "inputs": {"vpcEndpointType": "Gateway"}},
    ]
    c = costmod.monthly_cost(res, prices)
    ec2 = prices["ec2_hourly"]["m7g.large"] * 730 * 2
    tally.check(c["classes"]["ec2_instances"]["monthly"] == round(ec2, 2), c["classes"]["ec2_instances"])
    tally.check(c["classes"]["ebs_volumes"]["monthly"] == round(100 * prices["ebs"]["gp3_gb_month"], 2))
    tally.check(c["classes"]["public_ipv4"]["monthly"] == round(730 * prices["public_ipv4"]["hour"], 2))
    tally.check(c["classes"]["vpc_endpoints"]["lines"][0]["quantity"] == 2 * 730, "interface endpoints bill per AZ")
    bad = res + [{"type": "aws:ec2/instance:Instance", "name": "x", "inputs": {"instanceType": "z9.mega"}}]
    with pytest.raises(costmod.PriceError, match="z9.mega"):
        costmod.monthly_cost(bad, prices)


def test_prices_are_overridable_by_file_and_environment(tmp_path, monkeypatch, tally):
    over = tmp_path / "prices.yaml"
    over.write_text("ec2_hourly:\n  c7i.2xlarge: 1.0\nusage:\n  nat_gb: 0\n")
    base = costmod.load_prices("ap-northeast-2")
    p = costmod.load_prices("ap-northeast-2", over)
    tally.check(p["ec2_hourly"]["c7i.2xlarge"] == 1.0 and p["ec2_hourly"]["m7i.large"] == base["ec2_hourly"]["m7i.large"])
    tally.check(p["usage"]["nat_gb"] == 0 and p["usage"]["efs_gb"] == base["usage"]["efs_gb"], "merged, not replaced")
    monkeypatch.setenv(costmod.PRICES_ENV, str(over))
    p2 = costmod.load_prices("ap-northeast-2")
    tally.check(p2["overridden_by"] == str(over))
    res = plan_of("prod")["resources"]
    tally.check(costmod.monthly_cost(res, p2)["total"] > costmod.monthly_cost(res, base)["total"])
    with pytest.raises(costmod.PriceError):
        costmod.load_prices("mars-north-1")


def test_budget_profile_fits_the_users_budget_and_prod_does_not(tally):
    budget, prod = plan_of("budget"), plan_of("prod")
    tally.check(budget["monthly_cost"]["total"] <= 1000 and budget["monthly_cost"]["budget"]["status"] == "within",
                budget["monthly_cost"]["total"])
    tally.check(prod["monthly_cost"]["total"] > 1000, prod["monthly_cost"]["total"])
    tally.check(budget["profile"] == "ha" and len(budget["hosts"]) == len(prod["hosts"]), "same layout as prod")
    tally.check({h["arch"] for h in budget["hosts"].values()} == {"arm64"})
    tally.check(budget["resource_counts"]["aws:ec2/natGateway:NatGateway"] == 1)


def test_docs_cost_quotes_the_tools_figures(tally):
    """docs/cost.md states both monthly figures; they must be what the tool computes."""
    doc = (ROOT / "docs" / "cost.md").read_text()
    for stack in ("prod", "budget"):
        total = plan_of(stack)["monthly_cost"]["total"]
        m = re.search(rf"`{stack}`[^\n]*?\*\*\$([\d,]+\.\d\d)\*\*", doc)
        tally.check(m is not None, f"docs/cost.md has no figure for {stack}")
        tally.check(m and float(m.group(1).replace(",", "")) == total,
                    f"docs/cost.md says {m and m.group(1)} for {stack}; the tool says {total:,.2f} (make plan STACK={stack})")


def test_markdown_and_diagram(tmp_path, tally):
    p = plan_of("prod")
    if shutil.which("dot") is None:
        pytest.fail("graphviz `dot` is missing (Debian package graphviz)")
    written = planmod.write_plan(p, tmp_path, diagram=True)
    tally.check(sorted(x.name for x in written) == sorted(f"plan-prod.{e}" for e in ("json", "md", "dot", "svg", "png")))
    md = (tmp_path / "plan-prod.md").read_text()
    svg = html.unescape((tmp_path / "plan-prod.svg").read_text())
    for host in p["hosts"]:
        tally.check(f"| {host} |" in md and f"{host}" in svg, host)
    tally.check("## Monthly cost" in md and "## Security matrix" in md and "## Address plan" in md)
    tally.check((tmp_path / "plan-prod.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n")
    tally.check(p["diagram"]["dot_sha256"] == hashlib.sha256((tmp_path / "plan-prod.dot").read_bytes()).hexdigest())


def test_the_plan_is_byte_identical_across_runs(tmp_path, tally):
    """Two separate `tools/plan.py` processes, different hash seeds, time zones and locales."""
    digests = []
    for seed, tz in (("1", "Asia/Seoul"), ("4242", "America/Los_Angeles")):
        out = tmp_path / seed
        env = {**os.environ, "PYTHONHASHSEED": seed, "TZ": tz, "LC_ALL": "C.UTF-8"}
        env.pop("HPC_PRICES", None)
        proc = subprocess.run([sys.executable, str(ROOT / "tools" / "plan.py"), "--stack", "prod", "--out", str(out),
                               "--no-diagram"], env=env, capture_output=True, text=True, cwd=ROOT)
        tally.check(proc.returncode == 0, proc.stderr[-2000:])
        tally.check("app-1" in proc.stdout and "monthly cost" in proc.stdout, "the console table is printed")
        digests.append(hashlib.sha256((out / "plan-prod.json").read_bytes()).hexdigest())
        tally.check((out / "plan-prod.md").exists())
    tally.check(digests[0] == digests[1], digests)
    tally.check(json.loads((tmp_path / "1" / "plan-prod.json").read_text())["stack"] == "prod")


def test_every_resource_type_is_priced_or_known_free(stack_run, tally):
    from offline.mocks import RESOURCE_TYPES

    tally.check(plan_of(stack_run.stack)["monthly_cost"]["unpriced_types"] == [], stack_run.stack)
    unknown = sorted(set(RESOURCE_TYPES) - costmod.FREE_TYPES - costmod.PRICED_TYPES)
    tally.check(unknown == [], f"add these mocked types to tools/cost.py (priced or free): {unknown}")
    tally.check(not costmod.FREE_TYPES & costmod.PRICED_TYPES)


def test_hybrid_and_monitoring_resources_are_priced(tally):
    prices = costmod.load_prices("ap-northeast-2")
    res = [{"type": "aws:ec2/vpnConnection:VpnConnection", "name": "v", "inputs": {}},
           {"type": "aws:ec2transitgateway/vpcAttachment:VpcAttachment", "name": "t", "inputs": {}},
           {"type": "aws:route53/healthCheck:HealthCheck", "name": "h", "inputs": {"type": "HTTPS_STR_MATCH"}},
           {"type": "aws:cloudwatch/metricAlarm:MetricAlarm", "name": "a", "inputs": {}},
           {"type": "aws:ec2/made:Up", "name": "m", "inputs": {}}]
    c = costmod.monthly_cost(res, prices)
    tally.check(c["classes"]["hybrid"]["monthly"] == round(730 * 0.05, 2) + round(730 * 0.07, 2) + round(50 * 0.02, 2),
                c["classes"]["hybrid"])
    tally.check(c["classes"]["route53"]["monthly"] == 1.5 and c["classes"]["cloudwatch"]["monthly"] == 0.1)
    tally.check(c["unpriced_types"] == ["aws:ec2/made:Up"], "an unknown type is reported, not silently free")
