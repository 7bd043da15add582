"""Audio-text manifests -> a list of clips, each with its captions and the manifest line it came from.

    clips, location = load_manifest("clotho/clotho_captions_development.csv", flag="--train-audio-dir")
    if location.note:
        print(location.note)   # audio of clotho/clotho_captions_development.csv found in
                               # /data/clotho/development (Clotho layout: 3839 of 3839 files)
    clips = read_manifest(path, audio_dir=None)   # the same clips, without the location

Three formats, chosen by the file's suffix and, for CSV, by its header row:

- JSON Lines (`.jsonl` or `.json`): one object a line, `{"audio": "clips/a.wav", "text": "a dog
  barks"}` or `{"audio": "clips/a.wav", "captions": ["a dog barks", "barking"]}`. Other keys are
  ignored. Rows naming the same audio file form one clip, their captions merged in file order.
  Whitespace-only lines are skipped: they are layout, not data, so nothing is lost.
- Clotho CSV: header `file_name,caption_1,...,caption_5`, one row a clip. File names hold spaces,
  commas (quoted cells) and non-ASCII letters.
- AudioCaps CSV: header `audiocap_id,youtube_id,start_time,caption`, one row a caption; the rows
  of one (youtube_id, start_time) form one clip.

Where the audio is: relative paths resolve against `audio_dir` when given, else (JSON Lines) the
manifest's folder, else (a CSV) the folder where its data set ships the audio: data/layouts.py.

Every error starts with `manifest:line:` (1-based), or with the manifest's path when it concerns
the whole file. The same records and reports serve the other data sources (data/sources.py), whose
examples are rows of a table or samples of a tar shard: `where_of` names them `file.parquet: row 12`
(0-based, as pyarrow counts) and `shard.tar: key 'abc'`, and their media may be a reference into the
bigger file (data/refs.py) instead of a Path, which every check here takes as well.

A missing audio file is not a parse error, since a manifest may be written before its audio is
fetched: `check_files` lists those. A training run that skips bad input passes a
`bad_lines` list: a row that cannot be read (invalid JSON, a missing key, a blank or invisible or
non-string caption, a CSV row with a missing cell) then becomes a `BadLine` there and is left out,
for the run to count and list in skipped.jsonl; whole-file problems are errors either way.

The records and reports (`Clip`, `BadLine`, `ManifestError`, `where_of`) live in data/records.py, the
checks of one file or text (`readable_file_problem`, `text_problem`) in data/input_checks.py; this module
re-exports them.
"""

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from common.errors import PathNotFound
from data.input_checks import file_problem, text_problem
from data.layouts import AudioLocation, AudioNotFound, DiskNames, find_file, locate, nfc, resolve_path
from data.records import BadLine, BadRow, Clip, ManifestError, refuse_or_collect

# re-exported: these were defined here first, and the data sources, tasks and tests import them from here
from data.input_checks import audio_header, readable_file_problem  # noqa: F401
from data.records import Media, entry_name, media_where  # noqa: F401  (the data modules import them from here)

CLOTHO_HEADER = ["file_name", "caption_1", "caption_2", "caption_3", "caption_4", "caption_5"]
AUDIOCAPS_HEADER = ["audiocap_id", "youtube_id", "start_time", "caption"]
AUDIOCAPS_NAMES = (
    "{youtube_id}_{start_time}",  # aac-datasets (`.flac`) and most download scripts
    "{youtube_id}",  # yt-dlp's default output template, %(id)s
    "{audiocap_id}",  # audiocaps-download (pip): one copy per caption row; its default suffix is .ogg
    "Y{youtube_id}",  # AudioSet's convention (PANNs' downloader), which AudioCaps clips come from
    "{youtube_id}_{start_ms}_{end_ms}",  # audiocaps-dl (xieh97): milliseconds, end = start + 10 s
    "Y{youtube_id}_{start_s}_{end_s}",  # AudioSet-derived sets (DESED): Y<id>_30.000_40.000
)
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")  # all decoded by soundfile (libsndfile >= 1.1)
JSON_SUFFIXES = (".jsonl", ".json")
MANIFEST_SUFFIXES = JSON_SUFFIXES + (".csv",)
CLIP_SECONDS = 10  # every AudioCaps clip is the 10 s from start_time on
FLAG_HINT = "the audio folder option (--train-audio-dir / --eval-audio-dir of train.py, --audio-dir of eval.py)"


