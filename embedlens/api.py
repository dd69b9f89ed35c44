"""The notebook API: run a plan and read its tables as DataFrames, or run one probe on samples in memory.

Both are thin layers over what ``embedlens run`` does: `run` is the command
line's run (same files on disk), `probe` is the runner's per-batch loop for
one probe (fit passes, partition labels, batching) without writing anything.
See ``docs/python-api.md``.
"""

from __future__ import annotations

import contextlib
import json
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from embedlens.errors import InputError, PlanError

if TYPE_CHECKING:
    import pandas as pd

    from embedlens.adapters.base import Adapter
    from embedlens.data import Record, Sample
    from embedlens.plan.runner import RunResult
    from embedlens.synthetic import SyntheticSpec

__all__ = ["Results", "probe", "run"]


def _read_table(path: Path) -> "pd.DataFrame":
    """A run's table as a DataFrame: Parquet as written; CSV with its JSON list/dict cells decoded."""
    import pandas as pd

    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pandas()
    df = pd.read_csv(path, keep_default_na=False, na_values=[""])
    for col in df.columns:
        if df[col].dtype == object and df[col].map(lambda v: isinstance(v, str) and v[:1] in "[{").all():
            df[col] = df[col].map(json.loads)
    return df


class Results:
    """What `run` returns: the run folder(s) of a plan, with tables as pandas DataFrames.

    A plan with one model gives one run; a plan with ``models:`` gives one per
    model (``results["clip"]`` is that model's `Results`). Table names are the
    files' names without extension (``tokens``, ``effects``,
    ``embedding_lens.tokens`` when a plan has several probes); `tables` lists them.

    Example:
        >>> import embedlens
        >>> results = embedlens.run({"model": {"source": "tiny:llava-clip"}, "data": {"synthetic": {"n": 2, "size": 32}},
        ...     "probes": [{"name": "embedding_lens", "params": {"k": 2}}]}, output=getfixture("tmp_path") / "run")
        >>> results.tables
        ['tokens']
        >>> results.table("tokens")[["sample_id", "layer"]].drop_duplicates().shape[0]
        2
    """

    def __init__(self, runs: "dict[str, RunResult]"):
        self.runs = dict(runs)

    @property
    def models(self) -> list[str]:
        """The plan's model names (``model`` for a single-model plan)."""
        return list(self.runs)

    def __getitem__(self, model: str) -> "Results":
        if model not in self.runs:
            from embedlens.errors import UnknownNameError

            raise UnknownNameError.make("model of this run", model, self.runs)
        return Results({model: self.runs[model]})

    def _one(self, model: str | None = None) -> "RunResult":
        if model is not None:
            return self[model]._one()
        if len(self.runs) != 1:
            raise InputError(f"this plan ran {len(self.runs)} models ({', '.join(self.runs)}); "
                             f"pick one: results[{next(iter(self.runs))!r}] or model={next(iter(self.runs))!r}")
        return next(iter(self.runs.values()))

    @property
    def out_dir(self) -> Path:
        """The run folder (one model)."""
        return self._one().out_dir

    @property
    def tables(self) -> list[str]:
        """Names of the tables the run wrote (one model)."""
        return sorted(self._one().tables)

    @property
    def summary(self) -> dict[str, Any]:
        """``summary.json``: each probe's result, the partition, effects, data counts (one model)."""
        return self._one().summary

    @property
    def figures(self) -> list[Path]:
        return list(self._one().figures)

    @property
    def report(self) -> Path | None:
        """``report.html`` (None when the plan turned it off)."""
        return self._one().report

    @property
    def warnings(self) -> list[str]:
        return self._one().warnings

    def table(self, name: str, model: str | None = None) -> "pd.DataFrame":
        """One table as a DataFrame.

        Args:
            name: a table name from `tables`; a suffix after a dot (``tokens``
                for ``embedding_lens.tokens``) is enough when only one table has it.
            model: which model's run, for a plan with several.

        Raises:
            UnknownNameError: no such table (the error lists those that exist).
        """
        res = self._one(model)
        tables = res.tables
        key = name if name in tables else None
        if key is None:
            hits = [t for t in tables if t.endswith("." + name)]
            if len(hits) == 1:
                key = hits[0]
            elif len(hits) > 1:
                raise InputError(f"table {name!r} is ambiguous in {res.out_dir}: {', '.join(sorted(hits))}; give the full name")
        if key is None:
            from embedlens.errors import UnknownNameError

            raise UnknownNameError.make(f"table in {res.out_dir}", name, tables)
        path = tables[key]
        parquet = path.with_suffix(".parquet")
        return _read_table(parquet if parquet.is_file() else path)

    def __repr__(self) -> str:
        lines = []
        for name, res in self.runs.items():
            head = f"{name}: " if len(self.runs) > 1 else ""
            lines.append(f"{head}{res.out_dir} tables: {', '.join(sorted(res.tables)) or '(none)'}; "
                         f"{len(res.figures)} figure(s); report: {res.report}")
        return "Results(" + "\n        ".join(lines) + ")"


