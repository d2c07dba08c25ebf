"""AOTInductor packages: a mode's torch.export program compiled to a shared library and packed
in a `.pt2` archive that Python (`torch._inductor.aoti_load_package`) and C++
(`torch::inductor::AOTIModelPackageLoader`) load without the zoo, without Python in C++.

`<mode>.aoti.pt2` takes any batch size (1..MAX_BATCH); `<mode>.aoti.b<N>.pt2` is compiled for
batch N only. Two kinds of package (`--aoti-weights`):

- replaceable (default): the weights are constants under their own names that `load_constants`
  (C++: `update_constant_buffer`) replaces in memory without recompiling; convolutions run
  through aten's generic `convolution` (inductor can only prepack weights it may fold).
- frozen: compiled with inductor's freezing under no_grad, so its oneDNN passes fold BatchNorm
  and the residual adds into prepacked `mkldnn__convolution_pointwise` kernels. Measured on
  CIFAR ResNet-18, batch 1, AVX2 EPYC: 12.8 ms for a batch-1 frozen package against 30-37 ms
  for a replaceable one and 10.9 ms for onnxruntime in the same process; a frozen any-batch
  package ran 27.5 ms (oneDNN re-derives its plans for a dynamic batch). The weights are folded
  and cannot be replaced. A per-batch frozen package is compiled for the export's H x W as
  well: only with every size static does inductor store the convolution weights in oneDNN's
  blocked layout; with H and W free each call reordered all of them (Zen 4, the same model:
  6.4 ms with 20 weight reorders per call, 3.6 ms static, onnxruntime 3.4 ms).
"""

import io
import tempfile
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import torch
from torch import Tensor

from export.errors import ExportError, ParamsError, first_line
from export.formats.base import (
    Format,
    Layout,
    Source,
    quiet_logger,
    retrace_keeping_ranges,
    used_parameters,
    verify_in_fresh_process,
)
from export.store.flat_vector import Buffers, check_params_vector, layout_names, prefixed_buffers
from export.store.manifest import ARTIFACT_SUFFIX, ProgramInfo

#: inductor options per package kind (recorded in the manifest and the package's metadata).
#: replaceable:
#: - freezing off: frozen weights are renamed and prepacked, and load_constants could not
#:   replace them (freezing only applies when compiled under no_grad, which compile_package is);
#: - runtime constant folding: what inductor computes from weights alone (e.g. BatchNorm's
#:   scale from weight and running_var) is a sub-graph run again after `load_constants`, so
#:   every parameter stays replaceable; without it ResNet-18's BatchNorm weights are folded away
#:   and new weights would be silently ignored;
#: - check_lowerbound off: with input checks on (AOTI_RUNTIME_CHECK_INPUTS=1) a dynamic-batch
#:   package otherwise refuses batch 1 (torch.export assumes dynamic sizes >= 2; the compiled
#:   code handles 1, verified at export). The upper bound is the program's (compiled with
#:   `retrace_keeping_ranges`: inductor's re-trace no longer narrows it to 15).
#: frozen: freezing and oneDNN weight prepacking (convolutions fused with BatchNorm, ReLU and
#: residual adds); the same lower-bound setting.
AOTI_CONFIGS: Dict[str, Dict[str, Any]] = {
    "replaceable": {"freezing": False, "aot_inductor.use_runtime_constant_folding": True,
                    "aot_inductor.check_lowerbound": False},
    "frozen": {"freezing": True, "cpp.weight_prepack": True, "aot_inductor.check_lowerbound": False},
}
AOTI_WEIGHTS = tuple(AOTI_CONFIGS)


def check_aoti_weights(weights: str) -> str:
    if weights not in AOTI_CONFIGS:
        raise ExportError(f"--aoti-weights {weights!r}: allowed: {', '.join(AOTI_WEIGHTS)} (replaceable: "
                          "set_params and published versions work; frozen: fastest, weights fixed)")
    return weights


class AotiError(ExportError):
    """An AOTInductor package that cannot be built or loaded here."""


def _import_cpp_extension_quietly() -> None:
    """Inductor imports torch.utils.cpp_extension to compile and to load a package; on a machine
    without CUDA that import logs "No CUDA runtime is found", which nothing here can act on.
    Imported first under a raised logger, it says nothing when inductor imports it."""
    with quiet_logger("torch.utils.cpp_extension"):
        import torch.utils.cpp_extension  # noqa: F401


def check_compiler() -> str:
    """The C++ compiler inductor will use; one line naming what to install when there is none."""
    from torch._inductor import config
    from torch._inductor.cpp_builder import get_cpp_compiler

    _import_cpp_extension_quietly()
    try:
        return get_cpp_compiler()
    except Exception:  # inductor raises its own error type when the search finds nothing
        wanted = [c for c in config.cpp.cxx if c] or ["g++"]
        raise AotiError(f"--formats aoti compiles C++, but no compiler {', '.join(wanted)} was found: "
                        "install g++ (e.g. apt install g++) or set CXX to a C++17 compiler") from None


