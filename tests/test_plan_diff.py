"""make plan-diff: what a change adds, changes and removes, with the flags for stateful
replacements and instance restarts from the tested replacement table; one run end to
end against HEAD in a git worktree."""

from __future__ import annotations

import copy
import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from offline.mocks import RESOURCE_TYPES
from tests.conftest import program_run
from tools import plan as planmod
from tools import plan_diff as pd

ROOT = Path(__file__).resolve().parent.parent
TABLE = pd.load_table()
_BASE: dict[str, Any] = {}


def base_plan() -> dict[str, Any]:
    if not _BASE:
        _BASE.update(planmod.build_plan(program_run("prod"), "prod"))
    return copy.deepcopy(_BASE)


def res(plan: dict[str, Any], name: str, typ: str | None = None) -> dict[str, Any]:
    found = [r for r in plan["resources"] if r["name"] == name and (typ is None or r["type"] == typ)]
    assert len(found) == 1, name
    return found[0]


def changed(d: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in d["resources"]["changed"]}


def flags(d: dict[str, Any], level: str | None = None) -> list[dict[str, str]]:
    return [f for f in d["resources"]["flags"] if level is None or f["level"] == level]


def reprice(plan: dict[str, Any]) -> None:
    plan["monthly_cost"] = planmod.costmod.monthly_cost(plan["resources"], planmod.costmod.load_prices("ap-northeast-2"))


# ------------------------------------------------------------ the replacement table


def _table_problems(table: dict[str, Any]) -> list[str]:
    """Property names in the table that are not inputs of their Pulumi resource class."""
    problems = []
    packages = {"aws": "pulumi_aws", "random": "pulumi_random", "tls": "pulumi_tls", "command": "pulumi_command"}
    for token, entry in table["types"].items():
        pkg, mod_cls, cls = token.split(":")
        mod = mod_cls.split("/")[0]
        module = importlib.import_module(packages[pkg] + ("" if mod == "index" else f".{mod}"))
        params = set(inspect.signature(getattr(module, cls)._internal_init).parameters)
        props = list(entry.get("replace") or []) + list(entry.get("restart") or [])
        props += list(entry.get("replace_when_set") or {}) + list(entry.get("replace_nested") or {})
        for p in props:
            if re.sub(r"(?<!^)(?=[A-Z])", "_", p).lower() not in params:
                problems.append(f"{token}: {p}")
    return problems


def test_the_table_covers_every_resource_type_the_program_uses(tally):
    tally.check(sorted(set(RESOURCE_TYPES) - set(TABLE["types"])) == [], "types missing from tools/replacement_table.yaml")
    used = {r.type for s in ("dev", "prod", "budget") for r in program_run(s).resources if not r.type.startswith("hpc:")}
    tally.check(used <= set(TABLE["types"]), sorted(used - set(TABLE["types"])))
    inst = TABLE["types"]["aws:ec2/instance:Instance"]
    tally.check({"ami", "subnetId", "primaryNetworkInterface"} <= set(inst["replace"]))
    tally.check({"instanceType", "userDataBase64"} <= set(inst["restart"]))
    tally.check(all(TABLE["types"][t].get("stateful") for t in (
        "aws:ebs/volume:Volume", "aws:efs/fileSystem:FileSystem", "aws:s3/bucket:Bucket", "aws:ssm/parameter:Parameter")))


def test_every_property_in_the_table_is_a_real_input(tally):
    tally.check(_table_problems(TABLE) == [], _table_problems(TABLE))
    bad = copy.deepcopy(TABLE)
    bad["types"]["aws:ec2/instance:Instance"]["replace"].append("amiId")
    bad["types"]["aws:ebs/volume:Volume"]["replace"].append("sizeGb")
    tally.check(_table_problems(bad) == ["aws:ec2/instance:Instance: amiId", "aws:ebs/volume:Volume: sizeGb"])


