"""The `embedlens` command line: run, validate, list."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from embedlens.errors import EmbedLensError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Probe and intervene on the visual tokens of multimodal LLMs.",
)


def _fail(e: Exception) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(code=2)


@app.command()
def run(
    plan: Path = typer.Argument(..., help="YAML plan file."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output folder (overrides output.dir)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Run an analysis plan and write tables, figures and a manifest.

    Example:

        embedlens run examples/quickstart.yaml --output runs/quickstart
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    import embedlens  # noqa: F401 - registers the built-in plugins
    from embedlens.plan import load_plan, prepare
    from embedlens.plan import run as run_plan

    try:
        loaded = load_plan(plan)
        typer.echo(f"loading model {loaded.plan.model.source} ...", err=True)
        prepared = prepare(loaded)
        columns = [TextColumn("samples"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
        with Progress(*columns, disable=quiet, transient=False) as bar:
            task = bar.add_task("run", total=len(prepared.samples))
            result = run_plan(prepared, output, progress=lambda done, total: bar.update(task, completed=done))
    except EmbedLensError as e:
        _fail(e)
    typer.echo(f"wrote {result.out_dir}")
    for name, path in result.tables.items():
        typer.echo(f"  table  {name}: {path}")
    for fig in result.figures:
        typer.echo(f"  figure {fig}")


@app.command()
def validate(plan: Path = typer.Argument(..., help="YAML plan file.")) -> None:
    """Check a plan completely (schema, plugins, files, and against the model) without running it.

    Example:

        embedlens validate examples/quickstart.yaml
    """
    import embedlens  # noqa: F401
    from embedlens.plan import load_plan, prepare

    try:
        loaded = load_plan(plan)
        prepared = prepare(loaded)
    except EmbedLensError as e:
        _fail(e)
    typer.echo(
        f"{plan}: ok ({prepared.adapter.name} model, {len(prepared.samples)} samples, "
        f"probes: {', '.join(n for n, _ in prepared.probes)})"
    )


@app.command("list")
def list_plugins() -> None:
    """List every registered adapter, probe, intervention and metric with its parameters.

    Example:

        embedlens list
    """
    import embedlens  # noqa: F401
    from embedlens.registry import REGISTRIES, plugin_params, summary

    for kind, reg in REGISTRIES.items():
        typer.echo(f"{kind}:")
        items = reg.items()
        if not items and not reg.failed:
            typer.echo("  (none registered)")
        for name, cls in items:
            typer.echo(f"  {name:<18} {summary(cls)}")
            if kind == "adapters":
                typer.echo(f"  {'':<18} architectures: {', '.join(cls.architectures)}")
                continue
            params = plugin_params(cls)
            for p in params:
                typer.echo(f"  {'':<18}   {p}")
        for name, err in reg.failed.items():
            typer.echo(f"  {name:<18} FAILED TO LOAD: {err}")


def main() -> None:
    try:
        app()
    except EmbedLensError as e:  # pragma: no cover - commands catch their own
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
