"""Data-parallel runs (torchrun, gloo on CPU): the same files as one process, batch for batch, byte for byte."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from embedlens.plan.distributed import DistributedError, World
from embedlens.plan.runner import _rounds
from embedlens.plan.store import VOLATILE
from tests.support.faults import EVENTS, batch_events, hooked_env, kill_env

# one xdist worker runs the whole module: its module-scoped fixture (the one-process reference runs) is built once
pytestmark = pytest.mark.xdist_group("test_distributed")

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).with_name("torchrun")


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _run(plan: Path, out: Path, procs: int, *extra: str, events: Path | None = None) -> subprocess.CompletedProcess:
    if procs == 1:
        cmd = [sys.executable, "-m", "embedlens", "run", str(plan), "--output", str(out), "-q", *extra]
    else:
        cmd = [str(TORCHRUN), "--standalone", f"--nproc-per-node={procs}", "-m", "embedlens", "run", str(plan),
               "--output", str(out), "-q", *extra]
    env = hooked_env(_env(), **{EVENTS: str(events)}) if events is not None else _env()
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name not in VOLATILE}


def _plan(tmp: Path, name: str, **changes) -> Path:
    """An example plan with its data paths made absolute (and `changes` applied at the top level / to data).

    Written to one folder per module: the manifest names the plan file, so runs compared must share it.
    """
    doc = yaml.safe_load((ROOT / "examples" / name).read_text())
    if "prompts" in doc["data"]:
        doc["data"]["prompts"] = str(ROOT / "examples" / doc["data"]["prompts"])
    doc["data"].update(changes.pop("data", {}))
    doc.update(changes)
    path = tmp / name
    path.write_text(yaml.safe_dump(doc))
    return path


_SINGLE: dict[str, Path] = {}
_SINGLE_EVENTS: dict[str, list[tuple[int, int]]] = {}


@pytest.fixture(scope="module")
def plans(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("plans")


def _single(tmp_path_factory, plan: Path, key: str) -> Path:
    """The one-process run of a plan (once per module)."""
    if key not in _SINGLE:
        out = tmp_path_factory.mktemp("one") / "run"
        # one thread, as torchrun gives each rank: scikit-learn's KMeans sums its inertia in thread order, so runs
        # with different thread counts differ in the last bit (ranks or not)
        events = out.parent / "events.log"
        r = _run(plan, out, 1, events=events)
        assert r.returncode == 0, r.stderr[-3000:]
        _SINGLE[key], _SINGLE_EVENTS[key] = out, batch_events(events)
    return _SINGLE[key]


PRUNING = {"data": {"limit": 6}, "batch_size": 2}  # discovery and a data-set mean; 3 batches: a round with one


@pytest.mark.slow
@pytest.mark.parametrize("name, changes", [
    ("partition_study.yaml", {}),  # 8 prompts, batches of 2: two rounds of two ranks; fit pass = anchor discovery
    ("pruning_study.yaml", PRUNING),
])
def test_two_gloo_processes_write_the_files_of_one(tmp_path, tmp_path_factory, plans, name, changes):
    plan = _plan(plans, name, **changes)
    one, two = _single(tmp_path_factory, plan, name), tmp_path / "two"
    r2 = _run(plan, two, 2, events=tmp_path / "events.log")
    assert r2.returncode == 0, r2.stderr[-3000:]
    # one pass implementation: the main pass that ran every batch in one process ran each on its rank here
    n_batches = json.loads((one / "manifest.json").read_text())["n_batches"]
    assert _SINGLE_EVENTS[name] == [(0, b) for b in range(n_batches)]
    assert sorted(batch_events(tmp_path / "events.log"), key=lambda e: e[1]) == [(b % 2, b) for b in range(n_batches)]
    a, b = _files(one), _files(two)
    assert sorted(a) == sorted(b)  # no rank folders, no offload, no checkpoint left behind
    assert [k for k in a if a[k] != b[k]] == []
    assert any(k.startswith("effects") or k.startswith("tokens") or k.endswith("tokens.parquet") for k in a)
    assert '"processes": 2' in (two / "run_log.json").read_text()


def test_world_from_env():
    assert World.from_env({}) == World(0, 1, 0)
    w = World.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
    assert (w.rank, w.size, w.local_rank, w.main) == (3, 4, 1, False)
    assert [w.owner(b) for b in range(6)] == [0, 1, 2, 3, 0, 1]
    with pytest.raises(DistributedError, match="RANK=4, WORLD_SIZE=4"):
        World.from_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(DistributedError, match="WORLD_SIZE='two'"):
        World.from_env({"RANK": "0", "WORLD_SIZE": "two"})


def test_rounds_give_every_batch_to_exactly_one_rank_from_any_resume_point():
    for size in (1, 2, 3):
        for start in (0, 1, 4):
            owned = {}
            for rank in range(size):
                for rnd, mine in _rounds(start, 7, World(rank, size, rank)):
                    assert mine is None or mine in rnd
                    if mine is not None:
                        assert mine not in owned
                        owned[mine] = rank
            assert sorted(owned) == list(range(start, 7))
            assert all(owned[b] == b % size for b in owned)


@pytest.mark.slow
def test_a_rank_killed_mid_round_resumes_to_the_same_files(tmp_path, tmp_path_factory, plans):
    """Rank 1 dies after writing its part of batch 1 (torchrun then stops rank 0); --resume redoes the round."""
    plan = _plan(plans, "pruning_study.yaml", **PRUNING)
    one, two = _single(tmp_path_factory, plan, "pruning_study.yaml"), tmp_path / "two"
    env_kill = kill_env(_env(), "rank1_batch1")
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node=2", "-m", "embedlens", "run", str(plan), "--output", str(two), "-q"]
    killed = subprocess.run(cmd, env=env_kill, capture_output=True, text=True, timeout=600)
    assert killed.returncode != 0
    assert (two / "checkpoint.safetensors").is_file()  # the fit passes were checkpointed; round 0 was not
    assert (two / "ranks" / "rank-1" / "parts" / "effects" / "000001.parquet").is_file()  # the dead rank's own part
    r = _run(plan, two, 2, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _files(one), _files(two)
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []
