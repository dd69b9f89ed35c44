"""Validate a model on held-out synthetic images: QA by question type, the partition against ground truth, the study's experiments.

`evaluate` writes the held-out set (PNG + prompts.jsonl), an analysis plan
over it (``plan.yaml``: the partition, the embedding lens, a semantic linear
probe, the pruning conditions in both modes) and runs it with the normal
runner into ``OUT/run`` (tables, figures, report.html). It then joins the
run's per-token tables with the per-patch ground truth and writes
``validation.json``, ``validation.md`` and ``validation.png``.

    embedlens zoo evaluate zoo:tiny-llava-clip -o runs/zoo-clip

Everything is computed from the run's own outputs, so a reader can check any
figure of the validation against the tables it came from.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from embedlens.errors import InputError
from embedlens.synthetic import QUESTION_TYPES, SyntheticSpec, all_questions, patch_truth, render

# The partition used for the validation: anchors discovered from the data with
# the default rule (no hand-given ids, no hand-set thresholds; `embedlens.anchors`).
PARTITION = {"discover": True}
# the sink detectors, reported on their own with their defaults (the zoo models grew no sinks; the planted variant has one)
SINK_RULES: dict[str, Any] = {}
PRUNING = {
    "blind": [{"name": "prune", "params": {"tokens": "visual"}}],
    "prune_dead": [{"name": "prune", "params": {"tokens": "dead", "if_empty": "noop"}}],
    "prune_dead_random": [{"name": "prune_random_matched", "params": {"target": "dead", "seed": 0, "if_empty": "noop", "exclude_target": False}}],
    "prune_alive": [{"name": "prune", "params": {"tokens": "alive", "if_empty": "noop"}}],
    "mean_dead": [{"name": "ablate", "params": {"tokens": "dead", "value": "mean", "if_empty": "noop"}}],
    "mean_dead_random": [{"name": "ablate_random_matched", "params": {"target": "dead", "seed": 0, "value": "mean", "if_empty": "noop",
                                                                      "exclude_target": False}}],
    "mean_alive": [{"name": "ablate", "params": {"tokens": "alive", "value": "mean", "if_empty": "noop"}}],
    # why removal costs what it costs: blocked from attention (the same computation as removal, a check), and
    # replaced by the embedding of their anchor word (slots kept, content dropped; `background` is the zoo's anchor)
    "mask_dead": [{"name": "prune", "params": {"tokens": "dead", "mode": "mask", "if_empty": "noop"}}],
    "word_dead": [{"name": "ablate", "params": {"tokens": "dead", "value": "word", "word": "background", "if_empty": "noop"}}],
    "word_dead_random": [{"name": "ablate_random_matched", "params": {"target": "dead", "seed": 0, "value": "word", "word": "background",
                                                                      "if_empty": "noop", "exclude_target": False}}],
}
THRESHOLDS = {  # what the shipped checkpoints must reach (tests/zoo/test_zoo_thresholds.py)
    "tiny-llava-clip": {"qa_overall": 0.85, "qa_per_type": 0.70, "dead_precision": 0.9, "dead_recall": 0.9, "lens_top3": 0.5,
                        "probe_object": 0.9},
    "tiny-llava-siglip": {"qa_overall": 0.80, "qa_per_type": 0.60, "probe_object": 0.9},
}


def _nearest_object(scene, P: int, G: int) -> tuple[list[list[Any]], list[list[Any]]]:
    """For pure background patches (no object or text pixel), the colour and shape of the object whose cell
    centre is nearest (None elsewhere): what a background token would have to pick up from its context."""
    S = scene.kind.shape[0]
    edges = np.linspace(0, S, P + 1).round().astype(int)
    colour = [[None] * P for _ in range(P)]
    shape = [[None] * P for _ in range(P)]
    if not scene.objects:
        return colour, shape
    centres = np.array([[(o["row"] + 0.5) / G, (o["col"] + 0.5) / G] for o in scene.objects])
    for r in range(P):
        for c in range(P):
            if scene.kind[edges[r] : edges[r + 1], edges[c] : edges[c + 1]].any():
                continue
            d = ((centres - np.array([(r + 0.5) / P, (c + 0.5) / P])) ** 2).sum(1)
            o = scene.objects[int(d.argmin())]
            colour[r][c], shape[r][c] = o["colour"], o["shape"]
    return colour, shape


def heldout_rows(specs: list[SyntheticSpec], n_images: int | None = None) -> list[tuple[Any, dict[str, Any]]]:
    """(image, row) pairs of the held-out set: every answerable question type per image.

    The first row of each image carries the per-patch ground truth
    (``patch_labels``: kind, colour, shape, char, and near_colour / near_shape
    for background patches), so per-token statistics count each image once.
    """
    out = []
    per = None if n_images is None else [n_images // len(specs) + (i < n_images % len(specs)) for i in range(len(specs))]
    for si, spec in enumerate(specs):
        for i in range(spec.n if per is None else min(per[si], spec.n)):
            scene = render(spec, i)
            labels = patch_truth(scene, spec.patch_grid)
            labels["near_colour"], labels["near_shape"] = _nearest_object(scene, spec.patch_grid, spec.grid)
            first = True
            for qtype, q, a, cands in all_questions(spec, i, scene):
                row = {"id": f"s{spec.seed}-{i:04d}-{qtype}", "image": f"images/s{spec.seed}-{i:04d}.png", "question": q, "answer": a,
                       "qtype": qtype, "candidates": cands, "image_id": f"s{spec.seed}-{i:04d}", "background": spec.background}
                if first:
                    row["patch_labels"] = labels
                    first = False
                out.append((scene.image, row))
    return out


def write_heldout(rows: list[tuple[Any, dict[str, Any]]], folder: Path) -> Path:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for image, row in rows:
        path = folder / row["image"]
        if not path.exists():
            image.save(path)
    out = folder / "prompts.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for _, r in rows))
    return out


def eval_plan(source: str, prompts: Path, run_dir: Path, batch_size: int = 16, pruning: bool = True) -> dict[str, Any]:
    """The analysis plan the validation runs (also written next to the results as plan.yaml)."""
    return {
        "model": {"source": source},
        "data": {"prompts": str(prompts), "padding_side": "left"},
        "partition": dict(PARTITION),
        "probes": [
            {"name": "token_partition"},  # labels with the partition above
            {"name": "sink_detector", "label": "sinks", "params": dict(SINK_RULES)},
            {"name": "embedding_lens", "params": {"k": 3, "layers": [0]}},
            {"name": "semantic_probe", "params": {"attributes": ["colour", "shape", "near_colour", "near_shape"], "sites": ["llm.embed"],
                                                  "cv": 5, "max_tokens": 4000}},
            # the same on standardised features: a signal kept at a small scale is read here at full strength
            {"name": "semantic_probe", "label": "semantic_probe_standardized",
             "params": {"attributes": ["near_colour", "near_shape"], "sites": ["llm.embed"], "cv": 5, "max_tokens": 4000,
                        "standardize": True}},
        ],
        "conditions": PRUNING if pruning else {k: v for k, v in PRUNING.items() if k == "blind"},
        "metrics": [{"name": "forced_choice"}, {"name": "visual_tokens"}],
        "output": {"dir": str(run_dir)},
        "batch_size": batch_size,
        "seed": 0,
    }


def _table(run: Path, name: str) -> dict[str, list]:
    import pyarrow.parquet as pq

    return pq.read_table(run / f"{name}.parquet").to_pydict()


def _specs_for(adapter, n: int) -> list[SyntheticSpec]:
    """Held-out specs: the model's own recipe when it has one (zoo checkpoints), else the default recipe at its image size."""
    from embedlens.zoo.recipe import Recipe

    folder = Path(getattr(adapter.model, "name_or_path", "") or "")
    recipe_file = folder / "recipe.json"
    r = Recipe.from_dict(json.loads(recipe_file.read_text())) if recipe_file.exists() else Recipe()
    v = adapter.model.config.vision_config
    r.image_size, r.patch_size = v.image_size, v.patch_size
    r.heldout_images = n
    return r.specs("heldout")


