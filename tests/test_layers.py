"""Nothing below imports what stands above it. The layers, bottom up:

  cloud_init   pure rendering: plain values in, user-data bytes out
  components   the Pulumi program (config model, components, the stack)
  offline      the program without the cloud: strict mocks, harness, render contexts
  tools, rehearsal   on top: review tooling and the rehearsal read the program's output

Every import of every Python file of these packages (host scripts without a `.py`
suffix too) is read with `ast` and resolved to the layer it comes from; the test fails
on an import that points upwards or into tests/, and on a private name (leading
underscore) taken from another package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# layer -> the layers it may import (itself included)
ALLOWED: dict[str, set[str]] = {
    "cloud_init": {"cloud_init"},
    "components": {"components", "cloud_init"},
    "offline": {"offline", "components", "cloud_init"},
    # the policy pack's rule helpers are review tooling too (tools/aws_rules.py)
    "tools": {"tools", "offline", "components", "cloud_init", "policy"},
    "rehearsal": {"rehearsal", "offline", "components", "cloud_init"},
}
# Top-level names of the repository that an absolute import can point at.
PROJECT = set(ALLOWED) | {"tests", "policy", "examples", "conftest", "__main__"}


def _python_files(layer: str) -> list[Path]:
    files = []
    for f in sorted((ROOT / layer).rglob("*")):
        if not f.is_file() or "__pycache__" in f.parts:
            continue
        if f.suffix == ".py":
            files.append(f)
        elif not f.suffix:
            first = f.read_bytes().split(b"\n", 1)[0]
            if first.startswith(b"#!") and b"python" in first:
                files.append(f)  # a host script (cloud_init/scripts/hpc-*)
    return files


def _layer_of(f: Path) -> str:
    return f.relative_to(ROOT).parts[0]


def imports(f: Path, source: str | None = None) -> list[tuple[int, str, list[str]]]:
    """(line, the layer imported from, names imported) for every project import in `f`
    (or in `source`, standing at `f`); an import of a module next to the file (script
    style, `import cost`) is the file's own layer, anything else not in the repository
    is a library and left out."""
    tree = ast.parse(f.read_text(encoding="utf-8") if source is None else source, str(f))
    own = _layer_of(f)
    out: list[tuple[int, str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                layer = _absolute(f, alias.name)
                if layer is not None:
                    out.append((node.lineno, layer, []))
        elif isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
            if node.level:
                package = f.relative_to(ROOT).parts[:-1]
                if node.level > len(package):
                    raise AssertionError(f"{f.relative_to(ROOT)}:{node.lineno}: relative import leaves the package")
                out.append((node.lineno, own, names))
            else:
                layer = _absolute(f, node.module or "")
                if layer is not None:
                    out.append((node.lineno, layer, names))
    return out


def _absolute(f: Path, module: str) -> str | None:
    top = module.split(".")[0]
    if top in PROJECT:
        return top
    if (f.parent / f"{top}.py").exists() or (f.parent / top / "__init__.py").exists():
        return _layer_of(f)
    return None


FILES = [f for layer in ALLOWED for f in _python_files(layer)]


def test_every_layer_has_files_to_check() -> None:
    for layer in ALLOWED:
        assert any(_layer_of(f) == layer for f in FILES), f"no Python file found under {layer}/"
    assert any(f.parent.name == "scripts" and not f.suffix for f in FILES), "host scripts are checked too"


@pytest.mark.parametrize("f", FILES, ids=[str(f.relative_to(ROOT)) for f in FILES])
def test_imports_point_only_downwards(f: Path) -> None:
    own = _layer_of(f)
    wrong = [f"line {line}: imports {layer} (allowed: {', '.join(sorted(ALLOWED[own]))})"
             for line, layer, _names in imports(f) if layer not in ALLOWED[own]]
    assert not wrong, f"{f.relative_to(ROOT)}:\n" + "\n".join(wrong)


@pytest.mark.parametrize("f", FILES, ids=[str(f.relative_to(ROOT)) for f in FILES])
def test_no_private_name_is_taken_from_another_package(f: Path) -> None:
    own = _layer_of(f)
    wrong = [f"line {line}: {name} from {layer}" for line, layer, names in imports(f) if layer != own
             for name in names if name.startswith("_") and not name.startswith("__")]
    assert not wrong, f"{f.relative_to(ROOT)} uses another package's private names:\n" + "\n".join(wrong)


def test_the_checker_sees_a_wrong_import() -> None:
    """The resolver itself: libraries left out, an upward import, a private name, a
    relative import, tests."""
    probe = ROOT / "components" / "probe.py"  # never written: only its place counts
    source = ("import os\nimport yaml\nfrom offline.mocks import _hex\nfrom .config import StackConfig\n"
              "import tests.conftest\nfrom cloud_init.render import render_host\n")
    found = imports(probe, source)
    assert found == [(3, "offline", ["_hex"]), (4, "components", ["StackConfig"]), (5, "tests", []),
                     (6, "cloud_init", ["render_host"])]
    assert [layer for _line, layer, _names in found if layer not in ALLOWED["components"]] == ["offline", "tests"]
