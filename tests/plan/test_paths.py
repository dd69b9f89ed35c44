"""Every relative path of a plan file resolves from the plan's folder; the command line's --output from the working directory."""

from __future__ import annotations

import shutil
from pathlib import Path

from typer.testing import CliRunner

from embedlens.cli import app

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

PLAN = """\
model: {source: tiny:llava-clip}
data: {prompts: data/prompts.jsonl, limit: 1}
probes: [{name: embedding_lens, params: {k: 1, layers: [0]}}]
output: {dir: results/out, report: false, figures: false}
"""


def _shared(tmp_path: Path) -> tuple[Path, Path]:
    """A plan shared with its data in `tmp/shared`, run from another folder, `tmp/elsewhere`."""
    shared, elsewhere = tmp_path / "shared", tmp_path / "elsewhere"
    shutil.copytree(EXAMPLES / "data", shared / "data")
    elsewhere.mkdir()
    (shared / "plan.yaml").write_text(PLAN)
    return shared, elsewhere


def test_output_dir_is_relative_to_the_plan_and_dash_o_to_the_working_directory(tmp_path, monkeypatch):
    shared, elsewhere = _shared(tmp_path)
    monkeypatch.chdir(elsewhere)
    r = CliRunner().invoke(app, ["run", "../shared/plan.yaml", "-q"])
    assert r.exit_code == 0, r.output
    assert (shared / "results" / "out" / "tokens.parquet").is_file()
    assert not (elsewhere / "results").exists()
    r = CliRunner().invoke(app, ["run", "../shared/plan.yaml", "-q", "--output", "mine"])
    assert r.exit_code == 0, r.output
    assert (elsewhere / "mine" / "tokens.parquet").is_file()


def test_missing_or_unusable_paths_name_the_key_and_the_base(tmp_path, monkeypatch):
    shared, elsewhere = _shared(tmp_path)
    monkeypatch.chdir(elsewhere)
    (shared / "plan.yaml").write_text(PLAN.replace("data/prompts.jsonl", "data/nope.jsonl"))
    r = CliRunner().invoke(app, ["validate", "../shared/plan.yaml"])
    assert r.exit_code == 2
    assert "plan.yaml:2 data.prompts: file not found: " in r.output and "(a relative path is relative to the plan file's folder, ../shared)" in r.output
    (shared / "plan.yaml").write_text(PLAN.replace("data: {prompts: data/prompts.jsonl", "data: {prompts: data/prompts.jsonl, images: pics"))
    r = CliRunner().invoke(app, ["validate", "../shared/plan.yaml"])
    assert r.exit_code == 2 and "data.images: folder not found: " in r.output and "pics" in r.output
    (shared / "results").write_text("a file")
    (shared / "plan.yaml").write_text(PLAN)
    r = CliRunner().invoke(app, ["validate", "../shared/plan.yaml"])
    assert r.exit_code == 2 and "plan.yaml:4 output.dir: " in r.output and "is a file, so" in r.output, r.output
    (shared / "plan.yaml").write_text(PLAN.replace("results/out", "''"))
    r = CliRunner().invoke(app, ["validate", "../shared/plan.yaml"])
    assert r.exit_code == 2 and "output.dir: is empty" in r.output, r.output


def test_a_local_model_folder_is_relative_to_the_plan(tmp_path, monkeypatch):
    from embedlens.plan import load_plan, prepare
    from embedlens.testing.tiny import save_tiny_model

    shared, elsewhere = _shared(tmp_path)
    save_tiny_model("llava-clip", shared / "ckpt")
    monkeypatch.chdir(elsewhere)
    (shared / "plan.yaml").write_text(PLAN.replace("tiny:llava-clip", "./ckpt"))
    prepared = prepare(load_plan(Path("../shared/plan.yaml")))
    assert prepared.adapter.name == "llava" and Path(prepared.adapter.source).resolve() == (shared / "ckpt").resolve()
    (shared / "plan.yaml").write_text(PLAN.replace("tiny:llava-clip", "./nowhere"))
    r = CliRunner().invoke(app, ["validate", "../shared/plan.yaml"])
    assert r.exit_code == 2 and "plan.yaml:1 model.source: " in r.output and "nowhere" in r.output, r.output
