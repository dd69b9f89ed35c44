"""The plan reference (``docs/plan-reference.md``), generated from the schema and the built-in plugins.

Every key of the schema (`embedlens.plan.schema`) with its type, default,
bounds and description, then every built-in probe, intervention, metric and
adapter with its parameters (types and defaults from the constructor,
descriptions from the docstring's ``Args:``). ``embedlens docs plan-reference``
writes it; a test fails when the committed file differs.

Example:
    >>> text = plan_reference()
    >>> "| `batch_size` | int | `4` |" in text and "### `embedding_lens`" in text
    True
"""

from __future__ import annotations

import inspect
import re
import typing
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from embedlens.plan import schema

#: Schema sections, in the order a plan is usually written.
SECTIONS: tuple[tuple[str, type[BaseModel]], ...] = (
    ("Plan (top level)", schema.Plan),
    ("model / models.NAME", schema.ModelSpec),
    ("data", schema.DataSpec),
    ("data.synthetic", schema.SyntheticDataSpec),
    ("data.synthetic_video", schema.SyntheticVideoDataSpec),
    ("data.video", schema.VideoSpec),
    ("probes[i]", schema.ProbeSpec),
    ("conditions.NAME[i]", schema.InterventionSpec),
    ("metrics[i]", schema.MetricSpec),
    ("partition", schema.PartitionSpec),
    ("output", schema.OutputSpec),
    ("report", schema.ReportSpec),
)

PATHS = """\
## Paths

Every relative path in a plan file is relative to **the plan file's folder**:
`data.prompts`, `data.images`, `data.dataset`, `output.dir`, and `model.source`
when it is a local checkpoint folder (one that exists there, or is written as a
path: `./ckpt`, `../models/llava`; anything else is a hub id such as
`llava-hf/llava-1.5-7b-hf`). A plan shared
with its data (a folder holding `plan.yaml` and `data/`) runs the same from
anywhere, and writes its results next to itself. Image paths inside a prompts
file are relative to that file's folder (or to `data.images`); a record's
`video` (a file, or a list of frame files) must lie inside that folder. The command
line's `--output` is relative to the working directory, as any command-line
argument; so is `output=` of `embedlens.run`. A plan given to `embedlens.run`
as a dict resolves its paths from `base_dir=` (default: the working
directory). A path that does not exist is an error naming its key, the
resolved path and the folder it was resolved from.
"""


def _type(ann: Any) -> str:
    """A readable type: ``int | None``, ``'a' | 'b'``, ``list[int]``, ``ModelSpec``."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Annotated:  # the type; its validators are the schema's business
        return _type(args[0])
    if origin is typing.Literal:
        return " \\| ".join(repr(a) for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " \\| ".join(_type(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin).replace("typing.", ""))
        return f"{name}[{', '.join(_type(a) for a in args)}]"
    if ann is type(None):
        return "None"
    if isinstance(ann, type):
        return ann.__name__
    return str(ann).replace("typing.", "")


def _anchor(title: str) -> str:
    """GitHub's anchor for a ``### `title` `` heading."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def _value(v: Any) -> str:
    if v is None:
        return "`null`"
    if isinstance(v, BaseModel):
        v = v.model_dump()
    try:
        text = yaml.safe_dump(v, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()
    except yaml.YAMLError:
        text = repr(v)
    return f"`{text}`"


def _bounds(field: Any) -> str:
    out = []
    for m in field.metadata:
        for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "at least"), ("max_length", "at most")):
            if getattr(m, attr, None) is not None:
                out.append(f"{sym} {getattr(m, attr)}" + (" items" if "length" in attr else ""))
    return ", ".join(out)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def schema_section(title: str, model: type[BaseModel]) -> str:
    """One schema model as a Markdown table: key, type, default, description."""
    doc = inspect.getdoc(model) or ""
    lines = [f"### `{title}`", "", _cell(doc.split("\n\n")[0]), "", "| key | type | default | description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        if field.default_factory is not None:
            default = _value(field.default_factory())
        elif field.default is PydanticUndefined:
            default = "required"
        else:
            default = _value(field.default)
        desc = field.description or ""
        nested = [t for t, m in SECTIONS if m is not model and re.search(rf"\b{m.__name__}\b", _type(field.annotation))]
        if nested:
            see = "see " + ", ".join(f"[`{t}`](#{_anchor(t)})" for t in nested)
            desc = f"{desc}; {see}" if desc else see
        bounds = _bounds(field)
        if bounds:
            desc = f"{desc} ({bounds})" if desc else bounds
        lines.append(f"| `{name}` | {_type(field.annotation)} | {default} | {_cell(desc)} |")
    return "\n".join(lines) + "\n"


def docstring_args(obj: Any) -> dict[str, str]:
    """``name -> description`` from a Google-style ``Args:`` section (continuation lines joined)."""
    doc = inspect.getdoc(obj) or ""
    out: dict[str, str] = {}
    m = re.search(r"^Args:\n(.*?)(?:^\S|\Z)", doc, flags=re.S | re.M)
    if not m:
        return out
    current: list[str] | None = None
    for line in m.group(1).splitlines():
        head = re.match(r"^ {4}(\*{0,2}[A-Za-z_][\w, ]*?)(?: \(.*?\))?: (.*)$", line)
        if head:
            current = [head.group(2)]
            for name in head.group(1).split(","):
                out[name.strip().lstrip("*")] = current  # type: ignore[assignment]
        elif current is not None and line.strip():
            current.append(line.strip())
    return {k: " ".join(v) for k, v in out.items()}


def _builtin(cls: type) -> bool:
    """Shipped with embedlens (plugins installed from elsewhere and test plugins are left out of the committed file)."""
    return cls.__module__.startswith("embedlens.") and not getattr(cls, "registered_name", "").startswith("_")


def plugin_section(kind: str, registry: Any) -> str:
    from embedlens.registry import plugin_params, summary

    lines = [f"## {kind.capitalize()}", ""]
    for name, cls in registry.items():
        if not _builtin(cls):
            continue
        lines += [f"### `{name}`", "", _cell(summary(cls)), ""]
        if kind == "adapters":
            lines += [f"Architectures: {', '.join(f'`{a}`' for a in cls.architectures)}", ""]
            continue
        params = plugin_params(cls)
        if not params:
            lines += ["No parameters.", ""]
            continue
        args = docstring_args(cls)
        lines += ["| parameter | type | default | description |", "|---|---|---|---|"]
        for p in params:
            default = "required" if p.required else _value(p.default)
            lines.append(f"| `{p.name}` | {_cell(p.annotation)} | {default} | {_cell(args.get(p.name, ''))} |")
        lines.append("")
    return "\n".join(lines)


def plan_reference() -> str:
    """The whole reference as Markdown (deterministic: sorted plugins, no dates)."""
    from embedlens.registry import REGISTRIES

    parts = [
        "# Plan reference",
        "",
        "<!-- Generated by `embedlens docs plan-reference --output docs/plan-reference.md` from embedlens/plan/schema.py "
        "and the built-in plugins; do not edit by hand (tests/plan/test_reference.py fails when it is stale). -->",
        "",
        "Every key an analysis plan (YAML) may hold, then every built-in plugin with its parameters. Unknown keys are "
        "errors. Plugins from installed packages are listed by `embedlens list`.",
        "",
        PATHS,
        "## Plan keys",
        "",
    ]
    parts += [schema_section(title, model) for title, model in SECTIONS]
    for kind in ("probes", "interventions", "metrics", "adapters"):
        parts.append(plugin_section(kind, REGISTRIES[kind]))
    return "\n".join(parts).rstrip() + "\n"
