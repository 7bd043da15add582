"""The records every data source yields and how it names and reports a bad entry: `Clip` (an audio-text
example), `Media` (a file, or a reference into a bigger file: data/refs.py), `where_of` / `entry_name` (a
manifest line, a table row, a shard sample), `ManifestError`, and `BadLine` / `BadRow` / `refuse_or_collect`
(a line that cannot be read: an error naming it, or an entry left out and listed). data/manifest.py re-exports
them all.
"""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from common.errors import UserError
from data.refs import MediaRef, MemberRef, RowRef

TABLE_SUFFIXES = (".parquet", ".arrow")  # examples are rows: `file.parquet: row 12`
SHARD_SUFFIXES = (".tar",)  # examples are samples: `shard.tar: key 'abc'`

Media = Union[Path, RowRef, MemberRef]  # an example's audio or image: a file, or bytes inside a bigger file


class ManifestError(UserError, ValueError):
    """A manifest (or table, or shard) that cannot be read as written; the message starts with where:
    `manifest:line:`, `file.parquet: row 12:`, `shard.tar: key 'abc':`, or the file's path."""


def where_of(source: str, line: int, key: str | None = None) -> str:
    """How messages name an example or a bad entry: `manifest:line` (1-based), `file.parquet: row 12`
    (0-based, as pyarrow and `datasets` count), `shard.tar: key 'abc'` (or `sample 3` without its key)."""
    suffix = os.path.splitext(str(source))[1].lower()
    if suffix in TABLE_SUFFIXES:
        return f"{source}: row {line}"
    if suffix in SHARD_SUFFIXES:
        return f"{source}: key {key!r}" if key is not None else f"{source}: sample {line}"
    return f"{source}:{line}"


def entry_name(source: str) -> str:
    """What a user fixes or removes: a manifest line, a table row or a shard sample."""
    suffix = os.path.splitext(str(source))[1].lower()
    return "row" if suffix in TABLE_SUFFIXES else "sample" if suffix in SHARD_SUFFIXES else "manifest line"


@dataclass(frozen=True)
class BadLine:
    """A manifest line (a table row, a shard sample) left out because it cannot be read: what a reader
    appends to the `bad_lines` list it was given (a training run under `--on-bad-audio skip`) instead
    of raising a ManifestError naming it."""
    source: str  # the manifest's (table's, shard's) path
    line: int  # 1-based line; 0-based row or sample for a table or shard
    reason: str  # what is wrong with the line and what to do, without the `manifest:line:` prefix
    key: str | None = None  # a shard sample's key, which names it better than its position

    @property
    def where(self) -> str:
        return where_of(self.source, self.line, self.key)

    @classmethod
    def of(cls, example, reason: str) -> "BadLine":
        """The BadLine naming `example` (a Clip, AudioQAExample or VQAExample) as its own `where` does."""
        media = getattr(example, "audio", None) or getattr(example, "image", None)
        return cls(example.source, example.line, reason, media.key if isinstance(media, MemberRef) else None)


class BadRow(ValueError):
    """Raised by the parser of one row: that line's problem, to which `refuse_or_collect` adds
    the `manifest:line:` prefix (or which it collects)."""


def refuse_or_collect(bad_lines: list[BadLine] | None, path, line: int, reason: str, key: str | None = None) -> None:
    """A line that cannot be read: a ManifestError naming it (bad_lines is None: the default, and
    always for evaluation manifests), or one more BadLine in `bad_lines`, the line left out."""
    if bad_lines is None:
        raise ManifestError(f"{where_of(path, line, key)}: {reason}")
    bad_lines.append(BadLine(str(path), line, reason, key))


@dataclass(frozen=True)
class Clip:
    audio: Media  # an absolute Path (the same file from any working directory), or a RowRef / MemberRef
    captions: tuple[str, ...]  # at least one, none blank
    source: str  # the manifest's path, for messages (or the table's, the shard's)
    line: int  # 1-based line of the clip's first row in the manifest (0-based row or sample of a table or shard)

    @property
    def where(self) -> str:
        return media_where(self.audio, self.source, self.line)


def media_where(media: Media, source: str, line: int) -> str:
    """An example's `where`: its reference's own (`shard.tar: key 'abc'`), else `where_of(source, line)`."""
    return media.where if isinstance(media, MediaRef) else where_of(source, line)
