"""Runs are safe with any folder, plan and input: no code runs from a checkpoint, nothing is written or deleted
outside the run folder, a second run is refused, every kill resumes to the same bytes, changed inputs refuse resume."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from embedlens.cli import app
from embedlens.errors import EmbedLensError
from embedlens.plan import load_plan, prepare, run
from embedlens.plan.store import clear_run
from tests.support.snapshot import tree

# names of this fix's modules are imported inside the tests, so that every test also runs (and fails) on the old code
MARKER, LOCK, CHECKPOINT = ".embedlens-run", ".embedlens-lock", "checkpoint.safetensors"
VOLATILE = ("run_log.json", MARKER, LOCK)

SMALL = """\
model:
  source: tiny:llava-clip
data:
  synthetic: {n: 4, seed: 1, size: 48}
partition:
  anchors: {dead: [6, 7]}
  vit_norm: sink
probes:
  - name: embedding_lens
    params: {k: 2, layers: [0]}
  - name: token_partition
conditions:
  prune_dead:
    - {name: prune, params: {tokens: dead, if_empty: noop}}
metrics:
  - {name: answer_logprob}
batch_size: 2
seed: 3
"""


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in VOLATILE}




def _cli(plan: Path, out: Path | str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "embedlens.cli", "run", str(plan), "--output", str(out), "-q", *extra]


def _env(**extra: str) -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[2])
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra}


def _invoke(args: list[str]):
    r = CliRunner().invoke(app, args)
    text = r.output + (getattr(r, "stderr", "") if getattr(r, "stderr_bytes", None) else "")
    return r, text


# -- 1. no code from the folder ----------------------------------------------------------------------------


class _Boom:
    """Unpickling this runs os.system: what a crafted checkpoint.pkl does."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_planted_pickle_is_never_loaded(tmp_path, monkeypatch):
    """A crafted checkpoint.pkl runs no code on any run into its folder, --overwrite and --resume included."""
    monkeypatch.chdir(tmp_path)
    plan = tmp_path / "plan.yaml"
    plan.write_text(SMALL)
    out = tmp_path / "out"
    assert _invoke(["run", str(plan), "-o", str(out), "-q"])[0].exit_code == 0
    sentinel = tmp_path / "PWNED"
    (out / "checkpoint.pkl").write_bytes(pickle.dumps(_Boom(sentinel)))
    for flags in ([], ["--overwrite"], ["--resume"]):
        r, text = _invoke(["run", str(plan), "-o", str(out), "-q", *flags])
        assert not sentinel.exists(), f"the planted pickle ran with flags {flags}"
        assert r.exit_code == 0, text
    # in a foreign folder the plant is not even looked at: refused, untouched
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "checkpoint.pkl").write_bytes(pickle.dumps(_Boom(sentinel)))
    for flags in ([], ["--overwrite"], ["--resume"]):
        r, text = _invoke(["run", str(plan), "-o", str(foreign), "-q", *flags])
        assert r.exit_code == 2 and "not created by embedlens" in text and not sentinel.exists()
    assert sorted(os.listdir(foreign)) == ["checkpoint.pkl"]


def test_checkpoint_never_names_the_class_it_builds(tmp_path):
    """A checkpoint is data: a state naming another class (or a callable) is refused, never constructed."""
    from safetensors.torch import save

    plan = tmp_path / "plan.yaml"
    plan.write_text(SMALL)
    loaded = load_plan(plan)

    def stop(phase, done, total):
        if phase == "run" and done >= 2:
            raise EmbedLensError("stop")

    from embedlens.plan.checkpoint import read_document

    with pytest.raises(EmbedLensError):
        run(prepare(loaded), tmp_path / "a", progress=stop)
    doc, tensors = read_document(tmp_path / "a")
    assert doc["next_batch"] == 1 and doc["probes"][0]["class"] == "EmbeddingLens"
    sentinel = tmp_path / "PWNED"
    doc["probes"][0]["state"] = {"$obj": "os.system", "state": {"command": f"touch {sentinel}"}}
    (tmp_path / "a" / CHECKPOINT).write_bytes(save(tensors, metadata={"embedlens": json.dumps(doc)}))
    with pytest.raises(EmbedLensError, match="os.system"):
        run(prepare(loaded), tmp_path / "a", resume=True)
    assert not sentinel.exists()
    (tmp_path / "a" / CHECKPOINT).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}" + b"\x00" * 40)
    with pytest.raises(EmbedLensError, match="cannot read the checkpoint"):
        run(prepare(loaded), tmp_path / "a", resume=True)


