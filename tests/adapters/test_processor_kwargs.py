"""``model.processor_kwargs``: Qwen-VL's pixel bounds and InternVL's tiles cap the visual tokens; keys and values checked."""

from __future__ import annotations

import math

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

import embedlens
from embedlens.adapters.processor_options import ProcessorOptionError
from embedlens.cli import app
from embedlens.errors import EmbedLensError, PlanError
from embedlens.plan import load_plan
from embedlens.plan.preparation import prepare
from embedlens.plan.runner import run


def _sample(w: int, h: int) -> embedlens.Sample:
    return embedlens.Sample([Image.new("RGB", (w, h), (200, 40, 40))], question="what colour?", id=f"img{w}x{h}")


def _qwen_tokens(h: int, w: int, min_pixels: int, max_pixels: int, factor: int) -> int:
    """Qwen2-VL's resize rule (transformers' ``smart_resize``), written out: sides to multiples of `factor`, scaled
    into [min_pixels, max_pixels] keeping the aspect ratio; one visual token per factor x factor pixels."""
    hb, wb = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb, wb = max(factor, math.floor(h / beta / factor) * factor), max(factor, math.floor(w / beta / factor) * factor)
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return (hb // factor) * (wb // factor)


def _plan(tmp_path, kwargs: dict, source: str = "tiny:qwen2.5-vl", seed: int = 0):
    plan = {"model": {"source": source, "processor_kwargs": kwargs}, "data": {"synthetic": {"n": 4, "size": 48}},
            "probes": [{"name": "embedding_lens", "params": {"k": 1, "layers": [0]}}], "batch_size": 2, "seed": seed,
            "output": {"dir": "out", "figures": False, "report": False}}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


@pytest.mark.parametrize("max_pixels", [None, 512, 256])
def test_qwen_max_pixels_caps_the_visual_tokens_as_the_processor_computes(tmp_path, max_pixels):
    """A 64 x 40 image on the tiny Qwen2.5-VL (4-px patches merged 2 x 2: a token per 8 x 8 pixels; the processor's
    own bounds 256..1024 pixels): the plan's max_pixels gives the token count of the resize rule, and fewer tokens."""
    kwargs = {} if max_pixels is None else {"max_pixels": max_pixels}
    adapter = prepare(load_plan(_plan(tmp_path, kwargs))).adapter
    batch = adapter.encode([_sample(64, 40)])
    n = int(batch.roles.visual.sum())
    assert n == _qwen_tokens(40, 64, 256, max_pixels or 1024, 8)
    assert n == {None: 15, 512: 6, 256: 2}[max_pixels]  # 40x64 -> 24x40 (3x5 tokens) ... the rule by hand
    assert adapter.grid() == ((int(math.isqrt(max_pixels or 1024)) // 8),) * 2  # synthetic data's patch_grid: auto follows


def test_python_api_takes_the_same_settings():
    adapter = embedlens.load_model("tiny:qwen2.5-vl", processor_kwargs={"max_pixels": 512, "min_pixels": 64})
    assert int(adapter.encode([_sample(64, 40)]).roles.visual.sum()) == _qwen_tokens(40, 64, 64, 512, 8)
    with pytest.raises(ProcessorOptionError, match=r"model.processor_kwargs.max_pixel: qwen2_5_vl's processor does not take it\. "
                                                  r"Did you mean: max_pixels\?"):
        embedlens.load_model("tiny:qwen2.5-vl", processor_kwargs={"max_pixel": 512})


def test_internvl_max_dynamic_patch_caps_the_tiles():
    """The tiny InternVL tiles a wide image into up to 4 tiles plus a thumbnail, each image_seq_length tokens; with
    max_dynamic_patch: 1 it is one tile (no thumbnail, as InternVL's own rule: a thumbnail only beside several tiles)."""
    wide = _sample(128, 32)
    full = embedlens.load_model("tiny:internvl")
    one = embedlens.load_model("tiny:internvl", processor_kwargs={"max_dynamic_patch": 1})
    per_tile = full.config.image_seq_length
    assert int(full.encode([wide]).roles.visual.sum()) == per_tile * (4 + 1)
    assert int(one.encode([wide]).roles.visual.sum()) == per_tile


@pytest.mark.parametrize("kwargs, where, match", [
    ({"max_pixel": 512}, "max_pixel", r"does not take it\. Did you mean: max_pixels\? It takes: max_pixels, min_pixels"),
    ({"max_pixels": "many"}, "max_pixels", r"expected an integer; got 'many'"),
    ({"max_pixels": True}, "max_pixels", r"expected an integer; got True"),
    ({"max_pixels": 0}, "max_pixels", r"expected at least 1; got 0"),
    ({"min_pixels": 2048}, "min_pixels", r"min_pixels \(2048\) is above max_pixels \(1024\)"),
    ({"max_pixels": [1, 2]}, "max_pixels", r"expected a number, a string or true/false; got \[1, 2\]"),
])
def test_bad_settings_name_the_key_with_exit_status_2(tmp_path, kwargs, where, match):
    path = _plan(tmp_path, kwargs)
    with pytest.raises(PlanError, match=rf"plan\.yaml:\d+ model\.processor_kwargs\.{where}: .*{match}"):
        prepare(load_plan(path))
    res = CliRunner().invoke(app, ["run", str(path), "--output", str(tmp_path / "out")])
    assert res.exit_code == 2 and f"model.processor_kwargs.{where}" in res.output and "Traceback" not in res.output, res.output


def test_a_family_without_settings_says_so(tmp_path):
    with pytest.raises(PlanError, match=r"model\.processor_kwargs\.max_pixels: llava's processor does not take it.*takes none"):
        prepare(load_plan(_plan(tmp_path, {"max_pixels": 512}, source="tiny:llava-clip")))


def test_changing_them_refuses_resume(tmp_path):
    """They are part of the plan a run's checkpoint holds: a run stopped with one max_pixels does not resume with another."""
    path = _plan(tmp_path, {"max_pixels": 512})

    def stop(phase, done, total):
        if phase == "run" and done >= 2:
            raise EmbedLensError("stop")

    with pytest.raises(EmbedLensError, match="stop"):
        run(prepare(load_plan(path)), tmp_path / "a", progress=stop)
    changed = _plan(tmp_path, {"max_pixels": 256})
    with pytest.raises(EmbedLensError, match="different plan"):
        run(prepare(load_plan(changed)), tmp_path / "a", resume=True)
    assert run(prepare(load_plan(_plan(tmp_path, {"max_pixels": 512}))), tmp_path / "a", resume=True).resumed_from == 1
