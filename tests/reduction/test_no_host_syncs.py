"""The selection functions never wait for the device: no ``aten::item`` / ``nonzero`` / scalar read, counted by the
CPU profiler (on a GPU each would stall the host). The greedy loops' lengths come from shapes and the budget."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from embedlens.reduction.attention_ranked import visionzip_merge, visionzip_select, vispruner_select
from embedlens.reduction.budget import Budget
from embedlens.reduction.diversity import cdpruner_select, divprune_select, instruction_relevance

SYNCS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero")


def _inputs():
    gen = torch.Generator().manual_seed(0)
    image = torch.full((2, 50), -1)
    image[0, 2:22], image[0, 23:45], image[1, 5:40] = 0, 1, 0
    text = torch.zeros(2, 50, dtype=torch.bool)
    text[:, 46:] = True
    return (torch.rand(2, 50, generator=gen), torch.randn(2, 50, 8, generator=gen), image >= 0, image, text)


CASES = {
    "budget": lambda s, x, c, i, t, b: b.keep_mask(s, c, i),
    "visionzip": lambda s, x, c, i, t, b: visionzip_merge(x, *visionzip_select(s, x, c, i, b, 0.25)[:0:-1]),
    "vispruner": lambda s, x, c, i, t, b: vispruner_select(s, x, c, i, b, 0.5),
    "divprune": lambda s, x, c, i, t, b: divprune_select(x, c, i, b),
    "cdpruner": lambda s, x, c, i, t, b: cdpruner_select(x, instruction_relevance(x, t, c, i, True), c, i, b),
}


@pytest.mark.parametrize("keep", [6, 0.3])
@pytest.mark.parametrize("name", sorted(CASES))
def test_selection_reads_nothing_back_from_the_device(name, keep):
    args = (*_inputs(), Budget.parse(keep))
    CASES[name](*args)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        CASES[name](*args)
    found = {e.key: e.count for e in prof.key_averages() if e.key in SYNCS}
    assert found == {}, f"{name} waits for the device: {found}"
