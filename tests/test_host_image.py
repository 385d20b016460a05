"""A rehearsal host is a real Debian 12 boot: systemd 252 as PID 1 under systemd-nspawn,
the real cloud-init reading its user data from an IMDSv2 stand-in through the Ec2
datasource, and the properties the tiers rely on (sandboxing, timers, default limits,
a machine-id of its own, per-instance modules run once) as on an EC2 instance.

The daemon test boots the cached base image (rehearsal.image; built the first time, which
takes minutes) in a network namespace whose only neighbour is the metadata service at
169.254.169.254, served from rehearsal.imds_tree in a second namespace.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from rehearsal import container, image
from rehearsal.imds_tree import answer_path, build_tree

ROOT = Path(__file__).resolve().parent.parent
PREFIX = f"h4-t{os.getpid() % 100000}"  # namespaces PREFIX and PREFIX-m; hosts PREFIX-a, PREFIX-b
HOST_A, HOST_B = f"{PREFIX}-a", f"{PREFIX}-b"
IMDS_IP = "169.254.169.254"
HOST_IP = "169.254.10.2"
REGION = "ap-northeast-2"
INFO = {"instance_id": "i-0a1b2c3d4e5f60718", "mac": "0a:1b:2c:3d:4e:5f", "eni": "eni-0a1b2c3d4e5f60718",
        "ip": HOST_IP, "az": "ap-northeast-2a", "type": "t3.medium",
        "hostname": "ip-169-254-10-2.ap-northeast-2.compute.internal"}
USER_DATA = """\
#cloud-config
hostname: web-1
fqdn: web-1.hpc.internal
manage_etc_hosts: true
bootcmd:
  - echo boot >> /root/boots
write_files:
  - path: /etc/hpc/role
    content: "web\\n"
    permissions: "0640"
users:
  - name: hpcops
    shell: /bin/bash
    sudo: "ALL=(ALL) NOPASSWD:ALL"
    lock_passwd: true
runcmd:
  - CLUSTER=hpc-rehearsal
  - echo "cluster=$CLUSTER" > /root/runcmd.out
  - echo run >> /root/runs
