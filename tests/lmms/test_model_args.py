"""The model plugin's arguments, generation settings and registration: every refusal is a named error."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

from embedlens.errors import BenchmarkError, UnknownNameError
from embedlens.lmms.bridge import GreedySettings, cut_at, greedy_settings
from tests.lmms._support import lmms_env, write_plan  # noqa: F401 - lmms_env is a fixture


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"temperature": 0.7}, "temperature=0.7"),
        ({"do_sample": True}, "do_sample=True"),
        ({"num_beams": 4}, "num_beams=4"),
        ({"num_return_sequences": 2}, "num_return_sequences=2"),
        ({"repetition_penalty": 1.2}, "repetition_penalty=1.2"),
        ({"num_beams": True}, "num_beams=True"),
        ({"guidance_scale": 2}, "guidance_scale=2"),
        ({"max_new_tokens": 0}, "max_new_tokens=0"),
        ({"until": 3}, "until=3"),
    ],
)
def test_non_greedy_settings_are_refused_by_name(kwargs, key):
    with pytest.raises(BenchmarkError, match=rf"task 'pope': generation setting {key}"):
        greedy_settings(kwargs, task="pope")


def test_greedy_settings_pope_and_textvqa():
    # what lmms-eval's pope and textvqa_val tasks pass
    pope = {"max_new_tokens": 128, "temperature": 0, "top_p": 1.0, "num_beams": 1, "do_sample": False}
    assert greedy_settings(pope) == GreedySettings(128, ())
    assert greedy_settings({"until": ["ASSISTANT:"]}) == GreedySettings(128, ("ASSISTANT:",))
    assert cut_at("yes\n\nASSISTANT: no", ["\n\n"]) == "yes"


def test_model_args(lmms_env, tmp_path):
    from embedlens.lmms.model import EmbedLensLMM

    plan = write_plan(tmp_path)
    with pytest.raises(BenchmarkError, match=r"unknown key\(s\) conditon; the embedlens model takes plan, condition"):
        EmbedLensLMM.create_from_arg_string(f"plan={plan},conditon=prune_dead")
    with pytest.raises(BenchmarkError, match="plan=PLAN.yaml is required"):
        EmbedLensLMM.create_from_arg_string("condition=prune_dead")
    with pytest.raises(UnknownNameError, match="Unknown condition of plan .* 'prune_ded'. Did you mean: prune_dead"):
        EmbedLensLMM.create_from_arg_string(f"plan={plan},condition=prune_ded")
    with pytest.raises(BenchmarkError, match="no automatic batch size"):
        EmbedLensLMM.create_from_arg_string(f"plan={plan}", {"batch_size": "auto"})
    lm = EmbedLensLMM.create_from_arg_string(f"plan={plan},condition=none,batch_size=2", {"batch_size": 1, "device": "cpu"})
    assert (lm.condition, lm.batch_size) == ("baseline", 2)  # model_args win over lmms-eval's --batch_size default


def test_registered_as_embedlens(lmms_env):
    from lmms_eval import models

    from embedlens.lmms.model import EmbedLensLMM
    from embedlens.lmms.plugin import manifest, register

    register()
    assert models.get_model("embedlens") is EmbedLensLMM
    # the entry point lmms-eval reads when embedlens is installed names the same payload
    conf = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    target = conf["project"]["entry-points"]["lmms_eval.models"]["embedlens"]
    module, func = target.split(":")
    assert getattr(sys.modules.get(module) or __import__(module, fromlist=[func]), func) is manifest
    assert models.MODEL_REGISTRY_V2._coerce_payload_to_manifests(manifest)[0].simple_class_path == "embedlens.lmms.model.EmbedLensLMM"


def test_sampling_request_is_refused_inside_lmms_eval(lmms_env, tmp_path):
    """--gen_kwargs temperature=0.7 reaches generate_until and is refused there, before any decoding."""
    from lmms_eval.evaluator import simple_evaluate

    from embedlens.lmms.evaluate import _task_manager
    from embedlens.lmms.model import EmbedLensLMM

    lm = EmbedLensLMM(plan=str(write_plan(tmp_path)), condition="prune_dead")
    with pytest.raises(BenchmarkError, match="temperature=0.7 is not greedy decoding"):
        simple_evaluate(model=lm, tasks=["embedlens_synqa"], task_manager=_task_manager(["embedlens_synqa"]), limit=1,
                        bootstrap_iters=0, gen_kwargs="temperature=0.7", verbosity="WARNING")
    assert lm.responses == []
