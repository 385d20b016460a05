#!/usr/bin/env python3
"""Move the portal's SQLite databases into MariaDB (Galera), phase 2 of the rollout.

    tools/migrate_sqlite.py --source-root /srv/portal --dry-run     # DDL, row counts, actions
    tools/migrate_sqlite.py --source-root /srv/portal                # migrate (resumes by itself)
    tools/migrate_sqlite.py --source-root /srv/portal --verify       # compare, write nothing

The mapping of files to databases is tools/migration_map.yaml. Every table is copied into a
staging table `_stg_<table>` in batches that stay under the server's wsrep_max_ws_size and
max_allowed_packet, with the last committed key in `_migration_state` (same transaction
as the batch), verified by row count and a SHA-256 checksum computed the same way from
both sides, and only then renamed to its real name. docs/migration.md is the runbook.

Exit status: 0 success, 1 a table failed or differs, 2 bad arguments or map.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import decimal
import hashlib
import json
import math
import os
import re
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import yaml

try:
    import pymysql
    import pymysql.cursors
    from pymysql.converters import escape_item
except ImportError:  # pragma: no cover - the venv has it; the message says how to get it
    pymysql = None  # type: ignore[assignment]

DEFAULT_MAP = Path(__file__).resolve().parent / "migration_map.yaml"
STATE_TABLE = "_migration_state"
STAGING_PREFIX = "_stg_"
OLD_PREFIX = "_old_"
SURROGATE_PK = "_rowid"
KEY_LIMIT = 3072          # InnoDB index key limit (DYNAMIC row format), bytes
MAX_INDEXED_VARCHAR = 768  # 768 utf8mb4 characters = 3072 bytes
DEFAULT_BATCH_CAP = 4 * 1024 * 1024  # keep transactions short even when the limits are huge
LARGE_VALUE = 4096        # bytes; larger values are sent through a user variable
ROW_OVERHEAD = 64          # write-set bytes per row beyond its values (header, key set)
MAX_EXAMPLES = 5
SQL_MODE = "STRICT_ALL_TABLES,NO_AUTO_VALUE_ON_ZERO,NO_ENGINE_SUBSTITUTION,ERROR_FOR_DIVISION_BY_ZERO"
TABLE_OPTIONS = "ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_nopad_bin ROW_FORMAT=DYNAMIC"
COLLATIONS = {"BINARY": None, "NOCASE": "utf8mb4_general_nopad_ci", "RTRIM": "utf8mb4_bin"}


class MigrationError(Exception):
    """An error the operator can act on. `code` is one of: map, missing, locked, corrupt,
    schema, data, conflict, server, limit, verify, copy."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


# ------------------------------------------------------------------------------------
# The map
# ------------------------------------------------------------------------------------

IDENT = re.compile(r"^[A-Za-z0-9_$]{1,64}$")


@dataclasses.dataclass
class SourceSpec:
    name: str
    file: str
    database: str
    rename: dict[str, str] = dataclasses.field(default_factory=dict)
    skip: list[str] = dataclasses.field(default_factory=list)
    column_types: dict[str, str] = dataclasses.field(default_factory=dict)
    column_defaults: dict[str, str] = dataclasses.field(default_factory=dict)


def load_map(path: str | Path) -> list[SourceSpec]:
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise MigrationError("map", f"{path}: map file not found") from None
    except yaml.YAMLError as exc:
        raise MigrationError("map", f"{path}: not valid YAML: {exc}") from None
    return parse_map(doc, str(path))


def parse_map(doc: Any, where: str = "map") -> list[SourceSpec]:
    def bad(msg: str) -> MigrationError:
        return MigrationError("map", f"{where}: {msg}")

    if not isinstance(doc, dict) or not isinstance(doc.get("sources"), list) or not doc["sources"]:
        raise bad("expected a mapping with a non-empty list `sources`")
    if doc.get("version", 1) != 1:
        raise bad(f"version {doc.get('version')!r} is not supported (1 is)")
    allowed = {"name", "file", "database", "rename", "skip", "column_types", "column_defaults"}
    specs: list[SourceSpec] = []
    for i, entry in enumerate(doc["sources"]):
        if not isinstance(entry, dict):
            raise bad(f"sources[{i}] must be a mapping")
        unknown = set(entry) - allowed
        if unknown:
            raise bad(f"sources[{i}]: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
        for key in ("name", "file", "database"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise bad(f"sources[{i}]: `{key}` is required (a string)")
        if not IDENT.match(entry["database"]):
            raise bad(f"sources[{i}] ({entry['name']}): database {entry['database']!r} is not a plain MariaDB name")
        spec = SourceSpec(entry["name"], entry["file"], entry["database"],
                          dict(entry.get("rename") or {}), list(entry.get("skip") or []),
                          dict(entry.get("column_types") or {}), dict(entry.get("column_defaults") or {}))
        for old, new in spec.rename.items():
            if not isinstance(new, str) or not IDENT.match(new):
                raise bad(f"source {spec.name}: rename {old!r} -> {new!r}: not a plain MariaDB table name")
        for key in (*spec.column_types, *spec.column_defaults):
            if not isinstance(key, str) or key.count(".") != 1:
                raise bad(f"source {spec.name}: {key!r}: column overrides are keyed \"table.column\"")
        for key, typ in spec.column_types.items():
            try:
                parse_type_override(typ)
            except ValueError as exc:
                raise bad(f"source {spec.name}: column_types[{key!r}]: {exc}") from None
        specs.append(spec)
    for attr in ("name", "file"):
        seen: dict[str, int] = {}
        for s in specs:
            if getattr(s, attr) in seen:
                raise bad(f"two sources have the same {attr} {getattr(s, attr)!r}")
            seen[getattr(s, attr)] = 1
    return specs


# ------------------------------------------------------------------------------------
# Reading SQLite
# ------------------------------------------------------------------------------------

def qi(name: str) -> str:
    """SQLite identifier."""
    return '"' + name.replace('"', '""') + '"'


def mi(name: str) -> str:
    """MariaDB identifier."""
    return "`" + name.replace("`", "``") + "`"


@dataclasses.dataclass
class SrcColumn:
    name: str
    decl: str
    notnull: bool
    default: str | None
    pk: int
    hidden: int
    collation: str | None = None


@dataclasses.dataclass
class SrcIndex:
    name: str
    unique: bool
    origin: str
    partial: bool
    columns: list[tuple[str | None, bool]]  # (column or None for an expression, descending)


@dataclasses.dataclass
class ColStats:
    n_int: int = 0
    n_real: int = 0
    n_text: int = 0
    n_blob: int = 0
    max_chars: int = 0
    max_bytes: int = 0


@dataclasses.dataclass
class SrcTable:
    name: str
    columns: list[SrcColumn]
    indexes: list[SrcIndex]
    without_rowid: bool
    rowid_expr: str | None
    autoincrement: bool
    sequence: int | None
    has_check: bool
    foreign_keys: list[str]
    rows: int
    stats: dict[str, ColStats]


class Source:
    """One SQLite file, opened read-only inside a read transaction so that every table is
    read from the same snapshot (and, in rollback-journal mode, no writer commits meanwhile)."""

    def __init__(self, spec: SourceSpec, root: Path, busy_timeout: float) -> None:
        self.spec = spec
        self.path = (root / spec.file).resolve() if not Path(spec.file).is_absolute() else Path(spec.file)
        self.busy_timeout = busy_timeout
        self.conn: sqlite3.Connection | None = None

    def _err(self, code: str, what: str) -> MigrationError:
        return MigrationError(code, f"{self.path} (source {self.spec.name}): {what}")

    def open(self) -> None:
        if not self.path.exists():
            raise self._err("missing", "file not found; check --source-root and `file` in the map "
                                       "(copy the file from the old server, or leave the source out with --only)")
        if not self.path.is_file():
            raise self._err("missing", "not a regular file")
        try:
            conn = sqlite3.connect(self.path.as_uri() + "?mode=ro", uri=True, timeout=self.busy_timeout,
                                   isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise self._err("missing", f"cannot open: {exc}") from None
        self.conn = conn
        try:
            conn.execute("BEGIN")
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            problems = [r[0] for r in conn.execute("PRAGMA integrity_check(10)")]
        except sqlite3.OperationalError as exc:
            self.close()
            if "locked" in str(exc) or "busy" in str(exc):
                raise self._err("locked", f"locked by another process (waited {self.busy_timeout:g} s): stop the "
                                          "portal service that writes this file, or copy it after stopping the "
                                          "service, then re-run") from None
            raise self._err("corrupt", f"cannot be read: {exc}") from None
        except sqlite3.DatabaseError as exc:
            self.close()
            raise self._err("corrupt", f"not a usable SQLite database ({exc}); restore it from a backup "
                                       "or `sqlite3 FILE .recover`") from None
        if problems != ["ok"]:
            self.close()
            lines = [ln.strip() for p in problems for ln in str(p).splitlines() if ln.strip() and "***" not in ln]
            raise self._err("corrupt", "PRAGMA integrity_check failed: " + "; ".join(lines[:3])
                            + ("; ..." if len(lines) > 3 else "")
                            + ". Restore the file from a backup, or `sqlite3 FILE .recover` into a new file")

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            finally:
                self.conn = None

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Schema queries: text as str."""
        assert self.conn is not None
        self.conn.text_factory = str
        try:
            return self.conn.execute(sql, params).fetchall()
        finally:
            self.conn.text_factory = bytes

    def data(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        """Data queries: text as bytes, decoded by the column converters (invalid UTF-8 is found there)."""
        assert self.conn is not None
        self.conn.text_factory = bytes
        return self.conn.execute(sql, params)

    def table_names(self) -> tuple[list[str], list[str]]:
        """(tables to migrate, warnings about what is not migrated)."""
        warnings = []
        objs = self.query("SELECT type, name, sql FROM sqlite_master ORDER BY rowid")
        special: set[str] = set()
        try:
            for _schema, name, typ, *_ in self.query("PRAGMA main.table_list"):
                if typ in ("virtual", "shadow"):
                    special.add(name)
        except sqlite3.OperationalError:  # SQLite < 3.37: virtual tables by their SQL
            special = {n for t, n, s in objs if t == "table" and (s or "").upper().startswith("CREATE VIRTUAL")}
        tables = []
        for typ, name, _sql in objs:
            if typ == "table" and not name.startswith("sqlite_"):
                if name in special:
                    warnings.append(f"{self.spec.name}: virtual/shadow table {name} is not migrated")
                else:
                    tables.append(name)
            elif typ in ("view", "trigger"):
                warnings.append(f"{self.spec.name}: {typ} {name} is not migrated (recreate it in MariaDB if the app needs it)")
        return tables, warnings

    def without_rowid(self, name: str) -> bool:
        """PRAGMA table_list's `wr` (SQLite 3.37 and later). Older SQLite ignores that
        PRAGMA (no rows); there PRAGMA index_info given a table's name lists the primary key
        of a WITHOUT ROWID table and nothing for any other table (index and table names
        share one namespace)."""
        rows = self.query(f"PRAGMA main.table_list({qi(name)})")
        if rows:
            return bool(rows[0][4])
        return bool(self.query(f"PRAGMA main.index_info({qi(name)})"))

    def column_collations(self, name: str, cols: list[SrcColumn]) -> None:
        """Each column's collation, from SQLite itself (no PRAGMA reports it): a compound
        SELECT whose first arm reads the column and returns no row gives its result column
        the column's collation, and the second arm supplies the value 'a'. Under NOCASE
        'a' = 'A', under RTRIM 'a' = 'a ', under BINARY neither. The outer max() keeps SQLite
        from flattening the compound subquery into the outer query. A collation that only the
        application registers is not available here: SQLite refuses the query and names it."""
        for c in cols:
            probe = (f"SELECT max(v = 'A'), max(v = 'a ') FROM (SELECT {qi(c.name)} AS v FROM {qi(name)} WHERE 0 "
                     "UNION ALL SELECT 'a')")
            try:
                nocase, rtrim = self.query(probe)[0]
            except sqlite3.OperationalError as exc:
                unknown = re.fullmatch(r"no such collation sequence: (.+)", str(exc))
                if unknown is None:
                    raise
                c.collation = unknown.group(1).upper()
                continue
            c.collation = "NOCASE" if nocase else "RTRIM" if rtrim else None

    def read_table(self, name: str) -> SrcTable:
        cols = [SrcColumn(r[1], r[2] or "", bool(r[3]), r[4], r[5], r[6])
                for r in self.query(f"PRAGMA table_xinfo({qi(name)})") if r[6] != 1]
        (sql,) = self.query("SELECT sql FROM sqlite_master WHERE type='table' AND name=?", (name,))[0]
        self.column_collations(name, cols)
        without_rowid = self.without_rowid(name)
        rowid_expr = None
        if not without_rowid:
            names = {c.name.lower() for c in cols}
            rowid_expr = next((e for e in ("rowid", "_rowid_", "oid") if e not in names), None)
            if rowid_expr is None:
                raise MigrationError("schema", f"{self.path}: table {name} has columns named rowid, _rowid_ "
                                               "and oid, so its rowid cannot be read")
        indexes = []
        for _seq, iname, unique, origin, partial in self.query(f"PRAGMA index_list({qi(name)})"):
            icols = [(r[2] if r[1] >= 0 else None, bool(r[3]))
                     for r in self.query(f"PRAGMA index_xinfo({qi(iname)})") if r[5]]
            indexes.append(SrcIndex(iname, bool(unique), origin, bool(partial), icols))
        indexes.reverse()  # index_list is newest first
        # AUTOINCREMENT matters only through its counter: SQLite keeps one in sqlite_sequence
        # for an AUTOINCREMENT table (and only for one) from its first insert on. A table that
        # never had a row has no counter and nothing to carry over.
        seq = None
        if self.query("SELECT 1 FROM sqlite_master WHERE type='table' AND name='sqlite_sequence'"):
            row = self.query("SELECT seq FROM sqlite_sequence WHERE name=?", (name,))
            seq = int(row[0][0]) if row else None
        fks = [f"{name}({r[3]}) -> {r[2]}({r[4]})" for r in self.query(f"PRAGMA foreign_key_list({qi(name)})")]
        stats_sql = ["count(*)"]
        for c in cols:
            q = qi(c.name)
            stats_sql += [f"total(typeof({q})='integer')", f"total(typeof({q})='real')",
                          f"total(typeof({q})='text')", f"total(typeof({q})='blob')",
                          f"max(CASE WHEN typeof({q})='text' THEN length({q}) END)",
                          f"max(CASE WHEN typeof({q}) IN ('text','blob') THEN length(CAST({q} AS BLOB)) END)"]
        srow = self.query(f"SELECT {', '.join(stats_sql)} FROM {qi(name)}")[0]
        stats = {}
        for i, c in enumerate(cols):
            v = srow[1 + 6 * i: 7 + 6 * i]
            stats[c.name] = ColStats(int(v[0]), int(v[1]), int(v[2]), int(v[3]), int(v[4] or 0), int(v[5] or 0))
        return SrcTable(name, cols, indexes, without_rowid, rowid_expr, seq is not None, seq,
                        has_check(sql or ""), fks, int(srow[0]), stats)


# Text of a CREATE statement that cannot hold a keyword: strings, quoted names, comments.
_NOT_KEYWORDS = re.compile(r"""'(?:[^']|'')*'|"(?:[^"]|"")*"|`(?:[^`]|``)*`|\[[^\]]*\]|--[^\n]*|/\*.*?(?:\*/|\Z)""",
                           re.S)


