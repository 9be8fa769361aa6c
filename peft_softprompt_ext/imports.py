"""The single gate for optional packages: ask here whether one is installed, import it through `require`."""

from __future__ import annotations

import functools
import importlib
import importlib.util
from types import ModuleType

# package -> the extra of peft-softprompt-ext that installs it
OPTIONAL = {
    "deepspeed": "deepspeed",
    "gguf": "app",
    "trl": "clients",
    "lm_eval": "clients",
    "matplotlib": "bench",
}


@functools.cache
def is_available(package: str) -> bool:
    """Whether `package` can be imported (looked up without importing it)."""
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def require(package: str, why: str) -> ModuleType:
    """Import an optional package, or fail with the pip command that installs it."""
    if not is_available(package):
        extra = OPTIONAL.get(package)
        hint = f'pip install "peft-softprompt-ext[{extra}]"' if extra else f"pip install {package}"
        raise ModuleNotFoundError(f"{why} needs the optional package {package!r}: {hint}", name=package)
    return importlib.import_module(package)
