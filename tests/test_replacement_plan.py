"""The replacement-plan model (tools/replacement_plan.py): from the program's resource
graph and tools/replacement_table.yaml, per role and kind of change, the exact steps a
change takes. It is what a deploy drill would apply and check its observed order against."""

from __future__ import annotations

import yaml

from tests.conftest import program_run
from tests.loadfile import load_tool

rp = load_tool("replacement_plan")
TABLE = yaml.safe_load(rp.TABLE_FILE.read_text())
_MODEL: dict = {}


def model() -> dict:
    if not _MODEL:
        _MODEL.update(rp.model(program_run("prod"), "prod", TABLE))
    return _MODEL


def test_the_table_reads_each_kind_of_instance_change_as_ec2_does(tally):
    web_app = {"userDataReplaceOnChange": True}
    stateful = {"userDataReplaceOnChange": False}
    tally.check(rp.instance_action(web_app, {"ignore_changes": ["ami"]}, "userDataBase64", TABLE) == "replace")
    tally.check(rp.instance_action(stateful, {"ignore_changes": []}, "userDataBase64", TABLE) == "restart")
    tally.check(rp.instance_action(stateful, {"ignore_changes": ["user_data_base64"]}, "userDataBase64", TABLE) == "ignored")
    tally.check(rp.instance_action(web_app, {"ignore_changes": []}, "instanceType", TABLE) == "restart")
    tally.check(rp.instance_action(web_app, {"ignore_changes": []}, "ami", TABLE) == "replace")
    tally.check(rp.instance_action(web_app, {"ignore_changes": ["ami"]}, "ami", TABLE) == "ignored")


def test_an_app_template_change_is_one_host_at_a_time_with_drain_and_gate(tally):
    app = model()["app"]["template"]
    tally.check(app["mechanism"] == "pulumi up" and app["action"] == "replace", app)
    expected = [[f"prod-{h}-{x}"] for h in ("app-1", "app-2", "app-3")
                for x in ("lb-drain", "instance", "gate-ready", "lb-ready")]
    tally.check(app["steps"] == expected, app["steps"])
    tally.check(model()["web"]["template"]["steps"] == expected, "web runs on the app hosts in prod")
    itype = model()["app"]["instance_type"]
    tally.check(itype["action"] == "restart" and itype["steps"] == expected, "a new type drains and gates each host too")


def test_stateful_roles_take_templates_and_every_role_images_only_through_rolling(tally):
    m = model()
    for role in ("lb", "data", "slurm", "monitoring"):
        t = m[role]["template"]
        tally.check(t["action"] == "ignored" and t["mechanism"] == "tools/rolling.py", (role, t))
        replaces = [s for (s,) in t["steps"] if s.endswith("(replace)")]
        tally.check(len(replaces) == len(t["hosts"]), f"{role}: one replacement per host")
    data = [s for (s,) in m["data"]["template"]["steps"] if s.startswith("data-1:")]
    tally.check(data == ["data-1: pulumi", "data-1: pulumi (replace)", "data-1: gate", "data-1: pulumi"], data)
    for role, changes in m.items():
        tally.check(changes["ami"]["mechanism"] == "tools/rolling.py --ami", role)


def test_the_model_names_what_a_plain_up_would_do_to_stateful_hosts(tally):
    """An instance-type change is applied in place (stop/start) and the graph does not
    order the data hosts among themselves: the model says so and names the roll."""
    data = model()["data"]["instance_type"]
    tally.check(data["action"] == "restart" and not data["one_at_a_time"], data)
    tally.check("tools/rolling.py --role data" in data["warning"], data)
