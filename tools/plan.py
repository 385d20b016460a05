"""The offline plan of a stack: run the real program under mocks (no cloud, no CLI) and
print every host with its roles, AZ, subnet, address and instance type.

Writes, for review in pull requests:
- build/plan-<stack>.json: resources (type, name, parent, inputs; user-data and bundle
  blobs replaced by their sha256, secrets by "<secret>"), hosts (roles, AZ, subnet, IP,
  type, every rendered file as path -> sha256), address_plan, security_matrix (from the
  created rule resources), outputs, monthly_cost (tools/cost.py), the diagram's source;
- amis: per architecture the image id new hosts boot and where it comes from (the
  stack's pin, or Canonical's public SSM parameter read at preview: offline the
  parameter's answer is the mocks' stand-in, a real `pulumi preview` reads the real one);
- build/plan-<stack>.md: the same as tables;
- build/plan-<stack>.dot/.svg/.png: the topology (Graphviz `dot`).

The JSON is byte-identical across runs (PYTHONHASHSEED, TZ and locale do not matter).

    .venv/bin/python tools/plan.py --stack prod
    .venv/bin/python tools/plan.py --stack prod --overrides '{"roles": {"app": {"count": 30}}}' --no-diagram
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import ipaddress
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

TOOLS = Path(__file__).resolve().parent
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

import cost as costmod  # noqa: E402

ROOT = TOOLS.parent
PLAN_FORMAT = 2
# Pulumi's marker of a secret value in resource inputs.
SECRET_SIG = "4dabf18193072939515e22adb298388d"
# Inputs that carry whole files: the plan keeps their sha256 (of the decoded bytes).
BLOB_INPUTS = {"userDataBase64", "contentBase64", "userData", "content"}
RULE_TYPES = {
    "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule": "ingress",
    "aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule": "egress",
}


# ----------------------------------------------------------------------------- inputs


def blob_digest(key: str, value: Any) -> str:
    """sha256 of what a blob input carries (base64 inputs are decoded first)."""
    if not isinstance(value, str):
        return f"sha256:{hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()}"
    raw = value.encode()
    if key.endswith("Base64"):
        try:
            raw = base64.b64decode(value, validate=True)
        except ValueError:
            pass
    return f"sha256:{hashlib.sha256(raw).hexdigest()}"


def clean(value: Any, key: str = "") -> Any:
    """JSON-stable inputs: secrets hidden, blobs hashed, integral floats as ints, keys sorted."""
    if key in BLOB_INPUTS and value not in (None, "<unknown>"):
        return blob_digest(key, value)
    if isinstance(value, dict):
        if SECRET_SIG in value:
            return "<secret>"
        return {k: clean(v, k) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and "PRIVATE KEY-----" in value:
        return "<secret>"
    return value


def plan_resources(run: Any) -> list[dict[str, Any]]:
    out = []
    for r in run.resources:
        opts = {k: v for k, v in sorted((r.opts or {}).items()) if k != "protect" and v}
        out.append({
            "type": r.type,
            "name": r.name,
            "parent": r.parent,
            "id": r.id or None,
            "protect": bool((r.opts or {}).get("protect")),
            "opts": opts,
            "inputs": clean(r.inputs),
        })
    return sorted(out, key=lambda x: (x["type"], x["name"]))


# ------------------------------------------------------------------ derived sections


def hosts_section(outputs: dict[str, Any]) -> dict[str, Any]:
    rendered = outputs.get("rendered") or {}
    hosts: dict[str, Any] = {}
    for name, h in sorted(outputs["hosts"].items()):
        rh = rendered.get(name) or {}
        files = rh.get("files") or {}
        hosts[name] = {
            "roles": list(h["roles"]),
            "az": h["az"],
            "network": h["network"],
            "subnet": h["subnet_cidr"],
            "ip": h["private_ip"],
            "fqdn": h.get("fqdn"),
            "instance_type": h["instance_type"],
            "arch": h.get("arch"),
            "user_data": {"bytes": rh.get("user_data_bytes"), "sha256": rh.get("user_data_sha256")},
            "bundle": {"sha256": rh.get("bundle_sha256"), "files": list(rh.get("bundle_files") or [])},
            "packages": list(rh.get("packages") or []),
            "files": {p: f["sha256"] for p, f in sorted(files.items())},
            "file_modes": {p: f"{f['mode']} {f['owner']}" for p, f in sorted(files.items())},
        }
    return hosts


def address_plan(outputs: dict[str, Any]) -> dict[str, Any]:
    net = outputs["network"]
    plan: dict[str, Any] = {"vpc_cidr": net["vpc_cidr"], "networks": {}}
    for network, per_az in sorted(net["subnet_cidrs"].items()):
        plan["networks"][network] = {}
        for az, cidr in sorted(per_az.items()):
            sub = ipaddress.IPv4Network(cidr)
            members = {n: h["private_ip"] for n, h in sorted(outputs["hosts"].items())
                       if h["network"] == network and h["az"] == az}
            plan["networks"][network][az] = {
                "cidr": cidr,
                "usable": sub.num_addresses - 5,  # AWS keeps the first four and the last
                "hosts": dict(sorted(members.items(), key=lambda kv: ipaddress.IPv4Address(kv[1]))),
            }
    return plan


def _ports(proto: str, lo: Any, hi: Any) -> str:
    if proto in ("112", "-1"):
        return "vrrp" if proto == "112" else "all"
    lo, hi = int(lo), int(hi)
    return f"{proto}/{lo}" if lo == hi else f"{proto}/{lo}-{hi}"


def security_matrix(resources: list[dict[str, Any]]) -> dict[str, Any]:
    """Who reaches which port of whom, from the rule resources the program created."""
    role_of = {r["id"]: (r["inputs"].get("tags") or {}).get("Role", r["name"])
               for r in resources if r["type"] == "aws:ec2/securityGroup:SecurityGroup"}
    cells = []
    for r in resources:
        direction = RULE_TYPES.get(r["type"])
        if not direction:
            continue
        i = r["inputs"]
        group = role_of.get(i.get("securityGroupId"), str(i.get("securityGroupId")))
        peer = role_of.get(i.get("referencedSecurityGroupId"), i.get("referencedSecurityGroupId")) \
            if i.get("referencedSecurityGroupId") else (i.get("cidrIpv4") or i.get("cidrIpv6") or i.get("prefixListId"))
        port_name = str(i.get("description", "")).split(" ")[0]
        cells.append({"direction": direction, "group": group, "peer": peer,
                      "ports": _ports(str(i.get("ipProtocol")), i.get("fromPort", 0), i.get("toPort", 0)),
                      "port_name": port_name})
    cells.sort(key=lambda c: (c["direction"], c["group"], c["peer"], c["ports"]))
    ingress: dict[str, dict[str, list[str]]] = {}
    egress: dict[str, dict[str, list[str]]] = {}
    for c in cells:
        if c["direction"] == "ingress":  # source (role or CIDR) -> port -> target role
            ingress.setdefault(c["peer"], {}).setdefault(c["ports"], []).append(c["group"])
        else:  # source role -> port -> destination (role or CIDR)
            egress.setdefault(c["group"], {}).setdefault(c["ports"], []).append(c["peer"])

    def _sorted(m: dict[str, dict[str, list[str]]]) -> dict[str, dict[str, list[str]]]:
        return {k: {p: sorted(set(v)) for p, v in sorted(ports.items())} for k, ports in sorted(m.items())}

    return {"ingress": _sorted(ingress), "egress": _sorted(egress), "cells": cells}


# --------------------------------------------------------------------------- diagram

NETWORK_COLOURS = {"external": "#fde2e2", "internal": "#e2ecfd", "management": "#e6f5e1"}


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def topology_dot(plan: dict[str, Any]) -> str:
    """Placement (VPC -> network -> AZ -> host) and the role-level flows of the matrix."""
    lines = [
        f"digraph {_q('hpc-portal ' + plan['stack'])} {{",
        "  graph [rankdir=LR, fontname=Helvetica, fontsize=11, compound=true, nodesep=0.25, ranksep=0.6];",
        "  node [shape=box, style=\"rounded,filled\", fillcolor=white, fontname=Helvetica, fontsize=10];",
        "  edge [fontname=Helvetica, fontsize=8, color=\"#555555\"];",
        "  internet [shape=ellipse, label=\"internet\", fillcolor=\"#fff7d6\"];",
    ]
    vip = plan["outputs"].get("vip")
    if vip:
        lines.append(f"  vip [shape=ellipse, label={_q('VIP (Elastic IP) ' + str(vip.get('public_ip')))}, fillcolor=\"#fff7d6\"];")
        lines.append("  internet -> vip [label=\"80, 443\"];")
    ap = plan["address_plan"]
    lines.append(f"  subgraph cluster_vpc {{ label={_q('VPC ' + ap['vpc_cidr'])}; style=rounded; color=\"#888888\";")
    for network, per_az in ap["networks"].items():
        colour = NETWORK_COLOURS.get(network, "#eeeeee")
        lines.append(f"    subgraph cluster_{network} {{ label={_q(network)}; style=filled; fillcolor={_q(colour)}; color={_q(colour)};")
        for az, sub in per_az.items():
            cid = f"cluster_{network}_{az.replace('-', '_')}"
            lines.append(f"      subgraph {cid} {{ label={_q(az + '  ' + sub['cidr'])}; style=\"rounded,dashed\"; color=\"#999999\";")
            if not sub["hosts"]:
                lines.append(f"        {_q(network + '-' + az + '-empty')} [label=\"-\", shape=plaintext, style=\"\"];")
            for name, ip in sub["hosts"].items():
                h = plan["hosts"][name]
                label = f"{name}\\n{'+'.join(h['roles'])}\\n{ip}  {h['instance_type']}"
                lines.append(f"        {_q('host_' + name)} [label={_q(label).replace(chr(92) * 2 + 'n', chr(92) + 'n')}];")
            lines.append("      }")
        lines.append("    }")
    lines.append("  }")
    if vip:
        for n in plan["outputs"]["role_hosts"].get("lb", []):
            lines.append(f"  vip -> {_q('host_' + n)} [style=dashed, label=\"keepalived\"];")
    # Role-level flows: one edge per (from, to) with the port names.
    flows: dict[tuple[str, str], set[str]] = {}
    for c in plan["security_matrix"]["cells"]:
        if c["direction"] != "ingress":
            continue
        flows.setdefault((c["peer"], c["group"]), set()).add(c["port_name"] or c["ports"])
    roles = sorted({x for k in flows for x in k})
    lines.append("  subgraph cluster_flows { label=\"who reaches whom (security matrix, ingress)\"; style=rounded; color=\"#888888\";")
    for r in roles:
        label = "internet (0.0.0.0/0)" if r == "0.0.0.0/0" else r
        lines.append(f"    {_q('role_' + r)} [label={_q(label)}, shape=component, fillcolor=\"#f4f4f4\"];")
    for (src, dst), names in sorted(flows.items()):
        lines.append(f"    {_q('role_' + src)} -> {_q('role_' + dst)} [label={_q(', '.join(sorted(names)))}];")
    lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_diagram(dot_text: str, base: Path) -> list[Path]:
    """Write <base>.dot and, when Graphviz is installed, <base>.svg and <base>.png."""
    dot_path = base.with_suffix(".dot")
    dot_path.write_text(dot_text)
    written = [dot_path]
    exe = shutil.which("dot")
    if exe is None:
        print("graphviz `dot` not found (Debian package graphviz): wrote only the .dot source", file=sys.stderr)
        return written
    for fmt in ("svg", "png"):
        out = base.with_suffix(f".{fmt}")
        subprocess.run([exe, f"-T{fmt}", "-o", str(out), str(dot_path)], check=True)
        written.append(out)
    return written


# ------------------------------------------------------------------------ the plan


def ami_section(run: Any) -> dict[str, dict[str, str]]:
    """arch -> {id, source}: `pinned`, or the SSM parameter the program read for it."""
    params = {a["name"] for t, a in run.calls if t == "aws:ssm/getParameter:getParameter"}
    out: dict[str, dict[str, str]] = {}
    for arch, ami in sorted((run.outputs.get("amis") or {}).items()):
        canonical = "amd64" if arch == "x86_64" else arch
        read = sorted(p for p in params if f"/{canonical}/" in p)
        out[arch] = {"id": str(ami), "source": f"resolved at preview from {read[0]}" if read else "pinned"}
    return out


def build_plan(run: Any, stack: str, prices: dict[str, Any] | None = None) -> dict[str, Any]:
    """The plan document of one program run (see the module docstring)."""
    o = run.outputs
    resources = plan_resources(run)
    prices = prices or costmod.load_prices(o["region"])
    counts = Counter(r["type"] for r in resources if not r["type"].startswith("hpc:"))
    plan: dict[str, Any] = {
        "format": PLAN_FORMAT,
        "stack": stack,
        "profile": o["profile"],
        "region": o["region"],
        "resource_counts": dict(sorted(counts.items())),
        "resources": resources,
        "hosts": hosts_section(o),
        "amis": ami_section(run),
        "primaries": dict(sorted(o["primaries"].items())),
        "address_plan": address_plan(o),
        "security_matrix": security_matrix(resources),
        "outputs": clean({k: v for k, v in o.items() if k != "rendered"}),
        "monthly_cost": costmod.monthly_cost(resources, prices),
    }
    dot_text = topology_dot(plan)
    plan["diagram"] = {"dot_sha256": hashlib.sha256(dot_text.encode()).hexdigest(),
                       "files": [f"plan-{stack}.{x}" for x in ("dot", "svg", "png")]}
    return plan


def dumps(plan: dict[str, Any]) -> str:
    return json.dumps(plan, indent=1, sort_keys=True, ensure_ascii=True) + "\n"


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|")


def markdown(plan: dict[str, Any]) -> str:
    o, cost = plan["outputs"], plan["monthly_cost"]
    b = cost["budget"]
    out = [
        f"# Offline plan: stack `{plan['stack']}`",
        "",
        f"Profile `{plan['profile']}`, region `{plan['region']}`, {sum(plan['resource_counts'].values())} cloud "
        f"resources, {len(plan['hosts'])} hosts; built under mocks (no cloud credentials).",
        f"Monthly on-demand estimate: **${cost['total']:,.2f}** ({b['status']} the plan's ${b['low']:,.0f}-{b['high']:,.0f}; "
        f"prices of {cost['region']} dated {cost['price_date']}).",
        "",
        "AMIs new hosts boot: " + "; ".join(f"{a} **`{v['id']}`** ({v['source']})" for a, v in plan["amis"].items())
        + " - running hosts keep theirs until `tools/rolling.py --ami`.",
        "",
        f"![topology](plan-{plan['stack']}.svg)",
        "",
        "## Hosts",
        "",
        "| host | roles | AZ | network | subnet | IP | type | arch | user-data | files |",
        "|---|---|---|---|---|---|---|---|---:|---:|",
    ]
    for n, h in plan["hosts"].items():
        out.append(f"| {n} | {'+'.join(h['roles'])} | {h['az']} | {h['network']} | {h['subnet']} | {h['ip']} | "
                   f"{h['instance_type']} | {h['arch']} | {h['user_data']['bytes']} B | {len(h['files'])} |")
    out += ["", "Primaries: " + ", ".join(f"{k} = {v} ({plan['hosts'][v]['az']})" for k, v in plan["primaries"].items()), ""]
    out += ["## Address plan", "", f"VPC `{plan['address_plan']['vpc_cidr']}`.", "",
            "| network | AZ | subnet | usable | hosts |", "|---|---|---|---:|---|"]
    for network, per_az in plan["address_plan"]["networks"].items():
        for az, s in per_az.items():
            hosts = ", ".join(f"{n} {ip}" for n, ip in s["hosts"].items()) or "-"
            out.append(f"| {network} | {az} | {s['cidr']} | {s['usable']} | {hosts} |")
    out += ["", "## Security matrix", "", "Ingress: who (row) reaches which port of whom.", "",
            "| from | port | to |", "|---|---|---|"]
    for src, ports in plan["security_matrix"]["ingress"].items():
        for port, dsts in ports.items():
            out.append(f"| {src} | {port} | {', '.join(dsts)} |")
    out += ["", "Egress: where each group may connect.", "", "| from | port | to |", "|---|---|---|"]
    for src, ports in plan["security_matrix"]["egress"].items():
        for port, dsts in ports.items():
            out.append(f"| {src} | {port} | {', '.join(dsts)} |")
    out += ["", "## Monthly cost (on-demand)", "", _md_escape(costmod.cost_table(cost)).replace("\\|", "|"), "",
            "Assumed usage: " + ", ".join(f"{k} {v}" for k, v in cost["usage_assumed"].items()) + ".", ""]
    out += ["## Resources", "", "| type | count |", "|---|---:|"]
    for t, n in plan["resource_counts"].items():
        out.append(f"| `{t}` | {n} |")
    out += ["", "## Outputs", "", f"- VIP: {o.get('vip')}", f"- EFS: {o['efs']['dns_name']}",
            f"- buckets: {o['buckets']}", f"- secrets: `{o['secrets']['path']}` ({len(o['secrets']['parameters'])} parameters)",
            f"- private zone: `{o['network']['domain']}`, {len(o['endpoints'])} names", ""]
    return "\n".join(out)


def write_plan(plan: dict[str, Any], out_dir: Path, diagram: bool = True) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / f"plan-{plan['stack']}"
    written = [base.with_suffix(".json"), base.with_suffix(".md")]
    written[0].write_text(dumps(plan))
    written[1].write_text(markdown(plan))
    if diagram:
        written += render_diagram(topology_dot(plan), base)
    return written


def console_table(plan: dict[str, Any]) -> str:
    o = plan["outputs"]
    lines = [f"stack {plan['stack']}: profile {o['profile']}, phase {o['phase']}, region {o['region']}, "
             f"{len(plan['resources'])} resources (offline, under mocks)"]
    if o.get("vip"):
        lines.append("VIP: Elastic IP (allocated by the program, associated by keepalived's MASTER)")
    lines.append("")
    header = f"{'host':<9} {'roles':<24} {'AZ':<17} {'network':<11} {'subnet':<16} {'IP':<14} {'type':<12}"
    lines += [header, "-" * len(header)]
    for name, h in sorted(plan["hosts"].items(), key=lambda kv: (kv[1]["network"], kv[0])):
        lines.append(f"{name:<9} {'+'.join(h['roles']):<24} {h['az']:<17} {h['network']:<11} {h['subnet']:<16} "
                     f"{h['ip']:<14} {h['instance_type']:<12}")
    lines.append("")
    lines.append("primaries: " + ", ".join(f"{k}={v} ({plan['hosts'][v]['az']})" for k, v in plan["primaries"].items()))
    c = plan["monthly_cost"]
    lines.append(f"monthly cost (on-demand, {c['region']} prices of {c['price_date']}): ${c['total']:,.2f} "
                 f"-> {c['budget']['status']} the ${c['budget']['low']:,.0f}-{c['budget']['high']:,.0f} budget")
    return "\n".join(lines)


def run_program(stack: str, root: Path, overrides: dict[str, Any] | None = None) -> Any:
    """Run the program of the source tree at `root` (its own harness, mocks and renderer)."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from offline.harness import run_stack

    return run_stack(stack, overrides=overrides or None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stack", default="prod")
    ap.add_argument("--out", default=None, help="output directory (default: <root>/build)")
    ap.add_argument("--root", default=str(ROOT), help="the source tree whose program to plan (plan-diff: a worktree)")
    ap.add_argument("--overrides", default=None, help="JSON of project config keys to override, e.g. '{\"roles\": {...}}'")
    ap.add_argument("--prices", default=None, help="price override file (else $HPC_PRICES)")
    ap.add_argument("--no-diagram", action="store_true", help="skip the .dot/.svg/.png")
    ap.add_argument("--quiet", action="store_true", help="no console table")
    args = ap.parse_args(argv)
    root = Path(args.root).resolve()
    out = Path(args.out) if args.out else root / "build"
    try:
        run = run_program(args.stack, root, json.loads(args.overrides) if args.overrides else None)
    except Exception as e:  # ProgramFailed around a ConfigError: show the stack file's problems
        err = getattr(e, "error", None)
        if err is not None and type(err).__name__ == "ConfigError":
            print(f"Pulumi.{args.stack}.yaml: {err}", file=sys.stderr)
            return 2
        raise
    prices = args.prices
    own_table = root / "tools" / "prices" / f"{run.outputs['region']}.yaml"
    if prices is None and root != ROOT and own_table.exists():
        prices = str(own_table)  # another tree (plan-diff's base) is priced with its own table
    plan = build_plan(run, args.stack, costmod.load_prices(run.outputs["region"], prices))
    written = write_plan(plan, out, diagram=not args.no_diagram)
    if not args.quiet:
        print(console_table(plan))
        for p in written:
            print(f"wrote {p.relative_to(root) if p.is_relative_to(root) else p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
