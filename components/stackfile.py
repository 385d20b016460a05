"""Read a `Pulumi.<stack>.yaml` the way the Pulumi CLI hands it to the program.

Used by the tests, the offline plan and the rehearsal to run the real program for a
stack without the CLI. Secure values (`secure: v1:...`) count as configured secrets.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from .config import StackConfig
    from .topology import Topology

ROOT = Path(__file__).resolve().parent.parent


def project_name() -> str:
    return str(yaml.safe_load((ROOT / "Pulumi.yaml").read_text())["name"])


def stack_files() -> dict[str, Path]:
    return {p.name[len("Pulumi."):-len(".yaml")]: p for p in sorted(ROOT.glob("Pulumi.*.yaml"))}


def read_stack(stack: str, path: Path | None = None) -> tuple[dict[str, Any], set[str]]:
    """Return (full config {ns:key: value}, secret keys) of a stack file."""
    path = path or ROOT / f"Pulumi.{stack}.yaml"
    doc = yaml.safe_load(path.read_text()) or {}
    config: dict[str, Any] = dict(doc.get("config") or {})
    secrets = {k for k, v in config.items() if isinstance(v, dict) and set(v) == {"secure"}}
    return config, secrets


def namespace(config: dict[str, Any], ns: str) -> dict[str, Any]:
    return {k.split(":", 1)[1]: v for k, v in config.items() if k.split(":", 1)[0] == ns}


def overlay_config(raw: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """The project keys of a stack with `overlay` laid over them: a key the overlay sets
    replaces the stack's, except mappings, which are merged one level deep (an overlay's
    slurm.nodes keeps the stack's slurm.cluster_name)."""
    out = dict(raw)
    for k, v in overlay.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def load_stack(stack: str, overlay: dict[str, Any] | None = None) -> tuple[StackConfig, Topology]:
    """A stack file's validated config and topology, as the program builds them, for
    tools that run without the CLI. Secret config counts as set (its values are not
    readable offline); the certificate counts as configured, as prod requires.
    `overlay` (project keys) is laid over the stack's, see overlay_config."""
    from .config import load_config
    from .topology import build_topology

    config, secrets = read_stack(stack)
    project = project_name()
    configured = frozenset(k.split(":", 1)[1] for k in secrets) | {"tls_cert", "tls_key"}
    raw = overlay_config(namespace(config, project), overlay or {})
    cfg = load_config(raw, stack=stack, project=project,
                      region=config.get("aws:region", "ap-northeast-2"), configured_secrets=configured)
    return cfg, build_topology(cfg)