def run(
    plan: "str | Path | dict[str, Any]",
    output: str | Path | None = None,
    *,
    base_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: Callable[[str, str, int, int], None] | None = None,
    quiet: bool = False,
    overrides: Sequence[str] = (),
) -> Results:
    """Run an analysis plan, as ``embedlens run`` does, and return its results.

    Args:
        plan: a YAML plan file, or the plan as a dict (the same keys as the YAML).
        output: the output folder (overrides ``output.dir``), relative to the
            working directory like the command line's ``--output``.
        base_dir: for a dict plan, the folder its relative paths (``data.prompts``,
            ``output.dir``, ...) are resolved from (default: the working directory;
            a plan file's own folder otherwise).
        resume, overwrite: as the command line's ``--resume`` / ``--overwrite``.
        progress: called as ``progress(model, phase, done, total)``.
        quiet: no model messages: Hugging Face's progress bars (loading
            weights, downloads), its log messages below errors and library
            warnings are silenced for the run (the run's own warnings stay on
            ``results.warnings``), as the command line's ``--quiet``.
        overrides: ``KEY=VALUE`` plan keys set before validation, as the command
            line's ``--set`` (``["model.source=tiny:paligemma", "batch_size=2"]``);
            recorded as ``overrides`` in each run's ``manifest.json``.

    Returns:
        `Results`: ``results.table("tokens")`` and friends.

    Raises:
        PlanError: naming the key (and, for a file, the line) of a bad plan.
    """
    from embedlens.plan import load_plan

    if isinstance(plan, dict):
        import yaml

        try:
            text = yaml.safe_dump(plan, sort_keys=False)
        except yaml.YAMLError as e:
            raise PlanError(f"<plan>: the plan dict holds a value that is not plain data (str, number, list, dict): {e}") from None
        loaded = load_plan(text=text, base_dir=base_dir, overrides=tuple(overrides))
    elif isinstance(plan, (str, Path)):
        if base_dir is not None:
            raise PlanError("base_dir: only for a dict plan; a plan file's paths are relative to its own folder")
        loaded = load_plan(plan, overrides=tuple(overrides))
    else:
        raise PlanError(f"plan: expected a YAML file path or a dict; got {type(plan).__name__}")
    from embedlens.plan import run_all

    if output is not None:
        from embedlens.files import check_output

        check_output(output)
    with _quiet(quiet):
        return Results(run_all(loaded, output, progress=progress, resume=resume, overwrite=overwrite))


@contextlib.contextmanager
def _quiet(on: bool):
    """Silence Hugging Face's progress bars and info/warning logs and library warnings inside the block; restore after."""
    if not on:
        yield
        return
    import warnings

    import huggingface_hub.utils as hub
    from transformers.utils import logging as hf_logging

    verbosity, bars, hub_bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(), not hub.are_progress_bars_disabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    hub.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if hub_bars:
            hub.enable_progress_bars()


