"""The shipped examples' partitions, with their default settings, against the data's ground truth.

Dead tokens must be the background patches (synthetic per-patch truth; for
`examples/data` the images' flat background colour), the only dead anchor
discovered must be ``background`` on both zoo models, and no image may lose
every visual token to ``prune dead``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from embedlens.groups import Partition
from embedlens.plan import load_plan, prepare

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# (example, model name in the plan or None): every example whose plan has a partition, and the quickstart's data
CASES = [
    ("pruning_study.yaml", None),
    ("clip_vs_siglip.yaml", "clip"),
    ("clip_vs_siglip.yaml", "siglip"),
    ("partition_study.yaml", None),
    ("quickstart.yaml", None),
]


def _background_truth(sample, rows: int, cols: int) -> np.ndarray:
    """``[rows, cols]`` bool: the patch is background (synthetic truth, else the majority of its pixels are the flat background colour)."""
    labels = sample.meta.get("patch_labels", {}).get("kind")
    if labels is not None:
        return np.array(labels) == "background"
    img = np.asarray(sample.images[0].convert("RGB").resize((cols * 16, rows * 16), resample=0))
    colours, counts = np.unique(img.reshape(-1, 3), axis=0, return_counts=True)
    bg = colours[counts.argmax()]
    same = (img == bg).all(-1).reshape(rows, 16, cols, 16).mean(axis=(1, 3))
    return same > 0.5


@pytest.mark.slow
@pytest.mark.parametrize("example,model", CASES, ids=[f"{e}-{m or 'model'}" for e, m in CASES])
def test_default_partition_finds_background_alone(example, model):
    loaded = load_plan(EXAMPLES / example)
    prepared = prepare(loaded, model=model)
    adapter = prepared.adapter
    part = prepared.partition or Partition(discover=True)  # the quickstart has none: the default one
    assert part.discover
    samples = [r.load()[0] for r in prepared.records]
    batches = [adapter.encode(samples[i : i + 4], padding_side="left") for i in range(0, len(samples), 4)]
    part.fit(adapter, batches)
    tok = adapter.tokenizer
    assert [tok.convert_ids_to_tokens(i) for i in part.discovered["dead"]] == ["background"]
    tp = fp = fn = 0
    for b in batches:
        groups = part.label(adapter, b)
        vt = b.roles.visual_tokens()
        dead = groups["dead"][vt["sample"], vt["position"]]
        truth = torch.zeros_like(dead)
        for s, sample in enumerate(b.samples):
            sel = vt["sample"] == s
            rows, cols = b.roles.grid_shape(s, 0)
            bg = torch.from_numpy(_background_truth(sample, rows, cols))
            truth[sel] = bg[vt["row"][sel], vt["col"][sel]]
            assert not dead[sel].all(), f"prune dead would remove every visual token of {sample.id}"
        tp += int((dead & truth).sum()); fp += int((dead & ~truth).sum()); fn += int((~dead & truth).sum())
    precision, recall = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)
    summary = part.summary()
    assert not [w for w in summary["warnings"] if "dead" in w], summary["warnings"]  # defaults raise no degenerate-partition warning


def test_partition_block_and_token_partition_cannot_disagree(tmp_path):
    """One partition per plan: token_partition with its own settings beside a partition: block is refused,
    and without the block its settings become the plan's partition (the same object the probe labels with)."""
    from embedlens.errors import PlanError
    from embedlens.probes.partition import TokenPartition

    both = tmp_path / "both.yaml"
    both.write_text("data: {synthetic: {n: 2}}\npartition: {discover: true}\n"
                    "probes:\n  - name: token_partition\n    params: {discover: true, k: 1}\n")
    with pytest.raises(PlanError, match=r"both.yaml:5 probes\[0\]\.params\.discover: token_partition labels with the plan's partition"):
        load_plan(both)
    alone = tmp_path / "alone.yaml"
    alone.write_text("model: {source: 'tiny:llava-clip'}\ndata: {synthetic: {n: 2, size: 32}}\n"
                     "probes:\n  - name: token_partition\n    params: {k: 1, vit_norm: sink}\n"
                     "conditions: {p: [{name: prune, params: {tokens: dead, if_empty: noop}}]}\nmetrics: [{name: visual_tokens}]\n")
    loaded = load_plan(alone)
    assert loaded.plan.partition.k == 1 and loaded.plan.partition.vit_norm == "sink" and loaded.plan.partition.discover
    prepared = prepare(loaded)
    probe = dict(prepared.probes)["token_partition"]
    assert isinstance(probe, TokenPartition) and probe.partition is prepared.partition
    two = tmp_path / "two.yaml"
    two.write_text("data: {synthetic: {n: 2}}\nprobes:\n  - name: token_partition\n    params: {k: 1}\n"
                   "  - name: token_partition\n    label: other\n    params: {k: 2}\n")
    with pytest.raises(PlanError, match="one partition"):
        load_plan(two)


