"""``embedlens new probe|intervention|metric NAME``: a pip-installable plugin package to start from.

The package holds a ``pyproject.toml`` with the entry point embedlens loads
plugins through (group ``embedlens.probes`` / ``embedlens.interventions`` /
``embedlens.metrics``, entry-point name = the plugin's name in plans), the
plugin module under ``src/`` (a working plugin: a probe that reads the norm of
every visual token at one LLM layer, an intervention that scales selected
tokens' input embeddings, or a metric that says whether a condition keeps the
baseline's top next token), a README and tests. The src layout and the
pytest configuration in ``pyproject.toml`` make ``python -m pytest -q NAME``
(from the parent folder) and ``python -m pytest -q`` (inside it) import the
package, never the project folder of the same name; `next_steps` are the
commands ``embedlens new`` prints, and they pass as printed.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> root = new_plugin("probe", "my_norms", Path(tempfile.mkdtemp()))
    >>> sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    ['README.md', 'pyproject.toml', 'src/my_norms/__init__.py', 'tests/test_my_norms.py']
"""

from __future__ import annotations

import keyword
import re
import shlex
from pathlib import Path
from string import Template

from embedlens.errors import InputError

KINDS = ("probe", "intervention", "metric")
GROUPS = {"probe": "embedlens.probes", "intervention": "embedlens.interventions", "metric": "embedlens.metrics"}

_PYPROJECT = Template('''\
[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "$dist"
version = "0.1.0"
description = "$summary (an embedlens $kind plugin)"
requires-python = ">=3.10"
dependencies = ["embedlens"]

[project.optional-dependencies]
test = ["pytest>=8"]

# embedlens finds the plugin through this entry point; its name is the name plans use.
[project.entry-points."$group"]
$name = "$name:$cls"

# src layout: the project folder $name/ and the package src/$name/ cannot be confused on sys.path
[tool.setuptools]
package-dir = {"" = "src"}
packages = ["$name"]

# `python -m pytest -q` inside this folder, or `python -m pytest -q $name` next to it
[tool.pytest.ini_options]
testpaths = ["tests"]
pythonpath = ["src"]
''')

_PROBE = Template('''\
"""$summary: an embedlens probe plugin (see embedlens's docs/writing-a-probe.md)."""

from __future__ import annotations

from typing import Any

from embedlens.probes.base import Probe
from embedlens.registry import probes
from embedlens.sites import Site


@probes.register("$name")
class $cls(Probe):
    """Euclidean norm of every visual token at one LLM layer.

    Layer 0 is the LLM input (the projector output, site ``llm.embed``);
    layer l > 0 is the residual stream after decoder layer l - 1
    (``llm.layers[l-1]``).

    Args:
        layer: LLM layer to read (0 = the LLM input).

    Example:
        >>> $cls(layer=1).layer
        1
    """

    def __init__(self, layer: int = 0):
        self.layer = layer
        self.total = 0.0
        self.count = 0

    def check(self, adapter) -> None:
        n = adapter.n_llm_layers
        if not 0 <= self.layer <= n:
            from embedlens.errors import PlanError

            raise PlanError(f"$name.layer: layer {self.layer} is out of range for this model (0..{n})")

    def sites(self, adapter) -> list[Site]:
        return [Site("llm.embed") if self.layer == 0 else Site("llm.layers", self.layer - 1)]

    def update(self, adapter, batch, acts) -> dict[str, dict[str, list[Any]]]:
        hidden = acts[self.sites(adapter)[0]]  # [batch, seq, d]
        vt = batch.roles.visual_tokens()  # one entry per visual token: sample, position, image, tile, row, col
        norms = hidden[vt["sample"].to(hidden.device), vt["position"].to(hidden.device)].float().norm(dim=-1)  # [tokens]
        self.total += float(norms.sum())
        self.count += len(norms)
        rows: dict[str, list[Any]] = {
            "sample": vt["sample"].tolist(),
            "sample_id": [batch.samples[s].id for s in vt["sample"].tolist()],
        }
        for col in ("image", "tile", "row", "col", "position"):
            rows[col] = vt[col].tolist()
        rows["layer"] = [self.layer] * len(norms)
        rows["norm"] = norms.tolist()
        return {"tokens": rows}

    def result(self) -> dict[str, Any]:
        return {"layer": self.layer, "visual_tokens": self.count, "mean_norm": self.total / self.count if self.count else None}
''')

