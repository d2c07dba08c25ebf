"""Eager vs exported: load each artifact in a fresh runtime and compare every output."""

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from export.torchscript_export import load_torchscript
from zoo.base import MammothBackbone, unpack_outputs

#: The bound, elementwise: |exported - eager| <= ATOL * scale + RTOL * |eager|, with
#: scale = max|eager| of that output. Both terms follow the output's own magnitude, so the
#: check means the same for logits of 1e3 and features of 1e-12 (an absolute floor would pass
#: any graph there). ATOL is 1e-3 of the scale: float32 rounding differences (summation order,
#: ORT's Conv+BN fusion) grow through depth; with unit-scale random weights ResNet-50's last
#: stage differs by 1.1e-4 of its scale even with every ORT optimisation off, while one changed
#: weight moves some output by ~1e-1 of its scale.
ATOL = 1e-3
RTOL = 1e-4
#: |eager| below REL_FLOOR * scale counts as that much when reporting the relative error
REL_FLOOR = 1e-3
BATCHES = (1, 3)  # the export's example batch is 2: neither is it


def sample_inputs(input_shape: Sequence[int], seed: int = 0, images: bool = False,
                  batches: Sequence[int] = BATCHES) -> List[torch.Tensor]:
    """Seeded inputs at every verification batch size: N(0,1) (what normalised images look
    like), or uniform [0, 1] images for graphs that normalise their input themselves."""
    gen = torch.Generator().manual_seed(seed)
    draw = torch.rand if images else torch.randn
    return [draw(b, *input_shape, generator=gen) for b in batches]


