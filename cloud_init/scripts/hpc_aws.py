"""AWS and instance-metadata calls for the host scripts, with ONE retry layer.

Installed on every host as /usr/local/lib/hpc/hpc_aws.py (common tier); the scripts in
/usr/local/sbin add that directory to sys.path. Standard library and boto3 only: the
hosts run Ubuntu 24.04 (Python 3.12, boto3 1.34) and Debian 12 (Python 3.11, boto3 1.26).

    retry(fn, deadline_s=, what=, retryable=)   call fn until it succeeds, a permanent
                                                error, or the deadline; exponential
                                                backoff with full jitter, capped
    client(service, region, endpoint)           a botocore client that does NOT retry
                                                (retry() does), with connect/read time-outs
    endpoint_url(fallback)                      $HPC_AWS_ENDPOINT_URL, /etc/hpc/aws-endpoint,
                                                then the caller's fallback (rehearsals)
    Imds(base_url)                              IMDSv2: token PUT with a TTL, cached,
                                                fetched again on 401; every read retried

Why one layer: botocore's own retries (standard mode: 3 attempts, legacy: 5) multiply
with a script's loop, and still do not cover what a boot or a failover waits for: an
IMDS that is not answering yet, a parameter the program has not written yet, the
DescribeAddresses -> AssociateAddress pair of an Elastic IP takeover. Here a call site
names a deadline (how long its caller can wait) instead of a number of attempts, and a
multi-call sequence is retried as a unit by passing the whole sequence as `fn`.

Retried: throttling, 5xx / ServiceUnavailable / InternalError, connection errors and
time-outs, credentials not there yet (the instance profile right after boot), NotYet,
and the error codes the caller names in `retryable` ("not yet" answers such as
ParameterNotFound). Never retried: anything else (AccessDenied, UnauthorizedOperation,
validation errors, ...): those fail at once with CallFailed naming the call.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Collection
from typing import Any, TypeVar

T = TypeVar("T")

AWS_ENDPOINT_FILE = "/etc/hpc/aws-endpoint"
IMDS_URL_FILE = "/etc/hpc/imds-url"
DEFAULT_IMDS_URL = "http://169.254.169.254"

# Backoff: the n-th wait is uniform(0, min(CAP, BASE * 2**n)) ("full jitter"), so the
# waits stay short (a few seconds) and hosts retrying together spread out.
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 4.0

# Per-request time-outs of the AWS clients: a call that hangs must not eat the deadline.
CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 10.0

THROTTLING = frozenset({
    "RequestLimitExceeded", "Throttling", "ThrottlingException", "TooManyRequestsException",
    "RequestThrottled", "RequestThrottledException", "ThrottledException", "SlowDown",
    "EC2ThrottledException", "PriorRequestNotComplete", "ProvisionedThroughputExceededException",
})
TRANSIENT = frozenset({
    "ServiceUnavailable", "ServiceUnavailableException", "Unavailable", "InternalError",
    "InternalFailure", "InternalServerError", "InternalServerErrorException", "RequestTimeout",
    "RequestTimeoutException",
})

_logger = logging.getLogger("hpc_aws")


# --- errors ----------------------------------------------------------------------------

class NotYet(Exception):
    """Raised by a caller's fn for a state that another attempt may find changed (a
    parameter not written yet, ...). Always retried until the deadline."""

    def __init__(self, code: str, message: str = "", **details: Any) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.details = details


class CallFailed(Exception):
    """`what` failed for good: a permanent error, or retryable errors until the deadline.
    The last error is `cause` (also __cause__)."""

    def __init__(self, what: str, cause: BaseException, *, attempts: int, elapsed_s: float,
                 permanent: bool, deadline_s: float) -> None:
        self.what, self.cause, self.attempts = what, cause, attempts
        self.elapsed_s, self.permanent, self.deadline_s = elapsed_s, permanent, deadline_s
        why = ("not retryable" if permanent else
               f"still failing after {attempts} attempts in {elapsed_s:.1f} s (deadline {deadline_s:.0f} s)")
        message = error_message(cause)
        op = getattr(cause, "operation_name", "")  # the call of a multi-call unit that failed
        super().__init__(f"{what}: {op + ' failed: ' if op else ''}{describe(cause)}"
                         f"{': ' + message if message else ''} ({why})")

    @property
    def code(self) -> str:
        return error_code(self.cause)


class ImdsError(Exception):
    """IMDS answered with a permanent error (403: IMDS or tokens disabled, 404, ...)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ImdsUnavailable(Exception):
    """IMDS did not answer (connection refused, time-out, 5xx): retried."""


