"""python -m rehearsal up|drill|down|status|run  (see docs/rehearsal.md)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from .image import DEFAULT_OS, OSES
from .layout import DEFAULT_WORKDIR, build_layout
from .stack import Lock, RehearsalError, down, os_choice, preflight, read_state, running, say, up


def _drills(spec: str | None, default: list[str]) -> list[str]:
    from .drills import ORDER

    names = [d.strip() for d in (spec or "").split(",") if d.strip()] or default
    unknown = [d for d in names if d not in ORDER]
    if unknown:
        raise RehearsalError(f"unknown drill(s) {', '.join(unknown)}; known: {', '.join(ORDER)}")
    return names


def do_drills(stack: str, workdir: Path, names: list[str], report: Path, ceiling: float,
              alert_checks: int | None) -> int:
    from .drills import Drills, Result, table, write_report

    layout = build_layout(stack, workdir)
    st = read_state(workdir)
    onprem = st.get("onprem")
    extra: dict[str, Any] = {"onprem": onprem} if onprem else {}
    if st.get("http_hygiene"):
        extra["http_hygiene"] = st["http_hygiene"]
    extra["portal"] = (st.get("portal") or {}).get("kind", "standin")
    extra["os"] = {"name": st.get("os", DEFAULT_OS), "suite": st.get("suite", OSES[DEFAULT_OS].suite)}
    d = Drills(layout, workdir, ceiling=ceiling, alert_checks=alert_checks)
    results: list[Result] = []
    for name in names:
        try:
            results.append(d.drill(name))
        except NotImplementedError as e:
            r = Result(name, notes=[f"not implemented: {e}"])
            results.append(r)
        except Exception as e:  # noqa: BLE001 - a broken drill is a failed drill, the others still run
            r = Result(name, notes=[f"{type(e).__name__}: {e}"])
            results.append(r)
            say(f"drill {name}: ERROR {type(e).__name__}: {e}")
        write_report(report, stack, results, extra)
    print(table(results), flush=True)
    onprem_ok = True
    if extra.get("onprem"):
        o = extra["onprem"]
        onprem_ok = bool(o["passed"])
        failed = [c["name"] for c in o["checks"] if not c["ok"]]
        print(f"on-prem compute path ({o['source']}): "
              + ("all checks as expected" if onprem_ok else f"FAILED: {'; '.join(failed)}"), flush=True)
    hygiene_ok = True
    if extra.get("http_hygiene"):
        hygiene_ok = bool(extra["http_hygiene"]["passed"])
        failed = [c["name"] for c in extra["http_hygiene"]["checks"] if not c["ok"]]
        print("HTTP hygiene at the Elastic IP: " + ("all checks as expected" if hygiene_ok else
                                                     f"FAILED: {'; '.join(failed)}"), flush=True)
    from . import hosts as H

    boot = st.get("boot", {})
    states = {h.name: {**H.host_state(layout, h.name), "boot_s": boot.get(h.name, {}).get("seconds")}
              for h in layout.hosts}
    extra["hosts"] = states
    write_report(report, stack, results, extra)
    hosts_ok = all(s["ok"] for s in states.values())
    for name, s in states.items():
        line = f"{name:<8} systemd {s['systemd']:<9} cloud-init {s['cloud_init']:<7} boot {s['boot_s']}s"
        if s["accepted"]:
            line += f"  accepted: {'; '.join(s['accepted'])}"
        if s["errors"] or (s["failed_units"] and not s["ok"]):
            line += f"  FAILED: {'; '.join(s['errors'] + s['failed_units'])}"
        print(line, flush=True)
    say(f"hosts ran {extra['os']['name']} ({extra['os']['suite']}); report: {report}")
    return 0 if results and all(r.passed for r in results) and onprem_ok and hygiene_ok and hosts_ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rehearsal", description=__doc__)
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("up", "run"):
        s = sub.add_parser(name)
        s.add_argument("--stack", default=os.environ.get("STACK", "prod"))
        s.add_argument("--hosts", default="", help="comma-separated subset of hosts to boot (default: all)")
        s.add_argument("--onprem", choices=("auto", "none"), default=os.environ.get("HPC_REHEARSAL_ONPREM", "auto"),
                       help="auto: the stack's on-prem site, else the example one (rehearsal/onprem-site.yaml); "
                            "none: the stack as committed")
        s.add_argument("--portal", choices=("reference", "standin"),
                       default=os.environ.get("HPC_REHEARSAL_PORTAL", "reference"),
                       help="the portal on the app hosts: examples/reference-portal deployed through the git "
                            "artifact kind, the load logged in, with the browser journey in the drills (default), "
                            "or the standard-library stand-in (no build, no login, no websocket)")
        s.add_argument("--os", dest="os_name", metavar="OS", default=os.environ.get("OS") or DEFAULT_OS,
                       help=f"the hosts' OS, one of {', '.join(sorted(OSES))} (default: $OS, else {DEFAULT_OS})")
        if name == "run":
            s.add_argument("--drills", default=os.environ.get("DRILLS", ""))
            s.add_argument("--report", type=Path, default=Path("rehearsal-report.json"))
            s.add_argument("--ceiling", type=float, default=1.0, help="pass when within targets x this factor")
            s.add_argument("--alert-checks", type=int, default=None, help="check alerts for the first N drills only")
            s.add_argument("--keep", action="store_true", help="leave the rehearsal up afterwards")
        s.add_argument("--wait", type=float, default=0.0,
                       help="wait up to this many seconds for another rehearsal on this machine to finish")
    s = sub.add_parser("drill")
    s.add_argument("drills")
    s.add_argument("--report", type=Path, default=Path("rehearsal-report.json"))
    s.add_argument("--ceiling", type=float, default=1.0)
    s.add_argument("--alert-checks", type=int, default=None)
    sub.add_parser("down")
    sub.add_parser("status")
    a = p.parse_args(argv)
    try:
        if a.cmd == "down":
            preflight()
            done = down(a.workdir)
            say("nothing to clean up" if not done else "clean")
            return 0
        if a.cmd == "status":
            return status(a.workdir)
        if a.cmd in ("up", "run"):
            os_choice(a.os_name)  # an unknown OS stops here, before the lock or anything else
        preflight()
        lock = Lock()
        lock.acquire(wait=getattr(a, "wait", 0.0), machine_free=a.cmd in ("up", "run"))
        try:
            if a.cmd == "up":
                up(a.stack, a.workdir, only=[h for h in a.hosts.split(",") if h] or None, onprem=a.onprem, portal=a.portal,
                   os_name=a.os_name)
                say("up; `python -m rehearsal drill lb` to drill, `python -m rehearsal down` to stop")
                return 0
            if a.cmd == "drill":
                st = read_state(a.workdir)
                if not running(a.workdir):
                    raise RehearsalError("no rehearsal is up (`python -m rehearsal up` first)")
                from .drills import ORDER

                return do_drills(st["stack"], a.workdir, _drills(a.drills, ORDER), a.report, a.ceiling, a.alert_checks)
            # run: up, drills, down, whatever happens (Ctrl-C included)
            from .drills import ORDER

            names = _drills(a.drills, ORDER)
            signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
            t0 = time.time()
            try:
                up(a.stack, a.workdir, only=[h for h in a.hosts.split(",") if h] or None, onprem=a.onprem, portal=a.portal,
                   os_name=a.os_name)
                say(f"booted in {time.time() - t0:.0f}s; drills: {', '.join(names)}")
                rc = do_drills(a.stack, a.workdir, names, a.report, a.ceiling, a.alert_checks)
            finally:
                if not a.keep:
                    down(a.workdir)
            say(f"total {time.time() - t0:.0f}s")
            return rc
        finally:
            lock.release()
    except RehearsalError as e:
        print(f"rehearsal: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rehearsal: interrupted; cleaned up", file=sys.stderr)
        return 130


def status(workdir: Path) -> int:
    from . import hosts as H
    from . import netns

    st = read_state(workdir)
    if not st or not running(workdir):
        print("no rehearsal is up")
        return 1
    layout = build_layout(st["stack"], workdir)
    print(f"stack {st['stack']} on {st.get('os', DEFAULT_OS)}, up since {time.strftime('%H:%M:%S', time.localtime(st['started']))}")
    for h in layout.hosts:
        if not H.alive(h.name):
            print(f"  {h.name:<8} DOWN")
            continue
        try:
            units = H.call(layout, h.name, {"op": "status"}, timeout=10)["units"]
        except Exception as e:  # noqa: BLE001
            print(f"  {h.name:<8} init unreachable: {e}")
            continue
        active = sorted(n for n, u in units.items() if u["state"] == "active")
        failed = sorted(n for n, u in units.items() if u["state"] == "failed")
        drops = netns.dropped(h.ns)
        print(f"  {h.name:<8} {h.ip:<13} {len(active)} active" + (f", FAILED: {', '.join(failed)}" if failed else ""))
        if drops["drop_in"] or drops["drop_out"]:
            print(f"           security groups dropped: in {drops['drop_in'][:6]} out {drops['drop_out'][:6]}")
    print(json.dumps(st.get("deploy", {}).get("eip", {})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
