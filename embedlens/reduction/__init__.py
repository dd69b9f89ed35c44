"""Token reduction at matched budgets: one budget meaning shared by every method (`budget`), the methods
that choose tokens before the LLM (`attention_ranked`, `diversity`, `baselines`) and those that drop them inside
it (`fastv`, `pyramiddrop`, `dart`, `sparsevlm`, with their token accounting: `inllm`), registered as
interventions (their modules are in `embedlens.interventions.BUILTINS`)."""

from __future__ import annotations

from embedlens._lazy import lazy_names

# Public name -> module (loaded on first use, so a look-up of one method imports that method's module alone).
_LAZY = {
    "Budget": "embedlens.reduction.budget",
    "InputReduction": "embedlens.reduction.base",
}


__getattr__ = lazy_names(__name__, _LAZY)


__all__ = ["Budget", "InputReduction"]
