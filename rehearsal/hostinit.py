#!/usr/bin/python3
"""PID 1 of one rehearsal host. No systemd here: this starts what the units would start.

Runs inside the host's namespaces (its own PID, mount, UTS and network namespace), with
Debian's /usr/bin/python3 and the standard library (+ PyYAML), like a host script.

At first boot it does what cloud-init's EC2 datasource and modules would do with the
host's user-data, which it fetches from the instance metadata service (IMDSv2):
write_files (the exact bytes, modes and owners), then runcmd in order, as root. Later
boots (after a kill -9 of the whole host) start the enabled units, as systemd would.

The service manager part reads the real unit files the host has (the packages' units in
/lib/systemd/system, the rendered ones and drop-ins in /etc/systemd/system) and runs
ExecStartPre/ExecStart/ExecStartPost/ExecReload/ExecStop directly, as the unit's
User/Group, with Environment=/EnvironmentFile=, RuntimeDirectory=, PIDFile=, Type=
(simple, exec, notify with a notify socket, forking, oneshot), Restart= and RestartSec=.
Each unit's processes are tracked in a cgroup (v2) so stop and restart reach all of them.
Sandboxing directives (ProtectSystem=, PrivateTmp=, BindReadOnlyPaths=, ...) are ignored
and listed as such in the log.

`systemctl` inside the host is a shim that sends its arguments here over
/run/rehearsal/init.sock; the rehearsal's tools use the same socket (ops: systemctl, run,
status, kill, hold, cloud-init, boot).
"""

from __future__ import annotations

import base64
import glob
import grp
import gzip
import json
import os
import pwd
import re
import select
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
from typing import Any

CTL = "/run/rehearsal"
SOCK = f"{CTL}/init.sock"
LOG = f"{CTL}/init.log"
JOURNAL = f"{CTL}/journal"
NOTIFY_DIR = "/run/rehearsal-notify"
CGROUP_ROOT = "/sys/fs/cgroup"
BOOT_FINISHED = "/var/lib/cloud/instance/boot-finished"
UNIT_DIRS = ["/etc/systemd/system", "/run/systemd/system", "/usr/local/lib/systemd/system", "/lib/systemd/system",
             "/usr/lib/systemd/system"]
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
IMDS = "http://169.254.169.254"
STOP_TIMEOUT_CAP = 30.0
START_TIMEOUT_CAP = 900.0

# Not run here, on purpose (the reason is logged when a command asks for them).
NOT_REHEARSED = {
    "chrony.service": "time sync would set this machine's clock",
    "chronyd.service": "time sync would set this machine's clock",
    "slurmd.service": "slurmd needs a cgroup filesystem it cannot get in a namespace here",
    "grafana-server.service": "Grafana is not packaged in Debian",
    "unattended-upgrades.service": "no package upgrades in a rehearsal",
    "apt-daily.timer": "no package upgrades in a rehearsal",
    "apt-daily-upgrade.timer": "no package upgrades in a rehearsal",
}
IGNORED_DIRECTIVES = {
    "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateUsers", "PrivateNetwork",
    "NoNewPrivileges", "BindReadOnlyPaths", "BindPaths", "ReadWritePaths", "ReadOnlyPaths", "ReadWriteDirectories",
    "CapabilityBoundingSet", "AmbientCapabilities", "SystemCallFilter", "SystemCallArchitectures", "ProtectProc",
    "ProtectClock", "ProtectControlGroups", "ProtectHostname", "ProtectKernelLogs", "ProtectKernelModules",
    "ProtectKernelTunables", "RestrictAddressFamilies", "RestrictNamespaces", "RestrictRealtime", "RestrictSUIDSGID",
    "LockPersonality", "MemoryDenyWriteExecute", "RemoveIPC", "NoExecPaths", "ExecPaths", "DeviceAllow",
    "DevicePolicy", "IOSchedulingClass", "Nice", "TasksMax", "LimitMEMLOCK", "SyslogIdentifier", "InaccessiblePaths",
    "OOMScoreAdjust", "CPUSchedulingPolicy",
}

_log_lock = threading.Lock()
BOOT_TIME = time.time()
BOOT_DONE = threading.Event()  # a reboot's enabled units have all been started (or failed)


def log(msg: str) -> None:
    line = f"{time.strftime('%H:%M:%S')} {socket.gethostname()} init: {msg}\n"
    with _log_lock:
        with open(LOG, "a") as f:
            f.write(line)


# ------------------------------------------------------------------------ unit files


class UnitNotFound(Exception):
    pass


def _split_words(value: str) -> list[tuple[str, bool]]:
    """systemd-style word split: (word, quoted) pairs; quotes removed, backslashes kept for \\\\."""
    words: list[tuple[str, bool]] = []
    i, n = 0, len(value)
    while i < n:
        while i < n and value[i] in " \t":
            i += 1
        if i >= n:
            break
        word, quoted = "", False
        while i < n and value[i] not in " \t":
            c = value[i]
            if c in "\"'":
                quoted = True
                j = i + 1
                while j < n and value[j] != c:
                    if value[j] == "\\" and j + 1 < n and c == '"':
                        j += 1
                    word += value[j]
                    j += 1
                i = j + 1
            elif c == "\\" and i + 1 < n:
                word += value[i + 1]
                i += 2
            else:
                word += c
                i += 1
        words.append((word, quoted))
    return words


