"""Import a file that is not a package module: a host script under cloud_init/scripts
(no .py suffix; installed as /usr/local/sbin/<name>) or a tool under tools/.

The module is registered in sys.modules under its name (dataclasses and pickling look
their module up there) and no bytecode is written next to the file.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "cloud_init" / "scripts"
TOOLS = ROOT / "tools"


def load_file(path: Path, name: str | None = None) -> ModuleType:
    name = name or path.name.removesuffix(".py").replace("-", "_")
    if path.parent == SCRIPTS and str(SCRIPTS) not in sys.path:
        # host scripts import hpc_aws, which lands next to them on the host's sys.path
        sys.path.append(str(SCRIPTS))
    loader = importlib.machinery.SourceFileLoader(name, str(path))
    spec = importlib.util.spec_from_loader(name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    saved, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = saved
    return module


def load_script(name: str) -> ModuleType:
    """A host script from cloud_init/scripts, e.g. load_script("hpc-fetch-secrets")."""
    return load_file(SCRIPTS / name)


def load_tool(name: str) -> ModuleType:
    """A tool from tools/, e.g. load_tool("rolling")."""
    return load_file(TOOLS / f"{name}.py")
