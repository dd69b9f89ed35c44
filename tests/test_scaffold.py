"""`embedlens new`: the scaffolded plugin packages install, list, pass their own tests and run in a plan, as the
third-party example in examples/plugins does; names are validated and folders never overwritten."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from embedlens.cli import app

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "plugins" / "embedlens-patch-position"


def test_new_validates_the_name_and_never_overwrites(tmp_path):
    for bad in ("9lives", "Token-Norm", "class", "my plugin", ""):
        r = CliRunner().invoke(app, ["new", "probe", bad, "--dir", str(tmp_path)])
        assert r.exit_code == 2 and "expected a lower-case Python identifier" in r.output, (bad, r.output)
    r = CliRunner().invoke(app, ["new", "probe", "embedding_lens", "--dir", str(tmp_path)])
    assert r.exit_code == 2 and "embedlens already has a probe of that name" in r.output
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    r = CliRunner().invoke(app, ["new", "intervention", "mine", "--dir", str(tmp_path)])
    assert r.exit_code == 2 and "already exists; embedlens new never overwrites" in r.output
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # nothing written for the refused names


def _run(args: list[str], env: dict, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, args))}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_scaffolds_and_the_example_install_list_pass_their_tests_and_run_in_a_plan(tmp_path, pip_target):
    r = CliRunner().invoke(app, ["new", "probe", "demo", "--dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["new", "intervention", "demo_scale", "--dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    packages = [tmp_path / "demo", tmp_path / "demo_scale", EXAMPLE]
    # into a folder of its own, on the subprocesses' PYTHONPATH only: the venv is not modified
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--target", str(pip_target), "-q",
          *map(str, packages)], dict(os.environ), tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(pip_target), str(ROOT)]), "HF_HUB_OFFLINE": "1"}
    cli = [sys.executable, "-c", "from embedlens.cli import main; main()"]

    listed = _run([*cli, "list"], env, tmp_path).stdout
    for name, summary in (("demo", "Euclidean norm of every visual token"), ("demo_scale", "Scale the LLM-input embeddings"),
                          ("patch_position", "Cross-validated R^2 of a ridge regression")):
        line = next((x for x in listed.splitlines() if x.split()[:1] == [name]), "")
        assert summary in line, listed
    assert "FAILED TO LOAD" not in listed

    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # the example's own tests (the scaffolds': the next test)
    out = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(tmp_path / "pytest.ini"),
                "--rootdir", str(tmp_path), str(EXAMPLE / "tests")], env, tmp_path).stdout
    assert "3 passed" in out, out

    (tmp_path / "plan.yaml").write_text(
        "model: {source: tiny:llava-clip}\n"
        "data: {synthetic: {n: 4, size: 32}}\n"
        "probes:\n  - {name: demo, params: {layer: 1}}\n  - {name: patch_position, params: {layers: [0, 1]}}\n"
        "conditions:\n  halve: [{name: demo_scale, params: {tokens: visual, factor: 0.5}}]\n"
        "metrics: [{name: next_token_kl}]\n"
        "output: {dir: out, figures: false, report: false}\nbatch_size: 2\n")
    _run([*cli, "run", "plan.yaml", "-q"], env, tmp_path)
    import pyarrow.parquet as pq

    out_dir = tmp_path / "out"
    norms = pq.read_table(out_dir / "demo.tokens.parquet").to_pydict()
    assert len(norms["norm"]) == 4 * 16 and min(norms["norm"]) > 0 and set(norms["layer"]) == {1}
    layers = pq.read_table(out_dir / "patch_position.layers.parquet").to_pydict()
    assert layers["layer"] == [0, 1] and layers["n_tokens"] == [64, 64]
    effects = pq.read_table(out_dir / "effects.parquet").to_pydict()
    assert set(effects["condition"]) == {"halve"} and all(v > 0 for v in effects["kl"])


def test_the_install_guard_allows_only_the_temporary_target(tmp_path, pip_target):
    import pytest

    for args in ([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--target", str(tmp_path / "other"), "x"],
                 [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--target", str(pip_target), "x"],  # deps would come
                 [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "x"],  # into the venv
                 f"{sys.executable} -m pip install --no-deps --no-build-isolation --target {pip_target} x"):
        with pytest.raises(AssertionError, match="a package install was attempted at run time"):
            subprocess.Popen(args)


def _shim(bin_dir: Path) -> None:
    """`python` and `embedlens` on PATH as a user's shell has them: this interpreter, this checkout."""
    bin_dir.mkdir()
    for name, cmd in (("python", f'exec {sys.executable} "$@"'),
                      ("embedlens", f'exec {sys.executable} -c "from embedlens.cli import main; main()" "$@"')):
        (bin_dir / name).write_text(f"#!/bin/sh\n{cmd}\n")
        (bin_dir / name).chmod(0o755)


def test_the_printed_next_steps_pass_pasted_into_a_shell(tmp_path, pip_target):
    """For each kind: `embedlens new` in a shell, then its printed commands pasted as they are. The one line that
    would reach the network or change the environment, `pip install -e './NAME[test]'`, runs as the guarded
    `--no-deps --target` install of the same folder (and its [test] extra is checked to bring pytest); the rest
    (`embedlens list`, the tests from the parent folder and from inside the package) run verbatim."""
    import shlex
    import tomllib

    _shim(tmp_path / "bin")
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(pip_target), str(ROOT)]), "PYTEST_ADDOPTS": "-p no:cacheprovider -p no:xdist"}
    work = tmp_path / "work"
    work.mkdir()
    steps = {}
    for kind, name in (("probe", "my_norms"), ("intervention", "my_scale"), ("metric", "my_top_kept")):
        out = _run(["bash", "-c", f"embedlens new {kind} {name}"], env, work).stdout.splitlines()
        assert out[0] == f"wrote {name}; next, from this folder:", out
        steps[name] = [line.strip() for line in out[1:]]
        install = steps[name][0]
        assert shlex.split(install) == ["pip", "install", "-e", f"./{name}[test]"], install
        extras = tomllib.loads((work / name / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
        assert any(x.startswith("pytest") for x in extras), extras
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--target", str(pip_target), "-q",
          *(f"./{n}" for n in steps)], env, work)
    for name, lines in steps.items():
        assert lines[1:] == ["embedlens list", f"python -m pytest -q ./{name}", f"(cd ./{name} && python -m pytest -q)"], lines
        proc = subprocess.run(["bash", "-e", "-c", "\n".join(lines[1:])], env=env, cwd=work, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, f"{name}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        listed = [x for x in proc.stdout.splitlines() if x.split()[:1] == [name]]
        assert listed and "FAILED" not in listed[0], proc.stdout
        # both pytest runs collected the package's own tests and passed them all
        assert [x.split(" in ")[0] for x in proc.stdout.splitlines() if " passed" in x or " failed" in x] == ["2 passed"] * 2, proc.stdout
