"""Hostile input to the commands around `run`: eval's --limit, `new`'s name and folder, device maps, compare's run
folders, Hugging Face data sets, the torchrun environment, non-UTF-8 paths, plugin parameters and tuned-lens files.

Each case of the table ends with exit status 2, one ``error:`` line naming the file, key or value and what was
expected, no Python traceback, and nothing written or deleted outside the output folder (nothing at all when the
command writes no folder). The tests around the table check what should still work next to each refusal.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import struct
import zlib
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

FF = os.fsdecode(b"\xff")  # the byte 0xff in a file name, as Python sees it (a lone surrogate)


def _put(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)


def _png_bytes(size=(48, 48)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def _png_header(w: int, h: int) -> bytes:
    """A PNG that declares w x h pixels in a few dozen bytes (its data is not there: only a header check may read it)."""
    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _base(w: Path) -> None:
    _put(w / "a.png", _png_bytes())
    _put(w / "prompts.jsonl", '{"id": "x", "image": "a.png", "question": "what is it?", "answer": "red"}\n')


def _sub(old: str, new: str, text: str = PLAN) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def _validate(w: Path, text: str = PLAN) -> list[str]:
    _put(w / "plan.yaml", text)
    return ["validate", str(w / "plan.yaml")]


def _run(w: Path, text: str = PLAN, out: str = "out") -> list[str]:
    _put(w / "plan.yaml", text)
    return ["run", str(w / "plan.yaml"), "-o", out, "-q"]


def _model(line: str) -> str:
    return _sub("  source: tiny:llava-clip", "  source: tiny:llava-clip\n" + line)


def _probe(entry: str) -> str:
    return _sub("  - name: sink_detector", entry)


def _tokens(selection: str) -> str:
    return _sub('"visual and index % 2 == 0"', selection)


def _eval(limit: str) -> list[str]:
    return ["eval", "plan.yaml", "--tasks", "embedlens_pope", "--limit", limit, "-o", "out"]


# -- compare: two run folders written by hand (compare reads only manifest.json, summary.json and the figures) --

SUMMARY = {
    "partition": {"fractions": {"sink": 0.1, "dead": 0.5, "alive": 0.4}, "n_visual_tokens": 10, "order": ["sink", "dead", "alive"],
                  "anchors": [{"group": "dead", "id": 5, "token": "the", "source": "discovered"}]},
    "data": {"used": 2},
    "sink_detector": {"fraction": 0.1, "per_layer": [0.1, 0.2, 0.3]},
}
MANIFEST = {"model": {"name": "m", "source": "tiny:llava-clip"}, "tokenizer": {"sha256": "abc", "class": "T", "vocab_size": 9},
            "figures": ["figures/f.png"], "plan_hash": "h", "n_samples": 2}


def _finished(d: Path, summary: dict | str | None = None, manifest: dict | str | None = None) -> Path:
    _put(d / "figures" / "f.png", _png_bytes((64, 64)))
    for name, data, default in (("summary.json", summary, SUMMARY), ("manifest.json", manifest, MANIFEST)):
        data = default if data is None else data
        _put(d / name, data if isinstance(data, str) else json.dumps(data))
    return d


def _compare(w: Path, summary=None, manifest=None, name: str = "b") -> list[str]:
    _finished(w / "a")
    _finished(w / name, summary, manifest)
    return ["compare", str(w / "a"), str(w / name), "-o", str(w / "out")]


def _compare_raw(w: Path, summary: bytes) -> list[str]:
    args = _compare(w)
    _put(w / "b" / "summary.json", summary)
    return args


def _with(d: dict, path: str, value) -> dict:
    """A deep copy of `d` with the dotted `path` set to `value`."""
    d = json.loads(json.dumps(d))
    *head, last = path.split(".")
    cur = d
    for k in head:
        cur = cur[int(k)] if isinstance(cur, list) else cur[k]
    if isinstance(cur, list):
        cur[int(last)] = value
    else:
        cur[last] = value
    return d


# -- tuned-lens translator files --

def _translators(w: Path, kind: str) -> str:
    import pickle

    import torch
    from safetensors.torch import save_file

    p = w / "tr.safetensors"
    good = {"layers": torch.arange(4), "weight": torch.zeros(4, 64, 64), "bias": torch.zeros(4, 64)}
    if kind == "pickle":
        p = w / "tr.pt"
        p.write_bytes(pickle.dumps({"weight": [1.0]}))
    elif kind == "pickle named .safetensors":
        p.write_bytes(pickle.dumps({"weight": [1.0]}))
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "wrong width":
        save_file({**good, "weight": torch.zeros(4, 8, 8), "bias": torch.zeros(4, 8)}, str(p))
    elif kind == "extra tensor":
        save_file({**good, "payload": torch.zeros(1)}, str(p))
    elif kind == "nan":
        save_file({**good, "bias": torch.full((4, 64), float("nan"))}, str(p))
    elif kind == "int weights":
        save_file({**good, "weight": torch.zeros(4, 64, 64, dtype=torch.int32)}, str(p))
    elif kind == "other layers":
        save_file({**good, "layers": torch.tensor([0, 1, 2, 9])}, str(p))
    return str(p)


def _tl(kind: str):
    return lambda w: _validate(w, _probe("  - name: tuned_lens\n    params: {translators: " + _translators(w, kind) + "}"))


def _env(**values: str):
    def patch(monkeypatch, w):
        import torch.distributed as dist

        def rendezvous(*a, **k):  # a regression must fail here, not wait 30 minutes for a rank that never comes
            raise AssertionError("the refusal came after torch's rendezvous was reached")

        monkeypatch.setattr(dist, "init_process_group", rendezvous)
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(k, raising=False)
        for k, v in values.items():
            monkeypatch.setenv(k, v)
    return patch


def _dir_is_a_file(w: Path) -> list[str]:
    _put(w / "afile", "mine")
    return ["new", "probe", "norms", "--dir", str(w / "afile")]


HAS_LMMS = importlib.util.find_spec("lmms_eval") is not None
needs_lmms = pytest.mark.skipif(not HAS_LMMS, reason="eval needs lmms-eval")

# (id, setup(w) -> CLI args, regex over the message, options): options may hold "patch" (monkeypatch, w) and
# "writes" (the command may create w/out, e.g. a claimed run folder; everything else must stay as it was)
CASES = [
    # eval --limit: checked before any folder is made
    *[pytest.param((f"eval --limit {v}", lambda w, v=v: _eval(v), rf"--limit: expected a whole number of documents in 1\.\.\d+ or a fraction in \(0, 1\); got {re.escape(shown)}", {}),
                   marks=needs_lmms, id=f"eval --limit {v}")
      for v, shown in (("nan", "nan"), ("inf", "inf"), ("-inf", "-inf"), ("1e30", "1e+30"), ("2.5", "2.5"), ("0", "0.0"), ("-3", "-3.0"))],
    # new: the folder and the name
    ("new --dir a file", _dir_is_a_file, r"--dir .*afile: not a folder; expected a folder to create the package norms/ in", {}),
    ("new --dir under a file", lambda w: _put(w / "afile", "mine") or ["new", "probe", "norms", "--dir", str(w / "afile" / "sub")],
     r"--dir .*afile/sub: cannot create .*afile/sub/norms there \(Not a directory\)", {}),
    ("new --dir /proc/self", lambda w: ["new", "probe", "norms", "--dir", "/proc/self"], r"--dir /proc/self: cannot create /proc/self/norms there", {}),
    *[(f"new probe {n}", lambda w, n=n: ["new", "probe", n, "--dir", str(w / "pk")], rf"NAME '{n}': {why}.*; installed, the plugin's package {n}/ would take the place", {})
      for n, why in (("embedlens", "that is embedlens itself"), ("json", "a module of Python's standard library"), ("sys", "a module of Python's standard library"),
                     ("torch", "an installed module has that name"), ("numpy", "an installed module"), ("tests", "that is a generic folder name"),
                     ("docs", "that is a generic folder name"), ("src", "that is a generic folder name"))],
    ("new intervention typing", lambda w: ["new", "intervention", "typing", "--dir", str(w / "pk")], r"NAME 'typing': a module of Python's standard library", {}),
    # device maps: named by their own key, before anything loads; validate and run refuse the same maps
    *[(f"{cmd} device_map {label}", lambda w, cmd=cmd, m=m: (_validate if cmd == "validate" else _run)(w, _model(f"  device_map: {m}")),
       rf"plan\.yaml:3 model\.device_map{key}: {msg}", {"writes": cmd == "run"})
      for cmd in ("validate", "run")
      for label, m, key, msg in (
          ('{"": disk}', '{"": disk}', "", r"module '' \(the whole model\): every module is mapped to 'disk', so nothing runs the model"),
          ("all modules on disk", '{"model": disk, "lm_head": disk}', r"\.model", r"module 'model': every module is mapped to 'disk'"),
          ("{}", "{}", "", r"expected a strategy \(auto, .*\) or a non-empty mapping of module path -> device; got \{\}"),
          ("banana", '{"": banana}', "", r"module '' \(the whole model\): not a device: 'banana'; expected a GPU index, cuda:N, cpu or disk"),
          ("GPU 97", '{"": cpu, "lm_head": 97}', r"\.lm_head", r"module 'lm_head': 97: GPU 97 is not available here \(\d+ CUDA device\(s\)\)"),
          ("cuda:93", '{"": "cuda:93"}', "", r"module '' \(the whole model\): 'cuda:93': GPU 93 is not available here"),
          ("cuda:x", '{"": "cuda:x"}', "", r"module '' \(the whole model\): not a device: 'cuda:x'"),
          ("meta", '{"": cpu, "model.language_model": meta}', r"\.model\.language_model", r"module 'model\.language_model': 'meta' holds no weights"),
      )],
    ("run device_map names no module", lambda w: _run(w, _model('  device_map: {"": cpu, "model.nope": disk}')),
     r"plan\.yaml:3 model\.device_map\.model\.nope: module 'model\.nope': not a module of LlavaForConditionalGeneration", {"writes": True}),
    ("device meta", lambda w: _validate(w, _model("  device: meta")), r"plan\.yaml:3 model\.device: 'meta' holds no weights", {}),
    ("device meta:0", lambda w: _validate(w, _model("  device: meta:0")), r"model\.device: .*meta", {}),
    # compare: tampered run folders
    ("compare partition is a list", lambda w: _compare(w, {"partition": []}), r"b/summary\.json: partition: expected a mapping, got a list", {}),
    ("compare data is text", lambda w: _compare(w, _with(SUMMARY, "data", "all")), r"b/summary\.json: data: expected a mapping, got 'all'", {}),
    ("compare anchors are a mapping", lambda w: _compare(w, _with(SUMMARY, "partition.anchors", {"dead": 5})), r"partition\.anchors: expected a list of \{group, id, token\}, got a mapping", {}),
    ("compare anchor is an int", lambda w: _compare(w, _with(SUMMARY, "partition.anchors", [5])), r"partition\.anchors\[0\]: expected a mapping \{group, id, token\}, got 5", {}),
    ("compare anchor token an int", lambda w: _compare(w, _with(SUMMARY, "partition.anchors.0.token", 7)), r"partition\.anchors\[0\]\.token: expected text, got 7", {}),
    ("compare anchor group a list", lambda w: _compare(w, _with(SUMMARY, "partition.anchors.0.group", ["dead"])), r"partition\.anchors\[0\]\.group: expected text, got a list", {}),
    ("compare anchor id text", lambda w: _compare(w, _with(SUMMARY, "partition.anchors.0.id", "five")), r"partition\.anchors\[0\]\.id: expected a vocabulary id \(a whole number\), got 'five'", {}),
    ("compare anchor without id", lambda w: _compare(w, _with(SUMMARY, "partition.anchors", [{"group": "dead", "token": "the"}])), r"partition\.anchors\[0\]: needs 'id'", {}),
    ("compare fraction text", lambda w: _compare(w, _with(SUMMARY, "partition.fractions.dead", "half")), r"partition\.fractions\.dead: expected a number, got 'half'", {}),
    ("compare 100000-deep summary", lambda w: _compare(w, '{"x": ' + "[" * 100000 + "]" * 100000 + "}"), r"b/summary\.json: nested more than 32 levels deep", {}),
    ("compare 40-deep summary", lambda w: _compare(w, '{"x": ' + "[" * 40 + "]" * 40 + "}"), r"b/summary\.json: x(\[0\])+.* is nested more than 32 levels deep", {}),
    ("compare 5000-digit integer", lambda w: _compare(w, '{"x": 1' + "0" * 5000 + "}"), r"b/summary\.json: holds an integer of thousands of digits", {}),
    ("compare 4000-digit integer", lambda w: _compare(w, '{"sink_detector": {"n": 1' + "0" * 4000 + "}}"), r"b/summary\.json: sink_detector\.n: an integer of 4001 digits", {}),
    ("compare 5000-character key", lambda w: _compare(w, '{"x_l' + "9" * 5000 + '": 1, "x_l1": 2}'), r"b/summary\.json: x_l9+\.\.\.: a key of 5003 characters; at most 256", {}),
    ("compare summary is a list", lambda w: _compare(w, "[1, 2]"), r"b/summary\.json: expected a JSON object \(a mapping\), got a list", {}),
    ("compare summary not json", lambda w: _compare(w, "{nope"), r"b/summary\.json: not valid JSON", {}),
    ("compare summary not utf-8", lambda w: _compare_raw(w, b'{"x": "caf\xe9"}'), r"b/summary\.json: not UTF-8 text \(byte 0xe9", {}),
    ("compare model is a list", lambda w: _compare(w, None, _with(MANIFEST, "model", ["m"])), r"b/manifest\.json: model: expected a mapping, got a list", {}),
    ("compare model name a number", lambda w: _compare(w, None, _with(MANIFEST, "model.name", 3)), r"b/manifest\.json: model\.name: expected text, got 3", {}),
    ("compare tokenizer hash a list", lambda w: _compare(w, None, _with(MANIFEST, "tokenizer.sha256", ["x"])), r"tokenizer\.sha256: expected text, got a list", {}),
    ("compare plan_hash a mapping", lambda w: _compare(w, None, _with(MANIFEST, "plan_hash", {"a": 1})), r"b/manifest\.json: plan_hash: expected text, got a mapping", {}),
    ("compare figures a mapping", lambda w: _compare(w, None, _with(MANIFEST, "figures", {"f": 1})), r"figures: expected a list of file names inside the run folder, got a mapping", {}),
    ("compare figure a number", lambda w: _compare(w, None, _with(MANIFEST, "figures", ["figures/f.png", 7])), r"figures\[1\]: expected a file name inside the run folder, got 7", {}),
    ("compare 5000 distinct figures", lambda w: _compare(w, None, _with(MANIFEST, "figures", [f"figures/{i}.png" for i in range(5000)])),
     r"b/manifest\.json: figures: 5000 different files; a run lists at most 1000", {}),
    ("compare manifest is a string", lambda w: _compare(w, None, '"hello"'), r"b/manifest\.json: expected a JSON object \(a mapping\), got text", {}),
    # the torchrun environment, checked before torch's rendezvous
    ("WORLD_SIZE=2 without MASTER_ADDR", lambda w: _run(w), r"WORLD_SIZE=2 but MASTER_ADDR is not set", {"patch": _env(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_PORT="29500")}),
    ("WORLD_SIZE=2 without RANK", lambda w: _run(w), r"WORLD_SIZE=2 but RANK is not set", {"patch": _env(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")}),
    ("WORLD_SIZE=2 without MASTER_PORT", lambda w: _run(w), r"WORLD_SIZE=2 but MASTER_PORT is not set", {"patch": _env(WORLD_SIZE="2", RANK="1", MASTER_ADDR="127.0.0.1")}),
    ("MASTER_PORT not a port", lambda w: _run(w), r"MASTER_PORT='99999': expected a port number in 1\.\.65535",
     {"patch": _env(WORLD_SIZE="2", RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="99999")}),
    ("LOCAL_RANK outside the world", lambda w: _run(w), r"LOCAL_RANK=5, WORLD_SIZE=2: the local rank must be in 0\.\.WORLD_SIZE-1",
     {"patch": _env(WORLD_SIZE="2", RANK="0", LOCAL_RANK="5", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")}),
    # paths that are not UTF-8
    ("plan folder with 0xff", lambda w: _base(w / f"d{FF}") or _put(w / f"d{FF}" / "plan.yaml", PLAN) or ["run", str(w / f"d{FF}" / "plan.yaml"), "-o", "out", "-q"],
     r"plan file b'.*/d\\xff/plan\.yaml': the path holds byte 0xff, which is not UTF-8 text", {}),
    ("validate plan folder with 0xff", lambda w: _base(w / f"d{FF}") or _put(w / f"d{FF}" / "plan.yaml", PLAN) or ["validate", str(w / f"d{FF}" / "plan.yaml")],
     r"plan file b'.*/d\\xff/plan\.yaml': the path holds byte 0xff", {}),
    ("--output with 0xff", lambda w: _run(w, out=f"out{FF}"), r"output folder b'.*/out\\xff': the path holds byte 0xff, which is not UTF-8 text", {}),
    ("compare run folder with 0xff", lambda w: _compare(w, name=f"b{FF}"), r"run folder b'.*/b\\xff': the path holds byte 0xff", {}),
    ("compare --output with 0xff", lambda w: _compare(w)[:-1] + [str(w / f"out{FF}")], r"output folder b'.*/out\\xff': the path holds byte 0xff", {}),
    # plugin parameters: text where numbers belong, numbers no tensor holds
    ("layers ['1']", lambda w: _validate(w, _probe("  - name: embedding_lens\n    params: {layers: ['1']}")),
     r"plan\.yaml:7 probes\[0\]\.params\.layers: expected list\[int\], got \['1'\]: '1' is text where a number or true/false belongs", {}),
    ("layers [0, '2']", lambda w: _validate(w, _probe("  - name: embedding_lens\n    params: {layers: [0, '2']}")), r"probes\[0\]\.params\.layers: .*'2' is text where a number", {}),
    ("tau '20'", lambda w: _validate(w, _probe("  - name: sink_detector\n    params: {tau: '20'}")), r"probes\[0\]\.params\.tau: expected float( \| None)?, got '20': '20' is text", {}),
    ("k '5'", lambda w: _validate(w, _probe("  - name: embedding_lens\n    params: {k: '5'}")), r"probes\[0\]\.params\.k: expected int, got '5'", {}),
    ("selection 10**25", lambda w: _validate(w, _tokens('"visual and index < 10000000000000000000000000"')),
     r"plan\.yaml:9 conditions\.prune_dead\[0\]\.params\.tokens: .*the number 1e\+25 is out of range; expected a number within \+-2147483647", {}),
    ("selection -10**25", lambda w: _validate(w, _tokens('"visual and index > -10000000000000000000000000"')), r"params\.tokens: .*the number 1e\+25 is out of range", {}),
    ("selection % 10**25", lambda w: _validate(w, _tokens('"index % 10000000000000000000000000 == 0"')), r"params\.tokens: .*the number 1e\+25 is out of range", {}),
    ("selection 1e400", lambda w: _validate(w, _tokens('"row < 1e400"')), r"params\.tokens: .*the number inf is out of range", {}),
    ("selection list with 10**25", lambda w: _validate(w, _tokens("[1, 10000000000000000000000000]")), r"plan\.yaml:9 conditions\.prune_dead\[0\]\.params\.tokens: .*1e\+25 is too large", {}),
    ("selection list with 2**40", lambda w: _validate(w, _tokens("[1, 1099511627776]")), r"params\.tokens: .*1\.1e\+12 is too large", {}),
    # tuned-lens translators: safetensors only, checked before use
    *[(f"translators {k}", _tl(k), rf"plan\.yaml:7 probes\[0\]\.params\.translators: {msg}", {}) for k, msg in (
        ("pickle", r".*tr\.pt is not a readable safetensors file \(SafetensorError.*expected the safetensors file a tuned_lens saves: layers \[4\], weight \[4, 64, 64\], bias \[4, 64\]"),
        ("pickle named .safetensors", r".*tr\.safetensors is not a readable safetensors file"),
        ("empty", r".*tr\.safetensors is not a readable safetensors file"),
        ("wrong width", r".*tr\.safetensors holds \{.*'weight': \[4, 8, 8\].*\}; expected the safetensors file a tuned_lens saves"),
        ("extra tensor", r".*holds \{.*'payload': \[1\].*\}; expected"),
        ("nan", r".*tr\.safetensors: bias must hold finite floating-point values"),
        ("int weights", r".*tr\.safetensors: weight must hold finite floating-point values \(dtype torch\.int32\)"),
        ("other layers", r".*tr\.safetensors holds layers \[0, 1, 2, 9\]; this probe reads layers \[0, 1, 2, 3\]"),
    )],
]


def _case(c):
    return c.values[0] if hasattr(c, "values") else c




def test_the_table_covers_every_command():
    names = [_case(c)[0] for c in CASES]
    assert len(names) == len(set(names)) and len(names) >= 90
    for prefix in ("eval", "new", "validate device_map", "run device_map", "compare", "WORLD_SIZE", "plan folder", "--output", "layers", "selection", "translators"):
        assert any(n.startswith(prefix) for n in names), prefix


@pytest.mark.parametrize("case", CASES, ids=[_case(c)[0] for c in CASES])
def test_hostile_command_input_is_a_clear_error(tmp_path, monkeypatch, case):
    name, setup, expected, options = case
    w = tmp_path / "w"
    w.mkdir()
    home = tmp_path / "home"
    home.mkdir()
    (home / "precious.txt").write_text("the user's own file")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(w)
    _base(w)
    _put(w / "plan.yaml", PLAN)
    args = setup(w)
    if "patch" in options:
        options["patch"](monkeypatch, w)
    skip = w / "out" if options.get("writes") else None
    before = tree(tmp_path, skip)
    r = CliRunner().invoke(app, args)
    msg = r.output
    assert r.exit_code == 2, f"{name}: exit {r.exit_code}\n{msg}\n{r.exception!r}"
    assert "Traceback" not in msg and (r.exception is None or isinstance(r.exception, SystemExit)), msg
    assert msg.startswith("error: ") and re.search(expected, msg, flags=re.S), msg
    assert tree(tmp_path, skip) == before, f"{name}: something outside the output folder was written or deleted"


# -- what still works next to the refusals --

def test_validate_accepts_the_mixed_disk_map_run_accepts_and_leaves_no_offload_behind(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.chdir(tmp_path)
    _base(tmp_path)
    plan = _model('  device_map: {"": cpu, "model.language_model.layers.1": disk}')
    _put(tmp_path / "plan.yaml", plan)
    # a temporary folder of this test's own: the other xdist worker's validate runs make and remove theirs in the
    # system one at the same time
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    before = {p.name for p in temp.glob("embedlens-validate-*")}
    r = CliRunner().invoke(app, ["validate", "plan.yaml"])
    assert r.exit_code == 0 and "plan.yaml: ok" in r.output, r.output
    assert {p.name for p in temp.glob("embedlens-validate-*")} == before  # its offload folder went with it
    r = CliRunner().invoke(app, ["run", "plan.yaml", "-o", "out", "-q"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out" / "summary.json").is_file()


def test_a_hugging_face_data_set_skips_oversized_and_broken_images_as_a_prompts_file_does(tmp_path, monkeypatch):
    """A 225-megapixel PNG (declared in its header, a few dozen bytes), a 200000x1 strip and garbage bytes: validate
    lists the data set, run skips those three samples by id with the header check's reason, and the good one runs."""
    import datasets

    monkeypatch.chdir(tmp_path)
    _base(tmp_path)
    rows = {"good": _png_bytes(), "bomb": _png_header(15000, 15000), "strip": _png_header(200000, 1), "garbage": b"not an image at all"}
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "id": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in rows.values()], "question": ["what is it?"] * 4,
                                     "answer": ["red"] * 4, "id": list(rows)}, features=features)
    ds.save_to_disk(str(tmp_path / "hf"))
    _put(tmp_path / "plan.yaml", _sub("  prompts: prompts.jsonl", "  dataset: hf").replace("batch_size: 2", "batch_size: 4"))
    r = CliRunner().invoke(app, ["validate", "plan.yaml"])
    assert r.exit_code == 0 and "4 samples" in r.output, r.output
    r = CliRunner().invoke(app, ["run", "plan.yaml", "-o", "out", "-q"])
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    skipped = {s["sample_id"]: s["error"] for s in summary["data"]["skipped"]}
    assert set(skipped) == {"bomb", "strip", "garbage"}, skipped
    assert "225000000 pixels" in skipped["bomb"] and "too large to open safely" in skipped["bomb"]
    assert "aspect ratio 200000:1" in skipped["strip"]
    assert "cannot read image bytes" in skipped["garbage"]
    assert summary["data"]["used"] == 1


