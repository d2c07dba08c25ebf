"""`MammothBackbone`: the returnt contract and flat parameter vectors.

Everything is built on one typed, scriptable method, `forward_full(x) -> List[Tensor]`
(`[stage_0..stage_k, features, logits]`): the string-driven `forward(x, returnt)` and the
fixed-mode export heads (`zoo.heads`) both select from it, so they cannot disagree. Native
backbones implement it as three pieces: `forward_stages(x)`, `forward_pool(last_stage)` and
`forward_head(features)`.
"""

from dataclasses import dataclass
from typing import Dict, List, Tuple, Union

import torch
from torch import Tensor, nn

from zoo.jit_builtins import retain_registered_builtins
from zoo.modes import RETURNT_MODES, check_returnt, mode_outputs, pack_outputs, unpack_outputs

# Backbones promise to script; TorchScript mistakes an object for an operator torch dropped unless
# registered operators stay alive (ExecuTorch's import drops some).
retain_registered_builtins()

__all__ = ["RETURNT_MODES", "check_returnt", "mode_outputs", "pack_outputs", "unpack_outputs", "MammothBackbone",
           "Stage", "backbone_name", "ReturntOutput"]

ReturntOutput = Union[Tensor, Tuple[Tensor, Tensor], List[Tensor]]


@dataclass(frozen=True)
class Stage:
    """One entry of a backbone's `'full'` output, declared once as data."""

    name: str
    channels: int
    channel_dim: int = 1  # -1 for token sequences [B, N, C]


def backbone_name(net: object) -> str:
    """The registered name a backbone was built under (the class name if built directly)."""
    return getattr(net, "registry_name", None) or type(net).__name__


class MammothBackbone(nn.Module):
    """Base class of every zoo backbone.

    Subclasses set `self.input_shape` (C, H, W without batch), `self.stages` (a tuple of
    `Stage`), `self.feature_dim` and `self.dynamic_hw` in `__init__`, and implement either the
    three forward pieces or `forward_full` itself (the torchvision adapter does).
    """

    input_shape: Tuple[int, ...]
    stages: Tuple[Stage, ...]
    feature_dim: int
    #: export format -> why this backbone cannot be exported to it (none: every format)
    unsupported_formats: Dict[str, str] = {}
    # Python-only metadata: TorchScript must not try to compile these attributes.
    __jit_ignored_attributes__ = ["stages", "input_shape", "registry_name", "registry_kwargs",
                                  "unsupported_formats"]

    def forward_stages(self, x: Tensor) -> List[Tensor]:
        raise NotImplementedError

    def forward_pool(self, last: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_head(self, features: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_full(self, x: Tensor) -> List[Tensor]:
        """`[stage_0 .. stage_k, features, logits]`."""
        outs = self.forward_stages(x)
        features = self.forward_pool(outs[-1])
        outs.append(features)
        outs.append(self.forward_head(features))
        return outs

    def forward(self, x: Tensor, returnt: str = "out") -> ReturntOutput:
        """Mammoth's call: `'out'` logits, `'features'`, `'both'` (logits, features), `'full'`.

        Scriptable (Union return), but exported graphs use one fixed head per mode instead.
        """
        if returnt not in ["out", "features", "both", "full"]:
            raise ValueError(
                "unknown returnt '" + returnt + "'; allowed: out, features, both, full"
            )
        outs = self.forward_full(x)
        if returnt == "full":
            return outs
        if returnt == "features":
            return outs[-2]
        if returnt == "both":
            return outs[-1], outs[-2]
        return outs[-1]

    def features(self, x: Tensor) -> Tensor:
        """The vector right before the classifier."""
        return self.forward(x, returnt="features")

    def output_names(self) -> List[str]:
        """Names of the `'full'` outputs, in order (also the ONNX output names)."""
        return [f"stage_{i}" for i in range(len(self.stages))] + ["features", "logits"]

    # ------------------------------------------------------------------ flat parameters
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def get_params(self) -> Tensor:
        """All parameters concatenated in `parameters()` order (a detached copy)."""
        return torch.cat([p.detach().reshape(-1) for p in self.parameters()])

    def set_params(self, new_params: Tensor) -> None:
        """Copy a flat vector into the parameters; validated first so nothing is half-applied."""
        self._check_flat(new_params, "set_params")
        with torch.no_grad():
            offset = 0
            for p in self.parameters():
                n = p.numel()
                p.copy_(new_params[offset : offset + n].view_as(p))
                offset += n

    def get_grads(self) -> Tensor:
        """All gradients concatenated in `parameters()` order (zeros for parameters unused by
        the last backward, e.g. resnet32's `bn_final`)."""
        return torch.cat([g.reshape(-1) for g in self.get_grads_list()])

    def get_grads_list(self) -> List[Tensor]:
        params = list(self.parameters())
        if all(p.grad is None for p in params):
            raise RuntimeError(
                "get_grads: no parameter has a gradient yet; call loss.backward() first"
            )
        return [torch.zeros_like(p) if p.grad is None else p.grad.detach() for p in params]

    def set_grads(self, new_grads: Tensor) -> None:
        """Write a flat vector into `.grad` of every parameter (creating it where missing)."""
        self._check_flat(new_grads, "set_grads")
        offset = 0
        for p in self.parameters():
            n = p.numel()
            chunk = new_grads[offset : offset + n].view_as(p).detach().clone()
            if p.grad is None:
                p.grad = chunk
            else:
                p.grad.copy_(chunk)
            offset += n

    def _check_flat(self, vector: object, what: str) -> None:
        expected = self.num_params()
        check_flat_vector(vector, expected, next(self.parameters()).dtype, what)


def check_flat_vector(vector: object, expected: int, dtype: torch.dtype, what: str) -> None:
    """One-line ValueError unless `vector` is a 1-D tensor of `expected` elements and `dtype`."""
    if not isinstance(vector, Tensor):
        raise ValueError(
            f"{what}: expected a 1-D torch.Tensor of {expected} elements, got {type(vector).__name__}"
        )
    if vector.dim() != 1:
        raise ValueError(
            f"{what}: expected a 1-D vector of {expected} elements, got shape {tuple(vector.shape)}"
        )
    if vector.numel() != expected:
        raise ValueError(f"{what}: expected {expected} elements, got {vector.numel()}")
    if vector.dtype != dtype:
        raise ValueError(f"{what}: expected dtype {dtype}, got {vector.dtype}")
