"""The routing check both mixture-of-experts families' tests make after `prune`: each sparse block's router sees
exactly the tokens present, and routes each as in HF's run of the shortened sequence at the original positions."""

from __future__ import annotations

import torch

from embedlens.adapters.base import resolve_path
from embedlens.interventions import Engine
from embedlens.interventions.prune import Prune
from tests.conftest import hf_run


def assert_routing_follows_pruned_sequence(moe, batch, sparse_layers: list[int]) -> None:
    """Prune every third visual token of `batch` (two samples) and compare each sparse layer's (token, expert)
    choices, read from its router (`mlp.gate`, whose output's third item is the top-k ids), with HF's."""
    eng = Engine(moe)
    dead = batch.roles.visual & (torch.arange(batch.input_ids.shape[1]) % 3 == 0)
    layers = resolve_path(moe.model, moe.paths.llm_layers)
    sparse = [i for i, layer in enumerate(layers) if hasattr(layer.mlp, "gate")]
    assert sparse == sparse_layers
    seen: dict[int, list] = {i: [] for i in sparse}
    hooks = [layers[i].mlp.gate.register_forward_hook(lambda m, a, o, i=i: seen[i].append(o[2])) for i in sparse]
    try:
        out = eng.run(batch, [Prune(tokens="dead")], groups={"dead": dead}.__getitem__)
        engine_routes = {i: seen[i].pop() for i in sparse}
        keep = ~dead & ~batch.roles.padding
        embeds = eng.embed(batch)
        refs = []
        for b in range(2):
            hf_run(moe, batch, b, keep[b], embeds)  # HF on the cut sequence: its routes land in `seen`
            refs.append({i: seen[i].pop() for i in sparse})
    finally:
        for h in hooks:
            h.remove()
    rows = out.counts["rows"]
    width = int(rows[1].max())
    for i in sparse:
        assert engine_routes[i].shape == (2 * width, moe.config.text_config.num_experts_per_tok)
        for b in range(2):
            n = int(keep[b].sum())
            assert int(rows[i][b]) == n
            got = engine_routes[i].view(2, width, -1)[b, :n]  # the engine packs each sample's present tokens left
            assert torch.equal(got.sort(-1).values, refs[b][i].sort(-1).values)
