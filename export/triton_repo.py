"""`python -m export triton DIR [DIR ...] --repo REPO`: Triton Inference Server model
repositories from export directories.

Per backbone and mode:
  REPO/<backbone>_<mode>/config.pbtxt + 1/model.onnx      platform onnxruntime_onnx, tensors
                                                           named as in the ONNX graph (x; logits, ...)
  REPO/<backbone>_<mode>_ts/config.pbtxt + 1/model.pt     platform pytorch_libtorch, INPUT__0 and
                                                           OUTPUT__i in the mode's output order
Dims and datatypes come from the manifest (the batch dimension is Triton's `max_batch_size`,
dynamic image sizes are -1), with `dynamic_batching`. Every file is copied from bytes checked
against the manifest's sha256, and each model directory is replaced whole (built beside it,
swapped in when complete), so Triton polling the repository never sees half a model.
"""

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from export.errors import ExportError, check_option
from export.manifest import SHARED_WEIGHTS, artifact_name, free_dims, input_dims, read_manifest, read_verified
from export.transaction import DirectoryTransaction
from zoo.base import RETURNT_MODES

#: --backends value -> (Triton platform, export format, model file, name suffix)
BACKENDS: Dict[str, Tuple[str, str, str, str]] = {
    "onnxruntime": ("onnxruntime_onnx", "onnx", "model.onnx", ""),
    "pytorch": ("pytorch_libtorch", "torchscript", "model.pt", "_ts"),
}
CONFIG = "config.pbtxt"


def _tensor(name: str, dims: List[int], label: str = "") -> str:
    comment = f"  # {label}" if label else ""
    return (f"  {{\n    name: \"{name}\"{comment}\n    data_type: TYPE_FP32\n"
            f"    dims: [ {', '.join(map(str, dims))} ]\n  }}")


def model_config(manifest: Dict[str, Any], mode: str, backend: str, max_batch_size: int,
                 queue_delay_us: int, name: str) -> str:
    """config.pbtxt text (Triton's ModelConfig in protobuf text format) of one mode."""
    platform, fmt, _, _ = BACKENDS[backend]
    spec = manifest["input"]
    batched = "batch" in spec.get("dynamic", [])
    skip = 1 if batched else 0  # with max_batch_size > 0, Triton's dims leave the batch out
    outputs = manifest["modes"][mode]["outputs"]
    if backend == "pytorch":
        inputs = [_tensor("INPUT__0", input_dims(manifest)[skip:], spec["name"])]
        outs = [_tensor(f"OUTPUT__{i}", free_dims(o["shape"])[skip:], o["name"]) for i, o in enumerate(outputs)]
    else:
        inputs = [_tensor(spec["name"], input_dims(manifest)[skip:])]
        outs = [_tensor(o["name"], free_dims(o["shape"])[skip:]) for o in outputs]
    file = artifact_name(mode, fmt)
    params = {"returnt": mode, "backbone": manifest["backbone"]["name"], "source_file": file,
              "source_sha256": manifest["files"][file]["sha256"],
              "output_names": ",".join(o["name"] for o in outputs)}
    lines = [f"# returnt-zoo: {manifest['backbone']['name']} returnt={mode!r} from {file}",
             f"name: \"{name}\"", f"platform: \"{platform}\"",
             f"max_batch_size: {max_batch_size if batched else 0}",
             "input [\n" + ",\n".join(inputs) + "\n]", "output [\n" + ",\n".join(outs) + "\n]"]
    if batched:
        lines.append(f"dynamic_batching {{\n  max_queue_delay_microseconds: {queue_delay_us}\n}}")
    lines.append("instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]")
    for key, value in params.items():
        lines.append(f"parameters {{\n  key: \"{key}\"\n  value {{ string_value: {json.dumps(value)} }}\n}}")
    return "\n".join(lines) + "\n"


