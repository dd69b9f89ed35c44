"""The command line starts without torch, transformers or nnsight until a model or plugin needs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "transformers", "nnsight")
ROOT = Path(__file__).resolve().parents[1]


def _heavy_imported(args: list[str], cwd: Path) -> tuple[list[str], subprocess.CompletedProcess]:
    """Run the CLI in a fresh interpreter and report which heavy packages it imported."""
    code = (
        "import sys\n"
        "from embedlens.cli import main\n"
        f"sys.argv = ['embedlens', *{args!r}]\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        "else:\n"
        "    code = 0\n"
        f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
        "sys.exit(code)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    line = [x for x in proc.stdout.splitlines() if x.startswith("HEAVY=")][-1]
    return [m for m in line[len("HEAVY="):].split(",") if m], proc


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["validate", "--help"]])
def test_help_imports_nothing_heavy(args, tmp_path):
    heavy, proc = _heavy_imported(args, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Usage" in proc.stdout
    assert heavy == []


def test_plan_errors_before_the_model_import_nothing_heavy(tmp_path):
    heavy, proc = _heavy_imported(["validate", "missing.yaml"], tmp_path)
    assert proc.returncode == 2 and "plan file not found" in proc.stderr and heavy == []
    (tmp_path / "plan.yaml").write_text("model: {source: tiny:llava-clip}\nprobes: [{embedding_lens: {}}]\n")
    heavy, proc = _heavy_imported(["validate", "plan.yaml"], tmp_path)
    assert proc.returncode == 2 and "plan.yaml:1 data: required key is missing" in proc.stderr, proc.stderr
    assert heavy == []
    heavy, proc = _heavy_imported(["run", "plan.yaml"], tmp_path)
    assert proc.returncode == 2 and "data: required key is missing" in proc.stderr and heavy == []


def test_import_embedlens_is_light_and_names_load_on_use():
    code = (
        "import sys, embedlens\n"
        f"assert not [m for m in {HEAVY!r} if m in sys.modules], sys.modules.keys()\n"
        "assert embedlens.Site.parse('llm.layers[1]').layer == 1 and 'torch' not in sys.modules\n"
        "assert embedlens.probe_registry.get('embedding_lens').__name__ == 'EmbeddingLens'  # its module alone\n"
        "assert 'embedlens.probes.sink_detector' not in sys.modules and 'torch' not in sys.modules\n"
        "assert 'sink_detector' in embedlens.probe_registry  # listing imports every built-in\n"
        "assert 'embedlens.probes.sink_detector' in sys.modules\n"
        "assert callable(embedlens.collect) and 'torch' in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_new_imports_nothing_heavy_and_knows_the_builtin_names_from_the_source(tmp_path):
    """`embedlens new` reads the built-in names from the plugin modules' decorators: the same names the registries hold."""
    from embedlens.registry import interventions, metrics, probes
    from embedlens.scaffold import builtin_names

    for kind, registry in (("probe", probes), ("intervention", interventions), ("metric", metrics)):
        assert builtin_names(kind) == {n for n, c in registry.items() if c.__module__.startswith("embedlens.")}, kind
    heavy, proc = _heavy_imported(["new", "metric", "my_light_metric", "--dir", str(tmp_path)], tmp_path)
    assert proc.returncode == 0 and (tmp_path / "my_light_metric" / "pyproject.toml").is_file(), proc.stderr
    assert heavy == []
    heavy, proc = _heavy_imported(["new", "intervention", "prune", "--dir", str(tmp_path)], tmp_path)
    assert proc.returncode == 2 and "embedlens already has an intervention of that name" in proc.stderr and heavy == []


def test_the_stored_builtin_plugin_index_is_what_the_registries_hold():
    from embedlens.plugin_index import INDEX, index_text

    assert INDEX.read_text(encoding="utf-8") == index_text(), (
        "embedlens/resources/builtin_plugins.json is stale; regenerate it with: python -m embedlens.plugin_index")


def test_list_of_the_builtins_imports_nothing_heavy_and_shows_what_the_registries_hold(tmp_path):
    """Without third-party entry points (hidden here), `embedlens list` reads the stored index: no torch, and the
    lines are those the registries themselves give (rendered here from the imported classes)."""
    code = (
        "import sys\n"
        "from importlib import metadata\n"
        "real = metadata.entry_points\n"
        "metadata.entry_points = lambda **k: [] if k.get('group', '').startswith('embedlens') else real(**k)\n"
        "sys.argv = ['embedlens', 'list']\n"
        "from embedlens.cli import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    *lines, heavy = proc.stdout.splitlines()
    assert heavy == "HEAVY="
    from embedlens.registry import REGISTRIES, plugin_params, summary

    want = []
    for kind, reg in REGISTRIES.items():
        want.append(f"{kind}:")
        for name, cls in reg.items():
            if not cls.__module__.startswith("embedlens."):
                continue
            want.append(f"  {name:<18} {summary(cls)}")
            if kind == "adapters":
                want.append(f"  {'':<18} architectures: {', '.join(cls.architectures)}")
            else:
                want += [f"  {'':<18}   {p}" for p in plugin_params(cls)]
    assert lines == want
