"""The AWS stand-ins, run in the `rh-aws` namespace (`python -m rehearsal.awsd WORKDIR STACK`):

- moto server (EC2, SSM, S3) on ENDPOINT_IP:443, playing the VPC interface endpoints;
- the deploy step: the stack's VPC, subnets, one instance per host (its user-data = the
  renderer's bytes, passed to RunInstances), the Elastic IP, SecureString secrets under
  the stack's SSM path, the buckets and the hosts' bundles; writes deploy.json;
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
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from . import sockcall
from .layout import EIP_PUBLIC_IP, ENDPOINT_IP, ENDPOINT_PORT, IMDS_IP, Layout, build_layout
from .netns import set_eip_target

ENDPOINT_URL = f"http://{ENDPOINT_IP}:{ENDPOINT_PORT}"
ROLE_NAME = "hpc-portal-host"


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} awsd: {msg}", flush=True)


def client(service: str, region: str) -> Any:
    return boto3.client(service, region_name=region, endpoint_url=ENDPOINT_URL,
                        aws_access_key_id="rehearsal", aws_secret_access_key="rehearsal",
                        config=Config(retries={"max_attempts": 2}, connect_timeout=3, read_timeout=20))


# --------------------------------------------------------------------------- secrets


def make_secrets(workdir: Path, public_ip: str) -> dict[str, str]:
    """Fresh values for every secret the hosts read (never written anywhere but SSM)."""
    def pw() -> str:
        return pysecrets.token_urlsafe(24).replace("-", "x").replace("_", "y")

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        key, crt = os.path.join(tmp, "k.pem"), os.path.join(tmp, "c.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "365",
                        "-subj", "/CN=portal.rehearsal.invalid", "-addext",
                        f"subjectAltName=DNS:portal.rehearsal.invalid,IP:{public_ip}",
                        "-keyout", key, "-out", crt], check=True, capture_output=True)
        tls_pem = Path(crt).read_text() + Path(key).read_text()
    return {
        "redis_password": pw(), "mariadb_root_password": pw(), "mariadb_app_password": pw(),
        "mariadb_slurm_password": pw(), "galera_sst_password": pw(), "clustercheck_password": pw(),
        "grafana_admin_password": pw(),
        "munge_key": base64.b64encode(os.urandom(1024)).decode(),
        "tls_pem": tls_pem,
    }


# ---------------------------------------------------------------------------- deploy


def deploy(layout: Layout) -> dict[str, Any]:
    """Create the stack in the EC2/SSM/S3 stand-ins and render every host (see module doc)."""
    from cloud_init.render import render_host
    from components.hostctx import Deployed, host_context

    cfg, topo = layout.cfg, layout.topo
    region = cfg.region
    ec2, ssm, s3 = client("ec2", region), client("ssm", region), client("s3", region)

    vpc = ec2.create_vpc(CidrBlock=cfg.network.vpc_cidr)["Vpc"]["VpcId"]
    subnet_ids: dict[str, str] = {}
    for s in layout.subnets:
        subnet_ids[s.cidr] = ec2.create_subnet(VpcId=vpc, CidrBlock=s.cidr, AvailabilityZone=s.az)["Subnet"]["SubnetId"]
    eip = ec2.allocate_address(Domain="vpc", Address=EIP_PUBLIC_IP)
    suffix = pysecrets.token_hex(4)
    bundle_bucket = f"{cfg.project}-{cfg.stack}-bundles-{suffix}"
    backup_bucket = f"{cfg.project}-{cfg.stack}-backups-{suffix}"
    for b in (bundle_bucket, backup_bucket):
        s3.create_bucket(Bucket=b, CreateBucketConfiguration={"LocationConstraint": region})
    for name, value in make_secrets(layout.workdir, eip["PublicIp"]).items():
        ssm.put_parameter(Name=f"{cfg.ssm_path}/secrets/{name}", Value=value, Type="SecureString")

    dep = Deployed(
        efs_dns_name=f"fs-rehearsal{suffix}.efs.{region}.amazonaws.com",
        efs_access_points={"data": "fsap-rehearsaldata", "dist": "fsap-rehearsaldist", "slurm": "fsap-rehearsalslurm"},
        eip_allocation_id=eip["AllocationId"], eip_public_ip=eip["PublicIp"],
        bundle_bucket=bundle_bucket, backup_bucket=backup_bucket, aws_endpoint_url=ENDPOINT_URL,
    )
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    iam = client("iam", region)
    iam.create_role(RoleName=ROLE_NAME, AssumeRolePolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"},
                                                "Action": "sts:AssumeRole"}]}))
    iam.create_instance_profile(InstanceProfileName=ROLE_NAME)
    iam.add_role_to_instance_profile(InstanceProfileName=ROLE_NAME, RoleName=ROLE_NAME)
    hosts: dict[str, Any] = {}
    for h in topo.hosts:
        ctx = host_context(cfg, topo, h, dep)
        rendered = render_host(ctx)
        if rendered.bundle is not None:
            s3.put_object(Bucket=ctx["bundle"]["bucket"], Key=ctx["bundle"]["key"], Body=rendered.bundle)
        rh = layout.host(h.name)
        # A persistent interface per host, as the program creates it: a replacement
        # instance gets the same interface, address and security groups.
        eni_id = ec2.create_network_interface(SubnetId=subnet_ids[rh.subnet.cidr], PrivateIpAddress=h.ip,
                                              Description=f"{h.name} primary")["NetworkInterface"]["NetworkInterfaceId"]
        inst = ec2.run_instances(
            ImageId=image, MinCount=1, MaxCount=1, InstanceType=h.instance_type,
            NetworkInterfaces=[{"DeviceIndex": 0, "NetworkInterfaceId": eni_id}], UserData=rendered.user_data,
            Placement={"AvailabilityZone": h.az},
            IamInstanceProfile={"Name": ROLE_NAME},
            TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "Name", "Value": h.name}]}],
        )["Instances"][0]
        eni = inst["NetworkInterfaces"][0]
        hosts[h.name] = {
            "instance_id": inst["InstanceId"], "eni": eni["NetworkInterfaceId"], "mac": eni["MacAddress"],
            "ip": h.ip, "az": h.az, "user_data_bytes": len(rendered.user_data),
            "bundle_bytes": len(rendered.bundle) if rendered.bundle else 0,
            "bundle_files": rendered.bundle_files, "packages": rendered.packages,
            "files": [f.path for f in rendered.files],
            "commands": rendered.commands,
        }
        log(f"{h.name}: {inst['InstanceId']} {h.ip} user-data {len(rendered.user_data)} B"
            + (f", bundle {len(rendered.bundle)} B" if rendered.bundle else ""))
    return {
        "stack": cfg.stack, "region": region, "endpoint_url": ENDPOINT_URL, "vpc": vpc,
        "eip": {"allocation_id": eip["AllocationId"], "public_ip": eip["PublicIp"]},
        "buckets": {"bundle": bundle_bucket, "backup": backup_bucket},
        "ssm_path": cfg.ssm_path, "hosts": hosts,
    }


# ------------------------------------------------------------------------------ IMDS


class Imds:
    """Instance metadata answered from the EC2 stand-in, by the caller's private address."""

    def __init__(self, region: str):
        self.region = region
        self.ec2 = client("ec2", region)
        self.tokens: dict[str, float] = {}
        self.lock = threading.Lock()
        self.cache: dict[str, tuple[float, dict[str, Any]]] = {}

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
                    "ip": ip, "az": inst["Placement"]["AvailabilityZone"], "type": inst["InstanceType"],
                    "hostname": f"ip-{ip.replace('.', '-')}.{self.region}.compute.internal"}
            with self.lock:
                self.cache[ip] = (now, info)
            return info
        return None

    def user_data(self, instance_id: str) -> bytes:
        attr = self.ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
        value = (attr.get("UserData") or {}).get("Value")
        return base64.b64decode(value) if value else b""

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
        if path == "/latest/user-data":
            data = self.user_data(info["instance_id"])
            return (200, "application/octet-stream", data) if data else (404, "text/plain", b"")
        md = "/latest/meta-data/"
        if path == "/latest/dynamic/instance-identity/document":
            doc = {"instanceId": info["instance_id"], "region": self.region, "availabilityZone": info["az"],
                   "privateIp": info["ip"], "instanceType": info["type"], "accountId": "123456789012"}
            return 200, "application/json", json.dumps(doc).encode()
        if not path.startswith(md):
            return 404, "text/plain", b""
        key = path[len(md):]
        now = dt.datetime.now(dt.UTC)
        creds = {"Code": "Success", "Type": "AWS-HMAC", "AccessKeyId": "ASIAREHEARSAL0000000",
                 "SecretAccessKey": "rehearsal", "Token": "rehearsal-session",
                 "LastUpdated": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
                 "Expiration": (now + dt.timedelta(hours=6)).strftime("%Y-%m-%dT%H:%M:%SZ")}
        values = {
            "": "ami-id\nhostname\ninstance-id\ninstance-type\nlocal-ipv4\nmac\nnetwork/\nplacement/\niam/",
            "instance-id": info["instance_id"], "mac": info["mac"], "local-ipv4": info["ip"],
            "instance-type": info["type"], "hostname": info["hostname"], "local-hostname": info["hostname"],
            "ami-id": "ami-rehearsal", "placement/availability-zone": info["az"], "placement/region": self.region,
            f"network/interfaces/macs/{info['mac']}/interface-id": info["eni"],
            f"network/interfaces/macs/{info['mac']}/local-ipv4s": info["ip"],
            "network/interfaces/macs/": info["mac"] + "/",
            "iam/security-credentials/": ROLE_NAME, "iam/security-credentials": ROLE_NAME,
            f"iam/security-credentials/{ROLE_NAME}": json.dumps(creds),
        }
        if key in values:
            return 200, "text/plain", values[key].encode()
        return 404, "text/plain", b""


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

        do_GET = do_PUT = _do

        def log_message(self, format: str, *args: Any) -> None:
            pass

    srv = ThreadingHTTPServer((IMDS_IP, 80), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True, name="imds").start()
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

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)

    server = ThreadedMotoServer(ip_address=ENDPOINT_IP, port=ENDPOINT_PORT, verbose=False)
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
