"""Host images: a Debian (or Ubuntu) root built with debootstrap that boots under
systemd-nspawn as a rehearsal host (systemd as PID 1, the real cloud-init with its Ec2
datasource). OSES lists the OSes an image can be built of; debian-12 is the default.

    ensure("debian-12", tiers=False) -> Path     the image root, built once and cached
    python -m rehearsal.image build [--tiers] [--os debian-12]

An image is cached under CACHE_DIR/<os>-<base|tiers>-<hash>/root where the hash covers
the whole recipe (packages, files written into the image, disabled and masked units,
RECIPE_VERSION):
change any of them and the next ensure() builds a new image; the same recipe is never
built twice. A build goes to a temporary directory beside the cache entry and is renamed
into place when complete, under a lock, so two builders never race and a half-built
image is never used. Images are read-only lower layers: each host boots from its own
overlay (rehearsal.container).

What the image holds and why:
- BASE_PACKAGES: systemd + cloud-init and what the host scripts in cloud_init/scripts/
  run (python3 with boto3 and yaml, curl, iproute2, nftables, mkfs.ext4, openssl, ...).
- with tiers=True, TIER_PACKAGES preinstalled (the rehearsal has no network to the
  mirror), with every unit the packages enabled disabled again: only the host's
  cloud-init user data decides what runs, as on a fresh AMI.
- cloud-init uses the Ec2 datasource with the platform given, not probed (a container
  has no EC2 DMI data; see EC2_CONTAINER_DATASOURCE), and does not touch the network
  (the namespace is set up from outside).
- an empty /etc/machine-id (systemd gives each host its own on first boot unless the
  container writes one) and an empty /var/lib/cloud (a new instance).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Bump when the build steps change in a way the recipe data does not show.
RECIPE_VERSION = 1
CACHE_DIR = Path("/var/cache/hpc-rehearsal/images")


@dataclass(frozen=True)
class OsSpec:
    suite: str  # the suite given to debootstrap and written to the image's apt sources
    notes: str = ""
    distribution: str = "debian"  # "debian" or "ubuntu": the archive's layout and its mirror's path
    components: tuple[str, ...] = ("main",)  # archive components the image's apt sources name
    # What debootstrap needs for a distribution other than the host's: the archive's
    # keyring (and the Debian package that ships it, installed by _tools) and the script
    # for a suite this debootstrap may not know by name ("" = debootstrap's own choice).
    keyring: str = ""
    keyring_package: str = ""
    script: str = ""

    def sources_list(self, url: str) -> str:
        """The image's /etc/apt/sources.list for the mirror `url` (one-line format, in
        /etc/apt/sources.list itself: the rehearsal's hosts replace that file with the
        package mirror stand-in, so no other source may be left in sources.list.d/)."""
        comps = " ".join(self.components)
        if self.distribution == "ubuntu":  # -security is a pocket of the same archive
            return "".join(f"deb {url} {self.suite}{pocket} {comps}\n" for pocket in ("", "-updates", "-security"))
        security = url[: -len("/debian")] + "/debian-security"
        return f"deb {url} {self.suite} {comps}\ndeb {url} {self.suite}-updates {comps}\n" \
               f"deb {security} {self.suite}-security {comps}\n"


DEFAULT_OS = "debian-12"

# One row per bootable OS. Debian 13's systemd 257 was expected to refuse this machine's
# hybrid cgroup layout without SYSTEMD_CGROUP_ENABLE_LEGACY_FORCE=1 on PID 1's command
# line; measured, a trixie image booted to "running" under this machine's nspawn 252
# without it (nspawn gives the container its own cgroup tree).
#
# Ubuntu 24.04 (noble) is the release the hosts run in AWS; its image is for the PR smoke
# job on GitHub's ubuntu-24.04 runners. NOT YET BUILT ANYWHERE: the machine this was
# written on reaches Debian's archive only. What is known without a build:
# - the tier packages keep their Debian names in noble, most of them in universe (slurm-wlm,
#   munge, prometheus and its exporters, galera-4, redis): hence `main universe`;
#   nginx-light there is an empty universe package that depends on nginx (the binary).
#   Checked against packages.ubuntu.com: redis, nginx-light, prometheus-node-exporter,
#   prometheus-alertmanager, mariadb-backup, galera-4, slurmctld, slurm-client
#   (tools/install-debian-deps.sh); the rest of TIER_PACKAGES and BASE_PACKAGES are
#   expected under the same names and were not confirmed: a missing one fails the build's
#   apt-get install, which names it.
# - this machine's debootstrap (Debian 12's 1.0.128) has no `noble` script; Ubuntu's
#   releases since gutsy share the `gutsy` script (noble is a link to it where it exists).
# - the keyring is Ubuntu's ubuntu-archive-keyring.gpg: preinstalled on Ubuntu; on Debian
#   from the ubuntu-keyring package (Debian 13; Debian 12 only in bookworm-backports).
OSES: dict[str, OsSpec] = {
    "debian-12": OsSpec("bookworm"),
    "debian-13": OsSpec("trixie", "systemd 257 boots under nspawn 252 here without the legacy-cgroup switch"),
    "ubuntu-24.04": OsSpec(
        "noble", "not yet built anywhere; tier packages from universe; debootstrap's gutsy script",
        distribution="ubuntu", components=("main", "universe"),
        keyring="/usr/share/keyrings/ubuntu-archive-keyring.gpg", keyring_package="ubuntu-keyring", script="gutsy"),
}

# The mirror when the host's apt names none of the distribution's (an Ubuntu image built
# on a Debian machine). A Debian image is built from the host's own mirror only.
DEFAULT_MIRRORS = {"ubuntu": "http://archive.ubuntu.com/ubuntu"}


def os_spec(os_name: str) -> OsSpec:
    """The OsSpec of `os_name`, or an error that names the allowed values."""
    if os_name not in OSES:
        raise ImageError(f"unknown os {os_name!r}: allowed {', '.join(sorted(OSES))}")
    return OSES[os_name]


BASE_PACKAGES = (
    # the init system and what cloud-init needs to run as on an instance
    "systemd", "systemd-sysv", "dbus", "cloud-init", "ca-certificates", "netbase", "tzdata",
    # what the host scripts (cloud_init/scripts/) import or run
    "python3", "python3-boto3", "python3-yaml", "curl", "iproute2", "nftables", "openssl",
    "e2fsprogs", "util-linux", "mount", "gzip", "procps",
    # for a person logged in at 3 a.m.
    "sudo", "less",
    # as on an Ubuntu AMI: cloud-init's apt module imports a source's key with gpg
    # (the monitoring tier's Grafana repository)
    "gnupg",
    # as on an AMI (disabled below); also what cloud-init's ssh and set_passwords modules
    # expect, which warn on every boot without it
    "openssh-server",
)

# The tier packages (tools/install-debian-deps.sh and the `packages:` of
# cloud_init/templates/*/manifest.yaml). grafana is not a Debian package: the monitoring
# manifest's grafana needs its vendor's repository, unreachable here.
TIER_PACKAGES = (
    "haproxy", "keepalived", "nginx", "nginx-light",
    "redis-server", "redis-sentinel",
    "mariadb-server", "mariadb-client", "mariadb-backup", "galera-4", "socat",
    "slurmctld", "slurmdbd", "slurmd", "slurm-client", "munge",
    "prometheus", "prometheus-alertmanager", "prometheus-node-exporter", "prometheus-blackbox-exporter",
    "prometheus-mysqld-exporter", "prometheus-redis-exporter",
    "rsyslog", "chrony", "logrotate", "unattended-upgrades", "needrestart", "nfs-common", "git",
    "python3-redis", "python3-pymysql",
)

# Units disabled in every image (cloud-init user data may enable them), with the reason.
DISABLED_UNITS: dict[str, str] = {
    "ssh.service": "hosts are reached through the rehearsal (nsenter), as through SSM; "
                   "user data enables it where wanted",
    "apt-daily.timer": "the rehearsal has no route to a mirror: a failed apt-daily.service would "
                       "mark the host degraded in the middle of a drill",
    "apt-daily-upgrade.timer": "as apt-daily.timer",
}

# Units masked in every image, with the reason. Measured by booting the image under
# systemd-nspawn and reading `systemctl --failed` (docs/host-image.md).
MASKED_UNITS: dict[str, str] = {
    "run-rpc_pipefs.mount": "this kernel has no rpc_pipefs (no NFS client; EFS is a bind mount in the "
                            "rehearsal): once nfs-common's nfs-client.target is enabled the mount fails "
                            "and marks the host degraded; masked, nfs-client.target still starts",
}

# cloud-init 22.4 tells AWS from other clouds by /sys/hypervisor/uuid or DMI data; a
# container has neither (cloud-init reads no DMI in a container at all), so the stock Ec2
# datasource takes the platform for "unknown" and crawls with IMDSv1 GETs without a token,
# which an IMDS that requires tokens (http_tokens = "required") refuses. This datasource is
# the stock one with the platform given instead of probed: it asks for an IMDSv2 token and
# the instance identity document exactly as on an instance.
EC2_CONTAINER_DATASOURCE = '''\
"""The Ec2 datasource for a container that plays an EC2 instance (HPC portal rehearsal).

