"""The AWS stand-ins, run in the `rh-aws` namespace (`python -m rehearsal.awsd WORKDIR STACK`):

- moto server (EC2, SSM, S3) on ENDPOINT_IP:443, playing the VPC interface endpoints,
  with the SSM agent's part of Run Command (SsmAgent: AWS-RunShellScript runs inside the
  instance's host), which moto only records;
- the deploy step: the program's own `__main__.py` run against these stand-ins
  (rehearsal/deploy.py), which creates the VPC, subnets, security groups, interfaces,
  instances with the program's user-data, the Elastic IP (allocated only), EFS, the
  buckets and bundles and the SecureString secrets; writes deploy.json;
- the instance metadata service at 169.254.169.254:80 (IMDSv2 tokens required): it tells
  each caller, by source address, its instance id, MAC, interface id, AZ, role
  credentials and user-data, read from the EC2 stand-in;
- the EIP watcher: every 0.2 s it asks EC2 which interface holds the Elastic IP and points
  the router's DNAT there, so traffic to the VIP follows the association;
- an operations socket (WORKDIR/awsd.sock, one JSON request per connection) for the
  rehearsal's own tools, which live outside this namespace.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import secrets as pysecrets
import socketserver
import sys
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from . import sockcall
from .imds_tree import answer_path
from .layout import EIP_PUBLIC_IP, ENDPOINT_IP, ENDPOINT_PORT, IMDS_IP, MIRROR_IP, Layout, build_layout
from .netns import set_eip_target

ENDPOINT_URL = f"http://{ENDPOINT_IP}:{ENDPOINT_PORT}"


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} awsd: {msg}", flush=True)


# The rehearsal's own calls (EIP watcher, operations) carry this in their User-Agent:
# the API faults below are for the hosts' calls, not for the stand-in's plumbing.
OPS_AGENT = "hpc-rehearsal-ops"


def client(service: str, region: str) -> Any:
    return boto3.client(service, region_name=region, endpoint_url=ENDPOINT_URL,
                        aws_access_key_id="rehearsal", aws_secret_access_key="rehearsal",
                        config=Config(retries={"max_attempts": 2}, connect_timeout=3, read_timeout=20,
                                      user_agent_extra=OPS_AGENT))


# ----------------------------------------------------------------------- API faults


class ApiFaults:
    """What the EC2 and metadata stand-ins do wrong on purpose (the ec2-api drill), until
    a deadline: answer the named EC2 actions with RequestLimitExceeded (HTTP 503, EC2's
    own error document), and/or answer every EC2 and metadata call `delay_s` late."""

    def __init__(self, clock: Any = time.time) -> None:
        self.clock = clock
        self.lock = threading.Lock()
        self.throttle: frozenset[str] = frozenset()
        self.throttle_until = 0.0
        self.delay_s = 0.0
        self.delay_until = 0.0
        self.counts = {"throttled": 0, "delayed": 0}

    def set(self, throttle: list[str] | None = None, throttle_s: float = 0.0, delay_s: float = 0.0,
            delay_for_s: float = 0.0) -> dict[str, Any]:
        if throttle_s < 0 or delay_s < 0 or delay_for_s < 0 or throttle_s > 600 or delay_for_s > 600:
            raise ValueError("api faults: throttle_s, delay_s and delay_for_s must be 0..600 seconds")
        now = self.clock()
        with self.lock:
            before = dict(self.counts)  # what the faults just turned off did
            self.throttle = frozenset(throttle or [])
            self.throttle_until = now + throttle_s
            self.delay_s, self.delay_until = delay_s, now + delay_for_s
            self.counts = {"throttled": 0, "delayed": 0}
        return {**self.state(), "before": before}

    def state(self) -> dict[str, Any]:
        with self.lock:
            return {"throttle": sorted(self.throttle), "throttle_until": self.throttle_until,
                    "delay_s": self.delay_s, "delay_until": self.delay_until, **self.counts}

    def throttled(self, action: str) -> bool:
        with self.lock:
            hit = action in self.throttle and self.clock() < self.throttle_until
            if hit:
                self.counts["throttled"] += 1
            return hit

    def delay(self) -> float:
        with self.lock:
            if self.delay_s and self.clock() < self.delay_until:
                self.counts["delayed"] += 1
                return self.delay_s
            return 0.0


FAULTS = ApiFaults()
THROTTLED = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>RequestLimitExceeded</Code>'
             b'<Message>Request limit exceeded.</Message></Error></Errors><RequestID>rehearsal-throttle</RequestID>'
             b'</Response>')


def ec2_action(environ: dict[str, Any]) -> str | None:
    """The EC2 action of a request to the moto server (None: not EC2, or the rehearsal's
    own call). EC2's query API: Action in the form body or the query string; the service
    is in the SigV4 credential scope."""
    if OPS_AGENT in environ.get("HTTP_USER_AGENT", ""):
        return None
    if "/ec2/aws4_request" not in environ.get("HTTP_AUTHORIZATION", ""):
        return None
    import io
    from urllib.parse import parse_qs

    n = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(n) if n else b""
    environ["wsgi.input"] = io.BytesIO(body)
    fields = parse_qs(body.decode("utf-8", "replace")) or parse_qs(environ.get("QUERY_STRING", ""))
    return (fields.get("Action") or [""])[0]


def faulty_moto_server(ip: str, port: int, faults: ApiFaults, agent: SsmAgent | None = None) -> Any:
    """moto's threaded server with the API faults in front (none until set) and the SSM
    agent stand-in for Run Command."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from moto.server import ThreadedMotoServer
    from werkzeug.serving import make_server

    class FaultyMotoServer(ThreadedMotoServer):  # type: ignore[misc]
        def _server_entry(self) -> None:
            app = with_faults(DomainDispatcherApplication(create_backend_app), faults, agent)
            self._server = make_server(self._ip_address, self._port, app, True)
            self._server_ready_event.set()
            self._server.serve_forever()

    return FaultyMotoServer(ip_address=ip, port=port, verbose=False)


