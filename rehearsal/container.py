"""One rehearsal host as a container: systemd-nspawn boots systemd as PID 1 over a private
overlay of a host image (rehearsal.image), inside a network namespace made by the caller.

    h = start(name, image, hostdir, netns, binds=..., files=...)   boot; returns a Handle
    wait_running(h)              `systemctl is-system-running --wait` inside ("running")
    exec(h, argv, timeout)       (rc, output) of a command run inside (nsenter, no machined)
    exit_code(h)                 None while it runs; 0 after poweroff, 133 after a reboot inside
    freeze(h) / thaw(h)          pause every process of the host (v1 freezer)
    kill(h)                      SIGKILL everything at once, as a hard instance crash
    stop(h)                      poweroff inside, kill after a timeout
    reboot(h) -> Handle          stop + start on the same disk (upper layer)
    handle(name) -> Handle       a running host's handle, from its record (another process)
    pids(h), leftovers(prefix), cleanup_leftovers(prefix)

The host's disk is `hostdir`: upper/ and work/ of its overlay (kept across stop, kill and
reboot, like an instance's root volume) and root/, where the overlay is mounted. Files
for the host (its /etc/hosts, a fresh /etc/machine-id) are written into upper/ before the
overlay is mounted: writing into a mounted overlay's upper layer is undefined.

Cgroups: systemd-nspawn --keep-unit puts the container under its own cgroup
(<cgroup>/payload and <cgroup>/supervisor). Started from the root cgroup, two containers
would share /payload, so each nspawn is first moved into CGROUP_PARENT/<name> of every
hierarchy (name=systemd, unified (cgroup2) and each v1 controller); every process of the
host lives below those directories: cgroup.kill of the unified one kills them all at
once, the freezer one pauses them, and inside the container's cgroup namespace each v1
controller's root is the host's own cgroup (what Slurm's cgroup plugins on an on-prem
node create stays under that node). A record of each running host (its mount, cgroups and pids) is
kept in STATE_DIR/<name>.json so that leftovers() finds what a crashed caller left.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_PARENT = "hpc-containers"
# name=systemd: nspawn --keep-unit derives the container's cgroup from it (hybrid layout);
# unified: where cgroup.kill is; freezer: the v1 freezer pauses the whole host; the other
# v1 controllers: the host's own root there (cgroup namespace).
HIERARCHIES = ("systemd", "unified", "freezer", "memory", "cpuacct", "cpu", "cpuset", "devices", "pids", "blkio")
STATE_DIR = Path("/run/hpc-containers")
NSPAWN = "/usr/bin/systemd-nspawn"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ContainerError(RuntimeError):
    pass


@dataclass
class Handle:
    """A running host. `leader` is the container's PID 1 (systemd) as the machine sees it."""
    name: str
    image: str
    hostdir: str
    netns: str
    nspawn_pid: int
    leader: int
    argv: list[str]
    spec: dict[str, Any] = field(default_factory=dict)  # start()'s arguments, for reboot()

    @property
    def root(self) -> Path:
        return Path(self.hostdir) / "root"


def cgroup_dirs(name: str) -> dict[str, Path]:
    """The host's cgroup in each hierarchy this machine mounts (of HIERARCHIES)."""
    return {h: CGROUP_ROOT / h / CGROUP_PARENT / name for h in HIERARCHIES if (CGROUP_ROOT / h).is_dir()}


def _make_cgroup(path: Path) -> None:
    """mkdir -p; a new v1 cpuset starts with no CPUs and no memory nodes (no process
    could join it): it gets its parent's."""
    for d in reversed([path, *path.parents]):
        if d.exists() or not d.parent.exists():
            continue
        d.mkdir()
        if (d / "cpuset.cpus").exists():
            for f in ("cpuset.cpus", "cpuset.mems"):
                (d / f).write_text((d.parent / f).read_text())


