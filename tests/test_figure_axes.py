"""Every figure kind, drawn on a tiny run, read back from its matplotlib Axes: axes that plot data name their
quantity (never a bare group name), layer axes tick whole numbers at the model's layer numbers, curves of groups have
a titled legend, and hatching means one thing everywhere: a matched random control."""

from __future__ import annotations

import pytest

from embedlens import figures
from embedlens.plan import load_plan, prepare, run

pytestmark = [pytest.mark.xdist_group("test_figure_axes"), pytest.mark.slow]

PLAN = """
model: {source: zoo:MODEL}
data: {synthetic: {n: 3, seed: 0, size: 96}, padding_side: left}
partition: {discover: true, vit_norm: sink}
probes:
  - name: token_partition
  - name: anchor_discovery
  - name: sink_detector
  - {name: dead_token_entropy, params: {temperature: 0.05}}
  - {name: attention_flow, params: {queries: [last, question], layers: [1, 2, 3]}}
  - {name: logit_lens, params: {roles: [visual, last], k: 3}}
  - {name: tuned_lens, params: {layers: [1, 2, 3], roles: [visual], steps: 1}}
  - name: layer_alignment
  - {name: contextual_lens, params: {k: 3}}
  - {name: token_clusters, params: {n_clusters: 3}}
  - {name: embedding_lens, params: {k: 3, layers: [0, 2, 4]}}
  - {name: semantic_probe, params: {attributes: [colour], sites: [llm.embed, "llm.layers[2]"], cv: 2}}
conditions:
  prune_dead: [{name: prune, params: {tokens: dead, if_empty: noop}}]
  prune_dead_random: [{name: prune_random_matched, params: {target: dead, seed: 0, if_empty: noop, exclude_target: false}}]
metrics: [{name: forced_choice}, {name: answer_logprob}]
report: {breakdown: [qtype]}
output: {dir: out}
batch_size: 3
seed: 0
"""

#: Words that name a token group or role: a label that is only one of these says which tokens, not what was measured.
GROUPS = {"sink", "dead", "alive", "visual", "last", "text", "question", "all"}


def _plan(tmp_path, model):
    p = tmp_path / f"{model}.yaml"
    p.write_text(PLAN.replace("MODEL", model))
    return prepare(load_plan(p))


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """``{folder/file name: figure}`` for every figure two tiny runs (a CLIP and a SigLIP tower) and their comparison
    draw, and the first run's result."""
    from embedlens.compare import compare_runs

    tmp = tmp_path_factory.mktemp("axes")
    got = {}
    save = figures._save

    def capture(fig, path, tight=True):
        got[f"{path.parent.name}/{path.name}"] = fig
        return save(fig, path, tight)

    mp = pytest.MonkeyPatch()
    mp.setattr(figures, "_save", capture)
    try:
        a = run(_plan(tmp, "tiny-llava-clip"), tmp / "a")
        run(_plan(tmp, "tiny-llava-siglip"), tmp / "b")
        compare_runs([tmp / "a", tmp / "b"], tmp / "cmp", names=["a", "b"])
    finally:
        mp.undo()
    return got, a


def _is_colorbar(ax) -> bool:
    return ax.get_label() == "<colorbar>"


def _plots_data(ax) -> bool:
    return ax.axison and not _is_colorbar(ax) and (bool(ax.lines) or bool(ax.patches) or bool(ax.collections)) and not ax.get_images()


def _is_label(text: str) -> bool:
    t = text.strip()
    return bool(t) and t.lower() not in GROUPS and len(t.split()) >= 2 or (bool(t) and "_" in t and t.lower() not in GROUPS)


def test_every_figure_kind_is_drawn(drawn):
    got, _ = drawn
    names = {k.split("/")[1] for k in got}
    for want in ("attention_flow_last.png", "attention_flow_last_token.png", "sink_detector_layers.png", "sink_detector_map.png",
                 "dead_token_entropy_hist.png", "dead_token_entropy_map.png", "logit_lens_entropy.png", "tuned_lens_kl.png",
                 "layer_alignment_cosine.png", "contextual_lens_map.png", "token_clusters_map.png", "embedding_lens_layer2.png",
                 "semantic_probe_colour.png", "token_partition_map.png", "anchor_discovery.png", "effects_correct.png",
                 "effects_paired_correct.png", "effects_by_qtype_correct.png", "effects_logprob.png", "removed_prune_dead.png",
                 "partition_discovery.png"):
        assert want in names, want
    assert any(k.startswith("curves/") for k in got) and any(k.startswith("maps/") for k in got)