Identical to cloudinit.sources.DataSourceEc2.DataSourceEc2 except that the platform is
AWS by configuration: a container shows no EC2 DMI data or /sys/hypervisor/uuid.
Settings are read from `datasource: Ec2:` as for the stock datasource.
"""
from cloudinit import sources
from cloudinit.sources import DataSourceEc2 as ec2


class DataSourceEc2Container(ec2.DataSourceEc2):
    dsname = "Ec2"

    def _get_cloud_name(self):
        return ec2.CloudNames.AWS


datasources = [(DataSourceEc2Container, (sources.DEP_FILESYSTEM, sources.DEP_NETWORK))]


def get_datasource_list(depends):
    return sources.list_from_depends(depends, datasources)
'''

CLOUD_CFG = """\
# The rehearsal's hosts are EC2 instances played by containers (see
# cloudinit/sources/DataSourceEc2Container.py). Only that datasource: with a fallback to
# None, a host whose metadata service failed would finish "done" with no user data.
datasource_list: [ Ec2Container ]
datasource:
  Ec2:
    metadata_urls: [ "http://169.254.169.254" ]
    max_wait: 60
    timeout: 5
# The network namespace is configured from outside, as the VPC's DHCP would.
network: {config: disabled}
# No locales package: C.UTF-8 needs no generation.
locale: C.UTF-8
# The image's sshd is disabled (hosts are reached through the rehearsal, as through
# SSM); one fast host key type when user data enables it.
ssh_genkeytypes: [ ed25519 ]
"""

# ds-identify would append None to the datasource list; "enabled" skips it (the list
# above is the answer) and keeps cloud-init enabled in a container.
DS_IDENTIFY_CFG = "policy: enabled\n"

IMAGE_FILES: dict[str, str] = {
    "etc/cloud/cloud.cfg.d/90-hpc-rehearsal.cfg": CLOUD_CFG,
    "etc/cloud/ds-identify.cfg": DS_IDENTIFY_CFG,
    "usr/lib/python3/dist-packages/cloudinit/sources/DataSourceEc2Container.py": EC2_CONTAINER_DATASOURCE,
    "etc/hostname": "localhost\n",
    "etc/hosts": "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n",
    "etc/resolv.conf": "",  # each host gets its own
    "etc/machine-id": "",  # empty: each host gets its own
}

# Files only a distribution's image gets. Debian's cloud-init package ships
# `apt: preserve_sources_list: true` in /etc/cloud/cloud.cfg, so the sources.list the
# rehearsal gives each host (the package mirror stand-in, rehearsal/hosts.py) is used as
# written. Ubuntu's does not: its apt-configure module would write the archive's regional
# EC2 mirror over it (unreachable in the rehearsal, as a host's NAT path is played by the
# mirror stand-in), so the Ubuntu image says the same as Debian's package does.
DISTRIBUTION_FILES: dict[str, dict[str, str]] = {
    "ubuntu": {"etc/cloud/cloud.cfg.d/91-hpc-rehearsal-apt.cfg":
               "# As Debian's cloud-init package: keep the sources.list the host was given.\n"
               "apt:\n  preserve_sources_list: true\n"},
}

MARKER = ".hpc-image.json"


class ImageError(RuntimeError):
    pass


def recipe(os_name: str = DEFAULT_OS, tiers: bool = False) -> dict[str, Any]:
    """Everything an image is built from, as data: its hash names the cache entry."""
    spec = os_spec(os_name)
    packages = sorted(set(BASE_PACKAGES) | (set(TIER_PACKAGES) if tiers else set()))
    r = {"recipe_version": RECIPE_VERSION, "os": os_name, "suite": spec.suite, "tiers": tiers,
         "packages": packages,
         "files": dict(sorted({**IMAGE_FILES, **DISTRIBUTION_FILES.get(spec.distribution, {})}.items())),
         "disabled": dict(sorted(DISABLED_UNITS.items())), "masked": dict(sorted(MASKED_UNITS.items()))}
    if spec.distribution != "debian":
        # Only where they differ from Debian's: a Debian recipe (and so its cached image)
        # stays what it was before other distributions existed.
        r.update(distribution=spec.distribution, components=list(spec.components))
    return r


def recipe_hash(r: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(r, sort_keys=True).encode()).hexdigest()


def image_name(os_name: str = DEFAULT_OS, tiers: bool = False) -> str:
    r = recipe(os_name, tiers)
    return f"{os_name}-{'tiers' if tiers else 'base'}-{recipe_hash(r)[:16]}"


def image_root(os_name: str = DEFAULT_OS, tiers: bool = False, cache: Path = CACHE_DIR) -> Path:
    return cache / image_name(os_name, tiers) / "root"


def mirror(sources_dirs: tuple[Path, ...] = (Path("/etc/apt/sources.list.d"), Path("/etc/apt")),
           distribution: str = "debian") -> str:
    """The `distribution`'s mirror this machine's apt uses (a URI ending in /debian or
    /ubuntu, in deb822 .sources or one-line .list files); without one, Ubuntu's archive
    (an Ubuntu image built on a Debian machine), and for Debian an error."""
    for d in sources_dirs:
        for f in sorted(d.glob("*.sources")) + sorted(d.glob("*.list")):
            text = f.read_text(errors="replace")
            for line in re.findall(r"^\s*URIs:[ \t]*(.+)", text, re.M):  # deb822: one or more URIs
                for uri in line.split():
                    if uri.rstrip("/").endswith(f"/{distribution}"):
                        return uri.rstrip("/")
            for uri in re.findall(r"^\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)", text, re.M):
                if uri.rstrip("/").endswith(f"/{distribution}"):
                    return uri.rstrip("/")
    if distribution in DEFAULT_MIRRORS:
        return DEFAULT_MIRRORS[distribution]
    raise ImageError(f"no {distribution.capitalize()} mirror (a URI ending in /{distribution}) in "
                     "/etc/apt/sources.list.d/ or /etc/apt/sources.list")


def _run(argv: list[str], log: Any, **kw: Any) -> None:
    log.write(f"+ {' '.join(argv)}\n")
    log.flush()
    cp = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kw)
    if cp.returncode != 0:
        raise ImageError(f"{' '.join(argv[:4])}... failed with {cp.returncode}: see {log.name}")


def _in_package_lists(package: str) -> bool:
    return subprocess.run(["apt-cache", "show", "--no-all-versions", package], capture_output=True).returncode == 0


def _tools(log: Any, os_name: str = DEFAULT_OS) -> None:
    """debootstrap builds the image, systemd-nspawn boots it, and debootstrap checks the
    archive's signature with the OS's keyring: install what is missing."""
    spec = os_spec(os_name)
    need = [("debootstrap", "/usr/sbin/debootstrap"), ("systemd-container", "/usr/bin/systemd-nspawn")]
    if spec.keyring:
        need.append((spec.keyring_package, spec.keyring))
    missing = [p for p, path in need if not Path(path).exists()]
    if missing:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        _run(["apt-get", "update", "-qq"], log, env=env)
        unknown = [p for p in missing if not _in_package_lists(p)]
        if unknown:
            raise ImageError(f"{', '.join(unknown)} (for {os_name}) is not in this machine's package lists"
                             + (f" (Debian 12 has {spec.keyring_package} only in bookworm-backports)"
                                if spec.keyring_package in unknown else ""))
        _run(["apt-get", "install", "-y", "-qq", "-o", "DPkg::Lock::Timeout=600", "--no-install-recommends",
              *missing], log, env=env)


def _in_root(root: Path, script: str, log: Any, debs: Path | None = None) -> None:
    """Run a shell script chrooted in `root`, in a private mount and PID namespace: the
    mounts it needs (/proc, /sys, /dev, the shared .deb cache) and anything a package
    left running vanish with it."""
    wrapper = ('set -e; R="$1"; D="$2"; shift 2; mount -t proc proc "$R/proc"; mount -t sysfs sysfs "$R/sys"; '
               'mount --rbind /dev "$R/dev"; '
               'if [ -n "$D" ]; then mount --bind "$D" "$R/var/cache/apt/archives"; fi; '
               'exec chroot "$R" /bin/sh -ec "$1"')
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive", "LANG": "C.UTF-8"}
    if debs is not None:
        (debs / "partial").mkdir(parents=True, exist_ok=True)
    _run(["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child", "--",
          "/bin/sh", "-c", wrapper, "sh", str(root), str(debs or ""), script], log, env=env)


def _enabled_units(root: Path) -> set[str]:
    """Unit files with an enablement symlink under the image's /etc/systemd/system/."""
    base = root / "etc/systemd/system"
    out = set()
    for wants in base.glob("*.wants"):
        out |= {p.name for p in wants.iterdir() if p.is_symlink()}
    for wants in base.glob("*.requires"):
        out |= {p.name for p in wants.iterdir() if p.is_symlink()}
    return out


