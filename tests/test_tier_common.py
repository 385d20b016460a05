"""What every host gets (cloud_init/templates/common): each file checked by the tool that
reads it, for every host of the prod and dev stacks, with a broken twin the same tool
rejects.

Checkers: rsyslogd -N1, apt-config (with Ubuntu's own 50unattended-upgrades loaded
first), needrestart's loader (perl), prometheus-node-exporter (started for real),
systemd-analyze verify (in a throw-away root), cloud-init schema, json.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from cloud_init.templating import SCRIPTS, TEMPLATES, render_template
from offline.contexts import contexts
from tests import hostfiles
from tests.hostfiles import manifest
from tests.nsrun import can_isolate, run_isolated

needs_ns = pytest.mark.skipif(not can_isolate(), reason="needs root and unshare for namespaces")

HOSTS = [(stack, name, ctx) for stack in ("prod", "dev") for name, ctx in contexts(stack).items()]
IDS = [f"{s}-{n}" for s, n, _ in HOSTS]
MY_TIERS = ("common", "web", "app")
ROLES = {"all", "lb", "web", "app", "data", "slurm", "monitoring"}


def host_files(ctx: dict[str, Any], tiers: tuple[str, ...] = MY_TIERS) -> dict[str, tuple[bytes, int]]:
    return hostfiles.host_files(ctx, tiers)


# ---- manifests --------------------------------------------------------------------------


@pytest.mark.parametrize("tier", MY_TIERS)
def test_manifest_entries_are_complete_and_point_at_real_files(tier: str) -> None:
    doc = manifest(tier)
    assert set(doc) <= {"files", "commands", "packages", "cloud_config"}
    dests = set()
    for e in doc["files"]:
        assert ("src" in e) != ("script" in e), e
        if "src" in e:
            assert e["src"].startswith(f"{tier}/") and (TEMPLATES / e["src"]).is_file(), e
        else:
            assert (SCRIPTS / e["script"]).is_file() and os.access(SCRIPTS / e["script"], os.X_OK), e
        assert e["dest"].startswith("/") and e["dest"] not in dests
        dests.add(e["dest"])
        assert re.fullmatch(r"0[0-7]{3}", e["mode"]) and e["owner"] == "root:root"
        assert set(e["roles"]) <= ROLES and e["roles"] and e["check"]
        assert e["secret_placeholders"] is False
        if e["dest"].startswith("/usr/local/sbin/"):
            assert e["mode"] == "0755"
    all_dests = {f["dest"] for t in MY_TIERS for f in manifest(t)["files"]}
    for c in doc.get("commands", []):
        assert set(c["roles"]) <= ROLES and isinstance(c["order"], int)
        assert c["run"] and all(isinstance(x, str) for x in c["run"])
        if c["run"][0].startswith("/usr/local/sbin/"):
            assert c["run"][0] in all_dests, f"{c['run'][0]} is run but not installed"
    for p in doc.get("packages", []):
        assert set(p["roles"]) <= ROLES and p["names"]


def test_every_template_of_these_tiers_is_installed_or_included() -> None:
    listed = {e["src"] for t in MY_TIERS for e in manifest(t)["files"] if "src" in e}
    included = {"app/hpc-portal.service"}  # written once per port by app/hpc-portal-units
    on_disk = {f"{t}/{p.name}" for t in MY_TIERS for p in (TEMPLATES / t).iterdir() if p.name != "manifest.yaml"}
    assert on_disk == listed | included


@pytest.mark.parametrize(("stack", "name", "ctx"), HOSTS, ids=IDS)
def test_common_files_render_the_same_bytes_twice(stack: str, name: str, ctx: dict[str, Any]) -> None:
    a, b = host_files(ctx, ("common",)), host_files(ctx, ("common",))
    assert a == b and len(a) == len(manifest("common")["files"])
    for dest, (data, _mode) in a.items():
        assert b"{{" not in data and b"{%" not in data, dest


# ---- /etc/hpc/stack.json ----------------------------------------------------------------


@pytest.mark.parametrize(("stack", "name", "ctx"), HOSTS, ids=IDS)
def test_stack_json_has_the_plain_facts_the_scripts_read(stack: str, name: str, ctx: dict[str, Any]) -> None:
    doc = json.loads(render_template("common/stack.json", ctx))
    assert {k: doc[k] for k in ("project", "stack", "region", "ssm_path", "domain")} == {
        k: ctx[k] for k in ("project", "stack", "region", "ssm_path", "domain")
    }
    assert doc["host"] == {k: ctx["host"][k] for k in ("name", "fqdn", "ip", "roles")}
    assert doc["efs"] == {
        "dns_name": ctx["efs"]["dns_name"],
        "mounts": [{"name": m["name"], "path": m["path"]} for m in ctx["efs"]["mounts"]],
    }
    assert doc["secrets"]["path"] == f"{ctx['ssm_path']}/secrets/"
    assert "aws_endpoint_url" not in doc
    assert not re.search(r"password\"?\s*:", json.dumps(doc), re.I), "names only, never values"


def test_stack_json_carries_the_endpoint_override_when_set() -> None:
    ctx = dict(contexts("dev")["app-1"], aws_endpoint_url="http://10.99.0.1:5000")
    assert json.loads(render_template("common/stack.json", ctx))["aws_endpoint_url"] == "http://10.99.0.1:5000"


# ---- chrony -----------------------------------------------------------------------------

CHRONY_DIRECTIVES = {
    "server",
    "pool",
    "confdir",
    "sourcedir",
    "keyfile",
    "driftfile",
    "ntsdumpdir",
    "logdir",
    "maxupdateskew",
    "rtcsync",
    "makestep",
    "leapsectz",
}


def test_chrony_prefers_amazon_time_sync_with_the_ubuntu_pool_as_fallback() -> None:
    text = render_template("common/chrony.conf", contexts("prod")["data-1"])
    lines = [line.split() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert {line[0] for line in lines} <= CHRONY_DIRECTIVES
    sources = [line for line in lines if line[0] in ("server", "pool")]
    assert sources[0][:2] == ["server", "169.254.169.123"] and {"prefer", "iburst"} <= set(sources[0])
    assert [s[1] for s in sources[1:]] == [
        "ntp.ubuntu.com",
        "0.ubuntu.pool.ntp.org",
        "1.ubuntu.pool.ntp.org",
        "2.ubuntu.pool.ntp.org",
    ]
    assert not any("prefer" in s for s in sources[1:])


# ---- rsyslog ----------------------------------------------------------------------------


def rsyslog_check(tmp: Path, conf: str, hosts: dict[str, str]) -> subprocess.CompletedProcess[str]:
    (tmp / "spool").mkdir(exist_ok=True)
    (tmp / "90-hpc-forward.conf").write_text(conf)
    # As on Ubuntu: rsyslog.conf sets the work directory and the local files
    # (50-default.conf), then includes rsyslog.d/*.conf.
    (tmp / "rsyslog.conf").write_text(
        f'global(workDirectory="{tmp}/spool")\n'
        f'*.* action(type="omfile" file="{tmp}/syslog")\n'
        f'include(file="{tmp}/90-hpc-forward.conf")\n'
    )
    return run_isolated(["rsyslogd", "-N1", "-f", str(tmp / "rsyslog.conf")], hosts=hosts, timeout=20)


@needs_ns
def test_rsyslogd_accepts_the_forwarding_config_of_every_host(tmp_path: Path) -> None:
    checked = forwarding = 0
    for stack, name, ctx in HOSTS:
        conf = render_template("common/90-hpc-forward.conf", ctx)
        d = tmp_path / f"{stack}-{name}"
        d.mkdir()
        r = rsyslog_check(d, conf, {ctx["loghost"]["name"]: ctx["loghost"]["ip"]})
        assert r.returncode == 0 and "error" not in r.stderr.lower(), (name, r.stderr)
        checked += 1
        if ctx["host"]["ip"] == ctx["loghost"]["ip"]:
            assert "action(" not in conf, f"{name} is the log host: it must not forward to itself"
        else:
            forwarding += 1
            action = conf[conf.index("*.* action(") :]
            for want in (
                'type="omfwd"',
                f'target="{ctx["loghost"]["name"]}"',
                f'port="{ctx["loghost"]["port"]}"',
                'protocol="tcp"',
                'queue.type="LinkedList"',
                'queue.filename="hpc-forward"',
                'queue.saveOnShutdown="on"',
                'action.resumeRetryCount="-1"',
            ):
                assert want in action, (name, want)
    loghosts = [(s, n) for s, n, c in HOSTS if c["host"]["ip"] == c["loghost"]["ip"]]
    assert sorted(s for s, _ in loghosts) == ["dev", "prod"], "one log host per stack"
    assert checked == len(HOSTS) and forwarding == len(HOSTS) - len(loghosts) > 0


@needs_ns
def test_rsyslogd_rejects_a_broken_twin(tmp_path: Path) -> None:
    ctx = contexts("prod")["app-1"]
    conf = render_template("common/90-hpc-forward.conf", ctx).replace('queue.type="LinkedList"', 'queue.typ="LinkedList"')
    r = rsyslog_check(tmp_path, conf, {ctx["loghost"]["name"]: ctx["loghost"]["ip"]})
    assert r.returncode != 0 and "queue.typ" in r.stderr


# ---- unattended-upgrades ----------------------------------------------------------------

# Ubuntu 24.04's /etc/apt/apt.conf.d/50unattended-upgrades (the part that matters here).
UBUNTU_50UU = """\
Unattended-Upgrade::Allowed-Origins {
        "${distro_id}:${distro_codename}";
        "${distro_id}:${distro_codename}-security";
        "${distro_id}ESMApps:${distro_codename}-apps-security";
        "${distro_id}ESM:${distro_codename}-infra-security";
//      "${distro_id}:${distro_codename}-updates";
};
Unattended-Upgrade::Package-Blacklist {
};
Unattended-Upgrade::DevRelease "auto";
"""


def apt_dump(tmp: Path, parts: dict[str, str]) -> subprocess.CompletedProcess[str]:
    d = tmp / "apt.conf.d"
    d.mkdir(exist_ok=True)
    for name, text in parts.items():
        (d / name).write_text(text)
    (tmp / "apt.conf").write_text(f'Dir::Etc::Parts "{d}";\nDir::Etc::main "/dev/null";\n')
    return subprocess.run(
        ["apt-config", "dump"], env=dict(os.environ, APT_CONFIG=str(tmp / "apt.conf")), capture_output=True, text=True, timeout=20
    )


def apt_values(dump: str, key: str) -> list[str]:
    pat = re.compile(rf'^{re.escape(key)}(?:::)? "(.*)";$')
    return [m.group(1) for line in dump.splitlines() if (m := pat.match(line)) and m.group(1)]


def test_apt_reads_security_only_origins_and_the_blacklist_after_ubuntus_defaults(tmp_path: Path) -> None:
    ctx = contexts("prod")["data-1"]
    r = apt_dump(
        tmp_path,
        {
            "50unattended-upgrades": UBUNTU_50UU,
            "20auto-upgrades": render_template("common/20auto-upgrades", ctx),
            "51hpc-unattended-upgrades": render_template("common/51hpc-unattended-upgrades", ctx),
        },
    )
    assert r.returncode == 0, r.stderr
    origins = apt_values(r.stdout, "Unattended-Upgrade::Allowed-Origins")
    assert origins == [
        "${distro_id}:${distro_codename}-security",
        "${distro_id}ESMApps:${distro_codename}-apps-security",
        "${distro_id}ESM:${distro_codename}-infra-security",
    ]
    assert all(o.endswith("-security") for o in origins)
    assert apt_values(r.stdout, "Unattended-Upgrade::Automatic-Reboot") == ["false"]
    assert apt_values(r.stdout, "APT::Periodic::Update-Package-Lists") == ["1"]
    assert apt_values(r.stdout, "APT::Periodic::Unattended-Upgrade") == ["1"]

    # unattended-upgrades matches each entry with re.match against the package name.
    blacklist = apt_values(r.stdout, "Unattended-Upgrade::Package-Blacklist")
    held = [
        "mariadb-server",
        "mariadb-server-core",
        "mariadb-client",
        "libmariadb3",
        "galera-4",
        "redis-server",
        "redis-sentinel",
        "redis-tools",
        "slurmctld",
        "slurmd",
        "slurmdbd",
        "slurm-client",
        "slurm-wlm-basic-plugins",
        "libslurm38",
        "munge",
        "libmunge2",
        "keepalived",
        "haproxy",
    ]
    free = [
        "nginx",
        "openssl",
        "libssl3t64",
        "libc6",
        "linux-image-aws",
        "python3",
        "chrony",
        "rsyslog",
        "prometheus-node-exporter",
        "haproxy-doc",
        "keepalived-extra",
        "sudo",
    ]
    assert [p for p in held if not any(re.match(b, p) for b in blacklist)] == []
    assert [p for p in free if any(re.match(b, p) for b in blacklist)] == []


def test_apt_config_rejects_a_broken_twin(tmp_path: Path) -> None:
    text = render_template("common/51hpc-unattended-upgrades", contexts("prod")["data-1"])
    # apt's parser is lenient (a list entry without ";" silently becomes a key, which the
    # test above would catch); a statement without ";" at the end of the file is an error.
    broken = text.replace('Automatic-Reboot-WithUsers "false";', 'Automatic-Reboot-WithUsers "false"')
    assert broken != text
    r = apt_dump(tmp_path, {"51hpc-unattended-upgrades": broken})
    assert r.returncode != 0 and "51hpc-unattended-upgrades" in r.stderr


# ---- needrestart ------------------------------------------------------------------------

# needrestart's own loading and selection logic: defaults, needrestart.conf, then each
# conf.d/*.conf eval'd in order; a service is restarted unless the first matching
# override_rc key (sorted) says 0; NEEDRESTART_MODE overrides $nrconf{restart}.
NEEDRESTART_HARNESS = r"""
our %nrconf = (restart => 'i', defno => 0, override_rc => {qr(^dbus) => 0, qr(^cron) => 1});
foreach my $fn (@ARGV) {
    eval do { local(@ARGV, $/) = $fn; <> };
    die "Error parsing $fn: $@" if($@);
}
print "restart=$nrconf{restart}\n";
my @keys = sort keys %{$nrconf{override_rc}};
foreach my $rc (qw(mariadb.service redis-server.service redis-sentinel.service slurmctld.service
                   slurmdbd.service munge.service keepalived.service haproxy.service hpc-dbwriter.service
                   hpc-portal-api-5010.service nginx.service cron.service ssh.service)) {
    my $restart = !$nrconf{defno};
    foreach my $re (@keys) { next unless($rc =~ /$re/); $restart = $nrconf{override_rc}->{$re}; last; }
    print "$rc=", ($restart ? 1 : 0), "\n";
}
"""


def needrestart(tmp: Path, conf: str) -> subprocess.CompletedProcess[str]:
    f = tmp / "50-hpc.conf"
    f.write_text(conf)
    return subprocess.run(["perl", "-e", NEEDRESTART_HARNESS, str(f)], capture_output=True, text=True, timeout=20)


def test_needrestart_lists_only_and_never_selects_the_stateful_daemons(tmp_path: Path) -> None:
    conf = render_template("common/50-hpc.conf", contexts("prod")["data-1"])
    assert subprocess.run(["perl", "-c", "-e", conf], capture_output=True).returncode == 0
    r = needrestart(tmp_path, conf)
    assert r.returncode == 0, r.stderr
    got = dict(line.split("=", 1) for line in r.stdout.split())
    assert got.pop("restart") == "l"
    assert {k for k, v in got.items() if v == "1"} == {"nginx.service", "cron.service", "ssh.service"}


def test_needrestart_rejects_a_broken_twin(tmp_path: Path) -> None:
    conf = render_template("common/50-hpc.conf", contexts("prod")["data-1"]).replace("= 'l';", "= 'l'\n$x = ;")
    r = needrestart(tmp_path, conf)
    assert r.returncode != 0 and "Error parsing" in r.stderr


# ---- prometheus-node-exporter -----------------------------------------------------------


def exporter_args(text: str) -> list[str]:
    """systemd reads ARGS="..." from the EnvironmentFile and splits $ARGS on whitespace."""
    values = dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert set(values) == {"ARGS"}
    return shlex.split(values["ARGS"])[0].split()


@needs_ns
def test_node_exporter_starts_with_these_args_and_serves_the_textfile_directory(tmp_path: Path) -> None:
    args = exporter_args(render_template("common/prometheus-node-exporter", contexts("prod")["mon-1"]))
    assert "--collector.textfile.directory=/var/lib/prometheus/node-exporter" in args
    textfile = tmp_path / "textfile"
    textfile.mkdir()
    (textfile / "hpc_test.prom").write_text("hpc_test_metric 42\n")
    script = textwrap.dedent(f"""\
        prometheus-node-exporter {shlex.join(args)} --web.listen-address=127.0.0.1:19100 2>{tmp_path}/log &
        pid=$!
        for _ in $(seq 100); do
            curl -fsS -o {tmp_path}/metrics http://127.0.0.1:19100/metrics && break
            sleep 0.1
        done
        kill $pid
        wait $pid || true
        test -s {tmp_path}/metrics
    """)
    r = run_isolated(["bash", "-c", script], binds={str(textfile): "/var/lib/prometheus/node-exporter"}, timeout=30)
    assert r.returncode == 0, r.stderr + (tmp_path / "log").read_text()
    metrics = (tmp_path / "metrics").read_text()
    assert "hpc_test_metric 42" in metrics
    assert "node_textfile_scrape_error 0" in metrics


def test_node_exporter_rejects_a_broken_twin() -> None:
    args = exporter_args(render_template("common/prometheus-node-exporter", contexts("prod")["mon-1"]))
    broken = [a.replace("--collector.textfile.directory", "--collector.textfile.dir") for a in args]
    r = subprocess.run(
        ["prometheus-node-exporter", *broken, "--web.listen-address=127.0.0.1:19101"], capture_output=True, text=True, timeout=20
    )
    assert r.returncode != 0 and "collector.textfile.dir" in r.stderr


# ---- systemd units ----------------------------------------------------------------------


def verify(root: Path, *units: str) -> subprocess.CompletedProcess[str]:
    return hostfiles.verify_units(root, list(units), timeout=30)


def test_systemd_accepts_hpc_fetch_secrets_service(tmp_path: Path) -> None:
    root = hostfiles.fake_root(tmp_path, host_files(contexts("prod")["data-1"], ("common",)))
    r = verify(root, "hpc-fetch-secrets.service")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    unit = (root / "etc/systemd/system/hpc-fetch-secrets.service").read_text()
    assert "WantedBy=multi-user.target" in unit and "Type=oneshot" in unit and "RemainAfterExit=yes" in unit


def test_systemd_rejects_a_broken_twin(tmp_path: Path) -> None:
    files = host_files(contexts("prod")["data-1"], ("common",))
    data, mode = files["/etc/systemd/system/hpc-fetch-secrets.service"]
    files["/etc/systemd/system/hpc-fetch-secrets.service"] = (data.replace(b"Type=oneshot", b"Type=oneshots"), mode)
    del files["/usr/local/sbin/hpc-fetch-secrets"]
    r = verify(hostfiles.fake_root(tmp_path, files), "hpc-fetch-secrets.service")
    assert r.returncode != 0
    assert "oneshots" in r.stderr and "/usr/local/sbin/hpc-fetch-secrets" in r.stderr


# ---- cloud-config keys ------------------------------------------------------------------


def cloud_config_check(tmp: Path, doc: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    f = tmp / "user-data"
    f.write_text("#cloud-config\n" + yaml.safe_dump(doc))
    return subprocess.run(["cloud-init", "schema", "-c", str(f)], capture_output=True, text=True, timeout=30)


def test_cloud_init_accepts_the_common_cloud_config_keys(tmp_path: Path) -> None:
    from cloud_init.render import ALLOWED_CLOUD_CONFIG_KEYS, render_host

    keys = manifest("common")["cloud_config"]
    assert set(keys) <= ALLOWED_CLOUD_CONFIG_KEYS
    ctx = contexts("prod")["app-1"]
    doc = {"hostname": ctx["host"]["name"], "fqdn": ctx["host"]["fqdn"], "prefer_fqdn_over_hostname": False, **keys}
    r = cloud_config_check(tmp_path, doc)
    assert r.returncode == 0, r.stdout + r.stderr
    assert render_host(ctx).cloud_config["timezone"] == "Etc/UTC"


def test_cloud_init_rejects_a_broken_twin(tmp_path: Path) -> None:
    r = cloud_config_check(tmp_path, {"hostname": "app-1", "timezone": 9, "prefer_fqdn_over_hostname": "no"})
    assert r.returncode != 0 and "timezone" in r.stdout + r.stderr