def test_axes_name_their_quantity_and_group(drawn):
    got, _ = drawn
    checked = 0
    for name, fig in got.items():
        for ax in fig.axes:
            if _is_colorbar(ax):
                assert _is_label(ax.get_ylabel() or ax.get_xlabel()), f"{name}: colour bar without a label"
                continue
            if not _plots_data(ax):
                continue
            checked += 1
            y = ax.get_ylabel()
            yticks = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
            assert _is_label(y) or (yticks and not y and not any(t.replace(".", "").replace("-", "").replace("−", "").isdigit() for t in yticks)), \
                f"{name}: y label {y!r} does not name a quantity"
            x = ax.get_xlabel()
            xticks = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
            assert _is_label(x) or xticks, f"{name}: x axis says nothing ({x!r})"
            lines = [ln for ln in ax.lines if len(ln.get_xdata()) > 1 and not ln.get_label().startswith("_")]
            if len(lines) > 1 and all(ln.get_label() in GROUPS for ln in lines):
                leg = ax.get_legend()
                assert leg is not None and leg.get_title().get_text(), f"{name}: curves of groups without a titled legend"
    assert checked >= 20


def test_layer_axes_tick_the_models_layer_numbers(drawn):
    got, result = drawn
    seen = 0
    for name, fig in got.items():
        for ax in fig.axes:
            if not _plots_data(ax) or "layer" not in ax.get_xlabel().lower() and "hidden state" not in ax.get_xlabel().lower():
                continue
            if "site" in ax.get_xlabel():
                continue
            xs = sorted({float(x) for ln in ax.lines for x in ln.get_xdata()})
            ticks = list(ax.get_xticks())
            assert all(float(t).is_integer() for t in ticks), f"{name}: tick at a fraction of a layer {ticks}"
            assert all(x.is_integer() for x in xs), f"{name}: a curve at a fraction of a layer {xs}"
            assert sorted(ticks) == xs, f"{name}: ticks {ticks} are not the layers drawn {xs}"
            seen += 1
    assert seen >= 6
    # attention_flow probed layers 1, 2, 3: its x axis reads those, not positions 0, 1, 2
    ax = got["figures/attention_flow_last.png"].axes[0]
    assert list(ax.get_xticks()) == [1, 2, 3] and result.summary["attention_flow"]["layers"] == [1, 2, 3]
    # the comparison's curves: the layer numbers of the summaries, y naming the quantity and the group
    curve = got["curves/attention_flow.attention_mass.question.dead.per_layer.png"].axes[0]
    assert list(curve.get_xticks()) == [1, 2, 3] and curve.get_xlabel() == "LLM layer"
    assert curve.get_ylabel() == "attention_mass (question / dead tokens)" and curve.get_legend().get_title().get_text() == "run"


def test_hatching_marks_matched_random_controls_only(drawn):
    from embedlens.lmms.report import benchmarks_figure

    got, result = drawn
    controls = set(result.summary["controls"].values())
    bar_charts = 0
    for name, fig in got.items():
        for ax in fig.axes:
            bars = [p for p in ax.patches if type(p).__name__ == "Rectangle" and p.get_height() != 0 and p.get_width() < 1.5]
            ticks = [t.get_text() for t in ax.get_xticklabels()]
            if not bars or not ticks or not all(t in {*result.summary["effects"], "baseline"} for t in ticks):
                continue
            bar_charts += 1
            for b, t in zip(bars, ticks):
                assert bool(b.get_hatch()) == (t in controls), f"{name}: {t} hatched={b.get_hatch()!r}"
            legend = [x.get_text() for x in ax.get_legend().get_texts()]
            assert "matched random control" in legend, f"{name}: no legend entry for the hatching"
    assert bar_charts >= 3
    rows = [{"task": "pope", "condition": c, "metric": m, "value": v, "paired_sem": None}
            for c, v in (("baseline", 0.8), ("prune_dead", 0.7), ("prune_dead_random", 0.6)) for m in ("pope_accuracy", "pope_f1")]
    fig = benchmarks_figure(rows, ["baseline", "prune_dead", "prune_dead_random"], ["prune_dead_random"])
    ax = fig.axes[0]
    hatched = {c.get_label(): bool(c.patches[0].get_hatch()) for c in ax.containers if hasattr(c, "patches")}
    assert hatched == {"baseline": False, "prune_dead": False, "prune_dead_random": True}
    assert "matched random control" in ax.get_legend().get_title().get_text() and _is_label(ax.get_ylabel())
    figures._plt().close(fig)


def test_every_map_says_which_samples_it_draws(drawn):
    """A map over images names the samples it draws (the data's ids) in its title or its panels' titles."""
    import re

    got, _ = drawn
    maps = 0
    for name, fig in got.items():
        if not name.startswith("figures/") or not any(im.get_array().ndim == 3 for ax in fig.axes for im in ax.get_images()):
            continue
        maps += 1
        titles = " ".join([fig._suptitle.get_text() if fig._suptitle else ""] + [ax.get_title() for ax in fig.axes])
        drawn_ids = set(re.findall(r"syn-0-\d{5}", titles))
        panels = sum(1 for ax in fig.axes for im in ax.get_images() if im.get_array().ndim == 3)
        assert drawn_ids and len(drawn_ids) >= min(panels, 3), f"{name}: {titles!r}"
    assert maps >= 8
