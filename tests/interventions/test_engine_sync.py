"""The engine's layer loop only launches work: the host waits on the device a fixed number of times per run, and
each decoder layer costs about the operators Hugging Face's own decoder layer costs.

CI has no GPU, so the waits are counted on the CPU, two ways, on two tiny models that differ only in depth (the
same weights, 2 and 4 LLM layers): with `torch.profiler`, the ``aten::item`` / ``aten::_local_scalar_dense`` /
``aten::nonzero`` events (what a GPU would wait for), and with a `TorchFunctionMode`, every Python call that
reads a tensor on the host (``.tolist()``, ``.cpu()``, ``bool(t)``, ``torch.tensor(list)``, ...: on the CPU these
leave no profiler event, on a GPU each is a wait or a copy). Neither count may grow with depth. The operators per
decoder layer are the difference of the two depths' aten operator counts over the difference in layers, for the
engine and for Hugging Face's language model on the same input embeddings.

LLaVA (one position id per token), Qwen2.5-VL (M-RoPE's `[3, batch, seq]` ids) and Gemma 3 (sliding layers with a
window shorter than the prompts, each layer type with its own rotary embeddings, bidirectional image blocks) are
covered, without interventions, with half the visual tokens pruned by removal and by mask, with FastV (which moves
tokens out between layers, so the engine plans the layout twice), and for one decoding step.
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile

from embedlens.adapters import wrap_model
from embedlens.adapters.base import resolve_path
from embedlens.data import Sample
from embedlens.interventions import Engine, Hook, Intervention
from embedlens.interventions.engine import DONE_EVERY
from embedlens.interventions.prune import FastV, Prune
from embedlens.testing import tiny_model
from embedlens.testing.images import noise, shapes

# one xdist worker runs the module: its module-scoped fixture (every model at both depths) is built once
pytestmark = pytest.mark.xdist_group("test_engine_sync")

SYNC_EVENTS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero")
HOST_READS = {"item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "nonzero", "equal", "tensor"}
DEPTHS = (2, 4)
GENERATED = (8, 16)
#: the engine's operators per decoder layer may exceed Hugging Face's by this factor (issue 31)
OPS_RATIO = 1.2

CASES = {
    "none": lambda: [],
    "prune": lambda: [Prune(tokens="visual and index % 2 == 0")],
    "prune_mask": lambda: [Prune(tokens="visual and index % 2 == 0", mode="mask")],
    "fastv": lambda: [FastV(layer=1, keep=0.5)],
    # a plain function at a site (embedlens.intervene's ad-hoc edits): the packed rows go to batch positions and back
    "hook": lambda: [Hook(lambda x: 2 * x, site="llm.layers[1]", tokens="visual and index % 2 == 0")],
}


class HostReads(TorchFunctionMode):
    """Counts the Python calls that read a tensor's values on the host (or build one from Python data)."""

    def __init__(self):
        super().__init__()
        self.calls: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


def truncated(name: str, depth: int):
    """The tiny model `name` with only its first `depth` LLM layers (same weights, same everything else)."""
    model, processor = tiny_model(name, seed=0)
    adapter = wrap_model(model, processor)
    lm = resolve_path(adapter.model, adapter.paths.language_model)
    del resolve_path(adapter.model, adapter.paths.llm_layers)[depth:]
    lm.config.num_hidden_layers = depth
    if getattr(lm.config, "layer_types", None):
        lm.config.layer_types = lm.config.layer_types[:depth]
    return adapter


def measure(fn) -> dict:
    fn()  # warm up: first calls build caches (rotary tables, lazily resolved devices)
    reads = HostReads()
    with profile(activities=[ProfilerActivity.CPU]) as prof, reads:
        fn()
    events = collections.Counter(e.name for e in prof.events())
    return {
        "syncs": sum(events[k] for k in SYNC_EVENTS),
        "ops": sum(n for k, n in events.items() if k.startswith("aten::")),
        "reads": sum(reads.calls.values()),
        "read_calls": dict(reads.calls),
    }