_INTERVENTION = Template('''\
"""$summary: an embedlens intervention plugin (see embedlens's docs/writing-an-intervention.md)."""

from __future__ import annotations

import torch

from embedlens.interventions.base import IfEmpty, Intervention, parse_selection, require_nonempty
from embedlens.interventions.select import SelectionSpec
from embedlens.registry import interventions


@interventions.register("$name")
class $cls(Intervention):
    """Scale the LLM-input embeddings of selected image tokens by a factor.

    Args:
        tokens: which tokens (a selection: ``visual``, ``dead``, ``visual and row < 4``, ...).
        factor: the multiplier (1 leaves the model unchanged, 0 zeroes the tokens).
        if_empty: ``error`` when a sample's selection is empty, or ``noop`` to leave it unchanged.

    Example:
        >>> $cls(tokens="visual", factor=0.5).factor
        0.5
    """

    def __init__(self, tokens: SelectionSpec = "visual", factor: float = 0.5, if_empty: IfEmpty = "error"):
        self.tokens = tokens
        self.factor = factor
        self.if_empty = if_empty
        self._selection = parse_selection(tokens, "tokens")

    def setup(self, ctx) -> None:
        mask = ctx.select(self._selection, within=ctx.roles.image_span & ctx.valid)  # [batch, seq]
        require_nonempty(ctx, mask, "tokens", self.tokens, self.if_empty, what="image")
        self._mask = mask

    def edit_embeds(self, ctx, embeds: torch.Tensor) -> torch.Tensor:
        scale = torch.where(self._mask, self.factor, 1.0).to(embeds.dtype)  # [batch, seq]
        return embeds * scale[..., None]

    def state_dict(self) -> dict:
        return {}  # nothing learned; the per-batch mask is rebuilt by setup
''')

_METRIC = Template('''\
"""$summary: an embedlens metric plugin (see embedlens's docs/writing-an-intervention.md, "Metrics")."""

from __future__ import annotations

from embedlens.metrics.base import Metric
from embedlens.registry import metrics


@metrics.register("$name")
class $cls(Metric):
    """Whether the baseline's top next token stays among the condition's top k (1.0 or 0.0 per sample).

    Args:
        k: how many of the condition's most likely next tokens to look in (1 = the top token must not change).

    Example:
        >>> $cls(k=5).k
        5
    """

    def __init__(self, k: int = 1):
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"$name.k: expected an integer >= 1, got {k!r}")
        self.k = k

    def compute(self, baseline, condition, samples):
        top = baseline.last_logits().argmax(-1)  # [batch]
        kept = (condition.last_logits().topk(self.k, dim=-1).indices == top[:, None]).any(-1)  # [batch]
        return {"top_kept": kept.double().cpu().tolist()}  # once per batch, as one list
''')

_PROBE_TEST = Template('''\
"""The plugin passes embedlens's public conformance checks and reads what it says it reads."""

import torch

from embedlens.testing.conformance import check_probe
from $name import $cls


def test_conforms():
    check_probe($cls, params={"layer": 1}, families=("llava-clip", "paligemma"))


def test_norms_match_the_hidden_states():
    """Against Hugging Face's own hidden states at the LLM input."""
    from embedlens.adapters import load_model
    from embedlens.testing.conformance import conformance_samples
    from embedlens.tracing import collect

    adapter = load_model("tiny:llava-clip")
    batch = adapter.encode(conformance_samples()[:2])
    probe = $cls(layer=0)
    rows = probe.update(adapter, batch, collect(adapter, batch, probe.sites(adapter)))["tokens"]
    with torch.no_grad():
        hidden = adapter.model(**batch.inputs, output_hidden_states=True).hidden_states[0]
    want = [float(hidden[s, p].norm()) for s, p in zip(rows["sample"], rows["position"])]
    assert torch.allclose(torch.tensor(rows["norm"]), torch.tensor(want), rtol=1e-4)
''')

_INTERVENTION_TEST = Template('''\
"""The plugin passes embedlens's public conformance checks and changes what it says it changes."""

import torch

from embedlens.testing.conformance import check_intervention
from $name import $cls


def test_conforms():
    check_intervention($cls, params={"tokens": "visual", "factor": 0.5}, families=("llava-clip", "paligemma"))


def test_factor_one_is_the_unmodified_model_and_zero_is_zero_ablation():
    """Against the unmodified run (factor 1) and embedlens's own zero ablation (factor 0)."""
    from embedlens.adapters import load_model
    from embedlens.interventions.engine import Engine
    from embedlens.registry import interventions
    from embedlens.testing.conformance import conformance_samples

    adapter = load_model("tiny:llava-clip")
    batch = adapter.encode(conformance_samples(answers=False)[:2], padding_side="left")
    engine = Engine(adapter)
    base = engine.run(batch).last_logits()
    same = engine.run(batch, [$cls(tokens="visual", factor=1.0)]).last_logits()
    assert torch.allclose(same, base, atol=1e-5)
    zero = engine.run(batch, [$cls(tokens="visual", factor=0.0)]).last_logits()
    ablated = engine.run(batch, [interventions.get("ablate")(tokens="visual", value="zero")]).last_logits()
    assert torch.allclose(zero, ablated, atol=1e-5) and not torch.allclose(zero, base, atol=1e-3)
''')

