"""The executorch engine: `<mode>.pte` (XNNPACK-lowered ExecuTorch programs) run by
ExecuTorch's runtime, `executorch.runtime.Runtime` (the `edge` extra).

A program takes batches 1..its bound (memory is planned for it, recorded in the manifest); a
larger batch is refused in one line before ExecuTorch sees it. `get_params` is the file's own
`get_params` method; its weights are the ones it was lowered with: `set_params` and published
versions are refused, naming the re-export.
"""

from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch

from export.errors import ParamsError
from export.formats.pte import executorch_version, load_method
from export.runtime.base import RuntimeBackbone
from export.store.manifest import artifact_name
from zoo.base import RETURNT_MODES, unpack_outputs


class ExecutorchBackbone(RuntimeBackbone):
    """One ExecuTorch method per mode, loaded on first use from bytes checked against the manifest."""

    engine = "executorch"

    def __init__(self, directory: Union[str, Path], threads: Optional[int] = None, device: str = "cpu",
                 verify_hashes: bool = True) -> None:
        super().__init__(directory, verify_hashes)
        if torch.device(device).type != "cpu":
            raise ValueError(f"engine 'executorch' runs on the CPU (XNNPACK); got device {device!r}")
        executorch_version()
        self._require([m for m in RETURNT_MODES if artifact_name(m, "pte") in self.manifest.files],
                      "ExecuTorch program", "export with --formats including pte")
        self._check_files([artifact_name(m, "pte") for m in self.modes])
        self.max_batch: Dict[str, int] = {m: self.manifest.programs[artifact_name(m, "pte")].max_batch or 1
                                          for m in self.modes}
        self._methods: Dict[str, Any] = {}

    def method(self, mode: str):
        """The loaded program of `mode` (`execute([x])`), made once from verified bytes; for
        callers that time the program alone (the bench)."""
        if mode not in self._methods:
            self._methods[mode] = load_method(self._verified_bytes(artifact_name(mode, "pte")))
        return self._methods[mode]

    def _run(self, mode: str, x: np.ndarray) -> List[Any]:
        if x.shape[0] > self.max_batch[mode]:
            raise ValueError(f"batch {x.shape[0]}: {artifact_name(mode, 'pte')} takes batches of 1 to "
                             f"{self.max_batch[mode]} (its memory is planned for that; re-export with "
                             f"--pte-max-batch {x.shape[0]}, or send smaller batches)")
        with torch.no_grad():
            return unpack_outputs(list(self.method(mode).execute([torch.from_numpy(x)])))

    def _refuse(self, what: str) -> None:
        raise ParamsError(f"{self.directory}: {what}: a .pte runs the weights it was lowered with "
                          "(XNNPACK-packed); lower again with the new weights: python -m export "
                          "BACKBONE --checkpoint CKPT --formats pte")

    def get_params(self) -> torch.Tensor:
        """The flat vector, from the first mode's `get_params` method."""
        mode = self.modes[0]
        return self.method(mode).flat_params(f"{self.directory}/{artifact_name(mode, 'pte')}")

    def set_params(self, vector: torch.Tensor, allow_nonfinite: bool = False) -> None:
        self._refuse("set_params")

    def set_weights(self, vector: Any, buffers: Dict[str, Any]) -> None:
        self._refuse("published weight versions")
