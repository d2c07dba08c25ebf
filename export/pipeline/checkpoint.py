"""What users have as checkpoints: a plain backbone state_dict or a Mammoth run checkpoint.

A Mammoth `--savecheck` file is a dict with `model` (the continual model's state_dict: backbone
keys under `net.`, possibly wrapped as `module.`/`wrappee.`, other method state under other
prefixes) and `args` (the run's arguments; a plain dict in Mammoth's "safe" format, an
argparse Namespace in the old pickle format, which cannot be loaded weights-only).
"""

from argparse import Namespace
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from torch import Tensor

from zoo.weights import CheckpointError, load_file

_WRAPPERS = ("module.", "wrappee.")


@dataclass
class Checkpoint:
    """Backbone weights plus, for a Mammoth run, the backbone name and arguments it used."""

    path: Path
    state_dict: Dict[str, Tensor]
    backbone: Optional[str] = None
    args: Dict[str, Any] = field(default_factory=dict)
    kind: str = "state_dict"


def _strip_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPERS:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def backbone_state_from_model(model_state: Mapping[str, Any]) -> Dict[str, Tensor]:
    """The `net.` part of a continual model's state_dict, wrappers removed."""
    out: Dict[str, Tensor] = {}
    for key, value in model_state.items():
        key = _strip_wrappers(key)
        if key.startswith("net."):
            out[_strip_wrappers(key[len("net."):])] = value
    return out


def _check_state(path: Path, state: Any, what: str) -> Dict[str, Tensor]:
    """A mapping of string keys to tensors, or a one-line CheckpointError."""
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: {what} is a {type(state).__name__}, expected a dict of tensors")
    bad_keys = [k for k in state if not isinstance(k, str)]
    if bad_keys:
        raise CheckpointError(f"{path}: {what} has non-string keys ({', '.join(map(repr, bad_keys[:5]))})"
                              "; not a state_dict")
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(
            f"{path}: not a state_dict (non-tensor entries: {', '.join(map(str, bad[:5]))})"
        )
    return dict(state)


def read_checkpoint(path: str | Path, allow_unsafe_pickle: bool = False) -> Checkpoint:
    """Load a checkpoint file and tell what it holds; anything unusable is a CheckpointError."""
    path = Path(path)
    raw = load_file(path, allow_unsafe_pickle=allow_unsafe_pickle)
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{path}: expected a dict, found {type(raw).__name__}")
    if "model" in raw:
        model = raw["model"]
        if not isinstance(model, Mapping):
            raise CheckpointError(f"{path}: 'model' is a {type(model).__name__}, expected the "
                                  "continual model's state_dict")
        bad_keys = [k for k in model if not isinstance(k, str)]
        if bad_keys:
            raise CheckpointError(f"{path}: 'model' has non-string keys "
                                  f"({', '.join(map(repr, bad_keys[:5]))}); not a state_dict")
        state = _check_state(path, backbone_state_from_model(model), "the backbone's weights")
        if not state:
            raise CheckpointError(
                f"{path}: Mammoth run checkpoint without backbone weights (no 'net.' keys in 'model')"
            )
        args = raw.get("args") or {}
        if isinstance(args, Namespace):
            args = vars(args)
        if not isinstance(args, Mapping):
            raise CheckpointError(f"{path}: 'args' is a {type(args).__name__}, expected a dict")
        backbone = args.get("backbone")
        if backbone is not None and not isinstance(backbone, str):
            raise CheckpointError(f"{path}: 'args' names backbone {backbone!r}, expected a "
                                  "registered name (a string)")
        return Checkpoint(path, state, backbone, {str(k): v for k, v in args.items()}, kind="mammoth")
    state = raw["state_dict"] if "state_dict" in raw else raw
    return Checkpoint(path, _check_state(path, state, "'state_dict'" if "state_dict" in raw else "the file"))