_METRIC_TEST = Template('''\
"""The metric is registered, validates its parameter, and agrees with the logits it reads."""

import pytest
import torch

from $name import $cls


def test_registered_and_validated():
    from embedlens.registry import metrics

    assert metrics.get("$name") is $cls
    with pytest.raises(ValueError, match="k"):
        $cls(k=0)


def test_against_the_logits():
    """The unmodified model keeps every top token; zero-ablating the image, checked against the logits themselves."""
    from embedlens.adapters import load_model
    from embedlens.interventions.engine import Engine
    from embedlens.registry import interventions
    from embedlens.testing.conformance import conformance_samples

    adapter = load_model("tiny:llava-clip")
    samples = conformance_samples(answers=False)
    batch = adapter.encode(samples, padding_side="left")
    engine = Engine(adapter)
    with torch.no_grad():
        base = engine.run(batch)
        same = engine.run(batch)
        ablated = engine.run(batch, [interventions.get("ablate")(tokens="visual", value="zero")])
    assert $cls(k=1).compute(base, same, samples)["top_kept"] == [1.0] * len(samples)
    for k in (1, 3):
        want = [float(int(base.last_logits()[i].argmax()) in ablated.last_logits()[i].topk(k).indices.tolist())
                for i in range(len(samples))]
        assert $cls(k=k).compute(base, ablated, samples)["top_kept"] == want
''')

_README = Template('''\
# $dist

$summary: an [embedlens](https://github.com/embedlens/embedlens) $kind plugin, registered as `$name`.

```bash
pip install -e ".[test]"    # embedlens finds it through the "$group" entry point
embedlens list              # shows $name with its parameters
python -m pytest -q         # its tests (the public conformance check for probes and interventions)
```

Use it in a plan:

```yaml
$usage
```
''')


def check_name(name: str) -> str:
    """A plugin name is its key in plans, its module and its entry point: a lower-case Python identifier.

    Raises:
        InputError: naming the name and what is expected.
    """
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name or "") or keyword.iskeyword(name):
        raise InputError(f"NAME {name!r}: expected a lower-case Python identifier (letters, digits, '_', starting with a letter, "
                         "not a Python keyword), e.g. token_norm; it becomes the plan key, the module and the entry point")
    if len(name) > 60:
        raise InputError(f"NAME {name!r}: at most 60 characters")
    clash = _shadows(name)
    if clash:
        raise InputError(f"NAME {name!r}: {clash}; installed, the plugin's package {name}/ would take the place of that "
                         f"import for every program in the environment. Choose a distinct name, e.g. my_{name}")
    return name


#: Folder names a project keeps for itself: a plugin package of that name would collide with them (the scaffold's own
#: ``tests/`` included) or, installed, shadow another project's folder of the same name on ``sys.path``.
GENERIC = frozenset({"tests", "test", "testing", "docs", "doc", "src", "lib", "bin", "build", "dist", "examples", "example",
                     "scripts", "data", "setup", "conftest", "site", "main", "utils", "plugins"})


def _shadows(name: str) -> str | None:
    """Why `name` cannot be a top-level package: embedlens itself, the standard library, an installed module, a generic folder."""
    import importlib.util
    import sys

    if name == "embedlens" or name.startswith("embedlens."):
        return "that is embedlens itself"
    if name in sys.stdlib_module_names or name in sys.builtin_module_names:
        return "a module of Python's standard library has that name"
    if name in GENERIC:
        return "that is a generic folder name (tests, docs, src, ...)"
    try:
        found = importlib.util.find_spec(name) is not None  # finds, does not import
    except (ImportError, ValueError):
        found = True
    if found:
        return "an installed module has that name"
    return None


