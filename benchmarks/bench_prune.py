"""Pruning by removal saves compute: prefill time with half of the visual tokens
removed vs the unpruned prefill, both timed in this run on the same model.

The model is a LLaVA-style model built offline where visual tokens dominate the
sequence (576 of them, as LLaVA-1.5's 24x24 grid, and a short question), with
a language model wide enough that its layers, not Python overhead, take the
time. The vision tower runs once; both sides time the LLM prefill on the same
input embeddings (`Engine.run(..., embeds=...)`).

Target: unpruned / pruned >= 1.5. Run: ``python benchmarks/bench_prune.py``
(exit status 1 when the target is missed). ``--json PATH`` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, SiglipVisionConfig
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from embedlens.adapters import wrap_model
from embedlens.data import Sample
from embedlens.interventions import Engine
from embedlens.interventions.prune import Prune
from embedlens.tokenizer import build_tokenizer
from embedlens.testing.images import shapes

TARGET = 1.5


def build(image: int = 336, patch: int = 14, hidden: int = 512, layers: int = 4):
    tok = build_tokenizer()
    config = LlavaConfig(
        vision_config=SiglipVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=image, patch_size=patch
        ),
        text_config=LlamaConfig(
            vocab_size=len(tok),
            hidden_size=hidden,
            intermediate_size=hidden * 11 // 4,
            num_hidden_layers=layers,
            num_attention_heads=8,
            num_key_value_heads=8,
            max_position_embeddings=2048,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        ),
        image_token_id=tok.image_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    processor = LlavaProcessor(
        image_processor=SiglipImageProcessorPil(size={"height": image, "width": image}, image_mean=[0.5] * 3, image_std=[0.5] * 3),
        tokenizer=tok,
        patch_size=patch,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        chat_template=tok.chat_template,
    )
    return wrap_model(model, processor)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    adapter = build()
    samples = [Sample([shapes(336, seed=i)], question="what is in the picture?", id=str(i)) for i in range(args.batch)]
    batch = adapter.encode(samples)
    eng = Engine(adapter)
    embeds = eng.embed(batch)
    n_visual = int(batch.roles.visual[0].sum())
    n_tokens = int((~batch.roles.padding[0]).sum())
    prune = [Prune(tokens="visual and index % 2 == 0")]
    with torch.inference_mode():
        base = timed(lambda: eng.run(batch, embeds=embeds), args.repeats)
        pruned = timed(lambda: eng.run(batch, prune, embeds=embeds), args.repeats)
        masked = timed(lambda: eng.run(batch, [Prune(tokens="visual and index % 2 == 0", mode="mask")], embeds=embeds), args.repeats)
    ratio = base / pruned
    result = {
        "visual_tokens": n_visual,
        "sequence": n_tokens,
        "batch": args.batch,
        "unpruned_s": base,
        "pruned_half_s": pruned,
        "masked_half_s": masked,  # same outputs as removal, no saving expected
        "speedup": ratio,
        "target": TARGET,
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    ok = ratio >= TARGET
    print(f"{'PASS' if ok else 'FAIL'}: prefill with half the visual tokens pruned is {ratio:.2f}x faster (target {TARGET}x)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