def _check_params(cls: type, params: dict[str, Any]) -> None:
    """Plugin parameters against its declared signature: names, required ones, types (as a plan is checked)."""
    import difflib

    from pydantic import TypeAdapter, ValidationError

    from embedlens.registry import plugin_params

    declared = {p.name: p for p in plugin_params(cls)}
    name = getattr(cls, "registered_name", cls.__name__)
    for key, value in params.items():
        if key not in declared:
            close = difflib.get_close_matches(key, list(declared), n=2)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise InputError(f"{name} has no parameter {key!r}.{hint} Parameters: {', '.join(map(str, declared.values())) or '(none)'}")
        ann = typing.get_type_hints(cls.__init__).get(key, Any)
        try:
            TypeAdapter(ann).validate_python(value, strict=False)
        except ValidationError as e:
            raise InputError(f"{name}.{key}: expected {declared[key].annotation}, got {value!r} ({e.errors()[0]['msg']})") from None
    missing = [p.name for p in declared.values() if p.required and p.name not in params]
    if missing:
        raise InputError(f"{name} needs parameter(s): {', '.join(missing)}")


def _as_samples(samples: Any, adapter: "Adapter") -> "list[Sample]":
    """Samples from what a notebook has at hand: Samples, Records, a SyntheticSpec or a JSONL/CSV file."""
    from embedlens.data import Record, Sample, read_records
    from embedlens.synthetic import SyntheticSpec

    if isinstance(samples, SyntheticSpec):
        records: list[Any] = samples.records(adapter)
    elif isinstance(samples, (str, Path)):
        records = read_records(samples)
    elif isinstance(samples, Sample):
        records = [samples]
    else:
        records = list(samples)
    out = []
    for i, r in enumerate(records):
        if isinstance(r, Record):
            r = r.load()[0]
        if not isinstance(r, Sample):
            raise InputError(f"samples[{i}]: expected an embedlens.Sample, a Record or a SyntheticSpec; got {type(r).__name__}")
        out.append(r)
    if not out:
        raise InputError("samples: no samples given")
    return out


