"""The engine's stopwatch (`embedlens.interventions.timing`): what it counts as selection and as prefill, checked
against CPU time planted inside an intervention and measured around the run."""

from __future__ import annotations

import math
import time

import pytest

from embedlens.interventions import Engine
from embedlens.interventions.base import Intervention
from embedlens.testing import tiny_batch


class Burn(Intervention):
    """Spends `seconds` of process CPU time in `setup` (the method's own selection) and records how much."""

    def __init__(self, seconds: float = 0.05):
        self.seconds = seconds

    def setup(self, ctx) -> None:
        t0 = time.process_time()
        while time.process_time() - t0 < self.seconds:
            pass
        self.spent = time.process_time() - t0


@pytest.fixture(scope="module")
def engine_batch():
    adapter, batch = tiny_batch("llava-clip", n=2)
    return Engine(adapter), batch


def test_selection_time_is_the_interventions_own_and_prefill_is_the_layers(engine_batch):
    eng, batch = engine_batch
    embeds = eng.embed(batch)
    burn = Burn(0.05)
    t0 = time.process_time()
    out = eng.run(batch, [burn], embeds=embeds)
    around = 1000 * (time.process_time() - t0)
    t = out.stopwatch.read()
    assert set(t) == {"select_ms", "prefill_ms", "peak_mem_mb"}
    spent = 1000 * burn.spent
    assert spent <= t["select_ms"] <= spent + 25  # setup's burn, plus the (empty) per-layer hooks
    assert 0 < t["prefill_ms"] and t["select_ms"] + t["prefill_ms"] <= around  # both inside the run, disjoint
    assert math.isnan(t["peak_mem_mb"])  # the CPU has no allocator peak
    base = eng.run(batch, embeds=embeds).stopwatch.read()
    assert base["select_ms"] < 5 and base["prefill_ms"] > 0  # no interventions: nothing selected
    assert out.stopwatch.read() == t  # read once; later reads give the same numbers
