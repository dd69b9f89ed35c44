"""The unsupported-architecture error lists what is supported and points to the guide, and the guide's
file references are real."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from embedlens.adapters import ADDING_A_FAMILY, adapter_for_architecture
from embedlens.errors import AdapterError
from embedlens.registry import adapters

ROOT = Path(__file__).resolve().parents[2]


def test_unsupported_architecture_lists_supported_and_points_to_the_guide():
    with pytest.raises(AdapterError) as e:
        adapter_for_architecture(["Glm4vForConditionalGeneration"], "glm4v")
    msg = str(e.value)
    assert msg.startswith("No adapter supports architecture Glm4vForConditionalGeneration. Supported: ")
    listed = msg.split("Supported: ", 1)[1].split(". To add", 1)[0].split(", ")
    assert listed == sorted({a for _, cls in adapters.items() for a in cls.architectures})  # each once (llava, llava_pixtral)
    for arch in ("LlavaNextForConditionalGeneration", "Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration",
                 "InternVLForConditionalGeneration", "Qwen2VLForConditionalGeneration",
                 "Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration", "Mistral3ForConditionalGeneration"):
        assert arch in listed
    assert msg.endswith(f"To add a family, see {ADDING_A_FAMILY}")
    assert (ROOT / ADDING_A_FAMILY).is_file()


def test_the_guide_names_files_and_functions_that_exist():
    text = (ROOT / ADDING_A_FAMILY).read_text()
    paths = set(re.findall(r"`((?:embedlens|tests|examples)/[\w/.-]+\.(?:py|yaml))`", text))
    assert len(paths) >= 10
    missing = [p for p in paths if "NAME" not in p and not (ROOT / p).is_file()]
    assert not missing, missing
    from embedlens.adapters.base import Adapter

    for name in ("image_layouts", "placeholder_text", "special_token_ids", "processor_text", "block_ids", "position_ids",
                 "load_processor", "grid", "patch_block", "capabilities", "has", "n_prefix_tokens", "tower_kwargs",
                 "tower_images", "site_value", "vision_layers_needed"):
        assert f"`{name}" in text and hasattr(Adapter, name), name


def test_the_guide_lists_every_capability_with_the_families_that_declare_it():
    """One row per `Capability` in the guide's capability table, naming exactly the registered adapters that declare it."""
    from embedlens.adapters import Capability

    text = (ROOT / ADDING_A_FAMILY).read_text()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([A-Z_]+)` \|.*\| ([^|]*) \|$", text, re.M)}
    assert set(rows) == {c.name for c in Capability}
    for cap in Capability:
        declared = sorted(name for name, cls in adapters.items() if cap in cls.capabilities)
        assert sorted(re.findall(r"`(\w+)`", rows[cap.name])) == declared, cap
