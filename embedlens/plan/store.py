"""How a run lives on disk: an owned, locked folder; per-batch part files; atomic writes; the gathered tables.

A run folder is owned: `claim` writes the marker ``.embedlens-run`` into an
empty (or new) folder first, and refuses a non-empty folder without it, so
embedlens never reads, overwrites or deletes what it did not write. `RunLock`
holds an exclusive ``flock`` on ``.embedlens-lock`` for the life of a run; a
second run into the folder is refused and told who holds it.

Each batch's tables go to ``parts/TABLE/BATCH.parquet`` and its tensors to
``tensors/NAME/BATCH.safetensors``; `Parts.gather` writes one Parquet (and/or
CSV) file per table when the run ends. Parts are removed only after the
checkpoint (``checkpoint.safetensors``), so every state a kill can leave
resumes to the same bytes.
"""

from __future__ import annotations

import io
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from embedlens.errors import EmbedLensError
from embedlens.files import LOCK, MARKER, RunFolderError, RunLock, claim, check_output, safe_dir, write_bytes, write_text  # noqa: F401

#: The running state of an unfinished run: JSON in a safetensors file (see `embedlens.plan.checkpoint`).
CHECKPOINT = "checkpoint.safetensors"
PARTS = "parts"
#: Files whose content legitimately differs between two runs of the same plan (timings, resume history).
VOLATILE = ("run_log.json", MARKER, LOCK)
#: Files a run writes at the top of its folder (tables are listed by its manifest).
RUN_FILES = (CHECKPOINT, "summary.json", "manifest.json", "run_log.json", "report.html", "compare.csv", "compare.html", "run_plan.yaml")
_PART_NAME = re.compile(r"^\.?\d{6}\.(parquet|safetensors)(\.\d+)?(\.tmp)?$|^\.\d{6}\.(parquet|safetensors)\.\d+\.tmp$")


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` atomically without following links (see `embedlens.files.write_bytes`)."""
    write_bytes(path, data)


#: Where rank N of a data-parallel run writes its own parts: ``OUT/ranks/rank-N`` (claimed and locked by that rank).
RANKS = "ranks"


def shard_dir(out: Path, rank: int) -> Path:
    """Rank `rank`'s own folder inside the run folder (rank 0 uses the run folder itself)."""
    return Path(out) if rank == 0 else Path(out) / RANKS / f"rank-{rank}"


class Parts:
    """Per-batch part files: ``parts/TABLE/000012.parquet`` and ``tensors/NAME/000012.safetensors``.

    Args:
        out: the folder written to (the run folder, or a rank's own folder).
        shards: the other ranks' folders whose parts `gather` reads too (data-parallel runs;
            a batch's part is in exactly one of them).
    """

    def __init__(self, out: Path, shards: list[Path] | None = None):
        self.out = out
        self.shards = list(shards or [])

    def table(self, name: str, table: dict[str, list], index: int) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if is_empty(table):
            return
        lengths = {k: len(v) for k, v in table.items()}
        if len(set(lengths.values())) != 1:
            raise EmbedLensError(f"table {name!r}: columns have different lengths {lengths}")
        folder = safe_dir(self.out, Path(PARTS) / name)
        buf = io.BytesIO()
        pq.write_table(arrow_table(table), buf)
        write_bytes(folder / f"{index:06d}.parquet", buf.getvalue())

    def tensors(self, name: str, tensors: dict[str, torch.Tensor], index: int) -> None:
        from safetensors.torch import save

        folder = safe_dir(self.out, Path("tensors") / name)
        data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata={"batch": str(index)})
        atomic_write(folder / f"{index:06d}.safetensors", data)

    def drop_from(self, index: int) -> None:
        """Remove parts of batches >= index (the batch in flight when a run was killed)."""
        for root in (self.out / PARTS, self.out / "tensors"):
            if not root.is_dir() or root.is_symlink():
                continue
            for f in root.glob("*/*"):
                stem = f.name.lstrip(".").split(".")[0]
                if f.name.endswith(".tmp") or (stem.isdigit() and int(stem) >= index):
                    f.unlink()

    def read(self, name: str):
        """The parts of one table so far (the run's and, in a data-parallel run, every rank's), concatenated in
        batch order (a `pyarrow.Table`), or None."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        roots = [r / PARTS / name for r in (self.out, *self.shards)]
        files = sorted((f for folder in roots if folder.is_dir() and not folder.is_symlink()
                        for f in folder.glob("*.parquet") if not f.is_symlink()), key=lambda f: f.name)
        return pa.concat_tables([pq.read_table(f) for f in files], promote_options="permissive") if files else None

    def gather(self, formats: list[str]) -> dict[str, Path]:
        """One file per table from its parts, in batch order; returns table -> main file.

        The parts stay until `remove` (after the checkpoint is gone), so a run killed
        while it finishes gathers the same tables again when it resumes.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        out: dict[str, Path] = {}
        roots = [r / PARTS for r in (self.out, *self.shards) if (r / PARTS).is_dir() and not (r / PARTS).is_symlink()]
        names = sorted({p.name for root in roots for p in root.iterdir() if p.is_dir() and not p.is_symlink()})
        for name in names:
            files = sorted((f for root in roots for f in (root / name).glob("*.parquet") if not f.is_symlink()), key=lambda f: f.name)
            if not files:
                continue
            table = pa.concat_tables([pq.read_table(f) for f in files], promote_options="permissive")
            if "parquet" in formats:
                buf = io.BytesIO()
                pq.write_table(table, buf)
                write_bytes(self.out / f"{name}.parquet", buf.getvalue())
                out[name] = self.out / f"{name}.parquet"
            if "csv" in formats:
                _write_csv(table, self.out / f"{name}.csv")
                out.setdefault(name, self.out / f"{name}.csv")
        return out

    def remove(self) -> None:
        """Delete ``parts/`` (only the part files embedlens writes there, never through links), the shards' too."""
        for root in (self.out, *self.shards):
            _remove_tree(root / PARTS)


def remove_shards(out: Path) -> None:
    """Remove ``OUT/ranks/``: each rank folder's marker, lock, emptied parts and offload files, then the folders.

    Called by rank 0 once every rank has finished and let go of its lock; anything
    that is not embedlens's stays (with its folder).
    """
    from embedlens.files import LOCK, MARKER

    root = Path(out) / RANKS
    if root.is_symlink():
        root.unlink()
        return
    if not root.is_dir():
        return
    for sub in sorted(root.iterdir()):
        if sub.is_symlink() or not sub.is_dir() or not re.fullmatch(r"rank-\d+", sub.name):
            continue
        _remove_tree(sub / PARTS)
        _remove_tree(sub / "tensors")
        remove_offload(sub)
        for name in (MARKER, LOCK):
            p = sub / name
            if p.is_symlink() or p.is_file():
                p.unlink()
        try:
            sub.rmdir()
        except OSError:
            pass
    try:
        root.rmdir()
    except OSError:
        pass


def release_shard(own: Path) -> None:
    """Remove a rank's own folder (``ranks/rank-N``) when it holds nothing but its marker and lock: a run refused
    before it wrote anything leaves no folder behind (one holding an earlier run's parts stays as it is)."""
    from embedlens.files import LOCK, MARKER

    own = Path(own)
    if own.is_symlink() or not own.is_dir() or own.parent.name != RANKS or not re.fullmatch(r"rank-\d+", own.name):
        return
    if sorted(os.listdir(own)) != sorted([LOCK, MARKER]):
        return
    for name in (LOCK, MARKER):
        (own / name).unlink()
    try:
        own.rmdir()
    except OSError:
        pass


#: Modules a device map sends to ``disk`` are offloaded by accelerate into ``OUT/offload`` (these names only).
OFFLOAD = "offload"
_OFFLOAD_NAME = re.compile(r"^[A-Za-z0-9_.\-]+\.dat$|^index\.json$")


def offload_dir(run_dir: Path) -> Path:
    """The folder accelerate offloads ``disk`` modules into, inside the run folder."""
    return safe_dir(Path(run_dir), OFFLOAD)


def remove_offload(run_dir: Path) -> None:
    """Delete the offloaded weights (accelerate's ``*.dat`` and ``index.json``) and the folder, never through links."""
    root = Path(run_dir) / OFFLOAD
    if root.is_symlink():
        root.unlink()
        return
    if not root.is_dir():
        return
    for f in os.scandir(root):
        if f.is_symlink() or (f.is_file(follow_symlinks=False) and _OFFLOAD_NAME.match(f.name)):
            os.unlink(f.path)
    try:
        os.rmdir(root)
    except OSError:
        pass


def is_empty(table: dict) -> bool:
    """No columns, or no rows (columns are lists, numpy arrays or tensors)."""
    return not table or len(next(iter(table.values()))) == 0


def arrow_column(values):
    """One table column as an Arrow array, from a whole numpy array or tensor at once (or a list).

    Arrays keep the schema a list of Python scalars gave: integers int64, floats
    float64 (a float32 tensor's values widen exactly, as ``.tolist()`` did),
    booleans bool, strings string.
    """
    import torch
    import numpy as np
    import pyarrow as pa

    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    if isinstance(values, np.ndarray) and values.ndim == 1:
        if values.dtype.kind == "f":
            return pa.array(values.astype(np.float64, copy=False))
        if values.dtype.kind in "iu":
            return pa.array(values.astype(np.int64, copy=False))
        if values.dtype.kind == "b":
            return pa.array(values)
        if values.dtype.kind in "UO":
            values = values.tolist()  # str (and None) objects: Arrow infers string, as from a list
    return pa.array(_plain(values))


def arrow_table(table: dict):
    """A `pyarrow.Table` from columns (lists, 1-D numpy arrays or tensors), column by column."""
    import pyarrow as pa

    return pa.table({k: arrow_column(v) for k, v in table.items()})


def _plain(values: list) -> list:
    """Python scalars for Arrow (numpy / torch scalars in a column become int / float / bool)."""
    import torch

    if isinstance(values, torch.Tensor):
        return values.detach().cpu().tolist()
    if hasattr(values, "dtype") and hasattr(values, "tolist"):  # a numpy array: its scalars, in one call
        return values.tolist()
    if all(v is None or type(v) in (int, float, str, bool) for v in values):
        return list(values)
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
    write_text(path, buf.getvalue())


def _remove_tree(root: Path, names: re.Pattern | None = _PART_NAME) -> None:
    """Remove ``root/NAME/FILE`` part files matching `names` and then the emptied folders; links are unlinked, never followed."""
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        os.unlink(root)  # removes the link itself; what it points to is untouched
        return
    if not stat.S_ISDIR(st.st_mode):
        return
    for sub in os.scandir(root):
        if sub.is_symlink():
            os.unlink(sub.path)
            continue
        if not sub.is_dir(follow_symlinks=False):
            continue
        for f in os.scandir(sub.path):
            if f.is_symlink() or (f.is_file(follow_symlinks=False) and (names is None or names.match(f.name))):
                os.unlink(f.path)
        try:
            os.rmdir(sub.path)
        except OSError:
            pass  # something that is not embedlens's is left with its folder
    try:
        os.rmdir(root)
    except OSError:
        pass


#: What `embedlens.files.write_bytes` writes before it renames: ``.NAME.PID.tmp`` next to NAME.
_TEMP_NAME = re.compile(r"^\..+\.\d+\.tmp$")


def remove_temp(out: Path) -> None:
    """Delete the temporary files a killed run left half-written anywhere in its folder (``.NAME.PID.tmp``,
    embedlens's own naming; links are removed as links, never followed)."""
    for root, dirs, files in os.walk(out, followlinks=False):
        for name in files + [d for d in dirs if Path(root, d).is_symlink()]:
            p = Path(root) / name
            if _TEMP_NAME.match(name) and (p.is_symlink() or p.is_file()):
                p.unlink()


def damaged(path: Path, what: str) -> EmbedLensError:
    """The `embedlens.state.CheckpointError` of a run folder whose resume state cannot be trusted:
    ``cannot resume: FILE WHAT; start again with --overwrite``."""
    from embedlens.state import CheckpointError

    return CheckpointError(f"cannot resume: {path}: {what}; start again with --overwrite")


def check_parts(out: Path, next_batch: int) -> None:
    """Before a resume: every part file of a finished batch (``parts/TABLE/NNNNNN.parquet``, the run's and each
    rank's) is a Parquet file that joins the table's other parts as the gather joins them: a plugin's columns may
    vary from batch to batch, but a part shares at least one column with the table's parts before it, and a column
    present in several parts has types that promote to one (``promote_options="permissive"``).

    Raises:
        CheckpointError: ``cannot resume: FILE what is wrong; start again with --overwrite``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    roots = [out / PARTS] + sorted((out / RANKS).glob(f"rank-*/{PARTS}")) if (out / RANKS).is_dir() and not (out / RANKS).is_symlink() else [out / PARTS]
    first: dict[str, tuple[Path, Any]] = {}  # table -> (its first part, the schema of its parts so far)
    for root in roots:
        if not root.is_dir() or root.is_symlink():
            continue
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()):
            for f in sorted(folder.glob("*.parquet")):
                stem = f.name.split(".")[0]
                if not stem.isdigit() or f.is_symlink() or int(stem) >= next_batch:
                    continue  # not a part (left alone), or a batch the resumed run writes again
                try:
                    schema = pq.read_schema(f)
                except (pa.ArrowException, OSError, ValueError) as e:
                    raise damaged(f, f"not a Parquet part file ({type(e).__name__}: {str(e)[:200]})") from None
                if folder.name not in first:
                    first[folder.name] = (f, schema)
                    continue
                where, known = first[folder.name]
                if not set(schema.names) & set(known.names):
                    raise damaged(f, f"its columns {schema.names} are not those of {where} ({known.names}): no column in common, "
                                     f"not a part of this run's table {folder.name!r}")
                try:
                    first[folder.name] = (where, pa.unify_schemas([known, schema], promote_options="permissive"))
                except (pa.ArrowException, ValueError) as e:
                    raise damaged(f, f"its columns do not join those of the table's other parts ({where} ...): "
                                     f"{type(e).__name__}: {str(e)[:200]}") from None


def clear_run(out: Path) -> None:
    """Remove what an earlier run wrote in `out`, a folder `claim` checked is embedlens's.

    Only embedlens's own file names (`RUN_FILES`, part and tensor files) and the
    files the earlier run's manifest lists (inside `out`, reached without links)
    are deleted; links are removed as links, never followed; anything else stays.
    """
    from embedlens.files import contained

    out = Path(out)
    if not (out / MARKER).is_file() or (out / MARKER).is_symlink():
        raise RunFolderError(f"{out}: no {MARKER} marker; embedlens deletes nothing in a folder it did not create")
    old = out / "manifest.json"
    if old.is_file() and not old.is_symlink():
        try:
            listed = json.loads(old.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            listed = {}
        if not isinstance(listed, dict):
            listed = {}
        rels = [v for v in (listed.get("tables") or {}).values()] if isinstance(listed.get("tables"), dict) else []
        for key in ("figures", "artifacts"):
            rels += listed.get(key) if isinstance(listed.get(key), list) else []
        for rel in rels:
            if not isinstance(rel, str):
                continue
            for cand in {rel, str(Path(rel).with_suffix(".csv")), str(Path(rel).with_suffix(".parquet"))}:
                f = contained(out, cand)
                if f is not None:
                    f.unlink()
                elif not Path(cand).is_absolute() and ".." not in Path(cand).parts and (out / cand).is_symlink() \
                        and not any(q.is_symlink() for q in (out / cand).parents if out in q.parents):
                    (out / cand).unlink()  # a link planted under an embedlens name: the link goes, its target stays
    for name in RUN_FILES:
        p = out / name
        if p.is_symlink() or p.is_file():
            p.unlink()
    _remove_tree(out / PARTS)
    _remove_tree(out / "tensors")
    remove_temp(out)
