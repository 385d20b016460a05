"""Settings from the environment: the hpc-portal-<svc>-<port> unit sets PORTAL_SERVICE,
PORT, SERVER_ID, DB_NAME and HEALTH_PATH; /etc/hpc/portal.env the rest (REDIS_SENTINELS,
REDIS_MASTER_NAME, *_PASSWORD_FILE, DB_HOST/PORT/USER, SLURM_*). Nothing is hard-coded to
localhost except the defaults the app tier itself uses (the local DB writer)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

SERVICES = {"api": "/api/health", "auth": "/auth/health", "cae": "/health", "ws": "/ws/health"}


class SettingsError(ValueError):
    pass


def _secret(name: str) -> str:
    """NAME from the environment, else the file named by NAME_FILE (0440 root:portal)."""
    if os.environ.get(name):
        return os.environ[name]
    path = os.environ.get(f"{name}_FILE")
    if not path:
        return ""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as e:
        raise SettingsError(f"{name}_FILE={path}: cannot read it ({e.strerror})") from e


def _sentinels(raw: str) -> tuple[tuple[str, int], ...]:
    out = []
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise SettingsError(f"REDIS_SENTINELS: {item!r} is not host:port (a comma-separated list of them)")
        out.append((host, int(port)))
    return tuple(out)


def _int(env: Any, name: str, default: int, least: int) -> int:
    raw = env.get(name, "")
    if raw == "":
        return default
    if not raw.isdigit() or int(raw) < least:
        raise SettingsError(f"{name}={raw!r}: a whole number, at least {least}")
    return int(raw)


# Without a share in portal.env (a program older than DB_CONNECTIONS_PER_HOST), each
# process keeps this many: 12 processes on a host use 96 of the writer's connections.
DEFAULT_POOL_SIZE = 8
# The health round holds one while it checks; a request needs another.
MIN_POOL_SIZE = 2


def db_pool_size(env: Any) -> int:
    """Connections per process: PORTAL_DB_POOL_SIZE if set, else this host's share of the
    writer's connections (DB_CONNECTIONS_PER_HOST, from the program) divided among every
    portal process on the host (the ports in PORTAL_<SERVICE>_PORTS times PORTAL_WORKERS
    gunicorn workers each), so the host never takes more than its share."""
    if env.get("PORTAL_DB_POOL_SIZE"):
        return _int(env, "PORTAL_DB_POOL_SIZE", DEFAULT_POOL_SIZE, MIN_POOL_SIZE)
    share = _int(env, "DB_CONNECTIONS_PER_HOST", 0, 1)
    if not share:
        return DEFAULT_POOL_SIZE
    ports = sum(len([p for p in v.split(",") if p.strip()]) for k, v in env.items()
                if k.startswith("PORTAL_") and k.endswith("_PORTS"))
    processes = max(1, ports) * _int(env, "PORTAL_WORKERS", 2, 1)
    if share // processes < MIN_POOL_SIZE:
        raise SettingsError(f"DB_CONNECTIONS_PER_HOST={share}: {processes} portal processes on this host "
                            f"({ports} ports x PORTAL_WORKERS) need at least {MIN_POOL_SIZE} connections each; "
                            "set PORTAL_DB_POOL_SIZE or fewer workers")
    return share // processes


@dataclass(frozen=True)
class Settings:
    service: str
    port: int
    server_id: str
    health_path: str
    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    redis_password: str
    sentinel_password: str
    redis_timeout: float
    db_host: str
    db_port: int
    db_user: str
    db_password: str
    db_name: str
    cluster: str
    cookie_secure: bool
    poll_interval: float
    # The api service resubmits jobs a controller crash lost (reconcile.py); tests turn it off.
    reconcile_jobs: bool = True
    # Connections in this process's pool (db.py): see db_pool_size().
    db_pool_size: int = 8

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        service = env.get("PORTAL_SERVICE", "")
        if service not in SERVICES:
            raise SettingsError(f"PORTAL_SERVICE={service!r}: one of {', '.join(SERVICES)}")
        sentinels = _sentinels(env.get("REDIS_SENTINELS", ""))
        if not sentinels:
            raise SettingsError("REDIS_SENTINELS is empty: host:port of every Sentinel, comma-separated")
        pw = _secret("REDIS_PASSWORD")
        return cls(
            service=service,
            port=int(env.get("PORT", "0") or 0),
            server_id=env.get("SERVER_ID") or socket.gethostname(),
            health_path=env.get("HEALTH_PATH") or SERVICES[service],
            sentinels=sentinels,
            master_name=env.get("REDIS_MASTER_NAME", "mymaster"),
            redis_password=pw,
            sentinel_password=_secret("REDIS_SENTINEL_PASSWORD") or pw,
            redis_timeout=float(env.get("REDIS_SOCKET_TIMEOUT", "1.0")),
            db_host=env.get("DB_HOST", "127.0.0.1"),
            db_port=int(env.get("DB_PORT", "3306")),
            db_user=env.get("DB_USER", "portal"),
            db_password=_secret("DB_PASSWORD"),
            db_name=env.get("DB_NAME") or env.get(f"DB_NAME_{service.upper()}") or f"portal_{service}",
            # The Slurm cluster this portal submits to: one job-state poller per cluster.
            cluster=env.get("SLURM_CLUSTER", "hpc"),
            cookie_secure=env.get("PORTAL_COOKIE_SECURE", "1") != "0",
            poll_interval=float(env.get("PORTAL_POLL_INTERVAL", "2")),
            reconcile_jobs=env.get("PORTAL_RECONCILE_JOBS", "1") != "0",
            db_pool_size=db_pool_size(env),
        )
