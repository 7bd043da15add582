"""Audio-text manifests -> a list of clips, each with its captions and the manifest line it came from.

Three formats, chosen by the file's suffix and, for CSV, by its header row:

- JSON Lines (`.jsonl` or `.json`): one object a line, `{"audio": "clips/a.wav", "text": "a dog
  barks"}` or `{"audio": "clips/a.wav", "captions": ["a dog barks", "barking"]}`. Other keys are
  ignored. Rows naming the same audio file form one clip, their captions merged in file order.
  Whitespace-only lines are skipped: they are layout, not data, so nothing is lost.
- Clotho CSV: header `file_name,caption_1,...,caption_5`, one row a clip.
- AudioCaps CSV: header `audiocap_id,youtube_id,start_time,caption`, one row a caption; the rows
  of one (youtube_id, start_time) form one clip.

Relative audio paths are resolved against `audio_dir`, which defaults to the manifest's folder.
Clotho and AudioCaps keep their audio in a folder of their own (Clotho's
`clotho_captions_development.csv` sits beside `development/`): pass that folder as `audio_dir`.
AudioCaps ships no audio, and each download tool names the files differently, so a clip's file
is the first of AUDIOCAPS_NAMES x AUDIO_SUFFIXES that exists in `audio_dir`, or else the first
name (`<youtube_id>_<start_time>.wav`), which `check_files` then reports as missing.

Every error starts with `manifest:line:` (1-based). A missing audio file is not a parse error,
since a manifest may be written before its audio is fetched: `check_files` lists those.
"""

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

CLOTHO_HEADER = ["file_name", "caption_1", "caption_2", "caption_3", "caption_4", "caption_5"]
AUDIOCAPS_HEADER = ["audiocap_id", "youtube_id", "start_time", "caption"]
AUDIOCAPS_NAMES = ("{youtube_id}_{start_time}", "{youtube_id}", "{audiocap_id}")
AUDIO_SUFFIXES = (".wav", ".flac")
JSON_SUFFIXES = (".jsonl", ".json")


class ManifestError(ValueError):
    """A manifest that cannot be read as written; the message starts with `manifest:line:`."""


