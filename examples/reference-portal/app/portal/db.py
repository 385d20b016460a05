"""MariaDB through the local DB writer (hpc-dbwriter on 127.0.0.1:3306, a single-writer
HAProxy in front of Galera). PyMySQL, one connection per thread, time-outs on connect,
read and write; a broken connection is dropped and the request fails (the client
retries; writes are idempotent by request id, so a retry is safe)."""

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
                                connect_timeout=2, read_timeout=5, write_timeout=5, autocommit=True)
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
        try:
            self._ensure_schema()
            with self._conn().cursor() as cur:
                n = cur.execute(sql, args)
                return n, list(cur.fetchall())
        except Exception:
            self._drop()
            raise

    def _ensure_schema(self) -> None:
        if self._schema_done:
            return
        with self._lock:
            if not self._schema_done:
                with self._conn().cursor() as cur:
                    for ddl in SCHEMA.values():
                        cur.execute(ddl)
                self._schema_done = True
