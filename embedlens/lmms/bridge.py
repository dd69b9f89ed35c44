"""What the lmms-eval model plugin runs, free of lmms-eval: a plan's model and conditions, fitted once,
and the two request kinds lmms-eval sends (greedy generation, continuation log-likelihoods), batched
through the intervention engine.

`Bridge` loads a plan's model the way `embedlens run` does (`embedlens.plan.preparation`), fits the
partition and any condition that needs a data-set statistic on the plan's own data (as the runner's
first passes do), and then serves any number of conditions on the same loaded model: `embedlens eval`
builds one bridge and evaluates every condition with it.
"""

from __future__ import annotations

from pathlib import Path

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import torch

from embedlens.errors import BenchmarkError, EmbedLensError, UnknownNameError

if TYPE_CHECKING:
    from embedlens.data import Sample
    from embedlens.interventions.condition import Condition
    from embedlens.interventions.engine import Engine, Outcome
    from embedlens.plan.preparation import Prepared

#: Names that mean "no condition": the unmodified model.
BASELINE_NAMES = ("baseline", "none")
#: Generation settings the engine's greedy decoding honours, and the values that keep it greedy.
GREEDY_VALUES: dict[str, tuple] = {
    "temperature": (0, 0.0, None),
    "do_sample": (False, None),
    "num_beams": (1, None),
    "num_return_sequences": (1, None),
    "repetition_penalty": (1, 1.0, None),
}
#: Settings that change nothing under greedy decoding (Hugging Face ignores them when not sampling / beaming).
IGNORED_UNDER_GREEDY = ("top_p", "top_k", "min_p", "typical_p", "length_penalty", "early_stopping", "use_cache")
#: Greedy generation length when a task does not set ``max_new_tokens``.
DEFAULT_MAX_NEW_TOKENS = 128


@dataclass(frozen=True)
class GreedySettings:
    """How long to decode and where to cut: all a greedy request may ask for."""

    max_new_tokens: int
    until: tuple[str, ...] = ()


def greedy_settings(gen_kwargs: Mapping[str, Any] | None, task: str = "?") -> GreedySettings:
    """Check a request's generation settings against greedy decoding.

    Args:
        gen_kwargs: lmms-eval's ``generation_kwargs`` of the request (the task's, or ``--gen_kwargs``).
        task: the task, for the message.

    Raises:
        BenchmarkError: a setting that asks for something other than greedy decoding (sampling,
            temperature > 0, beams, several sequences, a repetition penalty) or that is unknown.

    Example:
        >>> greedy_settings({"max_new_tokens": 4, "temperature": 0, "until": "ASSISTANT:"})
        GreedySettings(max_new_tokens=4, until=('ASSISTANT:',))
        >>> greedy_settings({"temperature": 0.7}, task="pope")
        Traceback (most recent call last):
        ...
        embedlens.errors.BenchmarkError: task 'pope': generation setting temperature=0.7 is not greedy decoding; the embedlens model decodes greedily only (temperature 0.0, do_sample False, num_beams 1, num_return_sequences 1, repetition_penalty 1.0 (or unset))
    """
    kw = dict(gen_kwargs or {})
    until = kw.pop("until", None)
    if until is None:
        until = ()
    elif isinstance(until, str):
        until = (until,)
    elif isinstance(until, (list, tuple)) and all(isinstance(u, str) for u in until):
        until = tuple(u for u in until if u)
    else:
        raise BenchmarkError(f"task {task!r}: generation setting until={until!r}: expected a string or a list of strings")
    n = kw.pop("max_new_tokens", None)
    if n is None:
        n = DEFAULT_MAX_NEW_TOKENS
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 1_000_000:
        raise BenchmarkError(f"task {task!r}: generation setting max_new_tokens={n!r}: expected an integer >= 1")
    greedy = ", ".join(f"{k} {vals[-2]}" for k, vals in GREEDY_VALUES.items()) + " (or unset)"
    for key, value in kw.items():
        if key in GREEDY_VALUES:
            allowed = GREEDY_VALUES[key]
            if value is not None and (value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool)):
                raise BenchmarkError(
                    f"task {task!r}: generation setting {key}={value!r} is not greedy decoding; "
                    f"the embedlens model decodes greedily only ({greedy})"
                )
        elif key not in IGNORED_UNDER_GREEDY:
            known = ["until", "max_new_tokens", *GREEDY_VALUES, *IGNORED_UNDER_GREEDY]
            raise BenchmarkError(
                f"task {task!r}: generation setting {key}={value!r} is not supported by the embedlens model; "
                f"it takes {', '.join(known)}"
            )
    return GreedySettings(max_new_tokens=n, until=until)


