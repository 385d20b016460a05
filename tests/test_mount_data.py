"""hpc-mount-data: finds the attached data disk, formats it only when it has no
filesystem, refuses a foreign filesystem, mounts by label, idempotent; and only hosts
with a data volume run it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from cloud_init.render import render_host
from offline.contexts import contexts
from tests.loadfile import load_file

SCRIPT = Path(__file__).resolve().parent.parent / "cloud_init" / "scripts" / "hpc-mount-data"
mod = load_file(SCRIPT)

GIB = 1024**3


def fake_sys(tmp: Path, disks: dict[str, int], partitions: dict[str, list[str]]) -> Path:
    root = tmp / "sys-block"
    for name, size_gb in disks.items():
        d = root / name
        d.mkdir(parents=True)
        (d / "size").write_text(str(size_gb * GIB // 512))
        for p in partitions.get(name, []):
            (d / p).mkdir()
            (d / p / "partition").write_text("1")
    return root


def mountinfo(tmp: Path, extra: str = "") -> Path:
    p = tmp / "mountinfo"
    p.write_text("22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p1 rw\n" + extra)
    return p


class Runner:
    def __init__(self, blkid: str = ""):
        self.calls: list[list[str]] = []
        self.blkid = blkid

    def __call__(self, cmd):
        self.calls.append(cmd)
        out = self.blkid if cmd[0] == "blkid" else ""
        return subprocess.CompletedProcess(cmd, 0, out, "")


def args(tmp, sysb, mi, size=500):
    return ["--mount", str(tmp / "mnt"), "--size-gb", str(size), "--sys-block", str(sysb), "--mountinfo", str(mi),
            "--fstab", str(tmp / "fstab"), "--timeout", "20"]


def test_formats_a_blank_disk_once_and_mounts_it_by_label(tmp_path, tally):
    sysb = fake_sys(tmp_path, {"nvme0n1": 50, "nvme1n1": 500}, {"nvme0n1": ["nvme0n1p1"]})
    r = Runner()
    tally.check(mod.main(args(tmp_path, sysb, mountinfo(tmp_path)), runner=r, sleep=lambda s: None) == 0)
    tally.check(["mkfs.ext4", "-q", "-L", "hpc-data", "-E", "lazy_itable_init=1", "/dev/nvme1n1"] in r.calls)
    fstab = (tmp_path / "fstab").read_text()
    tally.check(fstab.count("LABEL=hpc-data ") == 1 and "nofail" in fstab)
    r2 = Runner(blkid="DEVNAME=/dev/nvme1n1\nLABEL=hpc-data\nTYPE=ext4\n")
    tally.check(mod.main(args(tmp_path, sysb, mountinfo(tmp_path)), runner=r2, sleep=lambda s: None) == 0)
    tally.check(not any(c[0] == "mkfs.ext4" for c in r2.calls), "an existing filesystem was formatted")
    tally.check((tmp_path / "fstab").read_text() == fstab, "fstab changed on the second run")


def test_refuses_a_foreign_filesystem_and_a_missing_disk(tmp_path, tally):
    sysb = fake_sys(tmp_path, {"nvme0n1": 50, "nvme1n1": 500}, {"nvme0n1": ["nvme0n1p1"]})
    r = Runner(blkid="TYPE=xfs\nLABEL=scratch\n")
    tally.check(mod.main(args(tmp_path, sysb, mountinfo(tmp_path)), runner=r, sleep=lambda s: None) == 2)
    tally.check(not any(c[0] in ("mkfs.ext4", "mount") for c in r.calls))
    waits: list[float] = []
    tally.check(mod.main(args(tmp_path, sysb, mountinfo(tmp_path), size=100), runner=Runner(),
                         sleep=waits.append) == 1)
    tally.check(sum(waits) >= 20, "gave up without waiting")


def test_already_mounted_is_left_alone(tmp_path, tally):
    sysb = fake_sys(tmp_path, {"nvme1n1": 500}, {})
    mi = mountinfo(tmp_path, f"30 22 259:3 / {tmp_path / 'mnt'} rw - ext4 /dev/nvme1n1 rw\n")
    r = Runner()
    tally.check(mod.main(args(tmp_path, sysb, mi), runner=r, sleep=lambda s: None) == 0 and r.calls == [])


def test_only_hosts_with_a_data_volume_mount_one(tally):
    for stack in ("prod", "dev"):
        for name, ctx in contexts(stack).items():
            r = render_host(ctx)
            cmds = [c for c in r.commands if c[0] == "/usr/local/sbin/hpc-mount-data"]
            if ctx["host"]["data_volume"]:
                tally.check(cmds == [["/usr/local/sbin/hpc-mount-data", "--mount", "/var/lib/hpc-data", "--size-gb",
                                      str(ctx["host"]["data_volume"]["size_gb"])]], (name, cmds))
            else:
                tally.check(cmds == [], name)
    tally.check(os.access(SCRIPT, os.X_OK))
