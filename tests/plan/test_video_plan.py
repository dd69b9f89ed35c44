"""A plan over the synthetic video set on tiny Qwen2-VL: video samples load with data.video's settings, probes
run, and pruning `visual and frame == 0` removes exactly the first temporal patch's tokens of every sample."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

import embedlens
from embedlens.cli import app
from embedlens.plan import load_plan, run_all
from embedlens.synthetic_video import SyntheticVideoSpec, make_video_records, save_video


def test_a_video_plan_prunes_one_temporal_patch(tmp_path):
    save_video(SyntheticVideoSpec(n=3, frames=6, size=32, speed=2, patch_grid=4), str(tmp_path / "data"))
    plan = {
        "model": {"source": "tiny:qwen2_vl"},
        "data": {"prompts": "data/prompts.jsonl", "video": {"num_frames": 4}},
        "probes": [{"name": "embedding_lens", "params": {"k": 2, "layers": [0]}}],
        "conditions": {"prune_first": [{"name": "prune", "params": {"tokens": "visual and frame == 0"}}]},
        "metrics": [{"name": "next_token_kl"}],
        "output": {"dir": "out"},
        "batch_size": 2,
    }
    embedlens.run(plan, base_dir=tmp_path, quiet=True)
    out = tmp_path / "out"
    # 6 frames kept as 4 -> 2 temporal patches of 4 x 4 tokens (32-px frames, 4-px patches merged 2 x 2)
    tokens = pd.read_parquet(out / "tokens.parquet")
    assert tokens.groupby("sample_id").position.nunique().tolist() == [32, 32, 32]
    touched = pd.read_parquet(out / "touched_tokens.parquet")
    assert set(touched.sample_id) == set(tokens.sample_id)
    for _, t in touched.groupby("sample_id"):
        assert sorted(t["index"]) == list(range(16))  # the first 16 visual tokens: temporal patch 0
        assert sorted(zip(t.row, t.col)) == [(r, c) for r in range(4) for c in range(4)]
        assert set(t.frame) == {0}


EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "video.yaml"


@pytest.fixture(scope="module")
def video_example(tmp_path_factory):
    """examples/video.yaml run as written (tiny:qwen2_vl, the synthetic video set from data.synthetic_video)."""
    out = tmp_path_factory.mktemp("video") / "run"
    return run_all(load_plan(EXAMPLE), out), out


def test_the_video_example_prunes_by_frame_with_frame_matched_controls(video_example):
    _, out = video_example
    plan = load_plan(EXAMPLE).plan
    spec = SyntheticVideoSpec(**{**plan.data.synthetic_video.model_dump(), "question_types": tuple(plan.data.synthetic_video.question_types)})
    ids = [r.id for r in make_video_records(spec)]
    tokens = pd.read_parquet(out / "token_partition.tokens.parquet")
    assert sorted(tokens.sample_id.unique()) == sorted(ids)
    # 8 frames of 32 px -> 4 temporal patches of 4 x 4 tokens (4-px patches merged 2 x 2) per video
    assert (tokens.groupby("sample_id").apply(lambda t: sorted(set(zip(t.frame, t.row, t.col))), include_groups=False)
            == pd.Series({i: [(f, r, c) for f in range(4) for r in range(4) for c in range(4)] for i in ids})).all()
    touched = pd.read_parquet(out / "touched_tokens.parquet")
    for sid, t in touched.groupby("sample_id"):
        frame0 = t[t.condition == "prune_frame0"]
        assert sorted(zip(frame0.frame, frame0.row, frame0.col)) == [(0, r, c) for r in range(4) for c in range(4)]
        ctrl = t[t.condition == "prune_frame0_random"]  # matched per sample, drawn outside the target: other frames
        assert len(ctrl) == 16 and (ctrl.frame > 0).all()
        top = t[t.condition == "prune_top1"]
        assert sorted(zip(top.frame, top.row)) == [(1, 0)] * 4
        ctrl = t[t.condition == "prune_top1_random"]  # per_frame: 4 tokens of frame 1, none of them the target
        assert len(ctrl) == 4 and set(ctrl.frame) == {1} and (ctrl.row > 0).all()
        dead = tokens[(tokens.sample_id == sid) & (tokens.group == "dead")]
        pruned = t[t.condition == "prune_dead"]
        assert sorted(zip(pruned.frame, pruned.row, pruned.col)) == sorted(zip(dead.frame, dead.row, dead.col))
        ctrl = t[t.condition == "prune_dead_random"]  # as many in each frame as the dead group has there
        assert ctrl.frame.value_counts().sort_index().to_dict() == dead.frame.value_counts().sort_index().to_dict()


def test_a_bad_synthetic_video_value_is_named_with_its_line(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text(EXAMPLE.read_text().replace("frames: 8, speed: 2", "frames: 8, speed: 9"))
    r = CliRunner().invoke(app, ["run", str(plan), "-q"])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert re.search(r"plan\.yaml:\d+ data\.synthetic_video: synthetic_video\.speed: 9 pixels a frame over 8 frames leaves a "
                     r"32-pixel frame \(at most 3\)", r.output), r.output
    plan.write_text(EXAMPLE.read_text().replace("still_rate: 0.5", "still_rate: 0.5, colours: 3"))
    r = CliRunner().invoke(app, ["validate", str(plan)])
    assert r.exit_code == 2 and re.search(r"plan\.yaml:\d+ data\.synthetic_video\.colours: unknown key", r.output), r.output


def test_a_video_has_one_token_map_per_temporal_patch_in_the_report(video_example):
    _, out = video_example
    report = (out / "report.html").read_text()
    for t in range(4):  # 8 kept frames -> 4 temporal patches
        assert (out / "figures" / f"token_partition_map_frame{t}.png").is_file()
        assert f"token_partition_map_frame{t}.png" in report
    assert not (out / "figures" / "token_partition_map.png").exists()


def test_each_frame_map_holds_that_frames_pixels_and_tokens():
    """FirstImage, which every token map draws from: per temporal patch t, the tokens whose frame is t (rows, cols,
    positions as the role map has them) over kept frame 2t's pixels (32-px frames are not resized)."""
    import numpy as np

    from embedlens import load_model
    from embedlens.probes._util import FirstImage

    adapter = load_model("tiny:qwen2_vl")
    recs = make_video_records(SyntheticVideoSpec(n=2, frames=6, size=32, speed=2, patch_grid=4))
    samples = [r.load()[0] for r in recs]
    batch = adapter.encode(samples, padding_side="left")
    vt = batch.roles.visual_tokens()
    first = FirstImage(n=4)
    first.offer(adapter, batch, vt, position=vt["position"].tolist())
    assert [e["frame"] for e in first.images] == [0, 1, 2] and {e["sample_id"] for e in first.images} == {recs[0].id}
    assert first.frames == first.images  # n=4 panels: the second 3-frame video does not fit and is not cut
    for e in first.images:
        t = e["frame"]
        mine = (vt["sample"] == 0) & (vt["frame"] == t)
        assert e["position"] == vt["position"][mine].tolist()
        assert list(zip(e["row"], e["col"])) == list(zip(vt["row"][mine].tolist(), vt["col"][mine].tolist()))
        want = np.asarray(samples[0].video.frames[2 * t], dtype=np.float32) / 255
        assert np.abs(e["pixels"].numpy() - want).max() < 0.02, t
        other = np.asarray(samples[0].video.frames[2 * t + 2 if t < 2 else 0], dtype=np.float32) / 255
        assert np.abs(e["pixels"].numpy() - other).max() > 0.1  # the shapes moved: another frame is told apart
    one = FirstImage(n=1)  # one panel asked: the first video is still kept whole
    one.offer(adapter, batch, vt, position=vt["position"].tolist())
    assert [e["frame"] for e in one.images] == [0, 1, 2]