@pytest.fixture(scope="module", params=["llava-clip", "qwen2_5_vl", "gemma3"])
def counts(request):
    """Per depth: the counts of Hugging Face's language model, of every engine case, and of one decoding step."""
    samples = [
        Sample([shapes(48, seed=1)], question="what is it?", id="a"),
        Sample([noise(40, 56, seed=2)], question="what colour is the big square on the left?", id="b"),
    ]
    out = {}
    for depth in DEPTHS:
        adapter = truncated(request.param, depth)
        batch = adapter.encode(samples, padding_side="left")
        eng = Engine(adapter)
        lm = resolve_path(adapter.model, adapter.paths.language_model)
        embeds = eng.embed(batch)
        positions = adapter.position_ids(batch.inputs)
        mask = (~batch.roles.padding).long()

        @torch.no_grad()
        def hf():
            lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)

        row = {"hf": measure(hf)}
        for case, make in CASES.items():
            row[case] = measure(lambda: eng.run(batch, make()))
        outcome = eng.run(batch, [Prune(tokens="visual and index % 2 == 0")], cache=True)
        token = outcome.last_logits().argmax(-1)[:, None]

        def step():
            point = outcome.checkpoint()
            outcome.step(token)
            outcome.rollback(point)

        row["step"] = measure(step)
        eos = adapter.tokenizer.eos_token_id
        for n in GENERATED if depth == DEPTHS[1] else ():
            row[f"generate{n}"] = measure(lambda n=n: outcome.generate(n, eos_token_id=eos))
        out[depth] = row
    return request.param, out


@pytest.mark.parametrize("case", [*CASES, "step"])
def test_host_waits_do_not_grow_with_depth(counts, case):
    name, by_depth = counts
    shallow, deep = (by_depth[d][case] for d in DEPTHS)
    assert deep["syncs"] == shallow["syncs"], f"{name} {case}: profiler sync events {shallow['syncs']} -> {deep['syncs']}"
    assert deep["reads"] == shallow["reads"], (
        f"{name} {case}: host reads {shallow['read_calls']} at {DEPTHS[0]} layers, {deep['read_calls']} at {DEPTHS[1]}"
    )


@pytest.mark.parametrize("case", [*CASES, "step"])
def test_operators_per_layer_stay_near_hugging_faces(counts, case):
    name, by_depth = counts
    layers = DEPTHS[1] - DEPTHS[0]
    hf = (by_depth[DEPTHS[1]]["hf"]["ops"] - by_depth[DEPTHS[0]]["hf"]["ops"]) / layers
    ours = (by_depth[DEPTHS[1]][case]["ops"] - by_depth[DEPTHS[0]][case]["ops"]) / layers
    assert hf > 50  # the difference of depths measured decoder layers, not noise
    assert ours <= OPS_RATIO * hf, f"{name} {case}: {ours:.0f} operators per layer vs Hugging Face's {hf:.0f}"


def test_a_decoding_step_never_waits(counts):
    """Decoding a token reads nothing back on the host (its masks are built on the device, once per distinct row set)."""
    name, by_depth = counts
    for depth in DEPTHS:
        step = by_depth[depth]["step"]
        assert step["syncs"] == 0 and step["read_calls"] == {}, f"{name}, {depth} layers: {step}"


def test_greedy_decoding_reads_the_host_once_per_few_tokens(counts):
    """`Outcome.generate` asks whether every sample has ended once per `DONE_EVERY` tokens, not per token."""
    name, by_depth = counts
    short, long = (by_depth[DEPTHS[1]][f"generate{n}"] for n in GENERATED)
    allowed = (GENERATED[1] - GENERATED[0]) // DONE_EVERY
    assert long["reads"] - short["reads"] <= allowed, f"{name}: {short['read_calls']} -> {long['read_calls']}"
    assert long["syncs"] - short["syncs"] <= 2 * allowed  # bool(t): aten::item and its _local_scalar_dense


def test_schedule_matches_packing_every_layer():
    """`schedule`'s widths and changes equal what packing each layer's present tokens gives (random enter/exit,
    tokens that never enter, exits past the last layer, padding)."""
    from embedlens.interventions.context import Rows
    from embedlens.interventions.layout import schedule

    gen = torch.Generator().manual_seed(0)
    n_layers, bsz, seq = 6, 3, 11
    for _ in range(20):
        enter = torch.randint(0, n_layers + 1, (bsz, seq), generator=gen)
        exit_ = torch.randint(0, n_layers + 2, (bsz, seq), generator=gen)
        valid = torch.rand(bsz, seq, generator=gen) > 0.2
        widths, changes = schedule(enter, exit_, valid, n_layers)
        before = None
        for layer in range(n_layers):
            present = (enter <= layer) & (layer < exit_) & valid
            rows = Rows.pack(present)  # reads its width from the tensor: the independent side
            assert widths[layer] == max(int(present.sum(dim=1).max()), 0)
            assert changes[layer] == (layer == 0 or not torch.equal(present, before))
            assert torch.equal(Rows.pack(present, widths[layer]).index, rows.index)
            before = present


