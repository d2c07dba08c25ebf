"""The zoo table (`python -m export zoo-table`, `make zoo-table`): every registered backbone
measured at its default input size, written as `docs/zoo.md` and a CSV (as timm publishes its
results CSVs).

Static columns come from the registry (name, arguments, default input, parameter count, the
formats it is exported to); measured ones from one export of random weights (GMACs counted by
torch.utils.flop_counter, max |exported - eager| per format from the export's own
verification, export seconds, onnxruntime latency of 'out' at batch 1 and 64). Rows keep the
CPU that measured them; a run limited to some names (`--names 'timm-*'`) replaces those rows and
keeps the others.
"""

import csv
import io
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from export.formats import DEFAULT_FORMATS
from export.pipeline.build import export_backbone, formats_for
from export.store.atomic import atomic_write_bytes
from zoo.registry import REGISTRY, BackboneEntry

#: the CSV's columns, in order: the first five are static (the registry's), the rest measured
COLUMNS = ("backbone", "arguments", "input", "params", "formats", "gmacs", "max_err_torchscript", "max_err_onnx",
           "max_err_exported", "export_s", "ort_bs1_ms", "ort_bs64_ms", "measured_on", "date")
STATIC = COLUMNS[:5]
LATENCY_BATCHES = (1, 64)


def entry_kwargs(entry: BackboneEntry) -> Dict[str, Any]:
    """The arguments a row is measured with: defaults, and the registry's examples for the
    required ones (what `--all` and `python -m zoo list` use)."""
    kwargs = {a.name: a.default for a in entry.args if not a.required}
    kwargs.update(entry.example)
    return kwargs


def arguments_text(entry: BackboneEntry) -> str:
    """`num_classes=10, depth (required: 18)`: every argument, the example for required ones."""
    parts = []
    for a in entry.args:
        if a.required:
            parts.append(f"{a.name} (required, e.g. {entry.example.get(a.name, '?')})")
        else:
            parts.append(f"{a.name}={a.default!r}")
    return ", ".join(parts)


