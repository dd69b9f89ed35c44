"""Load and validate a YAML plan; every error names the file, line and key path."""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from embedlens.errors import EmbedLensError, PlanError
from embedlens.plan.overrides import apply_overrides, overridden
from embedlens.plan.schema import Plan
from embedlens.plan.selections import check_selections
from embedlens.plan.yaml_reader import MAX_ALIASES, MAX_DEPTH, MAX_NODES, MAX_PLAN_BYTES, _duplicate_key, _parse_yaml, read_utf8  # noqa: F401 - the limits stay importable from here
from embedlens.registry import plugin_params, probes


def _key_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class _Located:
    """Maps key paths of a YAML document to line numbers."""

    def __init__(self, node: yaml.Node | None):
        self.node = node

    def line(self, loc: tuple) -> int | None:
        node, best = self.node, None
        for part in loc:
            if node is None:
                break
            best = node.start_mark.line + 1
            if isinstance(node, yaml.MappingNode):
                found = None
                for k, v in node.value:
                    if k.value == part:
                        found = (k, v)
                        break
                if found is None:
                    return best
                best = found[0].start_mark.line + 1
                node = found[1]
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
                node = node.value[part]
                best = node.start_mark.line + 1
            else:
                return best
        return best if best is not None else (node.start_mark.line + 1 if node is not None else None)


