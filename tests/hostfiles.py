"""A host's files as the manifests list them, and a root to check its units in.

Read from the manifests' YAML directly (not through the renderer), so the tests that use
them check the manifests themselves."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from cloud_init.templating import SCRIPTS, TEMPLATES, render_template


def manifest(tier: str) -> dict[str, Any]:
    return dict(yaml.safe_load((TEMPLATES / tier / "manifest.yaml").read_text()))


def host_files(ctx: dict[str, Any], tiers: tuple[str, ...]) -> dict[str, tuple[bytes, int]]:
    """dest -> (content, mode) of this host's files from the given tiers' manifests."""
    roles = set(ctx["host"]["roles"])
    out: dict[str, tuple[bytes, int]] = {}
    for tier in tiers:
        for e in manifest(tier)["files"]:
            if "all" not in e["roles"] and not roles & set(e["roles"]):
                continue
            data = render_template(e["src"], ctx).encode() if "src" in e else (SCRIPTS / e["script"]).read_bytes()
            out[e["dest"]] = (data, int(e["mode"], 8))
    return out


def fake_root(tmp: Path, files: dict[str, tuple[bytes, int]], executables: tuple[str, ...] = ()) -> Path:
    """A root with the distribution's units, the host's files and stand-ins for binaries
    the OS provides, for `systemd-analyze verify --root`."""
    root = tmp / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    for dest, (data, mode) in files.items():
        p = root / dest.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        p.chmod(mode)
    for exe in executables:
        p = root / exe.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("#!/bin/sh\n")
        p.chmod(0o755)
    return root


def verify_units(root: Path, units: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify", f"--root={root}", *units], capture_output=True, text=True,
                          timeout=timeout)
