"""What a change does to a stack, without cloud credentials: the offline plan at a git
ref against the working tree.

    .venv/bin/python tools/plan_diff.py --base HEAD~1 --stack prod      # markdown on stdout
    .venv/bin/python tools/plan_diff.py --old a.json --new b.json       # two plan files

The base is checked out in a temporary `git worktree` and planned with this tree's
tools/plan.py and the current virtualenv (its own program, harness, mocks, templates and
price table); the working tree is planned the same way. Each side also renders every
host's files with its own `cloud_init.render.render_host` and `offline.contexts` (the plan
JSON only holds hashes), in a subprocess per tree.

The report lists added, changed and removed resources, security-matrix cells, hosts and
rendered files (unified diffs, identical diffs of several hosts shown once), the monthly
cost delta, and flags - from tools/replacement_table.yaml - every change that replaces a
resource, replaces or deletes a stateful one, or restarts an instance. Written as
markdown for $GITHUB_STEP_SUMMARY and pull-request comments, also to
build/plan-diff-<stack>.md.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
TABLE_FILE = TOOLS / "replacement_table.yaml"
# GitHub's limit for one comment is 65,536 characters; leave room for the header.
DEFAULT_MAX_CHARS = 60_000
# Added or deleted host files: show this many lines of them.
NEW_FILE_LINES = 40


def load_table(path: Path = TABLE_FILE) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def camel(name: str) -> str:
    """user_data_base64 -> userDataBase64 (ignore_changes uses either form)."""
    head, *rest = name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def _key(r: dict[str, Any]) -> tuple[str, str]:
    return (r["type"], r["name"])


def _contains(value: Any, needle: str) -> bool:
    if isinstance(value, str):
        return value == needle
    if isinstance(value, dict):
        return any(_contains(v, needle) for v in value.values())
    if isinstance(value, list):
        return any(_contains(v, needle) for v in value)
    return False


def _short(v: Any, n: int = 80) -> str:
    s = json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
    return s if len(s) <= n else s[: n - 3] + "..."


# ------------------------------------------------------------------ resource changes


def classify(old: dict[str, Any], new: dict[str, Any], table: dict[str, Any]) -> dict[str, Any]:
    """What updating `old` to `new` does: changed input keys, the keys the program tells
    Pulumi to ignore, and the resulting action (update, restart, replace, none)."""
    entry = table["types"].get(new["type"]) or {}
    oi, ni = old.get("inputs") or {}, new.get("inputs") or {}
    changed = sorted(k for k in set(oi) | set(ni) if oi.get(k) != ni.get(k))
    opt_changes = sorted(k for k in ("protect",) if old.get(k) != new.get(k))
    ignore = {camel(x) for x in (new.get("opts") or {}).get("ignore_changes", [])}
    ignored = [k for k in changed if k in ignore]
    effective = [k for k in changed if k not in ignore]
    replace_keys = set(entry.get("replace") or [])
    if new["type"].startswith("aws:"):
        replace_keys |= set((table.get("aws_common") or {}).get("replace") or [])
    replace_keys |= {camel(x) for x in (new.get("opts") or {}).get("replace_on_changes", [])}
    for flag, keys in (entry.get("replace_when_set") or {}).items():
        if ni.get(flag) is True:
            replace_keys |= set(keys)
    replacing = [k for k in effective if k in replace_keys]
    for parent_key, subkeys in (entry.get("replace_nested") or {}).items():
        if parent_key in effective and parent_key not in replacing:
            o, n = oi.get(parent_key) or {}, ni.get(parent_key) or {}
            if isinstance(o, dict) and isinstance(n, dict) and any(o.get(s) != n.get(s) for s in subkeys):
                replacing.append(parent_key)
    restarting = [k for k in effective if k in set(entry.get("restart") or []) and k not in replacing]
    if replacing:
        action = "replace"
    elif restarting:
        action = "restart"
    elif effective or opt_changes:
        action = "update"
    else:
        action = "none"
    return {"changed": changed, "ignored": ignored, "replace_keys": sorted(replacing),
            "restart_keys": restarting, "action": action, "options": opt_changes}


def is_stateful(r: dict[str, Any], table: dict[str, Any]) -> bool:
    entry = table["types"].get(r["type"]) or {}
    if entry.get("stateful") or r.get("protect"):
        return True
    if r["type"] == "aws:ec2/instance:Instance":
        roles = set(str(((r.get("inputs") or {}).get("tags") or {}).get("Role", "")).split("+"))
        return bool(roles & set(table.get("stateful_instance_roles") or []))
    return False


def diff_resources(old: list[dict[str, Any]], new: list[dict[str, Any]], table: dict[str, Any]) -> dict[str, Any]:
    olds = {_key(r): r for r in old if not r["type"].startswith("hpc:")}
    news = {_key(r): r for r in new if not r["type"].startswith("hpc:")}
    added = [news[k] for k in sorted(set(news) - set(olds))]
    removed = [olds[k] for k in sorted(set(olds) - set(news))]
    changed: dict[tuple[str, str], dict[str, Any]] = {}
    for k in sorted(set(olds) & set(news)):
        c = classify(olds[k], news[k], table)
        if c["action"] != "none" or c["ignored"]:
            changed[k] = {**c, "type": k[0], "name": k[1], "cause": None,
                          "diff": {key: (olds[k]["inputs"].get(key), news[k]["inputs"].get(key)) for key in c["changed"]}}
    # A replaced resource gets a new id: whatever names it in a replace-forcing input is
    # replaced too (subnet -> interface -> instance). Mock ids do not change, so follow them.
    replaced_ids = {news[k]["id"]: k for k, c in changed.items() if c["action"] == "replace" and news[k].get("id")}
    frontier = dict(replaced_ids)
    while frontier:
        nxt: dict[str, tuple[str, str]] = {}
        for k, r in news.items():
            if k in changed and changed[k]["action"] == "replace":
                continue
            entry = table["types"].get(r["type"]) or {}
            keys = set(entry.get("replace") or [])
            for rid, src in frontier.items():
                hit = sorted(key for key in keys if _contains((r.get("inputs") or {}).get(key), rid))
                if hit and k in olds:
                    base = changed.get(k) or {"changed": [], "ignored": [], "restart_keys": [], "options": [],
                                              "type": k[0], "name": k[1], "diff": {}}
                    changed[k] = {**base, "action": "replace", "replace_keys": hit, "cause": f"{src[1]} is replaced"}
                    if r.get("id"):
                        nxt[r["id"]] = k
                    break
        frontier = nxt
    flags: list[dict[str, str]] = []
    for k, c in sorted(changed.items()):
        r = news[k]
        c["stateful"] = is_stateful(r, table)
        if c["action"] == "replace" and c["stateful"]:
            flags.append({"level": "danger", "resource": k[1], "type": k[0],
                          "what": f"replaces a stateful resource ({', '.join(c['replace_keys'])}"
                                  f"{'; ' + c['cause'] if c['cause'] else ''})"
                                  + ("; it is protected, so `pulumi up` will refuse" if r.get("protect") else "")})
        elif c["action"] == "replace":
            flags.append({"level": "warning", "resource": k[1], "type": k[0],
                          "what": f"replaced ({', '.join(c['replace_keys'])}{'; ' + c['cause'] if c['cause'] else ''})"})
        elif c["action"] == "restart":
            flags.append({"level": "warning", "resource": k[1], "type": k[0],
                          "what": f"stop/start of the instance ({', '.join(c['restart_keys'])})"})
        if c["ignored"]:
            flags.append({"level": "info", "resource": k[1], "type": k[0],
                          "what": f"changes to {', '.join(c['ignored'])} are ignored by the program; "
                                  "roll them out one host at a time (tools/rolling.py)"})
    for r in removed:
        if is_stateful(r, table):
            flags.append({"level": "danger", "resource": r["name"], "type": r["type"],
                          "what": "deletes a stateful resource" + ("; it is protected, so `pulumi up` will refuse"
                                                                   if r.get("protect") else "")})
    # Pulumi applies independent changes in parallel: several stateful hosts of one role
    # restarting or being replaced together is an outage of that role.
    by_role: dict[str, list[str]] = {}
    for k, c in changed.items():
        if k[0] == "aws:ec2/instance:Instance" and c["action"] in ("restart", "replace") and c["stateful"]:
            role = str((news[k]["inputs"].get("tags") or {}).get("Role", "?"))
            by_role.setdefault(role, []).append(k[1])
    for role, names in sorted(by_role.items()):
        if len(names) > 1:
            flags.append({"level": "danger", "resource": ", ".join(sorted(names)), "type": "aws:ec2/instance:Instance",
                          "what": f"{len(names)} {role} hosts stop or are replaced in the same update: "
                                  "Pulumi runs them in parallel; roll them one at a time"})
    order = {"danger": 0, "warning": 1, "info": 2}
    flags.sort(key=lambda f: (order[f["level"]], f["resource"], f["what"]))
    return {"added": added, "removed": removed, "changed": [changed[k] for k in sorted(changed)], "flags": flags}


# ------------------------------------------------------------------ other sections


def _cell_key(c: dict[str, Any]) -> tuple[str, ...]:
    return (c["direction"], c["group"], str(c["peer"]), c["ports"])


def diff_matrix(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    o = {_cell_key(c): c for c in old.get("cells", [])}
    n = {_cell_key(c): c for c in new.get("cells", [])}
    return {"added": [n[k] for k in sorted(set(n) - set(o))], "removed": [o[k] for k in sorted(set(o) - set(n))]}


HOST_FIELDS = ("roles", "az", "network", "subnet", "ip", "instance_type", "arch", "packages")


def diff_hosts(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    changed = {}
    for name in sorted(set(old) & set(new)):
        o, n = old[name], new[name]
        fields = {f: (o.get(f), n.get(f)) for f in HOST_FIELDS if o.get(f) != n.get(f)}
        of, nf = o.get("files") or {}, new[name].get("files") or {}
        files = {
            "added": sorted(set(nf) - set(of)),
            "removed": sorted(set(of) - set(nf)),
            "changed": sorted(p for p in set(of) & set(nf) if of[p] != nf[p]),
            "modes": sorted(p for p in set(of) & set(nf)
                            if (o.get("file_modes") or {}).get(p) != (n.get("file_modes") or {}).get(p)),
        }
        if fields or any(files.values()) or o.get("user_data") != n.get("user_data"):
            changed[name] = {"fields": fields, "files": files,
                             "user_data": (o.get("user_data"), n.get("user_data"))}
    return {"added": sorted(set(new) - set(old)), "removed": sorted(set(old) - set(new)), "changed": changed}


def diff_cost(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    classes = sorted(set(old.get("classes", {})) | set(new.get("classes", {})))
    rows = []
    for c in classes:
        a = (old.get("classes", {}).get(c) or {}).get("monthly", 0.0)
        b = (new.get("classes", {}).get(c) or {}).get("monthly", 0.0)
        if a != b:
            rows.append({"class": c, "before": a, "after": b, "delta": round(b - a, 2)})
    return {"before": old.get("total", 0.0), "after": new.get("total", 0.0),
            "delta": round(new.get("total", 0.0) - old.get("total", 0.0), 2), "classes": rows,
            "budget": new.get("budget") or old.get("budget")}


def file_diffs(old_files: dict[str, dict[str, str]] | None, new_files: dict[str, dict[str, str]] | None,
               hosts_changed: dict[str, Any], hosts_added: list[str]) -> list[dict[str, Any]]:
    """Unified diffs of the rendered files, hosts with the same diff of a path grouped."""
    if old_files is None or new_files is None:
        return []
    groups: dict[tuple[str, str, str], list[str]] = {}
    for host in sorted(set(old_files) | set(new_files)):
        of, nf = old_files.get(host, {}), new_files.get(host, {})
        for path in sorted(set(of) | set(nf)):
            a, b = of.get(path), nf.get(path)
            if a == b:
                continue
            text = "".join(difflib.unified_diff(
                (a or "").splitlines(keepends=True), (b or "").splitlines(keepends=True),
                fromfile=f"a{path}" if a is not None else "/dev/null",
                tofile=f"b{path}" if b is not None else "/dev/null", n=2))
            if text and not text.endswith("\n"):
                text += "\n"
            kind = "changed" if a is not None and b is not None else ("added" if a is None else "removed")
            if kind != "changed":  # a whole new or deleted file: its start is enough here
                lines = text.splitlines(keepends=True)
                if len(lines) > NEW_FILE_LINES:
                    text = "".join(lines[:NEW_FILE_LINES]) + f"... ({len(lines) - NEW_FILE_LINES} more lines)\n"
            groups.setdefault((kind, path, text), []).append(host)
    order = {"changed": 0, "added": 1, "removed": 2}
    return [{"kind": k, "path": p, "hosts": hs, "diff": d}
            for (k, p, d), hs in sorted(groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][1], kv[1]))]


def diff_plans(old: dict[str, Any], new: dict[str, Any], table: dict[str, Any] | None = None,
               old_files: dict[str, dict[str, str]] | None = None,
               new_files: dict[str, dict[str, str]] | None = None) -> dict[str, Any]:
    table = table or load_table()
    hosts = diff_hosts(old.get("hosts", {}), new.get("hosts", {}))
    return {
        "stack": new.get("stack") or old.get("stack"),
        "resources": diff_resources(old.get("resources", []), new.get("resources", []), table),
        "security_matrix": diff_matrix(old.get("security_matrix", {}), new.get("security_matrix", {})),
        "hosts": hosts,
        "files": file_diffs(old_files, new_files, hosts["changed"], hosts["added"]),
        "cost": diff_cost(old.get("monthly_cost", {}), new.get("monthly_cost", {})),
        "amis": {"before": old.get("amis", {}), "after": new.get("amis", {})},
    }


EMPTY_PLAN: dict[str, Any] = {"resources": [], "hosts": {}, "security_matrix": {"cells": []}, "monthly_cost": {}}


# -------------------------------------------------------------------------- markdown

ICON = {"danger": "🛑", "warning": "⚠️", "info": "ℹ️"}


def markdown(d: dict[str, Any], base_label: str = "base", head_label: str = "working tree",
             max_chars: int = DEFAULT_MAX_CHARS, notes: list[str] | None = None) -> str:
    r, m, h, c = d["resources"], d["security_matrix"], d["hosts"], d["cost"]
    out = [f"## Plan diff: stack `{d['stack']}` ({base_label} → {head_label})", ""]
    for note in notes or []:
        out += [f"> {note}", ""]
    sign = "+" if c["delta"] >= 0 else "-"
    out.append(f"**{len(r['added'])} to add, {len(r['changed'])} to change, {len(r['removed'])} to remove**; "
               f"security matrix +{len(m['added'])}/-{len(m['removed'])} cells; "
               f"hosts +{len(h['added'])}/-{len(h['removed'])}, {len(h['changed'])} changed; "
               f"monthly cost ${c['before']:,.2f} → ${c['after']:,.2f} ({sign}${abs(c['delta']):,.2f}).")
    out.append("")
    amis = d.get("amis") or {"before": {}, "after": {}}
    if amis["after"]:
        # Prominent on every diff: the image new hosts boot (a real preview resolves the
        # unpinned ones from Canonical's parameter; offline it is the mocks' stand-in).
        out.append("**AMIs new hosts boot**: " + "; ".join(
            f"{a} **`{v['id']}`** ({v['source']})" for a, v in sorted(amis["after"].items())))
        moved = [a for a, v in amis["after"].items() if (amis["before"].get(a) or {}).get("id", v["id"]) != v["id"]]
        for a in moved:
            out.append(f"- {ICON['warning']} {a}: `{amis['before'][a]['id']}` → `{amis['after'][a]['id']}`: new hosts "
                       "boot this one; running hosts keep theirs (a replacement too: the program ignores the AMI) "
                       "until `tools/rolling.py --ami`")
        out.append("")
    if not (r["added"] or r["changed"] or r["removed"] or m["added"] or m["removed"] or h["added"] or h["removed"]
            or h["changed"] or d["files"] or c["delta"]):
        out += ["No changes.", ""]
        return "\n".join(out)
    if r["flags"]:
        out += ["### Flags", ""]
        for f in r["flags"]:
            out.append(f"- {ICON[f['level']]} `{f['resource']}` ({f['type'].split(':')[-1]}): {f['what']}")
        out.append("")
    if r["added"] or r["removed"] or r["changed"]:
        out += ["### Resources", "", "| | type | name | what |", "|---|---|---|---|"]
        for x in r["added"]:
            out.append(f"| + | `{x['type']}` | `{x['name']}` | |")
        for x in r["removed"]:
            out.append(f"| - | `{x['type']}` | `{x['name']}` | {'stateful' if x.get('protect') else ''} |")
        for x in r["changed"]:
            keys = ", ".join(f"`{k}`" for k in x["changed"]) or "-"
            what = {"replace": "replace", "restart": "restart (stop/start)", "update": "update in place",
                    "none": "nothing applied"}[x["action"]]
            if x.get("cause"):
                what += f" ({x['cause']})"
            if x["ignored"]:
                what += f" (ignored by the program: {', '.join(x['ignored'])})"
            out.append(f"| ~ | `{x['type']}` | `{x['name']}` | {what}; changed: {keys} |")
        out.append("")
        details = [x for x in r["changed"] if x["diff"]]
        if details:
            out += ["<details><summary>changed inputs</summary>", "", "```diff"]
            for x in details:
                out.append(f"# {x['name']}")
                for k, (a, b) in x["diff"].items():
                    out.append(f"- {k}: {_short(a, 200)}")
                    out.append(f"+ {k}: {_short(b, 200)}")
            out += ["```", "", "</details>", ""]
    if m["added"] or m["removed"]:
        out += ["### Security matrix", "", "| | direction | group | peer | ports | name |", "|---|---|---|---|---|---|"]
        for sym, cells in (("+", m["added"]), ("-", m["removed"])):
            for cell in cells:
                out.append(f"| {sym} | {cell['direction']} | {cell['group']} | {cell['peer']} | {cell['ports']} | "
                           f"{cell.get('port_name', '')} |")
        out.append("")
    if h["added"] or h["removed"] or h["changed"]:
        out += ["### Hosts", ""]
        for name in h["added"]:
            out.append(f"- + `{name}`")
        for name in h["removed"]:
            out.append(f"- - `{name}`")
        for name, x in h["changed"].items():
            parts = [f"{k}: {_short(a, 40)} → {_short(b, 40)}" for k, (a, b) in x["fields"].items()]
            files = x["files"]
            for kind in ("added", "removed", "changed", "modes"):
                if files[kind]:
                    parts.append(f"files {kind}: {', '.join(files[kind])}")
            if not parts:
                parts.append("user-data bytes changed")
            out.append(f"- ~ `{name}`: " + "; ".join(parts))
        out.append("")
    if c["classes"] or c["delta"]:
        b = c.get("budget") or {}
        out += ["### Monthly cost (on-demand)", "", "| class | before | after | delta |", "|---|---:|---:|---:|"]
        for row in c["classes"]:
            out.append(f"| {row['class']} | {row['before']:,.2f} | {row['after']:,.2f} | {row['delta']:+,.2f} |")
        out.append(f"| **total** | **{c['before']:,.2f}** | **{c['after']:,.2f}** | **{c['delta']:+,.2f}** |")
        if b:
            out.append(f"\nAfter the change: {b.get('status')} the plan's ${b.get('low', 0):,.0f}-{b.get('high', 0):,.0f} a month.")
        out.append("")
    if d["files"]:
        out += ["### Rendered host files", ""]
        body = "\n".join(out)
        budget = max_chars - len(body) - 200
        shown = 0
        for f in d["files"]:
            block = (f"<details><summary>{f['kind']} <code>{f['path']}</code> on {', '.join(f['hosts'])}</summary>\n\n"
                     f"```diff\n{f['diff']}```\n\n</details>\n")
            if len(block) > budget:
                out.append(f"- {f['kind']} `{f['path']}` on {', '.join(f['hosts'])} (diff left out: report size limit)")
                budget -= 120
                continue
            out.append(block)
            budget -= len(block)
            shown += 1
        out.append("")
    text = "\n".join(out)
    if len(text) > max_chars:
        text = text[: max_chars - 200].rsplit("\n", 1)[0] + "\n\n(report cut at its size limit: run `make plan-diff` locally for all of it)\n"
    return text


# ----------------------------------------------------------------- building the sides


def render_files(root: Path, stack: str) -> dict[str, dict[str, str]]:
    """Every host's rendered files (path -> text) of the tree at `root`; runs in that
    tree's own modules (call it in a subprocess per tree)."""
    sys.path.insert(0, str(root))
    from cloud_init.render import render_host
    from offline.contexts import contexts

    out: dict[str, dict[str, str]] = {}
    for host, ctx in sorted(contexts(stack).items()):
        rh = render_host(ctx)
        files = {}
        for f in rh.files:
            try:
                files[f.path] = f.content.decode()
            except UnicodeDecodeError:
                files[f.path] = f"<binary, sha256 {f.sha256}>\n"
        out[host] = files
    return out


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)


