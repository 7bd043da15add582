"""Where a manifest's audio is: the folders public audio-text sets ship their audio in.

Relative paths resolve against `audio_dir` when it is given (the scripts'
`--train-audio-dir`, `--eval-audio-dir`, `--audio-dir`), used as is. Without it, a JSON Lines
manifest's paths are relative to the manifest's folder, as written. A CSV names bare files, and the
public sets keep them in a folder of their own, so `load_manifest` looks where each set ships them
and takes the folder only if it holds at least half of the manifest's files (the most, if several
do; the manifest's own folder first on a tie). `location.note` then says where it looked and what
it found; if no folder qualifies, a ManifestError lists every folder tried and the flag to pass.

    Clotho (Zenodo archives,                AudioCaps (CSVs from github.com/cdjkim/audiocaps,
    clotho_captions_<split>.csv)            <split>.csv, audio from a download tool)
    clotho/                                 audiocaps/
    ├── clotho_captions_development.csv     ├── train.csv  val.csv  test.csv
    ├── development/   <- 7z extracts here  ├── train/ val/ test/   audiocaps-download, audiocaps-dl
    ├── clotho_captions_evaluation.csv      ├── audio/<split>/      aac-datasets <= 0.3
    └── evaluation/                         └── audio_32000Hz/<split>/   aac-datasets >= 0.4
    (also clotho_csv_files/ beside          (also the CSVs in a subfolder: dataset/, csv_files_v1/,
    clotho_audio_files/<split>/)            with the audio folders beside it)

CLOTHO_FOLDERS and AUDIOCAPS_FOLDERS list them; `val` also finds `valid/` and `validation/`.
AudioCaps ships no audio, and each download tool names a clip's file its own way
(data/manifest.py AUDIOCAPS_NAMES x AUDIO_SUFFIXES): a clip's file is the first of those that exists, or else the
first name (`<youtube_id>_<start_time>.wav`), which `check_files` then reports as missing.

Names on disk are matched up to Unicode normalisation: archives made on macOS store `café.wav` as
NFD (`cafe` + a combining accent) while the CSV spells it NFC; on Linux those are different
names, so a name is looked up exactly first and then by its NFC form, and the clip gets the name
as it is on disk.
"""

import glob
import math
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

# Where each set's audio is, relative to the CSV's folder; "{split}" comes from the CSV's name.
CLOTHO_FOLDERS = ("{split}", "clotho_audio_{split}", "audio/{split}", "../clotho_audio_files/{split}",
                  "../{split}", "../audio/{split}")
AUDIOCAPS_FOLDERS = ("{split}", "audio/{split}", "audio_*/{split}", "audio", "../{split}", "../audio/{split}",
                     "../audio_*/{split}", "../audio")
SPLIT_ALIASES = {"val": ("val", "valid", "validation"), "valid": ("valid", "val", "validation"),
                 "validation": ("validation", "val", "valid"), "train_v2": ("train_v2", "train")}


class AudioNotFound(ValueError):
    """No folder holds the manifest's audio; the message lists the folders tried (data/manifest.py
    turns it into a ManifestError)."""


@dataclass(frozen=True)
class AudioLocation:
    """Where a manifest's relative audio paths were resolved, and why there."""
    manifest: str
    folder: Path  # absolute
    how: str  # "given", "beside the manifest", "Clotho layout" or "AudioCaps layout"
    found: int  # clips whose audio file exists in `folder`
    total: int  # clips in the manifest

    @property
    def note(self) -> str | None:
        """One line for the log when the folder was found by looking in a dataset's layout, else None."""
        if not self.how.endswith("layout"):
            return None
        return f"audio of {self.manifest} found in {self.folder} ({self.how}: {self.found} of {self.total} files)"


def resolve_path(base: Path, audio: str) -> Path:
    # abspath, not resolve(): keep symlinked dataset folders as the user wrote them in messages
    return Path(os.path.abspath(Path(base) / audio))


def nfc(name: str) -> str:
    return unicodedata.normalize("NFC", name)


