"""`attention_keys` (DART's keys, recomputed from a layer's attention input) equals the keys the model's own attention
module makes, on families whose rotary embedding takes one tensor (Gemma 4) or two (Llama-style)."""

from __future__ import annotations

import sys

import pytest
import torch

from embedlens.adapters import load_model
from embedlens.attention import attention_keys


@pytest.mark.parametrize("family", ["gemma4", "llava-clip"])
def test_recomputed_keys_equal_the_attention_modules_own(family, monkeypatch):
    adapter = load_model(f"tiny:{family}")
    layer = 1
    attn = adapter.model.get_submodule(f"{adapter.paths.llm_layers}.{layer}.{adapter.paths.attn}")
    modeling = sys.modules[type(attn).__module__]
    rope = modeling.apply_rotary_pos_emb
    got: dict = {}
    calls: list = []

    def recording(*args, **kwargs):  # the module calls it for its queries, then its keys
        out = rope(*args, **kwargs)
        if got.get("inside"):  # only the calls of the layer under test
            calls.append(out)
        return out

    def pre_hook(module, args, kwargs):
        got["hidden"] = kwargs.get("hidden_states", args[0] if args else None)
        got["pe"] = kwargs.get("position_embeddings")
        got["inside"] = True

    def post_hook(module, args, output):
        got["inside"] = False

    monkeypatch.setattr(modeling, "apply_rotary_pos_emb", recording)
    handles = [attn.register_forward_pre_hook(pre_hook, with_kwargs=True), attn.register_forward_hook(post_hook)]
    from embedlens.data import Sample
    from PIL import Image

    batch = adapter.encode([Sample(id="a", images=[Image.new("RGB", (64, 64), (200, 30, 30))], question="What colour?")])
    try:
        with torch.no_grad():
            adapter.model(**adapter.model_inputs(batch))
    finally:
        for h in handles:
            h.remove()
    monkeypatch.setattr(modeling, "apply_rotary_pos_emb", rope)
    assert (len(calls), isinstance(calls[0], tuple)) in ((1, True), (2, False))
    if isinstance(calls[0], tuple):  # Llama-style: apply_rotary_pos_emb(q, k, cos, sin) -> (q, k), [batch, heads, seq, d]
        want = calls[0][1]
    else:  # Gemma 4: one call per tensor on [batch, seq, heads, d]; the second is the keys
        want = calls[1].transpose(1, 2)
    with torch.no_grad():
        keys = attention_keys(attn, got["hidden"], got["pe"])
    assert keys.shape == want.shape
    torch.testing.assert_close(keys, want, rtol=1e-5, atol=1e-6)
