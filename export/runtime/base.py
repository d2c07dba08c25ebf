"""What every runtime backbone shares: the manifest, input validation against it, and the
`net(x, returnt=...)` call that returns what eager returns (numpy in -> numpy out, torch in ->
torch out on the input's device)."""

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from export.errors import ExportError, ManifestError
from export.store.manifest import Manifest, check_files, read_manifest, read_verified
from zoo.base import check_returnt, pack_outputs

#: engine -> the precisions it runs (int8: the `<mode>.int8.onnx` files `quantize` writes)
ENGINES: Dict[str, Tuple[str, ...]] = {
    "onnxruntime": ("fp32", "int8"),
    "openvino": ("fp32", "bf16", "int8"),
    "torchscript": ("fp32",),
    "exported": ("fp32",),
    "aoti": ("fp32",),
    "executorch": ("fp32",),
}


def check_engine(engine: str, precision: str) -> None:
    """One line for an engine that does not exist or a precision it does not run ("auto": the
    fastest measured engine, any precision some engine runs)."""
    if engine == "auto":
        every = sorted({p for precisions in ENGINES.values() for p in precisions})
        if precision not in every:
            raise ExportError(f"unknown precision {precision!r}; allowed: {', '.join(every)}")
        return
    if engine not in ENGINES:
        raise ExportError(f"unknown engine {engine!r}; allowed: auto, {', '.join(ENGINES)}")
    if precision not in ENGINES[engine]:
        raise ExportError(f"engine {engine!r} has no precision {precision!r}; it runs: "
                          f"{', '.join(ENGINES[engine])}")


class RuntimeBackbone:
    """Base of the engines: subclasses implement `_run(mode, x)` (x: float32 numpy) and the
    flat-parameter methods their engine supports."""

    engine = ""

    def __init__(self, directory: Union[str, Path], verify_hashes: bool = True) -> None:
        self.directory = Path(directory)
        self.manifest: Manifest = read_manifest(self.directory)
        self.verify_hashes = verify_hashes
        self.input_shape = tuple(self.manifest.input.shape[1:])
        self.dynamic_hw = self.manifest.dynamic_hw
        self.modes: List[str] = []
        #: the published weight version in use (None: the export's own weights)
        self.version: Optional[int] = None
        #: load(engine="auto"): which engine it chose and why (None: the engine was named)
        self.auto_choice: Optional[str] = None

    def _require(self, modes: Sequence[str], what: str, hint: str) -> None:
        """Set the modes this engine can run; refuse a directory without any of its files."""
        self.modes = list(modes)
        if not self.modes:
            raise ManifestError(f"{self.directory}: the manifest lists no {what} ({hint})")

    def _check_files(self, names: Sequence[str]) -> None:
        if self.verify_hashes:
            check_files(self.directory, self.manifest, names)

    def _verified_bytes(self, name: str) -> bytes:
        """A listed file's bytes, hashed as read when `verify_hashes` (what runs is what was checked)."""
        return (read_verified(self.directory, self.manifest, name) if self.verify_hashes
                else (self.directory / name).read_bytes())

    def __repr__(self) -> str:
        version = f", version={self.version}" if self.version is not None else ""
        auto = f", auto={self.auto_choice!r}" if self.auto_choice else ""
        return (f"{type(self).__name__}({str(self.directory)!r}, "
                f"backbone={self.manifest.backbone.name!r}, modes={self.modes}{version}{auto})")

    def use_version(self, version: Union[int, str, None]) -> None:
        """Run with the weights of a published version (None: the newest), read from bytes
        checked against its record, put into every mode's graph in memory."""
        from export.store.versions import check_version, read_version_weights, resolve_version

        record = resolve_version(self.manifest, self.directory, version)
        if self.verify_hashes:
            check_version(self.directory, self.manifest, record)
        vector, buffers = read_version_weights(self.directory, record, self._layout())
        self.set_weights(vector, buffers)
        self.version = record.number

    def set_weights(self, vector: Any, buffers: Dict[str, Any]) -> None:
        """The flat vector and the floating buffers (eager names) of a version."""
        raise ExportError(f"engine {self.engine!r} cannot run published weight versions")

    def output_names(self, mode: str) -> List[str]:
        return self.manifest.output_names(mode)

    def _check_mode(self, mode: str) -> None:
        check_returnt(mode)
        if mode not in self.modes:
            raise ValueError(f"mode {mode!r} was not exported in {self.directory} for the "
                             f"{self.engine} engine; available: {', '.join(self.modes)}")

    def _prepare(self, x: Any) -> np.ndarray:
        """Validate against the manifest; non-contiguous or float16/64 input is converted."""
        if hasattr(x, "detach") and hasattr(x, "cpu"):
            x = x.detach().cpu().numpy()
        if not isinstance(x, np.ndarray):
            raise TypeError(f"input must be a numpy array or torch tensor, got {type(x).__name__}")
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"input dtype {x.dtype} is not floating point; expected float32 images")
        problem = self.manifest.input_shape_problem(x.shape)
        if problem:
            raise ValueError(f"input of {problem}")
        return np.ascontiguousarray(x, dtype=np.float32)

    def _run(self, mode: str, x: np.ndarray) -> List[Any]:
        raise NotImplementedError

    def check_call(self, x: Any, returnt: str) -> np.ndarray:
        """A call's checks without running it (ValueError/TypeError for a mode not exported
        here or an input that does not fit): `x` as contiguous float32 numpy. Servers check
        each request with it before batching requests together."""
        self._check_mode(returnt)
        return self._prepare(x)

    def __call__(self, x: Any, returnt: str = "out"):
        is_torch = hasattr(x, "detach")
        outs = self._run(returnt, self.check_call(x, returnt))
        import torch

        if is_torch:
            outs = [(o if isinstance(o, torch.Tensor) else torch.from_numpy(o)).to(x.device) for o in outs]
        else:
            outs = [o.detach().cpu().numpy() if isinstance(o, torch.Tensor) else o for o in outs]
        return pack_outputs(returnt, outs)

    forward = __call__

    def _layout(self):
        """The manifest's flat-parameter layout, checked to tile the vector."""
        from export.store.flat_vector import checked_layout

        return checked_layout(self.manifest, self.directory)
