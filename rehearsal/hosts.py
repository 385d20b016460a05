"""Rehearsal hosts seen from outside, as systemd containers (rehearsal/container.py over
rehearsal/image.py): PID 1 is systemd 252, the first boot runs the real cloud-init with
its Ec2 datasource against the IMDS stand-in, and the host's units, drop-ins, ordering,
mounts, sandboxing, limits, timers and restart policies are systemd's own.

What the stack and the drills call:
  prepare(layout, h, deploy)   a new instance disk: what the image of this rehearsal adds
                               (private zone in /etc/hosts, resolver, memory budget, the
                               AWS endpoint override and the package mirror)
  start(layout, h)             boot (nspawn in the host's network namespace)
  boot(layout, name)           wait for cloud-init and systemd: the per-host boot report
  run / call / put_file / kill / stop / alive / pids / freeze / thaw / unit_state / hold /
  kill_unit / rss_bytes / pss_bytes
  efs_stall / efs_resume / efs_status   the Slurm share stops answering, as an EFS mount
                               target that does (the `efs-stall` drill)

What exists only for the rehearsal lives on the host's disk, never in user-data:
/etc/hpc/aws-endpoint (the stand-in endpoints), /etc/apt/sources.list (the package
mirror stand-in), /etc/hosts (the private zone: there is no DNS here).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from components.hostctx import EFS_MOUNTS

from . import container as C
from .layout import EFS_IP, ENDPOINT_IP, ENDPOINT_PORT, MIRROR_IP, Layout, RHost

DATA_VOLUME_MOUNT = "/var/lib/hpc-data"  # where components.hostctx puts a host's data volume
# The data volume goes through the power-loss layer (rehearsal/lazyfs.py): the host sees
# hostdir/lazy, a FUSE passthrough of hostdir/volume that can drop every write not yet
# fsynced (the power-loss drill). HPC_REHEARSAL_LAZYFS=0 binds hostdir/volume directly.
LAZY_DIR, LAZY_SOCK, LAZY_PID, LAZY_LOG = "lazy", "lazyfs.sock", "lazyfs.pid", "lazyfs.log"


def lazy_volume() -> bool:
    import os

    return os.environ.get("HPC_REHEARSAL_LAZYFS", "1").strip() not in ("0", "no", "false")
HOLD_DROPIN = "zz-rehearsal-hold.conf"


class HostError(RuntimeError):
    pass


def _handle(name: str) -> C.Handle:
    try:
        return C.handle(name)
    except C.ContainerError as e:
        raise HostError(str(e)) from e


def leader(host: str) -> int:
    """The host's systemd (its PID 1) as this machine sees it."""
    return _handle(host).leader


def host_files(layout: Layout, h: RHost) -> dict[str, str]:
    """What the rehearsal's image adds for this host (see the module doc)."""
    lines = ["127.0.0.1 localhost", f"{h.ip} {h.name}.{layout.cfg.domain} {h.name}"]
    names: dict[str, list[str]] = {}
    for fqdn, addr in layout.topo.endpoints.items():
        names.setdefault(addr, []).append(fqdn)
    # The VPC's resolver answers the file system's name with its mount target's address.
    try:
        efs = json.loads((layout.workdir / "deploy.json").read_text()).get("efs") or {}
    except (OSError, ValueError):
        efs = {}
    if efs.get("dns_name"):
        names.setdefault(EFS_IP, []).append(efs["dns_name"])
    lines += [f"{addr} {' '.join(sorted(n))}" for addr, n in sorted(names.items())]
    return {
        "/etc/hosts": "\n".join(lines) + "\n",
        # Nothing answers DNS in the rehearsal: lookups of unknown names fail at once.
        "/etc/resolv.conf": "nameserver 127.0.0.53\noptions timeout:1 attempts:1\n",
        "/etc/hpc/memory-override.json": json.dumps({"total_mib": h.memory_mib}) + "\n",
        "/etc/hpc/aws-endpoint": f"http://{ENDPOINT_IP}:{ENDPOINT_PORT}\n",
        "/etc/apt/sources.list": f"# the rehearsal's package mirror stand-in (rehearsal/mirror.py)\n"
                                 f"deb [trusted=yes] http://{MIRROR_IP}/debian ./\n",
    }


def image_for(layout: Layout) -> Path:
    from . import image

    return image.ensure(layout.os_name, tiers=True)


