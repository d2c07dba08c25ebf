"""Export one backbone: every mode x format written atomically, verified, and a manifest."""

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from export.atomic import atomic_path, check_writable_dir
from export.manifest import file_entry, param_layout, versions, write_manifest
from export.onnx_export import export_onnx, mode_outputs
from export.torchscript_export import save_torchscript, script_head
from export.verify import ATOL, REL_FLOOR, RTOL, eager_outputs, sample_inputs, verify_onnx, verify_torchscript
from zoo.base import RETURNT_MODES, MammothBackbone

FORMATS: Tuple[str, ...] = ("torchscript", "onnx")
SUFFIX = {"torchscript": ".pt", "onnx": ".onnx"}


@dataclass
class ExportResult:
    directory: Path
    manifest: Dict[str, Any]
    failures: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def max_error(self) -> float:
        errs = [s["max_abs"] for fmt in self.manifest["verification"].values()
                for outs in fmt.values() for s in outs.values()]
        return max(errs, default=0.0)


def parse_list(text: str, allowed: Sequence[str], what: str) -> List[str]:
    """'a,b' -> ['a', 'b'] in canonical order; one-line error naming a bad value."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise ValueError(f"unknown {what} {', '.join(map(repr, bad)) or repr(text)}; "
                         f"allowed: {', '.join(allowed)}")
    return [a for a in allowed if a in items]


def check_input_shape(net: MammothBackbone, shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """Refuse an input shape the backbone cannot take, naming the expected one."""
    expected = tuple(net.input_shape)
    what = "x".join(map(str, expected))
    name = getattr(net, "registry_name", type(net).__name__)
    if len(shape) != len(expected) or shape[0] != expected[0]:
        raise ValueError(f"--input-shape {','.join(map(str, shape))} does not fit backbone "
                         f"{name!r}: expected {what}" + (" (C fixed, H,W free)" if net.dynamic_hw else ""))
    if not net.dynamic_hw and tuple(shape) != expected:
        raise ValueError(f"--input-shape {','.join(map(str, shape))} does not fit backbone "
                         f"{name!r}: it only takes {what}")
    try:
        with torch.no_grad():
            net(torch.zeros(1, *shape, device=next(net.parameters()).device))
    except RuntimeError as exc:
        raise ValueError(f"--input-shape {','.join(map(str, shape))} is too small for backbone "
                         f"{name!r} ({str(exc).splitlines()[0][:120]}); default: {what}") from None
    return tuple(shape)


def export_backbone(
    net: MammothBackbone,
    out_dir: Path,
    modes: Sequence[str] = RETURNT_MODES,
    formats: Sequence[str] = FORMATS,
    input_shape: Optional[Tuple[int, ...]] = None,
    opset: Optional[int] = None,
    device: str = "cpu",
    source: Optional[Dict[str, Any]] = None,
) -> ExportResult:
    """Write `<mode>.pt` / `<mode>.onnx` and `manifest.json` into `out_dir`, verified."""
    out_dir = check_writable_dir(Path(out_dir))
    net = net.to(device).eval()
    shape = check_input_shape(net, tuple(input_shape or net.input_shape))
    full_names = net.output_names()
    outputs = mode_outputs(full_names)
    inputs = sample_inputs(shape)
    seconds: Dict[str, float] = {}
    files: Dict[str, Dict[str, Any]] = {}
    verification: Dict[str, Dict[str, Any]] = {f: {} for f in formats}
    failures: List[str] = []
    onnx_names: Dict[str, str] = {}
    opset_used = None

    if "onnx" in formats:
        t = time.perf_counter()
        exported = export_onnx(net, shape, opset=opset, device=device)
        onnx_names, opset_used = exported.param_names, exported.opset
        seconds["onnx_export"] = time.perf_counter() - t

    t = time.perf_counter()
    expected = {m: eager_outputs(net, m, inputs, device) for m in modes}
    seconds["eager"] = time.perf_counter() - t
    for fmt in formats:
        seconds.setdefault(f"{fmt}_write", 0.0)
        seconds.setdefault(f"{fmt}_verify", 0.0)
        verify = verify_torchscript if fmt == "torchscript" else verify_onnx
        for mode in modes:
            path = out_dir / f"{mode}{SUFFIX[fmt]}"
            t = time.perf_counter()
            try:
                with atomic_path(path) as tmp:
                    if fmt == "torchscript":
                        save_torchscript(script_head(net, mode), tmp)
                    else:
                        tmp.write_bytes(exported.models[mode].SerializeToString())
                    t_write = time.perf_counter()
                    # verified as the temp file: a failing artifact never appears under its name
                    result = verify(tmp, outputs[mode], inputs, expected[mode], device)
                    verification[fmt][mode] = result
                    bad = [n for n, s in result.items() if not s["ok"]]
                    if bad:
                        raise _Rejected(f"{path.name}: {', '.join(bad)} differ from eager beyond "
                                        f"{ATOL:g} + {RTOL:g}*|eager|")
            except _Rejected as rejected:
                failures.append(str(rejected))
                path.unlink(missing_ok=True)  # no stale artifact of an earlier run either
                continue
            seconds[f"{fmt}_write"] += t_write - t
            seconds[f"{fmt}_verify"] += time.perf_counter() - t_write
            files[path.name] = file_entry(path)

    manifest = {
        "format_version": 1,
        "backbone": {"name": getattr(net, "registry_name", type(net).__name__),
                     "args": getattr(net, "registry_kwargs", {}),
                     "num_params": net.num_params()},
        "source": source or {"weights": "random (seeded)"},
        "input": {"name": "x", "shape": ["batch", *shape], "dtype": "float32",
                  "dynamic": ["batch"] + (["height", "width"] if net.dynamic_hw else [])},
        "modes": {m: {"outputs": [{"name": n, "shape": _output_shape(net, n, expected[m], outputs[m])}
                                  for n in outputs[m]]} for m in modes},
        "formats": list(formats),
        "files": dict(sorted(files.items())),
        "opset": opset_used,
        "versions": versions(),
        "verification": verification,
        "tolerance": {"atol": ATOL, "rtol": RTOL, "rel_floor": REL_FLOOR,
                      "batches": [int(x.shape[0]) for x in inputs]},
        "flat_params": {"count": net.num_params(), "dtype": "float32",
                        "layout": param_layout(net, onnx_names)},
        "timing": {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "seconds": {k: round(v, 3) for k, v in seconds.items()}},
    }
    write_manifest(out_dir, manifest)
    return ExportResult(out_dir, manifest, failures)


class _Rejected(Exception):
    """Raised inside atomic_path so the failing artifact's temp file is discarded."""


def _output_shape(net: MammothBackbone, name: str, expected, names: List[str]) -> List[Any]:
    """Output shape with symbolic batch (and H/W where they vary with the input)."""
    shape = list(expected[0][names.index(name)].shape)
    shape[0] = "batch"
    if net.dynamic_hw and len(shape) == 4:
        shape[2], shape[3] = "height", "width"
    return shape
