"""The power-loss layer (rehearsal/lazyfs.py) on real FUSE mounts: what was fsynced
survives a power-off, what was not is gone (bytes overwritten, files extended or
truncated), ownership is the caller's. And the positive control the power-loss drill
rests on: a real mariadbd with its datadir on the layer loses acknowledged commits at
power-off with innodb_flush_log_at_trx_commit=2, and none with the durability settings of
the program's Galera template."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rehearsal import lazyfs

from .conftest import Tally, not_installed

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "cloud_init/templates/data/65-hpc-galera.cnf"


def _fuse_ready() -> bool:
    if os.geteuid() != 0:
        pytest.skip("needs root (FUSE mounts with allow_other, files owned by other users)")
    ok = True
    if not shutil.which("fusermount3"):
        not_installed("fusermount3", "fuse3")
        ok = False
    if not os.path.exists("/dev/fuse"):
        pytest.fail("/dev/fuse is missing: this kernel or container has no FUSE")
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as e:  # OSError: libfuse3 itself is missing
        pytest.fail(f"mfusepy cannot load libfuse3 (Debian package libfuse3-3): {e}")
    return ok


class Lazy:
    """Mounts of the layer made by one test; every one is unmounted at the end."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.backing = base / "backing"
        self.mnt = base / "mnt"
        self.control = base / "control.sock"
        self.pid: int | None = None
        for d in (self.backing, self.mnt):
            d.mkdir(parents=True, exist_ok=True)

    def mount(self, durable: bool = False) -> Path:
        self.pid = lazyfs.start(self.backing, self.mnt, self.control, self.base / "lazyfs.log", python=sys.executable,
                                durable=durable)
        return self.mnt

    def poweroff(self) -> dict[str, Any]:
        out = lazyfs.poweroff(self.control, self.mnt, self.pid)
        self.pid = None
        return out

    def close(self) -> None:
        lazyfs.stop(self.control, self.mnt, self.pid)
        self.pid = None


@pytest.fixture
def lazy() -> Iterator[Lazy]:
    if not _fuse_ready():
        pytest.fail("fusermount3 is needed to unmount the layer")
    base = Path(tempfile.mkdtemp(prefix="lazyfs-", dir="/var/tmp"))
    base.chmod(0o755)  # mysql must reach a datadir below it
    lz = Lazy(base)
    try:
        yield lz
    finally:
        lz.close()
        assert not lazyfs.mounted(lz.mnt), f"{lz.mnt} still mounted"
        shutil.rmtree(base, ignore_errors=True)


def test_unsynced_writes_are_gone_after_power_off_synced_ones_stay(lazy: Lazy) -> None:
    (lazy.backing / "old").write_bytes(b"A" * 10000)
    m = lazy.mount()
    with open(m / "old", "r+b") as f:  # overwrite inside the durable size, never synced
        f.seek(100)
        f.write(b"B" * 50)
    with open(m / "synced", "wb") as f:
        f.write(b"s" * 5000)
        f.flush()
        os.fsync(f.fileno())
        f.write(b"t" * 100)  # after the fsync: not durable
    with open(m / "datasynced", "wb") as f:
        f.write(b"d" * 700)
        f.flush()
        os.fdatasync(f.fileno())
    with open(m / "never", "wb") as f:
        f.write(b"n" * 123)
    assert (lazy.backing / "old").read_bytes()[100:150] == b"B" * 50  # written through at once
    dropped = lazy.poweroff()
    assert not lazyfs.mounted(lazy.mnt)
    assert (lazy.backing / "old").read_bytes() == b"A" * 10000
    assert (lazy.backing / "synced").read_bytes() == b"s" * 5000
    assert (lazy.backing / "datasynced").read_bytes() == b"d" * 700
    assert (lazy.backing / "never").read_bytes() == b""  # created (metadata is durable), data never synced
    assert dropped["files"] == 3 and dropped["bytes"] == 50 + 100 + 123, dropped
    assert sorted(dropped["paths"]) == ["/never", "/old", "/synced"]


