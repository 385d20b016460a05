"""The Redis master, found through Sentinel the careful way.

redis-py's own `Sentinel.discover_master` asks the Sentinels in turn and takes the FIRST
answer: one Sentinel with a stale view (partitioned, or restarted from an old config)
sends every client to the old master. And a master that is paused (a VM stall, SIGSTOP)
accepts TCP connections but never answers: without a socket time-out a client waits
forever. So here:

- every Sentinel is asked at once (each with a socket time-out), and the address that a
  MAJORITY of the configured Sentinels reports wins as soon as a majority has answered
  it; no majority, no master. Asked one after another, a paused Sentinel (it runs on the
  paused master's host) cost every discovery its whole time-out, and threads queue
  behind discovery (measured: freeze-redis answered sessions again after 4 s but kept
  failing some until 8 s);
- the winner is checked with ROLE on the master itself (a demoted master says "slave");
- every connection has a connect and a read time-out, and redis-py's automatic retries
  are off, so one call fails within its time-out and the caller answers 503;
- a connection or time-out error forgets the master: the next call discovers again
  (after a Sentinel failover the new master is found within one request); one
  discovery runs at a time, and the threads that waited for one that failed fail with
  it instead of each running their own. Only the
  client that failed is forgotten: a thread whose command on the old master times out
  after another thread found the new one leaves the new one in place.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

T = TypeVar("T")
ERRORS = (redis.RedisError, OSError)
# A lease in Redis (the websocket poller's, the job reconciler's). KEYS: the lease key;
# ARGV: my id, ttl ms. Take the lead if free, renew it if mine.
LEAD = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0
"""

# Delete the key only if it still holds this holder's value.
RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
SUBMIT_LOCK_MS = 15000  # a submission's lock on its request id; renewed every third of it


class NoMaster(redis.ConnectionError):
    """No master that a majority of the Sentinels agrees on and that says it is one."""


def _client(host: str, port: int, password: str, timeout: float, **kw: Any) -> redis.Redis:
    return redis.Redis(host=host, port=port, password=password or None, socket_timeout=timeout,
                       socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0), decode_responses=True, **kw)


