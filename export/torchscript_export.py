"""TorchScript export: `torch.jit.script` of each fixed head, saved with `torch.jit.save`."""

import hashlib
import io
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from zoo.base import MammothBackbone
from zoo.heads import make_head


@contextmanager
def jit_deprecations_silenced() -> Iterator[None]:
    """torch 2.14 deprecates torch.jit (script, save, load, freeze) in favour of torch.export; we
    still ship TorchScript, which users load with torch.jit.load, so exactly those warnings are
    silenced, only where we call them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        yield


def script_head(net: MammothBackbone, mode: str, preprocess=None) -> torch.jit.ScriptModule:
    """The scripted head of `mode` (eval). Loadable with torch.jit.load without the zoo."""
    head = make_head(net, mode, preprocess)
    with jit_deprecations_silenced():
        return torch.jit.script(head)


def save_torchscript(module: torch.jit.ScriptModule, path) -> None:
    """torch.jit.save, made reproducible. Saved through a buffer: the zip's top folder is named
    after the file, and a temporary name would make it random."""
    buffer = io.BytesIO()
    with jit_deprecations_silenced():
        torch.jit.save(module, buffer)
    Path(path).write_bytes(reproducible_archive(buffer.getvalue()))


def load_torchscript(path, device: str = "cpu") -> torch.jit.ScriptModule:
    with jit_deprecations_silenced():
        return torch.jit.load(str(path), map_location=device)


def reproducible_archive(data: bytes) -> bytes:
    """The same TorchScript archive, byte-reproducible and free of the build machine's paths.

    `torch.jit.save` adds `*.debug_pkl` files (source ranges naming the absolute path of every
    source file, e.g. /home/me/zoo/heads.py) and `.data/serialization_id` (drawn from the RNG).
    The debug files are dropped (only error messages' source lines need them; the code, the
    weights and every method stay) and the id becomes a digest of the archive's content.
    """
    source = zipfile.ZipFile(io.BytesIO(data))
    entries = [(i.filename, source.read(i.filename)) for i in source.infolist()
               if not i.filename.endswith(".debug_pkl")]
    digest = hashlib.sha256()
    for name, content in entries:
        if not name.endswith("/.data/serialization_id"):
            digest.update(name.encode() + b"\0" + content)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for name, content in entries:
            if name.endswith("/.data/serialization_id"):
                content = str(int(digest.hexdigest()[:32], 16)).encode()
            archive.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), content)
    return out.getvalue()
