"""A disk that loses what was not fsynced when its power goes: a FUSE passthrough (libfuse3
through mfusepy) over a backing directory, as Jepsen's LazyFS does.

Freezing a host does not stop the kernel's writeback and a copied file is not a
point-in-time image, so neither shows what a power cut does to a database. This layer
does: every write goes through to the backing file at once, but before the first change
of a byte range (or of the size) of a file since that file's last fsync/fdatasync, the
old bytes and the old size are saved (an undo log per file, spilled to disk: a Galera
gcache that is never synced can be a GiB). fsync/fdatasync of a file, and a write through
a descriptor opened O_SYNC/O_DSYNC, make that file's data durable: its undo log is
dropped. "Power off" applies every file's undo log (old bytes back, old size back), so the
backing directory holds only what had been made durable, and unmounts.

Simplifications, on purpose:
- Metadata is durable at once: create, mkdir, rename, unlink, link, symlink, chmod,
  chown, utimens. A file created and never fsynced survives the power cut with size 0
  (its data was never durable); a rename is never undone.
- sync(2)/syncfs(2) are not seen (FUSE does not forward them): only per-file syncs count.
- Nothing is really fsynced on the machine underneath: this layer defines durability.
- O_DIRECT is stripped on the backing descriptor (the backing file system need not take
  it); such writes are unsynced until fsync, like any other (a drive's cache).

Ownership: files, directories, nodes and links are created as the calling process's
uid/gid (fuse_get_context), the parent's gid when the parent is setgid; mounted with
allow_other and default_permissions so the kernel checks permissions as on any disk
(mysql in a container without a user namespace is the same uid here).

    python -m rehearsal.lazyfs mount BACKING MOUNTPOINT --control SOCK [--spill DIR]
    python -m rehearsal.lazyfs poweroff --control SOCK    drop unsynced writes, unmount
    python -m rehearsal.lazyfs status --control SOCK      dirty files and bytes now
    python -m rehearsal.lazyfs umount --control SOCK      a clean shutdown: keep all
    python -m rehearsal.lazyfs stall --control SOCK --seconds N   stop answering (at most N s)
    python -m rehearsal.lazyfs resume --control SOCK      answer again

Stalled, every operation waits (none fails) until `resume` or the stall's N seconds are
over, as on an NFS share mounted `hard` (EFS's mount options) whose server stops
answering: a process touching it blocks in the kernel, killable by SIGKILL only. A FUSE
request the daemon has read is not killable by itself (the kernel waits for its
answer), so a waiting operation watches for the kernel's interrupt of its request
(fuse_interrupted) and ends it with EINTR only when its caller is being killed (SIGKILL
pending, as a fatal signal makes it); any other signal goes on waiting, as on NFS. The
rehearsal's Slurm share goes through this layer with `--durable` (no undo log: nothing
there is ever powered off) for the `efs-stall` drill.

The control socket takes one JSON request per connection ({"op": "poweroff" | "status" |
"umount" | "stall" | "resume"}, "seconds" with stall) and answers one JSON line
(rehearsal/sockcall.py). poweroff answers {"files": N, "bytes": N, "paths": [...]} (what
was dropped); poweroff and umount end a stall first. From Python: start(), poweroff(),
stop(), stall(), resume(), mounted().
"""

from __future__ import annotations

import argparse
import bisect
import errno
import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

SYNC_FLAGS = os.O_SYNC | os.O_DSYNC
STALL_MAX_S = 600.0  # a stall nobody ends is over after this long at most


