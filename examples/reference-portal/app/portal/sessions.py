"""Server-side Flask sessions in Redis.

Flask's default session is a signed cookie: the data travels with the browser and a
logout cannot be forced from the server. Here the cookie carries only a random id
(`sid`, the same name as the stand-in's); the data is the Redis key
`portal:session:<sid>` (JSON, 8 h TTL, renewed on use). Any app host reads the same
key, so a request on another server keeps the login, and deleting the key logs the user
out everywhere. About 60 lines, so no extra dependency for it."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from flask import Flask, Request, Response
from flask.sessions import SessionInterface, SessionMixin
from werkzeug.datastructures import CallbackDict

from .redisha import ERRORS, SentinelMaster

COOKIE = "sid"
TTL = 8 * 3600
SID = re.compile(r"[0-9a-f]{32}")


def key(sid: str) -> str:
    return f"portal:session:{sid}"


class RedisSession(CallbackDict[str, Any], SessionMixin):
    def __init__(self, sid: str, data: dict[str, Any] | None = None, new: bool = False,
                 error: str | None = None) -> None:
        def changed(_self: Any) -> None:
            self.modified = True

        super().__init__(data or {}, changed)
        self.sid, self.new, self.modified, self.error = sid, new, False, error


class RedisSessionInterface(SessionInterface):
    def __init__(self, redis: SentinelMaster, secure: bool = True) -> None:
        self.redis, self.secure = redis, secure

    def open_session(self, app: Flask, request: Request) -> RedisSession:
        sid = request.cookies.get(COOKIE, "")
        if not SID.fullmatch(sid):
            return RedisSession(uuid.uuid4().hex, new=True)
        try:
            raw = self.redis.call(lambda r: r.get(key(sid)))
        except ERRORS as e:
            # Redis unreachable: an empty session that is never saved; views that need a
            # login answer 503 (see app.login_required), health checks are unaffected.
            return RedisSession(sid, error=f"{type(e).__name__}: {e}")
        if raw is None:  # expired or deleted (logged out): a fresh id, never the old one
            return RedisSession(uuid.uuid4().hex, new=True)
        return RedisSession(sid, json.loads(raw))

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        """Runs after the view, outside Flask's error handlers: a Redis error here would
        be a 500. So: a failed TTL renewal is let go (the key keeps its TTL; the next
        request renews it); a session that could not be written (a login, a new session)
        turns the answer into a 503 without a cookie, as every other backend failure."""
        assert isinstance(session, RedisSession)
        if session.error:
            return
        try:
            self._save(session, response)
        except ERRORS as e:
            if not (session.new or session.modified):
                return
            response.status_code = 503
            response.set_data(json.dumps({"error": f"session store unavailable: {type(e).__name__}: {e}"}))
            response.mimetype = "application/json"
            response.headers.pop("Set-Cookie", None)

    def _save(self, session: RedisSession, response: Response) -> None:
        if not session and session.modified:  # session.clear(): logout
            self.redis.call(lambda r: r.delete(key(session.sid)))
            response.delete_cookie(COOKIE, path="/")
            return
        if not session and session.new:
            return  # nothing to keep: no key, no cookie
        if not (session.new or session.modified):
            # Only renew the TTL: EXPIRE never brings back a key deleted meanwhile (a
            # logout elsewhere), where a SET would.
            self.redis.call(lambda r: r.expire(key(session.sid), TTL))
            return
        self.redis.call(lambda r: r.set(key(session.sid), json.dumps(dict(session)), ex=TTL))
        response.set_cookie(COOKIE, session.sid, max_age=TTL, path="/", httponly=True, secure=self.secure,
                            samesite="Lax")
