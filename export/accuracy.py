"""`python -m export accuracy DIR --data X --labels Y`: top-1 of every engine x precision the
directory can run, against the labels and against fp32, recorded in the manifest.

Speed figures of reduced precision mean nothing without this: bf16 and int8 change the
numbers, and only real data says by how much the answers change.
"""

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from export.errors import ExportError
from export.manifest import read_manifest, write_manifest
from export.tables import format_table

#: the reference every other pair is compared with
REFERENCE = ("onnxruntime", "fp32")


def available_pairs(directory: Path, manifest: Optional[Dict[str, Any]] = None) -> List[Tuple[str, str]]:
    """(engine, precision) pairs the directory has files for and this machine can run."""
    from export.manifest import artifact_name

    manifest = manifest or read_manifest(directory)
    files = manifest["files"]
    has = {"onnx": artifact_name("out", "onnx") in files, "int8": artifact_name("out", "int8") in files}
    pairs: List[Tuple[str, str]] = []
    if has["onnx"]:
        pairs.append(("onnxruntime", "fp32"))
    if has["int8"]:
        pairs.append(("onnxruntime", "int8"))
    try:
        from export.openvino_runtime import cpu_supports_bf16, openvino_core

        core = openvino_core()
        if has["onnx"]:
            pairs.append(("openvino", "fp32"))
            if cpu_supports_bf16(core):
                pairs.append(("openvino", "bf16"))
        if has["int8"]:
            pairs.append(("openvino", "int8"))
    except ExportError:
        pass  # openvino not installed: its pairs are not available here
    for engine, kind in (("torchscript", "torchscript"), ("exported", "exported")):
        if artifact_name("out", kind) in files:
            pairs.append((engine, "fp32"))
    programs = manifest.get("programs") or {}
    if any(i["format"] == "aoti" and i["mode"] == "out" and i["batch"] is None for i in programs.values()):
        pairs.append(("aoti", "fp32"))
    return pairs


def logits_of(directory: Path, engine: str, precision: str, x: np.ndarray, batch: int = 64) -> np.ndarray:
    from export.runtime import load

    net = load(directory, engine=engine, precision=precision)
    return np.concatenate([np.asarray(net(x[i:i + batch], returnt="out")) for i in range(0, len(x), batch)])


def measure_accuracy(directory: Path, x: np.ndarray, y: np.ndarray,
                     pairs: Optional[Sequence[Tuple[str, str]]] = None, log=None) -> Dict[str, Any]:
    """Top-1 of each pair on (x, y), its top-1 agreement with and max |logit difference| from
    the reference (onnxruntime fp32, else the first fp32 pair)."""
    pairs = list(pairs or available_pairs(directory))
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
    from export.transaction import DirectoryTransaction

    with DirectoryTransaction(Path(directory), keep_existing=True) as tx:
        manifest = read_manifest(tx.staging)
        manifest["accuracy"] = report
        write_manifest(tx.staging, manifest)
        tx.commit()


def run_accuracy(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m export accuracy", description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="an export directory")
    parser.add_argument("--data", type=Path, required=True,
                        help="inputs: [N, C, H, W] .npy/.pt, or an image folder DIR/<class>/<image> "
                             "(its class indices are the labels)")
    parser.add_argument("--labels", type=Path, help="[N] integer labels (.npy/.pt); not for an image folder")
    parser.add_argument("--mean", help="normalisation of image-folder inputs (default: the manifest's)")
    parser.add_argument("--std", help="see --mean")
    parser.add_argument("--limit", type=int, help="use at most this many inputs")
    parser.add_argument("--no-record", dest="record", action="store_false",
                        help="do not write the results into the manifest")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    from export.datasets import load_inputs, load_labels

    manifest = read_manifest(args.directory)
    if args.limit is not None and args.limit < 1:
        raise ExportError(f"--limit {args.limit}: must be at least 1")
    x, folder_labels, source = load_inputs(args.data, manifest, args.mean, args.std)
    if folder_labels is not None and args.labels is not None:
        raise ExportError(f"--labels {args.labels}: an image folder's labels are its class folders; "
                          "drop --labels")
    if folder_labels is None and args.labels is None:
        raise ExportError(f"--data {args.data} is a tensor file: give --labels (one integer per input)")
    y = folder_labels if folder_labels is not None else load_labels(args.labels, len(x))
    x, y = x[:args.limit], y[:args.limit]
    report = measure_accuracy(args.directory, x, y, log=lambda m: print(m, file=sys.stderr))
    report["data"] = source
    print(format_accuracy(report))
    if args.record:
        record_accuracy(args.directory, report)
    if args.json:
        import json

        from export.atomic import atomic_write_bytes

        atomic_write_bytes(args.json, (json.dumps(report, indent=2) + "\n").encode())
    return 0
