"""Typed errors for the whole project, in one place.

`BadInputError` is what a user can fix (an unknown name, a value out of range, a file that is
missing or malformed); the command line turns it into one line and exit status 2. Anything else
is a bug or an environment failure and keeps its traceback.
"""

import re
from pathlib import Path

_FIELD = re.compile(r"`([a-z][a-z0-9_]*)`")  # an option's field, named in a BadInputError's message


class PruningError(Exception):
    """Base class of every error this project raises on purpose."""


class BadInputError(PruningError, ValueError):
    """Input the user can correct. The message names the bad value and what would be valid, and
    an option by its field in backticks (`` `epochs` 0 must be at least 1 ``): `str()` shows the
    field's name, as the Python API and the Prefect UI's form know it (epochs 0 must be at least
    1); `as_flags()` shows the command line's flag (--epochs 0 must be at least 1)."""

    def __str__(self) -> str:
        return _FIELD.sub(r"\1", super().__str__())

    def as_flags(self) -> str:
        """The message with every field named as its command-line flag (prune_ratio: --prune-ratio)."""
        return _FIELD.sub(lambda m: "--" + m[1].replace("_", "-"), super().__str__())


def renamed_fields(exc: BadInputError, names: dict[str, str]) -> BadInputError:
    """`exc` again, of its type, with the fields its message names renamed by `names` (`model` →
    `train_model`): a check of one option reused for another names the option the user gave."""
    return type(exc)(_FIELD.sub(lambda m: f"`{names.get(m[1], m[1])}`", exc.args[0]))


class DatasetError(BadInputError):
    """A dataset that cannot be found, read, or is malformed (NaN, mismatched lengths, ...)."""


class CheckpointError(BadInputError):
    """A checkpoint that is corrupt, unsafe to load, or made for another model."""


class ArgumentsMismatchError(PruningError):
    """A folder already holds results computed with different arguments; they will not be mixed."""


class CommitConflictError(PruningError):
    """A version could not be committed: concurrent writers kept winning the race for the table."""


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def first_line(exc: BaseException, limit: int = 200, raw: bool = False) -> str:
    """The first line of an exception's message (its type's name if it has none), at most
    `limit` characters (a longer one cut at a space, '…' marking the cut): the reason inside a
    one-line error. A chain of causes written one a line, each marked '↳' (delta-rs's object-store
    errors: "Generic LocalFileSystem error / ↳ Requested range was invalid / ↳ Wanted range …"),
    gives its last, the most specific. `raw`: a BadInputError's fields stay marked, for a message
    that quotes it and is rendered as a whole (`as_flags()` then names them as flags too)."""
    text = exc.args[0] if raw and isinstance(exc, BadInputError) and exc.args and isinstance(exc.args[0], str) \
        else str(exc)
    lines = [_ANSI.sub("", line).strip() for line in text.strip().splitlines()] or [type(exc).__name__]
    causes = [line.removeprefix("↳").strip() for line in lines[1:] if line.startswith("↳")]
    line = causes[-1] if causes and causes[-1] else lines[0]
    if len(line) <= limit:
        return line
    cut = line[:limit - 1]
    return (cut.rsplit(" ", 1)[0] if " " in cut[limit // 2:] else cut).rstrip(" ,;:") + "…"


def no_file(path) -> str:
    """Why `path`, which is not a file, cannot be read as one: the reason inside a one-line error."""
    return "is a folder, not a file" if Path(path).is_dir() else "file not found"
