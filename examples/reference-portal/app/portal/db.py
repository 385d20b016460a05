"""MariaDB through the local DB writer (hpc-dbwriter on 127.0.0.1:3306, a single-writer
HAProxy in front of Galera). PyMySQL under SQLAlchemy's connection pool: a bounded pool
per process, sized so that every portal process of this host together stays within the
host's share of the writer's connections (DB_CONNECTIONS_PER_HOST in portal.env, see
Settings.db_pool_size). Time-outs on connect, read, write and on waiting for a pooled
connection; a pooled connection that broke is replaced once (see Database.query), any
other failure fails the request (the client retries; writes are idempotent by request
id, so a retry is safe).

Why a pool and not one connection per thread: connections then grow with threads, and
threads are what a host needs more of while a backend stalls (each stalled request holds
one). One connection per thread with 16 threads per process already filled MariaDB's
default 151 connections after one writer move (3 app hosts, 12 processes each); with 64
threads every app host got "Too many connections" (1040) on the failback."""

from __future__ import annotations

import threading
from typing import Any

import pymysql  # type: ignore[import-untyped]
from sqlalchemy import create_engine, exc
from sqlalchemy.engine import URL, Engine

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

# How long a request waits for a pooled connection before it answers 503. Every pooled
# connection is busy only while the writer stalls (a frozen node holds a statement until
# the DB writer cuts it, ~3.5 s, or the read time-out): queueing longer only holds the
# thread, which the health checks need.
POOL_WAIT_S = 2.0
# A connection is replaced after an hour (the DB writer and MariaDB keep idle ones 8 h).
POOL_RECYCLE_S = 3600


class PoolTimeout(pymysql.err.OperationalError):
    """No pooled connection came free within POOL_WAIT_S (the writer stalls). A
    pymysql error, so it is a 503 like any other database failure."""


class Database:
    def __init__(self, s: Settings) -> None:
        self.s = s
        self.pool_size = s.db_pool_size
        self.engine: Engine = create_engine(
            URL.create("mysql+pymysql", username=s.db_user, password=s.db_password, host=s.db_host,
                       port=s.db_port, database=s.db_name, query={"charset": "utf8mb4"}),
            pool_size=self.pool_size, max_overflow=0, pool_timeout=POOL_WAIT_S, pool_recycle=POOL_RECYCLE_S,
            # Every statement is its own transaction, so nothing is left to roll back when a
            # connection goes back to the pool (the default would cost a round trip each).
            isolation_level="AUTOCOMMIT", pool_reset_on_return=None,
            connect_args={
                "connect_timeout": 2, "read_timeout": 5, "write_timeout": 5,
                # MariaDB here has no TLS (port 3306 is closed to all but the DB clients'
                # security group). Without this PyMySQL 1.1+ builds a default TLS context on
                # every connect (reads the system CA bundle: 63 ms against 1.3 ms per
                # connect, measured on an app host) only to find none offered; when the DB
                # writer moves, every pooled connection is made again at once and that CPU
                # stalled the writes 1-2.5 s (freeze-galera drill, failback).
                "ssl_disabled": True,
            },
        )
        self._schema_done = False
        self._lock = threading.Lock()

    def query(self, sql: str, args: Any = None) -> tuple[int, list[tuple[Any, ...]]]:
        """One statement: (rows affected, rows). A pooled connection that broke under it (the
        DB writer cut it: its node failed, or the preferred node came back and the sessions
        on a backup were shut) is dropped with every connection made before it (the pool's
        invalidation: they all went to the same writer) and the statement runs once more on
        a new one; every write here is idempotent (INSERT IGNORE by request id, UPDATE ...
        WHERE the old value), so that is safe. Any other error fails the request: PyMySQL's
        own exception, or PoolTimeout."""
        for attempt in (1, 2):
            try:
                self._ensure_schema()
                return self._run(sql, args)
            except exc.TimeoutError as e:
                raise PoolTimeout(0, f"no database connection came free in {POOL_WAIT_S:.0f} s "
                                     f"(pool of {self.pool_size} per process)") from e
            except exc.DBAPIError as e:
                if attempt == 1 and e.connection_invalidated:
                    continue
                # The driver's error, as the callers know it (IntegrityError, 2003 refused, ...).
                raise e.orig from e  # type: ignore[misc]
        raise AssertionError("unreachable")

    def _run(self, sql: str, args: Any) -> tuple[int, list[tuple[Any, ...]]]:
        with self.engine.connect() as c:
            # One set of positional parameters (SQLAlchemy reads a list as many sets).
            r = c.exec_driver_sql(sql, tuple(args)) if args is not None else c.exec_driver_sql(sql)
            rows = [tuple(row) for row in r] if r.returns_rows else []
            return r.rowcount, rows

    def pool_status(self) -> dict[str, int]:
        """The pool's size, connections in use and idle ones (the tests read it)."""
        p: Any = self.engine.pool
        return {"size": self.pool_size, "in_use": p.checkedout(), "idle": p.checkedin()}

    def _ensure_schema(self) -> None:
        if self._schema_done:
            return
        with self._lock:
            if not self._schema_done:
                for ddl in SCHEMA.values():
                    self._run(ddl, None)
                self._schema_done = True
