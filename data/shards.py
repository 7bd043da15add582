"""WebDataset tar shards as map-style examples: a cached index per shard, random access, a shard-aware order.

    clips = read_shard_examples(shards, "audio-text", index_dir=cache / "shard-index", bad_lines=bad_lines)
    sampler = GlobalBatchSampler(len(clips), B, ..., order=ShardOrder.of(clips))

Layout, as LAION-CLAP's and WavCaps' tools write it: an uncompressed tar whose members form samples
by key, the member's name up to the first dot of its base name (WebDataset's rule), e.g.

    000000/abc.flac   000000/abc.json   {"text": "a dog barks"}, {"text": [...]} or {"captions": [...]}

Audio is .flac, .wav, .mp3 or .ogg; images (instructblip) .jpg, .jpeg, .png or .webp; the json of
an audio-qa or instructblip sample holds "prompt" and "answer". Each sample becomes one example
whose media is a data/refs.py MemberRef: read by one pread of its bytes, keyed in the feature
cache by shard and member. A sample that cannot be used (media without json, json without media,
two audio members, invalid json, a blank caption, a member the shard ends inside) is an error
naming it, `shard-000003.tar: key 'abc': ...`, or, given `bad_lines`, a BadLine counted and listed.
Media that is there but does not decode is found as a file's is: by the check before training or
when a worker decodes it.

Index: a tar has no table of contents, so each shard is walked once (`tarfile` reads the 512-byte
headers and seeks past the data) and its members' (name, offset, size), with the text of its
small .json members, saved in `index_dir` as JSON (common/atomic.py `atomic_write_text`). An index
is used only if it names this shard's path, size and mtime and its CRC-32 matches; otherwise it is
built again. Without an `index_dir` nothing is written and every run walks the shards.

Order: `ShardOrder` makes the epoch's sequence one permutation of all examples, a pure function
of (seed, epoch): the shards in a seeded random order, then a seeded shuffle within a buffer of
`buffer` examples (WebDataset's shuffle(n)). GlobalBatchSampler cuts that one sequence into
global batches and per-rank micro-batches (data/sampling.py), so ranks and workers never read the
same example, the global batch does not depend on the number of processes, and a resume at
(epoch, batches_done) takes exactly the remaining batches, while reads stay within a window of
about `buffer` examples of one or two shards.

Why not the `webdataset` package: its WebDataset pipeline is an iterable that splits shards over
ranks and workers (split_by_node, split_by_worker), so the examples of a global batch depend on
the number of processes and workers, and a run can only continue by replaying the stream from the
start of the epoch; its indexed `wids` reader is map-style but keeps its own shard cache and
sample decoding beside ours. A tar member is a byte range, so an index and a pread are all that
is needed, and the order and resume stay the ones every other source has.
"""

import hashlib
import json
import os
import random
import tarfile
import warnings
import zlib
from pathlib import Path

from common.atomic import atomic_write_text
from data.audio_qa import AudioQAExample
from data.instructblip import VQAExample
from data.manifest import BadLine, BadRow, Clip, ManifestError, refuse_or_collect, text_problem
from data.refs import MemberRef

AUDIO_EXTENSIONS = ("flac", "wav", "mp3", "ogg")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
INDEX_FORMAT = 1  # bump when the index's fields change: older ones are then rebuilt, never misread
INLINE_JSON_BYTES = 64 * 1024  # .json members up to this size ride in the index: no pread each at startup
SHUFFLE_BUFFER = 1000  # examples shuffled together: WebDataset's own examples use shuffle(1000)
ROLES = {"audio-text": ("audio", "text"), "audio-qa": ("audio", "prompt", "answer"),
         "instructblip": ("image", "prompt", "answer")}  # what each kind reads: the --*-column flags that apply
KINDS = tuple(ROLES)


