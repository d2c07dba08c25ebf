"""TorchScript's table of builtins keeps each id unique to its object for the life of the process.

`torch.jit.script` turns a Python value into an aten builtin when `id(value)` is a key of
`torch.jit._builtins._builtin_table`, and the table holds ids only, not the objects. torch drops
objects it registered there: `torch._ops._refresh_packet` replaces an operator's Python object when a
library adds an overload to an operator already looked up (importing `executorch.exir` replaces 20),
and destroying a `torch.library.Library` drops whole operators. The next object allocated at the
freed address then scripts as that operator: a module whose tuple attribute lands there fails with
"builtin cannot be used as a value", at random, after ExecuTorch was imported in the same process.

Holding every registered object keeps its address taken, so no other object can have its id. The
objects are a few thousand small callables torch already keeps while their operators exist.
"""

import threading
from typing import Any, Callable, Dict, Iterator, Optional

import torch

_retained: Dict[int, Any] = {}
#: torch's own `_register_builtin`, which holds ids only
torch_register_builtin: Optional[Callable[[Any, str], None]] = None
_lock = threading.Lock()
_installed = False


def retain_registered_builtins() -> bool:
    """From now on every object registered as a TorchScript builtin is held until the process ends,
    and so is every operator object registered before (those of operators looked up so far).

    Idempotent; returns whether torch has the id table (False: nothing to keep). Objects torch
    dropped before the first call cannot be recovered: `zoo.base` calls this on import, before
    the zoo can import a library that redefines operators.
    """
    global _installed, torch_register_builtin
    with _lock:
        builtins = torch.jit._builtins
        register = getattr(builtins, "_register_builtin", None)
        if register is None or not hasattr(builtins, "_find_builtin"):
            return False
        if _installed:
            return True

        def register_and_retain(fn: Any, op: str) -> None:
            _retained[id(fn)] = fn
            register(fn, op)

        for packet in _looked_up_packets():
            op = getattr(packet, "_op", None)
            if op is not None:
                _retained[id(op)] = op
        torch_register_builtin = register
        builtins._register_builtin = register_and_retain
        _installed = True
        return True


def _looked_up_packets() -> Iterator[Any]:
    """The `torch.ops.<namespace>.<name>` packets created so far (each holds its registered op)."""
    packet_type = torch._ops.OpOverloadPacket
    for namespace in list(vars(torch.ops).values()):
        if isinstance(namespace, torch._ops._OpNamespace):
            for value in list(vars(namespace).values()):
                if isinstance(value, packet_type):
                    yield value
