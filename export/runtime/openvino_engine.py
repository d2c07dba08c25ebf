"""The OpenVINO engine: the exported ONNX graphs compiled by OpenVINO for the CPU, with the
precision chosen explicitly.

OpenVINO's own default inference precision on CPUs with AVX512-BF16/AMX is bf16 (f32
elsewhere), so an unset hint would silently run reduced precision on one machine and not on
another: every model here is compiled with INFERENCE_PRECISION_HINT set from `precision`, and
bf16 on a CPU without bf16 support is refused instead of running f32 under the bf16 name, and so
is a oneDNN instruction-set cap (ONEDNN_MAX_CPU_ISA) below the CPU, under which OpenVINO computes
wrong outputs without an error.
int8 runs the QDQ files of `python -m export quantize` (their non-quantized parts in f32).
"""

from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np

from export.errors import ExportError
from export.runtime.base import check_engine
from export.runtime.cpu import onednn_cap_below_cpu
from export.runtime.ort_engine import OnnxBackbone

_HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


def openvino_core():
    """An OpenVINO Core; one line naming the extra to install when the package is missing, or the
    oneDNN cap under which OpenVINO's outputs are wrong (refused before OpenVINO is touched)."""
    cap = onednn_cap_below_cpu()
    if cap:
        raise ExportError(f"engine 'openvino': {cap} caps oneDNN below this CPU, and OpenVINO's CPU plugin "
                          "then computes wrong outputs (its own kernels are not capped: "
                          "openvinotoolkit/openvino#38189); unset it for this process or use engine 'onnxruntime'")
    try:
        import openvino as ov
    except ImportError:
        raise ExportError("engine 'openvino' needs the openvino package: pip install 'returnt-zoo[bench]' "
                          "(make install installs it)") from None
    return ov.Core()


def cpu_supports_bf16(core=None) -> bool:
    core = core or openvino_core()
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class OpenVinoBackbone(OnnxBackbone):
    """The `net(x, returnt=...)` API over one export directory, run by OpenVINO on the CPU."""

    engine = "openvino"

    def __init__(self, directory: Union[str, Path], precision: str = "fp32", threads: Optional[int] = None,
                 verify_hashes: bool = True) -> None:
        """Args as `export.runtime.load`; `set_params` rebuilds the models from the ONNX
        graphs with the new vector, in memory (fp32 and bf16)."""
        check_engine(self.engine, precision)
        self.core = openvino_core()
        if precision == "bf16" and not cpu_supports_bf16(self.core):
            raise ExportError("precision 'bf16': this CPU has no bf16 support (OpenVINO reports "
                              f"{self.core.get_property('CPU', 'OPTIMIZATION_CAPABILITIES')}); "
                              "use fp32 or int8")
        super().__init__(directory, threads=threads, verify_hashes=verify_hashes,
                         precision="fp32" if precision == "bf16" else precision)
        self.precision = precision
        self.config: Dict[str, Any] = {"INFERENCE_PRECISION_HINT": _HINTS[precision]}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = int(threads)

    def _make_session(self, source: Any):
        import io

        model = self.core.read_model(str(source) if isinstance(source, Path) else io.BytesIO(source))
        return self.core.compile_model(model, "CPU", self.config)

    def _run(self, mode: str, x: np.ndarray) -> List[Any]:
        compiled = self.session(mode)
        result = compiled({"x": x})
        return [np.asarray(result[compiled.output(name)]) for name in self.output_names(mode)]
