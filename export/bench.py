"""`python -m export bench` (`make bench`): eager vs TorchScript vs onnxruntime fp32/int8 vs
AOTInductor.

For one backbone (default CIFAR ResNet-18, 64 filters) at batch sizes 1, 8, 64: median and p90
latency, images/s, GFLOP/s (FLOPs counted by torch.utils.flop_counter) and the share of this
machine's fp32 peak (the best large matmul in torch and in onnxruntime, measured in the same
run). Then accuracy of int8 against fp32 on a model trained for a few seconds on scikit-learn's
digits (shipped with the package, no download).
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

import numpy as np
import torch

from export.atomic import atomic_write_bytes
from export.core import export_backbone
from export.manifest import artifact_name
from export.quantize import builtin_calibration, quantize_model
from export.tables import format_table
from export.torchscript_export import jit_deprecations_silenced, load_torchscript
from export.verify import ort_session
from zoo.registry import REGISTRY, get_entry


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
    """Best GFLOP/s of square fp32 matmuls in torch and in onnxruntime (best over `sizes`)."""
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
    torch_best = min(time_call(lambda: torch.mm(ta, ta), seconds))
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
        ort_best = min(time_call(lambda: session.run(None, {"a": a, "b": a}), seconds))
    return {"torch_gflops": flops / torch_best / 1e9, "onnxruntime_gflops": flops / ort_best / 1e9}


def digits_accuracy(backbone: str, kwargs: Dict[str, Any], input_shape: Sequence[int],
                    workdir: Path, train_seconds: float, log) -> Dict[str, Any]:
    """Train briefly on sklearn's digits, then compare fp32 and int8 ONNX on the held-out split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    c, h, w = input_shape
    images = torch.nn.functional.interpolate(images, size=(h, w), mode="bilinear",
                                             align_corners=False).repeat(1, c, 1, 1)
    images = (images - images.mean()) / images.std()
    labels = torch.tensor(digits.target)
    x_tr, x_te, y_tr, y_te = train_test_split(images, labels, test_size=0.25, random_state=0,
                                              stratify=labels)
    torch.manual_seed(0)
    net = REGISTRY.build(backbone, **kwargs)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    start, epochs = time.perf_counter(), 0
    while time.perf_counter() - start < train_seconds:
        perm = torch.randperm(len(x_tr))
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x_tr[idx]), y_tr[idx]).backward()
            opt.step()
        epochs += 1
    net.eval()
    result = export_backbone(net, workdir / "digits", modes=["out"], formats=["onnx"],
                             input_shape=tuple(input_shape))
    fp32_path = result.directory / artifact_name("out", "onnx")
    int8_path = result.directory / artifact_name("out", "int8")
    quantize_model(fp32_path, int8_path, x_tr[:256].numpy())
    fp32 = ort_session(fp32_path).run(None, {"x": x_te.numpy()})[0]
    int8 = ort_session(int8_path).run(None, {"x": x_te.numpy()})[0]
    y = y_te.numpy()
    out = {"train_seconds": round(time.perf_counter() - start, 1), "epochs": epochs,
           "test_samples": int(len(y)),
           "fp32_accuracy": float((fp32.argmax(1) == y).mean()),
           "int8_accuracy": float((int8.argmax(1) == y).mean()),
           "top1_agreement": float((fp32.argmax(1) == int8.argmax(1)).mean()),
           "max_logit_error": float(np.abs(fp32 - int8).max())}
    log(f"digits: fp32 {out['fp32_accuracy']:.3f}, int8 {out['int8_accuracy']:.3f}, "
        f"agreement {out['top1_agreement']:.3f} after {epochs} epochs")
    return out


