"""What every data source checks of an example before any work: that its media file is there and readable
(`file_problem`, `readable_file_problem`, with `audio_header` read once per file version) and that a text
has a visible character (`text_problem`). Each returns the problem as a sentence, or None. data/manifest.py
re-exports them all.
"""

import functools
import os
import unicodedata

import soundfile
from PIL import Image, UnidentifiedImageError

from data.records import Media
from data.refs import MediaRef, MemberRef, SourceChanged, container_of, media_input


def file_problem(path: Media, what: str) -> str | None:
    """Why `path` cannot be a data file (missing, not a file, empty), or None. No byte of it is read.
    For a reference into a bigger file: that file missing, or the member empty."""
    if isinstance(path, MediaRef):
        container = container_of(path)
        if not os.path.isfile(container):
            return f"{what} container file {container} not found"
        return f"{what} member is empty (0 bytes)" if isinstance(path, MemberRef) and path.size == 0 else None
    if not path.exists():
        return f"{what} file not found"
    if not path.is_file():
        return f"{what} path is not a regular file"
    if path.stat().st_size == 0:
        return f"{what} file is empty (0 bytes)"
    return None


def audio_header(path) -> tuple[int, int]:
    """(frames, sample rate) from an audio file's header, read once per file version: the check before
    training and --bucket-by-length's durations both ask, and a data set may hold 100k files. A
    reference's header is read from its bytes, once per version of its container."""
    if isinstance(path, MediaRef):
        stat = os.stat(container_of(path))
        return _embedded_audio_header(path, stat.st_size, stat.st_mtime_ns)
    stat = os.stat(path)
    return _audio_header(os.fspath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=1 << 20)
def _embedded_audio_header(ref, size: int, mtime_ns: int) -> tuple[int, int]:  # size, mtime: as _audio_header's
    info = soundfile.info(media_input(ref))
    return info.frames, info.samplerate


@functools.lru_cache(maxsize=1 << 20)
def _audio_header(path: str, size: int, mtime_ns: int) -> tuple[int, int]:  # size, mtime: a changed file is read anew
    info = soundfile.info(path)
    return info.frames, info.samplerate


def readable_file_problem(path: Media, what: str) -> str | None:
    """file_problem, then the header: an audio file's (soundfile.info), an image's (PIL's lazy open).
    Cheap, nothing is decoded: what train.py and eval.py check of every file before any work, so a
    file that is no audio (or image) at all stops the run at once, not after the first evaluation.
    Samples damaged past a readable header are still found only when a dataset decodes them."""
    problem = file_problem(path, what)
    if problem is not None:
        return problem
    if what == "audio":
        try:
            frames, _ = audio_header(path)
        except SourceChanged:  # not this clip's fault: the run must restart
            raise
        except (RuntimeError, OSError) as error:  # soundfile's LibsndfileError is a RuntimeError
            return f"audio file cannot be decoded ({error}); convert it to wav, flac or ogg"
        return "audio file holds 0 samples" if frames == 0 else None
    if what == "image":
        try:
            with Image.open(media_input(path)) as image:
                image.size  # noqa: B018 -- the header is parsed on open; size proves it was
        except (UnidentifiedImageError, OSError) as error:
            return f"image file cannot be read ({error})"
    return None



def text_problem(value, field: str) -> str | None:
    """Why `value` cannot be a caption (or a prompt, an answer), or None: not a string, blank, or
    without one visible character. Zero-width spaces, a byte-order mark, control characters and
    lone combining accents pass `str.strip()`, but tokenizers drop them all, and a text of special
    tokens alone would train on nothing without a word."""
    if not isinstance(value, str):
        return f"{field} must be a string, got {type(value).__name__} {value!r:.60}"
    if not value.strip():
        return f"{field} is empty"
    if not any(unicodedata.category(ch)[0] in "LNPS" for ch in value):  # letters, numbers, punctuation, symbols
        return (f"{field} has no visible character ({value!r:.60}: only spaces, control, zero-width or "
                "combining characters), so it tokenizes to nothing")
    return None
