"""hpc-eip-takeover moves the portal's Elastic IP to the keepalived master.

EC2 is moto (mock_aws in-process; ThreadedMotoServer for the endpoint override), the
instance metadata service is a small IMDSv2 stand-in on 127.0.0.1 that, like AWS with
http_tokens=required, answers nothing without a session token. The script's own main()
runs against both, as keepalived's notify_master would run it.
"""

from __future__ import annotations

import ast
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws
from moto.server import ThreadedMotoServer

from tests.loadfile import load_file

SCRIPT = Path(__file__).resolve().parent.parent / "cloud_init" / "scripts" / "hpc-eip-takeover"
REGION = "ap-northeast-2"
TOKEN = "fake-imds-session-token"


# ---- the IMDSv2 stand-in --------------------------------------------------------------

class FakeImds:
    """Answers like IMDS with tokens required; `instance` says which instance asks."""

    def __init__(self) -> None:
        self.instances: dict[str, dict[str, str]] = {}
        self.current = ""
        self.token_enabled = True
        self.log: list[tuple[str, str, bool]] = []  # (method, path, carried the token)
        imds = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def _send(self, code: int, body: str = "") -> None:
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self) -> None:
                imds.log.append(("PUT", self.path, False))
                if self.path != "/latest/api/token":
                    return self._send(404)
                if not imds.token_enabled:
                    return self._send(403)
                if not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    return self._send(400)
                self._send(200, TOKEN)

            def do_GET(self) -> None:
                has_token = self.headers.get("X-aws-ec2-metadata-token") == TOKEN
                imds.log.append(("GET", self.path, has_token))
                if not has_token:
                    return self._send(401)
                inst = imds.instances.get(imds.current)
                if inst is None:  # no instance is asking: an answer, not a dropped connection
                    return self._send(404)
                prefix = "/latest/meta-data/"
                paths = {
                    "instance-id": inst["instance_id"],
                    "mac": inst["mac"],
                    f"network/interfaces/macs/{inst['mac']}/interface-id": inst["eni"],
                }
                key = self.path[len(prefix):] if self.path.startswith(prefix) else None
                if key not in paths:
                    return self._send(404)
                self._send(200, paths[key])

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---- fixtures -------------------------------------------------------------------------

@pytest.fixture
def imds() -> Iterator[FakeImds]:
    fake = FakeImds()
    yield fake
    fake.stop()


@pytest.fixture
def takeover(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, imds: FakeImds, fake_aws: None) -> ModuleType:
    """The script as a module, pointed at the fake IMDS, sleeping recorded instead of done."""
    monkeypatch.setenv("HPC_IMDS_URL", imds.url)
    monkeypatch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")  # fast moto start; any AMI id is accepted
    mod: Any = load_file(SCRIPT)
    mod.IMDS_URL_FILE = str(tmp_path / "no-imds-url")
    mod.AWS_ENDPOINT_FILE = str(tmp_path / "no-aws-endpoint")
    mod.SYSLOG_SOCKET = str(tmp_path / "no-syslog")
    mod.IDENTITY_FILE = str(tmp_path / "instance-identity.json")  # never this machine's /run/hpc
    mod.sleeps = []
    mod.clock = [0.0]  # a fake monotonic clock: each recorded sleep advances it

    def sleep(seconds: float) -> None:
        mod.sleeps.append(seconds)
        mod.clock[0] += seconds

    mod._sleep = sleep
    mod._clock = lambda: mod.clock[0]
    return mod


def make_world(ec2: Any, imds: FakeImds) -> dict[str, Any]:
    """A VPC with two load balancer instances (A, B) and an unassociated Elastic IP."""
    vpc = ec2.create_vpc(CidrBlock="10.40.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.40.0.0/24")["Subnet"]["SubnetId"]
    image = "ami-12c6146b"
    world: dict[str, Any] = {}
    for name in ("A", "B"):
        inst = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, SubnetId=subnet,
                                 InstanceType="c7i.xlarge")["Instances"][0]
        nic = inst["NetworkInterfaces"][0]
        imds.instances[name] = {"instance_id": inst["InstanceId"], "mac": nic["MacAddress"],
                                "eni": nic["NetworkInterfaceId"]}
        world[name] = nic["NetworkInterfaceId"]
    world["alloc"] = ec2.allocate_address(Domain="vpc")["AllocationId"]
    return world