def test_every_probe_state_round_trips_bit_exactly():
    """The default state_dict of every registered probe survives JSON + safetensors: a probe rebuilt from its
    parameters and loaded gives the same result() and the same state, tensor bytes included (NaN kept)."""
    import math

    import torch

    from embedlens.adapters import load_model
    from embedlens.registry import probes
    from embedlens.state import decode_state, encode_state
    from embedlens.testing.conformance import conformance_samples
    from embedlens.tracing import collect

    ad = load_model("tiny:llava-clip")
    batch = ad.encode(conformance_samples(), padding_side="left")
    for name, cls in probes.items():
        p = cls(**cls.example_params)
        p.check(ad)
        if p.needs_fit:
            p.fit(ad, [batch])
        p.update(ad, batch, collect(ad, batch, p.sites(ad)))
        meta, tensors = encode_state(p, name)
        text = json.dumps(meta, allow_nan=False)  # standard JSON: NaN/inf spelled out
        q = cls(**cls.example_params)
        q.check(ad)
        decode_state(q, json.loads(text), {k: v.clone() for k, v in tensors.items()}, name)
        meta2, tensors2 = encode_state(q, name)
        assert meta2 == meta, name
        for k in tensors:
            a, b = tensors[k], tensors2[k]
            assert a.dtype == b.dtype and a.shape == b.shape and a.reshape(-1).contiguous().view(torch.uint8).equal(b.reshape(-1).contiguous().view(torch.uint8)), (name, k)
        ra, rb = json.dumps(p.result(), sort_keys=True, default=str), json.dumps(q.result(), sort_keys=True, default=str)
        assert ra == rb, name
    # floats: repr round-trip, and the non-finite ones
    from embedlens.state import Stateful

    class Holder(Stateful):
        def __init__(self):
            self.x = [0.1, 1 / 3, -0.0, 5e-324, 1.7976931348623157e308, math.nan, math.inf, -math.inf]
            self.keys = {(1, "a"): 2, 3: {4}}

    h, fresh = Holder(), Holder()
    fresh.x, fresh.keys = None, None
    meta, tensors = encode_state(h, "holder")
    decode_state(fresh, json.loads(json.dumps(meta, allow_nan=False)), tensors, "holder")
    assert [repr(v) for v in fresh.x] == [repr(v) for v in h.x] and fresh.keys == h.keys


def test_plugin_with_arbitrary_state_is_named(tmp_path):
    from embedlens.state import CheckpointError, Stateful, encode_state

    class Plugin(Stateful):
        def __init__(self):
            self.fn = lambda x: x

    with pytest.raises(CheckpointError, match=r"probe 'mine'.*attribute '\.fn'.*function.*state_dict"):
        encode_state(Plugin(), "probe 'mine'")


# -- 2. names from plans -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, pattern",
    [
        (SMALL.replace("  - name: token_partition", "  - name: token_partition\n    label: ../../x"), r"plan\.yaml:12 probes\[1\]\.label: label '\.\./\.\./x'"),
        (SMALL.replace("  - name: token_partition", "  - name: token_partition\n    label: /tmp/abs"), r"probes\[1\]\.label: label '/tmp/abs'"),
        (SMALL.replace("  - name: token_partition", "  - name: token_partition\n    label: a/b"), r"probes\[1\]\.label"),
        (SMALL.replace("model:\n  source: tiny:llava-clip", "models:\n  ../evil: {source: tiny:llava-clip}\n  ok: {source: tiny:llava-clip}"),
         r"plan\.yaml:2 models\.\.\./evil: model name '\.\./evil' becomes a folder name"),
        (SMALL.replace("model:\n  source: tiny:llava-clip", "models:\n  /abs: {source: tiny:llava-clip}\n  b: {source: tiny:llava-clip}"), r"models\./abs"),
    ],
    ids=["dotdot-label", "absolute-label", "slash-label", "dotdot-model", "absolute-model"],
)
def test_names_that_become_paths_are_refused_at_load(tmp_path, monkeypatch, text, pattern):
    import re

    monkeypatch.chdir(tmp_path)
    work = tmp_path / "w" / "x"
    work.mkdir(parents=True)
    (work / "plan.yaml").write_text(text)
    before = tree(tmp_path, skip=work / "out")
    r, out = _invoke(["run", str(work / "plan.yaml"), "-o", str(work / "out"), "-q"])
    assert r.exit_code == 2 and re.search(pattern, out), out
    assert tree(tmp_path, skip=work / "out") == before


