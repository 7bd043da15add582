"""A search index: the embeddings of a folder of clips, computed once and kept up to date.

    audio, names = search_index(model, files, root, Path("index.npz"), with_adapter=True)
    scores = audio @ model.embed_text(["a dog barks twice"]).numpy()[0]

The index (.npz) records each clip's path relative to `root`, its size and modification time, and
its embedding, plus the identity of what made them (the run's files by content, the precision, the
front end, LoRA on or off). A later search re-embeds only new or changed files; another identity
rebuilds it all. `eval.py --search` uses it (models/audio_text.py `load_run` gives the model).
"""

import functools
import hashlib
import os
import sys
import zipfile
from pathlib import Path

import numpy as np
import soundfile as sf

from lora.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from common.atomic import atomic_write
from common.run_files import HEADS_FILE, RUN_CONFIG


def save_npz(path, **arrays):
    with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to a temporary name
        np.savez(f, **arrays)


INDEX_VERSION = 1  # bump when the index's layout or meaning changes: older indexes are rebuilt


def checkpoint_identity(model, with_adapter: bool) -> str:
    """What a search index's embeddings depend on besides the audio: the run's files by content
    (run_config.json, heads, adapter), the precision, the front end and whether LoRA is on."""
    digest = hashlib.sha256(f"v{INDEX_VERSION} precision={model.precision} pad_to_30s={model.pad_to_30s} "
                            f"adapter={with_adapter}".encode())
    for name in [RUN_CONFIG, HEADS_FILE] + ([ADAPTER_CONFIG, ADAPTER_WEIGHTS] if with_adapter else []):
        digest.update(name.encode() + b"\0" + (Path(model.run_dir) / name).read_bytes())
    return digest.hexdigest()


def unreadable(path: Path) -> str | None:
    """Why soundfile cannot open this file (reading its header only), or None when it can."""
    try:
        if path.stat().st_size == 0:
            return "empty file"
        sf.info(str(path))
    except (OSError, RuntimeError) as error:  # soundfile's LibsndfileError is a RuntimeError
        return str(error)
    return None


def read_index(path: Path) -> dict | None:
    """A saved search index, or None when it is absent, damaged or of another version (then it is rebuilt)."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            index = {key: saved[key] for key in ("version", "identity", "paths", "sizes", "mtimes", "embeddings")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    n = len(index["paths"])
    if int(index["version"]) != INDEX_VERSION or not (
            len(index["sizes"]) == len(index["mtimes"]) == len(index["embeddings"]) == n):
        return None
    return index


def search_index(model, files: list[Path], root: Path, index_path: Path, with_adapter: bool, batch_size=32, workers=0,
                 feature_cache=None):
    """(embeddings (N, E) float32, names (N,)) of `files`, reusing and updating the index at `index_path`.

    A file is unchanged when its path relative to `root`, its size and its modification time (ns) are
    those the index recorded: its embedding is reused. New and changed files are embedded, vanished ones
    dropped, and the index rewritten (atomically) when anything changed. Another checkpoint_identity
    rebuilds the whole index. Files soundfile cannot open are left out with a message (and tried again
    next time).
    """
    identity = checkpoint_identity(model, with_adapter)
    names = [Path(os.path.relpath(path, root)).as_posix() for path in files]
    stamps = [(path.stat().st_size, path.stat().st_mtime_ns) for path in files]
    old = read_index(index_path) if index_path.exists() else None
    known = {}  # name -> (size, mtime_ns, row in the old index)
    if old is not None and str(old["identity"]) == identity:
        known = {name: (int(size), int(mtime), row) for row, (name, size, mtime)
                 in enumerate(zip(old["paths"].tolist(), old["sizes"], old["mtimes"]))}
    elif old is not None:
        print(f"index {index_path}: made with another checkpoint or precision; rebuilding it", file=sys.stderr)
    todo = [i for i, name in enumerate(names) if known.get(name, (None, None))[:2] != stamps[i]]
    bad = {i: reason for i in todo if (reason := unreadable(files[i]))}
    for i, reason in list(bad.items())[:10]:
        print(f"skipping {files[i]}: {reason}", file=sys.stderr)
    keep = [i for i in range(len(files)) if i not in bad]
    if not keep:
        raise ValueError(f"none of the {len(files)} audio files under {root} can be read")
    embed = [i for i in todo if i not in bad]
    fresh = (model.embed_audio([files[i] for i in embed], batch_size=batch_size, workers=workers,
                               feature_cache=feature_cache).numpy()
             if embed else None)
    fresh_row = {i: row for row, i in enumerate(embed)}
    embeddings = np.stack([fresh[fresh_row[i]] if i in fresh_row else old["embeddings"][known[names[i]][2]]
                           for i in keep])
    dropped = len(set(known) - {names[i] for i in keep})
    if embed or dropped or not known:
        arrays = dict(version=np.array(INDEX_VERSION), identity=np.array(identity), root=np.array(str(root)),
                      paths=np.array([names[i] for i in keep]),
                      sizes=np.array([stamps[i][0] for i in keep], dtype=np.int64),
                      mtimes=np.array([stamps[i][1] for i in keep], dtype=np.int64),
                      embeddings=embeddings.astype(np.float32))
        index_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(index_path, functools.partial(save_npz, **arrays))
    print(f"index {index_path}: {len(keep) - len(embed)} clips reused, {len(embed)} embedded, {dropped} dropped"
          + (f", {len(bad)} unreadable skipped" if bad else ""), file=sys.stderr)
    return embeddings.astype(np.float32), [names[i] for i in keep]


def default_index_path(checkpoint: str, source: Path, with_adapter: bool) -> Path:
    """search-index-<hash of the searched folder or manifest>.npz inside the run directory."""
    key = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:12]
    return Path(checkpoint) / f"search-index-{key}{'' if with_adapter else '-no-adapter'}.npz"
