"""The trace's rewrite of in-place activations: only where nothing can see the difference."""

import pytest
import torch
from torch import nn

from export.pipeline.trace import functional_activations


def _program(module: nn.Module) -> torch.export.ExportedProgram:
    return torch.export.export(module.eval(), (torch.randn(2, 3, 8, 8),), strict=False)


def _in_place(program) -> list:
    return sorted(str(n.target) for n in program.graph.nodes
                  if n.op == "call_function" and str(n.target).split(".")[-2].endswith("_"))


class Fresh(nn.Module):
    """conv -> BatchNorm -> hardswish_ -> conv -> relu_: each activation's input is new and read once."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Hardswish(inplace=True),
                                  nn.Conv2d(4, 4, 1), nn.ReLU(inplace=True))

    def forward(self, x):
        return self.body(x)


class ReadAgain(nn.Module):
    """relu_ of a tensor the code reads again afterwards: torch.export routes the later read
    through relu_'s result, so the functional relu gives the same graph values."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        z = torch.relu_(y)
        return y * 2 + z


class OfAView(nn.Module):
    """hardswish_ of a view: it writes through to the viewed tensor, which is returned."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        torch.nn.functional.hardswish(y.view(-1), inplace=True)
        return y


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("module, replaced, left", [
    (Fresh(), 2, []),
    (ReadAgain(), 1, []),
    (OfAView(), 0, ["aten.hardswish_.default"]),
], ids=["fresh", "read-again", "of-a-view"])
def test_in_place_activations_become_functional_only_where_unobservable(module, replaced, left):
    torch.manual_seed(0)
    program = _program(module)
    assert functional_activations(program) == replaced
    assert _in_place(program) == left
    with torch.no_grad():
        assert torch.equal(program.module()(X), module(X))


def test_a_later_read_of_the_mutated_tensor_keeps_the_activation_in_place():
    """A graph that reads relu_'s input itself after relu_ (the mutated values): kept in place."""
    program = _program(ReadAgain())
    graph = program.graph_module.graph
    relu = next(n for n in graph.nodes if n.target == torch.ops.aten.relu_.default)
    mul = next(n for n in graph.nodes if n.target == torch.ops.aten.mul.Tensor)
    mul.replace_input_with(relu, relu.args[0])  # mul now reads the conv output after relu_ wrote it
    program.graph_module.recompile()
    with torch.no_grad():
        want = program.module()(X)
    assert functional_activations(program) == 0 and _in_place(program) == ["aten.relu_.default"]
    with torch.no_grad():
        assert torch.equal(program.module()(X), want)