@dataclass(frozen=True)
class Clip:
    audio: Path  # absolute, so a clip means the same file from any working directory
    captions: tuple[str, ...]  # at least one, none blank
    source: str  # the manifest's path, for messages
    line: int  # 1-based line of the clip's first row in the manifest

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def read_manifest(path, audio_dir=None) -> list[Clip]:
    """Parse a manifest (see the module docstring) into clips, in order of first appearance."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in JSON_SUFFIXES + (".csv",):
        raise ManifestError(f"{path}: unknown manifest suffix {path.suffix!r}; use .jsonl (or .json) "
                            "with one JSON object a line, or a Clotho / AudioCaps .csv")
    base = Path(audio_dir) if audio_dir is not None else path.parent
    text = read_utf8(path)
    rows = _jsonl_rows(path, text, base) if suffix in JSON_SUFFIXES else _csv_rows(path, text, base)
    if not rows:
        raise ManifestError(f"{path}: the manifest holds no clips; add at least one row")
    return _group(rows, str(path))


def file_problem(path: Path, what: str) -> str | None:
    """Why `path` cannot be a data file (missing, not a file, empty), or None. Cheap: no decoding,
    so an undecodable file is found only when a dataset decodes it."""
    if not path.exists():
        return f"{what} file not found"
    if not path.is_file():
        return f"{what} path is not a regular file"
    if path.stat().st_size == 0:
        return f"{what} file is empty (0 bytes)"
    return None


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


def resolve_path(base: Path, audio: str) -> Path:
    # abspath, not resolve(): keep symlinked dataset folders as the user wrote them in messages
    return Path(os.path.abspath(base / audio))


def _check_caption(caption, where: str, field: str) -> str:
    if not isinstance(caption, str):
        raise ManifestError(f"{where}: {field} must be a string, got {type(caption).__name__} "
                            f"{caption!r:.60}")
    if not caption.strip():
        raise ManifestError(f"{where}: {field} is empty; give every clip real captions or remove the row")
    return caption


def json_lines(path: Path, text: str, example: str):
    """Yield (line number, "manifest:line", object) for each non-blank line of a JSON Lines text;
    a line that is not one JSON object is an error naming it (`example` shows a good line)."""
    # split("\n"), not splitlines(): the latter also breaks at U+2028 and friends, which JSON
    # strings may hold literally, and would shift every later line number
    for line_no, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{where}: invalid JSON ({e.msg} at column {e.colno}); "
                                "each line must hold one JSON object") from e
        if not isinstance(row, dict):
            raise ManifestError(f"{where}: expected a JSON object such as {example}, got a {type(row).__name__}")
        yield line_no, where, row


def _jsonl_rows(path: Path, text: str, base: Path) -> list[tuple[int, Path, list[str]]]:
    rows = []  # (line, audio path, captions)
    for line_no, where, row in json_lines(path, text, '{"audio": "a.wav", "text": "a dog barks"}'):
        if "audio" not in row:
            raise ManifestError(f'{where}: missing "audio" (the path of the clip, relative to '
                                f"{base})")
        audio = row["audio"]
        if not isinstance(audio, str) or not audio.strip():
            raise ManifestError(f'{where}: "audio" must be a non-empty path string, got {audio!r:.60}')
        if ("text" in row) == ("captions" in row):
            which = 'both "text" and' if "text" in row else 'neither "text" nor'
            raise ManifestError(f'{where}: has {which} "captions"; give one caption as "text" or '
                                'a list of them as "captions"')
        if "text" in row:
            captions = [_check_caption(row["text"], where, '"text"')]
        else:
            captions = row["captions"]
            if not isinstance(captions, list) or not captions:
                raise ManifestError(f'{where}: "captions" must be a non-empty list of strings, '
                                    f"got {captions!r:.60}")
            for k, caption in enumerate(captions):
                _check_caption(caption, where, f'"captions"[{k}]')
        rows.append((line_no, resolve_path(base, audio), list(captions)))
    return rows


def _csv_rows(path: Path, text: str, base: Path) -> list[tuple[int, Path, list[str]]]:
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
    names_in_dir = set(os.listdir(base)) if base.is_dir() else set()
    audiocaps_files = {}  # (youtube_id, start_time) -> audio path

    rows = []
    for line_no, cells in records[1:]:
        where = f"{path}:{line_no}"
        if len(cells) != len(header):
            raise ManifestError(f"{where}: {len(cells)} cells, but the header on line {header_line} "
                                f"has {len(header)}; quote captions that contain commas")
        if kind == "Clotho":
            audio = cells[column["file_name"]]
            if not audio:
                raise ManifestError(f'{where}: column "file_name" is empty')
            captions = [_check_caption(cells[column[name]], where, f'column "{name}"')
                        for name in caption_columns]
            rows.append((line_no, resolve_path(base, audio), captions))
        else:
            fields = {name: cells[column[name]] for name in AUDIOCAPS_HEADER}
            for name in ("youtube_id", "start_time"):
                if not fields[name]:
                    raise ManifestError(f'{where}: column "{name}" is empty')
            caption = _check_caption(fields["caption"], where, 'column "caption"')
            # the clip's first row names its file: later rows carry other audiocap_ids
            clip_key = (fields["youtube_id"], fields["start_time"])
            if clip_key not in audiocaps_files:
                audiocaps_files[clip_key] = resolve_path(base, _audiocaps_file(fields, names_in_dir))
            rows.append((line_no, audiocaps_files[clip_key], [caption]))
    return rows


def _audiocaps_file(fields: dict[str, str], names_in_dir: set[str]) -> str:
    candidates = [name.format(**fields) + suffix for name in AUDIOCAPS_NAMES for suffix in AUDIO_SUFFIXES]
    return next((name for name in candidates if name in names_in_dir), candidates[0])


def _group(rows: list[tuple[int, Path, list[str]]], source: str) -> list[Clip]:
    """Rows naming the same audio file -> one clip: first row's line, captions in file order."""
    first_line, captions = {}, {}
    for line, audio, row_captions in rows:
        first_line.setdefault(audio, line)
        captions.setdefault(audio, []).extend(row_captions)
    return [Clip(audio, tuple(captions[audio]), source, line) for audio, line in first_line.items()]
