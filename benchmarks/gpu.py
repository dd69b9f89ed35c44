"""embedlens on a GPU: its own work against the model's, on 7B-shaped models built in bf16 on the device.

    PYTHONPATH=. python benchmarks/gpu.py                       # LLaVA-1.5-7B and Qwen2.5-VL-7B shapes, batch 1 and 8
    PYTHONPATH=. python benchmarks/gpu.py --device cpu --tiny   # the same cases on tiny models: a smoke test, seconds

Builds a randomly initialised LLaVA-1.5-7B-shaped model (`medium.MediumSpec`:
CLIP-L/14-336 with 24 tower layers, Llama 32 x 4096, MLP 11008, vocabulary
32064) and a Qwen2.5-VL-7B-shaped one (32-block windowed tower, 28 x 3584 with
M-RoPE, vocabulary 152064), in bf16 directly on the GPU, and times, at batch
1 and 8, CUDA-synchronised medians of `--reps`:

- HF's forward, and HF's language model + head on the engine's input embeddings;
- the engine's prefill without an intervention, and with half the visual tokens
  pruned, against HF's language model on the same embeddings with those rows
  removed and the original position ids (its own speed-up from the shorter
  sequence);
- the partition pass (layer-0 lens + anchor partition + ViT-norm rule), against
  HF's forward and against its floor (the tower up to the feature layer, the
  projector, one bf16 search and top-k);
- the embedding lens at every LLM layer with its table written (Parquet),
  against HF's forward;
- host synchronisations in one engine run (profiler: ``aten::item``,
  ``_local_scalar_dense``, ``nonzero`` and CUDA stream / device synchronisations).

Prints the table with the issue's targets and writes ``benchmarks/gpu_results.json``
naming the device. Exit 2, with a message, where CUDA is asked for and absent.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from medium import MediumSpec, medium_model  # noqa: E402

SINK, DEAD = [5, 6], [7, 8, 9]
SYNC_EVENTS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero", "cudaStreamSynchronize", "cudaDeviceSynchronize")
LLAVA_7B = MediumSpec(vocab_size=32_064, llm_hidden=4096, llm_layers=32, llm_intermediate=11_008, llm_heads=32,
                      vision_hidden=1024, vision_layers=24, vision_intermediate=4096, vision_heads=16)
LLAVA_TINY = MediumSpec(vocab_size=2000, llm_hidden=64, llm_layers=2, llm_intermediate=128, llm_heads=2,
                        vision_hidden=32, vision_layers=2, vision_intermediate=64, vision_heads=2)


def qwen_7b(device: str, dtype: torch.dtype):
    """A Qwen2.5-VL-7B-shaped model (random weights) and a processor for 336-px images (144 visual tokens)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from embedlens.adapters.qwen2_vl import Qwen2_5_VLImageProcessor
    from embedlens.testing.tiny import qwen_ids, qwen_image_processor, qwen_tokenizer

    tok = qwen_tokenizer()
    text = dict(vocab_size=152_064, hidden_size=3584, intermediate_size=18_944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, max_position_embeddings=32_768, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]})
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=3584, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **qwen_ids(tok))
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype).eval()
    proc = Qwen2_5_VLImageProcessor(qwen_image_processor(patch_size=14, max_side=336, min_side=336), tok, chat_template=tok.chat_template)
    return model, proc


def build(name: str, device: str, tiny: bool):
    """(adapter, image size) for "llava" or "qwen", on `device` (bf16 on a GPU, float32 on the CPU)."""
    from embedlens.adapters import wrap_model
    from embedlens.testing.tiny import tiny_model

    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    if name == "llava":
        model, proc = medium_model(LLAVA_TINY if tiny else LLAVA_7B, device=device, dtype=dtype)
        return wrap_model(model, proc), 336
    if tiny:
        model, proc = tiny_model("qwen2_5_vl")
        return wrap_model(model.to(device), proc), 64
    model, proc = qwen_7b(device, dtype)
    return wrap_model(model, proc), 336