"""


# ------------------------------------------------------------------ fast unit tests


def test_recipe_hash_follows_the_recipe() -> None:
    r = image.recipe("debian-12", tiers=False)
    assert image.recipe_hash(r) == image.recipe_hash(image.recipe("debian-12", tiers=False))
    more = dict(r, packages=sorted([*r["packages"], "htop"]))
    assert image.recipe_hash(more) != image.recipe_hash(r)
    other_cfg = dict(r, files=dict(r["files"], **{"etc/cloud/cloud.cfg.d/90-hpc-rehearsal.cfg": "x"}))
    assert image.recipe_hash(other_cfg) != image.recipe_hash(r)
    assert image.recipe_hash(image.recipe("debian-12", tiers=True)) != image.recipe_hash(r)
    assert image.image_name("debian-12", False).startswith("debian-12-base-")
    assert image.image_name("debian-12", True).startswith("debian-12-tiers-")
    assert set(image.BASE_PACKAGES) <= set(image.recipe("debian-12", True)["packages"])


def test_ensure_builds_once_atomically_and_under_a_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two concurrent callers get one build; a failed build leaves no cache entry and a
    build killed half-way (its temp dir) is cleaned by the next one."""
    import threading

    builds: list[str] = []

    def fake_build(r: dict[str, Any], tmp: Path, log: Any, debs: Path) -> dict[str, Any]:
        builds.append(r["os"])
        assert not (tmp.parent / image.image_name("debian-12", r["tiers"])).exists()  # visible only once renamed
        time.sleep(0.3)
        if r["tiers"]:
            raise image.ImageError("apt-get install failed")
        (tmp / "root/usr/lib/systemd").mkdir(parents=True)
        return {}

    monkeypatch.setattr(image, "_build", fake_build)
    monkeypatch.setattr(image, "_tools", lambda log, os_name: None)
    stale = tmp_path / f".build-{image.image_name('debian-12', False)}-999999"
    (stale / "root").mkdir(parents=True)
    roots: list[Path] = []
    threads = [threading.Thread(target=lambda: roots.append(image.ensure("debian-12", False, cache=tmp_path)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert builds == ["debian-12"] and len(set(roots)) == 1
    assert roots[0] == tmp_path / image.image_name("debian-12", False) / "root"
    assert json.loads((roots[0].parent / image.MARKER).read_text())["hash"] == image.recipe_hash(
        image.recipe("debian-12", False))
    assert not stale.exists()
    assert image.ensure("debian-12", False, cache=tmp_path) == roots[0] and len(builds) == 1
    with pytest.raises(image.ImageError, match="apt-get install failed"):
        image.ensure("debian-12", True, cache=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and not p.name == "debs") == [
        image.image_name("debian-12", False)]


def test_recipe_rejects_unknown_os() -> None:
    with pytest.raises(image.ImageError, match="unknown os 'centos-7': allowed debian-12, debian-13"):
        image.recipe("centos-7")


def test_mirror_read_from_deb822_and_one_line_sources(tmp_path: Path) -> None:
    (tmp_path / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm\nComponents: main\n")
    assert image.mirror((tmp_path,)) == "http://mirror.example/debian"
    other = tmp_path / "old"
    other.mkdir()
    (other / "sources.list").write_text("deb [arch=amd64] http://m2.example/debian/ bookworm main\n")
    assert image.mirror((other,)) == "http://m2.example/debian"
    with pytest.raises(image.ImageError, match="no Debian mirror"):
        image.mirror((tmp_path / "none",))


def test_units_enabled_by_follows_dependencies(tmp_path: Path) -> None:
    root = tmp_path / "root"
    info = root / "var/lib/dpkg/info"
    info.mkdir(parents=True)
    (tmp_path / image.MARKER).write_text(json.dumps(
        {"disabled_after_tiers": ["nginx.service", "rsyslog.service", "rpcbind.socket"]}))
    ok = "Status: install ok installed"
    (root / "var/lib/dpkg/status").write_text("\n\n".join([
        f"Package: nginx\n{ok}\nDepends: nginx-core (<< 1.22.1-9.1~) | nginx-light (<< 1.22.1-9.1~)",
        f"Package: nginx-light\n{ok}\nDepends: libc6 (>= 2.34),\n nginx-common (= 1.22.1-9)",
        f"Package: nginx-common\n{ok}\nPre-Depends: init-system-helpers",
        f"Package: rsyslog\n{ok}",
        f"Package: socat\n{ok}\nDepends: libc6:amd64",
        "Package: rpcbind\nStatus: deinstall ok config-files",
    ]) + "\n")
    (info / "nginx-common.list").write_text("/lib/systemd/system/nginx.service\n/etc/nginx\n")
    (info / "rsyslog:amd64.list").write_text("/lib/systemd/system/rsyslog.service\n")
    (info / "socat.list").write_text("/usr/bin/socat\n")
    assert image.units_enabled_by(root, ["nginx", "socat"]) == ["nginx.service"]
    assert image.units_enabled_by(root, ["rsyslog"]) == ["rsyslog.service"]
    with pytest.raises(image.ImageError, match="package 'rpcbind' is not installed"):
        image.units_enabled_by(root, ["rpcbind"])


def test_container_refuses_a_bad_name_or_a_missing_namespace(tmp_path: Path) -> None:
    img = tmp_path / "img"
    (img / "usr/lib/systemd").mkdir(parents=True)
    (img / "usr/lib/systemd/systemd").touch()
    with pytest.raises(container.ContainerError, match="host name 'Web_1'"):
        container.start("Web_1", img, tmp_path / "disk", "x")
    with pytest.raises(container.ContainerError, match="not a host image root"):
        container.start("web-1", tmp_path, tmp_path / "disk", "x")
    with pytest.raises(container.ContainerError, match="network namespace 'h4-none' does not exist"):
        container.start("web-1", img, tmp_path / "disk", "h4-none")
    assert not (tmp_path / "disk").exists()


def test_imds_tree_versions_listings_and_leaves() -> None:
    ud = b"#cloud-config\n"
    for v in ("latest", "2021-03-23", "2009-04-04"):
        assert answer_path(f"/{v}/meta-data/instance-id", INFO, ud, REGION) == (200, "text/plain",
                                                                                  INFO["instance_id"].encode())
    code, _, body = answer_path("/2021-03-23/meta-data/", INFO, ud, REGION)
    listing = body.decode().splitlines()
    assert code == 200 and "instance-id" in listing and "placement/" in listing and "network/" in listing
    assert answer_path("/2021-03-23/meta-data", INFO, ud, REGION)[2] == body  # with or without the slash
    mac_dir = f"/2021-03-23/meta-data/network/interfaces/macs/{INFO['mac']}/"
    assert "local-ipv4s" in answer_path(mac_dir, INFO, ud, REGION)[2].decode().splitlines()
    assert answer_path(mac_dir + "local-ipv4s", INFO, ud, REGION)[2] == HOST_IP.encode()
    assert answer_path("/2021-03-23/meta-data/placement/region", INFO, ud, REGION)[2] == REGION.encode()
    assert answer_path("/2021-03-23/meta-data/instance-id/", INFO, ud, REGION)[0] == 404
    assert answer_path("/2021-03-23/meta-data/nope", INFO, ud, REGION)[0] == 404
    assert answer_path("/1999-01-01/meta-data/", INFO, ud, REGION)[0] == 404
    assert answer_path("/2021-03-23/user-data", INFO, ud, REGION) == (200, "application/octet-stream", ud)
    assert answer_path("/latest/user-data", INFO, b"", REGION)[0] == 404
    assert answer_path("/2021-03-23/", INFO, ud, REGION)[2].decode().split() == ["dynamic", "meta-data", "user-data"]
    assert answer_path("/2021-03-23/dynamic/instance-identity", INFO, ud, REGION)[2] == b"document"
    code, ctype, doc = answer_path("/2021-03-23/dynamic/instance-identity/document", INFO, ud, REGION)
    assert (code, ctype) == (200, "application/json")
    assert json.loads(doc)["instanceId"] == INFO["instance_id"] and json.loads(doc)["region"] == REGION
    assert "2021-03-23" in answer_path("/", INFO, ud, REGION)[2].decode().splitlines()


def test_imds_tree_iam_role() -> None:
    creds = {"Code": "Success", "AccessKeyId": "ASIAEXAMPLE"}
    tree: Any = build_tree(INFO, REGION, role="hpc-web", credentials=creds)
    assert json.loads(tree["meta-data"]["iam"]["security-credentials"]["hpc-web"])["AccessKeyId"] == "ASIAEXAMPLE"
    assert answer_path("/latest/meta-data/iam/security-credentials/", INFO, b"", REGION, "hpc-web",
                       creds)[2] == b"hpc-web"
    assert answer_path("/latest/meta-data/iam/", INFO, b"", REGION)[0] == 404  # no role, no iam/
    with pytest.raises(ValueError, match="instance info lacks mac"):
        build_tree({k: v for k, v in INFO.items() if k != "mac"}, REGION)


def test_image_cloud_config_and_datasource_with_cloud_inits_own_code() -> None:
    """The image's cloud.cfg.d and this test's user data pass cloud-init's schema, and the
    image's datasource says AWS where the stock one, in a container, says unknown (run
    with Debian's python3, which has cloud-init's modules)."""
    ds_src = image.IMAGE_FILES["usr/lib/python3/dist-packages/cloudinit/sources/DataSourceEc2Container.py"]
    code = f"""
import json, sys, types, yaml
from cloudinit.config.schema import get_schema, validate_cloudconfig_schema
for doc in json.loads(sys.argv[1]):
    validate_cloudconfig_schema(yaml.safe_load(doc), get_schema(), strict=True)
mod = types.ModuleType("DataSourceEc2Container")
exec({ds_src!r}, mod.__dict__)
print(mod.DataSourceEc2Container._get_cloud_name(None), mod.DataSourceEc2Container.dsname,
      [c.__name__ for c in mod.get_datasource_list(["FILESYSTEM", "NETWORK"])])
"""
    per_distribution = [f for files in image.DISTRIBUTION_FILES.values() for name, f in files.items()
                        if name.startswith("etc/cloud/cloud.cfg.d/")]
    cp = subprocess.run(["/usr/bin/python3", "-c", code, json.dumps([image.CLOUD_CFG, USER_DATA, *per_distribution])],
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.split() == ["aws", "Ec2", "['DataSourceEc2Container']"]


# ------------------------------------------------------------------ the IMDSv2 stand-in


def serve(info_json: str, user_data_file: str, log_file: str) -> None:
    """The metadata service of the test host (run in its own namespace): IMDSv2 only
    (http_tokens = "required"): a GET without a valid token is 401."""
    info = json.loads(info_json)
    user_data = Path(user_data_file).read_bytes()
    tokens: dict[str, float] = {}
    log = open(log_file, "a", buffering=1)

    class Handler(BaseHTTPRequestHandler):
        def _do(self) -> None:
            path = self.path.split("?")[0]
            token = self.headers.get("X-aws-ec2-metadata-token", "")
            has_token = tokens.get(token, 0) > time.time()
            if self.command == "PUT" and path == "/latest/api/token":
                ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
                if ttl.isdigit() and 1 <= int(ttl) <= 21600:
                    token = os.urandom(16).hex()
                    tokens[token] = time.time() + int(ttl)
                    code, ctype, body = 200, "text/plain", token.encode()
                else:
                    code, ctype, body = 400, "text/plain", b"bad ttl"
            elif self.command != "GET":
                code, ctype, body = 405, "text/plain", b""
            elif not has_token:
                code, ctype, body = 401, "text/plain", b""
            else:
                code, ctype, body = answer_path(path, info, user_data, REGION)
            log.write(json.dumps({"method": self.command, "path": path, "token": has_token, "code": code,
                                  "agent": self.headers.get("User-Agent", "")}) + "\n")
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_PUT = _do

        def log_message(self, format: str, *args: Any) -> None:
            pass

    ThreadingHTTPServer((IMDS_IP, 80), Handler).serve_forever()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class Env:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.ns = PREFIX
        self.imds_ns = f"{PREFIX}-m"
        self.imds_log = workdir / "imds.jsonl"
        self.imds: subprocess.Popen[bytes] | None = None
        self.handles: dict[str, container.Handle] = {}
        self.boot_seconds: dict[str, float] = {}

    def up(self) -> None:
        short = PREFIX.replace("-", "")
        _ip("netns", "add", self.ns)
        _ip("netns", "add", self.imds_ns)
        _ip("link", "add", f"{short}a", "type", "veth", "peer", "name", f"{short}b")
        _ip("link", "set", f"{short}a", "netns", self.ns)
        _ip("link", "set", f"{short}b", "netns", self.imds_ns)
        for ns, dev, addr in ((self.ns, f"{short}a", HOST_IP), (self.imds_ns, f"{short}b", IMDS_IP)):
            _ip("-n", ns, "addr", "add", f"{addr}/16", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        ud = self.workdir / "user-data"
        ud.write_text(USER_DATA)
        code = ("import sys; sys.path.insert(0, sys.argv[1]); from tests.test_host_image import serve; "
                "serve(*sys.argv[2:])")
        self.imds = subprocess.Popen(
            ["ip", "netns", "exec", self.imds_ns, sys.executable, "-c", code, str(ROOT), json.dumps(INFO),
             str(ud), str(self.imds_log)], stdout=subprocess.DEVNULL, stderr=open(self.workdir / "imds.err", "wb"))
        deadline = time.monotonic() + 20
        while not self.imds_log.exists() or not self.imds_log.read_text():
            probe = subprocess.run(["ip", "netns", "exec", self.ns, sys.executable, "-c",
                                    f"import urllib.request as u; u.urlopen('http://{IMDS_IP}/', timeout=1)"],
                                   capture_output=True)
            if probe.returncode == 0:
                break
            assert time.monotonic() < deadline, (self.workdir / "imds.err").read_text()
            time.sleep(0.2)

    def boot(self, name: str, img: Path, **kw: Any) -> container.Handle:
        t0 = time.monotonic()
        h = container.start(name, img, self.workdir / name, self.ns, **kw)
        self.handles[name] = h
        state = container.wait_running(h, timeout=180)
        self.boot_seconds[name] = round(time.monotonic() - t0, 1)
        if state != "running":
            _, failed = container.exec(h, ["systemctl", "--failed", "--no-legend"])
            raise AssertionError(f"{name} is {state}: {failed}")
        return h

    def down(self) -> None:
        errors = []
        for h in self.handles.values():
            try:
                container.kill(h)
            except Exception as e:  # noqa: BLE001 - clean up the rest anyway
                errors.append(f"{h.name}: {e}")
        container.cleanup_leftovers(f"{PREFIX}-")
        if self.imds is not None:
            self.imds.kill()
            self.imds.wait(timeout=10)
        for ns in (self.ns, self.imds_ns):
            if Path(f"/run/netns/{ns}").exists():
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        left = container.leftovers(f"{PREFIX}-")
        assert not any(left.values()), f"left behind: {left}"
        assert not errors, errors


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    img = image.ensure("debian-12", tiers=False, progress=lambda m: print(m, file=sys.stderr))
    work = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-", dir="/var/tmp"))
    e = Env(work)
    try:
        e.up()
        (work / "shared").mkdir()
        e.boot(HOST_A, img, binds=[(str(work / "shared"), "/srv/shared")], files={"/etc/hpc/given": b"\x00bytes\n"})
        yield e
    finally:
        try:
            e.down()
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(f"boot to running: {e.boot_seconds}", file=sys.stderr)


def run(e: Env, argv: list[str], name: str | None = None, timeout: float = 60) -> str:
    h = e.handles[name or HOST_A]
    rc, out = container.exec(h, argv, timeout=timeout)
    assert rc == 0, f"{argv} exited {rc}: {out}"
    return out


def host_file(e: Env, path: str, name: str | None = None) -> str:
    """A file of the running host, read through its PID 1's root."""
    h = e.handles[name or HOST_A]
    return Path(f"/proc/{h.leader}/root{path}").read_text()


# ------------------------------------------------------------------ the boot


@pytest.mark.daemons
def test_cloud_init_done_without_errors(env: Env) -> None:
    out = run(env, ["cloud-init", "status", "--long"])
    assert "status: done" in out, out
    result = json.loads(host_file(env, "/run/cloud-init/result.json"))["v1"]
    assert result["errors"] == [], result
    assert result["datasource"] == "DataSourceEc2Container", result
    # cloud-init >= 23.4 reports any warning as "degraded done" (exit 2): keep the boot clean
    warnings = [x for x in host_file(env, "/var/log/cloud-init.log").splitlines() if "[WARNING]" in x]
    assert warnings == [], warnings
    assert run(env, ["systemctl", "is-system-running"]).strip() == "running"
    version = run(env, ["systemctl", "--version"]).splitlines()[0]
    assert version.startswith("systemd 252"), version


@pytest.mark.daemons
def test_units_that_cannot_work_here_are_masked(env: Env) -> None:
    assert image.MASKED_UNITS, "nothing to check"
    for unit in image.MASKED_UNITS:
        rc, out = container.exec(env.handles[HOST_A], ["systemctl", "is-enabled", unit])
        assert out.strip() == "masked", (unit, rc, out)


@pytest.mark.daemons
def test_user_data_applied(env: Env) -> None:
    assert host_file(env, "/etc/hpc/role") == "web\n"
    assert run(env, ["stat", "-c", "%a", "/etc/hpc/role"]).strip() == "640"
    # runcmd is one shell script: a variable set in one entry is read by the next
    assert host_file(env, "/root/runcmd.out") == "cluster=hpc-rehearsal\n"
    assert host_file(env, "/root/runs") == "run\n"
    assert host_file(env, "/root/boots") == "boot\n"
    assert run(env, ["hostname"]).strip() == "web-1"
    assert run(env, ["hostname", "--fqdn"]).strip() == "web-1.hpc.internal"
    assert "hpcops" in run(env, ["getent", "passwd", "hpcops"])
    assert "(ALL) NOPASSWD: ALL" in run(env, ["sudo", "-l", "-U", "hpcops"])


@pytest.mark.daemons
def test_cloud_init_used_imdsv2_and_walked_the_versioned_tree(env: Env) -> None:
    reqs = [json.loads(x) for x in env.imds_log.read_text().splitlines()]
    host = [r for r in reqs if r["path"] != "/"]  # "/" is the fixture's readiness probe
    assert host and host[0]["method"] == "PUT" and host[0]["path"] == "/latest/api/token", host[:3]
    gets = [r for r in host if r["method"] == "GET"]
    assert all(r["token"] and r["code"] == 200 for r in gets), [r for r in gets if not r["token"] or r["code"] != 200]
    asked = {r["path"] for r in gets}
    for path in ("/2021-03-23/meta-data/instance-id", "/2021-03-23/user-data", "/2021-03-23/meta-data/",
                 f"/2021-03-23/meta-data/network/interfaces/macs/{INFO['mac']}/local-ipv4s",
                 "/2021-03-23/dynamic/instance-identity", "/2021-03-23/dynamic/instance-identity/document"):
        assert path in asked, sorted(asked)
    assert run(env, ["cloud-init", "query", "instance_id"]).strip() == INFO["instance_id"]
    assert run(env, ["cloud-init", "query", "v1.cloud_name"]).strip() == "aws"
    assert run(env, ["cloud-init", "query", "v1.region"]).strip() == REGION
    # the stand-in refuses IMDSv1, as EC2 does with http_tokens = "required"
    bare = run(env, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                     f"http://{IMDS_IP}/latest/meta-data/instance-id"])
    assert bare == "401"


@pytest.mark.daemons
def test_machine_id_is_the_hosts_own(env: Env) -> None:
    img = Path(env.handles[HOST_A].image)
    assert (img / "etc/machine-id").read_text() == ""
    first = host_file(env, "/etc/machine-id").strip()
    assert len(first) == 32 and int(first, 16)
    second_name = HOST_B
    h = env.boot(second_name, img)
    second = host_file(env, "/etc/machine-id", second_name).strip()
    assert len(second) == 32 and second != first
    assert second != Path("/etc/machine-id").read_text().strip()
    assert container.stop(h), "the second host did not power off cleanly"
    del env.handles[second_name]
    assert not container.alive(second_name)


@pytest.mark.daemons
def test_units_are_sandboxed_timed_and_limited_as_on_an_instance(env: Env) -> None:
    rc, out = container.exec(env.handles[HOST_A],
                             ["systemd-run", "--wait", "--pipe", "--quiet", "-p", "ProtectSystem=strict",
                              "-p", "StateDirectory=h4probe", "sh", "-c",
                              "touch /var/lib/h4probe/ok && touch /etc/h4-written"])
    assert rc != 0 and "Read-only file system" in out, out
    assert run(env, ["test", "-e", "/var/lib/h4probe/ok"]) == ""
    assert run(env, ["test", "!", "-e", "/etc/h4-written"]) == ""
    # AccuracySec defaults to 1 min: without it the timer fires anywhere in 2..62 s
    run(env, ["systemd-run", "--quiet", "--on-active=2", "--timer-property=AccuracySec=100ms", "--unit=h4-timer",
              "touch", "/run/h4-timer-fired"])
    assert "h4-timer.timer" in run(env, ["systemctl", "list-timers", "--all", "--no-legend"])
    deadline = time.monotonic() + 15
    while not Path(f"/proc/{env.handles[HOST_A].leader}/root/run/h4-timer-fired").exists():
        assert time.monotonic() < deadline, "the OnActiveSec=2 timer did not fire in 15 s"
        time.sleep(0.2)
    soft = run(env, ["systemd-run", "--wait", "--pipe", "--quiet", "sh", "-c", "ulimit -Sn"]).strip()
    assert soft == "1024"


@pytest.mark.daemons
def test_freeze_pauses_every_process_and_thaw_resumes(env: Env) -> None:
    h = env.handles[HOST_A]
    run(env, ["systemd-run", "--quiet", "--unit=h4-tick", "sh", "-c",
              "while :; do echo t >> /run/h4-tick; sleep 0.1; done"])
    tick = Path(f"/proc/{h.leader}/root/run/h4-tick")
    time.sleep(1)
    container.freeze(h)
    try:
        n0 = len(tick.read_text().splitlines())
        time.sleep(1.5)
        n1 = len(tick.read_text().splitlines())
        states = {Path(f"/proc/{p}/status").read_text().split("State:")[1].split()[0] for p in container.pids(h)}
    finally:
        container.thaw(h)
    assert n1 == n0, f"{n1 - n0} ticks while frozen"
    assert states <= {"D", "S"} and n0 > 3, (states, n0)
    time.sleep(1)
    assert len(tick.read_text().splitlines()) > n1 + 3
    run(env, ["systemctl", "stop", "h4-tick"])


@pytest.mark.daemons
def test_reboot_runs_per_boot_modules_only(env: Env) -> None:
    name = HOST_A
    before = host_file(env, "/etc/machine-id")
    t0 = time.monotonic()
    # from the record, as another process (the rehearsal's CLI) would: binds and files kept
    assert container.handle(name) == env.handles[name]
    h = container.reboot(container.handle(name))
    env.handles[name] = h
    assert container.wait_running(h, timeout=180) == "running"
    env.boot_seconds["reboot"] = round(time.monotonic() - t0, 1)
    assert "status: done" in run(env, ["cloud-init", "status", "--long"])
    assert host_file(env, "/root/boots") == "boot\nboot\n"  # bootcmd: every boot
    assert host_file(env, "/root/runs") == "run\n"  # runcmd: once per instance
    assert host_file(env, "/etc/machine-id") == before
    (env.workdir / "shared" / "from-machine").write_text("shared\n")
    assert host_file(env, "/srv/shared/from-machine") == "shared\n"
    assert Path(f"/proc/{h.leader}/root/etc/hpc/given").read_bytes() == b"\x00bytes\n"


@pytest.mark.daemons
def test_reboot_from_inside_ends_nspawn_with_the_reboot_code(env: Env) -> None:
    name = HOST_A
    h = env.handles[name]
    run(env, ["systemctl", "reboot", "--no-block"])
    deadline = time.monotonic() + 60
    while container.exit_code(h) is None:
        assert time.monotonic() < deadline, "nspawn still runs 60 s after a reboot inside"
        time.sleep(0.1)
    assert container.exit_code(h) == container.REBOOT_EXIT_CODE
    container.kill(h)  # nothing left to kill: releases the mount and cgroups
    h2 = container.start(name, Path(h.image), Path(h.hostdir), env.ns)
    env.handles[name] = h2
    assert container.wait_running(h2, timeout=180) == "running"
    assert host_file(env, "/root/boots") == "boot\nboot\nboot\n"
    assert host_file(env, "/root/runs") == "run\n"


@pytest.mark.daemons
def test_kill_is_a_hard_crash_and_the_disk_boots_again(env: Env) -> None:
    name = HOST_A
    h = env.handles[name]
    run(env, ["sh", "-c", "echo crash-marker > /root/marker && sync"])
    victims = container.kill(h)
    assert h.leader in victims and h.nspawn_pid in victims
    assert container.pids(h) == []
    for pid in (h.leader, h.nspawn_pid):
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    assert not any(container.leftovers(name).values()), container.leftovers(name)
    h2 = container.start(name, Path(h.image), Path(h.hostdir), env.ns)
    env.handles[name] = h2
    assert container.wait_running(h2, timeout=180) == "running"
    assert host_file(env, "/root/marker") == "crash-marker\n"
    assert host_file(env, "/root/runs") == "run\n"