def test_partition_spec_defaults_are_the_partitions():
    """The YAML block and the Python class have the same defaults (the schema cannot import torch to share them)."""
    import dataclasses

    from embedlens.plan.schema import PartitionSpec

    fields = {f.name: f.default for f in dataclasses.fields(Partition) if f.init}
    for name, info in PartitionSpec.model_fields.items():
        default = info.default if info.default_factory is None else info.default_factory()
        assert default == (fields[name] if not isinstance(fields[name], dataclasses._MISSING_TYPE) else {}), name


def test_degenerate_partition_warns_in_console_and_report(tmp_path):
    """Anchors accepted whatever their spread (max_dispersion 1) and frequency: content words become dead, and the run says so."""
    from typer.testing import CliRunner

    from embedlens.cli import app

    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "model: {source: 'zoo:tiny-llava-clip'}\ndata: {synthetic: {n: 8, seed: 1, size: 96}, padding_side: left}\n"
        "partition: {discover: true, discover_max_dispersion: 1.0, discover_min_images: 0.1}\n"
        "probes: [{name: token_partition}]\nconditions: {p: [{name: prune, params: {tokens: dead, if_empty: noop}}]}\n"
        "metrics: [{name: visual_tokens}]\noutput: {figures: false}\n"
    )
    res = CliRunner().invoke(app, ["run", str(plan), "-o", str(tmp_path / "out"), "-q"])
    assert res.exit_code == 0, res.output
    summary = __import__("json").loads((tmp_path / "out" / "summary.json").read_text())
    part = summary["partition"]
    assert part["fractions"]["dead"] > 0.9
    warnings = part["warnings"]
    assert any("of visual tokens are dead (more than 90%)" in w for w in warnings)
    assert any("dead anchors (" in w and "a real vocabulary usually has one to three" in w for w in warnings)
    assert any("holds every visual token of" in w for w in warnings)  # prune dead would empty some image
    assert "warning: partition:" in res.output
    report = (tmp_path / "out" / "report.html").read_text()
    assert 'id="warnings"' in report and "more than 90%" in report


