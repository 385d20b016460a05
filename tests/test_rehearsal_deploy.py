"""The rehearsal deploys the program's own output: `__main__.py` run against the AWS
stand-ins (moto), every instance's user-data byte for byte the program's, the values in
the hosts' files the ones the stand-ins describe, real secrets, and the hosts' nftables
from the security-group rules the program registered."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto import mock_aws

import components.security
import components.stack
from components.catalog import expand_matrix
from components.hostctx import Deployed
from rehearsal.awsd import tls_config
from rehearsal.deploy import StandIns, cross_check, deployment_record, host_files, instance_user_data, run_program
from rehearsal.layout import EIP_PUBLIC_IP, build_layout
from rehearsal.netns import host_rules, rules_from_security

REGION = "ap-northeast-2"
needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None, reason="needs root and nft")


# One moto for the module: each deploy is its own stack (its own SSM path, VPC, names), as
# several stacks share one AWS account.
@pytest.fixture(scope="module", autouse=True)
def stand_ins() -> Iterator[None]:
    with mock_aws():
        yield


def _deploy(stack: str = "prod") -> tuple[Any, Any, StandIns, dict[str, Any]]:
    layout = build_layout(stack, onprem="none")
    aws = StandIns(lambda svc: boto3.client(svc, region_name=REGION))
    run, mocks = run_program(stack, aws, REGION, EIP_PUBLIC_IP, secret_config=tls_config(layout.cfg, EIP_PUBLIC_IP))
    return run, mocks, aws, deployment_record(aws, run, REGION, "http://endpoint.invalid")


@pytest.fixture(scope="module")
def prod() -> tuple[Any, Any, StandIns, dict[str, Any]]:
    return _deploy("prod")


def test_every_instance_holds_the_programs_user_data_byte_for_byte(prod: Any) -> None:
    run, mocks, aws, record = prod
    instances = run.of_type("aws:ec2/instance:Instance")
    assert len(instances) == len(record["hosts"]) == 11
    checked = 0
    for res in instances:
        given = base64.b64decode(res.inputs["userDataBase64"])
        assert instance_user_data(aws, res.id) == given
        assert given[:2] == b"\x1f\x8b"  # the program's gzipped cloud-config, as prod gets it
        checked += 1
    assert checked == 11
    assert cross_check(aws, run, mocks, REGION) == []


def test_user_data_carries_nothing_that_exists_only_for_the_rehearsal(prod: Any) -> None:
    run, _mocks, aws, record = prod
    for name, h in record["hosts"].items():
        files = host_files(aws, instance_user_data(aws, h["instance_id"]))
        for path in ("/etc/hpc/stack.json", "/etc/hpc/eip.json", "/etc/hpc/galera.json"):
            if path in files:
                assert "aws_endpoint_url" not in json.loads(files[path]) or \
                    json.loads(files[path])["aws_endpoint_url"] is None, f"{name}:{path}"
        assert not any(b"10.255.0." in content for content in files.values()), name  # no stand-in address


def test_the_values_hosts_use_come_from_the_stand_ins(prod: Any) -> None:
    run, _mocks, aws, record = prod
    fs = aws("efs").describe_file_systems()["FileSystems"]
    assert [f["FileSystemId"] for f in fs] == [run.outputs["efs"]["id"]]
    aps = {a["AccessPointId"]: a["RootDirectory"]["Path"] for a in aws("efs").describe_access_points()["AccessPoints"]}
    assert {aps[i]: n for n, i in run.outputs["efs"]["access_points"].items()} == \
        {"/data": "data", "/dist": "dist", "/slurm": "slurm"}
    addr = aws("ec2").describe_addresses(PublicIps=[EIP_PUBLIC_IP])["Addresses"][0]
    assert addr["AllocationId"] == record["eip"]["allocation_id"] and "AssociationId" not in addr  # allocated only
    buckets = {b["Name"] for b in aws("s3").list_buckets()["Buckets"]}
    assert set(record["buckets"].values()) <= buckets
    lb = record["hosts"]["lb-1"]
    eip = json.loads(host_files(aws, instance_user_data(aws, lb["instance_id"]))["/etc/hpc/eip.json"])
    assert (eip["allocation_id"], eip["public_ip"]) == (addr["AllocationId"], EIP_PUBLIC_IP)
    for name, h in record["hosts"].items():
        inst = aws("ec2").describe_instances(InstanceIds=[h["instance_id"]])["Reservations"][0]["Instances"][0]
        profile = inst["IamInstanceProfile"]["Arn"].rsplit("/", 1)[-1]
        roles = aws("iam").get_instance_profile(InstanceProfileName=profile)["InstanceProfile"]["Roles"]
        assert roles, f"{name}: its instance profile has a role"
        if "data" in h["roles"]:
            vol = aws("ec2").describe_volumes(VolumeIds=[h["data_volume_id"]])["Volumes"][0]
            assert vol["Attachments"][0]["InstanceId"] == h["instance_id"]


def test_a_miswired_value_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The program's wiring is what is checked: swapping the Elastic IP's allocation id and
    address where the program builds the hosts' deployed values must be reported."""
    class Swapped(Deployed):
        @classmethod
        def from_outputs(cls, outputs: Any) -> Deployed:
            d = Deployed.from_outputs(outputs)
            return dataclasses.replace(d, eip_allocation_id=d.eip_public_ip, eip_public_ip=d.eip_allocation_id)

    monkeypatch.setattr(components.stack, "Deployed", Swapped)
    run, mocks, aws, _record = _deploy("dev")
    problems = cross_check(aws, run, mocks, REGION)
    assert any("eip.json" in p for p in problems), problems
    assert {p.split(":")[0] for p in problems if "eip.json" in p} == set(build_layout("dev").topo.role_hosts["lb"])


