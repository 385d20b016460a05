"""Deploy the stack the way `pulumi up` would: run the program's own `__main__.py` and let
every resource a host needs be created in the AWS stand-ins (moto's EC2, EFS, S3, SSM,
IAM), with the stand-ins' ids and attributes handed back to the program as outputs.

There is no second rendering here: each instance's user-data is what the program passed
to `aws.ec2.Instance` (checked byte for byte after the run), the hosts' security groups
are the rules the program registered (read back from the EC2 stand-in), and the values a
host's files carry (EFS name, access points, Elastic IP allocation, buckets) flow from
the stand-ins through the program's own wiring.

Resource types with nothing a host could observe (route tables, NAT gateways, DNS
records, policies, ...) get the offline mocks' deterministic ids; a type neither list
knows fails the deploy (offline.mocks.UnknownMock), as in the unit tests. Generated
secrets are real here: random passwords and munge key from the OS's generator, a real
key and certificate where the program generates one.

Runs inside the AWS stand-ins' namespace (rehearsal/awsd.py), where the endpoint is
reachable; `deploy()` returns what deploy.json records.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import os
import secrets as pysecrets
import string
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pulumi

from components.stackfile import namespace, overlay_config, project_name, read_stack
from offline.harness import ProgramRun, run_stack
from offline.mocks import Recorded, StrictMocks

# How Pulumi's mocks hand a secret input to new_resource.
_SECRET_SIG = "4dabf18193072939515e22adb298388d"
_ALNUM = string.ascii_letters + string.digits


def plain(v: Any) -> Any:
    """An input value with Pulumi's secret wrapper removed (the value is needed as-is)."""
    if isinstance(v, dict):
        if v.get(_SECRET_SIG) == "1b47061264138c4ac30d75fd1eb44270":
            return plain(v.get("value"))
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [plain(x) for x in v]
    return v


def _int(v: Any) -> int:
    return int(float(v))


def _tags(inputs: dict[str, Any], resource_type: str) -> list[dict[str, Any]]:
    tags = inputs.get("tags") or {}
    if not tags:
        return []
    return [{"ResourceType": resource_type, "Tags": [{"Key": k, "Value": str(v)} for k, v in sorted(tags.items())]}]


def _self_signed_pem(key: Any, common_name: str, dns_names: list[str], ip_addresses: list[str],
                     valid: dt.timedelta, ca: bool = False) -> str:
    """A self-signed certificate on `key`, as PEM."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + valid)
               .add_extension(x509.SubjectAlternativeName(sans), critical=False))
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def real_key_and_certificate(common_name: str, dns_names: list[str], ip_addresses: list[str] = (),  # type: ignore[assignment]
                             days: int = 365) -> tuple[str, str]:
    """A real ECDSA P-256 key and a self-signed certificate (PEM), as pulumi-tls makes."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    return key_pem, _self_signed_pem(key, common_name, dns_names, list(ip_addresses), dt.timedelta(days=days), ca=True)


@dataclass
class StandIns:
    """boto3 clients of the stand-ins, one per service, built lazily."""

    make_client: Callable[[str], Any]
    clients: dict[str, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, service: str) -> Any:
        with self.lock:
            if service not in self.clients:
                self.clients[service] = self.make_client(service)
            return self.clients[service]


