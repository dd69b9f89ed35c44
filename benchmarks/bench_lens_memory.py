"""The embedding lens over all layers of a 32k-vocabulary model never holds a [layers x tokens x vocab] tensor:
its peak extra memory is set by the chunk size the user chooses.

A LLaVA-style model is built offline with a 32,000-row vocabulary (LLaMA's
size), 576 visual tokens (LLaVA-1.5's 24x24 grid) and 8 LLM layers; the
activations of all 9 lens layers (0..8) are collected first. Then, in a
fresh process per chunk size, `EmbeddingLens.update` runs over all layers
while a thread samples the process's resident memory every millisecond; the
peak above the level just before the call is the lens's extra memory.

Baseline measured in the same run: ``chunk_size = vocab`` (no chunking), whose
similarity matrix for one layer is ``tokens x vocab``. Targets:

- chunk 1024 uses at most 1/4 of the unchunked extra memory;
- every chunked run stays below ``layers x tokens x vocab x 4`` bytes / 8
  (what holding all layers' similarities at once would need, with a wide margin);
- chunked runs use less than the unchunked one (the chunk size is the knob that bounds it).

Run: ``python benchmarks/bench_lens_memory.py`` (exit status 1 when a target is missed).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time

VOCAB = 32_000
LAYERS = 8
CHUNKS = (1024, 4096, VOCAB)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(chunk: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, SiglipVisionConfig
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from embedlens.adapters import wrap_model
    from embedlens.data import Sample
    from embedlens.probes import EmbeddingLens
    from embedlens.tokenizer import build_tokenizer
    from embedlens.testing.images import shapes
    from embedlens.tracing import collect

    torch.set_num_threads(2)
    tok = build_tokenizer()
    config = LlavaConfig(
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                         image_size=336, patch_size=14),
        text_config=LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=LAYERS,
                                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        image_token_id=tok.image_token_id, vision_feature_layer=-1, vision_feature_select_strategy="full",
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    processor = LlavaProcessor(
        image_processor=SiglipImageProcessorPil(size={"height": 336, "width": 336}, image_mean=[0.5] * 3, image_std=[0.5] * 3),
        tokenizer=tok, patch_size=14, vision_feature_select_strategy="full", num_additional_image_tokens=0,
        chat_template=tok.chat_template,
    )
    adapter = wrap_model(model, processor)
    batch = adapter.encode([Sample([shapes(336)], question="what is it?")])
    lens = EmbeddingLens(k=3, layers=list(range(LAYERS + 1)), chunk_size=chunk)
    acts = collect(adapter, batch, lens.sites(adapter))
    # warm-up: the math library's one-time workspaces are not what the chunk size controls
    lens.update(adapter, batch, acts)
    tokens = int(batch.roles.visual.sum())
    gc.collect()
    before = _rss()
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    t = threading.Thread(target=sample)
    t.start()
    start = time.perf_counter()
    lens.update(adapter, batch, acts)
    seconds = time.perf_counter() - start
    done.set()
    t.join()
    peak[0] = max(peak[0], _rss())
    return {"chunk_size": chunk, "tokens": tokens, "layers": LAYERS + 1, "vocab": VOCAB,
            "extra_mb": (peak[0] - before) / 2**20, "seconds": seconds}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # internal: measure one chunk size
    args = ap.parse_args(argv)
    if args.one is not None:
        print(json.dumps(measure(args.one)))
        return 0
    rows = []
    for chunk in CHUNKS:
        # blocks above 128 KiB are mapped and unmapped directly, so resident memory follows live tensors
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        out = subprocess.run([sys.executable, __file__, "--one", str(chunk)], capture_output=True, text=True, check=True, env=env)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]))
    by = {r["chunk_size"]: r["extra_mb"] for r in rows}
    tokens = rows[0]["tokens"]
    all_layers_mb = (LAYERS + 1) * tokens * VOCAB * 4 / 2**20
    checks = {
        "chunk 1024 <= 1/4 of unchunked": by[1024] <= by[VOCAB] / 4,
        "chunked runs < all-layers tensor / 8": all(v < all_layers_mb / 8 for c, v in by.items() if c < VOCAB),
        "grows with chunk size": by[1024] < by[VOCAB] and by[4096] < by[VOCAB],
    }
    result = {"extra_mb_by_chunk": by, "all_layers_tensor_mb": all_layers_mb, "checks": checks}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    ok = all(checks.values())
    print(f"{'PASS' if ok else 'FAIL'}: embedding_lens extra memory {by[1024]:.1f} MB at chunk 1024, "
          f"{by[VOCAB]:.1f} MB unchunked; holding every layer's similarities would take {all_layers_mb:.0f} MB")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