def split_name(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member name, WebDataset's way: `dir/abc.seg.flac` -> (`dir/abc`, `seg.flac`);
    None for a name whose base has no dot or starts with one (`._abc.flac`, macOS metadata)."""
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    if not stem or not dot:
        return None
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


# ---------------------------------------------------------------------------------------------- index


def shard_index(shard: Path, index_dir=None) -> dict:
    """{"members": [[name, offset, size], ...] in tar order, "texts": {name: text of a small .json}},
    from `index_dir` when a sound index of this very shard is there, else by walking the tar."""
    stat = os.stat(shard)
    record = {"format": INDEX_FORMAT, "shard": os.path.realpath(shard), "size": stat.st_size,
              "mtime_ns": stat.st_mtime_ns}
    index_path = None
    if index_dir is not None:
        digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
        index_path = Path(index_dir) / f"{digest[:32]}.json"
        if index_path.is_file():
            try:
                return read_index(index_path, record)
            except ValueError as error:
                warnings.warn(f"shard index {index_path} of {shard} is damaged ({error}); rebuilding it")
    index = _walk(shard)
    if index_path is not None:
        try:
            index_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(index_path, json.dumps({**record, **index, "crc32": _crc(index)}) + "\n")
        except OSError as error:  # a read-only or full cache costs a walk per run, not the run
            warnings.warn(f"cannot write the shard index {index_path} ({error}); the shard is walked on every run")
    return index


def _crc(index: dict) -> str:
    return f"{zlib.crc32(json.dumps([index['members'], index['texts']], sort_keys=True).encode()):08x}"


def read_index(path: Path, record: dict) -> dict:
    """The index stored at `path` for `record` (the shard's identity), or ValueError saying why not."""
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        index = {"members": stored["members"], "texts": stored["texts"]}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"unreadable: {error!r}") from error
    if any(stored.get(key) != value for key, value in record.items()):
        raise ValueError("it was built for another version of the shard")
    if stored.get("crc32") != _crc(index):
        raise ValueError("checksum mismatch")
    for member in index["members"]:
        if not (isinstance(member, list) and len(member) == 3 and isinstance(member[0], str)
                and all(isinstance(v, int) and v >= 0 for v in member[1:])):
            raise ValueError(f"malformed member {member!r:.80}")
    return index


def _walk(shard: Path) -> dict:
    members, texts = [], {}
    shard_size = os.stat(shard).st_size
    try:
        tar = tarfile.open(shard, mode="r:")  # "r:": uncompressed only, the one kind that can be seeked
    except (tarfile.ReadError, EOFError) as error:
        raise ManifestError(f"{shard}: not an uncompressed tar file ({error}); WebDataset shards are plain .tar "
                            "files (decompress a .tar.gz first)") from error
    with tar:
        members_of = iter(tar)
        while True:
            try:
                info = next(members_of)
            except StopIteration:
                _check_tail(shard, tar.offset, shard_size)
                break
            except (tarfile.ReadError, EOFError):  # cut short inside a member: its sample's check names it
                break
            if not info.isreg():  # folders, links; a sparse member is no byte range either
                continue
            members.append([info.name, info.offset_data, info.size])
            parts = split_name(info.name)
            if parts and parts[1] == "json" and info.size <= INLINE_JSON_BYTES \
                    and info.offset_data + info.size <= shard_size:
                try:
                    texts[info.name] = tar.extractfile(info).read().decode("utf-8")
                except UnicodeDecodeError:  # left out: the sample's check reads it and says so
                    pass
    return {"members": members, "texts": texts}


def _check_tail(shard: Path, offset: int, shard_size: int) -> None:
    """tarfile stops quietly at a damaged header: only zeros (the end-of-archive blocks and padding)
    may follow the last member it read, or the rest of the shard would be lost without a word."""
    with open(shard, "rb") as handle:
        handle.seek(offset)
        while chunk := handle.read(1 << 20):
            if chunk.strip(b"\0"):
                raise ManifestError(f"{shard}: a damaged tar header at byte {offset}; the "
                                    f"{shard_size - offset} bytes from there on cannot be read. Copy the shard again")


# ---------------------------------------------------------------------------------------------- examples


def read_shard_examples(shards: list[Path], kind: str, *, index_dir=None, audio_column=None, text_column=None,
                        image_column=None, prompt_column=None, answer_column=None,
                        bad_lines: list[BadLine] | None = None) -> list:
    """The examples of `kind` ("audio-text": Clip, "audio-qa": AudioQAExample, "instructblip":
    VQAExample) in the shards, shard by shard, samples in tar order. `audio_column` / `image_column`
    name the media's extension ("flac"); `text_column`, `prompt_column`, `answer_column` the json's
    keys (default "text" or "captions"; "prompt"; "answer")."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    given = {"audio": audio_column, "image": image_column, "text": text_column, "prompt": prompt_column,
             "answer": answer_column}
    unused = [f"--{role}-column" for role, value in given.items() if value is not None and role not in ROLES[kind]]
    if unused:
        raise ManifestError(f"{' and '.join(unused)} do not apply to {kind} shards; remove them")
    media_given = image_column if kind == "instructblip" else audio_column
    extensions = ((media_given.lower().lstrip("."),) if media_given
                  else IMAGE_EXTENSIONS if kind == "instructblip" else AUDIO_EXTENSIONS)
    skipped_before = len(bad_lines) if bad_lines is not None else 0
    examples: list = []
    for shard in shards:
        shard = Path(os.path.abspath(shard))
        stat = os.stat(shard)
        index = shard_index(shard, index_dir)
        samples: dict[str, list[tuple[str, str, int, int]]] = {}  # key -> [(extension, name, offset, size)]
        for name, offset, size in index["members"]:
            parts = split_name(name)
            if parts:
                samples.setdefault(parts[0], []).append((parts[1], name, offset, size))
        with open(shard, "rb") as handle:
            for ordinal, (key, members) in enumerate(samples.items()):
                try:
                    for member in members:
                        _check_within(member, stat.st_size)
                    media = _media_member(members, extensions, kind)
                    fields = _json_fields(handle, members, index["texts"])
                    ref = MemberRef(str(shard), media[1], key, media[2], media[3], stat.st_size, stat.st_mtime_ns)
                    examples.append(_example(kind, ref, fields, str(shard), ordinal, text_column, prompt_column,
                                             answer_column))
                except BadRow as problem:
                    refuse_or_collect(bad_lines, shard, ordinal, str(problem), key=key)
    if not examples:
        where = shards[0] if len(shards) == 1 else f"{len(shards)} shards ({shards[0]}, ...)"
        skipped = bad_lines[skipped_before:] if bad_lines is not None else []
        raise ManifestError(f"{where}: holds no samples with {' or '.join(extensions)} media and json"
                            if not skipped else f"{where}: none of its {len(skipped)} samples can be read (the first, "
                            f"{skipped[0].where}: {skipped[0].reason})")
    return examples


def _media_member(members, extensions: tuple[str, ...], kind: str):
    found = [member for member in members if member[0] in extensions]
    what = "image" if kind == "instructblip" else "audio"
    if not found:
        has = ", ".join(sorted(f".{member[0]}" for member in members))
        raise BadRow(f"no {what} member ({', '.join('.' + e for e in extensions)}), only {has}; add it or drop the "
                     "sample")
    if len(found) > 1:
        raise BadRow(f"{len(found)} {what} members ({', '.join(m[1] for m in found)}); keep one per sample, or name "
                     f"the one to use with --{what}-column EXTENSION")
    return found[0]


def _check_within(member, shard_size: int) -> None:
    _, name, offset, size = member
    if offset + size > shard_size:
        raise BadRow(f"the shard ends inside member {name!r} ({offset + size - shard_size} of its {size} bytes are "
                     "missing); the shard was cut short: copy it again")


def _json_fields(handle, members, texts: dict) -> dict:
    found = [member for member in members if member[0] == "json"]
    if not found:
        raise BadRow("no .json member (the sample's text); add it or drop the sample")
    _, name, offset, size = found[0]
    text = texts.get(name)
    if text is None:
        data = os.pread(handle.fileno(), size, offset)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise BadRow(f"member {name!r} is not UTF-8 text ({error.reason} at byte {error.start})") from error
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as error:
        raise BadRow(f"member {name!r} is not valid JSON ({error.msg}, line {error.lineno} column {error.colno})") \
            from error
    if not isinstance(fields, dict):
        raise BadRow(f"member {name!r} holds a JSON {type(fields).__name__}, not an object such as "
                     '{"text": "a dog barks"}')
    return fields


def _example(kind: str, ref: MemberRef, fields: dict, source: str, ordinal: int, text_key, prompt_key, answer_key):
    if kind == "audio-text":
        return Clip(ref, tuple(_captions(fields, text_key)), source, ordinal)
    prompt = _text(fields, prompt_key or "prompt")
    answer = _text(fields, answer_key or "answer")
    make = AudioQAExample if kind == "audio-qa" else VQAExample
    return make(ref, prompt, answer, source, ordinal)


def _text(fields: dict, key: str) -> str:
    if key not in fields:
        raise BadRow(f"its json has no {key!r} (keys: {', '.join(map(repr, fields)) or 'none'})")
    problem = text_problem(fields[key], f"json {key!r}")
    if problem:
        raise BadRow(f"{problem}; fill it in or drop the sample")
    return fields[key]


def _captions(fields: dict, key) -> list[str]:
    """{"text": str or [str, ...]} (LAION-CLAP, WavCaps) or {"captions": [...]}; `key` names another."""
    if key is None:
        present = [name for name in ("text", "captions") if name in fields]
        if len(present) != 1:
            which = 'both "text" and' if present else 'neither "text" nor'
            raise BadRow(f'its json has {which} "captions" (keys: {", ".join(map(repr, fields)) or "none"}); give '
                         'one, or name the key with --text-column')
        key = present[0]
    elif key not in fields:
        raise BadRow(f"its json has no {key!r} (keys: {', '.join(map(repr, fields)) or 'none'})")
    value = fields[key]
    values = value if isinstance(value, list) else [value]
    if not values:
        raise BadRow(f"json {key!r} is an empty list; give at least one caption or drop the sample")
    for k, caption in enumerate(values):
        problem = text_problem(caption, f"json {key!r}" + (f"[{k}]" if isinstance(value, list) else ""))
        if problem:
            raise BadRow(f"{problem}; fill it in or drop the sample")
    return values


# ---------------------------------------------------------------------------------------------- order


class ShardOrder:
    """The `order` hook of data/sampling.py GlobalBatchSampler for examples stored shard by shard:
    order(seed, epoch) is the shards in a seeded random order, then a seeded shuffle within a buffer
    of `buffer` examples; one permutation of range(n), a pure function of (seed, epoch)."""

    def __init__(self, shard_sizes: list[int], buffer: int = SHUFFLE_BUFFER):
        if buffer < 1 or any(size < 1 for size in shard_sizes):
            raise ValueError(f"buffer must be >= 1 and every shard hold an example, got {buffer} and {shard_sizes}")
        self.shard_sizes, self.buffer = list(shard_sizes), buffer
        self.starts = [0]
        for size in self.shard_sizes:
            self.starts.append(self.starts[-1] + size)

    @classmethod
    def of(cls, examples: list, buffer: int = SHUFFLE_BUFFER) -> "ShardOrder":
        """The order for `examples` as read_shard_examples gives them (or a filtered copy): each run of
        examples from one shard (`example.source`) is a shard."""
        sizes: list[int] = []
        previous = None
        for example in examples:
            if example.source != previous or not sizes:
                sizes.append(0)
                previous = example.source
            sizes[-1] += 1
        return cls(sizes, buffer)

    def __len__(self) -> int:
        return self.starts[-1]

    def __call__(self, seed: int, epoch: int) -> list[int]:
        # `random` hashes a str seed with SHA-512, the same in every process (Python's hash() is salted)
        rng = random.Random(f"shard-order:{seed}:{epoch}")
        shards = list(range(len(self.shard_sizes)))
        rng.shuffle(shards)
        order, window = [], []
        for shard in shards:
            for index in range(self.starts[shard], self.starts[shard + 1]):
                if len(window) < self.buffer:
                    window.append(index)
                    continue
                slot = rng.randrange(self.buffer)  # emit a random buffered example, keep the new one in its place
                order.append(window[slot])
                window[slot] = index
        rng.shuffle(window)
        return order + window
