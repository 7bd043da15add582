"""Atomic writes: a crash, a full disk or a second process mid-save never leaves a half-written adapter,
checkpoint or cache folder."""

import contextlib
import errno
import json
import os
import secrets
import shutil
import socket
from pathlib import Path
from typing import Callable

try:
    import fcntl
except ImportError:  # not POSIX: builders are not serialised, and the rename alone keeps folders whole
    fcntl = None

DONE_FILE = "DONE.json"  # written last into a built folder: its record and the size of every file


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


def build_directory_once(target: str | os.PathLike, record: dict, build: Callable[[Path], dict | None]) -> dict:
    """The folder `target` as `build` makes it for `record`, built at most once however many processes ask.

    A folder is reused only when its DONE.json holds `record` and every file DONE.json lists is there
    with its size; anything else (missing, partial, truncated, another record) is rebuilt, never read.
    `build(tmp)` fills an empty folder beside `target` (same filesystem, a name unique to the process)
    and returns extra fields for DONE.json, or None. DONE.json is written last, then the folder is
    renamed into place in one step, so a reader sees a whole folder or none. Should another process
    rename its folder there first, its folder is kept and this one deleted (the bytes are the same).
    A lock file beside `target` makes the other processes wait rather than build the same thing, but
    nothing depends on it. `target` belongs to the builder: a rebuild deletes everything in it.
    Returns DONE.json's fields, less its file list.
    """
    target = Path(target)
    record = json.loads(json.dumps(record))  # as it reads back from DONE.json (a tuple becomes a list)
    done = read_done(target, record)
    if done is not None:  # the common case, and it writes nothing (no lock file either)
        return done
    target.parent.mkdir(parents=True, exist_ok=True)
    with build_lock(target):
        done = read_done(target, record)  # built by the process this one waited for
        if done is not None:
            return done
        remove_dead_builders_folders(target)
        scratch = scratch_path(target)
        scratch.mkdir()
        try:
            extra = build(scratch) or {}
            if set(extra) & {*record, "files"}:
                raise ValueError(f"build returned {sorted(extra)}: they overlap the record {sorted(record)} or 'files'")
            files = {path.relative_to(scratch).as_posix(): path.stat().st_size
                     for path in sorted(scratch.rglob("*")) if path.is_file()}
            done = {**record, **extra, "files": files}
            atomic_write_text(scratch / DONE_FILE, json.dumps(done, indent=2) + "\n")
            winner = install(scratch, target, record)
            return winner if winner is not None else {key: value for key, value in done.items() if key != "files"}
        finally:
            shutil.rmtree(scratch, ignore_errors=True)  # still here if another process's folder won


def read_done(target: Path, record: dict) -> dict | None:
    """DONE.json's fields (less its file list) if `target` is a whole folder built for `record`, else None."""
    try:
        done = json.loads((Path(target) / DONE_FILE).read_text(encoding="utf-8"))
        if any(done.get(key) != value for key, value in record.items()):
            return None
        for name, size in done["files"].items():
            if os.stat(Path(target) / name).st_size != size:  # a truncated file, or a deleted one (OSError)
                return None
    except (OSError, ValueError, KeyError, AttributeError, TypeError):  # unreadable, torn or malformed
        return None
    return {key: value for key, value in done.items() if key != "files"}


def install(scratch: Path, target: Path, record: dict) -> dict | None:
    """Rename the finished `scratch` to `target`. Returns None when it did, or the record of another
    process's whole folder that got there first (then `scratch` is the caller's to delete)."""
    for _ in range(3):  # a retry only when another process puts a folder there between two steps
        winner = read_done(target, record)
        if winner is not None:
            return winner
        discard(target)  # partial, damaged or stale
        try:
            os.rename(scratch, target)  # fails on a non-empty folder: never merges two builds
            return None
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    raise RuntimeError(f"could not put the folder built in {scratch} at {target}: something keeps writing there")


def discard(path: Path):
    """Delete `path` (a folder or a file) if it exists: renamed aside first, so that a reader never
    sees a half-deleted folder at `path`, and a process killed while deleting leaves nothing there."""
    aside = scratch_path(path)
    try:
        os.rename(path, aside)
    except FileNotFoundError:  # nothing there, or another process moved it first
        return
    remove(aside)


def remove(path: Path):
    """Delete a folder tree or a file (a link is unlinked, never followed)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def scratch_path(target: Path) -> Path:
    """A name beside `target` no other process uses: pid and host say whose it is, the random part
    keeps two calls of one process apart."""
    return target.parent / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}-{socket.gethostname()}"


def remove_dead_builders_folders(target: Path):
    """Delete what builders on this host that no longer run left beside `target` (a killed build).
    Folders of running processes or of other hosts are left alone; their names never collide anyway."""
    prefix = f".{target.name}.tmp-"
    for path in target.parent.iterdir():
        if not path.name.startswith(prefix):
            continue
        pid, _, host = (path.name[len(prefix):].split("-", 2) + ["", ""])[:3]
        if host != socket.gethostname() or not pid.isdigit() or process_runs(int(pid)):
            continue
        remove(path)


def process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, and belongs to another user
        return True
    return True


@contextlib.contextmanager
def build_lock(target: Path):
    """An exclusive flock on `.<name>.lock` beside `target`, released when the block ends or the process
    dies. The file stays: deleting it would let two processes lock two different files."""
    if fcntl is None:
        yield
        return
    with open(target.parent / f".{target.name}.lock", "ab") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:  # a filesystem without locks: build unserialised, the rename still decides
            pass
        yield