def write_config(tmp: Path, alloc: str, **extra: str) -> Path:
    cfg = tmp / "eip.json"
    cfg.write_text(json.dumps({"allocation_id": alloc, "region": REGION, "public_ip": "203.0.113.10", **extra}))
    return cfg


def eip_eni(ec2: Any, alloc: str) -> str | None:
    """The interface the EIP is on, None when unassociated (moto answers "" for that)."""
    return ec2.describe_addresses(AllocationIds=[alloc])["Addresses"][0].get("NetworkInterfaceId") or None


def assoc_id(ec2: Any, alloc: str) -> str | None:
    return ec2.describe_addresses(AllocationIds=[alloc])["Addresses"][0].get("AssociationId") or None


@pytest.fixture
def aws(takeover: ModuleType, imds: FakeImds, tmp_path: Path) -> Iterator[dict[str, Any]]:
    with mock_aws():
        ec2 = boto3.client("ec2", region_name=REGION)
        world = make_world(ec2, imds)
        world["ec2"] = ec2
        world["cfg"] = write_config(tmp_path, world["alloc"])
        world["state"] = tmp_path / "run" / "vrrp-state"
        world["imds"] = imds
        yield world


def run(takeover: ModuleType, aws: dict[str, Any], *args: str) -> int:
    """One call as on the LB the fake IMDS currently answers for (its own identity file:
    one host's ids never change)."""
    ident = aws["state"].parent / f"identity-{aws['imds'].current}.json"
    return takeover.main([*args, "--config", str(aws["cfg"]), "--state-file", str(aws["state"]),
                          "--identity-file", str(ident)])


# ---- moving the address ---------------------------------------------------------------

def test_the_eip_follows_the_master_from_a_to_b_and_back(takeover: ModuleType, imds: FakeImds,
                                                         aws: dict[str, Any]) -> None:
    ec2, alloc = aws["ec2"], aws["alloc"]
    assert eip_eni(ec2, alloc) is None
    for who in ("A", "B", "A"):
        imds.current = who
        assert run(takeover, aws, "--reason", "master") == 0
        assert eip_eni(ec2, alloc) == aws[who]
        assert aws["state"].read_text().strip() == "MASTER"
    assert takeover.sleeps == []