class LoadedPlan:
    """A validated plan, with where it came from (for resolving relative paths and errors).

    `aliases` maps key paths of the expanded plan (after sweeps) to where they
    were written, so errors about a swept value point at the sweep line.
    """

    def __init__(self, plan: Plan, path: Path | None, located: _Located, base_dir: Path | None = None):
        self.plan = plan
        self.path = path
        self._located = located
        self._base_dir = base_dir
        self.aliases: dict[tuple, tuple] = {}
        self.overrides: dict[str, Any] = {}  # --set KEY=VALUE applied before validation: {dotted key: value}

    def written(self, loc: tuple) -> tuple:
        """Where an expanded key path was written in the file."""
        for n in range(len(loc), 0, -1):
            target = self.aliases.get(loc[:n])
            if target is not None:
                # a swept value is written in the sweep list: nothing below it to point at
                return target if target[0] == "sweep" else target + tuple(loc[n:])
        return loc

    @property
    def base_dir(self) -> Path:
        """The one folder every relative path of the plan is resolved from: the plan file's
        folder (a plan shared with its data runs anywhere); for a plan given as text, the
        ``base_dir`` it was loaded with, else the working directory."""
        if self._base_dir is not None:
            return self._base_dir
        return self.path.parent if self.path is not None else Path.cwd()

    def resolve(self, p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else self.base_dir / q

    def model_source(self, source: str) -> str:
        """``model.source`` with a local folder resolved from `base_dir`; ``zoo:``/``tiny:`` names and hub ids as written.

        A relative source is a folder when it exists under `base_dir` or is written
        as a path (``./ckpt``, ``../models/x``); otherwise it is a hub id (``org/name``).
        """
        if ":" in source.split("/", 1)[0]:  # zoo:NAME, tiny:NAME
            return source
        path = Path(source).expanduser()
        if path.is_absolute():
            return str(path)
        here = self.base_dir / path
        return str(here) if here.exists() or source.startswith(("./", "../")) else source

    @property
    def output_dir(self) -> Path:
        """``output.dir`` resolved from `base_dir` (the command line's ``--output`` is relative to the working directory instead)."""
        return self.resolve(self.plan.output.dir)

    def error(self, loc: tuple, message: str) -> PlanError:
        """A `PlanError` pointing at `loc` (a key path tuple) in the plan file."""
        loc = self.written(tuple(loc))
        by = overridden(loc, self.overrides)
        line = None if by is not None else self._located.line(loc)
        where = f"{self.path or '<plan>'}" + (f":{line}" if line else "") + (f" --set {by}:" if by is not None else "")
        return PlanError(f"{where} {_key_path(loc)}: {message}")


def _message(err: dict) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    got = err.get("input")
    if not isinstance(got, (dict, list)):
        return f"{msg}; got {got!r}"
    return msg


def _suggest(model: type[BaseModel], loc: tuple) -> str:
    """'Did you mean' for an unknown key, walking the schema to the right model."""
    cur: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(cur, "model_fields", {}).get(part)
        if field is None:
            return ""
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        cur = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if cur is None:
            return ""
    names = list(getattr(cur, "model_fields", {}))
    close = difflib.get_close_matches(str(loc[-1]), names, n=2)
    return (f". Did you mean: {', '.join(close)}?" if close else "") + f" Allowed keys: {', '.join(names)}"


def load_plan(path: str | Path | None = None, text: str | None = None, base_dir: str | Path | None = None,
              overrides: "list[str] | tuple[str, ...]" = ()) -> LoadedPlan:
    """Parse and validate a plan from a file (or from `text`).

    Checks that need no model happen here: schema, unknown keys, plugin names
    and parameter types, input files. Checks that need the model (layer
    ranges) run in `embedlens.plan.runner.prepare` after loading it.

    Relative paths in the plan (``data.prompts``, ``data.images``,
    ``data.dataset``, ``output.dir``) are relative to the plan file's folder;
    for `text`, to `base_dir` (default: the working directory). `overrides`
    (``["model.source=...", "batch_size=4"]``, see `embedlens.plan.overrides`)
    change keys before validation; ``loaded.overrides`` records them.

    Raises:
        PlanError: naming file, line and key path.
    """
    p = Path(path) if path is not None else None
    if p is not None:
        from embedlens.files import utf8_path

        utf8_path(p, "plan file", PlanError)  # relative paths in the plan, output.dir among them, start from its folder
    if text is None:
        if p is None or not p.is_file():
            raise PlanError(f"plan file not found: {p}")
        if p.stat().st_size > MAX_PLAN_BYTES:
            raise PlanError(f"{p}: the plan is {p.stat().st_size} bytes; plans are at most {MAX_PLAN_BYTES} bytes")
        text = read_utf8(p, PlanError)
    where = str(p or "<plan>")
    node, raw = _parse_yaml(text, where)
    located = _Located(node)
    dup = _duplicate_key(node)
    if dup is not None:
        line, path_, key, first = dup
        raise PlanError(f"{where}:{line} {path_}: duplicate key {key!r} (first given on line {first}); names must be unique")
    if raw is None:
        raise PlanError(f"{where}: the plan is empty")
    if not isinstance(raw, dict):
        raise PlanError(f"{where}:1: a plan must be a mapping of keys (model, data, probes, ...); got {type(raw).__name__}")
    applied = apply_overrides(raw, overrides) if overrides else {}
    try:
        plan = Plan.model_validate(raw)
    except ValidationError as e:
        errs = e.errors()
        first = errs[0]
        loc = tuple(first["loc"])
        msg = _message(first)
        if first["type"] == "value_error":
            msg = str(first["ctx"]["error"]) if "ctx" in first else msg.removeprefix("Value error, ")
            head, sep, rest = msg.partition(": ")
            if sep and head and " " not in head:  # "conditions.x: ..." names its own key
                loc = loc + tuple(head.split("."))
                msg = rest
        if first["type"] == "extra_forbidden":
            msg += _suggest(Plan, loc)
        line = located.line(loc)
        more = f" (and {len(errs) - 1} more problem(s))" if len(errs) > 1 else ""
        by = overridden(loc, applied)
        if by is not None:  # the file's line would point at what the override replaced
            raise PlanError(f"{where} --set {by}: {_key_path(loc)}: {msg}{more}") from None
        raise PlanError(f"{where}{':' + str(line) if line else ''} {_key_path(loc)}: {msg}{more}") from None
    loaded = LoadedPlan(plan, p, located, Path(base_dir).expanduser() if base_dir is not None else None)
    loaded.overrides = applied
    # the plan as written (comments kept): the report embeds it; with overrides, the plan as run
    loaded.text = text if not applied else (
        "# " + where + " with " + " ".join(f"--set {overridden(tuple(k.split('.')), applied)}" for k in applied) + "\n"
        + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))
    _check_names(loaded)
    _expand_sweeps(loaded)
    _check_plugins(loaded)
    _check_labels(loaded)
    _one_partition(loaded)
    check_selections(loaded)
    _check_files(loaded)
    return loaded


