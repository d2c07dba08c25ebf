"""`publish`: a checkpoint's weights as a new, verified version of an export directory,
without tracing or exporting again (the graphs are the export's; continual learning changes
only the weights from task to task), and what `versions` does with them (list, prune, pin).

A publish holds the directory's lock (concurrent publishes, exports and quantizes are refused
with the holder's pid). Each version is written into `versions/.staging-*`, verified (every
export file loaded as its users load it, with the new weights put in, against eager with the
checkpoint loaded; AOTInductor packages in a fresh process), renamed to `versions/<n>` and
only then recorded in the manifest (one atomic rename). A run killed at any point leaves a
directory no record lists, removed by the next command that takes the lock: never a half
version under the manifest.
"""

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from export.errors import ExportError, IntegrityError
from export.formats.aoti import check_torch_version, package_state, refuse_frozen, verify_fresh
from export.formats.onnx import load_onnx, ort_session, set_model_params
from export.formats.program import load_program, set_program_params
from export.formats.torchscript import load_torchscript, set_module_state
from export.pipeline.checkpoint import Checkpoint, read_checkpoint
from export.pipeline.preprocessing import Normalize
from export.pipeline.verify import _check_layout, eager_backbone, eager_outputs
from export.store.atomic import _disk_full
from export.store.flat_vector import checked_layout
from export.store.manifest import (
    VERSIONS_DIR,
    Manifest,
    WeightVersion,
    check_files,
    file_entry,
    read_manifest,
    sha256,
    write_manifest,
)
from export.store.tolerance import compare, sample_inputs
from export.store.transaction import DirectoryLock
from export.store.versions import (
    GRAPHS,
    SIGNATURE,
    VERSION_WEIGHTS,
    deployed_numbers,
    graph_files,
    graphs_record,
    remove_tree,
    unlisted_version_dirs,
    version_dir,
    version_numbers,
    weights_bytes,
)
from zoo.base import MammothBackbone
from zoo.registry import get_entry
from zoo.weights import CheckpointError, load_state_dict_strict

log = logging.getLogger(__name__)

_TASK = re.compile(r"_(\d+)$")


# ---------------------------------------------------------------- the checkpoint
def task_index(path: Path) -> Optional[int]:
    """Mammoth's task index from `<ckpt_name>_<task>.pt` (`_last` and other names: None)."""
    match = _TASK.search(Path(path).stem)
    return int(match.group(1)) if match else None


def in_task_order(paths: Sequence[Path]) -> List[Path]:
    """Mammoth's per-task checkpoints by task index; names without one stay in the given order,
    after them."""
    indexed = [(task_index(p), i, Path(p)) for i, p in enumerate(paths)]
    return [p for _, _, p in sorted(indexed, key=lambda t: (t[0] is None, t[0] if t[0] is not None else t[1], t[1]))]


def check_checkpoint(ckpt: Checkpoint, manifest: Manifest, directory: Path) -> MammothBackbone:
    """The export's backbone with the checkpoint's weights loaded; one line naming the first
    difference for a checkpoint of another backbone, other arguments or another parameter layout,
    or with non-finite weights."""
    where = f"{ckpt.path}"
    if ckpt.backbone is not None:
        try:
            theirs = get_entry(ckpt.backbone).name
        except KeyError:
            theirs = ckpt.backbone
        ours = get_entry(manifest.backbone.name).name
        if theirs != ours:
            raise CheckpointError(f"{where}: a checkpoint of backbone {ckpt.backbone!r}; {directory} is an "
                                  f"export of {manifest.backbone.name!r}")
    for name, value in sorted(manifest.backbone.args.items()):
        if name in ckpt.args and ckpt.args[name] is not None and ckpt.args[name] != value and name != "weights":
            raise CheckpointError(f"{where}: trained with {name}={ckpt.args[name]!r}; {directory} was exported "
                                  f"with {name}={value!r}")
    bad = [k for k, v in ckpt.state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{where}: non-finite values in {bad[0]}" + (f" and {len(bad) - 1} more" if len(bad) > 1
                                                                            else "") + ": nothing to publish "
                              "(a diverged run?)")
    net = eager_backbone(directory, manifest)
    load_state_dict_strict(net, ckpt.state_dict, what=where, name=manifest.backbone.name)
    try:
        _check_layout(directory, manifest, net)
    except ExportError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    return net.eval()


def version_state(net: torch.nn.Module) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
    """(parameters, floating buffers) of the eager backbone by state_dict name."""
    params = {n: p.detach() for n, p in net.named_parameters()}
    buffers = {n: b.detach() for n, b in net.named_buffers() if b.is_floating_point()}
    return params, buffers


