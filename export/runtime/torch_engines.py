"""The engines that run in torch: TorchScript (`<mode>.pt`), torch.export programs
(`<mode>.ep.pt2`) and AOTInductor packages (`<mode>.aoti.pt2`, `<mode>.aoti.b<N>.pt2`).

Each loads a mode's file on first use, from bytes checked against the manifest, and keeps a
vector given to `set_params` for the modes it loads later.
"""

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch

from export.formats.aoti import (
    check_torch_version,
    load_package,
    package_params,
    refuse_frozen,
    set_package_params,
)
from export.formats.program import load_program, program_params, set_program_params
from export.formats.torchscript import load_torchscript, set_module_state
from export.runtime.base import RuntimeBackbone
from export.store.flat_vector import check_buffers, check_params_vector
from export.store.manifest import artifact_name
from zoo.base import RETURNT_MODES, unpack_outputs


class TorchBackbone(RuntimeBackbone):
    """Shared by the torch engines: device, threads, lazily loaded per-mode callables."""

    def __init__(self, directory: Union[str, Path], threads: Optional[int] = None, device: str = "cpu",
                 verify_hashes: bool = True) -> None:
        super().__init__(directory, verify_hashes)
        self.threads = threads
        self.device = torch.device(device)
        self._loaded: Dict[Any, Any] = {}
        self._params: Optional[torch.Tensor] = None  # set with set_params, else the files' own
        self._buffers: Optional[Dict[str, torch.Tensor]] = None  # a version's floating buffers

    @contextmanager
    def _threads(self) -> Iterator[None]:
        """torch's intra-op threads are per process: use `threads` for this call only."""
        before = torch.get_num_threads()
        if self.threads and self.threads != before:
            torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            if torch.get_num_threads() != before:
                torch.set_num_threads(before)

    def _callable(self, mode: str, shape: Tuple[int, ...]):
        """What runs `mode` on an input of `shape` (batch first)."""
        raise NotImplementedError

    def _load(self, key: Any, make: Callable[[], Any]) -> Any:
        """What runs `key` (a mode, or a package's name), made once by `make` from verified
        bytes, with the vector of `set_params` applied when one was set."""
        if key not in self._loaded:
            loaded = make()
            if self._params is not None:
                self._apply_params(loaded, key)
            self._loaded[key] = loaded
        return self._loaded[key]

    def _run(self, mode: str, x: np.ndarray) -> List[Any]:
        fn = self._callable(mode, tuple(x.shape))
        with torch.no_grad(), self._threads():
            out = fn(torch.from_numpy(x).to(self.device))
        return unpack_outputs(out)

    def set_params(self, vector: torch.Tensor, allow_nonfinite: bool = False) -> None:
        """Use `vector` (eager `get_params()` order) as the parameters of every mode."""
        check_params_vector(vector, self._layout(), allow_nonfinite)
        self._params = vector.detach().cpu().clone()
        for key, loaded in self._loaded.items():
            self._apply_params(loaded, key)

    def set_weights(self, vector: torch.Tensor, buffers: Dict[str, torch.Tensor]) -> None:
        """A published version's weights: the flat vector and its floating buffers by eager name."""
        check_buffers(buffers)
        self._buffers = {k: v.detach().cpu() for k, v in buffers.items()}
        self.set_params(vector)

    def _apply_params(self, loaded: Any, key: Any) -> None:
        raise NotImplementedError


class _OneFilePerMode(TorchBackbone):
    """An engine that runs one file of format `engine` per mode (`<mode><suffix>`)."""

    #: what the files are called in errors
    what = ""

    def __init__(self, directory, threads=None, device="cpu", verify_hashes=True) -> None:
        super().__init__(directory, threads, device, verify_hashes)
        self._require(self.manifest.modes_with(self.engine), self.what,
                      f"export with --formats including {self.engine}")
        self._check_files([artifact_name(m, self.engine) for m in self.modes])


class TorchScriptBackbone(_OneFilePerMode):
    """`torch.jit.load` of `<mode>.pt`; flat parameters through the files' own methods."""

    engine = "torchscript"
    what = "TorchScript file"

    def _module(self, mode: str):
        def make():
            return load_torchscript(self._verified_bytes(artifact_name(mode, "torchscript")), str(self.device))

        return self._load(mode, make)

    def _callable(self, mode: str, shape: Tuple[int, ...]):
        return self._module(mode)

    def _apply_params(self, loaded, key) -> None:
        set_module_state(loaded, self._params, self._buffers)

    def get_params(self) -> torch.Tensor:
        if self._params is not None:
            return self._params.clone()
        return self._module(self.modes[0]).get_params().cpu()


