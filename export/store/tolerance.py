"""The one bound every comparison with eager uses: export verification, `verify`, the engines'
tests and the load test's answer checks."""

from typing import Any, Callable, Dict, List, Sequence

import numpy as np
import torch

from zoo.base import unpack_outputs

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


def tolerance_record(batches: Sequence[int]) -> Dict[str, Any]:
    """The bound as the manifest records it."""
    return {"atol": ATOL, "rtol": RTOL, "rel_floor": REL_FLOOR,
            "bound": "|exported - eager| <= atol*max|eager| + rtol*|eager| per output",
            "batches": list(batches)}


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


def failed_stats(names: Sequence[str], error: str) -> Dict[str, Dict[str, Any]]:
    """Every output failed with `error` (a file that could not even be run)."""
    return {n: {"max_abs": float("inf"), "max_rel": float("inf"), "ok": False, "error": error} for n in names}


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


def compare(run: Callable[[torch.Tensor], Sequence[Any]], names: List[str], inputs, expected) -> Dict[str, dict]:
    """Run every input through `run` (outputs in `names` order) and compare with `expected`."""
    per_output: Dict[str, list] = {n: [] for n in names}
    with torch.no_grad():
        for x, want in zip(inputs, expected):
            got = [g.detach().cpu().numpy() if isinstance(g, torch.Tensor) else g for g in unpack_outputs(run(x))]
            for name, g, w in zip(names, got, want):
                per_output[name].append(error_stats(g, w))
    return {n: merge(s) for n, s in per_output.items()}