class Unit:
    LIST_KEYS = {"Requires", "Wants", "BindsTo", "After", "Before", "ExecStartPre", "ExecStart", "ExecStartPost", "ExecReload", "ExecStop", "ExecStopPost", "Environment",
                 "EnvironmentFile", "ConditionPathExists", "ConditionFileNotEmpty", "ConditionPathIsMountPoint",
                 "RequiresMountsFor", "RuntimeDirectory", "StateDirectory", "LogsDirectory", "WantedBy", "Alias",
                 "SuccessExitStatus", "ReadWritePaths", "ConditionPathIsDirectory"}

    def __init__(self, name: str, path: str, dropins: list[str]):
        self.name = name
        self.path = path
        self.dropins = dropins
        self.props: dict[str, dict[str, Any]] = {}
        self.ignored: set[str] = set()
        for p in [path] + dropins:
            self._parse(p)

    def _parse(self, path: str) -> None:
        section = ""
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
        buf = ""
        for raw in lines:
            line = raw.rstrip()
            if buf:
                line = buf + " " + line.lstrip()
                buf = ""
            if line.endswith("\\"):
                buf = line[:-1]
                continue
            s = line.strip()
            if not s or s[0] in "#;":
                continue
            if s.startswith("[") and s.endswith("]"):
                section = s[1:-1]
                self.props.setdefault(section, {})
                continue
            if "=" not in s:
                continue
            key, _, value = s.partition("=")
            key, value = key.strip(), value.strip()
            sec = self.props.setdefault(section, {})
            if key in self.LIST_KEYS:
                if value == "":
                    sec[key] = []
                else:
                    sec.setdefault(key, []).append(value)
            else:
                sec[key] = value
            if key in IGNORED_DIRECTIVES:
                self.ignored.add(key)

    def get(self, key: str, default: Any = None, section: str = "Service") -> Any:
        return self.props.get(section, {}).get(key, default)

    def lst(self, key: str, section: str = "Service") -> list[str]:
        return list(self.props.get(section, {}).get(key, []))

    @property
    def kind(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    @property
    def type(self) -> str:
        t = self.get("Type")
        if t:
            return t
        return "simple" if self.lst("ExecStart") else "oneshot"


def _seconds(value: str | None, default: float) -> float:
    if not value:
        return default
    v = value.strip()
    if v in ("infinity", "0"):
        return START_TIMEOUT_CAP if v == "infinity" else default
    total = 0.0
    for num, unit in re.findall(r"([\d.]+)\s*(ms|min|s|m|h)?", v):
        f = float(num)
        total += {"ms": f / 1000, "min": f * 60, "m": f * 60, "h": f * 3600}.get(unit, f)
    return total or default


def find_unit(name: str) -> tuple[str, list[str]]:
    if "." not in name:
        name += ".service"
    for d in UNIT_DIRS:
        p = os.path.join(d, name)
        if os.path.lexists(p):
            if os.path.islink(p) and os.readlink(p) == "/dev/null":
                raise UnitNotFound(f"Unit {name} is masked.")
            real = os.path.realpath(p)
            if not os.path.exists(real):
                continue
            real_name = os.path.basename(real)
            dropins: list[str] = []
            seen: set[str] = set()
            for dd in reversed(UNIT_DIRS):
                for nm in {name, real_name}:
                    for f in sorted(glob.glob(os.path.join(dd, nm + ".d", "*.conf"))):
                        base = os.path.basename(f)
                        if base in seen:
                            dropins = [x for x in dropins if os.path.basename(x) != base]
                        seen.add(base)
                        dropins.append(f)
            dropins.sort(key=os.path.basename)
            return real, dropins
    raise UnitNotFound(f"Unit {name} not found.")


# ------------------------------------------------------------------------ processes


class Proc:
    def __init__(self, pid: int):
        self.pid = pid
        self.status: int | None = None
        self.done = threading.Event()


class Reaper:
    """PID 1 reaps everything; waiters register interest in a pid."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.procs: dict[int, Proc] = {}
        self.early: dict[int, int] = {}
        self.callbacks: dict[int, Any] = {}

    def track(self, pid: int) -> Proc:
        with self.lock:
            p = self.procs.get(pid) or Proc(pid)
            self.procs[pid] = p
            if pid in self.early:
                p.status = self.early.pop(pid)
                p.done.set()
            return p

    def on_exit(self, pid: int, cb: Any) -> None:
        with self.lock:
            self.callbacks[pid] = cb
            p = self.procs.get(pid)
            fire = p is not None and p.done.is_set()
        if fire and p is not None:
            threading.Thread(target=cb, args=(p.status,), daemon=True).start()

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            with self.lock:
                p = self.procs.pop(pid, None)
                cb = self.callbacks.pop(pid, None)
                if p is None:
                    if len(self.early) > 4096:
                        self.early.clear()
                    self.early[pid] = code
            if p is not None:
                p.status = code
                p.done.set()
            if cb is not None:
                threading.Thread(target=cb, args=(code,), daemon=True).start()


REAPER = Reaper()


def passwd_env(user: str | None) -> dict[str, str]:
    if not user:
        return {"HOME": "/root", "USER": "root", "LOGNAME": "root", "SHELL": "/bin/sh"}
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return {"USER": user, "LOGNAME": user}
    return {"HOME": pw.pw_dir, "USER": user, "LOGNAME": user, "SHELL": pw.pw_shell}


def spawn(argv: list[str], env: dict[str, str], *, user: str | None = None, group: str | None = None,
          cwd: str = "/", cgroup: str | None = None, out: Any = None, umask: int | None = None,
          stdin_data: bool = False) -> tuple[subprocess.Popen[bytes], Proc]:
    """Start argv as user:group, inside cgroup, logging to `out`. The pid is PID 1's to reap."""
    cmd = list(argv)
    if user and user != "root" or group and group != "root":
        priv = ["setpriv"]
        if user:
            priv += [f"--reuid={user}"]
        if group:
            priv += [f"--regid={group}"]
        elif user:
            try:
                priv += [f"--regid={pwd.getpwnam(user).pw_gid}"]
            except KeyError:
                pass
        priv += ["--init-groups" if user else "--clear-groups", "--"]
        cmd = priv + cmd
    if cgroup:
        cmd = ["/bin/sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', cgroup] + cmd
    old = os.umask(umask) if umask is not None else None
    try:
        popen = subprocess.Popen(cmd, env=env, cwd=cwd, stdin=subprocess.PIPE if stdin_data else subprocess.DEVNULL,
                                 stdout=out or subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        if old is not None:
            os.umask(old)
    proc = REAPER.track(popen.pid)
    # The reaper owns the exit status; keep subprocess from ever waiting on this pid.
    popen.returncode = 0
    return popen, proc


def cgroup_pids(path: str) -> list[int]:
    pids: list[int] = []
    for root, _dirs, files in os.walk(path):
        if "cgroup.procs" in files:
            try:
                with open(os.path.join(root, "cgroup.procs")) as f:
                    pids += [int(x) for x in f.read().split()]
            except OSError:
                pass
    return pids


def kill_pids(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


# ------------------------------------------------------------------ service manager


class UnitState:
    def __init__(self, name: str):
        self.name = name
        self.state = "inactive"  # inactive | activating | active | deactivating | failed
        self.main_pid = 0
        self.restarts = 0
        self.hold = False  # the rehearsal holds it down (no Restart=) for a drill
        self.lock = threading.RLock()
        self.stopping = False
        self.result = ""
        self.since = time.time()
        self.recent: list[float] = []
        self.cancel = False


class Manager:
    def __init__(self) -> None:
        self.units: dict[str, UnitState] = {}
        self.lock = threading.Lock()
        self.env: dict[str, str] = {}
        self.cache: dict[str, Unit] = {}
        self.cg_base = ""
        self.host = socket.gethostname()

    # ----- helpers
    def state(self, name: str) -> UnitState:
        with self.lock:
            if name not in self.units:
                self.units[name] = UnitState(name)
            return self.units[name]

    def load(self, name: str) -> Unit:
        if "." not in name:
            name += ".service"
        if name in self.cache:
            return self.cache[name]
        path, dropins = find_unit(name)
        u = Unit(name, path, dropins)
        canonical = os.path.basename(path)
        if canonical != name and canonical.rsplit(".", 1)[-1] == name.rsplit(".", 1)[-1]:
            u.name = canonical
        self.cache[name] = u
        if u.ignored:
            log(f"{u.name}: ignoring sandboxing directives {', '.join(sorted(u.ignored))}")
        return u

    def cgroup(self, unit: str) -> str | None:
        if not self.cg_base:
            return None
        path = os.path.join(self.cg_base, unit.replace("@", "_"))
        os.makedirs(path, exist_ok=True)
        return path

    def journal(self, unit: str) -> Any:
        os.makedirs(JOURNAL, exist_ok=True)
        return open(os.path.join(JOURNAL, unit + ".log"), "ab", buffering=0)

    def unit_env(self, u: Unit, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {"PATH": PATH, "LANG": "C.UTF-8", "INVOCATION_ID": os.urandom(16).hex()}
        env.update(passwd_env(u.get("User")))
        env.update(self.env)
        for line in u.lst("Environment"):
            for word, _q in _split_words(line):
                if "=" in word:
                    k, _, v = word.partition("=")
                    env[k] = v
        for spec in u.lst("EnvironmentFile"):
            optional = spec.startswith("-")
            path = spec.lstrip("-")
            for p in sorted(glob.glob(path)) or [path]:
                try:
                    env.update(read_env_file(p))
                except FileNotFoundError:
                    if not optional:
                        raise RuntimeError(f"{u.name}: EnvironmentFile {p} is missing") from None
        env.update(extra or {})
        return env

    def expand(self, u: Unit, line: str, env: dict[str, str]) -> tuple[list[str], str]:
        """An Exec line -> (argv, prefixes)."""
        m = re.match(r"^([-@:+!]*)(.*)$", line.strip())
        assert m
        prefixes, rest = m.group(1), m.group(2)
        rest = rest.replace("%n", u.name).replace("%N", u.name.rsplit(".", 1)[0]).replace("%t", "/run") \
                   .replace("%%", "%")
        argv: list[str] = []
        for word, quoted in _split_words(rest):
            m2 = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
            if m2 and not quoted:
                argv += env.get(m2.group(1), "").split()
                continue
            word = re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda mm: env.get(mm.group(1), ""), word)
            if not quoted:
                word = re.sub(r"\$([A-Za-z_][A-Za-z0-9_]*)", lambda mm: env.get(mm.group(1), ""), word)
            argv.append(word)
        if "@" in prefixes and len(argv) >= 2:
            argv = [argv[0]] + argv[2:]  # argv[1] would be argv[0]; exec keeps the path
        return argv, prefixes

    def run_sync(self, u: Unit, line: str, env: dict[str, str], timeout: float, what: str) -> int:
        argv, prefixes = self.expand(u, line, env)
        if not argv:
            return 0
        privileged = "+" in prefixes or "!" in prefixes
        with self.journal(u.name) as out:
            out.write(f"--- {time.strftime('%H:%M:%S')} {what}: {shlex.join(argv)}\n".encode())
            _p, proc = spawn(argv, env, user=None if privileged else u.get("User"),
                             group=None if privileged else u.get("Group"), cwd=self.workdir(u),
                             cgroup=self.cgroup(u.name), out=out, umask=self.umask(u))
        if not proc.done.wait(timeout):
            kill_pids([proc.pid], signal.SIGKILL)
            proc.done.wait(5)
            log(f"{u.name}: {what} timed out after {timeout:.0f}s")
            return 124 if "-" not in prefixes else 0
        rc = proc.status or 0
        if rc != 0 and "-" in prefixes:
            return 0
        if rc != 0 and str(rc) in " ".join(u.lst("SuccessExitStatus")).split():
            return 0
        return rc

    def workdir(self, u: Unit) -> str:
        wd = u.get("WorkingDirectory", "/").lstrip("-")
        if wd == "~":
            wd = passwd_env(u.get("User")).get("HOME", "/")
        return wd if os.path.isdir(wd) else "/"

    def umask(self, u: Unit) -> int | None:
        v = u.get("UMask")
        return int(v, 8) if v else None

    def conditions(self, u: Unit) -> str | None:
        for key in ("ConditionPathExists", "ConditionFileNotEmpty", "ConditionPathIsDirectory"):
            for spec in u.lst(key, "Unit"):
                neg = spec.startswith("!")
                path = spec.lstrip("!|")
                if key == "ConditionPathExists":
                    ok = os.path.exists(path)
                elif key == "ConditionPathIsDirectory":
                    ok = os.path.isdir(path)
                else:
                    ok = os.path.isfile(path) and os.path.getsize(path) > 0
                if ok == neg:
                    return f"{key}={spec}"
        return None

    def mkdirs(self, u: Unit) -> None:
        user, group = u.get("User"), u.get("Group")
        uid = pwd.getpwnam(user).pw_uid if user and _user_exists(user) else 0
        gid = grp.getgrnam(group).gr_gid if group and _group_exists(group) else (
            pwd.getpwnam(user).pw_gid if user and _user_exists(user) else 0)
        for key, base, mode_key in (("RuntimeDirectory", "/run", "RuntimeDirectoryMode"),
                                    ("StateDirectory", "/var/lib", "StateDirectoryMode"),
                                    ("LogsDirectory", "/var/log", "LogsDirectoryMode")):
            mode = int(u.get(mode_key, "0755"), 8)
            for spec in u.lst(key):
                for d in spec.split():
                    path = os.path.join(base, d)
                    os.makedirs(path, exist_ok=True)
                    os.chown(path, uid, gid)
                    os.chmod(path, mode)

    # ----- lifecycle
    def start(self, name: str, wait: bool = True) -> tuple[int, str]:
        try:
            u = self.load(name)
        except UnitNotFound as e:
            why = NOT_REHEARSED.get(name if "." in name else name + ".service")
            if why:
                log(f"{name}: not started ({why})")
                return 0, f"rehearsal: {name} not started: {why}"
            return 5, f"Failed to start {name}: {e}"
        if u.kind == "timer":
            return self.start_timer(u)
        if u.kind in ("target", "socket", "mount", "path"):
            return 0, ""
        why = NOT_REHEARSED.get(u.name)
        if why:
            log(f"{u.name}: not started ({why})")
            return 0, f"rehearsal: {u.name} not started: {why}"
        st = self.state(u.name)
        if st.state in ("active", "activating"):
            return 0, ""
        # Requires=/Wants= pull their units in first (After= ordering follows from that).
        for key in ("Requires", "Wants", "BindsTo"):
            for dep in " ".join(u.lst(key, "Unit")).split():
                if dep.endswith((".target", ".socket", ".mount", ".slice")) or dep == u.name:
                    continue
                if self._state_of(dep) in ("active", "activating"):
                    continue
                rc_dep, msg_dep = self.start(dep)
                if rc_dep != 0 and key != "Wants":
                    st.state, st.result = "failed", f"dependency {dep} failed"
                    return 1, f"Job for {u.name} failed: dependency {dep}: {msg_dep}"
        with st.lock:
            if st.state in ("active", "activating"):
                return 0, ""
            cond = self.conditions(u)
            if cond:
                log(f"{u.name}: condition failed ({cond}); not started")
                st.state, st.since = "inactive", time.time()
                return 0, ""
            st.state, st.since, st.stopping = "activating", time.time(), False
            try:
                rc, msg = self._start(u, st)
            except Exception as e:  # noqa: BLE001
                rc, msg = 1, f"{u.name}: {e}"
                log(traceback.format_exc())
            if rc != 0:
                st.state, st.result, st.since = "failed", msg, time.time()
                self._kill_all(u, signal.SIGKILL)
                log(f"{u.name}: start failed: {msg}")
                if u.get("Restart", "no") in ("always", "on-failure") and not st.hold:
                    threading.Thread(target=self._retry, args=(u, st), daemon=True).start()
                return 1, f"Job for {u.name} failed: {msg}"
            return 0, ""

    def _retry(self, u: Unit, st: UnitState) -> None:
        """Restart= after a failed start (e.g. an ExecStartPre that waits for something)."""
        now = time.time()
        st.recent = [t for t in st.recent if now - t < 10] + [now]
        if u.get("StartLimitIntervalSec", "10", section="Unit").strip() not in ("0", "0s", "infinity") \
                and len(st.recent) > 5:
            log(f"{u.name}: start request repeated too quickly; giving up like systemd")
            return
        time.sleep(_seconds(u.get("RestartSec"), 0.1))
        if st.hold or st.state != "failed":
            return
        st.restarts += 1
        log(f"{u.name}: Restart={u.get('Restart')} after a failed start (restart #{st.restarts})")
        self.cache.pop(u.name, None)
        self.start(u.name)

    def _start(self, u: Unit, st: UnitState) -> tuple[int, str]:
        self.mkdirs(u)
        env = self.unit_env(u)
        tstart = min(_seconds(u.get("TimeoutStartSec"), 90.0), START_TIMEOUT_CAP)
        for line in u.lst("ExecStartPre"):
            rc = self.run_sync(u, line, env, tstart, "ExecStartPre")
            if rc != 0:
                return rc, f"ExecStartPre exited {rc}"
            env = self.unit_env(u)  # a pre-command may have changed the manager environment
        execs = u.lst("ExecStart")
        typ = u.type
        if typ == "oneshot":
            for line in execs:
                rc = self.run_sync(u, line, env, tstart, "ExecStart")
                if rc != 0:
                    return rc, f"ExecStart exited {rc}"
            st.main_pid = 0
            st.state = "active" if u.get("RemainAfterExit", "no") in ("yes", "true", "1") else "inactive"
        else:
            if not execs:
                return 1, "no ExecStart"
            notify_path = None
            sock = None
            if typ == "notify":
                os.makedirs(NOTIFY_DIR, exist_ok=True)
                os.chmod(NOTIFY_DIR, 0o755)
                notify_path = os.path.join(NOTIFY_DIR, u.name)
                if os.path.exists(notify_path):
                    os.unlink(notify_path)
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.bind(notify_path)
                os.chmod(notify_path, 0o777)
                env["NOTIFY_SOCKET"] = notify_path
            argv, prefixes = self.expand(u, execs[-1], env)
            privileged = "+" in prefixes or "!" in prefixes
            with self.journal(u.name) as out:
                out.write(f"--- {time.strftime('%H:%M:%S')} ExecStart: {shlex.join(argv)}\n".encode())
                _p, proc = spawn(argv, env, user=None if privileged else u.get("User"),
                                 group=None if privileged else u.get("Group"), cwd=self.workdir(u),
                                 cgroup=self.cgroup(u.name), out=out, umask=self.umask(u))
            log(f"{u.name}: ExecStart pid {proc.pid}: {shlex.join(argv)}")
            if typ == "forking":
                if not proc.done.wait(tstart):
                    return 1, "forking start timed out"
                if proc.status not in (0, None):
                    return proc.status or 1, f"ExecStart exited {proc.status}"
                pidfile = u.get("PIDFile")
                main = 0
                deadline = time.monotonic() + 10
                while pidfile and time.monotonic() < deadline:
                    try:
                        with open(pidfile.replace("/var/run/", "/run/")) as f:
                            main = int(f.read().split()[0])
                        break
                    except (OSError, ValueError, IndexError):
                        time.sleep(0.1)
                if not main:
                    pids = cgroup_pids(self.cgroup(u.name) or "")
                    main = min(pids) if pids else 0
                if not main:
                    return 1, "forking service left no process"
                st.main_pid = main
                REAPER.track(main)
            else:
                st.main_pid = proc.pid
            REAPER.on_exit(st.main_pid, lambda code, u=u, st=st, pid=st.main_pid: self._main_exited(u, st, pid, code))
            if typ == "notify":
                assert sock is not None
                ok, why = self._wait_ready(sock, st, tstart)
                sock.close()
                if not ok:
                    return 1, why
            elif typ in ("simple", "exec", "idle"):
                # systemd counts a simple service as started at once; catch an immediate crash.
                if proc.done.wait(0.2):
                    return 1, f"exited at once ({proc.status})"
            st.state = "active"
        st.since = time.time()
        for line in u.lst("ExecStartPost"):
            rc = self.run_sync(u, line, self.unit_env(u, {"MAINPID": str(st.main_pid)}), tstart, "ExecStartPost")
            if rc != 0:
                return rc, f"ExecStartPost exited {rc}"
        log(f"{u.name}: {st.state} (main pid {st.main_pid or '-'})")
        return 0, ""

    def start_timer(self, u: Unit) -> tuple[int, str]:
        """Monotonic timers (OnBootSec=, OnActiveSec=, OnUnitActiveSec=) fire their unit;
        calendar timers (OnCalendar=) are noted, not scheduled."""
        st = self.state(u.name)
        if st.state == "active":
            return 0, ""
        st.state, st.since = "active", time.time()
        target = u.get("Unit", u.name[:-len(".timer")] + ".service", "Timer")
        first = [_seconds(u.get(k, section="Timer"), -1) for k in ("OnActiveSec", "OnBootSec", "OnStartupSec")]
        first = [max(0.0, x - (time.time() - BOOT_TIME if i else 0)) for i, x in enumerate(first) if x >= 0]
        every = _seconds(u.get("OnUnitActiveSec", section="Timer"), -1)
        if not first and every < 0:
            log(f"{u.name}: calendar timer ({u.get('OnCalendar', '?', 'Timer')}) not scheduled by the rehearsal")
            return 0, ""

        def loop() -> None:
            delay = min(first) if first else every
            while st.state == "active":
                time.sleep(delay)
                if st.state != "active":
                    return
                rc, msg = self.start(target)
                if self.load(target).type == "oneshot":
                    self.state(self.load(target).name).state = "inactive"  # a oneshot without RemainAfterExit
                if rc:
                    log(f"{u.name}: {target} failed: {msg}")
                if every < 0:
                    return
                delay = every

        threading.Thread(target=loop, daemon=True, name=u.name).start()
        log(f"{u.name}: scheduled {target} (first in {min(first) if first else every:.0f}s, then every {every:.0f}s)")
        return 0, ""

    def _wait_ready(self, sock: socket.socket, st: UnitState, timeout: float) -> tuple[bool, str]:
        deadline = time.monotonic() + timeout
        pid = st.main_pid
        while time.monotonic() < deadline:
            r, _w, _x = select.select([sock], [], [], 0.5)
            if r:
                data = sock.recv(65536).decode(errors="replace")
                fields = dict(x.split("=", 1) for x in data.split("\n") if "=" in x)
                if fields.get("MAINPID", "").isdigit():
                    st.main_pid = int(fields["MAINPID"])
                if fields.get("READY") == "1":
                    return True, ""
            proc = REAPER.procs.get(pid)
            if proc is None or proc.done.is_set():
                return False, "main process exited before it was ready"
            if st.cancel:
                return False, "start cancelled by a stop request"
        return False, f"not ready after {timeout:.0f}s"

    def _main_exited(self, u: Unit, st: UnitState, pid: int, code: int | None) -> None:
        with st.lock:
            if st.main_pid != pid:
                return
            st.main_pid = 0
            if st.stopping or st.state in ("inactive", "deactivating"):
                return
            clean = code == 0 or (code is not None and str(code) in " ".join(u.lst("SuccessExitStatus")).split()) \
                or code in (-signal.SIGTERM, 143) and "143" in " ".join(u.lst("SuccessExitStatus"))
            log(f"{u.name}: main process {pid} exited ({'signal ' + str(-code) if code and code < 0 else code})")
            # systemd performs the stop operation of a service that started, also when its
            # process died on its own: ExecStop= (no $MAINPID), the rest of the cgroup is
            # killed, then ExecStopPost= with $SERVICE_RESULT and $EXIT_CODE/$EXIT_STATUS.
            st.state = "deactivating"
            tstop = min(_seconds(u.get("TimeoutStopSec"), 90.0), STOP_TIMEOUT_CAP)
            for line in u.lst("ExecStop"):
                self.run_sync(u, line, self.unit_env(u), tstop, "ExecStop")
            self._kill_all(u, signal.SIGTERM)
            sig = -code if code is not None and code < 0 else 0
            post_env = self.unit_env(u, {
                "SERVICE_RESULT": "success" if clean else ("signal" if sig else "exit-code"),
                "EXIT_CODE": "killed" if sig else "exited",
                "EXIT_STATUS": signal.Signals(sig).name[3:] if sig else str(code or 0)})
            for line in u.lst("ExecStopPost"):
                self.run_sync(u, line, post_env, tstop, "ExecStopPost")
            st.state, st.since = ("inactive" if clean else "failed"), time.time()
            policy = u.get("Restart", "no")
            restart = (policy == "always" or (policy == "on-failure" and not clean)
                       or (policy == "on-abnormal" and sig and sig not in (1, 2, 13, 15))
                       or (policy == "on-abort" and sig and sig not in (1, 2, 13, 15)))
            if not restart:
                return
            if st.hold:
                log(f"{u.name}: Restart={policy} held back by the rehearsal (drill in progress)")
                return
            delay = _seconds(u.get("RestartSec"), 0.1)
            now = time.time()
            st.recent = [t for t in st.recent if now - t < 10] + [now]
            limited = u.get("StartLimitIntervalSec", "10", section="Unit").strip() not in ("0", "0s", "infinity")
            if limited and len(st.recent) > 5:
                log(f"{u.name}: start request repeated too quickly (5 in 10 s); giving up like systemd")
                return
        time.sleep(delay)
        with st.lock:
            if st.hold or st.state not in ("inactive", "failed"):
                return
            st.restarts += 1
        log(f"{u.name}: Restart={policy}: starting again (restart #{st.restarts})")
        self.cache.pop(u.name, None)
        self.start(u.name)

    def _kill_all(self, u: Unit, sig: int) -> None:
        cg = self.cgroup(u.name)
        if cg:
            kill_pids(cgroup_pids(cg), sig)

    def stop(self, name: str) -> tuple[int, str]:
        try:
            u = self.load(name)
        except UnitNotFound as e:
            if NOT_REHEARSED.get(name if "." in name else name + ".service"):
                return 0, ""
            return 5, f"Failed to stop {name}: {e}"
        st = self.state(u.name)
        if u.kind == "timer":
            st.state = "inactive"
            return 0, ""
        st.cancel = True  # a start still waiting for READY=1 gives up (systemd cancels the start job)
        with st.lock:
            st.cancel = False
            st.stopping = True
            if st.state in ("inactive", "failed") and not cgroup_pids(self.cgroup(u.name) or ""):
                st.state = "inactive" if st.state == "inactive" else st.state
                return 0, ""
            st.state = "deactivating"
            env = self.unit_env(u, {"MAINPID": str(st.main_pid)})
            tstop = min(_seconds(u.get("TimeoutStopSec"), 90.0), STOP_TIMEOUT_CAP)
            for line in u.lst("ExecStop"):
                self.run_sync(u, line, env, tstop, "ExecStop")
            kill_mode = u.get("KillMode", "control-group")
            sig = getattr(signal, u.get("KillSignal", "SIGTERM"), signal.SIGTERM)
            cg = self.cgroup(u.name) or ""
            if kill_mode != "none":
                if st.main_pid:
                    kill_pids([st.main_pid], sig)
                if kill_mode == "control-group":
                    kill_pids([p for p in cgroup_pids(cg) if p != st.main_pid], sig)
            deadline = time.monotonic() + tstop
            while time.monotonic() < deadline and cgroup_pids(cg):
                time.sleep(0.1)
            left = cgroup_pids(cg)
            if left:
                log(f"{u.name}: {len(left)} processes left after {tstop:.0f}s: SIGKILL")
                kill_pids(left, signal.SIGKILL)
            for line in u.lst("ExecStopPost"):
                self.run_sync(u, line, env, tstop, "ExecStopPost")
            st.state, st.main_pid, st.since = "inactive", 0, time.time()
            log(f"{u.name}: stopped")
            return 0, ""

    def reload(self, name: str) -> tuple[int, str]:
        u = self.load(name)
        st = self.state(u.name)
        if st.state != "active":
            return 1, f"{u.name} is not active, cannot reload."
        lines = u.lst("ExecReload")
        if not lines:
            return 1, f"Failed to reload {u.name}: Job type reload is not applicable for unit {u.name}."
        env = self.unit_env(u, {"MAINPID": str(st.main_pid)})
        for line in lines:
            rc = self.run_sync(u, line, env, 90, "ExecReload")
            if rc != 0:
                return 1, f"Job for {u.name} failed (ExecReload exited {rc})"
        log(f"{u.name}: reloaded")
        return 0, ""

    def kill(self, name: str, sig: int, whom: str = "all") -> tuple[int, str]:
        u = self.load(name)
        st = self.state(u.name)
        pids = [st.main_pid] if whom == "main" and st.main_pid else cgroup_pids(self.cgroup(u.name) or "")
        kill_pids(pids, sig)
        log(f"{u.name}: signal {sig} sent to {pids}")
        return 0, ""

    # ----- enablement
    def enable(self, name: str) -> tuple[int, str]:
        u = self.load(name)
        out = []
        for target in u.lst("WantedBy", "Install") + u.lst("RequiredBy", "Install"):
            for t in target.split():
                d = f"/etc/systemd/system/{t}.wants"
                os.makedirs(d, exist_ok=True)
                link = os.path.join(d, u.name)
                if not os.path.lexists(link):
                    os.symlink(u.path, link)
                    out.append(f"Created symlink {link} \u2192 {u.path}.")
        for alias in u.lst("Alias", "Install"):
            for a in alias.split():
                link = f"/etc/systemd/system/{a}"
                if not os.path.lexists(link):
                    os.symlink(u.path, link)
        return 0, "\n".join(out)

    def disable(self, name: str) -> tuple[int, str]:
        u = self.load(name)
        out = []
        for link in glob.glob(f"/etc/systemd/system/*.wants/{u.name}"):
            os.unlink(link)
            out.append(f"Removed \"{link}\".")
        return 0, "\n".join(out)

    def is_enabled(self, name: str) -> bool:
        u = self.load(name)
        return bool(glob.glob(f"/etc/systemd/system/*.wants/{u.name}"))

    def boot(self) -> list[str]:
        """A reboot: start every unit enabled for multi-user.target/timers.target."""
        names = sorted({os.path.basename(p) for p in glob.glob("/etc/systemd/system/multi-user.target.wants/*")
                        + glob.glob("/etc/systemd/system/timers.target.wants/*")})
        # Rough dependency order: data services, then writers/clients, then the rest.
        order = ["hpc-fetch-secrets", "hpc-memory-tune", "rsyslog", "munge", "redis-server", "redis-sentinel",
                 "mariadb", "hpc-clustercheck", "hpc-dbwriter", "hpc-portal-secrets", "slurmdbd", "slurmctld"]

        def key(n: str) -> tuple[int, str]:
            base = n.rsplit(".", 1)[0]
            return (order.index(base) if base in order else len(order), n)

        # systemd starts what is not ordered after something else in parallel: a unit
        # waiting for its peers (mariadb after a full outage) does not hold up the others.
        results: dict[str, str] = {}

        def one(n: str) -> None:
            rc, msg = self.start(n)
            results[n] = "ok" if rc == 0 else msg

        threads = []
        for n in sorted(names, key=key):
            t = threading.Thread(target=one, args=(n,), daemon=True)
            t.start()
            threads.append(t)
            time.sleep(0.05)
        for t in threads:
            t.join()
        return [f"{n}: {results.get(n, '?')}" for n in sorted(names, key=key)]

    # ----- systemctl
    def systemctl(self, argv: list[str]) -> tuple[int, str]:
        opts: dict[str, Any] = {"now": False, "quiet": False, "value": False, "props": [], "signal": "SIGTERM",
                                "whom": "all"}
        args: list[str] = []
        it = iter(argv)
        for a in it:
            if a == "--now":
                opts["now"] = True
            elif a in ("-q", "--quiet"):
                opts["quiet"] = True
            elif a == "--value":
                opts["value"] = True
            elif a in ("-p", "--property"):
                opts["props"] += next(it, "").split(",")
            elif a.startswith("--property="):
                opts["props"] += a.split("=", 1)[1].split(",")
            elif a in ("-s", "--signal"):
                opts["signal"] = next(it, "SIGTERM")
            elif a.startswith("--signal="):
                opts["signal"] = a.split("=", 1)[1]
            elif a.startswith("--kill-whom="):
                opts["whom"] = a.split("=", 1)[1]
            elif a.startswith("-") and a not in ("-"):
                continue  # --no-block, --no-pager, --system, --full, --no-reload, ...
            else:
                args.append(a)
        if not args:
            return 1, "rehearsal systemctl: no command"
        if "--no-block" in argv and args[0] in ("start", "restart", "try-restart", "reload-or-restart", "stop", "reload"):
            rest = [a for a in argv if a != "--no-block"]
            threading.Thread(target=lambda: log(f"systemctl --no-block {' '.join(rest)}: rc "
                                                f"{self.systemctl(rest)[0]}"), daemon=True).start()
            return 0, ""
        cmd, units = args[0], args[1:]
        rc_all, out_all = 0, []

        def each(fn: Any) -> tuple[int, str]:
            rc_, outs = 0, []
            for n in units:
                r, o = fn(n)
                rc_ = rc_ or r
                if o:
                    outs.append(o)
            return rc_, "\n".join(outs)

        if cmd in ("daemon-reload", "daemon-reexec"):
            self.cache.clear()
            return 0, ""
        if cmd == "start":
            return each(self.start)
        if cmd == "stop":
            return each(self.stop)
        if cmd in ("restart", "force-reload"):
            return each(lambda n: self.restart(n))
        if cmd == "try-restart":
            return each(lambda n: self.restart(n) if self._active(n) else (0, ""))
        if cmd == "reload":
            return each(self.reload)
        if cmd == "reload-or-restart":
            return each(lambda n: self.reload(n) if self._active(n) and self.load(n).lst("ExecReload")
                        else self.restart(n))
        if cmd == "try-reload-or-restart":
            return each(lambda n: (self.reload(n) if self.load(n).lst("ExecReload") else self.restart(n))
                        if self._active(n) else (0, ""))
        if cmd in ("enable", "disable", "reenable"):
            for n in units:
                try:
                    if cmd in ("disable", "reenable"):
                        r, o = self.disable(n)
                    if cmd in ("enable", "reenable"):
                        r, o = self.enable(n)
                except UnitNotFound as e:
                    why = NOT_REHEARSED.get(n if "." in n else n + ".service")
                    if why:
                        r, o = 0, f"rehearsal: {n} not {cmd}d: {why}"
                        log(f"{n}: {cmd} skipped ({why})")
                        out_all.append(o)
                        continue
                    r, o = 1, f"Failed to {cmd} unit: {e}"
                rc_all = rc_all or r
                if o:
                    out_all.append(o)
                if opts["now"] and r == 0:
                    r2, o2 = self.start(n) if cmd != "disable" else self.stop(n)
                    rc_all = rc_all or r2
                    if o2:
                        out_all.append(o2)
            return rc_all, "\n".join(out_all)
        if cmd in ("mask", "unmask"):
            for n in units:
                link = f"/etc/systemd/system/{n}"
                if cmd == "mask" and not os.path.lexists(link):
                    os.symlink("/dev/null", link)
                elif cmd == "unmask" and os.path.islink(link) and os.readlink(link) == "/dev/null":
                    os.unlink(link)
            self.cache.clear()
            return 0, ""
        if cmd == "reset-failed":
            for n in units or list(self.units):
                st = self.state(n if "." in n else n + ".service")
                if st.state == "failed":
                    st.state = "inactive"
            return 0, ""
        if cmd == "is-active":
            states = [self._state_of(n) for n in units]
            return (0 if all(s in ("active", "reloading") for s in states) else 3), \
                ("" if opts["quiet"] else "\n".join(states))
        if cmd == "is-failed":
            states = [self._state_of(n) for n in units]
            return (0 if any(s == "failed" for s in states) else 1), ("" if opts["quiet"] else "\n".join(states))
        if cmd == "is-enabled":
            res = []
            rc = 0
            for n in units:
                try:
                    enabled = self.is_enabled(n)
                except UnitNotFound:
                    enabled = False
                res.append("enabled" if enabled else "disabled")
                rc = rc or (0 if enabled else 1)
            return rc, "" if opts["quiet"] else "\n".join(res)
        if cmd == "status":
            out, rc = [], 0
            for n in units:
                try:
                    u = self.load(n)
                except UnitNotFound as e:
                    return 4, str(e)
                st = self.state(u.name)
                out.append(f"* {u.name}\n     Loaded: loaded ({u.path})\n     Active: {st.state}\n   Main PID: {st.main_pid}")
                rc = rc or (0 if st.state == "active" else 3)
            return rc, "\n".join(out)
        if cmd == "show":
            out = []
            for n in units:
                u = self.load(n)
                st = self.state(u.name)
                props = {"MainPID": str(st.main_pid), "ExecMainPID": str(st.main_pid), "ActiveState": st.state,
                         "SubState": "running" if st.main_pid else ("exited" if st.state == "active" else "dead"),
                         "NRestarts": str(st.restarts), "LoadState": "loaded", "Id": u.name,
                         "UnitFileState": "enabled" if self.is_enabled(u.name) else "disabled",
                         "FragmentPath": u.path}
                for p in opts["props"] or sorted(props):
                    out.append(props.get(p, "") if opts["value"] else f"{p}={props.get(p, '')}")
            return 0, "\n".join(out)
        if cmd == "kill":
            sig = opts["signal"]
            signum = int(sig) if str(sig).isdigit() else getattr(signal, sig if sig.startswith("SIG") else "SIG" + sig)
            return each(lambda n: self.kill(n, signum, opts["whom"]))
        if cmd == "set-environment":
            for kv in units:
                k, _, v = kv.partition("=")
                self.env[k] = v
            return 0, ""
        if cmd == "unset-environment":
            for k in units:
                self.env.pop(k.split("=")[0], None)
            return 0, ""
        if cmd == "show-environment":
            return 0, "\n".join(f"{k}={v}" for k, v in sorted(self.env.items()))
        if cmd == "list-units":
            return 0, "\n".join(f"{n} {s.state} {s.main_pid}" for n, s in sorted(self.units.items()))
        if cmd in ("enable-linger", "preset", "preset-all", "link", "revert", "edit", "cat", "isolate", "default",
                   "reboot", "poweroff", "halt"):
            return 1, f"rehearsal systemctl: {cmd} is not emulated"
        return 1, f"rehearsal systemctl: unknown command {cmd}"

    def _state_of(self, n: str) -> str:
        try:
            u = self.load(n)
        except UnitNotFound:
            return "inactive"
        return self.state(u.name).state

    def _active(self, n: str) -> bool:
        return self._state_of(n) in ("active", "activating")

    def restart(self, n: str) -> tuple[int, str]:
        why = NOT_REHEARSED.get(n if "." in n else n + ".service")
        if why:
            log(f"{n}: not restarted ({why})")
            return 0, f"rehearsal: {n} not started: {why}"
        r, o = self.stop(n)
        if r not in (0,):
            return r, o
        return self.start(n)

    def status(self) -> dict[str, Any]:
        out = {}
        for n, s in sorted(self.units.items()):
            out[n] = {"state": s.state, "main_pid": s.main_pid, "restarts": s.restarts, "hold": s.hold,
                      "since": s.since, "result": s.result,
                      "pids": cgroup_pids(self.cgroup(n) or "") if self.cg_base else []}
        return out


def _user_exists(u: str) -> bool:
    try:
        pwd.getpwnam(u)
        return True
    except KeyError:
        return False


def _group_exists(g: str) -> bool:
    try:
        grp.getgrnam(g)
        return True
    except KeyError:
        return False


def read_env_file(path: str) -> dict[str, str]:
    env: dict[str, str] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f.read().splitlines():
            s = line.strip()
            if not s or s[0] in "#;" or "=" not in s:
                continue
            if s.startswith("export "):
                s = s[7:]
            k, _, v = s.partition("=")
            v = v.strip()
            if len(v) >= 2 and v[0] == v[-1] and v[0] in "\"'":
                q = v[0]
                v = v[1:-1]
                if q == '"':
                    v = re.sub(r'\\(["\\$`])', r"\1", v)
            env[k.strip()] = v
    return env


MANAGER = Manager()


# ------------------------------------------------------------------------ cloud-init


def imds_get(path: str, attempts: int = 30) -> bytes:
    last: Exception | None = None
    for _ in range(attempts):
        try:
            req = urllib.request.Request(f"{IMDS}/latest/api/token", method="PUT",
                                         headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"})
            token = urllib.request.urlopen(req, timeout=3).read().decode()
            req = urllib.request.Request(f"{IMDS}{path}", headers={"X-aws-ec2-metadata-token": token})
            return urllib.request.urlopen(req, timeout=5).read()
        except Exception as e:  # noqa: BLE001
            last = e
            time.sleep(1)
    raise RuntimeError(f"IMDS {path}: {last}")


def _owner_ids(owner: str) -> tuple[int, int]:
    user, _, group = owner.partition(":")
    uid = pwd.getpwnam(user).pw_uid if user else 0
    gid = grp.getgrnam(group).gr_gid if group else pwd.getpwnam(user).pw_gid
    return uid, gid


def write_file(entry: dict[str, Any]) -> str:
    path = entry["path"]
    content = entry.get("content", "")
    enc = (entry.get("encoding") or "").lower()
    data = content.encode() if isinstance(content, str) else bytes(content)
    if enc in ("b64", "base64"):
        data = base64.b64decode(data)
    elif enc in ("gz+b64", "gzip+base64", "gz+base64"):
        data = gzip.decompress(base64.b64decode(data))
    elif enc in ("gz", "gzip"):
        data = gzip.decompress(data)
    mode = int(str(entry.get("permissions", "0644")), 8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.rehearsal-tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    try:
        uid, gid = _owner_ids(entry.get("owner", "root:root"))
    except KeyError:
        uid, gid = 0, 0
        log(f"write_files: owner {entry.get('owner')} of {path} does not exist yet; root:root")
    os.chown(tmp, uid, gid)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    return path


def run_command(argv: list[str], timeout: float = 1800, env: dict[str, str] | None = None,
                logname: str = "runcmd") -> tuple[int, str]:
    base = {"PATH": PATH, "LANG": "C.UTF-8", "HOME": "/root", "USER": "root", "LOGNAME": "root"}
    base.update(env or {})
    r, w = os.pipe()
    try:
        _p, proc = spawn(argv, base, out=w)
    except OSError as e:
        os.close(r)
        os.close(w)
        return 127, str(e)
    os.close(w)
    chunks: list[bytes] = []

    def reader() -> None:
        while True:
            b = os.read(r, 65536)
            if not b:
                break
            chunks.append(b)
        os.close(r)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    if not proc.done.wait(timeout):
        kill_pids([proc.pid], signal.SIGKILL)
        proc.done.wait(5)
        t.join(2)
        return 124, b"".join(chunks).decode(errors="replace") + f"\n[timed out after {timeout:.0f}s]"
    # Daemons started by the command may keep the pipe open: read what is there.
    t.join(2)
    return proc.status or 0, b"".join(chunks).decode(errors="replace")


def rehearsal_rewrite(argv: list[str]) -> tuple[list[str], str | None]:
    """The few runcmd entries the rehearsal changes, with the reason it prints."""
    if argv and argv[0].endswith("/hpc-mount-efs"):
        return argv + ["--no-mount"], ("EFS: fstab lines written (--no-mount); the shared directory is "
                                       "bind-mounted at the mount points (no NFS server in this kernel)")
    return argv, None


def cloud_init() -> dict[str, Any]:
    import yaml

    if os.path.exists(BOOT_FINISHED):
        return {"skipped": "boot-finished exists (cloud-init runs once per instance)"}
    raw = imds_get("/latest/user-data")
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    text = raw.decode()
    if not text.startswith("#cloud-config"):
        raise RuntimeError("user-data is not a #cloud-config document")
    doc = yaml.safe_load(text) or {}
    os.makedirs("/var/lib/cloud/instance", exist_ok=True)
    with open("/var/lib/cloud/instance/user-data.txt", "w") as f:
        f.write(text)
    result: dict[str, Any] = {"user_data_bytes": len(raw), "write_files": [], "runcmd": [], "notes": []}
    if doc.get("hostname") and doc["hostname"] != socket.gethostname():
        result["notes"].append(f"hostname {doc['hostname']} != {socket.gethostname()}")
    for key in sorted(doc):
        if key in ("hostname", "fqdn", "prefer_fqdn_over_hostname", "manage_etc_hosts", "write_files", "runcmd"):
            continue
        if key == "packages":
            cp = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${Status}\\n"] + list(doc["packages"]),
                                capture_output=True, text=True)
            have = {ln.split()[0] for ln in cp.stdout.splitlines() if ln.endswith("install ok installed")}
            missing = [p for p in doc["packages"] if p not in have]
            result["packages_missing"] = missing
            result["notes"].append(f"packages: {len(doc['packages']) - len(missing)} of {len(doc['packages'])} are "
                                   f"installed on this machine (Debian's builds){'; not installed: ' + ', '.join(missing) if missing else ''}")
            continue
        result["notes"].append(f"{key}: not applied by the rehearsal")
    deferred = []
    for entry in doc.get("write_files") or []:
        if entry.get("defer"):
            deferred.append(entry)
            continue
        result["write_files"].append(write_file(entry))
    for entry in deferred:  # after the packages, as cloud-init's write_files_deferred
        result["write_files"].append(write_file(entry))
    log(f"cloud-init: wrote {len(result['write_files'])} files")
    for i, cmd in enumerate(doc.get("runcmd") or []):
        argv = [str(x) for x in cmd] if isinstance(cmd, list) else ["sh", "-c", str(cmd)]
        argv, note = rehearsal_rewrite(argv)
        t0 = time.time()
        log(f"runcmd[{i}]: {shlex.join(argv)}")
        rc, out = run_command(argv)
        entry = {"argv": argv, "rc": rc, "seconds": round(time.time() - t0, 1), "output": out[-4000:]}
        if note:
            entry["rehearsal"] = note
        result["runcmd"].append(entry)
        log(f"runcmd[{i}]: rc={rc} in {entry['seconds']}s")
    with open(BOOT_FINISHED, "w") as f:
        f.write(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
    result["failed"] = [c for c in result["runcmd"] if c["rc"] != 0]
    return result


# ---------------------------------------------------------------------- control socket


def handle(req: dict[str, Any]) -> dict[str, Any]:
    op = req.get("op")
    if op == "systemctl":
        argv = [str(a) for a in req.get("argv", [])]
        rc, out = MANAGER.systemctl(argv)
        log(f"systemctl {shlex.join(argv)} -> rc {rc}" + (f": {out.splitlines()[0]}" if out and rc else ""))
        return {"rc": rc, "out": out}
    if op == "run":
        rc, out = run_command([str(a) for a in req["argv"]], float(req.get("timeout", 600)), req.get("env"))
        return {"rc": rc, "out": out}
    if op == "status":
        return {"rc": 0, "units": MANAGER.status(), "hostname": socket.gethostname(), "boot_done": BOOT_DONE.is_set()}
    if op == "cloud-init":
        try:
            return {"rc": 0, "result": cloud_init()}
        except Exception as e:  # noqa: BLE001
            log(traceback.format_exc())
            return {"rc": 1, "error": f"{type(e).__name__}: {e}"}
    if op == "boot":
        return {"rc": 0, "started": MANAGER.boot()}
    if op == "hold":
        st = MANAGER.state(req["unit"])
        st.hold = bool(req.get("hold", True))
        log(f"{st.name}: restart {'held' if st.hold else 'released'} by the rehearsal")
        return {"rc": 0}
    if op == "kill":
        u = MANAGER.load(req["unit"])
        st = MANAGER.state(u.name)
        if req.get("hold"):
            st.hold = True
        pids = [st.main_pid] if req.get("main_only") and st.main_pid else cgroup_pids(MANAGER.cgroup(u.name) or "")
        kill_pids(pids, int(req.get("signal", 9)))
        log(f"{u.name}: rehearsal sent signal {req.get('signal', 9)} to {pids}")
        return {"rc": 0, "pids": pids}
    return {"rc": 1, "out": f"unknown op {op!r}"}


def serve() -> None:
    if os.path.exists(SOCK):
        os.unlink(SOCK)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(SOCK)
    os.chmod(SOCK, 0o600)
    srv.listen(64)

    def conn_thread(c: socket.socket) -> None:
        with c:
            data = b""
            while not data.endswith(b"\n"):
                chunk = c.recv(65536)
                if not chunk:
                    break
                data += chunk
            try:
                resp = handle(json.loads(data or b"{}"))
            except Exception as e:  # noqa: BLE001
                log(traceback.format_exc())
                resp = {"rc": 1, "out": f"{type(e).__name__}: {e}"}
            try:
                c.sendall((json.dumps(resp, default=str) + "\n").encode())
            except OSError:
                pass

    while True:
        c, _ = srv.accept()
        threading.Thread(target=conn_thread, args=(c,), daemon=True).start()


def tmpfiles() -> str:
    """What systemd-tmpfiles-setup does at boot for directories (/run/haproxy, /run/mysqld, ...)."""
    made = []
    files: dict[str, str] = {}
    for d in ("/usr/lib/tmpfiles.d", "/lib/tmpfiles.d", "/run/tmpfiles.d", "/etc/tmpfiles.d"):
        for f in sorted(glob.glob(f"{d}/*.conf")):
            files[os.path.basename(f)] = f
    for _name, f in sorted(files.items()):
        try:
            lines = open(f).read().splitlines()
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) < 2 or parts[0].startswith("#") or parts[0].rstrip("!-+") not in ("d", "D"):
                continue
            path = parts[1].replace("/var/run/", "/run/")
            if not path.startswith(("/run/", "/var/", "/tmp/")) or "%" in path:
                continue
            mode = parts[2] if len(parts) > 2 and parts[2] != "-" else "0755"
            user = parts[3] if len(parts) > 3 and parts[3] != "-" else "root"
            group = parts[4] if len(parts) > 4 and parts[4] != "-" else "root"
            try:
                os.makedirs(path, exist_ok=True)
                uid = pwd.getpwnam(user).pw_uid if _user_exists(user) else 0
                gid = grp.getgrnam(group).gr_gid if _group_exists(group) else 0
                os.chown(path, uid, gid)
                os.chmod(path, int(mode.lstrip("~"), 8))
                made.append(path)
            except (OSError, ValueError):
                pass
    return f"{len(made)} directories"


def main() -> int:
    os.makedirs(CTL, exist_ok=True)
    # keepalived (and others) notify only when PID 1 is called "systemd" (/proc/1/stat).
    import ctypes

    ctypes.CDLL(None).prctl(15, b"systemd", 0, 0, 0)
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(65536, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    cg = os.environ.get("REHEARSAL_CGROUP", "")
    if cg and os.path.isdir(cg):
        MANAGER.cg_base = cg
    rfd, wfd = os.pipe()
    os.set_blocking(wfd, False)
    signal.set_wakeup_fd(wfd)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGTERM, lambda *_: None)  # PID 1 ignores TERM; the rehearsal uses SIGKILL
    # Daemons ask sd_booted() (does /run/systemd/system exist?) before they notify.
    os.makedirs("/run/systemd/system", exist_ok=True)
    threading.Thread(target=serve, daemon=True, name="ctl").start()
    log(f"up (pid namespace init, cgroup {MANAGER.cg_base or 'none'})")
    log("tmpfiles: " + tmpfiles())
    if os.path.exists(BOOT_FINISHED):
        def reboot() -> None:
            log("reboot: " + "; ".join(MANAGER.boot()))
            BOOT_DONE.set()

        threading.Thread(target=reboot, daemon=True).start()
    else:
        BOOT_DONE.set()  # first boot: cloud-init (the rehearsal's request) does the rest
    while True:
        try:
            ready, _w, _x = select.select([rfd], [], [], 1.0)
            if ready:
                os.read(rfd, 4096)
        except InterruptedError:
            pass
        REAPER.reap()


if __name__ == "__main__":
    sys.exit(main())
