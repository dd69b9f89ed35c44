"""Hostile resume state, eval folders and model folders through the real CLI: resume state is input from a
stranger (checkpoint fields, plugin attributes, tensors, sizes, nesting, part files), `eval` follows `run`'s folder
rules, and no code from a model folder runs, even on a terminal that answers "y". Each refusal exits 2 with a
message naming the file, key and value, no traceback, and nothing changed that the command did not write."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from embedlens.cli import app
from tests.support.snapshot import tree

PLAN = """\
model:
  source: tiny:llava-clip
data:
  synthetic: {n: 6, seed: 1, size: 48}
partition:
  anchors: {dead: [6, 7]}
  vit_norm: sink
probes:
  - name: embedding_lens
    params: {k: 2, layers: [0]}
  - name: token_clusters
    params: {n_clusters: 2, max_tokens: 500}
conditions:
  prune_dead:
    - {name: prune, params: {tokens: dead, if_empty: noop}}
metrics:
  - {name: answer_logprob}
batch_size: 2
seed: 3
"""
CK = "checkpoint.safetensors"


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> Path:
    """A run of PLAN stopped after 2 of its 3 batches: checkpoint and parts of batches 0 and 1."""
    from embedlens.errors import EmbedLensError
    from embedlens.plan import load_plan, prepare, run

    root = tmp_path_factory.mktemp("stopped")
    (root / "plan.yaml").write_text(PLAN)

    def stop(phase, done, total):
        if phase == "run" and done >= 4:
            raise EmbedLensError("stop")

    with pytest.raises(EmbedLensError, match="stop"):
        run(prepare(load_plan(root / "plan.yaml")), root / "out", progress=stop)
    assert (root / "out" / CK).is_file() and (root / "out" / "parts" / "effects" / "000001.parquet").is_file()
    return root / "out"


# -- editing a checkpoint --------------------------------------------------------------------------------------
def _load(path: Path):
    from safetensors.torch import load

    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(json.loads(raw[8 : 8 + n])["__metadata__"]["embedlens"]), load(raw)


def _edit(fn):
    """A damage that rewrites the checkpoint: ``fn(doc, tensors)`` edits them in place, or returns the metadata text."""

    def damage(out: Path) -> None:
        from safetensors.torch import save

        doc, tensors = _load(out / CK)
        text = fn(doc, tensors)
        (out / CK).write_bytes(save(tensors, metadata={"embedlens": text if isinstance(text, str) else json.dumps(doc)}))

    return damage


def _probe(doc: dict, label: str) -> dict:
    return next(p for p in doc["probes"] if p["label"] == label)["state"]["state"]


def _first_tensor(state: dict) -> dict:
    """The first ``$tensor`` entry in a state (depth first)."""
    todo = [state]
    while todo:
        v = todo.pop(0)
        if isinstance(v, dict):
            if "$tensor" in v:
                return v
            todo.extend(v.values())
        elif isinstance(v, list):
            todo.extend(v)
    raise AssertionError("no tensor")


def _reservoir(doc: dict) -> dict:
    return _probe(doc, "token_clusters")["_res"]["state"]


def _set_row(doc, tensors, value) -> None:
    import torch

    key = _reservoir(doc)["_rows"][0]["$tensor"]
    tensors[key] = value(tensors[key]) if callable(value) else torch.as_tensor(value)


def _put_part(rel: str, data):
    def damage(out: Path) -> None:
        p = out / rel
        if isinstance(data, bytes):
            p.write_bytes(data)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table(data), p)

    return damage


def _sparse(out: Path) -> None:
    os.truncate(out / CK, 6 << 30)  # a hole: 6 GiB on paper, nothing on disk


def _truncate(out: Path) -> None:
    raw = (out / CK).read_bytes()
    (out / CK).write_bytes(raw[: len(raw) // 2])


def _header_len(out: Path) -> None:
    raw = (out / CK).read_bytes()
    (out / CK).write_bytes((1 << 40).to_bytes(8, "little") + raw[8:])


def _deep_header(out: Path) -> None:
    header = ('{"__metadata__": {"embedlens": "{}"}, "x": ' + "[" * 100000 + "]" * 100000 + "}").encode()
    (out / CK).write_bytes(len(header).to_bytes(8, "little") + header)


def _fn(f):
    """Run `f(doc, tensors)` for its effect (a lambda cannot assign)."""
    return _edit(lambda d, t: f(d, t) and None)


def _set(*path_value):
    *path, value = path_value

    def f(doc, tensors):
        node = doc
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value

    return _edit(f)


FILE = r"cannot resume: \S*out/checkpoint\.safetensors: "
END = r"; start again with --overwrite"

# (id, damage(out), expected regex over the message)
CASES = [
    # the document's own fields
    ("next_batch negative", _set("next_batch", -3), FILE + r"next_batch is -3; expected an integer in 0\.\.3" + END),
    ("next_batch past the end", _set("next_batch", 99), FILE + r"next_batch is 99; expected an integer in 0\.\.3"),
    ("next_batch text", _set("next_batch", "1"), FILE + r"next_batch is '1'; expected an integer"),
    ("next_batch bool", _set("next_batch", True), FILE + r"next_batch is True; expected an integer"),
    ("next_batch 5000 digits", _edit(lambda d, t: json.dumps(d).replace('"next_batch": 2', '"next_batch": ' + "9" * 5000)),
     FILE + r"cannot read the checkpoint \(ValueError: Exceeds the limit"),
    ("n_batches other", _set("n_batches", 7), FILE + r"n_batches is 7; expected an integer in 0\.\.3"),
    ("fitted not bool", _set("fitted", "yes"), FILE + r"fitted is 'yes'; expected true or false"),
    ("batches before the fit", _set("fitted", False), FILE + r"next_batch is 2 but fitted is false"),
    ("probes a mapping", _set("probes", {"a": 1}), FILE + r"probes is dict; expected a list of entries"),
    ("probes of another plan", _fn(lambda d, t: d["probes"][0].update(label="other")), FILE + r"the checkpoint's probes \[\('other'"),
    ("skipped rows wrong", _set("skipped", [{"sample_id": 1}]), FILE + r"skipped is not a list of \{sample_id, where, error\} entries"),
    ("identity a list", _set("identity", [1, 2]), FILE + r"plan_hash or identity is not of the kind embedlens writes"),
    ("identity data a list", _set("identity", "data", [[1]]), FILE + r"identity is not of the kind embedlens writes \(TypeError"),
    ("100000-deep JSON", _edit(lambda d, t: json.dumps(d)[:-1] + ', "x": ' + "[" * 100000 + "]" * 100000 + "}"),
     FILE + r"the checkpoint's JSON is nested more than 256 levels deep"),
    ("not a checkpoint", _set("format", "pickle"), FILE + r"not an embedlens checkpoint" + END),
    # plugin attributes
    ("attribute replaces a method", _fn(lambda d, t: _probe(d, "embedding_lens").update(result=1)),
     FILE + r"EmbeddingLens: the saved state sets 'result', which would replace the function EmbeddingLens\.result"),
    ("attribute replaces a property", _fn(lambda d, t: d["partition"]["state"].update(needs_fit=True)),
     FILE + r"Partition: the saved state sets 'needs_fit', which would replace the property Partition\.needs_fit"),
    ("dunder attribute", _fn(lambda d, t: _probe(d, "embedding_lens").update(__class__="x")),
     FILE + r"EmbeddingLens: the saved state names attribute '__class__'"),
    ("probe k 10**9", _fn(lambda d, t: _probe(d, "embedding_lens").update(k=10**9)),
     FILE + r"EmbeddingLens\.k: the checkpoint holds 1000000000; the plan gives 2" + END),
    ("probe layers other", _fn(lambda d, t: _probe(d, "embedding_lens").update(layers=[0, 1, 2, 3])),
     FILE + r"EmbeddingLens\.layers: the checkpoint holds \[0, 1, 2, 3\]; the plan gives \[0\]"),
    ("reservoir capacity 10**9", _fn(lambda d, t: _reservoir(d).update(capacity=10**9)),
     FILE + r"Reservoir\.capacity: the checkpoint holds 1000000000; the plan gives 500"),
    ("partition anchors other", _fn(lambda d, t: d["partition"]["state"].update(anchors={"dead": [99999]})),
     FILE + r"Partition\.anchors: the checkpoint holds \{'dead': \[99999\]\}; the plan gives \{'dead': \[6, 7\]\}"),
    ("condition selection other", _fn(lambda d, t: d["conditions"][0]["state"]["state"]["interventions"][0]["state"].update(tokens="alive")),
     FILE + r"Prune\.tokens: the checkpoint holds 'alive'; the plan gives 'dead'"),
    ("kind changed", _fn(lambda d, t: _probe(d, "embedding_lens").update(_n_tokens="many")),
     FILE + r"EmbeddingLens\._n_tokens: the checkpoint holds str 'many'; a EmbeddingLens keeps number here"),
    ("state a list", _fn(lambda d, t: d["probes"][0]["state"].update(state=[1, 2])),
     FILE + r"EmbeddingLens: the saved state is list \[1, 2\]; expected a mapping of attribute names"),
    ("effect count zero", _fn(lambda d, t: next(iter(next(iter(d["effects"]["state"]["sums"].values())).values())).__setitem__(2, 0)),
     FILE + r"effect summary\.sums\['\w+'\]\['\w+'\]: .*expected \[sum, sum of squares >= 0, n >= 1\]"),
    # tensors
    ("tensor wrong shape", _edit(lambda d, t: _set_row(d, t, lambda x: x[:3])),
     FILE + r"Reservoir: the saved rows, labels and counts do not fit together"),
    ("tensor wrong dtype", _edit(lambda d, t: _set_row(d, t, lambda x: x.double())),
     FILE + r"Reservoir: the saved rows, labels and counts do not fit together"),
    ("tensor NaN", _edit(lambda d, t: _set_row(d, t, lambda x: x * float("nan"))), FILE + r"Reservoir: the saved rows, labels and counts do not fit .*expected finite float32 rows"),
    ("tensor on meta", _fn(lambda d, t: _first_tensor(_probe(d, "embedding_lens")).update(device="meta")),
     FILE + r"probe 'embedding_lens': a tensor saved on device 'meta'; a checkpoint's tensors live on cpu, cuda or mps"),
    ("tensor missing", _fn(lambda d, t: _first_tensor(_probe(d, "embedding_lens")).update({"$tensor": "nope"})),
     FILE + r"probe 'embedding_lens': malformed \$tensor entry in the checkpoint \(KeyError: 'nope'\)"),
    ("generator state garbage", _edit(lambda d, t: t.__setitem__(_reservoir(d)["_gen"]["$generator"], t[_reservoir(d)["_gen"]["$generator"]].float())),
     FILE + r"probe 'token_clusters': a random generator's state is a 1-d uint8 tensor; the checkpoint holds torch\.float32"),
    # the file itself
    ("6 GiB sparse checkpoint", _sparse, FILE + r"cannot read the checkpoint: the file is 6442450944 bytes, its header describes \d+"),
    ("truncated checkpoint", _truncate, FILE + r"cannot read the checkpoint: the file is \d+ bytes, its header describes \d+"),
    ("header length 2**40", _header_len, FILE + r"cannot read the checkpoint: a \d+-byte file whose header length reads 1099511627776"),
    ("100000-deep header", _deep_header, FILE + r"the checkpoint's JSON is nested more than 256 levels deep"),
    ("checkpoint garbage", lambda out: (out / CK).write_bytes(b"\xff" * 64), FILE + r"cannot read the checkpoint"),
    # part files
    ("garbage part file", _put_part("parts/effects/000000.parquet", b"not parquet at all"),
     r"cannot resume: \S*out/parts/effects/000000\.parquet: not a Parquet part file" + r".*" + END),
    ("part of another schema", _put_part("parts/effects/000001.parquet", {"x": [1, 2]}),
     r"cannot resume: \S*out/parts/effects/000001\.parquet: its columns \['x'\] are not those of \S*000000\.parquet"),
]


def test_the_table_covers_every_class():
    assert len(CASES) >= 35 and len({c[0] for c in CASES}) == len(CASES)


def _snapshot(root: Path) -> dict[str, tuple]:
    """`tree` of `root`; the lock file's text (the holder's pid) is not compared."""
    return tree(root, volatile=(".embedlens-lock",))



def _no_traceback(r) -> None:
    assert "Traceback" not in r.output and (r.exception is None or isinstance(r.exception, SystemExit)), (r.output, r.exception)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_damaged_resume_state_is_refused(stopped, tmp_path, monkeypatch, case):
    name, damage, expected = case
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plan.yaml").write_text(PLAN)
    shutil.copytree(stopped, tmp_path / "out", symlinks=True)
    damage(tmp_path / "out")
    before = _snapshot(tmp_path)
    r = CliRunner().invoke(app, ["run", "plan.yaml", "-o", "out", "-q", "--resume"])
    assert r.exit_code == 2, f"{name}: exit {r.exit_code}\n{r.output}\n{r.exception!r}"
    _no_traceback(r)
    assert r.output.startswith("error: ") and re.search(expected, r.output, flags=re.S), r.output
    assert _snapshot(tmp_path) == before, f"{name}: a refused resume changed the folder"


def test_undamaged_copy_resumes_and_leaves_no_temporary_file(stopped, tmp_path, monkeypatch):
    """The control of the table: the same folder, undamaged, resumes (exit 0); a temporary file a kill left
    half-written there is gone afterwards."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plan.yaml").write_text(PLAN)
    shutil.copytree(stopped, tmp_path / "out", symlinks=True)
    (tmp_path / "out" / ".effects_summary.parquet.99999.tmp").write_bytes(b"half")
    r = CliRunner().invoke(app, ["run", "plan.yaml", "-o", "out", "-q", "--resume"])
    assert r.exit_code == 0, r.output
    assert "resumed at batch 2" in r.output and (tmp_path / "out" / "manifest.json").is_file()
    assert not [p for p in (tmp_path / "out").rglob("*.tmp")]