def _over_time_run(tmp_path, still_rate: float):
    plan = {
        "model": {"source": "tiny:qwen2_vl"},
        "data": {"synthetic_video": {"n": 4, "size": 32, "frames": 8, "speed": 2, "still_rate": still_rate, "patch_grid": 4}},
        "partition": {"discover": True},
        "probes": [{"name": "token_partition"}, {"name": "embedding_lens", "params": {"k": 2, "layers": [0]}}],
        "output": {"dir": "out"},
        "batch_size": 2,
    }
    results = embedlens.run(plan, base_dir=tmp_path, quiet=True)
    out = tmp_path / "out"
    return results, pd.read_parquet(out / "token_partition.frames.parquet"), pd.read_parquet(out / "embedding_lens.frames.parquet")


def test_static_videos_keep_their_partition_and_their_words_in_every_frame(tmp_path):
    """Planted: with every shape still, a place's frames are the same pixels, so its token is in the same group
    and reads the same word at LLM layer 0 in every frame (agreement 1); moving shapes break that somewhere."""
    results, part, lens = _over_time_run(tmp_path / "still", 1.0)
    tokens = pd.read_parquet(tmp_path / "still" / "out" / "token_partition.tokens.parquet")
    assert len(part) == 4 * 16 and (part.n_frames == 4).all()  # 4 videos x 4 x 4 places, 4 temporal patches each
    assert ((part.n_sink + part.n_dead + part.n_alive) == part.n_frames).all()
    # independently from the token table: per place, the frames of each group
    want = tokens.groupby(["sample_id", "row", "col"]).group.agg(lambda g: (g == "dead").sum())
    got = part.set_index(["sample_id", "row", "col"]).n_dead
    assert (want.sort_index() == got.sort_index()).all()
    for g in ("dead", "alive"):
        assert part[f"n_{g}"].isin([0, 4]).all()
    over = results.summary["token_partition"]["over_time"]
    assert over["dead"]["places_ever"] > 0 and over["alive"]["places_ever"] > 0
    for g, t in over.items():
        assert t["places_ever"] == int((part[f"n_{g}"] > 0).sum())
        if t["places_ever"]:
            assert t["mean_share_of_frames"] == 1.0 and t["share_in_every_frame"] == 1.0
    assert (lens.agreement == 1.0).all() and (lens.n_agree == 4).all()
    assert results.summary["embedding_lens"]["frame_agreement"] == {"0": 1.0}

    results, part, lens = _over_time_run(tmp_path / "moving", 0.0)
    assert (lens.agreement < 1.0).any() and results.summary["embedding_lens"]["frame_agreement"]["0"] < 1.0
    assert results.summary["embedding_lens"]["frame_agreement"]["0"] == pytest.approx(lens.agreement.mean())
    toks = pd.read_parquet(tmp_path / "moving" / "out" / "embedding_lens.tokens.parquet")
    modal = toks.groupby(["sample_id", "row", "col"]).id_1.agg(lambda s: s.value_counts().iloc[0])
    assert (modal.sort_index() == lens.set_index(["sample_id", "row", "col"]).n_agree.sort_index()).all()


