"""TorchScript export: `torch.jit.script` of each fixed head, saved with `torch.jit.save`."""

import io
import warnings
from pathlib import Path

import torch

from zoo.base import MammothBackbone
from zoo.heads import make_head


def script_head(net: MammothBackbone, mode: str) -> torch.jit.ScriptModule:
    """The scripted head of `mode` (eval). Loadable with torch.jit.load without the zoo."""
    head = make_head(net, mode)
    with warnings.catch_warnings():
        # torch 2.14 deprecates torch.jit.script in favour of torch.export; we still ship
        # TorchScript (users load it with torch.jit.load), so silence only this warning.
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated",
                                category=FutureWarning)
        return torch.jit.script(head)


def save_torchscript(module: torch.jit.ScriptModule, path) -> None:
    """torch.jit.save without its torch 2.14 deprecation warning. Saved through a buffer: the
    zip's top folder is named after the file, and a temporary name would make it random."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.save` is deprecated",
                                category=FutureWarning)
        torch.jit.save(module, buffer)
    Path(path).write_bytes(buffer.getvalue())
