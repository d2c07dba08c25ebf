"""`python -m export triton DIR [DIR ...] --repo REPO`: Triton Inference Server model
repositories from export directories.

Per backbone and mode:
  REPO/<backbone>_<mode>/config.pbtxt + 1/model.onnx      platform onnxruntime_onnx, tensors
                                                           named as in the ONNX graph (x; logits, ...)
  REPO/<backbone>_<mode>_ts/config.pbtxt + 1/model.pt     platform pytorch_libtorch, INPUT__0 and
                                                           OUTPUT__i in the mode's output order
A directory with published weight versions (python -m export publish) gets one numbered
version directory per version (REPO/<model>/<n>/model.onnx: the export's graph with version n's
weights) and `version_policy { specific { versions: [...] } }`.
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
    check_files,
    free_dims,
    read_manifest,
    read_verified,
)
from export.store.transaction import DirectoryTransaction
from export.store.versions import version_sha256

#: --backends value -> (Triton platform, export format, model file, name suffix)
BACKENDS: Dict[str, Tuple[str, str, str, str]] = {
    "onnxruntime": ("onnxruntime_onnx", "onnx", "model.onnx", ""),
    "pytorch": ("pytorch_libtorch", "torchscript", "model.pt", "_ts"),
}
CONFIG = "config.pbtxt"


def model_config(manifest: Manifest, mode: str, backend: str, max_batch_size: int,
                 queue_delay_us: int, name: str, versions: Sequence[int] = ()) -> str:
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
    if versions:  # the directory's published weight versions, one version directory each
        config.version_policy.specific.versions.extend(int(v) for v in versions)
        params["weight_versions_sha256"] = ",".join(
            f"{v}:{version_sha256(manifest.weight_versions[str(v)])}" for v in versions)
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
                max_batch_size: int, queue_delay_us: int, versions: Sequence[int] = ()) -> Path:
    """REPO/<model>/ for one mode and backend, replaced whole: version 1 holds the export's
    files (hash-checked copies); with `versions`, each published weight version gets its
    numbered directory, the export's graph with that version's weights put in."""
    _, fmt, filename, suffix = BACKENDS[backend]
    name = f"{manifest.backbone.name}_{mode}{suffix}"
    source = artifact_name(mode, fmt)
    with DirectoryTransaction(repo / name, marker=CONFIG) as tx:
        if not versions:
            version = tx.staging / "1"
            version.mkdir()
            (version / filename).write_bytes(read_verified(directory, manifest, source))
            if fmt == "onnx" and manifest.onnx_weights == "shared":
                (version / SHARED_WEIGHTS).write_bytes(read_verified(directory, manifest, SHARED_WEIGHTS))
        for number in versions:
            (tx.staging / str(number)).mkdir()
            _write_version(directory, manifest, number, fmt, source, tx.staging / str(number) / filename)
        (tx.staging / CONFIG).write_text(model_config(manifest, mode, backend, max_batch_size,
                                                      queue_delay_us, name, versions))
        tx.commit()
    return repo / name


def _write_version(directory: Path, manifest: Manifest, number: int, fmt: str, source: str, out: Path) -> None:
    """The export's `source` file with weight version `number` put in (both hash-checked), at
    `out`: a self-contained ONNX file below 2 GiB (else its weights in `<out>.data`), or a
    TorchScript file."""
    from export.store.flat_vector import checked_layout
    from export.store.versions import check_version, read_version_weights

    record = manifest.weight_versions[str(number)]
    check_version(directory, manifest, record)
    check_files(directory, manifest, [source] + ([SHARED_WEIGHTS] if fmt == "onnx" and
                                                 manifest.onnx_weights == "shared" else []))
    vector, buffers = read_version_weights(directory, record, checked_layout(manifest, directory))
    if fmt == "onnx":
        import onnx

        from export.formats.onnx import ONNX_SINGLE_FILE_LIMIT, load_onnx, set_model_params

        model = set_model_params(load_onnx(directory / source), vector, checked_layout(manifest, source, onnx=True),
                                 source, buffers=buffers)
        if model.ByteSize() < ONNX_SINGLE_FILE_LIMIT:
            out.write_bytes(model.SerializeToString())
        else:
            onnx.save(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                      location=out.name + ".data")
        return
    from export.formats.torchscript import load_torchscript, save_torchscript, set_module_state

    module = load_torchscript(read_verified(directory, manifest, source))
    set_module_state(module, vector, buffers)
    save_torchscript(module, out)


def versions_to_write(manifest: Manifest, directory: Path, policy: str) -> List[int]:
    """The published versions a repository gets under a serve-style policy (none: the
    directory has no published versions and its export's files are version 1)."""
    if not manifest.weight_versions:
        return []
    from export.serving.config import parse_versions_policy, served_numbers

    return served_numbers(manifest, directory, parse_versions_policy(policy))


def write_repository(directories: Sequence[Path], repo: Path, backends: Sequence[str],
                     max_batch_size: int = 32, queue_delay_us: int = 5000, versions: str = "all") -> List[Path]:
    """Every exported mode of every directory, for each backend whose files it has; a directory
    with published weight versions gets those `versions` selects (latest, all, N,M) as Triton's
    numbered version directories, with a matching `version_policy`."""
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
            numbers = versions_to_write(manifest, d, versions)
            plans += [(d, manifest, m, backend, numbers) for m in modes]
    repo.mkdir(parents=True, exist_ok=True)  # only once every directory was checked
    for d, manifest, mode, backend, numbers in plans:
        written.append(write_model(d, manifest, repo, mode, backend, max_batch_size, queue_delay_us, numbers))
    return written
