"""Data sources: JSONL/CSV with annotations, a local Hugging Face data set, the synthetic set; odd images."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from embedlens import collect
from embedlens.data import open_image, read_records
from embedlens.errors import InputError, PlanError
from embedlens.plan import load_plan, prepare, run
from embedlens.probes.base import Probe, Tensors
from embedlens.sites import Site
from embedlens.synthetic import COLOURS, SHAPES, SyntheticSpec, background_share, make_records

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _plan(tmp_path: Path, data: str, extra: str = "") -> Path:
    p = tmp_path / "plan.yaml"
    p.write_text(
        f"model: {{source: tiny:llava-clip}}\ndata:\n{data}\nprobes:\n  - name: embedding_lens\n    params: {{k: 1, layers: [0]}}\n"
        f"output: {{dir: out}}\nbatch_size: 2\n{extra}"
    )
    return p


def test_odd_images_are_converted_and_bad_ones_reported(tmp_path):
    rgb = np.asarray(Image.open(EXAMPLES / "data" / "shapes_0.png").convert("RGB"))
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb).convert("L").save(tmp_path / "gray.png")
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    rgba[:8, :8, 3] = 0  # a transparent corner: composited on white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(tmp_path / "deep.png")  # 16-bit grayscale
    Image.fromarray(np.tile(rgb, (40, 40, 1))).save(tmp_path / "huge.png")  # 2560 x 2560
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    names = ["rgb", "gray", "rgba", "deep", "huge", "corrupt"]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"id": n, "image": f"{n}.png", "question": "what?"}) + "\n" for n in names))
    # the conversions, checked against what they should give
    im, notes = open_image(tmp_path / "rgba.png")
    arr = np.asarray(im)
    assert (arr[:8, :8] == 255).all() and (arr[8:, 8:] == rgb[8:, 8:]).all() and "alpha composited" in notes[0]
    im, notes = open_image(tmp_path / "deep.png")
    assert np.abs(np.asarray(im)[..., 0].astype(int) - rgb[..., 0]).max() <= 1 and "scaled to 8 bit" in notes[0]
    im, notes = open_image(tmp_path / "huge.png", max_pixels=1_000_000)
    assert im.width * im.height <= 1_000_000 and f"downscaled from {rgb.shape[1] * 40}x{rgb.shape[0] * 40}" in notes[0]
    with pytest.raises(InputError, match="cannot read image .*corrupt.png"):
        open_image(tmp_path / "corrupt.png")
    # the run goes on without the corrupt one, converts the rest, and lists both kinds
    plan = _plan(tmp_path, "  prompts: prompts.jsonl\n  max_pixels: 1000000")
    result = run(prepare(load_plan(plan)), tmp_path / "out")
    assert [s["sample_id"] for s in result.skipped] == ["corrupt"]
    converted = list(csv.DictReader(open(tmp_path / "out" / "converted.csv")))
    assert {r["sample_id"] for r in converted} == {"gray", "rgba", "deep", "huge"}
    rows = list(csv.DictReader(open(tmp_path / "out" / "tokens.csv")))
    assert {r["sample_id"] for r in rows} == {"rgb", "gray", "rgba", "deep", "huge"}
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["skipped_samples"] == 1


def test_csv_with_candidates_and_regions(tmp_path):
    shutil.copy(EXAMPLES / "data" / "shapes_0.png", tmp_path / "a.png")
    w_, h_ = Image.open(tmp_path / "a.png").size
    regions = [{"box": [0, 0, w_ / 2, h_], "labels": {"colour": "red"}}, {"box": [w_ / 2, 0, w_, h_], "labels": {"colour": "blue"}}]
    with open(tmp_path / "data.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "image", "question", "answer", "candidates", "regions", "source"])
        w.writerow(["s1", "a.png", "what colour?", "red", json.dumps(["red", "blue"]), json.dumps(regions), "web"])
        w.writerow(["s2", "a.png", "what shape?", "", "", "", ""])
    recs = read_records(tmp_path / "data.csv")
    assert [r.id for r in recs] == ["s1", "s2"] and recs[0].meta["candidates"] == ["red", "blue"] and recs[0].meta["source"] == "web"
    assert recs[1].answer is None and "candidates" not in recs[1].meta
    sample, _ = recs[0].load()
    grid = sample.meta["patch_labels"]["colour"]
    assert grid[5][3] == "red" and grid[5][30] == "blue"  # left half red, right half blue
    with open(tmp_path / "bad.csv", "w", newline="") as fh:
        fh.write("id,image,question,candidates\nq,a.png,what?,[red\n")
    with pytest.raises(InputError, match=r"bad.csv:2: column 'candidates' must hold JSON"):
        read_records(tmp_path / "bad.csv")
    with open(tmp_path / "dup.csv", "w", newline="") as fh:
        fh.write("id,image,question\nq,a.png,what?\nq,a.png,what else?\n")
    with pytest.raises(InputError, match=r"dup.csv:3: duplicate sample id 'q' \(first at .*dup.csv:2\)"):
        read_records(tmp_path / "dup.csv")


def test_local_hugging_face_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    ims = [Image.open(EXAMPLES / "data" / f"shapes_{i}.png").convert("RGB") for i in range(3)]
    ds = datasets.Dataset.from_dict(
        {"img": ims, "q": ["what colour?", "what shape?", "how many?"], "a": ["red", "circle", "two"], "opts": [["red", "blue"]] * 3}
    ).cast_column("img", datasets.Image())
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "hf"))
    data = "  dataset: hf\n  split: test\n  columns: {image: img, question: q, answer: a, candidates: opts}"
    loaded = load_plan(_plan(tmp_path, data))
    prepared = prepare(loaded)
    assert [r.answer for r in prepared.records] == ["red", "circle", "two"]
    assert prepared.records[0].meta["candidates"] == ["red", "blue"]
    s, _ = prepared.records[1].load()
    assert np.array_equal(np.asarray(s.images[0]), np.asarray(ims[1]))
    result = run(prepared, tmp_path / "out")
    assert len(list(csv.DictReader(open(tmp_path / "out" / "tokens.csv")))) == 3 * 16
    bad = load_plan(_plan(tmp_path, "  dataset: hf\n  split: train\n  columns: {image: img, question: q}"))
    with pytest.raises(Exception, match=r"plan.yaml:3 data.dataset: data set .*hf has no split 'train'; splits: \['test'\]"):
        prepare(bad)
    bad = load_plan(_plan(tmp_path, "  dataset: hf\n  columns: {image: picture, question: q}"))
    with pytest.raises(Exception, match=r"data.dataset: data set .*has no image column 'picture'"):
        prepare(bad)
    assert result.skipped == []


def test_duplicate_ids_in_a_hugging_face_dataset_are_refused(tmp_path):
    """Conditions are paired with the baseline and tables joined to the data by sample id: a data set whose id
    column repeats one is refused naming the row and the first use, as a prompts file is."""
    datasets = pytest.importorskip("datasets")
    ims = [Image.open(EXAMPLES / "data" / f"shapes_{i}.png").convert("RGB") for i in range(3)]
    ds = datasets.Dataset.from_dict({"img": ims, "q": ["a?", "b?", "c?"], "key": ["k0", "k1", "k0"]}).cast_column("img", datasets.Image())
    ds.save_to_disk(str(tmp_path / "hf"))
    plan = load_plan(_plan(tmp_path, "  dataset: hf\n  columns: {image: img, question: q, id: key}"))
    with pytest.raises(PlanError, match=r"plan.yaml:3 data.dataset: .*hf\[2\]: duplicate sample id 'k0' \(first at .*hf\[0\]\)"):
        prepare(plan)


def test_synthetic_ground_truth_is_what_was_drawn():
    spec = SyntheticSpec(n=24, seed=7, size=64, patch_grid=8, word_rate=0.5)
    recs = make_records(spec)
    again = make_records(spec)
    for a, b in zip(recs, again):  # deterministic by seed
        assert a.question == b.question and a.answer == b.answer and a.images[0].tobytes() == b.images[0].tobytes()
    assert recs[0].images[0].tobytes() != make_records(SyntheticSpec(n=1, seed=8, size=64, patch_grid=8))[0].images[0].tobytes()
    checked = 0
    for r in recs:
        px = np.asarray(r.images[0]).astype(int)
        labels = r.meta["patch_labels"]
        for i in range(8):
            for j in range(8):
                block = px[i * 8 : (i + 1) * 8, j * 8 : (j + 1) * 8].reshape(-1, 3)
                colour = labels["colour"][i][j]
                if labels["kind"][i][j] == "object":
                    # the label is the plurality: its exact colour covers more of the patch than any other colour
                    shares = {c: (np.abs(block - np.array(v)).sum(1) == 0).mean() for c, v in COLOURS.items()}
                    assert shares[colour] >= 0.25 and max(shares, key=shares.get) == colour and labels["shape"][i][j] in SHAPES
                    checked += 1
                elif labels["kind"][i][j] == "background":
                    assert colour is None
                    assert not any((np.abs(block - np.array(c)).sum(1) == 0).mean() > 0.5 for c in COLOURS.values())
        objs = r.meta["objects"]
        q, a = r.question, r.answer
        if r.meta["qtype"] == "colour":
            shape = q.removeprefix("what colour is the ").removesuffix("?")
            assert [o["colour"] for o in objs if o["shape"] == shape] == [a]
        elif r.meta["qtype"] == "count":
            assert a == ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"][len(objs)]
        elif r.meta["qtype"] == "word":
            assert a == r.meta["word"] and any(c is not None for row in labels["char"] for c in row)
        assert a in r.meta["candidates"]
    assert checked > 100
    assert {r.meta["qtype"] for r in recs} == {"colour", "shape", "position", "word", "count"}


@pytest.mark.parametrize("target", [0.4, 0.85])
def test_synthetic_background_share_follows_the_parameter(target):
    share = background_share(make_records(SyntheticSpec(n=120, seed=1, background=target)))
    assert abs(share - target) < 0.1, share


def test_synthetic_patch_grid_follows_the_encoder(tmp_path):
    plan = _plan(tmp_path, "  synthetic: {n: 3, seed: 0}")
    prepared = prepare(load_plan(plan))
    rows, cols = prepared.adapter.grid()
    kind = prepared.records[0].meta["patch_labels"]["kind"]
    assert (len(kind), len(kind[0])) == (rows, cols)


class DumpProjector(Probe):
    """Saves the projector output of every visual token (test only)."""

    def sites(self, adapter):
        return [Site.parse("projector")]

    def update(self, adapter, batch, acts):
        x = acts[Site.parse("projector")]
        return {"projector": Tensors(visual=x.reshape(-1, x.shape[-1]))}

    def result(self):
        return {}


def test_tensors_stream_to_safetensors(tmp_path):
    """A probe returning `Tensors` gets one safetensors file per batch, listed in the manifest."""
    from safetensors.torch import load_file

    from embedlens.registry import probes

    probes.register("_test_dump_projector")(DumpProjector)
    try:
        shutil.copy(EXAMPLES / "data" / "shapes_0.png", tmp_path / "a.png")
        (tmp_path / "p.jsonl").write_text("".join(json.dumps({"id": f"s{i}", "image": "a.png", "question": "what?"}) + "\n" for i in range(3)))
        plan = tmp_path / "plan.yaml"
        plan.write_text("data: {prompts: p.jsonl}\nprobes: [{name: _test_dump_projector}]\noutput: {dir: out}\nbatch_size: 2\n")
        prepared = prepare(load_plan(plan))
        run(prepared, tmp_path / "out")
        files = sorted((tmp_path / "out" / "tensors" / "projector").glob("*.safetensors"))
        assert [f.name for f in files] == ["000000.safetensors", "000001.safetensors"]
        batch = prepared.adapter.encode([r.load()[0] for r in prepared.records[:2]], padding_side="right")
        want = collect(prepared.adapter, batch, ["projector"])[Site.parse("projector")]
        got = load_file(files[0])["visual"]
        torch.testing.assert_close(got, want.reshape(-1, want.shape[-1]))
        assert json.loads((tmp_path / "out" / "manifest.json").read_text())["tensors"] == ["tensors/projector"]
    finally:
        probes._items.pop("_test_dump_projector", None)
