"""Intervention effects over a run: running means and standard errors, and which condition is whose control."""

from __future__ import annotations

from embedlens.interventions.condition import Condition
from embedlens.state import Stateful


class EffectSummary(Stateful):
    """Running mean and standard error of every numeric metric column, per condition (NaN skipped)."""

    def __init__(self):
        self.sums: dict[str, dict[str, list[float]]] = {}

    def load_state_dict(self, state: dict) -> None:
        """The saved sums, checked: ``{condition: {column: [sum, sum of squares, count]}}``, numbers, count >= 1."""
        from embedlens.state import CheckpointError

        sums = state.get("sums") if isinstance(state, dict) and set(state) == {"sums"} else None
        if not isinstance(sums, dict):
            raise CheckpointError(f"effect summary: the saved state is {state!r:.80}; expected {{'sums': {{condition: {{column: [sum, sum of squares, n]}}}}}}")
        for cond, cols in sums.items():
            if not isinstance(cond, str) or not isinstance(cols, dict):
                raise CheckpointError(f"effect summary.sums[{cond!r}]: expected a mapping of metric columns")
            for col, acc in cols.items():
                ok = (isinstance(col, str) and isinstance(acc, list) and len(acc) == 3
                      and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in acc)
                      and isinstance(acc[2], int) and acc[2] >= 1 and not acc[1] < 0)
                if not ok:
                    raise CheckpointError(f"effect summary.sums[{cond!r}][{col!r}]: {acc!r:.80}; expected [sum, sum of squares >= 0, n >= 1]")
        self.sums = sums

    def add(self, table: dict[str, list]) -> None:
        for i, cond in enumerate(table["condition"]):
            acc = self.sums.setdefault(cond, {})
            for col, values in table.items():
                v = values[i]
                if col in ("sample", "condition") or isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
                    continue
                s = acc.setdefault(col, [0.0, 0.0, 0])
                s[0] += float(v)
                s[1] += float(v) * float(v)
                s[2] += 1

    def stats(self) -> dict[str, dict[str, dict[str, float]]]:
        out: dict[str, dict[str, dict[str, float]]] = {}
        for cond, cols in self.sums.items():
            for col, (s, ss, n) in cols.items():
                mean = s / n
                var = max(0.0, ss / n - mean * mean) * n / (n - 1) if n > 1 else 0.0
                out.setdefault(cond, {})[col] = {"mean": mean, "sem": (var / n) ** 0.5, "n": n}
        return out

    def result(self) -> dict[str, dict[str, float]]:
        return {c: {k: v["mean"] for k, v in cols.items()} for c, cols in self.stats().items()}


def summary_rows(stats: dict[str, dict[str, dict[str, float]]], controls: dict[str, str]) -> dict[str, list]:
    """The ``effects_summary`` table: one row per condition and metric column of `EffectSummary.stats`."""
    rows: dict[str, list] = {"condition": [], "metric": [], "mean": [], "sem": [], "n": [], "control": []}
    for cond, cols in stats.items():
        for metric, st in cols.items():
            rows["condition"].append(cond)
            rows["metric"].append(metric)
            rows["mean"].append(st["mean"])
            rows["sem"].append(st["sem"])
            rows["n"].append(st["n"])
            # "" where a condition has no matched control, never a missing cell: a missing cell compares
            # unequal to itself (pandas), so two runs' tables would differ there whatever they computed
            rows["control"].append(controls.get(cond, ""))
    return rows


def _family(iv) -> tuple[str, ...] | None:
    """What kind of removal an intervention makes, so a control pairs only with its own kind."""
    from embedlens.interventions.ablate import Ablate
    from embedlens.interventions.prune import Prune, PruneRandomMatched

    if isinstance(iv, (Prune, PruneRandomMatched)):
        return ("prune", str(iv.mode))
    if isinstance(iv, Ablate):
        return ("ablate", str(iv.value), str(iv.site))
    return None


def budget_of(iv) -> int | float | None:
    """A token-reduction method's budget: its ``keep`` parameter (tokens per image, or a fraction), else None."""
    keep = getattr(iv, "keep", None)
    return keep if isinstance(keep, (int, float)) and not isinstance(keep, bool) else None


def budget_per(iv) -> str:
    """What one budget of `iv` covers (``image`` or ``frame``, `embedlens.reduction.budget`); ``image`` for a method
    without ``per``."""
    return str(getattr(iv, "per", "image"))


def matched_controls(conditions: list[Condition]) -> dict[str, str]:
    """``{condition: its matched random control}``: a one-intervention condition removing tokens X, paired
    with a one-intervention condition drawing as many at random with ``target: X`` (same kind and mode); and a
    one-intervention condition with a budget (``keep``), paired with the condition keeping as many tokens at
    random (an intervention whose class sets ``budget_control = True``) at the same ``keep`` and the same ``per``
    (a budget per frame of a video is paired with random tokens drawn frame by frame)."""
    from embedlens.interventions.ablate import AblateRandomMatched
    from embedlens.interventions.prune import PruneRandomMatched

    subjects: dict[tuple, str] = {}
    for c in conditions:
        if len(c.interventions) == 1:
            iv = c.interventions[0]
            fam = _family(iv)
            if fam is not None and not isinstance(iv, (PruneRandomMatched, AblateRandomMatched)):
                subjects.setdefault((*fam, str(iv.tokens)), c.name)
    out = {}
    for c in conditions:
        if len(c.interventions) == 1 and isinstance(c.interventions[0], (PruneRandomMatched, AblateRandomMatched)):
            iv = c.interventions[0]
            key = (*_family(iv), str(iv.target))
            if key in subjects:
                out.setdefault(subjects[key], c.name)
    at_budget: dict[tuple, str] = {}
    for c in conditions:
        if len(c.interventions) == 1 and getattr(type(c.interventions[0]), "budget_control", False):
            keep = budget_of(c.interventions[0])
            if keep is not None:
                at_budget.setdefault((type(keep), keep, budget_per(c.interventions[0])), c.name)
    for c in conditions:
        if len(c.interventions) == 1 and c.name not in out and not getattr(type(c.interventions[0]), "budget_control", False):
            keep = budget_of(c.interventions[0])
            key = (type(keep), keep, budget_per(c.interventions[0]))
            if keep is not None and key in at_budget:
                out[c.name] = at_budget[key]
    return out