class Dirty:
    """One file's changes since its last sync: its size then, and the old bytes of every
    range changed since (each range saved once: the first change has the durable bytes),
    kept in a spill file."""

    def __init__(self, fd: int, spill: Path, path: str) -> None:
        self.fd = fd  # O_RDWR on the backing inode: restores reach it even after a rename
        self.orig_size = os.fstat(fd).st_size
        self.spill_path = spill
        self.spill = os.open(spill, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.spill_end = 0
        self.starts: list[int] = []  # covered ranges [start, end), sorted, disjoint
        self.ends: list[int] = []
        self.entries: list[tuple[int, int, int]] = []  # (file offset, length, spill offset)
        self.path = path
        self.changed = False

    def reset(self) -> None:
        """Synced: the file's bytes and size now are the durable ones (the spill file is
        reused: a database file synced at every commit costs no file churn)."""
        self.orig_size = os.fstat(self.fd).st_size
        self.spill_end = 0
        self.starts, self.ends, self.entries = [], [], []
        self.changed = False

    def _uncovered(self, a: int, b: int) -> list[tuple[int, int]]:
        out = []
        i = bisect.bisect_right(self.ends, a)
        pos = a
        while pos < b and i < len(self.starts):
            s, e = self.starts[i], self.ends[i]
            if s >= b:
                break
            if s > pos:
                out.append((pos, s))
            pos = max(pos, e)
            i += 1
        if pos < b:
            out.append((pos, b))
        return out

    def _cover(self, a: int, b: int) -> None:
        i = bisect.bisect_left(self.ends, a)
        j = i
        while j < len(self.starts) and self.starts[j] <= b:
            a, b = min(a, self.starts[j]), max(b, self.ends[j])
            j += 1
        self.starts[i:j] = [a]
        self.ends[i:j] = [b]

    def save(self, a: int, b: int) -> None:
        """Before bytes [a, b) change: keep the durable ones (those below the size at the
        last sync; what lies beyond it goes with the size anyway)."""
        self.changed = True
        b = min(b, self.orig_size)
        if a >= b:
            return
        for x, y in self._uncovered(a, b):
            old = os.pread(self.fd, y - x, x)
            if old:
                os.pwrite(self.spill, old, self.spill_end)
                self.entries.append((x, len(old), self.spill_end))
                self.spill_end += len(old)
            self._cover(x, y)

    def restore(self) -> int:
        """Put the durable bytes and size back; the bytes dropped."""
        st = os.fstat(self.fd)
        if st.st_nlink == 0:  # unlinked since: metadata is durable, the file is gone
            return 0
        dropped = max(0, st.st_size - self.orig_size)
        for off, length, at in reversed(self.entries):
            old = os.pread(self.spill, length, at)
            os.pwrite(self.fd, old, off)
            dropped += length
        os.ftruncate(self.fd, self.orig_size)
        if not dropped and self.changed and st.st_size != self.orig_size:
            dropped = abs(st.st_size - self.orig_size)
        return dropped

    def close(self) -> None:
        for fd in (self.fd, self.spill):
            try:
                os.close(fd)
            except OSError:
                pass
        self.spill_path.unlink(missing_ok=True)


def _caller_killed() -> bool:
    """The kernel interrupted this handler's request and its caller has SIGKILL pending
    (a fatal signal: the process is dying, as a hard NFS wait lets it)."""
    import mfusepy
    from mfusepy import fuse_get_context

    try:
        if not mfusepy._libfuse.fuse_interrupted():
            return False
        _uid, _gid, pid = fuse_get_context()
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("SigPnd:", "ShdPnd:")) and int(line.split()[1], 16) & (1 << (signal.SIGKILL - 1)):
                    return True
    except (OSError, AttributeError, ValueError):
        return False
    return False


def _ops_base() -> type:
    from mfusepy import Operations

    return Operations  # type: ignore[no-any-return]


