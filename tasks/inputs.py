"""A task's input: its data read from any source (a manifest, a Hugging Face dataset on disk, WebDataset
shards: data/sources.py) with the run's column choices, and what every task does with bad input found before
training or evaluation begins: name it, then stop or skip it, counted and listed. Examples are checked up
front (files readable, texts within their token budgets), so a bad one is named by its manifest line, table
row or shard key before any model runs."""

import hashlib
import sys
from pathlib import Path

from common.errors import UserError
from common.run_config import RunConfig
from data.audio_text import Skipped
from data.sources import Source, read_source
from engine.training import TrainingError


def resolved(path: str | None) -> str | None:
    return str(Path(path).resolve()) if path else None


def read_data(config: RunConfig, path: str, media_dir=None, bad_lines: list | None = None,
              flag: str | None = None) -> Source:
    """The examples of `path` for the run's task, whatever the source, read with the run's --*-column choices;
    shards are indexed once under the cache folder. Lines that cannot be read go to `bad_lines` (else: an error)."""
    data = config.data
    columns = dict(audio_column=data.audio_column, text_column=data.text_column, image_column=data.image_column,
                   prompt_column=data.prompt_column, answer_column=data.answer_column)
    extra = dict(flag=flag) if flag else {}
    return read_source(path, config.task, media_dir=media_dir, bad_lines=bad_lines, **extra,
                       index_dir=Path(data.cache_dir) / "shard-index" if data.cache_dir else None,
                       **{name: value for name, value in columns.items() if value is not None})


def data_fingerprint(source: Source) -> str:
    """What identifies the training data: a manifest's bytes (an edited manifest is another run); for tables and
    shards, each file's name and size (their content is too large to hash at every start)."""
    if source.format == "manifest":
        return hashlib.sha256(Path(source.files[0]).read_bytes()).hexdigest()
    digest = hashlib.sha256()
    for name in source.files:
        digest.update(f"{Path(name).name}\0{Path(name).stat().st_size}\n".encode())
    return digest.hexdigest()


def report_problems(problems, manifest: str, policy: str, role: str, what: str, flag: str, say) -> list[Skipped]:
    """(item, reason) problems found before training: an error naming them, or, when skipping,
    the Skipped entries to count and list in skipped.jsonl. An item with a file (a clip's audio,
    an example's image) is listed under that file, counted once however many lines name it; any
    other (a data.manifest.BadLine: a line that cannot be read, or a text over its budget) under
    its `manifest:line`."""
    problems = sorted(problems, key=lambda problem: problem[0].line)  # in file order: the first is the error's
    for item, reason in problems[:10]:
        say(f"  {item.where}: {reason}")
    if problems and (policy == "fail" or role == "eval"):
        (first, reason), more = problems[0], len(problems) - 1
        raise TrainingError(f"{first.where}: {reason}"
                            + (f" (and {more} more {role} {what}(s), listed above)" if more else "")
                            + f"; fix {manifest}" + (f" or pass {flag} skip" if role == "train" else ""))
    if problems:
        say(f"skipping {len(problems)} unreadable train {what}(s) of {manifest}")
    return [Skipped(str(getattr(item, "audio", None) or getattr(item, "image", None) or item.where), item.line, reason)
            for item, reason in problems]


def refuse_unreadable(problems: list, data: str, what: str):
    """Evaluation needs every example: the unreadable ones listed (up to 10) on stderr, then one error."""
    if not problems:
        return
    for item, reason in problems[:10]:
        print(f"{item.where}: {reason}: {getattr(item, what)}", file=sys.stderr)
    raise UserError(f"{len(problems)} example(s) of {data} cannot be read (listed above); fix the manifest: evaluation "
                    f"needs every {what} file")