def _build(r: dict[str, Any], tmp: Path, log: Any, debs: Path) -> dict[str, Any]:
    root = tmp / "root"
    spec = os_spec(r["os"])
    url = mirror(distribution=spec.distribution)
    suite = r["suite"]
    t0 = time.monotonic()
    debs.mkdir(parents=True, exist_ok=True)
    extra = [f"--keyring={spec.keyring}"] if spec.keyring else []
    if spec.components != ("main",):
        extra.append(f"--components={','.join(spec.components)}")
    _run(["debootstrap", "--variant=minbase", "--include=ca-certificates", f"--cache-dir={debs}", *extra, suite,
          str(root), url, *([spec.script] if spec.script else [])], log)
    t_boot = time.monotonic() - t0
    (root / "etc/apt/sources.list").write_text(spec.sources_list(url))
    # Packages must not start services while the image is built (policy-rc.d 101 = refuse).
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    shutil.copyfile("/etc/resolv.conf", root / "etc/resolv.conf")
    before = _enabled_units(root)
    base = [p for p in r["packages"] if p in BASE_PACKAGES]
    tiers = [p for p in r["packages"] if p not in BASE_PACKAGES]
    apt = "apt-get install -y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold " \
          "--no-install-recommends"
    _in_root(root, f"apt-get update -q && {apt} {' '.join(base)}", log, debs)
    base_enabled = _enabled_units(root)
    disabled: list[str] = []
    if tiers:
        _in_root(root, f"{apt} {' '.join(tiers)}", log, debs)
        # Only cloud-init decides what runs: undo what the tier packages enabled.
        disabled = sorted(_enabled_units(root) - base_enabled)
        if disabled:
            _run(["systemctl", f"--root={root}", "disable", *disabled], log)
    if r["disabled"]:
        _run(["systemctl", f"--root={root}", "disable", *r["disabled"]], log)
    for unit in r["masked"]:
        _run(["systemctl", f"--root={root}", "mask", unit], log)
    _in_root(root, "apt-get clean", log)
    for rel, content in r["files"].items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.is_symlink():
            p.unlink()
        p.write_text(content)
    policy.unlink()
    (root / "var/lib/dbus/machine-id").unlink(missing_ok=True)  # dbus reads /etc/machine-id
    for key in (root / "etc/ssh").glob("ssh_host_*"):  # each instance makes its own (cloud-init)
        key.unlink()
    for d in ("var/lib/cloud", "var/lib/apt/lists", "var/log/journal"):
        shutil.rmtree(root / d, ignore_errors=True)
    (root / "var/lib/apt/lists/partial").mkdir(parents=True)
    still_enabled = sorted(_enabled_units(root))
    return {"debootstrap_seconds": round(t_boot, 1), "mirror": url, "enabled_before_packages": sorted(before),
            "disabled_after_tiers": disabled, "enabled": still_enabled}


