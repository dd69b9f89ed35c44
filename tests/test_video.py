"""Video samples: frames read from lists of files or decoded from a file, sampled as the plan says, paths kept
inside the data folder, errors that name the file, line and key."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from embedlens.cli import app
from embedlens.data import Sample, read_records
from embedlens.errors import InputError
from embedlens.video import Video, VideoOptions, read_video_file, sample_indices


def _frame(i: int, size: int = 32) -> Image.Image:
    """Frame i: a flat colour that encodes i (red = 20 i), so a kept frame tells which source frame it is."""
    return Image.new("RGB", (size, size), (20 * i, 100, 200 - 20 * i))


def _which(frame: Image.Image) -> int:
    return int(round(float(np.asarray(frame)[..., 0].mean()) / 20))


@pytest.fixture
def folder(tmp_path):
    for i in range(10):
        _frame(i).save(tmp_path / f"f{i}.png")
    return tmp_path


def test_sampling_keeps_even_frames_first_and_last():
    # an independent statement of "evenly spread, first and last kept" on 10 frames
    assert sample_indices(10, None, VideoOptions(num_frames=None)) == list(range(10))
    assert sample_indices(10, None, VideoOptions(num_frames=2)) == [0, 9]
    assert sample_indices(10, None, VideoOptions(num_frames=1)) == [0]
    assert sample_indices(3, None, VideoOptions(num_frames=8)) == [0, 1, 2]
    # 30 fps sampled at 10: every third frame; then 2 of those
    assert sample_indices(30, 30.0, VideoOptions(fps=10, num_frames=None)) == list(range(0, 30, 3))
    assert sample_indices(30, 30.0, VideoOptions(fps=10, num_frames=2)) == [0, 27]
    # a rate above the source's keeps every frame
    assert sample_indices(5, 10.0, VideoOptions(fps=50, num_frames=None)) == [0, 1, 2, 3, 4]


def test_a_list_of_frames_from_a_prompts_file(folder):
    (folder / "p.jsonl").write_text(
        json.dumps({"id": "v", "video": [f"f{i}.png" for i in range(10)], "question": "what moves?"}) + "\n"
    )
    (rec,) = read_records(folder / "p.jsonl")
    sample, _ = rec.load(video=VideoOptions(num_frames=4, max_pixels=16 * 16))
    assert sample.images == [] and isinstance(sample.video, Video)
    assert sample.video.indices == [0, 3, 6, 9]
    assert [_which(f) for f in sample.video.frames] == [0, 3, 6, 9]  # the frames themselves, in order
    assert {f.size for f in sample.video.frames} == {(16, 16)}  # downscaled to max_pixels
    assert sample.video.fps is None  # a list of frames has no known rate


def test_csv_lists_frames_with_semicolons(folder):
    (folder / "p.csv").write_text("id,video,question\nv,f0.png;f1.png;f2.png,what?\n")
    (rec,) = read_records(folder / "p.csv")
    assert [_which(f) for f in rec.load()[0].video.frames] == [0, 1, 2]


def test_sample_takes_frames_directly_and_refuses_images_with_a_video():
    s = Sample(video=[_frame(1), _frame(2).convert("L")], question="q")
    assert len(s.video) == 2 and all(f.mode == "RGB" for f in s.video.frames)
    with pytest.raises(InputError, match="image\\(s\\) and a video"):
        Sample([_frame(0)], question="q", video=[_frame(1)])
    with pytest.raises(InputError, match="differ in size"):
        Sample(video=[_frame(1, 32), _frame(2, 16)], question="q")
    with pytest.raises(InputError, match="list of PIL images"):
        Sample(video="clip.mp4", question="q")


@pytest.mark.parametrize(
    "video, expected",
    [
        ("../outside.png", r"'video' \(\.\./outside\.png\) resolves to .*outside the data folder"),
        (["f0.png", "../outside.png"], r"'video\[1\]' \(\.\./outside\.png\) resolves to .*outside the data folder"),
        ("/etc/hostname", r"'video' is an absolute path"),
        ("link.png", r"'video' \(link\.png\) resolves to .*outside the data folder"),
        (["f0.png", "nope.png"], r"'video\[1\]': file not found"),
        ([], r"'video' must be a video file path or a non-empty list of frame image paths; got \[\]"),
        ([1, 2], r"'video' must be a video file path or a non-empty list"),
    ],
    ids=["dotdot", "dotdot-in-list", "absolute", "symlink-out", "missing", "empty", "not-paths"],
)
def test_paths_stay_inside_the_data_folder(tmp_path, video, expected):
    data = tmp_path / "data"
    data.mkdir()
    _frame(0).save(data / "f0.png")
    _frame(1).save(tmp_path / "outside.png")
    os.symlink(tmp_path / "outside.png", data / "link.png")
    (data / "p.jsonl").write_text('{"id": "a", "image": "f0.png", "question": "q"}\n' + json.dumps({"video": video, "question": "q"}) + "\n")
    with pytest.raises(InputError, match=rf"p\.jsonl:2: {expected}"):
        read_records(data / "p.jsonl")


def test_a_bad_frame_names_its_record_and_index(folder):
    (folder / "bad.png").write_bytes(b"not a png")
    (folder / "p.jsonl").write_text(json.dumps({"video": ["f0.png", "bad.png"], "question": "q"}) + "\n")
    (rec,) = read_records(folder / "p.jsonl")
    with pytest.raises(InputError, match=r"p\.jsonl:1: video .*'video': frame 1: cannot read"):
        rec.load()


def test_video_and_images_together_are_refused(folder):
    (folder / "p.jsonl").write_text(json.dumps({"video": ["f0.png"], "image": "f1.png", "question": "q"}) + "\n")
    with pytest.raises(InputError, match=r"p\.jsonl:1: give 'video' or 'image'/'images', not both"):
        read_records(folder / "p.jsonl")


def test_a_video_file_without_pyav_says_how_to_install(folder, monkeypatch):
    (folder / "clip.mp4").write_bytes(b"\0" * 64)
    monkeypatch.setitem(sys.modules, "av", None)  # import av fails as when it is not installed
    with pytest.raises(InputError, match=r"needs PyAV: pip install 'embedlens\[video\]'"):
        read_video_file(folder / "clip.mp4")


def _write_clip(path: Path, n: int, fps: int) -> None:
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as out:
        stream = out.add_stream("ffv1", rate=fps)  # lossless: a decoded frame is the frame written
        stream.width = stream.height = 32
        stream.pix_fmt = "bgr0"
        for i in range(n):
            for packet in stream.encode(av.VideoFrame.from_image(_frame(i))):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def test_a_video_file_is_sampled_at_the_plan_rate(tmp_path):
    _write_clip(tmp_path / "clip.mkv", n=10, fps=10)
    v = read_video_file(tmp_path / "clip.mkv", VideoOptions(fps=5, num_frames=None))
    assert v.indices == [0, 2, 4, 6, 8]
    assert [_which(f) for f in v.frames] == [0, 2, 4, 6, 8]
    assert v.fps == pytest.approx(5.0)
    assert v.source_fps == pytest.approx(10.0)  # each kept frame's time is index / the file's own rate
    v = read_video_file(tmp_path / "clip.mkv", VideoOptions(num_frames=3))
    assert [_which(f) for f in v.frames] == [0, 4, 9] and v.fps == pytest.approx(10.0)


def test_a_file_that_is_not_a_video_is_an_input_error(tmp_path):
    pytest.importorskip("av")
    (tmp_path / "clip.mp4").write_bytes(b"not a video at all" * 10)
    with pytest.raises(InputError, match=r"cannot read video .*clip\.mp4"):
        read_video_file(tmp_path / "clip.mp4")


PLAN = """\
model:
  source: tiny:llava-clip
