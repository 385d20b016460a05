"""hpc_aws.py, the host scripts' one retry layer, under the faults it is sized for.

EC2 and SSM are moto (in-process). Faults are injected with botocore's own event system:
a `before-send` handler on the script's client counts every HTTP request the client
sends, makes it "late" on a fake clock, and answers a real AWS error document (for
instance EC2's 503 RequestLimitExceeded) for the first N seconds, so botocore parses and
classifies it as it would AWS's answer. Sleeping advances the same fake clock: a 20 s
throttle takes no real time. The instance metadata service is a tiny IMDSv2 server on
127.0.0.1 (random port).
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError, ReadTimeoutError
from moto import mock_aws
from moto.core.botocore_stubber import MockRawResponse

from tests.loadfile import load_script

REGION = "ap-northeast-2"

takeover = load_script("hpc-eip-takeover")
fetch = load_script("hpc-fetch-secrets")
galera = load_script("hpc-galera-start")
hpc_aws: ModuleType = takeover.hpc_aws
assert fetch.hpc_aws is hpc_aws and galera.hpc_aws is hpc_aws


# ---- a fake clock and a fault-injecting botocore hook ---------------------------------

class Clock:
    """Monotonic time that only sleeping (and late answers) advance; `at` runs an action
    once the clock reaches a time (a secret written 5 s after boot, ...)."""

    def __init__(self) -> None:
        self.t = 0.0
        self.sleeps: list[float] = []
        self.actions: list[tuple[float, Callable[[], None]]] = []

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds
        for when, action in list(self.actions):
            if self.t >= when:
                self.actions.remove((when, action))
                action()

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.advance(seconds)

    def at(self, when: float, action: Callable[[], None]) -> None:
        self.actions.append((when, action))


EC2_ERROR = ('<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>{code}</Code>'
             "<Message>{message}</Message></Error></Errors><RequestID>00000000-fault</RequestID></Response>")


class Faults:
    """Registered on one client: counts its HTTP sends per operation, makes each `latency_s`
    late on `clock`, and answers `code` to the operations in `until` while the clock is
    before their time."""

    def __init__(self, client: Any, clock: Clock, *, until: dict[str, float] | None = None,
                 code: str = "RequestLimitExceeded", status: int = 503, latency_s: float = 0.0) -> None:
        self.clock, self.until, self.code, self.status, self.latency_s = clock, until or {}, code, status, latency_s
        self.sends: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.service = client.meta.service_model.endpoint_prefix
        self.json = client.meta.service_model.protocol == "json"
        client.meta.events.register(f"before-send.{client.meta.service_model.service_id.hyphenize()}", self)

    def __call__(self, request: Any, event_name: str, **_: Any) -> AWSResponse | None:
        op = event_name.rsplit(".", 1)[-1]
        self.sends[op] += 1
        self.clock.advance(self.latency_s)
        if op in self.until and self.clock.t < self.until[op]:
            self.faults[op] += 1
            # botocore calls every before-send handler and takes the first answer: moto's
            # comes after this one, so point the request where moto serves nothing (a
            # throttled request has no effect), and answer it here
            request.url = "http://fault-injected.invalid/"
            if self.json:
                body = json.dumps({"__type": self.code, "message": "injected"}).encode()
                headers = {"Content-Type": "application/x-amz-json-1.1"}
            else:
                body = EC2_ERROR.format(code=self.code, message="injected").encode()
                headers = {"Content-Type": "text/xml"}
            return AWSResponse(request.url, self.status, headers, MockRawResponse(body))
        return None  # moto answers


# ---- the IMDSv2 stand-in --------------------------------------------------------------

class TinyImds:
    """IMDSv2 with tokens required: PUT /latest/api/token, then GETs with the token.
    `expire()` invalidates the tokens issued so far (the next GET with one gets 401);
    `fail_next` answers that many requests with 503."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values = values
        self.tokens: set[str] = set()
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status)
        self.fail_next = 0
        self.put_status = 200
        self.latency_s = 0.0  # every answer this late (a slow IMDS under load)
        imds = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def _send(self, code: int, body: str = "") -> None:
                time.sleep(imds.latency_s)
                imds.requests.append((self.command, self.path, code))
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self) -> None:
                if imds.fail_next:
                    imds.fail_next -= 1
                    return self._send(503)
                if self.path != "/latest/api/token" or not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    return self._send(400)
                if imds.put_status != 200:
                    return self._send(imds.put_status)
                token = f"token-{len(imds.tokens) + 1}"
                imds.tokens.add(token)
                self._send(200, token)

            def do_GET(self) -> None:
                if imds.fail_next:
                    imds.fail_next -= 1
                    return self._send(503)
                if self.headers.get("X-aws-ec2-metadata-token") not in imds.tokens:
                    return self._send(401)
                key = self.path.removeprefix("/latest/meta-data/")
                if key not in imds.values:
                    return self._send(404)
                self._send(200, imds.values[key])

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def expire(self) -> None:
        self.tokens = {f"expired-{t}" for t in self.tokens}

    def count(self, method: str, status: int | None = None) -> int:
        return sum(1 for m, _, s in self.requests if m == method and (status is None or s == status))

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---- fixtures -------------------------------------------------------------------------

