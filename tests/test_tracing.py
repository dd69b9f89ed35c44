"""A trace stops after its last site: same activations as a whole forward, and nothing after it runs."""

from __future__ import annotations

import pytest
import torch

from embedlens.adapters.capabilities import Capability
from embedlens.adapters.base import resolve_path
from embedlens.sites import Site
from embedlens.tracing import collect, collect_text
from tests.conftest import mixed_samples


class _Calls:
    """Counts forward calls of modules through plain PyTorch hooks (independent of nnsight)."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.n = dict.fromkeys(modules, 0)
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name):
        def hook(module, args):
            self.n[name] += 1
        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()


def _llm_modules(adapter) -> dict[str, torch.nn.Module]:
    layers = resolve_path(adapter.model, adapter.paths.llm_layers)
    return {"layer0": layers[0], "last_layer": layers[-1], "head": resolve_path(adapter.model, adapter.paths.unembed)}


EARLY = ["vision.layers[-1]", "vision.features", "projector", "llm.embed"]


def test_a_pass_ending_at_the_llm_input_never_runs_the_llm(adapter):
    batch = adapter.encode(mixed_samples(adapter=adapter))
    with _Calls(_llm_modules(adapter)) as calls:
        collect(adapter, batch, EARLY)
    assert calls.n == {"layer0": 0, "last_layer": 0, "head": 0}
    with _Calls(_llm_modules(adapter)) as calls:  # the counter sees a whole forward when the logits are read
        collect(adapter, batch, [*EARLY, "llm.unembed"])
    assert calls.n["layer0"] >= 1 and calls.n["last_layer"] >= 1 and calls.n["head"] >= 1


def test_a_pass_reading_llm_layers_stops_after_the_last_one_and_never_computes_the_head(adapter):
    batch = adapter.encode(mixed_samples(adapter=adapter))
    assert adapter.n_llm_layers >= 2
    with _Calls(_llm_modules(adapter)) as calls:
        collect(adapter, batch, ["llm.embed", "llm.layers[0]"])
    assert calls.n == {"layer0": 1, "last_layer": 0, "head": 0}
    with _Calls(_llm_modules(adapter)) as calls:  # the final norm is read, the logits are not
        collect(adapter, batch, ["llm.layers[-1]", "llm.norm"])
    assert calls.n == {"layer0": 1, "last_layer": 1, "head": 0}


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_a_stopped_pass_returns_exactly_the_whole_forwards_activations(adapter, padding_side):
    batch = adapter.encode(mixed_samples(adapter=adapter), padding_side=padding_side)
    sites = [*EARLY, "vision.embed", "llm.layers[0].in", "llm.layers[0].attn", "llm.layers[0].mlp", "llm.layers[0]"]
    for stop_at in (4, len(sites)):  # ends at llm.embed; ends inside the first decoder layer
        stopped = collect(adapter, batch, sites[:stop_at])
        whole = collect(adapter, batch, [*sites[:stop_at], "llm.unembed"])
        assert set(stopped) == {adapter.resolve(s) for s in sites[:stop_at]}
        for site, value in stopped.items():
            assert torch.equal(value, whole[site]), site


def test_collect_text_stops_after_its_last_site_with_the_same_activations(adapter):
    texts = ["a red square", "two green circles on a blue field"]
    with _Calls(_llm_modules(adapter)) as calls:
        stopped, ids, mask = collect_text(adapter, texts, ["llm.embed", "llm.layers[0]"])
    assert calls.n["last_layer"] == 0 and calls.n["head"] == 0
    whole, ids2, mask2 = collect_text(adapter, texts, ["llm.embed", "llm.layers[0]", "llm.unembed"])
    assert torch.equal(ids, ids2) and torch.equal(mask, mask2)
    for site in (Site("llm.embed"), Site("llm.layers", 0)):
        assert torch.equal(stopped[site], whole[site]), site


def _attention_calls(adapter) -> dict[str, torch.nn.Module]:
    """Each encoder layer's first child (its attention or norm): it runs only when the layer really computes
    (a layer's own hooks fire even when nnsight skips its forward)."""
    return {i: next(layer.children()) for i, layer in enumerate(resolve_path(adapter.model, adapter.paths.vision_layers))}


def _hf_reference(adapter, batch):
    """A plain HF forward (every encoder layer runs): the LM's input embeddings and its first layer's output."""
    captured = {}
    lm = resolve_path(adapter.model, adapter.paths.language_model)
    handle = lm.register_forward_pre_hook(lambda m, a, k: captured.update(x=k["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad():
            out = adapter.model(**adapter.model_inputs(batch), output_hidden_states=True)
    finally:
        handle.remove()
    return captured["x"], out.hidden_states[1]


def test_encoder_layers_after_the_selected_feature_layer_never_run_and_change_nothing(adapter):
    """A family whose features are `hidden_states[vision_feature_layer]` (LLaVA's -2) skips the encoder layers
    after it in traces and in the engine; every family's projector output and LLM activations stay the model's
    own, bit for bit, against a plain HF forward that runs every layer."""
    from embedlens.interventions import Engine

    batch = adapter.encode(mixed_samples(adapter=adapter))
    n = adapter.n_vision_layers
    feature = getattr(adapter.config, "vision_feature_layer", None)
    expected = n + 1 + feature if adapter.has(Capability.VISION_FEATURE_LAYER) and isinstance(feature, int) and feature < 0 else n
    assert adapter.vision_layers_needed == expected
    embeds, layer0 = _hf_reference(adapter, batch)
    with _Calls(_attention_calls(adapter)) as calls:
        acts = collect(adapter, batch, ["llm.embed", "llm.layers[0]"])
    assert [calls.n[i] > 0 for i in range(n)] == [i < expected for i in range(n)]
    assert torch.equal(acts[Site("llm.embed")], embeds) and torch.equal(acts[Site("llm.layers", 0)], layer0)
    layers = resolve_path(adapter.model, adapter.paths.vision_layers)
    forwards = [layer.__dict__.get("forward") for layer in layers]  # nnsight's wrapper where it set one
    with _Calls(_attention_calls(adapter)) as calls:
        engine_embeds = Engine(adapter).embed(batch)
    assert [calls.n[i] > 0 for i in range(n)] == [i < expected for i in range(n)]
    assert torch.equal(engine_embeds, embeds)
    assert [layer.__dict__.get("forward") for layer in layers] == forwards  # the engine put every forward back
    with _Calls(_attention_calls(adapter)) as calls:  # a site in a later encoder layer makes it run
        acts = collect(adapter, batch, ["vision.layers[-1]", "llm.embed"])
    assert all(calls.n[i] > 0 for i in range(n))
    assert torch.equal(acts[Site("llm.embed")], embeds)


@pytest.mark.parametrize("feature_layer, needed", [(-2, 2), (-3, 1), (1, 1), (0, 0), ([-3, -2], 2), (-1, 3)])
def test_vision_layers_needed_counts_as_hf_indexes_hidden_states(feature_layer, needed):
    """`hidden_states[0]` is the embeddings and entry i the output of layer i - 1 (a 3-layer tower here); for each
    single-layer setting a trace runs exactly the layers up to it and its LLM input is the model's own."""
    from embedlens.adapters import load_model

    adapter = load_model("tiny:llava-clip")  # a fresh model: its config is changed below
    adapter.model.config.vision_feature_layer = feature_layer
    assert adapter.n_vision_layers == 3 and adapter.vision_layers_needed == needed
    if isinstance(feature_layer, list) or feature_layer == 0:
        return  # concatenated layers need a wider projector than the tiny model's; HF's own forward fails on 0
    batch = adapter.encode(mixed_samples(adapter=adapter))
    embeds, _ = _hf_reference(adapter, batch)
    with _Calls(_attention_calls(adapter)) as calls:
        acts = collect(adapter, batch, ["vision.features", "llm.embed"])
    assert [calls.n[i] > 0 for i in range(3)] == [i < needed for i in range(3)]
    assert torch.equal(acts[Site("llm.embed")], embeds)


def test_a_video_batch_skips_the_encoder_layers_after_the_feature_layer_too():
    """Videos reach the tower as ``pixel_values_videos``: a trace reading the LLM skips the encoder layers after
    the selected feature layer for them as for images, and the LLM's input and first layer stay HF's own."""
    import numpy as np
    from PIL import Image

    from embedlens.adapters import load_model
    from embedlens.data import Sample

    adapter = load_model("tiny:llava_onevision")
    n = adapter.n_vision_layers
    adapter.config.vision_feature_layer = -2  # read by HF's video features and by the adapter alike
    assert adapter.vision_layers_needed == n - 1
    rng = np.random.default_rng(0)
    frames = [[Image.fromarray((rng.random((48, 48, 3)) * 255).astype(np.uint8)) for _ in range(2)] for _ in range(2)]
    batch = adapter.encode([Sample(video=f, question="what moves?", id=f"v{i}") for i, f in enumerate(frames)])
    assert "pixel_values_videos" in adapter.model_inputs(batch) and adapter.model_inputs(batch).get("pixel_values") is None
    embeds, layer0 = _hf_reference(adapter, batch)
    with _Calls(_attention_calls(adapter)) as calls:
        acts = collect(adapter, batch, ["llm.embed", "llm.layers[0]"])
    assert [calls.n[i] > 0 for i in range(n)] == [i < n - 1 for i in range(n)]
    assert torch.equal(acts[Site("llm.embed")], embeds) and torch.equal(acts[Site("llm.layers", 0)], layer0)
