"""Cross-check against TransformerLens's TransformerBridge, an independent second
implementation of hooks on the same weights (LLaVA, both towers)."""

from __future__ import annotations

import pytest
import torch

from embedlens.adapters import load_model
from embedlens.testing import save_tiny_model
from embedlens.tracing import collect
from tests.conftest import mixed_samples

tl_bridge = pytest.importorskip("transformer_lens.model_bridge")


@pytest.fixture(autouse=True)
def _no_torchvision_install(monkeypatch):
    """TransformerLens installs torchvision when a processor fails to load; refuse loudly."""
    import transformer_lens.model_bridge.sources.transformers.helpers as helpers

    def refuse() -> bool:
        raise AssertionError("TransformerLens tried to install torchvision")

    monkeypatch.setattr(helpers, "_ensure_torchvision", refuse)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llava-clip", "llava-siglip"])
def test_sites_equal_transformer_bridge_hooks(name, tmp_path):
    from transformers import AutoTokenizer

    folder = save_tiny_model(name, tmp_path / name)
    # The bridge switches its model to eager attention; give it its own copy,
    # and run ours in eager too so both use the same kernel.
    ours = load_model(str(folder), attn_implementation="eager")
    theirs = load_model(str(folder)).model
    bridge = tl_bridge.TransformerBridge.boot_transformers(
        str(folder), hf_model=theirs, tokenizer=AutoTokenizer.from_pretrained(folder), device="cpu"
    )
    assert type(bridge.processor).__name__ == "LlavaProcessor"  # loaded offline, no install needed

    batch = ours.encode(mixed_samples()[:2], padding_side="left")
    n_llm, n_vis = ours.n_llm_layers, ours.n_vision_layers
    # (our site, the bridge hook that should hold the same tensor)
    pairs = (
        [(f"vision.layers[{i}]", f"vision_encoder.encoder_layers.{i}.hook_out") for i in range(n_vis)]
        + [("projector", "vision_projector.hook_out"), ("llm.embed", "blocks.0.hook_in")]
        + [(f"llm.layers[{i}]{sub}", f"blocks.{i}{hook}") for i in range(n_llm)
           for sub, hook in (("", ".hook_out"), (".attn", ".attn.hook_out"), (".mlp", ".mlp.hook_out"))]
        + [("llm.norm", "ln_final.hook_out"), ("llm.unembed", "unembed.hook_out")]
    )
    sites, names = zip(*pairs)
    acts = collect(ours, batch, sites)
    cache = {}

    def save(name):
        def hook(x, hook):
            cache[name] = (x[0] if isinstance(x, tuple) else x).detach().clone()
            return x

        return hook

    with torch.no_grad():
        bridge.run_with_hooks(
            batch.input_ids,
            pixel_values=batch.inputs["pixel_values"],
            attention_mask=batch.inputs["attention_mask"],
            fwd_hooks=[(n, save(n)) for n in names],
        )
    for site, hook_name in zip(sites, names):
        assert hook_name in cache, hook_name
        torch.testing.assert_close(acts[ours.resolve(site)], cache[hook_name], atol=1e-5, rtol=1e-5, msg=lambda m: f"{site} vs {hook_name}: {m}")
