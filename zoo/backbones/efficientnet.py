"""Mammoth's EfficientNet (`backbone/EfficientNet.py`, after lukemelas/EfficientNet-PyTorch).

Same state_dict keys and `parameters()` order. Kept because checkpoints or numbers depend on
them: BN eps 1e-3 / momentum 0.01, TF-style "same" padding computed statically for the
variant's native resolution (224 for b0) and reused at any input size, Dropout before the
classifier. Rewritten to be scriptable: Swish is `F.silu` (Mammoth's custom autograd Swish
computes the same function), block arguments are plain attributes instead of namedtuples.
"""

import math
from typing import List, Literal, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.base import MammothBackbone, Stage
from zoo.registry import register_backbone
from zoo.weights import load_pretrained, warn_random_weights

EfficientNetType = Literal["b0", "b1", "b2", "b3", "b4", "b5", "b6", "b7", "b8", "l2"]

#: (width_coefficient, depth_coefficient, resolution, dropout_rate)
PARAMS = {
    "b0": (1.0, 1.0, 224, 0.2), "b1": (1.0, 1.1, 240, 0.2), "b2": (1.1, 1.2, 260, 0.3),
    "b3": (1.2, 1.4, 300, 0.3), "b4": (1.4, 1.8, 380, 0.4), "b5": (1.6, 2.2, 456, 0.4),
    "b6": (1.8, 2.6, 528, 0.5), "b7": (2.0, 3.1, 600, 0.5), "b8": (2.2, 3.6, 672, 0.5),
    "l2": (4.3, 5.3, 800, 0.5),
}
#: the b0 blocks: (repeats, kernel, stride, expand_ratio, in, out, se_ratio)
BLOCKS = [(1, 3, 1, 1, 32, 16, 0.25), (2, 3, 2, 6, 16, 24, 0.25), (2, 5, 2, 6, 24, 40, 0.25),
          (3, 3, 2, 6, 40, 80, 0.25), (3, 5, 1, 6, 80, 112, 0.25), (4, 5, 2, 6, 112, 192, 0.25),
          (1, 3, 1, 6, 192, 320, 0.25)]
BN_MOMENTUM, BN_EPS, DROP_CONNECT_RATE = 0.01, 1e-3, 0.2


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    if not width:
        return filters
    filters *= width
    new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
    if new < 0.9 * filters:
        new += divisor
    return int(new)


def round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(depth * repeats)) if depth else repeats


def _out_size(size: int, stride: int) -> int:
    return int(math.ceil(size / stride))


