"""ExecuTorch programs (`--formats pte`): lowered to XNNPACK with a bounded dynamic batch,
verified by ExecuTorch's runtime in a fresh process at batch 1, 3 and the bound, run by the
`executorch` engine; what they cannot do (weights) is refused in one line.

Lowering costs ~8-15 s per mode here (ExecuTorch's passes), so these tests share one small
export (an 8-filter CIFAR ResNet-18: convolutions, BatchNorm, pooling; 'full', which holds every
output the other modes return) on one xdist worker. mnistmlp's 'out' is lowered for batch 1 here
and for a dynamic batch by the bench's export (tests/test_quantize_bench.py).
"""

import os
import subprocess
import sys

import pytest
import torch

from export.errors import ExportError, ParamsError
from export.formats.base import retrace_keeping_ranges
from export.pipeline.build import export_backbone
from export.runtime import load
from tests.conftest import REPO, assert_runtime_matches_eager, build_small
from tests.test_export_cli import run

pytest.importorskip("executorch", reason="the edge extra is not installed (make install installs it)")
pytestmark = pytest.mark.xdist_group("pte")
MAX_BATCH = 64
MODES = ["full"]
_BUILT = {}


@pytest.fixture(scope="module")
def pte_export(tmp_path_factory):
    if "resnet18" not in _BUILT:
        net, shape = build_small("resnet18")
        result = export_backbone(net, tmp_path_factory.mktemp("pte") / "resnet18", modes=MODES,
                                 formats=["onnx", "pte"], input_shape=shape, pte_max_batch=MAX_BATCH)
        _BUILT["resnet18"] = (net, result)
    return _BUILT["resnet18"]


def test_programs_are_verified_and_recorded(pte_export):
    _, result = pte_export
    assert result.ok, result.failures
    m = result.manifest
    assert m.formats == ["onnx", "pte"]
    for mode in MODES:
        info = m.programs[f"{mode}.pte"]
        assert info.format == "pte" and info.max_batch == MAX_BATCH and info.dynamic == ["batch"]
        assert info.backend == "XnnpackBackend" and info.executorch == "1.5.1"
        assert info.delegated_ops_pct > 90 and info.planned_bytes > 0 and not info.weights_replaceable
        assert info.flat_params
        stats = m.verification["pte"][mode]
        assert all(s["ok"] for s in stats.values()), stats
    assert m.timing["seconds"]["pte_lower"] > 0 and m.timing["seconds"]["pte_verify"] > 0


def test_executorch_engine_up_to_the_bound(pte_export):
    """1, 5 and the bound (64) as eager; one more is refused in one line before ExecuTorch."""
    net, result = pte_export
    runtime = load(result.directory, engine="executorch")
    for batch in (1, 5, MAX_BATCH):
        x = torch.randn(batch, *runtime.input_shape, generator=torch.Generator().manual_seed(batch))
        assert_runtime_matches_eager(runtime, net, x, MODES)
    with pytest.raises(ValueError, match=r"^batch 65: full.pte takes batches of 1 to 64 .*--pte-max-batch 65"):
        runtime(torch.zeros(MAX_BATCH + 1, *runtime.input_shape), returnt="full")
    v = net.get_params()
    assert torch.equal(runtime.get_params().view(torch.int32), v.view(torch.int32))  # bit for bit
    with pytest.raises(ParamsError, match="set_params: a .pte runs the weights it was lowered with .* --formats pte"):
        runtime.set_params(v)


_FRESH = """
import sys, torch
from executorch.runtime import Runtime
program = Runtime.get().load_program(sys.argv[1])
method = program.load_method("forward")
print(tuple(method.execute([torch.randn(64, 3, 32, 32)])[-1].shape))  # full: the logits last
"""


def test_a_program_runs_batch_64_without_the_zoo(pte_export):
    """ExecuTorch's own runtime, nothing of the zoo (`-I`): the memory is planned for 64 images
    (it was planned for 15 before the lowering kept the program's batch range)."""
    _, result = pte_export
    proc = subprocess.run([sys.executable, "-I", "-c", _FRESH, str(result.directory / "full.pte")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-800:]
    assert proc.stdout.strip().splitlines()[-1] == "(64, 10)"


def _upper_bound_after_lowering(keep: bool) -> int:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.exir.sym_util import eval_upper_bound

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Flatten()).eval()
    program = torch.export.export(net, (torch.randn(2, 3, 8, 8),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},))
    if keep:
        with retrace_keeping_ranges(program):
            edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    else:
        edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    x = [n for n in edge.exported_program().graph.nodes if n.op == "placeholder"][-1]  # the input
    return eval_upper_bound(x.meta["val"].shape[0])


