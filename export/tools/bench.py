"""`python -m export bench` (`make bench`): every engine x precision on one backbone.

Eager, TorchScript (frozen), onnxruntime fp32/int8, OpenVINO fp32/bf16/int8, ExecuTorch
(XNNPACK fp32/int8) and AOTInductor (any-batch and per-batch packages) at batch sizes 1, 8, 64
(default CIFAR ResNet-18, 64 filters): latency, images/s, ratio to onnxruntime fp32, GFLOP/s (FLOPs counted by
torch.utils.flop_counter) and the share of this machine's fp32 peak (the best large matmul in
torch and in onnxruntime, measured in the same run). Each runtime is timed in blocks over
several interleaved rounds (a runtime's threads still spinning distort the next one, and the
machine's speed drifts), reported as the median over rounds with the spread between them.
Then the accuracy of every engine x precision on the same backbone trained briefly on
scikit-learn's digits (shipped with the package, no download), int8 calibrated on its real
training images. Writes JSON and a PNG plot when asked.
"""

import datetime
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

import numpy as np
import torch

from export.errors import ExportError
from export.formats.onnx import ort_session
from export.formats.torchscript import jit_deprecations_silenced, load_torchscript
from export.pipeline.build import export_backbone
from export.runtime import available_pairs, load
from export.runtime.cpu import cpu_info, cpu_name
from export.runtime.openvino_engine import openvino_core
from export.store.atomic import atomic_write_bytes
from export.store.manifest import artifact_name, read_manifest
from export.tools.accuracy import format_accuracy, measure_accuracy
from export.tools.quantize import builtin_calibration, quantize_directory
from export.tools.tables import format_table
from zoo.registry import REGISTRY