def test_rows_scatter_writes_the_valid_rows_only():
    """`Rows.scatter` (no host read) writes what indexing by the valid rows' positions writes."""
    from embedlens.interventions.context import Rows

    gen = torch.Generator().manual_seed(1)
    present = torch.rand(3, 9, generator=gen) > 0.4
    rows = Rows.pack(present)
    target, values = torch.randn(3, 9, 5, generator=gen), torch.randn(*rows.index.shape, 5, generator=gen)
    expected = target.clone()
    b, r = rows.valid.nonzero(as_tuple=True)
    expected[b, rows.index[b, r]] = values[b, r]
    assert torch.equal(rows.scatter(target, values), expected)


@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen3_vl"])
def test_mrope_ids_taken_from_the_models_own_call_equal_the_adapters(name):
    """The engine reuses the M-RoPE ids the model computed for its language model instead of asking the adapter
    (a second get_rope_index, a host loop per image); they are the adapter's ids, padding on either side."""
    from conftest import get_adapter

    adapter = get_adapter(name)
    samples = [Sample([shapes(48, seed=1)], question="what is it?", id="a"),
               Sample([noise(40, 56, seed=2)], question="what colour is the big square on the left?", id="b")]
    for side in ("left", "right"):
        batch = adapter.encode(samples, padding_side=side)
        ids = Engine(adapter).context(batch).positions
        assert torch.equal(ids, adapter.position_ids(batch.inputs).to(ids.device))


class _Exit(Intervention):
    """Scratch intervention: every other visual token leaves before layer 1, by an in-place edit of ``ctx.exit`` or
    by a new tensor (`torch.where`, as FastV does)."""

    def __init__(self, in_place: bool):
        self.in_place = in_place

    def setup(self, ctx):
        pass

    def before_layer(self, ctx, layer):
        if layer != 1:
            return
        m = ctx.roles.visual & (torch.arange(ctx.roles.visual.shape[1]) % 2 == 0)
        if self.in_place:
            ctx.exit[m] = 1
        else:
            ctx.exit = torch.where(m, torch.minimum(ctx.exit, torch.ones_like(ctx.exit)), ctx.exit)


class _Masks(Intervention):
    """Scratch intervention: text may not attend to visual tokens, and visual tokens' attention update is zeroed, from
    layer 1 on; the masks are one tensor object edited in place before layer 1, or new tensors at each layer."""

    def __init__(self, in_place: bool):
        self.in_place = in_place

    def setup(self, ctx):
        self.src, self.dst, self.zero = ctx.roles.text.clone(), torch.zeros_like(ctx.roles.visual), torch.zeros_like(ctx.roles.visual)

    def before_layer(self, ctx, layer):
        if layer == 1 and self.in_place:
            self.dst |= ctx.roles.visual
            self.zero |= ctx.roles.visual

    def blocked(self, ctx, layer):
        if self.in_place:
            return self.src, self.dst
        return self.src, ctx.roles.visual & (layer >= 1)

    def zero_update(self, ctx, layer, sublayer):
        if self.in_place:
            return self.zero if sublayer == "attn" else None
        return ctx.roles.visual & (layer >= 1) if sublayer == "attn" else None


@pytest.mark.parametrize("kind", [_Exit, _Masks])
def test_in_place_edits_between_layers_count_as_edits(kind):
    """The engine rereads ``ctx.enter`` / ``ctx.exit`` and rebuilds an intervention's blocked and zeroed masks when they
    were edited in place (their version counters moved), not only when they are new tensors: an in-place edit and
    the same edit out of place give the same logits and token counts, and differ from the run without it."""
    from conftest import get_adapter

    adapter = get_adapter("llava-clip")
    samples = [Sample([shapes(48, seed=1)], question="what is it?", id="a"),
               Sample([noise(40, 70, seed=2)], question="what colour is the big square?", id="b")]
    batch = adapter.encode(samples, padding_side="left")
    eng = Engine(adapter)
    base, in_place, out_place = eng.run(batch), eng.run(batch, [kind(True)]), eng.run(batch, [kind(False)])
    valid = ~batch.roles.padding & out_place.present
    torch.testing.assert_close(in_place.logits()[valid], out_place.logits()[valid], atol=1e-5, rtol=0)
    assert (base.logits()[valid] - out_place.logits()[valid]).abs().max() > 1e-3  # the edit matters
    for key, want in out_place.counts.items():
        assert torch.equal(in_place.counts[key], want), key
    if kind is _Exit:
        assert not torch.equal(base.counts["visual"], out_place.counts["visual"])
