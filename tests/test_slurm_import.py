"""tools/slurm_import.py: the old cluster's slurm.conf, version and munge key become the
stack's config.

- The parser reads an old-center slurm.conf (tests/fixtures/slurm/old-center: includes,
  backslash continuations, comments with an escaped '#', DEFAULT lines, NodeSets, quoted
  values, several Key=Value pairs per line) the way Slurm does; hostlists expand exactly
  like Slurm's own `scontrol show hostnames`.
- The import rewrites only the `hpc-portal:slurm` block of a Pulumi.<stack>.yaml (every
  other byte stays), the project's config model accepts the result, and the slurm.conf
  rendered from it is accepted by Slurm's parser (a deliberately broken entry is not).
- Versions older than 22.05 are refused with the staged upgrade path; newer than the
  target too.
- The munge key's size is checked and only the command is printed, never the key.
"""

from __future__ import annotations

import base64
import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.loadfile import load_tool

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "slurm_import.py"
FIXTURES = ROOT / "tests" / "fixtures" / "slurm"
OLD = FIXTURES / "old-center" / "slurm.conf"
HOSTS = FIXTURES / "old-center" / "hosts"

si = load_tool("slurm_import")

needs_scontrol = pytest.mark.skipif(shutil.which("scontrol") is None, reason="scontrol (slurm-client) is not installed")


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=60)


@pytest.fixture
def stack_dir(tmp_path: Path) -> Path:
    """A copy of the repository's Pulumi.yaml and Pulumi.prod.yaml to import into."""
    shutil.copy(ROOT / "Pulumi.yaml", tmp_path / "Pulumi.yaml")
    shutil.copy(ROOT / "Pulumi.prod.yaml", tmp_path / "Pulumi.prod.yaml")
    return tmp_path


# ----------------------------------------------------------------------------- parsing


def test_old_center_conf_parses_like_slurm_reads_it():
    conf = si.parse_slurm_conf(OLD)
    si.resolve_nodesets(conf)
    nodes = {n["NodeName"]: n for n in conf.nodes}
    parts = {p["PartitionName"]: p for p in conf.partitions}
    assert list(nodes) == ["cpu[001-016]", "cpu[017-032]", "gpu[01-04]", "viz01"]
    assert list(parts) == ["normal", "big", "gpu", "viz"]
    # DEFAULT lines apply to the lines after them; a line's own value wins; a later DEFAULT
    # changes only what follows it.
    assert nodes["cpu[001-016]"]["CoresPerSocket"] == 16 and nodes["cpu[001-016]"]["RealMemory"] == 257000
    assert nodes["cpu[017-032]"]["CoresPerSocket"] == 24 and nodes["cpu[017-032]"]["RealMemory"] == 515000
    assert nodes["gpu[01-04]"]["CoresPerSocket"] == 32 and nodes["gpu[01-04]"]["RealMemory"] == 1030000
    assert nodes["viz01"]["RealMemory"] == 128000 and nodes["viz01"]["Sockets"] == 2
    # A continuation line joins its next line; the comment after the backslash is gone.
    assert nodes["cpu[001-016]"]["State"] == "UNKNOWN"
    assert nodes["cpu[017-032]"]["Feature"] == "cpu,icelake"
    assert parts["normal"]["MaxTime"] == "2-00:00:00" and parts["normal"]["Default"] == "YES"
    assert parts["big"]["MaxTime"] == "7-00:00:00"  # from PartitionName=DEFAULT
    # Quotes go, an escaped '#' stays (and is escaped again for the rendered line).
    assert nodes["viz01"]["Feature"] == "vnc,viz"
    assert nodes["viz01"]["NodeHostname"] == "viz01"
    # NodeSets are written out as the node lists they select (by name and by feature).
    assert parts["big"]["Nodes"] == "cpu[017-032]"
    assert parts["gpu"]["Nodes"] == "gpu[01-04]"
    # Globals from the main file, the include's own lines are not globals.
    assert conf.get("ClusterName") == "KooCAE" and conf.get("SrunPortRange") == "60001-60500"
    assert conf.get("slurmctldtimeout") == "120"
    assert len(conf.down_nodes) == 1


