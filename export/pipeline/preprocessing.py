"""The input normalisation a model was trained with, carried in its manifest (and optionally
baked into its graphs).

A Mammoth checkpoint names its dataset (`args['dataset']`); each Mammoth dataset normalises its
images with a fixed mean/std after scaling them to [0, 1]. Feeding raw [0, 1] images to an
export of such a model without that normalisation silently changes its predictions.
"""

from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from export.errors import ExportError

_CIFAR10 = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2615))
_CIFAR100 = ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
_NONE_RGB = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
_NONE_GRAY = ((0.0,), (1.0,))

#: Mammoth dataset name -> (mean, std, input H x W), as its datasets/*.py define them
#: (aimagelab/mammoth at e75a491): images are ToTensor()'d to [0, 1], RGB, then normalised.
MAMMOTH_DATASETS: Dict[str, Tuple[Tuple[float, ...], Tuple[float, ...], Tuple[int, int]]] = {
    "seq-cifar10": (*_CIFAR10, (32, 32)),
    "seq-cifar100": (*_CIFAR100, (32, 32)),
    "seq-tinyimg": ((0.4802, 0.4480, 0.3975), (0.2770, 0.2691, 0.2821), (64, 64)),
    "seq-tinyimg-r": ((0.4807, 0.4485, 0.3980), (0.2541, 0.2456, 0.2604), (32, 32)),
    "seq-mnist": (*_NONE_GRAY, (28, 28)),
    "perm-mnist": (*_NONE_GRAY, (28, 28)),
    "rot-mnist": (*_NONE_GRAY, (28, 28)),
    "mnist-360": (*_NONE_GRAY, (28, 28)),
    "seq-cifar10-224": (*_CIFAR10, (224, 224)),
    "seq-cifar10-224-rs": (*_CIFAR10, (224, 224)),
    "seq-cifar100-224": (*_IMAGENET, (224, 224)),
    "seq-cifar100-224-rs": (*_CIFAR100, (224, 224)),
    "seq-celeba": (*_CIFAR10, (224, 224)),
    "seq-cub200": (*_IMAGENET, (224, 224)),
    "seq-cub200-rs": ((0.4856, 0.4994, 0.4324), (0.2272, 0.2226, 0.2613), (224, 224)),
    "seq-chestx": (*_IMAGENET, (224, 224)),
    "seq-cropdisease": (*_IMAGENET, (224, 224)),
    "seq-isic": (*_IMAGENET, (224, 224)),
    "seq-mit67": (*_IMAGENET, (224, 224)),
    "seq-cars196": (*_NONE_RGB, (224, 224)),
    "seq-imagenet-r": (*_NONE_RGB, (224, 224)),
    "seq-eurosat-rgb": (*_CLIP, (224, 224)),
    "seq-8vision": (*_CLIP, (224, 224)),
    "seq-dtd": (*_CLIP, (224, 224)),
    "seq-gtsrb": (*_CLIP, (224, 224)),
    "seq-mnist-224": (*_CLIP, (224, 224)),
    "seq-sun397": (*_CLIP, (224, 224)),
    "seq-svhn": (*_CLIP, (224, 224)),
}


@dataclass(frozen=True)
class Preprocessing:
    """What the graph's input `x` is: `(image in [0, 1], RGB, N C H W) - mean) / std`."""

    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    source: str
    input_size: Optional[Tuple[int, int]] = None
    baked: bool = False
    #: how images are resized and cropped to `input_size` before (timm's data config)
    interpolation: Optional[str] = None
    crop_pct: Optional[float] = None
    crop_mode: Optional[str] = None

    def manifest(self) -> Dict[str, Any]:
        entry = {k: v for k, v in asdict(self).items()
                 if v is not None or k not in ("interpolation", "crop_pct", "crop_mode")}
        entry.update(channel_order="RGB" if len(self.mean) == 3 else "single channel",
                     value_range=[0.0, 1.0], layout="NCHW")
        entry["input"] = ("images in [0, 1]: the graph normalises them" if self.baked else
                          "normalised images: (image - mean) / std, image in [0, 1]")
        return entry


def parse_floats(text: str, what: str) -> Tuple[float, ...]:
    try:
        values = tuple(float(t) for t in text.split(","))
    except ValueError:
        raise ExportError(f"{what} {text!r}: expected comma-separated numbers, e.g. "
                          "0.4914,0.4822,0.4465") from None
    return values


def resolve(channels: int, dataset: Optional[str] = None, mean: Optional[str] = None,
            std: Optional[str] = None, bake: bool = False,
            default: Optional[Preprocessing] = None) -> Optional[Preprocessing]:
    """The preprocessing from `--mean/--std` (first), a Mammoth dataset name, or `default` (what
    the backbone declares); None if none. One-line errors for an unknown dataset, a wrong
    number of channels or a non-positive std."""
    if (mean is None) != (std is None):
        raise ExportError("--mean and --std go together (one value per input channel each)")
    if mean is not None:
        prep = Preprocessing(parse_floats(mean, "--mean"), parse_floats(std, "--std"), "--mean/--std")
    elif dataset:
        if dataset not in MAMMOTH_DATASETS:
            raise ExportError(f"unknown Mammoth dataset {dataset!r} for the input normalisation; "
                              f"known: {', '.join(sorted(MAMMOTH_DATASETS))} (or give --mean/--std)")
        m, s, size = MAMMOTH_DATASETS[dataset]
        prep = Preprocessing(m, s, f"Mammoth dataset {dataset}", size)
    elif default is not None:
        prep = default
    else:
        if bake:
            raise ExportError("--bake-preprocessing needs the normalisation: --mean/--std, or a "
                              "Mammoth checkpoint whose args name its dataset")
        return None
    if len(prep.mean) != channels or len(prep.std) != channels:
        raise ExportError(f"normalisation from {prep.source} has {len(prep.mean)} mean and "
                          f"{len(prep.std)} std values; the backbone takes {channels} channel(s)")
    if min(prep.std) <= 0:
        raise ExportError(f"std {list(prep.std)}: every value must be positive")
    return replace(prep, baked=bake)


class Normalize(nn.Module):
    """`(x - mean) / std` per channel (scriptable, exported as two constant ops)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std
