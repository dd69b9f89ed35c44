"""`benchmarks/gpu.py` runs in CI: its tiny CPU mode goes through every case, and without CUDA it refuses clearly."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _gpu_module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("embedlens_bench_gpu", ROOT / "benchmarks" / "gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_cpu_smoke_run_measures_every_case_and_names_the_device(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert _gpu_module().main(["--device", "cpu", "--tiny", "--reps", "1", "--batch-sizes", "1", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["device"] and res["device_arg"] == "cpu" and res["tiny"] is True
    for model in ("llava", "qwen"):
        for bs in ("1", "2"):
            r = res["models"][model]["batches"][bs]
            assert set(r["times_s"]) == {"hf_forward", "hf_lm_head", "hf_lm_head_half", "engine_prefill", "engine_half_pruned",
                                         "partition_pass", "partition_floor", "lens_all_layers_tables"}
            assert all(v > 0 for v in r["times_s"].values())
            assert 0 < r["kept_tokens"] < int(bs) * r["seq"] and r["host_syncs_engine_run"] >= 0
    printed = capsys.readouterr().out
    assert "engine prefill / HF LM + head" in printed and "<= 1.05" in printed and "qwen b2" in printed


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_the_full_run_exits_2_with_a_message(tmp_path, capsys):
    gpu = _gpu_module()
    assert gpu.main(["--out", str(tmp_path / "x.json")]) == 2
    assert gpu.main(["--device", "cpu", "--out", str(tmp_path / "x.json")]) == 2  # the 7B shapes on a CPU: refused too
    err = capsys.readouterr().err
    assert "sees no CUDA device" in err and "--device cpu --tiny" in err and "need a GPU" in err
    assert not (tmp_path / "x.json").exists()