def error_code(exc: BaseException) -> str:
    """The AWS error code of a botocore ClientError (or NotYet), else ""."""
    if isinstance(exc, NotYet):
        return exc.code
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", "") or "")
    return ""


def error_message(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Message", "") or "")
    return "" if isinstance(exc, NotYet) else str(exc)


def describe(exc: BaseException) -> str:
    """Class and AWS error code, e.g. "ClientError ThrottlingException" (no message:
    log lines about secrets must not carry more than that)."""
    code = error_code(exc)
    name = type(exc).__name__
    if code and name == code and not isinstance(exc, NotYet):
        name = "ClientError"  # botocore's modelled subclass (ssm.exceptions.ParameterNotFound, ...)
    return f"{name}{' ' + code if code else ''}"


def _http_status(exc: BaseException) -> int:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        try:
            return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        except (TypeError, ValueError):
            return 0
    return 0


def is_retryable(exc: BaseException, retryable: Collection[str] = ()) -> bool:
    """Whether another attempt may succeed (see the module docstring)."""
    if isinstance(exc, (NotYet, ImdsUnavailable)):
        return True
    if isinstance(exc, ImdsError):
        return False
    code = error_code(exc)
    if code:
        return code in THROTTLING or code in TRANSIENT or code in retryable or _http_status(exc) >= 500
    try:
        from botocore import exceptions as bce
    except ImportError:  # IMDS-only use without boto3
        bce = None  # type: ignore[assignment]
    if bce is not None:
        transient_botocore = (
            bce.ConnectionError,  # EndpointConnectionError, ConnectTimeoutError, ConnectionClosedError, ...
            bce.HTTPClientError,  # ReadTimeoutError and other failures to get a response
            bce.NoCredentialsError,  # the instance profile is not ready in the first seconds of a boot
            bce.PartialCredentialsError,
            bce.CredentialRetrievalError,
        )
        if isinstance(exc, transient_botocore):
            return True
        if isinstance(exc, bce.BotoCoreError):
            return False  # NoRegionError, ParamValidationError, ...: configuration errors
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code >= 500 or exc.code == 429
    return isinstance(exc, (TimeoutError, socket.timeout, ConnectionError, urllib.error.URLError))


# --- the retry helper ------------------------------------------------------------------

def _now() -> float:
    return time.monotonic()


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def retry(
    fn: Callable[[], T],
    *,
    deadline_s: float,
    what: str,
    retryable: Collection[str] = (),
    max_attempts: int | None = None,
    base_s: float = BACKOFF_BASE_S,
    cap_s: float = BACKOFF_CAP_S,
    log: Callable[[str], None] | None = None,
    sleep: Callable[[float], None] | None = None,
    clock: Callable[[], float] | None = None,
    rng: random.Random | None = None,
) -> T:
    """fn() until it returns, raises a permanent error, or `deadline_s` seconds passed.

    The first attempt always runs; a new one starts only while time is left (its wait is
    cut to what is left), so the last attempt starts no later than the deadline; a call
    in flight then is bounded by the client's time-outs. `max_attempts` optionally caps
    the attempts too. Raises CallFailed (from the last error).
    """
    now = clock or _now
    pause = sleep or _sleep
    say = log or _logger.warning
    uniform = (rng or random).uniform
    start = now()
    end = start + deadline_s
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            elapsed = now() - start
            if not is_retryable(exc, retryable):
                raise CallFailed(what, exc, attempts=attempt, elapsed_s=elapsed, permanent=True,
                                 deadline_s=deadline_s) from exc
            left = end - now()
            if left <= 0 or (max_attempts is not None and attempt >= max_attempts):
                raise CallFailed(what, exc, attempts=attempt, elapsed_s=elapsed, permanent=False,
                                 deadline_s=deadline_s) from exc
            delay = min(uniform(0, min(cap_s, base_s * 2 ** (attempt - 1))), left)
            say(f"{what}: attempt {attempt} failed ({describe(exc)}); retrying in {delay:.1f} s, "
                f"{left:.0f} s left")
            pause(delay)


# --- AWS clients -----------------------------------------------------------------------

def read_override(env_name: str, path: str) -> str | None:
    """$env_name, else the first line of `path`, else None."""
    value = os.environ.get(env_name, "").strip()
    if not value:
        try:
            with open(path, encoding="utf-8") as f:
                value = f.read().strip()
        except FileNotFoundError:
            value = ""
    return value or None


def endpoint_url(fallback: str | None = None, path: str = AWS_ENDPOINT_FILE) -> str | None:
    """The AWS endpoint override: $HPC_AWS_ENDPOINT_URL, else `path`, else `fallback`
    (a config file's aws_endpoint_url); None means AWS's own. Passed to boto3
    explicitly: boto3 before 1.28 ignores AWS_ENDPOINT_URL."""
    return read_override("HPC_AWS_ENDPOINT_URL", path) or fallback or None


IMDS_CREDENTIALS_TIMEOUT_S = 4
IMDS_CREDENTIALS_ATTEMPTS = 2


def client_config(botocore_attempts: int = 1, connect_timeout: float = CONNECT_TIMEOUT_S,
                  read_timeout: float = READ_TIMEOUT_S) -> Any:
    from botocore.config import Config

    return Config(connect_timeout=connect_timeout, read_timeout=read_timeout,
                  retries={"mode": "standard", "total_max_attempts": botocore_attempts})


def client(service: str, region: str | None, endpoint: str | None = None, *, botocore_attempts: int = 1,
           connect_timeout: float = CONNECT_TIMEOUT_S, read_timeout: float = READ_TIMEOUT_S) -> Any:
    """A boto3 client of its own session (a session that found no credentials caches
    that), retries off unless `botocore_attempts` says otherwise (only for calls that
    retry() cannot repeat, such as a streamed upload)."""
    import boto3
    import botocore.session

    core = botocore.session.get_session()
    # The instance profile's credentials come from IMDS through botocore's own fetcher:
    # 1 s and one attempt by default, so an IMDS that answers 2 s late (a loaded host,
    # the ec2-api drill) left every call without credentials. Two attempts of 4 s each.
    core.set_config_variable("metadata_service_timeout", IMDS_CREDENTIALS_TIMEOUT_S)
    core.set_config_variable("metadata_service_num_attempts", IMDS_CREDENTIALS_ATTEMPTS)
    return boto3.session.Session(botocore_session=core).client(
        service, region_name=region, endpoint_url=endpoint,
        config=client_config(botocore_attempts, connect_timeout, read_timeout))


# --- IMDSv2 ----------------------------------------------------------------------------

def imds_url(path: str = IMDS_URL_FILE) -> str:
    """$HPC_IMDS_URL, else `path`, else 169.254.169.254."""
    return (read_override("HPC_IMDS_URL", path) or DEFAULT_IMDS_URL).rstrip("/")


class Imds:
    """Instance metadata over IMDSv2: every request carries a session token (PUT
    /latest/api/token with a TTL), cached until shortly before it expires and fetched
    again when IMDS answers 401 (expired). No IMDSv1 fallback. Each read is retried
    (connection errors, time-outs, 5xx, 429) under `deadline_s`; each attempt waits
    twice as long as the one before (from `timeout_s`, never past the deadline), so a
    hung IMDS costs little and a slow one (answers seconds late under load) still gets
    through instead of timing out on every attempt."""

    def __init__(self, base_url: str | None = None, *, deadline_s: float = 10.0, timeout_s: float = 2.0,
                 token_ttl_s: int = 300, log: Callable[[str], None] | None = None,
                 sleep: Callable[[float], None] | None = None, clock: Callable[[], float] | None = None) -> None:
        self.base = (base_url or imds_url()).rstrip("/")
        self.deadline_s, self.timeout_s, self.token_ttl_s = deadline_s, timeout_s, token_ttl_s
        self._log, self._sleep, self._clock = log, sleep, clock
        self._token: str | None = None
        self._token_expires = 0.0

    def _now(self) -> float:
        return (self._clock or _now)()

    def _http(self, method: str, path: str, headers: dict[str, str], timeout_s: float | None = None) -> str:
        req = urllib.request.Request(f"{self.base}{path}", method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout_s or self.timeout_s) as resp:
                return str(resp.read().decode("utf-8").strip())
        except urllib.error.HTTPError as e:
            if e.code >= 500 or e.code == 429:
                raise ImdsUnavailable(f"{method} {path}: HTTP {e.code}") from e
            raise ImdsError(f"{method} {path}: HTTP {e.code}", e.code) from e
        except (urllib.error.URLError, OSError) as e:  # refused, unreachable, timed out
            raise ImdsUnavailable(f"{method} {path}: {getattr(e, 'reason', e)}") from e

    def _new_token(self, timeout_s: float | None = None) -> str:
        token = self._http("PUT", "/latest/api/token",
                           {"X-aws-ec2-metadata-token-ttl-seconds": str(self.token_ttl_s)}, timeout_s)
        if not token:
            raise ImdsError("IMDS returned an empty token")
        self._token = token
        self._token_expires = self._now() + self.token_ttl_s - min(30, self.token_ttl_s / 2)
        return token

    def token(self, timeout_s: float | None = None) -> str:
        if self._token is None or self._now() >= self._token_expires:
            return self._new_token(timeout_s)
        return self._token

    def _get_once(self, path: str, timeout_s: float | None = None) -> str:
        url = f"/latest/{path}"
        try:
            value = self._http("GET", url, {"X-aws-ec2-metadata-token": self.token(timeout_s)}, timeout_s)
        except ImdsError as e:
            if e.status != 401:
                raise
            self._token = None  # expired or revoked: one fresh token, then the read again
            value = self._http("GET", url, {"X-aws-ec2-metadata-token": self.token(timeout_s)}, timeout_s)
        if not value:
            raise ImdsError(f"IMDS returned nothing for {path}")
        return value

    def get(self, path: str, deadline_s: float | None = None) -> str:
        """A metadata value, e.g. get("meta-data/instance-id")."""
        deadline = self.deadline_s if deadline_s is None else deadline_s
        end = self._now() + deadline
        attempt = [0]

        def once() -> str:
            attempt[0] += 1
            left = max(0.1, end - self._now())
            return self._get_once(path, min(self.timeout_s * 2 ** (attempt[0] - 1), left))

        try:
            return retry(once, deadline_s=deadline, what=f"IMDS {path}", log=self._log, sleep=self._sleep,
                         clock=self._clock)
        except CallFailed as e:
            raise ImdsError(str(e), getattr(e.cause, "status", None)) from e

    def meta(self, path: str) -> str:
        return self.get(f"meta-data/{path}")

    def instance_id(self) -> str:
        return self.meta("instance-id")

    def region(self) -> str:
        return self.meta("placement/region")

    def availability_zone(self) -> str:
        return self.meta("placement/availability-zone")

    def mac(self) -> str:
        return self.meta("mac")

    def interface_id(self, mac: str | None = None) -> str:
        """The network interface id of `mac` (default: the primary interface)."""
        return self.meta(f"network/interfaces/macs/{mac or self.mac()}/interface-id")
