"""Runs stream to disk and resume: a run killed with SIGKILL and resumed ends with the same bytes as an
uninterrupted one, and the same plan twice gives byte-identical outputs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from embedlens.errors import EmbedLensError
from embedlens.plan import load_plan, prepare, run
from embedlens.plan.checkpoint import read_document
from embedlens.plan.store import VOLATILE

PLAN = """\
model:
  source: tiny:llava-clip
data:
  synthetic: {n: 36, seed: 5, size: 48}
  padding_side: left
partition:
  discover: true
  vit_norm: sink
probes:
  - name: embedding_lens
    params: {k: 2, layers: [0, 2]}
  - name: token_partition
  - name: token_clusters
    params: {n_clusters: 3}
conditions:
  prune_dead:
    - {name: prune, params: {tokens: dead, if_empty: noop}}
  prune_dead_random:
    - {name: prune_random_matched, params: {target: dead, if_empty: noop, exclude_target: false}}
  mean_alive:
    - {name: ablate, params: {tokens: alive, value: mean, if_empty: noop}}
metrics:
  - {name: answer_logprob}
  - {name: forced_choice}
output:
  dir: out
batch_size: 2
seed: 3
"""


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in VOLATILE}


def _assert_same(a: Path, b: Path) -> None:
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    differ = [k for k in fa if fa[k] != fb[k]]
    assert not differ, f"files differ: {differ}"
    assert any(k.endswith(".parquet") for k in fa) and any(k.endswith(".png") for k in fa) and "report.html" in fa


def _cli(plan: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "embedlens.cli", "run", str(plan), "--output", str(out), "-q", *extra]


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_outputs(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(plan, killed), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    parts = killed / "parts" / "effects"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if parts.is_dir() and len(list(parts.glob("*.parquet"))) >= 4:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed: " + proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    doc, _ = read_document(killed)
    assert 3 <= doc["next_batch"] < doc["n_batches"] and not (killed / "manifest.json").exists()
    # without --resume the unfinished run is refused, not overwritten
    r = subprocess.run(_cli(plan, killed), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "unfinished run" in r.stderr and "--resume" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(_cli(plan, killed, "--resume"), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "resumed at batch" in r.stdout
    whole = tmp_path / "whole"
    r = subprocess.run(_cli(plan, whole), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    _assert_same(killed, whole)
    assert not (killed / "checkpoint.safetensors").exists() and not (killed / "parts").exists()


def test_failure_mid_run_keeps_finished_batches_and_resumes(tmp_path):
    """An error after batch 3 leaves batches 0-3 on disk; --resume finishes with the bytes of an uninterrupted run,
    and a second uninterrupted run of the same plan and seed is byte-identical too."""
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN.replace("n: 36", "n: 12"))
    loaded = load_plan(plan)

    class Stop(EmbedLensError):
        pass

    def stop_at_batch_3(phase, done, total):
        if phase == "run" and done >= 8:
            raise Stop("simulated failure")

    with pytest.raises(Stop, match="4 finished batch\\(es\\) of 6 are kept .*--resume"):
        run(prepare(loaded), tmp_path / "a", progress=stop_at_batch_3)
    with pytest.raises(EmbedLensError, match="unfinished run"):
        run(prepare(loaded), tmp_path / "a")
    res = run(prepare(loaded), tmp_path / "a", resume=True)
    assert res.resumed_from == 4  # the checkpoint is written before progress is reported
    run(prepare(loaded), tmp_path / "b")
    run(prepare(loaded), tmp_path / "c")
    _assert_same(tmp_path / "a", tmp_path / "b")
    _assert_same(tmp_path / "b", tmp_path / "c")
    # resuming a finished run does nothing and says so
    again = run(prepare(loaded), tmp_path / "c", resume=True)
    assert again.resumed_from == 6 and again.report is not None


def test_resume_refuses_another_plan(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN.replace("n: 36", "n: 6"))

    def stop(phase, done, total):
        if phase == "run" and done >= 4:
            raise EmbedLensError("stop")

    with pytest.raises(EmbedLensError):
        run(prepare(load_plan(plan)), tmp_path / "a", progress=stop)
    plan.write_text(PLAN.replace("n: 36", "n: 6").replace("seed: 3", "seed: 4"))
    with pytest.raises(EmbedLensError, match="different plan"):
        run(prepare(load_plan(plan)), tmp_path / "a", resume=True)
    res = run(prepare(load_plan(plan)), tmp_path / "a", overwrite=True)
    assert res.resumed_from is None and (tmp_path / "a" / "manifest.json").is_file()


def test_parts_whose_columns_vary_by_batch_resume_and_foreign_parts_are_refused(tmp_path):
    """A plugin whose table gains a column in a later batch: the gather joins its parts (permissive promotion), so
    check_parts accepts them (was: refused, so such a run could not resume). A part sharing no column with the
    table, a column whose types cannot be joined, or a file that is not Parquet are still refused, naming the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from embedlens.plan.store import PARTS, Parts, check_parts
    from embedlens.state import CheckpointError

    folder = tmp_path / PARTS / "widgets"
    folder.mkdir(parents=True)

    def part(i, cols):
        pq.write_table(pa.table(cols), folder / f"{i:06d}.parquet")

    part(0, {"sample_id": ["a", "b"], "score": [1.0, 2.0]})
    part(1, {"extra": [3, 4], "sample_id": ["c", "d"]})  # another column, another order, no "score"
    part(2, {"sample_id": ["e"], "score": [5], "extra": [None]})  # int score, null extra: both promote
    check_parts(tmp_path, 3)
    joined = Parts(tmp_path).read("widgets")  # what the gather does with the same parts
    assert joined.column("sample_id").to_pylist() == list("abcde") and joined.column("score").to_pylist() == [1.0, 2.0, None, None, 5.0]
    for cols, msg in (({"x": [1]}, r"000003\.parquet: its columns \['x'\] are not those of \S*000000\.parquet .*no column in common"),
                      ({"sample_id": [1]}, r"000003\.parquet: its columns do not join those of the table's other parts"),
                      (None, r"000003\.parquet: not a Parquet part file")):
        if cols is None:
            (folder / "000003.parquet").write_bytes(b"not parquet")
        else:
            part(3, cols)
        with pytest.raises(CheckpointError, match=msg):
            check_parts(tmp_path, 4)
        check_parts(tmp_path, 3)  # a batch the resumed run writes again is not checked
