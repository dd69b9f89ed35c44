"""The lmms-eval bridge: embedlens conditions scored by benchmarks' own metrics.

- `embedlens.lmms.model.EmbedLensLMM`: the lmms-eval model ``embedlens`` (``--model embedlens
  --model_args plan=PLAN.yaml,condition=NAME``); found through the entry point in `embedlens.lmms.plugin`.
- `embedlens.lmms.bridge.Bridge`: the plan's model and conditions serving lmms-eval's requests (no lmms-eval import).
- `embedlens.lmms.evaluate.run_eval`: ``embedlens eval``, every condition on every task, one table, a chart, a report.
- `embedlens.lmms.tasks`: the local tasks shipped for offline use (``embedlens_pope``, ``embedlens_pope_mc``,
  ``embedlens_synqa``).

Only `model` and `evaluate` import lmms-eval (``pip install "embedlens[lmms]"``: docs/benchmarks-lmms.md).
"""

from embedlens.lmms.plugin import MODEL_NAME, register
from embedlens.lmms.tasks import LOCAL_TASKS, TASKS_DIR

__all__ = ["LOCAL_TASKS", "MODEL_NAME", "TASKS_DIR", "register"]