# ---------------------------------------------------------------- loading with a version's weights
def load_with_weights(fmt: str, path: Path, device: str, layout, vector: Tensor,
                      buffers: Dict[str, Tensor], programs: Optional[Dict[Path, object]] = None
                      ) -> Callable[[Tensor], object]:
    """An export file loaded as its users load it, with `vector` and `buffers` put in (in memory:
    the file is not changed). `programs`: torch.export programs already loaded by this run
    (deserialising one takes seconds; every weight is overwritten before use)."""
    if fmt == "torchscript":
        module = load_torchscript(path, device)
        set_module_state(module, vector, buffers)
        return lambda x: module(x.to(device))
    if fmt == "exported":
        loaded = programs if programs is not None else {}
        if path not in loaded:
            loaded[path] = load_program(path)
        program = loaded[path]
        set_program_params(program, vector, layout, path, allow_nonfinite=False, buffers=buffers)
        module = program.module().to(device)
        return lambda x: module(x.to(device))
    if fmt == "onnx":
        model = set_model_params(load_onnx(path), vector, layout, path, buffers=buffers)
        session = ort_session(model.SerializeToString(), device)
        return lambda x: session.run(None, {"x": x.cpu().numpy()})
    raise ExportError(f"{path}: format {fmt!r} is verified in a fresh process")


@dataclass
class VersionCheck:
    """Eager vs every export file with one version's weights."""

    rows: List[List[str]]  # mode, output, format, max abs, max rel, status, file
    verification: Dict[str, Dict[str, dict]]
    max_abs: float

    @property
    def failed(self) -> List[str]:
        """Each output beyond the bound: format, mode, output and its error (or why it could not run)."""
        errors = {(name, output): s.get("error") for name, v in self.verification.items() for output, s in v.items()}
        return [f"{r[2]} {r[0]} {r[1]} ({errors.get((r[6], r[1])) or r[3]})" for r in self.rows if r[5] != "ok"]


def check_weights(directory: Path, manifest: Manifest, net: torch.nn.Module, vector: Tensor,
                  buffers: Dict[str, Tensor], device: str = "cpu", seed: int = 1,
                  programs: Optional[Dict[Path, object]] = None) -> VersionCheck:
    """Every export file (each format and mode; AOTInductor packages in one fresh process)
    with these weights against `net` (eager with the same weights), within verify's bound."""
    net = net.to(device).eval()
    shape = list(manifest.input.shape[1:])
    prep = manifest.preprocessing or {}
    preprocess = Normalize(prep["mean"], prep["std"]) if prep.get("baked") else None
    images = preprocess is not None
    layout = checked_layout(manifest, directory)
    rows: List[List[str]] = []
    verification: Dict[str, Dict[str, dict]] = {}
    expected: Dict[tuple, list] = {}
    aoti_jobs: List[tuple] = []
    for mode, fmt, name, batch in manifest.artifacts():
        inputs = (sample_inputs(shape, seed=seed, images=images) if batch is None
                  else sample_inputs(shape, seed=seed, images=images, batches=(batch,)))
        if (mode, batch) not in expected:
            expected[mode, batch] = eager_outputs(net, mode, inputs, device, preprocess)
        names = manifest.output_names(mode)
        if fmt == "aoti":
            check_torch_version(name, manifest.programs[name])
            refuse_frozen(name, manifest.programs[name])
            aoti_jobs.append((directory / name, names, inputs, expected[mode, batch], mode, name))
            continue
        fn = load_with_weights(fmt, directory / name, device, checked_layout(manifest, name, onnx=fmt == "onnx"),
                               vector, buffers, programs)
        verification[name] = compare(fn, names, inputs, expected[mode, batch])
    if aoti_jobs:
        results = verify_fresh([job[:4] for job in aoti_jobs], device, package_state(vector, layout, buffers))
        for job, result in zip(aoti_jobs, results):
            verification[job[5]] = result
    for mode, fmt, name, batch in manifest.artifacts():
        label = fmt if batch is None else f"{fmt} b{batch}"
        for output, s in verification[name].items():
            rows.append([mode, output, label, f"{s['max_abs']:.2e}", f"{s['max_rel']:.2e}",
                         "ok" if s["ok"] else "MISMATCH", name])
    max_abs = max((s["max_abs"] for v in verification.values() for s in v.values()), default=0.0)
    return VersionCheck(rows, verification, float(max_abs))


# ---------------------------------------------------------------- publish
@dataclass
class Published:
    version: WeightVersion
    bytes: int
    seconds: float


