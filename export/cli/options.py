"""Command-line values: parsing and the one-line errors for bad ones (the library's functions
take typed values and check only what they must)."""

import re
from typing import List, Optional, Sequence

from export.errors import ExportError
from export.pipeline.build import check_aoti_batches, check_choices


class CliError(ExportError):
    """A one-line user error of the command line: printed as `error: ...`, exit status 2."""


def check_option(flag: str, value: object, ok: bool, allowed: str) -> None:
    """A command-line value that is not allowed: one line naming it and what is."""
    if not ok:
        shown = f"{value:g}" if isinstance(value, float) else value
        raise ExportError(f"{flag} {shown} is not allowed; expected {allowed}")


def parse_list(text: str, allowed: Sequence[str], what: str) -> List[str]:
    """'a,b' -> ['a', 'b'] in canonical order; one-line error naming a bad value."""
    return check_choices([t.strip() for t in text.split(",") if t.strip()], allowed, what)


def parse_aoti_batches(text: str) -> List[Optional[int]]:
    """'dynamic,1,64' -> [None, 1, 64]: the AOTInductor packages to build per mode."""
    batches: List[Optional[int]] = []
    for item in (t.strip() for t in text.split(",")):
        if item == "dynamic":
            batches.append(None)
            continue
        try:
            batches.append(int(item))
        except ValueError:
            raise ExportError(f"--aoti-batch {item!r}: expected batch sizes and/or 'dynamic', "
                              "e.g. 1,64 or dynamic,1") from None
    return check_aoti_batches(batches)


#: names an export directory may not have: a name, not a path
_BAD_NAME = re.compile(r"^\.|[/\\\x00]")


def check_dir_name(name: str) -> str:
    """`--name` is one directory name: no separators, not `.`/`..`, not hidden, not empty."""
    if not name or _BAD_NAME.search(name) or name in (".", ".."):
        raise ExportError(f"--name {name!r} is not a plain directory name (no '/', not starting "
                          "with '.'); the directory is created under --out")
    return name