# ------------------------------------------------------------- SSM Run Command agent

SSM_OUTPUT_MAX = 24000  # GetCommandInvocation returns at most this much of each stream


class SsmAgent:
    """What the SSM agent on each instance does for Run Command, which moto only records:
    SendCommand of AWS-RunShellScript runs the commands as root inside the instance's host
    (`sh -c`, as the agent's script runner), in the background; GetCommandInvocation
    answers InProgress until it ends, then Success or Failed with its exit code and output
    (TimedOut past executionTimeout). An instance whose host is not up answers
    InvalidInstanceId, as SSM does for an instance whose agent is not registered. Any
    other document or operation is refused loudly rather than pretended."""

    def __init__(self, host_of: Any, execute: Any, clock: Any = time.time) -> None:
        self.host_of = host_of  # instance id -> host name, or None
        self.execute = execute  # (host, script, timeout_s) -> (rc, output); rc 124: timed out
        self.clock = clock
        self.lock = threading.Lock()
        self.invocations: dict[tuple[str, str], dict[str, Any]] = {}
        self.log: list[dict[str, Any]] = []  # every command run, in order (what a drill observes)

    @staticmethod
    def error(code: str, message: str) -> tuple[int, dict[str, Any]]:
        return 400, {"__type": code, "message": message}

    def handle(self, target: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if target == "SendCommand":
            return self.send_command(body)
        if target == "GetCommandInvocation":
            return self.get_invocation(body)
        return self.error("UnsupportedOperation", f"the rehearsal's SSM agent does not do {target}")

    def send_command(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        doc = body.get("DocumentName")
        if doc != "AWS-RunShellScript":
            return self.error("InvalidDocument", f"document {doc!r}: the rehearsal's agent runs AWS-RunShellScript only")
        params = body.get("Parameters") or {}
        script = "\n".join(params.get("commands") or [])
        if not script.strip():
            return self.error("InvalidParameters", "commands: empty")
        timeout = float((params.get("executionTimeout") or ["3600"])[0])
        ids = list(body.get("InstanceIds") or [])
        hosts = {i: self.host_of(i) for i in ids}
        missing = [i for i, h in hosts.items() if h is None]
        if not ids or missing:
            return self.error("InvalidInstanceId", f"instances not running an agent: {', '.join(missing) or '(none given)'}")
        cid = str(uuid.uuid4())  # SSM command ids are UUIDs
        now = self.clock()
        for iid, host in hosts.items():
            inv = {"CommandId": cid, "InstanceId": iid, "Status": "InProgress", "StatusDetails": "InProgress",
                   "ResponseCode": -1, "StandardOutputContent": "", "StandardErrorContent": "",
                   "DocumentName": doc, "host": host, "script": script, "sent": now}
            with self.lock:
                self.invocations[(cid, iid)] = inv
                self.log.append({"t": now, "host": host, "command_id": cid, "first_line": script.splitlines()[0][:200]})
            threading.Thread(target=self._run, args=(inv, timeout), daemon=True, name=f"ssm-{host}").start()
        return 200, {"Command": {"CommandId": cid, "DocumentName": doc, "InstanceIds": ids, "Status": "Pending",
                                 "Parameters": params}}

    def _run(self, inv: dict[str, Any], timeout: float) -> None:
        try:
            rc, out = self.execute(inv["host"], inv["script"], timeout)
        except Exception as e:  # noqa: BLE001 - the host went away under the command
            rc, out = -1, f"the agent lost the instance: {e}"
        status = "Success" if rc == 0 else "TimedOut" if rc == 124 else "Failed"
        with self.lock:
            inv.update(Status=status, StatusDetails="ExecutionTimedOut" if rc == 124 else status, ResponseCode=rc,
                       StandardOutputContent=out[-SSM_OUTPUT_MAX:], ended=self.clock())

    def get_invocation(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self.lock:
            inv = self.invocations.get((body.get("CommandId", ""), body.get("InstanceId", "")))
            if inv is None:
                return self.error("InvocationDoesNotExist", "no such command invocation")
            return 200, {k: v for k, v in inv.items() if k[0].isupper()}


def ssm_target(environ: dict[str, Any]) -> str | None:
    """The operation of an SSM JSON request (X-Amz-Target AmazonSSM.<Op>), else None."""
    t = environ.get("HTTP_X_AMZ_TARGET", "")
    return t.split(".", 1)[1] if t.startswith("AmazonSSM.") else None


SSM_AGENT_OPS = {"SendCommand", "GetCommandInvocation", "ListCommandInvocations", "ListCommands", "CancelCommand"}


def with_faults(app: Any, faults: ApiFaults, agent: SsmAgent | None = None) -> Any:
    """WSGI middleware in front of moto: EC2 calls get the configured faults; SSM Run
    Command goes to the agent (when one is given)."""
    def wsgi(environ: dict[str, Any], start_response: Any) -> Any:
        op = ssm_target(environ)
        if agent is not None and op in SSM_AGENT_OPS:
            n = int(environ.get("CONTENT_LENGTH") or 0)
            body = json.loads(environ["wsgi.input"].read(n) or b"{}") if n else {}
            code, doc = agent.handle(op, body)
            data = json.dumps(doc, default=str).encode()
            start_response(f"{code} {'OK' if code == 200 else 'Bad Request'}",
                           [("Content-Type", "application/x-amz-json-1.1"), ("Content-Length", str(len(data)))])
            return [data]
        action = ec2_action(environ)
        if action is not None:
            d = faults.delay()
            if d:
                time.sleep(d)
            if faults.throttled(action):
                start_response("503 Service Unavailable", [("Content-Type", "text/xml"),
                                                            ("Content-Length", str(len(THROTTLED)))])
                return [THROTTLED]
        return app(environ, start_response)
    return wsgi


# ---------------------------------------------------------------------------- deploy


def tls_config(cfg: Any, public_ip: str) -> dict[str, str]:
    """The certificate a stack that requires configured TLS (prod) is given with
    `pulumi config set --secret tls_cert/tls_key`: here a real one, made now, for the
    portal's name and the Elastic IP (the rehearsal's clients verify it)."""
    from .deploy import real_key_and_certificate

    if not cfg.require_tls_config:
        return {}
    key, cert = real_key_and_certificate(f"portal.{cfg.domain}", [f"portal.{cfg.domain}", f"*.{cfg.domain}"],
                                         [public_ip])
    return {"tls_cert": cert, "tls_key": key}


def deploy(layout: Layout) -> dict[str, Any]:
    """`pulumi up` of the stack against the stand-ins (rehearsal/deploy.py): the program's
    own __main__.py creates what the hosts need; nothing is rendered here."""
    from .deploy import StandIns, cross_check, deployment_record, run_program
    from .layout import ONPREM_SITE, read_state

    region = layout.cfg.region
    aws = StandIns(lambda svc: client(svc, region))
    overlay = None
    if layout.onprem is not None and layout.onprem.source != "stack":
        import yaml

        overlay = yaml.safe_load(ONPREM_SITE.read_text())["config"]
    portal_overlay = read_state(layout.workdir).get("portal_overlay")  # `--portal reference`: its artifact
    if portal_overlay:
        overlay = {**(overlay or {}), **portal_overlay}
    t0 = time.monotonic()
    run, mocks = run_program(layout.stack, aws, region, EIP_PUBLIC_IP, overlay=overlay,
                             secret_config=tls_config(layout.cfg, EIP_PUBLIC_IP))
    log(f"program: {len([r for r in run.resources if not r.type.startswith('hpc:')])} resources in "
        f"{time.monotonic() - t0:.1f}s")
    problems = cross_check(aws, run, mocks, region)
    if problems:
        raise RuntimeError("the deployed stack differs from what the stand-ins hold:\n  " + "\n  ".join(problems))
    record = deployment_record(aws, run, region, ENDPOINT_URL)
    for name, h in record["hosts"].items():
        log(f"{name}: {h['instance_id']} {h['ip']} user-data {h['user_data_bytes']} B")
    return record


# ------------------------------------------------------------------------------ IMDS


class Imds:
    """Instance metadata answered from the EC2 stand-in, by the caller's private address."""

    def __init__(self, region: str):
        self.region = region
        self.ec2 = client("ec2", region)
        self.iam = client("iam", region)
        self.tokens: dict[str, float] = {}
        self.lock = threading.Lock()
        self.cache: dict[str, tuple[float, dict[str, Any]]] = {}
        self.user_data_cache: dict[str, bytes] = {}

    def instance_for(self, ip: str) -> dict[str, Any] | None:
        now = time.monotonic()
        with self.lock:
            hit = self.cache.get(ip)
            if hit and now - hit[0] < 2.0:
                return hit[1]
        enis = self.ec2.describe_network_interfaces(
            Filters=[{"Name": "private-ip-address", "Values": [ip]}])["NetworkInterfaces"]
        for eni in enis:
            att = eni.get("Attachment") or {}
            if not att.get("InstanceId"):
                continue
            inst = self.ec2.describe_instances(InstanceIds=[att["InstanceId"]])["Reservations"][0]["Instances"][0]
            if inst["State"]["Name"] not in ("pending", "running"):
                continue
            info = {"instance_id": inst["InstanceId"], "mac": eni["MacAddress"], "eni": eni["NetworkInterfaceId"],
                    "role": self.role_of(inst),
                    "ip": ip, "az": inst["Placement"]["AvailabilityZone"], "type": inst["InstanceType"],
                    "hostname": f"ip-{ip.replace('.', '-')}.{self.region}.compute.internal"}
            with self.lock:
                self.cache[ip] = (now, info)
            return info
        return None

    def role_of(self, inst: dict[str, Any]) -> str:
        """The role of the instance's profile (the program's), as IMDS names it."""
        arn = (inst.get("IamInstanceProfile") or {}).get("Arn", "")
        if not arn:
            return ""
        profile = self.iam.get_instance_profile(InstanceProfileName=arn.rsplit("/", 1)[-1])["InstanceProfile"]
        return str(profile["Roles"][0]["RoleName"]) if profile.get("Roles") else ""

    def user_data(self, instance_id: str) -> bytes:
        """The instance's user-data as EC2 holds it (fixed for an instance's life)."""
        with self.lock:
            if instance_id in self.user_data_cache:
                return self.user_data_cache[instance_id]
        attr = self.ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
        value = (attr.get("UserData") or {}).get("Value")
        data = base64.b64decode(value) if value else b""
        with self.lock:
            self.user_data_cache[instance_id] = data
        return data

    def answer(self, method: str, path: str, headers: Any, src: str) -> tuple[int, str, bytes]:
        if method == "PUT" and path == "/latest/api/token":
            ttl = headers.get("X-aws-ec2-metadata-token-ttl-seconds")
            if not ttl or not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                return 400, "text/plain", b"missing or invalid X-aws-ec2-metadata-token-ttl-seconds\n"
            token = pysecrets.token_urlsafe(32)
            with self.lock:
                self.tokens[token] = time.time() + int(ttl)
            return 200, "text/plain", token.encode()
        if method != "GET":
            return 405, "text/plain", b""
        token = headers.get("X-aws-ec2-metadata-token", "")
        with self.lock:
            valid = self.tokens.get(token, 0) > time.time()
        if not valid:  # IMDSv2 required (http_tokens = "required")
            return 401, "text/plain", b""
        info = self.instance_for(src)
        if info is None:
            return 404, "text/plain", b""
        now = dt.datetime.now(dt.UTC)
        creds = {"Code": "Success", "Type": "AWS-HMAC", "AccessKeyId": "ASIAREHEARSAL0000000",
                 "SecretAccessKey": "rehearsal", "Token": "rehearsal-session",
                 "LastUpdated": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
                 "Expiration": (now + dt.timedelta(hours=6)).strftime("%Y-%m-%dT%H:%M:%SZ")}
        # One tree, as EC2 answers it under /latest/ and the dated versions cloud-init asks.
        return answer_path(path, info, self.user_data(info["instance_id"]), self.region,
                           role=info["role"] or None, credentials=creds)


def serve_imds(imds: Imds) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def _do(self) -> None:
            try:
                code, ctype, body = imds.answer(self.command, self.path.split("?")[0], self.headers,
                                                self.client_address[0])
            except Exception as e:  # noqa: BLE001 - answer 500 rather than hang the caller
                code, ctype, body = 500, "text/plain", str(e).encode()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _do_late(self) -> None:
            d = FAULTS.delay()
            if d:
                time.sleep(d)
            self._do()

        do_GET = do_PUT = _do_late

        def log_message(self, format: str, *args: Any) -> None:
            pass

    srv = ThreadingHTTPServer((IMDS_IP, 80), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True, name="imds").start()
    return srv


def serve_mirror(top: Path) -> ThreadingHTTPServer:
    """The package mirror stand-in (rehearsal/mirror.py): what apt reaches through a NAT."""
    import functools
    from http.server import SimpleHTTPRequestHandler

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    srv = ThreadingHTTPServer((MIRROR_IP, 80), functools.partial(Handler, directory=str(top)))
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True, name="mirror").start()
    return srv


# ------------------------------------------------------------------------ EIP watcher


def watch_eip(region: str, allocation_id: str, public_ip: str, moves_log: Path, stop: threading.Event) -> None:
    ec2 = client("ec2", region)
    current: str | None = "unset"
    while not stop.is_set():
        try:
            addr = ec2.describe_addresses(AllocationIds=[allocation_id])["Addresses"][0]
            target = addr.get("PrivateIpAddress") if addr.get("NetworkInterfaceId") else None
            if target != current:
                set_eip_target(public_ip, target)
                with moves_log.open("a") as f:
                    f.write(json.dumps({"t": time.time(), "private_ip": target,
                                        "eni": addr.get("NetworkInterfaceId")}) + "\n")
                log(f"EIP {public_ip} -> {target or 'unassociated'}")
                current = target
        except Exception as e:  # noqa: BLE001 - keep watching
            log(f"EIP watcher: {e}")
        stop.wait(0.2)


# ------------------------------------------------------------------------ operations


def serve_ops(path: Path, region: str) -> None:
    clients: dict[str, Any] = {}

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            try:
                req = json.loads(self.rfile.readline())
                if req.get("op") == "call":
                    svc = req["service"]
                    if svc not in clients:
                        clients[svc] = client(svc, region)
                    kwargs = req.get("kwargs", {})
                    for key in [k for k in kwargs if k.endswith("_b64")]:  # bytes travel as base64
                        kwargs[key[:-4]] = base64.b64decode(kwargs.pop(key))
                    result = getattr(clients[svc], req["method"])(**kwargs)
                    result.pop("ResponseMetadata", None)
                    if "Body" in result:
                        result["Body"] = base64.b64encode(result["Body"].read()).decode()
                    out = {"ok": True, "result": result}
                elif req.get("op") == "ping":
                    out = {"ok": True}
                elif req.get("op") == "ssm-log":  # the Run Command invocations so far, in order
                    out = {"ok": True, "result": list(AGENT.log) if AGENT else []}
                elif req.get("op") == "api-faults":
                    out = {"ok": True, "result": FAULTS.set(**req.get("kwargs", {}))}
                else:
                    out = {"ok": False, "error": f"unknown op {req.get('op')!r}"}
            except Exception as e:  # noqa: BLE001
                out = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            self.wfile.write((json.dumps(out, default=str) + "\n").encode())

    if path.exists():
        path.unlink()
    srv = socketserver.ThreadingUnixStreamServer(str(path), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True, name="ops").start()


AGENT: SsmAgent | None = None


def host_agent(region: str) -> SsmAgent:
    """The SSM agent stand-in of the rehearsal's hosts: an instance is reachable while
    EC2 says it runs and its host (the systemd container named by its Name tag) is up."""
    from . import container as C

    ec2 = client("ec2", region)

    def host_of(instance_id: str) -> str | None:
        try:
            r = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
        except Exception:  # noqa: BLE001 - InvalidInstanceID.NotFound
            return None
        inst = r[0]["Instances"][0] if r else {}
        name = {t["Key"]: t["Value"] for t in inst.get("Tags", [])}.get("Name")
        if inst.get("State", {}).get("Name") != "running" or not name or not C.alive(name):
            return None
        return str(name)

    def execute(host: str, script: str, timeout: float) -> tuple[int, str]:
        return C.exec(C.handle(host), ["sh", "-c", script], timeout=timeout)

    global AGENT
    AGENT = SsmAgent(host_of, execute)
    return AGENT


def api_faults(workdir: Path, **kwargs: Any) -> dict[str, Any]:
    """Set the API faults of the running stand-ins (see ApiFaults.set); {} turns them off."""
    out = sockcall.call(workdir / "awsd.sock", {"op": "api-faults", "kwargs": kwargs}, 10)
    if not out or not out.get("ok"):
        raise RuntimeError(f"api faults: {(out or {}).get('error', 'no answer')}")
    return dict(out["result"])


def ssm_log(workdir: Path) -> list[dict[str, Any]]:
    """Every command the SSM agent stand-in ran: time, host, command id, its first line."""
    out = sockcall.call(workdir / "awsd.sock", {"op": "ssm-log"}, 10)
    if not out or not out.get("ok"):
        raise RuntimeError(f"ssm log: {(out or {}).get('error', 'no answer')}")
    return list(out["result"])


def ops_call(workdir: Path, service: str, method: str, timeout: float = 30, **kwargs: Any) -> Any:
    """From outside the namespace: one AWS API call against the stand-ins."""
    out = sockcall.call(workdir / "awsd.sock", {"op": "call", "service": service, "method": method, "kwargs": kwargs},
                        timeout)
    if not out or not out.get("ok"):
        raise RuntimeError(f"{service}.{method}: {(out or {}).get('error', 'the operations socket closed without an answer')}")
    return out["result"]


def main(argv: list[str]) -> int:
    workdir, stack = Path(argv[0]), argv[1]
    os.chdir(Path(__file__).resolve().parent.parent)
    layout = build_layout(stack, workdir)
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)

    server = faulty_moto_server(ENDPOINT_IP, ENDPOINT_PORT, FAULTS, host_agent(layout.cfg.region))
    server.start()
    log(f"moto server on {ENDPOINT_URL}")
    try:
        info = deploy(layout)
    except Exception:
        traceback.print_exc()
        (workdir / "deploy.failed").write_text(traceback.format_exc())
        return 1
    tmp = workdir / "deploy.json.tmp"
    tmp.write_text(json.dumps(info, indent=2, sort_keys=True))
    imds = Imds(layout.cfg.region)
    serve_imds(imds)
    log(f"instance metadata on http://{IMDS_IP}/")
    stop = threading.Event()
    threading.Thread(target=watch_eip, args=(layout.cfg.region, info["eip"]["allocation_id"], info["eip"]["public_ip"],
                                             workdir / "eip-moves.log", stop), daemon=True, name="eip").start()
    serve_ops(workdir / "awsd.sock", layout.cfg.region)
    if os.environ.get("HPC_REHEARSAL_MIRROR"):
        serve_mirror(Path(os.environ["HPC_REHEARSAL_MIRROR"]))
        log(f"package mirror on http://{MIRROR_IP}/debian")
    tmp.rename(workdir / "deploy.json")  # readiness signal
    log("ready")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        stop.set()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
