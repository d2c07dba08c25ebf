"""Eager vs exported: load each artifact in a fresh runtime and compare every output."""

import warnings
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch

from zoo.base import MammothBackbone

#: SPEC §4 bound, elementwise: |exported - eager| <= ATOL * scale + RTOL * |eager|, where
#: scale = max(1, max|eager| of that output). For outputs of magnitude <= 1 this is exactly
#: SPEC's 1e-4 + 1e-4*|eager|; for large ones (resnet32's stages reach ~1e3) the absolute term
#: follows the output's scale, since float32 rounding of a sum of large terms that cancels to
#: ~0 is relative to the terms, not to the result.
ATOL = 1e-4
RTOL = 1e-4
#: |eager| below this counts as this much when reporting the relative error
REL_FLOOR = 1e-3
BATCHES = (1, 3)  # the export's example batch is 2: neither is it


def as_list(out) -> List[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else list(out)


def sample_inputs(input_shape: Sequence[int], seed: int = 0) -> List[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, *input_shape, generator=gen) for b in BATCHES]


def error_stats(got: np.ndarray, want: np.ndarray) -> Dict[str, float]:
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return {"max_abs": float("inf"), "max_rel": float("inf"), "ok": False,
                "error": f"shape {got.shape} != {want.shape}"}
    diff = np.abs(got - want)
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    ok = bool(np.all(diff <= ATOL * scale + RTOL * np.abs(want)))
    rel = diff / np.maximum(np.abs(want), REL_FLOOR)
    return {"max_abs": float(diff.max(initial=0.0)), "max_rel": float(rel.max(initial=0.0)), "ok": ok}


def merge(stats: List[Dict[str, float]]) -> Dict[str, float]:
    return {"max_abs": max(s["max_abs"] for s in stats), "max_rel": max(s["max_rel"] for s in stats),
            "ok": all(s["ok"] for s in stats)}


def eager_outputs(net: MammothBackbone, mode: str, inputs: List[torch.Tensor], device: str) -> List[List[np.ndarray]]:
    with torch.no_grad():
        return [[t.cpu().numpy() for t in as_list(net(x.to(device), returnt=mode))] for x in inputs]


def load_torchscript(path, device: str = "cpu") -> torch.jit.ScriptModule:
    """torch.jit.load, without its torch 2.14 deprecation warning (we ship TorchScript)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated",
                                category=FutureWarning)
        return torch.jit.load(str(path), map_location=device)


def verify_torchscript(path: Path, names: List[str], inputs, expected, device: str) -> Dict[str, dict]:
    module = load_torchscript(path, device)
    per_output: Dict[str, list] = {n: [] for n in names}
    with torch.no_grad():
        for x, want in zip(inputs, expected):
            got = as_list(module(x.to(device)))
            for name, g, w in zip(names, got, want):
                per_output[name].append(error_stats(g.cpu().numpy(), w))
    return {n: merge(s) for n, s in per_output.items()}


def ort_providers(device: str) -> List[str]:
    import onnxruntime as ort

    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def ort_session(path, device: str = "cpu", threads: int = 0):
    """An onnxruntime session; `threads` > 0 fixes the intra-op thread count (benchmarks)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # unused parameter initializers are kept on purpose
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=ort_providers(device))


def verify_onnx(path: Path, names: List[str], inputs, expected, device: str) -> Dict[str, dict]:
    session = ort_session(path, device)
    per_output: Dict[str, list] = {n: [] for n in names}
    for x, want in zip(inputs, expected):
        got = session.run(names, {"x": x.numpy()})
        for name, g, w in zip(names, got, want):
            per_output[name].append(error_stats(g, w))
    return {n: merge(s) for n, s in per_output.items()}
