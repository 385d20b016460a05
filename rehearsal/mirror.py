"""The package mirror stand-in: what a host's apt reaches through its NAT gateway on AWS.

The hosts never reach the registries. The rehearsal serves, from the AWS stand-ins'
namespace at MIRROR_IP, a flat Debian repository built from the very .deb files the
host image was built from (rehearsal/image.py keeps them in its cache), so cloud-init's
`package_update` and `packages` run for real against it:

    deb [trusted=yes] http://<MIRROR_IP>/debian ./      (the host's /etc/apt/sources.list)

Grafana is not packaged in Debian; the monitoring tier installs it from Grafana's own
repository. The mirror carries an honestly labelled placeholder package named `grafana`
(see PLACEHOLDERS): it installs the grafana-server unit with a small HTTP server that
answers Grafana's health endpoint and says what it is. It proves the unit, its drop-in
and the provisioning files are in place, not Grafana itself.

    ensure(debs_dir) -> Path     the repository directory (rebuilt when the debs change)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

CACHE = Path("/var/cache/hpc-rehearsal/mirror")

PLACEHOLDER_VERSION = "0~rehearsal1"
GRAFANA_SERVER = r'''#!/usr/bin/python3
"""REHEARSAL PLACEHOLDER for grafana-server: Grafana is not packaged in Debian and its
vendor repository is out of reach in the rehearsal. Answers Grafana's health endpoint
(/api/health) on :3000 so the monitoring host's unit, drop-in and checks run; serves
nothing else."""
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT = 3000


class H(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.startswith("/api/health"):
            body = json.dumps({"database": "ok", "version": "rehearsal-placeholder",
                               "note": "not Grafana: a placeholder (rehearsal/mirror.py)"}).encode()
            self.send_response(200)
        else:
            body = b"grafana placeholder (rehearsal): Grafana is not packaged in Debian\n"
            self.send_response(404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


print("grafana-server: REHEARSAL PLACEHOLDER (not Grafana)", file=sys.stderr, flush=True)
ThreadingHTTPServer(("0.0.0.0", PORT), H).serve_forever()
'''
GRAFANA_UNIT = """[Unit]
Description=Grafana (REHEARSAL PLACEHOLDER: not Grafana, see /usr/sbin/grafana-server)
After=network-online.target

[Service]
User=grafana
Group=grafana
ExecStart=/usr/sbin/grafana-server
Restart=on-failure

[Install]
WantedBy=multi-user.target
"""
GRAFANA_POSTINST = """#!/bin/sh
set -e
if [ "$1" = configure ]; then
    getent group grafana >/dev/null || addgroup --system grafana
    getent passwd grafana >/dev/null || adduser --system --ingroup grafana --home /usr/share/grafana \\
        --no-create-home --disabled-login grafana
    mkdir -p /etc/grafana /var/lib/grafana /var/log/grafana
    chown grafana:grafana /var/lib/grafana /var/log/grafana
fi
"""


def _placeholder_grafana(out: Path) -> Path:
    """A .deb named grafana that says on every surface it is a placeholder."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "pkg"
        (root / "DEBIAN").mkdir(parents=True)
        (root / "usr/sbin").mkdir(parents=True)
        (root / "lib/systemd/system").mkdir(parents=True)
        (root / "usr/share/doc/grafana").mkdir(parents=True)
        (root / "usr/sbin/grafana-server").write_text(GRAFANA_SERVER)
        os.chmod(root / "usr/sbin/grafana-server", 0o755)
        (root / "lib/systemd/system/grafana-server.service").write_text(GRAFANA_UNIT)
        (root / "usr/share/doc/grafana/README.rehearsal").write_text(
            "This is not Grafana. The HPC portal rehearsal installs this placeholder because Grafana is\n"
            "not packaged in Debian and its vendor repository is out of reach in the rehearsal.\n")
        (root / "DEBIAN/control").write_text(
            f"Package: grafana\nVersion: {PLACEHOLDER_VERSION}\nArchitecture: all\nMaintainer: HPC portal rehearsal\n"
            "Depends: python3, adduser\nSection: misc\nPriority: optional\n"
            "Description: REHEARSAL PLACEHOLDER for Grafana (not Grafana)\n"
            " Answers Grafana's /api/health on :3000 so the monitoring host's unit and checks run.\n")
        (root / "DEBIAN/postinst").write_text(GRAFANA_POSTINST)
        os.chmod(root / "DEBIAN/postinst", 0o755)
        deb = out / f"grafana_{PLACEHOLDER_VERSION}_all.deb"
        subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root), str(deb)], check=True,
                       capture_output=True)
    return deb


def ensure(debs_dir: Path, cache: Path = CACHE) -> Path:
    """The flat repository of every .deb in `debs_dir` plus the placeholders; rebuilt only
    when that set of files changes. Returns the directory holding `debian/`."""
    debs = sorted(p for p in Path(debs_dir).glob("*.deb"))
    if not debs:
        raise FileNotFoundError(f"no .deb files in {debs_dir}: build the host image first (python -m rehearsal.image build)")
    key = hashlib.sha256("\n".join(f"{p.name}:{p.stat().st_size}" for p in debs).encode()).hexdigest()[:16]
    top = cache / key
    repo = top / "debian"
    if (repo / "Packages").exists():
        return top
    tmp = cache / f".build-{key}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "debian").mkdir(parents=True)
    for p in debs:
        try:
            os.link(p, tmp / "debian" / p.name)
        except OSError:
            shutil.copyfile(p, tmp / "debian" / p.name)
    _placeholder_grafana(tmp / "debian")
    packages = subprocess.run(["dpkg-scanpackages", "--multiversion", ".", "/dev/null"], cwd=tmp / "debian",
                              check=True, capture_output=True).stdout
    (tmp / "debian" / "Packages").write_bytes(packages)
    cache.mkdir(parents=True, exist_ok=True)
    if top.exists():
        shutil.rmtree(tmp)
    else:
        os.rename(tmp, top)
    return top
