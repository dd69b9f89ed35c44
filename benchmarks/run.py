"""embedlens performance harness: one command, a table of ratios against targets, and a JSON file.

    PYTHONPATH=. python benchmarks/run.py                # everything (about 8-10 minutes on 2 CPU cores)
    PYTHONPATH=. python benchmarks/run.py --only lens    # one group: forward, siglip, lens, plans, memory, startup, reduction, validate

Every ratio is measured within one run: the cases being compared run in
interleaved repetitions (A B A B ...) and each case's time is the median of its
repetitions, so a slower or busier machine moves both sides together. Times
are wall-clock, or with `--clock cpu` this process's CPU time (robust on a
shared machine, best with `--threads 1`); the harness pins torch (and FAISS)
to `--threads` threads.
Results go to ``benchmarks/results.json`` (and the table to stdout).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from medium import MediumSpec, forward_flops, medium_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SINK, DEAD = [5, 6], [7, 8, 9]  # arbitrary anchor ids: the cost of the rule does not depend on them


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK = "wall"  # set by --clock


def interleaved(cases: dict[str, Callable[[], object]], reps: int, warm_up: bool = True,
                clock: str | None = None) -> dict[str, float]:
    """Median time of each case over `reps` interleaved repetitions (after one untimed warm-up each).

    `clock` is ``"wall"`` (elapsed time) or ``"cpu"`` (this process's CPU time, all its threads):
    on a machine other processes share, CPU time is what a case costs, while wall time also counts
    the time the case waited for a core. Default: `--clock`.
    """
    now = CLOCKS[clock or CLOCK]
    for fn in cases.values() if warm_up else ():
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(reps):
        for name, fn in cases.items():
            t = now()
            fn()
            times[name].append(now() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


PROFILE = False  # set by --profile


def profile_split(cases: dict[str, Callable[[], object]], adapter) -> dict:
    """Where each case's CPU time goes, one run after a warm-up: the time inside the vision tower, the
    projector, the language model and the head (forward hooks; a module a stopped trace never finishes is not
    counted), the rest (the vocabulary search and the probes' own work: everything outside the model), and the
    top operators by self CPU time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    from embedlens.adapters.base import resolve_path

    parts = {"vision tower": resolve_path(adapter.model, adapter.paths.vision_layers.rsplit(".", 2)[0]),
             "projector": resolve_path(adapter.model, adapter.paths.projector),
             "language model": resolve_path(adapter.model, adapter.paths.language_model),
             "head": resolve_path(adapter.model, adapter.paths.unembed)}
    out = {}
    for name, fn in cases.items():
        fn()
        spent = dict.fromkeys(parts, 0.0)
        started: dict[str, float] = {}
        handles = []
        for label, module in parts.items():
            handles.append(module.register_forward_pre_hook(lambda m, a, label=label: started.__setitem__(label, time.process_time())))
            handles.append(module.register_forward_hook(
                lambda m, a, o, label=label: spent.__setitem__(label, spent[label] + time.process_time() - started.pop(label))))
        try:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.process_time()
                fn()
                total = time.process_time() - t0
        finally:
            for h in handles:
                h.remove()
        split = {k: round(v, 3) for k, v in spent.items() if v}
        split["outside the model (vocabulary search, probes)"] = round(total - sum(spent.values()), 3)
        top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
        out[name] = {"total_s": round(total, 3), "split_s": split,
                     "top_ops": [(e.key, round(e.self_cpu_time_total / 1e6, 3), e.count) for e in top]}
    return out


def _image_batch(adapter, n: int, size: int, seed: int = 0):
    from embedlens.data import Sample
    from embedlens.testing.images import shapes

    samples = [Sample([shapes(size, seed=seed + i)], question="what is in the picture?", id=f"b{i}") for i in range(n)]
    return adapter.encode(samples, padding_side="left")


def _partition_pass(adapter, batch, search: str = "exact") -> Callable[[], object]:
    """The EmbedLens partition plan pass: layer-0 lens, anchor partition and ViT-norm rule, on one trace."""
    from embedlens.groups import Partition
    from embedlens.probes.embedding_lens import EmbeddingLens
    from embedlens.tracing import collect

    def fn():
        lens = EmbeddingLens(k=3, layers=[0], search=search)
        # the partition's own anchor search follows `search` once groups.Partition takes it
        extra = {"search": search} if "search" in getattr(Partition, "__dataclass_fields__", {}) else {}
        part = Partition({"sink": SINK, "dead": DEAD}, k=3, vit_norm="sink", **extra)
        sites = {*lens.sites(adapter), *part.sites(adapter)}
        acts = collect(adapter, batch, sites)
        lens.update(adapter, batch, acts)
        return part.label(adapter, batch, acts=acts)

    return fn


def _partition_takes_search() -> bool:
    from embedlens.groups import Partition

    return "search" in getattr(Partition, "__dataclass_fields__", {})


# -- groups of cases -----------------------------------------------------------------------
def forward_cases(reps: int) -> dict:
    """Medium CLIP model, batch 1: early-stopped passes and the engine's pruning, against a plain HF forward."""
    from embedlens.adapters import wrap_model
    from embedlens.interventions.engine import Engine
    from embedlens.interventions.prune import Prune
    from embedlens.tracing import collect

    spec = MediumSpec()
    model, processor = medium_model(spec)
    adapter = wrap_model(model, processor)
    batch = _image_batch(adapter, 1, spec.image_size)
    inputs = adapter.model_inputs(batch)
    engine = Engine(adapter)
    embeds = engine.embed(batch)  # the prefill cases time the LLM on the same input embeddings
    half = [Prune(tokens=f"visual & row < {spec.image_size // 14 // 2}")]
    layers = [f"llm.layers[{i}]" for i in range(adapter.n_llm_layers)]

    def hf():
        with torch.no_grad():
            model(**inputs)

    t = interleaved({
        "hf_forward": hf,
        "partition_pass": _partition_pass(adapter, batch),
        "partition_pass_approx": _partition_pass(adapter, batch, "approximate"),
        "llm_layers_pass": lambda: collect(adapter, batch, layers),
        "engine_prefill": lambda: engine.run(batch, embeds=embeds),
        "engine_prefill_half_pruned": lambda: engine.run(batch, half, embeds=embeds),
    }, reps)
    flops = forward_flops(spec, batch.input_ids.shape[1])
    prof = profile_split({"hf_forward": hf, "partition_pass": _partition_pass(adapter, batch)}, adapter) if PROFILE else None
    return {
        "profile": prof,
        "times_s": t,
        "gflops": {k: round(v / 1e9, 1) for k, v in flops.items()},
        "rows": [
            ("partition plan pass (lens 0 + partition + ViT norm) / HF forward", t["partition_pass"] / t["hf_forward"], "<=", 0.4),
            ("  same, lens with search: approximate" + ("" if _partition_takes_search() else " (partition's search exact)"), t["partition_pass_approx"] / t["hf_forward"], "<=", 0.4),
            ("pass reading every LLM layer (no logits) / HF forward", t["llm_layers_pass"] / t["hf_forward"], "<=", 0.9),
            ("engine LLM prefill (vision tower excluded) / HF forward (info)", t["engine_prefill"] / t["hf_forward"], None, None),
            ("engine prefill: unpruned / half visual tokens pruned", t["engine_prefill"] / t["engine_prefill_half_pruned"], ">=", 1.8),
        ],
    }


def siglip_cases(reps: int) -> dict:
    """The SigLIP-tower variant (729 visual tokens): the partition pass against a plain forward."""
    from embedlens.adapters import wrap_model

    spec = MediumSpec(tower="siglip")
    model, processor = medium_model(spec)
    adapter = wrap_model(model, processor)
    batch = _image_batch(adapter, 1, spec.image_size)
    inputs = adapter.model_inputs(batch)

    def hf():
        with torch.no_grad():
            model(**inputs)

    t = interleaved({"hf_forward": hf, "partition_pass": _partition_pass(adapter, batch)}, reps)
    prof = profile_split({"hf_forward": hf, "partition_pass": _partition_pass(adapter, batch)}, adapter) if PROFILE else None
    flops = forward_flops(spec, batch.input_ids.shape[1])
    return {"profile": prof, "times_s": t, "gflops": {k: round(v / 1e9, 1) for k, v in flops.items()}, "rows": [
        ("SigLIP 729 tokens: partition plan pass / HF forward", t["partition_pass"] / t["hf_forward"], "<=", 0.4)]}


def _clustered_vocab(n_vocab: int, d: int, seed: int = 0) -> torch.Tensor:
    """A vocabulary in clusters of ~20 rows with a decaying spectrum (as trained embedding matrices have)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.arange(1, d + 1).float() ** -0.5
    centres = torch.randn(n_vocab // 20, d, generator=g) * scale * 4
    return centres[torch.randint(len(centres), (n_vocab,), generator=g)] + torch.randn(n_vocab, d, generator=g) * scale


def lens_cases(reps: int, vocab_size: int, n_layers: int | None) -> dict:
    """All-layer embedding lens search, exact vs approximate, on the medium model's hidden states.

    Three settings, each `[vocab_size, 1024]`: a random Gaussian matrix (the
    model's own initialisation: no structure, the worst case for any index)
    with the model's hidden states as queries; a clustered matrix (structure
    like a trained one's) with the same queries (which lie nowhere near its
    rows); and the clustered matrix with queries near its rows (a visual token
    that resembles a word: the case the lens is read for).
    """
    from embedlens.adapters import wrap_model
    from embedlens.probes.embedding_lens import lens_site
    from embedlens.vocab import nearest_vocab
    from embedlens.vocab_index import clear_cache, default_n_probe, recall_at_k, vocab_index
    from embedlens.tracing import collect

    spec = MediumSpec()
    model, processor = medium_model(spec)
    adapter = wrap_model(model, processor)
    batch = _image_batch(adapter, 1, spec.image_size)
    n = adapter.n_llm_layers
    layers = list(range(n + 1)) if n_layers is None else [round(i * n / (n_layers - 1)) for i in range(n_layers)]
    acts = collect(adapter, batch, [lens_site(layer) for layer in layers])
    vt = batch.roles.visual_tokens()
    x = torch.cat([acts[lens_site(layer)][vt["sample"], vt["position"]] for layer in layers])  # [layers * 576, d]
    d = x.shape[1]
    del model, adapter, acts
    out: dict = {"layers": layers, "queries": x.shape[0], "rows": [], "settings": {}}
    g = torch.Generator().manual_seed(1)
    clustered = _clustered_vocab(vocab_size, d)
    near = clustered[torch.randint(vocab_size, (x.shape[0],), generator=g)]  # queries near vocabulary rows
    near = near + 0.5 * near.norm(dim=-1, keepdim=True) / d**0.5 * torch.randn(near.shape, generator=g)
    settings = (("gaussian, model queries", torch.randn(vocab_size, d, generator=g) * 0.02, x),
                ("clustered, model queries", clustered, x),
                ("clustered, queries near rows", clustered, near))
    built: dict[int, float] = {}
    for label, vocab, queries in settings:
        if id(vocab) not in built:  # the index is built once per matrix (and cached), as in a run
            clear_cache()
            t0 = time.perf_counter()
            vocab_index(vocab)
            built[id(vocab)] = time.perf_counter() - t0
        exact: list[torch.Tensor] = []
        approx: dict[int, torch.Tensor] = {}
        default = default_n_probe(vocab_index(vocab).n_lists)
        probes = (default, 2 * default)

        def run_exact(vocab=vocab, queries=queries):
            exact.append(nearest_vocab(queries, vocab, 3)[1])

        def run_approx(n_probe, vocab=vocab, queries=queries):
            approx[n_probe] = nearest_vocab(queries, vocab, 3, search="approximate", n_probe=n_probe)[1]

        t = interleaved({"exact": run_exact, **{f"approx_nprobe{p}": (lambda p=p: run_approx(p)) for p in probes}},
                        reps, warm_up=False)
        res = {"build_s": built[id(vocab)], "n_lists": vocab_index(vocab).n_lists, "times_s": t}
        for n_probe in probes:
            rec = res[f"recall@3_nprobe{n_probe}"] = recall_at_k(approx[n_probe], exact[-1])
            which = "default" if n_probe == default else "2x default"
            name = f"{vocab_size // 1000}k {label}: approximate lens (n_probe {n_probe}, {which}) speed-up / recall@3"
            out["rows"].append((name, t["exact"] / t[f"approx_nprobe{n_probe}"], ">=", 4.0, rec, 0.99))
        out["settings"][label] = res
    clear_cache()
    return out


def _plan_yaml(source: str, n: int, batch_size: int, kind: str, size: int, out: Path) -> Path:
    if kind == "quickstart":
        probes = "  - name: embedding_lens\n    params: {k: 3, layers: [0, 4, 8]}\n"
    else:
        probes = ("  - name: embedding_lens\n    params: {k: 3, layers: [0]}\n"
                  f"  - name: token_partition\n    params: {{anchors: {{sink: {SINK}, dead: {DEAD}}}, vit_norm: sink}}\n")
    text = (f"model: {{source: {source}}}\ndata:\n  synthetic: {{n: {n}, seed: 1, size: {size}}}\n  padding_side: left\n"
            f"probes:\n{probes}output:\n  dir: {out}\n  figures: false\n  report: false\nbatch_size: {batch_size}\nseed: 0\n")
    path = out.with_suffix(".yaml")
    path.write_text(text)
    return path


def reduction_cases(reps: int, budgets: tuple[int, ...] = (192, 128, 64)) -> dict:
    """Medium CLIP model (576 visual tokens), batch 1: the LLM prefill's CPU time at every token against the same
    prefill keeping `budgets` tokens (the first ones by `prune`, and a random draw of as many by the matched
    control), all on the same input embeddings; the clock is process CPU time whatever `--clock` says (the issue's
    measure). Also the engine's own measurement (`Outcome.stopwatch`, what the `prefill_time` metric reports)."""
    from embedlens.adapters import wrap_model
    from embedlens.interventions.engine import Engine
    from embedlens.interventions.prune import Prune, PruneRandomMatched

    spec = MediumSpec()
    model, processor = medium_model(spec)
    adapter = wrap_model(model, processor)
    batch = _image_batch(adapter, 1, spec.image_size)
    engine = Engine(adapter)
    embeds = engine.embed(batch)
    n = int(batch.roles.visual[0].sum())
    cases: dict[str, Callable[[], object]] = {"keep_all": lambda: engine.run(batch, embeds=embeds)}
    own: dict[str, list[float]] = {"keep_all": []}
    for k in budgets:
        drop = f"visual and index >= {k}"
        cases[f"prune_{k}"] = lambda drop=drop: engine.run(batch, [Prune(tokens=drop)], embeds=embeds)
        cases[f"random_{k}"] = lambda drop=drop: engine.run(batch, [PruneRandomMatched(target=drop, exclude_target=False)], embeds=embeds)
    # the engine's own stopwatch, read after each run: the number the plan's `prefill_time` metric writes
    timed = {name: (lambda fn=fn, name=name: own.setdefault(name, []).append(fn().stopwatch.read()["prefill_ms"])) for name, fn in cases.items()}
    t = interleaved(timed, reps, clock="cpu")  # Engine.run is no_grad (inference mode would hide the tensors' versions it reads)
    engine_ms = {name: statistics.median(v[1:]) for name, v in own.items()}  # [0] is the warm-up
    rows = []
    for k in budgets:
        target = (">=", 3.0) if k == 64 else (None, None)
        rows.append((f"LLM prefill CPU time, {n} / {k} visual tokens (prune)", t["keep_all"] / t[f"prune_{k}"], *target))
        rows.append((f"LLM prefill CPU time, {n} / {k} visual tokens (random at the budget)", t["keep_all"] / t[f"random_{k}"], *target))
        rows.append((f"  same, the engine's stopwatch (prefill_time metric), prune {k}", engine_ms["keep_all"] / engine_ms[f"prune_{k}"], None, None))
    return {"visual_tokens": n, "sequence": int(batch.input_ids.shape[1]), "cpu_times_s": t, "engine_prefill_ms": engine_ms, "rows": rows}


def plan_cases(tmp: Path, n_b1: int, n_b8: int) -> dict:
    """Images per second of the quickstart and partition plans (medium CLIP model), batch 1 and 8."""
    from embedlens.plan import load_plan, prepare, run

    spec = MediumSpec()
    model, processor = medium_model(spec)
    folder = tmp / "medium-clip"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    del model
    res, rows = {}, []
    for kind in ("quickstart", "partition"):
        for bs, n in ((1, n_b1), (8, n_b8)):
            plan = _plan_yaml(str(folder), n, bs, kind, spec.image_size, tmp / f"{kind}-b{bs}")
            prepared = prepare(load_plan(plan))
            t = time.perf_counter()
            run(prepared, overwrite=True)
            dt = time.perf_counter() - t
            res[f"{kind}_b{bs}"] = {"images": n, "seconds": dt, "images_per_s": n / dt}
            rows.append((f"{kind} plan, batch {bs}: images/s (info)", n / dt, None, None))
            del prepared
    return {"runs": res, "rows": rows}


# The child's own peak: VmHWM, the high-water mark of its address space, which exec starts afresh. Not
# getrusage's ru_maxrss: Linux carries a forked child's maxrss over from the parent at the fork, through exec, so
# a child of the harness (gigabytes after the medium-model groups) reported the parent's peak for 20 and for 200
# images alike (a ratio of 1.00 that measured nothing).
_MEMORY_CHILD = """
import resource, sys
from embedlens.plan import load_plan, prepare, run
prepared = prepare(load_plan(sys.argv[1]))
run(prepared, overwrite=True)
try:
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
except OSError:  # not Linux: there ru_maxrss is this process's own (in bytes on macOS)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // (1024 if sys.platform == "darwin" else 1)
print("PEAK_KB", peak)
"""


def memory_cases(tmp: Path, source: str, size: int, counts: tuple[int, int]) -> dict:
    """Peak resident memory of the partition plan over few vs many images, each in a fresh process."""
    peaks = {}
    for n in counts:
        plan = _plan_yaml(source, n, 8, "partition", size, tmp / f"memory-{n}")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(plan)], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        peaks[n] = int(proc.stdout.split("PEAK_KB")[-1].split()[0]) / 1024
    a, b = counts
    return {"peak_mib": peaks, "model": source, "rows": [
        (f"peak memory, partition plan: {b} / {a} images ({source})", peaks[b] / peaks[a], "<=", 1.10)]}


def startup_cases(reps: int) -> dict:
    """`embedlens --help` wall time against `python -c pass`, in fresh processes."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def call(args):
        return lambda: subprocess.run([sys.executable, *args], env=env, capture_output=True, check=True)

    t = interleaved({"python": call(["-c", "pass"]),
                     "help": call(["-c", "import sys; sys.argv=['embedlens','--help']\nfrom embedlens.cli import main\ntry: main()\nexcept SystemExit: pass"])},
                    reps, clock="wall")  # the work is in child processes: this process's CPU time would not see it
    return {"times_s": t, "rows": [("embedlens --help minus python -c pass (s)", t["help"] - t["python"], "<=", 1.5)]}


def validate_cases(tmp: Path, reps: int) -> dict:
    """`embedlens validate` on every example plan and on the issue's two refused plans (a misspelt group, an
    over-drawn matched control), `embedlens list` and `embedlens new`, each in a fresh process, against
    ``python -c "import torch"`` and `embedlens --help`: wall time and the child's CPU time (user + system; on a
    shared machine wall time also counts the waits for a core)."""
    import resource

    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cli = "import sys; from embedlens.cli import main; sys.argv = ['embedlens', *sys.argv[1:]]; main()"
    new_dir = tmp / "new"
    new_dir.mkdir()
    ded = tmp / "ded.yaml"  # the misspelt group: refused at its key (exit 2)
    ded.write_text((ROOT / "examples" / "pruning_study.yaml").read_text()
                   .replace("{tokens: dead, if_empty: noop}", "{tokens: ded, if_empty: noop}")
                   .replace("data/", str(ROOT / "examples" / "data") + "/"))
    overdrawn = tmp / "overdrawn.yaml"  # 28 target tokens of 36, 8 outside: refused at its key (exit 2)
    overdrawn.write_text("model: {source: zoo:tiny-llava-clip}\ndata: {synthetic: {n: 4, seed: 1}}\nconditions:\n"
                         "  first: [{name: prune, params: {tokens: 'index < 28'}}]\n"
                         "  first_random: [{name: prune_random_matched, params: {target: 'index < 28'}}]\n"
                         "metrics: [{name: next_token_kl}]\noutput: {dir: out}\n")
    cases = {"import torch": ["-c", "import torch"], "help": ["-c", cli, "--help"], "list": ["-c", cli, "list"]}
    for plan in sorted((ROOT / "examples").glob("*.yaml")):
        cases[f"validate {plan.name}"] = ["-c", cli, "validate", str(plan)]
    refused = {"validate tokens: ded": ded, "validate over-drawn control": overdrawn}
    for name, plan in refused.items():
        cases[name] = ["-c", cli, "validate", str(plan)]
    wall: dict[str, list[float]] = {k: [] for k in [*cases, "new probe"]}
    cpu: dict[str, list[float]] = {k: [] for k in wall}

    def children() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    for rep in range(reps + 1):  # the first round warms the file cache and is not counted
        for name, args in [*cases.items(), ("new probe", ["-c", cli, "new", "probe", f"bench_probe_{rep}", "--dir", str(new_dir)])]:
            t, c = time.perf_counter(), children()
            proc = subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != (2 if name in refused else 0):
                raise RuntimeError(f"{name}: exit {proc.returncode}: {proc.stderr[-2000:]}")
            if rep:
                wall[name].append(time.perf_counter() - t)
                cpu[name].append(children() - c)
    w = {k: statistics.median(v) for k, v in wall.items()}
    c = {k: statistics.median(v) for k, v in cpu.items()}
    validates = [k for k in w if k.startswith("validate ")]
    slow_w, slow_c = max(validates, key=w.get), max(validates, key=c.get)
    return {"wall_s": w, "cpu_s": c, "rows": [
        (f"embedlens validate, slowest of {len(validates)} plans ({slow_w}), wall (s)", w[slow_w], "<=", 2.0),
        (f"embedlens validate, slowest of {len(validates)} plans ({slow_c}), CPU (s)", c[slow_c], "<=", 2.0),
        ("embedlens validate (slowest, CPU) / python -c 'import torch' (CPU)", c[slow_c] / c["import torch"], "<=", 1.3),
        ("embedlens validate (slowest, wall) / embedlens --help (wall)", w[slow_w] / w["help"], None, None),
        ("embedlens list, wall (s)", w["list"], "<=", 2.0),
        ("embedlens new probe, wall (s)", w["new probe"], "<=", 2.0),
    ]}


# -- the table ---------------------------------------------------------------------------
def _met(value: float, op: str | None, target: float | None) -> str:
    if op is None:
        return "info"
    return "yes" if (value <= target if op == "<=" else value >= target) else "NO"


def table(rows: list[tuple]) -> str:
    lines = ["| what | measured | target | met |", "|---|---|---|---|"]
    for row in rows:
        name, value, op, target = row[:4]
        if len(row) == 6:  # speed-up and recall
            rec, rec_target = row[4], row[5]
            met = "yes" if _met(value, op, target) == "yes" and rec >= rec_target else "NO"
            lines.append(f"| {name} | {value:.2f}x / {rec:.3f} | {op} {target}x / >= {rec_target} | {met} |")
        else:
            shown = f"{value:.2f}" if op is None or target is None else f"{value:.2f}"
            lines.append(f"| {name} | {shown} | {'' if op is None else f'{op} {target}'} | {_met(value, op, target)} |")
    return "\n".join(lines)


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine(), "cores_visible": os.cpu_count(),
            "threads": torch.get_num_threads(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        model = [x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("model name")]
        info["cpu"] = model[0].split(":", 1)[1].strip() if model else info["cpu"]
        info["load_average_at_start"] = os.getloadavg()
    except OSError:
        pass
    return info


def qwen_vocab_cases(threads: int) -> dict:
    """Extra peak memory of the embedding lens + partition on a 151,936-row vocabulary (tiny Qwen2.5-VL, in a
    fresh process: `qwen_vocab.py`) against the chunked search's bound."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EMBEDLENS_BENCH_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "qwen_vocab.py")], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    res = json.loads(proc.stdout.split("RESULT", 1)[1])
    res["rows"] = [
        ("152k vocab (tiny Qwen2.5-VL): lens + partition extra peak / chunk bound", res["extra_peak_mib"] / res["chunk_bound_mib"], "<=", 1.5),
        ("152k vocab (tiny Qwen2.5-VL): lens + partition extra peak / unchunked sims", res["extra_peak_mib"] / res["unchunked_mib"], "<=", 0.25),
    ]
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", default=None, help="groups: forward siglip lens lens152k qwen152k plans memory startup reduction validate")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions per case (medians are reported)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall: elapsed time; cpu: process CPU time (use with --threads 1 on a shared machine)")
    p.add_argument("--profile", action="store_true",
                   help="forward, siglip: also profile one HF forward and one partition pass (torch.profiler): "
                        "time by part (vision tower, projector, language model, head, vocabulary search), top operators")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results.json")
    args = p.parse_args(argv)
    global CLOCK, PROFILE
    CLOCK, PROFILE = args.clock, args.profile
    torch.set_num_threads(args.threads)
    groups = args.only or ["startup", "validate", "forward", "siglip", "lens", "lens152k", "qwen152k", "plans", "memory", "reduction"]
    started = time.perf_counter()
    results: dict = {"machine": machine(), "clock": args.clock, "groups": {}}
    rows: list[tuple] = []
    with tempfile.TemporaryDirectory(prefix="embedlens-bench-") as tmp_name:
        tmp = Path(tmp_name)
        for g in groups:
            t = time.perf_counter()
            if g == "startup":
                r = startup_cases(max(args.reps, 5))
            elif g == "forward":
                r = forward_cases(args.reps)
            elif g == "siglip":
                r = siglip_cases(args.reps)
            elif g == "lens":
                r = lens_cases(args.reps, 32_000, None)
            elif g == "lens152k":
                r = lens_cases(1, 152_064, 2)
            elif g == "qwen152k":
                r = qwen_vocab_cases(args.threads)
            elif g == "plans":
                r = plan_cases(tmp, n_b1=2, n_b8=8)
            elif g == "validate":
                r = validate_cases(tmp, args.reps)
            elif g == "reduction":
                r = reduction_cases(max(args.reps, 5))
            elif g == "memory":
                r = memory_cases(tmp, "tiny:llava-clip", 32, (20, 200))
            else:
                p.error(f"unknown group {g!r}")
            r["seconds"] = time.perf_counter() - t
            results["groups"][g] = r
            rows += r["rows"]
            print(f"[{g}: {r['seconds']:.0f} s]", file=sys.stderr, flush=True)
    results["total_seconds"] = time.perf_counter() - started
    results["table"] = table(rows)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    print(results["table"])
    for g, r in results["groups"].items():
        for case, prof in (r.get("profile") or {}).items():
            print(f"\nprofile {g} / {case}: {prof['total_s']} s CPU; by part: {prof['split_s']}")
    print(f"\ntotal {results['total_seconds']:.0f} s; machine: {results['machine']}; JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
