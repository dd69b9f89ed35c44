"""The README's n = 96 pruning study, run by the command the README gives: dead-token pruning is about free while
its random control costs accuracy, and alive-token pruning is far worse than its random control, both significant
after the Holm adjustment, with the numbers the README prints (to within one sample of 96)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from embedlens.cli import app

ROOT = Path(__file__).resolve().parents[2]


def _readme_command() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(embedlens run examples/pruning_study\.yaml --output runs/pruning_study_n96.*?)```", text, re.S)
    assert block, "the README's n = 96 command is gone"
    return shlex.split(block.group(1).replace("\\\n", " "))[1:]  # without the program name


@pytest.mark.slow
def test_the_readme_n96_pruning_study_reproduces(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    args = _readme_command()
    args[args.index("--output") + 1] = str(tmp_path / "n96")
    monkeypatch.chdir(ROOT)
    r = CliRunner().invoke(app, [*args, "-q"])
    assert r.exit_code == 0, r.output
    rows = pq.read_table(tmp_path / "n96" / "effect_tests.parquet").to_pylist()
    by = {(x["condition"], x["reference"]): x for x in rows if x["metric"] == "correct" and x["by"] == "all"}
    one = 1 / 96 + 1e-9
    dead, alive = by[("prune_dead", "prune_dead_random")], by[("prune_alive", "prune_alive_random")]
    assert dead["n"] == 96 and by[("prune_dead", "baseline")]["mean_reference"] == pytest.approx(0.990, abs=one)
    assert (dead["mean"], dead["mean_reference"]) == pytest.approx((0.990, 0.854), abs=one)
    assert (alive["mean"], alive["mean_reference"]) == pytest.approx((0.125, 0.542), abs=one)
    assert dead["diff"] > 0 and dead["p_holm"] < 0.05 and dead["verdict"].startswith("evidence of a rise")
    assert alive["diff"] < 0 and alive["p_holm"] < 0.05 and alive["verdict"].startswith("evidence of a drop")
    assert dead["p_value"] < 1e-3 and alive["p_value"] < 1e-8
    # pruning dead tokens against the baseline: no change detected, with the power to detect one of 0.1
    base = by[("prune_dead", "baseline")]
    assert base["p_value"] == 1 and base["mde"] < 0.1
