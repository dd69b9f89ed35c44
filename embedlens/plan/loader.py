"""Load and validate a YAML plan; every error names the file, line and key path."""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from embedlens.errors import EmbedLensError, PlanError
from embedlens.plan.schema import Plan
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
    """A validated plan, with where it came from (for resolving relative paths and errors)."""

    def __init__(self, plan: Plan, path: Path | None, located: _Located):
        self.plan = plan
        self.path = path
        self._located = located

    @property
    def base_dir(self) -> Path:
        return self.path.parent if self.path is not None else Path.cwd()

    def resolve(self, p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else self.base_dir / q

    def error(self, loc: tuple, message: str) -> PlanError:
        """A `PlanError` pointing at `loc` (a key path tuple) in the plan file."""
        line = self._located.line(loc)
        where = f"{self.path or '<plan>'}" + (f":{line}" if line else "")
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


def load_plan(path: str | Path | None = None, text: str | None = None) -> LoadedPlan:
    """Parse and validate a plan from a file (or from `text`).

    Checks that need no model happen here: schema, unknown keys, plugin names
    and parameter types, input files. Checks that need the model (layer
    ranges) run in `embedlens.plan.runner.prepare` after loading it.

    Raises:
        PlanError: naming file, line and key path.
    """
    p = Path(path) if path is not None else None
    if text is None:
        if p is None or not p.is_file():
            raise PlanError(f"plan file not found: {p}")
        text = p.read_text()
    where = str(p or "<plan>")
    try:
        node = yaml.compose(text)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise PlanError(f"{where}{line}: YAML syntax error: {problem}") from None
    located = _Located(node)
    if raw is None:
        raise PlanError(f"{where}: the plan is empty")
    if not isinstance(raw, dict):
        raise PlanError(f"{where}:1: a plan must be a mapping of keys (model, data, probes, ...); got {type(raw).__name__}")
    try:
        plan = Plan.model_validate(raw)
    except ValidationError as e:
        errs = e.errors()
        first = errs[0]
        loc = tuple(first["loc"])
        msg = _message(first)
        if first["type"] == "extra_forbidden":
            msg += _suggest(Plan, loc)
        line = located.line(loc)
        more = f" (and {len(errs) - 1} more problem(s))" if len(errs) > 1 else ""
        raise PlanError(f"{where}{':' + str(line) if line else ''} {_key_path(loc)}: {msg}{more}") from None
    loaded = LoadedPlan(plan, p, located)
    _check_plugins(loaded)
    _check_files(loaded)
    return loaded


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
        ann = typing.get_type_hints(cls.__init__).get(key, Any)
        try:
            TypeAdapter(ann).validate_python(value, strict=False)
        except ValidationError as e:
            raise loaded.error(
                (*loc, "params", key),
                f"expected {params[key].annotation}, got {value!r} ({e.errors()[0]['msg']})",
            ) from None
    missing = [p.name for p in params.values() if p.required and p.name not in spec.params]
    if missing:
        raise loaded.error((*loc, "params"), f"{spec.name} needs parameter(s): {', '.join(missing)}")


def _check_files(loaded: LoadedPlan) -> None:
    data = loaded.plan.data
    prompts = loaded.resolve(data.prompts)
    if not prompts.is_file():
        raise loaded.error(("data", "prompts"), f"file not found: {prompts}")
    if data.images is not None and not loaded.resolve(data.images).is_dir():
        raise loaded.error(("data", "images"), f"folder not found: {loaded.resolve(data.images)}")
