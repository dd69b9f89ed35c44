"""A package's public names imported on first use (PEP 562): ``import embedlens.probes`` stays light (no torch,
no plugin module) until a name is asked for, as `validate` and `list` need.

Example:
    >>> import sys, types
    >>> pkg = types.ModuleType("pkg_demo"); sys.modules["pkg_demo"] = pkg
    >>> pkg.__getattr__ = lazy_names("pkg_demo", {"dumps": "json"})
    >>> pkg.dumps([1])
    '[1]'
    >>> "dumps" in vars(pkg)  # cached: later look-ups skip __getattr__
    True
    >>> pkg.loads
    Traceback (most recent call last):
    ...
    AttributeError: module 'pkg_demo' has no attribute 'loads'
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_names(package: str, table: dict[str, str]) -> Callable[[str], Any]:
    """The module ``__getattr__`` of `package` serving `table` (public name -> the module defining it)."""

    def __getattr__(name: str) -> Any:
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(table[name]), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
