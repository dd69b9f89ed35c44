"""A run's identity beyond its plan: the content of its data files and which model weights it reads.

The checkpoint stores it; ``--resume`` recomputes it and refuses to continue
when anything changed between the kill and the resume, naming what changed
(a run half on one data set and half on another matches neither).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterable

from embedlens.state import CheckpointError

_CHUNK = 1 << 20


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _file_entry(path: Path) -> dict[str, Any]:
    st = os.stat(path)
    return {"size": st.st_size, "mtime": st.st_mtime_ns, "sha256": sha256(path)}


def _folder_files(folder: Path, limit: int = 100_000) -> Iterable[Path]:
    n = 0
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            if f.startswith("."):
                continue
            n += 1
            if n > limit:
                return
            yield Path(root) / f


def data_identity(prepared) -> dict[str, Any]:
    """``{file: {size, mtime, sha256}}`` of the prompts file, every image file and the data set folder the run reads."""
    loaded, data = prepared.loaded, prepared.loaded.plan.data
    files: dict[str, Any] = {}
    if data.prompts is not None:
        files[str(loaded.resolve(data.prompts))] = None
    if data.dataset is not None:
        ds = loaded.resolve(data.dataset)
        for f in (_folder_files(ds) if ds.is_dir() else [ds]):
            files[str(f)] = None
    for r in prepared.records:
        for im in r.images:
            if isinstance(im, (str, Path)):
                files[str(im)] = None
    out = {}
    for name in sorted(files):
        p = Path(name)
        try:
            out[name] = _file_entry(p)
        except OSError as e:
            out[name] = {"error": e.strerror or str(e)}
    return out


def model_identity(source: str) -> dict[str, Any]:
    """The model a run reads: a ``tiny:`` / ``zoo:`` name, or every file of a model folder (size, mtime, sha256)."""
    folder = Path(source).expanduser()
    if source.startswith(("tiny:", "zoo:")) or not folder.is_dir():
        return {"source": source}
    files = {}
    for f in _folder_files(folder):
        try:
            files[str(f.relative_to(folder))] = _file_entry(f)
        except OSError as e:
            files[str(f.relative_to(folder))] = {"error": e.strerror or str(e)}
    return {"source": source, "files": files}


def run_identity(prepared) -> dict[str, Any]:
    return {"data": data_identity(prepared), "model": model_identity(prepared.adapter.source)}


def check_same(saved: dict[str, Any], now: dict[str, Any], where: Path, what: str = "unfinished run") -> None:
    """Refuse to resume when the data or the model differ from the checkpoint's; name what changed.

    Raises:
        CheckpointError: listing up to five changed, added or removed files.
    """
    changes: list[str] = []
    for kind, label in (("data", "data file"), ("model", "model")):
        a, b = saved.get(kind) or {}, now.get(kind) or {}
        if kind == "model":
            if a.get("source") != b.get("source"):
                changes.append(f"model source {a.get('source')!r} -> {b.get('source')!r}")
                continue
            a, b, label = a.get("files") or {}, b.get("files") or {}, f"model file in {b.get('source')}:"
        for name in sorted(set(a) | set(b)):
            if name not in b:
                changes.append(f"{label} {name} is gone")
            elif name not in a:
                changes.append(f"{label} {name} is new")
            elif (a[name] or {}).get("sha256") != (b[name] or {}).get("sha256") or (a[name] or {}).get("size") != (b[name] or {}).get("size"):
                changes.append(f"{label} {name} changed (sha256 {str((a[name] or {}).get('sha256'))[:12]} -> {str((b[name] or {}).get('sha256'))[:12]})")
    if changes:
        more = f" and {len(changes) - 5} more" if len(changes) > 5 else ""
        raise CheckpointError(
            f"{where}: the inputs changed since the {what} started: {'; '.join(changes[:5])}{more}. "
            "Resuming would mix (or hand back) results of other data or models; restore them, or start again with --overwrite"
        )