@dataclass
class _Entry:
    """The rows of one clip before its folder is known."""
    line: int
    names: list[str]  # its file's possible names, best first: relative to the audio folder, or absolute
    captions: list[str]


def read_manifest(path, audio_dir=None, bad_lines: list[BadLine] | None = None) -> list[Clip]:
    """Parse a manifest (see the module docstring) into clips, in order of first appearance."""
    return load_manifest(path, audio_dir, bad_lines=bad_lines)[0]


def load_manifest(path, audio_dir=None, flag: str = FLAG_HINT,
                  bad_lines: list[BadLine] | None = None) -> tuple[list[Clip], AudioLocation]:
    """The clips of a manifest and where their audio was found. `flag` names the option that sets
    `audio_dir`, for the error raised when no folder holds the audio.

    A row that cannot be read (invalid JSON, a missing key, a blank, invisible or non-string caption, a CSV
    row with a missing cell) is a ManifestError naming its line; given a `bad_lines` list, it is
    appended there as a BadLine and left out instead, so a run that skips bad input can count and
    list it. Errors about the whole file (its header, its encoding, no readable row) are raised
    either way."""
    path = Path(path)
    if not path.is_file():
        raise PathNotFound(f"manifest not found: {path}; check the path (--train-data, --eval-data or --data)")
    suffix = path.suffix.lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise ManifestError(f"{path}: unknown manifest suffix {path.suffix!r}; use .jsonl (or .json) "
                            "with one JSON object a line, or a Clotho / AudioCaps .csv")
    text = read_utf8(path)
    skipped_before = len(bad_lines) if bad_lines is not None else 0
    if suffix in JSON_SUFFIXES:
        kind, entries = "JSON Lines", _jsonl_entries(path, text, bad_lines)
    else:
        kind, entries = _csv_entries(path, text, bad_lines)
    if not entries:
        skipped = bad_lines[skipped_before:] if bad_lines is not None else []
        raise ManifestError(f"{path}: the manifest holds no clips; add at least one row" if not skipped else
                            f"{path}: none of its {len(skipped)} rows can be read (the first, {skipped[0].where}: "
                            f"{skipped[0].reason})")
    disk = DiskNames()
    try:
        location = locate(path, kind, [entry.names for entry in entries], audio_dir, flag, disk)
    except AudioNotFound as error:
        raise ManifestError(str(error)) from error
    clips: dict[Path, Clip] = {}  # two spellings of one file (a/../b.wav, b.wav) stay one clip
    for entry in entries:
        audio = find_file(disk, location.folder, entry.names) or resolve_path(location.folder, entry.names[0])
        if audio in clips:
            clip = clips[audio]
            clips[audio] = Clip(audio, clip.captions + tuple(entry.captions), clip.source, clip.line)
        else:
            clips[audio] = Clip(audio, tuple(entry.captions), str(path), entry.line)
    return list(clips.values()), location


def check_files(clips: list[Clip]) -> list[tuple[Clip, str]]:
    """(clip, problem) for each clip whose audio file is missing or empty."""
    return [(clip, problem) for clip in clips if (problem := file_problem(clip.audio, "audio"))]


def read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # -sig: spreadsheets often prepend a byte-order mark
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ManifestError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start}); "
                            "re-save the manifest as UTF-8") from e


def _check_caption(caption, field: str) -> str:
    problem = text_problem(caption, field)
    if problem:
        raise BadRow(f"{problem}; give every clip real captions or remove the row")
    return caption