def cut_at(text: str, until: Sequence[str]) -> str:
    """The text before the first stop sequence, stripped.

    Example:
        >>> cut_at(" red circle ASSISTANT: more", ["ASSISTANT:"])
        'red circle'
    """
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text.strip()


@dataclass
class Bridge:
    """A plan's model with its partition and conditions, ready to serve lmms-eval requests.

    Build it with `Bridge.load`. ``conditions`` holds every condition of the plan (fitted on first
    use); `run` takes a condition name or ``"baseline"``/``"none"``.
    """

    prepared: "Prepared"
    engine: "Engine"
    conditions: dict[str, "Condition"]
    batch_size: int
    padding_side: str
    plan_path: str = ""
    _fitted: set[str] = field(default_factory=set)
    _partition_fitted: bool = False

    @classmethod
    def load(
        cls,
        plan: str,
        *,
        source: str | None = None,
        model: str | None = None,
        device: str | None = None,
        batch_size: int | None = None,
        overrides: Sequence[str] = (),
    ) -> "Bridge":
        """Load the plan's model (one of its `models`, by name) and build its conditions.

        Args:
            plan: path of the plan YAML.
            source: replaces the model's ``source`` (e.g. a real checkpoint for a plan written on a zoo model).
            model: which of the plan's ``models`` (default: the first, or its single ``model``).
            device: replaces the model's ``device``.
            batch_size: prompts per engine run (default: the plan's ``batch_size``).
            overrides: ``KEY=VALUE`` plan keys set before validation (``--set``; `embedlens.plan.overrides`).

        Raises:
            PlanError: the plan does not validate, or the model does not load.
            BenchmarkError: an unknown `model` name or a batch size below 1.
        """
        from embedlens.interventions.engine import Engine
        from embedlens.plan import load_plan, prepare

        loaded = load_plan(plan, overrides=tuple(overrides))
        specs = loaded.plan.model_specs()
        name = model if model is not None else next(iter(specs))
        if name not in specs:
            raise UnknownNameError.make(f"model of plan {plan}", name, specs)
        spec = specs[name]  # the plan's own object: prepare() loads from it
        if source is not None:  # a command-line path: relative to the working directory, not the plan
            local = Path(str(source)).expanduser()
            spec.source = str(local.resolve()) if local.exists() else str(source)
        if device is not None:
            spec.device = str(device)
        bs = loaded.plan.batch_size if batch_size is None else batch_size
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
            raise BenchmarkError(f"batch_size: expected an integer >= 1; got {batch_size!r}")
        prepared = prepare(loaded, model=name)
        conditions = {c.name: c for c in prepared.conditions}
        return cls(prepared, Engine(prepared.adapter), conditions, bs, loaded.plan.data.padding_side, str(plan))

    @property
    def adapter(self):
        return self.prepared.adapter

    def condition_names(self) -> list[str]:
        return list(self.conditions)

    def check_condition(self, name: str | None) -> str:
        """The condition's canonical name (``baseline`` for none); an unknown name lists the plan's."""
        if name is None or str(name).lower() in BASELINE_NAMES:
            return "baseline"
        if name not in self.conditions:
            raise UnknownNameError.make(f"condition of plan {self.plan_path}", str(name), [*self.conditions, "baseline"])
        return str(name)

    # -- the runner's first passes, on the plan's own data -----------------------------------------------
    def _plan_batches(self) -> Iterable:
        plan = self.prepared.loaded.plan
        records = self.prepared.records
        bs = plan.batch_size
        for i in range(0, len(records), bs):
            samples = []
            for r in records[i : i + bs]:
                try:
                    samples.append(r.load(plan.data.max_pixels)[0])
                except EmbedLensError:
                    continue  # the runner skips unreadable records too
            if samples:
                yield self.adapter.encode(samples, padding_side=plan.data.padding_side)

    def fit(self, condition: str) -> None:
        """Fit the partition (discovered anchors) and the condition's data-set statistics, once each."""
        seed = self.prepared.loaded.plan.seed
        part = self.prepared.partition
        if part is not None and part.needs_fit and not self._partition_fitted:
            torch.manual_seed(seed)
            part.fit(self.adapter, self._plan_batches())
        self._partition_fitted = True
        if condition != "baseline" and condition not in self._fitted:
            cond = self.conditions[condition]
            if cond.needs_fit:
                torch.manual_seed(seed)
                cond.fit(self.adapter, self._plan_batches())
            self._fitted.add(condition)

    # -- requests ---------------------------------------------------------------------------------------
    def run(self, samples: Sequence["Sample"], condition: str) -> "Outcome":
        """Prefill `samples` (prompts without answers) under `condition`, with a cache to continue from."""
        condition = self.check_condition(condition)
        self.fit(condition)
        ivs = self.conditions[condition].interventions if condition != "baseline" else ()
        batch = self.adapter.encode(list(samples), padding_side=self.padding_side)
        return self.engine.run(batch, ivs, condition=condition, groups=self.prepared.partition, cache=True)

    def generate(self, samples: Sequence["Sample"], condition: str, settings: GreedySettings) -> list[str]:
        """Greedy answers of `samples` under `condition`, decoded as embedlens's `generation` metric decodes
        them (up to EOS, special tokens dropped), then cut at the first stop sequence."""
        tok = self.adapter.tokenizer
        eos = tok.eos_token_id
        out = self.run(samples, condition)
        texts = []
        for row in out.generate(settings.max_new_tokens, eos).cpu().tolist():
            if eos is not None and eos in row:
                row = row[: row.index(eos)]
            texts.append(cut_at(tok.decode(row, skip_special_tokens=True), settings.until))
        return texts

    def loglikelihoods(self, samples: Sequence["Sample"], continuations: Sequence[Sequence[str]], condition: str) -> list[list[tuple[float, bool]]]:
        """Log-probability of each continuation after its sample's prompt, and whether greedy decoding
        would produce it: ``out[b][j]`` for continuation j of sample b.

        A continuation is tokenised as embedlens tokenises an answer (`Adapter.continuation_ids`: after the
        prompt and one space; lmms-eval's target delimiter, a space, is that space).
        """
        out = self.run(samples, condition)
        ad = self.adapter
        ids = [[ad.continuation_ids(s, c[1:] if c.startswith(" ") else c) for c in conts] for s, conts in zip(samples, continuations)]
        result: list[list[tuple[float, bool]]] = [[] for _ in samples]
        for j in range(max((len(c) for c in ids), default=0)):
            todo = [seqs[j] if j < len(seqs) else [] for seqs in ids]
            lp, greedy = out.score_with_greedy(todo)
            for b, seqs in enumerate(ids):
                if j < len(seqs):
                    result[b].append((float(lp[b]), bool(greedy[b])))
        return result


def prompt_sample(images: list, context: str, sample_id: str, placeholder: str) -> "Sample":
    """An lmms-eval request as an embedlens sample: the images first (the family's chat template places
    them), the context as the question, with any image placeholder the task wrote into it removed."""
    from embedlens.data import Sample

    text = context.replace(placeholder, "").strip() if placeholder else context.strip()
    return Sample(list(images), question=text, id=sample_id)