def test_compare_lists_a_figure_once_however_often_a_manifest_repeats_it(tmp_path):
    from embedlens.compare import compare_runs

    a = _finished(tmp_path / "a")
    b = _finished(tmp_path / "b", manifest=_with(MANIFEST, "figures", ["figures/f.png"] * 3000))
    once = compare_runs([a, _finished(tmp_path / "c")], tmp_path / "once")
    many = compare_runs([a, b], tmp_path / "many")
    assert list(many.figures) == ["figures/f.png"]
    figure = (a / "figures" / "f.png").read_bytes()
    import base64

    inlined = base64.b64encode(figure).decode()
    assert many.html.read_text().count(inlined) == once.html.read_text().count(inlined) == 2  # one per run, side by side


def test_new_accepts_a_distinct_name_in_a_folder_it_creates(tmp_path):
    r = CliRunner().invoke(app, ["new", "probe", "my_norms_zz", "--dir", str(tmp_path / "fresh" / "plugins")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "fresh" / "plugins" / "my_norms_zz" / "pyproject.toml").is_file()
    assert "pip install -e" in r.output


@pytest.mark.parametrize("limit,expected", [("0.5", 0.5), ("3", 3), ("3.0", 3)])
def test_eval_limit_accepts_counts_and_fractions(limit, expected, monkeypatch, tmp_path):
    """The check passes a usable --limit on unchanged (to the evaluation, stopped here before any model loads)."""
    if not HAS_LMMS:
        pytest.skip("eval needs lmms-eval")
    import embedlens.lmms.evaluate as ev

    seen = {}

    def stop(plan, tasks, conditions, **kw):
        seen.update(kw)
        from embedlens.errors import BenchmarkError

        raise BenchmarkError("stopped")

    monkeypatch.setattr(ev, "run_eval", stop)
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["eval", "plan.yaml", "--tasks", "embedlens_pope", "--limit", limit])
    assert r.exit_code == 2 and "stopped" in r.output
    assert seen["limit"] == expected and type(seen["limit"]) is type(expected)
    ev._check_limit(seen["limit"])  # and the check itself lets it through