def new_plugin(kind: str, name: str, parent: Path) -> Path:
    """Write the plugin package ``parent/NAME`` and return its folder.

    Args:
        kind: "probe", "intervention" or "metric".
        name: the plugin's name (see `check_name`).
        parent: the folder to create the package in.

    Raises:
        InputError: unknown kind, bad name, a name embedlens already uses or that would shadow another
            module, `parent` not a folder or not writable, or ``parent/NAME`` already exists (it is never overwritten).
    """
    if kind not in KINDS:
        raise InputError(f"KIND {kind!r}: expected one of {', '.join(KINDS)}")
    check_name(name)
    if name in builtin_names(kind):  # read from the source, not imported: `embedlens new` starts without torch
        raise InputError(f"NAME {name!r}: embedlens already has {'an' if kind[0] in 'aeiou' else 'a'} {kind} of that name; choose another")
    parent = Path(parent)
    if (parent.exists() or parent.is_symlink()) and not parent.is_dir():
        raise InputError(f"--dir {parent}: not a folder; expected a folder to create the package {name}/ in")
    root = parent / name
    if root.exists() or root.is_symlink():
        raise InputError(f"{root} already exists; embedlens new never overwrites a folder: choose another NAME or folder")
    cls = "".join(part.capitalize() for part in name.split("_") if part) or name.capitalize()
    summary = {"probe": "Norm of every visual token at one LLM layer", "intervention": "Scale the input embeddings of selected image tokens",
               "metric": "Whether a condition keeps the baseline's top next token"}[kind]
    usage = {"probe": f"probes:\n  - name: {name}\n    params: {{layer: 1}}",
             "intervention": f"conditions:\n  halve_visual: [{{name: {name}, params: {{tokens: visual, factor: 0.5}}}}]\n"
                             "metrics: [{name: next_token_kl}]",
             "metric": f"conditions:\n  no_image: [{{name: ablate, params: {{tokens: visual, value: zero}}}}]\n"
                       f"metrics: [{{name: {name}, params: {{k: 5}}}}]"}[kind]
    fields = dict(name=name, cls=cls, kind=kind, group=GROUPS[kind], dist=f"embedlens-{name.replace('_', '-')}",
                  summary=summary, usage=usage)
    files = {
        "pyproject.toml": _PYPROJECT,
        f"src/{name}/__init__.py": {"probe": _PROBE, "intervention": _INTERVENTION, "metric": _METRIC}[kind],
        f"tests/test_{name}.py": {"probe": _PROBE_TEST, "intervention": _INTERVENTION_TEST, "metric": _METRIC_TEST}[kind],
        "README.md": _README,
    }
    try:
        root.mkdir(parents=True)
    except OSError as e:
        raise InputError(f"--dir {parent}: cannot create {root} there ({e.strerror or e}); choose a folder you can write to") from None
    try:
        for rel, template in files.items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(template.substitute(fields), encoding="utf-8")
    except OSError as e:
        raise InputError(f"cannot write the package into {root} ({e.strerror or e}); what was written there is left as it is") from None
    return root


def builtin_names(kind: str) -> set[str]:
    """The names of embedlens's built-in plugins of `kind`, read from the ``@REGISTRY.register("name")`` decorators
    in the source of ``embedlens/probes/`` (``interventions/`` and ``reduction/``, ``metrics/``) without importing it
    (nor torch).

    Example:
        >>> {"embedding_lens", "sink_detector"} <= builtin_names("probe")
        True
    """
    import ast

    registry = {"probe": "probes", "intervention": "interventions", "metric": "metrics"}[kind]
    folders = {"intervention": ("interventions", "reduction")}.get(kind, (registry,))  # reduction/: token budgets
    names: set[str] = set()
    root = Path(__file__).resolve().parent
    for path in sorted(p for folder in folders for p in (root / folder).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            for deco in getattr(node, "decorator_list", ()) if isinstance(node, ast.ClassDef) else ():
                if (isinstance(deco, ast.Call) and isinstance(deco.func, ast.Attribute) and deco.func.attr == "register"
                        and isinstance(deco.func.value, ast.Name) and deco.func.value.id == registry
                        and deco.args and isinstance(deco.args[0], ast.Constant) and isinstance(deco.args[0].value, str)):
                    names.add(deco.args[0].value)
    return names


def next_steps(root: Path) -> list[str]:
    """The shell commands that install the package at `root` with its test extra, list it and run its tests, from
    the folder that holds it and from inside it: they pass pasted as they are (`embedlens new` prints them).

    Example:
        >>> print(next_steps(Path("token_norm"))[0])
        pip install -e './token_norm[test]'
    """
    root = Path(root)
    shown = root.as_posix() if root.is_absolute() or root.as_posix().startswith(".") else f"./{root.as_posix()}"
    return [f"pip install -e {shlex.quote(shown + '[test]')}", "embedlens list", f"python -m pytest -q {shlex.quote(shown)}",
            f"(cd {shlex.quote(shown)} && python -m pytest -q)"]
