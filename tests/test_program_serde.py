"""export.formats.program_serde: torch.export.save/load with memoised lookups give torch's own
programs and bytes, with far fewer sympy parses and type-hint resolutions, and leave torch as
installed outside the block."""

import io
import re
import threading
import typing

import pytest
import sympy
import torch
from torch._export.serde import serialize

from export.formats.program_serde import memoised_serde
from tests.conftest import backbone_params


def _torchs_own():
    return (serialize.GraphModuleDeserializer.__dict__["_parse_sym_expr"], serialize._print_sympy, serialize.typing,
            serialize.canonicalize)


def _saved(program) -> bytes:
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def _shapes(program) -> list:
    return [str(node.meta["val"].shape) for node in program.graph.nodes
            if isinstance(node.meta.get("val"), torch.Tensor)]


@pytest.mark.parametrize("name", backbone_params("resnet18"))
def test_memoised_load_and_save_give_torchs_own_program(name, export, monkeypatch):
    """The 'full' program of a CIFAR ResNet-18 (batch, height and width dynamic)."""
    _, result = export
    data = (result.directory / "full.ep.pt2").read_bytes()
    calls = {"sympify": 0, "hints": 0, "canonicalize": 0}
    sympify, get_type_hints, canonicalize = sympy.sympify, typing.get_type_hints, serialize.canonicalize

    def counted_sympify(*args, **kwargs):
        calls["sympify"] += isinstance(args[0], str)
        return sympify(*args, **kwargs)

    def counted_hints(*args, **kwargs):
        calls["hints"] += 1
        return get_type_hints(*args, **kwargs)

    def counted_canonicalize(*args, **kwargs):
        calls["canonicalize"] += 1
        return canonicalize(*args, **kwargs)

    monkeypatch.setattr(sympy, "sympify", counted_sympify)
    monkeypatch.setattr(typing, "get_type_hints", counted_hints)
    monkeypatch.setattr(serialize, "canonicalize", counted_canonicalize)
    own = _torchs_own()
    plain = torch.export.load(io.BytesIO(data))
    plain_saved = _saved(plain)  # torch's own save runs its self-check
    plain_calls = dict(calls)
    calls.update(sympify=0, hints=0, canonicalize=0)
    with memoised_serde() as active:
        assert active, "torch's serializer no longer has the names program_serde memoises"
        assert all(mine is not torchs for mine, torchs in zip(_torchs_own(), own)), "a memo or the skip is missing"
        memoised = torch.export.load(io.BytesIO(data))
        resaved = _saved(plain)
    assert _torchs_own() == own  # restored after the block
    assert plain_calls["sympify"] > 300 and calls["sympify"] * 10 < plain_calls["sympify"], (plain_calls, calls)
    assert plain_calls["hints"] > 1000 and calls["hints"] * 100 < plain_calls["hints"], (plain_calls, calls)
    assert plain_calls["canonicalize"] == 1 and calls["canonicalize"] == 0, (plain_calls, calls)
    assert memoised.graph_module.code == plain.graph_module.code
    assert _shapes(memoised) == _shapes(plain) and any(re.search(r"\bs\d+", s) for s in _shapes(plain))
    assert {str(k): str(v) for k, v in memoised.range_constraints.items()} == {
        str(k): str(v) for k, v in plain.range_constraints.items()}
    assert memoised.state_dict.keys() == plain.state_dict.keys()
    assert all(torch.equal(memoised.state_dict[k], plain.state_dict[k]) for k in plain.state_dict)
    assert resaved == plain_saved == _saved(memoised) == data
    x = torch.randn(3, 3, 40, 24)  # a height and width the export never saw
    with torch.no_grad():
        for got, want in zip(memoised.module()(x), plain.module()(x)):
            assert torch.equal(got, want)


def test_nested_and_concurrent_uses_share_one_installation():
    own = _torchs_own()
    with memoised_serde():
        installed = _torchs_own()
        with memoised_serde():
            assert _torchs_own() == installed
        assert _torchs_own() == installed  # the outer block still has them
    assert _torchs_own() == own
    barrier = threading.Barrier(4)
    seen = []

    def use():
        with memoised_serde() as active:
            barrier.wait(timeout=30)
            seen.append(active and _torchs_own() != own)
            barrier.wait(timeout=30)

    threads = [threading.Thread(target=use) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert seen == [True] * 4 and _torchs_own() == own


def test_the_self_check_is_skipped_only_where_its_result_is_discarded():
    from export.formats.program_serde import _self_check_discarded, _without_self_check

    def discards(self, ep):
        canonicalize(ep, set())
        return ep

    def uses(self, ep):
        ep = canonicalize(ep, set())
        return ep

    def both(self, ep):
        canonicalize(ep)
        return canonicalize(ep)

    def canonicalize(ep, constants=None):
        return ("canonical", ep)

    assert _self_check_discarded(serialize.ExportedProgramSerializer.serialize)  # torch 2.14's own
    assert _self_check_discarded(discards) and not _self_check_discarded(uses) and not _self_check_discarded(both)
    def serializer(ep):
        return skipping(ep)

    skipping = _without_self_check(canonicalize, serializer.__code__)
    assert serializer("ep") == "ep"  # the self-check's call: skipped
    assert skipping("ep") == ("canonical", "ep")  # any other caller gets torch's result