def package_enabled_units(image_root: Path, packages: list[str]) -> dict[str, str]:
    """unit -> the target that wants it, for the units that installing the host's
    packages (and what they pull in) enables (their postinst's `deb-systemd-helper
    enable`). The image holds the tier packages preinstalled with those units disabled
    again (rehearsal/image.py), so installing them at first boot is a no-op here: their
    enablement is put back for the packages this host's user-data installs, as apt would
    leave it. Packages the image does not hold (grafana: from the mirror stand-in) are
    installed for real at boot."""
    from . import image

    info = image_root / "var/lib/dpkg/info"
    held = [p for p in packages if (info / f"{p}.list").exists() or any(info.glob(f"{p}:*.list"))]
    out: dict[str, str] = {}
    for unit in image.units_enabled_by(image_root, held):
        path = next((image_root / d / unit for d in ("lib/systemd/system", "usr/lib/systemd/system")
                     if (image_root / d / unit).exists()), None)
        text = path.read_text() if path is not None else ""
        wanted = [x.split("=", 1)[1].split()[0] for x in text.splitlines() if x.startswith("WantedBy=")]
        out[unit] = wanted[0] if wanted else "multi-user.target"
    return out


def prepare(layout: Layout, h: RHost, deploy: dict[str, Any] | None = None, keep_volume: bool = False) -> Path:
    """A fresh instance disk (the previous one, if any, is deleted), with the enablement
    of the units the host's packages enable (see package_enabled_units). `keep_volume`:
    the data volume outlives the instance, as the EBS volume a replacement is attached
    to again (tools/rolling.py on a data host)."""
    d = layout.hostdir(h.name)
    volume_stop(d)  # a layer left mounted: never delete through it
    kept = d.parent / f".{h.name}-volume"
    if keep_volume and (d / "volume").is_dir():
        shutil.rmtree(kept, ignore_errors=True)
        (d / "volume").rename(kept)
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    if keep_volume and kept.is_dir():
        kept.rename(d / "volume")
    else:
        (d / "volume").mkdir()
    packages = ((deploy or {}).get("hosts", {}).get(h.name) or {}).get("packages", [])
    image_root = image_for(layout)
    for unit, target in package_enabled_units(image_root, packages).items():
        wants = d / "upper" / "etc/systemd/system" / f"{target}.wants"
        wants.mkdir(parents=True, exist_ok=True)
        src = "/lib/systemd/system/" + unit
        (wants / unit).symlink_to(src)
    return d


def binds(layout: Layout, h: RHost) -> list[tuple[str, str]]:
    out = []
    for name, path, roles in EFS_MOUNTS:
        if set(roles) & set(h.roles):
            (layout.shared / name).mkdir(parents=True, exist_ok=True)
            out.append((str(efs_source(layout, name)), path))
    if layout.topo.host(h.name).data_gb:
        d = layout.hostdir(h.name)
        out.append((str(d / (LAZY_DIR if lazy_for(layout, h) else "volume")), DATA_VOLUME_MOUNT))
    return out


# ------------------------------------------------------------------ the data volume's power-loss layer
def _lazy_pid(d: Path) -> int | None:
    return _lazy_pid_file(d / LAZY_PID)


def _lazy_pid_file(f: Path) -> int | None:
    try:
        pid = int(f.read_text())
        Path(f"/proc/{pid}").stat()
        return pid
    except (OSError, ValueError):
        return None


def lazy_for(layout: Layout, h: RHost) -> bool:
    """The data tier's volumes (MariaDB, Redis) go through the layer; the monitoring
    host's (Prometheus: mmap-heavy, nothing a drill cuts) does not."""
    return bool(layout.topo.host(h.name).data_gb) and "data" in h.roles and lazy_volume()


def volume_start(layout: Layout, h: RHost) -> None:
    """The data volume's layer, running before the host (re)starts: mounted if it is not."""
    if not lazy_for(layout, h):
        return
    from . import lazyfs
    from .stack import _python

    d = layout.hostdir(h.name)
    if lazyfs.mounted(d / LAZY_DIR) and _lazy_pid(d):
        return
    volume_stop(d)
    (d / "volume").mkdir(parents=True, exist_ok=True)
    pid = lazyfs.start(d / "volume", d / LAZY_DIR, d / LAZY_SOCK, d / LAZY_LOG, python=_python())
    (d / LAZY_PID).write_text(f"{pid}\n")


