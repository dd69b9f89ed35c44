"""The lmms-eval model ``embedlens``: a plan's model with one of its conditions (or none) applied inside
``generate_until`` and ``loglikelihood``, batched, with the intervention engine's greedy decoding.

    python -m lmms_eval --model embedlens --model_args plan=PLAN.yaml,condition=prune_dead --tasks pope

``model_args``: ``plan`` (required), ``condition`` (a condition of the plan; ``baseline`` or ``none`` for the
unmodified model, the default), ``source`` (replaces the model's source), ``model`` (one of the plan's
``models``), ``batch_size`` (prompts per engine run; lmms-eval's ``--batch_size`` sets it too), ``device``.

Importing this module needs lmms-eval (``pip install "embedlens[lmms]"``, then lmms-eval itself without its
dependencies: docs/benchmarks-lmms.md).
"""

from __future__ import annotations

from typing import Any, Optional

from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms

from embedlens.errors import BenchmarkError
from embedlens.lmms.bridge import Bridge, greedy_settings, prompt_sample

#: The ``model_args`` keys the plugin takes (lmms-eval adds ``batch_size``, ``max_batch_size`` and ``device``).
MODEL_ARGS = ("plan", "condition", "source", "model", "batch_size", "device")


class EmbedLensLMM(lmms):
    """lmms-eval's view of an embedlens plan: one model, one condition.

    Args:
        plan: the plan YAML (its model, partition and conditions).
        condition: the condition to apply; ``baseline`` / ``none``: the unmodified model.
        source: replaces the plan model's ``source``.
        model: one of the plan's ``models`` by name (default: the first).
        batch_size: prompts per engine run (default: the plan's ``batch_size``).
        device: replaces the plan model's ``device``.
        max_batch_size: accepted because lmms-eval always passes it; unused (batches are fixed).
        bridge: an already loaded `Bridge` (``embedlens eval`` shares one model across conditions); then
            `plan`, `source`, `model` and `device` are not read.

    Raises:
        BenchmarkError, PlanError, UnknownNameError: a bad argument, plan or condition, named.
    """

    is_simple = True

    def __init__(
        self,
        plan: Optional[str] = None,
        condition: Optional[str] = "baseline",
        source: Optional[str] = None,
        model: Optional[str] = None,
        batch_size: Optional[int | str] = None,
        device: Optional[str] = None,
        max_batch_size: Optional[int] = None,
        bridge: Optional[Bridge] = None,
    ) -> None:
        super().__init__()
        filelock_compat()
        bs = _batch_size(batch_size)
        if bridge is None:
            if not plan:
                raise BenchmarkError("model_args: plan=PLAN.yaml is required (the plan names the model and its conditions)")
            bridge = Bridge.load(str(plan), source=source, model=model, device=device, batch_size=bs)
        elif bs is not None:
            bridge.batch_size = bs
        self.bridge = bridge
        self.condition = bridge.check_condition(condition)
        self.responses: list[dict[str, Any]] = []  # what each request got (tests and embedlens eval read it)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None) -> "EmbedLensLMM":
        """``plan=...,condition=...`` -> the model; an unknown key is an error listing the keys."""
        from lmms_eval import utils

        args = utils.simple_parse_args_string(arg_string)
        unknown = [k for k in args if k not in MODEL_ARGS]
        if unknown:
            raise BenchmarkError(f"model_args: unknown key(s) {', '.join(unknown)}; the embedlens model takes {', '.join(MODEL_ARGS)}")
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k in ("batch_size", "max_batch_size", "device")}
        if "batch_size" in args:
            extra.pop("batch_size", None)  # model_args win over lmms-eval's default --batch_size 1
        if "device" in args:
            extra.pop("device", None)
        return cls(**args, **extra)

    @property
    def batch_size(self) -> int:
        return self.bridge.batch_size

    @property
    def device(self):
        return self.bridge.adapter.device

    # -- requests ---------------------------------------------------------------------------------------
    def _sample(self, request: Instance, context: str, doc_to_visual, doc_id, task: str, split: str):
        doc = self.task_dict[task][split][doc_id]
        visuals = doc_to_visual(doc) if callable(doc_to_visual) else doc_to_visual
        images = [v for v in _flat(visuals) if v is not None]
        if not images or not all(hasattr(v, "convert") for v in images):
            kinds = sorted({type(v).__name__ for v in images}) or ["none"]
            raise BenchmarkError(
                f"task {task!r} doc {doc_id}: the embedlens model takes image tasks; this document's visuals are {', '.join(kinds)}"
            )
        images = [im.convert("RGB") for im in images]
        return prompt_sample(images, context, f"{task}/{split}/{doc_id}", self.bridge.adapter.image_placeholder), doc

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy answers, `batch_size` prompts per engine run (consecutive requests with the same settings)."""
        out: list[str] = []
        i = 0
        while i < len(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = requests[i].args
            settings = greedy_settings(gen_kwargs, task)
            chunk = [requests[i]]
            while len(chunk) < self.batch_size and i + len(chunk) < len(requests):
                nxt = requests[i + len(chunk)].args
                if nxt[4] != task or greedy_settings(nxt[1], nxt[4]) != settings:
                    break
                chunk.append(requests[i + len(chunk)])
            samples = [self._sample(r, *(r.args[0], *r.args[2:]))[0] for r in chunk]
            texts = self.bridge.generate(samples, self.condition, settings)
            for r, s, t in zip(chunk, samples, texts):
                self.responses.append({"kind": "generate_until", "task": r.args[4], "doc_id": r.args[3], "sample": s.id, "question": s.question, "text": t})
            out += texts
            i += len(chunk)
        return out

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """For each request ``(negative log-likelihood, is_greedy)``: lmms-eval 0.7.3 picks a multiple-choice
        answer by the *smallest* value (``argmin``; its own models return a loss), so the bridge returns the
        negated summed log-probability of the continuation, and the choice it picks is the most likely one.

        Each pair travels inside a ``GenerationResult``: lmms-eval 0.7.3's evaluator passes every response
        through ``unwrap_generation_output``, which turns a bare ``(float, bool)`` tuple into its string
        (and the task's ``process_results`` then fails); a ``GenerationResult``'s payload passes unchanged.

        Requests with the same document and context share one prefill; `batch_size` prompts per engine run.
        """
        groups: dict[tuple, list[int]] = {}
        for k, r in enumerate(requests):
            context, target, doc_to_visual, doc_id, task, split = r.args
            groups.setdefault((task, split, doc_id, context), []).append(k)
        keys = list(groups)
        result: list[GenerationResult | None] = [None] * len(requests)
        for start in range(0, len(keys), self.batch_size):
            chunk = keys[start : start + self.batch_size]
            samples, conts = [], []
            for key in chunk:
                first = requests[groups[key][0]]
                context, _, doc_to_visual, doc_id, task, split = first.args
                sample, doc = self._sample(first, context, doc_to_visual, doc_id, task, split)
                samples.append(sample)
                conts.append([_continuation(requests[k].args[1], doc) for k in groups[key]])
            scores = self.bridge.loglikelihoods(samples, conts, self.condition)
            for key, sample, cs, sc in zip(chunk, samples, conts, scores):
                for k, c, (lp, greedy) in zip(groups[key], cs, sc):
                    result[k] = GenerationResult(text=(-lp, greedy))  # type: ignore[arg-type]  (see above)
                    self.responses.append({"kind": "loglikelihood", "task": key[0], "doc_id": key[2], "sample": sample.id,
                                           "question": sample.question, "continuation": c, "logprob": lp, "greedy": greedy})
        return result  # type: ignore[return-value]

    def generate_until_multi_round(self, requests) -> list[str]:
        raise BenchmarkError("the embedlens model does not run multi-round generation tasks; choose single-turn tasks")


def filelock_compat() -> None:
    """lmms-eval 0.7.3's ``simple_evaluate`` patches ``filelock._api.FileLockMeta`` (a workaround for nested
    ``load_dataset`` locks under filelock 3.16-3.x); filelock 4 has no ``filelock._api`` and the import fails
    before any task loads. Where that module is missing, mark the workaround as applied so evaluation runs
    (filelock 4's own singleton handling is left as it is). The model calls this when it is built, which
    lmms-eval does before it applies the workaround."""
    import importlib.util

    if importlib.util.find_spec("filelock._api") is not None:
        return
    from lmms_eval import evaluator

    fn = getattr(evaluator, "_enable_reentrant_filelocks", None)
    if fn is not None:
        fn._patched = True


def _continuation(target, doc) -> str:
    value = target if isinstance(target, str) else target(doc)
    if not isinstance(value, str):
        raise BenchmarkError(f"a loglikelihood request's continuation must be text; got {type(value).__name__} {value!r}")
    return value


def _flat(visuals) -> list:
    out = []
    for v in visuals if isinstance(visuals, (list, tuple)) else [visuals]:
        out += _flat(v) if isinstance(v, (list, tuple)) else [v]
    return out


def _batch_size(value) -> int | None:
    """lmms-eval passes ``--batch_size`` as text ("1", "auto"); the bridge takes a fixed integer."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BenchmarkError(f"batch_size: expected an integer >= 1 (the embedlens model has no automatic batch size); got {value!r}")
    return value
