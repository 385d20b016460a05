"""Rehearsal hosts under real systemd: what the rehearsal adds to a host's disk (and what
it must not), the enablement apt would leave for preinstalled packages, the package
mirror stand-in, and how the drills' operations map onto systemctl."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from rehearsal import hosts as HS
from rehearsal import mirror
from rehearsal.layout import ENDPOINT_IP, MIRROR_IP, build_layout


def test_a_hosts_disk_carries_the_rehearsal_only_values_and_no_secret() -> None:
    layout = build_layout("prod", onprem="none")
    h = layout.host("data-1")
    files = HS.host_files(layout, h)
    assert files["/etc/hpc/aws-endpoint"].strip() == f"http://{ENDPOINT_IP}:443"
    assert f"http://{MIRROR_IP}/debian ./" in files["/etc/apt/sources.list"]
    assert f"{h.ip} data-1.{layout.cfg.domain} data-1" in files["/etc/hosts"]
    assert json.loads(files["/etc/hpc/memory-override.json"]) == {"total_mib": h.memory_mib}
    blob = "".join(files.values()).lower()
    assert "password" not in blob and "secret" not in blob and "begin" not in blob
    assert set(files) == {"/etc/hosts", "/etc/resolv.conf", "/etc/hpc/memory-override.json", "/etc/hpc/aws-endpoint",
                          "/etc/apt/sources.list"}


def test_the_file_systems_name_resolves_to_its_mount_target(tmp_path: Path) -> None:
    """What the VPC's resolver does for EFS: without it hpc-mount-efs waits minutes for a
    name nothing here answers."""
    from rehearsal.layout import EFS_IP

    layout = build_layout("prod", tmp_path, onprem="none")
    (tmp_path / "deploy.json").write_text(json.dumps({"efs": {"dns_name": "fs-1.efs.ap-northeast-2.amazonaws.com"}}))
    hosts = HS.host_files(layout, layout.host("app-1"))["/etc/hosts"]
    assert any(line.startswith(EFS_IP + " ") and "fs-1.efs.ap-northeast-2.amazonaws.com" in line
               for line in hosts.splitlines())


def _fake_image(tmp: Path) -> Path:
    root = tmp / "root"
    info = root / "var/lib/dpkg/info"
    info.mkdir(parents=True)
    units = root / "lib/systemd/system"
    units.mkdir(parents=True)
    (units / "redis-server.service").write_text("[Service]\nExecStart=/x\n[Install]\nWantedBy=multi-user.target\n")
    (units / "redis-server@.service").write_text("[Service]\nExecStart=/x\n")
    (units / "fstrim.timer").write_text("[Install]\nWantedBy=timers.target\n")
    (info / "redis-server.list").write_text("/lib/systemd/system/redis-server.service\n"
                                            "/lib/systemd/system/redis-server@.service\n/usr/bin/redis-server\n")
    (info / "util-linux:amd64.list").write_text("/lib/systemd/system/fstrim.timer\n")
    (root / "var/lib/dpkg/status").write_text(
        "Package: redis-server\nStatus: install ok installed\nDepends: redis-tools\n\n"
        "Package: redis-tools\nStatus: install ok installed\n\n"
        "Package: nginx\nStatus: install ok installed\nDepends: nginx-common\n\n"
        "Package: nginx-common\nStatus: install ok installed\n\n"
        "Package: util-linux\nStatus: install ok installed\n")
    (units / "nginx.service").write_text("[Install]\nWantedBy=multi-user.target\n")
    (info / "nginx-common.list").write_text("/lib/systemd/system/nginx.service\n")
    (info / "nginx.list").write_text("/usr/sbin/nginx\n")
    (tmp / ".hpc-image.json").write_text(json.dumps(
        {"disabled_after_tiers": ["redis-server.service", "fstrim.timer", "nginx.service"]}))
    return root


def test_units_the_hosts_packages_enable_are_enabled_as_apt_would(tmp_path: Path) -> None:
    root = _fake_image(tmp_path)
    assert HS.package_enabled_units(root, ["redis-server"]) == {"redis-server.service": "multi-user.target"}
    assert HS.package_enabled_units(root, ["util-linux"]) == {"fstrim.timer": "timers.target"}
    # A unit of a dependency (nginx -> nginx-common's nginx.service), as apt enables it.
    assert HS.package_enabled_units(root, ["nginx"]) == {"nginx.service": "multi-user.target"}
    # A package the image does not hold is installed for real at boot (grafana: the mirror).
    assert HS.package_enabled_units(root, ["grafana"]) == {}


def test_the_mirror_serves_the_image_debs_and_an_honest_grafana_placeholder(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN/control").write_text("Package: hpc-test\nVersion: 1.0\nArchitecture: all\nMaintainer: t\n"
                                        "Description: test\n")
    debs = tmp_path / "debs"
    debs.mkdir()
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(pkg), str(debs / "hpc-test_1.0_all.deb")],
                   check=True, capture_output=True)
    top = mirror.ensure(debs, cache=tmp_path / "cache")
    packages = (top / "debian" / "Packages").read_text()
    stanzas = {s.split("\n", 1)[0]: s for s in packages.strip().split("\n\n")}
    assert set(stanzas) == {"Package: hpc-test", "Package: grafana"}
    assert "REHEARSAL PLACEHOLDER" in stanzas["Package: grafana"]
    assert (top / "debian" / "hpc-test_1.0_all.deb").exists()
    assert mirror.ensure(debs, cache=tmp_path / "cache") == top  # cached by the set of debs
    with pytest.raises(FileNotFoundError, match="no .deb files"):
        mirror.ensure(tmp_path / "empty", cache=tmp_path / "cache")


def test_the_drills_operations_are_systemctls(monkeypatch: pytest.MonkeyPatch) -> None:
    layout = build_layout("prod", onprem="none")
    ran: list[list[str]] = []

    def fake_run(_layout: Any, host: str, argv: list[str], timeout: float = 120) -> tuple[int, str]:
        ran.append(argv)
        if argv[:2] == ["systemctl", "is-system-running"]:
            return 0, "running\n"
        if argv[:2] == ["systemctl", "list-units"]:
            return 0, "mariadb.service loaded active running MariaDB\nredis-server.service loaded failed failed Redis\n"
        return 0, ""

    monkeypatch.setattr(HS, "run", fake_run)
    st = HS.call(layout, "data-1", {"op": "status"})
    assert st["boot_done"] and st["units"]["mariadb.service"]["state"] == "active"
    assert st["units"]["redis-server.service"]["state"] == "failed"
    ran.clear()
    HS.call(layout, "data-1", {"op": "kill", "unit": "redis-server.service", "signal": 9, "hold": True})
    assert "Restart=no" in ran[0][-1] and "daemon-reload" in ran[0][-1]
    assert ran[1] == ["systemctl", "kill", "--signal=9", "redis-server.service"]
    ran.clear()
    HS.call(layout, "data-1", {"op": "hold", "unit": "redis-server.service", "hold": False})
    assert ran[0][-1].startswith("rm -f /run/systemd/system/redis-server.service.d/")
    HS.call(layout, "data-1", {"op": "systemctl", "argv": ["start", "redis-server.service"]})
    assert ran[-1] == ["systemctl", "start", "redis-server.service"]
    with pytest.raises(HS.HostError, match="unknown operation"):
        HS.call(layout, "data-1", {"op": "nope"})


def test_cloud_init_status_is_read_with_or_without_a_line_break_after_the_wait_dots() -> None:
    """`cloud-init status --wait --long` prints a dot per poll: 22.4 (Debian 12) ends
    them with a line break, 25.x (Debian 13) writes "status:" right after them (the first
    OS=debian-13 boot reported every host's cloud-init as "unknown")."""
    old = "......\nstatus: done\nextended_status: done\n"
    new = "..........status: done\nextended_status: done\n"
    assert HS._cloud_init_status(old) == HS._cloud_init_status(new) == "done"
    assert HS._cloud_init_status("....status: error\n") == "error"
    assert HS._cloud_init_status("nothing here\n") == "unknown"


@pytest.mark.parametrize(("status", "units"), [
    # cloud-init 22.4 (Debian 12)
    ("status: error\nerrors:\n  ('apt-configure', ValueError(\"Failed to import key "
     "'B53AE77BADB630A683046005963FA27710458545' from keyserver 'keyserver.ubuntu.com' after 3 tries\"))\n",
     ["cloud-config.service"]),
    # cloud-init 25.x (Debian 13, measured): tab-dash items, summary lines, and one more failed unit
    ("status: error\nerrors:\n\t- ('apt-configure', ValueError(\"Failed to import key "
     "'B53AE77BADB630A683046005963FA27710458545' from keyserver 'keyserver.ubuntu.com' after 3 tries\"))\n"
     "\t- Failed due to systemd unit failure.\nERROR:\n\t- Failed to obtain gpg key B53AE77BADB630A683046005963FA27710458545\n",
     ["cloud-config.service", "cloud-init-main.service"]),
])
def test_the_accepted_grafana_key_error_is_named_on_both_cloud_init_versions(
        monkeypatch: pytest.MonkeyPatch, status: str, units: list[str]) -> None:
    answers = {"systemctl": "degraded\n", "cloud-init": status}
    monkeypatch.setattr(HS, "run", lambda layout, host, argv, timeout=0: (0, answers[argv[0]]))
    monkeypatch.setattr(HS, "_failed_units", lambda layout, host: units)
    st = HS.host_state(None, "mon-1")  # type: ignore[arg-type]
    assert st["ok"] and st["accepted"] == ["apt-configure: Grafana's key from keyserver.ubuntu.com"], st
    assert st["errors"] == []
    # ... and any other error is not accepted
    answers["cloud-init"] = status + "\t- ('runcmd', RuntimeError('boom'))\n"
    st = HS.host_state(None, "mon-1")  # type: ignore[arg-type]
    assert not st["ok"] and st["errors"] == ["('runcmd', RuntimeError('boom'))"], st