def build_runtimes(net: torch.nn.Module, directory: Path, shape: Sequence[int], threads: int,
                   log) -> Dict[str, Callable[[np.ndarray, torch.Tensor], Any]]:
    """Every runtime of the exported 'out' mode as `f(numpy_input, torch_input)`: eager, frozen
    TorchScript, ORT fp32, ORT int8 (quantized here), the AOTInductor packages where built
    (any batch; one per batch size) and OpenVINO where installed."""
    onnx_path = directory / artifact_name("out", "onnx")
    int8_path = directory / artifact_name("out", "int8")
    quantize_model(onnx_path, int8_path, builtin_calibration(shape, 32))
    with jit_deprecations_silenced():  # still what TorchScript users run
        frozen = torch.jit.freeze(load_torchscript(directory / artifact_name("out", "torchscript")).eval())
    fp32_session = ort_session(onnx_path, threads=threads)
    int8_session = ort_session(int8_path, threads=threads)
    runtimes: Dict[str, Callable[[np.ndarray, torch.Tensor], Any]] = {
        "eager": lambda a, t: net(t),
        "torchscript-frozen": lambda a, t: frozen(t),
        "ort-fp32": lambda a, t: fp32_session.run(None, {"x": a}),
        "ort-int8": lambda a, t: int8_session.run(None, {"x": a}),
    }
    aoti = _aoti_runtimes(directory)
    runtimes.update(aoti)
    try:
        import openvino as ov

        compiled = ov.Core().compile_model(str(onnx_path), "CPU", {"INFERENCE_NUM_THREADS": threads})
        runtimes["openvino-fp32"] = lambda a, t: compiled(a)
    except ImportError:
        log("openvino not installed (pip install '.[openvino]'): skipped")
    return runtimes


def _aoti_runtimes(directory: Path) -> Dict[str, Callable[[np.ndarray, torch.Tensor], Any]]:
    """'aoti' (the any-batch package) and 'aoti-per-batch' (the package compiled for each batch
    size), through the aoti engine."""
    from export.manifest import read_manifest
    from export.runtime import load

    programs = read_manifest(directory).get("programs") or {}
    batches = {info["batch"] for info in programs.values() if info["format"] == "aoti" and info["mode"] == "out"}
    if not batches:
        return {}
    engine = load(directory, engine="aoti")
    found: Dict[str, Callable[[np.ndarray, torch.Tensor], Any]] = {}
    if None in batches:
        dynamic = engine._package(engine.packages["out"][None])
        found["aoti"] = lambda a, t: dynamic(t)
    if batches - {None}:
        found["aoti-per-batch"] = lambda a, t: engine._callable("out", t.shape[0])(t)
    return found


def measure(runtimes: Dict[str, Callable[[np.ndarray, torch.Tensor], Any]], shape: Sequence[int],
            batches: Sequence[int], seconds: float, flops: float, best_peak: float) -> List[Dict[str, Any]]:
    """Median and p90 latency of every runtime at every batch size, with throughput and the
    share of the measured fp32 peak."""
    from tqdm import tqdm

    rows: List[Dict[str, Any]] = []
    jobs = [(b, r) for b in batches for r in runtimes]
    for batch, name in (bar := tqdm(jobs, desc="bench", file=sys.stderr)):
        bar.set_postfix_str(f"{name} batch {batch}")
        x = np.random.default_rng(batch).standard_normal((batch, *shape)).astype(np.float32)
        xt = torch.from_numpy(x)
        with torch.no_grad():
            times = time_call(lambda fn=runtimes[name], a=x, t=xt: fn(a, t), seconds)
        median = statistics.median(times)
        gflops = flops * batch / median / 1e9
        rows.append({"runtime": name, "batch": batch, "runs": len(times), "median_ms": median * 1e3,
                     "p90_ms": float(np.percentile(times, 90)) * 1e3, "images_per_s": batch / median,
                     "gflops": gflops, "peak_percent": 100 * gflops / best_peak})
    return rows


