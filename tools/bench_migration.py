#!/usr/bin/env python3
"""Rows per second of tools/migrate_sqlite.py for a 100k-row table (a benchmark, not a test).

    .venv/bin/python tools/bench_migration.py                  # throwaway single-node Galera
    .venv/bin/python tools/bench_migration.py --rows 20000 --max-ws-size 2097152
    MARIADB_PASSWORD=... .venv/bin/python tools/bench_migration.py --port 3306 --user portal

Without --port it starts MariaDB with wsrep ON from offline/mariadb.py (as the
tests do, but with the data tier's wsrep_max_ws_size unless --max-ws-size says
otherwise) and stops it afterwards. The table looks like the portal's notifications:
an AUTOINCREMENT id, Korean text and emoji, NULLs, an index.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import random
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from offline.mariadb import MariaDB, missing_binaries  # noqa: E402


def load_tool():
    spec = importlib.util.spec_from_file_location("migrate_sqlite", REPO / "tools" / "migrate_sqlite.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["migrate_sqlite"] = mod
    spec.loader.exec_module(mod)
    return mod


def build(path: Path, rows: int) -> int:
    rng = random.Random(1)
    words = ["작업", "완료", "실패", "대기열", "노드", "🚀", "✅", "job", "queue", "mesh", "solver"]
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
    """)
    conn.executemany(
        "INSERT INTO notifications (user_id, title, message, level, is_read, created_at) VALUES (?,?,?,?,?,?)",
        ((rng.randint(1, 500), " ".join(rng.choices(words, k=5)),
          None if i % 7 == 0 else " ".join(rng.choices(words, k=rng.randint(5, 40))),
          rng.choice(["info", "warning", "error"]), i % 3 == 0,
          f"2024-{1 + i % 12:02d}-{1 + i % 28:02d} {i % 24:02d}:{i % 60:02d}:{i % 60:02d}.{i % 1000000:06d}")
         for i in range(rows)))
    conn.commit()
    conn.close()
    return path.stat().st_size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--max-ws-size", type=int, default=2147483647,
                    help="wsrep_max_ws_size of the throwaway server (default: the data tier's)")
    ap.add_argument("--batch-bytes", type=int, help="passed to the migration (default: derived from the server)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, help="use this server instead of starting one (needs database portal_api)")
    ap.add_argument("--user", default="portal")
    args = ap.parse_args()

    ms = load_tool()
    server = None
    if args.port:
        conn = {"host": args.host, "port": args.port, "user": args.user, "password": os.environ.get("MARIADB_PASSWORD")}
    else:
        reason = missing_binaries()
        if reason:
            print(f"cannot start MariaDB: {reason}", file=sys.stderr)
            return 2
        t0 = time.monotonic()
        server = MariaDB(max_ws_size=args.max_ws_size, max_allowed_packet=64 * 1024 * 1024).start()
        print(f"MariaDB with wsrep ON up in {time.monotonic() - t0:.1f} s (port {server.port}, "
              f"wsrep_max_ws_size={args.max_ws_size})")
        conn = server.app
    try:
        with tempfile.TemporaryDirectory(prefix="bench-migration-") as tmp:
            root = Path(tmp)
            (root / "db").mkdir()
            t0 = time.monotonic()
            size = build(root / "db" / "dashboard.db", args.rows)
            print(f"SQLite source: {args.rows} rows, {size / 1e6:.1f} MB, built in {time.monotonic() - t0:.1f} s")
            specs = ms.parse_map({"sources": [{"name": "bench", "file": "db/dashboard.db", "database": "portal_api"}]})
            target = ms.connect(**conn)
            try:
                target.x("DROP TABLE IF EXISTS `portal_api`.`notifications`")
                target.x("DROP TABLE IF EXISTS `portal_api`.`_stg_notifications`")
                target.x("DROP TABLE IF EXISTS `portal_api`.`_migration_state`")
                out = io.StringIO()
                t0 = time.monotonic()
                report = ms.migrate(specs, root, target=target, batch_bytes=args.batch_bytes, out=out)
                total = time.monotonic() - t0
                print(ms.summary(report))
                if not report.ok:
                    return 1
                r = report.results[0]
                scan = total - r.seconds
                print(f"\nread + convert + checksum the source: {scan:.2f} s")
                print(f"copy + verify + rename:               {r.seconds:.2f} s "
                      f"({r.batches} batches, budget {report.budget} bytes)")
                print(f"end to end:                           {total:.2f} s = {args.rows / total:,.0f} rows/s "
                      f"(copy phase alone {args.rows / r.seconds:,.0f} rows/s)")
                t0 = time.monotonic()
                again = ms.migrate(specs, root, target=target, out=io.StringIO())
                print(f"re-run (verify and skip):             {time.monotonic() - t0:.2f} s, "
                      f"status {again.results[0].status}")
            finally:
                target.conn.close()
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
