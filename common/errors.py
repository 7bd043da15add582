"""The one line between a user's mistake and a bug.

train.py and eval.py print a `UserError` as a single `error: <message>` line and exit with 2; any
other exception is a bug in this toolkit and keeps its traceback (as does every error with
`--debug`). So a message raised as a UserError must stand on its own: the file, line, flag, module
path or hub id at fault, and what to do about it.
"""


class UserError(Exception):
    """A mistake the user can fix: a path, a flag, a file's content, a model that is not there.
    Subclasses also derive from the builtin the caller would expect (ValueError, FileNotFoundError),
    so `except ValueError` around a loader keeps working."""


class PathNotFound(UserError, FileNotFoundError):
    """A file or folder the user named (a manifest, a run directory, an audio folder) is not there."""


def user_message(error: BaseException) -> str:
    """The error's own message. Raised in a DataLoader worker, an exception reaches the main process
    rebuilt around the worker's traceback, whose last line is the original `module.Type: message`:
    that line's message is what the user needs."""
    text = str(error).strip()
    if "Original Traceback" not in text:
        return text
    return text.splitlines()[-1].split(": ", 1)[-1]
