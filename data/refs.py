"""Media inside bigger files: a row of a parquet / Arrow table, a member of a tar shard.

An example's `audio` (Clip, AudioQAExample) or `image` (VQAExample) is a Path to a file of its own,
or, for data that ships its media inside a bigger file, one of the references here:

    RowRef(file, row, column, ...)       the bytes in the {"bytes", "path"} struct of one row of a
                                         Hugging Face dataset (a .parquet file, or an .arrow file
                                         that `datasets`' save_to_disk wrote)
    MemberRef(shard, name, key, ...)     one member of a WebDataset tar shard, by offset and size

A reference is a small frozen record, so DataLoader workers get it pickled with the examples, and
whatever takes an example's Path takes one: the decoders (`media_input` hands them the bytes as a
file object), the check before training (data/input_checks.py `readable_file_problem`, `audio_header`)
and the feature cache, whose key is then the container's identity and the row or member
(`identity`). `str(ref)` and `ref.where` say where it is: `train.parquet: row 12`,
`shard-000003.tar: key 'abc'`.

Reading is random access and reads little: a member is one pread of its bytes; a row reads the
record batch that holds it (Arrow: memory-mapped, nothing copied) or its row group's one column
(parquet), and each process keeps the last one, so rows read in order cost one read per row group.
Open files and that batch belong to the process: a forked DataLoader worker opens its own.

A container rewritten since its rows or members were listed (another size or mtime) is refused
with SourceChanged, never read: row 12 or offset 4096 would now be other data.
"""

import bisect
import io
import os
from collections import OrderedDict
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from common.errors import UserError

OPEN_FILES = 16  # containers kept open per process: a shuffled epoch over 1000 shards would run out of descriptors
ARROW_FILE_MAGIC = b"ARROW1"  # the Arrow IPC *file* format starts so; `save_to_disk` writes the *stream* format


class SourceChanged(UserError, RuntimeError):
    """A container rewritten after the run listed its rows or members."""


class ContainerError(UserError, ValueError):
    """A table file this reader cannot serve rows of (the message names it and says what to do)."""


@dataclass(frozen=True)
class RowRef:
    """The embedded bytes of one row's media column in a .parquet or .arrow file."""
    file: str  # absolute path
    row: int  # 0-based, as pyarrow and `datasets` count rows
    column: str  # a {"bytes", "path"} struct column (the `datasets` Audio and Image layout)
    size: int  # the file's size and mtime_ns when its rows were listed
    mtime_ns: int

    @property
    def where(self) -> str:
        return f"{self.file}: row {self.row}"

    def __str__(self) -> str:
        return self.where

    def identity(self) -> dict:
        """What the row's bytes depend on, for the feature cache's key."""
        return {**file_identity(self.file), "row": self.row, "column": self.column}

    def read_bytes(self) -> bytes:
        check_unchanged(self.file, self.size, self.mtime_ns)
        table = _open_files.get(self.file, lambda: open_table(self.file))
        batch, offset = table.locate(self.row)
        key = (self.file, batch, self.column)
        if _open_files.batch_key != key:
            _open_files.batch_key, _open_files.batch = None, None  # release the old batch before reading the new
            _open_files.batch = table.read_column(batch, self.column)
            _open_files.batch_key = key
        value = _open_files.batch[offset].as_py()  # copies this row's bytes only
        data = (value or {}).get("bytes")
        if not data:
            raise SourceChanged(f"{self.where}: column {self.column!r} holds no bytes now, though it did when the rows "
                                "were listed; was the file rewritten in place? Restart the run")
        return data


@dataclass(frozen=True)
class MemberRef:
    """One member of an uncompressed tar shard, by the offset and size of its data."""
    shard: str  # absolute path
    name: str  # the member's name in the tar
    key: str  # its sample's key: the name up to the first dot of its base name (WebDataset's rule)
    offset: int  # of the member's data, in bytes
    size: int
    shard_size: int  # the shard's size and mtime_ns when it was indexed
    shard_mtime_ns: int

    @property
    def where(self) -> str:
        return f"{self.shard}: key {self.key!r}"

    def __str__(self) -> str:
        return self.where

    def identity(self) -> dict:
        return {**file_identity(self.shard), "member": self.name, "offset": self.offset}

    def read_bytes(self) -> bytes:
        check_unchanged(self.shard, self.shard_size, self.shard_mtime_ns)
        fd = _open_files.get(self.shard, lambda: _OpenShard(os.open(self.shard, os.O_RDONLY))).fd
        data = os.pread(fd, self.size, self.offset)  # no shared file position: safe in any thread or worker
        if len(data) != self.size:
            raise SourceChanged(f"{self.where}: member {self.name!r} reads {len(data)} of its {self.size} bytes; "
                                "the shard was truncated after it was indexed. Restore it and restart the run")
        return data


MediaRef = (RowRef, MemberRef)  # for isinstance: everything an example's media may be besides a Path


def media_input(media):
    """What a decoder (soundfile, PIL) reads for an example's media: the path itself, or the
    referenced bytes as a file object. OSError for a container that is gone."""
    return io.BytesIO(media.read_bytes()) if isinstance(media, MediaRef) else media


def container_of(media) -> str | None:
    """The file a reference points into; None for a plain path."""
    if isinstance(media, RowRef):
        return media.file
    if isinstance(media, MemberRef):
        return media.shard
    return None


