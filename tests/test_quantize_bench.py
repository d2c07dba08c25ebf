"""Int8 quantization of export directories, and the benchmark's report."""

import json
import shutil
import statistics

import numpy as np
import pytest
import torch

from export.cli import main
from export.runtime import OnnxBackbone
from export.runtime.cpu import KERNEL_FLAGS
from tests.conftest import backbone_params


@pytest.mark.parametrize("name", backbone_params("mnistmlp"))
def test_quantize_directory(name, export, tmp_path, capsys):
    net, result = export
    d = tmp_path / "q"
    shutil.copytree(result.directory, d)
    calib = np.random.default_rng(0).standard_normal((16, 1, 28, 28)).astype(np.float32)
    np.save(tmp_path / "calib.npy", calib)
    assert main(["quantize", str(d), "--calibration", str(tmp_path / "calib.npy"), "--modes", "out,full"]) == 0
    manifest = json.loads((d / "manifest.json").read_text())
    assert set(manifest["quantized"]) == {"out", "full"}
    assert manifest["quantized"]["out"]["calibration"] == "tensors: calib.npy"
    assert manifest["quantized"]["out"]["calibration_random"] is False
    assert "out.int8.onnx" in manifest["files"] and (d / "out.int8.onnx").exists()
    fp32 = OnnxBackbone(d)(calib[:4])
    import onnxruntime as ort

    int8 = ort.InferenceSession(str(d / "out.int8.onnx")).run(None, {"x": calib[:4]})[0]
    scale = np.abs(fp32).max()
    assert np.abs(int8 - fp32).max() < 0.1 * scale  # int8 is close, not equal
    ops = {n.op_type for n in __import__("onnx").load(str(d / "out.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert main(["verify", str(d)]) == 0  # the manifest's hashes cover the int8 files
    bad = tmp_path / "bad.npy"
    np.save(bad, calib[:, :, :10])
    assert main(["quantize", str(d), "--calibration", str(bad)]) == 2
    assert "expected [batch, 1, 28, 28]" in capsys.readouterr().err


@pytest.mark.parametrize("name", backbone_params("resnet18"))
def test_calibration_at_another_image_size_is_refused(name, export, tmp_path, capsys):
    """The CIFAR ResNet takes any H x W, but int8 ranges measured on 7x7 images say nothing of
    its 32x32 activations: refused in one line, the directory unchanged."""
    _, result = export
    d = tmp_path / "q"
    shutil.copytree(result.directory, d)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    np.save(tmp_path / "small.npy", np.random.default_rng(0).standard_normal((8, 3, 7, 7)).astype(np.float32))
    assert main(["quantize", str(d), "--calibration", str(tmp_path / "small.npy")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "are 7x7 images; calibrate at the export's input size 32x32" in err, err
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before


def acc_epochs(report) -> int:
    acc = report["accuracy_digits"]
    assert acc["seeded"] is True and acc["train_seconds"] >= 0
    return acc["epochs"]


def test_bench_report_and_json(tmp_path, capsys):
    """One bench with every row kind (a second batch size would compile two more AOTInductor
    packages; the bench of a directory in test_auto_engine.py times two)."""
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    code = main(["bench", "--backbone", "mnistmlp", "--batches", "2", "--seconds", "0.2", "--rounds", "2",
                 "--epochs", "1", "--threads", "1", "--json", str(out), "--plot", str(png)])
    assert code == 0
    text = capsys.readouterr().out
    report = json.loads(out.read_text())
    runtimes = {r["runtime"] for r in report["results"]}
    assert {"eager", "torchscript-frozen", "ort-fp32", "ort-int8", "openvino-fp32", "openvino-int8",
            "executorch-fp32", "executorch-int8", "aoti", "aoti-per-batch", "aoti-frozen-per-batch"} <= runtimes
    assert {r["batch"] for r in report["results"]} == {2}
    assert set(report["aoti_compile_seconds"]) == {"out.aoti.pt2", "out.aoti.b2.pt2", "frozen out.aoti.b2.pt2"}
    assert "AOTInductor compile seconds" in text
    assert report["flops_per_image"] > 2 * 784 * 100  # counted, not typed
    # the fp32 matmul peak, measured briefly with a brief bench: one thread does > 5 GFLOP/s anywhere
    assert set(report["matmul_peak_gflops"]) == {"torch_gflops", "onnxruntime_gflops"}
    assert min(report["matmul_peak_gflops"].values()) > 5, report["matmul_peak_gflops"]
    for r in report["results"]:
        assert r["median_ms"] > 0 and r["p90_ms"] > 0 and r["images_per_s"] > 0
        rounds = r["round_medians_ms"]  # one median per interleaved round; the row's figures follow
        assert len(rounds) == r["rounds"] == 2 and r["runs"] >= 2 * 3
        assert r["median_ms"] == pytest.approx(statistics.median(rounds))
        assert r["spread"] == pytest.approx((max(rounds) - min(rounds)) / statistics.median(rounds))
        assert r["images_per_s"] == pytest.approx(r["batch"] / r["median_ms"] * 1e3)
    pub = report["publish"]  # a full export against publishing weight versions into it
    assert pub["export_s"] > 0 and 0 < pub["publish_next_s"] and pub["bytes_per_version"] > 0
    assert pub["first_vs_export"] == pytest.approx(pub["publish_first_s"] / pub["export_s"], abs=1e-2)
    assert "continual deployment (torchscript, onnx, exported, every mode): full export" in text
    stamp = report["stamp"]
    assert stamp["cpu"]["model"] and set(stamp["cpu"]["flags"]) <= set(KERNEL_FLAGS) and stamp["commit"]
    assert stamp["cores"] >= 1 and stamp["versions"]["torch"] == torch.__version__
    assert set(stamp["versions"]) == {"torch", "onnxruntime", "openvino", "executorch"}
    first = text.splitlines()[0]
    assert first.startswith(f"measured on {stamp['cpu']['model']}") and f"{stamp['cores']} cores" in first
    assert f"torch {torch.__version__}" in first and f"commit {stamp['commit']}" in first
    # the targets of this CPU kind, each met, missed or not measured with the reason
    targets = {t["what"].split(" (")[0].split(",")[0]: t for t in report["targets"]}
    vnni = bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(stamp["cpu"]["flags"]))
    assert targets["int8 speed"]["target"] == (">= 3.3x ORT fp32" if vnni else ">= 2.0x ORT fp32")
    bf16 = bool({"avx512_bf16", "amx_bf16"} & set(stamp["cpu"]["flags"]))
    if not bf16:
        assert targets["bf16"]["met"] is None and "no bf16 support" in targets["bf16"]["measured"]
    assert "targets on this CPU kind:" in text
    assert acc_epochs(report) == 1
    acc = report["accuracy_digits"]
    by_pair = {(r["engine"], r["precision"]): r for r in acc["results"]}
    assert by_pair["onnxruntime", "fp32"]["top1"] > 0.5, "the digits model did not learn"
    assert by_pair["onnxruntime", "int8"]["agreement"] >= 0.8, "int8 disagrees with fp32 on the trained model"
    assert by_pair["openvino", "fp32"]["agreement"] >= 0.99
    assert {("torchscript", "fp32"), ("openvino", "int8")} <= set(by_pair)
    converged = targets["fp32 top-1 of the digits model"]  # one epoch: reported, met or missed
    assert converged["target"] == ">= 93%"
    assert converged["met"] == (by_pair["onnxruntime", "fp32"]["top1"] >= 0.93)
    assert "ort-int8" in text and "vs ort-fp32" in text and "accuracy on a trained model" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_default_training_converges():
    """The accuracy table's model is trained a fixed, seeded number of epochs (not for a time), so
    it converges on every machine: mnistmlp at the default epochs, eager top-1 on the held-out
    digits (one epoch gives 90%)."""
    from export.tools.bench import DIGITS_EPOCHS, digits_data, train_digits
    from zoo import get_backbone

    torch.manual_seed(0)  # as the bench seeds its build
    net = get_backbone("mnistmlp")
    x_tr, x_te, y_tr, y_te = digits_data(net.input_shape)
    train_digits(net, x_tr, y_tr, DIGITS_EPOCHS, lambda line: None)
    with torch.no_grad():
        top1 = (net(x_te).argmax(1) == y_te).float().mean().item()
    assert top1 >= 0.93, f"{DIGITS_EPOCHS} seeded epochs: top-1 {top1:.2%}"


def test_bench_times_only_verified_exports():
    """An export that failed verification stops the bench with its failures, in one line."""
    from pathlib import Path

    from export.errors import ExportError
    from export.pipeline.build import ExportResult
    from export.tools.bench import _check_export

    _check_export(ExportResult(Path("bench"), None))
    with pytest.raises(ExportError, match=r"^the bench's export failed verification: onnx out logits \(max"):
        _check_export(ExportResult(Path("bench"), None, ["onnx out logits (max |diff| 0.3)"]))
