"""A selection's group names are checked when the plan loads (validate, run), not when the first batch runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from embedlens.cli import app
from embedlens.errors import PlanError
from embedlens.plan import load_plan
from embedlens.plan.selections import selection_params
from embedlens.registry import interventions

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _plan(tmp_path, text: str) -> Path:
    p = tmp_path / "plan.yaml"
    p.write_text(text)
    return p


def test_a_misspelt_group_is_refused_at_its_key_with_the_closest_name(tmp_path):
    text = (EXAMPLES / "pruning_study.yaml").read_text()
    assert text.count("{tokens: dead, if_empty: noop}") == 1
    bad = _plan(tmp_path, text.replace("{tokens: dead, if_empty: noop}", "{tokens: ded, if_empty: noop}"))
    line = next(i for i, x in enumerate(bad.read_text().splitlines(), 1) if "tokens: ded" in x)
    r = CliRunner().invoke(app, ["validate", str(bad)])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert f"{bad}:{line} conditions.prune_dead[0].params.tokens: condition 'prune_dead' (prune): unknown group 'ded' in selection 'ded'. Did you mean: dead?" in r.output
    assert "partition defines the groups sink, dead, alive" in r.output
    # in an expression, in a matched control's target, in a --set override
    for old, new, key in (("{name: prune_random_matched, params: {target: dead,",
                           "{name: prune_random_matched, params: {target: visual and not sinks,",
                           "conditions.prune_dead_random[0].params.target"),):
        assert text.count(old) == 1
        with pytest.raises(PlanError, match=rf"{re.escape(key)}: condition .*: unknown group 'sinks'.*Did you mean: sink\?"):
            load_plan(_plan(tmp_path, text.replace(old, new)))
    with pytest.raises(PlanError, match=r"--set conditions.blind.0.params.tokens=alve: conditions.blind\[0\].params.tokens: "
                                        r"condition 'blind' \(prune\): unknown group 'alve'.*Did you mean: alive\?"):
        load_plan(EXAMPLES / "pruning_study.yaml", overrides=["conditions.blind.0.params.tokens=alve"])


def test_groups_need_a_partition_and_roles_fields_and_partition_groups_pass(tmp_path):
    head = "model: {source: tiny:llava-clip}\ndata: {synthetic: {n: 2}}\nmetrics: [{name: next_token_kl}]\n"
    with pytest.raises(PlanError, match=r"conditions.c\[0\].params.tokens: condition 'c' \(prune\): unknown group 'dead'.*The plan has no partition"):
        load_plan(_plan(tmp_path, head + "conditions:\n  c: [{name: prune, params: {tokens: dead}}]\n"))
    ok = load_plan(_plan(tmp_path, head + "partition: {anchors: {junk: [3]}, vit_norm: sink}\n"
                                          "conditions:\n  c: [{name: prune, params: {tokens: 'junk or sink or (alive and row < 2)'}}]\n"
                                          "  d: [{name: prune, params: {tokens: [0, 1]}}]\n"))
    assert list(ok.plan.conditions) == ["c", "d"]
    with pytest.raises(PlanError, match=r"unknown name 'rows'"):  # a bad field, at the key, before the model
        load_plan(_plan(tmp_path, head + "conditions:\n  c: [{name: prune, params: {tokens: 'rows < 2'}}]\n"))


def test_selection_parameters_are_found_by_annotation():
    assert selection_params(interventions.get("prune")) == ["tokens"]
    assert "target" in selection_params(interventions.get("prune_random_matched"))
