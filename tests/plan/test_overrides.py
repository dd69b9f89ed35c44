"""`--set KEY=VALUE` on run / validate (eval: tests/lmms/test_eval.py), `--threads`, and `embedlens.run(quiet=, overrides=)`:
overrides are checked as the plan is, errors name the override and the key, and the manifest records what was applied."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from embedlens.cli import app
from embedlens.errors import PlanError
from embedlens.plan.overrides import apply_overrides

PLAN = """\
model: {source: tiny:llava-clip}
data: {synthetic: {n: 4, size: 32}}
probes:
  - {name: embedding_lens, params: {layers: [0]}}
output: {dir: out, figures: false, report: false}
batch_size: 4
"""


def test_apply_sets_nested_keys_list_items_and_reads_values_as_yaml():
    raw = {"model": {"source": "a"}, "probes": [{"name": "p", "params": {"layers": [0]}}]}
    applied = apply_overrides(raw, ["model.dtype=float16", "probes.0.params.layers=[1, 2]", "data.synthetic.n=8", "seed=null"])
    assert raw == {"model": {"source": "a", "dtype": "float16"}, "probes": [{"name": "p", "params": {"layers": [1, 2]}}],
                   "data": {"synthetic": {"n": 8}}, "seed": None}
    assert applied == {"model.dtype": "float16", "probes.0.params.layers": [1, 2], "data.synthetic.n": 8, "seed": None}
    for bad, says in (("batch_size", "expected KEY=VALUE"), ("model..source=x", "not a dotted plan key"),
                      ("0.x=1", "not a dotted plan key"), ("probes.5.name=x", "probes.5: the plan's list has 1 entries"),
                      ("model.source.x=1", "model.source is a str ('a') in the plan, not a mapping"),
                      ("seed=[1", "not valid YAML")):
        with pytest.raises(PlanError, match=None) as e:
            apply_overrides({"model": {"source": "a"}, "probes": [{"name": "p"}]}, [bad])
        assert says in str(e.value) and bad.split("=")[0] in str(e.value), (bad, str(e.value))


@pytest.fixture
def plan_file(tmp_path):
    p = tmp_path / "plan.yaml"
    p.write_text(PLAN)
    return p


def test_validate_refuses_a_bad_override_naming_it_and_the_key(plan_file):
    runner = CliRunner()
    for args, says in ((["--set", "batch_size=0"], "--set batch_size=0: batch_size: Input should be greater than or equal to 1"),
                       (["--set", "model.sourc=tiny:paligemma"], "model.sourc: unknown key. Did you mean: source?"),
                       (["--set", "probes.0.params.layerz=1"], "--set probes.0.params.layerz=1: probes[0].params.layerz: "
                                                               "embedding_lens has no parameter 'layerz'. Did you mean: layers?"),
                       (["--set", "probes.0.name=embeding_lens"], "Did you mean: embedding_lens"),
                       (["--threads", "0"], "--threads: expected an integer >= 1; got 0")):
        r = runner.invoke(app, ["validate", str(plan_file), *args])
        assert r.exit_code == 2 and says in r.output, (args, r.output)
        assert "Traceback" not in r.output
        assert f"{plan_file}:" not in r.output.split("--set")[0] or "--threads" in args  # no line of the file: the override is named


def test_run_applies_overrides_records_them_and_sets_threads(plan_file, tmp_path, monkeypatch):
    import pyarrow.parquet as pq
    import torch

    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    before = torch.get_num_threads()
    try:
        r = CliRunner().invoke(app, ["run", str(plan_file), "-q", "--set", "data.synthetic.n=3", "--set", "batch_size=2",
                                     "--set", "probes.0.params.layers=[1]", "--threads", "1"])
        assert r.exit_code == 0, r.output
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == os.environ["OPENBLAS_NUM_THREADS"] == "1"
    finally:
        torch.set_num_threads(before)
    out = tmp_path / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["overrides"] == {"data.synthetic.n": 3, "batch_size": 2, "probes.0.params.layers": [1]}
    assert (manifest["n_samples"], manifest["batch_size"], manifest["n_batches"]) == (3, 2, 2)  # 3 samples in batches of 2
    tokens = pq.read_table(out / manifest["tables"]["tokens"]).to_pydict()
    assert set(tokens["layer"]) == {1} and len(set(tokens["sample_id"])) == 3
    run_plan = (out / "run_plan.yaml").read_text()  # the plan as run, saying which overrides made it
    assert run_plan.startswith(f"# {plan_file} with --set data.synthetic.n=3 --set batch_size=2 --set probes.0.params.layers=[1]")
    assert "batch_size: 2" in run_plan
    # the overrides are part of the plan a resumed run must match
    from embedlens.plan import load_plan
    from embedlens.plan.runner import plan_hash

    assert manifest["plan_hash"] == plan_hash(load_plan(plan_file, overrides=["data.synthetic.n=3", "batch_size=2",
                                                                              "probes.0.params.layers=[1]"]))
    assert manifest["plan_hash"] != plan_hash(load_plan(plan_file))


def test_api_run_quiet_silences_hugging_face_during_the_run_and_restores_it(tmp_path):
    import embedlens
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as hf_logging

    seen = []

    def progress(model, phase, done, total):
        seen.append((hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled()))

    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    # start from Hugging Face's loud defaults, whatever an earlier test in this worker left behind (the CLI quiets them
    # for the process), so the test can tell quiet from loud; the worker's state is put back at the end
    before = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled())
    hf_logging.set_verbosity_warning()
    hf_logging.enable_progress_bar()
    enable_progress_bars()
    try:
        _quiet_run_restores(tmp_path, hf_logging, are_progress_bars_disabled, seen, progress)
    finally:
        hf_logging.set_verbosity(before[0])
        (hf_logging.enable_progress_bar if before[1] else hf_logging.disable_progress_bar)()
        (disable_progress_bars if before[2] else enable_progress_bars)()


def _quiet_run_restores(tmp_path, hf_logging, are_progress_bars_disabled, seen, progress):
    import embedlens

    state = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled())
    assert state[0] < hf_logging.ERROR and state[1] and not state[2], state  # else the test could not tell
    plan = {"model": {"source": "tiny:llava-clip"}, "data": {"synthetic": {"n": 2, "size": 32}},
            "probes": [{"name": "embedding_lens", "params": {"layers": [0]}}], "output": {"dir": "out", "figures": False, "report": False}}
    res = embedlens.run(plan, base_dir=tmp_path, progress=progress, quiet=True, overrides=["batch_size=1"])
    assert seen and set(seen) == {(hf_logging.ERROR, False, True)}
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled()) == state
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["overrides"] == {"batch_size": 1}
    seen.clear()
    embedlens.run(plan, tmp_path / "loud", base_dir=tmp_path, progress=progress)
    assert seen and set(seen) == {state}
    assert len(res.table("tokens")) == 2 * 16