def test_generated_secrets_are_real(prod: Any) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    run, _mocks, aws, record = prod
    ssm = aws("ssm")
    names = record["secrets"]["parameters"]
    value = {k: ssm.get_parameter(Name=n, WithDecryption=True)["Parameter"]["Value"] for k, n in names.items()}
    assert len(value["redis_password"]) == 40 and value["redis_password"].isalnum()
    assert len({value[k] for k in ("redis_password", "mariadb_root_password", "mariadb_app_password")}) == 3
    munge = base64.b64decode(value["munge_key"])
    assert len(munge) == 1024 and len(set(munge[:64])) > 32  # random bytes, not a repeated digest
    cert = x509.load_pem_x509_certificate(value["tls_pem"].encode())
    key = serialization.load_pem_private_key(value["tls_pem"].split("-----END CERTIFICATE-----")[1].strip().encode(),
                                             password=None)
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "portal.hpc-portal.internal" in sans.get_values_for_type(x509.DNSName)


def test_security_groups_in_the_stand_in_are_the_matrix(prod: Any) -> None:
    """The rules the program registered, read back from EC2, give each host the same
    nftables as the reviewed matrix (so the rehearsal enforces what AWS would)."""
    _run, _mocks, _aws, record = prod
    layout = build_layout("prod", onprem="none")
    rules, groups = rules_from_security(layout, record["security"])
    assert len(rules) == len(expand_matrix(layout.cfg))
    checked = 0
    for h in layout.hosts:
        mine = {record["security"]["groups"][g] for g in record["security"]["interfaces"][h.ip]}
        assert mine == set(h.roles), h.name
        # Comments aside (the stand-in does not keep every rule's description), the same rules.
        assert _uncommented(host_rules(layout, h, rules, groups, mine)) == _uncommented(host_rules(layout, h)), h.name
        checked += 1
    assert checked == len(layout.hosts) == 11


def _uncommented(text: str) -> list[str]:
    return sorted(line.split(" comment ")[0].rstrip() for line in text.splitlines())


