"""Job-state changes pushed to browsers over a websocket (service "ws", port 5011).

Slurm does not push, so someone has to poll squeue; if every websocket server did, the
controller would see N pollers and clients would see N slightly different streams. So:

  poller  ONE per cluster: every ws process competes for the Redis key
          portal:jobs:<cluster>:poller (SET NX PX, renewed by its holder with a
          compare-and-set script; a dead holder's key expires and another process takes
          over). The holder runs squeue every PORTAL_POLL_INTERVAL s, and for every job
          whose state changed it runs one Lua script: INCR the sequence, HSET the state,
          PUBLISH {"type":"job","seq","job_id","state"} on portal:jobs:<cluster>.
  hub     every ws process subscribes to that channel (one thread) and hands each
          message to its connected clients. A heartbeat through the subscription every
          5 s: a master that stopped answering (paused, failed over) is noticed and the
          hub resubscribes through Sentinel discovery, then tells its clients to resync.
  client  sends {"type":"hello","last_seq":N} after connecting (N: the last sequence it
          saw, 0 at first). Same as the current sequence: {"type":"uptodate"}; otherwise
          the server replays the current state: {"type":"snapshot","seq","jobs":{id:state}}
          (read atomically with the sequence). A client that sees a gap in seq sends
          hello again. So a reconnect, to this server or another, loses nothing.

Messages carry job ids and states only; which jobs belong to whom is the API's business
(GET /api/jobs), and the browser shows the changes for the jobs it lists.

Why flask-sock (simple-websocket, wsproto, h11): pure Python, maintained, and it runs
inside an ordinary WSGI server. Under gunicorn's gthread worker each open websocket holds
one thread of the worker (threads = the number of clients a process serves); no gevent
or eventlet (compiled, monkey-patching) and no second server process next to gunicorn.
The route answers the upgrade on /ws/ (HAProxy routes by the Upgrade header) with 101.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

from flask import Flask, request, session
from flask_sock import Sock
from simple_websocket import ConnectionClosed

from . import slurm
from .redisha import ERRORS, LEAD
from .sessions import RedisSession

if TYPE_CHECKING:
    from .app import Backends

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
         "DEADLINE", "DONE"}
RESYNC = "resync"
KEEP_FINISHED_S = 3600

# KEYS: seq, state hash, finished zset; ARGV: channel, job id, state, now, final (0/1)
PUBLISH = """
local seq = redis.call('INCR', KEYS[1])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
if ARGV[5] == '1' then redis.call('ZADD', KEYS[3], ARGV[4], ARGV[2]) end
redis.call('PUBLISH', ARGV[1], cjson.encode({type='job', seq=seq, job_id=ARGV[2], state=ARGV[3]}))
return seq
"""


class Keys:
    def __init__(self, cluster: str) -> None:
        base = f"portal:jobs:{cluster}"
        self.channel, self.seq, self.state = base, f"{base}:seq", f"{base}:state"
        self.finished, self.leader = f"{base}:finished", f"{base}:poller"


def snapshot(b: Backends, k: Keys) -> dict[str, Any]:
    def read(r: Any) -> Any:
        with r.pipeline(transaction=True) as p:  # MULTI: the sequence and the states agree
            p.get(k.seq)
            p.hgetall(k.state)
            return p.execute()
    seq, jobs = b.redis.call(read)
    return {"type": "snapshot", "seq": int(seq or 0), "jobs": jobs}


class Poller:
    """Competes for the cluster's poller lease; polls squeue while holding it."""

    def __init__(self, b: Backends, k: Keys) -> None:
        self.b, self.k = b, k
        self.me = f"{b.s.server_id}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.ttl_ms = int(max(5.0, 3 * b.s.poll_interval) * 1000)
        self.leading = False

    def lead(self) -> bool:
        self.leading = bool(self.b.redis.call(lambda r: r.eval(LEAD, 1, self.k.leader, self.me, self.ttl_ms)))
        return self.leading

    def poll_once(self) -> int:
        """One squeue pass; publishes every change. Returns the number published."""
        k = self.k
        now = slurm.queue_states()
        def states(r: Any) -> dict[str, str]:
            return dict(r.hgetall(k.state))
        before = self.b.redis.call(states)
        changes = {j: st for j, st in now.items() if before.get(j) != st}
        left = [j for j, st in before.items() if j not in now and st not in FINAL]
        changes.update(slurm.final_states(left))
        t = time.time()
        for job, state in sorted(changes.items()):
            final = "1" if state in FINAL else "0"
            def publish(r: Any, a: tuple[Any, ...] = (k.seq, k.state, k.finished, k.channel, job, state, t, final)) -> Any:
                return r.eval(PUBLISH, 3, *a)
            self.b.redis.call(publish)
        old = self.b.redis.call(lambda r: r.zrangebyscore(k.finished, 0, t - KEEP_FINISHED_S))
        if old:
            self.b.redis.call(lambda r: (r.hdel(k.state, *old), r.zrem(k.finished, *old)))
        return len(changes)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                if self.lead():
                    self.poll_once()
            except (*ERRORS, slurm.SlurmError) as e:
                print(f"hpc-portal ws poller: {type(e).__name__}: {e}", flush=True)
            stop.wait(self.b.s.poll_interval)


