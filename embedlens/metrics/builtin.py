"""The built-in effect metrics."""

from __future__ import annotations

import re
import string
from typing import TYPE_CHECKING, Sequence

from embedlens.errors import InputError
from embedlens.metrics.base import Metric
from embedlens.registry import metrics

if TYPE_CHECKING:
    from embedlens.data import Sample
    from embedlens.interventions.engine import Outcome

NAN = float("nan")


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, squeeze spaces (VQA-style).

    Example:
        >>> normalize_answer("  A Red circle. ")
        'red circle'
    """
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


@metrics.register("next_token_kl")
class NextTokenKL(Metric):
    """KL(baseline || condition) of the next-token distribution at the answer position.

    Example:
        >>> NextTokenKL()
        NextTokenKL()
    """

    def compute(self, baseline, condition, samples):
        p = baseline.last_logits().double().log_softmax(-1)
        q = condition.last_logits().double().log_softmax(-1)
        kl = (p.exp() * (p - q)).sum(-1)
        return {"kl": kl.cpu().tolist()}


def _answer_ids(outcome: "Outcome", samples: Sequence["Sample"]) -> list[list[int]]:
    ad = outcome.engine.adapter
    return [ad.continuation_ids(s, s.answer) if s.answer else [] for s in samples]


@metrics.register("answer_logprob")
class AnswerLogprob(Metric):
    """Answer log-probability under each run, its change, and the answer's first-token rank.

    The rank is taken at the answer position (1 = top). Samples without an
    answer get NaN.

    Example:
        >>> AnswerLogprob()
        AnswerLogprob()
    """

    needs_cache = True

    def measure(self, outcome, samples):
        ids = _answer_ids(outcome, samples)
        lp = outcome.score(ids).tolist()
        logits = outcome.last_logits()
        ranks = [int((logits[b] > logits[b, seq[0]]).sum()) + 1 if seq else NAN for b, seq in enumerate(ids)]
        return {"logprob": [v if ids[b] else NAN for b, v in enumerate(lp)], "rank": ranks}

    def compute(self, baseline, condition, samples):
        out = self.both(baseline, condition, samples)
        out["logprob_delta"] = [c - b for b, c in zip(out["logprob_base"], out["logprob"])]
        return out


@metrics.register("forced_choice")
class ForcedChoice(Metric):
    """Accuracy of picking the answer among the sample's candidate answers.

    Each candidate is scored by its log-probability as a continuation of the
    prompt (mean per token with `length_normalize`). Candidates come from the
    sample's `meta[key]` (a list of strings); samples without get NaN.

    Args:
        key: the sample meta key holding the candidate answers.
        length_normalize: score candidates by their mean log-probability per token instead of the sum.

    Example:
        >>> ForcedChoice(key="choices").key
        'choices'
    """

    needs_cache = True

    def __init__(self, key: str = "candidates", length_normalize: bool = False):
        self.key, self.length_normalize = key, length_normalize

    def _candidates(self, samples) -> list[list[str]]:
        out = []
        for s in samples:
            c = s.meta.get(self.key)
            if c is not None and (not isinstance(c, list) or not all(isinstance(x, str) for x in c) or not c):
                raise InputError(f"sample {s.id!r}: {self.key} must be a non-empty list of strings; got {c!r}")
            out.append(c or [])
        return out

    def measure(self, outcome, samples):
        import torch

        ad = outcome.engine.adapter
        cands = self._candidates(samples)
        n = max((len(c) for c in cands), default=0)
        scores = torch.full((len(samples), n), float("-inf"), dtype=torch.float64)
        for j in range(n):
            ids = [ad.continuation_ids(s, c[j]) if j < len(c) else [] for s, c in zip(samples, cands)]
            lp = outcome.score(ids)
            if self.length_normalize:
                lp = lp / torch.tensor([max(len(x), 1) for x in ids], dtype=torch.float64)
            for b, c in enumerate(cands):
                if j < len(c):
                    scores[b, j] = lp[b]
        choice, correct = [], []
        for b, (s, c) in enumerate(zip(samples, cands)):
            if not c:
                choice.append(None)
                correct.append(NAN)
                continue
            pick = c[int(scores[b].argmax())]
            choice.append(pick)
            correct.append(float(s.answer is not None and normalize_answer(pick) == normalize_answer(s.answer)))
        return {"choice": choice, "correct": correct}

    def compute(self, baseline, condition, samples):
        return self.both(baseline, condition, samples)


@metrics.register("generation")
class Generation(Metric):
    """Greedy generation with exact-match and contains accuracy against the answer.

    Args:
        max_new_tokens: tokens generated per sample (1..4096).

    Example:
        >>> Generation(max_new_tokens=5).max_new_tokens
        5
    """

    needs_cache = True

    def __init__(self, max_new_tokens: int = 16):
        if not 1 <= max_new_tokens <= 4096:
            raise InputError(f"max_new_tokens: must be in 1..4096; got {max_new_tokens}")
        self.max_new_tokens = max_new_tokens

    def measure(self, outcome, samples):
        tok = outcome.engine.adapter.tokenizer
        eos = tok.eos_token_id
        texts, exact, contains = [], [], []
        for s, row in zip(samples, outcome.generate(self.max_new_tokens, eos).cpu().tolist()):
            if eos is not None and eos in row:
                row = row[: row.index(eos)]
            text = tok.decode(row, skip_special_tokens=True).strip()
            texts.append(text)
            if s.answer is None:
                exact.append(NAN)
                contains.append(NAN)
                continue
            a, g = normalize_answer(s.answer), normalize_answer(text)
            exact.append(float(a == g))
            contains.append(float(bool(a) and a in g))
        return {"text": texts, "exact": exact, "contains": contains}

    def compute(self, baseline, condition, samples):
        return self.both(baseline, condition, samples)


@metrics.register("visual_tokens")
class VisualTokens(Metric):
    """Image tokens processed per LLM layer (one column per layer, and their mean).

    Example:
        >>> VisualTokens()
        VisualTokens()
    """

    descriptive = ("visual_tokens_mean",)

    def compute(self, baseline, condition, samples):
        counts = condition.counts["visual"]  # [layers, batch]
        out = {f"visual_tokens_l{i}": counts[i].tolist() for i in range(counts.shape[0])}
        out["visual_tokens_mean"] = counts.double().mean(0).tolist()
        out["visual_tokens_mean_base"] = baseline.counts["visual"].double().mean(0).tolist()
        return out


@metrics.register("prefill_flops")
class PrefillFlops(Metric):
    """Estimated LLM prefill FLOPs of each run and the fraction the condition saves.

    Example:
        >>> PrefillFlops()
        PrefillFlops()
    """

    descriptive = ("flops", "flops_saved")

    def compute(self, baseline, condition, samples):
        from embedlens.metrics.compare import prefill_flops

        base, cond = prefill_flops(baseline), prefill_flops(condition)
        saved = [(1.0 - c / b) if b > 0 else NAN for b, c in zip(base.tolist(), cond.tolist())]
        return {"flops_base": base.tolist(), "flops": cond.tolist(), "flops_saved": saved}


@metrics.register("prefill_time")
class PrefillTime(Metric):
    """Measured LLM prefill time, the interventions' own selection time and peak memory, with the baseline's.

    Each run is timed by the engine (`embedlens.interventions.timing`): ``prefill_ms`` from the LLM's input
    embeddings to its final norm (attention rows recorded while a layer runs, e.g. FastV's, are part of it),
    ``select_ms`` inside the interventions' own code (`setup`, `edit_embeds`, attention read ahead of a layer,
    `before_layer`); on a GPU by CUDA events, on the CPU by process CPU time. A run is timed per batch; each
    sample's value is the batch's time divided by its samples, so means over samples are per-sample costs. ``peak_mem_mb`` is the GPU allocator's
    peak during the run (NaN on the CPU, which has no such counter). The first run of a batch (the baseline)
    also warms caches: compare conditions with each other, and with the baseline over many batches.

    Example:
        >>> PrefillTime()
        PrefillTime()
    """

    descriptive = ("prefill_ms", "select_ms", "peak_mem_mb")

    def measure(self, outcome, samples):
        t = outcome.stopwatch.read()
        n = max(len(samples), 1)
        return {"prefill_ms": [t.get("prefill_ms", NAN) / n] * len(samples), "select_ms": [t.get("select_ms", 0.0) / n] * len(samples),
                "peak_mem_mb": [t["peak_mem_mb"]] * len(samples)}

    def compute(self, baseline, condition, samples):
        out = self.both(baseline, condition, samples)
        out.pop("select_ms_base", None)  # the baseline selects nothing
        return out


__all__ = ["AnswerLogprob", "ForcedChoice", "Generation", "NextTokenKL", "PrefillFlops", "PrefillTime", "VisualTokens"]
