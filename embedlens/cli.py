"""The `embedlens` command line: run, validate, list, compare, eval (lmms-eval benchmarks), new (plugin scaffolds), docs, zoo (train / evaluate / list)."""

from __future__ import annotations

import os
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


def _threads(n: Optional[int]) -> None:
    """``--threads N``: the BLAS libraries read their variables when torch loads them, torch its own setting after."""
    if n is None:
        return
    if n < 1:
        _fail(EmbedLensError(f"--threads: expected an integer >= 1; got {n}"))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS"):
        os.environ[var] = str(n)
    import torch  # after the variables: the BLAS libraries read them as torch loads them

    torch.set_num_threads(n)


def _progress_bar(quiet: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [
        TextColumn("{task.description:<28}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    return Progress(*columns, disable=quiet, transient=False)


@app.command()
def run(
    plan: Path = typer.Argument(..., help="YAML plan file."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Output folder (overrides output.dir), relative to the working directory; new, empty, or an earlier run's."),
    resume: bool = typer.Option(False, "--resume", help="Continue an unfinished run in the output folder from its last finished batch."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Discard an unfinished run in the output folder and start again."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or model messages."),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="KEY=VALUE: set a plan key for this run (dotted: model.source, batch_size, data.synthetic.n, probes.0.params.layer), checked as the plan; repeatable."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch and the BLAS libraries (default: theirs)."),
) -> None:
    """Run an analysis plan: tables (Parquet/CSV), figures, report.html and a manifest.

    Results stream to disk batch by batch; a run that stops (killed, out of
    memory, a crash) continues with --resume and ends with the same files as
    an uninterrupted run. A plan with several models runs each into
    OUTPUT/NAME and compares them in OUTPUT/compare.

    Example:

        embedlens run examples/quickstart.yaml --output runs/quickstart

        embedlens run examples/partition_study.yaml --resume

        embedlens run examples/quickstart.yaml --set model.source=tiny:paligemma --set batch_size=2 --threads 1
    """
    from embedlens.plan import load_plan

    _threads(threads)
    try:
        loaded = load_plan(plan, overrides=overrides or ())
        from embedlens.plan import run_all  # torch and the models: after the plan's own errors
        from embedlens.plan import distributed

        # under torchrun / accelerate launch: join the process group; only rank 0 shows progress and results
        world = distributed.activate(distributed.World.from_env())
        quiet = quiet or not world.main
        with _progress_bar(quiet) as bar:
            tasks: dict[tuple[str, str], object] = {}
            many = len(loaded.plan.model_specs()) > 1

            def on_model(name: str) -> None:
                if not quiet:
                    bar.console.print(f"loading model {name if many else loaded.plan.model.source} ...")

            def progress(model: str, phase: str, done: int, total: int) -> None:
                key = (model, phase)
                if key not in tasks:
                    tasks[key] = bar.add_task(f"{model}: {phase}" if many else phase, total=total, rate="")
                task = tasks[key]
                t = bar.tasks[[x.id for x in bar.tasks].index(task)]
                rate = f"{t.speed:.1f} samples/s" if t.speed else ""
                bar.update(task, completed=done, rate=rate)

            if output is not None:
                from embedlens.files import check_output

                check_output(output)  # '' would become '.': refuse it as written
            results = run_all(loaded, output, progress=progress, resume=resume, overwrite=overwrite, on_model=on_model)
    except EmbedLensError as e:
        _fail(e)
    except OSError as e:  # a file system that fails under us (full, read-only): named, with the run's state kept
        from embedlens.files import os_error

        _fail(os_error(e, "write", output))
    except Exception as e:  # under torchrun: a collective whose peer stopped is that peer's error, not a traceback here
        from embedlens.plan.distributed import peer_failure

        gone = peer_failure(e)
        if gone is None:
            raise
        _fail(gone)
    if not world.main:
        return
    for name, result in results.items():
        typer.echo(f"wrote {_shown(result.out_dir)}" + (f" (resumed at batch {result.resumed_from})" if result.resumed_from else ""))
        for tname, path in result.tables.items():
            typer.echo(f"  table  {tname}: {_shown(path)}")
        if result.figures:
            typer.echo(f"  figures: {len(result.figures)} in {_shown(result.out_dir / 'figures')}")
        if result.report is not None:
            typer.echo(f"  report: {_shown(result.report)}")
        for s in result.skipped:
            typer.echo(f"  skipped sample {s['sample_id']}: {s['error']}", err=True)
        part = result.summary.get("partition")
        if part:
            fr = ", ".join(f"{g} {part['fractions'][g]:.0%}" for g in part["order"])
            anchors = "; ".join(f"{g}: {', '.join(repr(a['token']) for a in part['anchors'] if a['group'] == g)}"
                                for g in dict.fromkeys(a["group"] for a in part["anchors"]))
            typer.echo(f"  partition: {fr}" + (f" (anchors {anchors})" if anchors else " (no anchors)"))
        for w in result.warnings:
            typer.secho(f"  warning: {w}", fg=typer.colors.YELLOW, err=True)
        if not quiet and result.summary.get("statistics"):
            _print_headline(result.summary["statistics"], name if len(results) > 1 else "")
    if len(results) > 1:
        out = Path(output) if output is not None else loaded.output_dir
        typer.echo(f"comparison: {_shown(out / 'compare' / 'compare.html')}")


def _shown(path) -> str:
    """A path as printed: ``examples/../runs/x`` (an output.dir relative to its plan) reads ``runs/x``."""
    return os.path.normpath(path)


def _print_headline(stats: dict, model: str = "") -> None:
    """The headline numbers of a run's effect tests: each accuracy metric by condition, with intervals and p-values."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    conf = int(round(100 * stats.get("method", {}).get("confidence", 0.95)))

    def diff(d: dict | None) -> str:
        if not d:
            return ""
        lo, hi = d["ci"]
        if d.get("test") == "deterministic":
            return f"{d['diff']:+.3f} (deterministic)"
        ph = d.get("p_holm", d["p"])
        mark = "*" if ph == ph and ph < 0.05 else ""
        return f"{d['diff']:+.3f} [{lo:+.2f}, {hi:+.2f}] p={d['p']:.2g} (Holm {ph:.2g}){mark}"

    for metric in stats.get("accuracy_metrics", []):
        base = stats.get("baseline", {}).get(metric)
        title = f"{metric}{' - ' + model if model else ''}" + (f" (baseline {base['mean']:.3f}, n={base['n']})" if base else "")
        table = Table(title=escape(title), caption=f"{conf}% BCa bootstrap intervals; exact McNemar p, raw and Holm-adjusted "
                      "across the plan's comparisons; * Holm p < 0.05. What each row supports: report.html")
        for col in ("condition", "mean", "minus baseline", "minus matched control"):
            table.add_column(col, justify="left" if col == "condition" else "right")
        for cond, entry in stats.get("conditions", {}).items():
            e = entry.get(metric)
            if not e:
                continue
            ctrl = e.get("vs_control")
            label = cond + (" (blind)" if cond == stats.get("blind") else "")
            table.add_row(escape(label), f"{e['mean']:.3f}", diff(e.get("vs_baseline")),
                          escape(f"{diff(ctrl)} vs {ctrl['control']}") if ctrl else "")
        Console(width=160).print(table)
    for w in stats.get("warnings", []):
        Console(width=160).print(f"[yellow]warning:[/yellow] {escape(w)}")


@app.command()
def validate(
    plan: Path = typer.Argument(..., help="YAML plan file."),
    deep: bool = typer.Option(False, "--deep", help="Load each model's weights, as a run does, to check also what its config "
                              "cannot tell: the tokenizer's ids, the processor's prompts (seconds to minutes)."),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="KEY=VALUE: set a plan key (as run --set does); repeatable."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch and the BLAS libraries (default: theirs)."),
) -> None:
    """Check a plan without running it, in about a second: schema, plugin names and
    parameter types, selections and group names, files and data records, and, against
    each model's config (no weights loaded), layer ranges, sites, vocabulary ids and the
    pools of matched controls where the token layout fixes them. --deep loads each model
    and checks the rest (what validate lists as needing the model).

    Example:

        embedlens validate examples/quickstart.yaml

        embedlens validate examples/pruning_study.yaml --deep
    """
    from embedlens.plan import load_plan

    _threads(threads)
    try:
        loaded = load_plan(plan, overrides=overrides or ())
        from embedlens.plan.validation import validate_plan  # torch: after the plan's own errors

        checks = validate_plan(loaded, deep=deep)
    except EmbedLensError as e:
        _fail(e)
    for c in checks:
        typer.echo(
            f"{plan}: ok ({c.name}: {c.adapter} model, {c.samples} samples, "
            f"probes: {', '.join(c.probes) or 'none'}, conditions: {', '.join(c.conditions) or 'none'}), "
            + ("checked with the model loaded" if c.loaded else "checked against its config (no weights loaded)")
        )
        if c.unchecked:
            typer.echo("  left to validate --deep (and to a run, before its first batch), as they need the loaded model:")
            by_need: dict[str, list[str]] = {}
            for key, what in c.unchecked:
                by_need.setdefault(what, []).append(key)
            for what, keys in by_need.items():  # swept copies of one condition need the same: one line
                more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
                typer.echo(f"    {what}: {', '.join(keys[:3])}{more}")
        for note in c.pool_notes:
            typer.echo(f"  control pool left to the run: {note}")


@app.command()
def compare(
    runs: list[Path] = typer.Argument(..., help="Two or more finished run folders."),
    output: Path = typer.Option(Path("runs/compare"), "--output", "-o", help="Folder for compare.csv and compare.html."),
    names: Optional[str] = typer.Option(None, "--names", help="Comma-separated column names (default: model names)."),
    all_rows: bool = typer.Option(False, "--all", help="Print every compared value, not only the differences."),
) -> None:
    """Put finished runs side by side: token-group fractions, probe summaries,
    intervention effects and figures, with the largest differences first.

    Example:

        embedlens compare runs/clip_vs_siglip/clip runs/clip_vs_siglip/siglip --output runs/cmp
    """
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from embedlens.compare import compare_runs
    from embedlens.report import fmt

    try:
        name_list = [n.strip() for n in names.split(",")] if names else None
        if name_list is not None and len(name_list) != len(runs):
            raise EmbedLensError(f"--names gives {len(name_list)} names for {len(runs)} runs")
        cmp = compare_runs(runs, output, names=name_list)
    except EmbedLensError as e:
        _fail(e)
    except OSError as e:
        from embedlens.files import os_error

        _fail(os_error(e, "write"))
    rows = cmp.rows if all_rows else [r for r in cmp.rows if r["section"] == "token groups"] + cmp.differences()[:25]
    table = Table(title="where the runs differ" if not all_rows else "all compared values")
    table.add_column("key")
    for n in cmp.names:
        table.add_column(n, justify="right")
    table.add_column("rel diff", justify="right")
    seen = set()
    for r in rows:
        if r["key"] in seen:
            continue
        seen.add(r["key"])
        table.add_row(escape(r["key"]), *[escape(fmt(v)) for v in r["values"]], fmt(r["rel_diff"]) if r["rel_diff"] is not None else "")
    Console(width=160).print(table)
    for w in cmp.warnings:
        typer.secho(f"warning: {w}", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"wrote {cmp.csv} and {cmp.html}")


@app.command("eval")
def eval_benchmarks(
    plan: Path = typer.Argument(..., help="YAML plan file (its model, partition and conditions)."),
    tasks: str = typer.Option(..., "--tasks", help="Comma-separated lmms-eval tasks, e.g. pope,textvqa_val (offline: embedlens_pope, embedlens_pope_mc, embedlens_synqa)."),
    conditions: Optional[str] = typer.Option(None, "--conditions", help="Comma-separated conditions of the plan; baseline is always run (default: baseline and every condition)."),
    limit: Optional[float] = typer.Option(None, "--limit", help="Documents per task (a count, or a fraction below 1)."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Run folder (default: the plan's output.dir + _eval)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Prompts per engine run (default: the plan's batch_size)."),
    source: Optional[str] = typer.Option(None, "--source", help="Replace the plan model's source (e.g. a real checkpoint)."),
    device: Optional[str] = typer.Option(None, "--device", help="Replace the plan model's device (e.g. cuda)."),
    resume: bool = typer.Option(False, "--resume", help="The output folder holds a finished eval of the same plan, tasks, conditions and limit: show it, do not evaluate again."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace what the output folder holds (an unfinished or finished embedlens run, another eval)."),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="KEY=VALUE: set a plan key for this run (dotted: model.source, batch_size, data.synthetic.n, probes.0.params.layer), checked as the plan; repeatable."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch and the BLAS libraries (default: theirs)."),
) -> None:
    """Score the plan's conditions on lmms-eval benchmarks with each benchmark's own metrics (in-process):
    one task x condition x metric table with the paired difference to the baseline, a chart and report.html.

    Needs the lmms extra (docs/benchmarks-lmms.md). Example:

        embedlens eval study.yaml --tasks pope,textvqa_val --conditions baseline,prune_dead,prune_random
    """
    _threads(threads)
    try:
        import importlib.util

        if importlib.util.find_spec("lmms_eval") is None:
            raise EmbedLensError('embedlens eval needs lmms-eval: pip install "embedlens[lmms]" && pip install --no-deps "lmms-eval==0.7.3" '
                                 "(docs/benchmarks-lmms.md; a plain install of lmms-eval would replace torch)")
        from embedlens.lmms.evaluate import parse_list, run_eval
        n = None
        if limit is not None:
            n = int(limit) if 1 <= limit <= 2**53 and float(limit).is_integer() else limit  # NaN, inf, 1e30 reach the check as given
        result = run_eval(plan, parse_list(tasks, "--tasks"), parse_list(conditions, "--conditions") if conditions is not None else None,
                          limit=n, out_dir=output, batch_size=batch_size, source=source, device=device,
                          progress=typer.echo, resume=resume, overwrite=overwrite, overrides=overrides or ())
    except EmbedLensError as e:
        _fail(e)
    except OSError as e:
        from embedlens.files import os_error

        _fail(os_error(e, "write", output))
    from embedlens.report import fmt

    for r in result.rows:
        paired = f"  paired {fmt(r['paired_diff'])} +- {fmt(r['paired_sem'])} (n={r['paired_n']})" if r["paired_n"] else ""
        diff = f"  diff {fmt(r['diff'])}" if r["condition"] != "baseline" and r["diff"] is not None else ""
        typer.echo(f"  {r['task']:<20} {r['metric']:<18} {r['condition']:<16} {fmt(r['value'])}{diff}{paired}")
    typer.echo(f"wrote {_shown(result.out_dir)}")
    for name, path in result.tables.items():
        typer.echo(f"  table  {name}: {path}")
    if result.report is not None:
        typer.echo(f"  report: {_shown(result.report)}")


@app.command("list")
def list_plugins() -> None:
    """List every registered adapter, probe, intervention and metric with its parameters.

    Example:

        embedlens list
    """
    from importlib import metadata

    from embedlens.plugin_index import read_index
    from embedlens.registry import REGISTRIES

    builtin = read_index()  # the built-ins as stored: listing them imports neither them nor torch
    for kind, reg in REGISTRIES.items():
        rows = {row["name"]: row for row in builtin.get(kind, [])}
        failed: dict[str, str] = {}
        if any(ep.name not in rows for ep in metadata.entry_points(group=reg.group)):  # third-party plugins: loaded
            from embedlens.registry import plugin_params, summary

            for name, cls in reg.items():
                if name not in rows:
                    rows[name] = {"name": name, "summary": summary(cls), "params": [str(p) for p in plugin_params(cls)],
                                  "architectures": list(getattr(cls, "architectures", ()))}
            failed = reg.failed
        typer.echo(f"{kind}:")
        if not rows and not failed:
            typer.echo("  (none registered)")
        for name in sorted(rows):
            row = rows[name]
            typer.echo(f"  {name:<18} {row['summary']}")
            if kind == "adapters":
                typer.echo(f"  {'':<18} architectures: {', '.join(row['architectures'])}")
                continue
            for p in row["params"]:
                typer.echo(f"  {'':<18}   {p}")
        for name, err in failed.items():
            typer.echo(f"  {name:<18} FAILED TO LOAD: {err}")


new_app = typer.Typer(no_args_is_help=True, help="Start a plugin: a pip-installable package that passes its own tests.")
app.add_typer(new_app, name="new")


def _new(kind: str, name: str, directory: Path) -> None:
    from embedlens.scaffold import new_plugin, next_steps

    try:
        root = new_plugin(kind, name, directory)
    except EmbedLensError as e:
        _fail(e)
    typer.echo(f"wrote {root}; next, from this folder:")
    for line in next_steps(root):
        typer.echo(f"  {line}")


@new_app.command("probe")
def new_probe(
    name: str = typer.Argument(..., help="The probe's name in plans (a lower-case identifier, e.g. token_norm)."),
    directory: Path = typer.Option(Path("."), "--dir", "-d", help="Folder to create the package NAME in."),
) -> None:
    """Write a probe plugin package NAME/: pyproject (entry point), module, README, conformance test.

    Example:

        embedlens new probe token_norm && pip install -e './token_norm[test]' && embedlens list
    """
    _new("probe", name, directory)


@new_app.command("metric")
def new_metric(
    name: str = typer.Argument(..., help="The metric's name in plans (a lower-case identifier)."),
    directory: Path = typer.Option(Path("."), "--dir", "-d", help="Folder to create the package NAME in."),
) -> None:
    """Write a metric plugin package NAME/: pyproject (entry point), module, README, tests.

    Example:

        embedlens new metric top_kept && pip install -e './top_kept[test]'
    """
    _new("metric", name, directory)


@new_app.command("intervention")
def new_intervention(
    name: str = typer.Argument(..., help="The intervention's name in plans (a lower-case identifier)."),
    directory: Path = typer.Option(Path("."), "--dir", "-d", help="Folder to create the package NAME in."),
) -> None:
    """Write an intervention plugin package NAME/: pyproject (entry point), module, README, conformance test.

    Example:

        embedlens new intervention scale_visual && pip install -e './scale_visual[test]'
    """
    _new("intervention", name, directory)


docs_app = typer.Typer(no_args_is_help=True, help="Generated documentation.")
app.add_typer(docs_app, name="docs")


@docs_app.command("plan-reference")
def docs_plan_reference(
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write it here (default: print it)."),
    check: bool = typer.Option(False, "--check", help="Do not write: exit 1 when --output differs from what would be written."),
) -> None:
    """Every plan key (from the schema) and every built-in plugin's parameters, as Markdown.

    Example:

        embedlens docs plan-reference --output docs/plan-reference.md
    """
    from embedlens.plan.reference import plan_reference

    text = plan_reference()
    if output is None:
        if check:
            _fail(EmbedLensError("--check needs --output FILE to compare with"))
        typer.echo(text, nl=False)
        return
    if check:
        current = output.read_text(encoding="utf-8") if output.is_file() else None
        if current != text:
            typer.echo(f"{output} is stale; regenerate it with: embedlens docs plan-reference --output {output}", err=True)
            raise typer.Exit(code=1)
        typer.echo(f"{output} is up to date")
        return
    output.write_text(text, encoding="utf-8")
    typer.echo(f"wrote {output}")


zoo_app = typer.Typer(no_args_is_help=True, help="The model zoo: train, evaluate and list embedlens's own trained models.")
app.add_typer(zoo_app, name="zoo")


@zoo_app.command("list")
def zoo_list() -> None:
    """List the zoo models (load any of them as zoo:NAME).

    Example:

        embedlens zoo list
    """
    from embedlens.zoo import ZOO, ZOO_DIR

    for e in ZOO.values():
        there = (ZOO_DIR / e.folder / "config.json").exists()
        typer.echo(f"  zoo:{e.name:<26} {e.description}{'' if there else '  (checkpoint missing)'}")


@zoo_app.command("train")
def zoo_train(
    variant: str = typer.Argument(..., help="clip or siglip."),
    output: Path = typer.Argument(..., help="Folder for the checkpoint (model, tokenizer, processor, recipe, train_log.json)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the data, the initialisation and the batch order."),
    threads: int = typer.Option(2, "--threads", help="torch CPU threads; results are reproducible for a fixed count."),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="Recipe override KEY=VALUE (repeatable), e.g. --set lm_steps=100."),
) -> None:
    """Train a zoo model from scratch on the synthetic data set (LLaVA's staged recipe; see embedlens.zoo.train).

    Example:

        embedlens zoo train clip runs/my-tiny-llava-clip --seed 0 --threads 2
    """
    from embedlens.zoo.recipe import Recipe
    from embedlens.zoo.train import train

    try:
        recipe = Recipe(variant=variant, seed=seed, threads=threads)
        for kv in overrides or []:
            recipe = recipe.with_override(kv)
        recipe.check()
        train(recipe, output)
    except EmbedLensError as e:
        _fail(e)
    typer.echo(f"wrote {output}")


@zoo_app.command("evaluate")
def zoo_evaluate(
    model: str = typer.Argument("zoo:tiny-llava-clip", help="zoo:NAME, tiny:NAME or a checkpoint folder."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Folder for the validation (default runs/zoo-eval/NAME)."),
    images: int = typer.Option(200, "--images", help="Held-out images (every answerable question type is asked of each)."),
    batch_size: int = typer.Option(16, "--batch-size"),
    pruning: bool = typer.Option(True, "--pruning/--no-pruning", help="Run the pruning experiments (both modes) besides QA and blind."),
    threads: int = typer.Option(1, "--threads", min=1, help="Torch and BLAS threads while it runs (1 is fastest for the zoo's tiny models)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Validate a model on held-out synthetic images: QA by question type and blind, the
    sink/dead/alive partition against the per-patch ground truth, the embedding lens,
    a semantic linear probe, and pruning in both modes (table, figures, report).

    Example:

        embedlens zoo evaluate zoo:tiny-llava-siglip -o runs/zoo-siglip
    """
    from embedlens.zoo.evaluate import check, evaluate, markdown

    name = model.split(":", 1)[-1].rstrip("/").split("/")[-1]
    out = output if output is not None else Path("runs/zoo-eval") / name
    try:
        with _progress_bar(quiet) as bar:
            tasks: dict[str, object] = {}

            def progress(phase: str, done: int, total: int) -> None:
                if phase not in tasks:
                    tasks[phase] = bar.add_task(phase, total=total, rate="")
                bar.update(tasks[phase], completed=done)

            result = evaluate(model, out, n_images=images, batch_size=batch_size, progress=progress, pruning=pruning,
                                  threads=threads)
    except EmbedLensError as e:
        _fail(e)
    typer.echo(markdown(result))
    bad = check(result, name)
    if bad:
        typer.echo("below the zoo thresholds: " + "; ".join(bad))
    typer.echo(f"wrote {out / 'validation.md'}, {out / 'validation.png'} and the run with report.html in {out / 'run'}")


def main() -> None:
    try:
        app()
    except EmbedLensError as e:  # pragma: no cover - commands catch their own
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
