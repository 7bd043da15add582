"""Audio that is not in a caption manifest: a folder to search, and labelled clips to classify.

    find_audio_files("clips/")              every audio file under the folder, recursively, sorted
    read_labelled_audio("ESC-50-classes/")  [(path, label)]: ROOT/<label>/**/*.wav, one folder a class
    read_labelled_audio("labels.csv")       [(path, label)]: a CSV with a filename and a label column
    label_text("chirping_birds")            "chirping birds": what a prompt template receives

A file counts as audio when its suffix (any case) names a format this build of soundfile reads
(AUDIO_SUFFIXES: .wav .flac .ogg .mp3 .aiff ...). Names starting with "." are skipped, files and
folders alike: hidden folders (.git) and macOS's "._x.wav" resource forks are not audio. The order
is the sorted relative POSIX path, so the same folder gives the same list on every machine.

CSV layout: a header row naming the file column (`filename`, `file_name` or `path`) and the label
column (`label`, `category` or `class`; ESC-50's meta/esc50.csv has `filename` and `category`).
Paths are relative to the CSV's folder, or to `audio_dir` when given (ESC-50 keeps its clips in
`audio/` beside `meta/`). Every error names the file and line.
"""

import csv
import os
from pathlib import Path

import soundfile as sf

from common.errors import PathNotFound

# The suffixes of each soundfile format worth walking for; only the formats this build reads count.
SUFFIXES_BY_FORMAT = {
    "WAV": (".wav", ".wave"), "FLAC": (".flac",), "OGG": (".ogg", ".oga", ".opus"), "MP3": (".mp3",),
    "AIFF": (".aiff", ".aif", ".aifc"), "AU": (".au", ".snd"), "CAF": (".caf",), "W64": (".w64",), "RF64": (".rf64",),
}
AUDIO_SUFFIXES = frozenset(suffix for name, suffixes in SUFFIXES_BY_FORMAT.items()
                           if name in sf.available_formats() for suffix in suffixes)
FILE_COLUMNS = ("filename", "file_name", "path")
LABEL_COLUMNS = ("label", "category", "class")


def find_audio_files(folder) -> list[Path]:
    """Every audio file under `folder` (recursively, hidden names skipped), sorted by relative path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PathNotFound(f"{folder} is not a folder; check --audio-dir")
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # os.walk descends only into what is left
        found += [Path(parent, f) for f in files if not f.startswith(".") and Path(f).suffix.lower() in AUDIO_SUFFIXES]
    return sorted(found, key=lambda path: path.relative_to(folder).as_posix())


def label_text(label: str) -> str:
    """A class name as words: '_' and '-' become spaces ('chirping_birds' -> 'chirping birds')."""
    return " ".join(label.replace("_", " ").replace("-", " ").split())


def read_labelled_audio(source, audio_dir=None) -> list[tuple[Path, str]]:
    """(audio file, label) pairs from a class-folder root or a CSV; see the module docstring."""
    source = Path(source)
    if source.is_dir():
        return _class_folders(source)
    if source.is_file() and source.suffix.lower() == ".csv":
        return _label_csv(source, Path(audio_dir) if audio_dir is not None else source.parent)
    raise PathNotFound(f"{source} is neither a folder of class folders (ROOT/<label>/*.wav) nor a .csv file")


def _class_folders(root: Path) -> list[tuple[Path, str]]:
    pairs = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        pairs += [(path, folder.name) for path in find_audio_files(folder)]
    if not pairs:
        loose = [p for p in find_audio_files(root) if p.parent == root]
        hint = f" ({len(loose)} audio files sit directly in it: put each class in a folder of its own)" if loose else ""
        raise ValueError(f"{root} holds no class folder with audio files in it{hint}")
    return pairs


def _label_csv(path: Path, base: Path) -> list[tuple[Path, str]]:
    with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: a spreadsheet's BOM is not part of the header
        rows = list(csv.reader(f))
    header = [name.strip().lower() for name in rows[0]] if rows else []
    file_col = next((header.index(c) for c in FILE_COLUMNS if c in header), None)
    label_col = next((header.index(c) for c in LABEL_COLUMNS if c in header), None)
    if file_col is None or label_col is None:
        raise ValueError(f"{path}:1: the header must name a file column ({' / '.join(FILE_COLUMNS)}) and a label "
                         f"column ({' / '.join(LABEL_COLUMNS)}); it is {rows[0] if rows else 'empty'}")
    pairs = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue  # a blank line is layout
        if len(row) <= max(file_col, label_col) or not row[file_col].strip() or not row[label_col].strip():
            raise ValueError(f"{path}:{line}: expected a file name and a label, got {row}")
        pairs.append((base / row[file_col].strip(), row[label_col].strip()))
    if not pairs:
        raise ValueError(f"{path}: no rows below the header")
    return pairs