def has_check(sql: str) -> bool:
    """Whether a CREATE TABLE statement has a CHECK constraint. No PRAGMA reports CHECK
    constraints, so this is the one thing read from the statement's text: the keyword
    outside strings, quoted names and comments."""
    return re.search(r"\bCHECK\b", _NOT_KEYWORDS.sub(" ", sql), re.I) is not None


# ------------------------------------------------------------------------------------
# Translation: SQLite declared types -> MariaDB types, and value converters
# ------------------------------------------------------------------------------------

def affinity(decl: str) -> str:
    """SQLite's rules (datatype3.html §3.1), in order."""
    t = decl.upper()
    if "INT" in t:
        return "INTEGER"
    if "CHAR" in t or "CLOB" in t or "TEXT" in t:
        return "TEXT"
    if "BLOB" in t or not t.strip():
        return "BLOB"
    if "REAL" in t or "FLOA" in t or "DOUB" in t:
        return "REAL"
    return "NUMERIC"


@dataclasses.dataclass
class TType:
    kind: str   # int, smallint, float, decimal, text, blob, datetime, date, time
    sql: str
    length: int | None = None   # VARCHAR / VARBINARY length, None for LONGTEXT / LONGBLOB
    precision: int | None = None
    scale: int | None = None


_OVERRIDE = re.compile(r"^\s*([A-Za-z]+)\s*(?:\(\s*(\d+)\s*(?:,\s*(\d+)\s*)?\))?\s*$")


def parse_type_override(text: str) -> TType:
    m = _OVERRIDE.match(str(text))
    if not m:
        raise ValueError(f"{text!r} is not a type this tool writes")
    name, a, b = m.group(1).upper(), m.group(2), m.group(3)
    n = int(a) if a else None
    if name in ("BIGINT", "INT", "INTEGER"):
        return TType("int", "BIGINT")
    if name in ("BOOL", "BOOLEAN") or (name == "TINYINT" and n == 1):
        return TType("smallint", "TINYINT(1)")
    if name in ("DOUBLE", "FLOAT", "REAL"):
        return TType("float", "DOUBLE")
    if name in ("DECIMAL", "NUMERIC") and n:
        s = int(b) if b else 0
        if not (1 <= n <= 65 and 0 <= s <= min(n, 38)):
            raise ValueError(f"{text!r}: DECIMAL(p,s) needs 1<=p<=65, 0<=s<=min(p,38)")
        return TType("decimal", f"DECIMAL({n},{s})", precision=n, scale=s)
    if name == "VARCHAR" and n:
        return TType("text", f"VARCHAR({n})", length=n)
    if name in ("TEXT", "LONGTEXT", "MEDIUMTEXT"):
        return TType("text", "LONGTEXT")
    if name == "VARBINARY" and n:
        return TType("blob", f"VARBINARY({n})", length=n)
    if name in ("BLOB", "LONGBLOB", "MEDIUMBLOB"):
        return TType("blob", "LONGBLOB")
    if name in ("DATETIME", "TIMESTAMP"):
        return TType("datetime", "DATETIME(6)")
    if name == "DATE":
        return TType("date", "DATE")
    if name == "TIME":
        return TType("time", "TIME(6)")
    raise ValueError(f"{text!r}: use one of BIGINT, TINYINT(1), DOUBLE, DECIMAL(p,s), VARCHAR(n), LONGTEXT, "
                     "VARBINARY(n), LONGBLOB, DATETIME, DATE, TIME")


def by_data(st: ColStats) -> TType | None:
    """For columns whose declared type says little: choose from the values stored."""
    numbers, text, blob = st.n_int + st.n_real, st.n_text, st.n_blob
    if numbers and (text or blob):
        return None
    if st.n_real:
        return TType("float", "DOUBLE")
    if st.n_int:
        return TType("int", "BIGINT")
    if blob:
        return TType("blob", "LONGBLOB")
    return TType("text", "LONGTEXT")