class StandInMocks(StrictMocks):
    """The program's resources created in the AWS stand-ins where a host can observe them;
    every other type through the strict offline mocks."""

    def __init__(self, aws: StandIns, region: str, eip_public_ip: str):
        super().__init__()
        self.aws = aws
        self.region = region
        self.eip_public_ip = eip_public_ip
        self.lock = threading.Lock()
        self.handlers: dict[str, Callable[[str, dict[str, Any]], tuple[str, dict[str, Any]]]] = {
            "aws:ec2/vpc:Vpc": self._vpc,
            "aws:ec2/subnet:Subnet": self._subnet,
            "aws:ec2/securityGroup:SecurityGroup": self._security_group,
            "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule": self._sg_rule(egress=False),
            "aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule": self._sg_rule(egress=True),
            "aws:ec2/networkInterface:NetworkInterface": self._eni,
            "aws:ec2/eip:Eip": self._eip,
            "aws:ec2/instance:Instance": self._instance,
            "aws:ebs/volume:Volume": self._volume,
            "aws:ec2/volumeAttachment:VolumeAttachment": self._attach,
            "aws:efs/fileSystem:FileSystem": self._efs,
            "aws:efs/mountTarget:MountTarget": self._mount_target,
            "aws:efs/accessPoint:AccessPoint": self._access_point,
            "aws:s3/bucket:Bucket": self._bucket,
            "aws:s3/bucketObjectv2:BucketObjectv2": self._object,
            "aws:ssm/parameter:Parameter": self._parameter,
            "aws:iam/role:Role": self._role,
            "aws:iam/instanceProfile:InstanceProfile": self._profile,
            "random:index/randomPassword:RandomPassword": self._password,
            "random:index/randomBytes:RandomBytes": self._bytes,
            "tls:index/privateKey:PrivateKey": self._private_key,
            "tls:index/selfSignedCert:SelfSignedCert": self._self_signed,
        }
        self.user_data: dict[str, bytes] = {}  # instance id -> the bytes the program passed

    # ------------------------------------------------------------------ dispatch
    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str | None, dict[str, Any]]:
        handler = self.handlers.get(args.typ)
        if handler is None:
            return super().new_resource(args)
        inputs = plain(dict(args.inputs))
        rid, computed = handler(args.name, inputs)
        outputs = {**args.inputs, **computed}
        with self.lock:
            self.resources.append(Recorded(args.typ, args.name, dict(args.inputs), rid, outputs, bool(args.custom)))
        return rid, outputs

    # ------------------------------------------------------------------ network
    def _vpc(self, name: str, i: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        ec2 = self.aws("ec2")
        vpc = ec2.create_vpc(CidrBlock=i["cidrBlock"], TagSpecifications=_tags(i, "vpc"))["Vpc"]
        for attr in ("enableDnsSupport", "enableDnsHostnames"):
            if attr in i:
                ec2.modify_vpc_attribute(VpcId=vpc["VpcId"], **{attr[0].upper() + attr[1:]: {"Value": bool(i[attr])}})
        return vpc["VpcId"], {"arn": f"arn:aws:ec2:{self.region}:{vpc['OwnerId']}:vpc/{vpc['VpcId']}",
                              "ownerId": vpc["OwnerId"], "defaultSecurityGroupId": "", "mainRouteTableId": ""}

    def _subnet(self, name: str, i: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        s = self.aws("ec2").create_subnet(VpcId=i["vpcId"], CidrBlock=i["cidrBlock"],
                                          AvailabilityZone=i["availabilityZone"],
                                          TagSpecifications=_tags(i, "subnet"))["Subnet"]
        return s["SubnetId"], {"arn": s.get("SubnetArn", ""), "availabilityZoneId": s.get("AvailabilityZoneId", "")}

    def _security_group(self, name: str, i: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        ec2 = self.aws("ec2")
        group_name = i.get("name") or f"{name}-{pysecrets.token_hex(4)}"
        gid = ec2.create_security_group(GroupName=group_name, Description=i.get("description") or "Managed by Pulumi",
                                        VpcId=i["vpcId"], TagSpecifications=_tags(i, "security-group"))["GroupId"]
        # As the provider does: AWS's default allow-all egress rule is removed, so the
        # program's egress rules are all the egress there is.
        ec2.revoke_security_group_egress(GroupId=gid, IpPermissions=[
            {"IpProtocol": "-1", "FromPort": -1, "ToPort": -1, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
        return gid, {"arn": f"arn:aws:ec2:{self.region}:123456789012:security-group/{gid}", "name": group_name}

    def _sg_rule(self, egress: bool) -> Callable[[str, dict[str, Any]], tuple[str, dict[str, Any]]]:
        def create(name: str, i: dict[str, Any]) -> tuple[str, dict[str, Any]]:
            ec2 = self.aws("ec2")
            proto = str(i["ipProtocol"])
            perm: dict[str, Any] = {"IpProtocol": proto,
                                    "FromPort": _int(i["fromPort"]) if "fromPort" in i else -1,
                                    "ToPort": _int(i["toPort"]) if "toPort" in i else -1}
            desc = i.get("description", "")
            if i.get("referencedSecurityGroupId"):
                perm["UserIdGroupPairs"] = [{"GroupId": i["referencedSecurityGroupId"], "Description": desc}]
            else:
                perm["IpRanges"] = [{"CidrIp": i["cidrIpv4"], "Description": desc}]
            call = ec2.authorize_security_group_egress if egress else ec2.authorize_security_group_ingress
            out = call(GroupId=i["securityGroupId"], IpPermissions=[perm])
            rule_id = out["SecurityGroupRules"][0]["SecurityGroupRuleId"]
            return rule_id, {"securityGroupRuleId": rule_id, "arn": ""}
        return create

    def _eni(self, name: str, i: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        ips = i.get("privateIps") or []
        kw: dict[str, Any] = {"SubnetId": i["subnetId"], "Groups": list(i.get("securityGroups") or []),
                              "Description": i.get("description", ""),
                              "TagSpecifications": _tags(i, "network-interface")}
        if ips:
            kw["PrivateIpAddress"] = ips[0]
        eni = self.aws("ec2").create_network_interface(**kw)["NetworkInterface"]
        return eni["NetworkInterfaceId"], {"privateIp": eni["PrivateIpAddress"], "macAddress": eni["MacAddress"],
                                           "privateIps": [eni["PrivateIpAddress"]]}

    def _eip(self, name: str, i: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        # The VIP gets the rehearsal's public address (its router DNATs it); any other
        # Elastic IP (NAT gateways) an address of the stand-in's choosing.
        is_vip = name.endswith("-vip")
        kw: dict[str, Any] = {"Domain": "vpc", "TagSpecifications": _tags(i, "elastic-ip")}
        if is_vip:
            kw["Address"] = self.eip_public_ip
        a = self.aws("ec2").allocate_address(**kw)
        return a["AllocationId"], {"allocationId": a["AllocationId"], "publicIp": a["PublicIp"]}

    # ------------------------------------------------------------------ compute
    def _instance(self, name: str, i: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        user_data = base64.b64decode(i["userDataBase64"]) if i.get("userDataBase64") else \
            (i.get("userData") or "").encode()
        kw: dict[str, Any] = {
            "ImageId": i["ami"], "MinCount": 1, "MaxCount": 1, "InstanceType": i["instanceType"],
            "UserData": user_data,  # boto3 base64-encodes it: EC2 stores these exact bytes
            "TagSpecifications": _tags(i, "instance"),
            "MetadataOptions": {"HttpTokens": (i.get("metadataOptions") or {}).get("httpTokens", "optional"),
                                "HttpEndpoint": "enabled"},
        }
        primary = (i.get("primaryNetworkInterface") or {}).get("networkInterfaceId")
        if primary:
            kw["NetworkInterfaces"] = [{"DeviceIndex": 0, "NetworkInterfaceId": primary}]
        if i.get("iamInstanceProfile"):
            kw["IamInstanceProfile"] = {"Name": i["iamInstanceProfile"]}
        if i.get("disableApiTermination"):
            kw["DisableApiTermination"] = True
        inst = self.aws("ec2").run_instances(**kw)["Instances"][0]
        iid = inst["InstanceId"]
        with self.lock:
            self.user_data[iid] = user_data
        eni = inst["NetworkInterfaces"][0] if inst.get("NetworkInterfaces") else {}
        return iid, {"arn": f"arn:aws:ec2:{self.region}:123456789012:instance/{iid}", "instanceState": "running",
                     "privateIp": inst.get("PrivateIpAddress", ""), "availabilityZone": inst["Placement"]["AvailabilityZone"],
                     "primaryNetworkInterfaceId": eni.get("NetworkInterfaceId", primary or "")}

    def _volume(self, name: str, i: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        v = self.aws("ec2").create_volume(AvailabilityZone=i["availabilityZone"], Size=_int(i["size"]),
                                          VolumeType=i.get("type", "gp3"), Encrypted=bool(i.get("encrypted")),
                                          TagSpecifications=_tags(i, "volume"))
        return v["VolumeId"], {"arn": f"arn:aws:ec2:{self.region}:123456789012:volume/{v['VolumeId']}"}

    def _attach(self, name: str, i: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        self.aws("ec2").attach_volume(Device=i["deviceName"], InstanceId=i["instanceId"], VolumeId=i["volumeId"])
        return f"vai-{hashlib.sha256(name.encode()).hexdigest()[:12]}", {}

    # ------------------------------------------------------------------ storage
    def _efs(self, name: str, i: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        tags = [{"Key": k, "Value": str(v)} for k, v in sorted((i.get("tags") or {}).items())]
        fs = self.aws("efs").create_file_system(CreationToken=f"{name}-{pysecrets.token_hex(6)}", Encrypted=bool(i.get("encrypted")),
                                                PerformanceMode=i.get("performanceMode", "generalPurpose"),
                                                ThroughputMode=i.get("throughputMode", "bursting"), Tags=tags)
        fid = fs["FileSystemId"]
        return fid, {"arn": fs.get("FileSystemArn", ""), "dnsName": f"{fid}.efs.{self.region}.amazonaws.com"}

    def _mount_target(self, name: str, i: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        mt = self.aws("efs").create_mount_target(FileSystemId=i["fileSystemId"], SubnetId=i["subnetId"],
                                                 SecurityGroups=list(i.get("securityGroups") or []))
        return mt["MountTargetId"], {"ipAddress": mt.get("IpAddress", ""),
                                     "dnsName": f"{i['fileSystemId']}.efs.{self.region}.amazonaws.com"}

    def _access_point(self, name: str, i: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        root = i.get("rootDirectory") or {}
        kw: dict[str, Any] = {"FileSystemId": i["fileSystemId"],
                              "Tags": [{"Key": k, "Value": str(v)} for k, v in sorted((i.get("tags") or {}).items())]}
        if root.get("path"):
            kw["RootDirectory"] = {"Path": root["path"]}
        ap = self.aws("efs").create_access_point(**kw)
        return ap["AccessPointId"], {"arn": ap.get("AccessPointArn", "")}

    def _bucket(self, name: str, i: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        bucket = i.get("bucket") or f"{i.get('bucketPrefix', name + '-')}{pysecrets.token_hex(6)}"
        self.aws("s3").create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": self.region})
        return bucket, {"bucket": bucket, "arn": f"arn:aws:s3:::{bucket}", "bucketDomainName": f"{bucket}.s3.amazonaws.com"}

    def _object(self, name: str, i: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        body = base64.b64decode(i["contentBase64"]) if "contentBase64" in i else (i.get("content") or "").encode()
        out = self.aws("s3").put_object(Bucket=i["bucket"], Key=i["key"], Body=body,
                                        ContentType=i.get("contentType", "binary/octet-stream"))
        return f"{i['bucket']}/{i['key']}", {"etag": out.get("ETag", "").strip('"'), "versionId": out.get("VersionId", "")}

    def _parameter(self, name: str, i: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        self.aws("ssm").put_parameter(Name=i["name"], Value=i["value"], Type=i.get("type", "String"),
                                      Tier=i.get("tier", "Standard"), Description=i.get("description", ""))
        return i["name"], {"arn": f"arn:aws:ssm:{self.region}:123456789012:parameter{i['name']}", "version": 1}

    # ------------------------------------------------------------------ identity
    def _role(self, name: str, i: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        rname = i.get("name") or f"{name}-{pysecrets.token_hex(4)}"
        r = self.aws("iam").create_role(RoleName=rname, AssumeRolePolicyDocument=i["assumeRolePolicy"],
                                        Description=i.get("description", ""))["Role"]
        return rname, {"name": rname, "arn": r["Arn"], "uniqueId": r["RoleId"]}

    def _profile(self, name: str, i: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        pname = i.get("name") or f"{name}-{pysecrets.token_hex(4)}"
        iam = self.aws("iam")
        p = iam.create_instance_profile(InstanceProfileName=pname)["InstanceProfile"]
        if i.get("role"):
            iam.add_role_to_instance_profile(InstanceProfileName=pname, RoleName=i["role"])
        return pname, {"name": pname, "arn": p["Arn"]}

    # ------------------------------------------------------------------ secrets (real values)
    def _password(self, name: str, i: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        if i.get("special", True) is not False:
            raise ValueError(f"{name}: only special=False passwords are generated here (the program's kind)")
        value = "".join(pysecrets.choice(_ALNUM) for _ in range(_int(i.get("length", 16))))
        return "none", {"result": value, "bcryptHash": ""}

    def _bytes(self, name: str, i: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        raw = os.urandom(_int(i.get("length", 32)))
        return "none", {"base64": base64.b64encode(raw).decode(), "hex": raw.hex()}

    def _private_key(self, name: str, i: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        if i.get("algorithm") != "ECDSA" or i.get("ecdsaCurve", "P224") != "P256":
            raise ValueError(f"{name}: only ECDSA P256 keys are generated here (the program's kind)")
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        key_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
        return f"key-{name}", {"privateKeyPem": key_pem, "publicKeyPem": ""}

    def _self_signed(self, name: str, i: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        # A certificate for the program's names on the key the program passes (its
        # PrivateKey resource's PEM, which it pairs with cert_pem).
        from cryptography.hazmat.primitives import serialization

        key = serialization.load_pem_private_key(i["privateKeyPem"].encode(), password=None)
        dns = list(i.get("dnsNames") or [])
        cn = (i.get("subject") or {}).get("commonName") or (dns or ["portal"])[0]
        valid = dt.timedelta(hours=_int(i.get("validityPeriodHours", 24 * 365)))
        return f"cert-{name}", {"certPem": _self_signed_pem(key, cn, dns, [], valid)}


def run_program(stack: str, aws: StandIns, region: str, eip_public_ip: str, *,
                overlay: dict[str, Any] | None = None, secret_config: dict[str, str] | None = None,
                env: dict[str, str] | None = None) -> tuple[ProgramRun, StandInMocks]:
    """`pulumi up` of `stack` against the stand-ins: the program's own __main__.py,
    with `overlay` (project keys, e.g. the example on-prem site) laid over the stack file
    as components.stackfile.overlay_config does for the layout."""
    config, _secret_keys = read_stack(stack)
    project = project_name()
    overrides: dict[str, Any] = {}
    if overlay:
        merged = overlay_config(namespace(config, project), overlay)
        overrides = {k: merged[k] for k in overlay}
    mocks = StandInMocks(aws, region, eip_public_ip)
    run = run_stack(stack, overrides=overrides, secrets=dict(secret_config or {}), env=env, mocks=mocks)
    return run, mocks


# ---------------------------------------------------------------------------- read back


def host_files(aws: StandIns, user_data: bytes) -> dict[str, bytes]:
    """Every file a host gets, read from what the stand-ins hold: the user-data's
    write_files and, when the user-data names one, the bundle from the bundle bucket
    (its sha256 checked against the pin, as hpc-fetch-bundle does at boot)."""
    import gzip
    import io
    import tarfile

    import yaml

    text = gzip.decompress(user_data).decode() if user_data[:2] == b"\x1f\x8b" else user_data.decode()
    doc = yaml.safe_load(text) or {}
    files: dict[str, bytes] = {}
    for e in doc.get("write_files") or []:
        content = e.get("content", "")
        files[e["path"]] = base64.b64decode(content) if e.get("encoding") in ("b64", "base64") else content.encode()
    for cmd in doc.get("runcmd") or []:
        if isinstance(cmd, list) and cmd and cmd[0].endswith("hpc-fetch-bundle"):
            args = dict(zip(cmd[1::2], cmd[2::2], strict=False))
            body = aws("s3").get_object(Bucket=args["--bucket"], Key=args["--key"])["Body"].read()
            if hashlib.sha256(body).hexdigest() != args["--sha256"]:
                raise ValueError(f"bundle s3://{args['--bucket']}/{args['--key']}: sha256 differs from the user-data's pin")
            with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as tar:
                for m in tar.getmembers():
                    if m.isfile():
                        f = tar.extractfile(m)
                        assert f is not None
                        files["/" + m.name] = f.read()
    return files


def instance_user_data(aws: StandIns, instance_id: str) -> bytes:
    attr = aws("ec2").describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
    value = (attr.get("UserData") or {}).get("Value")
    return base64.b64decode(value) if value else b""


def cross_check(aws: StandIns, run: ProgramRun, mocks: StandInMocks, region: str) -> list[str]:
    """What each host was handed, against what the stand-ins themselves describe. Returns
    the problems (empty: every value a host uses is the one AWS holds)."""
    import json

    problems: list[str] = []
    ec2, efs, s3 = aws("ec2"), aws("efs"), aws("s3")
    instances = {i["InstanceId"]: i for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]}
    registered = {r.name: r for r in run.of_type("aws:ec2/instance:Instance")}
    efs_id = (run.outputs.get("efs") or {}).get("id")
    file_systems = efs.describe_file_systems(FileSystemId=efs_id)["FileSystems"] if efs_id else []
    fs_names = {f"{f['FileSystemId']}.efs.{region}.amazonaws.com" for f in file_systems}
    buckets = {b["Name"] for b in s3.list_buckets()["Buckets"]}
    outputs = run.outputs
    for name, h in sorted((outputs.get("hosts") or {}).items()):
        iid = h["instance_id"]
        inst = instances.get(iid)
        if inst is None:
            problems.append(f"{name}: instance {iid} (program output) does not exist in EC2")
            continue
        # 1. The user-data EC2 holds is the program's, byte for byte.
        held = instance_user_data(aws, iid)
        res = next((r for r in registered.values() if r.id == iid), None)
        given = base64.b64decode(plain(res.inputs["userDataBase64"])) if res is not None else None
        if given is None or held != given:
            problems.append(f"{name}: EC2 holds {len(held)} B of user-data, the program passed "
                            f"{'nothing' if given is None else f'{len(given)} B'} (not the same bytes)")
        # 2. Interface, address and security groups as the program wired them.
        eni = inst["NetworkInterfaces"][0] if inst.get("NetworkInterfaces") else {}
        if eni.get("NetworkInterfaceId") != h["network_interface_id"]:
            problems.append(f"{name}: instance's interface {eni.get('NetworkInterfaceId')} != "
                            f"program's {h['network_interface_id']}")
        if eni.get("PrivateIpAddress") != h["private_ip"]:
            problems.append(f"{name}: instance address {eni.get('PrivateIpAddress')} != plan {h['private_ip']}")
        groups = {g["GroupId"]: g for g in ec2.describe_security_groups(
            GroupIds=[g["GroupId"] for g in eni.get("Groups", [])])["SecurityGroups"]} if eni.get("Groups") else {}
        roles = sorted({t["Value"] for g in groups.values() for t in g.get("Tags", []) if t["Key"] == "Role"})
        if roles != sorted(h["roles"]):
            problems.append(f"{name}: interface's security groups are for {roles}, host roles {sorted(h['roles'])}")
        if not inst.get("IamInstanceProfile"):
            problems.append(f"{name}: no instance profile")
        # 3. The values in the host's files are the ones the stand-ins describe.
        try:
            files = host_files(aws, held)
        except Exception as e:  # noqa: BLE001 - a broken bundle is a finding, not a crash
            problems.append(f"{name}: its files cannot be read back: {e}")
            continue
        stack_json = json.loads(files.get("/etc/hpc/stack.json", b"{}"))
        dns = (stack_json.get("efs") or {}).get("dns_name")
        if (stack_json.get("efs") or {}).get("mounts") and dns not in fs_names:
            problems.append(f"{name}: stack.json mounts EFS {dns!r}; EFS has {sorted(fs_names)}")
        if "/etc/hpc/eip.json" in files:
            eip = json.loads(files["/etc/hpc/eip.json"])
            found = ec2.describe_addresses(Filters=[{"Name": "allocation-id", "Values": [str(eip.get("allocation_id"))]}])
            addrs = found["Addresses"]
            if not addrs or addrs[0]["PublicIp"] != eip.get("public_ip"):
                problems.append(f"{name}: eip.json says allocation {eip.get('allocation_id')!r} / address "
                                f"{eip.get('public_ip')!r}; EC2 has {[(a['AllocationId'], a['PublicIp']) for a in addrs]}")
        for path in ("/etc/hpc/galera.json",):
            if path in files:
                bucket = (json.loads(files[path]).get("backup") or {}).get("bucket")
                if bucket not in buckets or bucket != (outputs.get("buckets") or {}).get("backups"):
                    problems.append(f"{name}: {path} backs up to {bucket!r}; S3 has {sorted(buckets)}")
    if set(mocks.user_data) != {h["instance_id"] for h in (outputs.get("hosts") or {}).values()}:
        problems.append("instances created and hosts in the program's outputs differ")
    return problems


def security_view(aws: StandIns, vpc_id: str) -> dict[str, Any]:
    """The security groups of the VPC as the EC2 stand-in holds them: group id -> role,
    every rule, and which groups each interface carries (by its private address)."""
    ec2 = aws("ec2")
    in_vpc = [{"Name": "vpc-id", "Values": [vpc_id]}]
    groups = {g["GroupId"]: next((t["Value"] for t in g.get("Tags", []) if t["Key"] == "Role"), g["GroupName"])
              for g in ec2.describe_security_groups(Filters=in_vpc)["SecurityGroups"]
              if g["GroupName"] != "default"}  # the VPC's own group, which no host carries
    rules = []
    for r in ec2.describe_security_group_rules(Filters=[{"Name": "group-id", "Values": sorted(groups)}])[
            "SecurityGroupRules"]:
        ref = (r.get("ReferencedGroupInfo") or {}).get("GroupId")
        rules.append({"group": r["GroupId"], "egress": bool(r["IsEgress"]), "protocol": str(r["IpProtocol"]),
                      "from_port": int(r.get("FromPort", -1)), "to_port": int(r.get("ToPort", -1)),
                      "peer_group": ref, "cidr": r.get("CidrIpv4"), "description": r.get("Description", "")})
    enis = {e["PrivateIpAddress"]: [g["GroupId"] for g in e.get("Groups", [])]
            for e in ec2.describe_network_interfaces(Filters=in_vpc)["NetworkInterfaces"]}
    return {"groups": groups, "rules": rules, "interfaces": enis}


def deployment_record(aws: StandIns, run: ProgramRun, region: str, endpoint_url: str) -> dict[str, Any]:
    """deploy.json: what the rehearsal's other parts need from this deploy."""
    ec2 = aws("ec2")
    out = run.outputs
    rendered = out.get("rendered") or {}
    instances = {i["InstanceId"]: i for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]}
    volumes = {a["InstanceId"]: v["VolumeId"] for v in ec2.describe_volumes()["Volumes"] for a in v.get("Attachments", [])}
    hosts: dict[str, Any] = {}
    for name, h in sorted((out.get("hosts") or {}).items()):
        inst = instances[h["instance_id"]]
        eni = inst["NetworkInterfaces"][0]
        r = rendered.get(name) or {}
        hosts[name] = {
            "instance_id": h["instance_id"], "eni": eni["NetworkInterfaceId"], "mac": eni["MacAddress"],
            "ip": h["private_ip"], "az": h["az"], "roles": h["roles"],
            "instance_profile": (inst.get("IamInstanceProfile") or {}).get("Arn", ""),
            "data_volume_id": volumes.get(h["instance_id"]),
            "user_data_bytes": r.get("user_data_bytes"), "user_data_sha256": r.get("user_data_sha256"),
            "bundle_files": r.get("bundle_files", []), "packages": r.get("packages", []),
            "files": sorted(r.get("files", {})),
        }
    vip = out.get("vip") or {}
    return {
        "stack": out.get("stack"), "region": region, "endpoint_url": endpoint_url, "vpc": out["network"]["vpc_id"],
        "eip": {"allocation_id": vip.get("allocation_id"), "public_ip": vip.get("public_ip")},
        "buckets": {"bundle": out["buckets"]["bundles"], "backup": out["buckets"]["backups"]},
        "efs": out.get("efs"), "ssm_path": (out.get("secrets") or {}).get("path", "").rsplit("/secrets", 1)[0],
        "secrets": out.get("secrets"), "hosts": hosts, "security": security_view(aws, out["network"]["vpc_id"]),
        "resources": len([r for r in run.resources if not r.type.startswith("hpc:")]),
    }
