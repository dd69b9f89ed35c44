"""Every plan in docs/real-checkpoints.md is a valid plan, and `embedlens validate` gets as far as the hub download."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from embedlens.cli import app
from embedlens.plan import load_plan

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "real-checkpoints.md"
BLOCKS = re.findall(r"```yaml\n(.*?)```", GUIDE.read_text(encoding="utf-8"), flags=re.S)


def _workdir(tmp_path: Path, i: int, text: str) -> Path:
    """The plan in a folder with the repository's examples/data next to it (its data paths are relative to it)."""
    shutil.copytree(ROOT / "examples" / "data", tmp_path / "examples" / "data", dirs_exist_ok=True)
    plan = tmp_path / f"plan{i}.yaml"
    plan.write_text(text)
    return plan


def test_the_guide_has_its_plans():
    assert len(BLOCKS) >= 6
    sources = [yaml.safe_load(b)["model"]["source"] for b in BLOCKS]
    assert "llava-hf/llava-1.5-7b-hf" in sources and any("Qwen2.5-VL" in s for s in sources)


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_each_plan_passes_validate_up_to_the_download(tmp_path, i, monkeypatch):
    plan = _workdir(tmp_path, i, BLOCKS[i])
    loaded = load_plan(plan)  # the schema, the plugins' parameters, the data files: no model needed
    source = loaded.plan.model.source
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import torch

    # the plans are for GPU machines: let `device: cuda` pass the device check, as it would there
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    r = CliRunner().invoke(app, ["validate", str(plan)])
    assert r.exit_code == 2, r.output
    # it stops at the model: the hub files cannot be fetched here, and nothing before that failed
    assert "model.source" in r.output and source in r.output, r.output
    assert "Traceback" not in r.output
