"""The portal's four SQLite databases move into MariaDB Galera (phase 2): tools/migrate_sqlite.py.

The SQLite files are built here the way the portal's services write them (AUTOINCREMENT
ids, a table without a primary key, a composite key, a WITHOUT ROWID table, indexes and
UNIQUE constraints, defaults, Korean text and emoji, NULLs, ~1 MB blobs, a 5k-row
table, one file in WAL mode). The target is a real MariaDB 10.11 with wsrep ON
(offline/mariadb.py) whose wsrep_max_ws_size is 2 MiB, so a batch that ignored the
write-set limit is refused by Galera itself. "Nothing written" is checked with Galera's
own counter: wsrep_last_committed rises with every replicated write, DDL included.
"""

from __future__ import annotations

import io
import os
import random
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pymysql
import pytest
import yaml

from offline.mariadb import MariaDB, mariadb  # noqa: F401  (session fixture)
from tests.loadfile import load_tool

REPO = Path(__file__).resolve().parent.parent
TOOL = REPO / "tools" / "migrate_sqlite.py"


ms = load_tool("migrate_sqlite")
MAP = ms.load_map(ms.DEFAULT_MAP)

KOREAN = ["홍길동", "작업이 완료되었습니다", "시뮬레이션 결과 보고서", "관리자 공지사항", "메시 생성 실패"]
EMOJI = ["🚀", "🔥", "✅", "👩‍🔬", "🇰🇷", "⚠️"]
BLOB_ROWS, BLOB_SIZE = 5, 1_000_000
NOTIFICATIONS = 5000


# ------------------------------------------------------------------------------------
# Realistic SQLite sources
# ------------------------------------------------------------------------------------

def _text(rng: random.Random, i: int) -> str:
    return f"{rng.choice(KOREAN)} #{i} {rng.choice(EMOJI)} job {rng.randint(1, 99999)} — ünïcödé"


def build_backend_dashboard(path: Path, rng: random.Random) -> None:
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE notifications (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            user_id INTEGER NOT NULL,
            title VARCHAR(200) NOT NULL,
            message TEXT,
            level VARCHAR(20) NOT NULL DEFAULT 'info',
            is_read BOOLEAN NOT NULL DEFAULT 0,
            created_at DATETIME DEFAULT CURRENT_TIMESTAMP
        );
        CREATE INDEX ix_notifications_user_read ON notifications (user_id, is_read);
        CREATE INDEX ix_notifications_created ON notifications (created_at DESC);
        CREATE TABLE job_templates (
            id INTEGER PRIMARY KEY,
            name VARCHAR(100) NOT NULL UNIQUE,
            owner TEXT COLLATE NOCASE,
            script TEXT NOT NULL,
            cores INTEGER DEFAULT 1,
            memory_gb REAL,
            params JSON,
            price NUMERIC(10, 2),
            created_at DATETIME NOT NULL DEFAULT (datetime('now'))
        );
        CREATE TABLE dashboard_configs (
            user_id INTEGER NOT NULL,
            widget TEXT NOT NULL,
            config BLOB,
            position INTEGER DEFAULT 0,
            updated_at TIMESTAMP,
            PRIMARY KEY (user_id, widget)
        );
        CREATE TABLE reports (
            title TEXT NOT NULL,
            body TEXT,
            attachment BLOB,
            generated_at DATETIME,
            size_kb NUMERIC
        );
        CREATE INDEX ix_reports_title ON reports (title);
    """)
    rows = []
    for i in range(1, NOTIFICATIONS + 11):
        rows.append((rng.randint(1, 40), _text(rng, i), None if i % 7 == 0 else _text(rng, i) * rng.randint(1, 4),
                     rng.choice(["info", "warning", "error"]), i % 3 == 0,
                     f"2024-0{1 + i % 9}-{1 + i % 28:02d} {i % 24:02d}:{i % 60:02d}:{i % 59:02d}"
                     + (f".{i % 999999:06d}" if i % 2 else "")))
    conn.executemany("INSERT INTO notifications (user_id, title, message, level, is_read, created_at) "
                     "VALUES (?,?,?,?,?,?)", rows)
    conn.execute("DELETE FROM notifications WHERE id > ?", (NOTIFICATIONS,))  # sqlite_sequence stays at 5010
    conn.execute("INSERT INTO job_templates (id, name, script) VALUES (0, 'empty-defaults', 'true')")
    conn.executemany("INSERT INTO job_templates (name, owner, script, cores, memory_gb, params, price, created_at) "
                     "VALUES (?,?,?,?,?,?,?,?)", [
                         ("cfd-openfoam", "Kim", "#!/bin/bash\nmpirun simpleFoam\n", 32, 0.1 + 0.2, '{"mesh": "fine"}',
                          12.5, "2024-03-01 09:00:00"),
                         ("fea-구조해석", "lee", "#!/bin/bash\nccx -i model\n", 8, 1 / 3, None, 0.1,
                          "2024-03-02T10:30:00"),
                         ("ml-🚀", None, "python train.py 'quoted' \\ back\\slash", 4, 1e-300, '{"gpu": 1}',
                          99999999.99, "2024-03-03 11:00:00.250000"),
                         ("date-only", "park", "true", 1, None, None, None, "2024-03-04"),
                     ])
    conn.executemany("INSERT INTO dashboard_configs VALUES (?,?,?,?,?)", [
        (u, w, (f'{{"widget": "{w}", "user": {u}}}'.encode() * (20000 if u == 3 and w == "jobs" else 1)),
         n, f"2024-05-0{1 + n}T12:00:00")
        for u in range(1, 6) for n, w in enumerate(["jobs", "queue", "storage", "알림"])])
    for i in range(BLOB_ROWS + 1):
        conn.execute("INSERT INTO reports VALUES (?,?,?,?,?)",
                     (f"월간 보고서 {i}", _text(rng, i) * 50, None if i == 2 else rng.randbytes(BLOB_SIZE),
                      f"2024-06-{10 + i} 08:00:00", BLOB_SIZE // 1024 if i != 2 else None))
    conn.execute("DELETE FROM reports WHERE rowid = 4")  # a gap: rowids are 1,2,3,5,6
    conn.commit()
    conn.close()


def build_vnc(path: Path, rng: random.Random) -> None:
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE vnc_sessions (
            session_id TEXT PRIMARY KEY,
            user_id INTEGER NOT NULL,
            node TEXT NOT NULL,
            display INTEGER NOT NULL,
            port INTEGER,
            password_hash BLOB,
            status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'running', 'ended')),
            started_at DATETIME DEFAULT (datetime('now')),
            ended_at DATETIME,
            UNIQUE (node, display)
        );
        CREATE INDEX ix_vnc_user ON vnc_sessions (user_id);
    """)
    conn.executemany("INSERT INTO vnc_sessions VALUES (?,?,?,?,?,?,?,?,?)", [
        (f"{rng.getrandbits(128):032x}", rng.randint(1, 40), f"compute-{i % 8:02d}", i // 8 + 1, 5900 + i // 8 + 1,
         rng.randbytes(32), ["pending", "running", "ended"][i % 3], f"2024-07-01 {i % 24:02d}:00:00",
         None if i % 3 != 2 else f"2024-07-02 {i % 24:02d}:30:00") for i in range(60)])
    conn.commit()
    conn.close()


