"""export.formats.onnx_registry: ONNX conversions share one torchlib registry per opset and set
of registered operators, convert to the same bytes, and leave torch as installed outside."""

import pytest
import torch
from torch.onnx._internal.exporter import _registration

import export.formats.onnx as onnx_format
import export.formats.onnx_registry as onnx_registry
from export.formats.onnx_registry import reused_registry
from export.formats.scoped_patch import ScopedPatch
from export.pipeline.trace import export_program
from tests.conftest import build_small


def _own():
    return _registration.ONNXRegistry.__dict__["from_torchlib"]


@pytest.fixture(autouse=True)
def nothing_built_yet(monkeypatch):
    """The registry is kept for the process: each test starts as if no conversion had run."""
    monkeypatch.setattr(onnx_registry, "_BUILT", {})


def test_conversions_share_one_registry_and_convert_alike(monkeypatch):
    net, shape = build_small("mnistmlp")
    program = export_program(net, "full", shape)
    build = _own().__func__
    built = []

    def counted(cls, opset_version=20):
        built.append(opset_version)
        return build(cls, opset_version)

    monkeypatch.setattr(_registration.ONNXRegistry, "from_torchlib", classmethod(counted))
    counting = _own()
    monkeypatch.setattr(onnx_format, "reused_registry", ScopedPatch(lambda: False, lambda: None))
    plain = onnx_format.export_onnx(net, program).models["full"].SerializeToString()
    assert len(built) == 1
    monkeypatch.setattr(onnx_format, "reused_registry", reused_registry)
    with reused_registry() as active:
        assert active, "torch's exporter no longer has the ONNXRegistry.from_torchlib this module reuses"
        assert _own() is not counting
        first = onnx_format.export_onnx(net, program).models["full"].SerializeToString()
        again = onnx_format.export_onnx(net, program).models["full"].SerializeToString()
        assert len(built) == 2  # the first conversion in the block built it; the second reused it
        opset = built[-1]
        given = _registration.ONNXRegistry.from_torchlib(opset_version=opset)
        given.functions.clear()  # a caller's changes stay in its copy
        assert _registration.ONNXRegistry.from_torchlib(opset_version=opset).functions and len(built) == 2
        _registration.ONNXRegistry.from_torchlib(opset_version=opset - 1)
        assert built[-1] == opset - 1  # another opset: built
    assert _own() is counting  # restored after the block
    assert first == again == plain


def test_an_operator_registered_later_gets_a_new_registry(monkeypatch):
    build = _own().__func__
    built = []
    monkeypatch.setattr(_registration.ONNXRegistry, "from_torchlib",
                        classmethod(lambda cls, opset_version=20: built.append(1) or build(cls, opset_version)))
    with reused_registry():
        _registration.ONNXRegistry.from_torchlib()
        _registration.ONNXRegistry.from_torchlib()
        assert len(built) == 1
        library = torch.library.Library("returnt_zoo_registry_test", "DEF")
        try:
            library.define("twice(Tensor x) -> Tensor")
            _registration.ONNXRegistry.from_torchlib()
            assert len(built) == 2
        finally:
            library._destroy()


@pytest.mark.parametrize("nested", [True, False])
def test_blocks_share_one_installation(nested):
    own = _own()
    with reused_registry():
        installed = _own()
        assert installed is not own
        if nested:
            with reused_registry():
                assert _own() is installed
        assert _own() is installed
    assert _own() is own