def _without_sentinel(cfg: Any, matrix: Any = None) -> Any:
    return [r for r in expand_matrix(cfg) if r.port_name != "sentinel"]


@pytest.fixture(scope="module")
def budget_without_sentinel() -> Iterator[dict[str, Any]]:
    mp = pytest.MonkeyPatch()
    mp.setattr(components.security, "expand_matrix", _without_sentinel)
    try:
        yield _deploy("budget")[3]
    finally:
        mp.undo()


def test_a_rule_removed_from_the_program_is_missing_in_the_hosts_rules(budget_without_sentinel: dict[str, Any]) -> None:
    layout = build_layout("budget", onprem="none")
    rules, groups = rules_from_security(layout, budget_without_sentinel["security"])
    data = layout.with_role("data")[0]
    text = host_rules(layout, data, rules, groups, set(data.roles))
    assert "dport 26379" not in text and "dport 6379" in text
    assert "dport 26379" in host_rules(layout, data)  # the matrix has it


@needs_root
def test_a_rule_removed_from_the_program_is_a_dropped_flow(prod: Any, budget_without_sentinel: dict[str, Any]) -> None:
    """An app host reaches a data host's Sentinel with the program's rules, and not with a
    program that lost the rule; the drop is recorded where `rehearsal status` shows it."""
    tag = f"rhd{os.getpid() % 10000}"
    a, d = f"{tag}a", f"{tag}d"

    def attempt(stack: str, record: dict[str, Any]) -> tuple[bool, str, str]:
        layout = build_layout(stack, onprem="none")
        app, data = layout.host("app-1"), layout.host("data-1")
        rules, groups = rules_from_security(layout, record["security"])
        for ns in (a, d):
            subprocess.run(["ip", "netns", "add", ns], check=True)
        try:
            subprocess.run(["ip", "-n", a, "link", "add", "ens5", "type", "veth", "peer", "name", "ens5", "netns", d],
                           check=True)
            for ns, h, other in ((a, app, data), (d, data, app)):
                subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
                subprocess.run(["ip", "-n", ns, "addr", "add", f"{h.ip}/32", "dev", "ens5"], check=True)
                subprocess.run(["ip", "-n", ns, "link", "set", "ens5", "up"], check=True)
                subprocess.run(["ip", "-n", ns, "route", "add", f"{other.ip}/32", "dev", "ens5"], check=True)
                subprocess.run(["nsenter", f"--net=/run/netns/{ns}", "nft", "-f", "-"],
                               input=host_rules(layout, h, rules, groups, set(h.roles)), text=True, check=True)
            server = subprocess.Popen(["nsenter", f"--net=/run/netns/{d}", sys.executable, "-c",
                                       "import socket;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
                                       f"s.bind(('{data.ip}',26379));s.listen();c,_=s.accept();c.send(b'ok')"])
            try:
                time.sleep(0.3)
                cp = subprocess.run(["nsenter", f"--net=/run/netns/{a}", sys.executable, "-c",
                                     f"import socket;s=socket.create_connection(('{data.ip}',26379),timeout=1.5);"
                                     "print(s.recv(2).decode())"], capture_output=True, text=True)
                drops = subprocess.run(["nsenter", f"--net=/run/netns/{a}", "nft", "list", "set", "inet", "rh_sg",
                                        "drop_out"], capture_output=True, text=True).stdout
                return cp.stdout.strip() == "ok", drops, data.ip
            finally:
                server.kill()
                server.wait()
        finally:
            for ns in (a, d):
                subprocess.run(["ip", "netns", "del", ns])

    ok, _, _ = attempt("prod", prod[3])
    assert ok, "the program's rules let the app tier reach Sentinel"
    ok, drops, data_ip = attempt("budget", budget_without_sentinel)
    assert not ok, "without the program's sentinel rule the connection must fail"
    assert f"{data_ip} . 26379" in drops