class ExportedBackbone(_OneFilePerMode):
    """`torch.export.load(<mode>.ep.pt2).module()`; flat parameters in the program's state."""

    engine = "exported"
    what = "torch.export program"

    def _program(self, mode: str):
        # [program, its module() once called]: parameters are set in the program's state
        return self._load(mode, lambda: [load_program(self._verified_bytes(artifact_name(mode, "exported"))), None])

    def _callable(self, mode: str, shape: Tuple[int, ...]):
        entry = self._program(mode)
        if entry[1] is None:
            entry[1] = entry[0].module().to(self.device)
        return entry[1]

    def _apply_params(self, loaded, key) -> None:
        set_program_params(loaded[0], self._params, self._layout(), key, allow_nonfinite=True,
                           buffers=self._buffers)
        loaded[1] = None  # module() copies the state: make it again

    def get_params(self) -> torch.Tensor:
        if self._params is not None:
            return self._params.clone()
        return program_params(self._program(self.modes[0])[0], self._layout(),
                              artifact_name(self.modes[0], "exported"))


class AotiBackbone(TorchBackbone):
    """AOTInductor packages: per call, the package compiled for that batch size if there is one,
    else the any-batch package. Parameters are swapped in with `load_constants`."""

    engine = "aoti"

    def __init__(self, directory, threads=None, device="cpu", verify_hashes=True) -> None:
        super().__init__(directory, threads, device, verify_hashes)
        programs = self.manifest.programs
        self.packages: Dict[str, Dict[Optional[int], str]] = {
            m: self.manifest.aoti_packages(m) for m in RETURNT_MODES if self.manifest.aoti_packages(m)}
        self._require(list(self.packages), "AOTInductor package",
                      "export with --formats including aoti")
        names = [n for by_batch in self.packages.values() for n in by_batch.values()]
        for name in names:
            check_torch_version(name, programs[name])
        self._check_files(names)

    def package_name(self, mode: str, batch: int, hw: Optional[Tuple[int, ...]] = None) -> str:
        """The package that runs `mode` at `batch` (and spatial size `hw`): compiled for that
        batch (a frozen one only at the export's H x W, which it fixes), else any-batch."""
        by_batch = self.packages[mode]
        fixed = by_batch.get(batch)
        if fixed is not None and (hw is None or "height" in self.manifest.programs[fixed].dynamic
                                  or tuple(hw) == self._export_hw()):
            return fixed
        if None in by_batch:
            return by_batch[None]
        if fixed is not None:
            size, want = "x".join(map(str, hw)), "x".join(map(str, self._export_hw()))
            raise ValueError(f"input {size}: the {mode!r} package {fixed} of {self.directory} was compiled "
                             f"for {want} only (a frozen per-batch package fixes the input size; export "
                             "with --aoti-batch dynamic as well for other sizes)")
        sizes = ", ".join(str(b) for b in sorted(by_batch))
        raise ValueError(f"batch {batch}: the {mode!r} packages of {self.directory} were compiled for "
                         f"batch {sizes} only (export with --aoti-batch dynamic for any size)")

    def _package(self, name: str):
        return self._load(name, lambda: load_package(self._verified_bytes(name), name))

    def _export_hw(self) -> Tuple[int, ...]:
        return tuple(int(d) for d in self.manifest.input.shape[2:])

    def _callable(self, mode: str, shape: Tuple[int, ...]):
        return self._package(self.package_name(mode, shape[0], shape[2:]))

    def package_for(self, mode: str, batch: Optional[int]):
        """The loaded package (a callable on torch tensors) that runs `mode` at `batch`; None:
        the any-batch package. For callers that time the package alone (the bench)."""
        return self._package(self.packages[mode][None] if batch is None else self.package_name(mode, batch))

    def _apply_params(self, loaded, key) -> None:
        set_package_params(loaded, self._params, self._layout(), allow_nonfinite=True, name=key,
                           buffers=self._buffers)

    def set_params(self, vector: torch.Tensor, allow_nonfinite: bool = False) -> None:
        """Use `vector` as the parameters of every package (`load_constants`, no recompiling)."""
        for by_batch in self.packages.values():
            for name in by_batch.values():
                refuse_frozen(name, self.manifest.programs[name])
        super().set_params(vector, allow_nonfinite)

    def get_params(self) -> torch.Tensor:
        """The flat vector (read back from a package whose mode reads every parameter)."""
        if self._params is not None:
            return self._params.clone()
        # every mode that returns logits reads every parameter; 'features' skips the classifier
        mode = next((m for m in ("full", "out", "both") if m in self.packages), self.modes[0])
        name = next(iter(self.packages[mode].values()))
        return package_params(self._verified_bytes(name), self._layout(), name, str(self.device))


TORCH_ENGINES = {"torchscript": TorchScriptBackbone, "exported": ExportedBackbone, "aoti": AotiBackbone}
