"""Document functions of embedlens's local lmms-eval tasks (see embedlens/lmms/tasks.py).

lmms-eval imports this file through the tasks' ``!function embedlens_task_utils.NAME`` entries. Answers are compared
after the normalisation embedlens's own exact-match metric applies (`embedlens.metrics.builtin.normalize_answer`:
lower case, no punctuation, no articles, single spaces), so the bridge's scores and embedlens's metrics
are the same numbers on the same samples.
"""

import re
import string


def normalize_answer(text):
    """The same rule as embedlens.metrics.builtin.normalize_answer (kept here: lmms-eval loads this file alone)."""
    text = str(text).lower().translate(str.maketrans("", "", string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question'].strip()}{kw.get('post_prompt', '')}"


def pope_process_results(doc, results):
    pred, gold = normalize_answer(results[0]), normalize_answer(doc["answer"])
    entry = {"question_id": doc["question_id"], "score": float(pred == gold), "prediction": pred, "ground_truth": gold}
    return {k: entry for k in ("pope_accuracy", "pope_precision", "pope_recall", "pope_f1_score", "pope_yes_ratio")}


def pope_accuracy(results):
    return sum(r["score"] for r in results) / len(results)


def pope_precision(results):
    tp = sum(r["ground_truth"] == "yes" and r["prediction"] == "yes" for r in results)
    fp = sum(r["ground_truth"] == "no" and r["prediction"] == "yes" for r in results)
    return tp / (tp + fp) if tp + fp else 0.0


def pope_recall(results):
    tp = sum(r["ground_truth"] == "yes" and r["prediction"] == "yes" for r in results)
    fn = sum(r["ground_truth"] == "yes" and r["prediction"] != "yes" for r in results)
    return tp / (tp + fn) if tp + fn else 0.0


def pope_f1_score(results):
    p, r = pope_precision(results), pope_recall(results)
    return 2 * p * r / (p + r) if p + r else 0.0


def pope_yes_ratio(results):
    """Share of "yes" among the predictions (POPE's bias measure; the ground truth is balanced by construction)."""
    return sum(r["prediction"] == "yes" for r in results) / len(results)


def synqa_process_results(doc, results):
    return {"exact_match": float(normalize_answer(results[0]) == normalize_answer(doc["answer"]))}