def _param_names(registry, name: str) -> set[str]:
    try:
        return {p.name for p in plugin_params(registry.get(name))}
    except EmbedLensError:
        return set()


def _fmt(v: Any) -> str:
    return v if isinstance(v, str) else yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def _expand_sweeps(loaded: LoadedPlan) -> None:
    """Replace each swept condition or probe by one copy per value (every combination for several keys).

    Keys are ``TARGET.PARAM``: TARGET is a condition name (its one
    intervention with PARAM), ``CONDITION.INTERVENTION``, an intervention name
    (every condition using it), ``*`` (every condition with an intervention
    taking PARAM: ``*.keep`` gives every token-reduction method the same
    budgets) or a probe name or label. Copies are named ``target[param=value]``.
    """
    from embedlens.registry import interventions

    plan = loaded.plan
    if not plan.sweep:
        return
    cond_sweeps: dict[str, list[tuple[int, str, list, str]]] = {}
    probe_sweeps: dict[int, list[tuple[str, list, str]]] = {}
    for key, values in plan.sweep.items():
        loc = ("sweep", key)
        target, dot, param = key.rpartition(".")
        if not dot or not target or not param:
            raise loaded.error(loc, "expected TARGET.PARAM (e.g. inject.layer, inject_at_layer.layer, embedding_lens.k)")
        if not values:
            raise loaded.error(loc, "needs at least one value")
        hits: list[tuple[str, Any]] = []
        cname, _, ivname = target.partition(".")
        if target == "*":  # every condition one of whose interventions takes PARAM (a budget for every method)
            for c, items in plan.conditions.items():
                idx = [i for i, iv in enumerate(items) if param in _param_names(interventions, iv.name)]
                if len(idx) > 1:
                    raise loaded.error(loc, f"condition {c!r} has several interventions with parameter {param!r}; sweep it with {c}.INTERVENTION.{param}")
                hits += [("condition", (c, i)) for i in idx]
            if not hits:
                raise loaded.error(loc, f"no condition has an intervention with parameter {param!r}")
        elif target in plan.conditions:
            idx = [i for i, iv in enumerate(plan.conditions[target]) if param in _param_names(interventions, iv.name)]
            if len(idx) > 1:
                raise loaded.error(loc, f"condition {target!r} has several interventions with parameter {param!r}; write {target}.INTERVENTION.{param}")
            if not idx:
                names = sorted({n for iv in plan.conditions[target] for n in _param_names(interventions, iv.name)})
                raise loaded.error(loc, f"no intervention of condition {target!r} has parameter {param!r}; parameters: {', '.join(names)}")
            hits.append(("condition", (target, idx[0])))
        elif ivname and cname in plan.conditions:
            idx = [i for i, iv in enumerate(plan.conditions[cname]) if iv.name == ivname]
            if not idx:
                raise loaded.error(loc, f"condition {cname!r} has no intervention {ivname!r}")
            hits += [("condition", (cname, i)) for i in idx]
        else:
            for c, items in plan.conditions.items():
                hits += [("condition", (c, i)) for i, iv in enumerate(items) if iv.name == target]
            hits += [("probe", j) for j, pr in enumerate(plan.probes) if target in (pr.label, pr.name)]
            if not hits:
                names = list(plan.conditions) + sorted({iv.name for items in plan.conditions.values() for iv in items}) + [
                    pr.label or pr.name for pr in plan.probes
                ]
                close = difflib.get_close_matches(target, names, n=2)
                hint = f" Did you mean: {', '.join(close)}?" if close else ""
                raise loaded.error(loc, f"{target!r} is not a condition, an intervention of one, or a probe of this plan.{hint} Targets: {', '.join(names)}")
        for kind, ref in hits:
            if kind == "condition":
                c, i = ref
                iv = plan.conditions[c][i]
                if param not in _param_names(interventions, iv.name):
                    raise loaded.error(loc, f"{iv.name} has no parameter {param!r}; parameters: {', '.join(sorted(_param_names(interventions, iv.name)))}")
                cond_sweeps.setdefault(c, []).append((i, param, values, key))
            else:
                pr = plan.probes[ref]
                if param not in _param_names(probes, pr.name):
                    raise loaded.error(loc, f"{pr.name} has no parameter {param!r}; parameters: {', '.join(sorted(_param_names(probes, pr.name)))}")
                probe_sweeps.setdefault(ref, []).append((param, values, key))

    import itertools

    new_conditions: dict[str, list] = {}
    for c, items in plan.conditions.items():
        if c not in cond_sweeps:
            new_conditions[c] = items
            continue
        axes = cond_sweeps[c]
        for combo in itertools.product(*[list(enumerate(vals)) for _, _, vals, _ in axes]):
            name = c + "[" + ",".join(f"{p}={_fmt(v)}" for (_, p, _, _), (_, v) in zip(axes, combo)) + "]"
            copy = [iv.model_copy(deep=True) for iv in items]
            loaded.aliases[("conditions", name)] = ("conditions", c)
            for (i, p, _, key), (j, v) in zip(axes, combo):
                copy[i].params[p] = v
                loaded.aliases[("conditions", name, i, "params", p)] = ("sweep", key, j)
            new_conditions[name] = copy
    new_probes = []
    for j, pr in enumerate(plan.probes):
        if j not in probe_sweeps:
            loaded.aliases[("probes", len(new_probes))] = ("probes", j)
            new_probes.append(pr)
            continue
        axes = probe_sweeps[j]
        for combo in itertools.product(*[list(enumerate(vals)) for _, vals, _ in axes]):
            label = (pr.label or pr.name) + "[" + ",".join(f"{p}={_fmt(v)}" for (p, _, _), (_, v) in zip(axes, combo)) + "]"
            copy = pr.model_copy(deep=True, update={"label": label})
            loaded.aliases[("probes", len(new_probes))] = ("probes", j)
            for (p, _, key), (k, v) in zip(axes, combo):
                copy.params[p] = v
                loaded.aliases[("probes", len(new_probes), "params", p)] = ("sweep", key, k)
            new_probes.append(copy)
    plan.conditions = new_conditions
    plan.probes = new_probes


