"""Import a file of `scripts/` as a module in tests (the scripts are not a package)."""

import importlib.util
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def load_script(name: str):
    """Import `scripts/<name>.py` as module `<name>` (registered in `sys.modules`, which dataclasses with
    postponed annotations need to resolve their types)."""
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
