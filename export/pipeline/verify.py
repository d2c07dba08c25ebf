"""Eager vs exported: each artifact loaded as its users load it, fresh, and every output
compared with eager within the bound (`export.store.tolerance`); the `verify` command's logic
(hashes, layout, outputs and the flat vector each file holds)."""

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from export.errors import ExportError
from export.formats import get_format
from export.formats.aoti import check_torch_version, package_constants
from export.formats.program import load_program
from export.formats.torchscript import load_torchscript
from export.pipeline.preprocessing import Normalize
from export.store.flat_vector import checked_layout
from export.store.manifest import Manifest, check_files, layout_problem, read_manifest, stray_files
from export.store.tolerance import compare, sample_inputs
from zoo.base import MammothBackbone, unpack_outputs
from zoo.heads import BACKBONE_PREFIX
from zoo.registry import get_backbone
from zoo.weights import load_state_dict_strict


def eager_outputs(net: MammothBackbone, mode: str, inputs: List[torch.Tensor], device: str,
                  preprocess: Optional[torch.nn.Module] = None) -> List[List[np.ndarray]]:
    """The eager reference: `net(preprocess(x), returnt=mode)` for every input, as numpy."""
    with torch.no_grad():
        return [[t.cpu().numpy() for t in unpack_outputs(net(_apply(preprocess, x.to(device)), returnt=mode))]
                for x in inputs]


def _apply(preprocess: Optional[torch.nn.Module], x: torch.Tensor) -> torch.Tensor:
    return x if preprocess is None else preprocess.to(x.device)(x)


def verify_file(fmt: str, path: Path, names: List[str], inputs, expected, device: str = "cpu") -> Dict[str, dict]:
    """Load one file as its users do (format `fmt`) and compare its outputs with `expected`."""
    return compare(get_format(fmt).load(Path(path), device), names, inputs, expected)


#: the formats a FreshTorchCheck loads with plain torch (no zoo): `torch.jit.load` and
#: `torch.export.load(...).module()`
FRESH_FORMATS = ("torchscript", "exported")

_FRESH_TORCH = """
import warnings
warnings.simplefilter("ignore")  # jit.load's deprecation; the programs' loader chatter
torch.set_num_threads(1)  # the exporting process uses the other core meanwhile; small inputs
# what torch.export.load imports on first use (~2.6 s), imported while the first file is written
import torch._dynamo, torch._export.serde.serialize, torch.export.pt2_archive._package  # noqa: E401


def run(job, shared):
    fmt, path, device, inputs = job
    model = torch.export.load(path).module() if fmt == "exported" else torch.jit.load(path, map_location=device)
    outs = []
    with torch.no_grad():
        for x in inputs:
            out = model(x.to(device))
            outs.append(as_list(out))
    return outs
"""


class FreshTorchCheck:
    """TorchScript files and torch.export programs verified in one fresh Python, as users load
    them without the zoo. Started before the files exist: its torch import and the programs'
    loading (torch.export.load takes ~1.5 s per CIFAR ResNet-18 program, mostly parsing
    symbolic sizes) run on another core while the caller converts to ONNX."""

    def __init__(self, device: str = "cpu") -> None:
        from export.formats.base import FreshProcess

        self.device = device
        self.process = FreshProcess(_FRESH_TORCH)
        self.jobs: List[tuple] = []

    def add(self, fmt: str, mode: str, path: Path, names: List[str], inputs, expected) -> None:
        """Hand one written file to the child, which starts on it at once."""
        self.process.submit((fmt, str(path), self.device, [x.cpu() for x in inputs]),
                            (Path(path), names, inputs, expected))
        self.jobs.append((fmt, mode, Path(path)))

    def results(self) -> List[tuple]:
        """(format, mode, path, comparison) per added file, once the child is done."""
        return [(*job, result) for job, result in zip(self.jobs, self.process.results())]

    def close(self) -> None:
        self.process.close()


class VerifyError(ExportError):
    """Artifacts that do not match their manifest or each other."""


def eager_backbone(directory: Path, manifest: Manifest) -> MammothBackbone:
    """The export's backbone built from the manifest's name and arguments (weights follow)."""
    backbone = manifest.backbone
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # pretrained variants: weights follow
            return get_backbone(backbone.name, **{k: v for k, v in backbone.args.items() if k != "weights"})
    except KeyError:
        raise VerifyError(f"{directory}: backbone {backbone.name!r} is not registered, so the "
                          "eager reference cannot be rebuilt") from None


