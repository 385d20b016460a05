"""Monitoring tier: every rendered file is accepted by the tool that reads it.

Checked with Debian 12's tools (promtool 2.42, amtool/Alertmanager 0.25, blackbox
exporter 0.23, rsyslog 8.2302, logrotate 3.21); the hosts run Ubuntu 24.04's newer ones.
- prometheus.yml with its rule files: `promtool check config`; rules: `promtool check
  rules` and the unit tests `promtool test rules` (each alert fires after its `for:`
  window and not for healthy series);
- both Alertmanager routing variants: `amtool check-config`, the routing tree
  (`amtool config routes test`), the Slack templates (`amtool template render`), and
  Alertmanager itself starting with them and its /etc/default flags;
- blackbox.yml: `prometheus-blackbox-exporter --config.check` with the rendered flags;
- the rsyslog receiver: `rsyslogd -N1`, and live: a message sent over TCP lands in
  /var/log/hpc/<host>/<program>.log and a hostile host name cannot leave that tree;
- logrotate, the Grafana provisioning files and dashboards (structure, PromQL syntax,
  metric names the exporters really export), the systemd drop-in, the boot script.
Every checker also rejects a deliberately broken rendering.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from cloud_init.templating import TEMPLATES, render_template
from components.stackfile import stack_files
from offline.contexts import contexts
from tests.nsrun import can_isolate, run_isolated

STACKS = tuple(sorted(stack_files()))  # every Pulumi.<stack>.yaml
MANIFEST = TEMPLATES / "monitoring" / "manifest.yaml"
RUNBOOKS = Path(__file__).resolve().parents[1] / "docs" / "runbooks"
needs_ns = pytest.mark.skipif(not can_isolate(), reason="needs root and unshare for namespaces")

REQUIRED_ALERTS = {
    "ServerDown", "RedisDown", "DatabaseDown", "GaleraClusterSize", "GaleraNotPrimary", "RedisNoMaster",
    "HAProxyBackendDown", "SlurmctldDown", "CertificateExpiry", "BackupTooOld", "Watchdog",
}

# Metric names the scraped exporters really export (checked against the running
# exporters or their sources): alerts and dashboards may use only these.
KNOWN_METRICS = {
    # Prometheus itself
    "up",
    # node_exporter (run here: prometheus-node-exporter 1.5)
    "node_cpu_seconds_total", "node_memory_MemAvailable_bytes", "node_memory_MemTotal_bytes",
    "node_filesystem_avail_bytes", "node_filesystem_size_bytes", "node_load1",
    "node_network_receive_bytes_total", "node_network_transmit_bytes_total",
    "node_textfile_mtime_seconds", "node_textfile_scrape_error", "node_boot_time_seconds",
    # HAProxy's prometheus-exporter service (run here: HAProxy 2.6)
    "haproxy_backend_active_servers", "haproxy_backend_backup_servers", "haproxy_backend_status",
    "haproxy_server_status", "haproxy_backend_http_requests_total", "haproxy_backend_http_responses_total",
    "haproxy_backend_response_time_average_seconds", "haproxy_frontend_current_sessions",
    "haproxy_backend_current_sessions",
    # mysqld_exporter: mysql_up and SHOW GLOBAL STATUS as mysql_global_status_<name>
    # (wsrep_cluster_status: Primary -> 1)
    "mysql_up", "mysql_global_status_wsrep_cluster_size", "mysql_global_status_wsrep_cluster_status",
    "mysql_global_status_wsrep_local_state", "mysql_global_status_wsrep_flow_control_paused",
    "mysql_global_status_wsrep_flow_control_paused_ns",
    "mysql_global_status_wsrep_local_recv_queue", "mysql_global_status_threads_connected",
    "mysql_global_status_queries",
    # redis_exporter
    "redis_up", "redis_instance_info", "redis_connected_slaves", "redis_master_link_up",
    "redis_connected_clients", "redis_memory_used_bytes", "redis_commands_processed_total", "redis_db_keys",
    # blackbox_exporter
    "probe_success", "probe_duration_seconds", "probe_ssl_earliest_cert_expiry",
    # textfile collector: hpc-slurm-metrics and the backup job
    "hpc_slurm_controller_up", "hpc_slurm_nodes", "hpc_slurm_jobs", "hpc_slurm_collector_success",
    "hpc_slurm_collector_last_run_timestamp_seconds", "hpc_backup_last_success_timestamp_seconds",
    "hpc_slurmctld_running", "hpc_slurmctld_state_change_timestamp_seconds",
    "hpc_slurm_state_dir_up", "hpc_slurm_state_dir_probe_seconds",
}


def manifest() -> dict[str, Any]:
    return yaml.safe_load(MANIFEST.read_text())


def monitoring_ctx(stack: str) -> dict[str, Any]:
    ctxs = contexts(stack)
    names = [n for n, c in ctxs.items() if "monitoring" in c["host"]["roles"]]
    assert len(names) == 1, names
    return ctxs[names[0]]


def render_all(stack: str) -> dict[str, str]:
    """dest -> rendered text of every template this tier installs on the monitoring host."""
    ctx = monitoring_ctx(stack)
    return {f["dest"]: render_template(f["src"], ctx) for f in manifest()["files"]}


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    kw.setdefault("timeout", 60)
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


# ---------------------------------------------------------------------------- manifest


def test_manifest_lists_existing_templates_for_the_monitoring_role():
    m = manifest()
    assert len(m["files"]) >= 15
    dests = [f["dest"] for f in m["files"]]
    assert len(dests) == len(set(dests))
    for f in m["files"]:
        assert (TEMPLATES / f["src"]).is_file(), f["src"]
        assert f["roles"] == ["monitoring"]
        assert f["secret_placeholders"] is False
    assert [c["order"] for c in m["commands"]] == [80]
    apt = m["cloud_config"]["apt"]
    src = apt["sources"]["grafana"]
    assert apt["roles"] == ["monitoring"]
    assert src["source"].startswith("deb [signed-by=$KEY_FILE] https://apt.grafana.com ")
    assert re.fullmatch(r"[0-9A-F]{40}", src["keyid"]) and src["keyserver"]


def test_no_secret_in_any_rendered_file():
    """Secrets reach the host at boot only: the templates name the files they come from."""
    checked = 0
    for stack in STACKS:
        for dest, text in render_all(stack).items():
            assert "hooks.slack.com" not in text, dest
            assert "api_url:" not in text, dest
            assert not re.search(r"GF_SECURITY_ADMIN_PASSWORD=(?!'%s')", text), dest
            assert not re.search(r"(?i)password\s*[:=]\s*[\"']?\w", text.replace("_password", "")), dest
            checked += 1
    assert checked > 30


# --------------------------------------------------------------------- prometheus.yml


def write_prometheus_tree(root: Path, files: dict[str, str]) -> Path:
    (root / "rules").mkdir(parents=True, exist_ok=True)
    (root / "prometheus.yml").write_text(files["/etc/prometheus/prometheus.yml"])
    (root / "rules" / "hpc-alerts.yml").write_text(files["/etc/prometheus/rules/hpc-alerts.yml"])
    return root / "prometheus.yml"


@pytest.mark.parametrize("stack", STACKS)
def test_prometheus_config_and_its_rule_files_pass_promtool(stack, tmp_path):
    cfg = write_prometheus_tree(tmp_path, render_all(stack))
    r = run(["promtool", "check", "config", str(cfg)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 1 rule files found" in r.stdout, r.stdout
    assert re.search(r"SUCCESS: \d+ rules found", r.stdout), r.stdout


def test_broken_prometheus_config_is_rejected(tmp_path):
    files = render_all("prod")
    files["/etc/prometheus/prometheus.yml"] = files["/etc/prometheus/prometheus.yml"].replace(
        "scrape_interval: 15s", "scrape_interval: fifteen")
    r = run(["promtool", "check", "config", str(write_prometheus_tree(tmp_path, files))])
    assert r.returncode != 0


@pytest.mark.parametrize("stack", STACKS)
def test_every_host_is_scraped_with_its_exporters(stack):
    ctx = monitoring_ctx(stack)
    cfg = yaml.safe_load(render_all(stack)["/etc/prometheus/prometheus.yml"])
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}

    def targets(job: str) -> dict[str, str]:
        return {sc["labels"]["host"]: t for sc in jobs[job]["static_configs"] for t in sc["targets"]}

    by_name = {h["name"]: h for h in ctx["hosts"]}
    assert targets("node") == {n: f"{h['ip']}:9100" for n, h in by_name.items()}
    assert targets("haproxy") == {n: f"{by_name[n]['ip']}:{ctx['lb']['stats_port']}" for n in ctx["role_hosts"]["lb"]}
    assert targets("mysqld") == {n: f"{by_name[n]['ip']}:9104" for n in ctx["role_hosts"]["data"]}
    assert targets("redis") == {n: f"{by_name[n]['ip']}:9121" for n in ctx["role_hosts"]["data"]}
    assert targets("blackbox-tls") == {n: f"{by_name[n]['ip']}:443" for n in ctx["role_hosts"]["lb"]}
    vip = jobs["blackbox-vip"]["static_configs"][0]["targets"]
    assert vip == [f"https://{ctx['vip']['public_ip']}/health"]
    assert cfg["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["127.0.0.1:9093"]
    bb = yaml.safe_load(render_all(stack)["/etc/prometheus/blackbox.yml"])["modules"]
    for job in ("blackbox-vip", "blackbox-tls", "clustercheck"):
        assert jobs[job]["params"]["module"][0] in bb, job


# ------------------------------------------------------------------------------ rules


def rules_doc(stack: str) -> dict[str, Any]:
    return yaml.safe_load(render_all(stack)["/etc/prometheus/rules/hpc-alerts.yml"])


def alert_rules(stack: str) -> list[dict[str, Any]]:
    return [r for g in rules_doc(stack)["groups"] for r in g["rules"] if "alert" in r]


def test_rules_cover_the_required_alerts_with_severity_summary_and_runbook():
    for stack in STACKS:
        rules = alert_rules(stack)
        names = {r["alert"] for r in rules}
        assert REQUIRED_ALERTS <= names, REQUIRED_ALERTS - names
        base = monitoring_ctx(stack)["monitoring"]["runbook_base"]
        for r in rules:
            assert r["labels"]["severity"] in {"critical", "warning", "none"}, r["alert"]
            assert r["annotations"]["summary"], r["alert"]
            assert r["annotations"]["runbook_url"] == f"{base}/{r['alert']}.md"
            page = RUNBOOKS / f"{r['alert']}.md"
            assert page.is_file(), f"runbook {page} missing"
            assert page.read_text().startswith(f"# {r['alert']}"), page
    by_name = {r["alert"]: r for r in alert_rules("prod")}
    assert by_name["ServerDown"]["expr"] == "up == 0" and by_name["ServerDown"]["for"] == "20s"
    assert by_name["RedisDown"]["expr"] == "redis_up == 0" and by_name["RedisDown"]["for"] == "20s"
    assert by_name["DatabaseDown"]["expr"] == "mysql_up == 0" and by_name["DatabaseDown"]["for"] == "20s"
    assert by_name["Watchdog"]["expr"] == "vector(1)"
    for stack in STACKS:
        size = monitoring_ctx(stack)["monitoring"]["expected_galera_size"]
        expr = {r["alert"]: r for r in alert_rules(stack)}["GaleraClusterSize"]["expr"]
        assert expr == f"mysql_global_status_wsrep_cluster_size < {size}"


def test_rule_files_pass_promtool_check_rules_and_a_broken_one_does_not(tmp_path):
    checked = 0
    for stack in STACKS:
        p = tmp_path / f"{stack}.yml"
        p.write_text(render_all(stack)["/etc/prometheus/rules/hpc-alerts.yml"])
        r = run(["promtool", "check", "rules", str(p)])
        assert r.returncode == 0, r.stdout + r.stderr
        checked += 1
    assert checked == len(STACKS) >= 2
    broken = tmp_path / "broken.yml"
    broken.write_text(render_all("prod")["/etc/prometheus/rules/hpc-alerts.yml"].replace(
        "expr: redis_up == 0", "expr: redis_up === 0"))
    assert run(["promtool", "check", "rules", str(broken)]).returncode != 0


# The rules' unit tests: the outage alerts evaluated every 5 s, the alerts whose windows
# are hours long every minute (a day of 5 s steps takes promtool minutes).
RULE_TESTS = ("hpc-alerts.test.yml", "hpc-alerts-long.test.yml")


def write_rule_tests(root: Path, stack: str, rules_text: str | None = None, only: str | None = None) -> list[Path]:
    """The rendered rules and their unit test files side by side; `only` keeps the test
    groups of one alert (and the files that have any)."""
    root.mkdir(parents=True, exist_ok=True)
    ctx = monitoring_ctx(stack)
    (root / "hpc-alerts.yml").write_text(rules_text or render_template("monitoring/hpc-alerts.yml", ctx))
    written = []
    for name in RULE_TESTS:
        text = render_template(f"monitoring/tests/{name}", ctx)
        if only:
            doc = yaml.safe_load(text)
            doc["tests"] = [g for g in doc["tests"] if {t["alertname"] for t in g["alert_rule_test"]} == {only}]
            if not doc["tests"]:
                continue
            text = yaml.safe_dump(doc, sort_keys=False)
        (root / name).write_text(text)
        written.append(root / name)
    assert written, only
    return written


@pytest.mark.parametrize("stack", STACKS)
def test_alert_unit_tests_pass(stack, tmp_path):
    tests = write_rule_tests(tmp_path, stack)
    assert len(tests) == len(RULE_TESTS)
    r = run(["promtool", "test", "rules", *(t.name for t in tests)], cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("SUCCESS") == len(RULE_TESTS)
    tested = {t["alertname"] for f in tests for g in yaml.safe_load(f.read_text())["tests"] for t in g["alert_rule_test"]}
    assert tested == {r["alert"] for r in alert_rules(stack)}, "every alert has a unit test"


@pytest.mark.parametrize("alert,old,new", [
    ("ServerDown", "expr: up == 0\n        for: 20s", "expr: up == 0\n        for: 25s"),
    ("HAProxyBackendDown", "haproxy_backend_active_servers + haproxy_backend_backup_servers == 0",
     "haproxy_backend_active_servers == 0"),
    ("RedisNoMaster", "(count(redis_instance_info{role=\"master\"}) or vector(0)) == 0",
     "count(redis_instance_info{role=\"master\"}) == 0"),
], ids=["ServerDown-for-window", "HAProxy-backup-servers", "RedisNoMaster-empty-count"])
def test_alert_unit_tests_catch_a_changed_rule(alert, old, new, tmp_path):
    """The negative twin: a rule that fires later, or not at all, fails its unit test."""
    rules = render_template("monitoring/hpc-alerts.yml", monitoring_ctx("prod"))
    assert old in rules
    tests = write_rule_tests(tmp_path / "as-rendered", "prod", rules, only=alert)
    r = run(["promtool", "test", "rules", *(t.name for t in tests)], cwd=tests[0].parent)
    assert r.returncode == 0, r.stdout + r.stderr
    tests = write_rule_tests(tmp_path / "changed", "prod", rules.replace(old, new, 1), only=alert)
    r = run(["promtool", "test", "rules", *(t.name for t in tests)], cwd=tests[0].parent)
    assert r.returncode != 0 and f"alertname: {alert}" in r.stdout + r.stderr


# ------------------------------------------------------------------------- alertmanager

AM_VARIANTS = ("slack", "null")


def am_file(stack: str, variant: str) -> str:
    return render_all(stack)[f"/etc/prometheus/alertmanager-{variant}.yml"]


def test_both_routing_variants_pass_amtool_and_route_as_intended(tmp_path):
    checked = 0
    for stack in STACKS:
        for variant in AM_VARIANTS:
            p = tmp_path / f"{stack}-{variant}.yml"
            p.write_text(am_file(stack, variant))
            r = run(["amtool", "check-config", str(p)])
            assert r.returncode == 0, r.stdout + r.stderr
            route = run(["amtool", "config", "routes", "test", f"--config.file={p}",
                         "alertname=ServerDown", "severity=critical"])
            assert route.stdout.strip() == ("slack" if variant == "slack" else "null"), route.stdout + route.stderr
            wd = run(["amtool", "config", "routes", "test", f"--config.file={p}", "alertname=Watchdog", "severity=none"])
            assert wd.stdout.strip() == "deadmans-switch", wd.stdout + wd.stderr
            cfg = yaml.safe_load(p.read_text())
            assert cfg["route"]["group_by"] == ["alertname"]
            checked += 1
    assert checked == 2 * len(STACKS) >= 4
    slack = yaml.safe_load(am_file("prod", "slack"))["receivers"][0]["slack_configs"][0]
    assert slack["api_url_file"] == "/etc/prometheus/alertmanager-slack-url"
    assert slack["channel"] == monitoring_ctx("prod")["monitoring"]["slack_channel"]


def test_broken_alertmanager_config_is_rejected(tmp_path):
    p = tmp_path / "broken.yml"
    p.write_text(am_file("prod", "slack").replace("receiver: deadmans-switch", "receiver: nobody"))
    r = run(["amtool", "check-config", str(p)])
    assert r.returncode != 0 and "nobody" in r.stdout + r.stderr


def _render_am_template(text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    glob = tmp_path / "empty.tmpl"
    glob.write_text("")
    return run(["amtool", "template", "render", f"--template.glob={glob}", f"--template.text={text}"])


def test_slack_message_templates_render_and_a_broken_one_does_not(tmp_path):
    slack = yaml.safe_load(am_file("prod", "slack"))["receivers"][0]["slack_configs"][0]
    for field in ("title", "title_link", "text"):
        r = _render_am_template(slack[field], tmp_path)
        assert r.returncode == 0, f"{field}: {r.stderr}"
    # amtool renders with placeholder data: the fixed parts of the title come through.
    assert _render_am_template(slack["title"], tmp_path).stdout.startswith("[")
    assert _render_am_template(slack["title"].replace("toUpper", "noSuchFunction"), tmp_path).returncode != 0


def _defaults_args(text: str) -> list[str]:
    r = run(["bash", "-c", 'set -eu; source /dev/stdin; printf "%s\\n" $ARGS'], input=text)
    assert r.returncode == 0, r.stderr
    return [a for a in r.stdout.splitlines() if a]


def _alertmanager_starts(config: str, args: list[str], work: Path) -> tuple[bool, str]:
    """Start Alertmanager (in a namespace) with the rendered flags and config; True once
    it has loaded the configuration and listens."""
    (work / "etc").mkdir()
    (work / "data").mkdir()
    shutil.chown(work / "data", "prometheus", "prometheus")
    (work / "etc" / "alertmanager.yml").write_text(config)
    (work / "etc" / "alertmanager-slack-url").write_text("https://hooks.example.invalid/x")
    script = f"""
        chmod 0755 {work} {work}/etc
        runuser -u prometheus -- prometheus-alertmanager {" ".join(args)} \\
            --storage.path={work}/data --web.listen-address=127.0.0.1:19093 >{work}/am.log 2>&1 &
        pid=$!
        for i in $(seq 100); do
            grep -q 'Completed loading of configuration file' {work}/am.log && break
            kill -0 $pid 2>/dev/null || break
            sleep 0.1
        done
        kill $pid 2>/dev/null; wait $pid || true
    """
    r = run_isolated(["bash", "-c", script], binds={str(work / "etc"): "/etc/prometheus"}, timeout=60)
    log = (work / "am.log").read_text(errors="replace") if (work / "am.log").exists() else r.stderr
    return "Completed loading of configuration file" in log, log


@needs_ns
@pytest.mark.daemons
@pytest.mark.skipif(shutil.which("prometheus-alertmanager") is None, reason="prometheus-alertmanager not installed")
def test_alertmanager_starts_with_each_variant_and_the_rendered_flags():
    args = _defaults_args(render_all("prod")["/etc/default/prometheus-alertmanager"])
    assert "--cluster.listen-address=" in args
    started = 0
    for variant in AM_VARIANTS:
        work = Path(tempfile.mkdtemp(prefix="hpc-am-", dir="/tmp"))
        try:
            ok, log = _alertmanager_starts(am_file("prod", variant), args, work)
            assert ok, f"{variant}:\n{log[-3000:]}"
            started += 1
        finally:
            shutil.rmtree(work, ignore_errors=True)
    assert started == 2
    work = Path(tempfile.mkdtemp(prefix="hpc-am-", dir="/tmp"))
    try:  # negative twin: a flag Alertmanager does not know
        ok, log = _alertmanager_starts(am_file("prod", "null"), args + ["--cluster.no-such-flag"], work)
        assert not ok and "no-such-flag" in log
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------- blackbox

BLACKBOX = shutil.which("prometheus-blackbox-exporter")


def _blackbox_check(config: str, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    etc = tmp_path / "etc"
    etc.mkdir(exist_ok=True)
    (etc / "blackbox.yml").write_text(config)
    # The flags name /etc/prometheus/blackbox.yml: bind the rendered file's directory there.
    return run_isolated([BLACKBOX or "prometheus-blackbox-exporter", *args, "--config.check"],
                        binds={str(etc): "/etc/prometheus"})


@needs_ns
@pytest.mark.skipif(BLACKBOX is None, reason="prometheus-blackbox-exporter not installed")
def test_blackbox_config_and_flags_pass_config_check(tmp_path):
    for stack in STACKS:
        files = render_all(stack)
        args = _defaults_args(files["/etc/default/prometheus-blackbox-exporter"])
        assert "--web.listen-address=127.0.0.1:9115" in args
        r = _blackbox_check(files["/etc/prometheus/blackbox.yml"], args, tmp_path)
        assert r.returncode == 0 and "Config file is ok" in r.stderr, r.stderr
    broken = files["/etc/prometheus/blackbox.yml"].replace("fail_if_not_ssl: true", "fail_if_not_tls: true")
    r = _blackbox_check(broken, args, tmp_path)
    assert r.returncode != 0 and "fail_if_not_tls" in r.stderr


# ------------------------------------------------------------------------------ rsyslog


def rsyslog_check(text: str, tmp_path: Path, name: str) -> subprocess.CompletedProcess[str]:
    p = tmp_path / name
    p.write_text(text)
    return run(["rsyslogd", "-N1", "-f", str(p)])


def test_loghost_receiver_and_the_forwarder_pass_rsyslogd(tmp_path):
    checked = 0
    for stack in STACKS:
        ctx = monitoring_ctx(stack)
        text = render_all(stack)["/etc/rsyslog.d/10-hpc-loghost.conf"]
        assert f'address="{ctx["host"]["ip"]}" port="{ctx["loghost"]["port"]}"' in text
        assert ctx["loghost"]["ip"] == ctx["host"]["ip"], "the loghost name must point at the monitoring host"
        r = rsyslog_check(text, tmp_path, f"{stack}-loghost.conf")
        assert r.returncode == 0, r.stderr
        checked += 1
        # The other side: what every other host forwards with (common tier).
        if (TEMPLATES / "common" / "90-hpc-forward.conf").is_file():
            other = next(c for c in contexts(stack).values() if "monitoring" not in c["host"]["roles"])
            fwd = render_template("common/90-hpc-forward.conf", other)
            assert "omfwd" in fwd and f'port="{ctx["loghost"]["port"]}"' in fwd
            r = rsyslog_check(fwd, tmp_path, f"{stack}-forward.conf")
            assert r.returncode == 0, r.stderr
            checked += 1
    assert checked >= 2


def test_broken_receiver_is_rejected_by_rsyslogd(tmp_path):
    text = render_all("prod")["/etc/rsyslog.d/10-hpc-loghost.conf"].replace('createDirs="on"', 'createDirz="on"')
    r = rsyslog_check(text, tmp_path, "broken.conf")
    assert r.returncode != 0 and "createDirz" in r.stderr


@needs_ns
@pytest.mark.daemons
def test_loghost_files_messages_per_host_and_program(tmp_path):
    """rsyslogd with the rendered receiver, in a namespace on the host's IP: a message
    sent over TCP lands in /var/log/hpc/<host>/<program>.log; a sender claiming the host
    name ".." or "../../etc" stays inside /var/log/hpc."""
    ctx = monitoring_ctx("prod")
    ip, port = ctx["host"]["ip"], ctx["loghost"]["port"]
    logdir = Path(tempfile.mkdtemp(prefix="hpc-loghost-", dir="/tmp"))
    try:
        conf = logdir / "rsyslog.conf"
        conf.write_text(render_all("prod")["/etc/rsyslog.d/10-hpc-loghost.conf"])
        (logdir / "log").mkdir()
        (logdir / "work").mkdir()
        script = f"""
            rsyslogd -n -f {conf} -i {logdir}/work/rsyslogd.pid >{logdir}/work/rsyslogd.out 2>&1 &
            pid=$!
            for i in $(seq 50); do (exec 3<>/dev/tcp/{ip}/{port}) 2>/dev/null && break; sleep 0.1; done
            logger --tcp --server {ip} --port {port} --tag portal-api -- "hello from the portal"
            exec 3<>/dev/tcp/{ip}/{port}
            printf '<13>Nov 26 08:00:00 .. evil1: dots\\n<13>Nov 26 08:00:00 ../../etc evil2: climb\\n' >&3
            exec 3>&-
            for i in $(seq 50); do
                grep -rqs climb /var/log/hpc && [ -s /var/log/hpc/{ctx["host"]["name"]}/portal-api.log ] && break
                sleep 0.1
            done
            kill $pid; wait $pid || true
            find /var/log -type f | sort
        """
        r = run_isolated(["bash", "-c", script], hostname=ctx["host"]["name"], extra_ips=[ip],
                         binds={str(logdir / "log"): "/var/log"}, timeout=60)
        files = [line for line in r.stdout.splitlines() if line.startswith("/var/log")]
        detail = f"{r.stdout}\n{r.stderr}\n{(logdir / 'work' / 'rsyslogd.out').read_text()}"
        mine = logdir / "log" / "hpc" / ctx["host"]["name"] / "portal-api.log"
        assert mine.is_file() and "hello from the portal" in mine.read_text(), detail
        assert files and all(f.startswith("/var/log/hpc/") for f in files), detail
        # Both hostile messages were received and written inside /var/log/hpc.
        received = "".join((logdir / "log" / f.removeprefix("/var/log/")).read_text() for f in files)
        assert "dots" in received and "climb" in received, detail
        assert not (logdir / "log" / "etc").exists()
        assert sorted(p.name for p in (logdir / "log").iterdir()) == ["hpc"]
    finally:
        shutil.rmtree(logdir, ignore_errors=True)


# ---------------------------------------------------------------------------- logrotate


def logrotate_check(text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    p = tmp_path / "hpc-loghost"
    p.write_text(text)
    p.chmod(0o644)
    r = run(["logrotate", "-d", "-s", str(tmp_path / "status"), str(p)])
    if "error:" in r.stderr + r.stdout:  # logrotate -d reports bad lines but exits 0
        r = subprocess.CompletedProcess(r.args, 1, r.stdout, r.stderr)
    return r


def test_logrotate_config_is_accepted_and_a_broken_one_is_not(tmp_path):
    text = render_all("prod")["/etc/logrotate.d/hpc-loghost"]
    r = logrotate_check(text, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "/var/log/hpc/*/*.log" in r.stderr + r.stdout
    assert logrotate_check(text.replace("daily", "dailyy"), tmp_path).returncode != 0


# ------------------------------------------------------------------------------ grafana

PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset",
    "sum", "avg", "min", "max", "count", "rate", "irate", "increase", "time", "vector", "absent", "abs",
    "topk", "bottomk", "histogram_quantile", "label_values", "humanizeDuration", "inf", "nan",
}


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers outside strings, label matchers,
    grouping clauses and ranges, not followed by "(" and not PromQL keywords."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", "", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\[[^\]]*\]", "", s)
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?", s):
        if not m.group(2) and m.group(1) not in PROMQL_WORDS:
            names.add(m.group(1))
    return names


def dashboards(stack: str) -> dict[str, dict[str, Any]]:
    return {dest: json.loads(text) for dest, text in render_all(stack).items() if dest.endswith(".json")}


def dashboard_exprs(stack: str) -> list[tuple[str, str]]:
    out = []
    for dest, d in dashboards(stack).items():
        for p in d["panels"]:
            for t in p["targets"]:
                out.append((f"{dest}: {p['title']}", t["expr"]))
    return out


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards():
    files = render_all("prod")
    ds = yaml.safe_load(files["/etc/grafana/provisioning/datasources/hpc.yaml"])
    assert ds["apiVersion"] == 1
    prom = next(d for d in ds["datasources"] if d["type"] == "prometheus")
    assert prom["url"] == "http://localhost:9090" and prom["uid"] == "hpc-prometheus" and prom["isDefault"]
    prov = yaml.safe_load(files["/etc/grafana/provisioning/dashboards/hpc.yaml"])
    assert prov["apiVersion"] == 1
    path = prov["providers"][0]["options"]["path"]
    json_dests = [d for d in files if d.endswith(".json")]
    assert len(json_dests) >= 4
    assert all(os.path.dirname(d) == path for d in json_dests)


def test_dashboards_are_valid_and_use_only_exported_metrics():
    for stack in STACKS:
        boards = dashboards(stack)
        titles = {d["title"] for d in boards.values()}
        for want in ("Hosts", "HAProxy", "Galera", "Redis"):
            assert any(want in t for t in titles), f"no {want} dashboard"
        uids = [d["uid"] for d in boards.values()]
        assert len(uids) == len(set(uids))
        for dest, d in boards.items():
            assert d["schemaVersion"] >= 30 and d["panels"], dest
            ids = [p["id"] for p in d["panels"]]
            assert len(ids) == len(set(ids)), dest
            for p in d["panels"]:
                assert p["datasource"] == {"type": "prometheus", "uid": "hpc-prometheus"}, dest
                assert set(p["gridPos"]) == {"h", "w", "x", "y"} and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
                assert p["targets"], f"{dest}: {p['title']} has no query"
                for t in p["targets"]:
                    assert t["refId"] and t["expr"]
    used = set()
    for where, expr in dashboard_exprs("prod"):
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr}"
        assert names <= KNOWN_METRICS, f"{where}: unknown metrics {names - KNOWN_METRICS}"
        used |= names
    for r in alert_rules("prod"):
        assert metric_names(r["expr"]) <= KNOWN_METRICS, r["alert"]
    assert len(used) > 30


def test_metric_name_check_catches_a_misspelt_metric():
    assert metric_names('sum by (host) (rate(node_cpu_second_total{mode="idle"}[5m]))') == {"node_cpu_second_total"}
    assert not metric_names('sum by (host) (rate(node_cpu_second_total{mode="idle"}[5m]))') <= KNOWN_METRICS
    assert metric_names('max by (controller, position) (hpc_slurm_controller_up) == 0') == {"hpc_slurm_controller_up"}


def _promql_check(exprs: list[tuple[str, str]], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """promtool parses every expression (as recording rules; Grafana's $host variable
    replaced by a regex as Grafana would)."""
    rules = [{"record": f"hpc:dashboard_check:{i}", "expr": e.replace("$host", ".*")} for i, (_, e) in enumerate(exprs)]
    p = tmp_path / "dashboard-exprs.yml"
    p.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    return run(["promtool", "check", "rules", str(p)])


def test_dashboard_queries_parse_as_promql_and_a_broken_one_does_not(tmp_path):
    exprs = dashboard_exprs("prod")
    assert len(exprs) > 30
    r = _promql_check(exprs, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    r = _promql_check([("broken", "sum by (host (rate(node_load1[5m]))")], tmp_path)
    assert r.returncode != 0


# ----------------------------------------------------------------------------- systemd


def _verify_grafana_drop_in(text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    d = tmp_path / "units"
    (d / "grafana-server.service.d").mkdir(parents=True)
    # Stand-in for the unit Grafana's package ships (not installed here).
    (d / "grafana-server.service").write_text(
        "[Unit]\nDescription=Grafana stand-in\n[Service]\nType=simple\nExecStart=/bin/true\n"
        "[Install]\nWantedBy=multi-user.target\n")
    (d / "grafana-server.service.d" / "hpc.conf").write_text(text)
    r = run(["systemd-analyze", "verify", "--man=no", str(d / "grafana-server.service")])
    if re.search(r"Unknown (key|section)|Invalid|Failed to parse", r.stderr):
        r = subprocess.CompletedProcess(r.args, 1, r.stdout, r.stderr)
    return r


def test_grafana_drop_in_passes_systemd_analyze_and_a_broken_one_does_not(tmp_path):
    text = render_all("prod")["/etc/systemd/system/grafana-server.service.d/hpc.conf"]
    assert "EnvironmentFile=/etc/hpc/grafana.env" in text
    r = _verify_grafana_drop_in(text, tmp_path / "ok")
    assert r.returncode == 0, r.stderr
    r = _verify_grafana_drop_in(text + "EnvironmentFiel=/x\n", tmp_path / "broken")
    assert r.returncode != 0 and "EnvironmentFiel" in r.stderr


# ------------------------------------------------------------------------- boot script


def boot_env(tmp_path: Path, slack: str | None, grafana_pw: str | None = "S3cret!pw") -> tuple[Path, dict[str, str]]:
    ctx = monitoring_ctx("prod")
    files = render_all("prod")
    script = tmp_path / "hpc-monitoring-boot"
    script.write_text(render_template("monitoring/hpc-monitoring-boot", ctx))
    prom = tmp_path / "etc-prometheus"
    prom.mkdir(exist_ok=True)
    for v in AM_VARIANTS:
        (prom / f"alertmanager-{v}.yml").write_text(files[f"/etc/prometheus/alertmanager-{v}.yml"])
    secrets = tmp_path / "secrets"
    secrets.mkdir(exist_ok=True)
    for name, value in (("slack_webhook_url", slack), ("grafana_admin_password", grafana_pw)):
        if value is None:
            (secrets / name).unlink(missing_ok=True)
        else:
            (secrets / name).write_text(value + "\n")
    stub = tmp_path / "systemctl"
    stub.write_text(f'#!/bin/sh\necho "$*" >> "{tmp_path}/systemctl.log"\n')
    stub.chmod(0o755)
    return script, {**os.environ, "HPC_SECRETS_DIR": str(secrets), "HPC_PROMETHEUS_DIR": str(prom),
                    "HPC_GRAFANA_ENV": str(tmp_path / "hpc" / "grafana.env"), "HPC_LOG_DIR": str(tmp_path / "log-hpc"),
                    "HPC_SYSTEMCTL": str(stub), "HPC_SKIP_CHECKS": "1", "HPC_ALERTMANAGER_OWNER": "root:root",
                    "HPC_LOG_OWNER": "root:root"}


def test_boot_picks_the_slack_variant_when_the_webhook_secret_exists(tmp_path):
    script, env = boot_env(tmp_path, "https://hooks.slack.com/services/T0/B0/xyz")
    r = run(["bash", str(script)], env=env)
    assert r.returncode == 0, r.stderr
    prom = Path(env["HPC_PROMETHEUS_DIR"])
    assert (prom / "alertmanager.yml").read_text() == (prom / "alertmanager-slack.yml").read_text()
    url = prom / "alertmanager-slack-url"
    assert url.read_text() == "https://hooks.slack.com/services/T0/B0/xyz"
    assert oct(url.stat().st_mode & 0o777) == "0o640"
    gf = Path(env["HPC_GRAFANA_ENV"])
    assert gf.read_text() == "GF_SECURITY_ADMIN_PASSWORD='S3cret!pw'\n" and oct(gf.stat().st_mode & 0o777) == "0o600"
    calls = (tmp_path / "systemctl.log").read_text()
    assert "restart prometheus-alertmanager.service" in calls
    assert "reload-or-restart prometheus.service" in calls
    # Second run: nothing rewritten, Alertmanager not restarted.
    mtimes = {p: p.stat().st_mtime_ns for p in (prom / "alertmanager.yml", url, gf)}
    (tmp_path / "systemctl.log").unlink()
    assert run(["bash", str(script)], env=env).returncode == 0
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert "restart prometheus-alertmanager.service" not in (tmp_path / "systemctl.log").read_text()


def test_boot_picks_the_null_variant_without_the_secret_and_drops_an_old_url(tmp_path):
    script, env = boot_env(tmp_path, "https://hooks.slack.com/services/T0/B0/xyz")
    assert run(["bash", str(script)], env=env).returncode == 0
    script, env = boot_env(tmp_path, None)
    r = run(["bash", str(script)], env=env)
    assert r.returncode == 0, r.stderr
    prom = Path(env["HPC_PROMETHEUS_DIR"])
    assert (prom / "alertmanager.yml").read_text() == (prom / "alertmanager-null.yml").read_text()
    assert not (prom / "alertmanager-slack-url").exists()
    assert sorted(p.name for p in prom.iterdir()) == ["alertmanager-null.yml", "alertmanager-slack.yml",
                                                      "alertmanager.yml"]


@pytest.mark.parametrize("slack,grafana_pw,why", [
    ("http://plain.example/x", "pw", "https://"),
    ("https://hooks.slack.com/a b", "pw", "whitespace"),
    (None, None, "grafana_admin_password is missing"),
    (None, "it's", "single quote"),
])
def test_boot_refuses_bad_secrets(tmp_path, slack, grafana_pw, why):
    script, env = boot_env(tmp_path, slack, grafana_pw)
    r = run(["bash", str(script)], env=env)
    assert r.returncode == 1 and why in r.stderr, r.stderr
    assert not (tmp_path / "systemctl.log").exists(), "no daemon touched after a refused secret"


def test_boot_checks_the_installed_configs_with_promtool_and_amtool(tmp_path):
    """Without HPC_SKIP_CHECKS the script runs the real checkers; a broken prometheus.yml
    stops it before any daemon is reloaded."""
    script, env = boot_env(tmp_path, None)
    env.pop("HPC_SKIP_CHECKS")
    prom = Path(env["HPC_PROMETHEUS_DIR"])
    write_prometheus_tree(prom, render_all("prod"))
    r = run(["bash", str(script)], env=env)
    assert r.returncode == 0, r.stderr
    (tmp_path / "systemctl.log").unlink()
    (prom / "prometheus.yml").write_text((prom / "prometheus.yml").read_text().replace("15s", "fifteen", 1))
    r = run(["bash", str(script)], env=env)
    assert r.returncode == 1 and "promtool rejects" in r.stderr
    assert not (tmp_path / "systemctl.log").exists()


def test_boot_script_passes_shellcheck_and_a_broken_one_does_not(tmp_path):
    text = render_template("monitoring/hpc-monitoring-boot", monitoring_ctx("prod"))
    p = tmp_path / "ok"
    p.write_text(text)
    r = run(["shellcheck", "-s", "bash", str(p)])
    assert r.returncode == 0, r.stdout
    p.write_text(text.replace('cmp -s "$tmp" "$dest"', "cmp -s $tmp $dest"))
    r = run(["shellcheck", "-s", "bash", str(p)])
    assert r.returncode != 0 and "SC2086" in r.stdout


# ---------------------------------------------------------------- failover alert budget

# The alerts the failover drills wait for, and the jobs whose scrapes feed them.
OUTAGE_ALERTS = ("ServerDown", "RedisDown", "RedisNoMaster", "DatabaseDown", "GaleraClusterSize",
                 "GaleraNotPrimary", "HAProxyBackendDown", "SlurmctldDown")
FAST_JOBS = ("node", "haproxy", "mysqld", "redis", "clustercheck")
ALERT_BUDGET_S = 60  # fault -> notification sent


def seconds(duration: str) -> int:
    """A Prometheus duration with one unit ("5s", "1m", "4h") in seconds."""
    m = re.fullmatch(r"(\d+)([smh])", duration)
    assert m, f"unexpected duration {duration!r}"
    return int(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2)]


@pytest.mark.parametrize("stack", STACKS)
def test_outage_exporters_are_scraped_every_5s_so_a_failure_is_seen_within_9s(stack):
    cfg = yaml.safe_load(render_all(stack)["/etc/prometheus/prometheus.yml"])
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert seconds(cfg["global"]["evaluation_interval"]) == 5
    for job in FAST_JOBS:
        interval, timeout = seconds(jobs[job]["scrape_interval"]), seconds(jobs[job]["scrape_timeout"])
        assert interval == 5 and timeout == 4, job
        assert timeout < interval, job  # Prometheus refuses a timeout above the interval
    # the probes that are not outage signals keep the 15 s default
    assert seconds(cfg["global"]["scrape_interval"]) == 15
    assert "scrape_interval" not in jobs["blackbox-tls"]


def notification_delays(prom_text: str, rules_text: str, am_text: str) -> dict[str, int]:
    """Worst case per outage alert, fault -> notification sent: the failure reaches the
    data after one scrape interval plus its timeout, the next evaluation starts the
    `for:` window, then Alertmanager waits group_wait (a new group) or group_interval (an
    alert joining a group already firing)."""
    prom = yaml.safe_load(prom_text)
    slowest = max(seconds(j.get("scrape_interval", prom["global"]["scrape_interval"]))
                  + seconds(j.get("scrape_timeout", prom["global"]["scrape_timeout"]))
                  for j in prom["scrape_configs"] if j["job_name"] in FAST_JOBS)
    evaluation = seconds(prom["global"]["evaluation_interval"])
    rules = {r["alert"]: r for g in yaml.safe_load(rules_text)["groups"] for r in g["rules"] if "alert" in r}
    route = yaml.safe_load(am_text)["route"]
    am_wait = max(seconds(route["group_wait"]), seconds(route["group_interval"]))
    return {name: slowest + evaluation + seconds(rules[name]["for"]) + am_wait for name in OUTAGE_ALERTS}


@pytest.mark.parametrize("stack", STACKS)
def test_each_outage_alert_is_notified_within_60s_of_the_fault_including_alertmanager_waits(stack):
    files = render_all(stack)
    for variant in AM_VARIANTS:
        delays = notification_delays(files["/etc/prometheus/prometheus.yml"],
                                     files["/etc/prometheus/rules/hpc-alerts.yml"], am_file(stack, variant))
        assert max(delays.values()) <= ALERT_BUDGET_S, (variant, delays)
        assert delays["ServerDown"] == 5 + 4 + 5 + 20 + 15
    for r in alert_rules(stack):
        if r["alert"] in OUTAGE_ALERTS:
            assert seconds(r["for"]) <= 30, r["alert"]


@pytest.mark.parametrize(("what", "old", "new"), [
    ("rules", "for: 20s", "for: 1m"),
    ("am", "group_wait: 10s", "group_wait: 30s"),
    ("am", "group_interval: 15s", "group_interval: 5m"),
    ("prom", "    scrape_interval: 5s\n    scrape_timeout: 4s\n", ""),
], ids=["for-1m", "group_wait-30s", "group_interval-5m", "default-15s-scrapes"])
def test_alert_budget_check_catches_each_old_setting(what, old, new):
    """The negative twin: each of the old settings alone misses the budget."""
    files = render_all("prod")
    texts = {"prom": files["/etc/prometheus/prometheus.yml"], "rules": files["/etc/prometheus/rules/hpc-alerts.yml"],
             "am": am_file("prod", "slack")}
    assert old in texts[what]
    texts[what] = texts[what].replace(old, new)
    assert max(notification_delays(texts["prom"], texts["rules"], texts["am"]).values()) > ALERT_BUDGET_S