# -- a kill inside the gather ------------------------------------------------------------------------------------
def _files(folder: Path) -> dict[str, bytes]:
    from embedlens.plan.store import VOLATILE

    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in VOLATILE}


@pytest.mark.slow
def test_kill_inside_the_gather_resumes_to_the_same_bytes_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    """SIGKILL with ``.effects_summary.parquet.PID.tmp`` written and not yet renamed: --resume removes it and
    ends with the bytes of an uninterrupted run."""
    import signal
    import subprocess

    from tests.support.faults import kill_env

    monkeypatch.chdir(tmp_path)
    (tmp_path / "plan.yaml").write_text(PLAN)
    root = str(Path(__file__).resolve().parents[2])
    env = kill_env({**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")},
                   "write:effects_summary.parquet")  # the test hook (tests/support/kill_hook) kills inside the write
    k = subprocess.run([sys.executable, "-m", "embedlens.cli", "run", "plan.yaml", "-o", "killed", "-q"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert k.returncode == -signal.SIGKILL, k.stderr[-2000:]
    left = [p.name for p in (tmp_path / "killed").glob(".*.tmp")]
    assert left == [f".effects_summary.parquet.{n}.tmp" for n in re.findall(r"\.(\d+)\.tmp$", left[0])], left
    assert (tmp_path / "killed" / CK).is_file()
    r = CliRunner().invoke(app, ["run", "plan.yaml", "-o", "killed", "-q", "--resume"])
    assert r.exit_code == 0, r.output
    assert CliRunner().invoke(app, ["run", "plan.yaml", "-o", "whole", "-q"]).exit_code == 0
    assert not [p for p in (tmp_path / "killed").rglob("*") if p.name.endswith(".tmp")]
    a, b = _files(tmp_path / "killed"), _files(tmp_path / "whole")
    assert sorted(a) == sorted(b) and [k for k in a if a[k] != b[k]] == []
    assert "effects_summary.parquet" in a and not (tmp_path / "killed" / CK).exists()


# -- eval follows run's folder rules -----------------------------------------------------------------------------
from tests.lmms._support import lmms_env, write_plan  # noqa: E402,F401 - lmms_env is a fixture


def _eval(plan: Path, out: str, *extra: str, tasks: str = "embedlens_synqa"):
    return CliRunner().invoke(app, ["eval", str(plan), "--tasks", tasks, "--conditions", "prune_dead", "--limit", "2",
                                    "--output", out, *extra])


def test_eval_never_clears_a_run_without_a_flag(stopped, lmms_env, tmp_path, monkeypatch):
    """An unfinished run (checkpoint and parts) and a finished run's tables stay, byte for byte, unless --overwrite;
    ``--output ''`` is refused, not the current folder; --overwrite replaces the run, says where data sets are
    cached, and --resume then returns that eval without evaluating again."""
    monkeypatch.chdir(tmp_path)
    plan = write_plan(tmp_path)
    shutil.copytree(stopped, tmp_path / "out", symlinks=True)
    (tmp_path / "plan.yaml").write_text(PLAN)
    for flags in ([], ["--resume"]):
        before = _snapshot(tmp_path)
        r = _eval(plan, "out", *flags)
        assert r.exit_code == 2 and re.search(r"out holds an unfinished `embedlens run` \(checkpoint\.safetensors and its parts\); "
                                              r"eval leaves it alone: continue it with `embedlens run PLAN --output out --resume`", r.output), r.output
        _no_traceback(r)
        assert _snapshot(tmp_path) == before
    assert CliRunner().invoke(app, ["run", str(tmp_path / "plan.yaml"), "-o", "out", "-q", "--resume"]).exit_code == 0
    assert (tmp_path / "out" / "embedding_lens.tokens.parquet").is_file()
    for flags in ([], ["--resume"]):
        before = _snapshot(tmp_path)
        r = _eval(plan, "out", *flags)
        assert r.exit_code == 2 and "out holds the results of an `embedlens run` (manifest.json and its tables); eval would delete them" in r.output, r.output
        _no_traceback(r)
        assert _snapshot(tmp_path) == before
    before = _snapshot(tmp_path)
    r = _eval(plan, "")
    assert r.exit_code == 2 and "the output folder is empty ('')" in r.output and _snapshot(tmp_path) == before, r.output
    r = _eval(plan, "out", "--overwrite")
    assert r.exit_code == 0, r.output
    assert f"data sets: lmms-eval caches them in {lmms_env}, not in out" in r.output
    assert (tmp_path / "out" / "benchmarks.parquet").is_file() and not (tmp_path / "out" / "embedding_lens.tokens.parquet").exists()
    rows = json.loads((tmp_path / "out" / "summary.json").read_text())["benchmarks"]["rows"]
    before = _snapshot(tmp_path)
    r = _eval(plan, "out", "--resume")
    assert r.exit_code == 0 and "evaluating" not in r.output and _snapshot(tmp_path) == before, r.output
    assert all(f"{row['task']:<20} {row['metric']:<18} {row['condition']:<16}" in r.output for row in rows)
    r = _eval(plan, "out", "--resume", tasks="embedlens_pope_mc")
    assert r.exit_code == 2 and "the finished eval there has tasks ['embedlens_synqa'] (now ['embedlens_pope_mc'])" in r.output, r.output
    assert _snapshot(tmp_path) == before
    # and run, symmetrically, never clears the finished eval without --overwrite (was: replaced it without a flag)
    for flags in ([], ["--resume"]):
        r = CliRunner().invoke(app, ["run", str(tmp_path / "plan.yaml"), "-o", "out", "-q", *flags])
        assert r.exit_code == 2 and "out holds the results of an `embedlens eval` (manifest.json of kind 'eval'); run would delete" in r.output, r.output
        _no_traceback(r)
        assert _snapshot(tmp_path) == before
    assert CliRunner().invoke(app, ["run", str(tmp_path / "plan.yaml"), "-o", "out", "-q", "--overwrite"]).exit_code == 0
    assert (tmp_path / "out" / "embedding_lens.tokens.parquet").is_file() and not (tmp_path / "out" / "benchmarks.parquet").exists()


# -- no code from a model folder, even on a terminal that answers "y" ---------------------------------------------
EVIL = """\
import os, pathlib
pathlib.Path(os.environ["EVIL_MARKER"]).write_text("evil.py ran")
from transformers import PretrainedConfig


class EvilConfig(PretrainedConfig):
    model_type = "evil_model"
"""


def _evil_folder(root: Path, auto_map: bool) -> Path:
    """A model folder whose config names a custom model type and (optionally) an auto_map into its own evil.py."""
    folder = root / ("auto_map" if auto_map else "custom_type")
    folder.mkdir()
    config = {"model_type": "evil_model", "architectures": ["LlavaForConditionalGeneration"]}
    if auto_map:
        config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForImageTextToText": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(EVIL)
    return folder


def _in_terminal(args: list[str], env: dict[str, str], timeout: float = 240) -> tuple[int, str]:
    """Run `args` with a pseudo-terminal as stdin/stdout/stderr, "y" typed ahead for any question; (exit code, output)."""
    import pty
    import select
    import time

    pid, fd = pty.fork()
    if pid == 0:  # the child: exec at once (nothing of the test's state is used)
        os.execvpe(args[0], args, env)
    os.write(fd, b"y\ny\ny\n")
    out, deadline = b"", time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
            if b"[y/N]" in chunk:
                os.write(fd, b"y\n")
    else:
        os.kill(pid, 9)
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), out.decode("utf-8", "replace")


#: Validates each plan with the real CLI, printing "exit N" after each: first as shipped, then with embedlens's own
#: refusal switched off, so that ``trust_remote_code=False`` alone must hold (one interpreter for both).
_VALIDATE_EACH = """\
import sys
from embedlens.cli import app
import embedlens.adapters as a, embedlens.adapters.base as b
for guard in ("on", "off"):
    if guard == "off":
        a.refuse_remote_code = b.refuse_remote_code = lambda source: None
    for plan in sys.argv[1:]:
        print(f"guard {guard}", flush=True)
        try:
            app(["validate", plan])
        except SystemExit as e:
            print(f"exit {e.code}", flush=True)
"""


def test_no_code_from_a_model_folder_runs_on_a_terminal_answering_yes(tmp_path):
    """`embedlens validate` on a terminal that answers "y": the folder's evil.py never runs (its marker file is
    never written). With embedlens's own refusal the message names config.json and its auto_map / model_type; with
    that refusal switched off, ``trust_remote_code=False`` alone keeps transformers from asking and importing."""
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "EVIL_MARKER": str(tmp_path / "PWNED"), "TERM": "dumb",
           "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    plans = []
    for auto_map in (True, False):
        folder = _evil_folder(tmp_path, auto_map)
        plan = tmp_path / f"plan-{folder.name}.yaml"
        plan.write_text(f"model:\n  source: {folder}\ndata:\n  synthetic: {{n: 2}}\nprobes:\n  - name: sink_detector\n")
        plans.append(str(plan))
    code, out = _in_terminal([sys.executable, "-c", _VALIDATE_EACH, *plans], env)
    text = out.replace("\r\n", "\n")
    assert not (tmp_path / "PWNED").exists(), f"the model folder's evil.py ran\n{text}"
    assert code == 0 and text.count("exit 2") == 4 and "Traceback" not in text and "[y/N]" not in text, text
    refused = text.split("guard off")[0].replace("\n", " ")
    for name, key in (("auto_map", r"auto_map \{\"AutoConfig\": \"evil\.EvilConfig\""),
                      ("custom_type", r"model_type 'evil_model' is not a model type transformers knows")):
        assert re.search(rf"plan-{name}\.yaml:2 model\.source: \S*{name}/config\.json: {key}.*?\(the folder holds evil\.py\)"
                         r".*?never runs code from a model folder", refused), text


# -- under torchrun: one refusal, every rank ----------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("folder", ["unfinished run", "foreign folder"])
def test_every_torchrun_rank_stops_with_rank_0s_refusal_and_leaves_nothing(stopped, tmp_path, folder):
    """Rank 0 refuses (an unfinished run without --resume, a folder that is not embedlens's): both ranks print
    the refusal, neither fails in a collective (no gloo traceback, no frame of embedlens), and ``ranks/`` is
    not left behind: the folder is as it was."""
    import subprocess

    out = tmp_path / "out"
    if folder == "unfinished run":
        shutil.copytree(stopped, out, symlinks=True)
        refusal = f"{out} holds an unfinished run (checkpoint.safetensors); continue it with --resume"
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        refusal = f"{out} is not empty and was not created by embedlens (it holds notes.txt"
    (tmp_path / "plan.yaml").write_text(PLAN)
    before = _snapshot(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    r = subprocess.run([str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node=2", "-m", "embedlens",
                        "run", str(tmp_path / "plan.yaml"), "--output", str(out), "-q"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert sorted(e.startswith(f"error: {refusal}") or e.startswith(f"error: rank 0 stopped: {refusal}") for e in errors) == [True, True], r.stderr[-3000:]
    assert len({e.startswith("error: rank 0 stopped") for e in errors}) == 2, r.stderr[-3000:]  # rank 0's own, and rank 1's
    assert "gloo" not in r.stderr.lower() and not re.search(r'File "[^"]*embedlens/', r.stderr), r.stderr[-3000:]
    assert not (out / "ranks").exists() and _snapshot(tmp_path) == before


def test_full_disk_names_the_file_not_a_question_mark(tmp_path, monkeypatch):
    """ENOSPC from fsync (a write on a full disk fails with no file name in the error): the message names the
    file being written and says to free space and --resume; the run stays resumable."""
    import errno

    import embedlens.files as files

    monkeypatch.chdir(tmp_path)
    (tmp_path / "plan.yaml").write_text(PLAN)
    real = files.os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".parquet.%d.tmp" % os.getpid()):
            raise OSError(errno.ENOSPC, "No space left on device")  # as the kernel gives it: no file name
        return real(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    r = CliRunner().invoke(app, ["run", "plan.yaml", "-o", "out", "-q"])
    assert r.exit_code == 2, r.output
    _no_traceback(r)
    assert re.search(r"^error: cannot write out/parts/[\w.]+/000000\.parquet: the disk is full; free space and continue with --resume", r.output), r.output
    assert "?" not in r.output and not list((tmp_path / "out").rglob("*.tmp"))