class LazyOps(_ops_base()):  # type: ignore[misc]
    use_ns = True

    def __init__(self, backing: Path, spill_dir: Path, durable: bool = False) -> None:
        self.root = os.path.realpath(backing)
        self.durable = durable  # every write durable at once: no undo log, power_off drops nothing
        self.spill_dir = spill_dir
        spill_dir.mkdir(parents=True, exist_ok=True)
        self._mu = threading.Lock()  # the tables below
        self.fhs: dict[int, tuple[int, bool, str]] = {}  # fh (backing fd) -> (inode, synchronous writes, path)
        self.dirty: dict[int, Dirty] = {}
        self.clean: dict[int, Dirty] = {}  # synced, kept for reuse while the file is open
        self.opens: dict[int, int] = {}  # inode -> open handles
        self.locks: dict[int, threading.Lock] = {}  # per inode: save + write, sync, restore
        self.off = False
        self.synced_files = 0
        self.synced_bytes = 0
        self._answering = threading.Event()  # cleared while stalled
        self._answering.set()
        self._stall_timer: threading.Timer | None = None
        self.waiting = 0  # operations waiting on the stall now
        self.stalled_ops = 0  # operations that waited on a stall, ever
        self.stalls = 0

    # ---------------------------------------------------------------- helpers
    def _p(self, path: str | None) -> str:
        if path is None:  # a metadata operation on an unlinked file through its handle
            raise OSError(errno.ESTALE, "unlinked")
        return os.path.join(self.root, path.lstrip("/"))

    def _wait_answering(self) -> None:
        if self._answering.is_set():
            return
        with self._mu:
            self.waiting += 1
            self.stalled_ops += 1
        try:
            while not self._answering.wait(0.2):
                if _caller_killed():
                    raise OSError(errno.EINTR, "interrupted: the caller is being killed")
        finally:
            with self._mu:
                self.waiting -= 1

    def _alive(self) -> None:
        self._wait_answering()
        if self.off:
            raise OSError(errno.EIO, "powered off")

    def _ilock(self, ino: int) -> threading.Lock:
        with self._mu:
            return self.locks.setdefault(ino, threading.Lock())

    def _dirty(self, ino: int, fd: int, path: str) -> Dirty:
        d = self.dirty.get(ino)
        if d is None:
            with self._mu:
                d = self.clean.pop(ino, None)
            if d is not None:
                d.reset()  # the size may have changed since the sync (metadata ops)
                d.path = path
            else:
                rw = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
                d = Dirty(rw, self.spill_dir / f"undo-{ino}", path)
            with self._mu:
                self.dirty[ino] = d
        return d

    def _synced(self, ino: int) -> None:
        with self._mu:
            d = self.dirty.pop(ino, None)
            keep = d is not None and self.opens.get(ino, 0) > 0
            if keep:
                self.clean[ino] = d  # type: ignore[assignment]
        if d is not None:
            self.synced_files += 1
            self.synced_bytes += d.spill_end
            if not keep:
                d.close()

    @staticmethod
    def _owner(parent: str) -> tuple[int, int]:
        from mfusepy import fuse_get_context

        uid, gid, _pid = fuse_get_context()
        try:
            pst = os.stat(parent)
            if pst.st_mode & stat.S_ISGID:
                gid = pst.st_gid
        except OSError:
            pass
        return uid, gid

    # ---------------------------------------------------------------- metadata
    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        self._alive()
        st = os.fstat(fh) if fh is not None and fh in self.fhs else os.lstat(self._p(path))
        return {k: getattr(st, k) for k in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_atime_ns",
                                             "st_mtime_ns", "st_ctime_ns", "st_ino", "st_blocks", "st_rdev")} | {
            "st_atime": st.st_atime_ns, "st_mtime": st.st_mtime_ns, "st_ctime": st.st_ctime_ns}

    def access(self, path: str, amode: int) -> int:
        self._alive()
        return 0  # default_permissions: the kernel checks

    def readdir(self, path: str | None, fh: int) -> list[Any]:
        """Each entry with its inode number and type: with use_ino an entry without one
        (inode 0) is skipped by readdir(3), and `rm -rf` would see an empty directory."""
        self._alive()  # nullpath_ok: the path may be None; the handle is opendir's fd
        where = fh if path is None else self._p(path)
        d = os.stat(where)
        out: list[Any] = [(n, {"st_mode": d.st_mode, "st_ino": d.st_ino}, 0) for n in (".", "..")]
        with os.scandir(where) as it:
            for e in it:
                st = e.stat(follow_symlinks=False)
                out.append((e.name, {"st_mode": st.st_mode, "st_ino": e.inode()}, 0))
        return out

    def readlink(self, path: str) -> str:
        self._alive()
        return os.readlink(self._p(path))

    def statfs(self, path: str) -> dict[str, int]:
        sv = os.statvfs(self._p(path))
        return {k: getattr(sv, k) for k in ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree",
                                             "f_files", "f_flag", "f_frsize", "f_namemax")}

    def chmod(self, path: str | None, mode: int) -> int:
        self._alive()
        if path is None:  # an unlinked file through its handle: nothing of it outlives it
            return 0
        os.chmod(self._p(path), mode)
        return 0

    def chown(self, path: str | None, uid: int, gid: int) -> int:
        self._alive()
        if path is None:  # an unlinked file through its handle: nothing of it outlives it
            return 0
        os.lchown(self._p(path), uid, gid)
        return 0

    def utimens(self, path: str | None, times: tuple[int, int] | None = None) -> int:
        self._alive()
        if path is None:  # an unlinked file through its handle: nothing of it outlives it
            return 0
        os.utime(self._p(path), ns=times, follow_symlinks=False) if times else os.utime(self._p(path),
                                                                                        follow_symlinks=False)
        return 0

    def mkdir(self, path: str, mode: int) -> int:
        self._alive()
        p = self._p(path)
        uid, gid = self._owner(os.path.dirname(p))
        os.mkdir(p, mode)
        os.lchown(p, uid, gid)
        return 0

    def rmdir(self, path: str) -> int:
        self._alive()
        os.rmdir(self._p(path))
        return 0

    def mknod(self, path: str, mode: int, dev: int) -> int:
        self._alive()
        p = self._p(path)
        uid, gid = self._owner(os.path.dirname(p))
        os.mknod(p, mode, dev)
        os.lchown(p, uid, gid)
        return 0

    def symlink(self, target: str, source: str) -> int:
        self._alive()
        p = self._p(target)
        uid, gid = self._owner(os.path.dirname(p))
        os.symlink(source, p)
        os.lchown(p, uid, gid)
        return 0

    def link(self, target: str, source: str) -> int:
        self._alive()
        os.link(self._p(source), self._p(target))
        return 0

    def unlink(self, path: str) -> int:
        self._alive()
        os.unlink(self._p(path))
        return 0

    def rename(self, old: str, new: str) -> int:
        self._alive()
        os.rename(self._p(old), self._p(new))
        return 0

    # ---------------------------------------------------------------- data
    def _open(self, path: str, flags: int, mode: int | None = None) -> int:
        self._alive()
        p = self._p(path)
        # O_DIRECT: not on the backing file; O_APPEND: the kernel gives the offset;
        # O_TRUNC: a size change like any other (saved first).
        bflags = flags & ~(os.O_DIRECT | os.O_APPEND | os.O_TRUNC | os.O_CREAT | os.O_EXCL)
        if mode is not None:
            uid, gid = self._owner(os.path.dirname(p))
            fd = os.open(p, bflags | os.O_CREAT | os.O_EXCL, mode)
            os.fchown(fd, uid, gid)
        else:
            fd = os.open(p, bflags)
        ino = os.fstat(fd).st_ino
        with self._mu:
            self.fhs[fd] = (ino, bool(flags & SYNC_FLAGS), path)
            self.opens[ino] = self.opens.get(ino, 0) + 1
        if flags & os.O_TRUNC and mode is None:
            self._truncate_fd(fd, ino, 0, path)
        return fd

    def open(self, path: str, flags: int) -> int:
        return self._open(path, flags)

    def create(self, path: str, mode: int, flags: int = os.O_WRONLY) -> int:
        return self._open(path, flags, mode)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        self._alive()
        return os.pread(fh, size, offset)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        self._alive()
        ino, sync, opened = self.fhs[fh]
        with self._ilock(ino):
            self._alive()
            if not sync and not self.durable:
                self._dirty(ino, fh, path or opened).save(offset, offset + len(data))
            n = os.pwrite(fh, data, offset)
        if sync:  # O_SYNC/O_DSYNC: durable when write() returns (the whole file's data, as fdatasync)
            with self._ilock(ino):
                self._synced(ino)
        return n

    def _truncate_fd(self, fd: int, ino: int, length: int, path: str) -> None:
        with self._ilock(ino):
            self._alive()
            if self.durable:
                os.ftruncate(fd, length)
                return
            d = self._dirty(ino, fd, path)
            size = os.fstat(fd).st_size
            if length < size:
                d.save(length, size)
            else:
                d.changed = True
            os.ftruncate(d.fd, length)

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        self._alive()
        if fh is not None and fh in self.fhs:  # ftruncate (also of an unlinked file)
            ino, _sync, opened = self.fhs[fh]
            self._truncate_fd(fh, ino, length, path or opened)
            return 0
        if path is None:
            raise OSError(errno.ESTALE, "no path and no handle")
        fd = os.open(self._p(path), os.O_RDONLY)
        try:
            self._truncate_fd(fd, os.fstat(fd).st_ino, length, path)
        finally:
            os.close(fd)
        return 0

    def fallocate(self, path: str, mode: int, offset: int, size: int, fh: int) -> int:
        self._alive()
        if mode != 0:  # keep-size, punch-hole, ...: not offered (callers fall back)
            raise OSError(errno.EOPNOTSUPP, "fallocate mode")
        ino, _sync, opened = self.fhs[fh]
        with self._ilock(ino):
            self._alive()
            if not self.durable:
                self._dirty(ino, fh, path or opened).changed = True
            os.posix_fallocate(fh, offset, size)
        return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        self._alive()
        ino, _sync, _path = self.fhs[fh]
        with self._ilock(ino):
            self._alive()
            self._synced(ino)
        return 0

    def flush(self, path: str, fh: int) -> int:
        self._wait_answering()  # close(2) flushes to an NFS server: it waits on a stall too
        return 0  # not a sync

    def release(self, path: str, fh: int) -> int:
        gone = None
        with self._mu:
            entry = self.fhs.pop(fh, None)
            if entry is not None:
                ino = entry[0]
                self.opens[ino] = self.opens.get(ino, 1) - 1
                if self.opens[ino] <= 0:
                    del self.opens[ino]
                    gone = self.clean.pop(ino, None)
        if gone is not None:
            gone.close()
        os.close(fh)
        return 0

    def opendir(self, path: str) -> int:
        self._alive()
        return os.open(self._p(path), os.O_RDONLY | os.O_DIRECTORY)

    def releasedir(self, path: str | None, fh: int) -> int:
        os.close(fh)
        return 0

    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        return 0

    # ---------------------------------------------------------------- control
    def status(self) -> dict[str, Any]:
        with self._mu:
            dirty = list(self.dirty.values())
            waiting, stalled_ops = self.waiting, self.stalled_ops
        return {"dirty_files": sum(1 for d in dirty if d.changed), "saved_bytes": sum(d.spill_end for d in dirty),
                "synced_files": self.synced_files, "off": self.off, "durable": self.durable,
                "stalled": not self._answering.is_set(), "waiting": waiting, "stalled_ops": stalled_ops,
                "stalls": self.stalls}

    def stall(self, seconds: float) -> dict[str, Any]:
        """Stop answering: every operation waits until resume() or `seconds` have passed."""
        if not 0 < seconds <= STALL_MAX_S:
            raise ValueError(f"stall seconds must be in (0, {STALL_MAX_S:.0f}], got {seconds}")
        with self._mu:
            if self._stall_timer is not None:
                self._stall_timer.cancel()
            self._stall_timer = threading.Timer(seconds, self.resume)
            self._stall_timer.daemon = True
            self.stalls += 1
        self._answering.clear()
        self._stall_timer.start()
        return self.status()

    def resume(self) -> dict[str, Any]:
        with self._mu:
            if self._stall_timer is not None:
                self._stall_timer.cancel()
                self._stall_timer = None
        self._answering.set()
        return self.status()

    def power_off(self) -> dict[str, Any]:
        """Every unsynced write is dropped; nothing is served after."""
        self.off = True
        self.resume()  # waiting operations end (with EIO)
        with self._mu:
            inos = sorted(self.dirty)
        files, total, paths = 0, 0, []
        for ino in inos:
            with self._ilock(ino):
                with self._mu:
                    d = self.dirty.pop(ino, None)
                if d is None:
                    continue
                n = d.restore() if d.changed else 0
                if n:
                    files += 1
                    total += n
                    paths.append(d.path)
                d.close()
        with self._mu:
            clean, self.clean = list(self.clean.values()), {}
        for d in clean:
            d.close()
        return {"files": files, "bytes": total, "paths": sorted(paths)[:50]}


