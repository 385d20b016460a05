"""The one Jinja2 environment every template is rendered with.

StrictUndefined makes a missing context key an error instead of an empty string, so a
template that asks for something the program does not provide fails in the tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2

TEMPLATES = Path(__file__).parent / "templates"
SCRIPTS = Path(__file__).parent / "scripts"

_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(TEMPLATES)),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
    trim_blocks=True,
    lstrip_blocks=True,
    autoescape=False,
)
_ENV.filters["tojson_sorted"] = lambda v: json.dumps(v, sort_keys=True, indent=2)


def render_template(relpath: str, ctx: dict[str, Any]) -> str:
    """Render `cloud_init/templates/<relpath>` with the host context `ctx`."""
    return _ENV.get_template(relpath).render(**ctx)