def nspawn_argv(name: str, root: Path, netns: str, binds: Sequence[tuple[str, str]] = (),
                ro_binds: Sequence[tuple[str, str]] = (), env: Mapping[str, str] | None = None,
                init_args: Sequence[str] = ()) -> list[str]:
    """The systemd-nspawn command line for a host (no machined here: --register=no;
    --keep-unit: stay in the cgroup the caller gave; the network namespace is the caller's)."""
    argv = [NSPAWN, "--quiet", f"--directory={root}", "--boot", "--register=no", "--keep-unit",
            "--link-journal=no", f"--network-namespace-path=/run/netns/{netns}", f"--hostname={name}",
            f"--machine={name}", "--console=read-only", "--resolv-conf=off", "--timezone=off",
            # nspawn grants CAP_NET_ADMIN with --private-network only; the namespace is the
            # host's own (nftables, keepalived's addresses need it, as on an instance)
            "--capability=CAP_NET_ADMIN"]
    for src, dest in binds:
        argv.append(f"--bind={src}:{dest}")
    for src, dest in ro_binds:
        argv.append(f"--bind-ro={src}:{dest}")
    for k, v in (env or {}).items():
        argv.append(f"--setenv={k}={v}")
    if init_args:
        argv += ["--", *init_args]
    return argv


def _write_files(upper: Path, files: Mapping[str, str | bytes]) -> None:
    for dest, content in files.items():
        if not dest.startswith("/"):
            raise ContainerError(f"file {dest!r}: the path inside the host must be absolute")
        p = upper / dest.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.is_symlink() or p.exists():
            p.unlink()
        p.write_bytes(content.encode() if isinstance(content, str) else content)


