"""How a run lives on disk: per-batch part files, atomic writes, the gathered tables.

Each batch's tables go to ``parts/TABLE/BATCH.parquet`` and its tensors to
``tensors/NAME/BATCH.safetensors``; `Parts.gather` turns the parts into one
Parquet (and/or CSV) file per table when the run ends.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from embedlens.errors import EmbedLensError

#: The running state of an unfinished run (see `embedlens.plan.runner`).
CHECKPOINT = "checkpoint.pkl"
PARTS = "parts"
#: Files whose content legitimately differs between two runs of the same plan (timings, resume history).
VOLATILE = ("run_log.json",)


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class Parts:
    """Per-batch part files: ``parts/TABLE/000012.parquet`` and ``tensors/NAME/000012.safetensors``."""

    def __init__(self, out: Path):
        self.out = out

    def table(self, name: str, table: dict[str, list], index: int) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not table or not next(iter(table.values()), None):
            return
        lengths = {k: len(v) for k, v in table.items()}
        if len(set(lengths.values())) != 1:
            raise EmbedLensError(f"table {name!r}: columns have different lengths {lengths}")
        folder = self.out / PARTS / name
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{index:06d}.parquet"
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(pa.table({k: _plain(v) for k, v in table.items()}), tmp)
        os.replace(tmp, path)

    def tensors(self, name: str, tensors: dict[str, torch.Tensor], index: int) -> None:
        from safetensors.torch import save

        folder = self.out / "tensors" / name
        folder.mkdir(parents=True, exist_ok=True)
        data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata={"batch": str(index)})
        atomic_write(folder / f"{index:06d}.safetensors", data)

    def drop_from(self, index: int) -> None:
        """Remove parts of batches >= index (the batch in flight when a run was killed)."""
        for root in (self.out / PARTS, self.out / "tensors"):
            if not root.is_dir():
                continue
            for f in root.glob("*/*"):
                stem = f.name.split(".")[0]
                if f.name.endswith(".tmp") or (stem.isdigit() and int(stem) >= index):
                    f.unlink()

    def gather(self, formats: list[str]) -> dict[str, Path]:
        """One file per table from its parts, in batch order; returns table -> main file."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        out: dict[str, Path] = {}
        root = self.out / PARTS
        if not root.is_dir():
            return out
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            files = sorted(folder.glob("*.parquet"))
            if not files:
                continue
            table = pa.concat_tables([pq.read_table(f) for f in files], promote_options="permissive")
            name = folder.name
            if "parquet" in formats:
                pq.write_table(table, self.out / f"{name}.parquet")
                out[name] = self.out / f"{name}.parquet"
            if "csv" in formats:
                _write_csv(table, self.out / f"{name}.csv")
                out.setdefault(name, self.out / f"{name}.csv")
        shutil.rmtree(root)
        return out


def _plain(values: list) -> list:
    """Python scalars for Arrow (numpy / torch scalars in a column become int / float / bool)."""
    out = []
    for v in values:
        if hasattr(v, "item") and not isinstance(v, (list, dict, str)):
            try:
                v = v.item()
            except (ValueError, RuntimeError):
                v = v.tolist()
        out.append(v)
    return out


def _write_csv(table, path: Path) -> None:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(table.column_names)
    cols = [c.to_pylist() for c in table.columns]
    for row in zip(*cols):
        w.writerow(["" if v is None else json.dumps(v) if isinstance(v, (list, dict)) else v for v in row])
    path.write_text(buf.getvalue())


def clear_run(out: Path) -> None:
    """Remove what an earlier run wrote in `out`: only files its manifest lists and embedlens's own names."""
    old = out / "manifest.json"
    if old.is_file():
        try:
            listed = json.loads(old.read_text())
        except json.JSONDecodeError:
            listed = {}
        for rel in list((listed.get("tables") or {}).values()) + list(listed.get("figures") or []) + list(listed.get("artifacts") or []):
            for f in {out / rel, (out / rel).with_suffix(".csv"), (out / rel).with_suffix(".parquet")}:
                if f.is_file() and out.resolve() in f.resolve().parents:
                    f.unlink()
    for name in (CHECKPOINT, "summary.json", "manifest.json", "run_log.json", "report.html"):
        (out / name).unlink(missing_ok=True)
    for name in (PARTS, "tensors"):
        if (out / name).is_dir():
            shutil.rmtree(out / name)