def test_the_video_example_splits_over_time_by_static_and_moving_content(video_example):
    """The `content` of each place, summed independently from the frames tables, is what the summary reports; on
    this model static places keep their group and their top-1 word in every frame, moving ones do not."""
    import json

    _, out = video_example
    summary = json.loads((out / "summary.json").read_text())
    part = pd.read_parquet(out / "token_partition.frames.parquet")
    lens = pd.read_parquet(out / "embedding_lens.frames.parquet")
    sinks = pd.read_parquet(out / "temporal_sinks.places.parquet")
    key = ["sample_id", "row", "col"]
    merged = part.merge(lens[key + ["content"]], on=key, suffixes=("", "_lens")).merge(sinks[key + ["content"]], on=key, suffixes=("", "_sinks"))
    assert len(merged) == len(part) == 6 * 16 and (merged.content == merged.content_lens).all() and (merged.content == merged.content_sinks).all()
    assert set(part.content) == {"static_background", "static_object", "moving"}
    by = summary["token_partition"]["over_time_by_content"]
    for content, rows in part.groupby("content"):
        assert by[content]["places"] == len(rows)
        for g in ("dead", "alive"):
            ever = rows[rows[f"n_{g}"] > 0]
            assert by[content][g]["places_ever"] == len(ever)
            if len(ever):
                assert by[content][g]["mean_share_of_frames"] == pytest.approx((ever[f"n_{g}"] / ever.n_frames).mean())
                assert by[content][g]["share_in_every_frame"] == pytest.approx((ever[f"n_{g}"] == ever.n_frames).mean())
    agree = summary["embedding_lens"]["frame_agreement_by_content"]
    for content, rows in lens.groupby("content"):
        assert agree[content]["places"] == len(rows) and agree[content]["0"] == pytest.approx(rows.agreement.mean())
    static = part[part.content != "moving"]
    assert ((static.n_dead == static.n_frames) | (static.n_alive == static.n_frames)).all()
    assert (lens[lens.content != "moving"].agreement == 1.0).all() and agree["moving"]["0"] < 1.0
    sink = summary["temporal_sinks"]
    assert sink["n_videos"] == 6 and sink["n_places"] == 96 and set(sink["by_content"]) == set(part.content)
    assert sinks.groupby("sample_id").sink_score.agg(["min", "max"]).values.tolist() == [[0.0, pytest.approx(1.0)]] * 6
    report = (out / "report.html").read_text()
    for t in range(4):
        assert f"temporal_sinks_map_frame{t}.png" in report
    assert "over_time_by_content.static_background.dead.places_ever" in report
    assert "frame_agreement_by_content.moving.0" in report


