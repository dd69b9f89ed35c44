"""The ``llm.layers[i].experts`` site on Qwen3-VL-MoE, GLM-4.5V and Llama 4 (Gemma 4's is proved in test_gemma4.py).

Against a computation by hand: each sparse layer's router weights applied to the hidden states its block receives
(a hook on the block's input in Hugging Face's own forward), then the family's rule written out here (Qwen3-VL-MoE:
top-k of the softmax; Llama 4: top-k of the logits; GLM-4.5V: top-k of the sigmoid plus the correction bias, within the best ``topk_group`` groups
ranked by their two best scores). GLM-4.5V runs on a variant of ``tiny:glm4v_moe`` with 8 experts in 4 groups, 3 kept
from the best 2 groups and a random correction bias, so group choice, bias and top-k within the groups all decide.
"""

from __future__ import annotations

import re

import pytest
import torch

from conftest import hf_run
from embedlens.adapters import load_model, wrap_model
from embedlens.adapters.base import resolve_path
from embedlens.api import probe
from embedlens.data import Sample
from embedlens.errors import AdapterError
from embedlens.interventions import Engine
from embedlens.interventions.prune import Prune
from embedlens.probes._util import visual_rows
from embedlens.sites import Site
from embedlens.testing.images import noise, shapes
from embedlens.testing.tiny import _glm4v_moe
from embedlens.tracing import collect
from tests.support.hf_testers import BLOCK_TESTER_CONFIGS


def _glm_variant():
    model, processor = _glm4v_moe(0)
    cfg = model.config
    cfg.text_config.n_routed_experts, cfg.text_config.n_group, cfg.text_config.topk_group = 8, 4, 2
    cfg.text_config.num_experts_per_tok = 3
    torch.manual_seed(1)
    model = type(model)(cfg).eval()
    for layer in model.model.language_model.layers[cfg.text_config.first_k_dense_replace:]:
        layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(8) * 0.05)
    return wrap_model(model, processor)


@pytest.fixture(scope="module", params=["qwen3_vl_moe", "qwen3_vl_moe-tester", "glm4v_moe", "llama4", "llama4-tester"])
def moe(request):
    """tiny:qwen3_vl_moe (layers 1 and 3 sparse, 2 of 4 experts), HF's Qwen3-VL-MoE tester configuration (every layer
    sparse, 4 of 8), the GLM-4.5V variant above, tiny:llama4 (layers 1 and 3 sparse, 1 of 4 experts) and HF's Llama 4
    tester configuration (both layers sparse, 1 of 16; its processor at up to 4 tiles, not 16, for which the two
    test prompts happen to come out equally long)."""
    if request.param.endswith("-tester"):
        adapter = wrap_model(*BLOCK_TESTER_CONFIGS[request.param.removesuffix("-tester")].build(0))
        if adapter.name == "llama4":
            adapter.processor.image_processor.max_patches = 4
        return adapter
    return load_model(f"tiny:{request.param}") if request.param != "glm4v_moe" else _glm_variant()


def _samples():
    return [Sample([shapes(64, seed=1)], question="what is it?", id="a"),
            Sample([noise(40, 70, seed=2)], question="count the shapes, then name the largest one", id="b")]


def _by_hand(adapter, x: torch.Tensor, layer: int) -> torch.Tensor:
    """`[rows, k]` expert ids of the rows `x` ([..., d], the sparse block's input) in LLM layer `layer`."""
    text = adapter.config.get_text_config()
    gate = _router(adapter, layer)
    logits = x.reshape(-1, x.shape[-1]).float() @ gate.weight.float().T  # [rows, experts]
    k = text.num_experts_per_tok
    if adapter.name == "llama4":  # Llama4Router: top-k of its logits (their sigmoid weighs the chosen experts)
        return logits.topk(k, dim=-1).indices
    if adapter.name == "qwen3_vl_moe":
        return logits.softmax(-1).topk(k, dim=-1).indices
    scores = logits.sigmoid() + gate.e_score_correction_bias  # GLM-4.5V
    grouped = scores.view(len(scores), text.n_group, -1)  # [rows, groups, experts per group]
    best = grouped.topk(2, dim=-1).values.sum(-1).topk(text.topk_group, dim=-1).indices
    kept = torch.zeros(grouped.shape[:2], dtype=torch.bool).scatter(1, best, True)
    return grouped.masked_fill(~kept[..., None], float("-inf")).flatten(1).topk(k, dim=-1).indices


def _router(adapter, layer: int) -> torch.nn.Module:
    return resolve_path(resolve_path(adapter.model, adapter.paths.llm_layers)[layer], adapter.paths.router)


def _block_inputs(adapter, run) -> dict[int, torch.Tensor]:
    """Each sparse layer's block input during `run()` (its last call), from a hook on the model's own modules."""
    layers = resolve_path(adapter.model, adapter.paths.llm_layers)
    seen: dict[int, torch.Tensor] = {}
    hooks = [resolve_path(layers[i], adapter.paths.mlp).register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0].detach()))
             for i in adapter.expert_layers]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return seen


