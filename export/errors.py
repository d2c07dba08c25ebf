"""The export tool's error classes: each is one line for the user, never a traceback.

`python -m export` prints these as `error: ...` and exits non-zero; anything else is a bug and
keeps its traceback.
"""


class ExportError(Exception):
    """A user-facing failure of the export tool (bad input, bad files, a busy directory)."""


class ManifestError(ExportError, ValueError):
    """A manifest.json that is missing, not JSON, or not shaped like one this tool writes."""


class IntegrityError(ExportError):
    """Files that are not the ones their manifest describes (changed, missing, mixed)."""


class LockedError(ExportError):
    """Another process holds the export directory's lock."""


class DiskFullError(ExportError, OSError):
    """No space left on the device while writing an artifact."""


class ParamsError(ExportError, ValueError):
    """A file or flat parameter vector that does not fit the manifest's parameter layout."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message (TorchScript's errors start with a
    newline), or its type's name when it has none: what a one-line report can show."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]