# -- 3. folders that are not embedlens's ---------------------------------------------------------------------


def test_foreign_folder_is_refused_and_left_byte_identical(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = tmp_path / "plan.yaml"
    plan.write_text(SMALL)
    mine = tmp_path / "mine"
    (mine / "parts" / "tokens").mkdir(parents=True)
    (mine / "parts" / "tokens" / "000000.parquet").write_bytes(b"my own data")
    (mine / "tensors" / "x").mkdir(parents=True)
    (mine / "tensors" / "x" / "000001.safetensors").write_bytes(b"mine too")
    (mine / "summary.json").write_text('{"mine": 1}')
    (mine / "manifest.json").write_text(json.dumps({"tables": {"t": "notes.txt"}, "figures": ["../elsewhere.txt"]}))
    (mine / "notes.txt").write_text("keep me")
    before = tree(tmp_path)
    for flags in ([], ["--overwrite"], ["--resume"]):
        r, text = _invoke(["run", str(plan), "-o", str(mine), "-q", *flags])
        assert r.exit_code == 2 and "not created by embedlens" in text and "notes.txt" in text, text
    assert tree(tmp_path) == before
    with pytest.raises(EmbedLensError, match="no .embedlens-run marker"):
        clear_run(mine)
    assert tree(tmp_path) == before


def test_clear_run_deletes_only_its_own_files_and_never_follows_links(tmp_path):
    """In an owned folder, a stale manifest naming outside files and links planted in place of embedlens's
    files and folders: the links are removed as links, nothing they point to is touched, user files stay."""
    plan = tmp_path / "plan.yaml"
    plan.write_text(SMALL)
    out = tmp_path / "out"
    run(prepare(load_plan(plan)), out)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.csv").write_text("do not touch")
    (victim / "000000.parquet").write_text("nor this")
    (tmp_path / "outside.txt").write_text("outside")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["tables"]["evil"] = "../outside.txt"
    manifest["figures"].append(str(tmp_path / "outside.txt"))
    (out / "manifest.json").write_text(json.dumps(manifest))
    os.unlink(out / "embedding_lens.tokens.csv")
    os.symlink(victim / "precious.csv", out / "embedding_lens.tokens.csv")
    os.symlink(victim, out / "parts")
    os.symlink(victim, out / "tensors")
    (out / "my_notes.txt").write_text("user file in the run folder")
    before = tree(victim) | {"outside": (tmp_path / "outside.txt").read_bytes()}
    clear_run(out)
    assert tree(victim) | {"outside": (tmp_path / "outside.txt").read_bytes()} == before
    assert not (out / "parts").exists() and not os.path.lexists(out / "embedding_lens.tokens.csv")
    assert (out / "my_notes.txt").read_text() == "user file in the run folder" and (out / MARKER).is_file()


def test_symlinks_planted_in_a_run_folder_are_not_written_through(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = tmp_path / "plan.yaml"
    plan.write_text(SMALL)
    out = tmp_path / "out"
    assert _invoke(["run", str(plan), "-o", str(out), "-q"])[0].exit_code == 0
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "target.csv").write_text("do not overwrite")
    os.unlink(out / "embedding_lens.tokens.csv")
    os.symlink(victim / "target.csv", out / "embedding_lens.tokens.csv")
    for f in (out / "figures").iterdir():
        f.unlink()
    (out / "figures").rmdir()
    os.symlink(victim, out / "figures")
    before = tree(victim)
    for flags in ([], ["--overwrite"], ["--resume"]):
        r, text = _invoke(["run", str(plan), "-o", str(out), "-q", *flags])
        assert r.exit_code == 2 and "symbolic link" in text, text
    assert tree(victim) == before


def test_write_bytes_replaces_a_link_instead_of_writing_through_it(tmp_path):
    from embedlens.files import contained, write_text

    (tmp_path / "target").write_text("keep")
    os.symlink(tmp_path / "target", tmp_path / "link")
    write_text(tmp_path / "link", "new")
    assert (tmp_path / "target").read_text() == "keep" and not (tmp_path / "link").is_symlink()
    assert (tmp_path / "link").read_text() == "new"
    assert contained(tmp_path, "../target") is None and contained(tmp_path, str(tmp_path / "target")) is None


# -- 4. one run at a time -------------------------------------------------------------------------------------


def test_a_second_run_is_refused_while_the_folder_is_locked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = tmp_path / "plan.yaml"
    plan.write_text(SMALL)
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from embedlens.files import claim, RunLock\n"
         "out = claim(sys.argv[1])\nwith RunLock(out):\n    print('held', flush=True)\n    time.sleep(60)", str(out)],
        env=_env(), stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        r, text = _invoke(["run", str(plan), "-o", str(out), "-q"])
        assert r.exit_code == 2 and "in use by another embedlens run" in text and f"pid {holder.pid}" in text, text
        assert sorted(os.listdir(out)) == sorted([MARKER, LOCK])
    finally:
        holder.kill()
        holder.wait()
    assert _invoke(["run", str(plan), "-o", str(out), "-q"])[0].exit_code == 0  # the lock dies with its process


