"""The shipped checkpoints against the zoo's thresholds, on held-out images, through `embedlens zoo evaluate`'s code.

Held-out images come from seeds the training never saw (`Recipe.specs("heldout")`).
"""

from __future__ import annotations


import pytest

from embedlens.zoo.evaluate import THRESHOLDS, check, evaluate

N_IMAGES = 60  # every answerable question of each: about 250 questions per model


@pytest.fixture(scope="module")
def validations(tmp_path_factory):
    out = {}
    for name in ("tiny-llava-clip", "tiny-llava-siglip"):  # threads=1 (the default) pins torch and BLAS to one thread
        out[name] = evaluate(f"zoo:{name}", tmp_path_factory.mktemp(name), n_images=N_IMAGES, batch_size=16, pruning=False)
    return out


def test_evaluation_pins_and_restores_threads():
    import torch
    from threadpoolctl import threadpool_info

    from embedlens.zoo.evaluate import pinned_threads

    before = torch.get_num_threads()
    with pinned_threads(1):
        assert torch.get_num_threads() == 1
        assert all(p["num_threads"] == 1 for p in threadpool_info())
    assert torch.get_num_threads() == before


# Measured on 200 held-out images (embedlens/resources/zoo/*/validation.md): CLIP 51.6% overall, SigLIP 50.8%;
# count is solved (100%), colour/shape/position/word are not. Issue 6 stays open on these; the marker is strict,
# so a recipe that gets there turns these tests red until the marker is removed.
QA_NOT_MET = pytest.mark.xfail(strict=True, reason="issue 6 open: the staged recipe reaches ~51% held-out QA (count 100%, "
                               "colour/shape ~45%, position ~24%, word at chance)")


@pytest.mark.slow
@QA_NOT_MET
@pytest.mark.parametrize("name", ["tiny-llava-clip", "tiny-llava-siglip"])
def test_qa_accuracy_thresholds(validations, name):
    th, qa = THRESHOLDS[name], validations[name]["qa"]["baseline"]
    assert qa["overall"] >= th["qa_overall"], qa
    assert min(v for t, v in qa.items() if t != "overall") >= th["qa_per_type"], qa


@pytest.mark.slow
def test_dead_tokens_are_the_background_patches(validations):
    """token_partition with discovered anchors (no ids given): dead vs background-patch precision and recall >= 0.9 (CLIP)."""
    p = validations["tiny-llava-clip"]["partition"]
    assert p["discovered_anchors"]["dead"], p
    assert p["precision"] >= 0.9 and p["recall"] >= 0.9, p
    s = validations["tiny-llava-siglip"]["partition"]  # reported beside it: 0.92 / 0.90 on 200 images, 0.96 / 0.84 on 60
    assert s["precision"] >= 0.8 and s["recall"] >= 0.8, s


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-llava-clip", "tiny-llava-siglip"])
def test_object_tokens_land_on_their_words(validations, name):
    """The embedding lens at the LM input: the colour or shape word in the top 3 for >= half the object tokens."""
    assert validations[name]["lens"]["object_top3_colour_or_shape"] >= THRESHOLDS["tiny-llava-clip"]["lens_top3"]
    assert next(iter(validations[name]["lens"]["background_top1"])) == "background"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-llava-clip", "tiny-llava-siglip"])
def test_semantic_probe_reads_colour_from_object_tokens(validations, name):
    sp = validations[name]["semantic_probe"]
    assert sp["object_colour"]["accuracy"] >= 0.9, sp


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 6 open: a linear probe reads the shape under an object patch at 76% (CLIP) / "
                   "51% (SigLIP), not 90%: a patch sees a piece of the shape")
@pytest.mark.parametrize("name", ["tiny-llava-clip", "tiny-llava-siglip"])
def test_semantic_probe_reads_shape_from_object_tokens(validations, name):
    assert validations[name]["semantic_probe"]["object_shape"]["accuracy"] >= 0.9


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-llava-clip", "tiny-llava-siglip"])
def test_blind_is_far_below_seeing(validations, name):
    qa = validations[name]["qa"]
    assert qa["blind"]["overall"] < qa["baseline"]["overall"] - 0.2


@pytest.mark.slow
def test_background_tokens_carry_little_about_nearby_objects(validations):
    """Object tokens predict what is under them; pure background tokens (no object pixel) predict the nearest
    object's colour and shape much worse (chance = majority class). Measured: colour 0.99 on objects vs 0.36-0.44
    on background (chance 0.19): above chance, so the tower does leak context into background tokens."""
    for name, result in validations.items():
        sp = result["semantic_probe"]
        bg, obj = sp["background_nearest_colour"], sp["object_colour"]
        assert bg["accuracy"] - bg["chance"] < 0.5 * (obj["accuracy"] - obj["chance"]), name
        # shape is not asserted: object tokens read shape weakly (SigLIP 0.51, chance 0.35), no better than
        # background tokens read the nearest object's shape (0.47, chance 0.28)


def test_thresholds_are_those_of_the_issue():
    assert THRESHOLDS["tiny-llava-clip"]["qa_overall"] == 0.85 and THRESHOLDS["tiny-llava-clip"]["qa_per_type"] == 0.70
    assert THRESHOLDS["tiny-llava-siglip"]["qa_overall"] == 0.80 and THRESHOLDS["tiny-llava-siglip"]["qa_per_type"] == 0.60


def test_check_reports_each_missed_threshold():
    result = {"qa": {"baseline": {"colour": 0.9, "word": 0.5, "overall": 0.84}},
              "partition": {"precision": 0.95, "recall": 0.8}, "lens": {"object_top3_colour_or_shape": 0.7},
              "semantic_probe": {"object_colour": {"accuracy": 0.99}, "object_shape": {"accuracy": 0.5}}}
    bad = check(result, "tiny-llava-clip")
    assert len(bad) == 4 and any("word" in b for b in bad) and any("recall" in b for b in bad) and any("shape" in b for b in bad)


@pytest.mark.slow
def test_pruning_experiments_in_both_modes(tmp_path):
    """Every condition runs on both variants; removal keeps the tokens the partition leaves, mean replacement keeps
    all, the matched random control removes as many as its condition, blind removes all."""
    import json

    from embedlens.zoo import zoo_path

    for name in ("tiny-llava-clip", "tiny-llava-siglip"):
        vision = json.loads((zoo_path(name) / "config.json").read_text())["vision_config"]
        n_tokens = (vision["image_size"] // vision["patch_size"]) ** 2
        r = evaluate(f"zoo:{name}", tmp_path / name, n_images=10, batch_size=16, pruning=True)
        kept = r["tokens_kept"]
        assert set(kept) == {"blind", "prune_dead", "prune_dead_random", "prune_alive", "mean_dead", "mean_dead_random", "mean_alive"}
        assert kept["blind"] == 0
        assert kept["prune_dead"] == pytest.approx(kept["prune_dead_random"])
        assert kept["mean_dead"] == kept["mean_alive"] == n_tokens
        dead = r["partition"]["fractions"]["dead"]
        # the effects count every question, the partition every image once; they agree in expectation
        assert kept["prune_dead"] == pytest.approx(n_tokens * (1 - dead), abs=0.1 * n_tokens)
        assert (tmp_path / name / "validation.png").stat().st_size > 10_000
        assert "prune_dead_random" in (tmp_path / name / "validation.md").read_text()
