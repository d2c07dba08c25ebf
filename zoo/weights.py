"""Loading weights files safely and strictly.

Everything goes through `torch.load(weights_only=True)` (or safetensors): a pickle that needs
arbitrary code is refused unless the caller opts in. Strict loads report every missing,
unexpected and mis-shaped key in one line instead of PyTorch's multi-line traceback.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from zoo.base import backbone_name

__all__ = [
    "CheckpointError",
    "UnsafeCheckpointError",
    "load_file",
    "load_state_dict_strict",
    "load_pretrained",
    "warn_random_weights",
]


class CheckpointError(ValueError):
    """A weights file that cannot be used for the requested backbone."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that needs more than tensors and plain containers to load."""


def load_file(path: str | Path, allow_unsafe_pickle: bool = False) -> Any:
    """Load a `.pt`/`.pth` (weights-only pickle) or `.safetensors` file on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file as load_safetensors

        try:
            return load_safetensors(str(path), device="cpu")
        except Exception as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_unsafe_pickle)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if allow_unsafe_pickle or not found:  # not a pickle that weights_only refused: corrupt
            raise CheckpointError(f"{path}: not a readable PyTorch file ({_first_line(exc)})") from None
        raise UnsafeCheckpointError(
            f"{path}: refused, not a weights-only pickle (it needs {found.group(1)}; unpickling it "
            f"can run code from the file); if you trust its source, pass --allow-unsafe-pickle "
            f"(allow_unsafe_pickle=True)"
        ) from None
    except MemoryError:
        raise CheckpointError(f"{path}: not a readable PyTorch file (it asks for more memory "
                              "than there is: corrupt?)") from None
    except Exception as exc:  # noqa: BLE001 - any failure to parse untrusted bytes is a bad file
        raise CheckpointError(f"{path}: not a readable PyTorch file ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def _summarise(keys: Iterable[str], limit: int = 8) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def state_dict_mismatch(net: nn.Module, state_dict: Mapping[str, Any]) -> str:
    """'' when `state_dict` fits `net` exactly, else one line naming every problem."""
    expected = net.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [
        f"{k} {tuple(state_dict[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict
        and isinstance(state_dict[k], Tensor)
        and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {_summarise(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {_summarise(unexpected)}")
    if misshaped:
        parts.append(f"mis-shaped keys ({len(misshaped)}): {_summarise(misshaped, 4)}")
    return "; ".join(parts)


def load_state_dict_strict(net: nn.Module, state_dict: Mapping[str, Any], what: str = "",
                           name: str = "") -> None:
    """`load_state_dict(strict=True)` with a one-line error that lists the bad keys; `name` is
    the registered backbone name for the message (default: the one the registry recorded)."""
    problem = state_dict_mismatch(net, state_dict)
    if problem:
        name = name or backbone_name(net)
        raise CheckpointError(f"{what or 'state_dict'} does not fit backbone {name!r}: {problem}")
    net.load_state_dict(state_dict, strict=True)


def load_pretrained(
    net: nn.Module,
    path: str | Path,
    rename: Optional[Callable[[str], Optional[str]]] = None,
    head: Optional[Tuple[str, str]] = None,
    name: str = "",
) -> None:
    """Load a pretrained (e.g. ImageNet) weights file the way Mammoth does.

    `rename` maps each file key to ours (None drops it). `head` = (prefix in the file, prefix in
    `net`) of the classifier: used when its shapes fit, else `net`'s own (random) classifier is
    kept, as for a new number of classes. Everything else must match exactly. `name` is the
    registered backbone name used in errors (the builder runs before the registry records it).
    """
    raw = _unwrap(load_file(path))
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{path}: expected a state_dict, found {type(raw).__name__}")
    current = net.state_dict()
    state: Dict[str, Any] = {}
    for key, value in raw.items():
        if head and key.startswith(head[0]):
            key = head[1] + key[len(head[0]):]
            if key not in current or tuple(current[key].shape) != tuple(value.shape):
                continue
        new = rename(key) if rename else key
        if new is not None:
            state[new] = value
    for key, value in current.items():  # the classifier is new: keep the random one
        if key.startswith("classifier.") or (head and key.startswith(head[1])):
            state.setdefault(key, value)
    load_state_dict_strict(net, state, what=f"weights file {str(path)!r}", name=name)


def _unwrap(raw: Any) -> Any:
    """The state_dict of a training checkpoint that wraps it (`{'state_dict': ...}`, `{'model':
    ...}`, as timm's and torchvision's training scripts save them), without a DataParallel
    `module.` prefix; a plain state_dict as it is."""
    if isinstance(raw, Mapping) and not any(isinstance(v, Tensor) for v in raw.values()):
        for key in ("state_dict", "model", "state_dict_ema"):
            if isinstance(raw.get(key), Mapping):
                raw = raw[key]
                break
    if isinstance(raw, Mapping) and raw and all(isinstance(k, str) and k.startswith("module.") for k in raw):
        raw = {k[len("module."):]: v for k, v in raw.items()}
    return raw


def warn_random_weights(name: str, source: str) -> None:
    """The one-line warning of a pretrained variant built without a local weights file."""
    warnings.warn(
        f"{name}: no local weights file given, using random weights; download {source} "
        f"yourself and pass weights=PATH (CLI: --weights PATH)",
        UserWarning,
        stacklevel=3,
    )