class StaticSameConv2d(nn.Conv2d):
    """TF 'same' convolution whose padding is fixed at build time for `image_size`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, image_size: int,
                 stride: int = 1, groups: int = 1, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, 1, groups, bias)
        out = _out_size(image_size, stride)
        pad = max((out - 1) * stride + kernel_size - image_size, 0)
        self.static_padding: nn.Module = (
            nn.ZeroPad2d((pad // 2, pad - pad // 2, pad // 2, pad - pad // 2)) if pad > 0 else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, momentum=BN_MOMENTUM, eps=BN_EPS)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck with squeeze-excitation and (in training) drop connect."""

    def __init__(self, inp: int, out: int, kernel: int, stride: int, expand_ratio: int,
                 se_ratio: float, image_size: int, drop_rate: float) -> None:
        super().__init__()
        mid = inp * expand_ratio
        self.has_expand = expand_ratio != 1
        if self.has_expand:
            self._expand_conv: nn.Module = StaticSameConv2d(inp, mid, 1, image_size, bias=False)
            self._bn0: nn.Module = _bn(mid)
        else:  # parameter-free placeholders keep forward scriptable and keys unchanged
            self._expand_conv = nn.Identity()
            self._bn0 = nn.Identity()
        self._depthwise_conv = StaticSameConv2d(mid, mid, kernel, image_size, stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        squeezed = max(1, int(inp * se_ratio))
        self._se_reduce = StaticSameConv2d(mid, squeezed, 1, 1)
        self._se_expand = StaticSameConv2d(squeezed, mid, 1, 1)
        self._project_conv = StaticSameConv2d(mid, out, 1, _out_size(image_size, stride), bias=False)
        self._bn2 = _bn(out)
        self.has_skip = stride == 1 and inp == out
        self.drop_rate = drop_rate

    def forward(self, inputs: Tensor) -> Tensor:
        x = inputs
        if self.has_expand:
            x = F.silu(self._bn0(self._expand_conv(x)))
        x = F.silu(self._bn1(self._depthwise_conv(x)))
        squeezed = self._se_expand(F.silu(self._se_reduce(F.adaptive_avg_pool2d(x, 1))))
        x = torch.sigmoid(squeezed) * x
        x = self._bn2(self._project_conv(x))
        if self.has_skip:
            if self.training and self.drop_rate > 0.0:
                keep = 1.0 - self.drop_rate
                mask = torch.floor(keep + torch.rand([x.shape[0], 1, 1, 1], dtype=x.dtype, device=x.device))
                x = x / keep * mask
            x = x + inputs
        return x


class EfficientNet(MammothBackbone):
    stage_ends: List[int]  # index of the last block of each group = a stage

    def __init__(self, efficientnet_type: str = "b0", num_classes: int = 10,
                 groups: Sequence[Tuple[int, int, int, int, int, int, float]] = tuple(BLOCKS)) -> None:
        """`groups`: the b0 block groups before width/depth scaling (fewer make a smaller net)."""
        super().__init__()
        if efficientnet_type not in PARAMS:
            raise ValueError(f"unknown efficientnet_type {efficientnet_type!r}; allowed: "
                             f"{', '.join(PARAMS)}")
        width, depth, size, dropout = PARAMS[efficientnet_type]
        self.input_shape = (3, size, size)
        self.dynamic_hw = True  # static padding for `size`; the graph itself takes other sizes
        stem = round_filters(32, width)
        self._conv_stem = StaticSameConv2d(3, stem, 3, size, stride=2, bias=False)
        self._bn0 = _bn(stem)
        size = _out_size(size, 2)
        blocks: List[MBConvBlock] = []
        self.stage_ends = []
        total = sum(round_repeats(g[0], depth) for g in groups)
        for repeats, kernel, stride, expand, inp, out, se in groups:
            inp, out = round_filters(inp, width), round_filters(out, width)
            for i in range(round_repeats(repeats, depth)):
                rate = DROP_CONNECT_RATE * float(len(blocks)) / total
                blocks.append(MBConvBlock(inp if i == 0 else out, out, kernel, stride if i == 0 else 1,
                                          expand, se, size, rate))
                if i == 0:
                    size = _out_size(size, stride)
            self.stage_ends.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        last_channels = round_filters(groups[-1][5], width)
        head = round_filters(1280, width)
        self._conv_head = StaticSameConv2d(last_channels, head, 1, size, bias=False)
        self._bn1 = _bn(head)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(head, num_classes)
        self.feature_dim = head
        self.stages = (Stage("stem", stem),) + tuple(
            Stage(f"blocks{i}", round_filters(g[5], width)) for i, g in enumerate(groups)) + (Stage("head", head),)

    def forward_stages(self, x: Tensor) -> List[Tensor]:
        x = F.silu(self._bn0(self._conv_stem(x)))
        outs = [x]
        for idx, block in enumerate(self._blocks):
            x = block(x)
            if idx in self.stage_ends:
                outs.append(x)
        outs.append(F.silu(self._bn1(self._conv_head(x))))
        return outs

    def forward_pool(self, last: Tensor) -> Tensor:
        return self._avg_pooling(last).flatten(1)

    def forward_head(self, features: Tensor) -> Tensor:
        return self.classifier(self._dropout(features))


@register_backbone("efficientnet")
def efficientnet(num_classes: int, efficientnet_type: EfficientNetType, pretrained: bool = False,
                 weights: str = "") -> EfficientNet:
    """Mammoth's EfficientNet b0-b8/l2; `pretrained` takes lukemelas' weights from `weights`."""
    net = EfficientNet(efficientnet_type, num_classes)
    if weights:
        load_pretrained(net, weights, head=("_fc.", "classifier."), name="efficientnet")
    elif pretrained:
        warn_random_weights(f"efficientnet-{efficientnet_type}",
                            f"lukemelas' efficientnet-{efficientnet_type} ImageNet weights")
    return net

