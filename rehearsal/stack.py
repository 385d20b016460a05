"""Bring a rehearsal up and down: namespaces, AWS stand-ins, hosts, their first boot.

Everything started is recorded in WORKDIR/state.json (pids, namespaces), so `down`
removes it by pid and by name even after a crash; a lock file keeps two rehearsals
from running at once.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from . import hosts as H
from . import image, netns
from .layout import DEFAULT_WORKDIR, LOCK_FILE, NS_AWS, Layout, build_layout, read_state, state_path

HERE = Path(__file__).resolve().parent
TOOLS = ["ip", "nft", "conntrack", "nsenter", "systemd-nspawn", "curl", "openssl", "haproxy", "keepalived", "mariadbd",
         "redis-server", "redis-sentinel", "nginx", "rsyslogd", "prometheus", "prometheus-alertmanager"]
STANDIN_DEST = "usr/local/lib/hpc/portal_standin.py"


class RehearsalError(RuntimeError):
    pass


def say(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} rehearsal: {msg}", flush=True)


# ------------------------------------------------------------------ state and locking


def write_state(workdir: Path, state: dict[str, Any]) -> None:
    tmp = state_path(workdir).with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
    tmp.replace(state_path(workdir))


class Lock:
    """An exclusive lock for the whole machine: one rehearsal at a time."""

    def __init__(self, path: Path = LOCK_FILE):
        self.path = path
        self.fd: int | None = None

    def acquire(self, wait: float = 0.0, machine_free: bool = True, stale_after: float = 300.0) -> None:
        """Take the lock; with `wait`, wait up to that many seconds for another rehearsal
        to finish. With `machine_free` (starting a rehearsal, not drilling one that is up),
        also for the namespaces and cgroups of a rehearsal started where this lock file is
        not visible (another container on this kernel): they would collide. Such a
        rehearsal's processes may be invisible from here (another PID namespace), so it is
        judged by what the kernel shows everyone: its namespaces and their packet counters
        (machine_activity). Namespaces where nothing changes for `stale_after` seconds are
        leftovers, not a rehearsal: no use waiting for them."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait
        said = 0.0
        seen: tuple[Any, ...] | None = None
        idle_since = time.monotonic()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                in_use = machine_in_use() if machine_free else []
                if not in_use:
                    break
                fcntl.flock(fd, fcntl.LOCK_UN)
                why = f"namespaces or cgroups of another rehearsal exist: {', '.join(in_use[:6])}"
                now = machine_activity()
                if now != seen:
                    seen, idle_since = now, time.monotonic()
                elif time.monotonic() - idle_since >= stale_after:
                    # A rehearsal whose runner was killed (a CI job cancelled, a session
                    # ended) leaves namespaces that nobody uses: remove them, as
                    # `make rehearse-down` would, rather than fail every later run.
                    gone = reclaim_leftovers()
                    if not gone or machine_in_use() == in_use:
                        os.close(fd)
                        raise RehearsalError(f"leftovers of a rehearsal that no longer runs (no process, no packet in "
                                             f"{stale_after:.0f}s): {', '.join(in_use[:6])}; could not remove them; "
                                             "`make rehearse-down` removes them")
                    say(f"removed the leftovers of a rehearsal that no longer runs (no process, no packet in "
                        f"{stale_after:.0f}s): {', '.join(gone)}")
                    seen, idle_since = None, time.monotonic()
                    continue
            except BlockingIOError:
                holder = self.path.read_text().strip() if self.path.exists() else "?"
                why = f"another rehearsal is running ({holder})"
            if time.monotonic() >= deadline:
                os.close(fd)
                hint = f" after waiting {wait:.0f}s" if wait else ""
                raise RehearsalError(f"{why}{hint}; wait for it, or if none runs, `make rehearse-down`") from None
            if time.monotonic() - said >= 60:
                say(f"waiting: {why}")
                said = time.monotonic()
            time.sleep(5)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} since {time.strftime('%H:%M:%S')}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def machine_in_use() -> list[str]:
    """What of a rehearsal exists on this kernel: its namespaces and its cgroups. They
    are shared by everything on the machine even where /run/lock is not."""
    found = [n for n in netns.existing_namespaces() if n.startswith("rh-")]
    # A container of a rehearsal (in an rh- namespace) whose record is here.
    found += [f"host {name}" for name in H.running_in("rh-")]
    return found