def error_stats(got: np.ndarray, want: np.ndarray) -> Dict[str, Any]:
    """Max abs/rel error of one output and whether it is within the bound (NaN never is)."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return {"max_abs": float("inf"), "max_rel": float("inf"), "ok": False,
                "error": f"shape {got.shape} != {want.shape}"}
    diff = np.abs(got - want)
    scale = float(np.abs(want).max(initial=0.0))
    ok = bool(np.all(diff <= ATOL * scale + RTOL * np.abs(want)))  # False for any NaN
    rel = diff / np.maximum(np.abs(want), max(REL_FLOOR * scale, np.finfo(np.float64).tiny))
    return {"max_abs": float(diff.max(initial=0.0)), "max_rel": float(rel.max(initial=0.0)),
            "scale": scale, "ok": ok}


def merge(stats: List[Dict[str, Any]]) -> Dict[str, Any]:
    def worst(key: str) -> float:  # NaN, when any, is the worst
        values = [s[key] for s in stats]
        return float("nan") if any(v != v for v in values) else max(values)

    merged = {"max_abs": worst("max_abs"), "max_rel": worst("max_rel"),
              "ok": all(s["ok"] for s in stats)}
    errors = [s["error"] for s in stats if "error" in s]
    if errors:
        merged["error"] = errors[0]
    return merged


def eager_outputs(net: MammothBackbone, mode: str, inputs: List[torch.Tensor], device: str,
                  preprocess: Optional[torch.nn.Module] = None) -> List[List[np.ndarray]]:
    """The eager reference: `net(preprocess(x), returnt=mode)` for every input, as numpy."""
    with torch.no_grad():
        return [[t.cpu().numpy() for t in unpack_outputs(net(_apply(preprocess, x.to(device)), returnt=mode))]
                for x in inputs]


def _apply(preprocess: Optional[torch.nn.Module], x: torch.Tensor) -> torch.Tensor:
    return x if preprocess is None else preprocess.to(x.device)(x)


def compare(run: Callable[[torch.Tensor], Sequence[Any]], names: List[str], inputs, expected) -> Dict[str, dict]:
    """Run every input through `run` (outputs in `names` order) and compare with `expected`."""
    per_output: Dict[str, list] = {n: [] for n in names}
    with torch.no_grad():
        for x, want in zip(inputs, expected):
            got = [g.detach().cpu().numpy() if isinstance(g, torch.Tensor) else g for g in unpack_outputs(run(x))]
            for name, g, w in zip(names, got, want):
                per_output[name].append(error_stats(g, w))
    return {n: merge(s) for n, s in per_output.items()}


def verify_torchscript(path: Path, names: List[str], inputs, expected, device: str) -> Dict[str, dict]:
    module = load_torchscript(path, device)
    return compare(lambda x: module(x.to(device)), names, inputs, expected)


def verify_program(path: Path, names: List[str], inputs, expected, device: str) -> Dict[str, dict]:
    """A torch.export program as users load it: `torch.export.load(path).module()`."""
    from export.program_export import load_program

    module = load_program(path).module()
    return compare(lambda x: module(x.to(device)), names, inputs, expected)


def verify_aoti(path: Path, names: List[str], inputs, expected, device: str) -> Dict[str, dict]:
    """An AOTInductor package as users load it: `torch._inductor.aoti_load_package(path)`."""
    from export.aoti_export import load_package

    model = load_package(path, path.name)
    return compare(lambda x: model(x.to(device)), names, inputs, expected)


def ort_providers(device: str) -> List[str]:
    import onnxruntime as ort

    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


def ort_session(source, device: str = "cpu", threads: Optional[int] = None, optimization: str = "all",
                providers: Optional[Sequence[str]] = None, log_level: int = 3, spin_wait: bool = True):
    """The one way this project makes an onnxruntime session.

    Args:
        source: a path, or the model's bytes (so what runs is what was hashed).
        device: cpu or cuda (the CUDA provider where onnxruntime has it).
        threads: intra-op threads; None: torch's (`torch.get_num_threads()`, all cores unless
            the process chose fewer), so one setting budgets both runtimes.
        optimization: graph optimisation level, one of OPTIMIZATION_LEVELS.
        providers: explicit execution providers (default: from `device`).
        log_level: 3 = errors only (unused parameter initializers are kept on purpose and would
            warn at 2).
        spin_wait: intra-op threads busy-wait for work between calls (onnxruntime's default:
            lowest latency for a process that has the cores to itself). Off where other processes
            need the same cores between calls, as in a server's proxy and ingress.
    """
    import onnxruntime as ort

    if optimization not in OPTIMIZATION_LEVELS:
        raise ValueError(f"unknown optimization {optimization!r}; allowed: {', '.join(OPTIMIZATION_LEVELS)}")
    options = ort.SessionOptions()
    options.log_severity_level = log_level
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    if not spin_wait:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    model = source if isinstance(source, bytes) else str(source)
    return ort.InferenceSession(model, options, providers=list(providers or ort_providers(device)))


def verify_onnx(path: Path, names: List[str], inputs, expected, device: str) -> Dict[str, dict]:
    session = ort_session(path, device)
    return compare(lambda x: session.run(names, {"x": x.numpy()}), names, inputs, expected)


_FRESH_AOTI = """
import sys, torch
jobs = torch.load(sys.argv[1], weights_only=True)
results = []
for path, inputs in jobs:
    model = torch._inductor.aoti_load_package(path)
    outs = []
    for x in inputs:
        out = model(x)
        outs.append([out] if isinstance(out, torch.Tensor) else list(out))
    results.append(outs)
torch.save(results, sys.argv[2])
"""


def verify_aoti_fresh(jobs: List[tuple], device: str) -> List[Dict[str, dict]]:
    """Verify AOTInductor packages in a fresh Python (`-I`: no zoo, no state of the process that
    compiled them): jobs of (path, output names, inputs, expected), one child for all."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="aoti-verify-") as tmp:
        request, reply = Path(tmp) / "jobs.pt", Path(tmp) / "outputs.pt"
        torch.save([(str(path), [x.to(device) for x in inputs]) for path, _, inputs, _ in jobs], request)
        proc = subprocess.run([sys.executable, "-I", "-c", _FRESH_AOTI, str(request), str(reply)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            return [{n: {"max_abs": float("inf"), "max_rel": float("inf"), "ok": False,
                         "error": f"fresh process failed: {last[:200]}"} for n in names}
                    for _, names, _, _ in jobs]
        outputs = torch.load(reply, weights_only=True)
    results = []
    for (_, names, inputs, expected), outs in zip(jobs, outputs):
        replies = iter(outs)
        results.append(compare(lambda x, r=replies: next(r), names, inputs, expected))
    return results


#: how each format's file is loaded and compared with eager
VERIFIERS = {"torchscript": verify_torchscript, "onnx": verify_onnx, "exported": verify_program,
             "aoti": verify_aoti}
