"""The rehearsal's on-prem site: which stacks get it, what the hosts render for it, the
VPN and route-table rules around it, what a compute node gets, and (daemons) a node
container running a job with the program's cgroup plugins on this machine. The live
compute path (nodes registered, a job through the VPN, the matrix's flows) runs in the
smoke rehearsal and the `slurm` drill."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from cloud_init.render import render_host
from components.hostctx import host_context
from components.stackfile import overlay_config
from offline.contexts import FAKE_DEPLOYED
from rehearsal.layout import NS_ONPREM, NS_VPN, ONPREM_SITE, build_layout
from rehearsal.netns import host_rules, router_rules, vpn_rules


def test_overlay_replaces_keys_and_merges_mappings_one_level() -> None:
    raw = {"profile": "ha", "slurm": {"cluster_name": "hpc", "nodes": []}, "onprem_cidrs": []}
    out = overlay_config(raw, {"onprem_cidrs": ["172.20.0.0/16"], "slurm": {"nodes": [{"NodeName": "a"}]}})
    assert out == {"profile": "ha", "onprem_cidrs": ["172.20.0.0/16"],
                   "slurm": {"cluster_name": "hpc", "nodes": [{"NodeName": "a"}]}}
    assert raw["slurm"] == {"cluster_name": "hpc", "nodes": []}, "the stack's own config is not modified"


def test_a_stack_without_onprem_gets_the_example_site_unless_told_not_to(tmp_path: Path) -> None:
    auto = build_layout("prod", tmp_path, onprem="auto")
    assert auto.onprem is not None and auto.onprem.source == "rehearsal/onprem-site.yaml"
    assert [n for n, _a in auto.onprem.nodes] == ["cn001", "cn002", "cn003", "cn004"]
    assert auto.onprem.addresses[0] == "172.20.10.11"
    assert NS_VPN in auto.namespaces and NS_ONPREM in auto.namespaces
    none = build_layout("prod", tmp_path, onprem="none")
    assert none.onprem is None and NS_VPN not in none.namespaces
    # The site file is valid stack config for every stack (no overlap with any VPC).
    for stack in ("dev", "budget"):
        lay = build_layout(stack, tmp_path, onprem="auto")
        assert lay.onprem is not None and lay.onprem.cidrs == ("172.20.0.0/16",)


def test_the_choice_is_kept_with_the_rehearsal_it_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "state.json").write_text('{"onprem_mode": "none"}')
    assert build_layout("prod", tmp_path).onprem is None
    monkeypatch.setenv("HPC_REHEARSAL_ONPREM", "sometimes")
    with pytest.raises(ValueError, match="HPC_REHEARSAL_ONPREM='sometimes': one of auto, none"):
        build_layout("prod", tmp_path / "fresh")


def test_hosts_render_the_sites_nodes_and_matrix_cells(tmp_path: Path) -> None:
    lay = build_layout("prod", tmp_path, onprem="auto")
    slurm1 = lay.topo.host("slurm-1")
    files = {f.path: f for f in render_host(host_context(lay.cfg, lay.topo, slurm1, FAKE_DEPLOYED)).files}
    conf = files["/etc/slurm/slurm.conf"].content.decode()
    assert "NodeName=cn001 NodeAddr=172.20.10.11 CPUs=2 RealMemory=2000 State=UNKNOWN" in conf
    assert "PartitionName=compute Nodes=cn[001-004] Default=YES" in conf and "NodeName=placeholder" not in conf
    rules = host_rules(lay, lay.host("slurm-1"))
    assert "ip saddr 172.20.10.0/24 tcp dport 6817 accept" in rules
    assert "ip daddr 172.20.10.0/24 tcp dport 6818 accept" in rules
    app = host_rules(lay, lay.host("app-1"))
    assert "ip saddr 172.20.10.0/24 tcp dport 60001-63000 accept" in app
    assert "ip daddr 172.20.10.0/24 tcp dport 5900-5999 accept" in app
    # Nothing toward the site on a host whose role has no cell for it.
    assert "172.20." not in host_rules(lay, lay.host("data-1"))
    assert "172.20." not in host_rules(lay, lay.host("lb-1"))


def test_only_private_subnets_route_to_the_site_and_the_vpn_carries_nothing_else(tmp_path: Path) -> None:
    lay = build_layout("prod", tmp_path, onprem="auto")
    public = ", ".join(s.cidr for s in lay.subnets if s.network == "external")
    rr = router_rules(lay)
    assert f"ip saddr {{ {public} }} ip daddr {{ 172.20.0.0/16 }} counter drop" in rr
    assert f"ip saddr {{ 172.20.0.0/16 }} ip daddr {{ {public} }} counter drop" in rr
    internal = [s.cidr for s in lay.subnets if s.network != "external"]
    assert all(c not in rr for c in internal)
    vr = vpn_rules(lay)
    assert "policy drop" in vr and "ip saddr 10.40.0.0/16 ip daddr { 172.20.0.0/16 } counter accept" in vr
    # Without a site, the router has no such rules.
    assert "172.20." not in router_rules(build_layout("prod", tmp_path, onprem="none"))


def test_the_site_file_says_what_it_is() -> None:
    text = ONPREM_SITE.read_text()
    assert "munged and slurmd run there" in text and "--onprem none" in text
    assert "INVAL" in text  # why the nodes are sized to this machine


def test_each_node_has_its_own_namespace_on_the_site(tmp_path: Path) -> None:
    """A compute node is a host: its own namespace and address; the site's namespace keeps
    only the addresses of compute networks without a node."""
    from rehearsal.layout import node_ns

    lay = build_layout("prod", tmp_path, onprem="auto")
    assert lay.onprem is not None
    assert [node_ns(n) for n, _a in lay.onprem.nodes] == ["rh-cn001", "rh-cn002", "rh-cn003", "rh-cn004"]
    assert all(node_ns(n) in lay.namespaces for n, _a in lay.onprem.nodes)
    assert lay.onprem.extra_addresses == []


def test_a_node_gets_the_slurm_hosts_files_and_the_sites_own() -> None:
    """slurm.conf and the munge key come from an app host (never written here); the node's
    own files are the site's: its /etc/hosts, no cloud-init, a cgroup.conf with Slurm's
    defaults (slurmd 22.05 fails proctrack/cgroup's init without the file)."""
    from rehearsal import onprem

    lay = build_layout("prod", onprem="auto")
    files = onprem._node_files(lay, "cn002", "172.20.10.12")
    assert set(files) == {"/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/etc/cloud/cloud-init.disabled"}
    assert "172.20.10.12 cn002" in files["/etc/hosts"] and files["/etc/hostname"] == "cn002\n"
    conf = [line for line in onprem.SITE_CGROUP_CONF.splitlines() if line and not line.startswith("#")]
    assert conf == ["CgroupPlugin=autodetect"]


def _plugin_lines() -> list[str]:
    """The cgroup plugin lines of the program's slurm.conf template, as rendered."""
    text = (Path(__file__).resolve().parent.parent / "cloud_init/templates/slurm/slurm.conf").read_text()
    lines = [line for line in text.splitlines()
             if line.split("=")[0] in ("ProctrackType", "TaskPlugin", "JobAcctGatherType")]
    assert len(lines) == 3 and "ProctrackType=proctrack/cgroup" in lines, lines
    return lines


@pytest.mark.daemons
def test_a_node_container_runs_a_job_with_the_programs_cgroup_plugins(tmp_path: Path) -> None:
    """What the on-prem nodes rely on, on this machine's hybrid cgroups: a container of
    the host image whose v1 controllers are made writable (rehearsal.onprem.writable_cgroups)
    and that holds the site's cgroup.conf runs slurmctld and slurmd with the program's
    cgroup plugins; a job sbatch'ed as an unprivileged user completes, inside the
    freezer, memory and cpuacct cgroups Slurm made, all below the container's own cgroup."""
    import subprocess

    from rehearsal import container, image, onprem

    img = image.ensure("debian-12", tiers=True)
    tag = f"hs-n{os.getpid() % 100000}"
    ns, name, addr = tag, f"{tag}-a", "10.99.0.1"
    conf = "\n".join(["ClusterName=t", f"SlurmctldHost=cn001({addr})", "SlurmUser=slurm", "AuthType=auth/munge",
                      "CredType=cred/munge", *_plugin_lines(), "SelectType=select/cons_tres",
                      "SelectTypeParameters=CR_Core_Memory", "StateSaveLocation=/var/lib/slurm/slurmctld",
                      "SlurmdSpoolDir=/var/spool/slurmd", f"NodeName=cn001 NodeAddr={addr} CPUs=2 RealMemory=1000",
                      "PartitionName=c Nodes=cn001 Default=YES State=UP", ""])

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    try:
        ip("netns", "add", ns)
        ip("-n", ns, "link", "set", "lo", "up")
        # An address besides loopback: getaddrinfo (AI_ADDRCONFIG) resolves nothing without one.
        ip("-n", ns, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "v0")
        ip("-n", ns, "link", "set", "v0", "up")
        ip("-n", ns, "link", "set", "v1", "up")
        h = container.start(name, img, tmp_path / name, ns,
                            files={"/etc/hosts": f"127.0.0.1 localhost\n{addr} cn001\n", "/etc/hostname": "cn001\n",
                                   "/etc/cloud/cloud-init.disabled": ""})
        container.wait_running(h, timeout=180)
        rc, out = container.exec(h, ["mkdir", "/sys/fs/cgroup/freezer/probe"])
        assert rc != 0 and "Read-only file system" in out  # nspawn's own mount, as measured
        onprem.writable_cgroups(name)
        for path, text in (("/etc/slurm/slurm.conf", conf), ("/etc/slurm/cgroup.conf", onprem.SITE_CGROUP_CONF)):
            rc, out = container.exec(h, ["sh", "-c", f"install -m 0644 /dev/stdin {path}"], input=text.encode())
            assert rc == 0, out
        rc, out = container.exec(h, ["sh", "-c", "install -d -o slurm /var/lib/slurm/slurmctld && useradd -u 2001 -M u1 && "
                                     "systemctl start munge slurmctld slurmd && systemctl is-active munge slurmctld slurmd"],
                                 timeout=120)
        assert rc == 0, out
        rc, job = container.exec(h, ["runuser", "-u", "u1", "--", "sbatch", "--parsable", "--chdir=/tmp", "--mem=100",
                                     "-o", "/tmp/j-%j.out", "--wrap", "cat /proc/self/cgroup; echo done"], timeout=60)
        assert rc == 0 and job.strip().isdigit(), job
        deadline = time.monotonic() + 60
        state = ""
        while time.monotonic() < deadline and "JobState=COMPLETED" not in state:
            _rc, state = container.exec(h, ["scontrol", "-o", "show", "job", job.strip()])
            time.sleep(1)
        assert "JobState=COMPLETED" in state and "ExitCode=0:0" in state, state
        _rc, out = container.exec(h, ["cat", f"/tmp/j-{job.strip()}.out"])
        assert "done" in out, out
        for ctl in ("freezer", "memory", "cpuacct"):
            assert any(line.split(":")[1] == ctl and "/job_" in line for line in out.splitlines()), out
            assert list((container.cgroup_dirs(name)[ctl]).glob("slurm*")), f"{ctl}: Slurm's tree is not the node's"
    finally:
        container.cleanup_leftovers(f"{tag}-")
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    assert not any(container.leftovers(f"{tag}-").values())
