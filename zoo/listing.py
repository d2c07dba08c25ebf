"""The `python -m zoo list` table: each backbone described from the registry, and a cache.

Describing needs torch and every family (~2 s of imports before the first model is built); the
table is a function of the zoo's own sources and the torch/torchvision versions only, so it is
kept in one JSON file keyed by a hash of exactly those, and answered from there without
importing torch. Any change to a source file or a version gives a new key and a fresh table.
"""

import hashlib
import json
import os
import sys
import tempfile
import warnings
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional

#: the cache's directory (default: $XDG_CACHE_HOME/returnt-zoo, else ~/.cache/returnt-zoo)
CACHE_ENV = "RETURNT_ZOO_CACHE_DIR"
ZOO_DIR = Path(__file__).resolve().parent


def describe(name: str) -> str:
    """One block per backbone: arguments (type, default/required), input shape, #params."""
    import torch

    from zoo.registry import get_backbone, get_entry

    entry = get_entry(name)
    kwargs = {a.name: a.default for a in entry.args if not a.required}
    kwargs.update(entry.example)  # required arguments: the registered example values
    # built on the meta device: shapes and counts without allocating or initialising weights
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")  # pretrained variants warn about missing weights
        net = get_backbone(name, **kwargs)
    shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    lines = [
        f"{name}  ({entry.doc.splitlines()[0] if entry.doc else ''})",
        "    args: " + "; ".join(a.describe() for a in entry.args),
        f"    input: {'x'.join(map(str, net.input_shape))}"
        f"{' (H,W dynamic)' if net.dynamic_hw else ''}   params: {net.num_params():,} at {shown}",
        "    full: " + ", ".join(f"{n}[{s.channels}]" for n, s in zip(net.output_names(), net.stages))
        + f", features[{net.feature_dim}], logits",
    ]
    return "\n".join(lines)


def table_key() -> str:
    """sha256 of what the table depends on: every .py file of the zoo package (path and bytes),
    the torch, torchvision and timm versions, and the Python version."""
    h = hashlib.sha256()
    for path in sorted(ZOO_DIR.rglob("*.py")):
        h.update(path.relative_to(ZOO_DIR).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    for dist in ("torch", "torchvision", "timm"):  # timm: the timm-* entries (absent: not installed)
        try:
            h.update(f"{dist}=={metadata.version(dist)}\0".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{dist} absent\0".encode())
    h.update(sys.version.encode())
    return h.hexdigest()


def cache_path() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / "list.json"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "returnt-zoo" / "list.json"


class Table:
    """Registered names and the blocks described so far, for one `table_key()`."""

    def __init__(self, key: str, names: Optional[List[str]] = None,
                 blocks: Optional[Dict[str, str]] = None) -> None:
        self.key = key
        self.changed = names is None  # a table not read from the cache is worth writing
        if names is None:
            from zoo.registry import list_backbones

            names = list_backbones()
        self.names: List[str] = names
        self.blocks: Dict[str, str] = dict(blocks or {})

    @classmethod
    def load(cls, key: str, refresh: bool = False) -> "Table":
        """The cached table if it was made for `key` (a missing, unreadable or other-key file
        is rebuilt), else a new one from the registry."""
        if not refresh:
            try:
                data = json.loads(cache_path().read_text())
                if (data.get("key") == key and isinstance(data.get("names"), list)
                        and isinstance(data.get("blocks"), dict)):
                    return cls(key, [str(n) for n in data["names"]],
                               {str(k): str(v) for k, v in data["blocks"].items()})
            except (OSError, ValueError, AttributeError):
                pass
        return cls(key)

    def block(self, name: str) -> str:
        if name not in self.blocks:
            self.blocks[name] = describe(name)
            self.changed = True
        return self.blocks[name]

    def save(self) -> None:
        """Written whole and renamed into place: concurrent runs never read half a file. A
        cache that cannot be written (read-only home) only makes the next run slower."""
        if not self.changed:
            return
        path = cache_path()
        data = json.dumps({"key": self.key, "names": self.names, "blocks": self.blocks}, indent=0)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".list-", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError:
            return
        self.changed = False