def test_logical_lines_follow_slurms_comment_and_continuation_rules(tmp_path):
    (tmp_path / "inc").mkdir()
    (tmp_path / "inc" / "more.conf").write_text("NodeName=b1 CPUs=2\n")
    (tmp_path / "slurm.conf").write_text(
        "# full comment\n"
        "ClusterName=c # trailing comment\n"
        "NodeName=a[1-2] \\\n"
        "   CPUs=4 \\   \n"          # spaces after the backslash still continue
        "   Feature=x\\#y\n"
        "Nodes=\\\\\n"                 # an even number of backslashes does not continue
        "INCLUDE inc/more.conf\n"
    )
    lines = [t for _, _, t in si.logical_lines(tmp_path / "slurm.conf")]
    assert lines == ["ClusterName=c", "NodeName=a[1-2]    CPUs=4    Feature=x\\#y", "Nodes=\\\\", "NodeName=b1 CPUs=2"]
    assert si.parse_pairs(lines[1]) == [("NodeName", "a[1-2]"), ("CPUs", "4"), ("Feature", "x#y")]
    assert si.parse_pairs('Features="a b,c" Weight=1') == [("Features", "a b,c"), ("Weight", "1")]
    # Written back for a slurm.conf line: '#' and '\\' escaped, spaces quoted, numbers as ints.
    assert si._typed("x#y") == "x\\#y" and si._typed("a b") == '"a b"' and si._typed("a\\b") == "a\\\\b"
    assert si._typed("257000") == 257000 and si._typed("08") == "08"


@pytest.mark.parametrize("text, error", [
    ("include missing.conf\n", "include .missing.conf.: no such file"),
    ("include slurm.conf\n", "include loop"),
    ("NodeName=a[1-2 CPUs=1\nPartitionName=p Nodes=ALL\n", "unbalanced"),
    ("NodeName=a CPUs=1 CPUs=2\n", "given twice"),
    ("NodeName=a CPUs 1\n", "cannot parse"),
])
def test_broken_conf_is_refused(tmp_path, text, error):
    (tmp_path / "slurm.conf").write_text(text)
    with pytest.raises(si.ImportError_, match=error):
        conf = si.parse_slurm_conf(tmp_path / "slurm.conf")
        si.check_consistency(conf, None)


HOSTLISTS = ["node[01-03,07]", "rack[1-2]-n[01-03]", "a[1-2]b[08-10]", "gpu[8-11],viz01", "single",
             "cn[001-004,010-012]x", "n[08-10]", "n[8-10]", "n[1-010]", "n[001-3]", "n[9,2-3],m1"]
# What Slurm refuses ("Invalid hostlist") and the tool refuses too, with the reason. The
# maintained library python-hostlist expands the first one (text after the last bracket),
# which Slurm would not accept in slurm.conf.
REFUSED = [("cn[001-004]x", "text after the last"), ("n[3-1]", "descending range"),
           ("n[0-100001]", "implausibly large")]


@needs_scontrol
@pytest.mark.parametrize("expr", HOSTLISTS)
def test_hostlists_expand_exactly_like_scontrol(expr):
    r = subprocess.run(["scontrol", "show", "hostnames", expr], capture_output=True, text=True, timeout=30,
                       env={**os.environ, "SLURM_CONF": str(FIXTURES / "minimal.conf")})
    assert r.returncode == 0, r.stderr
    if "Invalid hostlist" in r.stderr + r.stdout:  # scontrol says so, with exit status 0
        with pytest.raises(si.ImportError_, match="invalid hostlist"):
            si.expand_hostlist(expr)
        return
    assert si.expand_hostlist(expr) == r.stdout.split()


@pytest.mark.parametrize("expr, error", REFUSED + [("n[1-2", "unbalanced '\\['"), ("n1-2]", "unbalanced '\\]'"),
                                                  ("n[1-a]", "bad range")])
def test_hostlists_slurm_would_not_take_are_refused(expr, error):
    with pytest.raises(si.ImportError_, match=error):
        si.expand_hostlist(expr)


@needs_scontrol
@pytest.mark.parametrize("expr", [e for e, _ in REFUSED])
def test_slurm_refuses_them_too(expr):
    r = subprocess.run(["scontrol", "show", "hostnames", expr], capture_output=True, text=True, timeout=30,
                       env={**os.environ, "SLURM_CONF": str(FIXTURES / "minimal.conf")})
    assert "Invalid hostlist" in r.stdout + r.stderr