data:
  prompts: prompts.jsonl
{video}probes:
  - name: embedding_lens
    params: {{k: 2, layers: [0]}}
output:
  dir: out
"""


@pytest.mark.parametrize(
    "video, prompts, expected",
    [
        ("  video: {num_frames: 0}\n", None, r"plan\.yaml:\d+ data\.video\.num_frames: .*greater than or equal to 1"),
        ("  video: {fps: -1}\n", None, r"plan\.yaml:\d+ data\.video\.fps: .*greater than 0"),
        ("  video: {frames: 4}\n", None, r"plan\.yaml:\d+ data\.video\.frames: unknown key"),
        ("", '{"video": "../f0.png", "question": "q"}\n', r"prompts\.jsonl:1: 'video' \(\.\./f0\.png\) resolves to .*outside"),
    ],
    ids=["num_frames", "fps", "unknown-key", "escape"],
)
def test_bad_video_settings_exit_2_with_a_located_error(tmp_path, video, prompts, expected):
    import re

    work = tmp_path / "w"
    work.mkdir()
    _frame(0).save(tmp_path / "f0.png")
    _frame(0).save(work / "f0.png")
    (work / "prompts.jsonl").write_text(prompts or '{"video": ["f0.png", "f0.png"], "question": "q"}\n')
    (work / "plan.yaml").write_text(PLAN.format(video=video))
    r = CliRunner().invoke(app, ["validate", str(work / "plan.yaml")])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    assert re.search(expected, r.output, flags=re.S), r.output


def test_a_family_without_a_video_path_refuses_a_video_sample():
    from embedlens import load_model
    from embedlens.adapters import Capability

    adapter = load_model("tiny:llava-clip")
    assert not adapter.has(Capability.VIDEO)
    with pytest.raises(InputError, match=r"sample 'v' has a video; .* does not take video"):
        adapter.encode([Sample(video=[_frame(0), _frame(1)], question="q", id="v")])


@pytest.mark.parametrize("deep", [False, True], ids=["config", "deep"])
def test_validate_refuses_video_samples_for_a_family_without_video_naming_the_record(tmp_path, deep):
    """validate (from the config, and --deep) refuses a video sample on a family that takes none, as the run
    would at that sample's batch, naming the record and the families that take video (from the registry)."""
    from embedlens.adapters import Capability
    from embedlens.registry import adapters

    _frame(0).save(tmp_path / "f0.png")
    (tmp_path / "prompts.jsonl").write_text('{"image": "f0.png", "question": "q"}\n{"video": ["f0.png", "f0.png"], "question": "q", "id": "clip"}\n')
    (tmp_path / "plan.yaml").write_text(PLAN.format(video=""))
    r = CliRunner().invoke(app, ["validate", str(tmp_path / "plan.yaml"), *(["--deep"] if deep else [])])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    takes = sorted(name for name, cls in adapters.items() if Capability.VIDEO in cls.capabilities)
    assert "prompts.jsonl:2" in r.output and "sample 'clip' has a video; llava does not take video" in r.output, r.output
    assert f"families that do: {', '.join(takes)})" in r.output.replace("\n", ""), r.output
    (tmp_path / "prompts.jsonl").write_text('{"video": ["f0.png", "f0.png"], "question": "q", "id": "clip"}\n')
    (tmp_path / "plan.yaml").write_text(PLAN.format(video="").replace("tiny:llava-clip", "tiny:qwen2_vl"))
    r = CliRunner().invoke(app, ["validate", str(tmp_path / "plan.yaml"), *(["--deep"] if deep else [])])
    assert r.exit_code == 0, r.output


