"""Host scripts every server runs: hpc-fetch-secrets (SSM -> /run/hpc/secrets),
hpc-mount-efs (EFS lines in fstab) and hpc-rolling-patch (one host's stateful packages).

hpc-fetch-secrets runs against moto's SSM (in-process, and once as a real process against
a moto server that comes up late, through the endpoint override). hpc-mount-efs writes a
temporary fstab. hpc-rolling-patch runs with stub commands (apt-get, systemctl, curl,
redis-cli, ...) on PATH that record what it does.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError, NoCredentialsError
from moto import mock_aws

from cloud_init.templating import render_template
from offline.contexts import contexts
from tests.loadfile import load_script

SCRIPTS = Path(__file__).resolve().parent.parent / "cloud_init" / "scripts"
REGION = "ap-northeast-2"
PATH = "/hpc-portal/test/secrets/"


fetch = load_script("hpc-fetch-secrets")
mount = load_script("hpc-mount-efs")


@pytest.fixture(autouse=True)
def _aws_env(fake_aws: None) -> None:
    """Every test here talks to moto."""


# 13 secrets: more than one page of GetParametersByPath (at most 10 per page).
SECRETS = {f"secret_{i:02d}": f"value-{i:02d}-S3cr3t!\"'$" for i in range(11)}
SECRETS["redis_password"] = "r3dis-PA55-word"
SECRETS["munge_key"] = "bXVuZ2Uta2V5LWJhc2U2NA=="


def put_secrets(ssm: Any, values: dict[str, str] = SECRETS) -> None:
    for name, value in values.items():
        ssm.put_parameter(Name=PATH + name, Value=value, Type="SecureString")
    # Outside the path: must not be fetched.
    ssm.put_parameter(Name="/hpc-portal/other/secrets/redis_password", Value="not-ours", Type="SecureString")


def stack_json(tmp_path: Path, required: list[str], **extra: Any) -> Path:
    p = tmp_path / "stack.json"
    doc = {
        "region": REGION,
        "ssm_path": "/hpc-portal/test",
        "secrets": {"path": PATH, "dir": str(tmp_path / "secrets"), "required": required},
    }
    doc.update(extra)
    p.write_text(json.dumps(doc))
    return p


def assert_no_values(text: str, values: dict[str, str] = SECRETS) -> None:
    for v in values.values():
        assert v not in text


# ---- hpc-fetch-secrets ----------------------------------------------------------------


@mock_aws
def test_fetch_writes_every_secret_of_the_path_0600_across_pages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ssm = boto3.client("ssm", region_name=REGION)
    put_secrets(ssm)
    pages = []

    def factory() -> Any:
        c = boto3.client("ssm", region_name=REGION)
        c.meta.events.register("before-call.ssm.GetParametersByPath", lambda **kw: pages.append(1))
        return c

    rc = fetch.main(["--stack-json", str(stack_json(tmp_path, ["redis_password", "munge_key"]))], client_factory=factory)
    assert rc == 0
    assert len(pages) >= 2, "13 parameters need more than one page"
    d = tmp_path / "secrets"
    files = sorted(p.name for p in d.iterdir())
    assert files == sorted(SECRETS)
    for name, value in SECRETS.items():
        st = (d / name).stat()
        assert (d / name).read_text() == value
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert (st.st_uid, st.st_gid) == (0, 0) or os.geteuid() != 0
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    out = capsys.readouterr()
    assert out.out == ""
    assert_no_values(out.err + out.out)
    assert "13 secrets" in out.err and "not-ours" not in out.err


@mock_aws
def test_fetch_twice_changes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    put_secrets(boto3.client("ssm", region_name=REGION))
    args = ["--stack-json", str(stack_json(tmp_path, []))]
    assert fetch.main(args) == 0
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "secrets").iterdir()}
    capsys.readouterr()
    assert fetch.main(args) == 0
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "secrets").iterdir()}
    assert before == after
    assert "(0 updated)" in capsys.readouterr().err


@mock_aws
def test_fetch_retries_transient_errors_then_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    put_secrets(boto3.client("ssm", region_name=REGION))
    monkeypatch.setattr(fetch.hpc_aws.time, "sleep", lambda s: None)
    failures = [
        NoCredentialsError(),
        ClientError({"Error": {"Code": "ThrottlingException", "Message": "Rate exceeded"}}, "GetParametersByPath"),
    ]

    def factory() -> Any:
        if failures:
            raise failures.pop(0)
        return boto3.client("ssm", region_name=REGION)

    rc = fetch.main(["--stack-json", str(stack_json(tmp_path, ["redis_password"])), "--backoff", "0"], client_factory=factory)
    assert rc == 0
    err = capsys.readouterr().err
    assert "attempt 1 failed (NoCredentialsError)" in err
    assert "attempt 2 failed (ClientError ThrottlingException)" in err
    assert (tmp_path / "secrets" / "redis_password").read_text() == SECRETS["redis_password"]


def test_fetch_gives_up_after_the_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    delays: list[float] = []
    monkeypatch.setattr(fetch.hpc_aws.time, "sleep", delays.append)
    calls = []

    def factory() -> Any:
        calls.append(1)
        raise NoCredentialsError()

    rc = fetch.main(
        ["--stack-json", str(stack_json(tmp_path, [])), "--attempts", "4", "--backoff", "1", "--max-backoff", "3"],
        client_factory=factory,
    )
    assert rc == 4
    assert len(calls) == 4 and len(delays) == 3
    # full jitter: the n-th wait is random below min(--max-backoff, --backoff * 2**n)
    assert all(0 <= d <= bound for d, bound in zip(delays, (1, 2, 3), strict=True))
    assert "could not read /hpc-portal/test/secrets/ after 4 attempts" in capsys.readouterr().err


@mock_aws
def test_fetch_names_missing_required_secrets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    put_secrets(boto3.client("ssm", region_name=REGION))
    rc = fetch.main(
        ["--stack-json", str(stack_json(tmp_path, ["redis_password", "galera_sst_password"])), "--require", "tls_pem",
         "--deadline", "0"]  # one attempt: waiting for secrets that appear later is tested in test_hpc_aws.py
    )
    assert rc == 3
    err = capsys.readouterr().err
    assert "missing required secrets: galera_sst_password, tls_pem" in err
    assert_no_values(err)
    assert (tmp_path / "secrets" / "redis_password").exists(), "what exists is still written"


def test_fetch_endpoint_override_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "aws-endpoint"
    assert fetch.endpoint_url({}, str(f)) is None
    assert fetch.endpoint_url({"aws_endpoint_url": "http://c:1"}, str(f)) == "http://c:1"
    f.write_text("http://b:2\n")
    assert fetch.endpoint_url({"aws_endpoint_url": "http://c:1"}, str(f)) == "http://b:2"
    monkeypatch.setenv("HPC_AWS_ENDPOINT_URL", "http://a:3")
    assert fetch.endpoint_url({"aws_endpoint_url": "http://c:1"}, str(f)) == "http://a:3"


def test_fetch_rejects_a_config_without_path_or_region(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    p = tmp_path / "stack.json"
    p.write_text(json.dumps({"region": REGION}))
    assert fetch.main(["--stack-json", str(p)]) == 2
    p.write_text(json.dumps({"ssm_path": "/x"}))
    assert fetch.main(["--stack-json", str(p)]) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_fetch_as_a_process_through_the_endpoint_override_waits_for_a_late_endpoint(tmp_path: Path) -> None:
    """The real script, as boot runs it: the endpoint comes from HPC_AWS_ENDPOINT_URL and
    is not listening yet when the script starts (connection refused, retried)."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, HPC_AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    proc = subprocess.Popen(
        [
            sys.executable,
            str(SCRIPTS / "hpc-fetch-secrets"),
            "--stack-json",
            str(stack_json(tmp_path, ["munge_key"])),
            "--backoff",
            "0.3",
            "--max-backoff",
            "0.6",
            "--attempts",
            "30",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    refused = threading.Event()

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "failed (EndpointConnectionError)" in line:
                refused.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    try:
        assert refused.wait(20), "".join(lines)
        server.start()
        put_secrets(boto3.client("ssm", region_name=REGION, endpoint_url=url))
        proc.wait(timeout=30)
        reader.join(5)
        out = proc.stdout.read() if proc.stdout else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.stop()
    err = "".join(lines)
    assert proc.returncode == 0, err
    assert "failed (EndpointConnectionError)" in err
    assert f"via {url}" in err
    assert (tmp_path / "secrets" / "munge_key").read_text() == SECRETS["munge_key"]
    assert out == ""
    assert_no_values(err)


def test_every_host_requires_the_secrets_its_roles_use() -> None:
    want = {
        "app": {"redis_password", "mariadb_app_password", "munge_key"},
        "data": {"redis_password", "mariadb_root_password", "galera_sst_password", "clustercheck_password"},
        "lb": {"tls_pem"},
        "slurm": {"munge_key", "mariadb_slurm_password"},
        "monitoring": {"grafana_admin_password"},
    }
    checked = 0
    for stack in ("prod", "dev"):
        for ctx in contexts(stack).values():
            doc = json.loads(render_template("common/stack.json", ctx))
            required = set(doc["secrets"]["required"])
            assert required <= set(ctx["secrets"]["names"])
            assert doc["secrets"]["path"] == ctx["secrets"]["path"] + "/"
            for role in ctx["host"]["roles"]:
                assert want.get(role, set()) <= required, (ctx["host"]["name"], role)
            checked += 1
    assert checked == sum(len(contexts(s)) for s in ("prod", "dev")) and checked > 0


# ---- hpc-mount-efs ----------------------------------------------------------------------

DNS = "fs-0123456789abcdef0.efs.ap-northeast-2.amazonaws.com"
OPTS = "nfsvers=4.1,rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2,noresvport,_netdev,nofail"


def efs_stack(tmp_path: Path, mounts: list[dict[str, str]], dns: str = DNS) -> Path:
    p = tmp_path / "stack.json"
    p.write_text(json.dumps({"efs": {"dns_name": dns, "mounts": mounts}}))
    return p


MOUNTS = [{"name": "data", "path": "/data"}, {"name": "dist", "path": "/dist"}]
BASE_FSTAB = "# /etc/fstab: static file system information.\nLABEL=cloudimg-rootfs / ext4 discard,errors=remount-ro 0 1\n"


def test_mount_efs_writes_the_exact_fstab_lines_once(tmp_path: Path) -> None:
    fstab = tmp_path / "fstab"
    fstab.write_text(BASE_FSTAB)
    fstab.chmod(0o644)
    args = ["--stack-json", str(efs_stack(tmp_path, MOUNTS)), "--fstab", str(fstab), "--no-mount"]
    assert mount.main(args) == 0
    expected = BASE_FSTAB + (f"{DNS}:/data /data nfs4 {OPTS} 0 0\n{DNS}:/dist /dist nfs4 {OPTS} 0 0\n")
    assert fstab.read_text() == expected
    mtime = fstab.stat().st_mtime_ns
    assert mount.main(args) == 0
    assert fstab.read_text() == expected
    assert fstab.stat().st_mtime_ns == mtime, "an unchanged fstab is not rewritten"
    assert stat.S_IMODE(fstab.stat().st_mode) == 0o644


def test_mount_efs_replaces_an_outdated_line_and_keeps_the_rest(tmp_path: Path) -> None:
    fstab = tmp_path / "fstab"
    fstab.write_text(
        BASE_FSTAB + f"{DNS}:/ /data nfs4 defaults 0 0\n"
        f"{DNS}:/ /data nfs4 defaults 0 0\n# {DNS}:/dist /dist nfs4 old 0 0\n/dev/sdf /scratch xfs defaults 0 2\n"
    )
    assert mount.main(["--stack-json", str(efs_stack(tmp_path, MOUNTS)), "--fstab", str(fstab), "--no-mount"]) == 0
    lines = fstab.read_text().splitlines()
    assert lines.count(f"{DNS}:/data /data nfs4 {OPTS} 0 0") == 1
    assert lines.count(f"{DNS}:/dist /dist nfs4 {OPTS} 0 0") == 1
    assert not any(" /data nfs4 defaults" in line for line in lines)
    assert f"# {DNS}:/dist /dist nfs4 old 0 0" in lines and "/dev/sdf /scratch xfs defaults 0 2" in lines
    assert lines[:2] == BASE_FSTAB.splitlines()


def test_mount_efs_without_mounts_leaves_fstab_alone(tmp_path: Path) -> None:
    fstab = tmp_path / "fstab"
    fstab.write_text(BASE_FSTAB)
    assert mount.main(["--stack-json", str(efs_stack(tmp_path, [])), "--fstab", str(fstab)]) == 0
    assert fstab.read_text() == BASE_FSTAB


def test_mount_efs_rejects_bad_mounts(tmp_path: Path) -> None:
    fstab = tmp_path / "fstab"
    for bad in ([{"name": "a/b", "path": "/x"}], [{"name": "x", "path": "relative"}], [{"name": "x", "path": "/a b"}]):
        assert mount.main(["--stack-json", str(efs_stack(tmp_path, bad)), "--fstab", str(fstab), "--no-mount"]) == 2
    assert mount.main(["--stack-json", str(efs_stack(tmp_path, MOUNTS, dns="")), "--fstab", str(fstab)]) == 2
    assert not fstab.exists()


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def time(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def test_mount_efs_waits_for_the_name_to_resolve_within_its_bound() -> None:
    clock = FakeClock()
    answers = [OSError("no"), OSError("no"), [("ok",)]]

    def resolve(*a: Any, **kw: Any) -> Any:
        r = answers.pop(0)
        if isinstance(r, Exception):
            raise r
        return r

    assert mount.wait_resolvable(DNS, 180, 5, resolve=resolve, sleep=clock.sleep, clock=clock.time)
    assert clock.now == 10

    clock = FakeClock()
    calls = []

    def never(*a: Any, **kw: Any) -> Any:
        calls.append(1)
        raise OSError("NXDOMAIN")

    assert not mount.wait_resolvable(DNS, 90, 5, resolve=never, sleep=clock.sleep, clock=clock.time)
    assert clock.now <= 90 and len(calls) == 19


def test_mount_efs_writes_fstab_and_fails_when_the_name_never_resolves(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fstab = tmp_path / "fstab"
    rc = mount.main(
        [
            "--stack-json",
            str(efs_stack(tmp_path, MOUNTS, dns="fs-none.invalid")),
            "--fstab",
            str(fstab),
            "--resolve-timeout",
            "0",
            "--interval",
            "1",
        ]
    )
    assert rc == 1
    assert "fs-none.invalid:/data /data nfs4" in fstab.read_text()
    assert "did not resolve" in capsys.readouterr().err


def test_mount_efs_creates_a_missing_subdirectory_then_mounts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    results = {"first": True}

    def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        if cmd[:2] == ["mount", "--fstab"] and results["first"]:
            results["first"] = False
            return subprocess.CompletedProcess(cmd, 32, "", "mount.nfs4: No such file or directory")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(mount, "run", run)
    target = tmp_path / "mnt" / "data"
    stack = {"efs": {"dns_name": DNS, "mounts": [{"name": "data", "path": str(target)}]}}
    assert mount.mount_all(stack, "/tmp/fstab", mounted=set()) == 0
    assert [c[0] for c in calls] == ["mount", "mount", "umount", "mount"]
    assert calls[1][:4] == ["mount", "-t", "nfs4", "-o"] and calls[1][5] == f"{DNS}:/"
    assert "nofail" not in calls[1][4]
    assert calls[3] == ["mount", "--fstab", "/tmp/fstab", str(target)]
    assert target.is_dir()
    calls.clear()
    assert mount.mount_all(stack, "/tmp/fstab", mounted={str(target)}) == 0
    assert calls == [], "a mounted path is left alone"


def test_mount_efs_lines_for_every_rendered_host(tmp_path: Path) -> None:
    checked = 0
    for stack in ("prod", "dev"):
        for name, ctx in contexts(stack).items():
            sj = tmp_path / f"{stack}-{name}.json"
            sj.write_text(render_template("common/stack.json", ctx))
            fstab = tmp_path / f"{stack}-{name}.fstab"
            assert mount.main(["--stack-json", str(sj), "--fstab", str(fstab), "--no-mount"]) == 0
            lines = fstab.read_text().splitlines() if fstab.exists() else []
            assert lines == [f"{ctx['efs']['dns_name']}:/{m['name']} {m['path']} nfs4 {OPTS} 0 0" for m in ctx["efs"]["mounts"]]
            checked += len(lines)
    assert checked > 0


# ---- hpc-rolling-patch ----------------------------------------------------------------

PATCH = SCRIPTS / "hpc-rolling-patch"


def test_rolling_patch_passes_bash_n_and_shellcheck() -> None:
    assert subprocess.run(["bash", "-n", str(PATCH)], capture_output=True).returncode == 0
    r = subprocess.run(["shellcheck", "-x", str(PATCH)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_shellcheck_rejects_a_broken_twin(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.write_text(
        PATCH.read_text()
        .replace('systemctl restart "$unit"', "systemctl restart $unit", 1)
        .replace('"$SECRETS_DIR/redis_password"', "$SECRETS_DIR/redis_password", 1)
    )
    r = subprocess.run(["shellcheck", str(broken)], capture_output=True, text=True)
    assert r.returncode != 0 and "SC2086" in r.stdout


STUBS = {
    # Installed packages: held ones and one that is not held (nginx).
    "dpkg-query": """
        if [[ $* == *Status-Abbrev* ]]; then
            printf 'ii \\tmariadb-server\\nii \\tgalera-4\\nii \\tredis-server\\nii \\tnginx\\nii \\tlibmariadb3\\nrc \\tredis-tools\\n'
        else
            for p in "${@:3}"; do
                v=1; [[ -e $STATE/upgraded ]] && [[ $p == galera-4 ]] && v=2
                echo "$p=$v"
            done
        fi""",
    "apt-get": """
        echo "apt-get $*" >>"$STATE/log"
        [[ $* == *" -s "* || $* == "-s "* ]] && { echo "Inst galera-4 [1] (2 Ubuntu:24.04/noble-security)"; exit 0; }
        [[ $* == *install* ]] && touch "$STATE/upgraded"
        exit 0""",
    "needrestart": """echo 'NEEDRESTART-VER: 3.6'; echo 'NEEDRESTART-SVC: mariadb.service'; echo 'NEEDRESTART-SVC: cron.service'""",
    "systemctl": """
        echo "systemctl $*" >>"$STATE/log"
        case $1 in
            is-enabled) [[ " $ENABLED " == *" $3 "* ]] ;;
            is-active) exit 0 ;;
            restart) touch "$STATE/restarted-$2" ;;
            list-unit-files) exit 0 ;;
        esac""",
    # clustercheck: 503 until the counter reaches $CURL_OK_AFTER after a restart.
    "curl": """
        n=$(( $(cat "$STATE/curl" 2>/dev/null || echo 0) + 1 )); echo "$n" >"$STATE/curl"
        if [[ -n ${CURL_NEVER:-} ]]; then printf 503; exit 0; fi
        if [[ -e $STATE/restarted-mariadb.service && $n -lt ${CURL_OK_AFTER:-0} ]]; then printf 503; else printf 200; fi""",
    "redis-cli": """
        echo "redis-cli $* auth=${REDISCLI_AUTH:+yes}" >>"$STATE/log"
        case "$*" in
            *PING*) echo PONG ;;
            *"INFO replication"*) printf 'role:slave\\r\\nmaster_link_status:up\\r\\n' ;;
            *get-master-addr-by-name*) printf '10.0.0.1\\n6379\\n' ;;
        esac""",
}


def make_stubs(tmp_path: Path, enabled: str) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    state = tmp_path / "state"
    bin_dir.mkdir()
    state.mkdir()
    for name, body in STUBS.items():
        p = bin_dir / name
        p.write_text("#!/bin/bash\n" + textwrap.dedent(body).strip() + "\n")
        p.chmod(0o755)
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "redis_password").write_text("pw-not-logged")
    sj = tmp_path / "stack.json"
    sj.write_text(
        json.dumps(
            {
                "host": {"name": "data-2", "ip": "10.40.10.30", "roles": ["data"]},
                "health": {
                    "clustercheck_port": 9200,
                    "redis_port": 6379,
                    "sentinel_port": 26379,
                    "redis_master_name": "mymaster",
                    "web_port": 8080,
                    "web_health": "/health",
                },
            }
        )
    )
    return dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        STATE=str(state),
        ENABLED=enabled,
        HPC_STACK_JSON=str(sj),
        HPC_SECRETS_DIR=str(secrets),
        HPC_RUN_DIR=str(tmp_path / "run"),
        HPC_TEXTFILE_DIR=str(tmp_path),
    )


DATA_UNITS = "mariadb.service redis-server.service redis-sentinel.service hpc-dbwriter.service"


def run_patch(env: dict[str, str], *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(PATCH), "--interval", "1", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_rolling_patch_upgrades_only_held_packages_restarts_and_waits_for_galera(tmp_path: Path) -> None:
    env = make_stubs(tmp_path, DATA_UNITS)
    env["CURL_OK_AFTER"] = "4"  # a few 503s after the restart: it waits for Synced
    r = run_patch(env, "--timeout", "20")
    assert r.returncode == 0, r.stderr
    log = (tmp_path / "state" / "log").read_text()
    install = [line for line in log.splitlines() if line.startswith("apt-get") and " install " in line and " -s " not in line]
    assert len(install) == 1
    assert "--only-upgrade galera-4 libmariadb3 mariadb-server redis-server" in install[0]
    assert "nginx" not in install[0] and "redis-tools" not in install[0]
    assert "--force-confold" in install[0]
    restarts = [line for line in log.splitlines() if line.startswith("systemctl restart")]
    assert restarts == ["systemctl restart mariadb.service"], "only what needrestart lists, of this role's units"
    assert "waiting for galera" in r.stderr and "mariadb.service: healthy" in r.stderr
    assert "upgraded: galera-4=2" in r.stderr
    assert "auth=yes" in log and "pw-not-logged" not in r.stderr + r.stdout + log
    assert (tmp_path / "hpc_rolling_patch.prom").read_text().count("hpc_rolling_patch_last_success_timestamp_seconds") == 3


def test_rolling_patch_fails_when_the_host_does_not_get_healthy(tmp_path: Path) -> None:
    env = make_stubs(tmp_path, DATA_UNITS)
    env["CURL_NEVER"] = "1"
    r = run_patch(env, "--timeout", "2", "--force")
    assert r.returncode == 4, r.stderr
    assert "not healthy after 2s (failing: galera)" in r.stderr
    assert not (tmp_path / "hpc_rolling_patch.prom").exists()


def test_rolling_patch_refuses_an_unhealthy_host_without_force(tmp_path: Path) -> None:
    env = make_stubs(tmp_path, DATA_UNITS)
    env["CURL_NEVER"] = "1"
    r = run_patch(env, "--timeout", "2")
    assert r.returncode == 2
    assert "not healthy before patching (failing: galera)" in r.stderr
    assert not (tmp_path / "state" / "upgraded").exists()


def test_rolling_patch_dry_run_and_check_only_change_nothing(tmp_path: Path) -> None:
    env = make_stubs(tmp_path, DATA_UNITS)
    r = run_patch(env, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "packages: galera-4 libmariadb3 mariadb-server redis-server" in r.stderr
    assert (
        "units (restarted when needrestart lists them, or with --restart-all): mariadb.service "
        "redis-server.service redis-sentinel.service hpc-dbwriter.service" in r.stderr
    )
    r = run_patch(env, "--check-only")
    assert r.returncode == 0, r.stderr
    assert "healthy (galera redis sentinel dbwriter)" in r.stderr
    log = (tmp_path / "state" / "log").read_text()
    assert "apt-get" not in log and "systemctl restart" not in log


def test_rolling_patch_only_checks_units_enabled_on_this_host(tmp_path: Path) -> None:
    env = make_stubs(tmp_path, "redis-server.service")
    env["CURL_NEVER"] = "1"  # no mariadb here: clustercheck is not asked
    r = run_patch(env, "--check-only")
    assert r.returncode == 0, r.stderr
    assert "healthy (redis)" in r.stderr


def test_rolling_patch_rejects_bad_arguments(tmp_path: Path) -> None:
    env = make_stubs(tmp_path, DATA_UNITS)
    assert run_patch(env, "--bogus").returncode == 1
    assert run_patch(env, "--timeout", "soon").returncode == 1
    env["HPC_STACK_JSON"] = str(tmp_path / "missing.json")
    r = run_patch(env, "--check-only")
    assert r.returncode == 1 and "cannot read" in r.stderr


def test_mount_efs_does_not_wait_for_the_name_when_everything_is_mounted(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A reboot: systemd mounted the fstab lines already, so nothing waits on DNS."""
    fstab = tmp_path / "fstab"
    monkeypatch.setattr(mount, "mounted_points", lambda *a: {m["path"] for m in MOUNTS} | {"/"})

    def must_not_wait(*a: object, **k: object) -> bool:
        raise AssertionError("waited for the name although every mount point is mounted")

    monkeypatch.setattr(mount, "wait_resolvable", must_not_wait)
    assert mount.main(["--stack-json", str(efs_stack(tmp_path, MOUNTS)), "--fstab", str(fstab)]) == 0
    assert fstab.read_text().count(" nfs4 ") == len(MOUNTS)
