"""The onnxruntime engine: `OnnxBackbone`, one `InferenceSession` per mode, created on first
use; `set_params(v)` rebuilds the sessions from the ONNX models with the new vector, in memory."""

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from export.errors import ParamsError
from export.formats.onnx import (
    OPTIMIZATION_LEVELS,
    layout_for,
    load_onnx,
    model_from_bytes,
    ort_session,
    params_of_model,
    set_model_params,
)
from export.runtime.base import RuntimeBackbone, check_engine
from export.store.flat_vector import check_buffers, check_params_vector
from export.store.manifest import SHARED_WEIGHTS, artifact_name


class OnnxBackbone(RuntimeBackbone):
    """The `net(x, returnt=...)` API over the ONNX files of one export directory."""

    engine = "onnxruntime"

    def __init__(self, directory: Union[str, Path], threads: Optional[int] = None,
                 optimization: str = "all", providers: Optional[Sequence[str]] = None,
                 device: str = "cpu", log_level: int = 3, verify_hashes: bool = True,
                 precision: str = "fp32", spin_wait: bool = True) -> None:
        """Open the ONNX files of an export directory.

        Args:
            directory: an export directory (manifest.json + `<mode>.onnx`).
            threads: onnxruntime intra-op threads (None: torch's thread count, all cores by default).
            optimization: graph optimization level: disable, basic, extended, all.
            providers: onnxruntime execution providers (default: CUDA if `device` asks, CPU).
            device: cpu or cuda.
            log_level: onnxruntime log severity (3: errors only; unused parameter
                initializers, kept on purpose, would warn at 2).
            verify_hashes: check every file against the manifest's sha256 before using it.
                Turn off only for files you know are the ones the manifest describes.
            precision: fp32 (`<mode>.onnx`) or int8 (`<mode>.int8.onnx`, from `quantize`).
            spin_wait: onnxruntime threads busy-wait between calls (fastest alone on the cores; off
                where other processes share them, as in a server).
        """
        super().__init__(directory, verify_hashes)
        if optimization not in OPTIMIZATION_LEVELS:
            raise ValueError(f"unknown optimization {optimization!r}; allowed: "
                             f"{', '.join(OPTIMIZATION_LEVELS)}")
        check_engine(self.engine, precision)
        self._open_files(precision)
        self.session_args = {"threads": threads, "optimization": optimization, "device": device,
                             "providers": providers, "log_level": log_level, "spin_wait": spin_wait}
        self._sessions: Dict[str, Any] = {}
        self._params = None  # a flat vector set with set_params, else the files' own
        self._buffers = None  # a version's floating buffers (BatchNorm statistics), else the files' own
        self._allow_nonfinite = False

    def _open_files(self, precision: str) -> None:
        """Choose the files of `precision` and check them against the manifest."""
        self.precision = precision
        self.kind = "int8" if precision == "int8" else "onnx"
        if self.kind == "int8":
            self._require(self.manifest.modes_with("int8"),
                          "int8 ONNX file", f"quantize it first: python -m export quantize {self.directory} "
                          "--calibration DATA")
        else:
            self._require(self.manifest.modes_with("onnx"),
                          "ONNX file", "export with --formats including onnx")
        # shared weights: the graphs read one external-data file, resolved beside them on disk
        self.shared_weights = self.kind == "onnx" and self.manifest.onnx_weights == "shared"
        self._check_files([artifact_name(m, self.kind) for m in self.modes]
                          + ([SHARED_WEIGHTS] if self.shared_weights else []))

    def _refuse_int8(self, what: str) -> None:
        if self.kind == "int8":
            raise ParamsError(f"{what}: the int8 files hold quantized weights, not the flat vector; "
                              "use precision='fp32' (then quantize again for int8)")

    def _source(self, mode: str) -> Any:
        """What a session of `mode` is made from: the hashed bytes, or the path of a graph with
        shared weights (checked with its data file at construction), or the graph with a vector
        given to set_params."""
        path = self.directory / artifact_name(mode, self.kind)
        if self._params is not None:
            model = set_model_params(self._model(mode), self._params, self._layout(), path,
                                     self._allow_nonfinite, buffers=self._buffers)
            return model.SerializeToString()
        if self.shared_weights:
            return path
        return self._verified_bytes(path.name)

    def _make_session(self, source: Any):
        return ort_session(source, **self.session_args)

    def session(self, mode: str):
        """The (lazily created) onnxruntime session of `mode`."""
        self._check_mode(mode)
        if mode not in self._sessions:
            self._sessions[mode] = self._make_session(self._source(mode))
        return self._sessions[mode]

    def _run(self, mode: str, x: np.ndarray) -> List[Any]:
        return self.session(mode).run(self.output_names(mode), {"x": x})

    def _layout(self):
        """The manifest's ONNX flat-parameter layout, checked to tile the vector."""
        return layout_for(self.directory, self.manifest)

    def _model(self, mode: str):
        """The ONNX model of `mode` with its weights (external data loaded from beside it)."""
        path = self.directory / artifact_name(mode, "onnx")
        if self.shared_weights:
            return load_onnx(path)
        return model_from_bytes(self._verified_bytes(path.name), path)

    def get_params(self):
        """The flat parameter vector (eager `parameters()` order) as a torch tensor."""
        self._refuse_int8("get_params")
        if self._params is not None:
            return self._params.clone()
        return params_of_model(self._model(self.modes[0]), self._layout(),
                               self.directory / artifact_name(self.modes[0], "onnx"))

    def set_params(self, vector, allow_nonfinite: bool = False) -> None:
        """Use `vector` as the parameters: validated, then every session is rebuilt in memory.
        NaN/inf values are refused unless `allow_nonfinite` (then they stay allowed for the
        sessions built from this vector)."""
        self._refuse_int8("set_params")
        check_params_vector(vector, self._layout(), allow_nonfinite)
        self._params = vector.detach().cpu().clone()
        self._allow_nonfinite = allow_nonfinite
        self._sessions.clear()

    def set_weights(self, vector, buffers) -> None:
        """A published version's weights: the flat vector and its floating buffers by eager
        name, put into every mode's graph in memory (sessions rebuilt)."""
        self._refuse_int8("a published weight version")
        check_buffers(buffers)
        self.set_params(vector)
        self._buffers = dict(buffers)
