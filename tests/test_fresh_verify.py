"""--verify-in fresh: the TorchScript and torch.export files checked by a fresh Python (no zoo)
started before they are written, streaming one file at a time."""

import pytest
import torch

from export.cli.export import _default_verify_in
from export.cli.options import CliError
from export.formats.base import FreshProcess, verify_in_fresh_process
from export.pipeline.build import export_backbone
from export.store.tolerance import sample_inputs
from tests.conftest import backbone_params, build_small


@pytest.mark.parametrize("name", backbone_params("mnistmlp"))
def test_fresh_verification_checks_every_file(name, export, tmp_path):
    net, shape = build_small(name)
    result = export_backbone(net, tmp_path / name, input_shape=shape, verify_in="fresh")
    assert result.ok, result.failures
    m = result.manifest
    for fmt in ("torchscript", "exported", "onnx"):
        assert sorted(m.verification[fmt]) == sorted(m.modes)
        for mode, outputs in m.verification[fmt].items():
            assert list(outputs) == m.output_names(mode) and all(s["ok"] for s in outputs.values())
    seconds = m.timing["seconds"]
    assert "fresh_verify" in seconds and "exported_verify" not in seconds and "torchscript_verify" not in seconds
    # the same numbers as the shared export of the same network, verified in this process
    here = export[1].manifest
    for fmt in ("torchscript", "exported"):
        for mode in m.modes:
            for output, stats in m.verification[fmt][mode].items():
                assert stats["max_abs"] == pytest.approx(here.verification[fmt][mode][output]["max_abs"], rel=0.5,
                                                         abs=1e-6)


_WRONG = """
def run(job, shared):
    return [[x.sum(dim=1) * 0 + 1] for x in job]
"""

_FAILING = """
def run(job, shared):
    raise ValueError("cannot read this file")
"""


def test_fresh_process_compares_and_reports_failures():
    inputs = sample_inputs((1, 4, 4))
    expected = [[(x.sum(dim=1) * 0 + 1).numpy()] for x in inputs]
    wrong = [[(x.sum(dim=1) * 0 + 2).numpy()] for x in inputs]
    jobs = [("a.pt", ["out"], inputs, expected), ("b.pt", ["out"], inputs, wrong)]
    ok, bad = verify_in_fresh_process(_WRONG, [inputs, inputs], jobs)
    assert ok["out"]["ok"] and not bad["out"]["ok"]
    failed = verify_in_fresh_process(_FAILING, [inputs], jobs[:1])[0]["out"]
    assert not failed["ok"] and "fresh process failed: ValueError: cannot read this file" in failed["error"]
    # a child never handed a job exits by itself when closed
    fresh = FreshProcess(_WRONG)
    fresh.close()
    assert fresh._proc.poll() is not None


def test_verify_in_default(monkeypatch):
    monkeypatch.delenv("RETURNT_ZOO_VERIFY_IN", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert _default_verify_in() == "fresh"
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    assert _default_verify_in() == "process"
    monkeypatch.setenv("RETURNT_ZOO_VERIFY_IN", "elsewhere")
    with pytest.raises(CliError, match="RETURNT_ZOO_VERIFY_IN='elsewhere': allowed: fresh, process"):
        _default_verify_in()
    with pytest.raises(Exception, match="verify_in 'x': allowed: process, fresh"):
        export_backbone(torch.nn.Linear(1, 1), "/nonexistent", verify_in="x")


_LEAVES_A_TRACE_AT_TEARDOWN = """
import atexit


def run(job, shared):
    atexit.register(lambda: open(job[0], "w").close())  # runs only if the interpreter tears down
    return [[x.sum(dim=1) * 0 + 1] for x in job[1]]
"""


def test_the_child_exits_without_tearing_down_torch(tmp_path):
    """Its replies are saved before it exits; the ~1 s interpreter teardown of torch's modules
    (every export's last wait before) is skipped, so nothing registered to run at exit runs."""
    inputs = sample_inputs((1, 4, 4))
    expected = [[(x.sum(dim=1) * 0 + 1).numpy()] for x in inputs]
    marker = tmp_path / "torn-down"
    (result,) = verify_in_fresh_process(_LEAVES_A_TRACE_AT_TEARDOWN, [(str(marker), inputs)],
                                        [("a.pt", ["out"], inputs, expected)])
    assert result["out"]["ok"]
    assert not marker.exists()
