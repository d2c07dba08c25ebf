"""`OnnxBackbone`: an exported directory in onnxruntime, called like the eager backbone.

    from export.runtime import OnnxBackbone
    net = OnnxBackbone("artifacts/resnet")
    logits = net(x)                              # numpy in -> numpy out, torch in -> torch out
    logits, feats = net(x, returnt="both")
    outs = net(x, returnt="full")                # [stage_0..stage_k, features, logits]

One `InferenceSession` per mode, created on first use. `set_params(v)` rebuilds the sessions
from the ONNX models with the new flat vector, in memory (no file written, no re-export).
Every file is checked against the manifest's sha256 before use (construction checks the whole
set, so a changed, corrupt or mixed directory is refused at once; each session is then made
from the very bytes that were hashed). Hashing costs about 0.05 s per 45 MB file.
"""

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from export.errors import ManifestError
from export.manifest import SHARED_WEIGHTS, artifact_name, check_files, read_manifest, read_verified
from export.verify import OPTIMIZATION_LEVELS, ort_session
from zoo.base import RETURNT_MODES, check_returnt, pack_outputs


class OnnxBackbone:
    """The `net(x, returnt=...)` API over the ONNX files of one export directory."""

    def __init__(self, directory: Union[str, Path], threads: Optional[int] = None,
                 optimization: str = "all", providers: Optional[Sequence[str]] = None,
                 device: str = "cpu", log_level: int = 3, verify_hashes: bool = True) -> None:
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
        """
        self.directory = Path(directory)
        self.manifest: Dict[str, Any] = read_manifest(self.directory)
        if optimization not in OPTIMIZATION_LEVELS:
            raise ValueError(f"unknown optimization {optimization!r}; allowed: "
                             f"{', '.join(OPTIMIZATION_LEVELS)}")
        self.modes = [m for m in RETURNT_MODES if artifact_name(m, "onnx") in self.manifest["files"]]
        if not self.modes:
            raise ManifestError(f"{self.directory}: the manifest lists no ONNX file")
        self.verify_hashes = verify_hashes
        # shared weights: the graphs read one external-data file, resolved beside them on disk
        self.shared_weights = self.manifest.get("onnx_weights") == "shared"
        if verify_hashes:
            check_files(self.directory, self.manifest, [artifact_name(m, "onnx") for m in self.modes]
                        + ([SHARED_WEIGHTS] if self.shared_weights else []))
        spec = self.manifest["input"]
        self.input_shape = tuple(spec["shape"][1:])
        self.dynamic_hw = "height" in spec.get("dynamic", [])
        self.session_args = {"threads": threads, "optimization": optimization, "device": device,
                             "providers": providers, "log_level": log_level}
        self._sessions: Dict[str, Any] = {}
        self._params = None  # a flat vector set with set_params, else the files' own
        self._allow_nonfinite = False

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
            path = self.directory / artifact_name(mode, "onnx")
            if self._params is not None:
                from export.flat_params import set_model_params

                model = set_model_params(self._model(mode), self._params, self._layout(), path,
                                         self._allow_nonfinite)
                source: Any = model.SerializeToString()
            elif self.shared_weights:
                source = path  # checked with its data file at construction; ORT reads both
            else:
                source = self._verified_bytes(path.name)
            self._sessions[mode] = ort_session(source, **self.session_args)
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
        return pack_outputs(returnt, outs)

    forward = __call__

    def _layout(self):
        """The manifest's flat-parameter layout, checked to tile the vector."""
        from export.flat_params import layout_for

        return layout_for(self.directory, self.manifest)

    def _verified_bytes(self, name: str) -> bytes:
        return (read_verified(self.directory, self.manifest, name) if self.verify_hashes
                else (self.directory / name).read_bytes())

    def _model(self, mode: str):
        """The ONNX model of `mode` with its weights (external data loaded from beside it)."""
        from export.flat_params import load_onnx, model_from_bytes

        path = self.directory / artifact_name(mode, "onnx")
        if self.shared_weights:
            return load_onnx(path)
        return model_from_bytes(self._verified_bytes(path.name), path)

    def get_params(self):
        """The flat parameter vector (eager `parameters()` order) as a torch tensor."""
        if self._params is not None:
            return self._params.clone()
        from export.flat_params import params_of_model

        return params_of_model(self._model(self.modes[0]), self._layout(),
                               self.directory / artifact_name(self.modes[0], "onnx"))

    def set_params(self, vector, allow_nonfinite: bool = False) -> None:
        """Use `vector` as the parameters: validated, then every session is rebuilt in memory.
        NaN/inf values are refused unless `allow_nonfinite` (then they stay allowed for the
        sessions built from this vector)."""
        from export.flat_params import check_params_vector

        check_params_vector(vector, self._layout(), allow_nonfinite)
        self._params = vector.detach().cpu().clone()
        self._allow_nonfinite = allow_nonfinite
        self._sessions.clear()
