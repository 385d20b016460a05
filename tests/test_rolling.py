"""tools/rolling.py: one host at a time, drained first for web/app, protection lifted
only for the host being replaced, and a failed gate stops the roll."""

from __future__ import annotations

from tests.loadfile import load_tool

rolling = load_tool("rolling")


def test_web_app_hosts_are_drained_replaced_gated_and_readied_in_turn(tally):
    steps = rolling.plan("prod", "app")
    order = [(s.host, s.kind) for s in steps]
    for host in ("app-1", "app-2", "app-3"):
        mine = [k for h, k in order if h == host]
        tally.check(mine == ["drain", "drain", "pulumi", "gate", "ready", "ready"], (host, mine))
    hosts_in_order = [h for h, _ in order]
    tally.check(hosts_in_order == sorted(hosts_in_order, key=lambda h: int(h.split("-")[1])), "one host at a time")
    drain = next(s for s in steps if s.kind == "drain")
    tally.check("set server be_api/app-1-5010 state drain" in drain.argv[1] and "be_web/app-1" in drain.argv[1])
    replace = next(s for s in steps if s.kind == "pulumi")
    tally.check("--replace" in replace.argv and replace.env == {}, replace.show())


def test_stateful_hosts_lift_protection_only_for_themselves_and_restore_it(tally):
    steps = rolling.plan("prod", "data")
    for host in ("data-1", "data-2", "data-3"):
        mine = [s for s in steps if s.host == host]
        tally.check([s.kind for s in mine] == ["pulumi", "pulumi", "gate", "pulumi"], host)
        tally.check(mine[0].env == {"HPC_ROLL_HOST": host} and "--replace" not in mine[0].argv)
        tally.check(mine[1].env == {"HPC_ROLL_HOST": host} and "--replace" in mine[1].argv)
        tally.check(mine[3].env == {} and "--replace" not in mine[3].argv, "protection restored")


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