def file_identity(path) -> dict:
    resolved = os.path.realpath(path)
    stat = os.stat(resolved)
    return {"path": resolved, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def check_unchanged(path: str, size: int, mtime_ns: int) -> None:
    stat = os.stat(path)  # FileNotFoundError (an OSError) when it is gone: bad media, like a missing file
    if (stat.st_size, stat.st_mtime_ns) != (size, mtime_ns):
        raise SourceChanged(f"{path} changed since the run listed its contents ({size} -> {stat.st_size} bytes); "
                            "its rows or members may now be other data. Restart the run")


class _OpenShard:
    def __init__(self, fd: int):
        self.fd = fd

    def close(self):
        os.close(self.fd)


class _OpenFiles:
    """This process's open containers (an LRU of OPEN_FILES) and the last batch read."""

    def __init__(self):
        self.pid, self.files, self.batch_key, self.batch = None, OrderedDict(), None, None

    def get(self, path: str, opener):
        if self.pid != os.getpid():  # a forked worker: the parent's handles stay the parent's
            self.pid, self.files, self.batch_key, self.batch = os.getpid(), OrderedDict(), None, None
        if path not in self.files:
            self.files[path] = opener()
            if len(self.files) > OPEN_FILES:
                oldest_path, oldest = self.files.popitem(last=False)
                if self.batch_key is not None and self.batch_key[0] == oldest_path:
                    self.batch_key, self.batch = None, None  # its buffers may point into the mapping closed next
                oldest.close()
        self.files.move_to_end(path)
        return self.files[path]


_open_files = _OpenFiles()


def open_table(path: str):
    """A .parquet or .arrow file as a table of row batches: ParquetTable or ArrowTable."""
    if str(path).lower().endswith(".parquet"):
        return ParquetTable(path)
    return ArrowTable(path)


class ParquetTable:
    """A parquet file's rows, one row group at a time (a row group is parquet's unit of reading)."""

    def __init__(self, path: str):
        try:
            self.file = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as error:
            raise ContainerError(f"{path}: not a readable parquet file ({error}); re-download or re-export it") \
                from error
        self.schema = self.file.schema_arrow
        sizes = [self.file.metadata.row_group(g).num_rows for g in range(self.file.num_row_groups)]
        self.starts = _starts(sizes)

    def batches(self, columns: list[str], rows_per_batch: int = 256):
        """(first row, RecordBatch of `columns`) in file order; memory stays near one row group's columns."""
        row = 0
        for batch in self.file.iter_batches(batch_size=rows_per_batch, columns=columns):
            yield row, batch
            row += batch.num_rows

    def locate(self, row: int) -> tuple[int, int]:
        return _locate(self.starts, row)

    def read_column(self, group: int, column: str):
        return self.file.read_row_group(group, columns=[column]).column(column)

    def close(self):
        self.file.close()


class ArrowTable:
    """An Arrow IPC file, memory-mapped: the stream format `datasets`' save_to_disk writes (its
    record batches found by walking the message headers once), or the random-access file format."""

    def __init__(self, path: str):
        self.path, self.map = path, pa.memory_map(str(path))
        try:
            if self.map.read(len(ARROW_FILE_MAGIC)) == ARROW_FILE_MAGIC:
                self.map.seek(0)
                self.reader = pa.ipc.open_file(self.map)
                self.schema, self.offsets = self.reader.schema, None
                sizes = [self.reader.get_batch(i).num_rows for i in range(self.reader.num_record_batches)]
            else:
                self.map.seek(0)
                self.reader = None
                self.schema, self.offsets, sizes = self._index_stream()
        except (pa.ArrowException, OSError) as error:
            self.map.close()
            raise ContainerError(f"{path}: not a readable Arrow file ({error}); re-export it with save_to_disk") \
                from error
        self.starts = _starts(sizes)

    def _index_stream(self):
        """(schema, the byte offset of each record batch, each one's rows): the stream format has no
        footer, so random access needs this one walk (headers only: the bodies stay on disk)."""
        reader = pa.ipc.MessageReader.open_stream(self.map)
        schema, offsets, sizes = None, [], []
        while True:
            position = self.map.tell()
            try:
                message = reader.read_next_message()
            except StopIteration:
                break
            if message.type == "schema":
                schema = pa.ipc.read_schema(message)
            elif message.type == "record batch":
                offsets.append(position)
                sizes.append(pa.ipc.read_record_batch(message, schema).num_rows)
            else:  # a dictionary batch: its values would have to be replayed before every batch that uses them
                raise ContainerError(f"{self.path}: holds dictionary-encoded columns, which this reader does not "
                                     "serve row by row; re-save the dataset without them (dataset.cast to plain types)")
        if schema is None:
            raise ContainerError(f"{self.path}: no Arrow schema at its start; is it an Arrow stream file?")
        return schema, offsets, sizes

    def record_batch(self, index: int):
        if self.reader is not None:
            return self.reader.get_batch(index)
        self.map.seek(self.offsets[index])
        return pa.ipc.read_record_batch(pa.ipc.read_message(self.map), self.schema)

    def batches(self, columns: list[str]):
        row = 0
        for index in range(len(self.starts) - 1):
            batch = self.record_batch(index).select(columns)  # zero-copy: only the pages touched are read
            yield row, batch
            row += batch.num_rows

    def locate(self, row: int) -> tuple[int, int]:
        return _locate(self.starts, row)

    def read_column(self, index: int, column: str):
        return self.record_batch(index).column(column)

    def close(self):
        self.map.close()


def _starts(sizes: list[int]) -> list[int]:
    """Each batch's first row, then the total: [0, n0, n0 + n1, ...]."""
    starts = [0]
    for size in sizes:
        starts.append(starts[-1] + size)
    return starts


def _locate(starts: list[int], row: int) -> tuple[int, int]:
    """(batch, row within it) of a 0-based row, by bisection over the batches' first rows."""
    if not 0 <= row < starts[-1]:
        raise SourceChanged(f"row {row} is past the end ({starts[-1]} rows); the file changed since it was read")
    batch = bisect.bisect_right(starts, row) - 1
    return batch, row - starts[batch]