def compile_package(program: torch.export.ExportedProgram, metadata: Dict[str, str],
                    weights: str = "replaceable", configs: Optional[Dict[str, Any]] = None
                    ) -> "tuple[bytes, Dict[str, Any]]":
    """Compile `program` for its device as a `weights` package (or with explicit inductor
    `configs`); the package's bytes and what the manifest records (seconds, torch version,
    compiler, inductor options, the package kind)."""
    compiler = check_compiler()
    options = dict(AOTI_CONFIGS[check_aoti_weights(weights)] if configs is None else configs)
    stamp = {"torch_version": torch.__version__, "aoti_weights": weights, **metadata}
    buffer = io.BytesIO()
    start = time.perf_counter()
    # no_grad: inductor freezes (and prepacks) only graphs compiled without autograd
    with warnings.catch_warnings(), retrace_keeping_ranges(program), torch.no_grad():
        warnings.simplefilter("ignore")
        torch._inductor.aoti_compile_and_package(
            program, package_path=buffer,
            inductor_configs={**options, "aot_inductor.metadata": stamp})
    info = {"seconds": round(time.perf_counter() - start, 2), "torch": torch.__version__,
            "compiler": compiler, "inductor_configs": options, "metadata": stamp, "aoti_weights": weights}
    return buffer.getvalue(), info


def check_torch_version(name: str, entry: Optional[ProgramInfo]) -> None:
    """A package runs only on the torch that compiled it (its shared library links that
    libtorch's C++ ABI): refuse another version before loading."""
    built = entry.torch if entry is not None else None
    if built != torch.__version__:
        raise AotiError(f"{name}: compiled with torch {built}, this is torch {torch.__version__}; "
                        "re-export with --formats aoti on this torch (or use the exported program, "
                        "<mode>.ep.pt2, which loads on newer torch)")


def load_package(source: Union[Path, bytes], name: str = "package"):
    """`aoti_load_package` of a path or of bytes already checked against the manifest.

    Packages check input shapes only with AOTI_RUNTIME_CHECK_INPUTS=1 (a batch-1 package reads a
    batch of 3 without it); the aoti engine does not rely on it: it picks the package compiled
    for each call's batch size. With the check on, a dynamic-batch package takes 1..4096."""
    data = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    _import_cpp_extension_quietly()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch._inductor.aoti_load_package(data)
    except Exception as exc:
        raise AotiError(f"{name}: not a loadable AOTInductor package ({type(exc).__name__}: "
                        f"{first_line(exc, 120)})") from None


def _constants(source: Union[Path, bytes], name: str, device: str = "cpu") -> Dict[str, Tensor]:
    """The constants compiled into a package, by their original names (its shared library run
    through torch's container runner, which can read them back)."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    with tempfile.TemporaryDirectory(prefix="aoti-") as tmp:
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                libs = [n for n in archive.namelist() if n.endswith(".so") and "/aotinductor/" in n]
                if len(libs) != 1:
                    raise AotiError(f"{name}: expected one model library in the package, found {len(libs)}")
                so = archive.extract(libs[0], tmp)
        except zipfile.BadZipFile:
            raise AotiError(f"{name}: not an AOTInductor package (not a zip archive)") from None
        runner_type = (torch._C._aoti.AOTIModelContainerRunnerCuda if device.startswith("cuda")
                       else torch._C._aoti.AOTIModelContainerRunnerCpu)
        runner = runner_type(so, 1)
        return {k: v.clone() for k, v in runner.extract_constants_map(False).items()}


def package_constants(source: Union[Path, bytes], layout, name: str = "package",
                      device: str = "cpu") -> Dict[str, Tensor]:
    """Layout name -> the values a package holds for it. A parameter its mode does not read
    (the classifier of a 'features' package) is not compiled in and not listed."""
    constants = _constants(source, name, device)
    if any(k.startswith("_frozen_param") for k in constants):
        raise ParamsError(f"{name}: compiled with --aoti-weights frozen, its weights are folded and "
                          "prepacked (not the flat vector); read them from another file of the export "
                          "(.ep.pt2, .onnx) or re-export with --aoti-weights replaceable")
    held = {}
    for e in layout:
        found = next((n for n in layout_names(e) if n in constants), None)
        if found is not None:
            held[e.name] = constants[found].reshape(-1).float().cpu()
    return held


def package_params(source: Union[Path, bytes], layout, name: str = "package", device: str = "cpu") -> Tensor:
    """The flat vector compiled into a package, in the layout's (eager `parameters()`) order."""
    held = package_constants(source, layout, name, device)
    if len(held) != len(layout):
        raise ParamsError(f"{name}: holds {len(held)} of the {len(layout)} parameters (its mode does "
                          "not read the others); read them from an 'out', 'both' or 'full' package")
    return torch.cat([held[e.name] for e in layout])