def test_a_videos_removal_map_has_one_panel_per_frame(video_example):
    """The panels `removal_maps` draws for the example's prune_top1 and its per_frame control: the first video's
    4 temporal patches, each marked with the tokens touched_tokens says were removed in that frame."""
    from embedlens import load_model
    from embedlens.plan.conclusions import Conclusions, token_map_panels

    _, out = video_example
    plan = load_plan(EXAMPLE).plan
    spec = SyntheticVideoSpec(**{**plan.data.synthetic_video.model_dump(), "question_types": tuple(plan.data.synthetic_video.question_types)})
    records = make_video_records(spec)
    touched = pd.read_parquet(out / "touched_tokens.parquet")
    concl = Conclusions(conditions=["prune_top1", "prune_top1_random"], controls={"prune_top1": "prune_top1_random"})
    panels = token_map_panels(concl, touched.to_dict("list"), load_model("tiny:qwen2_vl"), records, 4, plan.data.max_pixels,
                              plan.data.video.options())
    first = records[0].id
    assert len(panels) == 1 and concl.map_samples == [first]
    images = panels[0]["images"]
    assert [im["title"] for im in images] == [f"{first}, frame {t}" for t in range(4)]
    assert all(sorted(zip(im["row"], im["col"])) == [(r, c) for r in range(4) for c in range(4)] for im in images)
    (name, acted), (ctrl, acted_ctrl) = panels[0]["rows"]
    assert (name, ctrl) == ("prune_top1", "prune_top1_random")
    mine = touched[touched.sample_id == first]
    for t, im in enumerate(images):
        for cond, marks in ((name, acted), (ctrl, acted_ctrl)):
            want = mine[(mine.condition == cond) & (mine.frame == t)]
            assert sorted(marks.get(im["key"], {})) == sorted(zip(want.row, want.col)), (cond, t)
    assert len(acted[images[1]["key"]]) == 4 and images[0]["key"] not in acted  # frame 1's top row only