# -------------------------------------------------------------------- the daemon
def _fusermount() -> str:
    return shutil.which("fusermount3") or "/usr/bin/fusermount3"


def _unmount(mountpoint: str) -> None:
    if subprocess.run([_fusermount(), "-u", mountpoint], capture_output=True).returncode != 0:
        subprocess.run([_fusermount(), "-u", "-z", mountpoint], capture_output=True)


def _serve(ops: LazyOps, sock_path: Path, mountpoint: str, report: Path | None) -> None:
    sock_path.unlink(missing_ok=True)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(sock_path))
    os.chmod(sock_path, 0o600)
    srv.listen(8)
    while True:
        conn, _ = srv.accept()
        with conn:
            data = b""
            while not data.endswith(b"\n"):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
            try:
                req = json.loads(data or b"{}")
                op = req.get("op")
            except (ValueError, AttributeError):
                req, op = {}, None
            if op == "status":
                out: dict[str, Any] = {**ops.status(), "mounted": mounted(mountpoint)}
            elif op == "stall":
                try:
                    out = ops.stall(float(req.get("seconds", 0)))
                except (TypeError, ValueError) as e:
                    out = {"error": str(e)}
            elif op == "resume":
                out = ops.resume()
            elif op == "poweroff":
                out = {"dropped": ops.power_off()}
                if report:
                    report.write_text(json.dumps(out) + "\n")
            elif op == "umount":
                ops.resume()
                out = {"dropped": None}
            else:
                out = {"error": f"unknown op {op!r}"}
            conn.sendall((json.dumps(out) + "\n").encode())
        if op in ("poweroff", "umount"):
            _unmount(mountpoint)
            return


