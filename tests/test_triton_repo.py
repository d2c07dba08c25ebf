"""`python -m export triton`: every config.pbtxt parses with Triton's own ModelConfig schema and
says what the manifest says; the model files in the repository give the export's outputs."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from export.formats.torchscript import jit_deprecations_silenced
from export.runtime import load
from tests.conftest import REPO, assert_within_bound, exported, flat_outputs
from tests.test_export_cli import run
from zoo.base import RETURNT_MODES

pytestmark = pytest.mark.xdist_group("backbone-mnistmlp")


def parse_config(path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def repo(export_root, tmp_path_factory):
    _, result = exported("mnistmlp", export_root)
    out = tmp_path_factory.mktemp("triton") / "repo"
    proc = subprocess.run([sys.executable, "-m", "export", "triton", str(result.directory), "--repo", str(out),
                           "--max-batch-size", "16"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out, result.directory


def test_every_config_parses_and_matches_the_manifest(repo):
    out, directory = repo
    net = load(directory)
    names = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert names == sorted([f"mnistmlp_{m}" for m in RETURNT_MODES] + [f"mnistmlp_{m}_ts" for m in RETURNT_MODES])
    for mode in RETURNT_MODES:
        outputs = net.manifest.modes[mode].outputs
        onnx_cfg = parse_config(out / f"mnistmlp_{mode}" / "config.pbtxt")
        ts_cfg = parse_config(out / f"mnistmlp_{mode}_ts" / "config.pbtxt")
        assert (onnx_cfg.platform, ts_cfg.platform) == ("onnxruntime_onnx", "pytorch_libtorch")
        assert onnx_cfg.max_batch_size == ts_cfg.max_batch_size == 16
        assert onnx_cfg.HasField("dynamic_batching") and ts_cfg.HasField("dynamic_batching")
        assert [(i.name, list(i.dims)) for i in onnx_cfg.input] == [("x", list(net.input_shape))]
        assert [(i.name, list(i.dims)) for i in ts_cfg.input] == [("INPUT__0", list(net.input_shape))]
        assert [(o.name, list(o.dims)) for o in onnx_cfg.output] == [(o.name, o.shape[1:]) for o in outputs]
        assert [(o.name, list(o.dims)) for o in ts_cfg.output] == [(f"OUTPUT__{i}", o.shape[1:])
                                                                   for i, o in enumerate(outputs)]
        assert onnx_cfg.parameters["source_sha256"].string_value == net.manifest.files[f"{mode}.onnx"].sha256


def test_repository_files_give_the_exports_outputs(repo):
    import onnxruntime as ort

    out, directory = repo
    net = load(directory)
    x = np.random.default_rng(0).standard_normal((3, *net.input_shape)).astype(np.float32)
    for mode in RETURNT_MODES:
        want = flat_outputs(net(x, returnt=mode))
        session = ort.InferenceSession(str(out / f"mnistmlp_{mode}" / "1" / "model.onnx"),
                                       providers=["CPUExecutionProvider"])
        for got, w in zip(session.run(None, {"x": x}), want):
            assert_within_bound(got, w)
        with jit_deprecations_silenced():
            module = torch.jit.load(str(out / f"mnistmlp_{mode}_ts" / "1" / "model.pt"))
        with torch.no_grad():
            got = module(torch.from_numpy(x))
        for g, w in zip(flat_outputs(got), want):
            assert_within_bound(g.numpy(), w)


def test_rewrite_replaces_models_and_refuses_foreign_directories(repo, tmp_path):
    from export.errors import ExportError
    from export.serving.triton import write_repository

    out, directory = repo
    written = write_repository([directory], out, ["onnxruntime"], max_batch_size=4)
    assert len(written) == 4 and parse_config(out / "mnistmlp_out" / "config.pbtxt").max_batch_size == 4
    assert not [p for p in out.iterdir() if ".staging-" in p.name or ".old-" in p.name]
    foreign = tmp_path / "repo"
    (foreign / "mnistmlp_out").mkdir(parents=True)
    (foreign / "mnistmlp_out" / "notes.txt").write_text("someone else's")
    with pytest.raises(ExportError, match="mnistmlp_out exists and is not a directory this tool wrote"):
        write_repository([directory], foreign, ["onnxruntime"])
    assert (foreign / "mnistmlp_out" / "notes.txt").read_text() == "someone else's"


@pytest.mark.parametrize("args, fragment", [
    (["--backends", "tensorrt"], "unknown --backends value 'tensorrt'; allowed: onnxruntime, pytorch"),
    (["--max-batch-size", "0"], "--max-batch-size 0 is not allowed"),
])
def test_bad_triton_options_are_one_line(repo, tmp_path, args, fragment, capsys):
    _, directory = repo
    code, _, err = run(capsys, "triton", directory, "--repo", tmp_path / "r", *args)
    assert code == 2 and err.count("\n") == 1 and fragment in err, err


def test_a_repository_that_is_a_file_or_inside_an_export_is_refused(repo, tmp_path, capsys):
    """--repo naming an existing file, the export directory itself, or a folder inside it: one
    line, exit 2, and nothing written (model directories there would become stray files)."""
    from tests.conftest import export_dir_snapshot

    _, directory = repo
    (tmp_path / "file").write_text("not a directory")
    before = export_dir_snapshot(directory)
    for target, fragment in ((tmp_path / "file", "is a file; expected a directory"),
                             (directory, f"is inside the export directory {directory.resolve()}"),
                             (directory / "triton", f"is inside the export directory {directory.resolve()}")):
        code, _, err = run(capsys, "triton", directory, "--repo", target)
        assert code == 2 and err.count("\n") == 1 and fragment in err, err
        assert "Traceback" not in err
    assert export_dir_snapshot(directory) == before
    assert (tmp_path / "file").read_text() == "not a directory"
