"""The shipped zoo checkpoints: loadable by name offline, small, and the planted variant's sinks are where it says."""

from __future__ import annotations

import pytest

from embedlens.adapters import load_model
from embedlens.errors import UnknownNameError
from embedlens.zoo import ZOO, ZOO_DIR, zoo_path

SHIPPED = ["tiny-llava-clip", "tiny-llava-siglip"]


@pytest.mark.parametrize("name", SHIPPED)
def test_checkpoint_is_complete_and_small(name):
    folder = zoo_path(name)
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "recipe.json", "train_log.json"} <= files
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert size <= 15 * 2**20, f"{name} is {size / 2**20:.1f} MB"


@pytest.mark.parametrize("name, tower", [("tiny-llava-clip", "clip"), ("tiny-llava-siglip", "siglip")])
def test_loads_by_name_through_the_adapter(name, tower):
    from transformers import AutoProcessor

    adapter = load_model(f"zoo:{name}")
    assert adapter.source == f"zoo:{name}" and adapter.tower == tower and adapter.name == "llava"
    assert type(AutoProcessor.from_pretrained(zoo_path(name))).__name__ == "LlavaProcessor"


def test_unknown_zoo_name_lists_the_known_ones():
    with pytest.raises(UnknownNameError, match="tiny-llava-clip"):
        load_model("zoo:tiny-llava-clop")


def test_zoo_dir_is_inside_the_package():
    import embedlens

    assert ZOO_DIR.is_relative_to(__import__("pathlib").Path(embedlens.__file__).parent)
    assert ZOO["tiny-llava-clip-planted"].planted


def _sink_hits(adapter, n=12):
    from embedlens.groups import Partition
    from embedlens.synthetic import SyntheticSpec, make_records

    recs = make_records(SyntheticSpec(n=n, seed=11, size=96, patch_grid=6, background=0.6))
    batch = adapter.encode([r.load()[0] for r in recs])
    part = Partition(vit_norm="sink", vit_sigma=4.0, massive="sink")
    part.label(adapter, batch)
    vt = batch.roles.visual_tokens()
    return {rule: sorted(zip(vt["row"][hit].tolist(), vt["col"][hit].tolist())) for rule, hit in part.last_rules.items()}, n


def test_planted_sinks_are_found_where_they_were_planted():
    adapter = load_model("zoo:tiny-llava-clip-planted")
    planted = adapter.model.config.embedlens_planted
    assert "PLANTED" in planted["note"]
    hits, n = _sink_hits(adapter)
    where = tuple(planted["patch"])
    for rule in ("vit_norm", "massive"):  # every image, that patch only
        assert hits[rule] == [where] * n, rule


def test_unplanted_model_has_no_sinks_at_these_thresholds():
    hits, _ = _sink_hits(load_model("zoo:tiny-llava-clip"))
    assert hits["massive"] == []
    assert len(hits["vit_norm"]) <= 1  # a stray 4-sigma token at most, never a fixed patch


def test_planted_massive_activation_is_in_the_named_dimension():
    from embedlens.sites import Site
    from embedlens.synthetic import SyntheticSpec, make_records
    from embedlens.tracing import collect

    adapter = load_model("zoo:tiny-llava-clip-planted")
    p = adapter.model.config.embedlens_planted
    batch = adapter.encode([r.load()[0] for r in make_records(SyntheticSpec(n=2, seed=3, size=96, patch_grid=6))])
    h = collect(adapter, batch, [Site("llm.layers", 1)])[Site("llm.layers", 1)]
    vt = batch.roles.visual_tokens()
    x = h[vt["sample"], vt["position"]]  # [tokens, d]
    top = x.abs().flatten().topk(2).indices
    rows, dims = top // x.shape[1], top % x.shape[1]
    assert dims.tolist() == [p["dim"]] * 2
    assert [(int(vt["row"][r]), int(vt["col"][r])) for r in rows] == [tuple(p["patch"])] * 2
    assert float(x.abs().max()) > 100 * float(x.abs().median())