def flops_per_image(net: torch.nn.Module, input_shape: Sequence[int]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(torch.zeros(1, *input_shape))
    return float(counter.get_total_flops())


def time_call(fn: Callable[[], Any], seconds: float, warmup: int = 3, min_runs: int = 5,
              max_runs: int = 1000) -> List[float]:
    for _ in range(warmup):
        fn()
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < seconds and len(times) < max_runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def matmul_peak(threads: int, sizes: Sequence[int] = (1024, 2048), seconds: float = 0.5) -> Dict[str, float]:
    """Best GFLOP/s of square fp32 matmuls in torch and in onnxruntime (best over `sizes`), each
    timed for `seconds` after one warm-up call, at least twice (a 2048 matmul takes ~0.17 s on one
    Zen 4 thread: a short bench stays short)."""
    best = {"torch_gflops": 0.0, "onnxruntime_gflops": 0.0}
    for n in sizes:
        for key, value in _matmul_gflops(threads, n, seconds).items():
            best[key] = max(best[key], value)
    return best


def _matmul_gflops(threads: int, n: int, seconds: float) -> Dict[str, float]:
    import onnx
    from onnx import TensorProto, helper

    flops = 2.0 * n ** 3
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    ta = torch.from_numpy(a)
    torch_best = min(time_call(lambda: torch.mm(ta, ta), seconds, warmup=1, min_runs=2))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "mm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mm.onnx"
        onnx.save(model, str(path))
        session = ort_session(path, threads=threads)
        ort_best = min(time_call(lambda: session.run(None, {"a": a, "b": a}), seconds, warmup=1, min_runs=2))
    return {"torch_gflops": flops / torch_best / 1e9, "onnxruntime_gflops": flops / ort_best / 1e9}


def digits_data(input_shape: Sequence[int]):
    """scikit-learn's 8x8 digits at the backbone's input size, normalised; a stratified
    3:1 train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    c, h, w = input_shape
    images = torch.nn.functional.interpolate(images, size=(h, w), mode="bilinear",
                                             align_corners=False).repeat(1, c, 1, 1)
    images = (images - images.mean()) / images.std()
    labels = torch.tensor(digits.target)
    return train_test_split(images, labels, test_size=0.25, random_state=0, stratify=labels)


#: the digits model's training: epochs, batch size and peak learning rate (one-cycle schedule),
#: seeded, so every machine trains the same model (measured: 32%, 86%, 98.9% top-1 after
#: epochs 1, 2, 3 on an AVX2 EPYC)
DIGITS_EPOCHS = 3
DIGITS_BATCH = 64
DIGITS_LR = 3e-3


def train_digits(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, log) -> float:
    """`epochs` seeded epochs of Adam with a one-cycle learning rate: the same model on every
    machine, converged, whatever its speed. Returns the seconds it took."""
    torch.manual_seed(0)
    order = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), lr=DIGITS_LR)
    steps_per_epoch = (len(x) + DIGITS_BATCH - 1) // DIGITS_BATCH
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=DIGITS_LR, total_steps=epochs * steps_per_epoch)
    net.train()
    start = time.perf_counter()
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=order)
        for i in range(0, len(perm), DIGITS_BATCH):
            idx = perm[i:i + DIGITS_BATCH]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
            schedule.step()
        log(f"digits: epoch {epoch + 1}/{epochs} done ({time.perf_counter() - start:.0f} s)")
    net.eval()
    return time.perf_counter() - start


def digits_accuracy(backbone: str, kwargs: Dict[str, Any], input_shape: Sequence[int],
                    workdir: Path, epochs: int, log) -> Dict[str, Any]:
    """Train `backbone` for `epochs` seeded epochs on digits, export it, quantize it on its real
    training images, then top-1 of every engine x precision on the held-out split
    (export.tools.accuracy), with the bounds each precision is held to."""
    x_tr, x_te, y_tr, y_te = digits_data(input_shape)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        net = REGISTRY.build(backbone, **kwargs)
    trained = train_digits(net, x_tr, y_tr, epochs, log)
    log(f"digits: trained {epochs} epoch(s) in {trained:.0f} s; exporting and quantizing ...")
    result = export_backbone(net, workdir / "digits", modes=["out"], formats=["torchscript", "onnx"],
                             input_shape=tuple(input_shape))
    quantize_directory(result.directory, x_tr.numpy(), ["out"], samples=256)
    report = measure_accuracy(result.directory, x_te.numpy(), y_te.numpy(), log=log)
    report.update({"train_seconds": round(trained, 1), "epochs": epochs, "seeded": True,
                   "calibration": "256 digits training images"})
    return report


#: the bench's frozen AOTInductor packages (--aoti-weights frozen), beside its main export
FROZEN_DIR = "bench-aoti-frozen"


def build_runtimes(net: torch.nn.Module, directory: Path, shape: Sequence[int], threads: int,
                   log) -> Dict[str, Callable[[np.ndarray, torch.Tensor], Any]]:
    """Every runtime of the exported 'out' mode as `f(numpy_input, torch_input)`: eager, frozen
    TorchScript, onnxruntime fp32/int8, OpenVINO fp32/bf16/int8 where installed (bf16 where the
    CPU has it), the AOTInductor packages where built (any batch; one per batch size). int8 is
    calibrated on random inputs here: this model has random weights, and only speed is timed."""
    calibration = builtin_calibration(shape, 32)
    quantize_directory(directory, calibration, ["out"])
    with jit_deprecations_silenced():  # still what TorchScript users run
        frozen = torch.jit.freeze(load_torchscript(directory / artifact_name("out", "torchscript")).eval())
    runtimes: Dict[str, Callable[[np.ndarray, torch.Tensor], Any]] = {
        "eager": lambda a, t: net(t),
        "torchscript-frozen": lambda a, t: frozen(t),
    }
    pairs = available_pairs(read_manifest(directory), "out")
    for engine, precision in pairs:
        if engine not in ("onnxruntime", "openvino"):
            continue
        session = load(directory, engine=engine, precision=precision, threads=threads).session("out")
        name = f"{'ort' if engine == 'onnxruntime' else engine}-{precision}"
        if engine == "onnxruntime":
            runtimes[name] = lambda a, t, s=session: s.run(None, {"x": a})
        else:
            runtimes[name] = lambda a, t, s=session: s({"x": a})
    if not any(e == "openvino" for e, _ in pairs):
        try:
            openvino_core()
        except ExportError as exc:
            log(f"{exc}: its rows are skipped")
    runtimes.update(_aoti_runtimes(directory))
    if (directory.parent / FROZEN_DIR).is_dir():
        runtimes.update(_aoti_runtimes(directory.parent / FROZEN_DIR, "aoti-frozen"))
    runtimes.update(_executorch_runtimes(net, directory, shape, calibration, log))
    return runtimes


def _executorch_runtimes(net: torch.nn.Module, directory: Path, shape: Sequence[int], calibration: np.ndarray,
                         log) -> Dict[str, Callable[[np.ndarray, torch.Tensor], Any]]:
    """'executorch-fp32' (the export's out.pte, through the executorch engine) and
    'executorch-int8' (the same program quantized for XNNPACK with the calibration inputs the
    onnxruntime and OpenVINO int8 rows use, lowered here)."""
    manifest = read_manifest(directory)
    if artifact_name("out", "pte") not in manifest.files:
        return {}
    from export.formats.pte import LoadedProgram, lower_int8
    from export.pipeline.trace import export_program

    fp32 = load(directory, engine="executorch").method("out")
    max_batch = manifest.programs[artifact_name("out", "pte")].max_batch or 1
    log(f"quantizing and lowering the ExecuTorch int8 program (batch up to {max_batch}) ...")
    program = export_program(net, "out", tuple(shape), "cpu", max_batch=max_batch, fixed_hw=True)
    data, _ = lower_int8(program, torch.from_numpy(calibration), max_batch)
    from executorch.runtime import Runtime

    int8 = LoadedProgram(data, Runtime.get().load_program(data))
    return {"executorch-fp32": lambda a, t: fp32.execute([t]),
            "executorch-int8": lambda a, t: int8.execute([t])}


def _aoti_runtimes(directory: Path, label: str = "aoti") -> Dict[str, Callable[[np.ndarray, torch.Tensor], Any]]:
    """'<label>' (the any-batch package) and '<label>-per-batch' (the package compiled for each
    batch size), through the aoti engine."""
    batches = set(read_manifest(directory).aoti_packages("out"))
    if not batches:
        return {}
    engine = load(directory, engine="aoti")
    found: Dict[str, Callable[[np.ndarray, torch.Tensor], Any]] = {}
    if None in batches:
        dynamic = engine.package_for("out", None)
        found[label] = lambda a, t: dynamic(t)
    if batches - {None}:
        found[f"{label}-per-batch"] = lambda a, t: engine.package_for("out", t.shape[0])(t)
    return found


def measure(runtimes: Dict[str, Callable[[np.ndarray, torch.Tensor], Any]], shape: Sequence[int],
            batches: Sequence[int], seconds: float, flops: float, best_peak: float,
            rounds: int = 5) -> List[Dict[str, Any]]:
    """Latency of every runtime at every batch size: `rounds` rounds, each timing every runtime
    in one block of seconds/rounds (order rotated per round); median over the rounds' medians,
    spread = (slowest - fastest round) / median."""
    from tqdm import tqdm

    names = list(runtimes)
    inputs = {b: np.random.default_rng(b).standard_normal((b, *shape)).astype(np.float32) for b in batches}
    per_round: Dict[tuple, List[float]] = {(n, b): [] for n in names for b in batches}
    all_times: Dict[tuple, List[float]] = {(n, b): [] for n in names for b in batches}
    jobs = [(r, b, i) for r in range(rounds) for b in batches for i in range(len(names))]
    for r, batch, i in (bar := tqdm(jobs, desc="bench", file=sys.stderr, disable=None)):
        name = names[(i + r) % len(names)]
        bar.set_postfix_str(f"round {r + 1}/{rounds} {name} batch {batch}")
        x = inputs[batch]
        xt = torch.from_numpy(x)
        with torch.no_grad():
            times = time_call(lambda fn=runtimes[name], a=x, t=xt: fn(a, t), seconds / rounds,
                              warmup=3 if r == 0 else 1, min_runs=3)
        per_round[name, batch].append(statistics.median(times))
        all_times[name, batch].extend(times)
    rows: List[Dict[str, Any]] = []
    for batch in batches:
        for name in names:
            medians = per_round[name, batch]
            median = statistics.median(medians)
            gflops = flops * batch / median / 1e9
            rows.append({"runtime": name, "batch": batch, "runs": len(all_times[name, batch]),
                         "rounds": rounds, "round_medians_ms": [m * 1e3 for m in medians], "median_ms": median * 1e3,
                         "spread": (max(medians) - min(medians)) / median,
                         "p90_ms": float(np.percentile(all_times[name, batch], 90)) * 1e3,
                         "images_per_s": batch / median, "gflops": gflops,
                         "peak_percent": 100 * gflops / best_peak})
    return rows


def plot(report: Dict[str, Any], path: Path) -> None:
    """images/s per runtime and batch size, one group of bars per batch size (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    batches = sorted({r["batch"] for r in rows})
    names = list(dict.fromkeys(r["runtime"] for r in rows))
    by_key = {(r["runtime"], r["batch"]): r for r in rows}
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=100)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(batches))]
        ax.bar(xs, [by_key[name, b]["images_per_s"] for b in batches], width, label=name)
    ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    ax.set_yscale("log")
    ax.set_ylabel("images / s (median over rounds)")
    ax.set_title(f"{report['backbone']} {report['args']}\n{stamp_line(report['stamp'])}", fontsize=8, wrap=True)
    ax.legend(ncol=3, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    data = __import__("io").BytesIO()
    fig.savefig(data, format="png", metadata={"Software": None})
    plt.close(fig)
    atomic_write_bytes(path, data.getvalue())


def runtime_versions() -> Dict[str, str]:
    """torch, onnxruntime, OpenVINO and ExecuTorch as installed ('-' where not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "onnxruntime", "openvino", "executorch"):
        try:
            found[name] = torch.__version__ if name == "torch" else version(name)
        except PackageNotFoundError:
            found[name] = "-"
    return found


def stamp() -> Dict[str, Any]:
    """Where and when figures come from: the CPU, its flags and cores, the runtimes' versions,
    the date, the commit (with '+changes' when the tree differs from it)."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=here, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=here, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    import os

    return {"cpu": cpu_info(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "versions": runtime_versions(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
            "commit": (commit or "unknown") + ("+changes" if commit and dirty else "")}


def stamp_line(st: Dict[str, Any]) -> str:
    """The stamp as one line, above every table and in the plot's title."""
    cpu = st["cpu"]
    versions = ", ".join(f"{k} {v}" for k, v in st["versions"].items())
    return (f"{cpu['model']} ({', '.join(cpu['flags']) or 'no AVX2'}), {st['cores']} cores, {st['threads']} "
            f"threads; {versions}; {st['date']}, commit {st['commit']}")


def _check_export(result) -> None:
    """Only verified files are timed: an export that failed verification stops the bench."""
    if not result.ok:
        raise ExportError(f"the bench's export failed verification: {'; '.join(result.failures)}")


def run_benchmark(backbone: str, kwargs: Dict[str, Any], batches: Sequence[int], threads: int, seconds: float,
                  rounds: int, epochs: int, aoti: bool, log: Callable[[str], None],
                  pte: bool = True) -> Dict[str, Any]:
    """Build, export, measure every runtime, check accuracy on digits; the report."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        net = REGISTRY.build(backbone, **kwargs).eval()
    shape = tuple(net.input_shape)
    flops = flops_per_image(net, shape)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        log(f"exporting {backbone} {kwargs} ...")
        formats = ["torchscript", "onnx", "exported"] + (["pte"] if pte else []) + (["aoti"] if aoti else [])
        if aoti:
            log(f"compiling AOTInductor packages (any batch, and batch {', '.join(map(str, batches))}) ...")
        result = export_backbone(net, tmp / "bench", modes=["out"], formats=formats,
                                 aoti_batches=[None, *batches], pte_max_batch=max(batches))
        _check_export(result)
        compile_seconds = {name: info.seconds for name, info in result.manifest.programs.items()
                           if info.format == "aoti"}
        if aoti:
            # per batch size only: a frozen any-batch package measured 2.2x slower than a frozen
            # batch-1 one (oneDNN's plans for a dynamic batch), the kind users would not pick
            log("compiling frozen AOTInductor packages (--aoti-weights frozen, one per batch size) ...")
            frozen = export_backbone(net, tmp / FROZEN_DIR, modes=["out"], formats=["aoti"],
                                     aoti_batches=list(batches), aoti_weights="frozen")
            _check_export(frozen)
            compile_seconds.update({f"frozen {name}": info.seconds for name, info in frozen.manifest.programs.items()})
        runtimes = build_runtimes(net, result.directory, shape, threads, log)
        log("measuring the fp32 matmul peak ...")
        peak = matmul_peak(threads, seconds=min(0.5, seconds / 6))  # 2 s of the default bench's 3
        rows = measure(runtimes, shape, batches, seconds, flops, max(peak.values()), rounds)
        refusal = bf16_refusal(result.directory)
        accuracy = None
        if epochs > 0:
            accuracy = digits_accuracy(backbone, kwargs, shape, tmp, epochs, log)
        publishing = publish_cost(net, tmp, log)
    report = {"backbone": backbone, "args": kwargs, "input_shape": list(shape), "cpu": cpu_name(),
              "stamp": stamp(), "threads": threads, "flops_per_image": flops, "matmul_peak_gflops": peak,
              "results": rows, "accuracy_digits": accuracy, "aoti_compile_seconds": compile_seconds,
              "publish": publishing, "bf16_refusal": refusal, "versions": result.manifest.versions}
    report["targets"] = check_targets(report)
    return report


def bench_directory(directory: Path, batches: Sequence[int], threads: int, seconds: float, rounds: int,
                    log: Callable[[str], None]) -> Dict[str, Any]:
    """Every engine x precision that can run `directory`'s 'out' mode here, loaded as users load
    it (`export.runtime.load`), timed like the full bench; the fastest per precision."""
    torch.set_num_threads(threads)
    manifest = read_manifest(directory)
    shape = tuple(manifest.input.shape[1:])
    pairs = available_pairs(manifest, "out")
    if not pairs:
        raise ExportError(f"{directory}: no engine can run its 'out' mode here (export it with --modes out)")
    runtimes: Dict[str, Callable[[np.ndarray, torch.Tensor], Any]] = {}
    for engine, precision in pairs:
        net = load(directory, engine=engine, precision=precision, threads=threads)
        runtimes[f"{engine}-{precision}"] = lambda a, t, n=net: n(a)
        log(f"loaded {engine} {precision}")
    limit = manifest.programs.get(artifact_name("out", "pte"))
    if limit is not None and limit.max_batch and max(batches) > limit.max_batch:
        runtimes.pop("executorch-fp32", None)  # a .pte takes batches up to its planned bound only
        log(f"executorch: skipped (out.pte takes batches up to {limit.max_batch})")
    rows = measure(runtimes, shape, batches, seconds, 0.0, 1.0, rounds)
    report = {"directory": str(directory), "backbone": manifest.backbone.name, "args": manifest.backbone.args,
              "input_shape": list(shape), "cpu": cpu_name(), "stamp": stamp(), "threads": threads, "results": rows}
    report["fastest"] = fastest_per_precision(rows)
    return report


def fastest_per_precision(rows: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """precision -> the runtime ('engine-precision') with the best geometric-mean speed over the
    batch sizes, relative to onnxruntime at that precision where it ran, else to the slowest."""
    by_key = {(r["runtime"], r["batch"]): r["median_ms"] for r in rows}
    batches = sorted({r["batch"] for r in rows})
    names = list(dict.fromkeys(r["runtime"] for r in rows))
    found: Dict[str, Dict[str, Any]] = {}
    for precision in dict.fromkeys(n.rsplit("-", 1)[1] for n in names):
        group = [n for n in names if n.endswith(f"-{precision}")]
        reference = f"onnxruntime-{precision}" if f"onnxruntime-{precision}" in group else None

        base = {b: by_key[reference, b] if reference else max(by_key[g, b] for g in group) for b in batches}
        speed = {n: float(np.exp(np.mean([np.log(base[b] / by_key[n, b]) for b in batches]))) for n in group}
        best = max(group, key=speed.__getitem__)
        found[precision] = {"engine": best.rsplit("-", 1)[0], "speedup": round(speed[best], 3),
                            "reference": (reference or "the slowest").replace(f"-{precision}", ""),
                            "batches": batches,
                            "median_ms": {b: round(by_key[best, b], 3) for b in batches}}
    return found


def save_engine_choice(directory: Path, report: Dict[str, Any]) -> None:
    """Record the fastest engine per precision for this CPU in the manifest (no file changes),
    atomically: what load(DIR, engine="auto") uses."""
    from export.store.transaction import manifest_update

    st = report["stamp"]
    with manifest_update(Path(directory)) as (_, manifest):
        manifest.engine_choice[report["cpu"]] = {
            precision: {**choice, "date": st["date"], "commit": st["commit"], "threads": report["threads"]}
            for precision, choice in report["fastest"].items()}


def format_directory_report(report: Dict[str, Any]) -> str:
    lines = [f"measured on {stamp_line(report['stamp'])}",
             f"{report['directory']} ({report['backbone']} {report['args']}), 'out' mode, loaded with "
             "export.runtime.load"]
    rows = report["results"]
    by_key = {(r["runtime"], r["batch"]): r for r in rows}
    table = []
    for r in rows:
        ref = by_key.get((f"onnxruntime-{r['runtime'].rsplit('-', 1)[1]}", r["batch"]))
        table.append([r["runtime"], r["batch"], f"{r['median_ms']:.2f}", f"{100 * r['spread']:.0f}%",
                      f"{r['images_per_s']:.0f}", f"{ref['median_ms'] / r['median_ms']:.2f}x" if ref else "-"])
    lines.append(format_table(["runtime", "batch", "median ms", "spread", "images/s", "vs onnxruntime"], table))
    for precision, choice in report["fastest"].items():
        lines.append(f"fastest {precision}: {choice['engine']} ({choice['speedup']:.2f}x {choice['reference']}, "
                     f"geometric mean over batch {', '.join(map(str, choice['batches']))})")
    return "\n".join(lines)


def publish_cost(net: torch.nn.Module, tmp: Path, log: Callable[[str], None]) -> Dict[str, Any]:
    """A full export of the default formats (every mode) against publishing two weight versions
    into it (the first in a run pays for loading the torch.export programs, the next reuses
    them): seconds of each and bytes per version."""
    from export.formats import DEFAULT_FORMATS
    from export.pipeline.publish import publish

    log("exporting every mode in the default formats, then publishing two weight versions ...")
    import os

    start = time.perf_counter()
    result = export_backbone(net, tmp / "continual", formats=list(DEFAULT_FORMATS),
                             verify_in="fresh" if (os.cpu_count() or 1) >= 2 else "process")
    export_s = time.perf_counter() - start
    paths = []
    for task in range(2):  # a task's weights: every float parameter and buffer moved
        gen = torch.Generator().manual_seed(task)
        state = {k: v + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                 for k, v in net.state_dict().items()}
        paths.append(tmp / f"task_{task}.pt")
        torch.save(state, paths[-1])
    published = publish(result.directory, paths)
    graphs = sum(e.size for e in result.manifest.files.values())
    return {"formats": list(DEFAULT_FORMATS), "export_s": round(export_s, 2),
            "publish_first_s": round(published[0].seconds, 2), "publish_next_s": round(published[1].seconds, 2),
            "first_vs_export": round(published[0].seconds / export_s, 3),
            "next_vs_export": round(published[1].seconds / export_s, 3),
            "bytes_per_version": published[0].bytes, "export_bytes": graphs,
            "export_breakdown": result.manifest.timing["seconds"]}


#: what each precision is held to, by CPU kind: speed as a multiple of ORT fp32 (at batch 1 and
#: the largest batch), top-1 agreement with ORT fp32 and points of top-1 lost on the digits model
INT8_SPEEDUP = {"vnni": 3.3, "avx2": 2.0}
BF16_SPEEDUP, BF16_AGREEMENT, BF16_POINTS = 1.9, 0.99, 0.5
INT8_POINTS = 1.0


def has_vnni(flags: Sequence[str]) -> bool:
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))


def has_bf16(flags: Sequence[str]) -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


def bf16_refusal(directory: Path) -> str:
    """Why bf16 is not measured here: the engine's own refusal line ('' where it runs)."""
    try:
        load(directory, engine="openvino", precision="bf16")
    except ExportError as exc:
        return str(exc)
    return ""


def check_targets(report: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Each target of this CPU kind against this run: what, target, measured, met (None: not
    measured, with the reason)."""
    flags = report["stamp"]["cpu"]["flags"]
    rows = report["results"]
    batches = sorted({r["batch"] for r in rows})
    edge = [batches[0], batches[-1]] if len(batches) > 1 else batches
    by_key = {(r["runtime"], r["batch"]): r["median_ms"] for r in rows}

    def speedups(runtime: str) -> List[float]:
        return [by_key["ort-fp32", b] / by_key[runtime, b] for b in edge
                if (runtime, b) in by_key and ("ort-fp32", b) in by_key]

    acc = {(r["engine"], r["precision"]): r for r in (report.get("accuracy_digits") or {}).get("results", [])}
    ref = acc.get(("onnxruntime", "fp32"))
    found: List[Dict[str, Any]] = []
    kind = "vnni" if has_vnni(flags) else "avx2"
    int8 = {name: speedups(name) for name in ("ort-int8", "openvino-int8") if speedups(name)}
    if int8:
        best = max(int8, key=lambda n: min(int8[n]))
        found.append({"what": f"int8 speed ({'VNNI' if kind == 'vnni' else 'AVX2 without VNNI'}), best engine "
                              f"{best}, batch {' and '.join(map(str, edge))}",
                      "target": f">= {INT8_SPEEDUP[kind]}x ORT fp32",
                      "measured": " / ".join(f"{v:.2f}x" for v in int8[best]),
                      "met": min(int8[best]) >= INT8_SPEEDUP[kind]})
    for engine in ("onnxruntime", "openvino"):
        row = acc.get((engine, "int8"))
        if row and ref:
            lost = 100 * (ref["top1"] - row["top1"])
            found.append({"what": f"int8 top-1 points lost ({engine})", "target": f"<= {INT8_POINTS:g}",
                          "measured": f"{lost:+.2f}".replace("+-", "-"), "met": lost <= INT8_POINTS})
    if not has_bf16(flags):
        found.append({"what": "bf16 (OpenVINO)", "target": f">= {BF16_SPEEDUP}x, agreement >= {BF16_AGREEMENT:.0%}",
                      "measured": report.get("bf16_refusal") or "this CPU has no bf16", "met": None})
    else:
        bf16 = speedups("openvino-bf16")
        row = acc.get(("openvino", "bf16"))
        if bf16:
            found.append({"what": "bf16 speed (OpenVINO)", "target": f">= {BF16_SPEEDUP}x ORT fp32",
                          "measured": " / ".join(f"{v:.2f}x" for v in bf16), "met": min(bf16) >= BF16_SPEEDUP})
        if row and ref:
            lost = 100 * (ref["top1"] - row["top1"])
            found.append({"what": "bf16 top-1 agreement / points lost",
                          "target": f">= {BF16_AGREEMENT:.0%} / <= {BF16_POINTS}",
                          "measured": f"{row['agreement']:.2%} / {lost:+.2f}",
                          "met": row["agreement"] >= BF16_AGREEMENT and lost <= BF16_POINTS})
    if ref:
        found.append({"what": "fp32 top-1 of the digits model (converged)", "target": ">= 93%",
                      "measured": f"{ref['top1']:.2%}", "met": ref["top1"] >= 0.93})
    return found


def format_report(report: Dict[str, Any]) -> str:
    peak = report["matmul_peak_gflops"]
    st = report["stamp"]
    lines = [f"measured on {stamp_line(st)}",
             f"{report['backbone']} {report['args']} input {report['input_shape']}, "
             f"{report['flops_per_image'] / 1e9:.3f} GFLOP/image, {report['threads']} threads, "
             f"{report['cpu']}; fp32 peak: torch {peak['torch_gflops']:.0f}, onnxruntime "
             f"{peak['onnxruntime_gflops']:.0f} GFLOP/s"]
    rows = []
    by_key = {(r["runtime"], r["batch"]): r for r in report["results"]}
    for r in report["results"]:
        ref = by_key.get(("ort-fp32", r["batch"]))
        rows.append([r["runtime"], r["batch"], f"{r['median_ms']:.2f}", f"{100 * r['spread']:.0f}%",
                     f"{r['p90_ms']:.2f}", f"{r['images_per_s']:.0f}", f"{r['gflops']:.0f}",
                     f"{r['peak_percent']:.0f}%",
                     f"{ref['median_ms'] / r['median_ms']:.2f}x" if ref else "-"])
    lines.append(format_table(["runtime", "batch", "median ms", "spread", "p90 ms", "images/s", "GFLOP/s",
                               "of peak", "vs ort-fp32"], rows))
    if report.get("aoti_compile_seconds"):
        lines.append("AOTInductor compile seconds: " + ", ".join(
            f"{k} {v:.1f}" for k, v in sorted(report["aoti_compile_seconds"].items())))
    pub = report.get("publish")
    if pub:
        lines.append(f"continual deployment ({', '.join(pub['formats'])}, every mode): full export "
                     f"{pub['export_s']:.1f} s; "
                     f"publishing a weight version {pub['publish_first_s']:.1f} s ({100 * pub['first_vs_export']:.0f}% "
                     f"of the export; the next in the same run {pub['publish_next_s']:.1f} s, "
                     f"{100 * pub['next_vs_export']:.0f}%), {pub['bytes_per_version'] / 1e6:.1f} MB per version "
                     f"against {pub['export_bytes'] / 1e6:.0f} MB of export files")
    acc = report.get("accuracy_digits")
    if acc:
        lines.append(f"accuracy on a trained model (sklearn digits, {acc['samples']} test images, "
                     f"{acc['epochs']} seeded epoch(s) in {acc['train_seconds']:.0f} s, int8 calibrated on "
                     f"{acc['calibration']}):")
        lines.append(format_accuracy(acc))
    if report.get("targets"):
        lines.append("targets on this CPU kind:")
        lines.append(format_table(["target", "bound", "measured", "met"], [
            [t["what"], t["target"], t["measured"], {True: "yes", False: "MISSED", None: "not measured"}[t["met"]]]
            for t in report["targets"]]))
    return "\n".join(lines)
