"""Plans: located errors for bad input, and the quickstart end to end."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from embedlens.cli import app
from embedlens.plan import load_plan, prepare, run
from tests.conftest import plan_error

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

GOOD = """\
model:
  source: tiny:llava-clip
data:
  prompts: prompts.jsonl
probes:
  - name: embedding_lens
    params:
      k: 2
      layers: [0, 1]
output:
  dir: out
batch_size: 2
"""


@pytest.fixture
def workdir(tmp_path):
    shutil.copy(EXAMPLES / "data" / "shapes_0.png", tmp_path / "a.png")
    shutil.copy(EXAMPLES / "data" / "shapes_1.png", tmp_path / "b.png")
    (tmp_path / "prompts.jsonl").write_text(
        '{"id": "x", "image": "a.png", "question": "what is it?", "answer": "red"}\n'
        '{"id": "y", "image": "b.png", "question": "what colour is the circle?"}\n'
        '{"id": "z", "image": "a.png", "prompt": "USER: <image>\\nname the shape ASSISTANT:"}\n'
    )
    return tmp_path


def _write(workdir: Path, text: str) -> Path:
    p = workdir / "plan.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "old, new, expected",
    [
        ("  - name: embedding_lens", "  - name: embeding_lens", r"plan.yaml:6 probes\[0\].name: Unknown probe 'embeding_lens'. Did you mean: embedding_lens\b"),
        ("batch_size: 2", "batch_sise: 2", r"plan.yaml:12 batch_sise: unknown key. Did you mean: batch_size\?"),
        ("      k: 2", "      kk: 2", r"plan.yaml:8 probes\[0\].params.kk: embedding_lens has no parameter 'kk'. Did you mean: k\?"),
        ("      k: 2", "      k: two", r"plan.yaml:8 probes\[0\].params.k: expected int, got 'two'"),
        ("      layers: [0, 1]", "      layers: [0, 40]", r"plan.yaml:\d+ probes\[0\].params.layers: layer 40 is out of range for this model \(0..4"),
        ("  source: tiny:llava-clip", "  source: tiny:llava-clop", r"plan.yaml:2 model.source: Unknown tiny model 'llava-clop'. Did you mean: llava-clip"),
        ("  source: tiny:llava-clip", "  source: tiny:llava-clip\n  adapter: lava", r"model.adapter: Unknown adapter 'lava'. Did you mean: llava\b"),
        ("  prompts: prompts.jsonl", "  prompts: missing.jsonl", r"plan.yaml:4 data.prompts: file not found: .*missing.jsonl"),
        ("batch_size: 2", "batch_size: 0", r"plan.yaml:12 batch_size: Input should be greater than or equal to 1; got 0"),
        ("probes:", "probes: [\n", r"plan.yaml:\d+: YAML syntax error"),
    ],
)
def test_bad_plans_get_located_errors(workdir, old, new, expected):
    import re

    assert old in GOOD
    msg = plan_error(workdir, GOOD.replace(old, new))
    assert re.search(expected, msg), msg


def test_unknown_architecture_lists_supported(tmp_path, workdir):
    folder = tmp_path / "gpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    msg = plan_error(workdir, GOOD.replace("tiny:llava-clip", str(folder)))
    assert "No adapter supports architecture GPT2LMHeadModel. Supported: " in msg and "LlavaForConditionalGeneration" in msg


def test_unreadable_image_is_skipped_and_reported(workdir):
    """A corrupt image costs its samples only: the run goes on and lists them with the file and the reason."""
    (workdir / "a.png").write_bytes(b"not a png")
    loaded = load_plan(_write(workdir, GOOD))
    result = run(prepare(loaded), workdir / "out")
    assert [s["sample_id"] for s in result.skipped] == ["x", "z"]  # both samples that use a.png
    assert all("prompts.jsonl:" in s["where"] and "cannot read image" in s["error"] and "a.png" in s["error"] for s in result.skipped)
    rows = list(csv.DictReader(open(workdir / "out" / "tokens.csv")))
    assert {r["sample_id"] for r in rows} == {"y"}
    assert {r["sample"] for r in rows} == {"1"}  # y's place in the data set, x before it skipped (in its batch: 0)
    skipped = list(csv.DictReader(open(workdir / "out" / "skipped.csv")))
    assert [r["sample_id"] for r in skipped] == ["x", "z"]
    assert _strict_json(workdir / "out" / "summary.json")["data"]["used"] == 1
    _strict_json(workdir / "out" / "manifest.json")


def _strict_json(path: Path):
    """Standard JSON only: Python's NaN / Infinity extensions are refused, as other readers refuse them."""
    def refuse(name):
        raise AssertionError(f"{path.name} holds {name}, which is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_prompt_without_placeholder_is_named(workdir):
    (workdir / "prompts.jsonl").write_text('{"id": "q", "image": "a.png", "prompt": "USER: what is it? ASSISTANT:"}\n')
    msg = plan_error(workdir, GOOD)
    assert "plan.yaml:4 data.prompts: " in msg and "prompts.jsonl:1: sample 'q': the prompt has 0 image placeholder(s) '<image>' but 1 image(s)" in msg


def test_run_writes_table_and_figure(workdir):
    loaded = load_plan(_write(workdir, GOOD))
    result = run(prepare(loaded), workdir / "out")
    rows = list(csv.DictReader(open(result.tables["tokens"].with_suffix(".csv"))))
    assert len(rows) == 3 * 16 * 2  # samples x visual tokens x layers
    assert {r["sample_id"] for r in rows} == {"x", "y", "z"}
    # `sample` is the place in the prompts file, not in the batch (batches of 2: z is the first of the second)
    assert {(r["sample"], r["sample_id"]) for r in rows} == {("0", "x"), ("1", "y"), ("2", "z")}
    assert rows[0].keys() >= {"sample", "image", "row", "col", "layer", "id_1", "token_1", "score_1", "id_2"}
    assert result.figures and result.figures[0].stat().st_size > 1000
    manifest = json.loads((workdir / "out" / "manifest.json").read_text())
    assert manifest["versions"]["nnsight"] and manifest["plan_hash"]


def test_cli_validate_list_and_run(workdir):
    runner = CliRunner()
    plan = _write(workdir, GOOD)
    r = runner.invoke(app, ["validate", str(plan)])
    assert r.exit_code == 0 and "ok (model: llava model, 3 samples" in r.output
    r = runner.invoke(app, ["list"])
    assert r.exit_code == 0 and "embedding_lens" in r.output and "k: int = 3" in r.output
    bad = _write(workdir, GOOD.replace("batch_size", "batchsize"))
    r = runner.invoke(app, ["validate", str(bad)])
    assert r.exit_code == 2 and "unknown key" in r.output and "Traceback" not in r.output
    for cmd in ("run", "validate", "list", "compare"):
        r = runner.invoke(app, [cmd, "--help"])
        assert r.exit_code == 0 and "Example" in r.output


def test_run_prints_its_folder_normalised(workdir, monkeypatch):
    """An output.dir relative to a plan in a sub-folder (``../runs/q``) is printed as the folder it is."""
    sub = workdir / "plans"
    sub.mkdir()
    (sub / "plan.yaml").write_text(GOOD.replace("dir: out", "dir: ../runs/q").replace("prompts: prompts.jsonl", "prompts: ../prompts.jsonl"))
    monkeypatch.chdir(workdir)
    r = CliRunner().invoke(app, ["run", "plans/plan.yaml", "-q"])
    assert r.exit_code == 0, r.output
    assert f"wrote {Path('runs') / 'q'}" in r.output.splitlines()[0] and ".." not in r.output
    assert (workdir / "runs" / "q" / "summary.json").is_file()


@pytest.mark.slow
def test_quickstart_runs_from_the_console_script(tmp_path):
    out = tmp_path / "quick"
    proc = subprocess.run(
        [sys.executable, "-m", "embedlens.cli", "run", str(EXAMPLES / "quickstart.yaml"), "--output", str(out), "-q"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "tokens.csv").is_file()
    # every requested layer (0, 2, 4) gets its own map, each shown in the report with a click to full resolution
    html = (out / "report.html").read_text()
    for layer in (0, 2, 4):
        assert (out / "figures" / f"embedding_lens_layer{layer}.png").is_file()
        assert f'alt="embedding_lens_layer{layer}.png"' in html
    assert html.count('<label class="zoom"') == html.count("<img ") and "<script" not in html
    assert "Layer by layer: the visual tokens' nearest words" in html and "content word of the image" in html
