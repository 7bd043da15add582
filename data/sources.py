"""One entry point for a task's data: a manifest, a Hugging Face dataset on disk, or WebDataset tar shards.

    bad_lines = []
    source = read_source(args.train_data, "audio-text", media_dir=args.train_audio_dir, bad_lines=bad_lines,
                         index_dir=Path(args.cache_dir) / "shard-index", text_column=args.text_column)
    clips, problems = precheck(source.examples)          # the same records as a manifest gives
    sampler = GlobalBatchSampler(len(clips), ..., order=source.order_for(clips))

What the path is picks the reader:

    a .jsonl / .json / .csv file                       a manifest: data/manifest.py (audio-text),
                                                       data/audio_qa.py, data/instructblip.py
    a .parquet or .arrow file, a folder of parquet     a Hugging Face dataset: data/tables.py
    files, a `save_to_disk` folder, a glob of them
    a .tar file, a folder of them, a brace range       WebDataset shards: data/shards.py
    ('shards/{000000..000099}.tar'), a glob, a list

Whatever the reader, the examples are the task's own records (Clip, AudioQAExample, VQAExample)
whose media is a Path or a data/refs.py reference into a table or shard, and a line, row or sample
that cannot be read is a ManifestError naming it or, given `bad_lines`, a BadLine appended there.
"""

import glob
import re
from dataclasses import dataclass
from pathlib import Path

from common.errors import PathNotFound
from data.audio_qa import read_audio_qa_manifest
from data.instructblip import read_vqa_manifest
from data.manifest import FLAG_HINT, MANIFEST_SUFFIXES, BadLine, ManifestError, load_manifest
from data.records import SHARD_SUFFIXES, TABLE_SUFFIXES
from data.shards import SHUFFLE_BUFFER, ShardOrder, read_shard_examples
from data.tables import KINDS, dataset_files, read_table_examples

COMPRESSED_SHARDS = (".tar.gz", ".tgz", ".tar.zst", ".tar.xz", ".tar.bz2")
BRACE = re.compile(r"\{([^{}]*)\}")
GLOB_CHARACTERS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class Source:
    """What read_source read: the examples and how to use them."""
    examples: list  # Clip, AudioQAExample or VQAExample, in the source's order
    format: str  # "manifest", "parquet", "arrow" or "shards"
    files: tuple[str, ...]  # the manifest, table files or shards read
    media_dir: Path | None  # where relative media paths were resolved (a manifest's audio folder), for run_config
    note: str | None  # a line for the log, or None (where a Clotho / AudioCaps CSV's audio was found)

    def order_for(self, examples: list, buffer: int = SHUFFLE_BUFFER) -> ShardOrder | None:
        """The GlobalBatchSampler `order` hook for `examples` (these, or those left after the check before
        training): shard-aware for tar shards, None (the sampler's own shuffle) for everything else."""
        return ShardOrder.of(examples, buffer) if self.format == "shards" else None


