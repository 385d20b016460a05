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
          BEAT_S: a master that stopped answering (paused, failed over) is noticed within
          BEAT_DEAD_S and the hub resubscribes through Sentinel discovery, then tells its
          clients to resync.
          The hub keeps a copy of the cluster's state (sequence and job states): loaded
          from Redis (atomically) each time it subscribes, every RELOAD_S (the poller's
          pruning of finished jobs is not published) and on a gap in the sequence, and
          advanced by every message it receives.
  client  sends {"type":"hello","last_seq":N} after connecting (N: the last sequence it
          saw, 0 at first). Same as the current sequence: {"type":"uptodate"}; otherwise
          the server replays the current state: {"type":"snapshot","seq","jobs":{id:state}}.
          Both come from the hub's copy and say whether it is live ("live": the hub is
          subscribed; false while Redis is away; {"type":"status","live":false} is pushed
          when the subscription breaks). A client that sees a gap in seq sends
          hello again. So a reconnect, to this server or another, loses nothing.

Redis away (a master lost, until Sentinel promotes another): the open websockets stay open
and keep answering from the hub's copy, marked "live": false. Nothing can change the state
meanwhile (the poller publishes through Redis), so the copy is the latest state there is;
when the hub has subscribed again it reloads it and every client gets a snapshot. Before,
the service closed every websocket (1011) and every browser reconnected at once against a
master just promoted, each upgrade reading its session there.

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
RELOAD_S = 60.0  # the hub reloads its copy of the state this often
# The hub's heartbeat through its subscription: sent every BEAT_S, the subscription is
# dead (resubscribe through Sentinel) when none came back for BEAT_DEAD_S. A Sentinel
# failover takes ~5 s; noticing a dead subscription 4 s after the last beat keeps the
# pushed changes missed meanwhile to one resync.
BEAT_S = 1.0
BEAT_DEAD_S = 4.0

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
        # The copy of the cluster's state (None: not loaded yet) and when it was loaded.
        self.seq: int | None = None
        self.jobs: dict[str, str] = {}
        self.loaded_at = 0.0

    def load(self) -> None:
        """Replace the copy with Redis' state (sequence and states read atomically)."""
        snap = snapshot(self.b, self.k)
        with self.lock:
            self.seq, self.jobs, self.loaded_at = snap["seq"], dict(snap["jobs"]), time.monotonic()

    def apply(self, raw: str) -> None:
        """Advance the copy by one published change; a gap (a message missed, or a new
        master whose sequence is not the one this copy follows) reloads it."""
        try:
            msg = json.loads(raw)
            seq, job, state = int(msg["seq"]), str(msg["job_id"]), str(msg["state"])
        except (ValueError, KeyError, TypeError):
            return
        with self.lock:
            if self.seq is not None and seq <= self.seq:
                return  # already in the copy (published between the subscription and the load)
            if self.seq is not None and seq == self.seq + 1:
                self.seq = seq
                self.jobs[job] = state
                return
        self.load()

    def view(self) -> dict[str, Any] | None:
        """The copy as a snapshot message (None: never loaded), "live" while subscribed."""
        with self.lock:
            if self.seq is None:
                return None
            return {"type": "snapshot", "seq": self.seq, "jobs": dict(self.jobs), "live": self.subscribed.is_set()}

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
        # Liveness of the subscription: every BEAT_S the hub publishes to a channel of its
        # own and expects the message back through the subscription within BEAT_DEAD_S
        # (the whole path: a paused or demoted master, a dead connection, a new master
        # that the old subscription never hears from). Not PING: redis-py mis-parses a
        # PONG on a subscription when decode_responses is on.
        beat = f"{self.k.channel}:beat:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        while not stop.is_set():
            ps = None
            try:
                ps = self.b.redis.call(lambda r: r.pubsub(ignore_subscribe_messages=True))
                ps.subscribe(self.k.channel, beat)
                # Subscribed first, then loaded: a change published in between is in the
                # state read and arrives as a message too (skipped by its sequence).
                self.load()
                self.subscribed.set()
                if not first:  # messages may have been missed while away
                    self.broadcast(RESYNC)
                first = False
                last_beat = sent = time.monotonic()
                while not stop.is_set():
                    if time.monotonic() - self.loaded_at > RELOAD_S:
                        self.load()
                    if time.monotonic() - sent > BEAT_S:
                        self.b.redis.call(lambda r: r.publish(beat, "1"))
                        sent = time.monotonic()
                    if time.monotonic() - last_beat > BEAT_DEAD_S:
                        raise TimeoutError(f"no heartbeat through the subscription for {BEAT_DEAD_S:.0f} s")
                    m = ps.get_message(timeout=1.0)
                    if m is None or m["type"] != "message":
                        continue
                    if m["channel"] == beat:
                        last_beat = time.monotonic()
                    else:
                        self.apply(m["data"])
                        self.broadcast(m["data"])
            except (*ERRORS, TimeoutError) as e:
                print(f"hpc-portal ws hub: {type(e).__name__}: {e}; resubscribing", flush=True)
                if self.subscribed.is_set():  # the pages say "updates paused" until the resync
                    self.broadcast(json.dumps({"type": "status", "live": False}))
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

    def current() -> dict[str, Any]:
        """The hub's copy; before the hub has ever loaded one, Redis itself."""
        view = hub.view()
        return view if view is not None else {**snapshot(b, k), "live": True}

    @sock.route("/ws/")
    def stream(ws: Any) -> None:
        q = hub.add()
        try:
            while True:
                raw = ws.receive(timeout=0)
                while raw is not None:
                    msg = json.loads(raw)
                    if msg.get("type") == "hello":
                        snap = current()
                        if int(msg.get("last_seq", -1)) == snap["seq"]:
                            ws.send(json.dumps({"type": "uptodate", "seq": snap["seq"], "live": snap["live"]}))
                        else:
                            ws.send(json.dumps(snap))
                    raw = ws.receive(timeout=0)
                try:
                    item = q.get(timeout=0.5)
                except queue.Empty:
                    continue
                ws.send(json.dumps(current()) if item == RESYNC else item)
        except ConnectionClosed:
            pass
        except (ValueError, AttributeError, TypeError):  # not JSON, not an object, last_seq not a number
            ws.close(reason=1003, message="messages are JSON objects: {\"type\": \"hello\", \"last_seq\": N}")
        except ERRORS:  # no copy yet (the hub never subscribed) and Redis away: the client reconnects
            ws.close(reason=1011, message="state store unavailable")
        finally:
            hub.remove(q)