def _mounted(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def _unmount(path: Path) -> None:
    for _ in range(50):
        if not _mounted(path):
            return
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            time.sleep(0.1)
    if _mounted(path):
        subprocess.run(["umount", "--lazy", str(path)], capture_output=True)


def _record(h: Handle) -> None:
    """STATE_DIR/<name>.json: everything handle(name) needs, readable by root only (the
    spec holds the files given to start)."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    rec = asdict(h)
    files = rec["spec"].get("files") or {}
    rec["spec"]["files"] = {k: v if isinstance(v, str) else {"base64": base64.b64encode(v).decode()}
                            for k, v in files.items()}
    rec.update(mount=str(h.root), cgroups=[str(p) for p in cgroup_dirs(h.name).values()])
    tmp = STATE_DIR / f".{h.name}.json"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(rec, indent=2) + "\n")
    os.replace(tmp, STATE_DIR / f"{h.name}.json")


def handle(name: str) -> Handle:
    """The handle of a running host from its record (for a process other than the one
    that started it: exec, freeze, kill, stop and reboot work with it)."""
    rec_file = STATE_DIR / f"{name}.json"
    try:
        rec = json.loads(rec_file.read_text())
    except (OSError, ValueError) as e:
        raise ContainerError(f"{name} is not running (no readable {rec_file})") from e
    spec = rec.get("spec") or {}
    spec["files"] = {k: v if isinstance(v, str) else base64.b64decode(v["base64"])
                     for k, v in (spec.get("files") or {}).items()}
    return Handle(rec["name"], rec["image"], rec["hostdir"], rec["netns"], rec["nspawn_pid"], rec["leader"],
                  rec["argv"], spec)


def _leader(nspawn_pid: int) -> int | None:
    """The container's PID 1: a descendant of nspawn whose pid is 1 in its own namespace."""
    todo = [nspawn_pid]
    while todo:
        pid = todo.pop()
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        for c in map(int, children):
            try:
                status = Path(f"/proc/{c}/status").read_text()
            except OSError:
                continue
            nspid = next((line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")), [])
            if len(nspid) > 1 and nspid[-1] == "1":
                return c
            todo.append(c)
    return None


NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


def _in_cgroups(name: str, argv: Sequence[str]) -> list[str]:
    """argv run after its process joined the host's cgroups (a shell that moves itself,
    then execs: no preexec_fn, which is unsafe in a threaded caller)."""
    files = " ".join(str(p / "cgroup.procs") for p in cgroup_dirs(name).values())
    return ["/bin/sh", "-c", f'for f in {files}; do echo $$ > "$f" || exit 125; done; exec "$@"', "sh", *argv]


def start(name: str, image: Path, hostdir: Path, netns: str, *, binds: Sequence[tuple[str, str]] = (),
          ro_binds: Sequence[tuple[str, str]] = (), files: Mapping[str, str | bytes] | None = None,
          env: Mapping[str, str] | None = None, init_args: Sequence[str] = (), timeout: float = 30) -> Handle:
    """Boot `name` from `image` with its disk in `hostdir` (created if new) inside the
    network namespace /run/netns/<netns>. `binds`/`ro_binds` are (machine path, host
    path) pairs; `files` {absolute path in the host: content} are written into the disk
    before it is mounted (again at each start); `env` is PID 1's environment; `init_args`
    go to systemd's command line. A new disk gets a fresh /etc/machine-id. Returns once
    systemd runs as the container's PID 1 (see wait_running for the boot itself)."""
    image, hostdir = Path(image), Path(hostdir)
    if not NAME_RE.fullmatch(name):
        raise ContainerError(f"host name {name!r}: lowercase letters, digits and '-', at most 63, "
                             "not starting with '-' (it is the hostname and a cgroup name)")
    if not (image / "usr/lib/systemd/systemd").exists():
        raise ContainerError(f"{image} is not a host image root (no usr/lib/systemd/systemd)")
    if not Path(f"/run/netns/{netns}").exists():
        raise ContainerError(f"network namespace {netns!r} does not exist (/run/netns/{netns})")
    if (STATE_DIR / f"{name}.json").exists() and alive(name):
        raise ContainerError(f"{name} is already running (see {STATE_DIR / (name + '.json')})")
    upper, work, root = hostdir / "upper", hostdir / "work", hostdir / "root"
    for d in (upper, work, root):
        d.mkdir(parents=True, exist_ok=True)
    if _mounted(root):
        raise ContainerError(f"{root} is still mounted: stop or clean up the previous boot first")
    mid = upper / "etc/machine-id"
    all_files: dict[str, str | bytes] = {}
    if not mid.exists() or not mid.read_text().strip():
        all_files["/etc/machine-id"] = uuid.uuid4().hex + "\n"
    all_files.update(files or {})
    _write_files(upper, all_files)
    cp = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                         f"lowerdir={image},upperdir={upper},workdir={work}", str(root)],
                        capture_output=True, text=True)
    if cp.returncode != 0:
        raise ContainerError(f"{name}: mounting its overlay on {root} failed: {cp.stderr.strip()}")
    cgs = cgroup_dirs(name)
    for p in cgs.values():
        _make_cgroup(p)
    (cgs["freezer"] / "freezer.state").write_text("THAWED")
    argv = nspawn_argv(name, root, netns, binds, ro_binds, env, init_args)
    console = open(hostdir / "console.log", "ab")
    try:
        proc = subprocess.Popen(_in_cgroups(name, argv), stdin=subprocess.DEVNULL, stdout=console,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={"PATH": PATH, "LANG": "C.UTF-8", "SYSTEMD_LOG_LEVEL": "warning"})
    except BaseException:
        console.close()
        _unmount(root)
        raise
    console.close()
    spec = {"binds": [list(b) for b in binds], "ro_binds": [list(b) for b in ro_binds], "files": dict(files or {}),
            "env": dict(env or {}), "init_args": list(init_args)}
    h = Handle(name, str(image), str(hostdir), netns, proc.pid, 0, argv, spec)
    _PROCS[name] = proc
    _record(h)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        leader = _leader(proc.pid)
        if leader:
            h.leader = leader
            _record(h)
            return h
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    tail = (hostdir / "console.log").read_text(errors="replace")[-2000:]
    kill(h)
    raise ContainerError(f"{name}: systemd-nspawn did not start systemd (exit {proc.poll()}):\n{tail}")


_PROCS: dict[str, subprocess.Popen[bytes]] = {}  # our nspawn children, reaped by kill/stop

# What systemd-nspawn --boot exits with when the host rebooted itself (`systemctl reboot`
# inside): the container is gone and its caller boots it again (reboot() or start()).
REBOOT_EXIT_CODE = 133


def exit_code(h: Handle) -> int | None:
    """systemd-nspawn's exit status once the host is down (0 after a poweroff,
    REBOOT_EXIT_CODE after a reboot from inside), None while it runs. Only for hosts
    started by this process."""
    proc = _PROCS.get(h.name)
    if proc is None:
        raise ContainerError(f"{h.name} was not started by this process")
    return proc.poll()


def exec(h: Handle, argv: Sequence[str], timeout: float = 120, input: bytes | None = None) -> tuple[int, str]:
    """Run `argv` as root inside the host (all its namespaces, its root) and return
    (exit status, stdout+stderr). The command joins the host's cgroups, so freeze and
    kill reach it too. A command that outlives `timeout` is killed: rc 124."""
    cgdirs = cgroup_dirs(h.name)
    state = (cgdirs["freezer"] / "freezer.state").read_text().strip()
    if state != "THAWED":  # the command would freeze with it, and so would its caller's wait
        raise ContainerError(f"{h.name} is {state.lower()}: thaw it before running {argv[0]!r} inside")
    cmd = ["nsenter", "-t", str(h.leader), "-a", "--", *argv]
    p = subprocess.Popen(_in_cgroups(h.name, cmd), stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         start_new_session=True, env={"PATH": PATH, "LANG": "C.UTF-8", "TERM": "dumb"})
    try:
        out, _ = p.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        return 124, out.decode(errors="replace")
    return p.returncode, out.decode(errors="replace")


def wait_running(h: Handle, timeout: float = 120) -> str:
    """What `systemctl is-system-running --wait` says once the boot is over: "running",
    "degraded" (a unit failed), ... Retries while systemd does not answer yet."""
    deadline = time.monotonic() + timeout
    out = ""
    while time.monotonic() < deadline:
        rc, out = exec(h, ["systemctl", "is-system-running", "--wait"], timeout=max(1.0, deadline - time.monotonic()))
        state = out.strip().splitlines()[-1] if out.strip() else ""
        if state in ("running", "degraded", "maintenance", "stopping"):  # "offline": no answer yet
            return state
        time.sleep(0.2)
    raise ContainerError(f"{h.name}: not booted after {timeout} s (systemctl is-system-running: {out.strip()!r})")


def pids(h: Handle | str) -> list[int]:
    """Every process of the host (nspawn, systemd and all below), from its unified cgroup."""
    name = h if isinstance(h, str) else h.name
    base = cgroup_dirs(name)["unified"]
    out: list[int] = []
    for d, _dirs, files in os.walk(base):
        if "cgroup.procs" in files:
            try:
                out += [int(x) for x in Path(d, "cgroup.procs").read_text().split()]
            except OSError:
                pass
    return out


def alive(name: str) -> bool:
    return bool(pids(name))


def _set_freezer(name: str, state: str, timeout: float) -> None:
    f = cgroup_dirs(name)["freezer"] / "freezer.state"
    f.write_text(state)
    deadline = time.monotonic() + timeout
    while f.read_text().strip() != state:
        if time.monotonic() > deadline:
            raise ContainerError(f"{name}: freezer.state is {f.read_text().strip()}, not {state}, "
                                 f"after {timeout} s")
        time.sleep(0.02)


def freeze(h: Handle, timeout: float = 10) -> None:
    """Pause every process of the host (the kernel keeps its sockets; peers see silence)."""
    _set_freezer(h.name, "FROZEN", timeout)


def thaw(h: Handle, timeout: float = 10) -> None:
    _set_freezer(h.name, "THAWED", timeout)


def _kill_cgroup(name: str, timeout: float) -> list[int]:
    victims = pids(name)
    cgs = cgroup_dirs(name)
    if not cgs["unified"].exists():
        return victims
    frz = cgs["freezer"] / "freezer.state"
    try:  # stop everything first so nothing reacts to its neighbours dying
        frz.write_text("FROZEN")
    except OSError:
        pass
    (cgs["unified"] / "cgroup.kill").write_text("1")
    try:  # a v1-frozen task dies only once thawed
        frz.write_text("THAWED")
    except OSError:
        pass
    deadline = time.monotonic() + timeout
    while pids(name):
        if time.monotonic() > deadline:
            raise ContainerError(f"{name}: processes {pids(name)} survived cgroup.kill for {timeout} s")
        time.sleep(0.05)
    return victims


def _remove_cgroups(name: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    for base in cgroup_dirs(name).values():
        while base.exists():
            for d, _dirs, _f in sorted(os.walk(base, topdown=False), key=lambda x: -len(x[0])):
                try:
                    os.rmdir(d)
                except OSError:
                    pass
            if not base.exists() or time.monotonic() > deadline:
                break
            time.sleep(0.1)


def _release(name: str, hostdir: Path) -> None:
    """Unmount the host's root, remove its cgroups and record (its disk stays)."""
    proc = _PROCS.pop(name, None)
    if proc is not None:
        proc.wait(timeout=10)
    _unmount(hostdir / "root")
    _remove_cgroups(name)
    (STATE_DIR / f"{name}.json").unlink(missing_ok=True)
    shutil.rmtree(Path("/run/systemd/nspawn/propagate") / name, ignore_errors=True)


def kill(h: Handle, timeout: float = 10) -> list[int]:
    """SIGKILL every process of the host at once (nspawn included), as when an instance
    dies; then unmount its root. Its disk (upper layer) stays as the crash left it.
    Returns the pids that were killed."""
    victims = _kill_cgroup(h.name, timeout)
    _release(h.name, Path(h.hostdir))
    return victims


def stop(h: Handle, timeout: float = 60) -> bool:
    """Power the host off from inside; kill it if it is not down after `timeout`.
    True when it shut down cleanly."""
    clean = False
    if alive(h.name):
        exec(h, ["systemctl", "poweroff", "--no-block"], timeout=15)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = _PROCS.get(h.name)
            done = proc.poll() is not None if proc is not None else not _pid_alive(h.nspawn_pid)
            if done:
                clean = True
                break
            time.sleep(0.1)
    kill(h)
    return clean


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def reboot(h: Handle, timeout: float = 60) -> Handle:
    """Reboot = clean shutdown, then boot again on the same disk. (With --boot a reboot
    inside makes nspawn exit; the caller starts it again: this is that caller.)"""
    stop(h, timeout)
    spec = h.spec
    return start(h.name, Path(h.image), Path(h.hostdir), h.netns,
                 binds=[tuple(b) for b in spec.get("binds", [])],  # type: ignore[misc]
                 ro_binds=[tuple(b) for b in spec.get("ro_binds", [])],  # type: ignore[misc]
                 files=spec.get("files") or {}, env=spec.get("env") or {}, init_args=spec.get("init_args") or [])


def leftovers(prefix: str) -> dict[str, list[str]]:
    """What exists on the machine for hosts whose name starts with `prefix`: records,
    cgroups, processes, mounts (overlay roots recorded or still mounted)."""
    records = sorted(STATE_DIR.glob(f"{prefix}*.json")) if STATE_DIR.exists() else []
    mounts: set[str] = set()
    for r in records:
        try:
            mounts.add(json.loads(r.read_text())["mount"])
        except (OSError, ValueError, KeyError):
            pass
    cgroups = []
    for h in HIERARCHIES:
        base = CGROUP_ROOT / h / CGROUP_PARENT
        if base.exists():
            cgroups += [str(p) for p in sorted(base.glob(f"{prefix}*")) if p.is_dir()]
    names = {Path(c).name for c in cgroups} | {r.stem for r in records}
    procs = [str(p) for n in sorted(names) for p in pids(n)]
    with open("/proc/self/mountinfo") as f:
        mounted = {line.split()[4] for line in f}
    return {"records": [str(r) for r in records], "cgroups": cgroups, "processes": procs,
            "mounts": sorted(m for m in mounts if m in mounted)}


def cleanup_leftovers(prefix: str, timeout: float = 10) -> dict[str, list[str]]:
    """Kill, unmount and remove whatever leftovers(prefix) finds; returns what it found.
    The hosts' disks (upper layers) are the caller's to remove."""
    found = leftovers(prefix)
    names = {Path(c).name for c in found["cgroups"]} | {Path(r).stem for r in found["records"]}
    for name in sorted(names):
        cleanup_host(name, timeout)
    return found


def cleanup_host(name: str, timeout: float = 10) -> None:
    """Kill, unmount and remove the one host `name`: its cgroups, overlay root, record."""
    rec_file = STATE_DIR / f"{name}.json"
    hostdir = None
    if rec_file.exists():
        try:
            hostdir = Path(json.loads(rec_file.read_text())["hostdir"])
        except (OSError, ValueError, KeyError):
            pass
    if cgroup_dirs(name)["unified"].exists():
        _kill_cgroup(name, timeout)
    if hostdir is not None:
        _release(name, hostdir)
    else:
        _remove_cgroups(name)
        rec_file.unlink(missing_ok=True)
