"""Small test configurations per backbone, and the one table of known exceptions.

A newly registered backbone is tested at once with its default arguments; add a row here only
to make it smaller/faster or to mark it slow.
"""

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple


@dataclass(frozen=True)
class Case:
    kwargs: Dict[str, Any] = field(default_factory=dict)
    input_shape: Optional[Tuple[int, ...]] = None  # None: the backbone's default input
    slow: bool = False
    build: Optional[Callable[[], Any]] = None  # a smaller direct build where args cannot shrink it


def _tiny_vit():
    from zoo.backbones.vit import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)


CASES: Dict[str, Case] = {
    "resnet18": Case({"num_filters": 8}),
    "resnet34": Case({"num_filters": 8}),
    "preact-resnet18": Case({"num_filters": 8}),
    "reduced-resnet18": Case(),
    "resnet18-spr": Case(),
    "resnet18-7x7-pt": Case(input_shape=(3, 64, 64)),
    "resnet32": Case(),
    "resnet50": Case(input_shape=(3, 64, 64), slow=True),
    "resnet50-pt": Case(input_shape=(3, 64, 64), slow=True),
    "mnistmlp": Case({"mlp_hidden_size": 32}),
    "resnet": Case({"depth": 18}),
    "efficientnet": Case({"efficientnet_type": "b0"}, input_shape=(3, 32, 32)),
    "vit": Case(build=_tiny_vit),  # full size: test_all_registered_backbones_export (slow)
    "tv": Case({"model": "mobilenet_v3_small"}, input_shape=(3, 64, 64)),
    "tv-resnet18": Case(input_shape=(3, 64, 64)),
    "tv-mobilenet-v3-small": Case(input_shape=(3, 64, 64)),
    "tv-mobilenet-v3-large": Case(input_shape=(3, 64, 64)),
    "tv-efficientnet-b0": Case(input_shape=(3, 64, 64)),
    "tv-convnext-tiny": Case(input_shape=(3, 64, 64), slow=True),
}


def case_for(name: str) -> Case:
    return CASES.get(name, Case())


@dataclass(frozen=True)
class KnownException:
    """A backbone, mode or format the zoo promises but does not provide (yet), and why."""

    backbone: str
    reason: str
    mode: str = "*"
    format: str = "*"


KNOWN_EXCEPTIONS: list = []  # every promised backbone x mode x format is provided

#: every backbone name the zoo promises (Mammoth's registered names that exist outside PNN)
PROMISED_BACKBONES = (
    "resnet18", "resnet34", "preact-resnet18", "reduced-resnet18", "resnet18-spr",
    "resnet18-7x7-pt", "resnet32", "resnet50", "resnet50-pt", "mnistmlp", "efficientnet",
    "vit", "resnet",
)