def test_compress_is_the_inverse_of_expand():
    for names in (["cpu001", "cpu002", "cpu003", "cpu007"], ["a1", "a2", "b09", "b10", "x"],
                  ["10.0.0.1", "10.0.0.2", "10.0.0.3"]):
        assert si.expand_hostlist(si.compress_hostlist(names)) == names
    assert si.compress_hostlist(["cpu001", "cpu002", "cpu003"]) == "cpu[001-003]"
    # The order is kept, whatever it is: Slurm pairs NodeAddr with NodeName by position.
    for names in (["10.0.0.9", "10.0.0.2", "10.0.0.3"], ["a2", "b1", "a1", "x", "a3"], ["n1", "n1"]):
        assert si.expand_hostlist(si.compress_hostlist(names)) == names
    assert si.compress_hostlist(["10.0.0.9", "10.0.0.2", "10.0.0.3"]) == "10.0.0.[9,2-3]"


def test_node_addresses_from_the_hosts_file_stay_paired_with_their_names(tmp_path):
    (tmp_path / "slurm.conf").write_text("ClusterName=c\nNodeName=n[1-3] CPUs=1\nPartitionName=p Nodes=n[1-3]\n")
    conf = si.parse_slurm_conf(tmp_path / "slurm.conf")
    si.check_consistency(conf, {"n1": "10.0.0.9", "n2": "10.0.0.2", "n3": "10.0.0.3"})
    node = conf.nodes[0]
    assert dict(zip(si.expand_hostlist(node["NodeName"]), si.expand_hostlist(node["NodeAddr"]), strict=True)) == {
        "n1": "10.0.0.9", "n2": "10.0.0.2", "n3": "10.0.0.3"}


def test_consistency_errors_are_refused(tmp_path):
    cases = {
        "PartitionName=p Nodes=a[1-3]\nNodeName=a[1-2]\n": "undefined node",
        "NodeName=a[1-2] NodeAddr=10.0.0.1\nPartitionName=p Nodes=ALL\n": "NodeAddr lists 1 addresses for 2 nodes",
        "NodeName=a[1-2]\nNodeName=a2\nPartitionName=p Nodes=ALL\n": "defined twice",
        "ClusterName=x\n": "no NodeName",
    }
    for text, error in cases.items():
        (tmp_path / "slurm.conf").write_text(text)
        with pytest.raises(si.ImportError_, match=error):
            si.check_consistency(si.parse_slurm_conf(tmp_path / "slurm.conf"), None)


# ----------------------------------------------------------------------------- versions


@pytest.mark.parametrize("text, ok, hops", [
    ("slurm 22.05.8", True, []),
    ("slurm 23.02.7", True, []),
    ("slurm 23.11.4-1ubuntu1", True, []),
    ("slurm-wlm 21.08.5", False, ["22.05 or 23.02"]),
    ("slurm 20.11.9", False, ["22.05"]),
    ("slurm 20.02.7", False, ["21.08", "23.02"]),
    ("slurm 24.05.1", False, []),
])
def test_version_check_and_staged_path(text, ok, hops):
    v = si.check_version(text)
    assert v.ok is ok, v.message
    assert v.path == hops
    if not ok and hops:
        assert "cannot read" in v.message and "slurmdbd first" in v.message and "compute node" in v.message
    if text.startswith("slurm 24"):
        assert "downgrade" in v.message


def test_version_refusal_stops_the_import(tmp_path, stack_dir):
    (tmp_path / "sinfo-V.txt").write_text("slurm-wlm 21.08.5\n")
    before = (stack_dir / "Pulumi.prod.yaml").read_bytes()
    r = run("--slurm-conf", OLD, "--stack-file", stack_dir / "Pulumi.prod.yaml", "--sinfo-version-output",
            tmp_path / "sinfo-V.txt")
    assert r.returncode == 1
    assert "21.08 -> 22.05 or 23.02" in r.stderr and "then move to 23.11" in r.stderr
    assert (stack_dir / "Pulumi.prod.yaml").read_bytes() == before
    r = run("--slurm-conf", OLD, "--stack-file", stack_dir / "Pulumi.prod.yaml")
    assert r.returncode == 2 and "needs the old cluster's version" in r.stderr
    r = run("--old-version", "not a version")
    assert r.returncode == 1 and "no Slurm version" in r.stderr


# ----------------------------------------------------------------------------- stack file


