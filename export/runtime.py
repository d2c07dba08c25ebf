"""`OnnxBackbone`: an exported directory in onnxruntime, called like the eager backbone.

    from export.runtime import OnnxBackbone
    net = OnnxBackbone("artifacts/resnet")
    logits = net(x)                              # numpy in -> numpy out, torch in -> torch out
    logits, feats = net(x, returnt="both")
    outs = net(x, returnt="full")                # [stage_0..stage_k, features, logits]

One `InferenceSession` per mode, created on first use. `set_params(v)` rebuilds the sessions
from the ONNX models with the new flat vector, in memory (no file written, no re-export).
"""

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from zoo.base import RETURNT_MODES, check_returnt

OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


class OnnxBackbone:
    """The `net(x, returnt=...)` API over the ONNX files of one export directory."""

    def __init__(self, directory: Union[str, Path], threads: Optional[int] = None,
                 optimization: str = "all", providers: Optional[Sequence[str]] = None,
                 device: str = "cpu", log_level: int = 3) -> None:
        import onnxruntime as ort

        self.directory = Path(directory)
        manifest_path = self.directory / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{self.directory}: no manifest.json (not an export directory?)")
        self.manifest: Dict[str, Any] = json.loads(manifest_path.read_text())
        if optimization not in OPTIMIZATION_LEVELS:
            raise ValueError(f"unknown optimization {optimization!r}; allowed: "
                             f"{', '.join(OPTIMIZATION_LEVELS)}")
        self.modes = [m for m in RETURNT_MODES if f"{m}.onnx" in self.manifest.get("files", {})]
        if not self.modes:
            raise FileNotFoundError(f"{self.directory}: the manifest lists no ONNX file")
        spec = self.manifest["input"]
        self.input_shape = tuple(spec["shape"][1:])
        self.dynamic_hw = "height" in spec.get("dynamic", [])
        self.options = ort.SessionOptions()
        self.options.log_severity_level = log_level  # unused parameter initializers are on purpose
        if threads:
            self.options.intra_op_num_threads = threads
        self.options.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[optimization]
        if providers is None:
            cuda = device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers()
            providers = (["CUDAExecutionProvider"] if cuda else []) + ["CPUExecutionProvider"]
        self.providers = list(providers)
        self._sessions: Dict[str, Any] = {}
        self._params = None  # a flat vector set with set_params, else the files' own

    def __repr__(self) -> str:
        return (f"OnnxBackbone({str(self.directory)!r}, backbone={self.manifest['backbone']['name']!r}, "
                f"modes={self.modes})")

    def output_names(self, mode: str) -> List[str]:
        return [o["name"] for o in self.manifest["modes"][mode]["outputs"]]

    def session(self, mode: str):
        """The (lazily created) onnxruntime session of `mode`."""
        check_returnt(mode)
        if mode not in self.modes:
            raise ValueError(f"mode {mode!r} was not exported in {self.directory}; "
                             f"available: {', '.join(self.modes)}")
        if mode not in self._sessions:
            import onnxruntime as ort

            path = self.directory / f"{mode}.onnx"
            if self._params is None:
                source: Any = str(path)
            else:
                from export.flat_params import load_onnx, set_model_params

                model = set_model_params(load_onnx(path), self._params,
                                         self.manifest["flat_params"]["layout"], path)
                source = model.SerializeToString()
            self._sessions[mode] = ort.InferenceSession(source, self.options, providers=self.providers)
        return self._sessions[mode]

    def _prepare(self, x: Any) -> np.ndarray:
        """Validate against the manifest; non-contiguous or float16/64 input is converted."""
        if hasattr(x, "detach") and hasattr(x, "cpu"):
            x = x.detach().cpu().numpy()
        if not isinstance(x, np.ndarray):
            raise TypeError(f"input must be a numpy array or torch tensor, got {type(x).__name__}")
        expected = "x".join(map(str, self.input_shape))
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"input dtype {x.dtype} is not floating point; expected float32 "
                            f"images of shape [batch, {expected}]")
        if x.ndim != len(self.input_shape) + 1:
            raise ValueError(f"input of shape {list(x.shape)} has rank {x.ndim}; expected "
                             f"[batch, {expected}]")
        fixed = self.input_shape[:1] if self.dynamic_hw else self.input_shape
        if tuple(x.shape[1:1 + len(fixed)]) != tuple(fixed) or x.shape[0] < 1:
            raise ValueError(f"input of shape {list(x.shape)} does not fit; expected [batch, "
                             f"{expected}]" + (" (H, W free)" if self.dynamic_hw else ""))
        return np.ascontiguousarray(x, dtype=np.float32)

    def __call__(self, x: Any, returnt: str = "out"):
        check_returnt(returnt)
        is_torch = hasattr(x, "detach")
        outs = self.session(returnt).run(self.output_names(returnt), {"x": self._prepare(x)})
        if is_torch:
            import torch

            device = x.device
            outs = [torch.from_numpy(o).to(device) for o in outs]
        if returnt in ("out", "features"):
            return outs[0]
        if returnt == "both":
            return outs[0], outs[1]
        return list(outs)

    forward = __call__

    def get_params(self):
        """The flat parameter vector (eager `parameters()` order) as a torch tensor."""
        if self._params is not None:
            return self._params.clone()
        from export.flat_params import read_onnx_params

        return read_onnx_params(self.directory / f"{self.modes[0]}.onnx", self.manifest)

    def set_params(self, vector, allow_nonfinite: bool = False) -> None:
        """Use `vector` as the parameters: validated, then every session is rebuilt in memory."""
        from export.flat_params import load_onnx, set_model_params

        path = self.directory / f"{self.modes[0]}.onnx"
        set_model_params(load_onnx(path), vector, self.manifest["flat_params"]["layout"], path,
                         allow_nonfinite)  # validates before anything changes
        self._params = vector.detach().cpu().clone()
        self._sessions.clear()