def _check_names(loaded: LoadedPlan) -> None:
    """Names written in the plan that become file and folder names: probe labels and model keys (slugs)."""
    from embedlens.files import SLUG, is_safe_name

    for name in loaded.plan.models or {}:
        if not is_safe_name(str(name), SLUG):
            raise loaded.error(("models", name), f"model name {name!r} becomes a folder name: use letters, digits, '_', '-' and '.' "
                               "(not starting with '.', at most 100 characters)")
    for i, pr in enumerate(loaded.plan.probes):
        if pr.label is not None and not is_safe_name(pr.label, SLUG):
            raise loaded.error(("probes", i, "label"), f"label {pr.label!r} names this probe's tables, figures and folders: use letters, "
                               "digits, '_', '-' and '.' (not starting with '.', no '/', at most 100 characters)")


def _check_labels(loaded: LoadedPlan) -> None:
    """Labels after sweeps expand (``label[param=value]``) must still be one safe file name, and unique."""
    from embedlens.files import is_safe_name

    for i, pr in enumerate(loaded.plan.probes):
        if pr.label is not None and not is_safe_name(pr.label):
            raise loaded.error(("probes", i, "label"), f"a sweep value makes the label {pr.label!r}, which cannot be a file name "
                               "(it holds '/', '\\' or a control character, or is too long); sweep probes over numbers, lists or simple words")
    seen: dict[str, int] = {}
    for i, pr in enumerate(loaded.plan.probes):
        label = pr.label or pr.name
        if label in seen:
            raise loaded.error(
                ("probes", i, "label" if pr.label else "name"),
                f"two probes would write tables named {label!r} (probes[{seen[label]}] too); give one a different label",
            )
        seen[label] = i


