"""Folders embedlens owns and files it writes there: ownership marker, run lock, atomic writes without links.

A run folder is owned: `claim` writes the marker ``.embedlens-run`` into a
new or empty folder first and refuses a non-empty folder without it, so
embedlens never reads, overwrites or deletes what it did not write. `RunLock`
holds an exclusive ``flock`` on ``.embedlens-lock`` for the life of a run; a
second run into the folder is refused and told who holds it.

Everything embedlens writes into a run folder goes through `write_bytes` /
`write_text` (a temporary file opened with ``O_NOFOLLOW | O_EXCL``, fsync,
then `os.replace`, which replaces a link rather than writing through it) into
folders made by `safe_dir` (which refuses a symlink anywhere between the run
folder and the file). Reads of files a run's own manifest names go through
`contained`, so a manifest cannot point a report at ``/etc/passwd``.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from embedlens.errors import EmbedLensError


class RunFolderError(EmbedLensError):
    """An output folder embedlens may not use: not its own, a link, locked by another run, not writable."""


#: Written first into a folder embedlens creates: the proof that it owns the folder.
MARKER = ".embedlens-run"
#: Held with flock for the life of a run.
LOCK = ".embedlens-lock"

#: Names a plan may give to things that become file or folder names (probe labels, model keys).
SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")
#: Names embedlens derives from a slug (sweep copies ``label[layers=[0, 1],k=2]``): one path component, printable.
FILE_NAME = re.compile(r"^[A-Za-z0-9][^/\\\x00-\x1f\x7f]{0,199}$")


def is_safe_name(name: str, pattern: re.Pattern = FILE_NAME) -> bool:
    """True when `name` can be one path component: no separators or control characters, no leading dot, bounded length."""
    return isinstance(name, str) and bool(pattern.match(name)) and name not in (".", "..")


def os_error(e: OSError, doing: str, path: str | Path | None = None) -> RunFolderError:
    """An `OSError` as a message naming the file and what to do (full disk, read-only, permissions).

    Args:
        path: the file (or folder) being written, named when the error carries no file name (a ``write`` or
            ``fsync`` that fails on a full disk names none).
    """
    where = e.filename or (str(path) if path is not None and str(path) else None) or "the output folder"
    if e.errno == errno.ENOSPC:
        hint = "the disk is full; free space and continue with --resume"
    elif e.errno == errno.EROFS:
        hint = "the file system is read-only; choose another --output"
    elif e.errno in (errno.EACCES, errno.EPERM):
        hint = "permission denied; choose another --output"
    elif e.errno == errno.ELOOP:
        hint = "it is a symbolic link, which embedlens does not follow"
    else:
        hint = e.strerror or str(e)
    return RunFolderError(f"cannot {doing} {where}: {hint}")


def safe_dir(root: Path, rel: str | Path = "") -> Path:
    """``root / rel`` as a folder, made if missing, refusing a symlink (or a file) at every step below `root`.

    Raises:
        RunFolderError: a component is a symlink or not a folder.
    """
    cur = Path(root)
    for part in Path(rel).parts:
        if part in ("..", "/") or Path(part).is_absolute():
            raise RunFolderError(f"{root}: refusing the path {rel!r} (it leaves the run folder)")
        cur = cur / part
        try:
            os.mkdir(cur)
        except FileExistsError:
            pass
        except OSError as e:
            raise os_error(e, "create the folder") from None
        if cur.is_symlink():
            raise RunFolderError(f"{cur} is a symbolic link; embedlens does not write through links (remove it)")
        if not cur.is_dir():
            raise RunFolderError(f"{cur} is not a folder")
    return cur


def write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically, never through a link; the folder must exist and not be a link.

    Raises:
        RunFolderError: naming the file (full disk, read-only file system, a link in the way).
    """
    path = Path(path)
    if path.parent.is_symlink():
        raise RunFolderError(f"{path.parent} is a symbolic link; embedlens does not write through links (remove it)")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except FileExistsError:
        os.unlink(tmp)  # a leftover of this pid's earlier, killed incarnation: ours (dotted .tmp name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise os_error(e, "write", path) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        sys.audit("embedlens.files.write", path.name)  # the temporary file is written, not yet renamed (the kill tests stop here)
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise os_error(e, "write", path) from None


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def json_text(obj: Any, **dumps_kwargs: Any) -> str:
    """`obj` as standard JSON: a NaN or infinite float (an undefined statistic, say) becomes ``null``, as
    Python's ``json`` would otherwise write ``NaN``, which other JSON readers reject.

    Example:
        >>> json_text({"mean": float("nan"), "n": [1.5, float("inf")]})
        '{"mean": null, "n": [1.5, null]}'
    """
    return json.dumps(_finite(obj), allow_nan=False, **dumps_kwargs)


def write_text(path: Path, text: str) -> None:
    """`write_bytes` of UTF-8 text."""
    write_bytes(path, text.encode("utf-8"))