def probe(
    model: "Adapter | str",
    name: str,
    samples: "Sequence[Sample] | Sequence[Record] | SyntheticSpec | str | Path",
    *,
    batch_size: int = 4,
    padding_side: str = "right",
    partition: "dict[str, Any] | None" = None,
    seed: int = 0,
    table: str | None = None,
    params: dict[str, Any] | None = None,
    **kwargs: Any,
) -> "pd.DataFrame":
    """Run one probe over samples in memory and return its table as a DataFrame.

    Does what a plan's run does for one probe, without writing files: the
    partition's and the probe's fit passes over all samples, batches of
    `batch_size` (the same seeds as a plan with this `seed`), the partition's
    group labels on each batch, then the probe's per-batch rows and final tables.

    Args:
        model: a loaded adapter (`embedlens.load_model`) or a source string
            (``zoo:tiny-llava-clip``, ``tiny:llava-clip``, a folder, a hub id).
        name: the probe's registered name (``embedding_lens``; see ``embedlens list``).
        samples: `Sample` objects, `Record` objects, a `SyntheticSpec` (its
            ground truth at the model's grid unless it sets `patch_grid`) or a
            JSONL/CSV prompts file.
        batch_size: samples per forward pass.
        padding_side: "left" or "right" (as the plan's ``data.padding_side``).
        partition: a plan's ``partition:`` block as a dict (e.g.
            ``{"discover": True}``); probes then report per group.
        seed: as the plan's ``seed``.
        table: which table, for a probe writing several (default: ``tokens``
            when it writes one, else its only table).
        params: the probe's parameters as a dict (for a parameter whose name is
            one of this function's own).
        **kwargs: the probe's parameters (``k=3, layers=[0, 2]``).

    Returns:
        The table, one row per its unit (e.g. visual token and layer), with
        ``sample`` the sample's index in `samples` (not in its batch) and
        ``sample_id`` its id. ``df.attrs["result"]`` holds the probe's summary
        (its ``result()``), ``df.attrs["tables"]`` the names of every table it wrote.

    Raises:
        UnknownNameError: an unknown probe (with close matches).
        InputError: an unknown or mistyped parameter, a bad sample, a probe
            that writes no table, or a `table` it did not write.

    Example:
        >>> import embedlens
        >>> samples = embedlens.SyntheticSpec(n=3, size=32).samples()
        >>> df = embedlens.probe("tiny:llava-clip", "embedding_lens", samples, batch_size=2, k=2, layers=[0])
        >>> sorted(df["sample"].unique().tolist()), df["sample_id"].iloc[-1]
        ([0, 1, 2], 'syn-0-00002')
    """
    import numpy as np
    import pyarrow as pa
    import torch

    from embedlens.adapters import Adapter, load_model
    from embedlens.groups import Partition
    from embedlens.plan.schema import PartitionSpec
    from embedlens.plan.store import arrow_table, is_empty
    from embedlens.probes.base import Tensors
    from embedlens.registry import probes as probe_registry
    from embedlens.tracing import collect

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size: expected a positive integer; got {batch_size!r}")
    if padding_side not in ("left", "right"):
        raise InputError(f"padding_side: expected 'left' or 'right'; got {padding_side!r}")
    both = set(params or {}) & set(kwargs)
    if both:
        raise InputError(f"parameter(s) {', '.join(sorted(both))} given both in params= and as keywords")
    params = {**(params or {}), **kwargs}
    cls = probe_registry.get(name)
    _check_params(cls, params)
    adapter = model if isinstance(model, Adapter) else load_model(model) if isinstance(model, str) else None
    if adapter is None:
        raise InputError(f"model: expected a loaded adapter or a source string (zoo:NAME, tiny:NAME, a folder); got {type(model).__name__}")
    part = None
    if partition is not None:
        if not isinstance(partition, dict):
            raise InputError(f"partition: expected a dict of the plan's partition: keys; got {type(partition).__name__}")
        from pydantic import ValidationError

        try:
            part = Partition(**PartitionSpec(**partition).model_dump())
        except ValidationError as e:
            err = e.errors()[0]
            key = ".".join(map(str, err["loc"]))
            msg = "unknown key" if err["type"] == "extra_forbidden" else f"{err['msg']}; got {err.get('input')!r}"
            raise InputError(f"partition.{key}: {msg}") from None
        part.check(adapter)
    the_probe = cls(**params)
    the_probe.check(adapter)
    if part is not None and hasattr(the_probe, "use_partition"):
        the_probe.use_partition(part)  # one partition and one discovery, as in a plan
    items = _as_samples(samples, adapter)
    chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]

    def batches():
        for chunk in chunks:
            yield adapter.encode(chunk, padding_side=padding_side)

    # the runner's seeds: one before the fit passes, one per batch
    torch.manual_seed(seed)
    if part is not None and part.needs_fit:
        part.fit(adapter, batches())
    if the_probe.needs_fit:
        the_probe.fit(adapter, batches())
    sites = set(the_probe.sites(adapter)) | (set(part.sites(adapter)) if part is not None else set())
    sites = sorted(sites, key=lambda s: s.order_key())
    parts: dict[str, list] = {}
    offset = 0
    for b, chunk in enumerate(chunks):
        torch.manual_seed(seed * 1_000_003 + b)
        batch = adapter.encode(chunk, padding_side=padding_side)
        acts = collect(adapter, batch, sites)
        if part is not None:
            batch.groups = part.label(adapter, batch, acts=acts)
        for tname, rows in the_probe.update(adapter, batch, acts).items():
            if isinstance(rows, Tensors) or is_empty(rows):
                continue  # tensors are written by plans only (tensors/NAME/BATCH.safetensors)
            rows = dict(rows)
            if "sample" in rows:  # batch-local -> index in `samples`
                rows["sample"] = np.asarray(rows["sample"], dtype=np.int64) + offset
            parts.setdefault(tname, []).append(arrow_table(rows))
        offset += len(chunk)
    for tname, rows in the_probe.final_tables().items():
        if not is_empty(rows):
            parts.setdefault(tname, []).append(arrow_table(rows))
    written = list(parts)
    if table is None:
        if not written:
            raise InputError(f"{name} wrote no table on these samples (its output is a summary: {sorted(the_probe.result())}); "
                             "run it in a plan, embedlens.run({...}), and read results.summary")
        table = "tokens" if "tokens" in parts else written[0] if len(written) == 1 else None
        if table is None:
            raise InputError(f"{name} writes several tables ({', '.join(written)}); choose one with table=")
    elif table not in parts:
        raise InputError(f"table {table!r}: {name} wrote {', '.join(written) or 'no table'} on these samples")
    df = pa.concat_tables(parts[table], promote_options="permissive").to_pandas()
    df.attrs["result"] = json.loads(json.dumps(the_probe.result(), default=str))
    df.attrs["tables"] = written
    return df
