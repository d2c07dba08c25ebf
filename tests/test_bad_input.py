"""Every bad option and every unusable checkpoint is one line before any work; no tracebacks."""

import io
import json
import random
import subprocess
import sys

import pytest
import torch

from export.cli import main
from export.pipeline.checkpoint import read_checkpoint
from tests.conftest import REPO, VECTORS
from zoo.weights import CheckpointError


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("argv, message", [
    (["mnistmlp", "--opset", "17"], "--opset 17 is not supported; allowed: 18-"),
    (["mnistmlp", "--opset", "99"], "--opset 99 is not supported; allowed: 18-"),
    (["mnistmlp", "--opset", "-1"], "--opset -1 is not supported"),
    (["mnistmlp", "--num_classes", "0"], "argument 'num_classes' must be a positive integer, got 0"),
    (["resnet18", "--num_classes", "-3"], "argument 'num_classes' must be a positive integer, got -3"),
    (["mnistmlp", "--mlp_hidden_size", "-1"], "'mlp_hidden_size' must be a positive integer, got -1"),
    (["resnet18", "--num_filters", "0"], "'num_filters' must be a positive integer, got 0"),
    (["mnistmlp", "--device", "bogus"], "--device 'bogus' is not a device; allowed: cpu, cuda, cuda:N"),
    (["mnistmlp", "--device", "mps"], "--device 'mps' is not supported; allowed: cpu, cuda"),
    (["resnet18", "--input-shape", "3,-4,32"], "dimensions must be positive"),
    (["resnet18", "--input-shape", "3,6000,6000"], "GiB of activations for backbone 'resnet18'"),
    (["resnet18", "--input-shape", "3,100000,100000"], "GiB of activations for backbone 'resnet18'"),
    (["mnistmlp", "--name", "../x"], "--name '../x' is not a plain directory name"),
    (["mnistmlp", "--name", "/abs/x"], "--name '/abs/x' is not a plain directory name"),
    (["mnistmlp", "--name", "."], "--name '.' is not a plain directory name"),
    (["mnistmlp", "--name", ""], "--name '' is not a plain directory name"),
])
def test_bad_options_are_one_line_before_any_work(capsys, tmp_path, argv, message):
    code, _, err = run(capsys, *argv, "--out", tmp_path)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(capsys, tmp_path):
    code, _, err = run(capsys, "mnistmlp", "--device", "cuda", "--out", tmp_path)
    assert code == 2 and "CUDA is not available on this machine; use cpu" in err


def test_opset_in_range_is_honoured(capsys, tmp_path):
    code, _, err = run(capsys, "mnistmlp", "--opset", "20", "--formats", "onnx", "--modes", "out",
                       "--out", tmp_path)
    assert code == 0, err
    assert json.loads((tmp_path / "mnistmlp" / "manifest.json").read_text())["opset"] == 20


def test_export_refuses_a_directory_it_did_not_write(capsys, tmp_path):
    (tmp_path / "mnistmlp").mkdir()
    (tmp_path / "mnistmlp" / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "mnistmlp", "--out", tmp_path)
    assert code == 2 and "exists and is not an export directory (no manifest.json)" in err
    assert (tmp_path / "mnistmlp" / "notes.txt").read_text() == "mine"


def test_nonfinite_weights_are_named_and_manifests_stay_json(tmp_path):
    from export.errors import ExportError
    from export.pipeline.build import export_backbone
    from export.store.manifest import manifest_bytes, parse_manifest
    from zoo import get_backbone

    net = get_backbone("mnistmlp", mlp_hidden_size=4)
    with torch.no_grad():
        net.classifier.bias[1] = float("nan")
    with pytest.raises(ExportError, match="the weights have NaN in classifier.bias"):
        export_backbone(net, tmp_path / "nan")
    assert not (tmp_path / "nan").exists()
    manifest = parse_manifest({"backbone": {"name": "toy"}, "input": {"shape": ["batch", 4]}, "modes": {},
                               "files": {}, "flat_params": {"count": 0},
                               "verification": {"onnx": {"max_abs": float("nan"), "x": [float("inf")]}}})
    assert json.loads(manifest_bytes(manifest))["verification"] == {"onnx": {"max_abs": "nan", "x": ["inf"]}}


