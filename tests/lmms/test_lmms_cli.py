"""`python -m lmms_eval` finds embedlens's local tasks with the --include_path docs/benchmarks-lmms.md gives, the reasons that page
gives for the flag hold for the installed lmms-eval, and its table of downloads is what lmms-eval's task files say."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.lmms._support import lmms_env  # noqa: F401 - a fixture

ROOT = Path(__file__).resolve().parents[2]


def test_the_documented_lmms_eval_command_finds_the_local_tasks(lmms_env, tmp_path):
    doc = (ROOT / "docs" / "benchmarks-lmms.md").read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", doc, re.S) if "--include_path" in b and "python -m lmms_eval" in b)
    command = block.replace("\\\n", " ")
    assert "--limit 8" in command and "--output_path runs/lmms" in command, command
    # as documented, fewer documents and into the test's folder
    command = command.replace("--limit 8", "--limit 1").replace("--output_path runs/lmms", f"--output_path {tmp_path / 'lmms'}")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (bin_dir / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(["bash", "-e", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Tasks not found" not in out, out[-3000:]
    rows = {line.split("|")[1].strip() for line in proc.stdout.splitlines() if line.startswith("|") and line.count("|") > 5}
    assert {"embedlens_synqa", "embedlens_pope_mc"} <= rows, proc.stdout[-3000:]


def test_why_the_tasks_need_the_flag_still_holds(lmms_env):
    """docs/benchmarks-lmms.md says why `--include_path` is needed in lmms-eval 0.7.3: task discovery reads no entry
    points, and LMMS_EVAL_PLUGINS reaches the include path only after the task index is built. Read from the installed
    lmms-eval, so the paragraph goes stale loudly when a release changes either."""
    import inspect

    import lmms_eval.__main__ as cli
    from lmms_eval.tasks import TaskManager

    assert "entry_points" not in inspect.getsource(TaskManager)
    body = inspect.getsource(cli.cli_evaluate_single)
    assert body.index("TaskManager(") < body.index("LMMS_EVAL_PLUGINS") < body.index("match_tasks(")
    assert "entry_points" not in body
    doc = (ROOT / "docs" / "benchmarks-lmms.md").read_text()
    assert "LMMS_EVAL_PLUGINS" in doc and "only *after* `cli_evaluate_single` has built its task index" in doc


def test_the_download_table_is_lmms_evals(lmms_env):
    """Each row of "Which benchmarks download what": the data set, its config, the split and whether a hub token is
    needed, as the installed lmms-eval's task YAML files say (includes followed, `!function` tags left unread)."""
    import lmms_eval
    import yaml

    tasks_dir = Path(lmms_eval.__file__).parent / "tasks"

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)

    def config(name: str) -> dict:
        path = next(p for p in tasks_dir.glob("*/*.yaml") if p.stem == name)
        cfg = yaml.load(path.read_text(), Loader=Loader)
        if "include" in cfg:
            cfg = {**yaml.load((path.parent / cfg["include"]).read_text(), Loader=Loader), **cfg}
        return cfg

    doc = (ROOT / "docs" / "benchmarks-lmms.md").read_text()
    section = doc.split("### Which benchmarks download what", 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("| `") and line.count("|") == 5]
    checked = 0
    for row in rows:
        names_cell, data_cell, split_cell, token_cell = (c.strip() for c in row.strip("|").split("|"))
        names = [n for n in re.findall(r"`([a-z0-9_]+)`", names_cell)]
        splits = re.findall(r"`([a-z_]+)`", split_cell)
        for name in names:
            cfg = config(name)
            assert f"`{cfg['dataset_path']}`" in data_cell, (name, cfg["dataset_path"])
            if cfg.get("dataset_name"):
                assert f"`{cfg['dataset_name']}`" in data_cell, (name, cfg["dataset_name"])
            assert cfg["test_split"].strip() in splits, (name, cfg["test_split"])
            token = bool((cfg.get("dataset_kwargs") or {}).get("token"))
            assert token_cell == ("yes" if token else "no"), (name, token)
            checked += 1
    assert checked == 11  # pope and its three splits, textvqa x2, mme, gqa, scienceqa_img, chartqa, docvqa_val
