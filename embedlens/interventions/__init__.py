"""Interventions on visual tokens, found through `embedlens.registry.interventions`,
and the engine that applies them.

The public names load on first use, so that a look-up of one intervention (``embedlens validate``) imports that
intervention's module alone; the registry imports every module of `BUILTINS` when it lists the interventions.
"""

from __future__ import annotations

from embedlens._lazy import lazy_names


#: Every module that registers a built-in intervention, the token-reduction methods included (imported when the
#: intervention registry lists its plugins).
BUILTINS = (
    "embedlens.interventions.ablate",
    "embedlens.interventions.layers",
    "embedlens.interventions.prune",
    "embedlens.reduction.attention_ranked",
    "embedlens.reduction.baselines",
    "embedlens.reduction.diversity",
    "embedlens.reduction.dart",
    "embedlens.reduction.fastv",
    "embedlens.reduction.pyramiddrop",
    "embedlens.reduction.sparsevlm",
)

# Public name -> module.
_LAZY = {
    "Context": "embedlens.interventions.context",
    "Engine": "embedlens.interventions.engine",
    "Hook": "embedlens.interventions.hook",
    "Intervention": "embedlens.interventions.base",
    "Outcome": "embedlens.interventions.outcome",
    "RowCache": "embedlens.interventions.outcome",
    "Rows": "embedlens.interventions.context",
    "Selection": "embedlens.interventions.select",
    "attention_rows": "embedlens.attention",
}


__getattr__ = lazy_names(__name__, _LAZY)


__all__ = ["Context", "Engine", "Hook", "Intervention", "Outcome", "RowCache", "Rows", "Selection", "attention_rows"]