def outside_block(text: str, key: str = "hpc-portal:slurm") -> list[str]:
    """The stack file's lines without `key`'s block (its line and the deeper-indented ones)."""
    out, inside = [], False
    for line in text.splitlines():
        if line.startswith(f"  {key}:"):
            inside = True
            continue
        if inside and (not line.strip() or line.startswith("    ")):
            continue
        inside = False
        out.append(line)
    return out


def imported(stack_dir: Path) -> dict[str, Any]:
    return yaml.safe_load((stack_dir / "Pulumi.prod.yaml").read_text())["config"]["hpc-portal:slurm"]


def test_import_writes_only_the_slurm_block(stack_dir):
    path = stack_dir / "Pulumi.prod.yaml"
    before = path.read_text()
    r = run("--slurm-conf", OLD, "--stack", "prod", "--stack-file", path, "--old-version", "slurm 22.05.8",
            "--hosts-file", HOSTS)
    assert r.returncode == 0, r.stderr
    after = path.read_text()
    # Every line outside the block is still there, in order, with its comments.
    assert outside_block(after) == outside_block(before)
    assert sum(line.startswith("#") for line in after.splitlines()) >= 3
    old_doc, new_doc = yaml.safe_load(before), yaml.safe_load(after)
    assert {k: v for k, v in new_doc["config"].items() if k != "hpc-portal:slurm"} == old_doc["config"]
    s = imported(stack_dir)
    assert s["cluster_name"] == "koocae" and s["srun_port_range"] == "60001-60500"
    assert [n["NodeName"] for n in s["nodes"]] == ["cpu[001-016]", "cpu[017-032]", "gpu[01-04]", "viz01"]
    assert [p["PartitionName"] for p in s["partitions"]] == ["normal", "big", "gpu", "viz"]
    # NodeAddr from the hosts file, as a hostlist; an existing NodeAddr is kept.
    assert s["nodes"][0]["NodeAddr"] == "192.168.101.[1-16]"
    assert s["nodes"][2]["NodeAddr"] == "192.168.101.[41-44]"
    # GresTypes is carried through slurm.settings (rendered into slurm.conf by the template)
    assert s["settings"] == {"GresTypes": "gpu"}
    for warning in ("PriorityType, PriorityWeightFairshare", "DownNodes", "NodeSet icelake"):
        assert warning in r.stdout, r.stdout
    # Running it again changes nothing.
    assert run("--slurm-conf", OLD, "--stack-file", path, "--old-version", "22.05.8", "--hosts-file",
               HOSTS).returncode == 0
    assert path.read_text() == after


def test_without_srun_port_range_the_stacks_range_stays(tmp_path):
    (tmp_path / "Pulumi.yaml").write_text("name: hpc-portal\n")
    stack = tmp_path / "Pulumi.x.yaml"
    stack.write_text("config:\n  hpc-portal:slurm:\n    srun_port_range: 61000-61999\n    ctld_timeout: 45\n")
    (tmp_path / "slurm.conf").write_text("ClusterName=c1\nNodeName=n[1-2] NodeAddr=10.9.0.[1-2]\n"
                                         "PartitionName=p Nodes=n[1-2]\n")
    r = run("--slurm-conf", tmp_path / "slurm.conf", "--stack-file", stack, "--skip-version-check")
    assert r.returncode == 0, r.stderr
    assert "SrunPortRange 61000-61999" in r.stdout and "ephemeral ports" in r.stdout
    s = yaml.safe_load(stack.read_text())["config"]["hpc-portal:slurm"]
    assert s == {"srun_port_range": "61000-61999", "ctld_timeout": 45, "cluster_name": "c1",
                 "nodes": [{"NodeName": "n[1-2]", "NodeAddr": "10.9.0.[1-2]"}],
                 "partitions": [{"PartitionName": "p", "Nodes": "n[1-2]"}]}


def test_an_existing_slurm_block_is_replaced_and_the_next_keys_comments_stay(tmp_path):
    text = ("# head\nconfig:\n  aws:region: x\n  # about slurm\n  hpc-portal:slurm:\n    ctld_timeout: 45\n"
            "    # stale note inside the block\n    nodes: []\n\n  # about backup\n  hpc-portal:backup:\n"
            "    retention_days: 3\n")
    new, dropped = si.write_stack_key(text, "hpc-portal:slurm", {"ctld_timeout": 45, "nodes": [{"NodeName": "a"}]})
    assert dropped == 1
    assert new.startswith("# head\nconfig:\n  aws:region: x\n  # about slurm\n  hpc-portal:slurm:\n    ctld_timeout: 45\n")
    assert "\n\n  # about backup\n  hpc-portal:backup:\n    retention_days: 3\n" in new
    assert yaml.safe_load(new)["config"]["hpc-portal:slurm"]["nodes"] == [{"NodeName": "a"}]
    # Not a block mapping: refused rather than guessed.
    with pytest.raises(si.ImportError_):
        si.write_stack_key("config: {a: 1}\n", "hpc-portal:slurm", {})


