"""Checks every probe must pass, as a public function plugin authors run on their own probes.

Example (in a plugin's test suite)::

    from embedlens.testing.conformance import check_probe
    from my_plugin import MyProbe

    def test_my_probe_conforms():
        check_probe(MyProbe, params={"layer": 1})

`check_intervention` does the same for interventions (see its docstring).
`check_probe` runs the probe on every tiny model family with a batch of three
samples of different image sizes and prompt lengths, padded left and right,
checks that its state survives a checkpoint (`embedlens.state`), and fails with an `AssertionError` that names the probe, the family and the
check.
"""

from __future__ import annotations

import inspect
import json
import math
import tempfile
from pathlib import Path
from typing import Any

from embedlens.data import Sample
from embedlens.testing.images import noise, shapes

from embedlens.testing.tiny import TINY_SPECS

# Every tiny model: a family added to `TINY_SPECS` is checked without editing this file.
DEFAULT_FAMILIES = tuple(TINY_SPECS)


def conformance_samples(answers: bool = True) -> list[Sample]:
    """Three samples: different image sizes, prompt lengths, and per-patch ``colour`` annotations."""
    grids = [[["red" if (r + c + k) % 3 == 0 else "blue" for c in range(4)] for r in range(4)] for k in range(3)]
    specs = [
        (shapes(64, seed=1), "what is it?", "a red circle"),
        (noise(40, 70, seed=2), "what colour is the big square on the left?", "blue"),
        (shapes(48, seed=3), "count", "two"),
    ]
    return [
        Sample([im], question=q, answer=a if answers else None, id=f"c{i}", meta={"patch_labels": {"colour": grids[i]}})
        for i, (im, q, a) in enumerate(specs)
    ]


def _fail(where: str, msg: str) -> None:
    raise AssertionError(f"{where}: {msg}")


def _check_tables(where: str, tables: Any) -> None:
    if not isinstance(tables, dict):
        _fail(where, f"update() must return a dict of tables; got {type(tables).__name__}")
    for name, table in tables.items():
        lengths = {c: len(v) for c, v in table.items()}
        if len(set(lengths.values())) > 1:
            _fail(where, f"table {name!r} has columns of different lengths: {lengths}")


def _same(where: str, name: str, a: dict, b: dict, atol: float) -> None:
    """Per-row equality of two tables from the same samples padded differently (positions excepted)."""
    if list(a) != list(b):
        _fail(where, f"table {name!r} has different columns with left and right padding: {list(a)} vs {list(b)}")
    for col in a:
        if col == "position":
            continue
        if len(a[col]) != len(b[col]):
            _fail(where, f"table {name!r} column {col!r} has {len(a[col])} rows with left padding, {len(b[col])} with right")
        for i, (x, y) in enumerate(zip(a[col], b[col])):
            if isinstance(x, float) and isinstance(y, float):
                if not (math.isclose(x, y, rel_tol=1e-3, abs_tol=atol) or (math.isnan(x) and math.isnan(y))):
                    _fail(where, f"table {name!r} column {col!r} row {i} depends on padding: {x} vs {y}")
            elif x != y:
                _fail(where, f"table {name!r} column {col!r} row {i} depends on padding: {x!r} vs {y!r}")


def _check_state(where: str, cls: type, params: dict[str, Any], adapter, probe) -> None:
    """The probe's state survives a checkpoint: JSON + safetensors, loaded into a probe built from the same parameters."""
    from embedlens.state import CheckpointError, decode_state, encode_state

    try:
        meta, tensors = encode_state(probe, where)
        text = json.dumps(meta, allow_nan=False)
        fresh = cls(**params)
        fresh.check(adapter)
        decode_state(fresh, json.loads(text), tensors, where)
    except CheckpointError as e:
        _fail(where, f"its state cannot be checkpointed: {e}")
    again, tensors2 = encode_state(fresh, where)
    if again != meta or any(not tensors[k].equal(tensors2[k]) and not tensors[k].isnan().any() for k in tensors):
        _fail(where, "state_dict() -> load_state_dict() does not give the same state back")
    if json.dumps(fresh.result(), sort_keys=True, default=str) != json.dumps(probe.result(), sort_keys=True, default=str):
        _fail(where, "a probe loaded from its checkpointed state gives a different result()")