def build_side(root: Path, stack: str, work: Path, prices: str | None = None) -> tuple[dict[str, Any] | None, Any, list[str]]:
    """(plan, rendered files, notes) of the tree at `root`; a plan of None when the
    stack does not exist there."""
    notes: list[str] = []
    if not (root / f"Pulumi.{stack}.yaml").exists():
        return None, {}, [f"`Pulumi.{stack}.yaml` does not exist in {root.name}"]
    work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(TOOLS / "plan.py"), "--root", str(root), "--stack", stack, "--out", str(work),
           "--no-diagram", "--quiet"]
    if prices:
        cmd += ["--prices", prices]
    p = _run(cmd, root)
    if p.returncode != 0:
        raise RuntimeError(f"the plan of {root} failed:\n{p.stderr[-4000:]}")
    plan = json.loads((work / f"plan-{stack}.json").read_text())
    files_json = work / "files.json"
    p = _run([sys.executable, str(TOOLS / "plan_diff.py"), "render-files", "--root", str(root), "--stack", stack,
              "--out", str(files_json)], root)
    files: Any = None
    if p.returncode == 0:
        files = json.loads(files_json.read_text())
    else:
        notes.append(f"rendered files of {root.name} could not be built (file diffs left out): "
                     f"{p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}")
    return plan, files, notes


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def plan_diff_against(base: str, stack: str, root: Path = ROOT, prices: str | None = None,
                      max_chars: int = DEFAULT_MAX_CHARS) -> tuple[str, dict[str, Any]]:
    try:
        sha = git("rev-parse", "--verify", f"{base}^{{commit}}", cwd=root)
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"plan-diff: cannot resolve BASE={base!r} ({e.stderr.strip()}); "
                         "in CI check out with fetch-depth: 0") from e
    tmp = Path(tempfile.mkdtemp(prefix="plan-diff-"))
    wt = tmp / "base"
    try:
        git("worktree", "add", "--detach", "--quiet", str(wt), sha, cwd=root)
        old, old_files, notes_a = build_side(wt, stack, tmp / "out-base", prices)
        new, new_files, notes_b = build_side(root, stack, tmp / "out-head", prices)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(wt)], cwd=root, capture_output=True)
        subprocess.run(["git", "worktree", "prune"], cwd=root, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    d = diff_plans(old or copy.deepcopy(EMPTY_PLAN), new or copy.deepcopy(EMPTY_PLAN), load_table(),
                   old_files, new_files)
    d["stack"] = stack
    label = base if re.fullmatch(r"[0-9a-f]{40}", base) is None else base[:12]
    return markdown(d, f"`{label}` ({sha[:12]})", "working tree", max_chars, notes_a + notes_b), d


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["render-files"]:
        ap = argparse.ArgumentParser(prog="plan_diff.py render-files")
        ap.add_argument("--root", required=True)
        ap.add_argument("--stack", required=True)
        ap.add_argument("--out", required=True)
        a = ap.parse_args(argv[1:])
        Path(a.out).write_text(json.dumps(render_files(Path(a.root).resolve(), a.stack), sort_keys=True))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", help="git ref to compare the working tree with (e.g. HEAD~1, origin/main, a sha)")
    ap.add_argument("--stack", default="prod")
    ap.add_argument("--old", help="a plan JSON (instead of --base)")
    ap.add_argument("--new", help="a plan JSON (instead of the working tree)")
    ap.add_argument("--prices", help="price override file for both sides")
    ap.add_argument("--out", help="markdown file to write (default build/plan-diff-<stack>.md with --base)")
    ap.add_argument("--max-chars", type=int, default=DEFAULT_MAX_CHARS)
    ap.add_argument("--fail-on-danger", action="store_true", help="exit 3 when a stateful resource is replaced or deleted")
    a = ap.parse_args(argv)
    if a.old and a.new:
        old, new = json.loads(Path(a.old).read_text()), json.loads(Path(a.new).read_text())
        d = diff_plans(old, new)
        md = markdown(d, Path(a.old).name, Path(a.new).name, a.max_chars)
    elif a.base:
        md, d = plan_diff_against(a.base, a.stack, ROOT, a.prices, a.max_chars)
    else:
        ap.error("give --base REF, or --old A.json --new B.json")
    out = Path(a.out) if a.out else (ROOT / "build" / f"plan-diff-{a.stack}.md" if a.base else None)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(md)
    print(md)
    if a.fail_on_danger and any(f["level"] == "danger" for f in d["resources"]["flags"]):
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
