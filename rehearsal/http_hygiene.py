"""HTTP hygiene of the portal's entry point, seen from a client: HSTS on HTTPS, no
`Server` header (proxied answers and HAProxy's own), plain HTTP redirected without HSTS
(only ACME challenges are proxied), TLS 1.0/1.1 refused by the server, TLS 1.2 and 1.3
accepted. The HTTP checks go to port 80 of the same host.

    check(["nsenter", "--net=/run/netns/<client ns>", "--"], "203.0.113.10")
    -> [{"name": "hsts", "ok": True, "got": "max-age=31536000", "expect": "..."}, ...]

curl and openssl are the clients (browsers ignore HSTS on an IP address, curl shows the
header). The certificate is not verified (-k): this checks headers and protocol versions,
and the rehearsal's certificate is self-signed.

TLS 1.0/1.1: curl (OpenSSL 3 at its default security level) refuses them before it sends
anything, which would prove nothing about the server. `openssl s_client` at SECLEVEL=0
offers only that version, and the check passes only when the SERVER answers with the
protocol_version alert (TLS alert 70): the version floor, not a missing cipher or a
client-side refusal.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence

HSTS_MIN_AGE = 31536000
TIMEOUT = 10
HOST_RE = re.compile(r"^[A-Za-z0-9.-]+(:\d{1,5})?$")
SERVER_ALERT_70 = "alert protocol version"  # what s_client prints for a received alert 70


def _run(prefix: Sequence[str], cmd: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=TIMEOUT + 5,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError as e:
        raise RuntimeError(f"http_hygiene: {e.filename} is not installed (needs curl and openssl)") from e
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(e.cmd, 124, "", f"no answer within {TIMEOUT + 5} s")


def _fetch(prefix: Sequence[str], url: str, *extra: str) -> tuple[str, dict[str, list[str]], str]:
    """curl URL -> (status line, {lower-case header name: [values]}, curl's error or "")."""
    r = _run(prefix, ["curl", "-sS", "-k", "--max-time", str(TIMEOUT), "-o", "/dev/null", "-D", "-", *extra, url])
    status = ""
    headers: dict[str, list[str]] = {}
    for line in r.stdout.splitlines():
        if line.startswith("HTTP/"):  # the last response if curl saw more than one
            status, headers = line.strip(), {}
        elif ":" in line:
            name, value = line.split(":", 1)
            headers.setdefault(name.strip().lower(), []).append(value.strip())
    return status, headers, "" if r.returncode == 0 else f"curl exit {r.returncode}: {r.stderr.strip()}"


def _code(status: str) -> int:
    parts = status.split()
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def _max_age(values: list[str]) -> int | None:
    if len(values) != 1:
        return None
    m = re.search(r"(?:^|;)\s*max-age\s*=\s*\"?(\d+)\"?\s*(?:;|$)", values[0], re.I)
    return int(m.group(1)) if m else None


def _describe(status: str, headers: dict[str, list[str]], err: str, *names: str) -> str:
    if err and not status:
        return err
    shown = [f"{n}: {v}" for n in names for v in headers.get(n, [])]
    return "; ".join([status or "(no response)", *(shown or [f"no {'/'.join(names)}"])])


def check(prefix: list[str], host: str) -> list[dict[str, object]]:
    """Run every check against https://<host> (and http://<host>) through `prefix`."""
    if not isinstance(host, str) or not HOST_RE.match(host):
        raise ValueError(f"http_hygiene.check: host {host!r} is not a host name or IPv4 address (optionally :port)")
    base = f"https://{host}"
    connect = host if ":" in host else f"{host}:443"
    out: list[dict[str, object]] = []

    def add(name: str, ok: bool, got: str, expect: str) -> None:
        out.append({"name": name, "ok": bool(ok), "got": got, "expect": expect})

    # A response from a backend (the portal's front page).
    status, headers, err = _fetch(prefix, f"{base}/")
    age = _max_age(headers.get("strict-transport-security", []))
    add("hsts", age is not None and age >= HSTS_MIN_AGE and _code(status) > 0,
        _describe(status, headers, err, "strict-transport-security"),
        f"one Strict-Transport-Security with max-age >= {HSTS_MIN_AGE} on {base}/")
    add("no server header (proxied)", _code(status) > 0 and "server" not in headers,
        _describe(status, headers, err, "server"), f"a response from {base}/ without a Server header")

    # A response HAProxy writes itself: its 400 for a header name with a space in it.
    status, headers, err = _fetch(prefix, f"{base}/", "--http1.1", "-H", "Bad Header: x")
    add("no server header (proxy error)", _code(status) == 400 and "server" not in headers,
        _describe(status, headers, err, "server"),
        "400 for a malformed request header, without a Server header")

    # Plain HTTP: a redirect to HTTPS, without HSTS (RFC 6797 7.2) and without Server.
    status, headers, err = _fetch(prefix, f"http://{host.split(':')[0]}/hygiene?q=1")
    location = (headers.get("location") or [""])[0]
    add("http redirects to https without hsts",
        _code(status) in (301, 308) and location.startswith(f"https://{host.split(':')[0]}")
        and "strict-transport-security" not in headers and "server" not in headers,
        _describe(status, headers, err, "location", "strict-transport-security", "server"),
        "301/308 to https://, no Strict-Transport-Security, no Server")

    # Plain HTTP that is proxied, not redirected (ACME HTTP-01): the web tier's answer,
    # whatever its status, without its Server header.
    status, headers, err = _fetch(prefix, f"http://{host.split(':')[0]}/.well-known/acme-challenge/hygiene")
    add("no server header (plain http, proxied)", _code(status) > 0 and "server" not in headers,
        _describe(status, headers, err, "server"),
        "an answer to /.well-known/acme-challenge/ on plain HTTP without a Server header")

    for version, flag in (("1.0", "-tls1"), ("1.1", "-tls1_1")):
        r = _run(prefix, ["openssl", "s_client", "-connect", connect, flag, "-cipher", "DEFAULT@SECLEVEL=0"])
        text = r.stdout + r.stderr
        if r.returncode == 0:
            version_line = re.search(r"Protocol\s*:\s*(\S+)", text)
            got = f"handshake completed ({version_line.group(1) if version_line else '?'})"
        else:
            got = next((line.strip() for line in text.splitlines() if ":error:" in line), f"s_client exit {r.returncode}")
        add(f"tls {version} refused by the server", r.returncode != 0 and SERVER_ALERT_70 in text, got,
            f"the server answers a TLS {version} ClientHello with the protocol_version alert (70)")

    for version in ("1.2", "1.3"):
        r = _run(prefix, ["curl", "-sS", "-k", "-v", "--max-time", str(TIMEOUT), "-o", "/dev/null", "-w", "%{http_code}",
                          f"--tlsv{version}", "--tls-max", version, f"{base}/"])
        m = re.search(r"SSL connection using (TLSv[\d.]+)", r.stderr)
        got = f"{m.group(1)}, HTTP {r.stdout.strip()}" if m else (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
        add(f"tls {version} accepted", r.returncode == 0 and m is not None and m.group(1) == f"TLSv{version}", got,
            f"a TLS {version} handshake and an HTTP answer")
    return out