@contextlib.contextmanager
def _lock(cache: Path) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".build.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _du_bytes(path: Path) -> int:
    cp = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True)
    return int(cp.stdout.split()[0])


def ensure(os_name: str = DEFAULT_OS, tiers: bool = False, cache: Path = CACHE_DIR,
           progress: Any = None) -> Path:
    """The image root for (os, tiers), built if the cache has no image of this recipe.
    Safe to call from several processes at once: one builds, the others wait."""
    r = recipe(os_name, tiers)
    name = image_name(os_name, tiers)
    final = cache / name
    if (final / MARKER).exists():
        return final / "root"
    with _lock(cache):
        if (final / MARKER).exists():
            return final / "root"
        tmp = cache / f".build-{name}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        for stale in cache.glob(f".build-{name}-*"):  # a build killed half-way (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
        log_path = cache / f"{name}.build.log"
        t0 = time.monotonic()
        try:
            with open(log_path, "w") as log:
                if progress:
                    progress(f"building {name} (log: {log_path})")
                _tools(log, os_name)
                # Downloaded packages are kept per suite beside the images: a rebuild downloads
                # only what changed (build input, not part of the image or its recipe).
                facts = _build(r, tmp, log, cache.parent / "debs" / r["suite"])
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        facts.update(build_seconds=round(time.monotonic() - t0, 1), size_bytes=_du_bytes(tmp / "root"),
                     built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), hash=recipe_hash(r),
                     recipe=r)
        (tmp / MARKER).write_text(json.dumps(facts, indent=2) + "\n")
        os.rename(tmp, final)
        if progress:
            progress(f"built {name} in {facts['build_seconds']} s, {facts['size_bytes'] / 2**20:.0f} MiB")
        return final / "root"


