"""Token reduction at matched budgets: one budget meaning shared by every method (`budget`), the methods
that choose tokens before the LLM (`attention_ranked`, `diversity`, `baselines`) and those that drop them inside
it (`fastv`, `pyramiddrop`, `dart`, `sparsevlm`, with their token accounting: `inllm`), registered as
interventions."""

from embedlens.reduction import attention_ranked  # noqa: F401 - registers fastervlm, visionzip, vispruner
from embedlens.reduction import baselines  # noqa: F401 - registers random_budget, partition_budget
from embedlens.reduction import diversity  # noqa: F401 - registers divprune, cdpruner
from embedlens.reduction import dart, fastv, pyramiddrop, sparsevlm  # noqa: F401 - registers the in-LLM methods
from embedlens.reduction.base import InputReduction
from embedlens.reduction.budget import Budget

__all__ = ["Budget", "InputReduction"]