STACK_HEAD = """\
# Production stack. Secrets: `pulumi config set --secret`.
config:
  aws:region: ap-northeast-2   # two spaces before this comment, kept
  hpc-portal:network:
    vpc_cidr: "10.40.0.0/16"
    azs: [ap-northeast-2a, ap-northeast-2b]
    tags: {team: hpc, 'cost center': "42"}
  # Comments before the slurm key stay before it.
"""
STACK_SLURM_OLD = """\
  hpc-portal:slurm:  # imported from the old cluster
    ctld_timeout: 45
    # a note inside the block
    nodes:
      - NodeName: old[1-2]
        CPUs: 4   # end-of-line comment inside the block
"""
STACK_TAIL = """\
  # Comments after the block, no blank line before them: they go with the next key.

  hpc-portal:backup:
    retention_days: 30
    windows:
      - "02:00"
      - '03:00'
    empty:

# The end of the file.
encryptionsalt: v1:abc:def
"""


def test_comments_and_other_keys_of_the_stack_file_survive_byte_for_byte():
    value = {"ctld_timeout": 45, "cluster_name": "koocae",
             "nodes": [{"NodeName": "cpu[001-002]", "CPUs": 64, "State": "UNKNOWN"}],
             "partitions": [{"PartitionName": "normal", "Nodes": "cpu[001-002]", "Default": "YES",
                             "OverSubscribe": "NO", "MaxTime": "12:00:00"}]}
    new, dropped = si.write_stack_key(STACK_HEAD + STACK_SLURM_OLD + STACK_TAIL, "hpc-portal:slurm", value)
    assert new == STACK_HEAD + (
        "  hpc-portal:slurm:  # imported from the old cluster\n"
        "    ctld_timeout: 45\n"
        "    cluster_name: koocae\n"
        "    nodes:\n"
        "      - NodeName: cpu[001-002]\n"
        "        CPUs: 64\n"
        "        State: UNKNOWN\n"
        "    partitions:\n"
        "      - PartitionName: normal\n"
        "        Nodes: cpu[001-002]\n"
        "        Default: 'YES'\n"
        "        OverSubscribe: 'NO'\n"
        "        MaxTime: '12:00:00'\n") + STACK_TAIL
    assert dropped == 2  # the two comments inside the old block's value
    # YES/NO/12:00:00 are quoted: PyYAML (YAML 1.1) would read them as true/false/43200.
    assert yaml.safe_load(new)["config"]["hpc-portal:slurm"] == value
    # A stack file without the key gets it after the last line of `config:`, before the
    # comments and keys that follow.
    without = STACK_HEAD + STACK_TAIL
    added, dropped = si.write_stack_key(without, "hpc-portal:slurm", {"ctld_timeout": 30})
    assert dropped == 0
    assert added == without.replace("    empty:\n", "    empty:\n  hpc-portal:slurm:\n    ctld_timeout: 30\n")
    # Writing the same value again changes nothing.
    assert si.write_stack_key(new, "hpc-portal:slurm", value) == (new, 0)


@pytest.mark.parametrize("other, line", [
    ("  hpc-portal:alerts:\n    emails:\n    - ops@example.org\n", "    - ops@example.org"),  # 2nd list layout
    ("  hpc-portal:onprem_cidrs: ~\n", "  hpc-portal:onprem_cidrs: ~"),  # ruamel.yaml writes null as nothing
    ("  hpc-portal:profile:   ha\n", "  hpc-portal:profile:   ha"),  # and one space after the colon
])
def test_a_stack_file_ruamel_would_re_lay_out_is_refused(other, line):
    """Lines that ruamel.yaml would write differently are not rewritten behind the
    operator's back: the import stops and names the first one."""
    text = "config:\n  hpc-portal:network:\n    azs:\n      - a\n      - b\n" + other
    with pytest.raises(si.ImportError_, match=rf"would also change other lines of the stack file \(first: '{line}'\)"):
        si.write_stack_key(text, "hpc-portal:slurm", {"nodes": [{"NodeName": "a"}]})