_DECIMAL = re.compile(r"^\s*(?:DECIMAL|NUMERIC|DEC)\s*\(\s*(\d+)\s*(?:,\s*(\d+)\s*)?\)", re.I)
_LENGTH = re.compile(r"\(\s*(\d+)\s*\)")


def base_type(col: SrcColumn, st: ColStats) -> TType | None:
    t = col.decl.upper()
    aff = affinity(t)
    if aff == "INTEGER":
        return TType("int", "BIGINT")
    if aff == "TEXT":
        return TType("text", "LONGTEXT")
    if aff == "REAL":
        return TType("float", "DOUBLE")
    if aff == "BLOB":
        return TType("blob", "LONGBLOB") if t.strip() else by_data(st)
    if "BOOL" in t:
        return TType("smallint", "TINYINT(1)")
    if "DATETIME" in t or "TIMESTAMP" in t:
        return TType("datetime", "DATETIME(6)")
    if "DATE" in t:
        return TType("date", "DATE")
    if "TIME" in t:
        return TType("time", "TIME(6)")
    if "JSON" in t:
        return TType("text", "LONGTEXT")
    m = _DECIMAL.match(t)
    if m:
        p, s = int(m.group(1)), int(m.group(2) or 0)
        if 1 <= p <= 65 and 0 <= s <= min(p, 38):
            return TType("decimal", f"DECIMAL({p},{s})", precision=p, scale=s)
    return by_data(st)


_DT = re.compile(r"^(\d{4})-(\d{2})-(\d{2})(?:[ T](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,6}))?)?)?$")
_TM = re.compile(r"^(-)?(\d{1,3}):(\d{2})(?::(\d{2})(?:\.(\d{1,6}))?)?$")


class Bad(ValueError):
    pass


def make_converter(tt: TType, notnull_key: bool) -> Callable[[bytes, Any], Any]:
    """Converter of one stored SQLite value (typeof, value) to the Python value written to
    MariaDB. The same value canonicalised is what the checksum hashes, so a converter that
    loses information shows up as a verification failure, never silently."""
    kind = tt.kind

    def conv(tp: bytes, v: Any) -> Any:
        if v is None:
            if notnull_key:
                raise Bad("NULL in a primary-key column (MariaDB keys are NOT NULL)")
            return None
        if kind in ("int", "smallint"):
            if tp == b"real" and v.is_integer() and abs(v) < 2 ** 63:
                v, tp = int(v), b"integer"
            if tp != b"integer":
                raise Bad(f"{describe(tp, v)} is not an integer")
            if kind == "smallint" and not -128 <= v <= 127:
                raise Bad(f"{v} does not fit TINYINT(1)")
            return v
        if kind == "float":
            if tp == b"integer":
                if abs(v) > 2 ** 53:
                    raise Bad(f"{v} cannot be represented exactly as DOUBLE")
                return float(v)
            if tp != b"real":
                raise Bad(f"{describe(tp, v)} is not a number")
            if not math.isfinite(v):
                raise Bad(f"{v} is not finite (MariaDB DOUBLE has no infinity)")
            return v
        if kind == "decimal":
            if tp not in (b"integer", b"real"):
                raise Bad(f"{describe(tp, v)} is not a number")
            d = decimal.Decimal(repr(v)) if tp == b"real" else decimal.Decimal(v)
            assert tt.scale is not None and tt.precision is not None
            try:
                q = d.quantize(decimal.Decimal(1).scaleb(-tt.scale))
            except decimal.InvalidOperation:
                raise Bad(f"{v} does not fit {tt.sql}") from None
            if q != d or len(q.as_tuple().digits) > tt.precision:
                raise Bad(f"{v} does not fit {tt.sql} exactly")
            return q
        if kind == "blob":
            if tp not in (b"blob", b"text"):
                raise Bad(f"{describe(tp, v)} is not text or a blob")
            v = bytes(v)
            if tt.length is not None and len(v) > tt.length:
                raise Bad(f"{len(v)} bytes do not fit {tt.sql}")
            return v
        # text-like kinds read the UTF-8 text
        if tp == b"blob":
            raise Bad("a BLOB value in a text column")
        if tp != b"text":
            raise Bad(f"{describe(tp, v)} in a text column")
        try:
            s = bytes(v).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise Bad(f"invalid UTF-8 at byte {exc.start}: {bytes(v)[max(0, exc.start - 8):exc.start + 8]!r}") from None
        if kind == "text":
            if tt.length is not None and len(s) > tt.length:
                raise Bad(f"{len(s)} characters do not fit {tt.sql}")
            return s
        if kind in ("datetime", "date"):
            m = _DT.match(s)
            if not m or (kind == "date" and m.group(4)):
                raise Bad(f"{s!r} is not a {'date' if kind == 'date' else 'date-time'} of the form "
                          f"YYYY-MM-DD{'' if kind == 'date' else '[ HH:MM[:SS[.ffffff]]]'}")
            year, month, day = int(m.group(1)), int(m.group(2)), int(m.group(3))
            if year < 1000:
                raise Bad(f"{s!r}: year before 1000 (outside MariaDB's range)")
            try:
                if kind == "date":
                    return dt.date(year, month, day)
                frac = (m.group(7) or "").ljust(6, "0")
                return dt.datetime(year, month, day, int(m.group(4) or 0), int(m.group(5) or 0),
                                   int(m.group(6) or 0), int(frac or 0))
            except ValueError as exc:
                raise Bad(f"{s!r}: {exc}") from None
        if kind == "time":
            m = _TM.match(s)
            if not m:
                raise Bad(f"{s!r} is not a time of the form HH:MM[:SS[.ffffff]]")
            td = dt.timedelta(hours=int(m.group(2)), minutes=int(m.group(3)), seconds=int(m.group(4) or 0),
                              microseconds=int((m.group(5) or "").ljust(6, "0") or 0))
            return -td if m.group(1) else td
        raise AssertionError(kind)

    return conv


def describe(tp: bytes, v: Any) -> str:
    if tp in (b"text", b"blob"):
        b = bytes(v)
        return f"{tp.decode()} {b[:24]!r}{'...' if len(b) > 24 else ''}"
    return f"{tp.decode()} {v!r}"


# ------------------------------------------------------------------------------------
# Canonical rows and checksums (identical for both sides)
# ------------------------------------------------------------------------------------