class Hub:
    """This process's subscription; fans each message out to the local clients' queues."""

    def __init__(self, b: Backends, k: Keys) -> None:
        self.b, self.k = b, k
        self.clients: set[queue.Queue[str]] = set()
        self.lock = threading.Lock()
        self.subscribed = threading.Event()

    def add(self) -> queue.Queue[str]:
        q: queue.Queue[str] = queue.Queue(maxsize=1000)
        with self.lock:
            self.clients.add(q)
        return q

    def remove(self, q: queue.Queue[str]) -> None:
        with self.lock:
            self.clients.discard(q)

    def broadcast(self, msg: str) -> None:
        with self.lock:
            clients = list(self.clients)
        for q in clients:
            try:
                q.put_nowait(msg)
            except queue.Full:  # a client that does not read: it resyncs when it does
                pass

    def run(self, stop: threading.Event) -> None:
        first = True
        # Liveness of the subscription: every 5 s the hub publishes to a channel of its
        # own and expects the message back through the subscription (the whole path: a
        # paused or demoted master, a dead connection). Not PING: redis-py mis-parses a
        # PONG on a subscription when decode_responses is on.
        beat = f"{self.k.channel}:beat:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        while not stop.is_set():
            ps = None
            try:
                ps = self.b.redis.call(lambda r: r.pubsub(ignore_subscribe_messages=True))
                ps.subscribe(self.k.channel, beat)
                if not first:  # messages may have been missed while away
                    self.broadcast(RESYNC)
                first = False
                self.subscribed.set()
                last_beat = sent = time.monotonic()
                while not stop.is_set():
                    if time.monotonic() - sent > 5:
                        self.b.redis.call(lambda r: r.publish(beat, "1"))
                        sent = time.monotonic()
                    if time.monotonic() - last_beat > 12:
                        raise TimeoutError("no heartbeat through the subscription for 12 s")
                    m = ps.get_message(timeout=1.0)
                    if m is None or m["type"] != "message":
                        continue
                    if m["channel"] == beat:
                        last_beat = time.monotonic()
                    else:
                        self.broadcast(m["data"])
            except (*ERRORS, TimeoutError) as e:
                print(f"hpc-portal ws hub: {type(e).__name__}: {e}; resubscribing", flush=True)
                self.subscribed.clear()
                self.b.redis.forget()
                stop.wait(1.0)
            finally:
                if ps is not None:
                    try:
                        ps.close()
                    except Exception:  # noqa: BLE001 - already broken
                        pass


def add_websocket(app: Flask, b: Backends) -> None:
    k = Keys(b.s.cluster)
    hub, poller = Hub(b, k), Poller(b, k)
    stop = threading.Event()
    started = threading.Lock()
    app.extensions["portal_ws"] = {"hub": hub, "poller": poller, "keys": k, "stop": stop}
    sock = Sock(app)

    def start_threads() -> None:
        # Lazily, in the worker process (gunicorn forks after import; threads do not survive a fork).
        with started:
            if not app.extensions["portal_ws"].get("threads"):
                app.extensions["portal_ws"]["threads"] = [
                    threading.Thread(target=hub.run, args=(stop,), daemon=True, name="ws-hub"),
                    threading.Thread(target=poller.run, args=(stop,), daemon=True, name="ws-poller")]
                for t in app.extensions["portal_ws"]["threads"]:
                    t.start()

    app.extensions["portal_ws"]["start"] = start_threads

    @app.before_request
    def websocket_needs_login() -> Any:
        start_threads()
        if request.path.rstrip("/") == "/ws" and request.headers.get("Upgrade", "").lower() == "websocket":
            assert isinstance(session, RedisSession)
            if session.error:
                return {"error": f"session store unavailable: {session.error}"}, 503
            if not session.get("user"):
                return {"error": "login required"}, 401
        return None

    @sock.route("/ws/")
    def stream(ws: Any) -> None:
        q = hub.add()
        try:
            while True:
                raw = ws.receive(timeout=0)
                while raw is not None:
                    msg = json.loads(raw)
                    if msg.get("type") == "hello":
                        snap = snapshot(b, k)
                        if int(msg.get("last_seq", -1)) == snap["seq"]:
                            ws.send(json.dumps({"type": "uptodate", "seq": snap["seq"]}))
                        else:
                            ws.send(json.dumps(snap))
                    raw = ws.receive(timeout=0)
                try:
                    item = q.get(timeout=0.5)
                except queue.Empty:
                    continue
                ws.send(json.dumps(snapshot(b, k)) if item == RESYNC else item)
        except ConnectionClosed:
            pass
        except (ValueError, AttributeError, TypeError):  # not JSON, not an object, last_seq not a number
            ws.close(reason=1003, message="messages are JSON objects: {\"type\": \"hello\", \"last_seq\": N}")
        except ERRORS:  # Redis away: close; the client reconnects (maybe elsewhere) and resyncs
            ws.close(reason=1011, message="state store unavailable")
        finally:
            hub.remove(q)
