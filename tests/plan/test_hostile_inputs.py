"""A table of hostile inputs through the real CLI (plans, data files, images, model folders, output folders):
each ends with exit status 2, a message naming what is wrong, no Python traceback, and nothing written outside
the output folder."""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from embedlens.cli import app
from tests.support.snapshot import tree

PLAN = """\
model:
  source: tiny:llava-clip
data:
  prompts: prompts.jsonl
probes:
  - name: sink_detector
conditions:
  prune_dead:
    - {name: prune, params: {tokens: "visual and index % 2 == 0"}}
metrics:
  - {name: answer_logprob}
batch_size: 2
"""


def _put(path: Path, data: str | bytes) -> None:
    """Write a file and return None (so setups can chain effects with `or`)."""
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)


def _png(path: Path, size=(48, 48)) -> None:
    from PIL import Image

    Image.new("RGB", size, (200, 30, 30)).save(path)


def _base(w: Path) -> None:
    _png(w / "a.png")
    _put(w / "prompts.jsonl", '{"id": "x", "image": "a.png", "question": "what is it?", "answer": "red"}\n')


def _plan(w: Path, text: str = PLAN) -> list[str]:
    _put(w / "plan.yaml", text)
    return ["validate", str(w / "plan.yaml")]


def _run(w: Path, text: str = PLAN, out: str = "out", *extra: str) -> list[str]:
    _put(w / "plan.yaml", text)
    return ["run", str(w / "plan.yaml"), "-o", out, "-q", *extra]


def _sub(old: str, new: str):
    assert old in PLAN, old
    return PLAN.replace(old, new, 1)


_MODEL: dict[str, Path] = {}


def _model_folder(w: Path, damage: str) -> str:
    """A saved tiny model, then damaged: config missing, weights missing / garbage / truncated."""
    import shutil

    if "src" not in _MODEL:
        import tempfile

        from embedlens.testing.tiny import tiny_model

        model, processor = tiny_model("llava-clip")
        src = Path(tempfile.mkdtemp(prefix="embedlens-tiny-")) / "m"
        model.save_pretrained(src)
        processor.save_pretrained(src)
        _MODEL["src"] = src
    dst = w / "model"
    shutil.copytree(_MODEL["src"], dst)
    weights = dst / "model.safetensors"
    if damage == "no config":
        (dst / "config.json").unlink()
    elif damage == "no weights":
        weights.unlink()
    elif damage == "garbage weights":
        weights.write_bytes(b"this is not a safetensors file at all" * 10)
    elif damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    elif damage == "bad config":
        (dst / "config.json").write_text("{not json")
    return str(dst)


def _nested_yaml(depth: int) -> str:
    return PLAN + "sweep:\n  sink_detector.tau: " + "[" * depth + "1" + "]" * depth + "\n"


def _alias_bomb() -> str:
    lines = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i in range(1, 12):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]")
    return "\n".join(lines) + "\n" + PLAN


def _ro(monkeypatch, w: Path) -> None:
    """A read-only file system under w/out (root ignores chmod, so the OS call is made to fail as EROFS would)."""
    real = os.mkdir

    def mkdir(path, *a, **k):
        if os.path.abspath(path).startswith(str(w / "ro")):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(os, "mkdir", mkdir)


def _full_disk(monkeypatch, w: Path) -> None:
    import embedlens.files as files

    real = files.os.open

    def open_(path, flags, *a, **k):
        if os.path.abspath(path).startswith(str(w / "out")) and flags & os.O_CREAT and str(path).endswith(".tmp"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, flags, *a, **k)

    monkeypatch.setattr(files.os, "open", open_)