def build_users(path: Path, rng: random.Random) -> None:
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE users (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            username VARCHAR(80) NOT NULL UNIQUE,
            email VARCHAR(120) UNIQUE,
            password_hash VARCHAR(256) NOT NULL,
            display_name TEXT,
            is_admin BOOLEAN NOT NULL DEFAULT 0 CHECK (is_admin IN (0, 1)),
            quota_gb REAL DEFAULT 100.0,
            created_at DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP,
            last_login DATETIME
        );
    """)
    # Kim/kim and lee/'lee ' are distinct in SQLite (BINARY): the target must keep them distinct.
    names = ["admin", "Kim", "kim", "lee", "lee ", "박지성", "user🚀"] + [f"user{i:03d}" for i in range(60)]
    conn.executemany("INSERT INTO users (username, email, password_hash, display_name, is_admin, quota_gb, "
                     "created_at, last_login) VALUES (?,?,?,?,?,?,?,?)", [
                         (n, None if i % 5 == 4 else f"u{i}@example.kr", "pbkdf2:sha256:600000$" + "x" * 80,
                          rng.choice(KOREAN) + rng.choice(EMOJI) if i % 4 else None, int(n == "admin"),
                          None if i % 6 == 0 else rng.choice([100.0, 250.5, 1e3]),
                          f"2023-12-{1 + i % 28:02d} 10:00:00", None if i % 2 else "2024-08-01 07:07:07.000007")
                         for i, n in enumerate(names)])
    conn.execute("DELETE FROM users WHERE username = 'user059'")
    conn.commit()
    conn.close()


def build_ws_dashboard(path: Path, rng: random.Random) -> None:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript("""
        CREATE TABLE notifications (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            user_id INTEGER,
            title TEXT,
            message TEXT,
            created_at DATETIME DEFAULT CURRENT_TIMESTAMP
        );
        CREATE TABLE dashboard_configs (
            user_id INTEGER NOT NULL,
            widget TEXT NOT NULL,
            config TEXT,
            PRIMARY KEY (user_id, widget)
        ) WITHOUT ROWID;
    """)
    conn.executemany("INSERT INTO notifications (user_id, title, message, created_at) VALUES (?,?,?,?)",
                     [(None if i % 9 == 0 else i % 11, f"ws {_text(rng, i)}", None if i % 4 == 0 else "연결 끊김 🔌",
                       f"2024-09-01 00:{i % 60:02d}:00") for i in range(300)])
    conn.executemany("INSERT INTO dashboard_configs VALUES (?,?,?)",
                     [(u, w, f"layout {w} {rng.choice(EMOJI)}" * 30) for u in range(1, 41)
                      for w in ("grid", "tabs", "위젯")])
    conn.commit()
    conn.close()


def build_portal(root: Path, seed: int = 7) -> Path:
    rng = random.Random(seed)
    for rel, build in (("backend_5010/database/dashboard.db", build_backend_dashboard),
                       ("backend_5010/vnc_sessions.db", build_vnc),
                       ("kooCAEWebServer_5000/db/users.db", build_users),
                       ("websocket_5011/database/dashboard.db", build_ws_dashboard)):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        build(p, rng)
    return root


EXPECTED = {
    "portal_api.notifications": NOTIFICATIONS, "portal_api.job_templates": 5, "portal_api.dashboard_configs": 20,
    "portal_api.reports": BLOB_ROWS, "portal_api.vnc_sessions": 60, "portal_cae.users": 66,
    "portal_ws.notifications": 300, "portal_ws.dashboard_configs": 120,
}


@pytest.fixture
def portal(tmp_path: Path) -> Path:
    return build_portal(tmp_path / "portal")


@pytest.fixture
def db(mariadb: MariaDB) -> MariaDB:  # noqa: F811
    mariadb.reset()
    return mariadb


def run(db: MariaDB, root: Path, specs: Any = None, **kw: Any) -> Any:
    kw.setdefault("out", io.StringIO())
    return ms.migrate(specs if specs is not None else MAP, root, connection=db.app, **kw)


def statuses(report: Any) -> dict[str, str]:
    return {r.target: r.status for r in report.results}


def app_conn(db: MariaDB, database: str) -> Any:
    return pymysql.connect(database=database, charset="utf8mb4", autocommit=True, **db.app)


def fetch(db: MariaDB, database: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    conn = app_conn(db, database)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return list(cur.fetchall())
    finally:
        conn.close()


def visible_tables(db: MariaDB) -> dict[str, list[str]]:
    return db.tables()


# ------------------------------------------------------------------------------------
# Full run, verification, re-run
# ------------------------------------------------------------------------------------

@pytest.mark.daemons
def test_full_run_copies_every_table_into_its_database_and_verifies(db: MariaDB, portal: Path) -> None:
    report = run(db, portal)
    assert report.ok, ms.summary(report)
    assert statuses(report) == dict.fromkeys(EXPECTED, "copied")
    assert {r.target: r.dst_rows for r in report.results} == EXPECTED
    assert db.tables() == {
        "portal_api": ["_migration_state", "dashboard_configs", "job_templates", "notifications", "reports",
                       "vnc_sessions"],
        "portal_cae": ["_migration_state", "users"],
        "portal_ws": ["_migration_state", "dashboard_configs", "notifications"],
    }
    # Galera needs a primary key on every table; utf8mb4 everywhere
    no_pk = db.sql("SELECT t.TABLE_SCHEMA, t.TABLE_NAME FROM information_schema.TABLES t LEFT JOIN "
                   "information_schema.TABLE_CONSTRAINTS c ON c.TABLE_SCHEMA=t.TABLE_SCHEMA AND "
                   "c.TABLE_NAME=t.TABLE_NAME AND c.CONSTRAINT_TYPE='PRIMARY KEY' WHERE t.TABLE_SCHEMA LIKE "
                   "'portal\\_%%' AND c.CONSTRAINT_NAME IS NULL")
    assert no_pk == []
    assert {r[0] for r in db.sql("SELECT DISTINCT CHARACTER_SET_NAME FROM information_schema.COLUMNS WHERE "
                                 "TABLE_SCHEMA LIKE 'portal\\_%%' AND CHARACTER_SET_NAME IS NOT NULL")} == {"utf8mb4"}

    # every value equals SQLite's, compared directly (not through the tool's checksum)
    src = sqlite3.connect(portal / "backend_5010/database/dashboard.db")
    want = src.execute("SELECT id, user_id, title, message, level, is_read, created_at FROM notifications "
                       "ORDER BY id").fetchall()
    got = fetch(db, "portal_api", "SELECT id, user_id, title, message, level, is_read, created_at FROM "
                                  "notifications ORDER BY id")
    assert len(got) == NOTIFICATIONS
    for w, g in zip(want, got, strict=True):
        assert g[:6] == (w[0], w[1], w[2], w[3], w[4], int(w[5])), (w, g)
        assert g[6].isoformat(sep=" ").startswith(w[6]) or g[6].strftime("%Y-%m-%d %H:%M:%S.%f") == w[6]
    assert any("🚀" in g[2] or "🚀" in (g[3] or "") for g in got) and any("홍길동" in g[2] for g in got)
    assert sum(1 for g in got if g[3] is None) == NOTIFICATIONS // 7
    blobs = src.execute("SELECT rowid, title, attachment FROM reports ORDER BY rowid").fetchall()
    got_blobs = fetch(db, "portal_api", "SELECT _rowid, title, attachment FROM reports ORDER BY _rowid")
    assert got_blobs == blobs  # the surrogate key carries SQLite's rowid (1,2,3,5,6), ~1 MB blobs byte-exact
    assert [r[0] for r in got_blobs] == [1, 2, 3, 5, 6]
    # id 0 stays 0 (NO_AUTO_VALUE_ON_ZERO), the SQLite defaults filled the rest of its row
    assert fetch(db, "portal_api", "SELECT id, cores, created_at IS NOT NULL FROM job_templates WHERE "
                                   "name='empty-defaults'") == [(0, 1, 1)]
    assert fetch(db, "portal_api", "SELECT created_at FROM job_templates WHERE name='date-only'") == [
        (ms.dt.datetime(2024, 3, 4),)]
    assert fetch(db, "portal_api", "SELECT memory_gb, price, owner FROM job_templates WHERE id > 0 ORDER BY id")[:3] == [
        (0.1 + 0.2, ms.decimal.Decimal("12.50"), "Kim"), (1 / 3, ms.decimal.Decimal("0.10"), "lee"),
        (1e-300, ms.decimal.Decimal("99999999.99"), None)]
    assert fetch(db, "portal_cae", "SELECT username FROM users WHERE username IN ('kim', 'Kim', 'lee', 'lee ') "
                                   "ORDER BY id") == [("Kim",), ("kim",), ("lee",), ("lee ",)]

    # --verify reads both sides again and agrees, writing nothing
    before = db.last_committed()
    check = run(db, portal, verify_only=True)
    assert statuses(check) == dict.fromkeys(EXPECTED, "match")
    assert db.last_committed() == before

    # AUTOINCREMENT: the counter continues past SQLite's sqlite_sequence (5010), not max(id) (5000)
    conn = app_conn(db, "portal_api")
    with conn.cursor() as cur:
        cur.execute("INSERT INTO notifications (user_id, title) VALUES (1, '새 알림 🚀')")
        assert cur.lastrowid == NOTIFICATIONS + 11
        cur.execute("SELECT level, is_read, created_at IS NOT NULL FROM notifications WHERE id=%s", (cur.lastrowid,))
        assert cur.fetchone() == ("info", 0, 1)  # defaults: 'info', 0, CURRENT_TIMESTAMP
        cur.execute("INSERT INTO reports (title) VALUES ('new')")  # the surrogate key is AUTO_INCREMENT
        cur.execute("SELECT max(_rowid) FROM reports")
        assert cur.fetchone() == (7,)
        with pytest.raises(pymysql.err.IntegrityError):  # UNIQUE (name) came along
            cur.execute("INSERT INTO job_templates (name, script) VALUES ('cfd-openfoam', 'x')")
    conn.close()
    indexes = {(t, i) for t, i in db.sql("SELECT TABLE_NAME, INDEX_NAME FROM information_schema.STATISTICS WHERE "
                                         "TABLE_SCHEMA='portal_api'")}
    assert {("notifications", "ix_notifications_user_read"), ("notifications", "ix_notifications_created"),
            ("reports", "ix_reports_title"), ("vnc_sessions", "ix_vnc_user")} <= indexes
    assert fetch(db, "portal_cae", "SELECT id FROM users WHERE username='user058'") == [(66,)]

    # the two dashboard.db files: same table names, different databases, each its own content
    by = report.by_target()
    assert by["portal_api.notifications"].checksum != by["portal_ws.notifications"].checksum
    assert fetch(db, "portal_ws", "SELECT count(*) FROM notifications WHERE title LIKE 'ws %%'") == [(300,)]



@pytest.mark.daemons
def test_verification_catches_a_changed_row(db: MariaDB, portal: Path) -> None:
    assert run(db, portal, only=["cae-users"]).ok
    db.sql("UPDATE portal_cae.users SET display_name = 'tampered' WHERE username = 'Kim'")
    check = run(db, portal, only=["cae-users"], verify_only=True)
    assert statuses(check) == {"portal_cae.users": "MISMATCH"}
    again = run(db, portal, only=["cae-users"])
    assert not again.ok and [e.code for e in again.errors] == ["verify"]
    assert "portal_cae.users differs" in str(again.errors[0]) and "DROP TABLE portal_cae.users" in str(again.errors[0])


@pytest.mark.daemons
def test_rerun_is_a_verified_no_op(db: MariaDB, portal: Path) -> None:
    assert run(db, portal).ok
    before = db.last_committed()
    again = run(db, portal)
    assert again.ok, ms.summary(again)
    assert statuses(again) == dict.fromkeys(EXPECTED, "verified")
    assert all(r.batches == 0 for r in again.results)
    assert db.last_committed() == before  # not a single write
    plan = run(db, portal, dry_run=True)
    assert {r.message for r in plan.results} == {"done earlier: would verify and skip"}


@pytest.mark.daemons
def test_dry_run_prints_ddl_and_counts_and_writes_nothing(db: MariaDB, portal: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    before = db.last_committed()
    rc = ms.main(["--source-root", str(portal), "--dry-run", "--host", "127.0.0.1", "--port", str(db.port),
                  "--user", "portal", "--password-file", str(_pw_file(portal))])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert db.last_committed() == before
    assert db.tables() == {"portal_api": [], "portal_cae": [], "portal_ws": []}
    assert "CREATE TABLE `portal_api`.`notifications`" in out and "(5000 rows; would copy into a new table)" in out
    assert "`_rowid` BIGINT NOT NULL AUTO_INCREMENT" in out and "AUTO_INCREMENT=5011" in out
    assert "`username` VARCHAR(80) NOT NULL" in out and "UNIQUE KEY" in out
    assert "dry run: nothing is written" in out and "result: OK" in out


def test_dry_run_without_a_server_still_plans(portal: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    rc = ms.main(["--source-root", str(portal), "--dry-run", "--port", str(closed_port)])
    out = capsys.readouterr().out
    assert rc == 0 and "target checks skipped" in out and "target not checked" in out
    assert "CREATE TABLE `portal_cae`.`users`" in out
    assert ms.main(["--source-root", str(portal), "--port", str(closed_port)]) == 1  # a real run needs the server
    assert "cannot connect to MariaDB at 127.0.0.1" in capsys.readouterr().out


def _pw_file(root: Path) -> Path:
    p = root / "pw"
    p.write_text("portal-Pw-1\n")
    return p


# ------------------------------------------------------------------------------------
# Resume after a crash
# ------------------------------------------------------------------------------------

@pytest.mark.daemons
def test_resume_after_a_crash_mid_table(db: MariaDB, portal: Path) -> None:
    """The process dies (os._exit: no cleanup runs) after 3 committed batches of the
    5k-row table; the next run continues from the last committed key."""
    driver = textwrap.dedent(f"""
        import importlib.util, os, sys
        spec = importlib.util.spec_from_file_location("migrate_sqlite", {str(TOOL)!r})
        m = importlib.util.module_from_spec(spec); sys.modules["migrate_sqlite"] = m; spec.loader.exec_module(m)
        def crash(plan, batch, rows):
            if plan.target == "notifications" and batch == 3:
                os._exit(75)
        sys.exit(m.main(sys.argv[1:], on_batch=crash))
    """)
    env = dict(os.environ, MARIADB_PASSWORD=db.app["password"])
    cp = subprocess.run([sys.executable, "-c", driver, "--source-root", str(portal), "--only", "backend-dashboard",
                         "--port", str(db.port), "--batch-bytes", "65536"], capture_output=True, text=True, env=env,
                        timeout=60)
    assert cp.returncode == 75, cp.stdout + cp.stderr
    assert "notifications" not in db.tables()["portal_api"]  # nothing half-done is visible
    assert "_stg_notifications" in db.tables()["portal_api"]
    (last_key, copied, batches, status), = db.sql("SELECT last_key, rows_copied, batches, status FROM "
                                                  "portal_api._migration_state WHERE target_table='notifications'")
    assert (batches, status) == (3, "copying") and 0 < copied < NOTIFICATIONS
    assert db.sql("SELECT count(*), max(id) FROM portal_api._stg_notifications")[0] == (copied, copied)
    assert ms.json.loads(last_key) == [["integer", copied]]

    report = run(db, portal, only=["backend-dashboard"], batch_bytes=65536)
    assert report.ok, ms.summary(report)
    res = report.by_target()["portal_api.notifications"]
    assert res.status == "resumed" and res.message == f"resumed after {copied} rows"
    assert res.dst_rows == NOTIFICATIONS
    full = run(db, portal, only=["backend-dashboard"], verify_only=True)
    assert statuses(full)["portal_api.notifications"] == "match"
    assert "_stg_notifications" not in db.tables()["portal_api"]
    # the resumed run copied only the rest: its batches plus the 3 before make one full copy's count
    db.reset()
    fresh = run(db, portal, only=["backend-dashboard"], batch_bytes=65536)
    assert fresh.by_target()["portal_api.notifications"].batches == res.batches + 3


class Crash(BaseException):
    """Like KeyboardInterrupt: not an Exception, so no error handler cleans up."""


@pytest.mark.daemons
def test_resume_a_without_rowid_table_by_its_primary_key(db: MariaDB, portal: Path) -> None:
    def crash(plan: Any, batch: int, rows: int) -> None:
        if plan.label == "portal_ws.dashboard_configs" and batch == 2:
            raise Crash

    with pytest.raises(Crash):
        run(db, portal, only=["websocket-dashboard"], batch_bytes=8192, on_batch=crash)
    (last_key,) = db.sql("SELECT last_key FROM portal_ws._migration_state WHERE target_table='dashboard_configs'")[0]
    assert [tp for tp, _v in ms.json.loads(last_key)] == ["integer", "text"]
    report = run(db, portal, only=["websocket-dashboard"], batch_bytes=8192)
    assert report.ok, ms.summary(report)
    assert statuses(report) == {"portal_ws.notifications": "verified", "portal_ws.dashboard_configs": "resumed"}


# ------------------------------------------------------------------------------------
# Galera's write-set limit
# ------------------------------------------------------------------------------------

@pytest.mark.daemons
def test_batches_stay_under_the_write_set_limit(db: MariaDB, portal: Path) -> None:
    ws_limit = int(db.sql("SELECT @@wsrep_max_ws_size")[0][0])
    assert ws_limit == 2 * 1024 * 1024
    report = run(db, portal, only=["backend-dashboard"])
    assert report.ok, ms.summary(report)
    reports = report.by_target()["portal_api.reports"]
    assert BLOB_ROWS * BLOB_SIZE > 2 * ws_limit  # the table as one transaction would not fit ...
    assert reports.batches >= BLOB_ROWS - 1 and reports.max_batch_bytes < ws_limit  # ... so it went in batches
    assert all(r.max_batch_bytes <= report.budget or r.batches == 0 or r.max_batch_bytes < ws_limit
               for r in report.results)


@pytest.mark.daemons
def test_without_batching_galera_refuses_the_table(db: MariaDB, portal: Path) -> None:
    """Proves the limit is real: one transaction for the whole blob table fails with the
    wsrep error, and no table (nor its staging copy) is left behind."""
    report = run(db, portal, only=["backend-dashboard"], batch_bytes=64 * 1024 * 1024)
    res = report.by_target()["portal_api.reports"]
    assert res.status == "FAILED"
    err = next(e for e in report.errors if "reports" in e.message)
    assert err.code == "limit" and "Maximum writeset size exceeded" in err.message
    assert "wsrep_max_ws_size=2097152" in err.message
    tables = db.tables()["portal_api"]
    assert "reports" not in tables and "_stg_reports" not in tables
    assert db.sql("SELECT count(*) FROM portal_api._migration_state WHERE target_table='reports'") == [(0,)]
    assert any("batch-bytes" in w for w in report.warnings)


@pytest.mark.daemons
def test_a_row_larger_than_the_write_set_limit_is_named(db: MariaDB, tmp_path: Path) -> None:
    root = tmp_path / "big"
    (root / "kooCAEWebServer_5000/db").mkdir(parents=True)
    conn = sqlite3.connect(root / "kooCAEWebServer_5000/db/users.db")
    conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, avatar BLOB)")
    conn.execute("INSERT INTO users VALUES (1, ?), (2, ?)", (b"a" * 1000, b"b" * 3_000_000))
    conn.commit()
    conn.close()
    report = run(db, root, only=["cae-users"])
    assert [e.code for e in report.errors] == ["limit"]
    assert "row rowid 2 is 3000" in report.errors[0].message and "wsrep_max_ws_size=2097152" in report.errors[0].message
    assert "users" not in db.tables()["portal_cae"] and "_stg_users" not in db.tables()["portal_cae"]


# ------------------------------------------------------------------------------------
# Bad input: a clear error, and nothing written anywhere
# ------------------------------------------------------------------------------------

def _nothing_written(db: MariaDB, before: int) -> None:
    assert db.last_committed() == before
    assert db.tables() == {"portal_api": [], "portal_cae": [], "portal_ws": []}


@pytest.mark.daemons
def test_missing_file(db: MariaDB, portal: Path) -> None:
    (portal / "websocket_5011/database/dashboard.db").unlink()
    before = db.last_committed()
    report = run(db, portal)
    assert [e.code for e in report.errors] == ["missing"]
    msg = str(report.errors[0])
    assert "websocket_5011/database/dashboard.db" in msg and "websocket-dashboard" in msg and "not found" in msg
    _nothing_written(db, before)


@pytest.mark.daemons
def test_locked_file(db: MariaDB, portal: Path) -> None:
    path = portal / "kooCAEWebServer_5000/db/users.db"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sqlite3, sys, time
        c = sqlite3.connect({str(path)!r}, isolation_level=None)
        c.execute("BEGIN EXCLUSIVE")
        print("locked", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        before = db.last_committed()
        t0 = time.monotonic()
        report = run(db, portal, busy_timeout=0.5)
        assert time.monotonic() - t0 < 20
    finally:
        holder.kill()
        holder.wait()
    assert [e.code for e in report.errors] == ["locked"]
    assert "users.db" in str(report.errors[0]) and "locked by another process" in str(report.errors[0])
    _nothing_written(db, before)
    assert run(db, portal, only=["cae-users"]).ok  # once the writer is gone, it goes through


@pytest.mark.daemons
def test_not_a_database(db: MariaDB, portal: Path) -> None:
    (portal / "backend_5010/vnc_sessions.db").write_bytes(b"this is not SQLite " * 500)
    before = db.last_committed()
    report = run(db, portal)
    assert [e.code for e in report.errors] == ["corrupt"]
    assert "vnc_sessions.db" in str(report.errors[0]) and "not a usable SQLite database" in str(report.errors[0])
    _nothing_written(db, before)


@pytest.mark.daemons
def test_damaged_pages(db: MariaDB, portal: Path) -> None:
    path = portal / "kooCAEWebServer_5000/db/users.db"
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) >= 3 * page
    data[2 * page + 8: 2 * page + 200] = bytes(range(192))  # scribble over a b-tree page's cell area
    path.write_bytes(bytes(data))
    before = db.last_committed()
    report = run(db, portal)
    assert [e.code for e in report.errors] == ["corrupt"]
    assert "users.db" in str(report.errors[0])
    _nothing_written(db, before)


@pytest.mark.daemons
def test_conflicting_existing_table(db: MariaDB, portal: Path) -> None:
    db.sql("CREATE TABLE portal_cae.users (id BIGINT PRIMARY KEY, login VARCHAR(50))")
    before = db.last_committed()
    report = run(db, portal)
    assert [e.code for e in report.errors] == ["conflict"]
    msg = str(report.errors[0])
    assert "portal_cae.users already exists with columns (id, login)" in msg and "users.db" in msg
    assert db.last_committed() == before
    assert db.tables() == {"portal_api": [], "portal_cae": ["users"], "portal_ws": []}


@pytest.mark.daemons
def test_existing_empty_table_with_the_same_columns_is_replaced(db: MariaDB, portal: Path) -> None:
    """What the app leaves behind when it started once against MariaDB (create_all)."""
    cols = ("id INT AUTO_INCREMENT PRIMARY KEY, username VARCHAR(80), email VARCHAR(120), password_hash "
            "VARCHAR(256), display_name VARCHAR(100), is_admin BOOL, quota_gb FLOAT, created_at DATETIME, "
            "last_login DATETIME")
    db.sql(f"CREATE TABLE portal_cae.users ({cols})")
    db.sql("INSERT INTO portal_cae.users (username) VALUES ('only-in-mariadb')")
    report = run(db, portal, only=["cae-users"])
    assert [e.code for e in report.errors] == ["conflict"] and "holds rows" in str(report.errors[0])
    db.sql("DELETE FROM portal_cae.users")
    report = run(db, portal, only=["cae-users"])
    assert report.ok and statuses(report) == {"portal_cae.users": "replaced"}
    assert db.sql("SELECT count(*) FROM portal_cae.users") == [(66,)]


@pytest.mark.daemons
def test_two_sources_colliding_in_one_database_need_a_rename(db: MariaDB, portal: Path) -> None:
    doc = yaml.safe_load(ms.DEFAULT_MAP.read_text())
    doc["sources"][3]["database"] = "portal_api"  # both dashboard.db files into one database
    before = db.last_committed()
    report = run(db, portal, ms.parse_map(doc))
    assert [e.code for e in report.errors] == ["map"]
    assert "portal_api.notifications would receive" in str(report.errors[0]) and "rename" in str(report.errors[0])
    _nothing_written(db, before)
    doc["sources"][3]["rename"] = {"notifications": "ws_notifications", "dashboard_configs": "ws_dashboard_configs"}
    report = run(db, portal, ms.parse_map(doc))
    assert report.ok, ms.summary(report)
    assert {"ws_notifications", "ws_dashboard_configs", "notifications"} <= set(db.tables()["portal_api"])


@pytest.mark.daemons
def test_invalid_utf8_is_reported_or_kept_as_bytes(db: MariaDB, portal: Path) -> None:
    path = portal / "backend_5010/vnc_sessions.db"
    conn = sqlite3.connect(path)
    conn.execute("UPDATE vnc_sessions SET node = CAST(X'636f6d707574652dff' AS TEXT) WHERE rowid = 5")
    conn.commit()
    conn.close()
    before = db.last_committed()
    report = run(db, portal)
    assert [e.code for e in report.errors] == ["data"]
    msg = str(report.errors[0])
    assert "vnc_sessions" in msg and "column node" in msg and "invalid UTF-8" in msg and "column_types" in msg
    _nothing_written(db, before)
    doc = yaml.safe_load(ms.DEFAULT_MAP.read_text())
    doc["sources"][1]["column_types"] = {"vnc_sessions.node": "VARBINARY(64)"}
    report = run(db, portal, ms.parse_map(doc), only=["backend-vnc"])
    assert report.ok, ms.summary(report)
    assert db.sql("SELECT count(*) FROM portal_api.vnc_sessions WHERE node = X'636f6d707574652dff'") == [(1,)]


# ------------------------------------------------------------------------------------
# Translation rules (no server)
# ------------------------------------------------------------------------------------

GOLDEN_DDL = REPO / "tests" / "fixtures" / "migration" / "golden_ddl.json"


def _unicode_ci(a: str, b: str) -> int:
    return (a.lower() > b.lower()) - (a.lower() < b.lower())


def build_edge(path: Path) -> None:
    """Schema text that is easy to misread: quoted names with commas, keywords inside
    strings, comments and names, every built-in collation and one the tool does not know,
    CHECK as a column and a table constraint, WITHOUT ROWID after a comment, generated
    columns, AUTOINCREMENT with and without a counter in sqlite_sequence."""
    conn = sqlite3.connect(path)
    conn.create_collation("unicode_ci", _unicode_ci)
    conn.executescript("""
        CREATE TABLE edge_rowid (
            id INTEGER PRIMARY KEY AUTOINCREMENT, -- c, d COLLATE NOCASE
            "na,me" TEXT COLLATE NOCASE DEFAULT 'a,b)',
            [bracket col] VARCHAR(10) COLLATE RTRIM,
            `tick` TEXT collate "nocase",
            plain TEXT COLLATE BINARY,
            score INTEGER CHECK (score >= 0)
        );
        CREATE TABLE edge_nocheck (
            id INTEGER PRIMARY KEY,
            "check" TEXT,
            check_status INTEGER,
            note TEXT DEFAULT 'COLLATE NOCASE CHECK (x) WITHOUT ROWID AUTOINCREMENT' /* CHECK (id > 0) */
        );
        CREATE TABLE edge_wr (
            k TEXT COLLATE NOCASE,
            n INTEGER,
            v BLOB,
            PRIMARY KEY (k, n),
            CONSTRAINT n_positive CHECK (n > 0)
        ) /* comment */ without
          ROWID;
        CREATE TABLE edge_autoinc_empty (id INTEGER PRIMARY KEY AUTOINCREMENT, label TEXT);
        CREATE TABLE edge_custom (
            id INTEGER PRIMARY KEY,
            name TEXT COLLATE unicode_ci,
            doubled INTEGER GENERATED ALWAYS AS (id * 2) STORED,
            shout TEXT AS (upper(name)) VIRTUAL
        );
        CREATE UNIQUE INDEX uq_edge_rowid_name ON edge_rowid ("na,me");
    """)
    conn.executemany('INSERT INTO edge_rowid ("na,me", [bracket col], tick, plain, score) VALUES (?,?,?,?,?)',
                     [("Kim", "a ", "x", "p", 1), ("lee", "b", "y", "q", 2)])
    conn.execute("INSERT INTO edge_nocheck (id, \"check\", check_status) VALUES (1, 'ok', 0)")
    conn.executemany("INSERT INTO edge_wr VALUES (?,?,?)", [("a", 1, b"x"), ("B", 2, None)])
    conn.executemany("INSERT INTO edge_custom (id, name) VALUES (?,?)", [(1, "Ärger"), (2, "zebra")])
    conn.commit()
    conn.close()


def planned_ddl(tmp_path: Path) -> dict[str, Any]:
    """What the tool would create in MariaDB for the test schemas: each table's DDL and
    the warnings of its plan (planning only, no server)."""
    portal = build_portal(tmp_path / "portal")
    build_edge(tmp_path / "edge.db")
    specs = MAP + ms.parse_map({"sources": [{"name": "edge", "file": str(tmp_path / "edge.db"),
                                             "database": "portal_edge"}]})
    m = ms.Migration(specs, portal, target=None, out=io.StringIO())
    try:
        m.prepare_sources()
    finally:
        for src in m.sources:
            src.close()
    assert not m.report.errors, m.report.errors
    return {p.label: {"ddl": p.create_sql(p.target).splitlines(), "warnings": p.warnings} for p in m.plans}


def test_target_ddl_matches_the_golden_file(tmp_path: Path) -> None:
    """The MariaDB DDL for every test schema, recorded once from the tool and committed:
    a change in how the source schema is read shows here as a diff. After an intended
    change of the translation, rewrite the file with MIGRATION_GOLDEN_UPDATE=1."""
    got = planned_ddl(tmp_path)
    if os.environ.get("MIGRATION_GOLDEN_UPDATE") == "1":
        GOLDEN_DDL.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN_DDL.write_text(ms.json.dumps(got, indent=2, ensure_ascii=False) + "\n")
    want = ms.json.loads(GOLDEN_DDL.read_text())
    assert sorted(got) == sorted(want)
    for label, plan in want.items():
        assert got[label] == plan, label


@pytest.mark.parametrize(("decl", "values", "sql"), [
    ("INTEGER", [1], "BIGINT"), ("int(11)", [1], "BIGINT"), ("TEXT", ["a"], "LONGTEXT"),
    ("VARCHAR(80)", ["a"], "LONGTEXT"), ("REAL", [1.5], "DOUBLE"), ("BLOB", [b"x"], "LONGBLOB"),
    ("BOOLEAN", [1], "TINYINT(1)"), ("DATETIME", ["2024-01-01 00:00:00"], "DATETIME(6)"),
    ("DATE", ["2024-01-01"], "DATE"), ("NUMERIC(10,2)", [1.5], "DECIMAL(10,2)"), ("JSON", ['{"a":1}'], "LONGTEXT"),
    ("NUMERIC", [1, 2], "BIGINT"), ("NUMERIC", [1, 2.5], "DOUBLE"), ("", ["a"], "LONGTEXT"), ("", [1], "BIGINT"),
    ("", [b"x"], "LONGBLOB"),
])
def test_declared_types_map_by_sqlite_affinity(decl: str, values: list[Any], sql: str) -> None:
    st = ms.ColStats(n_int=sum(isinstance(v, int) for v in values), n_real=sum(isinstance(v, float) for v in values),
                     n_text=sum(isinstance(v, str) for v in values), n_blob=sum(isinstance(v, bytes) for v in values))
    assert ms.base_type(ms.SrcColumn("c", decl, False, None, 0, 0), st).sql == sql


def test_mixed_values_without_a_telling_type_have_no_silent_translation() -> None:
    assert ms.base_type(ms.SrcColumn("c", "", False, None, 0, 0), ms.ColStats(n_int=1, n_text=1)) is None


@pytest.mark.parametrize(("expr", "decl", "sql"), [
    ("'info'", "VARCHAR(20)", "'info'"), ("0", "BOOLEAN", "0"), ("CURRENT_TIMESTAMP", "DATETIME", "current_timestamp()"),
    ("(datetime('now'))", "DATETIME", "current_timestamp()"), ("CURRENT_TIMESTAMP", "TEXT", "(current_timestamp())"),
    ("'C:\\tmp'", "TEXT", "'C:\\\\tmp'"), ("100.0", "REAL", "100.0e0"), ("NULL", "TEXT", "NULL"),
    ("TRUE", "BOOLEAN", "1"), ("X'00ff'", "BLOB", "_binary X'00ff'"),
])
def test_defaults_translate(expr: str, decl: str, sql: str) -> None:
    col = ms.SrcColumn("c", decl, False, expr, 0, 0)
    tt = ms.base_type(col, ms.ColStats())
    assert ms.translate_default(expr, col, tt, ms.make_converter(tt, False)) == sql


def test_a_default_without_translation_is_an_error() -> None:
    col = ms.SrcColumn("c", "TEXT", False, "(lower(hex(randomblob(16))))", 0, 0)
    tt = ms.base_type(col, ms.ColStats())
    with pytest.raises(ms.Bad, match="no MariaDB translation"):
        ms.translate_default(col.default, col, tt, ms.make_converter(tt, False))


def _read_schema(tmp_path: Path, script: str, source: type[Any] | None = None) -> Any:
    path = tmp_path / "schema.db"
    conn = sqlite3.connect(path)
    conn.executescript(script)
    conn.commit()
    conn.close()
    src = (source or ms.Source)(ms.SourceSpec("s", str(path), "d"), tmp_path, 1.0)
    src.open()
    return src


def test_create_table_parsing(tmp_path: Path) -> None:
    """What no PRAGMA states outright (column collations, AUTOINCREMENT, WITHOUT ROWID,
    CHECK) comes from SQLite: a comment and a string with commas and parentheses change
    nothing. SQLite refuses AUTOINCREMENT on a WITHOUT ROWID table, so two tables."""
    column = ' "na,me" TEXT COLLATE NOCASE DEFAULT \'a,b)\', CHECK (id > 0))'
    src = _read_schema(tmp_path, f'CREATE TABLE "t" (id INTEGER PRIMARY KEY AUTOINCREMENT, -- c, d\n{column};\n'
                                 f'CREATE TABLE "w" (id INTEGER PRIMARY KEY, -- c, d\n{column} WITHOUT ROWID;\n'
                                 'INSERT INTO t (id) VALUES (7);')
    try:
        t, w = src.read_table("t"), src.read_table("w")
    finally:
        src.close()
    p = {"collations": {c.name.lower(): c.collation for c in t.columns if c.collation},
         "autoincrement": t.autoincrement, "has_check": t.has_check, "without_rowid": w.without_rowid}
    assert p == {"collations": {"na,me": "NOCASE"}, "autoincrement": True, "has_check": True, "without_rowid": True}
    assert (t.without_rowid, t.sequence, w.autoincrement, w.has_check) == (False, 7, False, True)
    assert [c.collation for c in w.columns] == [None, "NOCASE"]


def test_without_rowid_on_sqlite_before_table_list(tmp_path: Path) -> None:
    """SQLite before 3.37 ignores PRAGMA table_list; PRAGMA index_info tells instead."""
    class OldSQLite(ms.Source):  # type: ignore[name-defined]
        def query(self, sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
            return [] if "table_list" in sql else super().query(sql, params)

    src = _read_schema(tmp_path, "CREATE TABLE r (k TEXT PRIMARY KEY, v);\n"
                                 "CREATE TABLE w (k TEXT PRIMARY KEY, v) WITHOUT ROWID;", OldSQLite)
    try:
        assert (src.without_rowid("r"), src.without_rowid("w")) == (False, True)
    finally:
        src.close()


def test_check_is_found_outside_strings_names_and_comments() -> None:
    assert ms.has_check("CREATE TABLE t (a INT CHECK(a > 0))")
    assert ms.has_check("CREATE TABLE t (a INT, CONSTRAINT c check (a > 0))")
    assert not ms.has_check("CREATE TABLE t (\"check\" TEXT, [check] INT, `check` INT, check_status INT, "
                            "n TEXT DEFAULT 'CHECK (x)' -- CHECK (a)\n /* CHECK (b) */)")


@pytest.mark.parametrize(("kind", "tp", "value", "match"), [
    ("BIGINT", b"text", b"abc", "not an integer"), ("TINYINT(1)", b"integer", 300, "TINYINT"),
    ("LONGTEXT", b"text", b"\xff", "invalid UTF-8"), ("LONGTEXT", b"blob", b"x", "BLOB value"),
    ("DATETIME", b"text", b"2024-01-01T00:00:00Z", "date-time"), ("DATETIME", b"integer", 1700000000, "text"),
    ("DECIMAL(5,2)", b"real", 1.005, "exactly"), ("DOUBLE", b"real", float("inf"), "not finite"),
])
def test_values_that_do_not_fit_are_named(kind: str, tp: bytes, value: Any, match: str) -> None:
    conv = ms.make_converter(ms.parse_type_override(kind), False)
    with pytest.raises(ms.Bad, match=match):
        conv(tp, value)


def test_checksum_is_order_independent_and_value_sensitive() -> None:
    rows = [[1, "a", None, b"x"], [2, "한", 1.5, b""], [3, "🚀", 0.1, None]]
    a, b, c = ms.Digest([0]), ms.Digest([0]), ms.Digest([0])
    for r in rows:
        a.add(r)
    for r in reversed(rows):
        b.add(r)
    for r in rows:
        c.add(r if r[0] != 2 else [2, "한", 1.5, None])  # b"" and NULL differ
    assert a.hexdigest() == b.hexdigest() != c.hexdigest()
    assert ms.canon("1") != ms.canon(1) != ms.canon(1.0)


def test_map_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ms.MigrationError, match="`database` is required"):
        ms.parse_map({"sources": [{"name": "a", "file": "a.db"}]})
    with pytest.raises(ms.MigrationError, match="same file"):
        ms.parse_map({"sources": [{"name": "a", "file": "x.db", "database": "d"},
                                  {"name": "b", "file": "x.db", "database": "e"}]})
    with pytest.raises(ms.MigrationError, match="column_types.*GEOMETRY.*use one of"):
        ms.parse_map({"sources": [{"name": "a", "file": "x.db", "database": "d", "column_types": {"t.c": "GEOMETRY"}}]})
    bad = tmp_path / "map.yaml"
    bad.write_text("sources: [{name: a, file: a.db, database: 'portal-api'}]\n")
    assert ms.main(["--source-root", str(tmp_path), "--map", str(bad), "--dry-run"]) == 2
    assert [s.database for s in MAP] == ["portal_api", "portal_api", "portal_cae", "portal_ws"]
    assert [s.file for s in MAP] == ["backend_5010/database/dashboard.db", "backend_5010/vnc_sessions.db",
                                     "kooCAEWebServer_5000/db/users.db", "websocket_5011/database/dashboard.db"]