def reclaim_leftovers() -> list[str]:
    """Remove what machine_in_use() reports for a rehearsal that no longer runs: its
    namespaces that hold no process, and the records and cgroups of its hosts that are
    not alive. Called only once nothing has moved in them for the stale time-out."""
    gone = [f"host {n}" for n in H.reclaim_dead("rh-")]
    idle = [n for n in netns.existing_namespaces()
            if n.startswith("rh-") and not netns.sh(["ip", "netns", "pids", n], check=False).stdout.split()]
    return gone + netns.destroy(idle)


def machine_activity() -> tuple[Any, ...]:
    """What changes while a rehearsal lives, as seen from anywhere on this kernel: the set
    of its namespaces, the packets their links have carried (VRRP alone sends one a
    second) and the processes in them that this PID namespace can see. Leftover
    namespaces with no process in them carry no packets."""
    names = sorted(n for n in netns.existing_namespaces() if n.startswith("rh-"))
    packets = pids = 0
    for ns in names:
        cp = netns.sh(["ip", "-n", ns, "-s", "-j", "link", "show"], check=False)
        try:
            for link in json.loads(cp.stdout or "[]"):
                st = link.get("stats64") or link.get("stats") or {}
                packets += int(st.get("rx", {}).get("packets", 0)) + int(st.get("tx", {}).get("packets", 0))
        except (ValueError, AttributeError):
            pass
        pids += len(netns.sh(["ip", "netns", "pids", ns], check=False).stdout.split())
    return tuple(names), packets, pids


def preflight() -> None:
    if os.geteuid() != 0:
        raise RehearsalError("the rehearsal needs root (namespaces, nftables, mounts): run it as root, e.g. sudo make rehearse")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise RehearsalError(f"missing tools: {', '.join(missing)} (make rehearse installs them: tools/install-debian-deps.sh)")
    if not Path("/sys/fs/cgroup/unified/cgroup.procs").exists():
        raise RehearsalError("no cgroup v2 hierarchy at /sys/fs/cgroup/unified (the hosts' cgroup.kill is there)")


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def running(workdir: Path) -> bool:
    st = read_state(workdir)
    return bool(st) and (_alive(st.get("awsd_pid")) or any(H.alive(h) for h in st.get("hosts", {})))


# ---------------------------------------------------------------------------- up/down


