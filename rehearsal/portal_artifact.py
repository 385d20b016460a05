"""The reference portal (examples/reference-portal) deployed the way a user ships theirs:
through the program's `git` artifact kind, so hpc-portal-fetch-app, the artifact's
install step and the hpc-portal-* units run on the hosts as in production.

    built = ensure_built()           build.sh once per content hash of the portal's sources,
                                     cached in CACHE/<hash>/ (outside the checkout)
    publish(layout, built) -> dict   the release on the EFS stand-in: the app artifact as
                                     the tag release-<id> of a bare repository at
                                     /dist/git/portal.git, the frontend in /dist/releases/<id>
                                     with /dist/current flipped to it; returns the config
                                     overlay {app: {artifact: {kind: git, url, ref}}}
    add_user(layout, ...)            the browser's login, set on one app host with the
                                     artifact's own `hpc-portal-service add-user`

`python -m rehearsal up|run` does the three (the default; `--portal standin` runs the
standard library's stand-in instead); the load generator logs in with the same account.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "examples" / "reference-portal"
CACHE = Path(os.environ.get("HPC_REHEARSAL_PORTAL_CACHE", "/var/cache/hpc-rehearsal/portal"))
GIT_URL = "file:///dist/git/portal.git"  # the bare repository on the EFS stand-in, as hosts see it
USER = "rehearsal"
SKIP = {"__pycache__", "node_modules", "build", ".vite"}


class PortalArtifactError(RuntimeError):
    pass


def source_files() -> list[Path]:
    out = []
    for p in sorted(SOURCE.rglob("*")):
        rel = p.relative_to(SOURCE)
        if p.is_file() and not (set(rel.parts) & SKIP) and rel.parts[0] != "README.md":
            out.append(p)
    return out


def source_hash() -> str:
    h = hashlib.sha256()
    for p in source_files():
        h.update(str(p.relative_to(SOURCE)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def ensure_built(progress: Callable[[str], None] = print) -> Path:
    """CACHE/<hash>/ with app/<id>/, web/releases/<id>/, portal.git and RELEASE (the id).
    Built by build.sh (PyPI and npm on this machine only) when the sources changed."""
    digest = source_hash()
    done = CACHE / digest
    if (done / "RELEASE").is_file():
        return done
    release = f"r{digest[:12]}"
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = CACHE / f".{digest}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    progress(f"reference portal: building release {release} (wheelhouse and frontend; cached in {done})")
    cp = subprocess.run([str(SOURCE / "build.sh"), "--out", str(tmp), "--release", release,
                         "--git-remote", str(tmp / "portal.git")],
                        env=dict(os.environ, PYTHON=sys.executable), capture_output=True, text=True, timeout=1200)
    if cp.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise PortalArtifactError(f"examples/reference-portal/build.sh failed:\n{cp.stderr[-3000:]}")
    (tmp / "RELEASE").write_text(release + "\n")
    try:
        tmp.rename(done)
    except OSError:  # another rehearsal built it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return done


def publish(shared: Path, built: Path) -> dict[str, Any]:
    """Put the release on the EFS stand-in (`shared`, mounted at / on app and web hosts
    as /dist, /data, ...) and return the config overlay that deploys it."""
    release = (built / "RELEASE").read_text().strip()
    dist = shared / "dist"
    repo = dist / "git" / "portal.git"
    shutil.rmtree(repo, ignore_errors=True)
    repo.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(built / "portal.git", repo, symlinks=True)
    web = dist / "releases" / release
    if not web.exists():
        shutil.copytree(built / "web" / "releases" / release, web, symlinks=True)
    link = dist / "current.new"
    link.unlink(missing_ok=True)
    link.symlink_to(f"releases/{release}")
    os.replace(link, dist / "current")
    return {"app": {"artifact": {"kind": "git", "url": GIT_URL, "ref": f"release-{release}"}}}


def add_user(run: Callable[[list[str], int], tuple[int, str]], password: str) -> None:
    """The browser's account, through the artifact's entry point on an app host, with the
    auth service's environment (its unit's: portal.env and the secrets systemd reads)."""
    script = (
        "set -euo pipefail; set -a; . /etc/hpc/portal.env; . /run/hpc/portal-secrets.env; set +a; "
        "export PORTAL_SERVICE=auth DB_NAME=\"$DB_NAME_AUTH\" PORT=0; "
        f"printf '%s\\n' {shlex.quote(password)} | "
        f"runuser -u portal -- /opt/hpc-portal/app/bin/hpc-portal-service add-user {USER}")
    rc, out = run(["bash", "-c", script], 120)
    if rc != 0:
        raise PortalArtifactError(f"add-user {USER} on an app host failed: {out.strip()[-2000:]}")


def lb_certificate(run: Callable[[list[str], int], tuple[int, str]]) -> str:
    """The certificate HAProxy serves at the Elastic IP (its PEM carries the key too: only
    the certificate leaves the host)."""
    rc, out = run(["openssl", "x509", "-in", "/etc/haproxy/certs/portal.pem"], 30)
    if rc != 0 or "BEGIN CERTIFICATE" not in out:
        raise PortalArtifactError(f"reading the LB's certificate failed: {out.strip()[-500:]}")
    return out[out.index("-----BEGIN CERTIFICATE-----"):]


def after_boot(workdir: Path, run_on: Callable[[str, list[str], int], tuple[int, str]], app_host: str,
               lb_host: str) -> dict[str, Any]:
    """The browser's account and trust, recorded in the rehearsal's state as `portal`
    (rehearsal/browser.py's around_fault reads it)."""
    pw_file = workdir / "portal-browser-password"
    password = secrets.token_urlsafe(18)
    pw_file.write_text(password + "\n")
    pw_file.chmod(0o600)
    add_user(lambda argv, t: run_on(app_host, argv, t), password)
    ca = workdir / "portal-lb-cert.pem"
    ca.write_text(lb_certificate(lambda argv, t: run_on(lb_host, argv, t)))
    return {"kind": "reference", "user": USER, "password_file": str(pw_file), "ca": str(ca)}


if __name__ == "__main__":  # python -m rehearsal.portal_artifact: build (or find) the cached release
    print(json.dumps({"built": str(ensure_built()), "hash": source_hash()}))