class DiskNames:
    """Finds a file by name, exactly or up to Unicode normalisation, listing each folder once.

    One listing per folder instead of a stat per candidate name: AudioCaps' 46k clips times
    24 candidate names in several folders would otherwise be a million system calls."""

    def __init__(self):
        self._listings: dict[Path, tuple[set[str], dict[str, str]] | None] = {}

    def _listing(self, folder: Path):
        if folder not in self._listings:
            try:
                names = os.listdir(folder)
            except OSError:  # missing, not a folder, or not readable
                self._listings[folder] = None
            else:
                self._listings[folder] = (set(names), {nfc(name): name for name in names})
        return self._listings[folder]

    def find(self, path: Path) -> Path | None:
        """`path` (absolute) as it is spelled on disk, or None if nothing exists there."""
        if path.parent == path:  # the file system's root
            return path if path.exists() else None
        parent = path.parent
        if self._listing(parent) is None:
            if os.path.isdir(parent):  # a folder we may enter but not list
                return path if os.path.lexists(path) else None
            parent = self.find(parent)  # the folder itself may be spelled in another normalisation
            if parent is None:
                return None
        return self.find_in(parent, path.name)

    def find_in(self, folder: Path, name: str) -> Path | None:
        """`folder / name` as spelled on disk, for a bare file name; None if absent or unlistable."""
        listing = self._listing(folder)
        if listing is None:
            return None
        exact, by_nfc = listing
        if name in exact:
            return folder / name
        on_disk = by_nfc.get(nfc(name))
        return folder / on_disk if on_disk is not None else None


def find_file(disk: DiskNames, folder: Path, names: list[str]) -> Path | None:
    """The first of `names` that exists under `folder` (absolute names: anywhere), as spelled on disk."""
    for name in names:
        if "/" in name or os.sep in name:  # a path: resolved component by component
            found = disk.find(resolve_path(folder, name))
        else:  # a bare name (every CSV's): one lookup in the folder's listing
            found = disk.find_in(folder, name)
        if found is not None:
            return found
    return None


def split_of(path: Path, kind: str) -> str | None:
    """The split a CSV's name says it holds: clotho_captions_<split>.csv, AudioCaps' <split>.csv."""
    if kind == "Clotho":
        match = re.fullmatch(r"clotho_captions_(\w+)", path.stem, flags=re.IGNORECASE)
        return match.group(1) if match else None
    return path.stem  # AudioCaps: train.csv, val.csv, test.csv


def layout_folders(path: Path, kind: str) -> list[Path]:
    """The folders where `kind`'s audio ships, relative to the CSV at `path` (globs expanded)."""
    split = split_of(path, kind)
    if split is None:
        return []
    templates = CLOTHO_FOLDERS if kind == "Clotho" else AUDIOCAPS_FOLDERS
    folders = []
    for template in templates:
        for name in SPLIT_ALIASES.get(split, (split,)) if "{split}" in template else ("",):
            relative = template.replace("{split}", name)
            if "*" in relative:  # audio_32000Hz: the sample rate is part of the folder's name
                folders += sorted(Path(p) for p in glob.glob(os.path.join(glob.escape(str(path.parent)), relative)))
            else:
                folders.append(path.parent / relative)
    folders = [Path(os.path.abspath(folder)) for folder in folders]
    return list(dict.fromkeys(folders))


def locate(path: Path, kind: str, names: list[list[str]], audio_dir, flag: str, disk: DiskNames) -> AudioLocation:
    """Choose the folder that relative audio paths resolve against (see the module docstring).
    `names` holds each clip's possible file names, best first; `flag` is named when none qualifies."""
    def found_in(folder: Path) -> int:
        if not os.path.isdir(folder):
            return 0
        return sum(find_file(disk, folder, clip) is not None for clip in names)

    def location(folder: Path, how: str, found: int | None = None) -> AudioLocation:
        return AudioLocation(str(path), folder, how, found_in(folder) if found is None else found, len(names))

    beside = Path(os.path.abspath(path.parent))
    if audio_dir is not None:
        return location(Path(os.path.abspath(audio_dir)), "given")
    if kind == "JSON Lines":  # its paths are relative to the manifest by definition
        return location(beside, "beside the manifest")
    tried = [(beside, "beside the manifest", found_in(beside))]
    if tried[0][2] < len(names):  # unless the manifest's folder holds every file, look where the set ships it
        tried += [(folder, f"{kind} layout", found_in(folder))
                  for folder in layout_folders(path, kind) if folder != beside]
    folder, how, found = max(tried, key=lambda t: t[2])  # max keeps the first of equals: the manifest's folder
    if found >= max(1, math.ceil(len(names) / 2)):
        return location(folder, how, found)

    example = names[0][0]
    lines = [f"{path}: " + (f"none of its {len(names)} audio files (the first: {example!r}) exist in the folders tried"
                            if found == 0 else
                            f"only {found} of its {len(names)} audio files were found, the most in {folder}")]
    lines += [f"  {f}  ({h}): {n} found" if os.path.isdir(f) else f"  {f}  ({h}): no such folder" for f, h, n in tried]
    if split_of(path, kind) is None:
        lines.append(f"  (a {kind} CSV named " + ("clotho_captions_<split>.csv" if kind == "Clotho" else "<split>.csv")
                     + " is also looked for in its split's folder)")
    lines.append(f"pass the folder that holds them with {flag}" + ("" if found == 0 else
                 " (a folder given so is used as is, and the files missing there are listed with their lines)"))
    raise AudioNotFound("\n".join(lines))