class SentinelMaster:
    def __init__(self, sentinels: tuple[tuple[str, int], ...], name: str, password: str = "",
                 sentinel_password: str = "", timeout: float = 1.0) -> None:
        if not sentinels:
            raise ValueError("no Sentinels configured")
        self.sentinels, self.name, self.timeout = sentinels, name, timeout
        self.password, self.sentinel_password = password, sentinel_password
        self._lock = threading.Lock()
        self._master: redis.Redis | None = None
        self._failed: tuple[float, str] = (-1.0, "")  # when the last discovery failed, and why
        self.address: tuple[str, int] | None = None

    def _ask(self, host: str, port: int) -> str:
        s = _client(host, port, self.sentinel_password, self.timeout)
        try:
            addr = s.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name)
            return f"{addr[0]}:{addr[1]}" if addr else "error: unknown master name"
        except ERRORS as e:
            return f"error: {type(e).__name__}: {e}"
        finally:
            s.close()

    def ask_sentinels(self, majority: bool = False) -> dict[str, str]:
        """Each Sentinel's answer, "host:port" or "error: ..." (for logs and tests), all
        asked at once. With `majority`, it returns as soon as one address has a majority
        of the configured Sentinels (the others' answers are "pending"; their threads end
        within the socket time-out)."""
        need = len(self.sentinels) // 2 + 1
        pool = ThreadPoolExecutor(max_workers=len(self.sentinels), thread_name_prefix="sentinel")
        try:
            try:
                futures = {pool.submit(self._ask, host, port): f"{host}:{port}" for host, port in self.sentinels}
            except RuntimeError:  # the interpreter is exiting (a worker's last health check): ask in turn
                return {f"{host}:{port}": self._ask(host, port) for host, port in self.sentinels}
            answers = {name: "pending" for name in futures.values()}
            left = set(futures)
            while left:
                done, left = wait(left, timeout=self.timeout * 2 + 1, return_when=FIRST_COMPLETED)
                if not done:
                    break
                for f in done:
                    answers[futures[f]] = f.result()
                votes = Counter(a for a in answers.values() if not a.startswith(("error", "pending")))
                if majority and votes and votes.most_common(1)[0][1] >= need:
                    break
            return answers
        finally:
            pool.shutdown(wait=False)

    def discover(self) -> redis.Redis:
        answers = self.ask_sentinels(majority=True)
        votes = Counter(a for a in answers.values() if not a.startswith(("error", "pending")))
        need = len(self.sentinels) // 2 + 1
        if not votes or votes.most_common(1)[0][1] < need:
            raise NoMaster(f"no master reported by {need} of {len(self.sentinels)} Sentinels: {answers}")
        addr = votes.most_common(1)[0][0]
        host, _, port = addr.rpartition(":")
        master = _client(host, int(port), self.password, self.timeout, health_check_interval=0)
        try:
            role = master.execute_command("ROLE")
        except ERRORS:
            master.close()
            raise
        if not role or role[0] != "master":
            master.close()
            raise NoMaster(f"{addr}, reported by the Sentinels, says ROLE {role[0] if role else '?'}")
        self.address = (host, int(port))
        return master

    def master(self) -> redis.Redis:
        """The master, discovered if none is known: one discovery at a time, and one that
        fails answers every thread that waited for it. Each thread running its own after
        the one before failed made them queue: during a failover a discovery takes up to
        the socket time-out twice (the Sentinels still name the paused master, ROLE on it
        times out), and with 64 threads per process requests waited 5-9 s in that queue
        and then succeeded all at once (freeze-galera, data-1 both writer and master)."""
        asked = time.monotonic()
        with self._lock:
            if self._master is None:
                failed_at, why = self._failed
                if failed_at >= asked:
                    raise NoMaster(f"{why} (the discovery this call waited for)")
                try:
                    self._master = self.discover()
                except ERRORS as e:
                    self._failed = (time.monotonic(), f"{type(e).__name__}: {e}")
                    raise
            return self._master

    def forget(self, failed: redis.Redis | None = None) -> None:
        """Drop the master; the next call discovers again. With `failed`, only if that
        client is still the one in use (another thread may have found the new master
        since `failed` was handed out). Only the idle connections are closed: another
        thread may be in the middle of a command on one of this client's connections,
        and closing it under that thread makes redis-py raise ValueError ("I/O operation
        on closed file"), which no caller expects (a 500 in the rehearsal's redis drill).
        A connection in use goes when its thread lets it go."""
        with self._lock:
            if failed is not None and self._master is not failed:
                failed.connection_pool.disconnect(inuse_connections=False)
                return
            if self._master is not None:
                self._master.connection_pool.disconnect(inuse_connections=False)
            self._master, self.address = None, None

    def call(self, fn: Callable[[redis.Redis], T]) -> T:
        """fn(master); a connection error, time-out, READONLY (a demoted master) or
        NOREPLICAS (a master cut from its replicas: min-replicas-to-write refuses writes
        there, while the Sentinels of the majority elect another) forgets the master and
        is raised: the caller fails fast, the next call discovers again."""
        client = self.master()
        try:
            return fn(client)
        except (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError, OSError):
            self.forget(client)
            raise
        except redis.ResponseError as e:
            if str(e).startswith("NOREPLICAS"):
                self.forget(client)
            raise


class SubmitLock:
    """One submission per request id at a time, across servers and the job reconciler:
    the key portal:submit:<request id>, set if absent (LEAD) and renewed by a thread of
    its holder every third of SUBMIT_LOCK_MS, released (only by its holder) when the
    submission ends. A server that dies mid-submission frees the request id within
    SUBMIT_LOCK_MS; a slow sbatch keeps it. (It was one SET NX EX 90: in the az drill a
    client whose server died with the lock got 409 for 47 s until the drill ended, while
    Slurm held the job.) If a renewal fails (Redis failing over) the key may lapse during
    the submission; a second attempt then looks the request id up in squeue first, as
    every attempt does. `with SubmitLock(...) as held:` - held is False when another
    holder has it."""

    def __init__(self, master: SentinelMaster, request_id: str, owner: str) -> None:
        self.master, self.key = master, f"portal:submit:{request_id}"
        self.me = f"{owner}:{uuid.uuid4().hex[:12]}"
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def _lead(self) -> bool:
        return bool(self.master.call(lambda r: r.eval(LEAD, 1, self.key, self.me, SUBMIT_LOCK_MS)))

    def __enter__(self) -> bool:
        if not self._lead():
            return False

        def renew() -> None:
            while not self.stop.wait(SUBMIT_LOCK_MS / 3000):
                try:
                    self._lead()
                except ERRORS:
                    pass  # the next renewal tries again; see the class docstring
        self.thread = threading.Thread(target=renew, daemon=True, name="submit-lock")
        self.thread.start()
        return True

    def __exit__(self, *exc: object) -> None:
        if self.thread is None:
            return
        self.stop.set()
        self.thread.join(5)
        try:
            self.master.call(lambda r: r.eval(RELEASE, 1, self.key, self.me))
        except ERRORS:
            pass  # it lapses within SUBMIT_LOCK_MS
