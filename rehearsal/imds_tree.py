"""EC2 instance metadata as one tree, answered the way EC2 answers it: under /latest/ and
under dated API versions (cloud-init 22.4 asks /2009-04-04/meta-data/instance-id to find
the service, then /2021-03-23/... for everything else), with directory listings
derived from the same tree (a child with children is listed with a trailing "/").

Pure functions, no I/O: the IMDS stand-in checks the IMDSv2 token and finds the caller's
instance, then asks `answer_path` for the body.

Paths cloud-init 22.4's Ec2 datasource walks (cloudinit/sources/DataSourceEc2.py and
cloudinit/sources/helpers/ec2.py), every GET with the IMDSv2 token when it knows the
platform is AWS (in a container: the image's DataSourceEc2Container, rehearsal.image):
  PUT /latest/api/token
  GET /2009-04-04/meta-data/instance-id           (is the service there?)
  GET /2021-03-23/meta-data/instance-id           (newest API version it knows)
  GET /2021-03-23/user-data                       (404 when there is none)
  GET /2021-03-23/meta-data/  and every listed child, recursively (it skips
      iam/security-credentials)
  GET /2021-03-23/dynamic/instance-identity       (listing, no trailing slash)
  GET /2021-03-23/dynamic/instance-identity/document
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Union

# API versions EC2 serves that the tools on the hosts ask for (cloud-init 22.4 tries
# 2021-03-23, 2018-09-24, 2016-09-02 and falls back to 2009-04-04); "latest" is an alias.
API_VERSIONS = ("1.0", "2009-04-04", "2016-09-02", "2018-09-24", "2021-03-23", "latest")
ACCOUNT_ID = "123456789012"
INFO_KEYS = ("instance_id", "mac", "eni", "ip", "az", "type", "hostname")

Tree = dict[str, Union[str, "Tree"]]
Answer = tuple[int, str, bytes]

def identity_document(info: Mapping[str, Any], region: str) -> dict[str, Any]:
    return {"accountId": ACCOUNT_ID, "architecture": "x86_64", "availabilityZone": info["az"],
            "imageId": "ami-rehearsal", "instanceId": info["instance_id"], "instanceType": info["type"],
            "privateIp": info["ip"], "region": region, "version": "2017-09-30"}


def build_tree(info: Mapping[str, Any], region: str, role: str | None = None,
               credentials: Mapping[str, Any] | None = None) -> Tree:
    """The instance's meta-data and dynamic trees. `info` has the keys of INFO_KEYS
    (as rehearsal.awsd.Imds.instance_for returns them); `role` and `credentials` add
    iam/security-credentials/<role> as EC2 does for an instance profile."""
    missing = [k for k in INFO_KEYS if not info.get(k)]
    if missing:
        raise ValueError(f"instance info lacks {', '.join(missing)} (needs {', '.join(INFO_KEYS)})")
    mac = str(info["mac"])
    meta: Tree = {
        "ami-id": "ami-rehearsal",
        "ami-launch-index": "0",
        "hostname": str(info["hostname"]),
        "instance-id": str(info["instance_id"]),
        "instance-type": str(info["type"]),
        "local-hostname": str(info["hostname"]),
        "local-ipv4": str(info["ip"]),
        "mac": mac,
        "network": {"interfaces": {"macs": {mac: {
            "device-number": "0",
            "interface-id": str(info["eni"]),
            "local-hostname": str(info["hostname"]),
            "local-ipv4s": str(info["ip"]),
            "mac": mac,
        }}}},
        "placement": {"availability-zone": str(info["az"]), "region": region},
        "services": {"domain": "amazonaws.com", "partition": "aws"},
    }
    if role:
        iam: Tree = {"info": json.dumps({"Code": "Success", "InstanceProfileArn":
                                         f"arn:aws:iam::{ACCOUNT_ID}:instance-profile/{role}"})}
        if credentials is not None:
            iam["security-credentials"] = {role: json.dumps(dict(credentials))}
        meta["iam"] = iam
    dynamic: Tree = {"instance-identity": {"document": json.dumps(identity_document(info, region), indent=2)}}
    return {"meta-data": meta, "dynamic": dynamic}


def _listing(node: Tree) -> bytes:
    return "\n".join(k + "/" if isinstance(v, dict) else k for k, v in node.items()).encode()


def answer_path(path: str, info: Mapping[str, Any], user_data: bytes, region: str,
                role: str | None = None, credentials: Mapping[str, Any] | None = None) -> Answer:
    """(HTTP status, content type, body) for a GET of `path` by the instance `info`.
    A directory answers its listing with or without the trailing slash (cloud-init asks
    /dynamic/instance-identity without one); a leaf asked with a trailing slash is 404
    as on EC2."""
    path = path.split("?", 1)[0]
    if path in ("", "/"):
        return 200, "text/plain", "\n".join(API_VERSIONS).encode()
    parts = path.lstrip("/").split("/")
    version, rest = parts[0], parts[1:]
    if version not in API_VERSIONS:
        return 404, "text/plain", b""
    trailing = path.endswith("/")
    if rest and rest[-1] == "":
        rest = rest[:-1]
    if not rest:
        top = ["dynamic", "meta-data"] + (["user-data"] if user_data else [])
        return 200, "text/plain", "\n".join(top).encode()
    if rest == ["user-data"]:
        if trailing or not user_data:
            return 404, "text/plain", b""
        return 200, "application/octet-stream", user_data
    node: str | Tree = build_tree(info, region, role, credentials)
    for part in rest:
        if not isinstance(node, dict) or part not in node:
            return 404, "text/plain", b""
        node = node[part]
    if isinstance(node, dict):
        return 200, "text/plain", _listing(node)
    if trailing:
        return 404, "text/plain", b""
    ctype = "application/json" if node.startswith("{") else "text/plain"
    return 200, ctype, node.encode()
