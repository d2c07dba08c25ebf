"""Shared test fixtures: the small configuration of every backbone, and the reference data."""

import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, Tuple

import numpy as np
import pytest
import torch

from export.store.tolerance import error_stats
from tests.cases import case_for
from zoo import get_backbone, get_entry, list_backbones
from zoo.base import unpack_outputs
from zoo.unit_scale import set_unit_scale

REPO = Path(__file__).resolve().parents[1]
#: Mammoth reference vectors shipped with the repository (a plain clone tests itself)
VECTORS = REPO / "tests" / "data" / "vectors"
#: the CI's shared data beside the clone: also holds the two large vector files
SHARED_VECTORS = REPO.parent / "shared" / "vectors"
LARGE_VECTORS = ("efficientnet-b0.pt", "reduced-resnet18.pt")


def pytest_configure(config) -> None:
    """Two xdist workers share two cores: one thread each for torch and (through
    export.formats.onnx.ort_session, which follows torch) onnxruntime, instead of four competing;
    the processes they start too.
    The CLI's exports verify in this process (--verify-in process): a fresh verifying Python
    per export costs ~5 s of CPU for its imports, which the other worker's core cannot absorb
    here; tests of --verify-in fresh ask for it."""
    os.environ.setdefault("RETURNT_ZOO_VERIFY_IN", "process")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
        # the processes the tests start (CLI exports, fresh verifiers, the README example) share
        # the same two cores: one OpenMP thread each, not two waiting on a busy core
        os.environ.setdefault("OMP_NUM_THREADS", "1")


def build_small(name: str) -> Tuple[Any, Tuple[int, ...]]:
    """The backbone at its small test arguments, in eval(), and the test input shape: random
    BatchNorm affine parameters, running statistics from a forward pass (unit-scale
    activations, as exports of random weights get), so eval-mode BN is really exercised and
    every output has a magnitude a comparison can see."""
    case = case_for(name)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pretrained variants without weights
        net = case.build() if case.build else get_backbone(name, **case.kwargs)
    shape = case.input_shape or tuple(net.input_shape)
    randomise_bn_affine(net)
    set_unit_scale(net, shape)
    return net.eval(), shape


def randomise_bn_affine(net: torch.nn.Module, seed: int = 1) -> None:
    """BatchNorm weights and biases away from 1 and 0."""
    gen = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            with torch.no_grad():
                m.weight.copy_(1 + torch.randn(c, generator=gen) * 0.1)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.1)


def _marks(name: str) -> list:
    return [pytest.mark.xdist_group(f"backbone-{name}")] + ([pytest.mark.slow] if case_for(name).slow else [])


def has_format(name: str, fmt: str) -> bool:
    """Whether the registered backbone `name` is exported to `fmt` (timm's do not script)."""
    return fmt not in get_entry(name).unsupported_formats


def backbone_params(*names: str, fmt: str = ""):
    """pytest params over the registry (or the backbones named; with `fmt`, those exported to
    it), slow ones marked. All tests of one backbone form one xdist group (`--dist loadgroup`),
    so each backbone is exported once per run, whether a test takes every backbone or a few."""
    return [pytest.param(n, id=n, marks=_marks(n)) for n in (names or list_backbones())
            if not fmt or has_format(n, fmt)]


def backbone_format_params(formats, *names: str):
    """pytest params (name, format) over the registry (or the backbones named) x `formats`, each
    backbone with the formats it is exported to; `formats` maps a label (an engine) to its
    format, or lists formats."""
    labels = formats if isinstance(formats, dict) else {f: f for f in formats}
    return [pytest.param(n, label, id=f"{n}-{label}", marks=_marks(n))
            for n in (names or list_backbones()) for label, fmt in labels.items() if has_format(n, fmt)]


def vector_files():
    """pytest params: the bundled vectors, then the large ones from ../shared/vectors (skipped,
    with the reason, on a clone without it)."""
    bundled = sorted(VECTORS.glob("*.pt")) + sorted((VECTORS / "extra").glob("*.pt"))
    params = [pytest.param(p, id=p.name) for p in bundled]
    for name in LARGE_VECTORS:
        path = SHARED_VECTORS / name
        params.append(pytest.param(path, id=name, marks=pytest.mark.skipif(
            not path.is_file(), reason=f"{name} is only in ../shared/vectors (CI), not beside this clone")))
    return params


def load_vector(path: Path) -> Dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


#: a returnt call's outputs as a list, whatever the mode
flat_outputs = unpack_outputs


def assert_within_bound(got, want) -> None:
    """The export's own bound (export.store.tolerance.error_stats), so tests and exports agree."""
    stats = error_stats(np.asarray(got), np.asarray(want))
    assert stats["ok"], (f"max |diff| {stats['max_abs']:.3g} (relative {stats['max_rel']:.3g}) "
                         f"beyond the bound; {stats.get('error', '')}")


def assert_runtime_matches_eager(runtime, net, x, modes) -> None:
    """`runtime(x, returnt=mode)` returns what eager returns, for every mode: the same structure
    (a tensor, a tuple, a list), torch tensors for torch input, each output within the bound."""
    for mode in modes:
        with torch.no_grad():
            want = net(x, returnt=mode)
        got = runtime(x, returnt=mode)
        assert type(got) is type(want), (mode, type(got))
        assert all(isinstance(t, torch.Tensor) for t in flat_outputs(got))
        for g, w in zip(flat_outputs(got), flat_outputs(want)):
            assert_within_bound(g.numpy(), w.numpy())


def export_dir_snapshot(directory: Path) -> Dict[str, bytes]:
    """Every file under an export directory (recursively) with its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(Path(directory).rglob("*")) if p.is_file()}


_EXPORTS: Dict[str, Any] = {}


def exported(name: str, root: Path):
    """Export the small configuration of `name` once per test process (all modes, formats)."""
    if name not in _EXPORTS:
        from export.pipeline.build import export_backbone

        net, shape = build_small(name)
        _EXPORTS[name] = (net, export_backbone(net, root / name, input_shape=shape))
    return _EXPORTS[name]


@pytest.fixture(scope="session")
def export_root(tmp_path_factory) -> Iterator[Path]:
    """One export per backbone for the whole session, removed at its end: it is gigabytes,
    and pytest's retention policy keeps only failed tests' own directories."""
    root = tmp_path_factory.mktemp("exports")
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def export(name, export_root):
    """(net, ExportResult) of the backbone parametrised as `name`."""
    return exported(name, export_root)


@pytest.fixture(scope="session", autouse=True)
def zoo_list_cache(tmp_path_factory) -> Iterator[Path]:
    """`python -m zoo list` caches its table in the user's cache directory; tests (and the
    processes they start) use their own."""
    from zoo.listing import CACHE_ENV

    path = tmp_path_factory.mktemp("zoo-list-cache")
    old = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(path)
    yield path
    if old is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = old
