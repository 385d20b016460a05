"""The policy pack: each rule of rules.py as a Pulumi policy.

Rules that judge one resource alone become ResourceValidationPolicy (reported on that
resource as soon as the engine sees it); rules that need the graph (which group a rule
belongs to, which subnet a host sits in, which bucket an encryption config serves)
become StackValidationPolicy. Both hand the same plain dicts to the same functions the
offline tests run, so a rule behaves the same in `pulumi preview --policy-pack policy`
and in `make test`.

Importing this module builds the policies; only running it (as the Pulumi CLI does)
starts the analyzer.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import rules  # noqa: E402
from pulumi_policy import (  # noqa: E402
    EnforcementLevel,
    PolicyPack,
    ReportViolation,
    ResourceValidationArgs,
    ResourceValidationPolicy,
    StackValidationArgs,
    StackValidationPolicy,
)

PACK_NAME = "hpc-portal-policies"


def plain(value: Any) -> Any:
    """Policy SDK values (proxies of secrets, mappings, sequences) as plain Python."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _name_of(urn_or_name: str | None) -> str | None:
    return urn_or_name.split("::")[-1] if urn_or_name else None


def resource_dict(resource_type: str, name: str, props: Mapping[str, Any], protect: bool,
                  parent: str | None) -> dict[str, Any]:
    p = plain(props)
    return {"type": resource_type, "name": name, "inputs": p, "opts": {"protect": bool(protect)},
            "parent": _name_of(parent), "id": p.get("id")}


def resource_validation(rule: rules.Rule):  # type: ignore[no-untyped-def]
    def validate(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
        res = resource_dict(args.resource_type, args.name, args.props, args.opts.protect, args.opts.parent)
        for v in rule.check([res]):
            report_violation(v.message, None)

    return validate


def stack_validation(rule: rules.Rule):  # type: ignore[no-untyped-def]
    def validate(args: StackValidationArgs, report_violation: ReportViolation) -> None:
        resources, urns = [], {}
        for r in args.resources:
            parent = r.parent.name if r.parent is not None else None
            resources.append(resource_dict(r.resource_type, r.name, r.props, r.opts.protect, parent))
            urns[r.name] = r.urn
        for v in rule.check(resources):
            report_violation(f"{v.resource}: {v.message}", urns.get(v.resource))

    return validate


def policies() -> list[Any]:
    out: list[Any] = []
    for rule in rules.RULES:
        if rule.scope == "resource":
            out.append(ResourceValidationPolicy(name=rule.name, description=rule.description,
                                                validate=resource_validation(rule),
                                                enforcement_level=EnforcementLevel.MANDATORY))
        else:
            out.append(StackValidationPolicy(name=rule.name, description=rule.description,
                                             validate=stack_validation(rule),
                                             enforcement_level=EnforcementLevel.MANDATORY))
    return out


POLICIES = policies()

if __name__ == "__main__":
    PolicyPack(name=PACK_NAME, enforcement_level=EnforcementLevel.MANDATORY, policies=POLICIES)