def test_an_eip_already_here_is_not_reassociated(takeover: ModuleType, imds: FakeImds,
                                                 aws: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    imds.current = "B"
    assert run(takeover, aws, "--reason", "master") == 0
    first = assoc_id(aws["ec2"], aws["alloc"])
    assert first
    assert run(takeover, aws, "--reason", "master") == 0
    assert assoc_id(aws["ec2"], aws["alloc"]) == first
    assert "already on" in capsys.readouterr().err


def _fail_calls(takeover: ModuleType, monkeypatch: pytest.MonkeyPatch, code: str, times: int) -> list[str]:
    """Make the script's AssociateAddress calls fail `times` times with `code`."""
    calls: list[str] = []
    real_client = takeover.ec2_client

    def client(region: str, endpoint: str | None) -> Any:
        c = real_client(region, endpoint)

        def before_call(**kwargs: Any) -> None:
            calls.append("AssociateAddress")
            if len(calls) <= times:
                raise ClientError({"Error": {"Code": code, "Message": "injected"}}, "AssociateAddress")

        c.meta.events.register("before-call.ec2.AssociateAddress", before_call)
        return c

    monkeypatch.setattr(takeover, "ec2_client", client)
    return calls


def test_a_transient_api_failure_is_retried_with_backoff(takeover: ModuleType, imds: FakeImds,
                                                         aws: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fail_calls(takeover, monkeypatch, "RequestLimitExceeded", times=2)
    imds.current = "A"
    assert run(takeover, aws, "--reason", "master") == 0
    assert eip_eni(aws["ec2"], aws["alloc"]) == aws["A"]
    assert len(calls) == 3
    # full jitter: the n-th wait is at most min(4, 0.5 * 2**n) seconds
    assert len(takeover.sleeps) == 2 and all(0 <= s <= c for s, c in zip(takeover.sleeps, (0.5, 1.0), strict=True))


def test_retries_are_bounded_and_end_in_exit_code_3(takeover: ModuleType, imds: FakeImds,
                                                    aws: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fail_calls(takeover, monkeypatch, "RequestLimitExceeded", times=100)
    imds.current = "A"
    assert run(takeover, aws, "--reason", "master") == 3
    assert eip_eni(aws["ec2"], aws["alloc"]) is None
    # bounded by the deadline, not by a count: the last attempt starts at the deadline
    assert takeover.EIP_DEADLINE_S == 45.0 and len(calls) == len(takeover.sleeps) + 1 > 5
    assert sum(takeover.sleeps) == pytest.approx(takeover.EIP_DEADLINE_S)
    assert max(takeover.sleeps) <= 4.0


def test_a_permanent_api_error_is_not_retried(takeover: ModuleType, imds: FakeImds,
                                              aws: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fail_calls(takeover, monkeypatch, "UnauthorizedOperation", times=100)
    imds.current = "A"
    assert run(takeover, aws, "--reason", "master") == 3
    assert len(calls) == 1 and takeover.sleeps == []


# ---- IMDSv2 ---------------------------------------------------------------------------

def test_the_imds_stand_in_refuses_requests_without_a_token(imds: FakeImds) -> None:
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{imds.url}/latest/meta-data/instance-id", timeout=2)
    assert e.value.code == 401


def test_every_metadata_request_carries_the_session_token(takeover: ModuleType, imds: FakeImds,
                                                          aws: dict[str, Any]) -> None:
    imds.current = "B"
    assert run(takeover, aws, "--reason", "master") == 0
    gets = [entry for entry in imds.log if entry[0] == "GET"]
    assert len(gets) == 3
    assert all(has_token for _, _, has_token in gets)
    assert imds.log[0][:2] == ("PUT", "/latest/api/token")


def test_a_standby_reads_its_identity_before_it_is_promoted_and_the_takeover_reads_none(
        takeover: ModuleType, imds: FakeImds, aws: dict[str, Any]) -> None:
    """Instance id and primary interface cannot change while the instance runs: the
    periodic --reconcile on a BACKUP reads them once, and the takeover after a promotion
    goes straight to EC2 (four metadata round trips off the critical path; the ec2-api
    drill with every call 2 s late took 28 s with them)."""
    imds.current = "B"
    aws["state"].parent.mkdir(parents=True, exist_ok=True)
    aws["state"].write_text("BACKUP\n")
    assert run(takeover, aws, "--reconcile") == 0
    assert [m for m, _, _ in imds.log] == ["PUT", "GET", "GET", "GET"]
    imds.log.clear()
    assert run(takeover, aws, "--reconcile") == 0  # kept: nothing read again
    assert imds.log == []
    assert run(takeover, aws, "--reason", "master") == 0
    assert eip_eni(aws["ec2"], aws["alloc"]) == aws["B"] and imds.log == []
    # A damaged file is read again from metadata, not trusted.
    ident = aws["state"].parent / "identity-B.json"
    ident.write_text('{"instance_id": ""}')
    assert run(takeover, aws, "--reason", "master") == 0
    assert [m for m, _, _ in imds.log] == ["PUT", "GET", "GET", "GET"]
    assert json.loads(ident.read_text())["interface_id"] == aws["B"]


def test_without_a_token_nothing_moves_and_exit_code_is_2(takeover: ModuleType, imds: FakeImds,
                                                          aws: dict[str, Any]) -> None:
    imds.current = "A"
    imds.token_enabled = False
    assert run(takeover, aws, "--reason", "master") == 2
    assert eip_eni(aws["ec2"], aws["alloc"]) is None
    assert [m for m, _, _ in imds.log] == ["PUT"]  # no IMDSv1 fallback


# ---- modes ----------------------------------------------------------------------------

def test_backup_fault_and_stop_record_the_state_and_leave_the_eip(takeover: ModuleType, imds: FakeImds,
                                                                  aws: dict[str, Any]) -> None:
    imds.current = "A"
    assert run(takeover, aws, "--reason", "master") == 0
    imds.log.clear()
    imds.current = "B"
    for reason in ("backup", "fault", "stop"):
        assert run(takeover, aws, "--reason", reason) == 0
        assert aws["state"].read_text().strip() == reason.upper()
    # B's identity is read once (keepalived enters BACKUP as it starts), then kept
    assert [m for m, _, _ in imds.log] == ["PUT", "GET", "GET", "GET"]
    assert eip_eni(aws["ec2"], aws["alloc"]) == aws["A"]


def test_boot_associates_only_on_the_master_unless_forced(takeover: ModuleType, imds: FakeImds,
                                                          aws: dict[str, Any]) -> None:
    ec2, alloc = aws["ec2"], aws["alloc"]
    imds.current = "A"
    assert run(takeover, aws, "--boot") == 0  # no state yet (keepalived has not decided)
    assert eip_eni(ec2, alloc) is None
    # ... but the identity is read now, so a later promotion goes straight to EC2
    assert [m for m, _, _ in imds.log] == ["PUT", "GET", "GET", "GET"]
    ident = aws["state"].parent / "identity-A.json"
    assert json.loads(ident.read_text()) == {"instance_id": imds.instances["A"]["instance_id"],
                                             "interface_id": aws["A"]}
    imds.log.clear()
    aws["state"].parent.mkdir(parents=True, exist_ok=True)
    aws["state"].write_text("BACKUP\n")
    assert run(takeover, aws, "--boot") == 0
    assert eip_eni(ec2, alloc) is None
    assert run(takeover, aws, "--boot", "--force") == 0
    assert eip_eni(ec2, alloc) == aws["A"]
    imds.current = "B"
    aws["state"].write_text("MASTER\n")
    assert run(takeover, aws, "--boot") == 0
    assert eip_eni(ec2, alloc) == aws["B"]


def test_configuration_and_usage_errors_exit_1(takeover: ModuleType, aws: dict[str, Any], tmp_path: Path) -> None:
    assert takeover.main(["--reason", "master", "--config", str(tmp_path / "missing.json"),
                          "--state-file", str(aws["state"])]) == 1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"region": REGION}))
    assert takeover.main(["--reason", "master", "--config", str(bad), "--state-file", str(aws["state"])]) == 1
    assert takeover.main(["--reason", "sideways"]) == 1
    assert takeover.main(["--boot", "--reason", "master"]) == 1


# ---- endpoint and IMDS overrides (the rehearsal) ---------------------------------------

@pytest.mark.parametrize("via", ["env", "file", "eip.json"])
def test_endpoint_and_imds_overrides_reach_a_moto_server(takeover: ModuleType, imds: FakeImds, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch, via: str) -> None:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=endpoint)
        world = make_world(ec2, imds)
        extra = {}
        if via == "env":
            monkeypatch.setenv("HPC_AWS_ENDPOINT_URL", endpoint)
        elif via == "file":
            Path(takeover.AWS_ENDPOINT_FILE).write_text(endpoint + "\n")
            Path(takeover.IMDS_URL_FILE).write_text(imds.url + "\n")
            monkeypatch.delenv("HPC_IMDS_URL")
        else:
            extra["aws_endpoint_url"] = endpoint
        cfg = write_config(tmp_path, world["alloc"], **extra)
        imds.current = "B"
        assert takeover.main(["--reason", "master", "--config", str(cfg),
                              "--state-file", str(tmp_path / "state")]) == 0
        assert eip_eni(ec2, world["alloc"]) == world["B"]
        assert any(m == "GET" for m, _, _ in imds.log)
    finally:
        server.stop()


