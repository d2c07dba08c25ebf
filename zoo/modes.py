"""What each `returnt` mode returns, without torch: the modes, which of the `'full'` outputs each
one returns, and how a call's outputs are packed. The ingress of a server and the Serve
application builders import only this (a process that runs no model loads no torch)."""

from typing import Any, Dict, List, Tuple

RETURNT_MODES: Tuple[str, ...] = ("out", "features", "both", "full")


def mode_outputs(full_names: List[str]) -> Dict[str, List[str]]:
    """What each `returnt` mode returns: which of the `'full'` outputs, by name and in order.

    The one definition: ONNX output names, the manifest, `OnnxBackbone` and the tests take it
    from here; `forward` and the scriptable heads (`zoo.heads`) index `forward_full` the same
    way (logits last, features before them), which the tests check against this table.
    """
    return {"out": ["logits"], "features": ["features"], "both": ["logits", "features"],
            "full": list(full_names)}


def pack_outputs(mode: str, outputs: List) -> Any:
    """A mode's outputs (listed in `mode_outputs` order) in the shape `forward` returns them:
    one tensor, a (logits, features) tuple, or the `'full'` list."""
    if mode in ("out", "features"):
        return outputs[0]
    if mode == "both":
        return outputs[0], outputs[1]
    return list(outputs)


def unpack_outputs(out) -> List:
    """The inverse of `pack_outputs`: a returnt call's outputs as a list (one tensor or array for
    'out' and 'features'), for code that treats every mode alike."""
    return list(out) if isinstance(out, (list, tuple)) else [out]


def check_returnt(returnt: str) -> str:
    if returnt not in RETURNT_MODES:
        raise ValueError(f"unknown returnt {returnt!r}; allowed: {', '.join(RETURNT_MODES)}")
    return returnt