def _check_plugins(loaded: LoadedPlan) -> None:
    from embedlens.registry import interventions, metrics

    plan = loaded.plan
    for i, spec in enumerate(plan.probes):
        _check_plugin(loaded, probes, ("probes", i), spec)
    for name, items in plan.conditions.items():
        for i, spec in enumerate(items):
            _check_plugin(loaded, interventions, ("conditions", name, i), spec)
    for i, spec in enumerate(plan.metrics):
        _check_plugin(loaded, metrics, ("metrics", i), spec)


#: Plugin parameters are checked against these bounds before any plugin sees them: numbers a plan can hold
#: but no probe, intervention or metric can use (``k: 1e30``, ``tau: nan``) are plan errors, not crashes.
MAX_PARAM_INT = 2**31 - 1
MAX_PARAM_DEPTH = 8
MAX_PARAM_ITEMS = 100_000


def _bad_value(value: Any, depth: int = 0) -> str | None:
    """Why a plugin parameter value is unusable (non-finite, too large, too deep), or None."""
    import math

    if depth > MAX_PARAM_DEPTH:
        return f"nested more than {MAX_PARAM_DEPTH} levels deep"
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return None if not isinstance(value, str) or len(value) <= 10_000 else "a string longer than 10000 characters"
    if isinstance(value, int):
        return None if abs(value) <= MAX_PARAM_INT else f"{value:.3g} is too large (at most {MAX_PARAM_INT})"
    if isinstance(value, float):
        if not math.isfinite(value):
            return f"{value} is not a finite number"
        return None if abs(value) <= 1e15 else f"{value:.3g} is too large (at most 1e15)"
    if isinstance(value, (list, tuple)):
        if len(value) > MAX_PARAM_ITEMS:
            return f"a list of more than {MAX_PARAM_ITEMS} items"
        return next((f"[{i}]: {r}" for i, v in enumerate(value) if (r := _bad_value(v, depth + 1))), None)
    if isinstance(value, dict):
        return next((f"{k}: {r}" for k, v in value.items() if (r := _bad_value(v, depth + 1))), None)
    return None


def _text_for_number(value: Any, coerced: Any) -> str | None:
    """The first string in `value` that validation turned into a number or a bool (``layers: ['1']``), or None."""
    if isinstance(value, str):
        return value if isinstance(coerced, (int, float, bool)) else None
    if isinstance(value, (list, tuple)) and isinstance(coerced, (list, tuple)) and len(value) == len(coerced):
        return next((t for v, c in zip(value, coerced) if (t := _text_for_number(v, c)) is not None), None)
    if isinstance(value, dict) and isinstance(coerced, dict):
        return next((t for k, v in value.items() if k in coerced and (t := _text_for_number(v, coerced[k])) is not None), None)
    return None


def _check_plugin(loaded: LoadedPlan, registry, loc: tuple, spec) -> None:
    """Name, parameter names and parameter types of one plugin entry, against its declared signature."""
    try:
        cls = registry.get(spec.name)
    except EmbedLensError as e:
        raise loaded.error((*loc, "name"), str(e)) from None
    params = {p.name: p for p in plugin_params(cls)}
    for key, value in spec.params.items():
        if key not in params:
            close = difflib.get_close_matches(key, list(params), n=2)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise loaded.error(
                (*loc, "params", key),
                f"{spec.name} has no parameter {key!r}.{hint} Parameters: {', '.join(map(str, params.values()))}",
            )
        bad = _bad_value(value)
        if bad is not None:
            raise loaded.error((*loc, "params", key), f"expected a usable value for {params[key].annotation}; {bad}")
        ann = typing.get_type_hints(cls.__init__).get(key, Any)
        try:
            coerced = TypeAdapter(ann).validate_python(value, strict=False)
        except ValidationError as e:
            raise loaded.error(
                (*loc, "params", key),
                f"expected {params[key].annotation}, got {value!r} ({e.errors()[0]['msg']})",
            ) from None
        text = _text_for_number(value, coerced)
        if text is not None:  # lax validation reads '1' as 1, but the plugin is given the value as written
            raise loaded.error((*loc, "params", key), f"expected {params[key].annotation}, got {value!r}: {text!r} is text "
                                                      "where a number or true/false belongs; write it without quotes")
    missing = [p.name for p in params.values() if p.required and p.name not in spec.params]
    if missing:
        raise loaded.error((*loc, "params"), f"{spec.name} needs parameter(s): {', '.join(missing)}")