def read_source(path, kind: str, *, media_dir=None, bad_lines: list[BadLine] | None = None, index_dir=None,
                audio_column=None, text_column=None, image_column=None, prompt_column=None, answer_column=None,
                flag: str = FLAG_HINT) -> Source:
    """The examples of `kind` ("audio-text", "audio-qa", "instructblip") in `path`: a manifest, table
    file(s) or shard(s), a folder of them, a glob or brace pattern, or a list of paths (see the module
    docstring). `media_dir` resolves relative media paths (--train-audio-dir ...); `index_dir` keeps
    the shard indexes (None: walk the shards every time); the *_column arguments name the columns of
    a table or the json keys / media extension of shards, each default found from the data; `flag`
    names the audio folder option in a manifest's error."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    columns = dict(audio_column=audio_column, text_column=text_column, image_column=image_column,
                   prompt_column=prompt_column, answer_column=answer_column)
    paths = expand_paths(path)
    family = _family(paths)
    if family == "manifest":
        given = [f"--{name.replace('_', '-')}" for name, value in columns.items() if value is not None]
        if given:
            raise ManifestError(f"{paths[0]}: {' and '.join(given)} apply to parquet, Arrow and tar data; a manifest "
                                "names its fields itself (\"audio\", \"text\", ...): remove them")
        return _read_manifest(paths[0], kind, media_dir, bad_lines, flag)
    if family == "shards":
        shards = [shard for p in paths for shard in (sorted(p.glob("*.tar")) if p.is_dir() else [p])]
        examples = read_shard_examples(shards, kind, index_dir=index_dir, bad_lines=bad_lines, **columns)
        return Source(examples, "shards", tuple(map(str, shards)), None, None)
    files = [file for p in paths for file in dataset_files(p)]
    examples = read_table_examples(files, kind, media_dir=media_dir, bad_lines=bad_lines, **columns)
    table_format = "parquet" if files[0].suffix.lower() == ".parquet" else "arrow"
    folder = Path(media_dir) if media_dir is not None else None
    return Source(examples, table_format, tuple(map(str, files)), folder, None)


def _read_manifest(path: Path, kind: str, media_dir, bad_lines, flag: str) -> Source:
    if kind == "audio-text":
        clips, location = load_manifest(path, media_dir, flag=flag, bad_lines=bad_lines)
        return Source(clips, "manifest", (str(path),), location.folder, location.note)
    read = read_audio_qa_manifest if kind == "audio-qa" else read_vqa_manifest
    examples = read(path, media_dir, bad_lines)
    return Source(examples, "manifest", (str(path),), Path(media_dir) if media_dir else path.parent, None)


def expand_braces(pattern: str) -> list[str]:
    """WebDataset's shard patterns: `{000..099}` (zero-padded as written) and `{a,b}`, any number of them."""
    match = BRACE.search(pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end():]
    numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numbers:
        first, last = numbers.groups()
        if int(last) < int(first):
            raise ManifestError(f"{pattern}: the range {{{body}}} runs backwards; write {{{last}..{first}}}")
        width = max(len(first), len(last)) if first.startswith("0") or last.startswith("0") else 0
        choices = [f"{n:0{width}d}" for n in range(int(first), int(last) + 1)]
    elif "," in body:
        choices = body.split(",")
    else:  # braces that are part of a name
        return [head + "{" + body + "}" + rest for rest in expand_braces(tail)]
    return [head + choice + rest for choice in choices for rest in expand_braces(tail)]


def expand_paths(spec) -> list[Path]:
    """The existing paths a data argument names: a path, a brace pattern, a glob, or a list of those.
    A named path that is not there is an error naming it (a missing shard is not skipped silently)."""
    patterns = [str(item) for item in spec] if isinstance(spec, (list, tuple)) else [str(spec)]
    if not patterns:
        raise PathNotFound("no data path given; pass --train-data (or --eval-data, --data)")
    paths: list[Path] = []
    for pattern in patterns:
        for expanded in expand_braces(pattern):
            if GLOB_CHARACTERS.search(expanded):
                matches = sorted(glob.glob(expanded))
                if not matches:
                    raise PathNotFound(f"no file matches {expanded}; check the pattern")
                paths += map(Path, matches)
            elif Path(expanded).exists():
                paths.append(Path(expanded))
            else:
                what = "manifest" if expanded.lower().endswith(MANIFEST_SUFFIXES) else "data"
                raise PathNotFound(f"{what} not found: {expanded}; check the path (--train-data, --eval-data or --data)"
                                   + (f" (from the pattern {pattern})" if expanded != pattern else ""))
    return paths


def _family(paths: list[Path]) -> str:
    """"manifest", "tables" or "shards": what the paths hold, one kind for all of them."""
    families = set()
    for path in paths:
        name = path.name.lower()
        if name.endswith(COMPRESSED_SHARDS):
            raise ManifestError(f"{path}: a compressed tar cannot be read at random; decompress it to a plain .tar "
                                "(gunzip keeps WebDataset's layout)")
        if path.is_dir():
            shard_folder = any(path.glob("*.tar")) and not any(path.glob("*.parquet")) \
                and not (path / "state.json").is_file()
            families.add("shards" if shard_folder else "tables")
        elif path.suffix.lower() in MANIFEST_SUFFIXES:
            families.add("manifest")
        elif path.suffix.lower() in TABLE_SUFFIXES:
            families.add("tables")
        elif path.suffix.lower() in SHARD_SUFFIXES:
            families.add("shards")
        else:
            raise ManifestError(f"{path}: unknown data format {path.suffix!r}; use a .jsonl / .csv manifest, .parquet "
                                "or .arrow files (or a save_to_disk folder), or .tar shards")
    if len(families) > 1:
        raise ManifestError(f"{paths[0].parent}: the data mixes {' and '.join(sorted(families))}; pass one kind")
    if families == {"manifest"} and len(paths) > 1:
        raise ManifestError(f"{len(paths)} manifests given ({paths[0]}, ...); pass one, or merge them into one")
    return families.pop()
