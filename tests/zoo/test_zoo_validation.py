"""The shipped checkpoints against the zoo's thresholds, on held-out images, through `embedlens zoo evaluate`'s code.

Held-out images come from seeds the training never saw (`Recipe.specs("heldout")`).
"""

from __future__ import annotations


import pytest

from embedlens.zoo.evaluate import THRESHOLDS, check, evaluate

# one xdist worker runs the whole module: its module-scoped fixture (the held-out evaluation of both checkpoints) is built once
pytestmark = pytest.mark.xdist_group("test_zoo_validation")

N_IMAGES = 200  # the held-out set the README and validation.md report (821 questions per model); 60 gave position 0.65 vs 0.775


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


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-llava-clip", "tiny-llava-siglip"])
def test_qa_accuracy_thresholds(validations, name):
    """CLIP >= 85% overall and >= 70% per type; SigLIP >= 80% / 60% (measured on 200 images: CLIP 0.993 with
    position 0.975 the lowest type, SigLIP 0.987 with position 0.945)."""
    th, qa = THRESHOLDS[name], validations[name]["qa"]["baseline"]
    assert qa["overall"] >= th["qa_overall"], qa
    assert min(v for t, v in qa.items() if t != "overall") >= th["qa_per_type"], qa


@pytest.mark.slow
def test_dead_tokens_are_the_background_patches(validations):
    """token_partition with discovered anchors (no ids given): dead vs background-patch precision and recall >= 0.9 (CLIP)."""
    p = validations["tiny-llava-clip"]["partition"]
    assert p["discovered_anchors"]["dead"], p
    assert p["precision"] >= 0.9 and p["recall"] >= 0.9, p


@pytest.mark.slow
def test_discovery_finds_the_filler_word_as_a_dead_anchor(validations):
    """On both variants the default discovery finds exactly one dead anchor, `background` (the word every
    background patch is during the LM's pretraining), no sink anchor, and dead tokens are the background patches."""
    for name, result in validations.items():
        p = result["partition"]
        assert p["discovered_anchors"] == {"sink": [], "dead": ["background"]}, (name, p)
        assert p["precision"] >= 0.95 and p["recall"] >= 0.95, (name, p)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-llava-clip", "tiny-llava-siglip"])
def test_object_tokens_land_on_their_words(validations, name):
    """The embedding lens at the LM input: the colour or shape word in the top 3 for >= half the object tokens
    of the CLIP variant (measured 0.997); SigLIP's is reported (1.000 on 200 images), held to 0.4 here."""
    bar = THRESHOLDS["tiny-llava-clip"]["lens_top3"] if name == "tiny-llava-clip" else 0.4
    assert validations[name]["lens"]["object_top3_colour_or_shape"] >= bar
    assert next(iter(validations[name]["lens"]["background_top1"])) == "background"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-llava-clip", "tiny-llava-siglip"])
def test_semantic_probe_reads_colour_from_object_tokens(validations, name):
    sp = validations[name]["semantic_probe"]
    assert sp["object_colour"]["accuracy"] >= 0.9, sp


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-llava-clip", "tiny-llava-siglip"])
def test_semantic_probe_reads_shape_from_object_tokens(validations, name):
    assert validations[name]["semantic_probe"]["object_shape"]["accuracy"] >= 0.9


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-llava-clip", "tiny-llava-siglip"])
def test_blind_is_far_below_seeing(validations, name):
    qa = validations[name]["qa"]
    assert qa["blind"]["overall"] < qa["baseline"]["overall"] - 0.2


@pytest.mark.slow
def test_background_tokens_carry_far_less_than_object_tokens_even_standardized(validations):
    """The alignment term pulls background tokens onto emb(background) (mean distance 4% of its norm), which
    attenuates what the tower mixed into them but does not erase it: on standardised features a probe still reads
    the nearest object's colour above chance (CLIP 0.47, chance 0.20), yet far below what object tokens carry."""
    for name, result in validations.items():
        sp = result["semantic_probe"]
        bg, obj = sp["background_nearest_colour_standardized"], sp["object_colour"]
        assert bg["accuracy"] is not None and bg["accuracy"] >= sp["background_nearest_colour"]["accuracy"] - 0.02, name
        assert bg["accuracy"] - bg["chance"] < 0.5 * (obj["accuracy"] - obj["chance"]), name


@pytest.mark.slow
def test_background_tokens_are_near_chance(validations):
    """The issue's "near chance" read as: within 0.1 of the majority-class rate, for colour and shape."""
    for name, result in validations.items():
        sp = result["semantic_probe"]
        for key in ("background_nearest_colour", "background_nearest_shape"):
            assert sp[key]["accuracy"] - sp[key]["chance"] <= 0.1, (name, key, sp[key])


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
        assert set(kept) == {"blind", "prune_dead", "prune_dead_random", "prune_alive", "mean_dead", "mean_dead_random", "mean_alive",
                             "mask_dead", "word_dead", "word_dead_random"}
        assert kept["blind"] == 0
        assert kept["prune_dead"] == pytest.approx(kept["prune_dead_random"])
        assert kept["mean_dead"] == kept["mean_alive"] == kept["mask_dead"] == kept["word_dead"] == n_tokens
        assert r["qa"]["mask_dead"] == r["qa"]["prune_dead"]  # blocked from attention == removed, question for question
        dead = r["partition"]["fractions"]["dead"]
        # the effects count every question, the partition every image once; they agree in expectation
        assert kept["prune_dead"] == pytest.approx(n_tokens * (1 - dead), abs=0.1 * n_tokens)
        assert (tmp_path / name / "validation.png").stat().st_size > 10_000
        assert "prune_dead_random" in (tmp_path / name / "validation.md").read_text()
