"""The local lmms-eval tasks embedlens ships: benchmark-shaped questions on its synthetic images, answered
from the planted truth, so the bridge is tested (and tried out) without reaching a hub.

Three tasks live in ``embedlens/resources/lmms_tasks/`` (YAML + one Parquet file each, images embedded):

- ``embedlens_pope``: POPE-style yes/no object questions ("is there a red circle in the image?"),
  greedy generation, POPE's metrics (accuracy, precision, recall, F1, yes ratio). Per image one question
  about an object that is there ("yes") and one about a colour/shape pair that is not ("no", drawn at
  random among the absent pairs: POPE's *random* split).
- ``embedlens_pope_mc``: the same questions as a two-way forced choice ("yes" / "no") scored by
  log-likelihood (lmms-eval's ``multiple_choice``: the bridge's ``loglikelihood`` path).
- ``embedlens_synqa``: the synthetic set's own colour / shape / position / word / count questions
  (``embedlens.synthetic``), greedy generation, exact match: the questions the zoo models were trained on.

The zoo models never saw a yes/no question, so they do poorly on the POPE-style tasks (they answer with
a colour or a shape); ``embedlens_synqa`` is where their accuracy and the cost of pruning show.

The data files are built by `build` (``python -m embedlens.lmms.tasks DIR``) and checked against a fresh
build by the tests: the shipped bytes are data, reproducible from the seed.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from embedlens.synthetic import COLOURS, SHAPES, SyntheticSpec, all_questions, render

#: Where the task YAML files and their data live (pass it to lmms-eval as ``--include_path``).
TASKS_DIR = Path(__file__).resolve().parent.parent / "resources" / "lmms_tasks"
#: The tasks in `TASKS_DIR`.
LOCAL_TASKS = ("embedlens_pope", "embedlens_pope_mc", "embedlens_synqa")
#: The images: the zoo models' size (96 px, 16-px patches) and the study's natural density of background.
SPEC = SyntheticSpec(n=16, seed=2026, size=96, grid=3, background=0.4, patch_grid=6)


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def pope_rows(spec: SyntheticSpec = SPEC) -> list[dict[str, Any]]:
    """Two yes/no questions per image: one object that is there, one colour/shape pair that is not.

    Example:
        >>> rows = pope_rows(SyntheticSpec(n=2, seed=0, size=32, patch_grid=2))
        >>> [r["answer"] for r in rows], rows[0]["question"].startswith("is there a ")
        (['yes', 'no', 'yes', 'no'], True)
    """
    rows = []
    for i in range(spec.n):
        scene = render(spec, i)
        rng = np.random.default_rng([spec.seed, i, 22])
        present = sorted({(o["colour"], o["shape"]) for o in scene.objects})
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        yes = present[int(rng.integers(len(present)))]
        no = absent[int(rng.integers(len(absent)))]
        png = _png(scene.image)
        for k, ((colour, shape), answer) in enumerate(((yes, "yes"), (no, "no"))):
            rows.append({
                "question_id": f"pope-{spec.seed}-{i:04d}-{k}",
                "image_id": f"syn-{spec.seed}-{i:05d}",
                "image": png,
                "question": f"is there a {colour} {shape} in the image?",
                "answer": answer,
                "category": "random",
            })
    return rows


def synqa_rows(spec: SyntheticSpec = SPEC) -> list[dict[str, Any]]:
    """Every question type each image can answer (`embedlens.synthetic.all_questions`), with its candidates."""
    rows = []
    for i in range(spec.n):
        scene = render(spec, i)
        png = _png(scene.image)
        for qtype, q, a, cands in all_questions(spec, i, scene):
            rows.append({
                "question_id": f"synqa-{spec.seed}-{i:04d}-{qtype}",
                "image_id": f"syn-{spec.seed}-{i:05d}",
                "image": png,
                "question": q,
                "answer": a,
                "qtype": qtype,
                "candidates": list(cands),
            })
    return rows


def _features(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The Hugging Face `datasets` feature description stored in the Parquet schema (so ``image`` loads as an image)."""
    feats: dict[str, Any] = {}
    for key, value in rows[0].items():
        if key == "image":
            feats[key] = {"_type": "Image"}
        elif isinstance(value, list):
            feats[key] = {"feature": {"dtype": "string", "_type": "Value"}, "_type": "List"}
        else:
            feats[key] = {"dtype": "string", "_type": "Value"}
    return feats


def write_parquet(rows: list[dict[str, Any]], path: Path) -> None:
    """Rows as Parquet with images as ``{bytes, path}`` structs and the `datasets` features in the schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols: dict[str, list] = {k: [r[k] for r in rows] for k in rows[0]}
    image = pa.array([{"bytes": b, "path": None} for b in cols.pop("image")],
                     type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    table = pa.Table.from_pydict({**cols, "image": image})
    table = table.select(list(rows[0]))  # the rows' column order
    meta = {b"huggingface": json.dumps({"info": {"features": _features(rows)}}).encode()}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **meta})
    pq.write_table(table, path)


def build(folder: str | Path) -> dict[str, Path]:
    """Write the tasks' data files (``pope.parquet``, ``synqa.parquet``) into `folder`; returns name -> path."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"pope": out / "pope.parquet", "synqa": out / "synqa.parquet"}
    write_parquet(pope_rows(), paths["pope"])
    write_parquet(synqa_rows(), paths["synqa"])
    return paths


if __name__ == "__main__":  # pragma: no cover - the data files' build script
    import sys

    for name, path in build(sys.argv[1] if len(sys.argv) > 1 else TASKS_DIR).items():
        print(f"wrote {name}: {path}")