@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(hpc_aws, "_now", c)
    monkeypatch.setattr(hpc_aws, "_sleep", c.sleep)
    monkeypatch.setattr(takeover, "_clock", c)
    monkeypatch.setattr(takeover, "_sleep", c.sleep)
    return c


@pytest.fixture
def lb(fake_aws: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Two instances and an unassociated EIP in moto; IMDS says this host is instance A."""
    monkeypatch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
    monkeypatch.setattr(takeover, "AWS_ENDPOINT_FILE", str(tmp_path / "no-aws-endpoint"))
    monkeypatch.setattr(takeover, "SYSLOG_SOCKET", str(tmp_path / "no-syslog"))
    with mock_aws():
        ec2 = boto3.client("ec2", region_name=REGION)
        vpc = ec2.create_vpc(CidrBlock="10.40.0.0/16")["Vpc"]["VpcId"]
        subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.40.0.0/24")["Subnet"]["SubnetId"]
        insts = [ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1, SubnetId=subnet,
                                   InstanceType="c7i.xlarge")["Instances"][0] for _ in range(2)]
        nic = insts[0]["NetworkInterfaces"][0]
        imds = TinyImds({"instance-id": insts[0]["InstanceId"], "mac": nic["MacAddress"],
                         f"network/interfaces/macs/{nic['MacAddress']}/interface-id": nic["NetworkInterfaceId"],
                         "placement/region": REGION, "placement/availability-zone": f"{REGION}a"})
        monkeypatch.setenv("HPC_IMDS_URL", imds.url)
        alloc = ec2.allocate_address(Domain="vpc")["AllocationId"]
        # the EIP starts on the other instance: the takeover has to move it
        ec2.associate_address(AllocationId=alloc, NetworkInterfaceId=insts[1]["NetworkInterfaces"][0]["NetworkInterfaceId"])
        cfg = tmp_path / "eip.json"
        cfg.write_text(json.dumps({"allocation_id": alloc, "region": REGION}))
        try:
            yield {"ec2": ec2, "alloc": alloc, "eni": nic["NetworkInterfaceId"], "cfg": cfg, "imds": imds,
                   "state": tmp_path / "vrrp-state"}
        finally:
            imds.stop()


def faulty_ec2(monkeypatch: pytest.MonkeyPatch, clock: Clock, **faults: Any) -> list[Faults]:
    """The takeover's EC2 client with Faults on it (one per client the script builds)."""
    made: list[Faults] = []
    real = takeover.ec2_client

    def client(region: str, endpoint: str | None) -> Any:
        c = real(region, endpoint)
        made.append(Faults(c, clock, **faults))
        return c

    monkeypatch.setattr(takeover, "ec2_client", client)
    return made


def eip_eni(lb: dict[str, Any]) -> str | None:
    return lb["ec2"].describe_addresses(AllocationIds=[lb["alloc"]])["Addresses"][0].get("NetworkInterfaceId") or None


def run_takeover(lb: dict[str, Any]) -> int:
    return int(takeover.main(["--reason", "master", "--config", str(lb["cfg"]), "--state-file", str(lb["state"]),
                              "--identity-file", str(lb["state"].parent / "instance-identity.json")]))


# ---- the EIP takeover under throttling and slow answers ---------------------------------

@pytest.mark.parametrize(("throttle_s", "latency_s"), [(20.0, 0.0), (0.0, 2.0), (20.0, 2.0)],
                         ids=["throttled-20s", "every-call-2s-late", "both"])
def test_takeover_completes_within_its_deadline(lb: dict[str, Any], clock: Clock, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str], tally: Any,
                                                throttle_s: float, latency_s: float) -> None:
    tally.expect(9)
    until = {"DescribeAddresses": throttle_s, "AssociateAddress": throttle_s}
    made = faulty_ec2(monkeypatch, clock, until=until, latency_s=latency_s)
    assert run_takeover(lb) == 0
    tally.check(eip_eni(lb) == lb["eni"], "the EIP is on this host")
    tally.check(len(made) == 1)
    f = made[0]
    tally.check(clock.t <= takeover.EIP_DEADLINE_S, f"took {clock.t:.1f} s of a {takeover.EIP_DEADLINE_S} s deadline")
    tally.check(clock.t >= throttle_s, "not before the throttle ended")
    err = capsys.readouterr().err
    retries = err.count("attempt ")
    # no botocore retries: one HTTP send per attempt of the unit, the failed ones included
    tally.check(f.sends["DescribeAddresses"] == retries + 1, (f.sends, retries))
    tally.check(f.sends["AssociateAddress"] == 1, f.sends)  # described until free, then one association
    tally.check(f.faults["DescribeAddresses"] == retries, f.faults)
    tally.check(all(s <= hpc_aws.BACKOFF_CAP_S for s in clock.sleeps), clock.sleeps)
    if throttle_s:
        tally.check("failed (ClientError RequestLimitExceeded); retrying in" in err and " s left" in err, err)
    else:
        tally.check(retries == 0 and clock.sleeps == [], err)