def _json_safe(value):
    """Mammoth's args as JSON values (anything else as its repr)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return repr(value)


def clean_leftovers(directory: Path, manifest: Manifest) -> None:
    """Remove what killed publishes and prunes left in versions/ (only the lock holder calls it)."""
    for leftover in unlisted_version_dirs(directory, manifest):
        remove_tree(leftover)
        log.warning("removed %s, left by an interrupted publish or prune", leftover)


def publish(directory: Path, checkpoints: Sequence[Path], sign_key: Optional[Path] = None,
            allow_unsafe_pickle: bool = False, device: str = "cpu",
            progress: Callable[[str], None] = lambda line: None) -> List[Published]:
    """Add each checkpoint (in Mammoth's task order) as the next weight version of `directory`.

    Every checkpoint is read and checked against the export before anything is written; a
    version whose files do not match eager within the bound is not published (ExportError
    naming the files), and the versions before it stay published.
    """
    directory = Path(os.path.abspath(directory))
    manifest = read_manifest(directory)
    if not manifest.artifacts():
        raise ExportError(f"{directory}: no float32 export files to publish weights for")
    lowered = sorted(n for _, fmt, n, _ in manifest.artifacts() if fmt == "pte")
    if lowered:
        raise ExportError(f"{directory}: {', '.join(lowered)}: a .pte runs the weights it was lowered with, "
                          "so a version cannot run in it; publish into an export without pte (--formats) and "
                          "lower each task's weights with python -m export BACKBONE --checkpoint CKPT --formats pte")
    ordered = in_task_order(checkpoints)
    ckpts = [read_checkpoint(p, allow_unsafe_pickle) for p in ordered]
    nets = [check_checkpoint(c, manifest, directory) for c in ckpts]  # all refused before any work
    if sign_key is not None:
        from export.store.signing import _model_signing

        _model_signing()
        if not Path(sign_key).is_file():
            raise ExportError(f"--sign-key {sign_key}: no such file")
    lock = DirectoryLock(directory)
    lock.acquire()
    try:
        manifest = read_manifest(directory)  # as it is now, under the lock
        check_files(directory, manifest, graph_files(manifest))
        clean_leftovers(directory, manifest)
        done: List[Published] = []
        programs: Dict[Path, object] = {}  # loaded once for all the checkpoints of this run
        for ckpt, net in zip(ckpts, nets):
            done.append(_publish_one(directory, manifest, ckpt, net, sign_key, device, programs))
            progress(describe(done[-1]))
        return done
    finally:
        lock.release()


def _publish_one(directory: Path, manifest: Manifest, ckpt: Checkpoint, net: torch.nn.Module,
                 sign_key: Optional[Path], device: str, programs: Dict[Path, object]) -> Published:
    start = time.perf_counter()
    number = max(version_numbers(manifest), default=0) + 1
    root = directory / VERSIONS_DIR
    staging = root / f".staging-{number}-{os.getpid()}"
    try:
        root.mkdir(exist_ok=True)
        staging.mkdir()
        params, buffers = version_state(net)
        (staging / VERSION_WEIGHTS).write_bytes(weights_bytes(params, buffers))
        (staging / GRAPHS).write_bytes(graphs_record(manifest, number))
    except OSError as exc:
        remove_tree(staging)
        raise _disk_full(exc, staging) from None
    try:
        layout = checked_layout(manifest, directory)
        vector = torch.cat([params[e.name].reshape(-1).float().cpu() for e in layout])
        check = check_weights(directory, manifest, net, vector, buffers, device, programs=programs)
        if check.failed:
            raise ExportError(f"{ckpt.path}: not published: with its weights {len(check.failed)} outputs differ "
                              f"from eager beyond the bound, first {check.failed[0]}")
        if sign_key is not None:
            from export.store.signing import sign_version

            sign_version(staging, sign_key)
        files = {p.name: file_entry(p) for p in sorted(staging.iterdir())}
        record = WeightVersion(
            number=number, files=files,
            checkpoint={"file": ckpt.path.name, "sha256": sha256(ckpt.path), "kind": ckpt.kind},
            task=task_index(ckpt.path), dataset=ckpt.args.get("dataset"),
            args=_json_safe(ckpt.args),
            published=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            seconds=round(time.perf_counter() - start, 3), verification=check.verification,
            max_abs=check.max_abs,
            signature={"file": SIGNATURE, "method": "model-signing elliptic key"} if SIGNATURE in files else None)
        for p in staging.iterdir():
            os.chmod(p, 0o444)  # a version is never modified
        os.rename(staging, version_dir(directory, number))
        manifest.weight_versions[str(number)] = record
        write_manifest(directory, manifest)
    except OSError as exc:
        raise _disk_full(exc, staging) from None
    finally:
        remove_tree(staging)
    return Published(record, sum(e.size for e in files.values()), time.perf_counter() - start)


def describe(done: Published) -> str:
    v = done.version
    task = f"task {v.task}" if v.task is not None else "no task index"
    dataset = f", {v.dataset}" if v.dataset else ""
    signed = ", signed" if v.signature else ""
    return (f"version {v.number} ({task}{dataset}, {v.checkpoint.get('file')}): {done.bytes / 1e6:.1f} MB, "
            f"max |error| {v.max_abs:.1e}{signed}, {done.seconds:.1f} s")


# ---------------------------------------------------------------- versions: prune, pin
def _locked_update(directory: Path, change: Callable[[Manifest], List[int]]) -> Tuple[Manifest, List[int]]:
    directory = Path(os.path.abspath(directory))
    lock = DirectoryLock(directory)
    lock.acquire()
    try:
        manifest = read_manifest(directory)
        clean_leftovers(directory, manifest)
        removed = change(manifest)
        write_manifest(directory, manifest)
        for number in removed:  # unlisted first, then removed: a kill leaves only a leftover
            remove_tree(version_dir(directory, number))
        return manifest, removed
    finally:
        lock.release()


def prune(directory: Path, keep: int) -> Tuple[Manifest, List[int]]:
    """Remove all but the newest `keep` versions, except pinned ones and those a deployment
    serves (versions/deployed.json)."""
    if keep < 1:
        raise ExportError(f"--keep {keep}: expected an integer >= 1 (the newest versions kept)")
    served = deployed_numbers(directory)

    def change(manifest: Manifest) -> List[int]:
        numbers = version_numbers(manifest)
        protected = set(manifest.pinned_versions) | set(served) | set(numbers[-keep:])
        removed = [n for n in numbers if n not in protected]
        for n in removed:
            del manifest.weight_versions[str(n)]
        return removed

    return _locked_update(directory, change)


def pin(directory: Path, numbers: Sequence[int], pinned: bool = True) -> Manifest:
    """Pin (or unpin) versions: `--keep` never prunes a pinned one."""

    def change(manifest: Manifest) -> List[int]:
        for n in numbers:
            if str(n) not in manifest.weight_versions:
                raise ExportError(f"{directory}: no weight version {n}; published: "
                                  f"{', '.join(map(str, version_numbers(manifest))) or 'none'}")
        now = set(manifest.pinned_versions)
        manifest.pinned_versions = sorted(now | set(numbers) if pinned else now - set(numbers))
        return []

    return _locked_update(directory, change)[0]


def version_table(directory: Path, manifest: Manifest) -> List[List[str]]:
    """One row per version for `versions`: number, task, dataset, checkpoint, published, size,
    max error, signed, pinned/served."""
    served = deployed_numbers(directory)
    rows = []
    for n in version_numbers(manifest):
        v = manifest.weight_versions[str(n)]
        marks = ["pinned"] if n in manifest.pinned_versions else []
        if n in served:
            marks.append(f"served by {', '.join(served[n])}")
        rows.append([str(n), "-" if v.task is None else str(v.task), v.dataset or "-", v.checkpoint.get("file", "-"),
                     v.published, f"{sum(e.size for e in v.files.values()) / 1e6:.1f} MB",
                     f"{v.max_abs:.1e}" if v.max_abs is not None else "-", "yes" if v.signature else "no",
                     ", ".join(marks) or "-"])
    return rows


def check_versions(directory: Path, manifest: Manifest, device: str = "cpu", seed: int = 1) -> List[List[str]]:
    """`verify DIR` for every published version: its files' sha256 and graphs, then every
    export file with its weights against eager with them (rows labelled `v<n> <format>`)."""
    from export.store.versions import check_version, read_version_weights

    rows: List[List[str]] = []
    layout = checked_layout(manifest, directory)
    for n in version_numbers(manifest):
        version = manifest.weight_versions[str(n)]
        try:
            check_version(directory, manifest, version)
        except IntegrityError as exc:
            rows.append(["-", "files", f"v{n}", "-", "-", f"MISMATCH: {exc}"])
            continue
        vector, buffers = read_version_weights(directory, version, layout)
        net = eager_backbone(directory, manifest)
        net.set_params(vector)
        state = dict(net.named_buffers())
        with torch.no_grad():
            for name, value in buffers.items():
                if name in state:
                    state[name].copy_(value)
        check = check_weights(directory, manifest, net.eval(), vector, buffers, device, seed)
        rows += [[r[0], r[1], f"v{n} {r[2]}", *r[3:6]] for r in check.rows]
    return rows