def build(entry: BackboneEntry, device: str = "cpu", seed: int = 0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pretrained variants without a weights file
        torch.manual_seed(seed)
        if device == "meta":
            with torch.device("meta"):
                return REGISTRY.build(entry.name, **entry_kwargs(entry))
        return REGISTRY.build(entry.name, **entry_kwargs(entry))


def static_row(name: str) -> Dict[str, str]:
    """What the registry says of `name` (built on the meta device: no weights allocated)."""
    entry = REGISTRY.entry(name)
    net = build(entry, "meta")
    shape = "x".join(map(str, net.input_shape)) + (" (H,W free)" if net.dynamic_hw else "")
    return {"backbone": entry.name, "arguments": arguments_text(entry), "input": shape,
            "params": str(net.num_params()), "formats": ",".join(formats_for(net))}


def gmacs(net: torch.nn.Module, shape: Sequence[int]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(torch.zeros(1, *shape))
    return counter.get_total_flops() / 2 / 1e9


def ort_latency_ms(directory: Path, shape: Sequence[int], batch: int, seconds: float = 1.0) -> float:
    """Median latency of 'out' in onnxruntime over at least `seconds` (and 3 calls), after one
    warm-up call and a pause for the export's torch threads to stop spinning (right after an
    export they take a core for a while: the same model measured 7.8 and 16.3 ms)."""
    from export.runtime import load
    from export.tools.bench import time_call

    time.sleep(1.0)
    session = load(directory).session("out")
    x = np.random.default_rng(batch).standard_normal((batch, *shape)).astype(np.float32)
    return statistics.median(time_call(lambda: session.run(None, {"x": x}), seconds, warmup=1, min_runs=3)) * 1e3


def measure(name: str, workdir: Path, cpu: str, date: str) -> Dict[str, str]:
    """One row: the static columns and one export's measurements."""
    from zoo.unit_scale import set_unit_scale

    row = static_row(name)
    entry = REGISTRY.entry(name)
    net = build(entry)
    shape = tuple(net.input_shape)
    set_unit_scale(net, shape)
    net.eval()
    row["gmacs"] = f"{gmacs(net, shape):.3g}"
    start = time.perf_counter()
    result = export_backbone(net, workdir / name)
    row["export_s"] = f"{time.perf_counter() - start:.1f}"
    if not result.ok:
        raise RuntimeError(f"{name}: the export failed verification: {'; '.join(result.failures)}")
    for fmt in DEFAULT_FORMATS:
        stats = result.manifest.verification.get(fmt)
        worst = max((s["max_abs"] for outs in (stats or {}).values() for s in outs.values()), default=None)
        row[f"max_err_{fmt}"] = "-" if worst is None else f"{worst:.1e}"
    for batch in LATENCY_BATCHES:
        row[f"ort_bs{batch}_ms"] = f"{ort_latency_ms(result.directory, shape, batch):.2f}"
    row.update(measured_on=cpu, date=date)
    return row


def read_csv(path: Path) -> Dict[str, Dict[str, str]]:
    """backbone -> row of an existing table (none if there is no file)."""
    if not path.is_file():
        return {}
    with path.open(newline="") as f:
        return {row["backbone"]: row for row in csv.DictReader(f)}


def csv_text(rows: List[Dict[str, str]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in COLUMNS})
    return out.getvalue()


def markdown(rows: List[Dict[str, str]], csv_name: str) -> str:
    """docs/zoo.md: the machines first, then one row per backbone."""
    machines = sorted({r["measured_on"] for r in rows if r.get("measured_on")})
    lines = ["# The zoo, measured", "",
             f"Generated by `python -m export zoo-table` (`make zoo-table`); do not edit by hand. The same "
             f"rows as CSV: [{csv_name}]({csv_name}). Every backbone at its default input size with random "
             "weights (the registry's example arguments for required ones), exported to the formats it has "
             "(every returnt mode) and verified; latency is onnxruntime fp32 on 'out', the median over at "
             "least 1 s (and 3 calls) on all cores.", "",
             "Measured on: " + "; ".join(f"{m}" for m in machines) + ".", "",
             "| backbone | arguments | input | params | GMACs | formats | max err ts / onnx / ep | export s "
             "| ORT bs1 ms | ORT bs64 ms |",
             "|---|---|---|---:|---:|---|---|---:|---:|---:|"]
    for r in rows:
        errs = " / ".join(r.get(f"max_err_{f}", "-") or "-" for f in DEFAULT_FORMATS)
        lines.append(f"| `{r['backbone']}` | {r['arguments']} | {r['input']} | {int(r['params']):,} | "
                     f"{r.get('gmacs', '-')} | {r['formats']} | {errs} | {r.get('export_s', '-')} | "
                     f"{r.get('ort_bs1_ms', '-')} | {r.get('ort_bs64_ms', '-')} |")
    lines += ["", "Other backbones and the arguments of each: [backbones.md](backbones.md); what the "
              "formats are: [formats.md](formats.md).", ""]
    return "\n".join(lines)


def write_table(names: Sequence[str], md_path: Path, csv_path: Path, cpu: str, date: str,
                log: Callable[[str], None] = lambda line: None, workdir: Optional[Path] = None) -> List[Dict[str, str]]:
    """Measure `names`, merge with the rows of the existing CSV (rows of backbones no longer
    registered are dropped), write both files whole. Returns the rows written."""
    from tqdm import tqdm

    registered = REGISTRY.names()
    rows = {k: v for k, v in read_csv(csv_path).items() if k in registered}
    with tempfile.TemporaryDirectory(prefix="zoo-table-", dir=workdir) as tmp:
        for name in (bar := tqdm(list(names), desc="zoo table", unit="backbone", disable=None)):
            bar.set_postfix_str(name)
            rows[name] = measure(name, Path(tmp), cpu, date)
            log(f"{name}: export {rows[name]['export_s']} s, ORT bs1 {rows[name]['ort_bs1_ms']} ms")
            shutil.rmtree(Path(tmp) / name, ignore_errors=True)  # a full-size export is hundreds of MB
    ordered = [rows[n] for n in registered if n in rows]
    atomic_write_bytes(csv_path, csv_text(ordered).encode())
    atomic_write_bytes(md_path, markdown(ordered, csv_path.name).encode())
    return ordered
