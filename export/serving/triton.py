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

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from export.errors import ExportError
from export.store.manifest import (
    MANIFEST,
    SHARED_WEIGHTS,
    Manifest,
    artifact_name,
    free_dims,
    read_manifest,
    read_verified,
)
from export.store.transaction import DirectoryTransaction

#: --backends value -> (Triton platform, export format, model file, name suffix)
BACKENDS: Dict[str, Tuple[str, str, str, str]] = {
    "onnxruntime": ("onnxruntime_onnx", "onnx", "model.onnx", ""),
    "pytorch": ("pytorch_libtorch", "torchscript", "model.pt", "_ts"),
}
CONFIG = "config.pbtxt"


def model_config(manifest: Manifest, mode: str, backend: str, max_batch_size: int,
                 queue_delay_us: int, name: str) -> str:
    """config.pbtxt of one mode: Triton's `ModelConfig` message (tritonclient's protobuf
    definitions) in protobuf text format."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    platform, fmt, _, _ = BACKENDS[backend]
    spec = manifest.input
    batched = "batch" in spec.dynamic
    skip = 1 if batched else 0  # with max_batch_size > 0, Triton's dims leave the batch out
    outputs = manifest.modes[mode].outputs
    config = mc.ModelConfig(name=name, platform=platform, max_batch_size=max_batch_size if batched else 0)
    tensors = [(config.input, "INPUT__0" if backend == "pytorch" else spec.name, manifest.input_dims())]
    tensors += [(config.output, f"OUTPUT__{i}" if backend == "pytorch" else o.name, free_dims(o.shape))
                for i, o in enumerate(outputs)]
    for field, tensor_name, dims in tensors:
        tensor = field.add(name=tensor_name, data_type=mc.TYPE_FP32)
        tensor.dims.extend(dims[skip:])
    if batched:
        config.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    config.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)
    file = artifact_name(mode, fmt)
    params = {"returnt": mode, "backbone": manifest.backbone.name, "source_file": file,
              "source_sha256": manifest.files[file].sha256, "input_name": spec.name,
              "output_names": ",".join(o.name for o in outputs)}
    for key, value in params.items():
        config.parameters[key].string_value = value
    return (f"# returnt-zoo: {manifest.backbone.name} returnt={mode!r} from {file}\n"
            + text_format.MessageToString(config))


def check_repository(repo: Path) -> None:
    """A repository is a directory (made if missing), outside every export directory (its
    model directories would become stray files of that export)."""
    repo = Path(repo)
    if repo.exists() and not repo.is_dir():
        raise ExportError(f"--repo {repo} is a file; expected a directory (created if missing)")
    for parent in [repo.resolve(), *repo.resolve().parents]:
        if (parent / MANIFEST).is_file():
            raise ExportError(f"--repo {repo} is inside the export directory {parent}; choose a "
                              "directory outside every export directory")


def write_model(directory: Path, manifest: Manifest, repo: Path, mode: str, backend: str,
                max_batch_size: int, queue_delay_us: int) -> Path:
    """REPO/<model>/ for one mode and backend, replaced whole; its files hash-checked copies."""
    _, fmt, filename, suffix = BACKENDS[backend]
    name = f"{manifest.backbone.name}_{mode}{suffix}"
    source = artifact_name(mode, fmt)
    with DirectoryTransaction(repo / name, marker=CONFIG) as tx:
        version = tx.staging / "1"
        version.mkdir()
        (version / filename).write_bytes(read_verified(directory, manifest, source))
        if fmt == "onnx" and manifest.onnx_weights == "shared":
            (version / SHARED_WEIGHTS).write_bytes(read_verified(directory, manifest, SHARED_WEIGHTS))
        (tx.staging / CONFIG).write_text(model_config(manifest, mode, backend, max_batch_size,
                                                      queue_delay_us, name))
        tx.commit()
    return repo / name


def write_repository(directories: Sequence[Path], repo: Path, backends: Sequence[str],
                     max_batch_size: int = 32, queue_delay_us: int = 5000) -> List[Path]:
    """Every exported mode of every directory, for each backend whose files it has."""
    check_repository(repo)
    written: List[Path] = []
    plans = []
    seen: Dict[str, Path] = {}
    for d in directories:
        manifest = read_manifest(d)
        name = manifest.backbone.name
        if name in seen:  # model directories are named after the backbone: one would replace the other
            raise ExportError(f"{d} and {seen[name]} both hold backbone {name!r}; a repository holds it once")
        seen[name] = d
        for backend in backends:
            fmt = BACKENDS[backend][1]
            modes = manifest.modes_with(fmt)
            if not modes:
                raise ExportError(f"{d} has no {fmt} files for the {backend} backend; export with "
                                  f"--formats {fmt} or leave {backend} out of --backends")
            plans += [(d, manifest, m, backend) for m in modes]
    repo.mkdir(parents=True, exist_ok=True)  # only once every directory was checked
    for d, manifest, mode, backend in plans:
        written.append(write_model(d, manifest, repo, mode, backend, max_batch_size, queue_delay_us))
    return written