# ------------------------------------------------------------------ plan vs plan


def test_identical_plans_show_no_changes(tally):
    d = pd.diff_plans(base_plan(), base_plan(), TABLE)
    tally.check(d["resources"]["changed"] == [] and d["resources"]["flags"] == [] and d["cost"]["delta"] == 0)
    tally.check("No changes." in pd.markdown(d))


def test_instance_type_change_restarts_and_costs(tally):
    new = base_plan()
    res(new, "prod-app-1-instance")["inputs"]["instanceType"] = "m7i.2xlarge"
    reprice(new)
    d = pd.diff_plans(base_plan(), new, TABLE)
    c = changed(d)["prod-app-1-instance"]
    tally.check(c["action"] == "restart" and c["restart_keys"] == ["instanceType"], c)
    tally.check([f["resource"] for f in flags(d, "warning")] == ["prod-app-1-instance"])
    tally.check(d["cost"]["delta"] > 0 and d["cost"]["classes"][0]["class"] == "ec2_instances", d["cost"])
    md = pd.markdown(d)
    tally.check("restart (stop/start)" in md and "ec2_instances" in md and "+" in md)


def test_user_data_change_replaces_web_app_hosts_and_is_ignored_on_stateful_ones(tally):
    new = base_plan()
    for n in ("prod-app-2-instance", "prod-data-2-instance"):
        res(new, n)["inputs"]["userDataBase64"] = "sha256:" + "0" * 64
    d = pd.diff_plans(base_plan(), new, TABLE)
    c = changed(d)
    tally.check(c["prod-app-2-instance"]["action"] == "replace", "userDataReplaceOnChange: true replaces")
    tally.check(c["prod-data-2-instance"]["action"] == "none" and c["prod-data-2-instance"]["ignored"] == ["userDataBase64"])
    tally.check(any(f["level"] == "info" and f["resource"] == "prod-data-2-instance" for f in flags(d)))


def test_ami_change_on_an_ignoring_host_is_flagged_not_applied(tally):
    new = base_plan()
    res(new, "prod-lb-1-instance")["inputs"]["ami"] = "ami-0123456789abcdef0"
    res(new, "prod-app-1-instance")["inputs"]["ami"] = "ami-0123456789abcdef0"
    d = pd.diff_plans(base_plan(), new, TABLE)
    c = changed(d)
    # every host ignores a new image: it arrives only through tools/rolling.py --ami
    tally.check(c["prod-lb-1-instance"]["action"] == "none" and c["prod-app-1-instance"]["action"] == "none", c)
    tally.check(c["prod-app-1-instance"]["ignored"] == ["ami"], c["prod-app-1-instance"])


def test_the_amis_new_hosts_boot_are_shown_prominently_and_a_move_is_flagged(tally):
    base = base_plan()
    tally.check(set(base["amis"]) == {"x86_64"} and base["amis"]["x86_64"]["source"].startswith(
        "resolved at preview from /aws/service/canonical/ubuntu/server/24.04/"), base["amis"])
    same = pd.markdown(pd.diff_plans(base_plan(), base_plan(), TABLE))
    ami = base["amis"]["x86_64"]["id"]
    tally.check(f"**AMIs new hosts boot**: x86_64 **`{ami}`**" in same, same[:600])
    tally.check(same.index("**AMIs new hosts boot**") < same.index("No changes."), "before everything else")
    new = base_plan()
    new["amis"]["x86_64"] = {"id": "ami-0123456789abcdef0", "source": "pinned"}
    text = pd.markdown(pd.diff_plans(base_plan(), new, TABLE))
    tally.check(f"x86_64: `{ami}` → `ami-0123456789abcdef0`" in text and "tools/rolling.py --ami" in text, text[:900])


