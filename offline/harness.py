"""Run the real `__main__.py` for a stack file under strict mocks, without the Pulumi CLI.

`run_stack("prod")` loads `Pulumi.prod.yaml` (plus optional overrides and secret config),
runs the program in preview or update mode and returns every registered resource with
its inputs and resource options, and the resolved stack outputs. Used by the tests, the
offline plan (`make plan`) and the rehearsal.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import runpy
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pulumi
from pulumi.runtime import settings as pulumi_settings
from pulumi.runtime.stack import run_pulumi_func
from pulumi.runtime.sync_await import _sync_await

from components.stackfile import ROOT, project_name, read_stack
from offline.mocks import StrictMocks

# Certificate and key the tests hand to stacks that require configured TLS (prod).
TEST_SECRETS = {
    "tls_cert": "-----BEGIN CERTIFICATE-----\nTESTCERTIFICATE\n-----END CERTIFICATE-----",
    "tls_key": "-----BEGIN PRIVATE KEY-----\nTESTPRIVATEKEYVALUE\n-----END PRIVATE KEY-----",
}


@dataclass
class Res:
    type: str
    name: str
    inputs: dict[str, Any]
    id: str
    outputs: dict[str, Any]
    opts: dict[str, Any] = field(default_factory=dict)
    parent: str | None = None


@dataclass
class ProgramRun:
    stack: str
    preview: bool
    resources: list[Res]
    outputs: dict[str, Any]
    secret_outputs: set[str]
    calls: list[tuple[str, dict[str, Any]]]

    def of_type(self, typ: str) -> list[Res]:
        suffix = typ if ":" in typ else None
        return [r for r in self.resources if (r.type == suffix if suffix else r.type.endswith(":" + typ))]

    def named(self, name: str) -> Res:
        found = [r for r in self.resources if r.name == name]
        if len(found) != 1:
            raise KeyError(f"{len(found)} resources named {name}")
        return found[0]


class ProgramFailed(Exception):
    """The program raised; `registered` lists the cloud resources registered before it did."""

    def __init__(self, error: BaseException, registered: list[Any]):
        self.error = error
        self.registered = registered
        super().__init__(f"{type(error).__name__}: {error} ({len(registered)} resources registered)")


def _flatten_config(stack_config: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in stack_config.items():
        if isinstance(v, dict) and set(v) == {"secure"}:
            continue  # encrypted values cannot be read offline; tests pass their own
        out[k if ":" in k else f"{project_name()}:{k}"] = v if isinstance(v, str) else json.dumps(v)
    return out


@contextlib.contextmanager
def _env(env: dict[str, str] | None) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _resolve(value: Any) -> tuple[Any, bool]:
    out = pulumi.Output.from_input(value)
    resolved = _sync_await(out.future(with_unknowns=True))
    secret = _sync_await(out.is_secret())
    return _plain(resolved), bool(secret)


def _plain(v: Any) -> Any:
    from pulumi.output import Unknown

    if isinstance(v, Unknown):
        return "<unknown>"
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def run_stack(
    stack: str,
    *,
    preview: bool = False,
    overrides: dict[str, Any] | None = None,
    remove: tuple[str, ...] = (),
    secrets: dict[str, str] | None = None,
    stack_config: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    mocks: StrictMocks | None = None,
    program: str | None = None,
) -> ProgramRun:
    """Run `__main__.py` for `stack` under mocks. `overrides` replace project keys
    (e.g. {"roles": {...}}); `secrets` are set as secret config (default: TEST_SECRETS);
    `mocks` answer for the resources (default: the strict offline mocks; the rehearsal
    passes its own, which create them in the AWS stand-ins); `program` runs another
    file in its place (tools/bench.py times the SDK's floor with it)."""
    project = project_name()
    if stack_config is None:
        stack_config, _ = read_stack(stack)
    cfg = dict(stack_config)
    for k in remove:
        cfg.pop(f"{project}:{k}", None)
    for k, v in (overrides or {}).items():
        cfg[k if ":" in k else f"{project}:{k}"] = v
    flat = _flatten_config(cfg)
    secret_values = dict(TEST_SECRETS if secrets is None else secrets)
    secret_keys = []
    for k, v in secret_values.items():
        flat[f"{project}:{k}"] = v
        secret_keys.append(f"{project}:{k}")

    mocks = StrictMocks() if mocks is None else mocks
    # A fresh event loop per run: a run that failed must not leave tasks behind that
    # break the next one.
    old_loop = asyncio.get_event_loop_policy().get_event_loop() if _has_loop() else None
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        with _young_collections_only():
            return _run(stack, preview, project, flat, secret_keys, mocks, env, program)
    finally:
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()
        asyncio.set_event_loop(old_loop if old_loop is not None and not old_loop.is_closed() else None)


@contextlib.contextmanager
def _young_collections_only() -> Iterator[None]:
    """Python's garbage collector without its full collections while the program runs.
    A run makes millions of objects that live until it ends (resources, their outputs
    and futures); CPython collects its oldest generation again whenever a quarter more
    objects reached it, and each such collection goes over every object of the process:
    at 3,651 resources, 20 of them took a third of the offline plan's time, and their
    count and cost both grew with the resources (the SDK's floor in tools/bench.py alike).
    The young generations, where most garbage cycles die, are still collected; the first
    full collection after the run takes what the run left."""
    young, middle, old = gc.get_threshold()
    gc.set_threshold(young, middle, 1_000_000)  # full collections every 10^6 middle ones: never in a run
    try:
        yield
    finally:
        gc.set_threshold(young, middle, old)


def _has_loop() -> bool:
    try:
        asyncio.get_event_loop_policy().get_event_loop()
        return True
    except RuntimeError:
        return False


def _run(stack: str, preview: bool, project: str, flat: dict[str, str], secret_keys: list[str],
         mocks: StrictMocks, env: dict[str, str] | None, program_file: str | None = None) -> ProgramRun:
    pulumi_settings.ROOT.set(None)
    pulumi.runtime.set_all_config(flat, secret_keys)
    pulumi.runtime.set_mocks(mocks, project=project, stack=stack, preview=preview)
    captured: list[Res] = []

    def record(args: pulumi.ResourceTransformationArgs) -> None:
        o = args.opts
        parent = o.parent
        captured.append(Res(
            type=args.type_, name=args.name, inputs={}, id="", outputs={},
            opts={
                "protect": bool(o.protect),
                "ignore_changes": list(o.ignore_changes or []),
                "delete_before_replace": bool(o.delete_before_replace),
                "depends_on": [getattr(d, "_name", None) for d in (o.depends_on or [])]
                if isinstance(o.depends_on, list) else [],
                "replace_on_changes": list(o.replace_on_changes or []),
            },
            parent=getattr(parent, "_name", None) if parent is not None else None,
        ))
        return None

    pulumi.runtime.register_stack_transformation(record)  # type: ignore[arg-type]
    main = program_file or str(ROOT / "__main__.py")
    with _env(env):
        try:
            def program() -> None:
                runpy.run_path(main, run_name="__main__")

            _sync_await(run_pulumi_func(program))
        except Exception as exc:
            registered = [r for r in mocks.resources if not r.type.startswith("hpc:")]
            raise ProgramFailed(exc, registered) from exc

    root = pulumi_settings.get_root_resource()
    outputs: dict[str, Any] = {}
    secret_outputs: set[str] = set()
    for name, value in getattr(root, "outputs", {}).items():
        outputs[name], is_secret = _resolve(value)
        if is_secret:
            secret_outputs.add(name)

    # Join what the mocks saw (inputs, ids) with what the transformation saw (options).
    by_key = {(r.type, r.name): r for r in captured}
    resources: list[Res] = []
    for rec in mocks.resources:
        opts_rec = by_key.get((rec.type, rec.name))
        resources.append(Res(rec.type, rec.name, rec.inputs, rec.id, rec.outputs,
                             opts_rec.opts if opts_rec else {}, opts_rec.parent if opts_rec else None))
    missing = set(by_key) - {(r.type, r.name) for r in mocks.resources}
    if missing:
        raise AssertionError(f"resources constructed but never registered: {sorted(missing)[:5]}")
    return ProgramRun(stack, preview, resources, outputs, secret_outputs, list(mocks.calls))
