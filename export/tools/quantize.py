"""Int8 ONNX per mode: onnxruntime static quantization, QDQ format, per-channel weights.

`python -m export quantize artifacts/resnet --calibration DATA` writes `<mode>.int8.onnx` beside
each `<mode>.onnx` and records them, with the calibration used, in the manifest. DATA is real
inputs of the model: a tensor file ([N, C, H, W] .npy/.pt) or an image folder (DIR/<class>/<image>,
resized to the input size and normalised with --mean/--std or the manifest's preprocessing).
`--calibration random` (seeded N(0,1) inputs) is only for models with random weights: the ranges
it measures say nothing about a trained model's activations.
"""

import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import numpy as np

from export.errors import ExportError
from export.store.atomic import atomic_path
from export.store.manifest import artifact_name, check_files, file_entry
from export.store.transaction import manifest_update


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


#: what `quantize` says when no calibration data is given
CALIBRATION_HELP = ("int8 needs calibration data: --calibration inputs.npy|inputs.pt ([N, C, H, W] real "
                    "inputs) or --calibration IMAGE_DIR (DIR/<class>/<image>, with --mean/--std unless "
                    "the manifest has the normalisation); --calibration random only for random weights")


def quantize_directory(directory: Path, calibration: Union[np.ndarray, str, Path, None] = None,
                       modes: Optional[Sequence[str]] = None, samples: int = 64,
                       mean: Optional[str] = None, std: Optional[str] = None) -> Dict[str, Any]:
    """Quantize every exported ONNX mode of `directory`; returns the manifest's new section.

    `calibration`: an array of inputs, a tensor file or image folder, or "random" (seeded
    N(0,1), explicitly). At most `samples` inputs are used.
    """
    from export.formats.onnx import ort_session
    from export.tools.inputs import check_inputs, load_inputs

    if calibration is None:
        raise ExportError(CALIBRATION_HELP)
    directory = Path(directory)
    with manifest_update(directory) as (staging, manifest):
        shape = manifest.input.shape[1:]
        if isinstance(calibration, str) and calibration == "random":
            calibration, source = builtin_calibration(shape, samples), "random: seeded N(0,1) inputs"
        elif isinstance(calibration, (str, Path)):
            calibration, _, source = load_inputs(Path(calibration), manifest, mean, std, samples)
        else:
            calibration, source = check_inputs(np.asarray(calibration), manifest, "calibration"), "arrays"
        calibration = calibration[:samples]
        if tuple(calibration.shape[1:]) != tuple(shape):
            # int8 ranges measured at another image size do not describe the export's activations
            got, want = "x".join(map(str, calibration.shape[2:])), "x".join(map(str, shape[1:]))
            raise ExportError(f"calibration inputs of shape {list(calibration.shape)} are {got} images; "
                              f"calibrate at the export's input size {want} ([N, {'x'.join(map(str, shape))}]: "
                              "resize them, or give an image folder, which is resized)")
        modes = modes or manifest.modes_with("onnx")
        check_files(staging, manifest, [artifact_name(m, "onnx") for m in modes])
        section = manifest.quantized
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
                "calibration_random": source.startswith("random"),
                "max_abs_vs_fp32": {o.name: float(np.abs(a - b).max())
                                    for o, a, b in zip(fp32_session.get_outputs(), int8, fp32)},
                "seconds": round(seconds, 3),
            }
            manifest.files[dst.name] = file_entry(dst)
    return section