def test_one_discovery_per_run_whichever_probes_ask(tmp_path):
    """A loosened partition: block and an anchor_discovery probe: the report holds one discovery (the partition's),
    reported by the probe with the same anchors, evidence and warnings, the warnings naming the setting; a probe
    parameter that would make a second discovery is refused, naming the partition key."""
    import json

    from typer.testing import CliRunner

    from embedlens.cli import app

    head = ("model: {source: 'zoo:tiny-llava-clip'}\ndata: {synthetic: {n: 8, seed: 1, size: 96}, padding_side: left}\n"
            "partition: {discover: true, discover_max_dispersion: 1.0, discover_min_images: 0.1}\n")
    plan = tmp_path / "plan.yaml"
    plan.write_text(head + "probes: [{name: anchor_discovery}, {name: token_partition}]\noutput: {figures: false}\n")
    res = CliRunner().invoke(app, ["run", str(plan), "-o", str(tmp_path / "out"), "-q"])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    part = summary["partition"]
    probe = summary["anchor_discovery"]
    assert probe["source"] == "partition"
    assert {g: [a["id"] for a in v] for g, v in probe["anchors"].items()} == {
        g: [a["id"] for a in v] for g, v in part["discovered_anchors"].items()}
    assert len(probe["anchors"]["dead"]) > 1  # the loosened rule's many anchors, not the probe's own default discovery
    assert [c["id"] for c in probe["candidates"]] == [c["id"] for c in part["discovery"]]
    assert probe["warnings"] and set(probe["warnings"]) <= set(part["warnings"])
    assert any("partition.discover_max_dispersion=1 (default 0.2)" in w for w in probe["warnings"])
    assert not any("broken projector" in w for w in part["warnings"])  # nothing collapsed: the setting did it
    for written in (0.3, 0.2):  # 0.2 is the probe's default, but written: the user asked for it, and it differs
        plan.write_text(head + f"probes: [{{name: anchor_discovery, params: {{max_dispersion: {written}}}}}]\noutput: {{figures: false}}\n")
        res = CliRunner().invoke(app, ["run", str(plan), "-o", str(tmp_path / "out2"), "-q"])
        assert res.exit_code == 2 and "discover_max_dispersion" in res.output and "Traceback" not in res.output, res.output


def test_anchor_discovery_compares_the_parameters_it_was_given_with_the_partitions():
    """Written parameters are compared with the partition's, defaults included; unwritten ones are not."""
    from embedlens.errors import PlanError
    from embedlens.groups import Partition
    from embedlens.probes import AnchorDiscovery

    loose = Partition(discover=True, discover_max_dispersion=0.5)
    with pytest.raises(PlanError, match=r"max_dispersion: .*partition.discover_max_dispersion = 0.5"):
        AnchorDiscovery(max_dispersion=0.2).use_partition(loose)  # the default value, but written
    with pytest.raises(PlanError, match="massive: "):
        AnchorDiscovery(massive=True).use_partition(loose)  # this partition counts no massive activations
    for same in (AnchorDiscovery(), AnchorDiscovery(max_dispersion=0.5), AnchorDiscovery(max_dispersion=0.5, massive=False)):
        same.use_partition(loose)
        assert same.result()["source"] == "partition"


def test_token_partition_and_anchor_groups_refuse_given_parameters_the_partition_overrides(tmp_path):
    """A partition probe labels with the run's one partition: a parameter written to it that differs from the
    partition's is an error naming the partition key (was: silently dropped); equal or unwritten ones are fine,
    and the probe then labels with that partition. In a plan: anchor_groups' anchors beside a partition: block."""
    from embedlens.errors import PlanError
    from embedlens.groups import Partition
    from embedlens.probes.partition import AnchorGroups, TokenPartition

    part = Partition(anchors={"dead": [6, 7]}, k=2, vit_norm="sink")
    with pytest.raises(PlanError, match=r"k: token_partition labels with the run's one partition \(partition\.k = 2, here 3\); set k"):
        TokenPartition(anchors={"dead": [6, 7]}, k=3).use_partition(part)  # k = 3 is the default, but written
    with pytest.raises(PlanError, match=r"anchors: anchor_groups .*partition\.anchors = \{'dead': \[6, 7\]\}"):
        AnchorGroups(anchors={"dead": [5]}).use_partition(part)
    for same in (TokenPartition(), TokenPartition(k=2, vit_norm="sink"), AnchorGroups(anchors={"dead": [6, 7]}, k=2)):
        same.use_partition(part)
        assert same.partition is part
    plan = tmp_path / "p.yaml"
    plan.write_text("model: {source: 'tiny:llava-clip'}\ndata: {synthetic: {n: 2, size: 32}}\n"
                    "partition: {anchors: {dead: [6, 7]}}\n"
                    "probes:\n  - name: anchor_groups\n    params: {anchors: {dead: [5]}}\n")
    with pytest.raises(PlanError, match=r"probes\[0\].*anchors: anchor_groups labels with the run's one partition"):
        prepare(load_plan(plan))