def test_imported_config_passes_the_config_model(stack_dir):
    from components.config import load_config
    from components.stackfile import namespace, read_stack

    assert run("--slurm-conf", OLD, "--stack-file", stack_dir / "Pulumi.prod.yaml", "--old-version", "22.05.8",
               "--hosts-file", HOSTS).returncode == 0
    config, _ = read_stack("prod", stack_dir / "Pulumi.prod.yaml")
    cfg = load_config(namespace(config, "hpc-portal"), stack="prod", project="hpc-portal", region="ap-northeast-2",
                      configured_secrets=frozenset({"tls_cert", "tls_key"}))
    assert cfg.slurm.cluster_name == "koocae" and cfg.slurm.srun_port_range == "60001-60500"
    assert [n["NodeName"] for n in cfg.slurm.nodes] == [n["NodeName"] for n in imported(stack_dir)["nodes"]]


@needs_scontrol
def test_slurm_conf_rendered_from_the_import_is_accepted_by_slurm(stack_dir, tmp_path):
    from cloud_init.templating import render_template
    from offline.contexts import contexts

    assert run("--slurm-conf", OLD, "--stack-file", stack_dir / "Pulumi.prod.yaml", "--old-version", "22.05.8",
               "--hosts-file", HOSTS).returncode == 0
    s = imported(stack_dir)
    ctx = copy.deepcopy(next(c for c in contexts("prod").values() if "slurm" in c["host"]["roles"]))
    ctx["slurm"].update(nodes=s["nodes"], partitions=s["partitions"], srun_port_range=s["srun_port_range"],
                        cluster_name=s["cluster_name"])

    def parse(slurm: dict[str, Any], name: str) -> subprocess.CompletedProcess[str]:
        c = copy.deepcopy(ctx)
        c["slurm"].update(slurm)
        text = render_template("slurm/slurm.conf", c)
        (tmp_path / name).write_text(text)
        return subprocess.run(["scontrol", "show", "hostnames", "gpu[01-04]"], capture_output=True, text=True,
                              timeout=30, env={**os.environ, "SLURM_CONF": str(tmp_path / name)})

    r = parse({}, "slurm.conf")
    assert r.returncode == 0 and r.stdout.split() == ["gpu01", "gpu02", "gpu03", "gpu04"], r.stderr
    text = (tmp_path / "slurm.conf").read_text()
    assert "NodeName=viz01 " in text and "SrunPortRange=60001-60500" in text
    # The checker can fail: an entry with a key Slurm does not know.
    broken = copy.deepcopy(s["nodes"])
    broken[0]["CoresPerSockets"] = 2
    r = parse({"nodes": broken}, "broken.conf")
    assert r.returncode != 0 and "CoresPerSockets" in r.stderr


# ----------------------------------------------------------------------------- munge key


@pytest.mark.parametrize("size, ok", [(31, False), (32, True), (1024, True), (1025, False)])
def test_munge_key_size_and_command(tmp_path, size, ok):
    key = tmp_path / "munge.key"
    data = os.urandom(size)
    key.write_bytes(data)
    key.chmod(0o400)
    r = run("--munge-key", key)
    out = r.stdout + r.stderr
    assert (r.returncode == 0) is ok, out
    assert base64.b64encode(data).decode() not in out and data.hex() not in out
    if ok:
        assert f'pulumi config set --secret munge_key "$(base64 -w0 {key})"' in r.stdout
        assert "munged refuses" not in r.stderr
    else:
        assert f"{size} bytes" in r.stderr and "32 to 1024" in r.stderr


def test_munge_key_command_names_the_stack_and_warns_on_a_loose_mode(tmp_path):
    key = tmp_path / "munge key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o644)
    r = run("--munge-key", key, "--stack", "prod")
    assert r.returncode == 0
    assert f"pulumi config set --stack prod --secret munge_key \"$(base64 -w0 '{key}')\"" in r.stdout
    assert "readable by group/others" in r.stderr
    # The decoded secret is what hpc-munge-key installs: the command round-trips the bytes.
    cmd = r.stdout.strip().splitlines()[-1]
    inner = cmd[cmd.index("$(") + 2: cmd.rindex(")")]
    encoded = subprocess.run(["bash", "-c", inner], capture_output=True, check=True).stdout
    assert base64.b64decode(encoded) == key.read_bytes()