def serve(backing: Path, mountpoint: Path, control: Path, spill: Path | None = None,
          report: Path | None = None, durable: bool = False) -> None:
    import mfusepy

    class FUSE(mfusepy.FUSE):  # type: ignore[misc]
        """ftruncate reaches the operations with its handle (mfusepy passes only the
        path, which is None for an unlinked file)."""

        def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
            fh = fip.contents.fh if fip else None
            return int(self.operations.truncate(None if path is None else path.decode(self.encoding, self.errors),
                                                length, fh) or 0)

    os.umask(0)
    spill = spill or control.parent / f"{control.name}.spill"
    if spill.exists():
        shutil.rmtree(spill)
    ops = LazyOps(backing, spill, durable)
    t = threading.Thread(target=_serve, args=(ops, control, str(mountpoint), report), daemon=True)
    t.start()
    try:
        FUSE(ops, str(mountpoint), foreground=True, nothreads=False, allow_other=True, default_permissions=True,
             use_ino=True, fsname=f"lazyfs:{backing}", subtype="lazyfs")
    finally:
        control.unlink(missing_ok=True)
        shutil.rmtree(spill, ignore_errors=True)


# -------------------------------------------------------------------- callers
def _target(mountpoint: Path | str) -> str:
    """The mountpoint's real path without a stat of the mountpoint itself: that would be
    a request to the layer, which waits while it is stalled (and deadlocks the layer's
    own control thread)."""
    p = os.path.abspath(mountpoint)
    return os.path.join(os.path.realpath(os.path.dirname(p)), os.path.basename(p))


