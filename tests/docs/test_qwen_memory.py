"""docs/real-checkpoints.md's Qwen2.5-VL-7B table is benchmarks/qwen_memory.py's output, and its token counts are
what Qwen's image processor gives for images of those sizes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("qwen_memory", ROOT / "benchmarks" / "qwen_memory.py")
qm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(qm)


def test_the_guide_shows_the_computed_table():
    text = (ROOT / "docs" / "real-checkpoints.md").read_text(encoding="utf-8")
    table = qm.table()
    assert table in text, "docs/real-checkpoints.md is stale: paste `PYTHONPATH=. python benchmarks/qwen_memory.py`"
    assert "8.29 B parameters" in table  # Qwen2.5-VL-7B's published size, from the model built on the meta device
    assert "arrives with its own change" not in text


@pytest.mark.parametrize("size, cap", [*((s, qm.MAX_PIXELS) for s in qm.SIZES), ((1920, 1080), qm.CAP)])
def test_token_counts_are_the_processors(size, cap):
    """Qwen2.5-VL's processor settings (14-px patches, 2 x 2 merge, temporal patch 2, the pixel bounds) run on an
    image of each size: its grid (t, h, w) over the 2 x 2 merge is the table's V."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ip = Qwen2VLImageProcessorPil(size={"shortest_edge": qm.MIN_PIXELS, "longest_edge": cap}, patch_size=14, merge_size=2,
                                  temporal_patch_size=2)
    image = Image.fromarray(np.full((size[1], size[0], 3), 128, dtype=np.uint8))
    t, h, w = ip(images=[image], return_tensors="pt")["image_grid_thw"][0].tolist()
    tokens, rw, rh = qm.visual_tokens(*size, max_pixels=cap)
    assert (t, h * 14, w * 14) == (1, rh, rw)
    assert t * h * w // 4 == tokens and tokens <= cap // (28 * 28)


def test_kv_cache_counts_the_key_value_heads():
    """Grouped-query attention: the cache holds 4 key/value heads of 128, not 28 (per token and layer: 2 x 4 x 128 x 2 bytes)."""
    one = qm.per_sample(1)["kv"] - qm.per_sample(0)["kv"]
    assert one == 28 * 2 * 4 * 128 * 2