def timed(cases: dict, reps: int, device: str) -> dict[str, float]:
    """Median seconds of each case over `reps` interleaved repetitions after a warm-up, synchronised on CUDA."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for fn in cases.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(reps):
        for k, fn in cases.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def count_syncs(fn, device: str) -> int:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    fn()
    with profile(activities=acts) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key in SYNC_EVENTS)


def _lm_call(adapter):
    """HF's language model + head on given input embeddings (`position_ids` as HF's own forward made them)."""
    from embedlens.adapters.base import resolve_path

    lm = resolve_path(adapter.model, adapter.paths.language_model)
    head = resolve_path(adapter.model, adapter.paths.unembed)
    seen: dict = {}

    def grab(module, args, kwargs):
        seen.update(kwargs)

    def run(embeds, position_ids, mask):
        with torch.no_grad():
            return head(lm(inputs_embeds=embeds, position_ids=position_ids, attention_mask=mask).last_hidden_state)

    return lm, grab, seen, run


def model_cases(name: str, adapter, size: int, batch_size: int, reps: int, device: str) -> dict:
    from embedlens.interventions.engine import Engine
    from embedlens.interventions.prune import Prune
    from embedlens.plan.store import Parts
    from embedlens.probes.embedding_lens import EmbeddingLens
    from embedlens.sites import Site
    from embedlens.tracing import collect
    from run import _image_batch, _partition_pass

    batch = _image_batch(adapter, batch_size, size)
    inputs = adapter.model_inputs(batch)
    engine = Engine(adapter)
    embeds = engine.embed(batch)
    vis = batch.roles.visual
    half_row = int(batch.roles.row[vis].max()) // 2 + 1 if vis.any() else 0
    prune = [Prune(tokens=f"visual & row < {half_row}")]
    keep = ~(vis & (batch.roles.row < half_row))  # [batch, seq]: the rows the pruned prefill keeps
    n_keep = keep.sum(1)
    if not bool((n_keep == n_keep[0]).all()):
        raise SystemExit("gpu.py: samples of one batch must keep the same number of tokens (same image size and question)")
    lm, grab, seen, lm_run = _lm_call(adapter)
    handle = lm.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        adapter.model(**inputs)
    handle.remove()
    seq = embeds.shape[1]
    pos = seen.get("position_ids")
    if pos is None:
        pos = torch.arange(seq, device=embeds.device).expand(embeds.shape[0], seq)
    mask = seen.get("attention_mask")
    mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    kb, kp = keep.to(embeds.device).nonzero(as_tuple=True)  # once, before timing
    kp = kp.view(embeds.shape[0], -1)
    short = embeds.gather(1, kp[..., None].expand(-1, -1, embeds.shape[-1]))
    short_pos = pos.gather(pos.dim() - 1, kp.expand(*pos.shape[:-2], -1, -1)) if pos.dim() == 3 else pos.gather(1, kp)
    short_mask = mask.gather(1, kp) if mask is not None else None

    def hf():
        with torch.no_grad():
            adapter.model(**inputs)

    n = adapter.n_llm_layers
    vocab = adapter.input_embeddings().detach()
    vt = batch.roles.visual_tokens()
    s_idx, p_idx = vt["sample"].to(embeds.device), vt["position"].to(embeds.device)
    vocab_bf16 = vocab.to(torch.bfloat16)

    def floor():  # tower up to the feature layer + projector + one bf16 search and top-k
        acts = collect(adapter, batch, [Site("llm.embed")])
        x = acts[Site("llm.embed")][s_idx, p_idx].to(torch.bfloat16)
        (x @ vocab_bf16.T).topk(3, dim=-1)

    tmp = Path(tempfile.mkdtemp(prefix="embedlens-gpu-"))
    written = [0]

    def lens_all():
        lens = EmbeddingLens(k=3, layers=list(range(n + 1)))
        acts = collect(adapter, batch, lens.sites(adapter))
        Parts(tmp).table("tokens", lens.update(adapter, batch, acts)["tokens"], written[0])
        written[0] += 1

    t = timed({
        "hf_forward": hf,
        "hf_lm_head": lambda: lm_run(embeds, pos, mask),
        "hf_lm_head_half": lambda: lm_run(short, short_pos, short_mask),
        "engine_prefill": lambda: engine.run(batch, embeds=embeds),
        "engine_half_pruned": lambda: engine.run(batch, prune, embeds=embeds),
        "partition_pass": _partition_pass(adapter, batch),
        "partition_floor": floor,
        "lens_all_layers_tables": lens_all,
    }, reps, device)
    syncs = count_syncs(lambda: engine.run(batch, embeds=embeds), device)
    hf_gain = t["hf_lm_head"] / t["hf_lm_head_half"]
    eng_gain = t["engine_prefill"] / t["engine_half_pruned"]
    tag = f"{name} b{batch_size}"
    rows = [
        (f"{tag}: HF forward (ms)", 1000 * t["hf_forward"], None, None),
        (f"{tag}: engine prefill / HF LM + head, same embeddings", t["engine_prefill"] / t["hf_lm_head"], "<=", 1.05),
        (f"{tag}: engine pruning speed-up / HF's from the same shorter sequence ({eng_gain:.2f}x / {hf_gain:.2f}x)",
         eng_gain / hf_gain, ">=", 0.9),
        (f"{tag}: partition pass / HF forward", t["partition_pass"] / t["hf_forward"], "<=", 0.15 if batch_size >= 8 else None),
        (f"{tag}: partition pass / its floor (tower + projector + bf16 search)", t["partition_pass"] / t["partition_floor"], "<=", 1.3),
        (f"{tag}: all-layer embedding lens, table written / HF forward", t["lens_all_layers_tables"] / t["hf_forward"], "<=", 2.0),
        (f"{tag}: host syncs per engine run ({n} layers)", float(syncs), None, None),
    ]
    return {"times_s": t, "seq": seq, "visual_tokens": int(vis.sum()), "kept_tokens": int(n_keep.sum()),
            "host_syncs_engine_run": syncs, "rows": rows}


def table(rows) -> str:
    lines = ["| case | measured | target | met |", "|---|---|---|---|"]
    for name, value, op, target in rows:
        met = "info" if op is None or target is None else ("yes" if (value <= target if op == "<=" else value >= target) else "NO")
        lines.append(f"| {name} | {value:.2f} | {'' if op is None or target is None else f'{op} {target}'} | {met} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny: the smoke test)")
    p.add_argument("--tiny", action="store_true", help="tiny models in place of the 7B shapes (seconds on a CPU)")
    p.add_argument("--models", nargs="*", default=["llava", "qwen"], choices=["llava", "qwen"])
    p.add_argument("--batch-sizes", nargs="*", type=int, default=[1, 8])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "gpu_results.json")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu.py: --device {args.device} but this torch ({torch.__version__}) sees no CUDA device; run it on a GPU "
              "machine, or use --device cpu --tiny for the smoke test", file=sys.stderr)
        return 2
    if args.device == "cpu" and not args.tiny:
        print("gpu.py: the 7B shapes need a GPU; on the CPU use --tiny (the smoke test)", file=sys.stderr)
        return 2
    started = time.perf_counter()
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else (platform.processor() or platform.machine())
    res: dict = {"device": device_name, "device_arg": args.device, "tiny": args.tiny, "torch": torch.__version__,
                 "cuda": torch.version.cuda, "python": platform.python_version(), "reps": args.reps, "models": {}}
    rows: list = []
    with torch.inference_mode(False), torch.no_grad():
        for name in args.models:
            t0 = time.perf_counter()
            adapter, size = build(name, args.device, args.tiny)
            built = time.perf_counter() - t0
            res["models"][name] = {"build_s": built, "batches": {}}
            for bs in args.batch_sizes:
                r = model_cases(name, adapter, size, bs, args.reps, args.device)
                res["models"][name]["batches"][str(bs)] = r
                rows += r["rows"]
            del adapter
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    res["total_s"] = time.perf_counter() - started
    res["table"] = table(rows)
    args.out.write_text(json.dumps(res, indent=2, default=str))
    print(res["table"])
    print(f"\n{res['total_s']:.0f} s on {device_name}; JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