def replaceable_weights(program: torch.export.ExportedProgram, package_bytes: bytes) -> bool:
    """Whether every parameter the program reads is a constant of the compiled package under
    its own name (so load_constants replaces it), not folded into another constant."""
    fqns = set(load_package(package_bytes).get_constant_fqns())
    return used_parameters(program) <= fqns


def package_state(vector: Tensor, layout, buffers: Optional[Buffers] = None) -> Dict[str, Tensor]:
    """Every name a package may give a parameter or buffer -> its value (a package holds only
    those its mode reads; `load_constants` is given the ones it has)."""
    constants = {name: value.clone() for name, value in prefixed_buffers(buffers).items()}
    for e in layout:
        value = vector[e.offset:e.offset + e.length].view(e.shape)
        for fqn in layout_names(e):
            constants[fqn] = value.clone()  # its own storage: load_constants takes no views of the vector
    return constants


def set_package_params(model, vector: Tensor, layout, allow_nonfinite: bool = False,
                       name: str = "package", buffers: Optional[Buffers] = None) -> None:
    """Replace the parameters (and `buffers`, eager names) of a loaded package in memory
    (`load_constants`, no recompiling); those its mode does not read are not in it and are skipped."""
    check_params_vector(vector, layout, allow_nonfinite)
    fqns = set(model.get_constant_fqns())
    key = model.get_metadata().get("AOTI_DEVICE_KEY", "cpu")  # the device it was compiled for
    device = torch.device("cuda" if key.startswith("cuda") else "cpu")
    constants = {fqn: value.to(device) for fqn, value in package_state(vector, layout, buffers).items()
                 if fqn in fqns}
    model.load_constants(constants, check_full_update=False)


def refuse_frozen(name: str, info: ProgramInfo) -> None:
    """One line for a package whose weights inductor folded into other constants."""
    if info.aoti_weights == "frozen":
        raise ParamsError(f"{name}: compiled with --aoti-weights frozen (weights folded into its kernels), "
                          "so its weights cannot be replaced; re-export with --aoti-weights replaceable "
                          "(python -m export ... --formats aoti --aoti-weights replaceable) or with the new weights")
    if not info.weights_replaceable:
        raise ParamsError(f"{name}: inductor folded parameters of this package into other constants "
                          "when compiling, so its weights cannot be replaced; re-export with the "
                          "new weights (python -m export ... --formats aoti)")


def _write(program: torch.export.ExportedProgram, path: Path, metadata: Optional[Dict[str, str]] = None,
           weights: str = "replaceable") -> Optional[Dict[str, Any]]:
    """Compile and write one package; what the manifest records of it (seconds, compiler,
    inductor options, package kind, whether its weights can be replaced)."""
    data, info = compile_package(program, metadata or {}, weights)
    Path(path).write_bytes(data)
    return {**info, "weights_replaceable": replaceable_weights(program, data)}


def _load(source: Source, device: str = "cpu") -> Callable[[Tensor], Any]:
    """A package as users load it: `torch._inductor.aoti_load_package(path)`."""
    model = load_package(source, source.name if isinstance(source, Path) else "package")
    return lambda x: model(x.to(device))


def _read_params(path: Path, layout: Layout) -> Tensor:
    return package_params(path, layout, Path(path).name)


def _write_params(path: Path, vector: Tensor, out: Path, layout: Layout, allow_nonfinite: bool = False) -> Path:
    raise ExportError(f"{path}: an AOTInductor package's weights are compiled into its shared "
                      "library and torch cannot rewrite them in the file; replace them when "
                      "loaded (export.runtime.load(DIR, engine='aoti').set_params(v), C++: "
                      "AOTIModelPackageLoader::load_constants) or re-export")


FORMAT = Format("aoti", ARTIFACT_SUFFIX["aoti"], _write, _load, _read_params, _write_params)


_FRESH = """
def run(job, constants):
    path, inputs = job
    model = torch._inductor.aoti_load_package(path)
    if constants:
        held = set(model.get_constant_fqns())
        model.load_constants({k: v for k, v in constants.items() if k in held}, check_full_update=False)
    outs = []
    for x in inputs:
        out = model(x)
        outs.append(as_list(out))
    return outs
"""


def verify_fresh(jobs: List[tuple], device: str,
                 constants: Optional[Dict[str, Tensor]] = None) -> List[Dict[str, dict]]:
    """Verify packages in a fresh Python (`-I`: no zoo, no state of the process that compiled
    them): jobs of (path, output names, inputs, expected), one child for all. `constants`
    (`package_state`: a published version's weights) are loaded into each package first."""
    held = {k: v.to(device) for k, v in (constants or {}).items()}
    return verify_in_fresh_process(
        _FRESH, [(str(path), [x.to(device) for x in inputs]) for path, _, inputs, _ in jobs], jobs, held or None)
