"""The example plans run unchanged on the tiny model of each family added after LLaVA/OneVision/PaliGemma:
only ``model.source`` differs (the original families run them through the zoo models in test_examples_report).
One exception: partition_study's attention_flow asks for CLS attention, which only CLIP towers give here
(Idefics3/SmolVLM's and Gemma 3's SigLIP have no CLS; InternViT's is not read yet); the plan is refused with an error naming the
option and runs without it."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from embedlens.errors import PlanError
from embedlens.plan import load_plan, prepare, run_all

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ORIGINAL_SOURCE = "source: zoo:tiny-llava-clip"
NEW_FAMILIES = ("llava_next", "idefics3", "smolvlm", "internvl", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3", "mistral3",
                "llava_onevision1_5", "qwen3_5", "qwen3_vl_moe", "llava_pixtral", "gemma4", "glm4v", "glm4v_moe", "llama4",
                "llava_next_video", "molmo2")
TILED = {"llava_next": True, "idefics3": True, "smolvlm": True, "internvl": True,  # families whose images become several tiles
         "qwen2_vl": False, "qwen2_5_vl": False, "qwen3_vl": False, "gemma3": False, "mistral3": False,
         "llava_onevision1_5": False, "qwen3_5": False, "qwen3_vl_moe": False, "llava_pixtral": False, "gemma4": False,
         "glm4v": False, "glm4v_moe": False, "llama4": True, "llava_next_video": True,
         "molmo2": True}  # its low-res view (tile 0) and high-res crops (tile 1)
# towers whose CLS attention attention_flow can compute (CLIP's); InternViT has a CLS token, but not CLIP's modules
HAS_CLS = {"llava_next": True, "idefics3": False, "smolvlm": False, "internvl": False,
           "qwen2_vl": False, "qwen2_5_vl": False, "qwen3_vl": False, "gemma3": False, "mistral3": False,
           "qwen3_5": False, "qwen3_vl_moe": False, "llava_pixtral": False, "gemma4": False, "glm4v": False, "glm4v_moe": False,
           "llava_onevision1_5": False,  # its per-image class token is dropped before the merger, no CLS attention
           "llava_next_video": True,
           "llama4": False,  # its class token comes after the patches and is dropped before the pixel shuffle
           "molmo2": False}
CLS_OPTION = ", vit_cls_layer: -2"  # how partition_study.yaml asks attention_flow for CLS attention


@pytest.mark.slow
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_examples_run_unchanged_on_the_family(family, tmp_path):
    work = tmp_path / "examples"
    shutil.copytree(EXAMPLES, work)  # the plans read data files relative to themselves
    for name in ("quickstart", "partition_study", "pruning_study"):
        text = (EXAMPLES / f"{name}.yaml").read_text()
        assert text.count(ORIGINAL_SOURCE) == 1, f"{name}.yaml no longer names {ORIGINAL_SOURCE!r}"
        plan = work / f"{name}.yaml"
        text = text.replace(ORIGINAL_SOURCE, f"source: tiny:{family}")
        plan.write_text(text)
        if not HAS_CLS[family] and CLS_OPTION in text:
            # partition_study asks attention_flow for CLS attention, which a tower without CLS cannot give:
            # the plan is refused up front, naming the option; the rest of the plan runs without it
            with pytest.raises(PlanError, match=r"vit_cls_layer: .*has no CLS token"):
                prepare(load_plan(plan))
            plan.write_text(text.replace(CLS_OPTION, ""))
        out = tmp_path / "runs" / name
        run_all(load_plan(plan), out)
        manifests = list(out.rglob("manifest.json"))
        assert manifests, f"{name}: the run wrote no manifest"
        for m in manifests:
            meta = json.loads(m.read_text())
            assert f"tiny:{family}" in json.dumps(meta), f"{name}: {m} does not record the model source"
    # the lens table covers every tile the family makes, not only the first
    with open(tmp_path / "runs" / "quickstart" / "tokens.csv") as f:
        tiles = {int(row["tile"]) for row in csv.DictReader(f)}
    assert tiles == set(range(max(tiles) + 1)) and (max(tiles) > 0) == TILED[family], tiles
