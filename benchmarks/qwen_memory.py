"""Qwen2.5-VL-7B's visual tokens and memory per image size, computed (no download, no GPU): the table in
docs/real-checkpoints.md ("Qwen2.5-VL-7B: tokens and memory per image size").

- The model: `Qwen2_5_VLForConditionalGeneration` built on the meta device (shapes only) from a config
  with Qwen/Qwen2.5-VL-7B-Instruct's sizes, written out below; its parameters are counted, not quoted.
- Visual tokens: the processor's own resize rule (transformers' ``smart_resize``: sides to multiples of
  14 x 2 = 28 pixels, the area scaled into [min_pixels, max_pixels]), one token per 28 x 28 pixels.
- Memory per sample, bf16: the same terms as the LLaVA table above it, with Qwen2.5-VL's grouped-query
  attention (4 key/value heads of 28) in the KV cache, and the vision tower's own terms (it runs on the
  4 x tokens patches before the 2 x 2 merge; 4 of its 32 layers attend over the whole image).

Run: ``PYTHONPATH=. python benchmarks/qwen_memory.py`` prints the Markdown table.
"""

from __future__ import annotations

import sys

#: Qwen/Qwen2.5-VL-7B-Instruct's config.json, the entries that set a shape.
TEXT = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
            vocab_size=152064, tie_word_embeddings=False, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])
#: Its preprocessor_config.json: the processor's pixel bounds.
MIN_PIXELS, MAX_PIXELS = 3136, 12845056
#: Image sizes of the table (width x height), and the cap a plan sets with model.processor_kwargs.
SIZES = [(448, 448), (672, 672), (1008, 1008), (1344, 1344), (1920, 1080)]
CAP = 802816  # 1024 x 28 x 28: at most 1,024 visual tokens
TEXT_TOKENS = 64
BYTES = 2  # bf16
GIB, MIB = 1024**3, 1024**2


def config():
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(text_config=TEXT, vision_config=VISION)


def parameter_count(cfg) -> int:
    """Parameters of the model built from `cfg` on the meta device (no memory, no download)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    return sum(p.numel() for p in model.parameters())


def visual_tokens(width: int, height: int, max_pixels: int = MAX_PIXELS, min_pixels: int = MIN_PIXELS) -> tuple[int, int, int]:
    """``(tokens, resized width, resized height)`` by the processor's own rule."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize  # the PIL processor: no torchvision

    factor = VISION["patch_size"] * VISION["spatial_merge_size"]
    h, w = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return (h // factor) * (w // factor), w, h


def per_sample(v: int) -> dict[str, float]:
    """Bytes per sample at `v` visual tokens (the LLaVA table's terms, Qwen2.5-VL-7B's sizes)."""
    d, L, H, kv = TEXT["hidden_size"], TEXT["num_hidden_layers"], TEXT["num_attention_heads"], TEXT["num_key_value_heads"]
    head = d // H
    s = v + TEXT_TOKENS
    p = 4 * v  # vision patches before the 2 x 2 merge
    vd, vh = VISION["hidden_size"], VISION["num_heads"]
    out = {
        "streams": (L + 1) * s * d * BYTES,  # residual stream of every LLM layer
        "mlp": 3 * s * TEXT["intermediate_size"] * BYTES,  # one LLM layer's MLP intermediates (transient)
        "attn_eager": H * s * s * BYTES,  # one LLM layer's attention probabilities, eager only
        "kv": 2 * L * s * kv * head * BYTES,  # KV cache: 4 key/value heads (GQA)
        "tower": 3 * p * VISION["intermediate_size"] * BYTES + 2 * p * vd * BYTES,  # one tower layer's MLP + stream
        "tower_eager": vh * p * p * BYTES,  # a full-attention tower layer's probabilities, eager only
        "logits": v * TEXT["vocab_size"] * 4,  # logit lens, one layer's visual-token logits in float32
    }
    out["probe_sdpa"] = out["streams"] + max(out["mlp"], out["tower"]) + out["logits"]
    out["probe_eager"] = out["streams"] + max(out["mlp"], out["attn_eager"], out["tower"] + out["tower_eager"]) + out["logits"]
    return out


def _mib(x: float) -> str:
    return f"{x / MIB:,.0f} MiB" if x < 10 * GIB else f"{x / GIB:,.1f} GiB"


def table() -> str:
    """The Markdown the guide shows."""
    n = parameter_count(config())
    cols = [(w, h, MAX_PIXELS) for w, h in SIZES] + [(1920, 1080, CAP)]
    heads, per = [], []
    for w, h, cap in cols:
        v, rw, rh = visual_tokens(w, h, cap)
        heads.append(f"{w} x {h}" + (" capped" if cap != MAX_PIXELS else "") + f"<br>({rw} x {rh}: V = {v:,})")
        per.append(per_sample(v))
    lines = [f"Weights: {n / 1e9:.2f} B parameters x 2 bytes = {n * BYTES / GIB:.1f} GiB (bf16), once. Per sample, on top "
             f"({TEXT_TOKENS} text tokens besides the V visual tokens):", "",
             "| term | " + " | ".join(heads) + " |", "|---|" + "---|" * len(cols)]
    rows = [("residual stream of every LLM layer (29 x S x 3584 x 2)", "streams"),
            ("one LLM layer's MLP intermediates (3 x S x 18944 x 2)", "mlp"),
            ("one LLM layer's attention probabilities, eager only (28 x S^2 x 2)", "attn_eager"),
            ("KV cache, conditions that score or decode (2 x 28 x S x 4 x 128 x 2)", "kv"),
            ("one tower layer's MLP and stream (4V patches: (3 x 3420 + 2 x 1280) x 4V x 2)", "tower"),
            ("a full-attention tower layer's probabilities, eager only (16 x (4V)^2 x 2)", "tower_eager"),
            ("logit lens, one layer's visual-token logits, float32 (V x 152064 x 4)", "logits"),
            ("**probe pass, sdpa** (streams + largest transient + logits)", "probe_sdpa"),
            ("**probe pass, eager**", "probe_eager")]
    for label, key in rows:
        lines.append(f"| {label} | " + " | ".join(_mib(p[key]) for p in per) + " |")
    lines.append("| batch of 4 with conditions (probe pass + KV cache), sdpa | "
                 + " | ".join(_mib(4 * (p["probe_sdpa"] + p["kv"])) for p in per) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(table())
