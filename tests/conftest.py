"""Shared fixtures: cached runs of the real program per stack file, and a tally that
makes a test fail when its checks never ran (an empty loop proves nothing)."""

from __future__ import annotations

from collections.abc import Iterator
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