def test_a_failed_associate_is_described_again_before_the_next_try(lb: dict[str, Any], clock: Clock,
                                                                   monkeypatch: pytest.MonkeyPatch, tally: Any) -> None:
    tally.expect(4)
    made = faulty_ec2(monkeypatch, clock, until={"AssociateAddress": 3.0}, latency_s=1.0)
    assert run_takeover(lb) == 0
    f = made[0]
    tally.check(eip_eni(lb) == lb["eni"])
    tally.check(f.faults["AssociateAddress"] >= 1)
    # every AssociateAddress, failed or not, follows its own DescribeAddresses
    tally.check(f.sends["DescribeAddresses"] == f.sends["AssociateAddress"], f.sends)
    tally.check(f.sends["AssociateAddress"] == f.faults["AssociateAddress"] + 1, f.sends)


def test_a_throttle_past_the_deadline_ends_in_exit_3_at_the_deadline(lb: dict[str, Any], clock: Clock,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str],
                                                                      tally: Any) -> None:
    tally.expect(4)
    made = faulty_ec2(monkeypatch, clock, until={"DescribeAddresses": 1e9}, latency_s=2.0)
    assert run_takeover(lb) == 3
    tally.check(eip_eni(lb) != lb["eni"])
    # the last attempt starts at the latest at the deadline; only its own (late) answer follows
    tally.check(takeover.EIP_DEADLINE_S <= clock.t <= takeover.EIP_DEADLINE_S + 2.0, clock.t)
    err = capsys.readouterr().err
    tally.check("still failing after" in err and "DescribeAddresses" in err, err)
    tally.check(made[0].sends["AssociateAddress"] == 0)


def test_access_denied_fails_at_once_naming_the_call(lb: dict[str, Any], clock: Clock, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str], tally: Any) -> None:
    tally.expect(5)
    made = faulty_ec2(monkeypatch, clock, until={"AssociateAddress": 1e9}, code="UnauthorizedOperation", status=403)
    assert run_takeover(lb) == 3
    f = made[0]
    tally.check(f.sends["AssociateAddress"] == 1 and f.sends["DescribeAddresses"] == 1, f.sends)
    tally.check(clock.sleeps == [] and clock.t == 0)
    err = capsys.readouterr().err
    tally.check("AssociateAddress failed: ClientError UnauthorizedOperation" in err, err)
    tally.check("not retryable" in err, err)
    tally.check("attempt " not in err, err)