@pytest.mark.slow
def test_concurrent_runs_second_refused_first_complete(tmp_path):
    """Two real runs started into one folder: the second exits 2 naming the first; the first equals an uninterrupted run."""
    plan = tmp_path / "plan.yaml"
    # long enough that the second run (a fresh interpreter: seconds of imports) starts while the first still runs
    plan.write_text(SMALL.replace("n: 4", "n: 240"))
    out, whole = tmp_path / "out", tmp_path / "whole"
    first = subprocess.Popen(_cli(plan, out), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and first.poll() is None:
        if (out / "parts").is_dir():  # the first run holds the lock and has written a batch
            break
        time.sleep(0.01)
    assert first.poll() is None, first.stderr.read()
    second = subprocess.run(_cli(plan, out), env=_env(), capture_output=True, text=True, timeout=300)
    first_rc = first.wait(timeout=300)
    assert second.returncode == 2 and "in use by another embedlens run" in second.stderr and f"pid {first.pid}" in second.stderr, second.stderr
    assert "Traceback" not in second.stderr
    assert first_rc == 0, first.stderr.read()
    r = subprocess.run(_cli(plan, whole), env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert _files(out) == _files(whole)


# -- 5. kills during the finish ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_at_every_phase_of_the_finish_resumes_to_the_same_bytes(tmp_path):
    from embedlens.plan.runner import PHASES
    from tests.support.faults import KILL_AT, kill_env

    plan = tmp_path / "plan.yaml"
    plan.write_text(SMALL)
    whole = tmp_path / "whole"
    r = subprocess.run(_cli(plan, whole), env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    reference = _files(whole)
    assert "effects.parquet" in reference and "embedding_lens.tokens.csv" in reference and "report.html" in reference
    loaded = load_plan(plan)
    for phase in PHASES:
        out = tmp_path / phase
        k = subprocess.run(_cli(plan, out), env=kill_env(_env(), phase), capture_output=True, text=True, timeout=300)
        assert k.returncode == -signal.SIGKILL, (phase, k.returncode, k.stderr[-2000:])
        res = run(prepare(loaded), out, resume=True)
        assert _files(out) == reference, phase
        manifest = json.loads((out / "manifest.json").read_text())
        assert {"effects", "embedding_lens.tokens", "token_partition.tokens"} <= set(manifest["tables"]) and res.report is not None
    # the package itself reads no kill switch: without the hook on the path, the same setting (and the old one) do nothing
    out = tmp_path / "unhooked"
    r = subprocess.run(_cli(plan, out), env=_env(**{KILL_AT: PHASES[0], "EMBEDLENS_KILL_AT": PHASES[0]}), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _files(out) == reference


def test_full_disk_while_finishing_keeps_the_run_resumable(tmp_path, monkeypatch):
    """ENOSPC while report.html is written: exit 2 naming the disk, no truncated report, and --resume
    (space freed) ends with the bytes of an uninterrupted run."""
    import errno

    import embedlens.files as files

    monkeypatch.chdir(tmp_path)
    plan = tmp_path / "plan.yaml"
    plan.write_text(SMALL)
    real = files.os.replace

    def full(src, dst, *a, **k):
        if str(dst).endswith("report.html"):
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(files.os, "replace", full)
    r, text = _invoke(["run", str(plan), "-o", "out", "-q"])
    assert r.exit_code == 2 and "disk is full" in text and "report.html" in text and "Traceback" not in text, text
    assert not (tmp_path / "out" / "report.html").exists() and (tmp_path / "out" / CHECKPOINT).is_file()
    monkeypatch.setattr(files.os, "replace", real)
    assert _invoke(["run", str(plan), "-o", "out", "-q", "--resume"])[0].exit_code == 0
    assert _invoke(["run", str(plan), "-o", "whole", "-q"])[0].exit_code == 0
    assert _files(tmp_path / "out") == _files(tmp_path / "whole")


# -- 6. changed inputs ------------------------------------------------------------------------------------------


def _prompt_plan(tmp_path: Path) -> Path:
    from embedlens.testing.images import shapes

    data = tmp_path / "data"
    data.mkdir()
    lines = []
    for i in range(4):
        shapes(48, seed=i).save(data / f"im{i}.png")
        lines.append(json.dumps({"image": f"im{i}.png", "question": "what is it?", "answer": "a shape", "id": f"s{i}"}))
    (data / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    plan = tmp_path / "plan.yaml"
    plan.write_text(SMALL.replace("  synthetic: {n: 4, seed: 1, size: 48}", "  prompts: data/prompts.jsonl"))
    return plan


@pytest.mark.parametrize("change", ["prompts", "image"])
def test_resume_refuses_changed_data_naming_it(tmp_path, change):
    plan = _prompt_plan(tmp_path)

    def stop(phase, done, total):
        if phase == "run" and done >= 2:
            raise EmbedLensError("stop")

    with pytest.raises(EmbedLensError):
        run(prepare(load_plan(plan)), tmp_path / "out", progress=stop)
    if change == "prompts":
        p = tmp_path / "data" / "prompts.jsonl"
        p.write_text(p.read_text().replace('"id": "s3"', '"id": "s3", "answer2": "x"'))
        name = "prompts.jsonl"
    else:
        from embedlens.testing.images import shapes

        shapes(48, seed=99).save(tmp_path / "data" / "im3.png")
        name = "im3.png"
    with pytest.raises(EmbedLensError, match=rf"inputs changed.*{name} changed.*--overwrite"):
        run(prepare(load_plan(plan)), tmp_path / "out", resume=True)


def test_resume_of_a_finished_run_refuses_another_plan_or_changed_data(tmp_path):
    """--resume on a finished run hands back its results only when they are this plan's on these inputs."""
    from embedlens.plan.store import VOLATILE

    def _outputs(folder):  # the run's files, less the lock each run rewrites
        return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name not in VOLATILE}

    plan = _prompt_plan(tmp_path)
    out = tmp_path / "out"
    first = run(prepare(load_plan(plan)), out)
    before = _outputs(out)
    same = run(prepare(load_plan(plan)), out, resume=True)  # the same plan and inputs: the results, untouched
    assert same.summary == first.summary
    assert _outputs(out) == before

    from embedlens.testing.images import shapes

    shapes(48, seed=99).save(tmp_path / "data" / "im3.png")
    with pytest.raises(EmbedLensError, match=r"inputs changed since the finished run started.*im3\.png changed.*--overwrite"):
        run(prepare(load_plan(plan)), out, resume=True)
    plan.write_text(plan.read_text().replace("seed: 3", "seed: 11"))
    with pytest.raises(EmbedLensError, match=r"finished run there is of a different plan.*--overwrite"):
        run(prepare(load_plan(plan)), out, resume=True)
    assert _outputs(out) == before  # refused: nothing touched


def test_model_folder_identity_names_a_changed_weight_file(tmp_path):
    from embedlens.plan.identity import check_same, model_identity
    from embedlens.state import CheckpointError

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"w" * 100)
    before = {"data": {}, "model": model_identity(str(folder))}
    assert before["model"]["files"]["model.safetensors"]["size"] == 100
    check_same(before, {"data": {}, "model": model_identity(str(folder))}, tmp_path)
    (folder / "model.safetensors").write_bytes(b"v" * 100)
    with pytest.raises(CheckpointError, match="model file in .*model.safetensors changed"):
        check_same(before, {"data": {}, "model": model_identity(str(folder))}, tmp_path)


# -- 8. compare reads only inside the runs ----------------------------------------------------------------------


def test_compare_inlines_only_files_inside_the_runs(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text(SMALL)
    a, b = tmp_path / "a", tmp_path / "b"
    run(prepare(load_plan(plan)), a)
    run(prepare(load_plan(plan)), b)
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG SECRET-BYTES-0123456789")
    (a / "figures" / "leak.png").symlink_to(secret)
    for run_dir in (a, b):
        m = json.loads((run_dir / "manifest.json").read_text())
        m["figures"] += [str(secret), "../secret.png", "figures/leak.png", "/etc/passwd"]
        (run_dir / "manifest.json").write_text(json.dumps(m))
    r, text = _invoke(["compare", str(a), str(b), "-o", str(tmp_path / "cmp")])
    assert r.exit_code == 0, text
    import base64

    html = (tmp_path / "cmp" / "compare.html").read_text()
    assert base64.b64encode(secret.read_bytes())[:20].decode() not in html and "root:" not in html
    assert "no such figure" in html


INTERVENTION_PARAMS = {
    "ablate": {"tokens": "visual", "value": "mean"},
    "ablate_random_matched": {"target": "visual"},
    "attention_knockout": {"source": "last", "target": "visual", "layers": [0, 1]},
    "inject_at_layer": {"layer": 1, "tokens": "visual"},
    "prune": {"tokens": "visual"},
    "prune_random_matched": {"target": "visual"},
    "skip_sublayer": {"tokens": "visual", "sublayers": [0, 1.5]},
    "withdraw_at_layer": {"layer": 1, "tokens": "visual"},
    "fastv_budget": {"keep": 0.5},
    "pyramiddrop": {"keep": 0.5},
    "dart": {"keep": 0.5},
    "sparsevlm": {"keep": 0.5},
}


def test_every_intervention_state_round_trips():
    """Every registered intervention, checked against a model, checkpoints as data and loads into a fresh one;
    a selection saved for another expression is refused (it identifies the plan's selection, never replaces it)."""
    from embedlens.adapters import load_model
    from embedlens.registry import interventions
    from embedlens.state import CheckpointError, decode_state, encode_state

    ad = load_model("tiny:llava-clip")
    for name, cls in interventions.items():
        params = INTERVENTION_PARAMS.get(name, {})
        iv = cls(**params)
        iv.check(ad)
        meta, tensors = encode_state(iv, name)
        fresh = cls(**params)
        fresh.check(ad)
        decode_state(fresh, json.loads(json.dumps(meta, allow_nan=False)), tensors, name)
        assert encode_state(fresh, name)[0] == meta, name
    iv = interventions.get("prune")(tokens="visual")
    meta, tensors = encode_state(iv, "prune")
    with pytest.raises(CheckpointError, match="selection 'text'.*written for selection 'visual'|tokens: the checkpoint holds 'visual'; the plan gives 'text'"):
        decode_state(interventions.get("prune")(tokens="text"), meta, tensors, "prune")


def test_resume_refuses_changed_model_weights(tmp_path):
    """A model folder whose weights are rewritten between the stop and --resume: refused, naming the file."""
    import torch
    from safetensors.torch import load_file, save_file

    from embedlens.testing.tiny import tiny_model

    model, processor = tiny_model("llava-clip")
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    plan = tmp_path / "plan.yaml"
    plan.write_text(SMALL.replace("tiny:llava-clip", str(folder)))

    def stop(phase, done, total):
        if phase == "run" and done >= 2:
            raise EmbedLensError("stop")

    with pytest.raises(EmbedLensError, match="stop"):
        run(prepare(load_plan(plan)), tmp_path / "out", progress=stop)
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name] = tensors[name] + torch.ones_like(tensors[name])
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(EmbedLensError, match=r"inputs changed.*model file in .*model\.safetensors changed"):
        run(prepare(load_plan(plan)), tmp_path / "out", resume=True)
