"""Effect metrics (found through `embedlens.registry.metrics`) and `compare`,
which runs a batch's baseline and conditions and applies them.

The public names load on first use, so that a look-up of one metric (``embedlens validate``) imports no tensor
code; the registry imports every module of `BUILTINS` when it lists the metrics.
"""

from __future__ import annotations

import importlib

#: Every module that registers a built-in metric (imported when the metric registry lists its plugins).
BUILTINS = ("embedlens.metrics.builtin",)

# Public name -> module.
_LAZY = {
    "Metric": "embedlens.metrics.base",
    "compare": "embedlens.metrics.compare",
    "prefill_flops": "embedlens.metrics.compare",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Metric", "compare", "prefill_flops"]
