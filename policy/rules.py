"""The portal's security and reliability rules, as pure functions.

Every rule takes the stack's resources as plain dicts

    {"type": "aws:ec2/instance:Instance", "name": "prod-lb-1-instance",
     "inputs": {...camelCase properties...}, "opts": {"protect": bool},
     "parent": "prod-lb-1" | None, "id": "i-..." | None}

and returns a list of `Violation`s. The same functions run in the policy pack
(`pulumi preview --policy-pack policy`, see __main__.py) and offline in the tests against
the mocked graph (tests/test_policy.py). Values that are unknown during a preview are
skipped, never guessed. No Pulumi import here, and nothing from the program: the pack
can be published on its own.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import io
import ipaddress
import json
import re
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

Resource = dict[str, Any]

# The placeholders Pulumi uses for values only known after the update.
UNKNOWNS = {"<unknown>", "04da6b54-80e4-46f7-96ec-b56ff0331ba9"}

INSTANCE = "aws:ec2/instance:Instance"
ENI = "aws:ec2/networkInterface:NetworkInterface"
SUBNET = "aws:ec2/subnet:Subnet"
SG = "aws:ec2/securityGroup:SecurityGroup"
SG_INGRESS = "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"
ROUTE_TABLE = "aws:ec2/routeTable:RouteTable"
RTA = "aws:ec2/routeTableAssociation:RouteTableAssociation"
VOLUME = "aws:ebs/volume:Volume"
EFS = "aws:efs/fileSystem:FileSystem"
BUCKET = "aws:s3/bucket:Bucket"
BUCKET_SSE = "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration"
BUCKET_PAB = "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock"
BUCKET_OBJECT = "aws:s3/bucketObjectv2:BucketObjectv2"
ROLE_POLICY = "aws:iam/rolePolicy:RolePolicy"
IAM_POLICY = "aws:iam/policy:Policy"
IAM_ROLE = "aws:iam/role:Role"
POLICY_ATTACHMENT = "aws:iam/rolePolicyAttachment:RolePolicyAttachment"

# The only ports open to the world, and only on the load balancers' group.
WORLD_OPEN_ROLE = "lb"
WORLD_OPEN_PORTS = {80, 443}
WORLD = {"0.0.0.0/0", "::/0"}

# Roles whose hosts keep data that must never sit in a public subnet.
DATA_ROLES = {"data"}
# The Galera role: an odd number of at least three voters, one per AZ.
QUORUM_ROLE = "data"
QUORUM_MIN = 3

# Resources whose loss loses data or identity: `protect` must be set. Buckets whose
# logical name ends with one of REGENERATED_SUFFIXES hold only what every `pulumi up`
# writes again (the host-file bundles) and may be recreated.
STATEFUL_TYPES = {
    VOLUME, EFS, BUCKET,
    "aws:ssm/parameter:Parameter",
    "random:index/randomPassword:RandomPassword",
    "random:index/randomBytes:RandomBytes",
    "tls:index/privateKey:PrivateKey",
    "aws:rds/cluster:Cluster", "aws:rds/instance:Instance", "aws:dynamodb/table:Table",
}
REGENERATED_SUFFIXES = ("-bundles",)

# Managed policies an instance role may carry (AWS maintains their scope).
ALLOWED_MANAGED_POLICIES = {
    "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore",
    "arn:aws:iam::aws:policy/service-role/AWSDataLifecycleManagerServiceRole",
    "arn:aws:iam::aws:policy/CloudWatchAgentServerPolicy",
}
# Wildcards are allowed only for these actions (EC2 Describe has no resource-level scope).
WILDCARD_OK = re.compile(r"^ec2:Describe[A-Za-z*]*$")

SECRET_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("private key", re.compile(r"-----BEGIN (?:RSA |EC |DSA |OPENSSH |ENCRYPTED )?PRIVATE KEY-----\s*[A-Za-z0-9+/=]{16,}")),
    ("AWS access key id", re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")),
    ("AWS secret access key", re.compile(r"(?i)aws_secret_access_key\s*[=:]\s*['\"]?[A-Za-z0-9/+]{40}")),
    ("Slack webhook", re.compile(r"https://hooks\.slack\.com/services/T[A-Z0-9]+/B[A-Z0-9]+/[A-Za-z0-9]{8,}")),
    ("GitHub token", re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b")),
    # A literal credential assigned to a credential-named key. Variable references
    # ($X, ${X}, {{ x }}, %(x)s, <x>, @x@), file paths and empty values are not literals.
    ("credential assignment", re.compile(
        r"(?im)^[ \t]*(?:export[ \t]+)?[\w.-]*(?:password|passwd|secret|token|requirepass|masterauth|auth-pass|api[_-]?key)"
        r"[\w.-]*[ \t]*(?:=|:|[ \t])[ \t]*['\"]?(?![$<{%@/])([A-Za-z0-9+/_=!#.,~-]{12,})['\"]?[ \t]*$")),
]
# Words that look like values of a credential key but are not secrets.
NOT_SECRET_VALUES = re.compile(r"^(?:true|false|yes|no|none|null|required|optional|disabled|enabled|"
                               r"[a-z_]+(?:\.[a-z_]+)*|/[\w./-]+)$")


@dataclass(frozen=True, order=True)
class Violation:
    rule: str
    resource: str
    message: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.resource}: {self.message}"


# ---------------------------------------------------------------------------- helpers


def unknown(v: Any) -> bool:
    return isinstance(v, str) and v in UNKNOWNS


def of_type(resources: Iterable[Resource], *types: str) -> list[Resource]:
    return [r for r in resources if r.get("type") in types]


def inputs(r: Resource) -> dict[str, Any]:
    return r.get("inputs") or {}


def tags(r: Resource) -> dict[str, str]:
    t = inputs(r).get("tags") or {}
    return t if isinstance(t, dict) else {}


def roles_of(r: Resource) -> set[str]:
    role = tags(r).get("Role") or ""
    return {x for x in str(role).split("+") if x}


def by_id(resources: Iterable[Resource]) -> dict[str, Resource]:
    return {str(r["id"]): r for r in resources if r.get("id") and not unknown(r.get("id"))}


def by_name(resources: Iterable[Resource]) -> dict[str, Resource]:
    return {r["name"]: r for r in resources}


def as_list(v: Any) -> list[Any]:
    if v is None:
        return []
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _int(v: Any) -> int | None:
    try:
        return int(float(v))
    except (TypeError, ValueError):
        return None


class Network:
    """Subnets of the graph and which are public, looked up by id or by address."""

    def __init__(self, resources: list[Resource]):
        self.ids = by_id(resources)
        self.subnets = of_type(resources, SUBNET)
        igw_tables: set[str] = set()
        for rt in of_type(resources, ROUTE_TABLE):
            for route in as_list(inputs(rt).get("routes")):
                gw = str((route or {}).get("gatewayId") or "")
                if gw.startswith("igw-"):
                    igw_tables.add(str(rt.get("id")))
        igw_subnets = {str(inputs(a).get("subnetId")) for a in of_type(resources, RTA)
                       if str(inputs(a).get("routeTableId")) in igw_tables}
        self.public: set[str] = set()
        for s in self.subnets:
            i = inputs(s)
            if i.get("mapPublicIpOnLaunch") is True or tags(s).get("Network") == "external" or str(s.get("id")) in igw_subnets:
                self.public.add(s["name"])

    def subnet_for(self, subnet_id: Any = None, ips: Iterable[str] = ()) -> Resource | None:
        if subnet_id and not unknown(subnet_id):
            s = self.ids.get(str(subnet_id))
            if s is not None and s.get("type") == SUBNET:
                return s
        for ip in ips:
            if not ip or unknown(ip):
                continue
            try:
                addr = ipaddress.ip_address(str(ip))
            except ValueError:
                continue
            for s in self.subnets:
                cidr = inputs(s).get("cidrBlock")
                if cidr and not unknown(cidr) and addr in ipaddress.ip_network(str(cidr)):
                    return s
        return None


def hosts(resources: list[Resource]) -> dict[str, dict[str, Any]]:
    """Host name -> roles, subnet and AZ, from instances and their network interfaces
    (joined by the Name tag, or by the instance's primary interface id)."""
    net = Network(resources)
    ids = by_id(resources)
    out: dict[str, dict[str, Any]] = {}

    def place(name: str, res: Resource, subnet: Resource | None) -> None:
        h = out.setdefault(name, {"roles": set(), "subnet": None, "az": None, "resources": []})
        h["roles"] |= roles_of(res)
        h["resources"].append(res["name"])
        if subnet is not None:
            h["subnet"] = subnet["name"]
            h["az"] = inputs(subnet).get("availabilityZone")
        elif inputs(res).get("availabilityZone") and not h["az"]:
            h["az"] = inputs(res)["availabilityZone"]

    for e in of_type(resources, ENI):
        i = inputs(e)
        name = tags(e).get("Name") or e["name"]
        place(name, e, net.subnet_for(i.get("subnetId"), [str(x) for x in as_list(i.get("privateIps"))] + [str(i.get("privateIp") or "")]))
    for inst in of_type(resources, INSTANCE):
        i = inputs(inst)
        name = tags(inst).get("Name") or inst["name"]
        subnet = net.subnet_for(i.get("subnetId"), [str(i.get("privateIp") or "")])
        pni = i.get("primaryNetworkInterface") or {}
        eni = ids.get(str(pni.get("networkInterfaceId"))) if isinstance(pni, dict) else None
        if subnet is None and eni is not None:
            subnet = net.subnet_for(inputs(eni).get("subnetId"), [str(x) for x in as_list(inputs(eni).get("privateIps"))])
        place(name, inst, subnet)
    return out


# ------------------------------------------------------------------------------ rules


def world_open(resources: list[Resource]) -> list[Violation]:
    """Nothing is reachable from 0.0.0.0/0 (or ::/0) but the LB group's TCP 80 and 443."""
    out = []
    names, ids = by_name(resources), by_id(resources)

    def group_role(rule: Resource) -> set[str]:
        sg = ids.get(str(inputs(rule).get("securityGroupId"))) or names.get(rule.get("parent") or "")
        return roles_of(sg) if sg is not None and sg.get("type") == SG else set()

    def allowed(role: set[str], proto: Any, lo: Any, hi: Any) -> bool:
        lo_i, hi_i = _int(lo), _int(hi)
        return role == {WORLD_OPEN_ROLE} and str(proto) in ("tcp", "6") and lo_i == hi_i and lo_i in WORLD_OPEN_PORTS

    for r in of_type(resources, SG_INGRESS):
        i = inputs(r)
        cidr = i.get("cidrIpv4") or i.get("cidrIpv6")
        if cidr in WORLD and not allowed(group_role(r), i.get("ipProtocol"), i.get("fromPort"), i.get("toPort")):
            out.append(Violation("world-open", r["name"], f"{i.get('ipProtocol')} {i.get('fromPort')}-{i.get('toPort')} "
                                 f"open to {cidr} on group {sorted(group_role(r)) or '?'}: only the LB's 80/443 may be"))
    for sg in of_type(resources, SG):  # inline rules, if a group ever uses them
        for rule in as_list(inputs(sg).get("ingress")):
            cidrs = set(as_list(rule.get("cidrBlocks"))) | set(as_list(rule.get("ipv6CidrBlocks")))
            if cidrs & WORLD and not allowed(roles_of(sg), rule.get("protocol"), rule.get("fromPort"), rule.get("toPort")):
                out.append(Violation("world-open", sg["name"], f"inline ingress {rule.get('protocol')} "
                                     f"{rule.get('fromPort')}-{rule.get('toPort')} open to the world"))
    return out


def imdsv2(resources: list[Resource]) -> list[Violation]:
    """Every instance requires IMDSv2 tokens (and keeps the hop limit at 1 or 2)."""
    out = []
    for r in of_type(resources, INSTANCE):
        m = inputs(r).get("metadataOptions") or {}
        tokens = m.get("httpTokens")
        if unknown(tokens):
            continue
        if tokens != "required":
            out.append(Violation("imdsv2", r["name"], f"metadataOptions.httpTokens is {tokens!r}, not 'required'"))
        hop = _int(m.get("httpPutResponseHopLimit"))
        if hop is not None and hop > 2:
            out.append(Violation("imdsv2", r["name"], f"metadataOptions.httpPutResponseHopLimit {hop} lets containers "
                                 "and forwarded traffic reach the metadata service"))
    return out


def encryption(resources: list[Resource]) -> list[Violation]:
    """EBS volumes (root, attached, separate), EFS and every S3 bucket are encrypted."""
    out = []
    for r in of_type(resources, INSTANCE):
        i = inputs(r)
        root = i.get("rootBlockDevice")
        if not isinstance(root, dict) or root.get("encrypted") is not True:
            out.append(Violation("encryption", r["name"], "rootBlockDevice.encrypted is not true"))
        for j, dev in enumerate(as_list(i.get("ebsBlockDevices"))):
            if (dev or {}).get("encrypted") is not True:
                out.append(Violation("encryption", r["name"], f"ebsBlockDevices[{j}].encrypted is not true"))
    for r in of_type(resources, VOLUME, EFS):
        if inputs(r).get("encrypted") is not True:
            out.append(Violation("encryption", r["name"], "encrypted is not true"))
    buckets = of_type(resources, BUCKET)
    encrypted: set[str] = set()
    for sse in of_type(resources, BUCKET_SSE):
        algos = [((rule or {}).get("applyServerSideEncryptionByDefault") or {}).get("sseAlgorithm")
                 for rule in as_list(inputs(sse).get("rules"))]
        if algos and all(a in ("aws:kms", "aws:kms:dsse", "AES256") for a in algos):
            encrypted |= _bucket_refs(sse, buckets)
    for b in buckets:
        inline = inputs(b).get("serverSideEncryptionConfiguration")
        if b["name"] not in encrypted and not inline:
            out.append(Violation("encryption", b["name"], "no server-side encryption configuration for this bucket"))
    return out


def _bucket_refs(child: Resource, buckets: list[Resource]) -> set[str]:
    """Which buckets a bucket-level resource configures: by its `bucket` input (name or
    id) or, when that is unknown in a preview, by its parent."""
    ref = inputs(child).get("bucket")
    hits = {b["name"] for b in buckets
            if ref is not None and not unknown(ref) and ref in (b.get("id"), inputs(b).get("bucket"))}
    if not hits:
        hits = {b["name"] for b in buckets if b["name"] == child.get("parent")}
    return hits


def s3_private(resources: list[Resource]) -> list[Violation]:
    """Every bucket blocks public ACLs and policies."""
    buckets = of_type(resources, BUCKET)
    blocked: set[str] = set()
    for pab in of_type(resources, BUCKET_PAB):
        i = inputs(pab)
        if all(i.get(k) is True for k in ("blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls", "restrictPublicBuckets")):
            blocked |= _bucket_refs(pab, buckets)
    return [Violation("s3-private", b["name"], "no BucketPublicAccessBlock with all four settings true")
            for b in buckets if b["name"] not in blocked]


def data_tier_private(resources: list[Resource]) -> list[Violation]:
    """Hosts of the data tier never sit in a public (external) subnet nor get a public IP."""
    net = Network(resources)
    out = []
    for name, h in sorted(hosts(resources).items()):
        if not h["roles"] & DATA_ROLES:
            continue
        if h["subnet"] in net.public:
            out.append(Violation("data-tier-private", name, f"data host in public subnet {h['subnet']}"))
    for r in of_type(resources, INSTANCE):
        if roles_of(r) & DATA_ROLES and inputs(r).get("associatePublicIpAddress") is True:
            out.append(Violation("data-tier-private", r["name"], "data host with a public IP address"))
    return out


def multi_az(resources: list[Resource]) -> list[Violation]:
    """A role with several hosts spans at least two AZs; the Galera role has an odd count
    of at least three, spread over as many AZs as the stack has (up to three)."""
    out = []
    hs = hosts(resources)
    stack_azs = {inputs(s).get("availabilityZone") for s in of_type(resources, SUBNET)} - {None}
    by_role: dict[str, list[str]] = {}
    for name, h in hs.items():
        for role in h["roles"]:
            by_role.setdefault(role, []).append(name)
    for role, names in sorted(by_role.items()):
        azs = {hs[n]["az"] for n in names}
        if None in azs or any(unknown(a) for a in azs):
            continue
        if len(names) > 1 and len(azs) < 2:
            out.append(Violation("multi-az", role, f"{len(names)} hosts ({', '.join(sorted(names))}) all in {sorted(azs)}"))
        if role == QUORUM_ROLE and len(names) > 1:
            if len(names) < QUORUM_MIN or len(names) % 2 == 0:
                out.append(Violation("multi-az", role, f"{len(names)} Galera nodes: needs an odd count of at least "
                                     f"{QUORUM_MIN} to keep a quorum after losing one"))
            want = min(QUORUM_MIN, len(stack_azs) or QUORUM_MIN, len(names))
            if len(azs) < want:
                out.append(Violation("multi-az", role, f"Galera nodes in {len(azs)} AZs ({sorted(azs)}); "
                                     f"{want} are available: one AZ outage would take the quorum"))
    return out


def decode_blob(value: Any, is_base64: bool) -> list[tuple[str, str]]:
    """(part name, text) of user-data or a bundle: base64, then gzip, then tar members."""
    if not isinstance(value, str) or unknown(value):
        return []
    raw = value.encode()
    if is_base64:
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return [("(not base64)", value)]
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except OSError:
            return [("(bad gzip)", "")]
    try:
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            parts = []
            for m in tar.getmembers():
                f = tar.extractfile(m) if m.isfile() else None
                if f is not None:
                    parts.append((m.name, f.read().decode("utf-8", "replace")))
            return parts
    except tarfile.TarError:
        pass
    return [("", raw.decode("utf-8", "replace"))]


def find_secrets(text: str, known: Iterable[str] = ()) -> list[str]:
    """Descriptions of secret-like text: known secret values, then the patterns."""
    found = []
    for value in known:
        if value and len(value) >= 8 and value in text:
            found.append("a generated secret value")
    for what, pattern in SECRET_PATTERNS:
        for m in pattern.finditer(text):
            if what == "credential assignment":
                val = m.group(1)
                if NOT_SECRET_VALUES.match(val) or not (re.search(r"\d", val) and re.search(r"[A-Za-z]", val)):
                    continue
            line = text.count("\n", 0, m.start()) + 1
            found.append(f"{what} (line {line})")
    return found


def user_data_secrets(resources: list[Resource], known_secrets: Iterable[str] = ()) -> list[Violation]:
    """No secret-like text in user-data (readable with ec2:DescribeInstanceAttribute and
    from IMDS) nor in the host-file bundles that extend it."""
    out = []
    known = list(known_secrets)
    for r in of_type(resources, INSTANCE):
        i = inputs(r)
        parts = decode_blob(i.get("userDataBase64"), True) + decode_blob(i.get("userData"), False)
        for part, text in parts:
            for f in find_secrets(text, known):
                out.append(Violation("user-data-secrets", r["name"], f"user-data{' ' + part if part else ''}: {f}"))
    for r in of_type(resources, BUCKET_OBJECT):
        i = inputs(r)
        for part, text in decode_blob(i.get("contentBase64"), True) + decode_blob(i.get("content"), False):
            for f in find_secrets(text, known):
                out.append(Violation("user-data-secrets", r["name"], f"bundle {part}: {f}"))
    return out


def stateful_protected(resources: list[Resource]) -> list[Violation]:
    """Volumes, file systems, buckets, secrets and generated keys have `protect` set."""
    out = []
    for r in resources:
        if r.get("type") not in STATEFUL_TYPES:
            continue
        if r["type"] == BUCKET and r["name"].endswith(REGENERATED_SUFFIXES):
            continue
        if not (r.get("opts") or {}).get("protect"):
            out.append(Violation("stateful-protected", r["name"], f"{r['type'].split(':')[-1]} without protect=True: "
                                 "a rename or an accidental delete would destroy its data"))
    return out


def policy_documents(resources: list[Resource]) -> list[tuple[Resource, Any]]:
    """(resource, parsed document) of every permission policy (trust policies excluded)."""
    docs: list[tuple[Resource, Any]] = []
    for r in of_type(resources, ROLE_POLICY, IAM_POLICY):
        docs.append((r, inputs(r).get("policy")))
    for r in of_type(resources, IAM_ROLE):
        for p in as_list(inputs(r).get("inlinePolicies")):
            docs.append((r, (p or {}).get("policy")))
    out = []
    for r, doc in docs:
        if doc is None or unknown(doc):
            continue
        if isinstance(doc, str):
            try:
                doc = json.loads(doc)
            except ValueError:
                doc = {"__unparsable__": doc}
        out.append((r, doc))
    return out


def iam_least_privilege(resources: list[Resource]) -> list[Violation]:
    """No `*` in an allowed action or resource, except EC2 Describe actions on "*"; no
    NotAction/NotResource allows; only reviewed managed policies attached."""
    out = []
    for r, doc in policy_documents(resources):
        if "__unparsable__" in doc:
            out.append(Violation("iam-least-privilege", r["name"], "policy is not valid JSON"))
            continue
        for j, st in enumerate(as_list(doc.get("Statement"))):
            if not isinstance(st, dict) or st.get("Effect") != "Allow":
                continue
            sid = st.get("Sid") or f"Statement[{j}]"
            if "NotAction" in st or "NotResource" in st:
                out.append(Violation("iam-least-privilege", r["name"], f"{sid}: Allow with NotAction/NotResource"))
            actions = [str(a) for a in as_list(st.get("Action"))]
            describe_only = bool(actions) and all(WILDCARD_OK.match(a) for a in actions)
            for a in actions:
                if "*" in a and not WILDCARD_OK.match(a):
                    out.append(Violation("iam-least-privilege", r["name"], f"{sid}: wildcard action {a}"))
            for res in as_list(st.get("Resource")):
                if "*" in str(res) and not describe_only:
                    out.append(Violation("iam-least-privilege", r["name"], f"{sid}: wildcard resource {res} "
                                         f"for {', '.join(actions)}"))
    # Customer-managed policies created in this graph are checked as documents above; an
    # attachment may name one of them (Pulumi auto-names them <resource name>-<suffix>).
    own = {r["name"] for r in of_type(resources, IAM_POLICY)}
    for r in of_type(resources, POLICY_ATTACHMENT):
        arn = inputs(r).get("policyArn")
        if not arn or unknown(arn) or arn in ALLOWED_MANAGED_POLICIES:
            continue
        m = re.match(r"^arn:aws[\w-]*:iam::\d{12}:policy/(.+)$", str(arn))
        if m and any(m.group(1) == n or m.group(1).startswith(n + "-") for n in own):
            continue
        out.append(Violation("iam-least-privilege", r["name"], f"managed policy {arn} is not on the reviewed list"))
    return out


@dataclass(frozen=True)
class Rule:
    name: str
    check: Callable[[list[Resource]], list[Violation]]
    description: str
    scope: str  # "resource": judges one resource alone; "stack": needs the whole graph


RULES: tuple[Rule, ...] = (
    Rule("world-open", world_open, "Nothing is open to the internet but the load balancers' TCP 80 and 443.", "stack"),
    Rule("imdsv2", imdsv2, "Instances require IMDSv2 (http_tokens = required, hop limit <= 2).", "resource"),
    Rule("encryption", encryption, "EBS volumes, EFS file systems and S3 buckets are encrypted.", "stack"),
    Rule("s3-private", s3_private, "Every S3 bucket blocks public access.", "stack"),
    Rule("data-tier-private", data_tier_private, "Data hosts never sit in a public subnet nor get a public IP.", "stack"),
    Rule("multi-az", multi_az, "Multi-host roles span two or more AZs; Galera has an odd count of 3+ across AZs.", "stack"),
    Rule("user-data-secrets", user_data_secrets, "No secret-like text in user-data or host-file bundles.", "resource"),
    Rule("stateful-protected", stateful_protected, "Volumes, file systems, buckets and secrets are protected.", "resource"),
    Rule("iam-least-privilege", iam_least_privilege, "No IAM wildcard beyond EC2 Describe actions.", "resource"),
)


def check_all(resources: list[Resource], rules: Iterable[Rule] = RULES) -> list[Violation]:
    return sorted(v for rule in rules for v in rule.check(resources))