def volume_power_off(layout: Layout, host: str) -> dict[str, Any]:
    """The data volume loses every write not fsynced (its host must be dead already):
    what was dropped ({"files", "bytes", "paths"}). The next start() mounts it again."""
    from . import lazyfs

    d = layout.hostdir(host)
    if not lazyfs.mounted(d / LAZY_DIR):
        raise HostError(f"{host}: its data volume is not behind the power-loss layer (HPC_REHEARSAL_LAZYFS=0?)")
    out = lazyfs.poweroff(d / LAZY_SOCK, d / LAZY_DIR, _lazy_pid(d))
    (d / LAZY_PID).unlink(missing_ok=True)
    return out


def volume_status(layout: Layout, host: str) -> str:
    """One line on the host's power-loss layer for a failure's notes: its dirty files and
    saved bytes, "no layer", or that it does not answer (a stuck layer blocks MariaDB)."""
    from . import lazyfs

    d = layout.hostdir(host)
    if not lazyfs.mounted(d / LAZY_DIR):
        return "no power-loss layer mounted"
    try:
        st = lazyfs.call(d / LAZY_SOCK, "status", 5)
    except (OSError, ValueError) as e:
        return f"power-loss layer does not answer its control socket: {e}"
    return (f"power-loss layer: {st.get('dirty_files')} dirty files, {st.get('saved_bytes')} bytes saved for undo, "
            f"{st.get('waiting')} operations waiting, stalled {st.get('stalled')}")


def volume_stop(d: Path) -> None:
    """Unmount the layer cleanly (nothing dropped), when there is one."""
    from . import lazyfs

    mnt = d / LAZY_DIR
    pid = _lazy_pid(d)
    if pid or lazyfs.mounted(mnt):
        lazyfs.stop(d / LAZY_SOCK, mnt, pid)
    (d / LAZY_PID).unlink(missing_ok=True)


# ------------------------------------------------------------------ the Slurm share's stall layer
# The Slurm share (slurmctld's StateSaveLocation) reaches its hosts through the same FUSE
# layer in --durable mode (nothing is undone at a power cut: EFS is durable), so the
# `efs-stall` drill can make it stop answering: every operation waits, as on an NFS
# mount `hard` whose server is gone. workdir/efs-layer/<share> is the mountpoint the
# hosts bind, workdir/efs/<share> stays the backing directory.
EFS_LAYER = "efs-layer"
STALLABLE_SHARES = ("slurm",)


def efs_source(layout: Layout, name: str) -> Path:
    """What a host binds for EFS share `name`: the layer's mountpoint for a stallable
    share (when the layers are on), else the share's directory."""
    if name in STALLABLE_SHARES and lazy_volume():
        return layout.workdir / EFS_LAYER / name
    return layout.shared / name


def _efs_paths(workdir: Path, name: str) -> tuple[Path, Path, Path, Path]:
    d = workdir / EFS_LAYER
    return d / name, d / f"{name}.sock", d / f"{name}.pid", d / f"{name}.log"


def efs_start(layout: Layout, h: RHost) -> None:
    """The layer of every stallable share `h` mounts, running before `h` (re)starts."""
    from . import lazyfs
    from .stack import _python

    if not lazy_volume():
        return
    for name, _path, roles in EFS_MOUNTS:
        if name not in STALLABLE_SHARES or not set(roles) & set(h.roles):
            continue
        mnt, sock, pidf, log = _efs_paths(layout.workdir, name)
        if lazyfs.mounted(mnt) and _lazy_pid_file(pidf):
            continue
        efs_stop(layout.workdir, name)
        (layout.shared / name).mkdir(parents=True, exist_ok=True)
        pid = lazyfs.start(layout.shared / name, mnt, sock, log, python=_python(), durable=True)
        pidf.write_text(f"{pid}\n")


def efs_stop(workdir: Path, name: str) -> bool:
    """Unmount a share's layer (ending a stall first); True if there was one."""
    from . import lazyfs

    mnt, sock, pidf, _log = _efs_paths(workdir, name)
    pid = _lazy_pid_file(pidf)
    there = bool(pid) or lazyfs.mounted(mnt)
    if there:
        lazyfs.stop(sock, mnt, pid)
    pidf.unlink(missing_ok=True)
    return there


