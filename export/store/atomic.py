"""Write-then-rename, so an interrupted write never leaves a partial file under its name."""

import errno
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from export.errors import DiskFullError, ExportError

#: every temporary file this tool writes ends so; `verify` reports leftovers as stray
TMP_SUFFIX = ".tmp"


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it into place only if the block succeeds."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=TMP_SUFFIX, dir=final.parent)
    except OSError as exc:
        raise _disk_full(exc, final) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts are shared files
        os.replace(tmp_path, final)
    except OSError as exc:
        raise _disk_full(exc, final) from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _disk_full(exc: OSError, path: Path) -> OSError:
    """ENOSPC becomes a one-line DiskFullError naming the file; other OSErrors stay as they are."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"no space left on device writing {path}")
    return exc


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(final: Path, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def write_json(final: Path, report: Any) -> None:
    """A JSON report (bench, accuracy, loadtest), indented, written atomically."""
    atomic_write_bytes(Path(final), (json.dumps(report, indent=2) + "\n").encode())


def check_writable_dir(path: Path) -> Path:
    """Create `path` if needed; one-line error if it cannot hold files."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test.", suffix=TMP_SUFFIX)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"no space left on device writing {path}") from None
        raise ExportError(f"output directory {str(path)!r} is not writable ({exc.strerror})") from None
    return path
