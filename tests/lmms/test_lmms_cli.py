"""`python -m lmms_eval` finds embedlens's local tasks with the --include_path docs/benchmarks-lmms.md gives."""

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