def test_replacing_a_stateful_resource_is_a_danger_flag(tally):
    new = base_plan()
    res(new, "prod-data-1-data")["inputs"]["encrypted"] = False
    d = pd.diff_plans(base_plan(), new, TABLE)
    danger = flags(d, "danger")
    tally.check([f["resource"] for f in danger] == ["prod-data-1-data"], danger)
    tally.check("protected" in danger[0]["what"], "a protected resource cannot be replaced: pulumi up refuses")
    tally.check("🛑" in pd.markdown(d))
    new = base_plan()
    res(new, "prod-data-1-data")["inputs"]["size"] = 800  # grows in place
    d = pd.diff_plans(base_plan(), new, TABLE)
    tally.check(changed(d)["prod-data-1-data"]["action"] == "update" and flags(d, "danger") == [])


def test_a_replaced_subnet_cascades_to_what_sits_in_it(tally):
    new = base_plan()
    res(new, "prod-internal-a")["inputs"]["cidrBlock"] = "10.40.7.0/24"
    d = pd.diff_plans(base_plan(), new, TABLE)
    c = changed(d)
    tally.check(c["prod-internal-a"]["action"] == "replace")
    for n in ("prod-app-1-eni", "prod-data-3-eni", "prod-slurm-2-eni", "prod-storage-efs-mt-a"):
        tally.check(n in c and c[n]["action"] == "replace" and "prod-internal-a" in (c[n]["cause"] or ""), n)
    for n in ("prod-app-1-instance", "prod-data-3-instance"):
        tally.check(c.get(n, {}).get("action") == "replace" and "-eni is replaced" in (c[n]["cause"] or ""), n)
    tally.check("prod-data-3-instance" in [f["resource"] for f in flags(d, "danger")], "a data host is replaced")
    tally.check("prod-app-2-instance" not in c, "hosts in other subnets are untouched")


def test_stateful_hosts_of_one_role_restarting_together_is_flagged(tally):
    new = base_plan()
    for n in ("prod-data-1-instance", "prod-data-2-instance"):
        res(new, n)["inputs"]["instanceType"] = "m7i.2xlarge"
    d = pd.diff_plans(base_plan(), new, TABLE)
    tally.check(any("2 data hosts" in f["what"] for f in flags(d, "danger")), flags(d))


def test_removed_resources_and_matrix_cells_and_hosts(tally):
    old = base_plan()
    new = base_plan()
    new["resources"] = [r for r in new["resources"] if r["name"] != "prod-mon-1-data"]
    cell = {"direction": "ingress", "group": "data", "peer": "monitoring", "ports": "tcp/9999", "port_name": "x"}
    new["security_matrix"]["cells"].append(cell)
    removed_cell = new["security_matrix"]["cells"].pop(0)
    new["hosts"]["app-4"] = copy.deepcopy(new["hosts"]["app-3"])
    new["hosts"]["app-1"]["files"]["/etc/hpc/new.conf"] = "0" * 64
    d = pd.diff_plans(old, new, TABLE)
    tally.check([r["name"] for r in d["resources"]["removed"]] == ["prod-mon-1-data"])
    tally.check(any(f["what"].startswith("deletes a stateful") for f in flags(d, "danger")))
    tally.check(d["security_matrix"]["added"] == [cell] and d["security_matrix"]["removed"] == [removed_cell])
    tally.check(d["hosts"]["added"] == ["app-4"] and d["hosts"]["changed"]["app-1"]["files"]["added"] == ["/etc/hpc/new.conf"])
    md = pd.markdown(d)
    tally.check("tcp/9999" in md and "`app-4`" in md and "prod-mon-1-data" in md)