def json_lines(path: Path, text: str, example: str, bad_lines: list[BadLine] | None = None):
    """Yield (line number, "manifest:line", object) for each non-blank line of a JSON Lines text;
    a line that is not one JSON object is an error naming it (`example` shows a good line), or,
    given a `bad_lines` list, a BadLine appended there (`refuse_or_collect`)."""
    # split("\n"), not splitlines(): the latter also breaks at U+2028 and friends, which JSON
    # strings may hold literally, and would shift every later line number
    for line_no, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            refuse_or_collect(bad_lines, path, line_no, f"invalid JSON ({e.msg}, column {e.colno}); "
                              f"each line must hold one JSON object such as {example}")
            continue
        if not isinstance(row, dict):
            refuse_or_collect(bad_lines, path, line_no, f"expected a JSON object such as {example}, "
                              f"got a {type(row).__name__}")
            continue
        yield line_no, f"{path}:{line_no}", row


def read_examples(path, parse_row, example: str, kind: str, bad_lines: list[BadLine] | None = None) -> list:
    """The examples of a JSON Lines manifest with one example a line (InstructBLIP, audio-qa), in file
    order: `parse_row(row, line)` makes one or raises BadRow, which is an error naming the line, or,
    given a `bad_lines` list, a BadLine appended there. `example` shows a good line; `kind` names the
    manifest in messages."""
    path = Path(path)
    if not path.is_file():
        raise PathNotFound(f"manifest not found: {path}; check the path (--train-data, --eval-data or --data)")
    if path.suffix.lower() not in JSON_SUFFIXES:
        raise ManifestError(f"{path}: unknown manifest suffix {path.suffix!r}; {kind} manifest is .jsonl (or .json) "
                            f"with one JSON object a line, such as {example}")
    skipped_before = len(bad_lines) if bad_lines is not None else 0
    examples = []
    for line_no, _, row in json_lines(path, read_utf8(path), example, bad_lines):
        try:
            examples.append(parse_row(row, line_no))
        except BadRow as problem:
            refuse_or_collect(bad_lines, path, line_no, str(problem))
    if not examples:
        skipped = bad_lines[skipped_before:] if bad_lines is not None else []
        raise ManifestError(f"{path}: the manifest holds no examples; add lines such as {example}" if not skipped else
                            f"{path}: none of its {len(skipped)} lines can be read (the first, {skipped[0].where}: "
                            f"{skipped[0].reason})")
    return examples


def missing_keys(row: dict, required: tuple[str, ...], example: str) -> None:
    """BadRow naming the required keys a row lacks (and the usual misnaming, "question")."""
    missing = [key for key in required if key not in row]
    if missing:
        hint = ' (rename "question" to "prompt")' if "prompt" in missing and "question" in row else ""
        raise BadRow(f"missing {', '.join(map(json.dumps, missing))}{hint}; every line needs the keys "
                     f"{', '.join(map(json.dumps, required))}, as in {example}")
    for key in required:
        problem = text_problem(row[key], f'"{key}"')
        if problem:
            raise BadRow(f"{problem}; fill it in or remove the line")


def _add(entries: dict, key, line: int, names: list[str], captions: list[str]):
    """Rows with one key are one clip: the first row's line, every row's names and captions in order."""
    entry = entries.setdefault(key, _Entry(line, [], []))
    entry.names += [name for name in names if name not in entry.names]
    entry.captions += captions


def _name_key(name: str) -> str:
    # './a.wav' and 'a.wav', or an NFC and an NFD spelling, name one file
    return nfc(os.path.normpath(name))


def _jsonl_row(row: dict) -> tuple[str, list[str]]:
    """One JSON Lines row -> (audio path as written, captions); BadRow says what is wrong."""
    if "audio" not in row:
        raise BadRow('missing "audio" (the path of the clip\'s audio file); add it or remove the line')
    audio = row["audio"]
    if not isinstance(audio, str) or not audio.strip():
        raise BadRow(f'"audio" must be a non-empty path string, got {audio!r:.60}')
    if ("text" in row) == ("captions" in row):
        which = 'both "text" and' if "text" in row else 'neither "text" nor'
        raise BadRow(f'has {which} "captions"; give one caption as "text" or a list of them as "captions"')
    if "text" in row:
        return audio, [_check_caption(row["text"], '"text"')]
    captions = row["captions"]
    if not isinstance(captions, list) or not captions:
        raise BadRow(f'"captions" must be a non-empty list of strings, got {captions!r:.60}')
    return audio, [_check_caption(caption, f'"captions"[{k}]') for k, caption in enumerate(captions)]