def _canon_other(v: Any) -> bytes:
    if isinstance(v, dt.datetime):
        return b"T" + v.isoformat(sep=" ", timespec="microseconds").encode()
    if isinstance(v, dt.date):
        return b"D" + v.isoformat().encode()
    if isinstance(v, dt.timedelta):
        return b"t" + str(v // dt.timedelta(microseconds=1)).encode()
    if isinstance(v, decimal.Decimal):
        return b"M" + str(v).encode()
    if isinstance(v, (bytearray, memoryview)):
        return b"B" + bytes(v)
    raise TypeError(f"no canonical form for {type(v).__name__}")


_CANON: dict[type, Callable[[Any], bytes]] = {
    type(None): lambda v: b"N",
    bool: lambda v: b"I" + str(int(v)).encode(),
    int: lambda v: b"I" + str(v).encode(),
    float: lambda v: b"F" + repr(v).encode(),
    str: lambda v: b"S" + v.encode("utf-8"),
    bytes: lambda v: b"B" + v,
}


def canon(v: Any) -> bytes:
    """A value's canonical bytes: type tag + text form, length-prefixed. Both sides produce
    the same Python types for the same stored value (int, float, str, bytes, datetime,
    date, timedelta, Decimal), so equal rows give equal bytes."""
    b = _CANON.get(type(v), _canon_other)(v)
    return len(b).to_bytes(4, "big") + b


class Digest:
    """SHA-256 over rows in primary-key order: each row is canonicalised, hashed, and the
    row hashes are sorted by the canonical primary key, so the two sides agree whatever
    order (or collation) they return rows in."""

    def __init__(self, pk_idx: Sequence[int]) -> None:
        self.pk_idx = list(pk_idx)
        self.pairs: list[tuple[bytes, bytes]] = []

    def add(self, values: Sequence[Any]) -> None:
        fields = [canon(v) for v in values]
        pk = b"".join(fields[i] for i in self.pk_idx)
        self.pairs.append((pk, hashlib.sha256(b"".join(fields)).digest()))

    @property
    def count(self) -> int:
        return len(self.pairs)

    def hexdigest(self) -> str:
        h = hashlib.sha256()
        for pk, row in sorted(self.pairs):
            h.update(len(pk).to_bytes(4, "big"))
            h.update(pk)
            h.update(row)
        return h.hexdigest()


# ------------------------------------------------------------------------------------
# The plan of one table
# ------------------------------------------------------------------------------------

@dataclasses.dataclass
class TCol:
    name: str
    tt: TType
    src: int | None          # index into the source columns; None = the surrogate key (rowid)
    nullable: bool
    default_sql: str | None
    auto_increment: bool
    collation: str | None
    conv: Callable[[bytes, Any], Any]

    def ddl(self) -> str:
        parts = [mi(self.name), self.tt.sql]
        if self.collation and self.tt.kind == "text":
            parts.append(f"COLLATE {self.collation}")
        parts.append("NULL" if self.nullable else "NOT NULL")
        if self.auto_increment:
            parts.append("AUTO_INCREMENT")
        if self.default_sql is not None:
            parts.append(f"DEFAULT {self.default_sql}")
        return " ".join(parts)


@dataclasses.dataclass
class TIndex:
    name: str
    unique: bool
    columns: list[tuple[str, int | None, bool]]  # (column, prefix length, descending)

    def ddl(self) -> str:
        cols = ", ".join(mi(c) + (f"({p})" if p else "") + (" DESC" if d else "") for c, p, d in self.columns)
        return f"{'UNIQUE KEY' if self.unique else 'KEY'} {mi(self.name)} ({cols})"


@dataclasses.dataclass
class TablePlan:
    source: Source
    src: SrcTable
    database: str
    target: str
    columns: list[TCol]
    pk: list[str]
    indexes: list[TIndex]
    auto_increment: int | None
    warnings: list[str]
    # filled by the source scan
    rows: int = 0
    checksum: str = ""
    # filled by the target check
    action: str = ""          # copy, resume, verify-existing, replace-empty
    state_status: str | None = None
    resume_key: list[Any] | None = None
    rows_done: int = 0
    batches_done: int = 0

    @property
    def label(self) -> str:
        return f"{self.database}.{self.target}"

    @property
    def staging(self) -> str:
        return aux_name(STAGING_PREFIX, self.target)

    @property
    def old(self) -> str:
        return aux_name(OLD_PREFIX, self.target)

    @property
    def pk_idx(self) -> list[int]:
        names = [c.name for c in self.columns]
        return [names.index(p) for p in self.pk]

    def create_sql(self, name: str) -> str:
        lines = [c.ddl() for c in self.columns]
        lines.append("PRIMARY KEY (" + ", ".join(mi(p) for p in self.pk) + ")")
        lines += [ix.ddl() for ix in self.indexes]
        opts = TABLE_OPTIONS + (f" AUTO_INCREMENT={self.auto_increment}" if self.auto_increment else "")
        return f"CREATE TABLE {mi(self.database)}.{mi(name)} (\n  " + ",\n  ".join(lines) + f"\n) {opts}"

    @property
    def plan_hash(self) -> str:
        ident = json.dumps([self.source.spec.name, self.source.spec.file, self.src.name,
                            [(c.name, c.tt.kind, c.tt.sql, c.src) for c in self.columns]])
        return hashlib.sha256((ident + self.create_sql(self.target)).encode()).hexdigest()


def aux_name(prefix: str, table: str) -> str:
    name = prefix + table
    if len(name) <= 64:
        return name
    return prefix + table[:50] + hashlib.sha1(table.encode()).hexdigest()[:8]


def sql_literal(v: Any) -> str:
    return str(escape_item(v, "utf8mb4"))


def translate_default(expr: str, col: SrcColumn, tt: TType, conv: Callable[[bytes, Any], Any]) -> str:
    """A SQLite default expression as MariaDB SQL; raises Bad when there is no faithful one."""
    e = expr.strip()
    while e.startswith("(") and e.endswith(")") and balanced(e[1:-1]):
        e = e[1:-1].strip()
    up = re.sub(r"\s+", "", e.upper())
    tp: bytes
    v: Any
    now = {"CURRENT_TIMESTAMP", "DATETIME('NOW')", "DATETIME('NOW','LOCALTIME')",
           "STRFTIME('%Y-%M-%D%H:%M:%S','NOW')"}
    if up == "NULL":
        return "NULL"
    if up in now or up in ("CURRENT_DATE", "DATE('NOW')", "CURRENT_TIME", "TIME('NOW')"):
        fn = {"DATE": "curdate()", "TIME": "curtime()"}.get(up.split("_")[-1].split("(")[0], "current_timestamp()")
        if tt.kind == "datetime" and fn == "current_timestamp()":
            return "current_timestamp()"
        if tt.kind == "date" and fn == "curdate()":
            return "(curdate())"
        if tt.kind == "time" and fn == "curtime()":
            return "(curtime())"
        if tt.kind == "text":  # SQLite writes 'YYYY-MM-DD HH:MM:SS' text; so does MariaDB's function as text
            return f"({fn})"
        raise Bad(f"default {expr} on a {tt.sql} column")
    if up == "STRFTIME('%S','NOW')" and tt.kind in ("int", "text"):
        return "(unix_timestamp())"
    if up in ("TRUE", "FALSE"):
        tp, v = b"integer", int(up == "TRUE")
    elif re.fullmatch(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?", e):
        num = float(e) if re.search(r"[.eE]", e) else int(e)
        tp, v = (b"integer", num) if isinstance(num, int) else (b"real", num)
        if tt.kind in ("text", "blob"):
            tp, v = b"text", e.lstrip("+").encode()
    elif re.fullmatch(r"'(?:[^']|'')*'", e, re.S):
        s = e[1:-1].replace("''", "'")
        tp, v = b"text", s.encode("utf-8")
        if affinity(col.decl) in ("INTEGER", "REAL", "NUMERIC") and re.fullmatch(r"\s*[+-]?\d+\s*", s):
            tp, v = b"integer", int(s)
        elif affinity(col.decl) in ("REAL", "NUMERIC") and re.fullmatch(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*", s):
            tp, v = b"real", float(s)
    elif re.fullmatch(r"[xX]'([0-9A-Fa-f]{2})*'", e):
        tp, v = b"blob", bytes.fromhex(e[2:-1])
    else:
        raise Bad(f"default expression {expr} has no MariaDB translation")
    value = conv(tp, v)
    return sql_literal(value)


def balanced(s: str) -> bool:
    depth = 0
    for ch in s:
        depth += ch == "("
        depth -= ch == ")"
        if depth < 0:
            return False
    return depth == 0


def index_name(table: str, cols: Sequence[str], unique: bool, used: set[str]) -> str:
    base = ("uq_" if unique else "ix_") + table + "_" + "_".join(cols)
    name = base[:64]
    n = 2
    while name.lower() in used:
        name = f"{base[:60]}_{n}"
        n += 1
    return name


def key_bytes(tt: TType, prefix: int | None) -> int | None:
    """Index key bytes of one column; None when the column needs a prefix."""
    if tt.kind in ("text", "blob"):
        per = 4 if tt.kind == "text" else 1
        if prefix:
            return prefix * per
        return tt.length * per if tt.length is not None else None
    return {"int": 8, "smallint": 1, "float": 8, "datetime": 8, "date": 3, "time": 6}.get(
        tt.kind, (tt.precision or 10) // 2 + 2)


def plan_table(source: Source, st: SrcTable, target: str) -> TablePlan:
    spec = source.spec
    where = f"{source.path} table {st.name}"
    warnings: list[str] = []
    if not IDENT.match(target) or target.startswith((STAGING_PREFIX, OLD_PREFIX)) or target == STATE_TABLE:
        raise MigrationError("schema", f"{where}: target name {target!r} is not usable in MariaDB (reserved or not "
                                       f"a plain name); add `rename: {{{st.name}: new_name}}` to source {spec.name} in the map")
    names_lower = [c.name.lower() for c in st.columns]
    if len(set(names_lower)) != len(names_lower):
        raise MigrationError("schema", f"{where}: column names differ only in case (MariaDB column names do not)")
    for c in st.columns:
        if len(c.name) > 64:
            raise MigrationError("schema", f"{where}: column name {c.name!r} is longer than 64 characters")
        if c.hidden in (2, 3):
            warnings.append(f"{st.name}.{c.name}: generated column copied as a plain column")

    pk_cols = [c.name for c in sorted((c for c in st.columns if c.pk), key=lambda c: c.pk)]
    alias = (not st.without_rowid and len(pk_cols) == 1
             and next(c for c in st.columns if c.name == pk_cols[0]).decl.strip().upper() == "INTEGER")
    surrogate = not pk_cols
    if surrogate and SURROGATE_PK in names_lower:
        raise MigrationError("schema", f"{where}: has no primary key and already a column {SURROGATE_PK}; "
                                       "give the table a primary key in SQLite first")

    # types: override > declared type > data; indexed text/blob columns become VARCHAR/VARBINARY
    indexed = {c for ix in st.indexes for c, _d in ix.columns if c} | set(pk_cols)
    types: dict[str, TType] = {}
    for c in st.columns:
        key = f"{st.name}.{c.name}"
        if key in spec.column_types:
            types[c.name] = parse_type_override(spec.column_types[key])
            continue
        tt = base_type(c, st.stats[c.name])
        if tt is None:
            s = st.stats[c.name]
            raise MigrationError("data", f"{where}: column {c.name} (declared {c.decl or 'without a type'!s}) holds "
                                         f"numbers ({s.n_int + s.n_real}) and text/blobs ({s.n_text + s.n_blob}); set "
                                         f"column_types: {{\"{key}\": LONGTEXT}} (or another type) for source "
                                         f"{spec.name} in the map")
        if c.name in indexed and tt.kind == "text":
            declared = _LENGTH.search(c.decl)
            want = max(int(declared.group(1)) if declared else 255, st.stats[c.name].max_chars)
            if want <= MAX_INDEXED_VARCHAR:
                tt = TType("text", f"VARCHAR({want})", length=want)
        elif c.name in indexed and tt.kind == "blob":
            want = max(255, st.stats[c.name].max_bytes)
            if want <= KEY_LIMIT:
                tt = TType("blob", f"VARBINARY({want})", length=want)
        types[c.name] = tt

    columns: list[TCol] = []
    for i, c in enumerate(st.columns):
        tt = types[c.name]
        is_key = c.name in pk_cols
        conv = make_converter(tt, is_key)
        coll = COLLATIONS.get(c.collation or "BINARY", None) if c.collation else None
        if c.collation and c.collation not in COLLATIONS:
            warnings.append(f"{st.name}.{c.name}: collation {c.collation} has no MariaDB equivalent; binary used")
        default_sql = None
        dkey = f"{st.name}.{c.name}"
        if dkey in spec.column_defaults:
            default_sql = str(spec.column_defaults[dkey])
        elif c.default is not None:
            try:
                default_sql = translate_default(c.default, c, tt, conv)
            except Bad as exc:
                raise MigrationError("schema", f"{where}: column {c.name}: {exc}; set column_defaults: "
                                               f"{{\"{dkey}\": <MariaDB expression>}} for source {spec.name} in the map") from None
            if default_sql == "NULL" and (c.notnull or is_key):
                default_sql = None
        auto = alias and is_key
        if auto and types[c.name].kind != "int":
            auto = False
        columns.append(TCol(c.name, tt, i, not (c.notnull or is_key), default_sql, auto and default_sql is None,
                            coll, conv))
    if surrogate:
        columns.append(TCol(SURROGATE_PK, TType("int", "BIGINT"), None, False, None, True, None,
                            make_converter(TType("int", "BIGINT"), True)))
        pk_cols = [SURROGATE_PK]
        warnings.append(f"{st.name}: no primary key in SQLite; {SURROGATE_PK} (SQLite's rowid) added as the "
                        "primary key Galera needs")

    auto_inc = None
    if any(col.auto_increment for col in columns):
        auto_inc = 1  # raised to past the maximum by the source scan

    # indexes; the primary key is the table's own
    indexes: list[TIndex] = []
    used: set[str] = set()
    tmap = {c.name: c.tt for c in columns}
    pk_sizes = [key_bytes(tmap[p], None) for p in pk_cols]
    if any(s is None for s in pk_sizes) or sum(s or 0 for s in pk_sizes) > KEY_LIMIT:
        raise MigrationError("schema", f"{where}: primary key ({', '.join(pk_cols)}) does not fit InnoDB's {KEY_LIMIT}-byte "
                                       f"key limit (longest values: {[st.stats[p].max_chars for p in pk_cols if p in st.stats]}); "
                                       "shorten the values or override the column types in the map")
    for ix in st.indexes:
        if ix.origin == "pk":
            continue
        if any(c is None for c, _d in ix.columns):
            warnings.append(f"{st.name}: index {ix.name} on an expression is not migrated (MariaDB 10.11 has no "
                            "expression indexes)")
            continue
        unique = ix.unique
        if ix.partial:
            warnings.append(f"{st.name}: partial index {ix.name} migrated as a full{' non-unique' if unique else ''} index")
            unique = False
        cols = [c for c, _d in ix.columns if c]
        sizes = [key_bytes(tmap[c], None) for c in cols]
        prefixes: dict[str, int | None] = {c: None for c in cols}
        if any(s is None for s in sizes) or sum(s or 0 for s in sizes) > KEY_LIMIT:
            if unique:
                raise MigrationError("schema", f"{where}: unique index {ix.name} ({', '.join(cols)}) does not fit InnoDB's "
                                               f"{KEY_LIMIT}-byte key limit; a prefix would change what is unique. "
                                               "Shorten the values or override the column types in the map")
            var = [n for n in cols if tmap[n].kind in ("text", "blob")]
            fixed = sum(key_bytes(tmap[n], None) or 0 for n in cols if n not in var)
            room = (KEY_LIMIT - fixed) // max(1, len(var))
            for n in var:
                per = 4 if tmap[n].kind == "text" else 1
                prefixes[n] = min(tmap[n].length or 10 ** 9, room // per)
                if tmap[n].length and prefixes[n] == tmap[n].length:
                    prefixes[n] = None
            warnings.append(f"{st.name}: index {ix.name} uses column prefixes to fit the key limit")
        name = ix.name if not ix.name.startswith("sqlite_autoindex_") else index_name(st.name, cols, unique, used)
        name = name[:64]
        if name.lower() in used:
            name = index_name(st.name, cols, unique, used)
        used.add(name.lower())
        indexes.append(TIndex(name, unique, [(c, prefixes[c], d) for c, d in ix.columns if c]))
    if st.foreign_keys:
        warnings.append(f"{st.name}: foreign keys not created in MariaDB: {'; '.join(st.foreign_keys)}")
    if st.has_check:
        warnings.append(f"{st.name}: CHECK constraints are not migrated")
    return TablePlan(source, st, spec.database, target, columns, pk_cols, indexes, auto_inc, warnings)


# ------------------------------------------------------------------------------------
# Reading rows in key order (the checkpoint is the key of the last committed row)
# ------------------------------------------------------------------------------------

def encode_key(key: Sequence[tuple[bytes, Any]]) -> str:
    out = []
    for tp, v in key:
        out.append([tp.decode(), bytes(v).hex() if tp in (b"text", b"blob") else v])
    return json.dumps(out)


def decode_key(text: str) -> list[tuple[bytes, Any]]:
    return [(tp.encode(), bytes.fromhex(v) if tp in ("text", "blob") else v) for tp, v in json.loads(text)]


def iter_source(plan: TablePlan, after: list[tuple[bytes, Any]] | None = None, errors: list[str] | None = None
                ) -> Iterator[tuple[list[tuple[bytes, Any]], list[Any]]]:
    """(key, converted row) in key order. A value that does not convert raises Bad naming
    the column and the key, or, when `errors` is a list, is recorded there and its row skipped."""
    st = plan.src
    sel = []
    for c in st.columns:
        sel += [f"typeof({qi(c.name)})", qi(c.name)]
    if st.rowid_expr:
        keycols = [st.rowid_expr]
        head = [st.rowid_expr]
    else:
        pkn = [c.name for c in sorted((c for c in st.columns if c.pk), key=lambda c: c.pk)]
        keycols = [qi(n) for n in pkn]
        head = []
    where, params = "", []
    if after:
        holders = []
        for tp, v in after:
            holders.append("CAST(? AS TEXT)" if tp == b"text" else "?")
            params.append(v)
        where = f" WHERE ({', '.join(keycols)}) > ({', '.join(holders)})"
    sql = f"SELECT {', '.join(head + sel)} FROM {qi(st.name)}{where} ORDER BY {', '.join(keycols)}"
    off = len(head)
    convs = [(c.src, c.conv, c.name) for c in plan.columns]
    if st.rowid_expr:
        pk_src: list[int] = []
    else:
        pk_src = [[c.name for c in st.columns].index(n)
                  for n in [c.name for c in sorted((c for c in st.columns if c.pk), key=lambda c: c.pk)]]
    for row in plan.source.data(sql, params):
        if st.rowid_expr:
            key = [(b"integer", row[0])]
        else:
            key = [(row[off + 2 * i], row[off + 2 * i + 1]) for i in pk_src]
        out = []
        try:
            for src, conv, name in convs:
                if src is None:
                    out.append(row[0])
                    continue
                try:
                    out.append(conv(row[off + 2 * src], row[off + 2 * src + 1]))
                except Bad as exc:
                    raise Bad(f"column {name}, {key_text(plan, key)}: {exc}") from None
        except Bad as exc:
            if errors is None:
                raise
            errors.append(str(exc))
            continue
        yield key, out


def key_text(plan: TablePlan, key: Sequence[tuple[bytes, Any]]) -> str:
    if plan.src.rowid_expr:
        return f"rowid {key[0][1]}"
    parts = [bytes(v).decode("utf-8", "replace") if tp in (b"text", b"blob") else repr(v) for tp, v in key]
    return "key (" + ", ".join(parts) + ")"


def scan_source(plan: TablePlan) -> None:
    """Convert every row once (so bad data stops the run before anything is written),
    count it and checksum it; find the maximum of the AUTO_INCREMENT column."""
    digest = Digest(plan.pk_idx)
    errors: list[str] = []
    auto_idx = next((i for i, c in enumerate(plan.columns) if c.auto_increment), None)
    top = 0
    for _key, row in iter_source(plan, errors=errors):
        digest.add(row)
        if auto_idx is not None and row[auto_idx] is not None:
            top = max(top, row[auto_idx])
    if errors:
        hint = ("set column_types for the column in the map (LONGBLOB keeps bytes exactly, LONGTEXT keeps any "
                "text) or fix the rows in SQLite")
        shown = errors[:MAX_EXAMPLES]
        raise MigrationError("data", f"{plan.source.path} table {plan.src.name} -> {plan.label}: {len(errors)} row(s) "
                                     f"cannot be stored as the planned types: " + "; ".join(shown)
                                     + ("; ..." if len(errors) > len(shown) else "") + f". To go on: {hint}")
    plan.rows = digest.count
    plan.checksum = digest.hexdigest()
    if plan.auto_increment is not None:
        plan.auto_increment = max(top, plan.src.sequence or 0) + 1


# ------------------------------------------------------------------------------------
# The target
# ------------------------------------------------------------------------------------

@dataclasses.dataclass
class Target:
    conn: Any
    wsrep_on: bool
    ws_limit: int | None
    packet: int
    annotate: bool = True  # binlog_annotate_row_events: the statement text rides in the write set too

    def q(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        with self.conn.cursor() as cur:
            cur.execute(sql, params)
            return list(cur.fetchall())

    def x(self, sql: str | bytes, params: Sequence[Any] | None = None) -> int:
        with self.conn.cursor() as cur:
            return int(cur.execute(sql, params) or 0)

    def db_exists(self, db: str) -> bool:
        return bool(self.q("SELECT 1 FROM information_schema.SCHEMATA WHERE SCHEMA_NAME=%s", (db,)))

    def columns(self, db: str, table: str) -> list[str] | None:
        if not self.q("SELECT 1 FROM information_schema.TABLES WHERE TABLE_SCHEMA=%s AND TABLE_NAME=%s", (db, table)):
            return None
        return [r[0] for r in self.q("SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA=%s "
                                     "AND TABLE_NAME=%s ORDER BY ORDINAL_POSITION", (db, table))]

    def state(self, db: str, table: str) -> dict[str, Any] | None:
        if self.columns(db, STATE_TABLE) is None:
            return None
        with self.conn.cursor(pymysql.cursors.DictCursor) as cur:
            cur.execute(f"SELECT * FROM {mi(db)}.{mi(STATE_TABLE)} WHERE target_table=%s", (table,))
            row = cur.fetchone()
        return dict(row) if row else None

    def ensure_state_table(self, db: str) -> None:
        self.x(f"""CREATE TABLE IF NOT EXISTS {mi(db)}.{mi(STATE_TABLE)} (
  target_table VARCHAR(64) NOT NULL PRIMARY KEY,
  source_name VARCHAR(255) NOT NULL,
  source_file VARCHAR(1024) NOT NULL,
  source_table VARCHAR(255) NOT NULL,
  plan_hash CHAR(64) NOT NULL,
  status VARCHAR(16) NOT NULL,
  last_key LONGTEXT NULL,
  rows_copied BIGINT NOT NULL DEFAULT 0,
  batches INT NOT NULL DEFAULT 0,
  source_rows BIGINT NULL,
  checksum CHAR(64) NULL,
  started_at DATETIME(6) NOT NULL,
  updated_at DATETIME(6) NOT NULL
) {TABLE_OPTIONS}""")

    def digest(self, plan: TablePlan, table: str) -> Digest:
        d = Digest(plan.pk_idx)
        cols = ", ".join(mi(c.name) for c in plan.columns)
        with self.conn.cursor(pymysql.cursors.SSCursor) as cur:
            cur.execute(f"SELECT {cols} FROM {mi(plan.database)}.{mi(table)}")
            for row in cur:
                d.add(row)
        return d


def connect(host: str | None = "127.0.0.1", port: int = 3306, user: str | None = None, password: str | None = None,
            unix_socket: str | None = None, defaults_file: str | None = None, connect_timeout: float = 10) -> Target:
    if pymysql is None:
        raise MigrationError("server", "PyMySQL is not installed: pip install PyMySQL")
    kw: dict[str, Any] = {"charset": "utf8mb4", "autocommit": True, "connect_timeout": connect_timeout,
                          "max_allowed_packet": 1 << 30, "init_command": f"SET SESSION sql_mode='{SQL_MODE}', "
                                                                         "time_zone='+00:00'"}
    if defaults_file:
        kw.update(read_default_file=defaults_file, read_default_group="client")
    if unix_socket:
        kw["unix_socket"] = unix_socket
    else:
        kw.update(host=host, port=port)
    if user:
        kw["user"] = user
    if password is not None:
        kw["password"] = password
    try:
        conn = pymysql.connect(**kw)
    except pymysql.MySQLError as exc:
        where = unix_socket or f"{host}:{port}"
        raise MigrationError("server", f"cannot connect to MariaDB at {where}: {exc}") from None
    t = Target(conn, False, None, 0)
    variables = dict(t.q("SHOW VARIABLES WHERE Variable_name IN ('wsrep_on', 'wsrep_max_ws_size', "
                         "'max_allowed_packet', 'binlog_annotate_row_events')"))
    t.packet = int(variables.get("max_allowed_packet", 16 << 20))
    t.annotate = str(variables.get("binlog_annotate_row_events", "ON")).upper() in ("ON", "1")
    t.wsrep_on = str(variables.get("wsrep_on", "OFF")).upper() == "ON"
    if t.wsrep_on:
        t.ws_limit = int(variables["wsrep_max_ws_size"])
        status = dict(t.q("SHOW GLOBAL STATUS WHERE Variable_name IN ('wsrep_ready', 'wsrep_cluster_status')"))
        if status.get("wsrep_ready") != "ON" or status.get("wsrep_cluster_status") != "Primary":
            raise MigrationError("server", f"the Galera node is not ready (wsrep_ready={status.get('wsrep_ready')}, "
                                           f"cluster status {status.get('wsrep_cluster_status')}): connect through the "
                                           "writer endpoint of a healthy cluster")
    return t


def batch_budget(target: Target, requested: int | None) -> tuple[int, list[str]]:
    """Bytes of row data per transaction: half of the write-set limit and of the packet
    limit, at most DEFAULT_BATCH_CAP, unless --batch-bytes says otherwise."""
    notes = []
    limits = [target.packet // 2, DEFAULT_BATCH_CAP]
    if target.ws_limit:
        limits.append(target.ws_limit // 2)
    budget = max(1024, min(limits))
    if requested:
        if target.ws_limit and requested > target.ws_limit:
            notes.append(f"--batch-bytes {requested} is above the server's wsrep_max_ws_size {target.ws_limit}: "
                         "Galera will refuse such batches")
        budget = requested
    return budget, notes


def value_size(v: Any) -> int:
    if isinstance(v, (bytes, bytearray)):
        return len(v)
    if isinstance(v, str):
        return len(v.encode("utf-8"))
    return 9


def is_writeset_error(exc: Exception) -> bool:
    text = str(exc).lower()
    return "writeset" in text or "write set" in text or "ws_size" in text or "transaction size exceed" in text


def is_connection_error(exc: Exception) -> bool:
    if isinstance(exc, (pymysql.err.InterfaceError,)):
        return True
    return bool(isinstance(exc, pymysql.err.OperationalError) and exc.args and exc.args[0] in (2006, 2013, 2003, 2055))


# ------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------

@dataclasses.dataclass
class Result:
    source: str
    table: str
    target: str
    status: str
    src_rows: int | None = None
    dst_rows: int | None = None
    batches: int = 0
    max_batch_bytes: int = 0
    seconds: float = 0.0
    checksum: str = ""
    message: str = ""
    ddl: str = ""


@dataclasses.dataclass
class Report:
    results: list[Result]
    errors: list[MigrationError]
    warnings: list[str]
    budget: int | None = None
    server: str = ""

    @property
    def ok(self) -> bool:
        return not self.errors and all(r.status in ("copied", "resumed", "verified", "match", "planned", "replaced")
                                       for r in self.results)

    def by_target(self) -> dict[str, Result]:
        return {r.target: r for r in self.results}


BatchHook = Callable[[TablePlan, int, int], None]


class Migration:
    def __init__(self, specs: list[SourceSpec], source_root: Path, *, target: Target | None,
                 busy_timeout: float = 5.0, batch_bytes: int | None = None, only: Sequence[str] | None = None,
                 out: TextIO | None = None, on_batch: BatchHook | None = None, verbose: bool = False) -> None:
        self.specs = [s for s in specs if not only or s.name in only]
        unknown = set(only or ()) - {s.name for s in specs}
        if unknown:
            raise MigrationError("map", f"--only {', '.join(sorted(unknown))}: no such source in the map "
                                        f"(sources: {', '.join(s.name for s in specs)})")
        self.root = Path(source_root)
        self.target = target
        self.busy_timeout = busy_timeout
        self.batch_bytes = batch_bytes
        self.out = out or sys.stdout
        self.on_batch = on_batch
        self.verbose = verbose
        self.sources: list[Source] = []
        self.plans: list[TablePlan] = []
        self.report = Report([], [], [])

    def say(self, msg: str) -> None:
        print(msg, file=self.out, flush=True)

    # -- phase 1: read and check every source; nothing is written ----------------------
    def prepare_sources(self) -> None:
        claimed: dict[tuple[str, str], str] = {}
        for spec in self.specs:
            src = Source(spec, self.root, self.busy_timeout)
            try:
                src.open()
            except MigrationError as exc:
                self.report.errors.append(exc)
                continue
            self.sources.append(src)
            try:
                tables, warnings = src.table_names()
                self.report.warnings += warnings
                if not tables:
                    self.report.warnings.append(f"{spec.name}: {src.path} contains no tables")
                for missing in (set(spec.rename) | set(spec.skip)) - set(tables):
                    self.report.warnings.append(f"{spec.name}: map names table {missing}, which the file does not have")
                for t in tables:
                    if t in spec.skip:
                        self.report.warnings.append(f"{spec.name}: table {t} skipped (map)")
                        continue
                    target = spec.rename.get(t, t)
                    key = (spec.database, target.lower())
                    if key in claimed:
                        raise MigrationError("map", f"{spec.database}.{target} would receive table {t} of source "
                                                    f"{spec.name} ({spec.file}) and a table of source {claimed[key]}: "
                                                    f"add `rename: {{{t}: <other_name>}}` to one of them in the map")
                    claimed[key] = f"{spec.name} ({spec.file})"
                    st = src.read_table(t)
                    plan = plan_table(src, st, target)
                    scan_source(plan)
                    self.report.warnings += plan.warnings
                    self.plans.append(plan)
            except MigrationError as exc:
                self.report.errors.append(exc)
            except sqlite3.DatabaseError as exc:
                self.report.errors.append(MigrationError("corrupt", f"{src.path} (source {spec.name}): {exc}"))

    # -- phase 2: what the target already holds; nothing is written --------------------
    def check_target(self) -> None:
        assert self.target is not None
        t = self.target
        for db in sorted({p.database for p in self.plans}):
            if not t.db_exists(db):
                self.report.errors.append(MigrationError(
                    "server", f"database {db} does not exist on the server (the data tier's bootstrap creates "
                              "portal_api, portal_cae and portal_ws); check the map and the data tier"))
        if self.report.errors:
            return
        for p in self.plans:
            try:
                self._decide(p)
            except MigrationError as exc:
                self.report.errors.append(exc)

    def _decide(self, p: TablePlan) -> None:
        t = self.target
        assert t is not None
        state = t.state(p.database, p.target)
        final = t.columns(p.database, p.target)
        staging = t.columns(p.database, p.staging)
        if state and state["plan_hash"] != p.plan_hash:
            if final is not None and state["status"] == "done":
                raise MigrationError("conflict", f"{p.label} was migrated earlier with a different translation "
                                                 f"(source schema or map changed). To migrate it again: DROP TABLE "
                                                 f"{p.label}; then re-run")
            state = None  # a staging copy of an older plan: start over
        if state and final is not None:
            p.action = "verify-existing"
            p.state_status = state["status"]
            return
        if state and state["status"] == "copying" and staging is not None:
            p.action = "resume"
            p.resume_key = decode_key(state["last_key"]) if state["last_key"] else None
            p.rows_done = int(state["rows_copied"])
            p.batches_done = int(state["batches"])
            return
        if final is not None:
            ours = [c.name.lower() for c in p.columns]
            theirs = [c.lower() for c in final]
            if sorted(ours) != sorted(theirs):
                raise MigrationError("conflict", f"{p.label} already exists with columns ({', '.join(final)}); the "
                                                 f"source table {p.src.name} of {p.source.path} has "
                                                 f"({', '.join(c.name for c in p.columns)}). Rename or drop the "
                                                 f"existing table, or map the source table to another name "
                                                 f"(rename: in the map)")
            if t.q(f"SELECT 1 FROM {mi(p.database)}.{mi(p.target)} LIMIT 1"):
                raise MigrationError("conflict", f"{p.label} already exists with the same columns and holds rows "
                                                 "this migration did not write; drop it (or empty it) to migrate "
                                                 f"{p.src.name} from {p.source.path}")
            p.action = "replace-empty"
            return
        p.action = "copy"

    # -- phase 3: copy, verify, swap --------------------------------------------------
    def run(self, *, dry_run: bool = False, verify_only: bool = False) -> Report:
        try:
            self.prepare_sources()
            if self.target is not None:
                budget, notes = batch_budget(self.target, self.batch_bytes)
                self.report.budget = budget
                self.report.warnings += notes
                info = self.target.conn.get_server_info().removeprefix("5.5.5-")
                self.report.server = (f"{info}, wsrep {'ON' if self.target.wsrep_on else 'OFF'}, wsrep_max_ws_size="
                                      f"{self.target.ws_limit}, max_allowed_packet={self.target.packet}, batch "
                                      f"budget {budget} bytes")
                if not self.report.errors:
                    self.check_target()
            if self.report.errors:
                for p in self.plans:
                    self.report.results.append(self._result(p, "not started"))
                return self.report
            for p in self.plans:
                if dry_run:
                    r = self._result(p, "planned", message=self._dry_message(p))
                    r.ddl = p.create_sql(p.target)
                    self.report.results.append(r)
                elif verify_only:
                    self.report.results.append(self._verify_only(p))
                else:
                    self.report.results.append(self._migrate(p))
            return self.report
        finally:
            for s in self.sources:
                s.close()

    def _result(self, p: TablePlan, status: str, **kw: Any) -> Result:
        return Result(p.source.spec.name, p.src.name, p.label, status, src_rows=p.rows or None, **kw)

    def _dry_message(self, p: TablePlan) -> str:
        if self.target is None:
            return "target not checked"
        return {"copy": "would copy into a new table",
                "replace-empty": "would replace the existing empty table",
                "resume": f"would resume after {p.rows_done} rows ({p.batches_done} batches committed)",
                "verify-existing": "done earlier: would verify and skip"}[p.action]

    def _verify_only(self, p: TablePlan) -> Result:
        assert self.target is not None
        t0 = time.monotonic()
        if self.target.columns(p.database, p.target) is None:
            return self._result(p, "missing", message=f"{p.label} does not exist")
        d = self.target.digest(p, p.target)
        ok = d.count == p.rows and d.hexdigest() == p.checksum
        return self._result(p, "match" if ok else "MISMATCH", dst_rows=d.count, seconds=time.monotonic() - t0,
                            checksum=d.hexdigest()[:12],
                            message="" if ok else f"source {p.rows} rows sha256 {p.checksum[:12]}")

    def _migrate(self, p: TablePlan) -> Result:
        t = self.target
        assert t is not None
        t0 = time.monotonic()
        try:
            if p.action == "verify-existing":
                d = t.digest(p, p.target)
                if d.count != p.rows or d.hexdigest() != p.checksum:
                    raise MigrationError("verify", f"{p.label} differs from {p.source.path} table {p.src.name} "
                                                   f"(target {d.count} rows sha256 {d.hexdigest()[:12]}, source "
                                                   f"{p.rows} rows sha256 {p.checksum[:12]}): the source or the "
                                                   f"target changed after the migration. To copy again: DROP TABLE "
                                                   f"{p.label}; then re-run")
                if p.state_status != "done":  # renamed, then interrupted before the state said so
                    self._mark_done(p)
                return self._result(p, "verified", dst_rows=d.count, checksum=p.checksum[:12],
                                    seconds=time.monotonic() - t0, message="done earlier; verified, skipped")
            stats = self._copy(p)
            d = t.digest(p, p.staging)
            if d.count != p.rows or d.hexdigest() != p.checksum:
                raise MigrationError("verify", f"{p.label}: staging copy differs from the source (target {d.count} "
                                               f"rows sha256 {d.hexdigest()[:12]}, source {p.rows} rows sha256 "
                                               f"{p.checksum[:12]}); nothing was renamed")
            self._swap(p)
            status = {"resume": "resumed", "replace-empty": "replaced"}.get(p.action, "copied")
            msg = f"resumed after {p.rows_done} rows" if p.action == "resume" else ""
            return self._result(p, status, dst_rows=d.count, batches=stats[0], max_batch_bytes=stats[1],
                                checksum=p.checksum[:12], seconds=time.monotonic() - t0, message=msg)
        except MigrationError as exc:
            self._abandon(p)
            self.report.errors.append(exc)
            return self._result(p, "FAILED", seconds=time.monotonic() - t0, message=exc.message)
        except pymysql.MySQLError as exc:
            if is_connection_error(exc):
                err = MigrationError("server", f"{p.label}: lost the connection to MariaDB ({exc}); the staging "
                                               f"copy and its checkpoint are kept: re-run to resume")
            else:
                self._abandon(p)
                if is_writeset_error(exc):
                    err = MigrationError("limit", f"{p.label}: the server refused a batch: {exc.args[-1]} (Galera "
                                                  f"wsrep_max_ws_size={t.ws_limit}, batch budget "
                                                  f"{self.report.budget} bytes). Lower --batch-bytes or leave it "
                                                  "unset; staging table dropped")
                else:
                    err = MigrationError("copy", f"{p.label}: MariaDB error {exc.args[0] if exc.args else ''}: "
                                                 f"{exc.args[-1] if exc.args else exc}; staging table dropped")
            self.report.errors.append(err)
            return self._result(p, "FAILED", seconds=time.monotonic() - t0, message=err.message)

    def _abandon(self, p: TablePlan) -> None:
        """Drop the staging copy and its checkpoint after an error that a resume would repeat."""
        t = self.target
        assert t is not None
        try:
            t.conn.rollback()
            t.x(f"DROP TABLE IF EXISTS {mi(p.database)}.{mi(p.staging)}")
            if t.columns(p.database, STATE_TABLE) is not None:
                t.x(f"DELETE FROM {mi(p.database)}.{mi(STATE_TABLE)} WHERE target_table=%s AND status<>'done'",
                    (p.target,))
        except pymysql.MySQLError as exc:
            self.report.warnings.append(f"{p.label}: could not drop {p.staging}: {exc}")

    def _copy(self, p: TablePlan) -> tuple[int, int]:
        t = self.target
        assert t is not None
        db, stg = mi(p.database), mi(p.staging)
        state = f"{db}.{mi(STATE_TABLE)}"
        if p.action != "resume":
            t.ensure_state_table(p.database)
            t.x(f"DROP TABLE IF EXISTS {db}.{stg}")
            t.x(f"DELETE FROM {state} WHERE target_table=%s", (p.target,))
            t.x(p.create_sql(p.staging))
            t.x(f"INSERT INTO {state} (target_table, source_name, source_file, source_table, plan_hash, status, "
                "rows_copied, batches, source_rows, started_at, updated_at) VALUES (%s,%s,%s,%s,%s,'copying',0,0,%s,"
                "UTC_TIMESTAMP(6),UTC_TIMESTAMP(6))",
                (p.target, p.source.spec.name, p.source.spec.file, p.src.name, p.plan_hash, p.rows))
            rows_done, batch_no = 0, 0
        else:
            rows_done, batch_no = p.rows_done, p.batches_done
            self.say(f"{p.label}: resuming after {rows_done} rows ({batch_no} batches were committed)")
        budget = self.report.budget or DEFAULT_BATCH_CAP
        stmt_limit = t.packet - 4096
        ws_hard = int(t.ws_limit * 0.9) if t.ws_limit else None
        prefix = f"INSERT INTO {db}.{stg} ({', '.join(mi(c.name) for c in p.columns)}) VALUES ".encode()
        batches, max_bytes, most_vars = 0, 0, 0
        stmts: list[list[bytes]] = [[]]
        sets: list[bytes] = []
        stmt_len = len(prefix)
        size = 0
        last_key: list[tuple[bytes, Any]] | None = None
        nrows = 0

        def flush() -> None:
            nonlocal stmts, sets, stmt_len, size, nrows, batches, max_bytes, rows_done, batch_no, most_vars
            if not nrows:
                return
            assert last_key is not None
            t.conn.begin()
            for set_sql in sets:
                t.x(set_sql)
            for values in stmts:
                if values:
                    t.x(prefix + b",".join(values))
            t.x(f"UPDATE {state} SET last_key=%s, rows_copied=rows_copied+%s, batches=batches+1, "
                "updated_at=UTC_TIMESTAMP(6) WHERE target_table=%s", (encode_key(last_key), nrows, p.target))
            t.conn.commit()
            rows_done += nrows
            batch_no += 1
            batches += 1
            max_bytes = max(max_bytes, size)
            most_vars = max(most_vars, len(sets))
            if self.verbose:
                self.say(f"{p.label}: batch {batch_no}: {nrows} rows, ~{size} bytes ({rows_done}/{p.rows})")
            stmts, sets, stmt_len, size, nrows = [[]], [], len(prefix), 0, 0
            if self.on_batch:
                self.on_batch(p, batch_no, rows_done)

        try:
            for key, row in iter_source(p, p.resume_key):
                # Large values travel in user variables (SET is not replicated) and the INSERT
                # names the variable: with binlog_annotate_row_events (MariaDB's default) the
                # INSERT's text rides in the write set next to the row image, so a 1 MB blob
                # sent inline as 2 MB of hex would cost ~3 MB of write set instead of ~1 MB.
                lit, row_sets = self._row_sql(row, len(sets))
                rsize = sum(value_size(v) for v in row) + ROW_OVERHEAD + (len(lit) if t.annotate else 0)
                if (len(prefix) + len(lit) > stmt_limit or any(len(x) > stmt_limit for x in row_sets)
                        or (ws_hard and rsize > ws_hard)):
                    raise MigrationError("limit", f"{p.label}: row {key_text(p, key)} is {rsize} bytes, more than the "
                                                  f"server takes in one transaction (max_allowed_packet={t.packet}, "
                                                  f"wsrep_max_ws_size={t.ws_limit}); raise them on every Galera node")
                if nrows and size + rsize > budget:
                    flush()
                    if row_sets:  # the variables of the new batch start again at @_m0
                        lit, row_sets = self._row_sql(row, 0)
                if stmt_len + len(lit) + 1 > stmt_limit:
                    stmts.append([])
                    stmt_len = len(prefix)
                stmts[-1].append(lit)
                sets += row_sets
                stmt_len += len(lit) + 1
                size += rsize
                nrows += 1
                last_key = key
            flush()
        except Bad as exc:  # the scan converted every row already; only a changed source gets here
            raise MigrationError("data", f"{p.source.path} table {p.src.name}: {exc} (the file changed during the "
                                         "run?)") from None
        if most_vars:
            t.x("SET " + ", ".join(f"@_m{i} = NULL" for i in range(most_vars)))
        return batches, max_bytes

    @staticmethod
    def _row_sql(row: Sequence[Any], first_var: int) -> tuple[bytes, list[bytes]]:
        parts: list[str] = []
        sets: list[bytes] = []
        for v in row:
            if value_size(v) > LARGE_VALUE:
                var = f"@_m{first_var + len(sets)}"
                sets.append(f"SET {var} = ".encode() + sql_literal(v).encode("utf-8"))
                parts.append(var)
            else:
                parts.append(sql_literal(v))
        return ("(" + ",".join(parts) + ")").encode("utf-8"), sets

    def _swap(self, p: TablePlan) -> None:
        t = self.target
        assert t is not None
        db = mi(p.database)
        if p.action == "replace-empty" and t.columns(p.database, p.target) is not None:
            if t.q(f"SELECT 1 FROM {db}.{mi(p.target)} LIMIT 1"):
                raise MigrationError("conflict", f"{p.label} received rows during the migration (is the portal "
                                                 "running?); stop it, drop the table and re-run")
            t.x(f"DROP TABLE IF EXISTS {db}.{mi(p.old)}")
            t.x(f"RENAME TABLE {db}.{mi(p.target)} TO {db}.{mi(p.old)}, {db}.{mi(p.staging)} TO {db}.{mi(p.target)}")
            t.x(f"DROP TABLE {db}.{mi(p.old)}")
        else:
            try:
                t.x(f"RENAME TABLE {db}.{mi(p.staging)} TO {db}.{mi(p.target)}")
            except pymysql.err.OperationalError as exc:
                if exc.args and exc.args[0] == 1050:
                    raise MigrationError("conflict", f"{p.label} appeared during the migration; drop it or rename "
                                                     "the source table in the map, then re-run") from None
                raise
        self._mark_done(p)

    def _mark_done(self, p: TablePlan) -> None:
        t = self.target
        assert t is not None
        t.x(f"UPDATE {mi(p.database)}.{mi(STATE_TABLE)} SET status='done', source_rows=%s, checksum=%s, "
            "updated_at=UTC_TIMESTAMP(6) WHERE target_table=%s", (p.rows, p.checksum, p.target))


# ------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------

def summary(report: Report) -> str:
    head = ["source", "table", "target", "src rows", "dst rows", "batches", "max batch B", "sec", "sha256", "status"]
    rows = [[r.source, r.table, r.target, "" if r.src_rows is None else str(r.src_rows),
             "" if r.dst_rows is None else str(r.dst_rows), str(r.batches) if r.batches else "",
             str(r.max_batch_bytes) if r.max_batch_bytes else "", f"{r.seconds:.2f}" if r.seconds else "",
             r.checksum, r.status] for r in report.results]
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=False)]
    right = {3, 4, 5, 6, 7}

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
    notes = [f"  {r.target}: {r.message}" for r in report.results
             if r.message and r.status not in ("planned", "verified")]
    if notes:
        lines += ["", "notes:"] + notes
    if report.warnings:
        lines += ["", "warnings:"] + [f"  {w}" for w in report.warnings]
    if report.errors:
        lines += ["", "errors:"] + [f"  {e}" for e in report.errors]
    lines += ["", "result: " + ("OK" if report.ok else "FAILED")]
    return "\n".join(lines)


def migrate(map_path: str | Path | list[SourceSpec], source_root: str | Path, *, dry_run: bool = False,
            verify_only: bool = False, connection: dict[str, Any] | None = None, target: Target | None = None,
            **kw: Any) -> Report:
    """The library entry point (tests and tools/bench_migration.py use it)."""
    specs = map_path if isinstance(map_path, list) else load_map(map_path)
    own = False
    if target is None and connection is not None:
        try:
            target = connect(**connection)
            own = True
        except MigrationError as exc:
            if not dry_run:
                return Report([], [exc], [])
            kw.setdefault("out", sys.stdout)
            print(f"note: {exc}; target checks skipped", file=kw["out"])
    if target is None and not dry_run:
        raise MigrationError("server", "no MariaDB connection given")
    try:
        return Migration(specs, Path(source_root), target=target, **kw).run(dry_run=dry_run, verify_only=verify_only)
    finally:
        if own and target is not None:
            target.conn.close()


def main(argv: Sequence[str] | None = None, on_batch: BatchHook | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See docs/migration.md for the runbook and what each error means.")
    ap.add_argument("--source-root", required=True, help="directory the map's `file` paths are relative to")
    ap.add_argument("--map", default=str(DEFAULT_MAP), help="source -> database mapping (default: %(default)s)")
    ap.add_argument("--only", action="append", metavar="SOURCE", help="migrate only this source of the map (repeatable)")
    ap.add_argument("--dry-run", action="store_true", help="print the DDL, row counts and actions; write nothing")
    ap.add_argument("--verify", action="store_true", help="compare sources with the migrated tables; write nothing")
    ap.add_argument("--host", default="127.0.0.1", help="DB writer endpoint (default: %(default)s)")
    ap.add_argument("--port", type=int, default=3306)
    ap.add_argument("--socket", help="connect through this unix socket instead")
    ap.add_argument("--user", default=os.environ.get("MARIADB_USER", "portal"), help="default: $MARIADB_USER or portal")
    ap.add_argument("--password-file", help="file holding the password (default: $MARIADB_PASSWORD, else none)")
    ap.add_argument("--defaults-file", help="MariaDB client option file ([client] section), e.g. ~/.my.cnf")
    ap.add_argument("--batch-bytes", type=int, help="row bytes per transaction (default: derived from the server's "
                                                    "wsrep_max_ws_size and max_allowed_packet)")
    ap.add_argument("--busy-timeout", type=float, default=5.0, help="seconds to wait for a SQLite lock (default 5)")
    ap.add_argument("-v", "--verbose", action="store_true", help="a line per batch")
    args = ap.parse_args(argv)
    if args.dry_run and args.verify:
        ap.error("--dry-run and --verify exclude each other")
    password = os.environ.get("MARIADB_PASSWORD")
    if args.password_file:
        try:
            password = Path(args.password_file).read_text().strip("\r\n")
        except OSError as exc:
            ap.error(f"--password-file: {exc}")
    conn = {"host": args.host, "port": args.port, "unix_socket": args.socket, "user": args.user,
            "password": password, "defaults_file": args.defaults_file}
    out = sys.stdout
    try:
        report = migrate(args.map, args.source_root, dry_run=args.dry_run, verify_only=args.verify, connection=conn,
                         busy_timeout=args.busy_timeout, batch_bytes=args.batch_bytes, only=args.only, out=out,
                         on_batch=on_batch, verbose=args.verbose)
    except MigrationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if exc.code == "map" else 1
    if report.server:
        print(f"server: {report.server}", file=out)
    if args.dry_run:
        print("dry run: nothing is written\n", file=out)
        for r in report.results:
            print(f"-- {r.target} <- {r.source}:{r.table}  ({r.src_rows or 0} rows; {r.message})\n{r.ddl};\n", file=out)
    print(summary(report), file=out)
    if report.errors and all(e.code == "map" for e in report.errors):
        return 2
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