def contained(root: Path, rel: str | Path) -> Path | None:
    """``root / rel`` when it is a regular file inside `root` reached without links; else None.

    Used for every path a manifest names: absolute paths, ``..`` and links out
    of the folder are not read.
    """
    if not isinstance(rel, (str, Path)) or not str(rel) or Path(rel).is_absolute() or ".." in Path(rel).parts:
        return None
    root = Path(root)
    cur = root
    for part in Path(rel).parts:
        cur = cur / part
        if cur.is_symlink():
            return None
    try:
        if not cur.is_file() or root.resolve() not in cur.resolve().parents:
            return None
    except OSError:
        return None
    return cur


def utf8_path(path: str | Path, what: str, error: type[Exception] = RunFolderError) -> Path:
    """`path`, made absolute, refused when it is not UTF-8 text.

    A folder name with a byte such as 0xff reaches Python as a lone surrogate
    (``'\udcff'``); every file a run writes names its paths in UTF-8 (Parquet
    metadata, JSON, HTML), so it would fail at the first one, after the model ran.

    Raises:
        `error`: naming `what`, the path as bytes and the offending byte.
    """
    full = Path(path).absolute()
    try:
        str(full).encode("utf-8")
    except UnicodeEncodeError as e:
        raw = os.fsencode(full)
        bad = os.fsencode(str(full)[e.start:e.end])
        raise error(f"{what} {raw!r}: the path holds byte 0x{bad[0]:02x}, which is not UTF-8 text; results name their files in "
                    "UTF-8 (Parquet, JSON, HTML), so rename the folder or choose another") from None
    return Path(path)


def check_output(out: str | Path) -> Path:
    """Refuse output folders that can only be mistakes: empty, the file system root, the home folder, a file, a path not in UTF-8.

    Raises:
        RunFolderError: naming the folder and why.
    """
    if out is None or not str(out).strip():
        raise RunFolderError("the output folder is empty (''); give a folder for the run, e.g. --output runs/NAME")
    utf8_path(out, "output folder")
    path = Path(out).expanduser()
    try:
        real = path.resolve()
    except (OSError, RuntimeError) as e:
        raise RunFolderError(f"output folder {out}: cannot resolve it ({e})") from None
    if real == Path(real.anchor) or real == Path.home().resolve() or real in Path.home().resolve().parents:
        raise RunFolderError(f"refusing to use {out} ({real}) as a run folder: it is the root or your home folder; give a folder of its own")
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"output {out} exists and is not a folder; give a folder for the run")
    return path


def _read_marker(path: Path) -> dict | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RunFolderError(f"{path}: cannot read the run marker ({e.strerror}); is it a link?") from None
    with os.fdopen(fd, "rb") as fh:
        raw = fh.read(4096)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("embedlens_run"), str):
        raise RunFolderError(f"{path}: not an embedlens run marker; this folder is not embedlens's, choose another")
    return data


def claim(out: str | Path, kind: str = "run") -> Path:
    """Make `out` a folder embedlens owns, or check that it already is one.

    A new or empty folder gets the marker; a folder with the marker is ours;
    anything else (a non-empty folder without the marker, a link) is refused
    and left untouched.

    Raises:
        RunFolderError: naming the folder and a few of the files that are not embedlens's.
    """
    import uuid

    path = check_output(out)
    if path.is_symlink() and not path.exists():
        raise RunFolderError(f"output {out} is a dangling symbolic link")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error(e, "create the output folder") from None
    marker = path / MARKER
    if _read_marker(marker) is not None:
        _refuse_links(path)
        return path
    try:
        entries = sorted(os.listdir(path))
    except OSError as e:
        raise os_error(e, "list the output folder") from None
    foreign = [e for e in entries if e != LOCK]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise RunFolderError(
            f"{out} is not empty and was not created by embedlens (it holds {shown}; no {MARKER} marker); "
            "embedlens only writes into a new or empty folder or one of its own runs: choose another --output"
        )
    body = json.dumps({"embedlens_run": uuid.uuid4().hex, "kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode()
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except FileExistsError:  # another run claimed it a moment ago: it is ours now too; the lock decides who runs
        _read_marker(marker)
        return path
    except OSError as e:
        raise os_error(e, "write the run marker", marker) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(body)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as e:
        raise os_error(e, "write the run marker", marker) from None
    return path


def _refuse_links(out: Path) -> None:
    """A run folder never holds symbolic links (embedlens writes none); one there was planted: refuse."""
    for root, dirs, files in os.walk(out, followlinks=False):
        for name in dirs + files:
            p = Path(root) / name
            if p.is_symlink():
                raise RunFolderError(
                    f"{p} is a symbolic link; embedlens writes no links into its run folders and will not write through one "
                    "(remove it, or choose another --output)"
                )


class RunLock:
    """An exclusive ``flock`` on ``OUT/.embedlens-lock`` held while a run writes into `OUT`.

    Raises (on entry):
        RunFolderError: another process holds the lock; the message gives its pid and start time.
    """

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK
        self.fd: int | None = None

    def __enter__(self) -> "RunLock":
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise os_error(e, "open the run lock") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
            except (UnicodeDecodeError, json.JSONDecodeError, OSError):
                holder = {}
            os.close(fd)
            who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
            raise RunFolderError(
                f"{self.path.parent} is in use by another embedlens run ({who}); wait for it to finish, or choose another --output"
            ) from None
        import platform

        info = json.dumps({"pid": os.getpid(), "host": platform.node(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, info, 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock; the file stays (removing it would race a waiting run)
            self.fd = None