def _jsonl_entries(path: Path, text: str, bad_lines: list[BadLine] | None = None) -> list[_Entry]:
    entries: dict[str, _Entry] = {}
    for line_no, _, row in json_lines(path, text, '{"audio": "a.wav", "text": "a dog barks"}', bad_lines):
        try:
            audio, captions = _jsonl_row(row)
        except BadRow as problem:
            refuse_or_collect(bad_lines, path, line_no, str(problem))
            continue
        _add(entries, _name_key(audio), line_no, [audio], captions)
    return list(entries.values())


def _csv_row(kind: str, cells: list[str], header: list[str], header_line: int) -> tuple:
    """One CSV row -> (the clip's key, its file names, its captions); BadRow says what is wrong."""
    if len(cells) != len(header):
        raise BadRow(f"{len(cells)} cells, but the header on line {header_line} has {len(header)}; "
                     "fill in every cell, and quote captions that contain commas")
    fields = dict(zip(header, cells))
    if kind == "Clotho":
        if not fields["file_name"]:
            raise BadRow('column "file_name" is empty; fill it in or remove the row')
        captions = [_check_caption(fields[name], f'column "{name}"') for name in header if name.startswith("caption_")]
        return _name_key(fields["file_name"]), [fields["file_name"]], captions
    for name in ("youtube_id", "start_time"):
        if not fields[name]:
            raise BadRow(f'column "{name}" is empty; fill it in or remove the row')
    caption = _check_caption(fields["caption"], 'column "caption"')
    # one clip per (youtube_id, start_time); each row adds its own audiocap_id name
    return (fields["youtube_id"], fields["start_time"]), audiocaps_names(fields), [caption]


def _csv_entries(path: Path, text: str, bad_lines: list[BadLine] | None = None) -> tuple[str, list[_Entry]]:
    records = []  # (first line of the record, cells); a quoted caption may span lines
    reader = csv.reader(io.StringIO(text))
    last_line = 0
    for cells in reader:
        first_line, last_line = last_line + 1, reader.line_num
        if any(cell.strip() for cell in cells):  # blank lines are layout, as in JSON Lines
            records.append((first_line, [cell.strip() for cell in cells]))
    if not records:
        raise ManifestError(f"{path}: the manifest is empty; expected a header row "
                            f"({','.join(CLOTHO_HEADER)} or {','.join(AUDIOCAPS_HEADER)})")

    header_line, header = records[0]
    column = {name: i for i, name in enumerate(header)}
    caption_columns = [name for name in header if name.startswith("caption_")]
    if "file_name" in column and caption_columns:
        kind = "Clotho"
    elif all(name in column for name in AUDIOCAPS_HEADER):
        kind = "AudioCaps"
    else:
        raise ManifestError(f"{path}:{header_line}: unknown CSV header {','.join(header)!r}; "
                            f"expected Clotho's {','.join(CLOTHO_HEADER)!r} or AudioCaps' "
                            f"{','.join(AUDIOCAPS_HEADER)!r}")

    entries: dict = {}
    for line_no, cells in records[1:]:
        try:
            key, names, captions = _csv_row(kind, cells, header, header_line)
        except BadRow as problem:
            refuse_or_collect(bad_lines, path, line_no, str(problem))
            continue
        _add(entries, key, line_no, names, captions)
    return kind, list(entries.values())


def audiocaps_names(fields: dict[str, str]) -> list[str]:
    """The file names a download tool may have given an AudioCaps row's clip, in AUDIOCAPS_NAMES order."""
    values = dict(fields)
    try:
        start = float(fields["start_time"])
    except ValueError:  # not a number: only the names that copy the cell as written
        start = None
    if start is not None:
        values.update(start_ms=round(start * 1000), end_ms=round((start + CLIP_SECONDS) * 1000),
                      start_s=f"{start:.3f}", end_s=f"{start + CLIP_SECONDS:.3f}")
    names = []
    for template in AUDIOCAPS_NAMES:
        try:
            stem = template.format(**values)
        except KeyError:
            continue
        names += [stem + suffix for suffix in AUDIO_SUFFIXES]
    return names