def _efs_sock(layout: Layout, name: str) -> Path:
    from . import lazyfs

    mnt, sock, _pidf, _log = _efs_paths(layout.workdir, name)
    if not lazyfs.mounted(mnt):
        raise HostError(f"EFS share {name!r} is not behind the stall layer ({mnt} not mounted; "
                        "HPC_REHEARSAL_LAZYFS=0?): the efs-stall drill needs it")
    return sock


def efs_stall(layout: Layout, seconds: float, name: str = "slurm") -> dict[str, Any]:
    """EFS share `name` stops answering for `seconds` at most (efs_resume ends it sooner)."""
    from . import lazyfs

    return lazyfs.stall(_efs_sock(layout, name), seconds)


def efs_resume(layout: Layout, name: str = "slurm") -> dict[str, Any]:
    from . import lazyfs

    return lazyfs.resume(_efs_sock(layout, name))


def efs_status(layout: Layout, name: str = "slurm") -> dict[str, Any]:
    from . import lazyfs

    return lazyfs.call(_efs_sock(layout, name), "status", 10)


def start(layout: Layout, h: RHost) -> int:
    """Boot the host (its data volume's layer and its EFS shares' layers first); returns
    the pid of its systemd-nspawn."""
    volume_start(layout, h)
    efs_start(layout, h)
    handle = C.start(h.name, image_for(layout), layout.hostdir(h.name), h.ns, binds=binds(layout, h),
                     files=host_files(layout, h))
    return handle.nspawn_pid


def run(layout: Layout, host: str, argv: list[str], timeout: float = 120) -> tuple[int, str]:
    return C.exec(_handle(host), argv, timeout=timeout)


def put_file(layout: Layout, host: str, name: str, data: bytes) -> str:
    """Hand a file to the host (as an operator's scp would); returns its path there."""
    path = f"/var/tmp/{name}"
    rc, out = C.exec(_handle(host), ["sh", "-c", f"umask 077 && cat > {path}"], timeout=300, input=data)
    if rc != 0:
        raise HostError(f"{host}: writing {path}: {out.strip()}")
    return path


def _cloud_init_status(text: str) -> str:
    """The `status:` of `cloud-init status --long`. With --wait it prints a dot per poll
    first; cloud-init 22.4 ends them with a line break, 25.x (Debian 13) does not
    ("....status: done", measured), so the dots are skipped."""
    return next((line.lstrip(".").split(":", 1)[1].strip() for line in text.splitlines()
                 if line.lstrip(".").startswith("status:")), "unknown")


def _failed_units(layout: Layout, host: str) -> list[str]:
    _rc, out = run(layout, host, ["systemctl", "list-units", "--failed", "--plain", "--no-legend", "--no-pager"],
                   timeout=30)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def boot(layout: Layout, host: str, timeout: float = 1200) -> dict[str, Any]:
    """Wait for the first boot to finish: cloud-init's own status and systemd's state,
    the units that failed, and how long it took."""
    t0 = time.monotonic()
    h = _handle(host)
    rc, ci = C.exec(h, ["cloud-init", "status", "--wait", "--long"], timeout=timeout)
    state = C.wait_running(h, timeout=max(30.0, timeout - (time.monotonic() - t0)))
    return {"cloud_init": _cloud_init_status(ci), "cloud_init_rc": rc, "cloud_init_detail": ci.strip()[-2000:],
            "systemd": state, "failed_units": _failed_units(layout, host), "seconds": round(time.monotonic() - t0, 1)}


# A cloud-init error the rehearsal cannot avoid and says so: the monitoring tier adds
# Grafana's apt repository with its key id, which cloud-init imports from
# keyserver.ubuntu.com; nothing here reaches a keyserver, and no stand-in can serve a
# key with the vendor's fingerprint. The rest of the host's user-data runs (Grafana's
# package comes from the mirror stand-in as a labelled placeholder).
ACCEPTED_CLOUD_INIT_ERRORS = {
    "apt-configure: Grafana's key from keyserver.ubuntu.com":
        ("apt-configure", "Failed to import key 'B53AE77BADB630A683046005963FA27710458545' from keyserver"),
}