def _check_files(loaded: LoadedPlan) -> None:
    data = loaded.plan.data
    base = f"(a relative path is relative to {'the plan file' + chr(39) + 's folder' if loaded.path is not None else 'the base folder'}, {loaded.base_dir})"
    if data.prompts is not None:
        prompts = loaded.resolve(data.prompts)
        if not prompts.is_file():
            raise loaded.error(("data", "prompts"), f"file not found: {prompts} {base}")
        if prompts.suffix.lower() not in (".jsonl", ".json", ".csv"):
            raise loaded.error(("data", "prompts"), f"expected a .jsonl or .csv file; got {prompts.name}")
        try:
            text = read_utf8(prompts, PlanError)
        except PlanError as e:
            raise loaded.error(("data", "prompts"), str(e)) from None
        if not text.strip():
            raise loaded.error(("data", "prompts"), f"{prompts} is empty: no samples")
    if data.images is not None and not loaded.resolve(data.images).is_dir():
        raise loaded.error(("data", "images"), f"folder not found: {loaded.resolve(data.images)} {base}")
    if data.dataset is not None and not loaded.resolve(data.dataset).exists():
        raise loaded.error(("data", "dataset"), f"data set folder not found: {loaded.resolve(data.dataset)} {base}")
    out = loaded.plan.output.dir
    if not out.strip():
        raise loaded.error(("output", "dir"), "is empty (''); give a folder for the run, e.g. runs/NAME")
    resolved = loaded.output_dir
    if resolved.exists() and not resolved.is_dir():
        raise loaded.error(("output", "dir"), f"{resolved} exists and is not a folder {base}")
    parent = next((p for p in resolved.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise loaded.error(("output", "dir"), f"{parent} is a file, so {resolved} cannot be created {base}")


def _one_partition(loaded: LoadedPlan) -> None:
    """One partition per plan: `token_partition` reads the `partition:` block, or, without one, defines it.

    A plan with a ``partition:`` block and a ``token_partition`` probe with
    parameters of its own is an error (the two could disagree); a plan without
    the block takes the probe's parameters as its partition, so conditions and
    every other probe use the same groups.
    """
    from embedlens.plan.schema import PartitionSpec

    plan = loaded.plan
    found = [(i, pr) for i, pr in enumerate(plan.probes) if pr.name == "token_partition"]
    if plan.partition is not None:
        for i, pr in found:
            if pr.params:
                key = next(iter(pr.params))
                raise loaded.error(
                    ("probes", i, "params", key),
                    "token_partition labels with the plan's partition: block (one partition per plan); "
                    f"set {key} there and give token_partition no parameters",
                )
        return
    if not found:
        return
    params_given = [(i, pr) for i, pr in found if pr.params]
    if len(params_given) > 1 or (params_given and len(found) > 1 and any(pr.params != params_given[0][1].params for _, pr in found)):
        i = params_given[-1][0]
        raise loaded.error(("probes", i), "a plan has one partition: give its settings once, in a partition: block, "
                           "and no parameters to token_partition")
    i, pr = params_given[0] if params_given else found[0]
    params = dict(pr.params)
    if params.get("discover") is None:
        params["discover"] = not params.get("anchors")
    try:
        plan.partition = PartitionSpec(**params)
    except Exception as e:  # pydantic's message, located at the probe's parameters
        raise loaded.error(("probes", i, "params"), f"not a valid partition: {e}") from None
    loaded.aliases[("partition",)] = ("probes", i, "params")
    for _, pr in found:
        pr.params = {}