def write_model(directory: Path, manifest: Dict[str, Any], repo: Path, mode: str, backend: str,
                max_batch_size: int, queue_delay_us: int) -> Path:
    """REPO/<model>/ for one mode and backend, replaced whole; its files hash-checked copies."""
    _, fmt, filename, suffix = BACKENDS[backend]
    name = f"{manifest['backbone']['name']}_{mode}{suffix}"
    source = artifact_name(mode, fmt)
    with DirectoryTransaction(repo / name, marker=CONFIG) as tx:
        version = tx.staging / "1"
        version.mkdir()
        (version / filename).write_bytes(read_verified(directory, manifest, source))
        if fmt == "onnx" and manifest.get("onnx_weights") == "shared":
            (version / SHARED_WEIGHTS).write_bytes(read_verified(directory, manifest, SHARED_WEIGHTS))
        (tx.staging / CONFIG).write_text(model_config(manifest, mode, backend, max_batch_size,
                                                      queue_delay_us, name))
        tx.commit()
    return repo / name


def write_repository(directories: Sequence[Path], repo: Path, backends: Sequence[str],
                     max_batch_size: int = 32, queue_delay_us: int = 5000) -> List[Path]:
    """Every exported mode of every directory, for each backend whose files it has."""
    written: List[Path] = []
    plans = []
    seen: Dict[str, Path] = {}
    for d in directories:
        manifest = read_manifest(d)
        name = manifest["backbone"]["name"]
        if name in seen:  # model directories are named after the backbone: one would replace the other
            raise ExportError(f"{d} and {seen[name]} both hold backbone {name!r}; a repository holds it once")
        seen[name] = d
        for backend in backends:
            fmt = BACKENDS[backend][1]
            modes = [m for m in RETURNT_MODES if artifact_name(m, fmt) in manifest["files"]]
            if not modes:
                raise ExportError(f"{d} has no {fmt} files for the {backend} backend; export with "
                                  f"--formats {fmt} or leave {backend} out of --backends")
            plans += [(d, manifest, m, backend) for m in modes]
    repo.mkdir(parents=True, exist_ok=True)  # only once every directory was checked
    for d, manifest, mode, backend in plans:
        written.append(write_model(d, manifest, repo, mode, backend, max_batch_size, queue_delay_us))
    return written


def triton_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export triton",
        description="Write Triton Inference Server model repositories from export directories: "
                    "per backbone and mode <backbone>_<mode> (ONNX, onnxruntime_onnx) and "
                    "<backbone>_<mode>_ts (TorchScript, pytorch_libtorch).",
        epilog="Example: python -m export triton artifacts/resnet artifacts/mnistmlp --repo triton-repo "
               "&& tritonserver --model-repository=triton-repo")
    p.add_argument("directories", nargs="+", type=Path, metavar="DIR", help="export directories")
    p.add_argument("--repo", type=Path, required=True, help="model repository to write into")
    p.add_argument("--backends", default="onnxruntime,pytorch",
                   help=f"comma-separated, out of {', '.join(BACKENDS)} (default: %(default)s)")
    p.add_argument("--max-batch-size", type=int, default=32, help="Triton max_batch_size (default: %(default)s)")
    p.add_argument("--queue-delay-us", type=int, default=5000,
                   help="dynamic_batching max_queue_delay_microseconds (default: %(default)s)")
    return p


def run_triton(argv: Sequence[str]) -> int:
    ns = triton_parser().parse_args(argv)
    backends = [b.strip() for b in ns.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        raise ExportError(f"--backends {ns.backends!r}: {', '.join(unknown) or 'empty'}; "
                          f"allowed: {', '.join(BACKENDS)}")
    check_option("--max-batch-size", ns.max_batch_size, ns.max_batch_size >= 1, "an integer >= 1")
    check_option("--queue-delay-us", ns.queue_delay_us, ns.queue_delay_us >= 0, "an integer >= 0")
    for d in ns.directories:
        if not d.is_dir():
            raise ExportError(f"{d} is not a directory; expected an export directory (manifest.json)")
    written = write_repository(ns.directories, ns.repo, backends, ns.max_batch_size, ns.queue_delay_us)
    for path in written:
        print(ns.repo / path.name)
    print(f"{len(written)} models in {ns.repo}")
    return 0
