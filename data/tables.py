"""Hugging Face datasets on disk as examples: parquet files and `save_to_disk` Arrow folders.

    files = dataset_files("clotho-parquet/data")      # or a .parquet / .arrow file, or a save_to_disk folder
    clips = read_table_examples(files, "audio-text", bad_lines=bad_lines)   # [Clip, ...], rows in file order

Two layouts, both read with pyarrow a record batch at a time (never the whole table in memory):
- parquet: what the hub serves (`data/train-00000-of-00004.parquet`), or `Dataset.to_parquet`;
- `Dataset.save_to_disk`: `data-00000-of-0000N.arrow` (Arrow IPC stream files) beside
  `dataset_info.json` and `state.json`, whose `_data_files` gives their order.

Columns, chosen by name or found in the schema (`choose_columns`):
- the media: an Audio or Image column of `datasets`, stored as a struct {"bytes": binary,
  "path": string}. A row with bytes becomes a data/refs.py RowRef (its bytes decoded when an
  item is read, keyed in the feature cache by file and row); a row with only a path becomes
  that file's Path, resolved against `media_dir` (default: the table's folder), so it is a plain
  file as in a manifest, and rows naming one audio file form one clip, as in a manifest. A string
  column of paths is taken too when named (--audio-column / --image-column).
- texts: captions (audio-text) as a string column or a list-of-strings column, or several string
  columns (Clotho's caption_1 .. caption_5); prompt and answer (audio-qa, instructblip) as
  string columns. Found by name (`TEXT_NAMES`, ...): a guess that finds none, or more than one,
  is an error listing every column and its type, and the flag that names it.

A row that cannot be used (no bytes and no path, a null, blank or invisible text) is an error
naming it, `train.parquet: row 1234: ...` (0-based rows, as pyarrow and the dataset viewer
count), or, given a `bad_lines` list, a BadLine there, counted and listed like a manifest's.
"""

import difflib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from common.errors import PathNotFound
from data.audio_qa import AudioQAExample
from data.instructblip import VQAExample
from data.layouts import resolve_path
from data.manifest import BadLine, BadRow, Clip, ManifestError, refuse_or_collect, text_problem
from data.refs import RowRef, open_table

KINDS = ("audio-text", "audio-qa", "instructblip")
MEDIA_ROLE = {"audio-text": "audio", "audio-qa": "audio", "instructblip": "image"}
TEXT_ROLES = {"audio-text": ("text",), "audio-qa": ("prompt", "answer"), "instructblip": ("prompt", "answer")}
# names that decide a guess, compared case-insensitively; the first names are `datasets`' own conventions
MEDIA_NAMES = {"audio": ("audio", "sound", "wav", "flac", "mp3", "speech"),
               "image": ("image", "img", "picture", "jpg", "png")}
TEXT_NAMES = {"text": ("caption", "captions", "text", "sentence", "sentences", "description"),
              "prompt": ("prompt", "question", "instruction", "query"),
              "answer": ("answer", "response", "output", "multiple_choice_answer")}
NUMBERED_CAPTIONS = re.compile(r"caption_?\d+", re.IGNORECASE)  # Clotho: caption_1 .. caption_5
SAVE_TO_DISK_FILES = ("dataset_info.json", "state.json")
HUB_SHARD_NAME = re.compile(r"(.+)-\d{5}-of-\d{5}\.parquet")  # the hub's split files: train-00000-of-00004.parquet


def flag_of(role: str) -> str:
    return f"--{role}-column"


@dataclass(frozen=True)
class Columns:
    """The columns one kind of example is read from."""
    media: str  # the audio or image column
    media_is_path: bool  # a plain string column of file paths, not the {"bytes", "path"} struct
    texts: tuple[str, ...]  # audio-text: the caption column(s); else (prompt, answer)

    @property
    def names(self) -> list[str]:
        return [self.media, *self.texts]


