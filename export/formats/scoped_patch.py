"""Replacements of a library's internals that are in place only while a `with` block uses them.

The zoo speeds up a few pure, repeated steps inside torch's own calls (program saves and loads,
the ONNX exporter's registry). Each replacement is installed when the first block starts and
torch's own functions are put back when the last one ends: nested and concurrent blocks share
one installation, and code outside every block sees torch as installed.
"""

import threading
from contextlib import contextmanager
from typing import Callable, Iterator


class ScopedPatch:
    """`with patch() as active:` runs the block with `install()`'s replacements (`active`: whether
    `install` put them in place; it declines where the library's private names differ)."""

    def __init__(self, install: Callable[[], bool], restore: Callable[[], None]) -> None:
        self._install, self._restore = install, restore
        self._lock = threading.Lock()
        self._depth = 0
        self._active = False

    @contextmanager
    def __call__(self) -> Iterator[bool]:
        with self._lock:
            if self._depth == 0:
                self._active = bool(self._install())
            self._depth += 1
            active = self._active
        try:
            yield active
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0 and self._active:
                    self._restore()
                    self._active = False