def test_retry_helper_refuses_access_denied_and_validation_errors(fake_aws: None, clock: Clock, tally: Any) -> None:
    tally.expect(6)
    with mock_aws():
        ssm = hpc_aws.client("ssm", REGION)
        f = Faults(ssm, clock, until={"GetParameter": 1e9}, code="AccessDeniedException", status=400)
        with pytest.raises(hpc_aws.CallFailed) as e:
            hpc_aws.retry(lambda: ssm.get_parameter(Name="/x/secrets/a"), deadline_s=60, what="GetParameter /x/secrets/a",
                          retryable=("ParameterNotFound",))
        tally.check(e.value.permanent and e.value.attempts == 1 and e.value.code == "AccessDeniedException")
        tally.check(str(e.value).startswith("GetParameter /x/secrets/a: GetParameter failed: ClientError AccessDeniedException"),
                    str(e.value))
        tally.check(f.sends["GetParameter"] == 1 and clock.sleeps == [])
        with pytest.raises(hpc_aws.CallFailed) as e:  # botocore's own parameter validation
            hpc_aws.retry(lambda: ssm.get_parameter(Nme="x"), deadline_s=60, what="GetParameter")
        tally.check(e.value.permanent and "ParamValidationError" in str(e.value), str(e.value))
        tally.check(clock.sleeps == [])
        with pytest.raises(hpc_aws.CallFailed) as e:  # ValidationException from the service
            Faults(ssm, clock, until={"PutParameter": 1e9}, code="ValidationException", status=400)
            hpc_aws.retry(lambda: ssm.put_parameter(Name="/x", Value="v", Type="String"), deadline_s=60, what="Put")
        tally.check(e.value.permanent and e.value.code == "ValidationException" and clock.sleeps == [])


# ---- "not yet": a secret written 5 s after the host asked ----------------------------

def test_a_parameter_that_appears_after_5s_is_fetched(fake_aws: None, clock: Clock, tally: Any) -> None:
    tally.expect(6)
    with mock_aws():
        ssm = hpc_aws.client("ssm", REGION)
        f = Faults(ssm, clock)
        writer = boto3.client("ssm", region_name=REGION)
        clock.at(5.0, lambda: writer.put_parameter(Name="/p/secrets/late", Value="v4lue", Type="SecureString"))
        value = hpc_aws.retry(
            lambda: ssm.get_parameter(Name="/p/secrets/late", WithDecryption=True)["Parameter"]["Value"],
            deadline_s=30, what="GetParameter /p/secrets/late", retryable=("ParameterNotFound",))
        tally.check(value == "v4lue")
        tally.check(5.0 <= clock.t <= 5.0 + hpc_aws.BACKOFF_CAP_S, clock.t)
        tally.check(f.sends["GetParameter"] == len(clock.sleeps) + 1, (f.sends, clock.sleeps))
        # not named by the caller: ParameterNotFound is an answer, not a reason to wait
        with pytest.raises(hpc_aws.CallFailed) as e:
            hpc_aws.retry(lambda: ssm.get_parameter(Name="/p/secrets/never"), deadline_s=30, what="GetParameter never")
        tally.check(e.value.permanent and e.value.code == "ParameterNotFound")
        with pytest.raises(hpc_aws.CallFailed) as e:  # named, but never written: the deadline ends it
            start = clock.t
            hpc_aws.retry(lambda: ssm.get_parameter(Name="/p/secrets/never"), deadline_s=30, what="GetParameter never",
                          retryable=("ParameterNotFound",))
        tally.check(not e.value.permanent and clock.t - start == pytest.approx(30))
        tally.check("still failing after" in str(e.value))


