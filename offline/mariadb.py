"""A real MariaDB 10.11 with wsrep ON, as a single-node Galera cluster, for tests.

`gcomm://` with no peers bootstraps a new one-node cluster, so the node runs the same
Galera code paths as the data tier (write-set replication, certification, TOI DDL,
wsrep_max_ws_size). The write-set limit is small (2 MiB by default) so that the
migration's batching has to work for real. The server runs from a temp directory, as
the mysql user when the tests run as root, and is stopped by its PID.

    from offline.mariadb import mariadb  # noqa: F401  (the session fixture)

Also used outside pytest by tools/bench_migration.py (MariaDB(...).start()).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

GALERA_PROVIDER = "/usr/lib/galera/libgalera_smm.so"
PORTAL_DATABASES = ("portal_api", "portal_cae", "portal_ws")
APP_USER, APP_PASSWORD = "portal", "portal-Pw-1"


def missing_binaries() -> str | None:
    for exe in ("mariadbd", "mariadb-install-db"):
        if not (shutil.which(exe) or os.path.exists(f"/usr/sbin/{exe}")):
            return f"{exe} is not installed (Debian: apt-get install mariadb-server galera-4)"
    if not os.path.exists(GALERA_PROVIDER):
        return f"{GALERA_PROVIDER} is missing (Debian: apt-get install galera-4)"
    return None


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick_port(preferred: int) -> int:
    if _free(preferred):
        return preferred
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MariaDB:
    def __init__(self, *, port: int = 33061, galera_port: int = 45671, max_ws_size: int = 2 * 1024 * 1024,
                 max_allowed_packet: int = 16 * 1024 * 1024, extra_args: tuple[str, ...] = ()) -> None:
        self.port = _pick_port(port)
        self.galera_port = _pick_port(galera_port)
        self.max_ws_size = max_ws_size
        self.max_allowed_packet = max_allowed_packet
        self.extra_args = extra_args
        self.base = Path(tempfile.mkdtemp(prefix="mariadb-galera-"))
        self.datadir = self.base / "data"
        self.sock = str(self.base / "sock")
        self.log = self.base / "error.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def _mariadbd(self) -> str:
        return shutil.which("mariadbd") or "/usr/sbin/mariadbd"

    def start(self, timeout: float = 60) -> MariaDB:
        as_root = os.geteuid() == 0
        self.datadir.mkdir()
        user_args: list[str] = []
        if as_root:
            mysql = pwd.getpwnam("mysql")
            os.chmod(self.base, 0o755)
            for p in (self.base, self.datadir):
                os.chown(p, mysql.pw_uid, mysql.pw_gid)
            user_args = ["--user=mysql"]
        install = subprocess.run(
            [shutil.which("mariadb-install-db") or "/usr/bin/mariadb-install-db", "--no-defaults",
             f"--datadir={self.datadir}", "--auth-root-authentication-method=normal", "--skip-test-db", *user_args],
            capture_output=True, text=True, timeout=120)
        if install.returncode != 0:
            raise RuntimeError(f"mariadb-install-db failed: {install.stdout[-2000:]}{install.stderr[-2000:]}")
        args = [
            self._mariadbd(), "--no-defaults", f"--datadir={self.datadir}", f"--socket={self.sock}",
            f"--port={self.port}", "--bind-address=127.0.0.1", *user_args,
            f"--pid-file={self.base / 'mariadbd.pid'}", f"--log-error={self.log}",
            "--wsrep-on=ON", f"--wsrep-provider={GALERA_PROVIDER}", "--wsrep-cluster-address=gcomm://",
            "--wsrep-cluster-name=migration-test", "--wsrep-node-address=127.0.0.1",
            f"--wsrep-provider-options=base_port={self.galera_port};gcache.size=32M",
            f"--wsrep-max-ws-size={self.max_ws_size}", f"--max-allowed-packet={self.max_allowed_packet}",
            "--binlog-format=ROW", "--innodb-autoinc-lock-mode=2", "--default-storage-engine=InnoDB",
            "--character-set-server=utf8mb4", "--collation-server=utf8mb4_general_ci",
            "--innodb-buffer-pool-size=128M", "--innodb-flush-log-at-trx-commit=2", "--skip-name-resolve",
            *self.extra_args,
        ]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mariadbd exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if self.status("wsrep_ready") == "ON":
                    break
            except Exception:  # not accepting connections yet
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mariadbd did not reach wsrep_ready=ON in {timeout:g} s:\n{self.log_tail()}")
            time.sleep(0.1)
        self.provision()
        return self

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no error log)"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None
        shutil.rmtree(self.base, ignore_errors=True)

    # -- clients ------------------------------------------------------------------
    def root(self) -> Any:
        import pymysql

        return pymysql.connect(unix_socket=self.sock, user="root", charset="utf8mb4", autocommit=True)

    def sql(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        conn = self.root()
        try:
            with conn.cursor() as cur:
                cur.execute(query, params)
                return list(cur.fetchall())
        finally:
            conn.close()

    def status(self, name: str) -> str:
        rows = self.sql("SHOW GLOBAL STATUS LIKE %s", (name,))
        return str(rows[0][1]) if rows else ""

    def last_committed(self) -> int:
        """Galera's seqno: any replicated write (DML or DDL) raises it."""
        return int(self.status("wsrep_last_committed"))

    @property
    def app(self) -> dict[str, Any]:
        """Connection settings of the portal's account, over TCP as through the writer endpoint."""
        return {"host": "127.0.0.1", "port": self.port, "user": APP_USER, "password": APP_PASSWORD}

    def provision(self) -> None:
        """The portal's databases and account, as the data tier's bootstrap creates them."""
        self.reset()
        for host in ("127.0.0.1", "localhost"):
            self.sql(f"CREATE USER IF NOT EXISTS '{APP_USER}'@'{host}' IDENTIFIED BY '{APP_PASSWORD}'")
            for db in PORTAL_DATABASES:
                self.sql(f"GRANT ALL PRIVILEGES ON `{db}`.* TO '{APP_USER}'@'{host}'")

    def reset(self) -> None:
        for db in PORTAL_DATABASES:
            self.sql(f"DROP DATABASE IF EXISTS `{db}`")
            self.sql(f"CREATE DATABASE `{db}` CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci")

    def tables(self) -> dict[str, list[str]]:
        rows = self.sql("SELECT TABLE_SCHEMA, TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA IN "
                        f"({', '.join(['%s'] * len(PORTAL_DATABASES))}) ORDER BY 1, 2", PORTAL_DATABASES)
        out: dict[str, list[str]] = {db: [] for db in PORTAL_DATABASES}
        for db, t in rows:
            out[db].append(t)
        return {db: sorted(ts) for db, ts in out.items()}


@pytest.fixture(scope="session")
def mariadb() -> Iterator[MariaDB]:
    reason = missing_binaries()
    if reason:
        pytest.skip(f"needs a real MariaDB with Galera: {reason}")
    server = MariaDB()
    try:
        server.start()
        yield server
    finally:
        server.stop()