# (id, setup(w) -> CLI args, expected regex over the message, optional patch(monkeypatch, w))
CASES = [
    # plans
    ("plan not utf-8", lambda w: _put(w / "plan.yaml", PLAN.encode() + b"# caf\xe9\n") or ["validate", str(w / "plan.yaml")],
     r"plan\.yaml:13: not UTF-8 text \(byte 0xe9"),
    ("plan latin-1 in a value", lambda w: _put(w / "plan.yaml", PLAN.replace("prune_dead", "prun\xe9").encode("latin-1")) or ["validate", str(w / "plan.yaml")],
     r"plan\.yaml:8: not UTF-8"),
    ("yaml alias bomb", lambda w: _plan(w, _alias_bomb()), r"plan\.yaml:\d+: the plan is (expands to more than|more than 100 aliases)"),
    ("yaml 10000-deep nesting", lambda w: _plan(w, _nested_yaml(10000)), r"plan\.yaml:14: the plan is nested more than 32 levels deep"),
    ("yaml deep mapping", lambda w: _plan(w, "a:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 60))), r"plan\.yaml:\d+: the plan is nested more than 32"),
    ("yaml python tag", lambda w: _plan(w, '!!python/object/apply:os.system ["touch PWNED"]\n'), r"plan\.yaml:1: YAML syntax error: could not determine a constructor"),
    ("plan too large", lambda w: _plan(w, PLAN + "#" * (1 << 21) + "\n"), r"plan\.yaml: the plan is \d+ bytes; plans are at most"),
    ("seed 1e30", lambda w: _plan(w, PLAN + "seed: 1.0e+30\n"), r"plan\.yaml:13 seed: .*1e\+30"),
    ("seed negative", lambda w: _plan(w, PLAN + "seed: -1\n"), r"plan\.yaml:13 seed: Input should be greater than or equal to 0"),
    ("batch_size inf", lambda w: _plan(w, _sub("batch_size: 2", "batch_size: .inf")), r"plan\.yaml:12 batch_size: Input should be a finite number"),
    ("batch_size huge", lambda w: _plan(w, _sub("batch_size: 2", "batch_size: 100000000")), r"plan\.yaml:12 batch_size: Input should be less than or equal to 65536"),
    ("probe k 1e30", lambda w: _plan(w, _sub("  - name: sink_detector", "  - name: embedding_lens\n    params: {k: 1.0e+30}")),
     r"plan\.yaml:7 probes\[0\]\.params\.k: expected a usable value .* 1e\+30 is too large"),
    ("probe tau nan", lambda w: _plan(w, _sub("  - name: sink_detector", "  - name: sink_detector\n    params: {tau: .nan}")),
     r"plan\.yaml:7 probes\[0\]\.params\.tau: expected a usable value .* nan is not a finite number"),
    ("probe tau inf", lambda w: _plan(w, _sub("  - name: sink_detector", "  - name: sink_detector\n    params: {tau: -.inf}")),
     r"probes\[0\]\.params\.tau: .*-inf is not a finite number"),
    ("max_new_tokens 1e12", lambda w: _plan(w, _sub("  - {name: answer_logprob}", "  - {name: generation, params: {max_new_tokens: 1000000000000}}")),
     r"plan\.yaml:11 metrics\[0\]\.params\.max_new_tokens: expected a usable value .* too large"),
    ("max_new_tokens 1e6", lambda w: _plan(w, _sub("  - {name: answer_logprob}", "  - {name: generation, params: {max_new_tokens: 1000000}}")),
     r"metrics\[0\]\.params\.max_new_tokens: must be in 1\.\.4096; got 1000000"),
    ("synthetic n 1e12", lambda w: _plan(w, _sub("  prompts: prompts.jsonl", "  synthetic: {n: 1000000000000}")),
     r"plan\.yaml:4 data\.synthetic\.n: Input should be less than or equal to 1000000"),
    ("synthetic texture nan", lambda w: _plan(w, _sub("  prompts: prompts.jsonl", "  synthetic: {n: 2, texture: .nan}")),
     r"data\.synthetic\.texture: Input should be a finite number"),
    ("selection % 0", lambda w: _plan(w, _sub("index % 2 == 0", "index % 0 == 0")),
     r"plan\.yaml:9 conditions\.prune_dead\[0\]\.params\.tokens: .*'% N' needs a whole number N > 0"),
    ("selection deep nesting", lambda w: _plan(w, _sub('"visual and index % 2 == 0"', '"' + "not " * 60 + "visual" + '"')),
     r"conditions\.prune_dead\[0\]\.params\.tokens: .*nested \d+ levels deep; at most 32"),
    ("selection too long", lambda w: _plan(w, _sub('"visual and index % 2 == 0"', '"' + " or ".join(["visual"] * 600) + '"')),
     r"params\.tokens: .*a selection is at most 2000 characters"),
    ("param nested too deep", lambda w: _plan(w, _sub("  - name: sink_detector", "  - name: embedding_lens\n    params: {layers: " + "[" * 12 + "0" + "]" * 12 + "}")),
     r"probes\[0\]\.params\.layers: expected a usable value .*nested more than 8 levels"),
    ("probe label ../../x", lambda w: _plan(w, _sub("  - name: sink_detector", "  - name: sink_detector\n    label: ../../x")),
     r"plan\.yaml:7 probes\[0\]\.label: label '\.\./\.\./x' names this probe's tables"),
    ("probe label absolute", lambda w: _plan(w, _sub("  - name: sink_detector", "  - name: sink_detector\n    label: /etc/cron.d/x")),
     r"probes\[0\]\.label: label '/etc/cron\.d/x'"),
    ("probe label hidden", lambda w: _plan(w, _sub("  - name: sink_detector", "  - name: sink_detector\n    label: .hidden")), r"probes\[0\]\.label: label '\.hidden'"),
    ("sweep value with a slash", lambda w: _plan(w, _sub("  - name: sink_detector", "  - name: logit_lens") + "sweep:\n  logit_lens.target: [answer, ../../etc]\n"),
     r"plan\.yaml:6 probes\[0\]\.label: a sweep value makes the label 'logit_lens\[target=\.\./\.\./etc\]', which cannot be a file name"),
    ("model key ..", lambda w: _plan(w, _sub("model:\n  source: tiny:llava-clip", "models:\n  ..: {source: tiny:llava-clip}\n  b: {source: tiny:llava-clip}")),
     r"plan\.yaml:2 models\.\.\.: model name '\.\.' becomes a folder name"),
    # only loading tells (validate reads a tiny: model's stored config, as a checkpoint's): --deep loads it
    ("unknown attn_implementation", lambda w: [*_plan(w, _sub("  source: tiny:llava-clip", "  source: tiny:llava-clip\n  attn_implementation: warp_drive")), "--deep"],
     r"plan\.yaml:3 model\.attn_implementation: 'warp_drive' cannot be used with this model"),
    ("unavailable device", lambda w: _plan(w, _sub("  source: tiny:llava-clip", "  source: tiny:llava-clip\n  device: cuda:7")),
     r"plan\.yaml:3 model\.device: 'cuda:7' is not available here"),
    ("not a device", lambda w: _plan(w, _sub("  source: tiny:llava-clip", "  source: tiny:llava-clip\n  device: banana")), r"model\.device: not a device: 'banana'"),
    # data files
    ("prompts not utf-8", lambda w: _put(w / "prompts.jsonl", b'{"id": "x", "image": "a.png", "question": "caf\xe9"}\n') or _plan(w),
     r"plan\.yaml:4 data\.prompts: .*prompts\.jsonl:1: not UTF-8 text"),
    ("csv not utf-8", lambda w: _put(w / "p.csv", b"image,question\na.png,caf\xe9\n") or _plan(w, _sub("prompts.jsonl", "p.csv")),
     r"data\.prompts: .*p\.csv:2: not UTF-8 text"),
    ("jsonl deep nesting", lambda w: _put(w / "prompts.jsonl", '{"id": "x", "image": "a.png", "question": "q", "m": ' + "[" * 100000 + "]" * 100000 + "}\n") or _plan(w),
     r"data\.prompts: .*prompts\.jsonl:1: the JSON is nested too deeply"),
    ("jsonl not json", lambda w: _put(w / "prompts.jsonl", "{nope\n") or _plan(w), r"data\.prompts: .*prompts\.jsonl:1: not valid JSON"),
    ("jsonl array line", lambda w: _put(w / "prompts.jsonl", "[1, 2]\n") or _plan(w), r"prompts\.jsonl:1: expected a JSON object, got list"),
    ("image missing", lambda w: _put(w / "prompts.jsonl", '{"id": "x", "image": "gone.png", "question": "q"}\n') or _plan(w),
     r"prompts\.jsonl:1: image file not found: .*gone\.png"),
    ("prompts empty", lambda w: _put(w / "prompts.jsonl", "\n\n") or _plan(w), r"data\.prompts: .*prompts\.jsonl is empty"),
    ("prompts is a folder", lambda w: (w / "dir.jsonl").mkdir() or _plan(w, _sub("prompts.jsonl", "dir.jsonl")), r"data\.prompts: file not found"),
    # model folders
    ("model folder without config", lambda w: _plan(w, _sub("tiny:llava-clip", _model_folder(w, "no config"))), r"plan\.yaml:2 model\.source: cannot load .*model.*config\.json"),
    ("model folder bad config", lambda w: _plan(w, _sub("tiny:llava-clip", _model_folder(w, "bad config"))), r"plan\.yaml:2 model\.source: cannot load"),
    ("model folder without weights", lambda w: _plan(w, _sub("tiny:llava-clip", _model_folder(w, "no weights"))), r"plan\.yaml:2 model\.source: (cannot load the model from|adapter .llava. \(\w+\) cannot load) .*model"),
    ("model garbage safetensors", lambda w: _plan(w, _sub("tiny:llava-clip", _model_folder(w, "garbage weights"))), r"plan\.yaml:2 model\.source: (cannot load the model from|adapter .llava. \(\w+\) cannot load)"),
    ("model truncated safetensors", lambda w: _plan(w, _sub("tiny:llava-clip", _model_folder(w, "truncated weights"))), r"plan\.yaml:2 model\.source: (cannot load the model from|adapter .llava. \(\w+\) cannot load)"),
    ("model folder missing", lambda w: _plan(w, _sub("tiny:llava-clip", str(w / "nowhere"))), r"model\.source: cannot load a model config"),
    # output folders
    ("output empty string", lambda w: _run(w, out=""), r"the output folder is empty \(''\)"),
    ("output root", lambda w: _run(w, out="/"), r"refusing to use / .*root or your home folder"),
    ("output home", lambda w: _run(w, out="~"), r"refusing to use ~ .*root or your home folder"),
    ("output is a file", lambda w: _put(w / "f.txt", "mine") or _run(w, out="f.txt"), r"output f\.txt exists and is not a folder"),
    ("output foreign folder", lambda w: (w / "mine").mkdir() or _put(w / "mine" / "summary.json", "{}") or _run(w, out="mine"),
     r"mine is not empty and was not created by embedlens \(it holds summary\.json"),
    ("output dangling link", lambda w: os.symlink(w / "nowhere", w / "dl") or _run(w, out="dl"), r"output dl is a dangling symbolic link"),
    ("output bad marker", lambda w: (w / "m").mkdir() or _put(w / "m" / ".embedlens-run", "[1]") or _run(w, out="m"), r"not an embedlens run marker"),
    ("output marker is a link", lambda w: (w / "m").mkdir() or _put(w / "x.json", '{"embedlens_run": "a"}') or os.symlink(w / "x.json", w / "m" / ".embedlens-run") or _run(w, out="m"),
     r"cannot read the run marker .*link"),
    ("output read-only", lambda w: _run(w, out="ro/out"), r"cannot create the output folder .*ro.*read-only; choose another --output", _ro),
    ("disk full", lambda w: _run(w, PLAN.replace("tiny:llava-clip", "tiny:llava-clip").replace("prompts: prompts.jsonl", "synthetic: {n: 2, size: 32}")),
     r"cannot write .*out/.*: the disk is full; free space and continue with --resume", _full_disk),
    ("resume corrupt checkpoint", lambda w: (w / "out").mkdir() or _put(w / "out" / ".embedlens-run", '{"embedlens_run": "x"}')
     or _put(w / "out" / "checkpoint.safetensors", b"\xff" * 64) or _run(w, PLAN, "out", "--resume"), r"checkpoint\.safetensors: cannot read the checkpoint"),
    ("unfinished run without flags", lambda w: (w / "out").mkdir() or _put(w / "out" / ".embedlens-run", '{"embedlens_run": "x"}')
     or _put(w / "out" / "checkpoint.safetensors", b"x") or _run(w), r"holds an unfinished run .*--resume or start again with --overwrite"),
    ("compare outside file", lambda w: ["compare", str(w / "nope1"), str(w / "nope2"), "-o", "out"], r"run folder not found: .*nope1"),
]


def test_the_table_is_large_enough():
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES)




@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_is_a_clear_error(tmp_path, monkeypatch, case):
    name, setup, expected = case[:3]
    patch = case[3] if len(case) > 3 else None
    w = tmp_path / "w"
    w.mkdir()
    home = tmp_path / "home"
    home.mkdir()
    (home / "precious.txt").write_text("the user's own file")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(w)
    _base(w)
    args = setup(w)
    if patch is not None:
        patch(monkeypatch, w)
    before = tree(tmp_path, w / "out")
    r = CliRunner().invoke(app, args)
    msg = r.output
    assert r.exit_code == 2, f"{name}: exit {r.exit_code}\n{msg}\n{r.exception!r}"
    assert "Traceback" not in msg and (r.exception is None or isinstance(r.exception, SystemExit)), msg
    assert msg.startswith("error: ") and re.search(expected, msg, flags=re.S), msg
    assert tree(tmp_path, w / "out") == before, f"{name}: something was written outside the output folder"
    assert not (w / "PWNED").exists()


def test_extreme_aspect_image_is_skipped_and_listed_not_a_crash(tmp_path, monkeypatch):
    """A 200000x1 PNG of a few hundred bytes: refused from its header (no decode), listed as skipped; the run goes on."""
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    _base(tmp_path)
    Image.new("L", (200000, 1), 7).save(tmp_path / "strip.png")
    assert (tmp_path / "strip.png").stat().st_size < 1000
    Image.new("L", (5000, 5000), 7).save(tmp_path / "huge.png")  # 25M pixels: over 16 x max_pixels below, never decoded
    (tmp_path / "prompts.jsonl").write_text(
        '{"id": "good", "image": "a.png", "question": "what is it?", "answer": "red"}\n'
        '{"id": "strip", "image": "strip.png", "question": "what is it?", "answer": "red"}\n'
        '{"id": "huge", "image": "huge.png", "question": "what is it?", "answer": "red"}\n'
    )
    (tmp_path / "plan.yaml").write_text(PLAN.replace("batch_size: 2", "batch_size: 3").replace("  prompts: prompts.jsonl", "  prompts: prompts.jsonl\n  max_pixels: 1000000"))
    r = CliRunner().invoke(app, ["run", "plan.yaml", "-o", "out", "-q"])
    assert r.exit_code == 0, r.output
    skipped = json.loads((tmp_path / "out" / "summary.json").read_text())["data"]["skipped"]
    assert [s["sample_id"] for s in skipped] == ["strip", "huge"]
    assert "aspect ratio 200000:1" in skipped[0]["error"] and "more than 16 x data.max_pixels" in skipped[1]["error"]
    assert "skipped sample strip" in r.output