def test_fetch_secrets_waits_for_a_required_secret_written_5s_later(fake_aws: None, clock: Clock, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str],
                                                                    tally: Any) -> None:
    tally.expect(6)
    stack = tmp_path / "stack.json"
    stack.write_text(json.dumps({"region": REGION, "secrets": {"path": "/p/secrets/", "dir": str(tmp_path / "s"),
                                                               "required": ["munge_key", "redis_password"]}}))
    with mock_aws():
        writer = boto3.client("ssm", region_name=REGION)
        writer.put_parameter(Name="/p/secrets/munge_key", Value="m", Type="SecureString")
        clock.at(5.0, lambda: writer.put_parameter(Name="/p/secrets/redis_password", Value="r", Type="SecureString"))
        made: list[Faults] = []

        def factory() -> Any:
            c = fetch.make_client(REGION, None)
            made.append(Faults(c, clock))
            return c

        rc = fetch.main(["--stack-json", str(stack)], client_factory=factory)
    tally.check(rc == 0)
    tally.check((tmp_path / "s" / "redis_password").read_text() == "r")
    tally.check(clock.t >= 5.0 and clock.t <= fetch.DEADLINE_S)
    err = capsys.readouterr().err
    tally.check("failed (NotYet ParameterNotFound)" in err, err)
    tally.check(all(f.sends["GetParametersByPath"] == 1 for f in made), [f.sends for f in made])  # no botocore retries
    tally.check(len(made) == err.count("attempt ") + 1)


# ---- no botocore retries --------------------------------------------------------------

def test_clients_send_each_request_once_and_the_counter_sees_retries(fake_aws: None, clock: Clock, tally: Any) -> None:
    tally.expect(5)
    with mock_aws():
        ours = hpc_aws.client("ec2", REGION)
        f = Faults(ours, clock, until={"DescribeAddresses": 1e9})
        with pytest.raises(ClientError):
            ours.describe_addresses()
        tally.check(f.sends["DescribeAddresses"] == 1, f.sends)
        tally.check(ours.meta.config.retries["total_max_attempts"] == 1)
        tally.check(ours.meta.config.connect_timeout == hpc_aws.CONNECT_TIMEOUT_S
                    and ours.meta.config.read_timeout == hpc_aws.READ_TIMEOUT_S)
        # negative twin: botocore's default client retries the same throttle by itself
        default = boto3.client("ec2", region_name=REGION)
        g = Faults(default, clock, until={"DescribeAddresses": 1e9})
        with pytest.raises(ClientError):
            default.describe_addresses()
        tally.check(g.sends["DescribeAddresses"] > 1, g.sends)
        # one 503 then success through retry(): two sends in all
        h = Faults(ours, clock, until={"DescribeRegions": clock.t + 1.5}, code="ServiceUnavailable", latency_s=1.0)
        hpc_aws.retry(ours.describe_regions, deadline_s=10, what="DescribeRegions")
        tally.check(h.sends["DescribeRegions"] == 2 and h.faults["DescribeRegions"] == 1, h.sends)


def test_retry_backoff_is_full_jitter_capped_and_bounded_by_the_deadline(tally: Any) -> None:
    tally.expect(5)
    clock = Clock()
    lines: list[str] = []
    err = ClientError({"Error": {"Code": "Throttling", "Message": "slow down"}}, "Op")

    def always() -> None:
        clock.advance(0.1)
        raise err

    with pytest.raises(hpc_aws.CallFailed) as e:
        hpc_aws.retry(always, deadline_s=20, what="Op thing", log=lines.append, sleep=clock.sleep, clock=clock)
    tally.check(e.value.__cause__ is err and not e.value.permanent)
    bounds = [min(hpc_aws.BACKOFF_CAP_S, hpc_aws.BACKOFF_BASE_S * 2 ** n) for n in range(len(clock.sleeps))]
    tally.check(all(0 <= s <= b for s, b in zip(clock.sleeps, bounds, strict=True)), clock.sleeps)
    tally.check(20 <= clock.t <= 20.1 + 1e-9, clock.t)
    tally.check(len(lines) == len(clock.sleeps) == e.value.attempts - 1)
    tally.check(lines[0].startswith("Op thing: attempt 1 failed (ClientError Throttling); retrying in ")
                and lines[0].endswith(" s left"), lines[0])


def test_connection_errors_and_timeouts_are_retried(tally: Any) -> None:
    tally.expect(2)
    clock = Clock()
    errors: list[Exception] = [ReadTimeoutError(endpoint_url="http://x"), ConnectionRefusedError(), TimeoutError()]

    def flaky() -> str:
        if errors:
            raise errors.pop(0)
        return "ok"

    tally.check(hpc_aws.retry(flaky, deadline_s=5, what="x", sleep=clock.sleep, clock=clock, log=lambda m: None) == "ok")
    tally.check(len(clock.sleeps) == 3)


# ---- IMDSv2 ---------------------------------------------------------------------------

