"""The bridge's scores equal embedlens's own metrics on the same samples, on both zoo models.

lmms-eval runs the local tasks with the ``embedlens`` model (baseline and ``prune_dead``); independently,
``embedlens run`` runs a plan with the same model, partition and condition on the same documents (written
out as a prompts file) with its `generation`, `forced_choice` and `answer_logprob` metrics. The exact-match
accuracies, the greedy answers, the forced-choice accuracy and the answer log-likelihoods must agree.
"""

from __future__ import annotations

import io
import json

import pyarrow.parquet as pq
import pytest
from PIL import Image

from embedlens.lmms.tasks import TASKS_DIR
from tests.lmms._support import lmms_env, write_plan  # noqa: F401 - lmms_env is a fixture

# one xdist worker runs the whole module: its module-scoped fixture (the loaded zoo models) is built once
pytestmark = pytest.mark.xdist_group("test_bridge")

TASKS = ["embedlens_pope", "embedlens_pope_mc", "embedlens_synqa"]
LIMIT = 4
CONDITIONS = ("baseline", "prune_dead")


def _docs(name: str) -> list[dict]:
    return pq.read_table(TASKS_DIR / f"{name}.parquet").slice(0, LIMIT).to_pylist()


@pytest.fixture(scope="module", params=["zoo:tiny-llava-clip", "zoo:tiny-llava-siglip"])
def runs(request, lmms_env, tmp_path_factory):
    """(lmms-eval's results and the bridge's responses per condition, embedlens's own effects table)."""
    from lmms_eval.evaluator import simple_evaluate

    from embedlens.lmms.bridge import Bridge
    from embedlens.lmms.evaluate import _task_manager
    from embedlens.lmms.model import EmbedLensLMM
    from embedlens.plan import load_plan, run_all

    folder = tmp_path_factory.mktemp("bridge")
    bridge = Bridge.load(str(write_plan(folder, request.param)))
    tm = _task_manager(TASKS)
    lmms = {}
    for cond in CONDITIONS:
        lm = EmbedLensLMM(bridge=bridge, condition=cond)
        res = simple_evaluate(model=lm, tasks=TASKS, task_manager=tm, limit=LIMIT, bootstrap_iters=0, log_samples=True, verbosity="WARNING")
        lmms[cond] = (res, lm.responses)

    # embedlens's own run on the same documents: images as files, the same questions, answers and candidates
    (folder / "images").mkdir()
    lines = []
    for task, docs in (("pope", _docs("pope")), ("synqa", _docs("synqa"))):
        for k, d in enumerate(docs):
            img = folder / "images" / f"{task}-{k}.png"
            Image.open(io.BytesIO(d["image"]["bytes"])).save(img)
            cands = ["yes", "no"] if task == "pope" else d["candidates"]
            lines.append({"id": f"{task}-{k}", "image": f"images/{img.name}", "question": d["question"], "answer": d["answer"], "candidates": cands})
    (folder / "prompts.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    plan = write_plan(folder, request.param, data="prompts: prompts.jsonl", name="own.yaml")
    result = run_all(load_plan(plan), folder / "own")["model"]
    effects = pq.read_table(result.tables["effects"]).to_pylist()
    own = {r["sample"]: r for r in effects if r["condition"] == "prune_dead"}
    return lmms, own


def _own(own: dict, task: str, cond: str, col: str) -> list:
    key = col if cond == "prune_dead" else f"{col}_base"
    return [own[f"{task}-{k}"][key] for k in range(LIMIT)]


def _texts(responses: list[dict], task: str) -> list[str]:
    got = {r["doc_id"]: r["text"] for r in responses if r["task"] == task and r["kind"] == "generate_until"}
    return [got[k] for k in range(LIMIT)]


@pytest.mark.parametrize("cond", CONDITIONS)
def test_greedy_exact_match_equals_embedlens_generation(runs, cond):
    lmms, own = runs
    res, responses = lmms[cond]
    for task, data in (("embedlens_synqa", "synqa"), ("embedlens_pope", "pope")):
        assert _texts(responses, task) == _own(own, data, cond, "text")
        exact = _own(own, data, cond, "exact")
        metric = "exact_match,none" if task == "embedlens_synqa" else "pope_accuracy,none"
        assert res["results"][task][metric] == pytest.approx(sum(exact) / LIMIT, abs=1e-12)
        logged = {s["doc_id"]: s["filtered_resps"][0] for s in res["samples"][task]}
        assert [logged[k] for k in range(LIMIT)] == _own(own, data, cond, "text")


@pytest.mark.parametrize("cond", CONDITIONS)
def test_forced_choice_loglikelihoods_equal_embedlens_scores(runs, cond):
    lmms, own = runs
    res, responses = lmms[cond]
    correct = _own(own, "pope", cond, "correct")
    assert res["results"]["embedlens_pope_mc"]["acc,none"] == pytest.approx(sum(correct) / LIMIT, abs=1e-12)
    answers = [d["answer"] for d in _docs("pope")]
    ll = {(r["doc_id"], r["continuation"].strip()): r["logprob"] for r in responses if r["kind"] == "loglikelihood"}
    bridge_lp = [ll[(k, answers[k])] for k in range(LIMIT)]
    assert bridge_lp == pytest.approx(_own(own, "pope", cond, "logprob"), rel=1e-5, abs=1e-6)
    # what lmms-eval compared: the negated log-likelihoods of " yes" and " no", the smaller one chosen
    for s in res["samples"]["embedlens_pope_mc"]:
        nll = [x[0] for x in s["filtered_resps"]]
        assert nll == pytest.approx([-ll[(s["doc_id"], "yes")], -ll[(s["doc_id"], "no")]], rel=1e-12)


def test_the_condition_is_applied(runs):
    """prune_dead moved the log-likelihoods (on the bridge's side as on embedlens's): the condition bites."""
    lmms, own = runs
    base = {(r["doc_id"], r["continuation"]): r["logprob"] for r in lmms["baseline"][1] if r["kind"] == "loglikelihood"}
    pruned = {(r["doc_id"], r["continuation"]): r["logprob"] for r in lmms["prune_dead"][1] if r["kind"] == "loglikelihood"}
    assert base.keys() == pruned.keys()
    assert max(abs(base[k] - pruned[k]) for k in base) > 1e-3
