#!/usr/bin/python3
"""systemctl inside a rehearsal host. No systemd here: this passes the arguments to the
host's init (/run/rehearsal/init.sock), which starts what the units would start, and
prints what it answers. Exit codes follow systemctl's (0, 1, 3 inactive, 4/5 no unit)."""

import json
import socket
import sys


def main() -> int:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect("/run/rehearsal/init.sock")
    except OSError as e:
        print(f"systemctl (rehearsal): host init unreachable: {e}", file=sys.stderr)
        return 1
    with s:
        s.sendall((json.dumps({"op": "systemctl", "argv": sys.argv[1:]}) + "\n").encode())
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    resp = json.loads(data or b'{"rc": 1, "out": "no answer"}')
    out = resp.get("out", "")
    if out:
        print(out, file=sys.stdout if resp.get("rc", 1) == 0 else sys.stderr)
    return int(resp.get("rc", 1))


if __name__ == "__main__":
    sys.exit(main())
