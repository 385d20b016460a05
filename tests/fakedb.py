"""A pymysql connection stand-in for the portals' reconnect tests: each statement raises
the next of the errors it was made with (None: it succeeds)."""

from __future__ import annotations

from typing import Any


class FakeConn:
    """A pymysql connection whose statements raise the next of `errors` (None: succeed)."""

    def __init__(self, errors: list[BaseException | None]) -> None:
        self.errors, self.closed, self.statements = errors, False, 0

    def cursor(self) -> Any:
        conn = self

        class Cur:
            def __enter__(self) -> Any:
                return self

            def __exit__(self, *a: Any) -> None:
                return None

            def execute(self, sql: str, args: Any = None) -> int:
                conn.statements += 1
                err = conn.errors.pop(0) if conn.errors else None
                if err is not None:
                    raise err
                return 1

            def fetchall(self) -> list[tuple[Any, ...]]:
                return []

        return Cur()

    def close(self) -> None:
        self.closed = True
