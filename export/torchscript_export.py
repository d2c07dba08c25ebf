"""TorchScript export: `torch.jit.script` of each fixed head, saved with `torch.jit.save`."""

import warnings

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
    """torch.jit.save without its torch 2.14 deprecation warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.save` is deprecated",
                                category=FutureWarning)
        torch.jit.save(module, str(path))
