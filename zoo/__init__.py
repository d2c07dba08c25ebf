"""returnt-zoo: Mammoth-compatible backbones whose every `returnt` mode can be exported.

Importing the package registers every backbone family (registration by import, as torchvision
and timm do): `zoo.REGISTRY.names()` is complete right after `import zoo`.
"""

import zoo.backbones  # noqa: F401  (registration by import: every family registers itself)
from zoo.base import RETURNT_MODES, MammothBackbone, Stage, check_returnt
from zoo.registry import (
    REGISTRY,
    Registry,
    get_backbone,
    get_entry,
    list_backbones,
    register_backbone,
)

__version__ = "0.1.0"

__all__ = [
    "RETURNT_MODES",
    "MammothBackbone",
    "Stage",
    "check_returnt",
    "REGISTRY",
    "Registry",
    "get_backbone",
    "get_entry",
    "list_backbones",
    "register_backbone",
    "__version__",
]
