"""A trace stops after its last site: same activations as a whole forward, and nothing after it runs."""

from __future__ import annotations

import pytest
import torch

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
