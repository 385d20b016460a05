"""Pulumi mocks that know every resource type and invoke the program uses, and fail
loudly on anything else.

A new resource type or data-source call in the program makes the tests fail until its
mock behaviour (the outputs AWS would compute) is written here, so no assertion can pass
on a property the mock silently left empty.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pulumi

ACCOUNT = "123456789012"
REGION = "ap-northeast-2"


def _hex(name: str, n: int = 17) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:n]


def _pem(kind: str, name: str) -> str:
    body = hashlib.sha256(name.encode()).hexdigest() * 2
    return f"-----BEGIN {kind}-----\n{body}\n-----END {kind}-----\n"


# type token -> (id prefix, function(name, inputs) -> extra computed outputs)
Computed = Callable[[str, dict[str, Any]], dict[str, Any]]


def _none(name: str, inputs: dict[str, Any]) -> dict[str, Any]:
    return {}


def _arn(service: str, what: str) -> Computed:
    return lambda name, inputs: {"arn": f"arn:aws:{service}:{REGION}:{ACCOUNT}:{what}/{name}"}


def _bucket(name: str, inputs: dict[str, Any]) -> dict[str, Any]:
    bucket = inputs.get("bucket") or f"{inputs.get('bucketPrefix', name + '-')}{_hex(name, 12)}"
    return {"bucket": bucket, "arn": f"arn:aws:s3:::{bucket}", "bucketDomainName": f"{bucket}.s3.amazonaws.com"}


def _iam_role(name: str, inputs: dict[str, Any]) -> dict[str, Any]:
    rname = inputs.get("name") or f"{name}-{_hex(name, 7)}"
    return {"name": rname, "arn": f"arn:aws:iam::{ACCOUNT}:role/{rname}", "uniqueId": "AROA" + _hex(name, 16).upper()}


def _profile(name: str, inputs: dict[str, Any]) -> dict[str, Any]:
    pname = inputs.get("name") or f"{name}-{_hex(name, 7)}"
    return {"name": pname, "arn": f"arn:aws:iam::{ACCOUNT}:instance-profile/{pname}"}


def _eip(name: str, inputs: dict[str, Any]) -> dict[str, Any]:
    n = int(_hex(name, 4), 16)
    return {"allocationId": f"eipalloc-{_hex(name)}", "publicIp": f"203.0.113.{n % 250 + 1}"}


def _efs(name: str, inputs: dict[str, Any]) -> dict[str, Any]:
    fid = f"fs-{_hex(name)}"
    return {"dnsName": f"{fid}.efs.{REGION}.amazonaws.com", "arn": f"arn:aws:elasticfilesystem:{REGION}:{ACCOUNT}:file-system/{fid}"}


def _instance(name: str, inputs: dict[str, Any]) -> dict[str, Any]:
    return {"arn": f"arn:aws:ec2:{REGION}:{ACCOUNT}:instance/i-{_hex(name)}", "instanceState": "running"}


def _eni(name: str, inputs: dict[str, Any]) -> dict[str, Any]:
    ips = inputs.get("privateIps") or []
    return {"privateIp": ips[0] if ips else None, "macAddress": "02:00:00:" + ":".join(_hex(name, 6)[i:i + 2] for i in (0, 2, 4))}


def _zone(name: str, inputs: dict[str, Any]) -> dict[str, Any]:
    return {"zoneId": "Z" + _hex(name, 20).upper(), "nameServers": []}


def _password(name: str, inputs: dict[str, Any]) -> dict[str, Any]:
    return {"result": "pw" + _hex("secret" + name, 30), "bcryptHash": "x"}


def _bytes(name: str, inputs: dict[str, Any]) -> dict[str, Any]:
    import base64

    length = int(inputs.get("length", 32))
    raw = hashlib.sha256(name.encode()).digest() * (length // 32 + 1)
    return {"base64": base64.b64encode(raw[:length]).decode(), "hex": raw.hex()}


RESOURCE_TYPES: dict[str, tuple[str, Computed]] = {
    "aws:ec2/vpc:Vpc": ("vpc", _arn("ec2", "vpc")),
    "aws:ec2/internetGateway:InternetGateway": ("igw", _none),
    "aws:ec2/subnet:Subnet": ("subnet", _arn("ec2", "subnet")),
    "aws:ec2/routeTable:RouteTable": ("rtb", _none),
    "aws:ec2/routeTableAssociation:RouteTableAssociation": ("rtbassoc", _none),
    "aws:ec2/eip:Eip": ("eipalloc", _eip),
    "aws:ec2/natGateway:NatGateway": ("nat", _none),
    "aws:ec2/vpcEndpoint:VpcEndpoint": ("vpce", _none),
    "aws:ec2/securityGroup:SecurityGroup": ("sg", _arn("ec2", "security-group")),
    "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule": ("sgr", _none),
    "aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule": ("sgr", _none),
    "aws:ec2/networkInterface:NetworkInterface": ("eni", _eni),
    "aws:ec2/instance:Instance": ("i", _instance),
    "aws:ec2/volumeAttachment:VolumeAttachment": ("vai", _none),
    "aws:ebs/volume:Volume": ("vol", _arn("ec2", "volume")),
    "aws:route53/zone:Zone": ("Z", _zone),
    "aws:route53/record:Record": ("rec", _none),
    "aws:efs/fileSystem:FileSystem": ("fs", _efs),
    "aws:efs/backupPolicy:BackupPolicy": ("fsbp", _none),
    "aws:efs/mountTarget:MountTarget": ("fsmt", _none),
    "aws:efs/accessPoint:AccessPoint": ("fsap", _arn("elasticfilesystem", "access-point")),
    "aws:s3/bucket:Bucket": ("bucket", _bucket),
    "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock": ("pab", _none),
    "aws:s3/bucketOwnershipControls:BucketOwnershipControls": ("own", _none),
    "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration": ("sse", _none),
    "aws:s3/bucketVersioning:BucketVersioning": ("ver", _none),
    "aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration": ("lc", _none),
    "aws:s3/bucketObjectv2:BucketObjectv2": ("obj", _none),
    "aws:iam/role:Role": ("role", _iam_role),
    "aws:iam/rolePolicy:RolePolicy": ("rp", _none),
    "aws:iam/rolePolicyAttachment:RolePolicyAttachment": ("rpa", _none),
    "aws:iam/policy:Policy": ("pol", lambda n, i: {"arn": f"arn:aws:iam::{ACCOUNT}:policy/{n}", "name": n}),
    "aws:iam/instanceProfile:InstanceProfile": ("ip", _profile),
    "aws:dlm/lifecyclePolicy:LifecyclePolicy": ("policy", _arn("dlm", "policy")),
    "aws:ssm/parameter:Parameter": ("param", _none),
    "aws:ec2/vpnGateway:VpnGateway": ("vgw", _none),
    "aws:ec2/customerGateway:CustomerGateway": ("cgw", _none),
    "aws:ec2/vpnConnection:VpnConnection": ("vpn", _none),
    "aws:ec2/vpnConnectionRoute:VpnConnectionRoute": ("vpnroute", _none),
    "aws:ec2transitgateway/vpcAttachment:VpcAttachment": ("tgw-attach", _none),
    "aws:ec2/route:Route": ("r", _none),
    "aws:route53/healthCheck:HealthCheck": ("hc", _none),
    "aws:cloudwatch/metricAlarm:MetricAlarm": ("alarm", _arn("cloudwatch", "alarm")),
    "command:local:Command": ("cmd", lambda n, i: {"stdout": "ready", "stderr": ""}),
    "random:index/randomPassword:RandomPassword": ("none", _password),
    "random:index/randomBytes:RandomBytes": ("none", _bytes),
    "tls:index/privateKey:PrivateKey": ("key", lambda n, i: {"privateKeyPem": _pem("PRIVATE KEY", n),
                                                              "publicKeyPem": _pem("PUBLIC KEY", n)}),
    "tls:index/selfSignedCert:SelfSignedCert": ("cert", lambda n, i: {"certPem": _pem("CERTIFICATE", n)}),
}

CANONICAL_AMI_PREFIX = "/aws/service/canonical/ubuntu/server/24.04/stable/current/"


def stand_in_ami(parameter: str) -> str:
    """The AMI id the stand-ins answer for a Canonical parameter: stable per name (17 hex
    digits, as EC2's are), starting with ami-0fff so a reader sees it is no real image."""
    return "ami-0fff" + _hex(parameter, 13)


def _get_parameter(a: dict[str, Any]) -> dict[str, Any]:
    """Only Canonical's public Ubuntu 24.04 AMI parameters: the program reads no other."""
    name = str(a.get("name", ""))
    if not (name.startswith(CANONICAL_AMI_PREFIX) and name.endswith("/hvm/ebs-gp3/ami-id")):
        raise UnknownMock(f"no mock for SSM parameter {name!r}: the program reads only Canonical's Ubuntu AMI ids")
    value = stand_in_ami(name)
    return {"name": name, "value": value, "insecureValue": value, "type": "String", "version": 1,
            "arn": f"arn:aws:ssm:{REGION}::parameter{name}", "id": name, "withDecryption": True}


INVOKES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "aws:ssm/getParameter:getParameter": _get_parameter,
    "aws:index/getCallerIdentity:getCallerIdentity": lambda a: {
        "accountId": ACCOUNT, "arn": f"arn:aws:iam::{ACCOUNT}:user/test", "userId": "AIDATEST", "id": ACCOUNT},
    "aws:index/getPartition:getPartition": lambda a: {
        "partition": "aws", "dnsSuffix": "amazonaws.com", "reverseDnsPrefix": "com.amazonaws", "id": "aws"},
}


