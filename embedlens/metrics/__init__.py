"""Effect metrics (found through `embedlens.registry.metrics`) and `compare`,
which runs a batch's baseline and conditions and applies them.

The public names load on first use, so that a look-up of one metric (``embedlens validate``) imports no tensor
code; the registry imports every module of `BUILTINS` when it lists the metrics.
"""

from __future__ import annotations

from embedlens._lazy import lazy_names


#: Every module that registers a built-in metric (imported when the metric registry lists its plugins).
BUILTINS = ("embedlens.metrics.builtin",)

# Public name -> module.
_LAZY = {
    "Metric": "embedlens.metrics.base",
    "compare": "embedlens.metrics.compare",
    "prefill_flops": "embedlens.metrics.compare",
}


__getattr__ = lazy_names(__name__, _LAZY)


__all__ = ["Metric", "compare", "prefill_flops"]