def test_steps_are_logged_to_syslog(takeover: ModuleType, imds: FakeImds, aws: dict[str, Any], tmp_path: Path) -> None:
    sock_path = tmp_path / "log.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(2)
    setattr(takeover, "SYSLOG_SOCKET", str(sock_path))  # noqa: B010 - a module attribute mypy cannot see
    # The host has an identity (the BACKUP notification reads it): a failing metadata
    # service would log a warning per retry, and more datagrams than the socket queues
    # (net.unix.max_dgram_qlen, 10 here) block the sender while nothing reads: the
    # suite hung here once.
    imds.current = "A"
    try:
        assert run(takeover, aws, "--reason", "backup") == 0
        messages = [sock.recv(4096).decode() for _ in range(2)]
    finally:
        sock.close()
    assert all("hpc-eip-takeover[" in m for m in messages)
    assert any("BACKUP" in m for m in messages)
    assert messages[0].startswith("<30>")  # daemon.info


# ---- the script file ------------------------------------------------------------------

def test_the_script_is_an_executable_python3_file_using_stdlib_and_boto3_only() -> None:
    text = SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/python3\n")
    assert os.access(SCRIPT, os.X_OK)
    modules = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            modules |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module.split(".")[0])
    assert modules, "no imports found"
    assert modules - set(sys.stdlib_module_names) == {"hpc_aws"}  # boto3 through the shared module
    lib = SCRIPT.parent / "hpc_aws.py"
    lib_modules = set()
    for node in ast.walk(ast.parse(lib.read_text())):
        if isinstance(node, ast.Import):
            lib_modules |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            lib_modules.add(node.module.split(".")[0])
    assert lib_modules - set(sys.stdlib_module_names) == {"boto3", "botocore"}
    r = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--boot" in r.stdout
    compile(text, str(SCRIPT), "exec")
    broken = subprocess.run([sys.executable, "-c", "import ast,sys; ast.parse(sys.stdin.read())"],
                            input=text.replace("def main(", "def main((", 1), capture_output=True, text=True)
    assert broken.returncode != 0


