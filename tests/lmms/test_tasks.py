"""The shipped local tasks: data rebuilt from the seed equals the shipped files, answers follow the planted truth,
and the YAML files name only local data (nothing to fetch)."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import yaml
from PIL import Image

from embedlens.lmms.tasks import LOCAL_TASKS, SPEC, TASKS_DIR, build
from embedlens.synthetic import COLOURS, SHAPES, all_questions, render


def _rows(path):
    return pq.read_table(path).to_pylist()


def _pixels(row):
    return np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB"))


def test_shipped_data_is_the_build(tmp_path):
    fresh = build(tmp_path)
    for name, path in fresh.items():
        shipped, rebuilt = _rows(TASKS_DIR / path.name), _rows(path)
        assert len(shipped) == len(rebuilt) > 0
        for a, b in zip(shipped, rebuilt):
            assert {k: v for k, v in a.items() if k != "image"} == {k: v for k, v in b.items() if k != "image"}
            assert np.array_equal(_pixels(a), _pixels(b))
        # the image column loads as an image in Hugging Face datasets (the schema carries the features)
        meta = json.loads(pq.read_schema(TASKS_DIR / path.name).metadata[b"huggingface"])
        assert meta["info"]["features"]["image"] == {"_type": "Image"}


def test_pope_answers_follow_the_planted_objects():
    rows = _rows(TASKS_DIR / "pope.parquet")
    assert len(rows) == 2 * SPEC.n and [r["answer"] for r in rows[:4]] == ["yes", "no", "yes", "no"]
    words = {f"{c} {s}" for c in COLOURS for s in SHAPES}
    for i in range(SPEC.n):
        scene = render(SPEC, i)
        present = {f"{o['colour']} {o['shape']}" for o in scene.objects}
        assert np.array_equal(_pixels(rows[2 * i]), np.asarray(scene.image))
        for row in rows[2 * i : 2 * i + 2]:
            asked = row["question"].removeprefix("is there a ").removesuffix(" in the image?")
            assert asked in words
            assert row["answer"] == ("yes" if asked in present else "no")


def test_synqa_is_the_synthetic_questions():
    rows = _rows(TASKS_DIR / "synqa.parquet")
    expected = [(q, a, list(c)) for i in range(SPEC.n) for _, q, a, c in all_questions(SPEC, i, render(SPEC, i))]
    assert [(r["question"], r["answer"], r["candidates"]) for r in rows] == expected


def test_task_files_read_local_data_only():
    for name in LOCAL_TASKS:
        text = (TASKS_DIR / f"{name}.yaml").read_text()
        conf = yaml.safe_load(text.replace("!function", ""))
        assert conf["task"] == name
        assert conf["dataset_path"] == "parquet"
        for f in conf["dataset_kwargs"]["data_files"].values():
            assert (TASKS_DIR / f).is_file()


def test_task_scoring_normalises_as_embedlens():
    """The tasks' copy of the answer normalisation is embedlens's rule (lmms-eval loads that file alone)."""
    import importlib.util

    from embedlens.metrics.builtin import normalize_answer

    spec = importlib.util.spec_from_file_location("_task_utils", TASKS_DIR / "embedlens_task_utils.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for text in ["Yes.", "  A Red circle. ", "the top-left", "NO!", "an Apple, the cat", "yes\n\n", ""]:
        assert mod.normalize_answer(text) == normalize_answer(text)
    assert mod.synqa_process_results({"answer": "top left"}, ["Top left."]) == {"exact_match": 1.0}
    pope = mod.pope_process_results({"answer": "no", "question_id": "q"}, ["Yes"])
    assert pope["pope_accuracy"]["score"] == 0.0 and mod.pope_yes_ratio([pope["pope_accuracy"]]) == 1.0