def facts(root: Path) -> dict[str, Any]:
    """What the build recorded about an image (times, size, units it enabled and disabled)."""
    return dict(json.loads((root.parent / MARKER).read_text()))


def _installed_depends(root: Path) -> dict[str, set[str]]:
    """{installed package: the installed packages it depends on} from the image's dpkg status."""
    deps: dict[str, set[str]] = {}
    for para in (root / "var/lib/dpkg/status").read_text().split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z-]+):[ \t]*(.*(?:\n[ \t].*)*)", para, re.M))
        if "Package" in fields and "install ok installed" in fields.get("Status", ""):
            names = re.split(r"[,|]", fields.get("Depends", "") + "," + fields.get("Pre-Depends", ""))
            deps[fields["Package"]] = {n.split("(")[0].split(":")[0].strip() for n in names if n.strip()}
    return {p: {d for d in ds if d in deps} for p, ds in deps.items()}


def units_enabled_by(root: Path, packages: Iterable[str]) -> list[str]:
    """The units that installing `packages` (and what they pull in) enabled and the tiers
    image's build disabled again. On an instance cloud-init's `packages:` installs them and
    Debian enables and starts their services; in the image they are installed already, so
    the rehearsal enables these itself to match (e.g. nginx -> nginx-common's
    nginx.service, nfs-common -> rpcbind's units)."""
    disabled = set(facts(root).get("disabled_after_tiers", []))
    deps = _installed_depends(root)
    todo = list(packages)
    for pkg in todo:
        if pkg not in deps:
            raise ImageError(f"package {pkg!r} is not installed in {root} (tiers image: {', '.join(TIER_PACKAGES)})")
    seen: set[str] = set()
    while todo:
        pkg = todo.pop()
        if pkg not in seen:
            seen.add(pkg)
            todo += sorted(deps[pkg] - seen)
    info = root / "var/lib/dpkg/info"
    out: set[str] = set()
    for pkg in seen:
        for f in [info / f"{pkg}.list", *info.glob(f"{pkg}:*.list")]:
            if f.exists():
                out |= {Path(x).name for x in f.read_text().splitlines()
                        if "/systemd/system/" in x and Path(x).name in disabled}
    return sorted(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rehearsal.image", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the image unless the cache has this recipe; print its root")
    b.add_argument("--os", default=DEFAULT_OS, choices=sorted(OSES))
    b.add_argument("--tiers", action="store_true", help="preinstall the tier packages (services disabled)")
    p = sub.add_parser("path", help="print where the image of this recipe is (or would be)")
    p.add_argument("--os", default=DEFAULT_OS, choices=sorted(OSES))
    p.add_argument("--tiers", action="store_true")
    args = ap.parse_args(argv)
    if args.cmd == "path":
        print(image_root(args.os, args.tiers))
        return 0
    try:
        root = ensure(args.os, args.tiers, progress=lambda m: print(m, file=sys.stderr, flush=True))
    except ImageError as e:
        print(f"image: {e}", file=sys.stderr)
        return 1
    print(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
