"""load_program deserialises each distinct program once per process and hands out private copies."""

import pytest
import torch

from export.formats.program import _ProgramCache, load_program, program_bytes, program_params, set_program_params
from tests.conftest import backbone_params


@pytest.mark.parametrize("name", backbone_params("resnet18"))
def test_copies_are_private_and_save_to_the_same_bytes(name, export):
    net, result = export
    path = result.directory / "full.ep.pt2"
    layout = result.manifest.flat_params.layout
    first, second = load_program(path), load_program(path)
    assert first is not second
    assert program_bytes(second) == path.read_bytes()
    set_program_params(first, torch.zeros(net.num_params()), layout)
    assert torch.equal(program_params(second, layout), net.get_params())
    assert torch.equal(program_params(load_program(path), layout), net.get_params())
    x = torch.randn(2, 3, 40, 24)  # a height and width the export never saw
    with torch.no_grad():
        assert torch.equal(second.module()(x)[-1], load_program(path).module()(x)[-1])


def test_distinct_bytes_are_parsed_and_the_limit_holds():
    parsed = []

    def parse(data: bytes):
        parsed.append(data)
        return {"program": data}

    cache = _ProgramCache(limit=10)
    a, b, big = b"a" * 6, b"b" * 4, b"c" * 11
    assert cache.get(a, parse) == {"program": a} and cache.get(a, parse) == {"program": a}
    assert parsed == [a]  # the second a was a copy
    cache.get(b, parse)
    cache.get(big, parse), cache.get(big, parse)
    assert parsed == [a, b, big, big]  # larger than the limit: never kept
    cache.get(a, parse)
    assert parsed == [a, b, big, big]  # a and b fit the limit together
    d = b"d" * 5
    cache.get(d, parse)  # 15 bytes: the least recently used go (b, then a) until it fits
    assert parsed == [a, b, big, big, d]
    cache.get(d, parse), cache.get(a, parse)
    assert parsed == [a, b, big, big, d, a]
