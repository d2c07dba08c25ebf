"""TorchScript's builtin table: an operator object torch drops after registering it never lends its
id to another object. Without that, a module attribute allocated at the freed address scripts as
the operator ("builtin cannot be used as a value"), at random, after ExecuTorch's import."""

import itertools
import subprocess
import sys

import pytest
import torch
from torch import nn

import zoo.base  # noqa: F401  (installs the retention, as every backbone import does)
from export.formats.torchscript import script
from tests.conftest import REPO
from zoo import jit_builtins

_names = itertools.count()


class PadBy(nn.Module):
    def __init__(self, pad) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.pad(x, self.pad)


def _drop_a_registered_op():
    """A new operator looked up (registered as a builtin), then given an overload: torch replaces
    the packet's op object and drops the old one. Returns the library and the old op's id."""
    namespace = f"returnt_zoo_jit_test{next(_names)}"
    library = torch.library.Library(namespace, "DEF")
    library.define("probe(Tensor x) -> Tensor")
    packet = getattr(torch.ops, namespace).probe
    old_id = id(packet._op)
    assert torch.jit._builtins._find_builtin(packet._op) == f"{namespace}::probe"
    library.define("probe.other(Tensor x, int n) -> Tensor")
    assert id(packet._op) != old_id
    return library, namespace, old_id


def _tuple_at(address, limit=200_000):
    """4-tuples (the dropped builtin's allocation size) until one is at `address`, or None."""
    made = []
    for i in range(limit):
        made.append((i, i + 1, i + 2, i + 3))
        if id(made[-1]) == address:
            return made[-1], made
    return None, made


def test_without_retention_a_tuple_scripts_as_the_dropped_operator(monkeypatch):
    """The control: torch's own registration reproduces the failure, so the test below can fail."""
    assert jit_builtins.torch_register_builtin is not None
    monkeypatch.setattr(torch.jit._builtins, "_register_builtin", jit_builtins.torch_register_builtin)
    library, namespace, old_id = _drop_a_registered_op()
    try:
        pad, _ = _tuple_at(old_id)
        assert pad is not None, "no 4-tuple was allocated at the dropped operator's address"
        assert torch.jit._builtins._find_builtin(pad) == f"{namespace}::probe"
        with pytest.raises(RuntimeError, match="builtin cannot be used as a value"):
            script(PadBy(pad))
    finally:
        torch.jit._builtins._builtin_table.pop(old_id, None)  # no stale id left for later tests
        library._destroy()


def test_with_retention_no_object_takes_a_dropped_operators_id():
    assert jit_builtins.retain_registered_builtins()
    library, namespace, old_id = _drop_a_registered_op()
    try:
        pad, made = _tuple_at(old_id)
        assert pad is None
        assert old_id in jit_builtins._retained
        assert not any(torch.jit._builtins._find_builtin(t) for t in made)
        assert script(PadBy((1, 2, 3, 4)))(torch.zeros(1, 1, 2, 2)).shape == (1, 1, 9, 5)
    finally:
        library._destroy()


def test_every_looked_up_operator_is_retained():
    """Whether looked up before `retain_registered_builtins` ran (while torch imported) or after:
    any of them can be refreshed later."""
    assert torch.ops.aten.hardtanh.default  # looked up now, if not before
    packets = list(jit_builtins._looked_up_packets())
    assert len(packets) > 100
    assert [p._qualified_op_name for p in packets if id(p._op) not in jit_builtins._retained] == []


_EXECUTORCH_IMPORT = """
import sys
refreshed = []


def watch(frame, event, arg):
    code = frame.f_code
    if event == "call" and code.co_name == "_refresh_packet" and code.co_filename.endswith("_ops.py"):
        refreshed.append(id(frame.f_locals["packet"]._op))


import torch
import zoo.base
from zoo import jit_builtins
sys.setprofile(watch)
import executorch.exir
sys.setprofile(None)
print(len(refreshed), sum(i not in jit_builtins._retained for i in refreshed))
"""


def test_executorchs_import_drops_no_registered_operator():
    """The case the suite met: `import executorch.exir` (the pte format) adds overloads to
    operators already looked up. Every operator object it replaces stays alive."""
    proc = subprocess.run([sys.executable, "-c", _EXECUTORCH_IMPORT], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-800:]
    refreshed, dropped = map(int, proc.stdout.split())
    assert refreshed > 0  # it does replace operator objects (20 with executorch 1.5.1)
    assert dropped == 0
