"""`embedlens.intervene`: a plan's conditions, pairing and statistics on samples in memory, and `Hook` (plain functions)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

import embedlens
from embedlens.errors import EmbedLensError, InputError, InterventionError
from embedlens.interventions.ablate import Ablate
from embedlens.interventions.prune import Prune

ROOT = Path(__file__).resolve().parent.parent
STUDY = ROOT / "examples" / "pruning_study.yaml"
SEL = "visual and row < 2"


@pytest.fixture(scope="module")
def study():
    """The pruning study's model, data settings and plan text."""
    plan = yaml.safe_load(STUDY.read_text())
    return embedlens.load_model(plan["model"]["source"]), plan


@pytest.fixture(scope="module")
def samples(study):
    model, plan = study
    return embedlens.SyntheticSpec(**plan["data"]["synthetic"]).samples(model)[:8]


def test_intervene_gives_a_plans_tables_value_for_value(study, samples, tmp_path):
    """examples/pruning_study.yaml's prune_dead and mean_dead with their matched controls, on its first 8 samples, run
    as a plan (the study's file cut to these conditions) and through intervene(controls=True): every table equal."""
    model, plan = study
    keep = ["prune_dead", "prune_dead_random", "mean_dead", "mean_dead_random"]
    small = {**plan, "conditions": {k: plan["conditions"][k] for k in keep}, "probes": [], "output": {"figures": False, "report": False}}
    small["data"] = {**plan["data"], "limit": 8}
    run = embedlens.run(small, output=tmp_path / "run")
    kwargs = dict(metrics=plan["metrics"], partition=plan["partition"], batch_size=plan["batch_size"],
                  padding_side=plan["data"]["padding_side"], seed=plan["seed"], report=plan["report"])
    conditions = {"prune_dead": [Prune(tokens="dead", if_empty="noop")],
                  "mean_dead": [{"name": "ablate", "params": {"tokens": "dead", "value": "mean", "if_empty": "noop"}}]}
    effects = embedlens.intervene(model, samples, conditions, controls=True, **kwargs)
    assert effects.attrs["tables"] == ["effect_tests", "effects", "effects_summary", "touched_tokens"]
    assert list(dict.fromkeys(effects["condition"])) == keep
    assert effects.attrs["summary"]["controls"] == {"prune_dead": "prune_dead_random", "mean_dead": "mean_dead_random"}
    assert effects.attrs["summary"]["controls"] == run.summary["controls"]
    assert effects.attrs["summary"]["effects"] == run.summary["effects"]
    for name in ("effects", "effects_summary", "effect_tests", "touched_tokens"):
        mine = effects if name == "effects" else embedlens.intervene(model, samples, conditions, controls=True, table=name, **kwargs)
        theirs = run.table(name)
        assert list(mine.columns) == list(theirs.columns), name
        pd.testing.assert_frame_equal(mine, theirs, check_exact=True, obj=name)
    tests = run.table("effect_tests")
    assert {"baseline", "prune_dead_random"} <= set(tests[tests.condition == "prune_dead"].reference)  # paired with its control


def test_hook_at_a_site_equals_the_builtin_edit(study, samples):
    """A plain function zeroing tokens at llm.embed / after a layer gives ablate(value: zero)'s effects exactly; at
    llm.layers[2].in it is the same place as after llm.layers[1]; fn(ctx) lowering ctx.exit is prune."""
    model, _ = study
    kl = lambda conds: embedlens.intervene(model, samples[:4], conds, metrics=["next_token_kl", "visual_tokens"])  # noqa: E731
    zero = lambda x: torch.zeros_like(x)  # noqa: E731

    def prune_top(ctx):
        ctx.exit = torch.where(ctx.select(SEL, within=ctx.roles.image_span), torch.zeros_like(ctx.exit), ctx.exit)

    mine = kl({"embed": embedlens.Hook(zero, site="llm.embed", tokens=SEL),
               "layer1": [embedlens.Hook(lambda x, ctx: x.masked_fill(ctx.select(SEL)[..., None], 0.0), site="llm.layers[1]")],
               "layer2_in": [embedlens.Hook(zero, site="llm.layers[2].in", tokens=SEL)],
               "fn_ctx": [prune_top]})
    builtin = kl({"embed": [Ablate(tokens=SEL, value="zero")], "layer1": [Ablate(tokens=SEL, value="zero", site="llm.layers[1]")],
                  "layer2_in": [Ablate(tokens=SEL, value="zero", site="llm.layers[1]")], "fn_ctx": [Prune(tokens=SEL)]})
    pd.testing.assert_frame_equal(mine, builtin, check_exact=True)
    assert (mine.kl > 0).all()  # each edit changed every sample's next token distribution
    assert (mine[mine.condition == "fn_ctx"].visual_tokens_mean < mine[mine.condition == "fn_ctx"].visual_tokens_mean_base).all()