@pytest.fixture
def imds() -> Iterator[TinyImds]:
    server = TinyImds({"instance-id": "i-0abc", "mac": "0e:00:00:00:00:01", "placement/region": REGION,
                       "placement/availability-zone": f"{REGION}c",
                       "network/interfaces/macs/0e:00:00:00:00:01/interface-id": "eni-0def"})
    yield server
    server.stop()


def test_imds_reads_with_one_cached_token(imds: TinyImds, tally: Any) -> None:
    tally.expect(3)
    client = hpc_aws.Imds(imds.url)
    got = (client.instance_id(), client.region(), client.availability_zone(), client.mac(), client.interface_id())
    tally.check(got == ("i-0abc", REGION, f"{REGION}c", "0e:00:00:00:00:01", "eni-0def"), got)
    tally.check(imds.count("PUT") == 1, imds.requests)
    tally.check(imds.count("GET") == 6 and imds.count("GET", 200) == 6, imds.requests)  # interface_id reads the MAC


def test_imds_refreshes_an_expired_token_on_401(imds: TinyImds, tally: Any) -> None:
    tally.expect(4)
    client = hpc_aws.Imds(imds.url)
    tally.check(client.instance_id() == "i-0abc")
    imds.expire()
    tally.check(client.region() == REGION)
    tally.check(imds.count("PUT", 200) == 2, imds.requests)
    tally.check(imds.count("GET", 401) == 1 and imds.count("GET", 200) == 2, imds.requests)


def test_imds_retries_5xx_and_refuses_a_disabled_token_at_once(imds: TinyImds, tally: Any) -> None:
    tally.expect(4)
    clock = Clock()
    imds.fail_next = 2
    client = hpc_aws.Imds(imds.url, sleep=clock.sleep, clock=clock, log=lambda m: None)
    tally.check(client.instance_id() == "i-0abc")
    tally.check(len(clock.sleeps) == 2 and imds.count("PUT", 503) + imds.count("GET", 503) == 2, imds.requests)
    imds.put_status = 403  # IMDS tokens disabled (or IMDS off): no IMDSv1 fallback, no retry
    fresh = hpc_aws.Imds(imds.url, sleep=clock.sleep, clock=clock)
    with pytest.raises(hpc_aws.ImdsError) as e:
        fresh.instance_id()
    tally.check(e.value.status == 403 and len(clock.sleeps) == 2, str(e.value))
    tally.check(imds.count("PUT", 403) == 1)


def test_imds_unreachable_gives_up_at_its_deadline(tally: Any) -> None:
    tally.expect(2)
    clock = Clock()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    server.server_close()  # nothing listens there now: connection refused
    client = hpc_aws.Imds(url, deadline_s=10, sleep=clock.sleep, clock=clock, log=lambda m: None)
    with pytest.raises(hpc_aws.ImdsError) as e:
        client.instance_id()
    tally.check(clock.t == pytest.approx(10) and len(clock.sleeps) >= 3, (clock.t, clock.sleeps))
    tally.check("still failing after" in str(e.value), str(e.value))


# ---- a claim whose answer was lost ----------------------------------------------------

def test_galera_claim_whose_answer_was_lost_is_recognised_as_ours(fake_aws: None, monkeypatch: pytest.MonkeyPatch,
                                                                  tally: Any) -> None:
    tally.expect(3)
    monkeypatch.setattr(galera.time, "sleep", lambda s: None)
    with mock_aws():
        ssm = boto3.client("ssm", region_name=REGION)

        class LostAnswer:
            """PutParameter lands, but its answer times out (once)."""

            def __init__(self) -> None:
                self.lost = 0

            def put_parameter(self, **kw: Any) -> Any:
                out = ssm.put_parameter(**kw)
                if not self.lost:
                    self.lost += 1
                    raise ReadTimeoutError(endpoint_url="http://ssm")
                return out

            def get_parameter(self, **kw: Any) -> Any:
                return ssm.get_parameter(**kw)

        tally.check(galera.claim_bootstrap(LostAnswer(), "/g/marker-1", "data-1") is True)
        # the same lost answer, but another starter's marker was there first: not ours
        ssm.put_parameter(Name="/g/marker-2", Value=json.dumps({"host": "data-1", "claim": "other"}), Type="String")

        class Timeout:
            calls = 0

            def put_parameter(self, **kw: Any) -> Any:
                Timeout.calls += 1
                if Timeout.calls == 1:
                    raise ReadTimeoutError(endpoint_url="http://ssm")
                return ssm.put_parameter(**kw)

            def get_parameter(self, **kw: Any) -> Any:
                return ssm.get_parameter(**kw)

        tally.check(galera.claim_bootstrap(Timeout(), "/g/marker-2", "data-1") is False)
        tally.check(Timeout.calls == 2)


