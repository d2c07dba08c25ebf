"""`torch.onnx.export` with torch's ONNX registry built once per process instead of per call.

torch 2.14's exporter starts every call with `ONNXRegistry.from_torchlib(opset)`: every
torchlib function's signature translated again, 0.45-0.75 s on a Zen 4 thread, for the same
registry whenever the opset and the operators registered with torch are the same. Inside
`reused_registry()` the registry built first is kept and each call gets a copy of it (the exporter
adds to it only for a custom translation table, which then stays in that copy); another opset, or
any operator registered with torch since (torchvision's, imported after the first export), builds
a new one. Where torch's private names differ, nothing is replaced.
"""

import threading
from typing import Any, Dict, Optional, Tuple

import torch

from export.formats.scoped_patch import ScopedPatch

_ORIGINAL: Dict[str, Any] = {}
_BUILT: Dict[str, Tuple[Tuple[int, frozenset], Any]] = {}  # "last": (key, registry)
_BUILD_LOCK = threading.Lock()


def _registration() -> Optional[Any]:
    """torch's registration module when its `ONNXRegistry` is shaped as this module expects."""
    try:
        from torch.onnx._internal.exporter import _registration
    except ImportError:
        return None
    registry = getattr(_registration, "ONNXRegistry", None)
    from_torchlib = getattr(registry, "__dict__", {}).get("from_torchlib")
    return _registration if isinstance(from_torchlib, classmethod) else None


def _copy(registry: Any) -> Any:
    """A registry sharing the built one's (read-only) entries, with lists of its own."""
    copied = object.__new__(type(registry))
    copied.__dict__.update(registry.__dict__)
    copied.functions = {target: list(metas) for target, metas in registry.functions.items()}
    return copied


def _install() -> bool:
    registration = _registration()
    if registration is None:
        return False
    cls = registration.ONNXRegistry
    build = cls.__dict__["from_torchlib"].__func__
    _ORIGINAL["from_torchlib"] = cls.__dict__["from_torchlib"]

    def from_torchlib(klass, opset_version=registration._constants.TORCHLIB_OPSET):
        if klass is not cls:  # a subclass builds its own
            return build(klass, opset_version)
        key = (opset_version, frozenset(torch._C._dispatch_get_all_op_names()))
        with _BUILD_LOCK:
            held = _BUILT.get("last")
            if held is None or held[0] != key:
                held = _BUILT["last"] = (key, build(klass, opset_version))
        return _copy(held[1])

    cls.from_torchlib = classmethod(from_torchlib)
    return True


def _restore() -> None:
    from torch.onnx._internal.exporter import _registration

    _registration.ONNXRegistry.from_torchlib = _ORIGINAL.pop("from_torchlib")


#: `with reused_registry() as active:` torch.onnx.export calls in the block share one registry
reused_registry = ScopedPatch(_install, _restore)
