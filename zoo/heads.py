"""One fixed, scriptable head per `returnt` mode.

A `returnt` string is run-time control flow; an exported graph needs a fixed signature. Each
head's `forward(x)` calls the backbone's typed pieces and returns a static type. Heads also
carry the flat-parameter API as `@torch.jit.export` methods, so a TorchScript file keeps
`get_params`/`set_params`/`get_grads`/`set_grads` with eager semantics and order.
"""


from typing import Dict, List, Optional, Tuple, Type

import torch
from torch import Tensor, nn

from zoo.base import RETURNT_MODES, MammothBackbone, check_returnt


def _dtype_name(dtype: torch.dtype) -> str:
    """str(dtype) in TorchScript gives a number; name the common ones."""
    if not torch.jit.is_scripting():
        return str(dtype)
    names = {6: "torch.float32", 7: "torch.float64", 5: "torch.float16", 15: "torch.bfloat16"}
    for code, name in names.items():
        if dtype == code:
            return name
    return "dtype code " + str(dtype)


#: heads hold the backbone as `self.backbone`: its names in exported files carry this prefix
BACKBONE_PREFIX = "backbone."


class ExportHead(nn.Module):
    """Base of the four heads: holds the backbone and the flat-parameter methods."""

    mode: str = ""

    def __init__(self, backbone: MammothBackbone, preprocess: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.backbone = backbone
        # what the graph does to its input first (e.g. the dataset's normalisation); no parameters
        self.preprocess = preprocess if preprocess is not None else nn.Identity()
        # TorchScript cannot iterate parameters(); a list attribute aliases them (and still
        # does after torch.jit.save/load), in the backbone's parameters() order.
        self.flat_params: List[Tensor] = [p for p in backbone.parameters()]
        self.num_params: int = sum(p.numel() for p in self.flat_params)

    def _check(self, v: Tensor, what: str) -> None:
        if v.dim() != 1:
            raise ValueError(what + ": expected a 1-D vector of " + str(self.num_params)
                             + " elements, got " + str(v.dim()) + " dimensions")
        if v.numel() != self.num_params:
            raise ValueError(what + ": expected " + str(self.num_params) + " elements, got "
                             + str(v.numel()))
        if v.dtype != self.flat_params[0].dtype:
            raise ValueError(what + ": expected dtype " + _dtype_name(self.flat_params[0].dtype)
                             + ", got " + _dtype_name(v.dtype))

    @torch.jit.export
    def get_params(self) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.flat_params])

    @torch.jit.export
    def set_params(self, new_params: Tensor) -> None:
        self._check(new_params, "set_params")
        offset = 0
        with torch.no_grad():
            for p in self.flat_params:
                n = p.numel()
                p.copy_(new_params[offset:offset + n].view(p.shape))
                offset += n

    def _grads_or_none(self) -> List[Optional[Tensor]]:
        # TorchScript types `p.grad` as Tensor (an undefined one when absent); only once it is
        # stored as Optional does `is None` test what it says.
        return [p.grad for p in self.flat_params]

    @torch.jit.export
    def get_grads(self) -> Tensor:
        grads: List[Tensor] = []
        seen = False
        for p, g in zip(self.flat_params, self._grads_or_none()):
            if g is None:
                grads.append(torch.zeros_like(p).reshape(-1))
            else:
                seen = True
                grads.append(g.detach().reshape(-1))
        if not seen:
            raise RuntimeError("get_grads: no parameter has a gradient yet; call backward() first")
        return torch.cat(grads)

    @torch.jit.export
    def set_grads(self, new_grads: Tensor) -> None:
        self._check(new_grads, "set_grads")
        offset = 0
        for p, g in zip(self.flat_params, self._grads_or_none()):
            n = p.numel()
            chunk = new_grads[offset:offset + n].view(p.shape).detach().clone()
            if g is None:  # TorchScript cannot assign .grad; accumulating into none creates it
                p.backward(chunk)
            else:
                g.copy_(chunk)
            offset += n


class OutHead(ExportHead):
    mode = "out"

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone.forward_full(self.preprocess(x))[-1]


class FeaturesHead(ExportHead):
    mode = "features"

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone.forward_full(self.preprocess(x))[-2]


class BothHead(ExportHead):
    mode = "both"

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        outs = self.backbone.forward_full(self.preprocess(x))
        return outs[-1], outs[-2]


class FullHead(ExportHead):
    mode = "full"

    def forward(self, x: Tensor) -> List[Tensor]:
        return self.backbone.forward_full(self.preprocess(x))


HEADS: Dict[str, Type[ExportHead]] = {
    "out": OutHead, "features": FeaturesHead, "both": BothHead, "full": FullHead,
}
assert tuple(HEADS) == RETURNT_MODES


def parameter_aliases(net: nn.Module, prefix: str = BACKBONE_PREFIX) -> Dict[str, List[str]]:
    """Eager parameter name (as `parameters()` names it) -> every name it has under `prefix`
    (a module reachable twice, e.g. an MLP's `fc1` that is also `net.0.0`, has several; a
    program or package may use any of them)."""
    by_id: Dict[int, List[str]] = {}
    for name, p in net.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(prefix + name)
    return {names[0][len(prefix):]: names for names in by_id.values()}


def make_head(backbone: MammothBackbone, mode: str, preprocess: Optional[nn.Module] = None) -> ExportHead:
    """The fixed head of `mode` around `backbone`, in eval() (exports must never see train BN);
    `preprocess` (parameter-free, e.g. a normalisation) runs on the input first."""
    return HEADS[check_returnt(mode)](backbone, preprocess).eval()
