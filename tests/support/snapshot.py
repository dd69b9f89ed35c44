"""What a hostile-input test compares before and after a refused command: every path under a folder, so that a
write, a deletion or a link followed outside the run folder shows as a difference."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def tree(root: Path, skip: Path | None = None, volatile: tuple[str, ...] = ()) -> dict[str, tuple]:
    """Every path under `root` except under `skip`: a link as its target text, a folder as itself, a file as its
    size and the hash of its first MiB (a sparse 6 GiB file is not read whole); of a file named in `volatile` (a
    lock, whose text is its holder's pid: its length varies with the pid's digits) only the presence is compared."""
    out: dict[str, tuple] = {}
    for dirpath, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            p = Path(dirpath) / name
            if skip is not None and (p == skip or skip in p.parents):
                continue
            if p.is_symlink():
                out[str(p)] = ("link", os.readlink(p))
            elif p.is_file():
                if name in volatile:
                    out[str(p)] = ("file",)
                    continue
                with open(p, "rb") as fh:
                    out[str(p)] = (p.stat().st_size, hashlib.sha256(fh.read(1 << 20)).hexdigest())
            else:
                out[str(p)] = ("dir",)
    return out
