"""The in-LLM methods' per-layer work never waits for the device: no host synchronisation inside their
`before_layer` / `after_layer` hooks or the attention probes they hand the engine (`setup` may read the batch's
shape once, as the engine's own docs allow). On the CPU `torch.profiler` records each host read as an
``aten::item`` / ``aten::_local_scalar_dense`` / ``aten::nonzero`` event; the hooks run inside a named
`record_function` scope, and no such event may fall inside one."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from embedlens.interventions import Engine
from embedlens.interventions.context import Context
from embedlens.registry import interventions
from tests.reduction.inllm_support import models, samples

SYNCS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero")
SCOPE = "reduction_hook"


def _scoped(fn):
    def wrapped(*args, **kwargs):
        with record_function(SCOPE):
            return fn(*args, **kwargs)

    return wrapped


def syncs_in_hooks(iv, monkeypatch) -> int:
    adapter, _ = models()
    batch = adapter.encode(samples(), padding_side="left")
    for hook in ("before_layer", "after_layer"):
        monkeypatch.setattr(iv, hook, _scoped(getattr(iv, hook)))
    probe = Context.probe_attention
    monkeypatch.setattr(Context, "probe_attention", lambda self, layer, fn, **kw: probe(self, layer, _scoped(fn), **kw))
    eng = Engine(adapter)
    eng.run(batch, [iv])  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        eng.run(batch, [iv])
    count = 0
    for event in prof.events():
        if event.name not in SYNCS:
            continue
        parent = event.cpu_parent
        while parent is not None and parent.name != SCOPE:
            parent = parent.cpu_parent
        count += parent is not None
    return count


@pytest.mark.parametrize("name", ["fastv_budget", "pyramiddrop", "dart", "sparsevlm"])
def test_no_host_sync_in_the_layer_hooks(name, monkeypatch):
    iv = interventions.get(name)(keep=0.5)
    assert syncs_in_hooks(iv, monkeypatch) == 0


def test_the_count_sees_a_sync_in_a_hook(monkeypatch):
    iv = interventions.get("fastv_budget")(keep=0.5)
    original = iv.before_layer

    def reads(ctx, layer):
        float(ctx.exit.float().mean())  # a host read every layer
        return original(ctx, layer)

    monkeypatch.setattr(iv, "before_layer", reads)
    assert syncs_in_hooks(iv, monkeypatch) >= 4
