"""The notebook API (`embedlens.api`): docs/python-api.md runs as written, `probe` gives a plan's rows,
`run` reads tables back, and bad input is a named error."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

import embedlens
from embedlens.errors import EmbedLensError, InputError, PlanError, UnknownNameError

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(md: Path) -> list[str]:
    """The fenced ```python blocks of a Markdown file, in order."""
    return re.findall(r"^```python\n(.*?)^```", md.read_text(), flags=re.S | re.M)


def test_python_api_doc_runs(tmp_path, monkeypatch, capsys):
    """Every python block of docs/python-api.md, in one namespace, from a folder with a copy of examples/."""
    blocks = python_blocks(ROOT / "docs" / "python-api.md")
    assert len(blocks) >= 5
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"docs/python-api.md block {i}", "exec"), ns)
    out = capsys.readouterr().out
    assert "is ambiguous" in out and "embedding_lens.tokens" in out
    assert (tmp_path / "runs" / "quickstart" / "tokens.parquet").is_file()
    assert (tmp_path / "runs" / "notebook" / "embedding_lens.tokens.parquet").is_file()
    assert (tmp_path / "runs" / "pruning8" / "effects.parquet").is_file()  # the intervene example's plan run
    assert "'prune_dead': 'prune_dead_random'" in out and "drop_top_rows" in out


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """The quickstart plan run as the command line runs it, and its table read with pyarrow directly."""
    import pyarrow.parquet as pq

    from embedlens.plan import load_plan, run_all

    out = tmp_path_factory.mktemp("qs") / "run"
    run_all(load_plan(ROOT / "examples" / "quickstart.yaml"), out)
    return out, pq.read_table(out / "tokens.parquet").to_pylist()


def test_probe_gives_the_quickstart_plans_rows(quickstart):
    """Same settings as examples/quickstart.yaml (zoo CLIP model, 8 synthetic images, batches of 2, left padding):
    the same rows, value for value; `sample` counts over all samples where the plan's counts within a batch."""
    import yaml

    _, plan_rows = quickstart
    plan = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    model = embedlens.load_model(plan["model"]["source"])
    df = embedlens.probe(model, "embedding_lens", embedlens.SyntheticSpec(**plan["data"]["synthetic"]),
                         batch_size=plan["batch_size"], padding_side=plan["data"]["padding_side"],
                         **plan["probes"][0]["params"])
    rows = df.to_dict("records")
    assert len(rows) == len(plan_rows) == 8 * 3 * model.grid()[0] * model.grid()[1]
    ids = sorted({r["sample_id"] for r in plan_rows})
    for mine, theirs in zip(rows, plan_rows):
        assert mine == theirs  # `sample` included: both give the sample's index in the data set
        assert mine["sample"] == ids.index(mine["sample_id"])
    assert len({r["sample"] for r in rows}) == 8  # not its place in a batch of 2
    assert df.attrs["tables"] == ["tokens"] and df.attrs["result"]["n_visual_tokens"] == len(rows) // 3


def test_run_reads_back_what_the_run_wrote(quickstart):
    import pyarrow.parquet as pq

    out, plan_rows = quickstart
    res = embedlens.run(ROOT / "examples" / "quickstart.yaml", output=out, resume=True)  # finished: nothing re-run
    assert res.tables == ["tokens"] and res.out_dir == out and res.report == out / "report.html"
    assert res.table("tokens").to_dict("records") == [{k: (list(v) if isinstance(v, list) else v) for k, v in r.items()} for r in plan_rows]
    with pytest.raises(UnknownNameError, match=r"Unknown table in .*'tokenz'. Did you mean: tokens\? Available: tokens"):
        res.table("tokenz")
    with pytest.raises(UnknownNameError, match="Available: model"):
        res["clip"]
    # a CSV-only copy reads back the same values (lists decoded from their JSON cells)
    csv_only = out.parent / "csv"
    csv_only.mkdir()
    shutil.copy(out / "tokens.csv", csv_only / "tokens.csv")
    from embedlens.api import Results
    from embedlens.plan.runner import RunResult

    again = Results({"model": RunResult(out_dir=csv_only, tables={"tokens": csv_only / "tokens.csv"})}).table("tokens")
    ref = pq.read_table(out / "tokens.parquet").to_pandas()
    assert list(again.columns) == list(ref.columns) and again["token_1"].tolist() == ref["token_1"].tolist()
    assert again["score_1"].tolist() == pytest.approx(ref["score_1"].tolist(), rel=1e-6)


def test_dict_plan_paths_are_relative_to_base_dir(tmp_path, monkeypatch):
    """A dict plan's data and output paths resolve from base_dir; a missing one is an error naming the key."""
    shutil.copytree(ROOT / "examples" / "data", tmp_path / "shared" / "data")
    plan = {"model": {"source": "tiny:llava-clip"}, "data": {"prompts": "data/prompts.jsonl", "limit": 2},
            "probes": [{"name": "embedding_lens", "params": {"k": 1, "layers": [0]}}], "output": {"dir": "out"}}
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PlanError, match=r"data\.prompts: file not found: .*data/prompts\.jsonl \(a relative path is relative to the base folder"):
        embedlens.run(plan)
    res = embedlens.run(plan, base_dir=tmp_path / "shared")
    assert res.out_dir == tmp_path / "shared" / "out" and (tmp_path / "shared" / "out" / "tokens.parquet").is_file()
    import json

    first_two = [json.loads(line)["id"] for line in (tmp_path / "shared" / "data" / "prompts.jsonl").read_text().splitlines()[:2]]
    assert sorted(res.table("tokens")["sample_id"].unique()) == sorted(first_two)
    with pytest.raises(PlanError, match="base_dir: only for a dict plan"):
        embedlens.run(ROOT / "examples" / "quickstart.yaml", base_dir=tmp_path)
    with pytest.raises(PlanError, match="plan: expected a YAML file path or a dict; got int"):
        embedlens.run(3)


def test_probe_input_errors_name_what_is_wrong():
    samples = embedlens.SyntheticSpec(n=2, size=32).samples()
    model = embedlens.load_model("tiny:llava-clip")
    with pytest.raises(UnknownNameError, match="Did you mean: embedding_lens"):
        embedlens.probe(model, "embeding_lens", samples)
    with pytest.raises(InputError, match=r"embedding_lens has no parameter 'kk'. Did you mean: k\?"):
        embedlens.probe(model, "embedding_lens", samples, kk=3)
    with pytest.raises(InputError, match=r"embedding_lens.k: expected int, got 'three'"):
        embedlens.probe(model, "embedding_lens", samples, k="three")
    with pytest.raises(InputError, match="batch_size: expected a positive integer; got 0"):
        embedlens.probe(model, "embedding_lens", samples, batch_size=0)
    with pytest.raises(InputError, match=r"samples\[1\]: expected an embedlens.Sample"):
        embedlens.probe(model, "embedding_lens", [samples[0], "img.png"])
    with pytest.raises(InputError, match="k given both"):
        embedlens.probe(model, "embedding_lens", samples, params={"k": 1}, k=2)
    with pytest.raises(InputError, match="writes no table|wrote no table"):
        embedlens.probe(model, "layer_alignment", samples)
    with pytest.raises(InputError, match=r"partition.discover_min_images: Input should be less than or equal to 1; got 5"):
        embedlens.probe(model, "embedding_lens", samples, partition={"discover": True, "discover_min_images": 5})
    with pytest.raises(InputError, match=r"partition.discover_min: unknown key"):
        embedlens.probe(model, "embedding_lens", samples, partition={"discover_min": 0.5})
    assert isinstance(InputError("x"), EmbedLensError)


def test_synthetic_spec_takes_the_models_grid():
    """Without patch_grid the ground truth is at the model's visual-token grid; with it, as given."""
    for source in ("tiny:llava-clip", "tiny:paligemma"):
        model = embedlens.load_model(source)
        rows = len(embedlens.SyntheticSpec(n=1, size=64).samples(model)[0].meta["patch_labels"]["kind"])
        assert rows == model.grid()[0]
    assert len(embedlens.SyntheticSpec(n=1, size=64, patch_grid=5).samples(model)[0].meta["patch_labels"]["kind"]) == 5
    assert len(embedlens.SyntheticSpec(n=1, size=64).samples()[0].meta["patch_labels"]["kind"]) == 8