def test_rendered_file_diffs_are_unified_and_grouped_by_identical_change(tally):
    old = {h: {"/etc/haproxy/haproxy.cfg": "global\n  maxconn 100\n", "/etc/x": "same\n"} for h in ("lb-1", "lb-2")}
    new = copy.deepcopy(old)
    for h in new:
        new[h]["/etc/haproxy/haproxy.cfg"] = "global\n  maxconn 200\n"
    new["lb-2"]["/etc/y"] = "\n".join(f"line {i}" for i in range(100)) + "\n"
    files = pd.file_diffs(old, new, {}, [])
    tally.check([(f["kind"], f["path"], f["hosts"]) for f in files]
                == [("changed", "/etc/haproxy/haproxy.cfg", ["lb-1", "lb-2"]), ("added", "/etc/y", ["lb-2"])], files)
    tally.check("-  maxconn 100\n+  maxconn 200\n" in files[0]["diff"] and files[0]["diff"].startswith("--- a/etc/haproxy"))
    tally.check("more lines" in files[1]["diff"], "a new file is shown by its start only")
    d = pd.diff_plans(base_plan(), base_plan(), TABLE, old, new)
    small = pd.markdown(d, max_chars=600)
    tally.check(len(small) <= 600, len(small))
    tally.check("maxconn 200" in pd.markdown(d))


def test_diffing_two_plan_files_from_the_command_line(tmp_path, tally):
    new = base_plan()
    res(new, "prod-lb-2-instance")["inputs"]["instanceType"] = "c7i.2xlarge"
    (tmp_path / "a.json").write_text(planmod.dumps(base_plan()))
    (tmp_path / "b.json").write_text(planmod.dumps(new))
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "plan_diff.py"), "--old", str(tmp_path / "a.json"),
                        "--new", str(tmp_path / "b.json"), "--fail-on-danger"], capture_output=True, text=True, cwd=ROOT)
    tally.check(p.returncode == 0 and "prod-lb-2-instance" in p.stdout and "restart" in p.stdout, p.stderr[-1000:])
    res(new, "prod-storage-efs")["inputs"]["performanceMode"] = "maxIO"
    (tmp_path / "b.json").write_text(planmod.dumps(new))
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "plan_diff.py"), "--old", str(tmp_path / "a.json"),
                        "--new", str(tmp_path / "b.json"), "--fail-on-danger"], capture_output=True, text=True, cwd=ROOT)
    tally.check(p.returncode == 3 and "prod-storage-efs" in p.stdout, "a danger flag fails with --fail-on-danger")


# ----------------------------------------------------------------------- end to end


def _worktrees() -> list[str]:
    out = subprocess.run(["git", "worktree", "list", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.startswith("worktree ")]


def test_plan_diff_against_head_end_to_end(tmp_path, tally):
    before = _worktrees()
    out = tmp_path / "diff.md"
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "plan_diff.py"), "--base", "HEAD", "--stack", "dev",
                        "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    tally.check(p.returncode == 0, p.stderr[-3000:])
    md = out.read_text()
    tally.check(md.startswith("## Plan diff: stack `dev` (`HEAD`") and "working tree" in md, md[:300])
    tally.check(re.search(r"\*\*\d+ to add, \d+ to change, \d+ to remove\*\*", md) or "No changes." in md, md[:500])
    tally.check("could not be built" not in md, "both trees rendered their files")
    tally.check(p.stdout.strip() == md.strip(), "the same report on stdout (for $GITHUB_STEP_SUMMARY)")
    tally.check(_worktrees() == before, "the temporary worktree is removed")


def test_an_unknown_base_ref_is_a_clear_error(tally):
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "plan_diff.py"), "--base", "no-such-ref-0000", "--stack", "dev"],
                       capture_output=True, text=True, cwd=ROOT)
    tally.check(p.returncode != 0 and "cannot resolve BASE" in p.stderr, p.stderr[-500:])


def test_workflow_and_makefile_agree_on_the_report_path(tally):
    wf = yaml.safe_load((ROOT / ".github" / "workflows" / "pr.yml").read_text())
    steps = "\n".join(str(s.get("run", "")) for s in wf["jobs"]["checks"]["steps"])
    tally.check("build/plan-diff-prod.md" in steps and "make plan-diff" in steps)