def run_bench(argv: Sequence[str]) -> int:
    """`python -m export bench`: build, export, measure, check int8 accuracy, report."""
    from tqdm import tqdm

    parser = argparse.ArgumentParser(prog="python -m export bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--arg", action="append", default=[], metavar="NAME=VALUE",
                        help="backbone argument (default for resnet18: num_filters=64)")
    parser.add_argument("--batches", default="1,8,64", help="batch sizes (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="threads for every runtime (default: all cores, %(default)s)")
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="measuring time per runtime and batch (default: %(default)s)")
    parser.add_argument("--train-seconds", type=float, default=8.0,
                        help="training time of the digits model (0 skips the accuracy check)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--no-aoti", dest="aoti", action="store_false",
                        help="skip the AOTInductor packages (compiling them takes ~1 min)")
    args = parser.parse_args(argv)
    entry = get_entry(args.backbone)
    kwargs: Dict[str, Any] = {"num_filters": 64} if entry.name == "resnet18" else {}
    for item in args.arg:
        key, _, value = item.partition("=")
        kwargs[key] = entry.arg(key).convert(value)
    batches = [int(b) for b in args.batches.split(",")]
    torch.set_num_threads(args.threads)
    log = lambda msg: tqdm.write(msg, file=sys.stderr)  # noqa: E731

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        net = REGISTRY.build(entry.name, **kwargs).eval()
    shape = tuple(net.input_shape)
    flops = flops_per_image(net, shape)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        log(f"exporting {entry.name} {kwargs} ...")
        formats = ["torchscript", "onnx", "exported"] + (["aoti"] if args.aoti else [])
        if args.aoti:
            log(f"compiling AOTInductor packages (any batch, and batch {', '.join(map(str, batches))}) ...")
        result = export_backbone(net, tmp / "bench", modes=["out"], formats=formats,
                                 aoti_batches=[None, *batches])
        compile_seconds = {name: info["seconds"] for name, info in result.manifest["programs"].items()
                           if info["format"] == "aoti"}
        runtimes = build_runtimes(net, result.directory, shape, args.threads, log)
        log("measuring the fp32 matmul peak ...")
        peak = matmul_peak(args.threads)
        rows = measure(runtimes, shape, batches, args.seconds, flops, max(peak.values()))
        accuracy = None
        if args.train_seconds > 0:
            accuracy = digits_accuracy("resnet18", {"num_filters": 16}, (3, 32, 32), tmp,
                                       args.train_seconds, log)
    report = {"backbone": entry.name, "args": kwargs, "input_shape": list(shape),
              "threads": args.threads, "flops_per_image": flops, "matmul_peak_gflops": peak,
              "results": rows, "int8_accuracy_digits": accuracy, "aoti_compile_seconds": compile_seconds,
              "versions": result.manifest["versions"]}
    print(format_report(report))
    if args.json:
        atomic_write_bytes(args.json, (json.dumps(report, indent=2) + "\n").encode())
    return 0


def format_report(report: Dict[str, Any]) -> str:
    peak = report["matmul_peak_gflops"]
    lines = [f"{report['backbone']} {report['args']} input {report['input_shape']}, "
             f"{report['flops_per_image'] / 1e9:.3f} GFLOP/image, {report['threads']} threads; "
             f"fp32 peak: torch {peak['torch_gflops']:.0f}, onnxruntime "
             f"{peak['onnxruntime_gflops']:.0f} GFLOP/s"]
    rows = []
    by_key = {(r["runtime"], r["batch"]): r for r in report["results"]}
    for r in report["results"]:
        eager = by_key[("eager", r["batch"])]
        rows.append([r["runtime"], r["batch"], f"{r['median_ms']:.2f}", f"{r['p90_ms']:.2f}",
                     f"{r['images_per_s']:.0f}", f"{r['gflops']:.0f}", f"{r['peak_percent']:.0f}%",
                     f"{eager['median_ms'] / r['median_ms']:.2f}x"])
    lines.append(format_table(["runtime", "batch", "median ms", "p90 ms", "images/s", "GFLOP/s",
                         "of peak", "vs eager"], rows))
    if report.get("aoti_compile_seconds"):
        lines.append("AOTInductor compile seconds: " + ", ".join(
            f"{k} {v:.1f}" for k, v in sorted(report["aoti_compile_seconds"].items())))
    acc = report.get("int8_accuracy_digits")
    if acc:
        lines.append(f"int8 on a trained model (sklearn digits, {acc['test_samples']} test images): "
                     f"fp32 accuracy {acc['fp32_accuracy']:.3f}, int8 {acc['int8_accuracy']:.3f}, "
                     f"top-1 agreement {acc['top1_agreement']:.3f}, max logit error "
                     f"{acc['max_logit_error']:.3g}")
    return "\n".join(lines)
