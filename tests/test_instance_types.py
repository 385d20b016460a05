"""components/data/instance_types.json, which the config model checks instance types
against without calling AWS, is exactly what tools/update_instance_types.py makes of the
installed moto's copy of EC2's DescribeInstanceTypes data: after a moto upgrade, rerun it."""

from __future__ import annotations

import json

from tools import update_instance_types as uit


def test_committed_instance_types_are_the_build_of_moto_data():
    built = uit.build()
    assert len(built) > 500 and built["m7g.large"] == {"archs": ["arm64"], "auto_recovery": True, "memory_mib": 8192,
                                                       "vcpus": 2}, "moto's data was read"
    assert uit.OUT.read_text() == uit.render(built), (
        f"{uit.OUT} is stale for the installed moto: run .venv/bin/python tools/update_instance_types.py")


def test_the_rendered_table_is_the_json_it_claims():
    table = uit.build()
    assert json.loads(uit.render(table)) == table
    assert not any(name.endswith(".metal") for name in table), "bare metal types are left out"
