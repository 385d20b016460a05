"""Run a command in throw-away namespaces so config checks never resolve names or
reach anything outside this machine.

`run_isolated(cmd, hosts={"name": "ip"}, hostname="x")` runs `cmd` under
`unshare --net --mount --uts --fork` with a private /etc/hosts bind-mounted over the real
one and only loopback up. The namespaces die with the process: nothing to clean up.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Sequence


def can_isolate() -> bool:
    return os.geteuid() == 0 and shutil.which("unshare") is not None


def run_isolated(
    cmd: Sequence[str],
    *,
    hosts: dict[str, str] | None = None,
    hostname: str = "checker",
    extra_ips: Sequence[str] = (),
    binds: dict[str, str] | None = None,
    timeout: float = 60,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `cmd` in fresh net+mount+uts namespaces.

    hosts: entries for the private /etc/hosts. extra_ips: addresses added to a dummy
    interface (so a daemon can bind the host's private IP). binds: src -> dest bind mounts
    (dest must exist).
    """
    with tempfile.TemporaryDirectory(prefix="nsrun-") as tmp:
        hosts_file = os.path.join(tmp, "hosts")
        with open(hosts_file, "w") as f:
            f.write("127.0.0.1 localhost\n")
            f.write(f"127.0.1.1 {hostname}\n")
            for name, ip in sorted((hosts or {}).items()):
                f.write(f"{ip} {name}\n")
        script = ["set -e", "ip link set lo up", f"mount --bind {shlex.quote(hosts_file)} /etc/hosts"]
        script.append(f"hostname {shlex.quote(hostname)}")
        if extra_ips:
            script.append("ip link add dummy0 type veth peer name dummy1 && ip link set dummy1 up && ip link set dummy0 up")
            for ip in extra_ips:
                script.append(f"ip addr add {shlex.quote(ip)}/32 dev dummy0")
        for src, dest in (binds or {}).items():
            script.append(f"mount --bind {shlex.quote(src)} {shlex.quote(dest)}")
        script.append("exec " + shlex.join(cmd))
        full_env = dict(os.environ)
        full_env.update(env or {})
        return subprocess.run(
            ["unshare", "--net", "--mount", "--uts", "--fork", "--", "bash", "-c", "\n".join(script)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=full_env,
        )