@contextlib.contextmanager
def pinned_threads(n: int):
    """Torch's and the BLAS/OpenMP pools (scikit-learn's) limited to `n` threads for the block, then restored.

    The zoo's models are tiny: one thread is the fastest setting, and on a 2-core machine torch's and BLAS's
    pools fighting each other made an evaluation 8x slower (173 s vs 22 s for 60 images).
    """
    import torch
    from threadpoolctl import threadpool_limits

    if n < 1:
        raise InputError(f"threads: must be >= 1; got {n}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(n):
            yield
    finally:
        torch.set_num_threads(before)


def evaluate(source: str, out: str | Path, n_images: int = 200, batch_size: int = 16,
             progress: Callable[[str, int, int], None] | None = None, overwrite: bool = True, pruning: bool = True,
             threads: int | None = 1) -> dict[str, Any]:
    """Validate `source` on `n_images` held-out images; writes everything under `out` and returns the validation.

    `pruning=False` runs only the blind condition (QA thresholds, partition,
    lens and probe without the pruning experiments: what the threshold test uses).
    `threads` pins torch and BLAS to that many threads while it runs (None leaves them alone).
    """
    with contextlib.nullcontext() if threads is None else pinned_threads(threads):
        return _evaluate(source, out, n_images, batch_size, progress, overwrite, pruning)


def _evaluate(source, out, n_images, batch_size, progress, overwrite, pruning) -> dict[str, Any]:
    import embedlens  # noqa: F401 - registers the plugins
    from embedlens.adapters import load_model
    from embedlens.plan import load_plan
    from embedlens.plan.runner import prepare, run

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    adapter = load_model(source)
    rows = heldout_rows(_specs_for(adapter, n_images))
    prompts = write_heldout(rows, out / "data")
    plan = eval_plan(source, prompts.resolve(), (out / "run").resolve(), batch_size, pruning)
    (out / "plan.yaml").write_text(yaml.safe_dump(plan, sort_keys=False))
    loaded = load_plan(out / "plan.yaml")
    prepared = prepare(loaded, adapter=adapter)
    run(prepared, out / "run", progress=progress, overwrite=overwrite)
    result = summarise(out / "run", [r for _, r in rows], source)
    result["planted"] = getattr(adapter.model.config, "embedlens_planted", None)
    (out / "validation.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "validation.md").write_text(markdown(result))
    figure(result, out / "validation.png")
    return result


def summarise(run: Path, rows: list[dict[str, Any]], source: str) -> dict[str, Any]:
    """The validation numbers, from the run's tables joined with the ground truth in `rows`."""
    by_id = {r["id"]: r for r in rows}
    truth = {r["id"]: r["patch_labels"] for r in rows if "patch_labels" in r}
    res: dict[str, Any] = {"model": source, "n_images": len(truth), "n_questions": len(rows)}

    # QA: baseline and every condition, per question type
    eff = _table(run, "effects")
    acc: dict[str, dict[str, list[float]]] = {}
    seen = set()
    for sid, cond, cb, c in zip(eff["sample"], eff["condition"], eff["correct_base"], eff["correct"]):
        t = by_id[sid]["qtype"]
        if sid not in seen:
            seen.add(sid)
            acc.setdefault("baseline", {}).setdefault(t, []).append(cb)
        acc.setdefault(cond, {}).setdefault(t, []).append(c)
    qa = {}
    for cond, per in acc.items():
        qa[cond] = {t: float(np.mean(v)) for t, v in sorted(per.items())}
        qa[cond]["overall"] = float(np.mean([x for v in per.values() for x in v]))
    res["qa"] = qa
    res["qa_n"] = {t: len(v) for t, v in sorted(acc["baseline"].items())}
    summ = json.loads((run / "summary.json").read_text())
    res["tokens_kept"] = {c: v.get("visual_tokens_mean") for c, v in summ.get("effects", {}).items()}

    # partition vs ground truth
    tok = _table(run, "token_partition.tokens")
    conf: dict[tuple[str, str], int] = {}
    for sid, r, c, g in zip(tok["sample_id"], tok["row"], tok["col"], tok["group"]):
        if sid in truth:
            k = truth[sid]["kind"][r][c]
            conf[(g, k)] = conf.get((g, k), 0) + 1
    dead_bg = conf.get(("dead", "background"), 0)
    n_dead = sum(v for (g, _), v in conf.items() if g == "dead")
    n_bg = sum(v for (_, k), v in conf.items() if k == "background")
    res["partition"] = {
        "precision": dead_bg / n_dead if n_dead else 0.0,
        "recall": dead_bg / n_bg if n_bg else 0.0,
        "confusion": {f"{g}|{k}": v for (g, k), v in sorted(conf.items())},
        "fractions": summ["token_partition"]["fractions"],
        "discovered_anchors": {g: [a["token"] for a in v] for g, v in summ["partition"]["discovered_anchors"].items()},
        "params": dict(PARTITION),
    }

    # the sink detectors (ViT high norm, massive activation) on their own
    sk = _table(run, "sinks.tokens")
    where: dict[tuple[int, int], int] = {}
    n_sink = 0
    for sid, r, c, vit, massive in zip(sk["sample_id"], sk["row"], sk["col"], sk["vit_norm_flag"], sk["massive_flag"]):
        if sid in truth and (vit or massive):
            n_sink += 1
            where[(r, c)] = where.get((r, c), 0) + 1
    res["sinks"] = {"n_sink_tokens": n_sink, "per_image": n_sink / max(1, len(truth)), "rule_counts": {k: v for k, v in summ["sinks"]["flag_counts"].items() if k in ("vit_norm", "massive")},
                    "top_patches": [{"row": r, "col": c, "count": n} for (r, c), n in sorted(where.items(), key=lambda kv: -kv[1])[:3]],
                    "params": dict(SINK_RULES)}

    # embedding lens at the LM input: object tokens whose top-3 holds their colour or shape word
    lens = _table(run, "embedding_lens.tokens")
    hits, n_obj, bg_top = 0, 0, {}
    for i, sid in enumerate(lens["sample_id"]):
        if sid not in truth or lens["layer"][i] != 0:
            continue
        r, c = lens["row"][i], lens["col"][i]
        lab = truth[sid]
        top = {lens["token_1"][i], lens["token_2"][i], lens["token_3"][i]}
        if lab["kind"][r][c] == "object":
            n_obj += 1
            hits += bool(top & {lab["colour"][r][c], lab["shape"][r][c]})
        elif lab["kind"][r][c] == "background":
            bg_top[lens["token_1"][i]] = bg_top.get(lens["token_1"][i], 0) + 1
    res["lens"] = {"object_top3_colour_or_shape": hits / n_obj if n_obj else 0.0, "n_object_tokens": n_obj,
                   "background_top1": dict(sorted(bg_top.items(), key=lambda kv: -kv[1])[:5])}

    # semantic linear probe at the LM input
    pick = {(label, e["attribute"], e["group"]): e for label in ("semantic_probe", "semantic_probe_standardized")
            for e in summ.get(label, {}).get("scores", []) if e["site"] == "llm.embed"}

    def entry(attr: str, label: str = "semantic_probe") -> dict[str, Any]:
        e = pick.get((label, attr, "all"), {})
        return {"accuracy": e.get("accuracy"), "chance": e.get("chance"), "n": e.get("n")}

    res["semantic_probe"] = {
        "object_colour": entry("colour"), "object_shape": entry("shape"),
        "background_nearest_colour": entry("near_colour"), "background_nearest_shape": entry("near_shape"),
        "background_nearest_colour_standardized": entry("near_colour", "semantic_probe_standardized"),
        "background_nearest_shape_standardized": entry("near_shape", "semantic_probe_standardized"),
    }
    return res


def check(result: dict[str, Any], name: str) -> list[str]:
    """The thresholds `name` misses (empty when all hold)."""
    th = THRESHOLDS.get(name, {})
    bad = []
    qa = result["qa"]["baseline"]
    if "qa_overall" in th and qa["overall"] < th["qa_overall"]:
        bad.append(f"QA overall {qa['overall']:.3f} < {th['qa_overall']}")
    for t, v in qa.items():
        if t != "overall" and "qa_per_type" in th and v < th["qa_per_type"]:
            bad.append(f"QA {t} {v:.3f} < {th['qa_per_type']}")
    p = result["partition"]
    for key in ("precision", "recall"):
        if f"dead_{key}" in th and p[key] < th[f"dead_{key}"]:
            bad.append(f"dead {key} {p[key]:.3f} < {th[f'dead_{key}']}")
    if "lens_top3" in th and result["lens"]["object_top3_colour_or_shape"] < th["lens_top3"]:
        bad.append(f"lens top-3 {result['lens']['object_top3_colour_or_shape']:.3f} < {th['lens_top3']}")
    sp = result["semantic_probe"]
    for key in ("object_colour", "object_shape"):
        a = sp[key]["accuracy"]
        if "probe_object" in th and (a is None or a < th["probe_object"]):
            bad.append(f"semantic probe {key} {a} < {th['probe_object']}")
    return bad


def markdown(result: dict[str, Any]) -> str:
    """The validation as Markdown tables (also printed by ``embedlens zoo evaluate``)."""
    qa = result["qa"]
    types = [t for t in QUESTION_TYPES if t in qa["baseline"]] + ["overall"]
    lines = [f"# Validation of {result['model']}", ""]
    if result.get("planted"):
        lines += ["**PLANTED sinks** (edited into the weights, not learned): " + json.dumps(result["planted"]), ""]
    lines += [f"{result['n_images']} held-out images, {result['n_questions']} questions (forced choice among candidates).", "",
              "## QA accuracy by question type", "", "| condition | " + " | ".join(types) + " | visual tokens |",
              "|---" * (len(types) + 2) + "|"]
    for cond, per in qa.items():
        kept = result["tokens_kept"].get(cond)
        lines.append(f"| {cond} | " + " | ".join(f"{per.get(t, float('nan')):.3f}" for t in types)
                     + f" | {'' if kept is None else f'{kept:.1f}'} |")
    lines.append("| n | " + " | ".join(str(result["qa_n"].get(t, sum(result["qa_n"].values()))) for t in types) + " | |")
    p = result["partition"]
    lines += ["", "## Partition vs ground truth (dead vs background patches)", "",
              f"Anchors discovered from the data: {p['discovered_anchors']}; params {p['params']}.", "",
              f"- precision {p['precision']:.3f}, recall {p['recall']:.3f}",
              "- group fractions: " + ", ".join(f"{g} {v:.3f}" for g, v in p["fractions"].items()),
              "- confusion (group|truth): " + ", ".join(f"{k} {v}" for k, v in p["confusion"].items())]
    sk = result["sinks"]
    lines += ["", "## Sink detectors (defaults: ViT high norm > mean + 2 sd and >= 2x the median, massive activation)", "",
              f"- sink tokens: {sk['n_sink_tokens']} ({sk['per_image']:.2f} per image); rules fired: {sk['rule_counts']}; "
              f"most frequent patches: {sk['top_patches']}"]
    le = result["lens"]
    lines += ["", "## Embedding lens at the LM input", "",
              f"- object tokens with their colour or shape word in the top 3: {le['object_top3_colour_or_shape']:.3f} "
              f"(n = {le['n_object_tokens']})", f"- background tokens' nearest words: {le['background_top1']}"]
    sp = result["semantic_probe"]
    lines += ["", "## Semantic linear probe at the LM input (5-fold CV; chance = majority class)", "",
              "Logistic regression (L2, C = 1) on the raw tokens, as the study probes them; the *standardized* rows "
              "scale each feature to unit variance first, which reads a signal however small its scale.", "",
              "| tokens | predicts | accuracy | chance | n |", "|---|---|---|---|---|"]
    for key, e in sp.items():
        who, what = key.split("_", 1)
        acc_s = "n/a" if e["accuracy"] is None else f"{e['accuracy']:.3f}"
        ch_s = "n/a" if e["chance"] is None else f"{e['chance']:.3f}"
        lines.append(f"| {who} | {what.replace('_', ' ')} | {acc_s} | {ch_s} | {e['n']} |")
    return "\n".join(lines) + "\n"


def figure(result: dict[str, Any], path: Path) -> Path:
    """QA per type (baseline vs blind), the pruning conditions in both modes, and the partition against the truth."""
    from embedlens.figures import _plt, _save

    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    qa = result["qa"]
    types = [t for t in QUESTION_TYPES if t in qa["baseline"]] + ["overall"]
    x = np.arange(len(types))
    for j, (cond, colour) in enumerate((("baseline", "#1f77b4"), ("blind", "#7f7f7f"))):
        if cond in qa:
            axes[0].bar(x + (j - 0.5) * 0.38, [qa[cond].get(t, 0) for t in types], 0.38, label=cond, color=colour)
    axes[0].set_xticks(x, types, rotation=30)
    axes[0].set_ylim(0, 1)
    axes[0].set_title("QA accuracy by question type")
    axes[0].legend(fontsize=8)
    conds = [c for c in ("baseline", "prune_dead", "prune_dead_random", "prune_alive", "mean_dead", "mean_dead_random", "mean_alive", "blind")
             if c in qa]
    cols = ["#1f77b4" if c == "baseline" else "#7f7f7f" if "dead" in c and "random" not in c else "#bcbd22" if "random" in c
            else "#2ca02c" if "alive" in c else "#444444" for c in conds]
    axes[1].bar(range(len(conds)), [qa[c]["overall"] for c in conds], color=cols)
    axes[1].set_xticks(range(len(conds)), conds, rotation=45, ha="right", fontsize=8)
    axes[1].set_ylim(0, 1)
    axes[1].set_title("Pruning (removal / mean replacement)")
    conf = result["partition"]["confusion"]
    groups = sorted({k.split("|")[0] for k in conf})
    kinds = ["background", "object", "text"]
    m = np.array([[conf.get(f"{g}|{k}", 0) for k in kinds] for g in groups], dtype=float)
    axes[2].imshow(m / np.maximum(m.sum(0, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
    for i in range(len(groups)):
        for j in range(len(kinds)):
            axes[2].text(j, i, int(m[i, j]), ha="center", va="center", fontsize=8)
    axes[2].set_xticks(range(len(kinds)), kinds)
    axes[2].set_yticks(range(len(groups)), groups)
    p = result["partition"]
    axes[2].set_title(f"group vs truth (dead: P {p['precision']:.2f}, R {p['recall']:.2f})", fontsize=9)
    fig.suptitle(result["model"] + ("  [PLANTED sinks]" if result.get("planted") else ""))
    return _save(fig, path)