def dataset_files(path) -> list[Path]:
    """The table files of a .parquet or .arrow file, a folder of parquet files, or a save_to_disk folder."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise PathNotFound(f"data not found: {path}; check the path (--train-data, --eval-data or --data)")
    if (path / "dataset_dict.json").is_file():  # DatasetDict.save_to_disk: one folder per split
        splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
        example = "train" if "train" in splits or not splits else splits[0]
        raise ManifestError(f"{path}: a DatasetDict folder (splits {', '.join(splits) or 'none'}); "
                            f"pass one split's folder, e.g. {path / example}")
    if (path / "state.json").is_file():
        return _save_to_disk_files(path)
    parquet = sorted(path.glob("*.parquet"))
    splits = sorted({match.group(1) for f in parquet if (match := HUB_SHARD_NAME.fullmatch(f.name))})
    if len(splits) > 1:  # the hub's data/ folder holds every split: training on all of them mixes test into train
        example = path / f"{'train' if 'train' in splits else splits[0]}-*.parquet"
        raise ManifestError(f"{path}: holds the parquet files of several splits ({', '.join(splits)}); pass one "
                            f"split's files as a pattern, e.g. '{example}'")
    if parquet:
        return parquet
    arrow = sorted(path.glob("*.arrow"))
    if arrow:
        return arrow
    below = sorted({p.parent.relative_to(path).as_posix() for p in path.rglob("*.parquet")})
    hint = f"; its subfolders {', '.join(below[:5])} hold parquet files: pass one of them" if below else ""
    raise ManifestError(f"{path}: holds no .parquet or .arrow file, nor a save_to_disk dataset "
                        f"({' + '.join(SAVE_TO_DISK_FILES)} + data-*.arrow){hint}")


def _save_to_disk_files(folder: Path) -> list[Path]:
    """The Arrow files of a save_to_disk folder, in the order state.json lists them."""
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        names = [entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ManifestError(f"{folder / 'state.json'}: not the state.json of save_to_disk ({error!r}); "
                            "save the dataset again") from error
    files = [folder / name for name in names]
    missing = [str(f) for f in files if not f.is_file()]
    if missing or not files:
        raise ManifestError(f"{folder}: state.json lists {len(files)} Arrow file(s) but "
                            f"{', '.join(missing) or 'none'} is missing; copy the whole folder or save it again")
    return files


def hf_types(schema: pa.Schema) -> dict[str, str]:
    """Each column's `datasets` feature type ("Audio", "Image", "Value", ...), from the schema's
    metadata that `datasets` writes into parquet and Arrow files; {} without it."""
    try:
        features = json.loads((schema.metadata or {})[b"huggingface"])["info"]["features"]
        return {name: feature.get("_type", "") for name, feature in features.items() if isinstance(feature, dict)}
    except (KeyError, ValueError, TypeError, AttributeError):
        return {}


def is_media_struct(type_: pa.DataType) -> bool:
    """The Audio / Image storage of `datasets`: a struct with binary "bytes" and string "path"."""
    if not pa.types.is_struct(type_):
        return False
    fields = {type_.field(i).name: type_.field(i).type for i in range(type_.num_fields)}
    return ("bytes" in fields and (pa.types.is_binary(fields["bytes"]) or pa.types.is_large_binary(fields["bytes"]))
            and "path" in fields and _is_string(fields["path"]))


def _is_string(type_: pa.DataType) -> bool:
    return pa.types.is_string(type_) or pa.types.is_large_string(type_)


def _is_string_list(type_: pa.DataType) -> bool:
    return (pa.types.is_list(type_) or pa.types.is_large_list(type_)) and _is_string(type_.value_type)


def describe_columns(schema: pa.Schema) -> str:
    """`audio (Audio), caption (string), id (int64)`: what an error lists so the user can choose."""
    features = hf_types(schema)
    parts = []
    for field in schema:
        feature = features.get(field.name)
        kind = feature if feature in ("Audio", "Image") else str(field.type)
        parts.append(f"{field.name} ({kind})")
    return ", ".join(parts)


def choose_columns(schema: pa.Schema, kind: str, file, audio_column=None, text_column=None, image_column=None,
                   prompt_column=None, answer_column=None) -> Columns:
    """The columns `kind` reads: those named, else those the schema's types and names single out;
    an error listing the columns (and their types) when a guess finds none or several."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    given = {"audio": audio_column, "image": image_column, "text": text_column, "prompt": prompt_column,
             "answer": answer_column}
    media_role = MEDIA_ROLE[kind]
    unused = [flag_of(role) for role, name in given.items()
              if name is not None and role != media_role and role not in TEXT_ROLES[kind]]
    if unused:
        raise ManifestError(f"{' and '.join(unused)} do not apply to {kind} data, which reads the "
                            f"{' and '.join((media_role,) + TEXT_ROLES[kind])} columns; remove them")
    media, media_is_path = _media_column(schema, media_role, given[media_role], file)
    texts: list[str] = []
    for role in TEXT_ROLES[kind]:
        texts += _text_columns(schema, role, given[role], file, allow_lists=kind == "audio-text")
    return Columns(media, media_is_path, tuple(texts))