def _sets(ids: torch.Tensor) -> torch.Tensor:
    return ids.sort(-1).values


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_site_is_the_routers_top_k_computed_by_hand(moe, padding_side):
    """At batch 2 with padding: ``llm.layers[i].experts`` is `[batch, seq, k]` and, at every position (the visual
    tokens among them), the set of experts the router's weights pick from the block's input by the family's rule."""
    batch = moe.encode(_samples(), padding_side=padding_side)
    assert batch.roles.padding.any()
    layers = moe.expert_layers
    acts = collect(moe, batch, [f"llm.layers[{i}].experts" for i in layers])
    inputs = _block_inputs(moe, lambda: moe.model(**moe.model_inputs(batch)))
    bsz, seq = batch.input_ids.shape
    k, vis = moe.config.get_text_config().num_experts_per_tok, batch.roles.visual
    for i in layers:
        got = acts[Site("llm.layers", i, "experts")]
        assert got.shape == (bsz, seq, k) and got.dtype == torch.long
        want = _by_hand(moe, inputs[i], i).reshape(bsz, seq, k)
        assert torch.equal(_sets(got[vis]), _sets(want[vis])), i
        assert torch.equal(_sets(got), _sets(want)), i
        assert len(_sets(got[vis]).unique(dim=0)) > 1  # the visual tokens are not all routed alike: the check bites


def test_dense_layers_refuse_the_site_naming_the_sparse_ones(moe):
    text = moe.config.text_config
    if moe.expert_layers == list(range(moe.n_llm_layers)):  # the testers: every layer sparse, none to refuse
        if moe.name == "llama4":
            assert text.moe_layers == list(range(moe.n_llm_layers))
        else:
            assert text.decoder_sparse_step == 1 and not text.mlp_only_layers
        return
    sparse = {"qwen3_vl_moe": [1, 3], "glm4v_moe": [1, 2, 3], "llama4": [1, 3]}[moe.name]
    assert moe.expert_layers == sparse
    with pytest.raises(AdapterError, match=re.escape(f"layer 0 of {moe.name} is dense (a plain MLP, no router); "
                                                     f"the .experts site applies to layers {sparse}")):
        moe.resolve("llm.layers[0].experts")
    assert moe.resolve("llm.layers[-1].experts") == Site("llm.layers", 3, "experts")


def test_prune_recomputes_routing_on_the_shortened_sequence(moe):
    """Pruning a different number of visual tokens per sample: in every sparse layer the engine routes each kept
    token to the experts computed by hand from HF's run of the shortened sequence at the original positions; and
    some kept tokens go elsewhere than in the unpruned run (read at the site), so routing was recomputed."""
    batch = moe.encode(_samples(), padding_side="left")
    vis = batch.roles.visual
    rank = vis.long().cumsum(1) - 1  # each visual token's place among its sample's
    dead = vis & (rank % torch.tensor([[2], [3]]) == 0)  # every other one in sample 0, every third in sample 1
    assert int(dead[0].sum()) != int(dead[1].sum()) > 0
    keep = ~dead & ~batch.roles.padding
    eng = Engine(moe)
    layers = resolve_path(moe.model, moe.paths.llm_layers)
    routed: dict[int, torch.Tensor] = {}
    k = moe.config.get_text_config().num_experts_per_tok
    # the ids each router picks: its third output, or (Llama 4's, which returns (scores, logits)) the top-k logits
    ids = (lambda o: o[1].topk(k, dim=-1).indices) if moe.name == "llama4" else (lambda o: o[2])
    hooks = [_router(moe, i).register_forward_hook(lambda m, a, o, i=i: routed.__setitem__(i, ids(o)))
             for i in moe.expert_layers]
    try:
        out = eng.run(batch, [Prune(tokens="dead")], groups={"dead": dead}.__getitem__)
    finally:
        for h in hooks:
            h.remove()
    full = collect(moe, batch, [f"llm.layers[{i}].experts" for i in moe.expert_layers])
    embeds = eng.embed(batch)
    width, moved = int(out.counts["rows"][moe.expert_layers[0]].max()), 0
    for b in range(2):
        n = int(keep[b].sum())
        cut = _block_inputs(moe, lambda: hf_run(moe, batch, b, keep[b], embeds))
        for i in moe.expert_layers:
            assert int(out.counts["rows"][i][b]) == n
            mine = _sets(routed[i].view(2, width, -1)[b, :n])  # the engine packs each sample's rows left
            assert torch.equal(mine, _sets(_by_hand(moe, cut[i], i))), (b, i)
            moved += int((mine != _sets(full[Site("llm.layers", i, "experts")][b][keep[b]])).any(-1).sum())
    assert moved > 0


def test_a_probe_reads_each_visual_tokens_routing(moe):
    """`visual_rows` gives the site as one multi-hot row per visual token (1 at its experts); ``token_clusters`` on it
    with as many clusters as there are distinct routings (planted: counted by hand) finds exactly those groups."""
    samples = _samples()
    batch = moe.encode(samples, padding_side="right")
    i = moe.expert_layers[-1]
    site = moe.resolve(f"llm.layers[{i}].experts")
    inputs = _block_inputs(moe, lambda: moe.model(**moe.model_inputs(batch)))
    vt = batch.roles.visual_tokens()
    want = _by_hand(moe, inputs[i], i).reshape(*batch.input_ids.shape, -1)[vt["sample"], vt["position"]]  # [tokens, k]
    rows = visual_rows(moe, site, collect(moe, batch, [site])[site], vt)
    hot = torch.zeros(len(want), moe.n_experts).scatter(1, want, 1.0)
    assert rows.shape == (int(batch.roles.visual.sum()), moe.n_experts) and torch.equal(rows, hot)
    patterns, counts = hot.unique(dim=0, return_counts=True)
    df = probe(moe, "token_clusters", samples, batch_size=2, padding_side="right", site=str(site),
               n_clusters=len(patterns), normalize=False)
    assert sorted(df["size"].tolist()) == sorted(counts.tolist())
