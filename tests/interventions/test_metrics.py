"""Effect metrics against independent computations with the Hugging Face model."""

from __future__ import annotations

import dataclasses

import torch

from conftest import get_adapter, hf_run
from embedlens.adapters.base import resolve_path
from embedlens.data import Sample
from embedlens.interventions import Engine
from embedlens.interventions.condition import Condition
from embedlens.metrics import compare, prefill_flops
from embedlens.metrics.builtin import AnswerLogprob, ForcedChoice, Generation, NextTokenKL, PrefillFlops, VisualTokens
from embedlens.testing.images import noise, shapes

CANDIDATES = ["red circle", "blue", "two", "a green square"]


def answered() -> list[Sample]:
    return [
        Sample([shapes(64, seed=1)], question="what is it?", answer="a red circle", id="a", meta={"candidates": CANDIDATES}),
        Sample([noise(40, 70, seed=2)], question="what colour is the square?", answer="blue", id="b", meta={"candidates": CANDIDATES[:3]}),
        Sample([shapes(48, seed=3)], question="count", answer="two", id="c", meta={"candidates": CANDIDATES}),
    ]


def teacher_forced(adapter, sample: Sample, text: str) -> float:
    """log p(text | prompt) from one HF forward over prompt + text."""
    s = dataclasses.replace(sample, answer=text)
    batch = adapter.encode([s])
    with torch.no_grad():
        logits = adapter.model(**adapter.model_inputs(batch), position_ids=adapter.position_ids(batch.inputs)).logits[0]
    pos = batch.roles.answer[0].nonzero().flatten()
    ids = adapter.continuation_ids(sample, text)
    pos = pos[: len(ids)]  # PaliGemma's suffix ends with EOS, which is not part of the answer
    assert batch.input_ids[0, pos].tolist() == ids
    logp = logits.double().log_softmax(-1)
    return float(logp[pos - 1, batch.input_ids[0, pos]].sum())


NOOP = Condition("noop", [])
PRUNE = Condition.build("prune_half", [{"name": "prune", "params": {"tokens": "visual and index % 2 == 0"}}])


def test_answer_logprob_and_rank(adapter):
    samples = answered()
    table = compare(Engine(adapter), samples, [NOOP, PRUNE], [AnswerLogprob()])
    assert table["condition"] == ["noop"] * 3 + ["prune_half"] * 3
    for i, s in enumerate(samples):
        ref = teacher_forced(adapter, s, s.answer)
        assert abs(table["logprob_base"][i] - ref) < 1e-4
        assert abs(table["logprob"][i] - ref) < 1e-4  # the no-op condition
        assert table["logprob_delta"][i] == table["logprob"][i] - table["logprob_base"][i]
    batch = adapter.encode([dataclasses.replace(s, answer=None) for s in samples])
    with torch.no_grad():
        logits = adapter.model(**adapter.model_inputs(batch), position_ids=adapter.position_ids(batch.inputs)).logits
    last = batch.roles.last_index
    for i, s in enumerate(samples):
        first = adapter.continuation_ids(s, s.answer)[0]
        row = logits[i, last[i]]
        assert table["rank_base"][i] == int((row > row[first]).sum()) + 1


def test_kl_is_zero_for_noop_and_matches_hand_cut_for_pruning(adapter):
    samples = answered()
    eng = Engine(adapter)
    table = compare(eng, samples, [NOOP, PRUNE], [NextTokenKL()], padding_side="right")
    assert table["kl"][:3] == [0.0, 0.0, 0.0]
    batch = adapter.encode([dataclasses.replace(s, answer=None) for s in samples], padding_side="right")
    embeds = eng.embed(batch)
    drop = batch.roles.visual & (torch.where(batch.roles.visual, batch.roles.visual.long().cumsum(1) - 1, -1) % 2 == 0)
    for b in range(3):
        full = ~batch.roles.padding[b]
        outs = [hf_run(adapter, batch, b, keep, embeds).logits[0, -1].double().log_softmax(-1)
                for keep in (full, full & ~drop[b])]
        p, q = outs
        ref = float((p.exp() * (p - q)).sum())
        assert abs(table["kl"][3 + b] - ref) < 1e-6 * max(1.0, ref) + 1e-7