def _python() -> str:
    venv = HERE.parent / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def start_awsd(layout: Layout, state: dict[str, Any]) -> dict[str, Any]:
    wd = layout.workdir
    for f in ("deploy.json", "deploy.failed", "eip-moves.log", "awsd.sock"):
        (wd / f).unlink(missing_ok=True)
    log = open(wd / "awsd.log", "ab")
    env = dict(os.environ, HPC_REHEARSAL_MIRROR=state.get("mirror", ""))
    p = subprocess.Popen(["nsenter", f"--net=/run/netns/{NS_AWS}", "--", _python(), "-m", "rehearsal.awsd", str(wd),
                          layout.stack], cwd=str(HERE.parent), stdin=subprocess.DEVNULL, stdout=log, env=env,
                         stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    state["awsd_pid"] = p.pid
    write_state(wd, state)
    deadline = time.monotonic() + 600  # the program's run against the stand-ins: ~1 min here
    while time.monotonic() < deadline:
        if (wd / "deploy.json").exists():
            return json.loads((wd / "deploy.json").read_text())
        if (wd / "deploy.failed").exists() or p.poll() is not None:
            raise RehearsalError(f"the AWS stand-ins failed: see {wd / 'awsd.log'}")
        time.sleep(0.2)
    raise RehearsalError(f"the AWS stand-ins did not come up in time: see {wd / 'awsd.log'}")


def boot_host(layout: Layout, name: str, results: dict[str, Any]) -> None:
    t0 = time.time()
    try:
        resp = H.call(layout, name, {"op": "cloud-init"}, timeout=1800)
    except Exception as e:  # noqa: BLE001
        resp = {"rc": 1, "error": f"{type(e).__name__}: {e}"}
    resp["seconds"] = round(time.time() - t0, 1)
    results[name] = resp


def boot_phases(layout: Layout) -> list[list[str]]:
    phases: dict[int, list[str]] = {}
    for h in layout.topo.hosts:
        phases.setdefault(h.phase, []).append(h.name)
    return [phases[k] for k in sorted(phases)]


def install_standin(layout: Layout, name: str) -> bool:
    """The stand-in portal, until the app tier ships it as a host file."""
    upper = layout.hostdir(name) / "upper" / STANDIN_DEST
    upper.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(HERE.parent / "cloud_init" / "scripts" / "portal_standin.py", upper)
    os.chmod(upper, 0o755)
    return True


def os_choice(os_name: str) -> image.OsSpec:
    """The hosts' OS, or an error that names the allowed ones (--os, or OS= for make)."""
    try:
        return image.os_spec(os_name)
    except image.ImageError:
        raise RehearsalError(f"unknown OS {os_name!r} (--os, or OS= for make rehearse): allowed "
                             f"{', '.join(sorted(image.OSES))}") from None


def up(stack: str, workdir: Path = DEFAULT_WORKDIR, only: list[str] | None = None, onprem: str = "auto",
       portal: str = "reference", os_name: str = image.DEFAULT_OS) -> Layout:
    spec = os_choice(os_name)  # before anything exists
    preflight()
    if running(workdir):
        raise RehearsalError(f"a rehearsal is already up in {workdir} (`python -m rehearsal down` first)")
    layout = build_layout(stack, workdir, onprem=onprem, os_name=os_name)
    workdir.mkdir(parents=True, exist_ok=True)
    for sub in ("hosts", "efs"):
        if (workdir / sub).exists():
            shutil.rmtree(workdir / sub)
    (workdir / "efs").mkdir()
    for n in ("slurm", "data", "dist"):
        (workdir / "efs" / n).mkdir()
    # A built frontend release on the EFS stand-in, the way a deploy leaves it.
    rel = workdir / "efs" / "dist" / "releases" / "rehearsal"
    (rel / "assets").mkdir(parents=True)
    (rel / "index.html").write_text("<!doctype html><title>HPC portal (rehearsal)</title><script src=/assets/app.js></script>\n")
    (rel / "assets" / "app.js").write_text("console.log('rehearsal');\n")
    (workdir / "efs" / "dist" / "current").symlink_to("releases/rehearsal")
    state: dict[str, Any] = {"stack": stack, "started": time.time(), "namespaces": layout.namespaces, "hosts": {},
                             "pid": os.getpid(), "onprem_mode": onprem, "os": os_name, "suite": spec.suite}
    from . import mirror

    say(f"host image: {os_name} ({spec.suite}) with systemd and cloud-init (rehearsal/image.py; built once, "
        "then cached)")
    root = image.ensure(os_name, tiers=True, progress=say)
    state["mirror"] = str(mirror.ensure(image.CACHE_DIR.parent / "debs" / spec.suite))
    state["image"] = str(root)
    write_state(workdir, state)
    say(f"stack {stack}: {len(layout.hosts)} hosts in {len(layout.subnets)} subnets; namespaces")
    if layout.onprem:
        o = layout.onprem
        how = "the stack's own" if o.source == "stack" else \
            f"the stack has none: the example site {o.source} is laid over it; --onprem none for the stack as committed"
        say(f"on-prem site behind a VPN ({how}): {', '.join(o.cidrs)}, "
            f"compute nodes {', '.join(n for n, _a in o.nodes) or '-'}")
    if portal == "reference":  # the reference portal through the git artifact kind (rehearsal/portal_artifact.py)
        from . import portal_artifact

        state["portal_overlay"] = portal_artifact.publish(layout.shared, portal_artifact.ensure_built(say))
        say(f"reference portal: {state['portal_overlay']['app']['artifact']} on the EFS stand-in")
        write_state(workdir, state)
    netns.create(layout)
    say("AWS stand-ins: moto (EC2, EFS, SSM, S3, IAM) + instance metadata; `pulumi up` of the program against them")
    deploy = start_awsd(layout, state)
    state["deploy"] = {"eip": deploy["eip"], "buckets": deploy["buckets"]}
    write_state(workdir, state)
    say(f"deployed {deploy['resources']} resources; user-data of every instance is the program's, byte for byte; "
        "security groups from the rules the program registered")
    netns.apply_security_groups(layout, deploy["security"])
    names = [h.name for h in layout.hosts if not only or h.name in only]
    for name in names:
        h = layout.host(name)
        H.prepare(layout, h, deploy)
        if "app" in h.roles and not layout.cfg.app_artifact and \
                "/" + STANDIN_DEST not in deploy["hosts"][name].get("files", []):
            install_standin(layout, name)
            say(f"  {name}: stand-in portal copied to /{STANDIN_DEST} (not among the rendered files yet)")
    results: dict[str, Any] = {}
    for phase in boot_phases(layout):
        group = [n for n in phase if n in names]
        if not group:
            continue
        for name in group:
            state["hosts"][name] = {"unshare_pid": H.start(layout, layout.host(name))}
            write_state(workdir, state)
        say(f"booting {', '.join(group)} (cloud-init from the user-data in IMDS)")
        threads = [threading.Thread(target=boot_host, args=(layout, n, results), daemon=True) for n in group]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for n in group:
            r = results[n]
            if "boot" not in r:
                say(f"  {n}: boot FAILED: {r.get('error')}")
                continue
            b = r["boot"]  # cloud-init's and systemd's own word
            say(f"  {n}: cloud-init {b['cloud_init']}, systemd {b['systemd']}, {b['seconds']}s"
                + (f", failed units: {', '.join(b['failed_units'])}" if b["failed_units"] else ""))
            if b["cloud_init"] != "done":
                for line in b["cloud_init_detail"].splitlines()[-12:]:
                    say(f"     {line}")
    (workdir / "boot-report.json").write_text(json.dumps(results, indent=2, default=str))
    state["boot"] = {n: {"seconds": r.get("seconds"), **({k: r["boot"][k] for k in ("cloud_init", "systemd")}
                                                         if "boot" in r else {})} for n, r in results.items()}
    if not only:
        wait_ready(layout)
        state["http_hygiene"] = check_http_hygiene()
        if portal == "reference":  # the browser's login and trust (rehearsal/browser.py)
            from . import portal_artifact

            app_host = next(h.name for h in layout.hosts if "app" in h.roles)
            lb_host = next(h.name for h in layout.hosts if "lb" in h.roles)
            state["portal"] = portal_artifact.after_boot(workdir, lambda h, a, t: H.run(layout, h, a, timeout=t),
                                                         app_host, lb_host)
        if layout.onprem:
            if layout.onprem.nodes:
                from . import onprem as site

                say("on-prem compute nodes: systemd containers with munged and slurmd, the program's "
                    "slurm.conf and munge key (rehearsal/onprem.py)")
                state["onprem_nodes"] = site.start_nodes(layout, root, say)
                write_state(workdir, state)
            state["onprem"] = check_onprem(layout)
    state["booted"] = time.time()
    write_state(workdir, state)
    return layout


def check_onprem(layout: Layout, timeout: float = 150) -> dict[str, Any]:
    """The compute path through the VPN (rehearsal/onprem.py), retried while the
    controllers come up; every check is printed."""
    from . import onprem

    assert layout.onprem is not None
    deadline = time.monotonic() + timeout
    while True:
        checks = onprem.check(layout)
        if all(c.ok for c in checks) or time.monotonic() > deadline:
            break
        time.sleep(5)
    say(f"on-prem compute path: {sum(c.ok for c in checks)}/{len(checks)} checks as expected")
    for c in checks:
        say(f"  {'ok  ' if c.ok else 'FAIL'} {c.name}: {c.got}" + ("" if c.ok else f" (expected {c.expect})"))
    return {"source": layout.onprem.source, "passed": all(c.ok for c in checks), "checks": onprem.as_json(checks)}


def check_http_hygiene() -> dict[str, Any]:
    """HSTS, no Server header, TLS 1.0/1.1 refused: asked of the Elastic IP from the
    internet side with curl and openssl (browsers ignore HSTS on an IP address)."""
    from . import http_hygiene
    from .layout import EIP_PUBLIC_IP, NS_CLIENT

    checks = http_hygiene.check(["nsenter", f"--net=/run/netns/{NS_CLIENT}", "--"], EIP_PUBLIC_IP)
    say(f"HTTP hygiene at the Elastic IP: {sum(bool(c['ok']) for c in checks)}/{len(checks)} as expected")
    for c in checks:
        if not c["ok"]:
            say(f"  FAIL {c['name']}: {c['got']} (expected {c['expect']})")
    return {"passed": all(c["ok"] for c in checks), "checks": checks}


def wait_ready(layout: Layout, timeout: float = 120) -> None:
    """The stack serves: the Elastic IP is associated (a keepalived master claimed it) and
    the portal answers through it from the client namespace."""
    from .layout import EIP_PUBLIC_IP, NS_CLIENT

    deadline = time.monotonic() + timeout
    probe = ["nsenter", f"--net=/run/netns/{NS_CLIENT}", "--", "curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}",
             "--max-time", "3"]
    last = ""
    while time.monotonic() < deadline:
        codes = [subprocess.run(probe + [f"https://{EIP_PUBLIC_IP}{p}"], capture_output=True, text=True).stdout
                 for p in ("/api/health", "/", "/auth/health")]
        last = " ".join(codes)
        if all(c == "200" for c in codes):
            say(f"the portal answers through the Elastic IP {EIP_PUBLIC_IP}")
            return
        time.sleep(1)
    raise RehearsalError(f"the portal does not answer through {EIP_PUBLIC_IP} (last: {last}); "
                         f"see {layout.workdir}/hosts/*/console.log and `journalctl` inside the hosts")


def down(workdir: Path = DEFAULT_WORKDIR, quiet: bool = False) -> list[str]:
    """Remove everything a rehearsal started, by pid and by name. Safe to repeat."""
    st = read_state(workdir)
    done: list[str] = []
    done += H.cleanup(workdir)  # containers of this workdir, recorded or not in state.json
    for name in list(st.get("hosts", {})):
        victims = H.kill(name)
        if victims:
            done.append(f"host {name}: killed {len(victims)} processes")
    for key in ("load_pid", "awsd_pid"):
        pid = st.get(key)
        if pid and _alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
            done.append(f"{key.split('_')[0]}: killed pid {pid}")
    # Hosts of a rehearsal killed mid-run in another workdir (a test's temporary one).
    done += [f"host {n}: leftover of a rehearsal that no longer runs, removed" for n in H.reclaim_dead("rh-")]
    names = st.get("namespaces") or [n for n in netns.existing_namespaces() if n.startswith("rh-")]
    gone = netns.destroy(names)
    if gone:
        done.append(f"namespaces: {', '.join(gone)}")
    # The hosts' disks (GiBs: Galera's gcache files) go; their logs (ctl/) and the
    # reports stay for a look afterwards, until the next `up`.
    hosts_dir = workdir / "hosts"
    for d in hosts_dir.iterdir() if hosts_dir.is_dir() else []:
        for sub in ("upper", "work", "volume", "root"):
            if (d / sub).exists() and not H.alive(d.name):
                shutil.rmtree(d / sub, ignore_errors=True)
    if (workdir / "efs").exists():
        shutil.rmtree(workdir / "efs", ignore_errors=True)
    if st:
        st["down"] = time.time()
        st["hosts"] = {}
        st.pop("awsd_pid", None)
        write_state(workdir, st)
    if not quiet:
        for item in done:
            say(f"down: {item}")
    return done