def test_reconcile_pulls_the_eip_to_a_settled_master_only(takeover: ModuleType, imds: FakeImds,
                                                          aws: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    """The LB pair healed after a cut: A stayed MASTER without a transition while the
    address stayed on B (BACKUP now). The periodic --reconcile on A moves it back; on B,
    and on a MASTER state recorded a moment ago (a step-down may be pending), it does
    nothing and logs nothing."""
    import os
    import time

    ec2, alloc = aws["ec2"], aws["alloc"]
    imds.current = "B"
    assert run(takeover, aws, "--reason", "master") == 0  # B took the address during the cut
    assert run(takeover, aws, "--reason", "backup") == 0  # ... and stepped down at the heal
    imds.log.clear()
    capsys.readouterr()
    assert run(takeover, aws, "--reconcile") == 0  # B: BACKUP, nothing to do
    assert eip_eni(ec2, alloc) == aws["B"] and imds.log == [] and capsys.readouterr().err == ""
    imds.current = "A"
    aws["state"].write_text("MASTER\n")  # A's record: MASTER since before the cut
    assert run(takeover, aws, "--reconcile") == 0  # ... but written just now: not settled
    assert eip_eni(ec2, alloc) == aws["B"]
    old = time.time() - takeover.RECONCILE_SETTLE_S - 1
    os.utime(aws["state"], (old, old))
    assert run(takeover, aws, "--reconcile") == 0
    assert eip_eni(ec2, alloc) == aws["A"]
    assert "reconcile: this node is MASTER and the EIP was elsewhere" in capsys.readouterr().err
    first = assoc_id(ec2, alloc)
    assert run(takeover, aws, "--reconcile") == 0  # already here: no call that moves it, no log
    assert assoc_id(ec2, alloc) == first and capsys.readouterr().err == ""


def test_reconcile_runs_from_a_timer_on_every_lb() -> None:
    import yaml

    tpl = SCRIPT.parent.parent / "templates" / "lb"
    timer = (tpl / "hpc-eip-reconcile.timer").read_text()
    assert "OnUnitActiveSec=5s" in timer and "WantedBy=timers.target" in timer
    assert "ExecStart=/usr/local/sbin/hpc-eip-takeover --reconcile" in (tpl / "hpc-eip-reconcile.service").read_text()
    man = yaml.safe_load((tpl / "manifest.yaml").read_text())
    dests = {f.get("dest") for f in man["files"]}
    assert {"/etc/systemd/system/hpc-eip-reconcile.service", "/etc/systemd/system/hpc-eip-reconcile.timer"} <= dests
    assert ["systemctl", "enable", "--now", "hpc-eip-reconcile.timer"] in [c["run"] for c in man["commands"]]


def test_reconcile_leaves_the_eip_with_a_peer_cut_off_from_here_and_takes_it_back_after_the_heal(
        takeover: ModuleType, imds: FakeImds, aws: dict[str, Any], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A cut between the LBs (both reachable from the internet): both are MASTER. B took
    the address; A's reconcile must not pull it back while B does not answer here (each
    move drops every connection through the EIP: they moved it back and forth). Once B
    answers (the cut healed, B is BACKUP), A's reconcile takes it. A node whose own
    takeover never completed since its transition takes it whatever the peer does."""
    import os
    import socket
    import time

    ec2, alloc = aws["ec2"], aws["alloc"]
    # The peer's probe port: closed and unroutable first (TEST-NET-1: no route here), then
    # a listener on loopback once the "cut" heals.
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    aws["cfg"] = write_config(tmp_path, alloc, peers=["192.0.2.7"], probe_port=port)  # type: ignore[arg-type]
    imds.current = "A"
    assert run(takeover, aws, "--reason", "master") == 0 and eip_eni(ec2, alloc) == aws["A"]
    held = aws["state"].parent / takeover.HELD_FILE
    assert held.exists(), "a completed takeover is recorded"
    imds.current = "B"
    assert run(takeover, aws, "--reason", "master") == 0 and eip_eni(ec2, alloc) == aws["B"]  # B, cut off, MASTER too
    imds.current = "A"
    aws["state"].write_text("MASTER\n")
    old = time.time() - takeover.RECONCILE_SETTLE_S - 1
    os.utime(aws["state"], (old, old))
    capsys.readouterr()
    first = assoc_id(ec2, alloc)
    for _ in range(3):  # every 5 s while the cut lasts: nothing moves
        assert run(takeover, aws, "--reconcile") == 0
    assert eip_eni(ec2, alloc) == aws["B"] and assoc_id(ec2, alloc) == first
    assert "does not answer here" in capsys.readouterr().err
    # The heal: B answers on its private address (here: refused counts, as a peer whose
    # HAProxy is down is up and FAULT, not a MASTER cut off).
    aws["cfg"] = write_config(tmp_path, alloc, peers=["127.0.0.1"], probe_port=port)  # type: ignore[arg-type]
    assert run(takeover, aws, "--reconcile") == 0
    assert eip_eni(ec2, alloc) == aws["A"]
    # A transition clears the record: a MASTER whose takeover failed retries in the
    # reconcile even when the peer holding the address does not answer (it may be dead).
    imds.current = "B"
    assert run(takeover, aws, "--reason", "master") == 0 and eip_eni(ec2, alloc) == aws["B"]
    imds.current = "A"
    assert run(takeover, aws, "--reason", "backup") == 0 and not held.exists()
    aws["state"].write_text("MASTER\n")
    os.utime(aws["state"], (old, old))
    aws["cfg"] = write_config(tmp_path, alloc, peers=["192.0.2.7"], probe_port=port)  # type: ignore[arg-type]
    assert run(takeover, aws, "--reconcile") == 0
    assert eip_eni(ec2, alloc) == aws["A"] and held.exists()
    probe.close()


def test_the_lb_config_names_the_peers_to_probe(tmp_path: Path) -> None:
    """eip.json on each LB lists the other LBs' private addresses and the probe port;
    bad values are refused with the key named."""
    import pytest as _pytest

    mod: Any = load_file(SCRIPT)
    bad = tmp_path / "bad.json"
    for doc, key in (({"peers": "10.0.0.1"}, "peers"), ({"probe_port": 0}, "probe_port"),
                     ({"probe_port": "443"}, "probe_port")):
        bad.write_text(json.dumps({"allocation_id": "eipalloc-1", "region": REGION, **doc}))
        with _pytest.raises(ValueError, match=key):
            mod.load_config(str(bad))