def _mount_line(mountpoint: Path | str) -> list[str] | None:
    target = _target(mountpoint)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == target and " fuse.lazyfs " in line:
                return fields
    return None


def mounted(mountpoint: Path | str) -> bool:
    return _mount_line(mountpoint) is not None


def connection(mountpoint: Path | str) -> str | None:
    """The FUSE connection's name under /sys/fs/fuse/connections (the mount's device
    minor), while it is mounted."""
    fields = _mount_line(mountpoint)
    return fields[2].split(":")[1] if fields else None


def abort_connection(conn: str) -> bool:
    """Abort a FUSE connection whose daemon cannot end (a thread of it waiting on its own
    stalled mount): every request waiting on it fails, so every process ends. True if
    it was there."""
    base = Path("/sys/fs/fuse/connections")
    ours = False
    if not (base / conn).exists() and not os.path.ismount(base):
        ours = subprocess.run(["mount", "-t", "fusectl", "fusectl", str(base)], capture_output=True).returncode == 0
    try:
        (base / conn / "abort").write_text("1")
        return True
    except OSError:
        return False
    finally:
        if ours:
            subprocess.run(["umount", str(base)], capture_output=True)


def call(control: Path, op: str, timeout: float = 120, **args: Any) -> dict[str, Any]:
    from .sockcall import call as sockcall

    return dict(sockcall(control, {"op": op, **args}, timeout) or {})