def test_truncate_and_extend_are_undone(lazy: Lazy) -> None:
    data = bytes(range(256)) * 40
    (lazy.backing / "shrunk").write_bytes(data)
    (lazy.backing / "grown").write_bytes(data)
    (lazy.backing / "both").write_bytes(data)
    m = lazy.mount()
    os.truncate(m / "shrunk", 1000)
    with open(m / "grown", "ab") as f:
        f.write(b"G" * 3000)
    os.truncate(m / "both", 10)  # cut, then written past the old end
    with open(m / "both", "r+b") as f:
        f.seek(20000)
        f.write(b"X")
    with open(m / "trunc-open", "wb") as f:  # O_TRUNC of a synced file
        f.write(b"keep")
        f.flush()
        os.fsync(f.fileno())
    with open(m / "trunc-open", "wb") as f:
        f.write(b"new")
    assert os.path.getsize(lazy.backing / "shrunk") == 1000 and os.path.getsize(lazy.backing / "both") == 20001
    lazy.poweroff()
    for name in ("shrunk", "grown", "both"):
        assert (lazy.backing / name).read_bytes() == data, name
    assert (lazy.backing / "trunc-open").read_bytes() == b"keep"


def test_o_dsync_writes_are_durable_o_direct_ones_are_not(lazy: Lazy) -> None:
    m = lazy.mount()
    fd = os.open(m / "dsync", os.O_WRONLY | os.O_CREAT | os.O_DSYNC, 0o644)
    os.write(fd, b"durable")
    os.close(fd)
    fd = os.open(m / "direct", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    buf = __import__("mmap").mmap(-1, 4096)  # O_DIRECT wants an aligned buffer
    buf.write(b"q" * 4096)
    os.write(fd, buf)
    os.close(fd)
    assert os.path.getsize(lazy.backing / "direct") == 4096
    lazy.poweroff()
    assert (lazy.backing / "dsync").read_bytes() == b"durable"
    assert (lazy.backing / "direct").read_bytes() == b""


def test_rm_rf_sees_every_entry_and_an_unlinked_open_file_still_works(lazy: Lazy) -> None:
    """A Galera joiner's SST ends with `rm -rf .sst`: readdir must give every entry its
    inode (readdir(3) skips inode 0). A file unlinked while open still reads, writes,
    truncates and syncs through its handle (libfuse keeps it as .fuse_hidden*)."""
    m = lazy.mount()
    (m / "sst" / "sub").mkdir(parents=True)
    for name in ("a", "b", "sub/c"):
        (m / "sst" / name).write_bytes(b"x")
    assert sorted(os.listdir(m / "sst")) == ["a", "b", "sub"]
    subprocess.run(["rm", "-rf", str(m / "sst")], check=True, timeout=30)
    assert not (lazy.backing / "sst").exists()
    with open(m / "open", "w+b") as f:
        f.write(b"abc")
        f.flush()
        os.unlink(m / "open")
        f.write(b"def")
        f.flush()
        os.ftruncate(f.fileno(), 4)
        os.fsync(f.fileno())
        f.seek(0)
        assert f.read() == b"abcd" and os.fstat(f.fileno()).st_size == 4
    deadline = time.monotonic() + 10  # the release after close(2) is asynchronous
    while os.listdir(lazy.backing) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.listdir(lazy.backing)


def test_files_are_owned_by_their_creator(lazy: Lazy) -> None:
    m = lazy.mount()
    d = m / "d"
    d.mkdir(mode=0o777)
    os.chmod(d, 0o777)
    script = ("import os,sys; d=sys.argv[1]; open(d+'/f','w').write('x'); os.mkdir(d+'/sub'); "
              "os.symlink('f', d+'/ln'); os.mkfifo(d+'/fifo')")
    r = subprocess.run(["setpriv", "--reuid=4321", "--regid=4322", "--clear-groups", sys.executable, "-c", script,
                        str(d)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    for name in ("f", "sub", "ln", "fifo"):
        st = os.lstat(lazy.backing / "d" / name)
        assert (st.st_uid, st.st_gid) == (4321, 4322), name
    # default_permissions: the kernel checks modes as on any disk
    os.chmod(d / "f", 0o600)
    r = subprocess.run(["setpriv", "--reuid=999", "--regid=999", "--clear-groups", "cat", str(d / "f")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "Permission denied" in r.stderr


def test_the_layer_serves_many_threads_at_once(lazy: Lazy) -> None:
    m = lazy.mount()
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            with open(m / f"w{i}", "wb") as f:
                for k in range(200):
                    f.write(bytes([i]) * 512)
                    if k == 99:
                        f.flush()
                        os.fsync(f.fileno())
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    dropped = lazy.poweroff()
    assert dropped["files"] == 8 and dropped["bytes"] == 8 * 100 * 512
    for i in range(8):
        assert (lazy.backing / f"w{i}").read_bytes() == bytes([i]) * 512 * 100


# ------------------------------------------------------------------ a stalled share (efs-stall)
def _in_thread(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001
            out["error"] = e
        out["at"] = time.monotonic()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_a_stall_holds_every_operation_until_resume_then_all_complete(lazy: Lazy) -> None:
    m = lazy.mount(durable=True)
    (m / "state").write_bytes(b"x" * 100)

    def rewrite() -> bytes:  # what slurmctld does with a state file: write a new one, rename it over
        with open(m / "state.new", "wb") as f:
            f.write(b"y" * 200)
            os.fsync(f.fileno())
        os.rename(m / "state.new", m / "state")
        return (m / "state").read_bytes()

    before = lazyfs.stall(lazy.control, 60)
    assert before["stalled"] and before["durable"], before
    t0 = time.monotonic()
    writer, wout = _in_thread(rewrite)
    lister, lout = _in_thread(lambda: sorted(os.listdir(m)))
    time.sleep(1.5)
    assert writer.is_alive() and lister.is_alive(), f"an operation was answered while stalled: {wout} {lout}"
    st = lazyfs.call(lazy.control, "status", 10)
    assert st["stalled"] and st["waiting"] >= 1, st
    t_resume = time.monotonic()
    after = lazyfs.resume(lazy.control)
    assert not after["stalled"], after
    writer.join(20)
    lister.join(20)
    assert "error" not in wout and "error" not in lout, (wout, lout)
    assert wout["value"] == b"y" * 200 and "state" in "".join(lout["value"])
    assert wout["at"] >= t_resume and wout["at"] - t0 >= 1.5
    assert lazyfs.call(lazy.control, "status", 10)["stalled_ops"] >= 1


def test_a_stall_nobody_ends_is_over_after_its_seconds_and_unmount_ends_one(lazy: Lazy) -> None:
    m = lazy.mount(durable=True)
    lazyfs.stall(lazy.control, 1.0)
    t0 = time.monotonic()
    (m / "f").write_bytes(b"z")
    assert time.monotonic() - t0 >= 0.8, "the write did not wait for the stall"
    with pytest.raises(RuntimeError, match="stall refused"):
        lazyfs.stall(lazy.control, 10_000)  # over STALL_MAX_S: refused, named
    lazyfs.stall(lazy.control, 300)
    # SIGKILL ends a process waiting on the stall (as on a hard NFS mount); SIGTERM caught
    # by a handler does not end its wait.
    waiter = subprocess.Popen([sys.executable, "-c", "import signal, sys, time\n"
                               "signal.signal(signal.SIGTERM, lambda *a: None)\n"
                               f"open({str(m / 'f')!r}, 'rb').read()\nprint('read', flush=True)"],
                              stdout=subprocess.PIPE, text=True)
    time.sleep(1.0)
    waiter.send_signal(signal.SIGTERM)
    time.sleep(1.0)
    assert waiter.poll() is None, "a caught SIGTERM ended the wait"
    t0 = time.monotonic()
    waiter.kill()
    assert waiter.wait(10) == -signal.SIGKILL and time.monotonic() - t0 < 5, "SIGKILL did not end the wait"
    hung, hout = _in_thread(lambda: (m / "f").read_bytes())
    time.sleep(0.5)
    assert hung.is_alive()
    lazy.close()  # a clean unmount while stalled: the stall ends first, nothing hangs
    hung.join(20)
    assert not hung.is_alive() and not lazyfs.mounted(lazy.mnt)
    assert (lazy.backing / "f").read_bytes() == b"z"


def test_a_durable_layer_keeps_unsynced_writes_at_power_off(lazy: Lazy) -> None:
    m = lazy.mount(durable=True)
    with open(m / "never-synced", "wb") as f:
        f.write(b"n" * 123)
    dropped = lazy.poweroff()
    assert dropped["files"] == 0 and dropped["bytes"] == 0, dropped
    assert (lazy.backing / "never-synced").read_bytes() == b"n" * 123


# ------------------------------------------------------------------ positive control
def template_durability() -> dict[str, str]:
    """The durability settings the program's Galera template sets for mysqld."""
    out = {}
    section = ""
    for line in TEMPLATE.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        m = re.fullmatch(r"(innodb_flush_log_at_trx_commit|sync_binlog|innodb_doublewrite)\s*=\s*(\S+)", line)
        if section == "[mysqld]" and m:
            out[m.group(1)] = m.group(2)
    return out


class Mariadb:
    def __init__(self, lz: Lazy) -> None:
        self.lz = lz
        self.run = lz.base / "run"
        self.run.mkdir(exist_ok=True)
        shutil.chown(self.run, "mysql", "mysql")
        self.sock = self.run / "mysqld.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def install(self) -> None:
        datadir = self.lz.backing / "mysql"
        datadir.mkdir()
        shutil.chown(datadir, "mysql", "mysql")
        r = subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={datadir}", "--user=mysql",
                            "--auth-root-authentication-method=normal", "--skip-test-db"],
                           capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, f"mariadb-install-db: {r.stdout[-2000:]}{r.stderr[-2000:]}"

    def start(self, settings: dict[str, str]) -> None:
        opts = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
        log = open(self.lz.base / "mariadbd.log", "ab")
        self.proc = subprocess.Popen(["mariadbd", "--no-defaults", f"--datadir={self.lz.mnt / 'mysql'}",
                                      f"--socket={self.sock}", "--skip-networking", "--user=mysql",
                                      f"--pid-file={self.run / 'mysqld.pid'}", "--skip-log-bin",
                                      "--innodb-buffer-pool-size=64M", "--innodb-log-file-size=48M", *opts],
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"mariadbd exited {self.proc.returncode}: {self.log()}")
            if self.sock.exists() and self.sql("SELECT 1", check=False).strip() == "1":
                return
            time.sleep(0.2)
        raise AssertionError(f"mariadbd not ready: {self.log()}")

    def log(self) -> str:
        return (self.lz.base / "mariadbd.log").read_text(errors="replace")[-3000:]

    def sql(self, q: str, check: bool = True) -> str:
        r = subprocess.run(["mariadb", "-uroot", f"--socket={self.sock}", "-N", "-B", "-e", q], capture_output=True,
                           text=True, timeout=60)
        if check:
            assert r.returncode == 0, f"{q}: {r.stderr}"
        return r.stdout

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill9()
        self.proc = None


def commit_until_killed(db: Mariadb, seconds: float) -> list[int]:
    """Rows inserted one commit at a time as fast as one client goes; mariadbd is killed
    -9 after `seconds` while commits go on. The ids whose COMMIT was acknowledged."""
    import pymysql  # type: ignore[import-untyped]

    conn = pymysql.connect(unix_socket=str(db.sock), user="root", autocommit=True, database="pc")
    acked: list[int] = []

    def killer() -> None:
        time.sleep(seconds)
        db.kill9()

    t = threading.Thread(target=killer)
    t.start()
    i = 0
    try:
        with conn.cursor() as c:
            while True:
                i += 1
                c.execute("INSERT INTO t (id, v) VALUES (%s, REPEAT('x', 200))", (i,))
                acked.append(i)  # the server answered OK: the commit is acknowledged
    except pymysql.err.MySQLError:
        pass
    finally:
        t.join()
        try:
            conn.close()
        except Exception:  # noqa: BLE001
            pass
    return acked


def power_cycle(lz: Lazy, db: Mariadb, settings: dict[str, str], seconds: float) -> tuple[int, int, dict[str, Any]]:
    """(acknowledged, lost, dropped by the layer) of one run: commits, kill -9, power off,
    power on (mount again), recovery, count."""
    db.sql("CREATE DATABASE IF NOT EXISTS pc; DROP TABLE IF EXISTS pc.t; "
           "CREATE TABLE pc.t (id INT PRIMARY KEY, v VARCHAR(255)) ENGINE=InnoDB")
    db.stop()  # the table is durable before the run (a clean shutdown)
    lz.close()
    lz.mount()
    db.start(settings)
    acked = commit_until_killed(db, seconds)
    dropped = lz.poweroff()
    lz.mount()
    db.start({"innodb_flush_log_at_trx_commit": "1"})
    present = {int(x) for x in db.sql("SELECT id FROM pc.t").split()}
    lost = [i for i in acked if i not in present]
    return len(acked), len(lost), dropped


@pytest.fixture
def mariadb(lazy: Lazy) -> Iterator[Mariadb]:
    for exe in ("mariadbd", "mariadb-install-db", "mariadb"):
        if not shutil.which(exe) and not os.path.exists(f"/usr/sbin/{exe}"):
            not_installed(exe, "mariadb-server")
            pytest.fail(f"{exe} is needed for the positive control")
    db = Mariadb(lazy)
    try:
        db.install()
        lazy.mount()
        db.start({})
        yield db
    finally:
        db.kill9()


@pytest.mark.daemons
def test_positive_control_flush_at_commit_2_loses_acknowledged_commits(mariadb: Mariadb, lazy: Lazy,
                                                                        tally: Tally) -> None:
    """The layer must be able to show a loss, or its "0 lost" proves nothing: with
    innodb_flush_log_at_trx_commit=2 the redo log reaches the OS at commit but is synced
    about once a second, so a power cut takes the last commits acknowledged."""
    tries = []
    for _ in range(4):
        acked, lost, dropped = power_cycle(lazy, mariadb, {"innodb_flush_log_at_trx_commit": "2"}, 3.0)
        tries.append((acked, lost, dropped.get("bytes")))
        print(f"flush=2: {acked} acknowledged, {lost} lost, the layer dropped {dropped}")
        tally.check(acked > 100, f"too few commits to judge: {tries}")
        if lost:
            break
    assert any(lost for _a, lost, _b in tries), f"no acknowledged commit lost with flush=2 in {tries}"
    assert all(b for _a, _l, b in tries), f"the layer dropped nothing: {tries}"


@pytest.mark.daemons
def test_with_the_templates_durability_no_acknowledged_commit_is_lost(mariadb: Mariadb, lazy: Lazy,
                                                                      tally: Tally) -> None:
    settings = template_durability()
    assert settings == {"innodb_flush_log_at_trx_commit": "1", "sync_binlog": "1", "innodb_doublewrite": "1"}, \
        f"{TEMPLATE.name} sets {settings}"
    tally.expect(3)
    for _ in range(3):
        acked, lost, dropped = power_cycle(lazy, mariadb, settings, 3.0)
        print(f"template settings: {acked} acknowledged, {lost} lost, the layer dropped {dropped}")
        tally.check(acked > 100 and lost == 0, f"{lost} of {acked} acknowledged commits lost (dropped {dropped})")
        assert dropped.get("bytes"), f"the layer dropped nothing, so the run proves nothing: {dropped}"


def test_a_data_hosts_volume_layer_across_restarts_power_off_and_down(tally: Tally) -> None:
    """hosts.volume_start before each (re)start (mounted once, reused), volume_power_off
    drops what was not synced, the next start mounts it again, cleanup (down) unmounts."""
    from rehearsal import hosts as H

    if not _fuse_ready():
        pytest.fail("fusermount3 is needed to unmount the layer")
    wd = Path(tempfile.mkdtemp(prefix="lazyfs-wd-", dir="/var/tmp"))
    host = type("Th", (), {"data_gb": 20})()
    layout = type("L", (), {"topo": type("T", (), {"host": lambda self, n: host})(),
                            "hostdir": lambda self, n: wd / "hosts" / n})()
    h = type("RH", (), {"name": "data-1", "roles": ["data"]})()
    d = wd / "hosts" / "data-1"
    try:
        H.volume_start(layout, h)  # type: ignore[arg-type]
        pid = int((d / H.LAZY_PID).read_text())
        H.volume_start(layout, h)  # type: ignore[arg-type]
        tally.check(int((d / H.LAZY_PID).read_text()) == pid, "a running layer is reused")
        with open(d / H.LAZY_DIR / "f", "wb") as f:
            f.write(b"unsynced")
        dropped = H.volume_power_off(layout, "data-1")  # type: ignore[arg-type]
        tally.check(dropped["bytes"] == 8 and (d / "volume" / "f").read_bytes() == b"", str(dropped))
        tally.check(not lazyfs.mounted(d / H.LAZY_DIR))
        H.volume_start(layout, h)  # type: ignore[arg-type]
        tally.check(lazyfs.mounted(d / H.LAZY_DIR) and int((d / H.LAZY_PID).read_text()) != pid)
        done = H.cleanup(wd)
        tally.check(not lazyfs.mounted(d / H.LAZY_DIR) and any("layer unmounted" in x for x in done), str(done))
        tally.expect(5)
    finally:
        H.volume_stop(d)
        shutil.rmtree(wd, ignore_errors=True)
