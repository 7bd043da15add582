"""On-disk cache of per-clip log-mel features, so each clip is decoded and transformed once.

What a clip contributes to a batch, `models.audio.clip_features` (its first min(V + 2, 3000)
frames, V and a fill value), depends only on the file and the front end, never on the other clips
of the batch, so it is computed once and reused across epochs, evaluations, resumes and runs:

    AudioTextDataset[i] (a DataLoader worker)
      -> FeatureCache.load_or_compute(path, n_mels, compute)
           the entry of key(path, n_mels) is there and sound:  read it               "hit"
           no entry (new clip, changed file, new setting):     compute, write it     "miss"
           an entry that fails its checks:                     compute, rewrite it   "recomputed"

Key: the file's identity (resolved path, size, mtime_ns) and the front-end setting (n_mels and
`FRONTEND_VERSION`, bumped whenever the computation changes). A clip embedded in a bigger file (a
row of a parquet / Arrow dataset, a member of a tar shard: data/refs.py) is keyed by that file's
identity and its place in it: the row and column, or the member's name and offset. So a rewritten
table or shard gets new keys for all of its clips, and two rows holding the same bytes two entries.
A changed file or setting has a new key, hence a new entry; old entries are left behind, so delete
the folder to reclaim the space.
The padding mode (--pad-to-30s) is not in the key on purpose: an entry holds exactly what both
modes take from the clip (`pad_clip_features` adds the padding), so one entry serves both.

Layout: one safetensors file per entry, `<root>/<h[:2]>/<h[2:4]>/<h>.safetensors` with h the
SHA-256 of the key, so no folder grows past a few thousand files. An entry holds the tensors
"features" (n_mels, T) float32 and "fill" (1,) float32, and in its metadata the key itself, V and
a CRC-32 of the data.

Damage is detected, never used: an unreadable or truncated file, a key that is not the one
asked for, a shape that V does not explain, or a checksum mismatch makes the entry "recomputed":
computed again, rewritten, counted, and reported with a warning.

Concurrency: DataLoader workers and ranks may write the same entry at once. Each writer writes
its own temporary file (pid and a random suffix, unique across hosts sharing the folder) and
renames it over the entry with os.replace, which is atomic, so a reader sees a whole entry, old
or new; the writers' bytes are identical anyway. There is no fsync, unlike common/atomic.py: an
entry torn by a power cut fails its checksum and is recomputed, and an fsync per clip would
make the first epoch wait on the disk.
"""

import contextlib
import hashlib
import json
import os
import secrets
import warnings
import zlib
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from data.refs import MediaRef, file_identity
from models.audio import FRONTEND_VERSION, N_FRAMES, ClipFeatures

CACHE_STATUSES = ("hit", "miss", "recomputed")


class DamagedEntry(Exception):
    """A cache entry that must not be used; the message says why."""


def file_key(path, n_mels: int) -> dict:
    """What an entry's features depend on: the file's identity and the front-end setting. `path` is
    a file's path or a RowRef / MemberRef (its container's identity, and the row or member)."""
    identity = path.identity() if isinstance(path, MediaRef) else file_identity(path)
    return {**identity, "n_mels": n_mels, "frontend": FRONTEND_VERSION}


def checksum(features: torch.Tensor, fill: torch.Tensor, valid_frames: int) -> str:
    """CRC-32 of an entry's data: catches bit flips and torn writes (not an attacker)."""
    crc = zlib.crc32(features.contiguous().numpy().tobytes())
    crc = zlib.crc32(fill.numpy().tobytes(), crc)
    return f"{zlib.crc32(str(valid_frames).encode(), crc):08x}"


class FeatureCache:
    """Per-clip features under `root`, shared by every worker, rank and run that uses it."""

    def __init__(self, root):
        self.root = Path(root)
        self._warned_write = False

    def entry_path(self, key: dict) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        return self.root / digest[:2] / digest[2:4] / f"{digest}.safetensors"

    def load_or_compute(self, path, n_mels: int, compute: Callable[[], ClipFeatures]) -> tuple[ClipFeatures, str]:
        """(the clip's features, "hit" | "miss" | "recomputed"). `compute()` decodes the file and
        returns its ClipFeatures, or raises for bad audio; then nothing is written. `path` is a
        file's path, or a reference to a clip inside a bigger file (data/refs.py)."""
        try:
            key = file_key(path, n_mels)
        except OSError:  # missing or unreadable: the decoder raises the error that names it
            return compute(), "miss"
        entry = self.entry_path(key)
        status = "miss"
        if os.path.isfile(entry):  # never raises: an OSError here would pass for bad audio
            try:
                return read_entry(entry, key), "hit"
            except DamagedEntry as e:
                warnings.warn(f"feature cache entry {entry} for {path} is damaged ({e}); recomputing it")
                status = "recomputed"
        features = compute()
        # a file rewritten while it was decoded would store new features under the old key
        with contextlib.suppress(OSError):
            if file_key(path, n_mels) == key:
                self._write(entry, key, features)
        return features, status

    def _write(self, entry: Path, key: dict, clip: ClipFeatures) -> None:
        fill = torch.tensor([clip.fill], dtype=torch.float32)  # (1,): the float32 value, exactly
        metadata = {"key": json.dumps(key, sort_keys=True), "valid_frames": str(clip.valid_frames),
                    "crc32": checksum(clip.features, fill, clip.valid_frames)}
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            save_file({"features": clip.features.contiguous(), "fill": fill}, tmp, metadata=metadata)
            os.replace(tmp, entry)
        except (OSError, SafetensorError) as e:
            # a full or read-only disk costs speed, not the run; and it must not reach the
            # dataset, which would take an OSError for a bad audio file
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            if not self._warned_write:
                warnings.warn(f"cannot write to the feature cache {self.root} ({e}); features are "
                              "computed on every read instead. Free space or pass --no-feature-cache")
                self._warned_write = True


def read_entry(entry: Path, key: dict) -> ClipFeatures:
    """The ClipFeatures stored in `entry` for `key`, or DamagedEntry saying what is wrong."""
    try:
        with safe_open(entry, framework="pt") as f:
            metadata = f.metadata() or {}
            features, fill = f.get_tensor("features"), f.get_tensor("fill")
    except (SafetensorError, OSError, KeyError) as e:
        raise DamagedEntry(f"unreadable: {e}") from e
    if metadata.get("key") != json.dumps(key, sort_keys=True):
        raise DamagedEntry(f"it holds the key {metadata.get('key')!r}")
    try:
        valid_frames = int(metadata["valid_frames"])
    except (KeyError, ValueError) as e:
        raise DamagedEntry(f"bad valid_frames in its metadata: {metadata.get('valid_frames')!r}") from e
    expected = (key["n_mels"], min(valid_frames + 2, N_FRAMES))
    if features.dtype != torch.float32 or tuple(features.shape) != expected or fill.dtype != torch.float32 \
            or fill.shape != (1,):
        raise DamagedEntry(f"features {features.dtype} {tuple(features.shape)}, fill {tuple(fill.shape)}; "
                           f"expected float32 {expected} for {valid_frames} valid frames and (1,)")
    if metadata.get("crc32") != checksum(features, fill, valid_frames):
        raise DamagedEntry("checksum mismatch")
    return ClipFeatures(features, valid_frames, fill.item())
