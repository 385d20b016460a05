"""One JSON request per connection over a Unix socket, one JSON line back: how the
rehearsal's tools talk to a host's init and to the AWS stand-ins' operations socket."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any


def call(path: Path | str, req: dict[str, Any], timeout: float) -> Any:
    """Send `req`, return the decoded answer; None when the other side closed without one."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(path))
    with s:
        s.sendall((json.dumps(req) + "\n").encode())
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            data += chunk
    return json.loads(data) if data else None
