"""Int8 ONNX per mode: onnxruntime static quantization, QDQ format, per-channel weights.

`python -m export quantize artifacts/resnet [--calibration inputs.npy]` writes
`<mode>.int8.onnx` beside each `<mode>.onnx` and records them in the manifest. Calibration uses
the user's inputs, else a built-in set (seeded standard-normal images: what normalised inputs
look like to a randomly initialised network; give real data for a trained one).
"""

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np

from export.atomic import atomic_path
from export.errors import ExportError
from export.manifest import artifact_name, check_files, file_entry, read_manifest, write_manifest
from export.transaction import DirectoryTransaction
from zoo.base import RETURNT_MODES


def builtin_calibration(input_shape: Sequence[int], samples: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((samples, *input_shape)).astype(np.float32)


def quantize_model(src: Path, dst: Path, calibration: np.ndarray, batch: int = 8) -> None:
    """Static QDQ quantization of one ONNX file (u8 activations, per-channel s8 weights)."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"x": calibration[i:i + batch]}
                                 for i in range(0, len(calibration), batch)])

        def get_next(self):
            return next(self.batches, None)

    # the pre-processing sessions would warn about the parameters kept on purpose
    onnxruntime.set_default_logger_severity(3)
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        # ORT's symbolic shape inference cannot read our folded constants; onnx's is enough
        # a self-contained copy: shared weights (external data) live beside `src`, not in `tmp`
        embedded = Path(tmp) / "embedded.onnx"
        onnx.save(onnx.load(str(src)), str(embedded))
        quant_pre_process(str(embedded), str(pre), skip_symbolic_shape=True)
        with atomic_path(dst) as out:
            quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8)


def quantize_directory(directory: Path, calibration: Optional[np.ndarray] = None,
                       modes: Optional[Sequence[str]] = None, samples: int = 32) -> Dict[str, Any]:
    """Quantize every exported ONNX mode of `directory`; returns the manifest's new section."""
    from export.verify import ort_session

    directory = Path(directory)
    with DirectoryTransaction(directory, keep_existing=True) as tx:
        staging = tx.staging
        manifest = read_manifest(staging)
        shape = manifest["input"]["shape"][1:]
        source = "user inputs"
        if calibration is None:
            calibration, source = builtin_calibration(shape, samples), f"built-in: {samples} seeded N(0,1) inputs"
        if tuple(calibration.shape[1:]) != tuple(shape):
            raise ExportError(f"calibration inputs of shape {list(calibration.shape)} do not fit; "
                              f"expected [N, {'x'.join(map(str, shape))}]")
        modes = modes or [m for m in RETURNT_MODES if artifact_name(m, "onnx") in manifest["files"]]
        check_files(staging, manifest, [artifact_name(m, "onnx") for m in modes])
        section = manifest.setdefault("quantized", {})
        for mode in modes:
            src, dst = staging / artifact_name(mode, "onnx"), staging / artifact_name(mode, "int8")
            t = time.perf_counter()
            quantize_model(src, dst, calibration)
            seconds = time.perf_counter() - t
            probe = calibration[: min(8, len(calibration))]
            fp32_session = ort_session(src)
            fp32 = fp32_session.run(None, {"x": probe})
            int8 = ort_session(dst).run(None, {"x": probe})
            section[mode] = {
                "file": dst.name, "format": "QDQ", "activations": "uint8", "weights": "int8 per-channel",
                "calibration": source, "calibration_samples": int(len(calibration)),
                "max_abs_vs_fp32": {o.name: float(np.abs(a - b).max())
                                    for o, a, b in zip(fp32_session.get_outputs(), int8, fp32)},
                "seconds": round(seconds, 3),
            }
            manifest["files"][dst.name] = file_entry(dst)
        manifest["files"] = dict(sorted(manifest["files"].items()))
        write_manifest(staging, manifest)
        tx.commit()
    return section


def load_inputs(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False).astype(np.float32)
        except (OSError, ValueError) as exc:
            raise ExportError(f"{path}: not a readable .npy array ({str(exc).splitlines()[0]})") from None
    from zoo.weights import load_file

    return load_file(path).detach().cpu().numpy().astype(np.float32)


def run_quantize(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m export quantize",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="an export directory (with manifest.json)")
    parser.add_argument("--calibration", type=Path,
                        help="calibration inputs [N, C, H, W] as .npy or a torch tensor .pt")
    parser.add_argument("--samples", type=int, default=32, help="size of the built-in set")
    parser.add_argument("--modes", help="comma-separated modes (default: every exported one)")
    args = parser.parse_args(argv)
    from export.core import parse_list

    modes = parse_list(args.modes, RETURNT_MODES, "mode") if args.modes else None
    calib = load_inputs(args.calibration) if args.calibration else None
    section = quantize_directory(args.directory, calib, modes, args.samples)
    for info in section.values():
        err = max(info["max_abs_vs_fp32"].values())
        print(f"{args.directory / info['file']}: max |int8-fp32| {err:.3g} ({info['calibration']})")
    return 0
