"""tools/rolling.py: one host at a time, drained first for web/app, protection lifted
only for the host being replaced, and a failed gate stops the roll."""

from __future__ import annotations

import pytest

from tests.loadfile import load_tool

rolling = load_tool("rolling")


REPLACE = ["--target-dependents", "--replace"]


def _replaces(step) -> bool:
    return step.kind == "pulumi" and "--replace" in step.argv


def test_web_app_hosts_are_drained_replaced_gated_and_readied_in_turn(tally):
    steps = rolling.plan("prod", "app")
    order = [(s.host, s.kind) for s in steps]
    for host in ("app-1", "app-2", "app-3"):
        mine = [k for h, k in order if h == host]
        tally.check(mine == ["drain", "drain", "pulumi", "gate", "ready", "ready"], (host, mine))
    hosts_in_order = [h for h, _ in order]
    tally.check(hosts_in_order == sorted(hosts_in_order, key=lambda h: int(h.split("-")[1])), "one host at a time")
    drains = [s for s in steps if s.kind == "drain" and s.host == "app-1"]
    tally.check([d.argv[0] for d in drains] == ["lb-1", "lb-2"], "every LB")
    for d in drains:
        via = d.via
        tally.check(via[:2] == ["python3", "tools/gate.py"] and via[via.index("--lb-state") + 1] == "drain")
        tally.check(via[via.index("--lb-hosts") + 1] == d.argv[0] and via[via.index("--stack") + 1] == "prod", via)
        servers = via[via.index("--servers") + 1].split(",")
        tally.check("be_api/app-1-5010" in servers and "be_web/app-1" in servers, servers)
        tally.check("set server $s state drain" in d.argv[1] and "be_web/app-1" in d.argv[1], d.argv[1])
    replace = next(s for s in steps if s.kind == "pulumi")
    tally.check(all(a in replace.argv for a in REPLACE), replace.show())
    tally.check(replace.env == {"HPC_ROLL_HOST": "app-1", "HPC_ROLL_STEP": "replace"}, replace.env)


def test_exact_steps_per_role(tally):
    """Every role: one replacement per host, a gate right after it, and only data hosts
    (termination protection) get the unprotect step before and the restore after."""
    expected = {
        "app": ["drain", "drain", "replace", "gate", "ready", "ready"],
        "lb": ["replace", "gate"],
        "data": ["unprotect", "replace", "gate", "protect"],
        "slurm": ["replace", "gate"],
        "monitoring": ["replace", "gate"],
    }

    def label(s) -> str:
        if s.kind != "pulumi":
            return s.kind
        if "--replace" in s.argv:
            return "replace"
        return "unprotect" if s.env.get("HPC_ROLL_STEP") == "unprotect" else "protect"

    for role, kinds in expected.items():
        steps = rolling.plan("prod", role)
        hosts = list(dict.fromkeys(s.host for s in steps))
        tally.check(len(hosts) >= 1, role)
        for h in hosts:
            mine = [s for s in steps if s.host == h]
            tally.check([label(s) for s in mine] == kinds, (role, h, [label(s) for s in mine]))
            tally.check(sum(_replaces(s) for s in mine) == 1, f"{h}: exactly one replacement")
            if "unprotect" in kinds:
                first = mine[0]
                tally.check(first.env == {"HPC_ROLL_HOST": h, "HPC_ROLL_STEP": "unprotect"}
                            and "--replace" not in first.argv and "--target-dependents" not in first.argv,
                            "the first step only lifts termination protection")
                tally.check(mine[-1].env == {} and "--replace" not in mine[-1].argv, "protection restored")


def test_ami_flag_lets_the_replaced_host_take_the_image(tally):
    for role in ("app", "data"):
        for s in rolling.plan("prod", role, ami=True):
            if s.kind == "pulumi":
                tally.check((s.env.get("HPC_ROLL_AMI") == "1") == _replaces(s), s.show())


def test_put_back_readies_a_drained_host_on_every_lb(tally):
    steps = rolling.plan("prod", put_back="app-2")
    tally.check([(s.kind, s.argv[0]) for s in steps] == [("ready", "lb-1"), ("ready", "lb-2")], steps)
    tally.check(all("--lb-state" in s.via and "ready" in s.via for s in steps), [s.show() for s in steps])
    with pytest.raises(SystemExit):
        rolling.plan("prod", put_back="data-1")


def test_unprotect_step_under_the_program_changes_only_protection(tally):
    """What the first step's `pulumi up` would apply to the data host: protection
    lifted, user-data and AMI still ignored, so no in-place stop/start and no replacement."""
    from tests.conftest import program_run

    base = {r.inputs["tags"]["Name"]: r for r in program_run("prod").of_type("aws:ec2/instance:Instance")}
    run = program_run("prod", env={"HPC_ROLL_HOST": "data-1", "HPC_ROLL_STEP": "unprotect"})
    inst = {r.inputs["tags"]["Name"]: r for r in run.of_type("aws:ec2/instance:Instance")}
    d1 = inst["data-1"]
    tally.check(d1.opts["ignore_changes"] == ["ami", "user_data_base64"], d1.opts)
    changed = {k for k in d1.inputs if d1.inputs[k] != base["data-1"].inputs[k]}
    tally.check(changed == {"disableApiTermination"}, changed)


def test_a_failed_gate_stops_the_roll(tally, capsys):
    steps = rolling.plan("prod", "data")
    ran = []

    def run(step):
        ran.append(step)
        return 1 if (step.kind == "gate" and step.host == "data-1") else 0

    tally.check(rolling.execute(steps, run) == 1)
    tally.check(all(s.host == "data-1" for s in ran), "later hosts were touched")
    tally.check("later hosts untouched" in capsys.readouterr().err)


def test_roll_host_lifts_termination_protection_for_that_host_only(tally):
    from tests.conftest import program_run

    run = program_run("prod", env={"HPC_ROLL_HOST": "data-2"})
    for r in run.of_type("aws:ec2/instance:Instance"):
        name = r.inputs["tags"]["Name"]
        if name.startswith("data-"):
            tally.check(r.inputs["disableApiTermination"] is (name != "data-2"), name)
