"""An export directory is replaced whole or not at all.

A new set of artifacts is built in a staging directory beside the target
(`.<name>.staging-*`), and swapped in only when the caller commits, i.e. after every file has
passed verification. The swap is one `renameat2(RENAME_EXCHANGE)` where the kernel and file
system offer it (Linux), else two renames whose gap the next run repairs. So a failed, killed
(SIGKILL at any instruction) or interrupted run leaves the previous complete set and its
manifest as they were. A lock file (`.<name>.lock`, `flock`) keeps two writers apart; the
holder's pid is in it. Leftovers of killed runs are removed by the next run that takes the lock.
"""

import ctypes
import errno
import logging
import os
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Iterator, Optional, Tuple, Type

from export.errors import ExportError, LockedError
from export.store.atomic import TMP_SUFFIX, _disk_full, _umask, check_writable_dir
from export.store.manifest import MANIFEST, VERSIONS_DIR, Manifest, read_manifest, write_manifest

log = logging.getLogger(__name__)

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths; False where the system cannot (then nothing changed)."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


class DirectoryLock:
    """An exclusive, non-blocking `flock` on `<parent>/.<name>.lock`, holding the owner's pid."""

    def __init__(self, target: Path) -> None:
        self.path = target.parent / f".{target.name}.lock"
        self.target = target
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockedError(f"{self.target} is locked by pid {owner} (another export or "
                              "quantize is writing it); wait for it to finish or stop it") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (removing it would race)
            self._fd = None


class DirectoryTransaction:
    """`with DirectoryTransaction(target) as tx:` write into `tx.staging`, then `tx.commit()`.

    Leaving the block without `commit()` (an error, a failed verification, SIGINT or SIGTERM)
    removes the staging directory and leaves `target` untouched. `keep_existing=True` starts
    the staging directory as a hard-linked copy of the current set (for commands that add files
    to an export, e.g. quantize); files are then replaced by rename, never written in place.
    """

    def __init__(self, target: Path, keep_existing: bool = False, marker: str = MANIFEST) -> None:
        """`marker`: the file an existing target must hold to be replaced (a directory without it
        is someone else's)."""
        self.target = Path(os.path.abspath(target))
        self.keep_existing = keep_existing
        self.marker = marker
        self.lock = DirectoryLock(self.target)
        self.staging = self.target  # set on entry
        self.committed = False
        self._old_handler = None

    # ------------------------------------------------------------------ entry
    def __enter__(self) -> "DirectoryTransaction":
        check_writable_dir(self.target.parent)
        self.lock.acquire()
        try:
            self._recover()
            self._check_target()
            try:
                self.staging = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.staging-",
                                                     dir=self.target.parent))
            except OSError as exc:
                raise _disk_full(exc, self.target) from None
            os.chmod(self.staging, 0o777 & ~_umask())  # mkdtemp makes 0700; exports are shared
            if self.keep_existing and self.target.is_dir():
                self._link_existing()
            self._catch_sigterm()
        except BaseException:
            self._cleanup()
            raise
        return self

    def _recover(self) -> None:
        """Remove or repair what killed runs left (only the lock holder gets here)."""
        parent, name = self.target.parent, self.target.name
        olds = sorted(parent.glob(f".{name}.old-*"), key=lambda p: p.stat().st_mtime)
        if olds and not self.target.exists() and (olds[-1] / self.marker).is_file():
            os.rename(olds[-1], self.target)  # a two-rename swap was cut between its renames
            log.warning("restored %s from %s (a run was killed while swapping)",
                        self.target, olds[-1].name)
        for leftover in [*parent.glob(f".{name}.staging-*"), *parent.glob(f".{name}.old-*")]:
            shutil.rmtree(leftover, ignore_errors=True)
            log.warning("removed %s, left by an interrupted run", leftover)
        if self.target.is_dir():
            for tmp in self.target.glob(f".*{TMP_SUFFIX}"):
                tmp.unlink(missing_ok=True)
                log.warning("removed %s, left by an interrupted run", tmp)

    def _check_target(self) -> None:
        if self.target.exists() and not self.target.is_dir():
            raise ExportError(f"{self.target} exists and is not a directory")
        if (self.target.is_dir() and any(self.target.iterdir())
                and not (self.target / self.marker).is_file()):
            what = "an export directory" if self.marker == MANIFEST else "a directory this tool wrote"
            raise ExportError(f"{self.target} exists and is not {what} (no {self.marker}): choose "
                              "another --name or --out, or remove it")

    def _link_existing(self) -> None:
        """Hard links, except for ONNX external-data files: onnx refuses to read one with more
        than one link (its guard against hard-link attacks), so those are copied. The published
        weight versions (versions/) come along, linked file by file."""
        _link_tree(self.target, self.staging, top=True)

    def _catch_sigterm(self) -> None:
        """SIGTERM raises SystemExit inside the block, so cleanup runs (SIGINT already raises
        KeyboardInterrupt). Signal handlers exist only in the main thread."""
        if threading.current_thread() is threading.main_thread():
            def on_term(signum, frame):
                raise SystemExit(128 + signum)

            self._old_handler = signal.signal(signal.SIGTERM, on_term)

    # ------------------------------------------------------------------ commit and exit
    def commit(self) -> None:
        """Put the staging directory in place of the target, in one step."""
        if self.target.is_dir() and not _exchange(self.staging, self.target):
            old = self.target.parent / f".{self.target.name}.old-{os.getpid()}"
            os.rename(self.target, old)
            os.rename(self.staging, self.target)
            self.staging = old
        elif not self.target.is_dir():
            if self.target.exists():
                raise ExportError(f"{self.target} exists and is not a directory")
            os.rename(self.staging, self.target)
            self.staging = self.target  # nothing left to remove
        # after an exchange, self.staging holds the previous set: removed on exit
        self.committed = True

    def __exit__(self, kind: Optional[Type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self._cleanup()

    def _cleanup(self) -> None:
        if self._old_handler is not None:
            signal.signal(signal.SIGTERM, self._old_handler)
            self._old_handler = None
        if self.staging != self.target:
            shutil.rmtree(self.staging, ignore_errors=True)
        self.lock.release()


def _link_tree(src_dir: Path, dst_dir: Path, top: bool = False) -> None:
    for src in src_dir.iterdir():
        if src.name.endswith(TMP_SUFFIX) or src.is_symlink():
            continue
        if src.is_dir():
            if top and src.name != VERSIONS_DIR:
                continue  # staging or other directories are not part of an export
            if not src.name.startswith("."):
                (dst_dir / src.name).mkdir()
                _link_tree(src, dst_dir / src.name)
        elif src.is_file():
            try:
                if src.name.endswith(".data"):
                    raise OSError("copied")
                os.link(src, dst_dir / src.name)
            except OSError:
                shutil.copy2(src, dst_dir / src.name)


@contextmanager
def manifest_update(directory: Path) -> Iterator[Tuple[Path, Manifest]]:
    """Read-modify-commit of an export directory: yields (staging copy, its manifest); files
    written into the staging copy and the manifest as changed replace the directory in one step
    when the block ends without an error (quantize, accuracy, params)."""
    with DirectoryTransaction(Path(directory), keep_existing=True) as tx:
        manifest = read_manifest(tx.staging)
        yield tx.staging, manifest
        manifest.files = dict(sorted(manifest.files.items()))
        write_manifest(tx.staging, manifest)
        tx.commit()