def check_probe(cls: type, params: dict[str, Any] | None = None, families: tuple[str, ...] = DEFAULT_FAMILIES,
                atol: float = 1e-4) -> None:
    """Run the conformance checks on probe class `cls` (see the module docstring).

    Args:
        cls: a `Probe` subclass.
        params: constructor parameters (default: ``cls.example_params``).
        families: tiny model families to run on.
        atol: absolute tolerance when comparing float columns across paddings.
    """
    from embedlens.adapters import load_model
    from embedlens.groups import Partition
    from embedlens.probes.base import Probe
    from embedlens.tracing import collect

    name = getattr(cls, "registered_name", cls.__name__)
    if not issubclass(cls, Probe):
        _fail(name, "a probe must subclass embedlens.probes.Probe")
    _check_docstring(cls, name)
    params = dict(getattr(cls, "example_params", {}) if params is None else params)
    for family in families:
        where = f"{name} on tiny:{family}"
        adapter = load_model(f"tiny:{family}")
        samples = conformance_samples()
        runs = {}
        for side in ("left", "right"):
            probe = cls(**params)
            probe.check(adapter)
            sites = probe.sites(adapter)
            batch = adapter.encode(samples, padding_side=side)
            if probe.needs_fit:
                probe.fit(adapter, [batch])
            tables = probe.update(adapter, batch, collect(adapter, batch, sites))
            _check_tables(where, tables)
            runs[side] = (probe, tables)
        for t in runs["left"][1]:
            _same(where, t, runs["left"][1][t], runs["right"][1].get(t, {}), atol)
        probe, first = runs["right"]
        # a second batch, now labelled by a partition: same tables and columns, groups taken from the batch
        part = Partition(anchors={"dead": [6, 7]}, vit_norm="sink")
        batch = adapter.encode(samples[:2], padding_side="left")
        acts = collect(adapter, batch, sorted(set(probe.sites(adapter)) | set(part.sites(adapter)), key=lambda s: s.order_key()))
        batch.groups = part.label(adapter, batch, acts=acts)
        second = probe.update(adapter, batch, acts)
        _check_tables(where, second)
        for t, table in second.items():
            if t in first and list(table) != list(first[t]):
                _fail(where, f"table {t!r} changed columns between batches: {list(first[t])} -> {list(table)}")
        try:
            json.dumps(probe.result())
        except (TypeError, ValueError) as e:
            _fail(where, f"result() is not JSON-serialisable: {e}")
        _check_tables(where, probe.final_tables())
        _check_state(where, cls, params, adapter, probe)
        with tempfile.TemporaryDirectory() as tmp:
            for kind, paths in (("figures", probe.figures(Path(tmp))), ("artifacts", probe.artifacts(Path(tmp)))):
                missing = [str(p) for p in paths if not Path(p).is_file()]
                if missing:
                    _fail(where, f"{kind}() returned paths that were not written: {missing}")


def _check_docstring(cls: type, name: str) -> None:
    from embedlens.registry import plugin_params

    doc = inspect.getdoc(cls) or ""
    if "Example" not in doc:
        _fail(name, "the class docstring needs an Example section")
    documented = [p.name for p in plugin_params(cls) if p.name not in doc]
    if documented:
        _fail(name, f"parameters {documented} are not described in the class docstring")


def check_intervention(cls: type, params: dict[str, Any] | None = None, families: tuple[str, ...] = DEFAULT_FAMILIES,
                       atol: float = 1e-4) -> None:
    """Run the conformance checks on intervention class `cls`.

    On every tiny family, with the three `conformance_samples` labelled by a
    partition (``dead``: anchors 6 and 7; ``sink``: ViT high norm), the
    intervention runs as a plan's condition does (its fit pass first when
    `needs_fit`, the baseline's groups and embeddings): each sample's
    next-token logits under the intervention must be finite and the same with
    left and right padding; its state must survive a checkpoint; and
    registering it must succeed (explicit typed parameters, `setup` defined).

    Example (in a plugin's test suite)::

        from embedlens.testing.conformance import check_intervention
        from my_plugin import ScaleVisual

        def test_scale_visual_conforms():
            check_intervention(ScaleVisual, params={"factor": 0.5})

    Args:
        cls: an `Intervention` subclass.
        params: constructor parameters (default: ``cls.example_params``).
        families: tiny model families to run on.
        atol: absolute tolerance on the logits across paddings (relative: 1e-3).
    """
    from embedlens.adapters import load_model
    from embedlens.groups import Partition
    from embedlens.interventions.base import Intervention
    from embedlens.interventions.condition import Condition
    from embedlens.interventions.engine import Engine
    import torch

    from embedlens.metrics.compare import prompt_only
    from embedlens.registry import interventions
    from embedlens.state import CheckpointError, decode_state, encode_state

    name = getattr(cls, "registered_name", "") or cls.__name__
    if not (isinstance(cls, type) and issubclass(cls, Intervention)):
        _fail(name, "an intervention must subclass embedlens.interventions.base.Intervention")
    _check_docstring(cls, name)
    try:
        interventions.fresh().add(name, cls)  # the checks registration makes, on a registry of its own
    except Exception as e:  # noqa: BLE001 - PluginError, named
        _fail(name, str(e))
    params = dict(getattr(cls, "example_params", {}) if params is None else params)
    for family in families:
        where = f"{name} on tiny:{family}"
        adapter = load_model(f"tiny:{family}")
        samples = prompt_only(conformance_samples())
        part = Partition(anchors={"dead": [6, 7]}, vit_norm="sink")
        effects = {}
        for side in ("left", "right"):
            iv = cls(**params)
            iv.check(adapter)
            cond = Condition("conformance", [iv])
            if cond.needs_fit:
                cond.fit(adapter, [adapter.encode(samples, padding_side=side)])
            engine = Engine(adapter)
            batch = adapter.encode(samples, padding_side=side)
            with torch.no_grad():
                base = engine.run(batch, groups=part)
                out = engine.run(batch, cond.interventions, condition=cond.name, groups=base.context.groups, embeds=base.context.embeds)
                effects[side] = (iv, out.last_logits().float().cpu())  # [samples, vocab]
        (_, left), (_, right) = effects["left"], effects["right"]
        for i, s in enumerate(samples):
            if not bool(torch.isfinite(left[i]).all()):
                _fail(where, f"the next-token logits of sample {s.id} are not finite")
            gap = float((left[i] - right[i]).abs().max())
            if not torch.allclose(left[i], right[i], rtol=1e-3, atol=atol):
                _fail(where, f"the next-token logits of sample {s.id} depend on padding (max difference {gap:.3g} left vs right)")
        iv = effects["right"][0]
        try:
            meta, tensors = encode_state(iv, where)
            fresh = cls(**params)
            decode_state(fresh, json.loads(json.dumps(meta, allow_nan=False)), tensors, where)
        except CheckpointError as e:
            _fail(where, f"its state cannot be checkpointed: {e}")
        if encode_state(fresh, where)[0] != meta:
            _fail(where, "state_dict() -> load_state_dict() does not give the same state back")
