"""Shared fixtures: cached runs of the real program per stack file, a tally that makes
a test fail when its checks never ran (an empty loop proves nothing), and the skip
policy: under CI=true a skip that is not listed in ALLOWED_SKIPS is an error, and so is
a missing tool that a test would otherwise quietly do without."""

from __future__ import annotations

import fnmatch
import os
import shutil
import warnings
from collections.abc import Generator, Iterator
from typing import Any

import pytest

from components.stackfile import stack_files
from offline.harness import ProgramRun, run_stack

STACKS = sorted(stack_files())
_RUNS: dict[str, ProgramRun] = {}


def program_run(stack: str, preview: bool = False, **kwargs: Any) -> ProgramRun:
    """A run of the real program, shared by every test that asks for the same inputs
    (runs are deterministic; tests only read them)."""
    import json

    key = json.dumps([stack, preview, kwargs], sort_keys=True)
    if key not in _RUNS:
        _RUNS[key] = run_stack(stack, preview=preview, **kwargs)
    return _RUNS[key]


@pytest.fixture(params=STACKS)
def stack_run(request: pytest.FixtureRequest) -> ProgramRun:
    """The program run (update mode) of every Pulumi.<stack>.yaml in the repository."""
    return program_run(request.param)


@pytest.fixture
def prod() -> ProgramRun:
    return program_run("prod")


@pytest.fixture
def dev() -> ProgramRun:
    return program_run("dev")


@pytest.fixture
def fake_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials and region for moto, and no profile or endpoint override from the
    machine's environment leaking into a test."""
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "ap-northeast-2"}.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "HPC_AWS_ENDPOINT_URL"):
        monkeypatch.delenv(k, raising=False)


class Tally:
    def __init__(self) -> None:
        self.count = 0
        self.minimum = 1

    def check(self, condition: Any, message: str = "") -> None:
        self.count += 1
        assert condition, message

    def expect(self, minimum: int) -> None:
        self.minimum = minimum


@pytest.fixture
def tally() -> Iterator[Tally]:
    t = Tally()
    yield t
    assert t.count >= t.minimum, f"only {t.count} checks ran, expected at least {t.minimum}"


# ------------------------------------------------------------------------- skip policy
#
# CI (.ci/run, and the pull-request workflow) runs the whole suite as root after
# tools/install-debian-deps.sh, so every test can run there: under CI=true a skip is a
# check that never ran, and it fails the run. The few tests that may still skip under CI
# are listed here, as fnmatch patterns of pytest node ids -> why that skip is legitimate.
# Runs without CI=true (a developer's machine, not root) skip root-only tests as before.
ALLOWED_SKIPS: dict[str, str] = {}

_UNLISTED = pytest.StashKey[list[tuple[str, str]]]()
_COLLECT_SKIPS: list[tuple[str, str]] = []  # module-level skips, seen before the session ends


def in_ci() -> bool:
    """CI=true (GitHub Actions sets it; .ci/run runs with it)."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def allowed_skip(nodeid: str) -> str | None:
    """Why `nodeid` may skip under CI, or None when it may not."""
    for pattern, why in ALLOWED_SKIPS.items():
        if fnmatch.fnmatchcase(nodeid, pattern):
            return why
    return None


def not_installed(what: str, package: str, stacklevel: int = 2) -> None:
    """A test is about to drop one of its checks because `what` is not on this machine.
    Under CI=true that fails the test (CI installs every package the tests use); elsewhere
    it is a warning in pytest's summary, never silent."""
    message = f"{what} is not installed (Debian package {package}; tools/install-debian-deps.sh installs it)"
    if in_ci():
        pytest.fail(f"{message}: under CI=true a check is never dropped for a missing tool", pytrace=False)
    warnings.warn(f"{message}: this check did not run", stacklevel=stacklevel)


def tool(name: str, package: str) -> str | None:
    """The path of a tool one check of a test needs (a command name, or an absolute path),
    or None when it is missing outside CI (see not_installed: under CI=true it fails)."""
    found = (name if os.path.exists(name) else None) if os.path.isabs(name) else shutil.which(name)
    if found is None:
        not_installed(name, package, stacklevel=3)
    return found


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_UNLISTED] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report: pytest.TestReport = yield
    if not (report.skipped and in_ci()) or hasattr(report, "wasxfail") or allowed_skip(report.nodeid):
        return report
    reason = _skip_reason(report)
    item.config.stash.setdefault(_UNLISTED, []).append((report.nodeid, reason))
    report.outcome = "failed"
    report.longrepr = (f"skipped under CI=true ({reason}), and {report.nodeid} is not in ALLOWED_SKIPS "
                       "(tests/conftest.py): CI runs as root with every Debian package the tests use, "
                       "so this skip is a check that never ran")
    return report


def pytest_collectreport(report: pytest.CollectReport) -> None:
    # A module-level skip: recorded here and failed at the end of the session (turning
    # it into a collection error would stop every other test from running).
    if report.skipped and in_ci() and not allowed_skip(report.nodeid):
        _COLLECT_SKIPS.append((report.nodeid, _skip_reason(report)))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _COLLECT_SKIPS:
        session.config.stash.setdefault(_UNLISTED, []).extend(_COLLECT_SKIPS)
        _COLLECT_SKIPS.clear()
    if session.config.stash.get(_UNLISTED, []) and session.exitstatus in (pytest.ExitCode.OK,
                                                                         pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    unlisted = config.stash.get(_UNLISTED, []) + _COLLECT_SKIPS
    if not unlisted:
        return
    terminalreporter.write_sep("=", f"skip policy: {len(unlisted)} skip(s) under CI=true not in ALLOWED_SKIPS", red=True)
    for nodeid, reason in unlisted:
        terminalreporter.write_line(f"{nodeid}: {reason}")
