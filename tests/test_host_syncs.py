"""Host synchronisations of the partition pass and the lens do not grow with the model's depth.

On a GPU the host waits at every ``.item()``, ``.tolist()``, ``nonzero()`` and boolean-mask index; on the CPU
`torch.profiler` records them as ``aten::item`` / ``aten::_local_scalar_dense`` / ``aten::nonzero`` events, so
the count can be held here without a GPU: two tiny LLaVA models that differ only in their number of LLM layers,
every layer read, must give the same count.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import embedlens.testing.tiny as tiny
from embedlens.adapters import wrap_model
from embedlens.data import Sample
from embedlens.groups import Partition
from embedlens.probes.embedding_lens import EmbeddingLens
from embedlens.testing.images import shapes
from embedlens.tracing import collect

SYNCS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero")


@pytest.fixture(scope="module")
def shallow_and_deep():
    out = {}
    for depth in (2, 8):
        with mock.patch.dict(tiny._TEXT, num_hidden_layers=depth):
            adapter = wrap_model(*tiny.tiny_model("llava-clip"))
        batch = adapter.encode([Sample([shapes(32, seed=i)], question="what is it?", id=f"s{i}") for i in range(3)],
                               padding_side="left")
        out[depth] = (adapter, batch)
    return out


def _syncs(fn) -> int:
    fn()  # warm-up: lazily built tables and caches are not what is counted
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key in SYNCS)


def _lens(adapter, batch):
    lens = EmbeddingLens(k=3, layers=list(range(adapter.n_llm_layers + 1)))
    acts = collect(adapter, batch, lens.sites(adapter))
    return lambda: (batch.memo.clear(), lens.update(adapter, batch, acts))


def _partition_pass(adapter, batch):
    """The partition plan's pass after the trace: layer-0 lens, anchors, ViT norm, massive activations at every layer."""
    lens = EmbeddingLens(k=3, layers=[0])
    part = Partition({"sink": [5, 6], "dead": [7, 8, 9]}, k=3, vit_norm="sink", massive="sink")
    acts = collect(adapter, batch, {*lens.sites(adapter), *part.sites(adapter)})
    assert len(part.sites(adapter)) == adapter.n_llm_layers + 2  # vision layer, llm.embed, every LLM layer

    def fn():
        batch.memo.clear()
        lens.update(adapter, batch, acts)
        return part.label(adapter, batch, acts=acts)

    return fn


@pytest.mark.parametrize("case", [_lens, _partition_pass], ids=["lens_update_every_layer", "partition_pass"])
def test_sync_count_does_not_grow_with_depth(shallow_and_deep, case):
    counts = {depth: _syncs(case(adapter, batch)) for depth, (adapter, batch) in shallow_and_deep.items()}
    assert counts[2] == counts[8], f"host syncs by number of LLM layers: {counts}"


def test_the_count_sees_a_per_layer_sync(shallow_and_deep):
    """The counter is not blind: a `.item()` per layer shows up as one event per layer."""
    counts = {}
    for depth, (adapter, batch) in shallow_and_deep.items():
        acts = collect(adapter, batch, [f"llm.layers[{i}]" for i in range(depth)])
        counts[depth] = _syncs(lambda acts=acts: [float(h.abs().max()) for h in acts.values()])
    assert counts[8] - counts[2] >= 6


def test_per_image_vit_norm_statistics_match_a_loop_over_images():
    """Qwen-VL's packed tower: the ViT-norm rule's statistics per image, computed without a loop, against one."""
    from embedlens.signals import norm_outliers

    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        sizes = torch.randint(1, 40, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g)
        images = torch.repeat_interleave(torch.arange(len(sizes)), sizes)[None]
        norms = torch.rand(images.shape, generator=g) * torch.where(torch.rand(images.shape, generator=g) < 0.1, 20.0, 1.0)
        loop = torch.zeros_like(norms, dtype=torch.bool)
        for i in range(len(sizes)):
            at = images == i
            loop[at] = norm_outliers(norms[at][None], 2.0, None, 2.0)[0]
        assert torch.equal(norm_outliers(norms, 2.0, None, 2.0, images), loop)
