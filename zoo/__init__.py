"""returnt-zoo: Mammoth-compatible backbones whose every `returnt` mode can be exported.

Registration by import, as torchvision and timm do: the registry imports every backbone family
on its first lookup, so `zoo.REGISTRY.names()` is complete right after `import zoo`, while
`import zoo` itself loads no torch (`python -m zoo list` answers from its cache without it).
"""

import importlib
from typing import Any

from zoo.registry import (
    REGISTRY,
    Registry,
    get_backbone,
    get_entry,
    list_backbones,
    register_backbone,
)

REGISTRY.loader = lambda: importlib.import_module("zoo.backbones")

__version__ = "0.1.0"

#: names defined in zoo.base (which imports torch), loaded on first use
_BASE_NAMES = ("RETURNT_MODES", "MammothBackbone", "Stage", "check_returnt")

__all__ = [
    *_BASE_NAMES,
    "REGISTRY",
    "Registry",
    "get_backbone",
    "get_entry",
    "list_backbones",
    "register_backbone",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name in _BASE_NAMES:
        return getattr(importlib.import_module("zoo.base"), name)
    raise AttributeError(f"module 'zoo' has no attribute {name!r}")
