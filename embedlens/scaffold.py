"""``embedlens new probe NAME`` / ``embedlens new intervention NAME``: a pip-installable plugin package to start from.

The package holds a ``pyproject.toml`` with the entry point embedlens loads
plugins through (group ``embedlens.probes`` / ``embedlens.interventions``,
entry-point name = the plugin's name in plans), the plugin module (a working
plugin: a probe that reads the norm of every visual token at one LLM layer,
or an intervention that scales selected tokens' input embeddings), a README
and a test that runs the public conformance check. It passes its own tests
unchanged.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> root = new_plugin("probe", "my_norms", Path(tempfile.mkdtemp()))
    >>> sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    ['README.md', 'my_norms/__init__.py', 'pyproject.toml', 'tests/test_my_norms.py']
"""

from __future__ import annotations

import keyword
import re
from pathlib import Path
from string import Template

from embedlens.errors import InputError

KINDS = ("probe", "intervention")
GROUPS = {"probe": "embedlens.probes", "intervention": "embedlens.interventions"}

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

[tool.setuptools]
packages = ["$name"]
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

_README = Template('''\
# $dist

$summary: an [embedlens](https://github.com/embedlens/embedlens) $kind plugin, registered as `$name`.

```bash
pip install -e .            # embedlens finds it through the "$group" entry point
embedlens list              # shows $name with its parameters
python -m pytest -q tests   # the public conformance check
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
        kind: "probe" or "intervention".
        name: the plugin's name (see `check_name`).
        parent: the folder to create the package in.

    Raises:
        InputError: unknown kind, bad name, a name embedlens already uses or that would shadow another
            module, `parent` not a folder or not writable, or ``parent/NAME`` already exists (it is never overwritten).
    """
    from embedlens.registry import interventions, probes

    if kind not in KINDS:
        raise InputError(f"KIND {kind!r}: expected one of {', '.join(KINDS)}")
    check_name(name)
    registry = probes if kind == "probe" else interventions
    if name in registry and registry.get(name).__module__.startswith("embedlens."):
        raise InputError(f"NAME {name!r}: embedlens already has a {kind} of that name; choose another")
    parent = Path(parent)
    if (parent.exists() or parent.is_symlink()) and not parent.is_dir():
        raise InputError(f"--dir {parent}: not a folder; expected a folder to create the package {name}/ in")
    root = parent / name
    if root.exists() or root.is_symlink():
        raise InputError(f"{root} already exists; embedlens new never overwrites a folder: choose another NAME or folder")
    cls = "".join(part.capitalize() for part in name.split("_") if part) or name.capitalize()
    summary = "Norm of every visual token at one LLM layer" if kind == "probe" else "Scale the input embeddings of selected image tokens"
    usage = (f"probes:\n  - name: {name}\n    params: {{layer: 1}}" if kind == "probe" else
             f"conditions:\n  halve_visual: [{{name: {name}, params: {{tokens: visual, factor: 0.5}}}}]\nmetrics: [{{name: next_token_kl}}]")
    fields = dict(name=name, cls=cls, kind=kind, group=GROUPS[kind], dist=f"embedlens-{name.replace('_', '-')}",
                  summary=summary, usage=usage)
    files = {
        "pyproject.toml": _PYPROJECT,
        f"{name}/__init__.py": _PROBE if kind == "probe" else _INTERVENTION,
        f"tests/test_{name}.py": _PROBE_TEST if kind == "probe" else _INTERVENTION_TEST,
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