def eager_from_artifacts(directory: Path, manifest: Manifest) -> torch.nn.Module:
    """Rebuild the eager backbone from the manifest's arguments and the artifacts' weights."""
    net = eager_backbone(directory, manifest)
    ts_files = sorted(manifest.mode_files("torchscript").values())
    programs = sorted(manifest.mode_files("exported").values())
    if ts_files or programs:
        if ts_files:
            state = load_torchscript(directory / ts_files[0]).state_dict()
        else:
            state = load_program(directory / programs[0]).state_dict
        state = {k[len(BACKBONE_PREFIX):]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}
        load_state_dict_strict(net, state, what=f"{(ts_files or programs)[0]}")
    else:
        import onnx
        from onnx import numpy_helper

        from export.formats.onnx import read_onnx_params

        onnx_file = directory / next(iter(manifest.mode_files("onnx").values()))  # int8 files do not hold them
        net.set_params(read_onnx_params(onnx_file, manifest))
        inits = {t.name: t for t in onnx.load(str(onnx_file)).graph.initializer}
        for name, buf in net.named_buffers():
            if BACKBONE_PREFIX + name in inits:
                # torch.tensor copies: onnx's array is read-only, which torch.from_numpy warns about
                buf.copy_(torch.tensor(numpy_helper.to_array(inits[BACKBONE_PREFIX + name])))
    return net.eval()


@dataclass
class VerifyReport:
    rows: List[List[str]] = field(default_factory=list)  # mode, output, format, abs, rel, status
    stray: List[str] = field(default_factory=list)  # files the manifest does not list

    @property
    def failed(self) -> int:
        return sum(r[-1] != "ok" for r in self.rows)


def _check_layout(directory: Path, manifest: Manifest, net: torch.nn.Module) -> None:
    """The manifest's flat-parameter layout tiles the vector and names the backbone's
    parameters in parameters() order with their shapes."""
    layout = manifest.flat_params.layout
    problem = layout_problem(layout, manifest.flat_params.count)
    if not problem:
        ours = [(n, list(p.shape)) for n, p in net.named_parameters()]
        theirs = [(e.name, list(e.shape)) for e in layout]
        if ours != theirs:
            bad = next((t for o, t in zip(ours, theirs) if o != t), None) or "its length"
            problem = f"it does not list the backbone's parameters in order (first difference: {bad})"
    if problem:
        raise VerifyError(f"{directory}: the manifest's flat-parameter layout is wrong: {problem}")


def verify_directory(directory: Path, seed: int = 1, device: str = "cpu") -> VerifyReport:
    """Hashes, layout, then eager vs every artifact (outputs on fresh inputs and the flat
    parameter vector each file holds); the rows of the report table."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if not manifest.files:
        raise VerifyError(f"{directory}: the manifest lists no files: nothing to verify "
                          "(re-export it)")
    check_files(directory, manifest)
    net = eager_from_artifacts(directory, manifest).to(device)
    _check_layout(directory, manifest, net)
    params = net.get_params().cpu()
    shape = list(manifest.input.shape[1:])
    prep = manifest.preprocessing or {}
    preprocess = Normalize(prep["mean"], prep["std"]) if prep.get("baked") else None
    inputs = sample_inputs(shape, seed=seed, images=preprocess is not None)
    report = VerifyReport(stray=stray_files(directory, manifest))
    wanted: Dict[Any, Any] = {}
    for mode, fmt, name, batch in manifest.artifacts():
        path = directory / name
        outputs = manifest.output_names(mode)
        ins = inputs if batch is None else sample_inputs(shape, seed=seed, images=preprocess is not None,
                                                         batches=(batch,))
        if (mode, batch) not in wanted:
            wanted[mode, batch] = eager_outputs(net, mode, ins, device, preprocess)
        label = fmt if batch is None else f"{fmt} b{batch}"
        if fmt != "pte" or manifest.programs[name].flat_params:  # else: lowered without get_params
            report.rows.append([mode, "flat params", label, "-", "-",
                                "ok" if _holds_params(path, fmt, manifest, params, device) else "MISMATCH"])
        for output, s in verify_file(fmt, path, outputs, ins, wanted[mode, batch], device).items():
            report.rows.append([mode, output, label, f"{s['max_abs']:.2e}", f"{s['max_rel']:.2e}",
                                "ok" if s["ok"] else "MISMATCH"])
    return report


def _holds_params(path: Path, fmt: str, manifest: Manifest, params: torch.Tensor, device: str) -> bool:
    """Whether the file holds the eager flat vector: all of it, bit for bit (an AOTInductor
    package: every parameter its mode reads, which is all it holds)."""
    layout = checked_layout(manifest, path, onnx=fmt == "onnx")
    if fmt != "aoti":
        return torch.equal(get_format(fmt).read_params(path, layout), params)
    check_torch_version(path.name, manifest.programs[path.name])
    held = package_constants(path, layout, path.name, device)
    return bool(held) and all(torch.equal(held[e.name], params[e.offset:e.offset + e.length])
                              for e in layout if e.name in held)


