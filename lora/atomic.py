"""Atomic file writes: a crash or a full disk mid-save never leaves a half-written adapter or checkpoint."""

import os
from pathlib import Path
from typing import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)`, flush it to disk, then rename it over `path` in one step.

    The temporary file sits beside the target, so the rename stays on one filesystem
    (os.replace is atomic there); on any error it is removed and the old file is untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """atomic_write for a text file (JSON configs)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