def test_forced_choice_matches_independent_scoring(adapter):
    samples = answered()
    table = compare(Engine(adapter), samples, [NOOP], [ForcedChoice()])
    for i, s in enumerate(samples):
        cands = s.meta["candidates"]
        scores = [teacher_forced(adapter, s, c) for c in cands]
        best = cands[max(range(len(cands)), key=scores.__getitem__)]
        assert table["choice_base"][i] == best == table["choice"][i]
        assert table["correct_base"][i] == float(best.replace("a ", "") == s.answer.replace("a ", ""))


def test_generation_matches_hf_generate(adapter):
    samples = answered()
    table = compare(Engine(adapter), samples, [NOOP], [Generation(max_new_tokens=4)], padding_side="left")
    tok = adapter.tokenizer
    for i, s in enumerate(samples):
        batch = adapter.encode([dataclasses.replace(s, answer=None)])
        with torch.no_grad():
            ids = adapter.model.generate(**adapter.model_inputs(batch), max_new_tokens=4, do_sample=False)
        new = ids[0, batch.input_ids.shape[1] :].tolist()
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id)]
        assert table["text_base"][i] == tok.decode(new, skip_special_tokens=True).strip() == table["text"][i]
        assert table["exact_base"][i] == float(table["text_base"][i].lower() == s.answer.lower())


def test_visual_tokens_and_flops():
    adapter = get_adapter("llava-clip")
    samples = answered()
    eng = Engine(adapter)
    table = compare(eng, samples, [NOOP, PRUNE], [VisualTokens(), PrefillFlops()], padding_side="right")
    n_vis = 16  # a 4x4 patch grid per image
    for b in range(3):
        assert [table[f"visual_tokens_l{i}"][b] for i in range(4)] == [n_vis] * 4
        assert [table[f"visual_tokens_l{i}"][3 + b] for i in range(4)] == [n_vis // 2] * 4
    # flops against the closed form for a causal model
    batch = adapter.encode([dataclasses.replace(s, answer=None) for s in samples], padding_side="right")
    layer = resolve_path(adapter.model, adapter.paths.llm_layers)[0]
    weights = sum(p.numel() for n, p in layer.named_parameters() if n.endswith("proj.weight"))
    cfg = adapter.model.config.text_config
    width = cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads)
    for b in range(3):
        t = int((~batch.roles.padding[b]).sum())
        for col, n in (("flops_base", t), ("flops", t - n_vis // 2)):
            ref = 4 * (2 * n * weights + 4 * (n * (n + 1) // 2) * width)
            assert table[col][3 + b] == ref
        assert abs(table["flops_saved"][3 + b] - (1 - table["flops"][3 + b] / table["flops_base"][3 + b])) < 1e-12
    assert prefill_flops(eng.run(batch)).tolist() == table["flops_base"][3:]


def test_decoding_passes_the_cache_under_the_installed_transformers_name(adapter):
    """transformers 5.24 renamed a decoder layer's ``past_key_values`` to ``cache`` (the old name warns, and goes in
    5.40): the engine reads the name off the layer's signature, so decoding raises no deprecation warning on either."""
    import functools
    import inspect
    import warnings

    from embedlens.interventions.engine import cache_kwarg

    eng = Engine(adapter)
    expect = "cache" if "cache" in inspect.signature(eng.layers[0].forward).parameters else "past_key_values"
    assert eng.cache_kwarg == expect
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        compare(eng, answered()[:2], [NOOP], [Generation(max_new_tokens=3), ForcedChoice()], padding_side="left")

    class Old(torch.nn.Module):
        def forward(self, x, past_key_values=None, use_cache=False):
            return x

    class New(torch.nn.Module):
        def forward(self, x, cache=None, use_cache=False):
            return x

    def renamed(f):  # a deprecation wrapper as transformers writes it: the new signature behind functools.wraps
        @functools.wraps(f)
        def wrapper(*args, **kwargs):
            return f(*args, **kwargs)

        return wrapper

    New.forward = renamed(New.forward)
    assert cache_kwarg(Old()) == "past_key_values" and cache_kwarg(New()) == "cache"