def _column_error(schema: pa.Schema, file, role: str, problem: str) -> ManifestError:
    return ManifestError(f"{file}: {problem}; its columns: {describe_columns(schema)}. Name the {role} column "
                         f"with {flag_of(role)} ({role}_column=...)")


def _named(schema: pa.Schema, name: str, role: str, file) -> pa.Field:
    if name not in schema.names:
        near = difflib.get_close_matches(name, schema.names, n=3)
        hint = f" (did you mean {' or '.join(near)}?)" if near else ""
        raise _column_error(schema, file, role, f"no column {name!r}{hint}")
    return schema.field(name)


def _media_column(schema: pa.Schema, role: str, name: str | None, file) -> tuple[str, bool]:
    """(the audio or image column, whether it holds plain path strings)."""
    feature_name = role.capitalize()  # "Audio", "Image": `datasets`' feature types
    if name is not None:
        field = _named(schema, name, role, file)
        if is_media_struct(field.type) or _is_string(field.type):
            return name, _is_string(field.type)
        raise _column_error(schema, file, role, f"column {name!r} is {field.type}, neither a {feature_name} column "
                            "(a struct of bytes and path) nor a string column of file paths")
    features = hf_types(schema)
    structs = [field.name for field in schema if is_media_struct(field.type)]
    # the feature type decides first; by name only among structs it does not mark as the other medium
    typed = [column for column in structs if features.get(column) == feature_name]
    named = [column for column in structs if column.lower() in MEDIA_NAMES[role]
             and features.get(column, feature_name) == feature_name]
    untyped = [column for column in structs if features.get(column, feature_name) == feature_name]
    for candidates in (typed, named, untyped):
        if len(candidates) == 1:
            return candidates[0], False
        if len(candidates) > 1:
            raise _column_error(schema, file, role, f"several columns could hold the {role} "
                                f"({', '.join(candidates)})")
    raise _column_error(schema, file, role, f"no {feature_name} column (a struct of bytes and path)")


def _text_columns(schema: pa.Schema, role: str, name, file, allow_lists: bool) -> list[str]:
    """The column(s) of one text role: given (a name, a comma-separated string or a list), else by name."""
    def usable(field: pa.Field) -> bool:
        return _is_string(field.type) or (allow_lists and _is_string_list(field.type))

    kinds = "a string or a list-of-strings" if allow_lists else "a string"
    if name is not None:
        names = [n.strip() for n in name.split(",")] if isinstance(name, str) else list(name)
        for column in names:
            field = _named(schema, column, role, file)
            if not usable(field):
                raise _column_error(schema, file, role, f"column {column!r} is {field.type}, not {kinds} column")
        return names
    candidates = [field.name for field in schema if field.name.lower() in TEXT_NAMES[role] and usable(field)]
    if len(candidates) == 1:
        return candidates
    if len(candidates) > 1:
        raise _column_error(schema, file, role, f"several columns could hold the {role} ({', '.join(candidates)})")
    if role == "text":
        numbered = [field.name for field in schema
                    if NUMBERED_CAPTIONS.fullmatch(field.name) and _is_string(field.type)]
        if numbered:
            return numbered
    raise _column_error(schema, file, role, f"no {kinds} column named {', '.join(TEXT_NAMES[role])}")