def host_state(layout: Layout, host: str) -> dict[str, Any]:
    """A host's state as systemd and cloud-init report it now, with the errors the
    rehearsal accepts named (see ACCEPTED_CLOUD_INIT_ERRORS)."""
    _rc, system = run(layout, host, ["systemctl", "is-system-running"], timeout=30)
    _rc, ci = run(layout, host, ["cloud-init", "status", "--long"], timeout=30)
    status = _cloud_init_status(ci)
    # 22.4 lists each error as "('module', Error(...))"; 25.x as "\t- ('module', ...)" with
    # its own summary lines ("- Failed to obtain gpg key ...") around them.
    errors = [e for e in (line.strip().removeprefix("- ") for line in ci.splitlines()) if e.startswith("(")]
    accepted = [name for name, (module, text) in ACCEPTED_CLOUD_INIT_ERRORS.items()
                if any(module in e and text in e for e in errors)]
    unexplained = [e for e in errors if not any(m in e and t in e for m, t in ACCEPTED_CLOUD_INIT_ERRORS.values())]
    units = _failed_units(layout, host)
    # cloud-init's own error marks cloud-config.service failed (25.x: cloud-init-main.service
    # too, measured on Debian 13): accepted with it.
    units_left = [u for u in units if not (accepted and not unexplained
                                           and u in ("cloud-config.service", "cloud-init-main.service"))]
    ok = (status == "done" or (status == "error" and accepted and not unexplained)) and not units_left and \
        system.strip() in ("running", "degraded")
    return {"systemd": system.strip(), "cloud_init": status, "failed_units": units, "accepted": accepted,
            "errors": unexplained, "ok": ok}


def unit_state(layout: Layout, host: str, unit: str) -> str:
    _rc, out = run(layout, host, ["systemctl", "show", "-p", "ActiveState", "--value", unit], timeout=20)
    return out.strip()


def hold(layout: Layout, host: str, unit: str, held: bool) -> None:
    """Hold back a unit's restart (a runtime drop-in Restart=no), or release it."""
    d = f"/run/systemd/system/{unit}.d"
    if held:
        cmd = f"mkdir -p {d} && printf '[Service]\\nRestart=no\\n' > {d}/{HOLD_DROPIN} && systemctl daemon-reload"
    else:
        cmd = f"rm -f {d}/{HOLD_DROPIN} && systemctl daemon-reload"
    rc, out = run(layout, host, ["sh", "-c", cmd], timeout=30)
    if rc != 0:
        raise HostError(f"{host}: hold {unit}={held}: {out.strip()}")


def kill_unit(layout: Layout, host: str, unit: str, signal: int = 9) -> None:
    rc, out = run(layout, host, ["systemctl", "kill", f"--signal={signal}", unit], timeout=30)
    if rc != 0:
        raise HostError(f"{host}: systemctl kill {unit}: {out.strip()}")


def pids(host: str) -> list[int]:
    return C.pids(host)


def alive(host: str) -> bool:
    return C.alive(host)


def kill(host: str, timeout: float = 10) -> list[int]:
    """Every process of the host dies at once (the instance crashed); its disk stays."""
    try:
        return C.kill(_handle(host), timeout)
    except HostError:
        return []


def stop(host: str, timeout: float = 90) -> bool:
    """The instance shuts down from inside (EC2's stop and terminate send the guest an
    ACPI shutdown), killed if it is not down after `timeout`; True when it was clean."""
    try:
        return C.stop(_handle(host), timeout)
    except HostError:
        return False


def freeze(host: str) -> None:
    C.freeze(_handle(host))


def thaw(host: str) -> None:
    C.thaw(_handle(host))


def rss_bytes(host: str) -> int:
    """Resident memory of the host's processes (proportional set size, so shared pages
    of the same binaries count once across hosts)."""
    return pss_bytes(pids(host))