def test_identity_hook_and_in_place_edits(study, samples):
    """A function returning its input (or None after editing nothing) changes nothing; one editing x in place counts."""
    model, _ = study
    df = embedlens.intervene(model, samples[:2], {"same": embedlens.Hook(lambda x: x, site="llm.layers[-1]"),
                                                   "none": embedlens.Hook(lambda x: None, site="llm.embed"),
                                                   "inplace": embedlens.Hook(lambda x: x.mul_(0), site="llm.embed", tokens="visual")})
    assert (df[df.condition != "inplace"].kl.abs() < 1e-12).all()
    assert (df[df.condition == "inplace"].kl > 0).all()


def test_a_matched_control_whose_pool_is_too_small_is_refused_first(study, samples):
    """The pruning study's alive tokens are most of each image: a control drawn outside them cannot match them."""
    model, plan = study
    with pytest.raises(InputError, match=r"conditions\['prune_alive_random'\]\[0\] \(prune_random_matched\): sample 'syn-0-\d+' has \d+ target"):
        embedlens.intervene(model, samples, {"prune_alive": [Prune(tokens="alive", if_empty="noop")]}, controls=True,
                            partition=plan["partition"])
    df = embedlens.intervene(model, samples[:4], {"prune_alive": [Prune(tokens="alive", if_empty="noop")]},
                             controls={"exclude_target": False}, partition=plan["partition"], table="effects_summary")
    assert set(df.control) == {"prune_alive_random", ""}


@pytest.mark.parametrize("kwargs, match", [
    ({"conditions": {"c": [Prune]}}, r"conditions\['c'\]\[0\]: Prune is a class; give an instance"),
    ({"conditions": {"c": ["prune"]}}, r"conditions\['c'\]\[0\]: expected an intervention"),
    ({"conditions": {"baseline": [Prune(tokens="visual")]}}, r"'baseline' is not a condition name"),
    ({"conditions": {}}, r"conditions: expected \{name"),
    ({"conditions": {"c": Prune(tokens="visual"), "c_random": Prune(tokens="visual")}, "controls": True}, r"would be named 'c_random'"),
    ({"metrics": ["next_token_kll"]}, r"next_token_kl"),
    ({"metrics": []}, r"metrics: give at least one metric"),
    ({"table": "effect"}, r"table: expected one of effects, effects_summary"),
    ({"report": {"resample": 100}}, r"report.resample: unknown key"),
    ({"partition": {"discovr": True}}, r"partition.discovr: unknown key"),
    ({"partition": ["discover"]}, r"partition: expected a dict"),
    ({"report": {"resample": 100}, "partition": {"discover": True}}, r"report.resample: unknown key"),
    ({"report": "qtype"}, r"report: expected a dict"),
    ({"report": {"breakdown": ["nope"]}}, r"breakdown: no sample has a field 'nope'"),
    ({"controls": {"sed": 1}}, r"controls: the matched control of 'c' \(prune_random_matched\).*sed"),
    ({"batch_size": 0}, r"batch_size: expected a positive integer"),
])
def test_bad_arguments_name_what_is_wrong(study, samples, kwargs, match):
    model, _ = study
    args = {"conditions": {"c": [Prune(tokens="visual")]}, **kwargs}
    with pytest.raises(EmbedLensError, match=match):
        embedlens.intervene(model, samples[:1], args.pop("conditions"), **args)


def test_hook_errors_name_the_site_and_the_condition(study, samples):
    model, _ = study
    with pytest.raises(InterventionError, match=r"site: a hook edits llm.embed, llm.layers\[i\].in, llm.layers\[i\]; got 'llm.layers\[0\].mlp'"):
        embedlens.Hook(lambda x: x, site="llm.layers[0].mlp")
    with pytest.raises(InterventionError, match=r"condition 'far', interventions\[0\] \(hook\): site: .*out of range"):
        embedlens.intervene(model, samples[:1], {"far": embedlens.Hook(lambda x: x, site="llm.layers[40]")})
    with pytest.raises(InterventionError, match=r"condition 'cut', interventions\[0\] \(hook\): fn at 'llm.embed' must return a tensor of shape"):
        embedlens.intervene(model, samples[:1], {"cut": embedlens.Hook(lambda x: x[:, :1], site="llm.embed")})
    with pytest.raises(InterventionError, match=r"tokens: restricts where"):
        embedlens.Hook(lambda ctx: None, tokens="visual")