class UnknownMock(AssertionError):
    pass


@dataclass
class Recorded:
    type: str
    name: str
    inputs: dict[str, Any]
    id: str
    outputs: dict[str, Any]
    custom: bool


@dataclass
class StrictMocks(pulumi.runtime.Mocks):
    resources: list[Recorded] = field(default_factory=list)
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str | None, dict[str, Any]]:
        if args.typ.startswith("hpc:"):  # our own component resources
            self.resources.append(Recorded(args.typ, args.name, dict(args.inputs), "", {}, bool(args.custom)))
            return (None, {})
        if args.typ not in RESOURCE_TYPES:
            raise UnknownMock(f"no mock for resource type {args.typ} ({args.name}): add it to offline/mocks.py")
        prefix, computed = RESOURCE_TYPES[args.typ]
        rid = f"{prefix}-{_hex(args.typ + args.name)}"
        outputs = {**args.inputs, **computed(args.name, dict(args.inputs))}
        if args.typ == "aws:efs/fileSystem:FileSystem":
            outputs["dnsName"] = f"{rid}.efs.{REGION}.amazonaws.com"
        if args.typ == "aws:ec2/eip:Eip":
            rid = outputs["allocationId"]
        if args.typ == "aws:s3/bucket:Bucket":
            rid = outputs["bucket"]
        if args.typ == "aws:route53/zone:Zone":
            rid = outputs["zoneId"]
        self.resources.append(Recorded(args.typ, args.name, dict(args.inputs), rid, outputs, bool(args.custom)))
        return (rid, outputs)

    def call(self, args: pulumi.runtime.MockCallArgs) -> Any:
        if args.token not in INVOKES:
            raise UnknownMock(f"no mock for invoke {args.token}: add it to offline/mocks.py")
        self.calls.append((args.token, dict(args.args)))
        return INVOKES[args.token](dict(args.args))