def pss_bytes(pids: list[int]) -> int:
    """The proportional set size of these processes, from /proc/<pid>/smaps_rollup."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            pass
    return total


# ------------------------------------------------------------------ operations by name
# The drills speak to a host through `call(layout, host, {"op": ...})`; each operation is
# systemctl's or cloud-init's own.


def _units(layout: Layout, host: str) -> dict[str, dict[str, str]]:
    _rc, out = run(layout, host, ["systemctl", "list-units", "--all", "--plain", "--no-legend", "--no-pager"], timeout=30)
    units = {}
    for line in out.splitlines():
        parts = line.split(None, 4)
        if len(parts) >= 4:
            units[parts[0]] = {"load": parts[1], "state": parts[2], "sub": parts[3]}
    return units


def call(layout: Layout, host: str, req: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    op = req.get("op")
    if op == "status":
        _rc, state = run(layout, host, ["systemctl", "is-system-running"], timeout=20)
        return {"boot_done": state.strip() in ("running", "degraded"), "system": state.strip(),
                "units": _units(layout, host)}
    if op == "cloud-init":
        r = boot(layout, host, timeout=timeout)
        ok = r["cloud_init"] == "done" and r["systemd"] == "running"
        return {"rc": 0 if ok else 1, "boot": r,
                "error": None if ok else f"cloud-init {r['cloud_init']}, systemd {r['systemd']}, "
                                         f"failed units: {', '.join(r['failed_units']) or '-'}"}
    if op == "kill":
        if req.get("hold"):
            hold(layout, host, req["unit"], True)
        kill_unit(layout, host, req["unit"], int(req.get("signal", 9)))
        return {"rc": 0}
    if op == "hold":
        hold(layout, host, req["unit"], bool(req.get("hold")))
        return {"rc": 0}
    if op == "systemctl":
        rc, out = run(layout, host, ["systemctl", *req["argv"]], timeout=float(req.get("timeout", 120)))
        return {"rc": rc, "out": out}
    if op == "run":
        rc, out = run(layout, host, list(req["argv"]), timeout=float(req.get("timeout", 120)))
        return {"rc": rc, "out": out}
    raise HostError(f"{host}: unknown operation {op!r}")


def remove_cgroups(host: str, timeout: float = 10) -> bool:
    return not C.alive(host)


def running_in(prefix: str) -> list[str]:
    """Hosts running on this machine whose network namespace starts with `prefix` (a
    rehearsal's hosts, whoever started them)."""
    return [name for name, d in _records() if str(d.get("netns", "")).startswith(prefix) and C.alive(name)]


def _records() -> list[tuple[str, dict[str, Any]]]:
    """(host name, record) of every readable container record on this machine."""
    out = []
    for rec in sorted(C.STATE_DIR.glob("*.json")) if C.STATE_DIR.exists() else []:
        try:
            out.append((rec.stem, json.loads(rec.read_text())))
        except (OSError, ValueError):
            continue
    return out


def reclaim_dead(prefix: str) -> list[str]:
    """Records (and cgroups, overlay roots) of hosts in a namespace starting with `prefix`
    that are not alive: what a rehearsal killed mid-run leaves. Returns their names."""
    out = []
    workdirs: set[Path] = set()
    for name, d in _records():
        if not str(d.get("netns", "")).startswith(prefix) or C.alive(name):
            continue
        C.cleanup_host(name)
        out.append(name)
        hostdir = Path(str(d.get("hostdir", "")))
        if hostdir.name == name and hostdir.parent.name == "hosts":
            if (hostdir / LAZY_DIR).is_dir() and _lazy_mounted(hostdir):
                volume_stop(hostdir)
            workdirs.add(hostdir.parent.parent)
    for workdir in workdirs:
        for name in STALLABLE_SHARES:
            efs_stop(workdir, name)
    return out


def leftovers(workdir: Path) -> list[str]:
    """Hosts of a rehearsal in `workdir` that a crashed run left running or mounted."""
    return [name for name, d in _records() if str(d.get("hostdir", "")).startswith(str(workdir) + "/")]


def cleanup(workdir: Path) -> list[str]:
    done = []
    for name in leftovers(workdir):
        victims = kill(name)
        done.append(f"host {name}: killed {len(victims)} processes")
    hosts_dir = workdir / "hosts"
    for d in sorted(hosts_dir.iterdir()) if hosts_dir.is_dir() else []:
        if (d / LAZY_PID).exists() or (d / LAZY_DIR).is_dir() and _lazy_mounted(d):
            volume_stop(d)
            done.append(f"host {d.name}: data volume layer unmounted")
    for name in STALLABLE_SHARES:
        if efs_stop(workdir, name):
            done.append(f"EFS share {name}: stall layer unmounted")
    return done


def _lazy_mounted(d: Path) -> bool:
    from . import lazyfs

    return lazyfs.mounted(d / LAZY_DIR)
