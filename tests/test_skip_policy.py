"""The skip policy of tests/conftest.py, run on throwaway test files through pytester:
under CI=true a skip that ALLOWED_SKIPS does not list fails the session (and names the
test and its reason), a listed one does not, and a missing tool that a test would do
without fails the test; without CI the same skips stay skips."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent

CASES = '''
import os
import pytest
from tests.conftest import tool

@pytest.mark.skipif(True, reason="needs a thing this machine lacks")
def test_marked_skip():
    pass

def test_skips_in_its_body():
    pytest.skip("decided at run time")

def test_allowed_to_skip():
    pytest.skip("listed in ALLOWED_SKIPS")

def test_drops_a_check_without_its_tool():
    exe = tool("h9-no-such-checker", "h9-no-such-package")
    if exe:
        raise AssertionError("the tool cannot exist")

def test_passes():
    assert True

@pytest.mark.xfail(reason="a known failure is not a skip", strict=True)
def test_expected_failure():
    raise AssertionError
'''

# The pytester session uses the repository's conftest as a plugin, and lists one test as
# allowed (patterns match node ids, as in tests/conftest.py).
CONFTEST = '''
import tests.conftest as policy
policy.ALLOWED_SKIPS["test_cases.py::test_allowed_to_skip"] = "a listed skip"
'''


def run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: str | None, *args: str) -> pytest.RunResult:
    pytester.makepyfile(test_cases=CASES)
    pytester.makeconftest(CONFTEST)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    return pytester.runpytest_subprocess("-p", "tests.conftest", "-p", "no:cacheprovider", "-rA", *args)


def test_under_ci_an_unlisted_skip_fails_the_session_and_names_the_test(pytester, monkeypatch):
    r = run(pytester, monkeypatch, "true")
    out = r.stdout.str()
    assert r.ret == pytest.ExitCode.TESTS_FAILED, out
    # The two unlisted skips and the missing tool fail; the listed skip, the pass and
    # the xfail are untouched.
    r.assert_outcomes(passed=1, skipped=1, errors=1, failed=2, xfailed=1)
    assert "skip policy: 2 skip(s) under CI=true not in ALLOWED_SKIPS" in out
    assert "test_cases.py::test_marked_skip: needs a thing this machine lacks" in out
    assert "test_cases.py::test_skips_in_its_body: decided at run time" in out
    assert "test_allowed_to_skip: " not in out.split("skip policy:")[1]
    assert "h9-no-such-checker is not installed (Debian package h9-no-such-package" in out


def test_under_ci_listed_skips_pass(pytester, monkeypatch):
    r = run(pytester, monkeypatch, "true", "-k", "allowed or passes or expected")
    assert r.ret == pytest.ExitCode.OK, r.stdout.str()
    r.assert_outcomes(passed=1, skipped=1, xfailed=1)
    assert "skip policy" not in r.stdout.str()


def test_under_ci_one_unlisted_skip_is_enough(pytester, monkeypatch):
    r = run(pytester, monkeypatch, "true", "-k", "marked_skip or passes")
    assert r.ret == pytest.ExitCode.TESTS_FAILED, r.stdout.str()
    r.assert_outcomes(passed=1, errors=1)
    assert "skip policy: 1 skip(s)" in r.stdout.str()


def test_outside_ci_skips_stay_skips_and_a_missing_tool_warns(pytester, monkeypatch):
    for ci in (None, "false"):
        r = run(pytester, monkeypatch, ci)
        out = r.stdout.str()
        assert r.ret == pytest.ExitCode.OK, out
        r.assert_outcomes(passed=2, skipped=3, xfailed=1, warnings=1)
        assert "skip policy" not in out
        assert "h9-no-such-checker is not installed" in out and "this check did not run" in out


def test_module_level_skip_under_ci_fails_the_session(pytester, monkeypatch):
    pytester.makepyfile(test_whole_module='''
import pytest
pytest.skip("the whole module needs something", allow_module_level=True)

def test_never_runs():
    pass
''')
    r = run(pytester, monkeypatch, "true", "test_whole_module.py")
    out = r.stdout.str()
    assert r.ret == pytest.ExitCode.TESTS_FAILED, out
    assert "test_whole_module.py: the whole module needs something" in out
