"""MariaDB through the local DB writer (hpc-dbwriter on 127.0.0.1:3306, a single-writer
HAProxy in front of Galera). PyMySQL, one connection per thread, time-outs on connect,
read and write; a kept connection that broke is replaced once (see Database.query),
any other failure fails the request (the client retries; writes are idempotent by
request id, so a retry is safe)."""

from __future__ import annotations

import threading
from typing import Any

import pymysql  # type: ignore[import-untyped]

from .settings import Settings

SCHEMA = {
    # The rehearsal's data-consistency probe (same as the stand-in's).
    "records": "CREATE TABLE IF NOT EXISTS records ("
               " id BIGINT AUTO_INCREMENT PRIMARY KEY, request_id VARCHAR(64) NOT NULL,"
               " payload VARCHAR(255) NOT NULL, server_id VARCHAR(64) NOT NULL,"
               " created TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),"
               " UNIQUE KEY uq_request (request_id)) ENGINE=InnoDB",
    # Which portal user asked for which job (Slurm runs them all as the portal account).
    "portal_jobs": "CREATE TABLE IF NOT EXISTS portal_jobs ("
                   " request_id VARCHAR(64) PRIMARY KEY, job_id VARCHAR(32) NOT NULL,"
                   " username VARCHAR(64) NOT NULL, name VARCHAR(128) NOT NULL,"
                   " created TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),"
                   " KEY by_user (username, created)) ENGINE=InnoDB",
    # What the reconciler needs to submit a lost job again (reconcile.py), and which job it replaced.
    "portal_jobs_resubmit": "ALTER TABLE portal_jobs ADD COLUMN IF NOT EXISTS seconds INT NOT NULL DEFAULT 600,"
                            " ADD COLUMN IF NOT EXISTS resubmitted_from VARCHAR(32) NULL,"
                            " ADD INDEX IF NOT EXISTS by_created (created)",
    # The auth service's accounts (werkzeug password hashes).
    "portal_users": "CREATE TABLE IF NOT EXISTS portal_users ("
                    " username VARCHAR(64) PRIMARY KEY, password_hash VARCHAR(255) NOT NULL) ENGINE=InnoDB",
}


CONNECTION_LOST = {2006, 2013}  # server has gone away; lost connection during query


def connection_lost(e: BaseException) -> bool:
    if isinstance(e, pymysql.err.InterfaceError):  # a use of a closed socket
        return True
    return isinstance(e, pymysql.err.OperationalError) and bool(e.args) and e.args[0] in CONNECTION_LOST


class Database:
    def __init__(self, s: Settings) -> None:
        self.s = s
        self.local = threading.local()
        self._schema_done = False
        self._lock = threading.Lock()

    def _conn(self) -> Any:
        c = getattr(self.local, "c", None)
        if c is None:
            c = pymysql.connect(host=self.s.db_host, port=self.s.db_port, user=self.s.db_user,
                                password=self.s.db_password, database=self.s.db_name, charset="utf8mb4",
                                connect_timeout=2, read_timeout=5, write_timeout=5, autocommit=True,
                                # MariaDB here has no TLS (port 3306 is closed to all but the
                                # DB clients' security group). Without this PyMySQL 1.1+ builds
                                # a default TLS context on every connect (reads the system CA
                                # bundle: 63 ms against 1.3 ms per connect, measured on an app
                                # host) only to find none offered; when the DB writer moves,
                                # every busy thread reconnects at once and that CPU stalled
                                # the writes 1-2.5 s (freeze-galera drill, failback).
                                ssl_disabled=True)
            self.local.c = c
        return c

    def _drop(self) -> None:
        c, self.local.c = getattr(self.local, "c", None), None
        if c is not None:
            try:
                c.close()
            except Exception:  # noqa: BLE001 - already broken
                pass

    def query(self, sql: str, args: Any = None) -> tuple[int, list[tuple[Any, ...]]]:
        """One statement. A kept connection that broke under it (the DB writer cut it: its
        node failed, or the preferred node came back and the sessions on a backup were
        shut) is dropped and the statement runs once more on a new one, as a pool with
        pre-ping would; every write here is idempotent (INSERT IGNORE by request id,
        UPDATE ... WHERE the old value), so that is safe. Any other error fails the request."""
        for attempt in (1, 2):
            kept = getattr(self.local, "c", None) is not None
            try:
                self._ensure_schema()
                with self._conn().cursor() as cur:
                    n = cur.execute(sql, args)
                    return n, list(cur.fetchall())
            except Exception as e:
                self._drop()
                if attempt == 1 and kept and connection_lost(e):
                    continue
                raise
        raise AssertionError("unreachable")

    def _ensure_schema(self) -> None:
        if self._schema_done:
            return
        with self._lock:
            if not self._schema_done:
                with self._conn().cursor() as cur:
                    for ddl in SCHEMA.values():
                        cur.execute(ddl)
                self._schema_done = True