def read_table_examples(files: list[Path], kind: str, *, media_dir=None, audio_column=None, text_column=None,
                        image_column=None, prompt_column=None, answer_column=None,
                        bad_lines: list[BadLine] | None = None) -> list:
    """The examples of `kind` ("audio-text": Clip, "audio-qa": AudioQAExample, "instructblip":
    VQAExample) in the table files, in file and row order; see the module docstring."""
    files = [Path(os.path.abspath(f)) for f in files]
    first = open_table(str(files[0]))
    try:
        columns = choose_columns(first.schema, kind, files[0], audio_column=audio_column, text_column=text_column,
                                 image_column=image_column, prompt_column=prompt_column, answer_column=answer_column)
    finally:
        first.close()
    skipped_before = len(bad_lines) if bad_lines is not None else 0
    examples: list = []
    clip_of_file: dict[Path, int] = {}  # audio-text: rows naming one file on disk form one clip, as in a manifest
    for file in files:
        base = Path(media_dir) if media_dir is not None else file.parent
        for row, media, texts in _rows(file, columns, base, bad_lines):
            if kind != "audio-text":
                make = AudioQAExample if kind == "audio-qa" else VQAExample
                examples.append(make(media, texts[0], texts[1], str(file), row))
            elif isinstance(media, Path) and media in clip_of_file:
                clip = examples[clip_of_file[media]]
                examples[clip_of_file[media]] = Clip(media, clip.captions + tuple(texts), clip.source, clip.line)
            else:
                if isinstance(media, Path):
                    clip_of_file[media] = len(examples)
                examples.append(Clip(media, tuple(texts), str(file), row))
    if not examples:
        where = files[0] if len(files) == 1 else f"{files[0].parent} ({len(files)} files)"
        skipped = bad_lines[skipped_before:] if bad_lines is not None else []
        raise ManifestError(f"{where}: holds no rows; add at least one" if not skipped else
                            f"{where}: none of its {len(skipped)} rows can be read (the first, {skipped[0].where}: "
                            f"{skipped[0].reason})")
    return examples


def _rows(file: Path, columns: Columns, base: Path, bad_lines):
    """(row, media, texts) for each usable row of one file; the others refused or collected."""
    table = open_table(str(file))
    try:
        _check_schema(table.schema, columns, file)
        stat = os.stat(file)
        for first, batch in table.batches(columns.names):
            media = batch.column(columns.media)
            if columns.media_is_path:
                lengths, paths = [None] * batch.num_rows, media.to_pylist()
            else:  # lengths from the offsets alone: the bytes are neither copied nor decoded here
                data, path_array = media.flatten()  # children with the struct's own nulls applied
                lengths, paths = pc.binary_length(data).to_pylist(), path_array.to_pylist()
            texts = [batch.column(name).to_pylist() for name in columns.texts]
            for i in range(batch.num_rows):
                row = first + i
                try:
                    if lengths[i]:
                        item = RowRef(str(file), row, columns.media, stat.st_size, stat.st_mtime_ns)
                    elif paths[i]:
                        item = resolve_path(base, paths[i])
                    else:
                        raise BadRow(f"column {columns.media!r} holds no bytes and no path; fill it in or drop the row")
                    yield row, item, _row_texts(columns, [values[i] for values in texts])
                except BadRow as problem:
                    refuse_or_collect(bad_lines, file, row, str(problem))
    finally:
        table.close()


def _check_schema(schema: pa.Schema, columns: Columns, file: Path) -> None:
    """Every file of a data set must hold the columns chosen from the first, with usable types."""
    for name in columns.names:
        if name not in schema.names:
            raise ManifestError(f"{file}: no column {name!r}, which the data set's first file has; its columns: "
                                f"{describe_columns(schema)}")
    media_type = schema.field(columns.media).type
    if not (_is_string(media_type) if columns.media_is_path else is_media_struct(media_type)):
        raise ManifestError(f"{file}: column {columns.media!r} is {media_type} here, unlike in the data set's first "
                            "file; give every file the same columns")


def _row_texts(columns: Columns, values: list) -> list[str]:
    """The row's captions (audio-text: every value of every caption column), or its [prompt, answer]."""
    texts = []
    for name, value in zip(columns.texts, values):
        if isinstance(value, list):
            if not value:
                raise BadRow(f"column {name!r} is an empty list; give every row at least one caption or drop it")
            items = [(f"column {name!r}[{k}]", caption) for k, caption in enumerate(value)]
        else:
            items = [(f"column {name!r}", value)]
        for field, text in items:
            problem = f"{field} is null" if text is None else text_problem(text, field)
            if problem:
                raise BadRow(f"{problem}; fill it in or drop the row")
            texts.append(text)
    return texts
