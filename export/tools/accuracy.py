"""`python -m export accuracy DIR --data X --labels Y`: top-1 of every engine x precision the
directory can run, against the labels and against fp32, recorded in the manifest.

Speed figures of reduced precision mean nothing without this: bf16 and int8 change the
numbers, and only real data says by how much the answers change.
"""

from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from export.errors import ExportError
from export.runtime import available_pairs
from export.store.manifest import read_manifest
from export.store.transaction import manifest_update
from export.tools.tables import format_table

#: the reference every other pair is compared with
REFERENCE = ("onnxruntime", "fp32")


def logits_of(directory: Path, engine: str, precision: str, x: np.ndarray, batch: int = 64) -> np.ndarray:
    from export.runtime import load

    net = load(directory, engine=engine, precision=precision)
    return np.concatenate([np.asarray(net(x[i:i + batch], returnt="out")) for i in range(0, len(x), batch)])


def measure_accuracy(directory: Path, x: np.ndarray, y: np.ndarray,
                     pairs: Optional[Sequence[Tuple[str, str]]] = None, log=None) -> Dict[str, Any]:
    """Top-1 of each pair on (x, y), its top-1 agreement with and max |logit difference| from
    the reference (onnxruntime fp32, else the first fp32 pair)."""
    pairs = list(pairs or available_pairs(read_manifest(directory), "out"))
    if not pairs:
        raise ExportError(f"{directory}: no engine can run this directory's 'out' mode")
    reference = REFERENCE if REFERENCE in pairs else next((p for p in pairs if p[1] == "fp32"), pairs[0])
    logits = {}
    for pair in [reference] + [p for p in pairs if p != reference]:
        if log:
            log(f"accuracy: {pair[0]} {pair[1]} ...")
        logits[pair] = logits_of(directory, pair[0], pair[1], x)
    ref = logits[reference]
    rows = []
    for pair in pairs:
        out = logits[pair]
        rows.append({"engine": pair[0], "precision": pair[1],
                     "top1": float((out.argmax(1) == y).mean()),
                     "agreement": float((out.argmax(1) == ref.argmax(1)).mean()),
                     "max_abs_logit_diff": float(np.abs(out.astype(np.float64) - ref).max())})
    return {"samples": int(len(y)), "reference": f"{reference[0]} {reference[1]}", "results": rows}


def format_accuracy(report: Dict[str, Any]) -> str:
    rows = [[r["engine"], r["precision"], f"{r['top1']:.4f}", f"{r['agreement']:.4f}",
             f"{r['max_abs_logit_diff']:.3g}"] for r in report["results"]]
    return format_table(["engine", "precision", "top-1", f"agrees with {report['reference']}",
                         "max |dlogit|"], rows)


def record_accuracy(directory: Path, report: Dict[str, Any]) -> None:
    """Put the report into the manifest (under `accuracy`), atomically; no file changes."""
    with manifest_update(Path(directory)) as (_, manifest):
        manifest.accuracy = report
