"""Hostile resume state, eval folders and model folders through the real CLI: resume state is input from a
stranger (checkpoint fields, plugin attributes, tensors, sizes, nesting, part files), `eval` follows `run`'s folder
rules, and no code from a model folder runs, even on a terminal that answers "y". Each refusal exits 2 with a
message naming the file, key and value, no traceback, and nothing changed that the command did not write."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from embedlens.cli import app

# one xdist worker: the module-scoped fixture runs a plan once
pytestmark = pytest.mark.xdist_group("test_hostile_resume")

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
    ("tensor NaN", _edit(lambda d, t: _set_row(d, t, lambda x: x * float("nan"))), FILE + r"probe 'token_clusters': a saved torch\.float32 tensor of shape \[\d+\] holds NaN"),
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
    """Every path under `root` with its size and the hash of its first MiB (a sparse 6 GiB file is not read whole);
    the lock file's text (the holder's pid) is not compared."""
    out = {}
    for dirpath, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            p = Path(dirpath) / name
            if p.is_symlink():
                out[str(p)] = ("link", os.readlink(p))
            elif p.is_file():
                with open(p, "rb") as fh:
                    out[str(p)] = (p.stat().st_size, None if name == ".embedlens-lock" else hashlib.sha256(fh.read(1 << 20)).hexdigest())
            else:
                out[str(p)] = ("dir",)
    return out


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
