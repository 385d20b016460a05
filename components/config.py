"""The stack configuration: one typed model, validated in one place.

`load_config(raw, stack=..., project=..., region=...)` turns the project's config
namespace (a plain dict, as in `Pulumi.<stack>.yaml`) into a `StackConfig`, or raises
`ConfigError` listing every problem as `key.path: value -> what is allowed`. Nothing in
this module imports Pulumi, so the program calls it before it registers any resource
and the tests, the offline plan and the rehearsal use the very same model.

  config_model.py       the typed model: profiles, roles, sizing, host groups, dataclasses
  config_validation.py  every check and the collection of the problems
  config.py             this entry point (import from here); model <- validation <- config
"""

from __future__ import annotations

from typing import Any

from .config_model import NETWORKS, ROLES, SIZING, StackConfig
from .config_validation import INSTANCE_TYPES, validate_config

__all__ = ["INSTANCE_TYPES", "NETWORKS", "ROLES", "SIZING", "ConfigError", "StackConfig", "load_config"]


class ConfigError(ValueError):
    """Invalid stack configuration. `problems` holds one line per invalid key."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(
            "invalid stack configuration:\n" + "\n".join(f"  - {p}" for p in problems)
        )


def load_config(
    raw: dict[str, Any],
    *,
    stack: str,
    project: str,
    region: str,
    configured_secrets: frozenset[str] = frozenset(),
) -> StackConfig:
    """Validate the project's config namespace. Raises ConfigError listing every problem."""
    problems, cfg = validate_config(raw, stack=stack, project=project, region=region,
                                    configured_secrets=configured_secrets)
    if cfg is None:
        raise ConfigError(problems)
    return cfg
