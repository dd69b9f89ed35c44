"""Peak memory of the embedding lens and the partition on a Qwen2.5-VL-sized vocabulary (151,936 rows).

Runs in a fresh process (``python benchmarks/qwen_vocab.py``; `run.py --only qwen152k` calls it): a tiny random
`Qwen2_5_VLForConditionalGeneration` (embedlens's ``tiny:qwen2_5_vl``, hidden 64) whose text vocabulary is
151,936 rows, four 64-px images (64 visual tokens), the embedding lens at every layer (5 x 64 queries) and the
anchor partition with the ViT-norm rule on one trace. A thread samples the resident set (``/proc/self/statm``)
every millisecond while the lens and the partition run; the extra peak over the resident set before them is
compared with the chunked search's bound, ``queries x chunk_size + chunk_size x d`` float32 values, and with
the ``queries x vocab`` similarity matrix an unchunked search would hold.
"""

from __future__ import annotations

import json
import os
import threading
import time

import torch

VOCAB = 151_936
CHUNK = 4096  # nearest_vocab's default chunk_size


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> dict:
    from transformers import Qwen2_5_VLForConditionalGeneration

    from embedlens.adapters import wrap_model
    from embedlens.data import Sample
    from embedlens.groups import Partition
    from embedlens.probes.embedding_lens import EmbeddingLens
    from embedlens.testing import tiny_model
    from embedlens.testing.images import shapes
    from embedlens.tracing import collect

    torch.set_num_threads(int(os.environ.get("EMBEDLENS_BENCH_THREADS", "2")))
    small, processor = tiny_model("qwen2_5_vl")
    config = small.config
    config.text_config.vocab_size = VOCAB
    torch.manual_seed(0)
    adapter = wrap_model(Qwen2_5_VLForConditionalGeneration(config).eval(), processor)
    batch = adapter.encode([Sample([shapes(64, seed=i)], question="what is it?", id=f"s{i}") for i in range(4)], padding_side="left")
    n = adapter.n_llm_layers
    lens = EmbeddingLens(k=3, layers=list(range(n + 1)))
    part = Partition({"sink": [5, 6], "dead": [7, 8, 9]}, k=3, vit_norm="sink")
    acts = collect(adapter, batch, {*lens.sites(adapter), *part.sites(adapter)})
    lens.update(adapter, batch, acts)  # warm-up: first-call allocations are not the search's
    part.label(adapter, batch, acts=acts)
    queries = int(batch.roles.visual.sum()) * (n + 1)
    d = adapter.input_embeddings().shape[1]

    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    before = _rss()
    peak[0] = before
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    lens.update(adapter, batch, acts)
    part.label(adapter, batch, acts=acts)
    stop.set()
    t.join()
    mib = 1024 * 1024
    bound = (queries * CHUNK + CHUNK * d) * 4
    return {"vocab": VOCAB, "d_model": d, "queries": queries, "extra_peak_mib": (peak[0] - before) / mib,
            "chunk_bound_mib": bound / mib, "unchunked_mib": queries * VOCAB * 4 / mib}


if __name__ == "__main__":
    print("RESULT", json.dumps(main()))