def test_lowering_keeps_the_exported_batch_range():
    """The source of the old bound of 15: re-tracing runs FakeTensor's convolution, whose
    backend choice evaluates NNPACK's `batch >= 16` on the example batch (2) and records it as a
    guard. Lowered plainly the range shrinks to 15; with the guards suppressed it stays 64."""
    assert _upper_bound_after_lowering(keep=False) == 15
    assert _upper_bound_after_lowering(keep=True) == MAX_BATCH


def test_verify_and_refusals(pte_export, tmp_path, capsys):
    _, result = pte_export
    code, out, err = run(capsys, "verify", result.directory)
    assert code == 0, out + err
    assert " pte " in out and "0 failed" in out
    assert [ln.split()[:4] for ln in out.splitlines() if "flat params" in ln and " pte " in ln] == \
        [["full", "flat", "params", "pte"]]
    from tests.continual import task_checkpoints

    ckpt = task_checkpoints(tmp_path / "run", "resnet18", 1, num_filters=8)[0]
    code, out, err = run(capsys, "publish", result.directory, ckpt)
    assert code == 2 and "a .pte runs the weights it was lowered with" in err
    assert len(err.strip().splitlines()) == 1
    code, out, err = run(capsys, "params", "read", result.directory / "full.pte", "--out", tmp_path / "v.npy")
    assert code == 0, err
    import numpy as np

    assert np.array_equal(np.load(tmp_path / "v.npy"), pte_export[0].get_params().numpy())
    torch.save(pte_export[0].get_params(), tmp_path / "v.pt")
    code, out, err = run(capsys, "params", "write", result.directory / "full.pte", tmp_path / "v.pt",
                         "--out", tmp_path / "new.pte")
    assert code == 2 and "new weights need lowering again: python -m export BACKBONE" in err


@pytest.mark.parametrize("argv, message", [
    (["--pte-max-batch", "0"], "--pte-max-batch 0: the batch bound goes from 1 to 4096"),
    (["--pte-max-batch", "5000"], "--pte-max-batch 5000: the batch bound goes from 1 to 4096"),
])
def test_bad_bound_is_one_line(capsys, tmp_path, argv, message):
    code, _, err = run(capsys, "mnistmlp", "--formats", "pte", *argv, "--out", tmp_path)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_batch_one_program(tmp_path):
    """--pte-max-batch 1: a static batch-1 program (the smallest memory plan for devices); without
    the get_params method (--pte-without-params) the file is smaller by the weights' size."""
    net, shape = build_small("mnistmlp")
    result = export_backbone(net, tmp_path / "b1", modes=["out"], formats=["pte"], input_shape=shape,
                             pte_max_batch=1, pte_params=False)
    assert result.ok, result.failures
    info = result.manifest.programs["out.pte"]
    assert info.max_batch == 1 and info.batch == 1 and info.dynamic == [] and not info.flat_params
    with_params = export_backbone(net, tmp_path / "b1p", modes=["out"], formats=["pte"], input_shape=shape,
                                  pte_max_batch=1)
    weights = 4 * net.num_params()
    grown = with_params.manifest.files["out.pte"].size - result.manifest.files["out.pte"].size
    assert weights <= grown < weights + 4096
    runtime = load(tmp_path / "b1", engine="executorch")
    assert_runtime_matches_eager(runtime, net, torch.randn(1, *shape), ["out"])
    with pytest.raises(ValueError, match="batch 2: out.pte takes batches of 1 to 1"):
        runtime(torch.zeros(2, *shape))
    with pytest.raises(ParamsError, match="lowered without the get_params method .*--pte-without-params"):
        runtime.get_params()


_WITHOUT = """
import sys
sys.modules["executorch"] = None  # as if the edge extra were not installed
from export.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_without_executorch_one_line_names_the_extra(tmp_path, pte_export):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _WITHOUT, "mnistmlp", "--formats", "pte", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: the pte format (ExecuTorch) needs executorch: pip install 'returnt-zoo[edge]' (executorch==1.5.1)"]
    code = ("import sys; sys.modules['executorch'] = None\nfrom export.runtime import load\n"
            f"load({str(pte_export[1].directory)!r}, engine='executorch')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1 and "ExportError: the pte format (ExecuTorch) needs executorch" in proc.stderr
    with pytest.raises(ExportError, match="unknown engine 'tflite'; allowed: .*executorch"):
        load(pte_export[1].directory, engine="tflite")
