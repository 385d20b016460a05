"""The common report of every drill: the load's history, the read-back's judgement of
records, sessions and jobs, the fault window, and the checks every drill shares (no
rehearsal here: the history and Slurm's answers are written by hand)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from rehearsal import load
from rehearsal.drills import ORDER, TARGETS, Result, table, write_report
from rehearsal.drills.base import (
    MIN_ACKED,
    REGISTRY,
    SESSION_WINDOW_S,
    DrillBase,
    finish,
    history,
    judge_jobs,
    parse_jobs,
    split_window,
    tally,
)

SCHEMA = ["name", "rto_s", "target_rto_s", "requests", "failed_reads", "failed_writes", "in_flight_writes", "errors",
          "acked_writes", "lost_writes", "duplicates", "ghost_jobs", "per_kind", "acked_in_fault_window",
          "fault_effect", "alert", "alert_latency_s", "passed", "checks", "notes"]


def test_the_registry_is_exactly_the_order() -> None:
    assert sorted(REGISTRY) == sorted(ORDER) and len(set(ORDER)) == len(ORDER)


def test_targets_are_the_raised_ones() -> None:
    assert {k: TARGETS[k]["rto"] for k in ("lb", "redis", "galera", "az", "slurm")} == \
        {"lb": 3.0, "redis": 5.0, "galera": 5.0, "az": 10.0, "slurm": 30.0}


def test_history_reads_both_line_formats_and_the_load_writes_the_new_one(tmp_path: Path) -> None:
    f = tmp_path / "load.log"
    f.write_text("1.000 1.100 write 1 200 rh-a\n"
                 + load.line(2.0, 2.5, "job", True, 200, "rh-job-1", "app-1", "42")
                 + load.line(3.0, 3.5, "snew", False, 0, "", "", "")
                 + "garbage\n")
    h = history(f)
    assert h[0] == (1.0, 1.1, "write", True, 200, "rh-a", "-", "-")
    assert h[1] == (2.0, 2.5, "job", True, 200, "rh-job-1", "app-1", "42")
    assert h[2][2:] == ("snew", False, 0, "-", "-", "-")
    assert len(h) == 3
    assert len(load.line(0, 1, "page", True, 200, "a b", "x\ty", "").split()) == 8  # blanks never split a field


def test_tally_counts_every_writing_kind() -> None:
    recs = [(0.0, 11.0, "write", False, 0, "a"), (12.0, 12.1, "snew", True, 200, "s"),
            (12.0, 12.1, "job", False, 503, "j"), (12.0, 12.1, "page", False, 0, "-"),
            (12.0, 12.1, "write", True, 200, "b")]
    res = Result("x")
    tally(recs, 10.0, res)
    assert (res.requests, res.failed_reads, res.failed_writes, res.in_flight_writes, res.acked_writes) == (5, 1, 2, 1, 2)
    assert res.errors == 1 + (2 - 1)


def test_sessions_are_judged_against_the_window_around_the_fault() -> None:
    fault = 100.0
    lost = {"before": fault - 5, "just-before": fault - 0.5, "during": fault + 2.9, "after": fault + 10}
    inside, outside = split_window(lost, (fault, fault + 30), SESSION_WINDOW_S)
    assert set(inside) == {"just-before", "during"} and set(outside) == {"before", "after"}
    assert split_window(lost, None, SESSION_WINDOW_S) == ({}, lost)


def test_parse_jobs_reads_squeue_and_sacct() -> None:
    text = "101|rh-job-a\n102|(null)\n103.batch|rh-job-b\n104_3|rh-job-c\nJOBID|COMMENT\n105|\n"
    assert parse_jobs(text) == [("101", "rh-job-a"), ("103", "rh-job-b"), ("104_3", "rh-job-c")]


def test_held_and_withdrawn_attempts_are_no_jobs_of_their_request_id() -> None:
    """The reference portal submits an attempt (held, comment pending/<id>) and releases
    it once the request id is settled: an attempt still held is reported apart (it must
    be gone by the read-back's end), one cancelled never ran, a withdrawn one carries
    withdrawn/<id>; none of them is a job of the request id, in squeue or in accounting.
    A released attempt is a job, and so is a settled job its user holds."""
    squeue = ("10|rh-job-a|RUNNING|None\n11|pending/rh-job-a|PENDING|JobHeldUser\n"
              "12|withdrawn/rh-job-a|CANCELLED|JobHeldUser\n13|pending/rh-job-b|CANCELLED|JobHeldUser\n"
              "14|(null)|PENDING|None\n15|pending/rh-job-d|PENDING|Resources\n16|rh-job-e|PENDING|JobHeldUser\n")
    sacct = "10|rh-job-a\n12|withdrawn/rh-job-a\n13|pending/rh-job-b\n9|rh-job-c\n"
    calls: list[str] = []

    def run(host: str, cmd: str, timeout: float = 0) -> tuple[int, str]:
        calls.append(host)
        return 0, squeue if cmd.startswith("squeue") else sacct
    me = type("Fake", (), {})()
    me.layout = type("L", (), {"topo": type("T", (), {"role_hosts": {"app": ["app-1", "app-2"]}})()})()
    me.run = run
    found = DrillBase.jobs_by_request_id(me)  # type: ignore[arg-type]
    # 15: released, its rename not done yet; 16: settled, then held by its user
    assert found == {"rh-job-a": {"10"}, "rh-job-c": {"9"}, "rh-job-d": {"15"}, "rh-job-e": {"16"}}
    assert me.held_attempts == {"rh-job-a": {"11"}}
    assert calls == ["app-2", "app-2"]


def H(rid: str, ok: bool, job: str = "-") -> tuple[float, float, str, bool, int, str, str, str]:
    return (1.0, 2.0, "job", ok, 200 if ok else 503, rid, "app-1", job)


def test_jobs_acked_lost_duplicated_ghost() -> None:
    hist = [H("fine", False), H("fine", True, "1"),   # a retry found or made exactly one job
            H("lost", True, "2"),                      # acknowledged, Slurm has nothing
            H("dup", True, "3"),                       # two jobs for one request id
            H("ghost", False), H("ghost", False),      # never acknowledged, yet a job exists
            H("never", False)]                         # never acknowledged, no job: a clean failure
    found = {"fine": {"1"}, "dup": {"3", "4"}, "ghost": {"5"}}
    assert judge_jobs(hist, found) == {"acked": 3, "lost": 1, "duplicated": 1, "ghost": 1, "resubmitted": 0}
    # the id the client was given is not the one Slurm holds: a duplicate it cannot see
    assert judge_jobs([H("x", True, "7")], {"x": {"8"}})["duplicated"] == 1


def test_ghost_jobs_are_named_with_their_jobs_and_attempts() -> None:
    from rehearsal.drills.base import ghost_note

    hist = [(100.0, 100.1, "job", False, 503, "r-ghost", "-", "-"), (101.0, 106.0, "job", False, 0, "r-ghost", "-", "TimeoutError"),
            (102.0, 102.2, "job", True, 200, "r-ok", "app-1", "7"), (103.0, 103.1, "job", False, 503, "r-gone", "-", "-")]
    note = ghost_note(hist, {"r-ghost": {"12"}, "r-ok": {"7"}, "r-gone": set()}, 90.0)  # type: ignore[arg-type]
    assert note == "ghost jobs (never acknowledged, held by Slurm): r-ghost (jobs 12; 2 attempts from +10.0s)"


def test_a_job_the_portals_reconciler_submitted_again_is_neither_lost_nor_a_duplicate() -> None:
    hist = [H("r", True, "52")]
    again = {"r": ("52", "60")}
    # Slurm holds the new job, accounting perhaps the lost one's stale record too
    assert judge_jobs(hist, {"r": {"60"}}, again)["resubmitted"] == 1
    j = judge_jobs(hist, {"r": {"52", "60"}}, again)
    assert (j["resubmitted"], j["duplicated"], j["lost"]) == (1, 0, 0)
    # the new job is gone too: lost; a third job besides: a duplicate
    assert judge_jobs(hist, {"r": {"52"}}, again)["lost"] == 1
    assert judge_jobs(hist, {"r": {"60", "61"}}, again)["duplicated"] == 1
    # a resubmission of some other job than the one acknowledged changes nothing
    assert judge_jobs(hist, {"r": {"60"}}, {"r": ("51", "60")})["duplicated"] == 1


def _good(**kw: object) -> Result:
    r = Result("d", rto_s=1.0, fault_effect="killed", fault_window=(0.0, 10.0), acked_in_fault_window=50,
               per_kind={"records": {"acked": MIN_ACKED}})
    for k, v in kw.items():
        setattr(r, k, v)
    return r


def test_finish_passes_a_drill_that_meets_everything() -> None:
    assert finish(_good(), 3.0).passed


@pytest.mark.parametrize("kw,check", [
    ({"fault_effect": None}, "fault_effect"),
    ({"acked_in_fault_window": 3}, "acked_in_fault_window"),
    ({"lost_writes": 1}, "lost_writes"),
    ({"duplicates": 1}, "duplicates"),
    ({"ghost_jobs": 1}, "ghost_jobs"),
    ({"rto_s": 3.5}, "rto"),
    ({"rto_s": None}, "rto"),
    ({"per_kind": {"records": {"acked": MIN_ACKED - 1}}}, "acked_writes"),
])
def test_finish_fails_on_each_shortfall(kw: dict[str, object], check: str) -> None:
    r = finish(_good(**kw), 3.0)
    assert not r.passed and r.checks[check] is False


def test_the_ceiling_widens_only_the_rto() -> None:
    assert finish(_good(rto_s=8.0), 3.0, ceiling=3.0).passed
    assert not finish(_good(rto_s=8.0, fault_effect=None), 3.0, ceiling=3.0).passed


def test_report_has_the_common_schema(tmp_path: Path) -> None:
    r = finish(_good(), 3.0)
    doc = write_report(tmp_path / "r.json", "prod", [r])
    d = json.loads((tmp_path / "r.json").read_text())["drills"][0]
    assert [k for k in SCHEMA if k not in d] == [] and doc["drills"][0]["fault_effect"] == "killed"
    assert "PASS" in table([r]) and "fault: killed" in table([r])


def test_a_partial_outage_counts_until_its_last_failure() -> None:
    from rehearsal.drills.base import settled_rto

    res = Result("p", rto_s=0.1, fault_window=(100.0, 130.0))
    recs = [(100.5, 101.0, "session", True, 200, "-")] * 10 + [
        (104.0, 107.0, "session", False, 0, "-"),   # a request stuck on the cut side
        (120.0, 121.0, "page", False, 0, "-"),      # a kind the fault does not touch
        (140.0, 141.0, "session", False, 0, "-")]   # after the fault window
    settled_rto(res, recs, ("session",), 5.0)
    assert res.rto_s == 4.0 and res.checks["rto"] is True  # began 4 s after the fault (its end is the time-out)
    settled_rto(res, recs + [(106.0, 106.5, "session", False, 503, "-")], ("session",), 5.0)
    assert res.rto_s == 6.0 and res.checks["rto"] is False
    res = Result("p", rto_s=2.0, fault_window=(100.0, 130.0))
    settled_rto(res, [(100.5, 101.0, "session", False, 0, "-")], ("session",), 5.0)
    assert res.rto_s == 2.0 and res.checks["rto"] is True


def test_failures_are_broken_down_by_kind_status_and_phase() -> None:
    from rehearsal.drills.base import failure_breakdown

    h = [(1.0, 2.0, "write", False, 0, "a", "-", "-"), (5.0, 5.1, "record", False, 503, "b", "-", "-"),
         (5.5, 5.6, "record", False, 503, "c", "-", "-"), (9.0, 9.1, "page", False, 0, "-", "-", "-"),
         (5.0, 5.1, "ws", False, 0, "3", "-", "closed"), (6.0, 6.1, "write", True, 200, "d", "-", "-")]
    assert failure_breakdown(h, (4.0, 8.0)) == {"record 503 window": 2, "page 0 after": 1, "write 0 before": 1}


def test_the_loads_login_and_websocket_figures() -> None:
    from rehearsal.drills.base import load_portal_figures

    assert load_portal_figures([(1.0, 1.1, "write", True, 200, "a", "-", "-")], 0.0) == {}  # the stand-in's load
    h = [(0.0, 0.5, "login", True, 200, "-", "-", "first"), (0.0, 0.6, "login", True, 200, "-", "-", "first"),
         (0.1, 9.0, "login", False, 0, "-", "-", "first"),
         (1.0, 1.01, "ws", True, 101, "0", "app-1-5011", "uptodate"),
         (2.0, 2.01, "ws", True, 101, "1", "app-1-5011", "snapshot"),
         (2.5, 2.5, "ws", False, 0, "1", "app-1-5011", "closed"), (2.6, 2.7, "ws", False, 503, "1", "-", "connect"),
         # answered from the server's copy while Redis was away, then from live state;
         # the reconnect was placed on another server (its own had gone)
         (2.8, 2.85, "ws", True, 101, "1", "app-2-5011", "uptodate-stale"),
         (3.3, 3.4, "ws", True, 101, "4", "app-2-5011", "resync"),
         (4.3, 4.31, "ws", True, 101, "4", "app-2-5011", "uptodate"),
         (5.0, 5.9, "login", True, 200, "-", "-", "relogin")]
    f = load_portal_figures(h, 2.4)
    assert f == {"logins": 2, "forced_relogins": 1, "login_failures": 1, "ws_round_trips": 5, "ws_opened": 2,
                 "ws_reconnects": 1, "ws_resyncs": 1, "ws_failures": 2, "ws_back_s": 0.45, "ws_live_back_s": 1.0,
                 "ws_servers": 2, "ws_moves": 1}


def test_tally_leaves_the_websocket_out_and_counts_failed_logins_as_writes() -> None:
    recs = [(0.0, 1.0, "login", False, 503, "-"), (2.0, 2.1, "ws", False, 0, "1"), (2.0, 2.1, "page", False, 0, "-")]
    res = Result("x")
    tally(recs, 10.0, res)
    assert (res.requests, res.failed_reads, res.failed_writes) == (2, 1, 1)


def test_the_load_keeps_cookies_and_resends_once_on_a_connection_closed_while_idle() -> None:
    """A keep-alive connection the server closed after its answer (as the LB does after
    `timeout http-keep-alive`): the next request fails at once on it, and is sent again
    on a new connection; a Set-Cookie is kept, a deleted cookie dropped."""
    import http.server
    import threading

    seen: list[str] = []

    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            seen.append(self.headers.get("Cookie", ""))
            self.send_response(200)
            if self.path == "/login":
                self.send_header("Set-Cookie", "sid=abc; Path=/; HttpOnly")
                self.send_header("Set-Cookie", "SRV=app-1; Path=/")
            if self.path == "/logout":
                self.send_header("Set-Cookie", "sid=; Max-Age=0; Path=/")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")
            self.close_connection = True  # no "Connection: close": the client thinks it may reuse it

        def log_message(self, *a: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        c = load.Conn(f"http://127.0.0.1:{srv.server_address[1]}")
        assert c.request("GET", "/login")[0] == 200
        assert c.jar == {"sid": "abc", "SRV": "app-1"}
        time.sleep(0.2)  # the server has closed its end meanwhile
        assert c.request("GET", "/x")[0] == 200
        assert c.stale_retries == 1 and seen[-1] == "sid=abc; SRV=app-1"
        c.request("GET", "/logout")
        assert c.jar == {"SRV": "app-1"}
        fresh = load.Conn(f"http://127.0.0.1:{srv.server_address[1]}")
        with pytest.raises(Exception):  # noqa: B017 - never retried on a first use: the failure is real
            srv.shutdown()
            srv.server_close()
            fresh.request("GET", "/x", timeout=1)
        assert fresh.stale_retries == 0
    finally:
        srv.shutdown()
        srv.server_close()


def test_the_job_read_back_waits_for_squeue_and_adds_sacct(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only squeue knows an unfinished job's request id (sacct gets the comment with the
    completion record): a read-back during a controller hand-back (29 s on Slurm 24.11)
    fell back to sacct alone and called every unfinished job lost. It now waits for
    squeue, and gives up (None: read-back failed) only after its deadline."""
    from types import SimpleNamespace

    from rehearsal.drills import base as B

    d = B.DrillBase.__new__(B.DrillBase)
    d.layout = SimpleNamespace(topo=SimpleNamespace(role_hosts={"app": ["app-1", "app-3"]}))  # type: ignore[assignment]
    answers = {"squeue": [(1, "slurm_load_jobs error: Unable to contact slurm controller")] * 2
               + [(0, "11|req-a|RUNNING|None\n12|req-b|PENDING|Priority\n")], "sacct": [(0, "7|req-old\n11|\n")]}
    asked: list[tuple[str, str]] = []

    def run(host: str, cmd: str, timeout: float = 0) -> tuple[int, str]:
        tool = cmd.split()[0]
        asked.append((host, tool))
        return answers[tool].pop(0) if len(answers[tool]) > 1 else answers[tool][0]

    clock = [1000.0]
    monkeypatch.setattr(d, "run", run, raising=False)
    monkeypatch.setattr(B.time, "time", lambda: clock[0])
    monkeypatch.setattr(B.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    found = d.jobs_by_request_id()
    assert found == {"req-a": {"11"}, "req-b": {"12"}, "req-old": {"7"}}
    assert [t for _, t in asked] == ["squeue", "squeue", "squeue", "sacct"] and {h for h, _ in asked} == {"app-3"}
    answers["squeue"] = [(1, "no controller")]
    assert d.jobs_by_request_id(wait_s=30) is None


def test_the_portals_job_journal_is_read_through_the_socket_and_a_failure_is_loud() -> None:
    """The read-back of the reconciler's journal ran `mariadb -uroot -h<ip>` with the
    database name in backquotes inside double quotes: the shell ran `portal_api` as a
    command and root has no network login, so every rehearsal read {} and judged each
    resubmitted job a duplicate (three drills of one run). It asks each data host's
    MariaDB through its socket, and raises when none answers."""
    from types import SimpleNamespace

    asked: list[tuple[str, str]] = []
    answers = {"data-1": (1, "ERROR 2002 (HY000): Can't connect"), "data-2": (0, "rid-a\t11\t12\nbad line\n")}

    def run(host: str, cmd: str, timeout: float = 0) -> tuple[int, str]:
        asked.append((host, cmd))
        return answers.get(host, (1, "down"))
    me = SimpleNamespace(run=run, layout=SimpleNamespace(
        cfg=SimpleNamespace(services=[SimpleNamespace(name="api", db="portal_api")]),
        topo=SimpleNamespace(role_hosts={"data": ["data-1", "data-2", "data-3"]})))
    assert DrillBase.resubmitted_jobs(me) == {"rid-a": ("11", "12")}  # type: ignore[arg-type]
    assert [h for h, _ in asked] == ["data-1", "data-2"]
    cmd = asked[-1][1]
    assert "`" not in cmd and " -h" not in cmd and "MYSQL_PWD" not in cmd and "FROM portal_api.portal_jobs" in cmd
    answers.clear()
    with pytest.raises(RuntimeError, match="journal could not be read: data-1: rc 1"):
        DrillBase.resubmitted_jobs(me)  # type: ignore[arg-type]
    me.layout.cfg.services[0].db = "portal`api"
    with pytest.raises(RuntimeError, match="not a plain identifier"):
        DrillBase.resubmitted_jobs(me)  # type: ignore[arg-type]


def test_an_alerts_allowance_counts_its_for_and_the_range_it_averages(tmp_path: Path) -> None:
    """The drills allow an alert its `for:` + 30 s (capped at a minute); one whose
    expression averages a range (rate over 30 s) also needs that range to fill."""
    from types import SimpleNamespace

    rules = tmp_path / "hosts" / "mon-1" / "upper" / "etc" / "prometheus" / "rules"
    rules.mkdir(parents=True)
    (rules / "hpc-alerts.yml").write_text(
        "      - alert: ServerDown\n        expr: up == 0\n        for: 20s\n"
        "      - alert: GaleraFlowControl\n        # a comment\n"
        "        expr: rate(mysql_global_status_wsrep_flow_control_paused_ns[30s]) / 1e9 > 0.25\n"
        "        for: 15s\n"
        "      - alert: Slow\n        expr: >-\n          avg_over_time(x[2m]) > 1\n        for: 1m\n")
    me = SimpleNamespace(wd=tmp_path, layout=SimpleNamespace(topo=SimpleNamespace(role_hosts={"monitoring": ["mon-1"]})))
    assert DrillBase.rule_for(me, "ServerDown") == 20.0  # type: ignore[arg-type]
    assert DrillBase.rule_for(me, "GaleraFlowControl") == 45.0  # type: ignore[arg-type]
    assert DrillBase.rule_for(me, "Slow") == 180.0  # type: ignore[arg-type]
    assert DrillBase.rule_for(me, "Unknown") == 60.0  # type: ignore[arg-type]


def test_a_drill_starts_from_a_settled_lb_pair_and_fails_when_it_never_settles(monkeypatch: pytest.MonkeyPatch) -> None:
    """A smoke run's lb drill chose "the active LB" while the Elastic IP still sat on the
    LB that had just become BACKUP after the boot; the reconcile moved it, and the drill
    killed an LB that held nothing. Every drill now waits for one MASTER holding the
    address, and a pair that never settles fails the drill with what it saw."""
    from types import SimpleNamespace

    from rehearsal.drills import base as B

    d = B.DrillBase.__new__(B.DrillBase)
    d.layout = SimpleNamespace(topo=SimpleNamespace(role_hosts={"lb": ["lb-1", "lb-2"]}),  # type: ignore[assignment]
                               hosts=[SimpleNamespace(name="lb-1", ip="10.0.0.10"), SimpleNamespace(name="lb-2", ip="10.0.0.11")])
    # Both MASTER (the boot), then lb-1 MASTER with the address still on lb-2, then settled.
    views = [({"lb-1": "MASTER", "lb-2": "MASTER"}, "10.0.0.11"), ({"lb-1": "MASTER", "lb-2": "BACKUP"}, "10.0.0.11"),
             ({"lb-1": "MASTER", "lb-2": "BACKUP"}, "10.0.0.10")]
    view = [0]
    monkeypatch.setattr(d, "vrrp_states", lambda: views[min(view[0], 2)][0], raising=False)
    monkeypatch.setattr(d, "eip_target", lambda: views[min(view[0], 2)][1], raising=False)
    clock = [1000.0]

    def sleep(s: float) -> None:
        clock[0] += s
        view[0] += 1

    monkeypatch.setattr(B.time, "time", lambda: clock[0])
    monkeypatch.setattr(B.time, "sleep", sleep)
    ran: list[float] = []

    def fake(self: Any) -> Result:
        ran.append(view[0])
        return Result("fake", passed=True, checks={"rto": True})

    monkeypatch.setitem(B.REGISTRY, "fake", fake)
    res = d.drill("fake")
    assert ran == [2] and res.passed and "waited 2.0s" in " ".join(res.notes), (ran, res)
    # A pair that never settles: the drill still runs and reports, and fails.
    views[:] = [views[1]] * 3
    view[0] = 0
    res = d.drill("fake")
    assert not res.passed and res.checks["lb_pair_settled_before"] is False, res
    assert "had not settled" in res.notes[0] and "Elastic IP on lb-2" in res.notes[0], res.notes


def test_alert_latency_is_prometheus_firing_time_not_when_the_drill_looked(monkeypatch: pytest.MonkeyPatch) -> None:
    """An lb drill whose browser waited 50 s reported ServerDown 50.9 s after the fault and
    failed its 50 s target, while Alertmanager's startsAt said it fired 22.8 s after it.
    The latency is now the alert's own startsAt; an alert active since before the fault,
    or one without a readable startsAt, is timed when it is seen."""
    from rehearsal.drills import base as B

    t0 = B.epoch_of("2026-12-03T13:29:27.000Z")
    assert t0 is not None and B.epoch_of("x") is None and B.epoch_of(None) is None
    d = B.DrillBase.__new__(B.DrillBase)
    d.ceiling = 1.0
    seen_at = t0 + 50.9
    monkeypatch.setattr(B.time, "time", lambda: seen_at)
    for starts, latency, note in (("2026-12-03T13:29:49.848Z", 22.8, False), ("2026-12-03T13:20:00.000Z", 50.9, True),
                                  ("x", 50.9, False)):
        monkeypatch.setattr(d, "alerts", lambda s=starts: [{"labels": {"alertname": "ServerDown", "instance": "lb-1:8404"},
                                                             "startsAt": s}], raising=False)
        res = Result("lb")
        res.alert_target_s = 50.0
        assert d.alert_seen(["ServerDown"], t0, lambda a: True, res)
        assert res.alert_latency_s == latency and res.checks["alert"] == (latency <= 50), (starts, res)
        assert any("before the fault" in n for n in res.notes) == note, res.notes


def test_an_alert_resolved_before_the_drill_looked_is_still_seen_by_the_alert_watch() -> None:
    """slow-galera: GaleraFlowControl fired 30 s after the slowdown and was resolved 20 s
    later, before the drill (busy reading flow-control counters) first looked; it reported
    no such alert and a later PortalErrors at 88 s. The watch looks every 2 s from the
    fault on; the earliest alert to start is the one judged."""
    from rehearsal.drills import base as B

    t0 = B.epoch_of("2026-12-03T21:51:21.000Z")
    assert t0 is not None
    fc = {"labels": {"alertname": "GaleraFlowControl", "host": "data-1"}, "startsAt": "2026-12-03T21:51:51.000Z"}
    pe = {"labels": {"alertname": "PortalErrors", "proxy": "be_api"}, "startsAt": "2026-12-03T21:52:50.000Z"}
    answers = iter([[], [fc], [fc, pe]])
    looks: list[int] = []

    def fetch() -> list[dict[str, Any]]:
        looks.append(1)
        return next(answers, [pe])

    d = B.DrillBase.__new__(B.DrillBase)
    d.ceiling = 1.0
    d.alerts = lambda: [pe]  # type: ignore[method-assign]  # what the drill's own look finds, late
    watch = B.AlertWatch(fetch, every_s=0.01)
    with watch:
        deadline = time.time() + 10
        while len(looks) < 3 and time.time() < deadline:
            time.sleep(0.01)
    assert len(looks) >= 3 and not watch._thread.is_alive()
    d.alert_watch = watch
    res = Result("slow-galera")
    res.alert_target_s = 60.0
    assert d.alert_seen(["GaleraFlowControl", "PortalErrors"], t0, lambda a: True, res)
    assert res.alert == "GaleraFlowControl" and res.alert_latency_s == 30.0 and res.checks["alert"], res
    assert any("resolved before this look" in n for n in res.notes), res.notes
    # Without the watch (the drill before): only the late PortalErrors, past the target.
    d.alert_watch = None
    res = Result("slow-galera")
    res.alert_target_s = 60.0
    assert d.alert_seen(["GaleraFlowControl", "PortalErrors"], t0, lambda a: True, res)
    assert res.alert == "PortalErrors" and res.alert_latency_s == 89.0 and not res.checks["alert"], res


def test_the_return_of_a_thawed_node_is_its_own_outage_against_the_same_target() -> None:
    """A full run's freeze-lb: the service was back 2.8 s after the freeze; after the thaw
    at 10 s the thawed LB, the higher VRRP priority, took the Elastic IP back at 11.9 s and
    one write begun at 10.96 s failed. The one RTO said 10.96 s: the freeze and the return
    were one outage. They are now measured apart, each against the target (the return's
    from its first failed request to its last), so a return that is itself too long
    still fails."""
    from rehearsal.drills.base import recovery_outage, settled_rto

    recs = [(100.2 + i * 0.1, 100.3 + i * 0.1, "write", False, 0, "-") for i in range(25)]  # 0-2.7 s: the freeze
    recs += [(103.0 + i * 0.1, 103.1 + i * 0.1, "write", True, 200, "-") for i in range(60)]
    recs += [(110.96, 113.96, "write", False, 0, "-")]  # the move back after the thaw at 110
    recs += [(111.0 + i * 0.1, 111.1 + i * 0.1, "write", True, 200, "-") for i in range(60)]
    res = Result("freeze-lb", rto_s=2.8, fault_window=(100.0, 125.0))
    settled_rto(res, recs, ("write",), 3.0, until=110.0)
    assert res.rto_s == 2.8 and res.checks["rto"] is True, res
    recovery_outage(res, recs, ("write",), 110.0, "thaw", 3.0)
    assert res.checks["rto_after_thaw"] is True and "begun 0.96s to 0.96s after it: an outage of 0.0s" in res.notes[-1], \
        res.notes
    # Without the split, the same history is one 10.96 s outage.
    whole = Result("freeze-lb", rto_s=2.8, fault_window=(100.0, 125.0))
    settled_rto(whole, recs, ("write",), 3.0)
    assert whole.rto_s == 10.96 and whole.checks["rto"] is False
    # A return that fails for longer than the target fails the drill (0.96 s to 4.5 s).
    late = recs + [(114.5, 115.0, "write", False, 503, "-")]
    res = Result("freeze-lb", rto_s=2.8, fault_window=(100.0, 125.0))
    recovery_outage(res, late, ("write",), 110.0, "thaw", 3.0)
    assert res.checks["rto_after_thaw"] is False
    quiet = Result("freeze-lb", rto_s=2.8, fault_window=(100.0, 125.0))
    recovery_outage(quiet, recs[:85], ("write",), 110.0, "thaw", 3.0)
    assert "rto_after_thaw" not in quiet.checks and quiet.notes == ["after the thaw: no failed request"]


def test_a_galera_wait_that_times_out_leaves_what_the_nodes_said_in_the_drills_notes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A CI smoke run's galera drill failed with 'writer_rejoined: False' and nothing else:
    CI keeps no part of the run. A wait_synced that times out now records every data
    host's Galera state, its unit's state and the waited-for host's last WSREP lines, and
    drill() adds them to the notes (the first thing the smoke test's assertion prints)."""
    from types import SimpleNamespace

    from rehearsal.drills import base as B

    d = B.DrillBase.__new__(B.DrillBase)
    d.diagnoses = []
    d.layout = SimpleNamespace(topo=SimpleNamespace(role_hosts={"data": ["data-1", "data-2"], "lb": []}))  # type: ignore[assignment]
    status = {"data-1": {"wsrep_local_state": "1", "wsrep_local_state_comment": "Joining",
                         "wsrep_cluster_status": "Primary", "wsrep_cluster_size": "2"},
              "data-2": {"wsrep_local_state": "2", "wsrep_local_state_comment": "Donor/Desynced",
                         "wsrep_cluster_status": "Primary", "wsrep_cluster_size": "2"}}
    asked: list[str] = []

    def global_status(host: str, names: tuple[str, ...], timeout: float = 15) -> dict[str, str]:
        asked.append(host)
        return {k: v for k, v in status[host].items() if k in names}

    def run(host: str, cmd: str, timeout: float = 30) -> tuple[int, str]:
        if cmd.startswith("systemctl is-active"):
            return 0 if host == "data-2" else 3, "active\n" if host == "data-2" else "activating\n"
        if cmd.startswith("systemctl list-jobs"):
            return 0, "7 mariadb.service start running\n"
        assert "journalctl" in cmd and host == "data-1", (host, cmd)
        return 0, "WSREP: Requesting state transfer failed: -11(Resource temporarily unavailable)\n"

    monkeypatch.setattr(d, "global_status", global_status, raising=False)
    monkeypatch.setattr(d, "run", run, raising=False)
    monkeypatch.setattr(B, "frozen", lambda host: False)
    monkeypatch.setattr(B.H, "volume_status", lambda layout, host: f"power-loss layer of {host}: 3 operations waiting")
    clock = [1000.0]
    monkeypatch.setattr(B.time, "time", lambda: clock[0])
    monkeypatch.setattr(B.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    monkeypatch.setattr(d, "lb_pair_settled", lambda: True, raising=False)
    monkeypatch.setattr(d, "settle", lambda check, timeout: 0.0, raising=False)

    def fake(self: Any) -> Result:
        ok = self.wait_synced("data-1", 2, 10)
        return Result("fake", passed=ok, checks={"writer_rejoined": ok})

    monkeypatch.setitem(B.REGISTRY, "fake", fake)
    res = d.drill("fake")
    assert not res.passed and len(res.notes) == 1, res.notes
    note = res.notes[0]
    for part in ("data-1 not Synced in a cluster of 2 after 10s", "data-1: unit activating",
                 "local_state_comment=Joining", "data-2: unit active", "local_state_comment=Donor/Desynced",
                 "data-1's journal: WSREP: Requesting state transfer failed",
                 "data-1's pending jobs: 7 mariadb.service start running",
                 "data-1's data volume: power-loss layer of data-1: 3 operations waiting"):
        assert part in note, (part, note)
    # The waits polled data-1 every 2 s; the diagnosis asked both nodes once more.
    assert asked.count("data-2") == 1 and asked.count("data-1") >= 5, asked
    # A drill whose waits succeed adds nothing.
    status["data-1"].update(wsrep_local_state="4", wsrep_local_state_comment="Synced")
    res = d.drill("fake")
    assert res.passed and res.notes == [], res.notes