def test_a_data_set_column_holds_frame_lists_inside_its_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    from embedlens.data import read_hf_dataset

    folder = tmp_path / "ds"
    datasets.Dataset.from_dict({"clip": [["f0.png", "f1.png", "f2.png"], ["f0.png", "../outside.png"]], "question": ["q", "q"]}).save_to_disk(str(folder))
    for i in range(3):
        _frame(i).save(folder / f"f{i}.png")
    _frame(5).save(tmp_path / "outside.png")
    with pytest.raises(InputError, match=r"ds\[1\]: .video\[1\]. \(\.\./outside\.png\) resolves to .*outside the data folder"):
        read_hf_dataset(folder, columns={"video": "clip"})
    datasets.Dataset.from_dict({"clip": [["f0.png", "f1.png", "f2.png"]], "question": ["q"]}).save_to_disk(str(tmp_path / "ok"))
    for i in range(3):
        _frame(i).save(tmp_path / "ok" / f"f{i}.png")
    (rec,) = read_hf_dataset(tmp_path / "ok", columns={"video": "clip"})
    assert [_which(f) for f in rec.load()[0].video.frames] == [0, 1, 2]
    with pytest.raises(InputError, match=r"data\.columns\.video names 'film', not a column"):
        read_hf_dataset(tmp_path / "ok", columns={"video": "film"})
