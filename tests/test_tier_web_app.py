"""Web and app tiers: nginx serving the built frontends, and the portal services (one
systemd unit per port) with their environment and secrets.

Checkers: nginx -t and a real nginx in a namespace (the full /etc/nginx tree this
project installs is bind-mounted over /etc/nginx there, so nothing on this machine is
read or written), systemd-analyze verify (throw-away root), shellcheck, the scripts run
for real against temporary directories. Each checker has a broken twin it rejects.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jinja2
import pytest

from cloud_init.render import environment_file
from cloud_init.templating import TEMPLATES, render_template
from offline.contexts import contexts
from tests import hostfiles
from tests.hostfiles import manifest
from tests.nsrun import can_isolate, run_isolated

needs_ns = pytest.mark.skipif(not can_isolate(), reason="needs root and unshare for namespaces")

ALL = [(s, n, c) for s in ("prod", "dev") for n, c in contexts(s).items()]
WEB = [(s, n, c) for s, n, c in ALL if "web" in c["host"]["roles"]]
APP = [(s, n, c) for s, n, c in ALL if "app" in c["host"]["roles"]]
WEB_IDS = [f"{s}-{n}" for s, n, _ in WEB]
APP_IDS = [f"{s}-{n}" for s, n, _ in APP]


def test_the_stacks_have_web_and_app_hosts() -> None:
    # The parametrized tests below must not run zero times.
    assert {s for s, _, _ in WEB} == {s for s, _, _ in APP} == {"prod", "dev"}
    assert len(WEB) >= 4 and len(APP) >= 4




def with_artifact(ctx: dict[str, Any], artifact: dict[str, Any] | None) -> dict[str, Any]:
    c = copy.deepcopy(ctx)
    c["app"] = {"artifact": artifact}
    return c


# ---- nginx ------------------------------------------------------------------------------


def nginx_tree(tmp: Path, ctx: dict[str, Any], site: str | None = None) -> dict[str, str]:
    """/etc/nginx as this project installs it, plus empty log/lib/run dirs; returns binds."""
    etc = tmp / "etc-nginx"
    (etc / "conf.d").mkdir(parents=True)
    (etc / "modules-enabled").mkdir()
    shutil.copy("/etc/nginx/mime.types", etc / "mime.types")
    (etc / "nginx.conf").write_text(render_template("web/nginx.conf", ctx))
    (etc / "conf.d" / "hpc-portal.conf").write_text(site if site is not None else render_template("web/hpc-portal.conf", ctx))
    binds = {str(etc): "/etc/nginx"}
    for name, dest in (("log", "/var/log/nginx"), ("lib", "/var/lib/nginx"), ("run", "/run")):
        (tmp / name).mkdir()
        binds[str(tmp / name)] = dest
    return binds


@needs_ns
@pytest.mark.parametrize(("stack", "name", "ctx"), WEB, ids=WEB_IDS)
def test_nginx_accepts_the_config_of_every_web_host(tmp_path: Path, stack: str, name: str, ctx: dict[str, Any]) -> None:
    r = run_isolated(["nginx", "-t", "-c", "/etc/nginx/nginx.conf"], binds=nginx_tree(tmp_path, ctx), timeout=20)
    assert r.returncode == 0, r.stderr
    assert "test is successful" in r.stderr
    site = render_template("web/hpc-portal.conf", ctx)
    assert f"listen {ctx['web']['port']} default_server;" in site
    assert f"root {ctx['web']['dist_root']}/current;" in site
    assert "sites-enabled" not in render_template("web/nginx.conf", ctx).replace("sites-enabled/default", "")


@needs_ns
def test_nginx_rejects_a_broken_twin(tmp_path: Path) -> None:
    ctx = contexts("prod")["app-1"]
    site = render_template("web/hpc-portal.conf", ctx).replace(
        "try_files $uri $uri/ /index.html;", "try_files $uri $uri/ /index.html", 1
    )
    r = run_isolated(["nginx", "-t", "-c", "/etc/nginx/nginx.conf"], binds=nginx_tree(tmp_path, ctx, site), timeout=20)
    assert r.returncode != 0 and "hpc-portal.conf" in r.stderr


@pytest.fixture()
def dist_root() -> Iterator[Path]:
    """A release tree nginx's worker (www-data) can read: pytest's tmp dirs are 0700."""
    d = Path(tempfile.mkdtemp(prefix="hpc-dist-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


def make_release(root: Path, version: str, frontends: list[str]) -> None:
    rel = root / "releases" / version
    for sub in ["", *frontends]:
        (rel / sub / "assets").mkdir(parents=True, exist_ok=True)
        (rel / sub / "index.html").write_text(f"<html>{sub or 'main'} {version}</html>\n")
        (rel / sub / "assets" / f"app-{version}abc.js").write_text("console.log('portal');\n" * 200)


CASES = {  # name: (path, extra curl args)
    "health": ("/health", []),
    "root": ("/", []),
    "spa": ("/jobs/42/log", []),
    "asset": ("/assets/app-v1abc.js", ["-H", "Accept-Encoding: gzip"]),
    "missing_asset": ("/assets/app-nothere.js", []),
    "admin_spa": ("/admin/users/7", []),
    "admin_asset": ("/admin/assets/app-v1abc.js", []),
    "after_flip": ("/", []),
}


@needs_ns
def test_nginx_serves_the_current_release_with_cache_headers_and_spa_fallback(tmp_path: Path, dist_root: Path) -> None:
    ctx = copy.deepcopy(contexts("prod")["app-2"])
    ctx["web"]["dist_root"] = str(dist_root)
    ctx["web"]["frontends"] = [{"name": "admin"}]
    make_release(dist_root, "v1", ["admin"])
    make_release(dist_root, "v2", ["admin"])
    os.symlink("releases/v1", dist_root / "current")
    out = tmp_path / "out"
    out.mkdir()
    port = ctx["web"]["port"]
    lines = [
        "set -e",
        "nginx -c /etc/nginx/nginx.conf",
        "trap 'kill $(cat /run/nginx.pid)' EXIT",
        f"for _ in $(seq 50); do curl -s -o /dev/null http://127.0.0.1:{port}/health && break; sleep 0.1; done",
    ]
    for case, (path, extra) in CASES.items():
        if case == "after_flip":  # a deploy: flip the symlink atomically, no reload
            lines.append(f"ln -sfn releases/v2 {dist_root}/current.new && mv -T {dist_root}/current.new {dist_root}/current")
        curl = [
            "curl",
            "-s",
            *extra,
            "-o",
            f"{out}/{case}.body",
            "-D",
            f"{out}/{case}.head",
            "-w",
            "%{http_code}",
            f"http://127.0.0.1:{port}{path}",
        ]
        lines.append(f"{shlex.join(curl)} > {out}/{case}.code")
    r = run_isolated(["bash", "-c", "\n".join(lines)], binds=nginx_tree(tmp_path, ctx), timeout=30)
    assert r.returncode == 0, r.stderr + (tmp_path / "log" / "error.log").read_text()

    def get(case: str) -> tuple[int, dict[str, str], bytes]:
        head = (out / f"{case}.head").read_text().lower()
        headers = dict(line.split(": ", 1) for line in head.splitlines()[1:] if ": " in line)
        return int((out / f"{case}.code").read_text()), headers, (out / f"{case}.body").read_bytes()

    code, h, body = get("health")
    assert (code, body) == (200, b"ok\n")
    for case, want in (("root", b"main v1"), ("spa", b"main v1"), ("admin_spa", b"admin v1"), ("after_flip", b"main v2")):
        code, h, body = get(case)
        assert code == 200 and want in body, case
        assert h["cache-control"] == "no-cache", case
    for case in ("asset", "admin_asset"):
        code, h, _ = get(case)
        assert code == 200 and h["cache-control"] == "public, max-age=31536000, immutable", case
    assert get("asset")[1]["content-encoding"] == "gzip"
    code, h, _ = get("missing_asset")
    assert code == 404 and "immutable" not in h.get("cache-control", "")


# ---- /etc/hpc/portal.env ----------------------------------------------------------------


def parse_env(text: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Z][A-Z0-9_]*)=(\S+)", line)
        assert m, f"not a plain KEY=value line: {line!r}"
        assert m.group(1) not in env, f"{m.group(1)} twice"
        env[m.group(1)] = m.group(2)
    return env


@pytest.mark.parametrize(("stack", "name", "ctx"), APP, ids=APP_IDS)
def test_portal_env_has_every_variable_and_no_secret(stack: str, name: str, ctx: dict[str, Any]) -> None:
    text = render_template("app/portal.env", ctx)
    assert text == render_template("app/portal.env", copy.deepcopy(ctx)) == environment_file(ctx)
    env = parse_env(text)
    d = ctx["domain"]
    sentinels = env["REDIS_SENTINELS"].split(",")
    assert sentinels == [f"sentinel-{i}.{d}:{ctx['redis']['sentinel_port']}" for i in range(1, len(ctx["redis"]["nodes"]) + 1)]
    redis_ips = {n["ip"] for n in ctx["redis"]["nodes"]}
    assert {ctx["endpoints"][s.rsplit(":", 1)[0]] for s in sentinels} == redis_ips
    controllers = env["SLURM_CONTROLLER_HOSTS"].split(",")
    assert [ctx["endpoints"][c] for c in controllers] == [c["ip"] for c in ctx["slurm"]["controllers"]]
    expected = {
        "SERVER_ID": name,
        "REDIS_MASTER_NAME": ctx["redis"]["master_name"],
        "REDIS_PASSWORD_FILE": "/run/hpc/portal/redis_password",
        "REDIS_SENTINEL_PASSWORD_FILE": "/run/hpc/portal/redis_password",
        "DB_HOST": "127.0.0.1",
        "DB_PORT": "3306",
        "DB_USER": "portal",
        "DB_PASSWORD_FILE": "/run/hpc/portal/db_password",
        "SLURM_CONTROLLER_HOST": controllers[0],
        "SLURM_CONF": "/etc/slurm/slurm.conf",
        "BACKEND_5010_HOST": "0.0.0.0",
    }
    assert {k: env.get(k) for k in expected} == expected
    for svc in ctx["services"]:
        key = svc["name"].upper()
        assert env[f"DB_NAME_{key}"] == svc["db"] and svc["db"] in ctx["galera"]["databases"]
        assert env[f"PORTAL_{key}_PORTS"] == ",".join(map(str, svc["ports"]))
        for port in svc["ports"]:
            assert env[f"BACKEND_{port}_HOST"] == "0.0.0.0" and env[f"BACKEND_{port}_PORT"] == str(port)
    # The host's share of the writer's connections: all app hosts' shares fit under the
    # Galera nodes' max_connections with the reserve left over.
    share = int(env["DB_CONNECTIONS_PER_HOST"])
    apps = len(ctx["role_hosts"]["app"])
    assert share >= 24 and apps * share + 50 <= ctx["galera"]["max_connections"], (share, apps)
    # No values that belong in the secrets files: only *_FILE paths for passwords.
    secretish = [k for k in env if re.search("PASS|SECRET|TOKEN|KEY", k)]
    assert secretish and all(k.endswith("_FILE") and env[k].startswith("/run/hpc/") for k in secretish)
    # The unit's own Environment= must not be overridden (EnvironmentFile= wins over it).
    assert not {"PORT", "PORTAL_SERVICE", "DB_NAME", "HEALTH_PATH"} & set(env)


def test_portal_env_fails_loudly_without_sentinel_names() -> None:
    ctx = copy.deepcopy(contexts("prod")["app-1"])
    ctx["endpoints"] = {k: v for k, v in ctx["endpoints"].items() if not k.startswith("sentinel-")}
    with pytest.raises(jinja2.UndefinedError, match="no_sentinel_N_names_in_endpoints"):
        render_template("app/portal.env", ctx)


# ---- systemd units ----------------------------------------------------------------------


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        assert current is not None, line
        key, value = line.split("=", 1)
        current.setdefault(key, []).append(value)
    return sections


def install_units(tmp: Path, ctx: dict[str, Any]) -> tuple[Path, subprocess.CompletedProcess[str]]:
    script = tmp / "hpc-portal-units"
    script.write_text(render_template("app/hpc-portal-units", ctx))
    unit_dir = tmp / "units"
    unit_dir.mkdir(exist_ok=True)
    r = subprocess.run(
        ["bash", str(script), "--unit-dir", str(unit_dir), "--no-start"], capture_output=True, text=True, timeout=20
    )
    return unit_dir, r


def fake_root(tmp: Path, ctx: dict[str, Any], unit_dir: Path, executables: tuple[str, ...]) -> Path:
    """The distribution's units, the common+app files of this host, the portal units and
    stand-ins for what the OS or the artifact provides, for systemd-analyze --root."""
    root = hostfiles.fake_root(tmp, hostfiles.host_files(ctx, ("common", "app")), executables)
    for unit in unit_dir.iterdir():
        shutil.copy(unit, root / "etc/systemd/system" / unit.name)
    return root


def verify(root: Path, units: list[str]) -> subprocess.CompletedProcess[str]:
    return hostfiles.verify_units(root, units, timeout=60)


def expected_units(ctx: dict[str, Any]) -> dict[str, tuple[dict[str, Any], int]]:
    return {f"hpc-portal-{s['name']}-{p}.service": (s, p) for s in ctx["services"] for p in s["ports"]}


@pytest.mark.parametrize(("stack", "name", "ctx"), APP, ids=APP_IDS)
def test_one_unit_per_port_with_restart_user_and_environment(tmp_path: Path, stack: str, name: str, ctx: dict[str, Any]) -> None:
    unit_dir, r = install_units(tmp_path, ctx)
    assert r.returncode == 0, r.stderr
    want = expected_units(ctx)
    assert sorted(p.name for p in unit_dir.iterdir()) == sorted(want) and len(want) > 0
    for unit_name, (svc, port) in want.items():
        u = parse_unit((unit_dir / unit_name).read_text())
        s = u["Service"]
        assert s["ExecStart"] == ["/usr/bin/python3 /usr/local/lib/hpc/portal_standin.py"]
        assert s["ExecStart"][0].startswith("/")
        assert (s["Restart"], s["RestartSec"], s["User"]) == (["always"], ["2"], ["portal"])
        assert s["EnvironmentFile"] == ["/etc/hpc/portal.env", "/run/hpc/portal-secrets.env"]
        env = dict(v.split("=", 1) for v in s["Environment"])
        assert env["PORT"] == str(port) and env["SERVER_ID"] == name and env["PORTAL_SERVICE"] == svc["name"]
        assert env["DB_NAME"] == svc["db"] and env["HEALTH_PATH"] == svc["health"]
        after = " ".join(u["Unit"]["After"]).split()
        assert {"network-online.target", "hpc-dbwriter.service", "hpc-portal-secrets.service"} <= set(after)
        assert u["Unit"]["Requires"] == ["hpc-portal-secrets.service"]
        assert u["Unit"]["StartLimitIntervalSec"] == ["0"]
        assert u["Install"]["WantedBy"] == ["multi-user.target"]


@pytest.mark.parametrize(("stack", "name", "ctx"), APP, ids=APP_IDS)
def test_systemd_accepts_the_portal_units(tmp_path: Path, stack: str, name: str, ctx: dict[str, Any]) -> None:
    unit_dir, r = install_units(tmp_path, ctx)
    assert r.returncode == 0, r.stderr
    root = fake_root(tmp_path, ctx, unit_dir, ("/usr/bin/python3",))
    units = sorted(expected_units(ctx)) + ["hpc-portal-secrets.service", "hpc-fetch-secrets.service"]
    r = verify(root, units)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_systemd_rejects_a_broken_twin(tmp_path: Path) -> None:
    ctx = contexts("prod")["app-1"]
    unit_dir, _ = install_units(tmp_path, ctx)
    unit = unit_dir / "hpc-portal-auth-4431.service"
    unit.write_text(unit.read_text().replace("Restart=always", "Restart=sometimes"))
    root = fake_root(tmp_path, ctx, unit_dir, ("/usr/bin/python3",))
    r = verify(root, ["hpc-portal-auth-4431.service"])
    assert "sometimes" in r.stderr
    (root / "usr/bin/python3").unlink()
    r = verify(root, ["hpc-portal-api-5010.service"])
    assert r.returncode != 0 and "/usr/bin/python3" in r.stderr


@pytest.mark.parametrize(
    ("artifact", "exec_start", "extra"),
    [
        (
            {"kind": "efs", "path": "/dist/app/current"},
            "/dist/app/current/bin/hpc-portal-service",
            "RequiresMountsFor=/dist/app/current",
        ),
        (
            {"kind": "git", "url": "https://git.example.com/hpc/portal.git", "ref": "v1.4.2"},
            "/opt/hpc-portal/app/bin/hpc-portal-service",
            "WorkingDirectory=/opt/hpc-portal/app",
        ),
    ],
    ids=["efs", "git"],
)
def test_units_start_the_configured_artifact(tmp_path: Path, artifact: dict[str, Any], exec_start: str, extra: str) -> None:
    ctx = with_artifact(contexts("prod")["app-3"], artifact)
    unit_dir, r = install_units(tmp_path, ctx)
    assert r.returncode == 0, r.stderr
    text = (unit_dir / "hpc-portal-ws-5011.service").read_text()
    assert f"ExecStart={exec_start}\n" in text and extra + "\n" in text
    root = fake_root(tmp_path, ctx, unit_dir, (exec_start,))
    r = verify(root, sorted(expected_units(ctx)))
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_an_unknown_artifact_kind_is_an_error() -> None:
    with pytest.raises(jinja2.UndefinedError, match="unknown_app_artifact_kind"):
        render_template("app/hpc-portal-units", with_artifact(contexts("dev")["app-2"], {"kind": "s3", "path": "x"}))


def test_units_script_passes_shellcheck_and_rejects_a_broken_twin(tmp_path: Path) -> None:
    script = tmp_path / "hpc-portal-units"
    text = render_template("app/hpc-portal-units", contexts("prod")["app-1"])
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    r = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
    script.write_text(text.replace('rm -f "$path"', "rm -f $path"))
    r = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert r.returncode != 0 and "SC2086" in r.stdout


def test_units_script_is_idempotent_and_removes_ports_no_longer_configured(tmp_path: Path) -> None:
    ctx = contexts("prod")["app-1"]
    n = len(expected_units(ctx))
    unit_dir, r = install_units(tmp_path, ctx)
    assert f"{n} units, {n} changed, 0 removed" in r.stderr
    mtimes = {p.name: p.stat().st_mtime_ns for p in unit_dir.iterdir()}
    (unit_dir / "hpc-portal-old-9999.service").write_text("[Service]\nExecStart=/bin/true\n")
    (unit_dir / "hpc-portal-secrets.service").write_text("kept\n")
    unit_dir, r = install_units(tmp_path, ctx)
    assert f"{n} units, 0 changed, 1 removed" in r.stderr
    assert not (unit_dir / "hpc-portal-old-9999.service").exists()
    assert (unit_dir / "hpc-portal-secrets.service").exists()
    assert {p.name: p.stat().st_mtime_ns for p in unit_dir.iterdir() if p.name in mtimes} == mtimes


# ---- hpc-portal-secrets ------------------------------------------------------------------

PORTAL_SECRETS = TEMPLATES / "app" / "hpc-portal-secrets"


def systemd_env_value(raw: str) -> str:
    """How systemd reads a double-quoted value in an EnvironmentFile= (no expansion)."""
    assert raw.startswith('"') and raw.endswith('"')
    out, i, s = [], 0, raw[1:-1]
    while i < len(s):
        if s[i] == "\\" and i + 1 < len(s):
            out.append(s[i + 1] if s[i + 1] in '"\\`$' else s[i : i + 2])
            i += 2
        else:
            assert s[i] != '"', "unescaped quote"
            out.append(s[i])
            i += 1
    return "".join(out)


def run_portal_secrets(tmp: Path) -> subprocess.CompletedProcess[str]:
    script = tmp / "hpc-portal-secrets"
    script.write_text(render_template("app/hpc-portal-secrets", contexts("prod")["app-1"]))
    return subprocess.run(
        [
            "python3",
            str(script),
            "--secrets-dir",
            str(tmp / "secrets"),
            "--env-file",
            str(tmp / "run" / "portal-secrets.env"),
            "--files-dir",
            str(tmp / "run" / "portal"),
            "--group",
            "root",
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )


def test_portal_secrets_writes_the_env_file_and_group_readable_copies(tmp_path: Path) -> None:
    assert render_template("app/hpc-portal-secrets", contexts("prod")["app-1"]) == PORTAL_SECRETS.read_text(), (
        "a plain script: Jinja must not change a byte"
    )
    (tmp_path / "secrets").mkdir()
    redis_pw, db_pw = 'r3d"is\\pa$$`x', "db pass 'w0rd' ${HOME}"
    (tmp_path / "secrets" / "redis_password").write_text(redis_pw)
    (tmp_path / "secrets" / "mariadb_app_password").write_text(db_pw)
    r = run_portal_secrets(tmp_path)
    assert r.returncode == 0, r.stderr
    assert redis_pw not in r.stdout + r.stderr and db_pw not in r.stdout + r.stderr
    env_file = tmp_path / "run" / "portal-secrets.env"
    assert oct(env_file.stat().st_mode & 0o777) == "0o600"
    values = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
    assert {k: systemd_env_value(v) for k, v in values.items()} == {"REDIS_PASSWORD": redis_pw, "DB_PASSWORD": db_pw}
    files = tmp_path / "run" / "portal"
    assert oct(files.stat().st_mode & 0o777) == "0o750"
    for name, value in (("redis_password", redis_pw), ("db_password", db_pw)):
        assert (files / name).read_text() == value
        assert oct((files / name).stat().st_mode & 0o777) == "0o440"
    r = run_portal_secrets(tmp_path)
    assert r.returncode == 0 and "unchanged" in r.stderr


def test_portal_secrets_names_a_missing_secret(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "redis_password").write_text("only-redis")
    r = run_portal_secrets(tmp_path)
    assert r.returncode == 1 and "missing secret mariadb_app_password" in r.stderr
    assert "only-redis" not in r.stderr + r.stdout
    assert not (tmp_path / "run" / "portal-secrets.env").exists()


# ---- hpc-portal-fetch-app -----------------------------------------------------------------


@pytest.mark.parametrize(
    "artifact",
    [None, {"kind": "efs", "path": "/dist/app/current"}, {"kind": "git", "url": "https://example.com/it's.git", "ref": "main"}],
    ids=["standin", "efs", "git"],
)
def test_fetch_app_passes_shellcheck_for_every_artifact_kind(tmp_path: Path, artifact: dict[str, Any] | None) -> None:
    script = tmp_path / "fetch"
    script.write_text(render_template("app/hpc-portal-fetch-app", with_artifact(contexts("dev")["app-1"], artifact)))
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    r = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(
        ["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci", "-c", "init.defaultBranch=main", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def test_fetch_app_checks_out_the_configured_git_ref_and_moves_with_it(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "bin").mkdir(parents=True)
    git("init", "-q", ".", cwd=repo)
    entry = repo / "bin" / "hpc-portal-service"
    entry.write_text("#!/bin/sh\necho v1\n")
    entry.chmod(0o755)
    git("add", ".", cwd=repo)
    git("commit", "-qm", "v1", cwd=repo)
    git("tag", "v1", cwd=repo)
    entry.write_text("#!/bin/sh\necho v2\n")
    git("commit", "-qam", "v2", cwd=repo)
    git("tag", "v2", cwd=repo)
    dest = tmp_path / "app"

    def run(ref: str) -> str:
        script = tmp_path / "fetch"
        ctx = with_artifact(contexts("prod")["app-1"], {"kind": "git", "url": f"file://{repo}", "ref": ref})
        script.write_text(render_template("app/hpc-portal-fetch-app", ctx))
        r = subprocess.run(
            ["bash", str(script)], env=dict(os.environ, HPC_PORTAL_APP_DIR=str(dest)), capture_output=True, text=True, timeout=30
        )
        assert r.returncode == 0, r.stderr
        return (dest / "bin" / "hpc-portal-service").read_text()

    assert "v1" in run("v1")
    assert "v1" in run("v1")
    assert "v2" in run("v2")
    assert os.access(dest / "bin" / "hpc-portal-service", os.X_OK)


def test_fetch_app_runs_the_artifacts_install_step_after_each_checkout(tmp_path: Path) -> None:
    """install.sh at the artifact's top runs (as the fetch's user, root on a host) after
    every checkout, before the units start; its failure fails the fetch."""
    repo = tmp_path / "repo"
    (repo / "bin").mkdir(parents=True)
    git("init", "-q", ".", cwd=repo)
    entry = repo / "bin" / "hpc-portal-service"
    entry.write_text("#!/bin/sh\n")
    entry.chmod(0o755)
    install = repo / "install.sh"
    install.write_text('#!/bin/sh\ncd "$(dirname "$0")" && echo "$(git rev-parse --short HEAD)" >> installed\n')
    install.chmod(0o755)
    git("add", ".", cwd=repo)
    git("commit", "-qm", "good", cwd=repo)
    git("tag", "good", cwd=repo)
    install.write_text("#!/bin/sh\necho 'no wheelhouse' >&2; exit 3\n")
    git("commit", "-qam", "bad", cwd=repo)
    git("tag", "bad", cwd=repo)
    dest = tmp_path / "app"

    def run(ref: str) -> subprocess.CompletedProcess[str]:
        script = tmp_path / "fetch"
        ctx = with_artifact(contexts("prod")["app-1"], {"kind": "git", "url": f"file://{repo}", "ref": ref})
        script.write_text(render_template("app/hpc-portal-fetch-app", ctx))
        return subprocess.run(["bash", str(script)], env=dict(os.environ, HPC_PORTAL_APP_DIR=str(dest)),
                              capture_output=True, text=True, timeout=30)

    assert run("good").returncode == 0
    assert run("good").returncode == 0
    assert len((dest / "installed").read_text().split()) == 2, "the install step runs on every fetch"
    r = run("bad")
    assert r.returncode == 1 and "install.sh failed (bad)" in r.stderr and "no wheelhouse" in r.stderr


# ---- manifests and ordering ----------------------------------------------------------------


def test_nginx_is_reconfigured_before_haproxy_needs_port_80() -> None:
    web_orders = {c["order"] for c in manifest("web")["commands"]}
    lb_orders = {c["order"] for c in manifest("lb")["commands"]}
    assert max(web_orders) < min(lb_orders)
    common_orders = {c["order"] for c in manifest("common")["commands"] if "hpc-mount-efs" in c["run"][0]}
    assert max(common_orders) < min(web_orders), "nginx serves EFS: mounts come first"


def test_the_portal_user_exists_before_the_units_start() -> None:
    cmds = manifest("app")["commands"]
    user = [c["order"] for c in cmds if "useradd" in " ".join(c["run"])]
    units = [c["order"] for c in cmds if c["run"] == ["/usr/local/sbin/hpc-portal-units"]]
    assert user and units and max(user) < min(units)
    assert {"munge", "slurm-client"} <= set(manifest("app")["packages"][0]["names"])


def test_every_unit_the_scripts_start_is_installed() -> None:
    text = textwrap.dedent(render_template("app/hpc-portal-units", contexts("prod")["app-1"]))
    dests = {e["dest"] for t in ("common", "app") for e in manifest(t)["files"]}
    assert "systemctl enable hpc-portal-secrets.service" in text
    assert "/etc/systemd/system/hpc-portal-secrets.service" in dests
    assert "/etc/systemd/system/hpc-fetch-secrets.service" in dests


def test_db_connection_shares_fit_the_writer_for_any_width_of_app_tier() -> None:
    from components.hostctx import DB_CONNECTIONS_RESERVED, DB_MAX_CONNECTIONS_CAP, db_connection_budget

    checked = 0
    for apps in (0, 1, 3, 6, 39, 40, 300, 1000):
        top, share = db_connection_budget(apps)
        # every share fits with the reserve; past the cap only the floor of 24 per host
        assert top >= 151 and share >= 24 and apps * share + DB_CONNECTIONS_RESERVED <= top, (apps, top, share)
        assert top <= DB_MAX_CONNECTIONS_CAP or share == 24, (apps, top, share)
        checked += 1
    assert db_connection_budget(3) == (350, 100) and db_connection_budget(300)[1] == 24
    assert checked == 8