def test_galera_claim_survives_a_20s_throttle_without_botocore_retries(fake_aws: None, monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Path, tally: Any) -> None:
    tally.expect(3)
    clock = Clock()
    monkeypatch.setattr(galera, "AWS_ENDPOINT_FILE", str(tmp_path / "no-aws-endpoint"))
    monkeypatch.setattr(galera.time, "sleep", clock.sleep)
    with mock_aws():
        ssm = galera.ssm_client({"region": REGION})
        f = Faults(ssm, clock, until={"PutParameter": 20.0}, code="ThrottlingException", status=400)
        tally.check(galera.claim_bootstrap(ssm, "/g/marker-3", "data-1") is True)
        tally.check(f.sends["PutParameter"] == f.faults["PutParameter"] + 1 <= 5, f.sends)  # one send per attempt
        tally.check(clock.t >= 20.0)


def test_imds_answering_late_is_read_with_longer_waits_not_timed_out_forever(imds: TinyImds, tally: Any) -> None:
    """Each attempt waits twice as long as the one before: with every answer 1.5 s late
    and a first wait of 0.5 s, the third attempt (2 s) gets through, well inside the
    deadline; with a fixed wait every attempt would time out."""
    tally.expect(2)
    imds.latency_s = 1.5
    client = hpc_aws.Imds(imds.url, deadline_s=15, timeout_s=0.5, log=lambda m: None)
    t0 = time.monotonic()
    tally.check(client.instance_id() == "i-0abc")
    tally.check(time.monotonic() - t0 < 15, time.monotonic() - t0)


# ---- role credentials from an IMDS that answers late -----------------------------------

class LateImds(http.server.ThreadingHTTPServer):
    """IMDSv2 with an instance profile, every answer `delay` seconds late."""

    delay = 2.0


def _late_imds_handler() -> type[http.server.BaseHTTPRequestHandler]:
    class H(http.server.BaseHTTPRequestHandler):
        def _send(self, body: bytes) -> None:
            time.sleep(self.server.delay)  # type: ignore[attr-defined]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_PUT(self) -> None:  # noqa: N802 - http.server's name
            self._send(b"token")

        def do_GET(self) -> None:  # noqa: N802
            if self.path.endswith("/security-credentials/"):
                self._send(b"hpc-lb")
            elif self.path.endswith("/security-credentials/hpc-lb"):
                self._send(json.dumps({"Code": "Success", "AccessKeyId": "AKIALATE", "SecretAccessKey": "s",
                                       "Token": "t", "Expiration": "2099-01-01T00:00:00Z"}).encode())
            else:
                self.send_response(404)
                self.end_headers()

        def log_message(self, *a: Any) -> None:
            pass

    return H


@pytest.fixture
def late_imds(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    srv = LateImds(("127.0.0.1", 0), _late_imds_handler())
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
              "AWS_METADATA_SERVICE_TIMEOUT", "AWS_METADATA_SERVICE_NUM_ATTEMPTS", "AWS_EC2_METADATA_DISABLED"):
        monkeypatch.delenv(k, raising=False)
    (tmp_path / "empty").write_text("")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "empty"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "empty"))
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", f"http://127.0.0.1:{srv.server_port}/")
    try:
        yield f"http://127.0.0.1:{srv.server_port}/"
    finally:
        srv.shutdown()


def test_clients_get_the_instance_profile_from_an_imds_two_seconds_late(late_imds: str) -> None:
    # positive control: botocore's defaults (1 s, one attempt) find no credentials
    plain = boto3.session.Session().client("ec2", region_name=REGION)
    assert plain._request_signer._credentials is None
    c = hpc_aws.client("ec2", REGION)
    creds = c._request_signer._credentials
    assert creds is not None and creds.get_frozen_credentials().access_key == "AKIALATE"