def _fuzz_files(directory, count_random=130, count_truncated=130, count_flipped=130):
    """400+ checkpoint-like files: random bytes, truncated and bit-flipped zips of a real Mammoth
    checkpoint, text, and pickles of the wrong structure."""
    rng = random.Random(0)
    good = (VECTORS / "checkpoints" / "mammoth_safe_resnet18.pt").read_bytes()
    files = []

    def add(name, data):
        path = directory / name
        path.write_bytes(data)
        files.append(path)

    for i in range(count_random):
        add(f"random{i}.pt", bytes(rng.randrange(256) for _ in range(rng.randrange(0, 3000))))
    for i in range(count_truncated):
        add(f"truncated{i}.pt", good[:rng.randrange(len(good))])
    for i in range(count_flipped):
        data = bytearray(good)
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        add(f"flipped{i}.pt", bytes(data))
    weights = {"net.conv1.weight": torch.zeros(1)}
    structures = [{"backbone": 123}, {"model": {"net.a": 1}}, {"model": 5}, {"state_dict": 5},
                  {1: torch.zeros(1)}, {"model": {1: torch.zeros(1)}}, {"model": weights, "args": 5},
                  {"model": weights, "args": {"backbone": 123}}, {"state_dict": {"a": "b"}},
                  [1, 2], "text", 5, None, {"model": {}}]
    for i, obj in enumerate(structures):
        add(f"structure{i}.pt", _saved(obj))
    add("text.pt", b"these are not weights\n" * 20)
    add("empty.pt", b"")
    add("zip.pt", _zip_of_text())
    return files


def _saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _zip_of_text() -> bytes:
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("archive/data.pkl", "hello")
    return buffer.getvalue()


def test_checkpoint_fuzz_raises_only_checkpoint_errors(tmp_path):
    files = _fuzz_files(tmp_path)
    assert len(files) >= 400
    refused = 0
    for path in files:
        try:
            read_checkpoint(path)
        except CheckpointError as exc:
            refused += 1
            message = str(exc)
            assert "\n" not in message and str(path) in message
            assert "allow-unsafe-pickle" not in message, (path.name, message)
    assert refused >= 250  # random, truncated, text and wrong structures are all refused


@pytest.mark.parametrize("obj, message", [
    ({"model": {"net.conv1.weight": torch.zeros(1)}, "args": {"backbone": 123}},
     "'args' names backbone 123, expected a registered name"),
    ({"state_dict": 5}, "'state_dict' is a int, expected a dict of tensors"),
    ({1: torch.zeros(1), 2: torch.zeros(1)}, "the file has non-string keys (1, 2)"),
    ({"model": 5}, "'model' is a int, expected the continual model's state_dict"),
])
def test_checkpoint_structures_are_named(tmp_path, capsys, obj, message):
    torch.save(obj, tmp_path / "c.pt")
    code, _, err = run(capsys, "--checkpoint", tmp_path / "c.pt", "--out", tmp_path)
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_random_bytes_get_no_unsafe_pickle_advice(tmp_path, capsys):
    (tmp_path / "r.pt").write_bytes(bytes(random.Random(1).randrange(256) for _ in range(500)))
    code, _, err = run(capsys, "--checkpoint", tmp_path / "r.pt", "--out", tmp_path)
    assert code == 2 and "not a readable PyTorch file" in err and "unsafe" not in err


def test_cli_imports_no_onnx_until_it_exports():
    code = ("import sys, export.cli, export.__main__; "
            "heavy = [m for m in ('onnx', 'onnxscript', 'onnxruntime', 'onnx_ir') if m in sys.modules]; "
            "print(heavy)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_zoo_list_builds_nothing_on_the_cpu(monkeypatch, capsys):
    import zoo.__main__ as zoo_main
    import zoo.registry

    devices = []
    real = zoo.registry.get_backbone

    def spy(name, **kwargs):
        net = real(name, **kwargs)
        devices.extend({p.device.type for p in net.parameters()})
        return net

    monkeypatch.setattr(zoo.registry, "get_backbone", spy)
    assert zoo_main.main(["list", "--refresh"]) == 0
    assert "vit" in capsys.readouterr().out
    assert set(devices) == {"meta"}