def stall(control: Path, seconds: float) -> dict[str, Any]:
    """The layer stops answering for `seconds` at most (resume() ends it sooner)."""
    out = call(control, "stall", 30, seconds=seconds)
    if out.get("error") or not out.get("stalled"):
        raise RuntimeError(f"lazyfs {control}: stall refused: {out}")
    return out


def resume(control: Path) -> dict[str, Any]:
    return call(control, "resume", 30)


def start(backing: Path, mountpoint: Path, control: Path, log: Path, python: str = sys.executable,
          timeout: float = 30, durable: bool = False) -> int:
    """Mount the layer (a daemon in its own session); returns its pid once it answers."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    if mounted(mountpoint):
        raise RuntimeError(f"{mountpoint} is already a lazyfs mount")
    repo = Path(__file__).resolve().parents[1]
    with open(log, "ab") as out:
        p = subprocess.Popen([python, "-m", "rehearsal.lazyfs", "mount", str(backing), str(mountpoint),
                              "--control", str(control), *(["--durable"] if durable else [])], cwd=str(repo), stdin=subprocess.DEVNULL, stdout=out,
                             stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise RuntimeError(f"lazyfs on {mountpoint} exited {p.returncode}: "
                               f"{log.read_text(errors='replace')[-1500:]}")
        if mounted(mountpoint) and control.exists():
            try:
                call(control, "status", 5)
                return p.pid
            except OSError:
                pass
        time.sleep(0.05)
    p.kill()
    p.wait()
    _unmount(str(mountpoint))
    raise RuntimeError(f"lazyfs on {mountpoint}: not mounted after {timeout} s")


def _wait_gone(pid: int | None, mountpoint: Path, timeout: float) -> None:
    conn = connection(mountpoint)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = False
        if pid:
            try:
                os.kill(pid, 0)
                alive = Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
            except (OSError, IndexError):
                alive = False
        if not alive and not mounted(mountpoint):
            return
        time.sleep(0.05)
    if pid:
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    _unmount(str(mountpoint))
    if pid and conn:  # killed, but a thread of it may wait on its own mount: abort the connection
        for _ in range(50):
            try:
                if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z" and \
                        len(os.listdir(f"/proc/{pid}/task")) <= 1:
                    return
            except (OSError, IndexError):
                return
            time.sleep(0.1)
        abort_connection(conn)


def poweroff(control: Path, mountpoint: Path, pid: int | None = None, timeout: float = 120) -> dict[str, Any]:
    """Drop every unsynced write, unmount; what was dropped ({"files", "bytes", "paths"})."""
    out = call(control, "poweroff", timeout)
    _wait_gone(pid, mountpoint, 30)
    return dict(out.get("dropped") or {})


def stop(control: Path, mountpoint: Path, pid: int | None = None) -> None:
    """A clean unmount (everything written stays); also when the daemon is gone already."""
    try:
        if control.exists():
            call(control, "umount", 30)
    except (OSError, ValueError):
        pass
    _wait_gone(pid, mountpoint, 15)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rehearsal.lazyfs", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("mount", help="mount BACKING at MOUNTPOINT (foreground)")
    m.add_argument("backing", type=Path)
    m.add_argument("mountpoint", type=Path)
    m.add_argument("--control", type=Path, required=True, help="the control socket")
    m.add_argument("--spill", type=Path, help="where undo logs go (default: beside the socket)")
    m.add_argument("--report", type=Path, help="write poweroff's answer here too")
    m.add_argument("--durable", action="store_true", help="every write durable at once (no undo log)")
    for name in ("poweroff", "status", "umount", "stall", "resume"):
        c = sub.add_parser(name)
        c.add_argument("--control", type=Path, required=True)
        if name == "stall":
            c.add_argument("--seconds", type=float, required=True, help=f"at most {STALL_MAX_S:.0f}")
    a = ap.parse_args(argv)
    if a.cmd == "mount":
        logging.basicConfig(level=logging.WARNING)
        serve(a.backing, a.mountpoint, a.control, a.spill, a.report, a.durable)
        return 0
    print(json.dumps(call(a.control, a.cmd, **({"seconds": a.seconds} if a.cmd == "stall" else {}))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
