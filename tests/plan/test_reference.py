"""docs/plan-reference.md is generated from the schema and the built-in plugins and must not go stale."""

from __future__ import annotations

import inspect
from pathlib import Path

from typer.testing import CliRunner

from embedlens.cli import app
from embedlens.plan import schema
from embedlens.plan.reference import SECTIONS, docstring_args, plan_reference
from embedlens.registry import REGISTRIES, plugin_params

DOC = Path(__file__).resolve().parents[2] / "docs" / "plan-reference.md"


def test_committed_plan_reference_is_current():
    assert DOC.read_text(encoding="utf-8") == plan_reference(), (
        "docs/plan-reference.md is stale: run `embedlens docs plan-reference --output docs/plan-reference.md`")


def test_reference_lists_every_schema_key_and_every_builtin_parameter():
    """Independently of the generator's own walk: every pydantic model in schema.py and every field; every
    built-in plugin and parameter, with its documented description where the docstring has one."""
    text = DOC.read_text(encoding="utf-8")
    models = {m for _, m in inspect.getmembers(schema, inspect.isclass) if issubclass(m, schema.BaseModel)
              and m.__module__ == schema.__name__ and m is not schema._Strict}
    assert models == {m for _, m in SECTIONS}
    for _, model in SECTIONS:
        for key in model.model_fields:
            assert f"| `{key}` |" in text, key
    for kind, reg in REGISTRIES.items():
        for name, cls in reg.items():
            if not cls.__module__.startswith("embedlens.") or name.startswith("_"):
                continue
            section = text.split(f"### `{name}`\n", 1)[1].split("\n### ", 1)[0]
            args = docstring_args(cls)
            for p in ([] if kind == "adapters" else plugin_params(cls)):
                row = next(line for line in section.splitlines() if line.startswith(f"| `{p.name}` |"))
                if p.name in args:
                    assert args[p.name].split()[0] in row.replace("\\|", "|"), (name, p.name)
    assert "| `k` | int | `3` | neighbours kept per token. |" in text.split("### `embedding_lens`", 1)[1]


def test_docstring_args_parses_google_style():
    def f(a, b, c):
        """Do.

        Args:
            a: first
                continued.
            b, c (int): both.

        Returns:
            nothing.
        """

    assert docstring_args(f) == {"a": "first continued.", "b": "both.", "c": "both."}


def test_cli_check_says_stale_and_writes(tmp_path):
    out = tmp_path / "ref.md"
    out.write_text("old\n")
    r = CliRunner().invoke(app, ["docs", "plan-reference", "--output", str(out), "--check"])
    assert r.exit_code == 1 and "is stale" in r.output
    r = CliRunner().invoke(app, ["docs", "plan-reference", "--output", str(out)])
    assert r.exit_code == 0 and out.read_text() == plan_reference()
    r = CliRunner().invoke(app, ["docs", "plan-reference", "--output", str(out), "--check"])
    assert r.exit_code == 0 and "up to date" in r.output


def test_every_builtin_plugin_parameter_is_described():
    """Every parameter of a built-in probe, intervention and metric has a description under its docstring's Args
    (the reference and `embedlens list` readers rely on it)."""
    missing = []
    for kind in ("probes", "interventions", "metrics"):
        for name, cls in REGISTRIES[kind].items():
            if not cls.__module__.startswith("embedlens.") or name.startswith("_"):
                continue
            args = docstring_args(cls)
            missing += [f"{kind}.{name}.{p.name}" for p in plugin_params(cls) if not args.get(p.name)]
    assert missing == []
