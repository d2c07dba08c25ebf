"""Export one backbone: every mode x format built in a staging directory, verified, and swapped
in whole with its manifest (a failed or killed export leaves the previous set as it was)."""

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from export.errors import ExportError, first_line
from export.formats import DEFAULT_FORMATS, FORMATS, get_format
from export.pipeline.preprocessing import Normalize, Preprocessing
from export.pipeline.trace import MAX_BATCH, derive_program, dynamic_dims, export_program
from export.pipeline.verify import FRESH_FORMATS, FreshTorchCheck, eager_outputs, verify_file
from export.store.atomic import atomic_path
from export.store.manifest import (
    SHARED_WEIGHTS,
    FileEntry,
    Manifest,
    aoti_name,
    artifact_name,
    file_entry,
    parse_manifest,
    write_manifest,
)
from export.store.tolerance import ATOL, RTOL, sample_inputs, tolerance_record
from export.store.transaction import DirectoryTransaction
from zoo.base import RETURNT_MODES, MammothBackbone, backbone_name, mode_outputs
from zoo.heads import make_head, parameter_aliases

__all__ = ["ExportResult", "export_backbone", "DEFAULT_FORMATS", "FORMATS", "ONNX_WEIGHTS"]

#: how ONNX graphs hold their weights: each file its own copy, or one shared external-data file
ONNX_WEIGHTS: Tuple[str, ...] = ("embedded", "shared")
#: the largest batch an export runs (verification at 1 and 3, the ONNX example at 2)
_LARGEST_BATCH = 3


@dataclass
class ExportResult:
    directory: Path
    manifest: Manifest
    failures: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def max_error(self) -> float:
        errs = [s["max_abs"] for fmt in self.manifest.verification.values()
                for outs in fmt.values() for s in outs.values()]
        return max(errs, default=0.0)


def check_device(device: str) -> torch.device:
    """A device this machine has; one line naming the bad value otherwise."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ExportError(f"--device {device!r} is not a device; allowed: cpu, cuda, cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ExportError(f"--device {device!r}: CUDA is not available on this machine; use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ExportError(f"--device {device!r}: this machine has {torch.cuda.device_count()} "
                              "CUDA device(s)")
    elif dev.type != "cpu":
        raise ExportError(f"--device {device!r} is not supported; allowed: cpu, cuda, cuda:N")
    return dev


def check_choices(values: Sequence[str], allowed: Sequence[str], what: str) -> List[str]:
    """`values` in `allowed`'s order; one line naming a bad value and what is allowed."""
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise ExportError(f"unknown {what} {', '.join(map(repr, bad)) or repr(','.join(values))}; "
                          f"allowed: {', '.join(allowed)}")
    return [a for a in allowed if a in values]


def check_pte_max_batch(max_batch: int) -> int:
    """The batch bound of ExecuTorch programs: 1..MAX_BATCH."""
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= MAX_BATCH:
        raise ExportError(f"--pte-max-batch {max_batch!r}: the batch bound goes from 1 to {MAX_BATCH} "
                          "(memory is planned for it)")
    return max_batch


def formats_for(net: MammothBackbone, formats: Optional[Sequence[str]] = None) -> List[str]:
    """The formats to write for `net`: the given ones (a format the backbone cannot have is
    refused in one line, with why), or by default every default format it can have."""
    unsupported: Dict[str, str] = dict(getattr(net, "unsupported_formats", {}) or {})
    if formats is None:
        return [f for f in DEFAULT_FORMATS if f not in unsupported]
    formats = check_choices(list(formats), FORMATS, "format")
    for fmt in formats:
        if fmt in unsupported:
            allowed = [f for f in FORMATS if f not in unsupported]
            raise ExportError(f"backbone {backbone_name(net)!r} is not exported as {fmt}: {unsupported[fmt]} "
                              f"(its formats: {', '.join(allowed)})")
    return formats


def default_preprocessing(net: MammothBackbone) -> Optional[Preprocessing]:
    """The input normalisation a backbone declares for itself (timm's data config), recorded
    when the caller gives none."""
    cfg = getattr(net, "data_config", None)
    if not cfg:
        return None
    return Preprocessing(tuple(cfg["mean"]), tuple(cfg["std"]), str(cfg.get("source", "the backbone")),
                         tuple(cfg["input_size"][1:]), interpolation=cfg.get("interpolation"),
                         crop_pct=cfg.get("crop_pct"), crop_mode=cfg.get("crop_mode"))


VERIFY_IN = ("process", "fresh")


def check_verify_in(verify_in: str) -> str:
    if verify_in not in VERIFY_IN:
        raise ExportError(f"verify_in {verify_in!r}: allowed: {', '.join(VERIFY_IN)}")
    return verify_in


def check_aoti_batches(batches: Sequence[Optional[int]]) -> List[Optional[int]]:
    """Batch sizes of AOTInductor packages (None: any batch), sorted, duplicates dropped."""
    bad = [b for b in batches if b is not None and not 1 <= b <= MAX_BATCH]
    if bad or not batches:
        raise ExportError(f"--aoti-batch {bad[0] if bad else '(empty)'}: batch sizes go from 1 to "
                          f"{MAX_BATCH} ('dynamic': any)")
    return sorted(set(batches), key=lambda b: -1 if b is None else b)


def check_opset(opset: Optional[int]) -> None:
    from export.formats.onnx import MIN_OPSET, max_opset

    if opset is not None and not MIN_OPSET <= opset <= max_opset():
        raise ExportError(f"--opset {opset} is not supported; allowed: {MIN_OPSET}-{max_opset()} "
                          "(default: the exporter's)")


def nonfinite_problem(tensors: Mapping[str, Any]) -> str:
    """'' if every floating tensor is finite, else e.g. 'NaN in conv1.weight' (the first)."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            kind = "NaN" if bool(torch.isnan(t).any()) else "Inf"
            return f"{kind} in {name}"
    return ""


def available_memory() -> int:
    """Bytes of memory available to a new allocation (psutil: MemAvailable on Linux, the free
    and inactive pages on macOS, the same figure on Windows)."""
    import psutil

    return int(psutil.virtual_memory().available)


def activation_bytes(net: MammothBackbone, shape: Tuple[int, ...]) -> int:
    """Estimated bytes of one image's activations at `shape`: every module's output summed at the
    backbone's own (small) input size, scaled by the number of pixels. Nothing of `shape`'s size
    is allocated."""
    base = tuple(net.input_shape)
    total = [0]

    def count(module, inputs, output):
        for t in output if isinstance(output, (list, tuple)) else [output]:
            if isinstance(t, torch.Tensor):
                total[0] += t.numel() * t.element_size()

    hooks = [m.register_forward_hook(count) for m in net.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            net(torch.zeros(1, *base, device=next(net.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    pixels = max(1, base[-1] * base[-2]) if len(base) >= 2 else 1
    new_pixels = shape[-1] * shape[-2] if len(shape) >= 2 else 1
    input_bytes = 4 * int(torch.tensor(shape).prod())
    return int(total[0] * new_pixels / pixels) + input_bytes


def check_input_shape(net: MammothBackbone, shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """Refuse an input shape the backbone cannot take, naming the expected one; refuse one whose
    activations would not fit in memory before allocating anything of its size."""
    expected = tuple(net.input_shape)
    what = "x".join(map(str, expected))
    text = ",".join(map(str, shape))
    name = backbone_name(net)
    if len(shape) != len(expected) or shape[0] != expected[0] or min(shape) < 1:
        raise ExportError(f"--input-shape {text} does not fit backbone {name!r}: expected "
                          f"{what}" + (" (C fixed, H,W free)" if net.dynamic_hw else ""))
    if not net.dynamic_hw and tuple(shape) != expected:
        raise ExportError(f"--input-shape {text} does not fit backbone {name!r}: it only takes {what}")
    if tuple(shape) != expected:
        need = _LARGEST_BATCH * activation_bytes(net, shape)
        have = available_memory()
        if need > have:
            raise ExportError(f"--input-shape {text}: about {need / 2**30:.1f} GiB of activations "
                              f"for backbone {name!r}, {have / 2**30:.1f} GiB available; use a "
                              f"smaller input (default: {what})")
    try:
        with torch.no_grad():
            net(torch.zeros(1, *shape, device=next(net.parameters()).device))
    except RuntimeError as exc:
        first = first_line(exc, 120)
        if "alloc" in first.lower() or "out of memory" in first.lower():
            raise ExportError(f"--input-shape {text}: not enough memory for backbone {name!r} "
                              f"({first})") from None
        raise ExportError(f"--input-shape {text} is too small for backbone {name!r} ({first}); "
                          f"default: {what}") from None
    return tuple(shape)


def export_backbone(
    net: MammothBackbone,
    out_dir: Path,
    modes: Sequence[str] = RETURNT_MODES,
    formats: Optional[Sequence[str]] = None,
    input_shape: Optional[Tuple[int, ...]] = None,
    opset: Optional[int] = None,
    device: str = "cpu",
    source: Optional[Dict[str, Any]] = None,
    preprocessing: Optional[Preprocessing] = None,
    onnx_weights: str = "embedded",
    aoti_batches: Sequence[Optional[int]] = (None,),
    pte_max_batch: int = 64,
    pte_params: bool = True,
    aoti_weights: str = "replaceable",
    verify_in: str = "process",
) -> ExportResult:
    """Export `net` into `out_dir`: one file per mode and format, plus `manifest.json`.

    Args:
        net: the backbone (its weights are used as they are; it is put in eval()).
        out_dir: the export directory (`<mode>.pt`, `<mode>.onnx`, `<mode>.ep.pt2`,
            `<mode>.aoti.pt2`, manifest.json). It is replaced whole, and only when every file passed
            verification; otherwise (failure, error, SIGINT/SIGTERM, SIGKILL) what it held
            before stays exactly as it was. Another process exporting into it is refused.
        modes, formats: subsets of `RETURNT_MODES` and `FORMATS` (formats default: every
            one of DEFAULT_FORMATS the backbone can have, `net.unsupported_formats`).
        input_shape: C,H,W of the example input (default: the backbone's).
        opset: ONNX opset (default: the exporter's).
        device: where eager, TorchScript and onnxruntime run (cpu, cuda, cuda:N).
        source: what the weights are, recorded in the manifest.
        preprocessing: the input normalisation the model was trained with, recorded in the
            manifest; with `baked=True` every graph applies it (its input is then [0, 1] images).
            Default: what the backbone declares (timm's data config), else none.
        onnx_weights: "embedded" (each ONNX file self-contained) or "shared" (one
            `weights.onnx.data` that every mode's graph refers to). Models of 2 GiB of weights or
            more are always exported shared: a self-contained ONNX file cannot hold them.
        aoti_batches: the AOTInductor packages per mode (with "aoti" in `formats`): None for
            `<mode>.aoti.pt2` (any batch size), N for `<mode>.aoti.b<N>.pt2` (batch N only;
            measured on CIFAR ResNet-18 no faster than the any-batch package, docs/benchmarks.md).
        aoti_weights: "replaceable" (set_params and published versions replace the weights in
            memory) or "frozen" (oneDNN convolutions with the weights folded in: a batch-1
            package 2-3x faster on CPU; the weights cannot be replaced).
        verify_in: where the TorchScript and torch.export files are loaded and checked: "process"
            (this one) or "fresh" (a fresh Python started at once, no zoo: its torch import
            and the programs' loading run on another core while this process converts to ONNX;
            ~10 s less for CIFAR ResNet-18 on 2 cores, ~4 s more CPU for the child's import).
            The CLI uses "fresh" on machines with 2 or more cores.
        pte_max_batch: the batch bound of ExecuTorch programs (with "pte" in `formats`):
            `<mode>.pte` takes batches 1..pte_max_batch at the export's H x W; its memory is
            planned for the bound.
        pte_params: give each `.pte` a `get_params` method returning the flat vector (XNNPACK's
            packed weights are not it; the file grows by the weights' size).
    Returns:
        An ExportResult; `ok` is False (and nothing was replaced) if any artifact failed.
    """
    check_verify_in(verify_in)
    modes = check_choices(list(modes), RETURNT_MODES, "mode")
    formats = formats_for(net, formats)
    if preprocessing is None:
        preprocessing = default_preprocessing(net)
    check_device(device)
    check_opset(opset)
    if onnx_weights not in ONNX_WEIGHTS:
        raise ExportError(f"unknown --onnx-weights {onnx_weights!r}; allowed: {', '.join(ONNX_WEIGHTS)}")
    aoti_batches = check_aoti_batches(aoti_batches)
    check_pte_max_batch(pte_max_batch)
    if "pte" in formats:
        from export.formats.pte import executorch_version

        executorch_version()
    if "aoti" in formats:
        from export.formats.aoti import check_aoti_weights, check_compiler

        check_aoti_weights(aoti_weights)
        check_compiler()
    problem = nonfinite_problem(net.state_dict())
    if problem:
        raise ExportError(f"the weights have {problem}: nothing to export (a diverged run?)")
    net = net.to(device).eval()
    shape = check_input_shape(net, tuple(input_shape or net.input_shape))
    _refuse_versioned(Path(out_dir))
    with DirectoryTransaction(Path(out_dir)) as tx:
        result = _write_verified_set(net, tx.staging, modes, formats, shape, opset, device, source,
                                     preprocessing, onnx_weights, aoti_batches, pte_max_batch, pte_params,
                                     aoti_weights, verify_in)
        if result.ok:
            tx.commit()
    result.directory = Path(out_dir)
    return result


def _refuse_versioned(out_dir: Path) -> None:
    """An export replaces a directory whole: one with published weight versions (tied to its
    graphs) is not replaced by a new export."""
    from export.store.manifest import MANIFEST, read_manifest
    from export.store.versions import refuse_if_versions

    if (out_dir / MANIFEST).is_file():
        try:
            manifest = read_manifest(out_dir)
        except ExportError:
            return  # not a manifest this tool can read: the transaction decides
        refuse_if_versions(out_dir, manifest, "a new export would drop them; export into another "
                           "directory (--out/--name), or remove this one first")


def _write_verified_set(net: MammothBackbone, out_dir: Path, modes: Sequence[str],
                        formats: Sequence[str], shape: Tuple[int, ...], opset: Optional[int],
                        device: str, source: Optional[Dict[str, Any]],
                        preprocessing: Optional[Preprocessing] = None,
                        onnx_weights: str = "embedded",
                        aoti_batches: Sequence[Optional[int]] = (None,), pte_max_batch: int = 64,
                        pte_params: bool = True, aoti_weights: str = "replaceable",
                        verify_in: str = "process") -> ExportResult:
    """Write and verify every artifact and the manifest into `out_dir` (a staging directory).

    One way through: trace the 'full' head once -> derive each mode's program -> hand each
    format what it writes from -> write -> verify against eager -> record in the manifest."""
    full_names = net.output_names()
    outputs = mode_outputs(full_names)
    baked = preprocessing is not None and preprocessing.baked
    preprocess = Normalize(preprocessing.mean, preprocessing.std).to(device) if baked else None
    inputs = sample_inputs(shape, images=baked)
    seconds: Dict[str, float] = {}
    rec = _Record(formats)

    def timed(key: str):
        return _Timer(seconds, key)

    if "onnx" in formats:
        from export.formats.onnx import ONNX_SINGLE_FILE_LIMIT, weights_bytes

        if onnx_weights == "embedded" and weights_bytes(net) >= ONNX_SINGLE_FILE_LIMIT:
            onnx_weights = "shared"  # a self-contained ONNX file cannot hold 2 GiB
    # a fresh Python for the TorchScript and torch.export files, importing torch meanwhile
    fresh = FreshTorchCheck(device) if verify_in == "fresh" and set(FRESH_FORMATS) & set(formats) else None
    try:
        _write_files(net, out_dir, modes, formats, shape, opset, device, preprocess, inputs, onnx_weights,
                     aoti_batches, pte_max_batch, pte_params, aoti_weights, rec, timed, fresh)
    finally:
        if fresh is not None:
            fresh.close()

    # 4. record
    entries = _output_entries(net, shape, device)
    manifest = parse_manifest({
        "format_version": 1,
        "backbone": {"name": backbone_name(net),
                     "args": getattr(net, "registry_kwargs", {}),
                     "num_params": net.num_params()},
        "source": source or {"weights": "as given (export_backbone)"},
        "input": {"name": "x", "shape": ["batch", *shape], "dtype": "float32",
                  "dynamic": ["batch"] + (["height", "width"] if net.dynamic_hw else [])},
        "preprocessing": preprocessing.manifest() if preprocessing else None,
        "modes": {m: {"outputs": [entries[n] for n in outputs[m]]} for m in modes},
        "formats": list(formats),
        "files": dict(sorted(rec.files.items())),
        "programs": dict(sorted(rec.programs.items())),
        "opset": rec.opset,
        "onnx": rec.onnx_info,
        "onnx_weights": onnx_weights if "onnx" in formats else None,
        "versions": versions(),
        "verification": rec.verification,
        "tolerance": tolerance_record([int(x.shape[0]) for x in inputs]),
        "flat_params": {"count": net.num_params(), "dtype": "float32",
                        "layout": param_layout(net, rec.onnx_names)},
        "timing": {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "seconds": {k: round(v, 3) for k, v in seconds.items()}},
    }, "the manifest being written")
    write_manifest(out_dir, manifest)
    return ExportResult(out_dir, manifest, rec.failures)


def _write_files(net: MammothBackbone, out_dir: Path, modes: Sequence[str], formats: Sequence[str],
                 shape: Tuple[int, ...], opset: Optional[int], device: str, preprocess, inputs,
                 onnx_weights: str, aoti_batches: Sequence[Optional[int]], pte_max_batch: int, pte_params: bool,
                 aoti_weights: str, rec: "_Record", timed, fresh: Optional[FreshTorchCheck]) -> None:
    """Every file of the set, written and verified against eager; with `fresh`, the TorchScript
    and torch.export files are written first and checked by that fresh process while the ONNX
    conversion runs here."""
    full_names = net.output_names()
    outputs = mode_outputs(full_names)
    # 1. trace once; every mode's program is the same graph with fewer outputs
    full_program = None
    if {"exported", "aoti", "onnx"} & set(formats):
        with timed("torch_export"):
            full_program = export_program(net, "full", shape, device, preprocess)
    with timed("eager"):
        expected = {m: eager_outputs(net, m, inputs, device, preprocess) for m in modes}

    # 2. what each format writes from, per mode (ONNX: converted when its turn comes)
    def artifacts(fmt: str) -> Dict[str, Any]:
        if fmt == "torchscript":
            return {m: make_head(net, m, preprocess) for m in modes}
        if fmt == "exported":
            with timed("torch_export"):
                return {m: derive_program(full_program, m, full_names) for m in modes}
        return _onnx_models(net, out_dir, modes, full_program, opset, onnx_weights, rec, timed)

    # 3. write each file and verify it against eager (the fresh process's formats first, the
    #    programs, slowest to load, before all)
    order = [f for f in formats if f not in ("aoti", "pte")]
    if fresh is not None:
        order.sort(key=lambda f: (f not in FRESH_FORMATS, f != "exported"))
    for fmt in order:
        handed = artifacts(fmt)
        for mode in modes:
            path = out_dir / artifact_name(mode, fmt)
            with timed(f"{fmt}_write"), atomic_path(path) as tmp:
                get_format(fmt).write(handed[mode], tmp)
            if fmt == "exported":
                rec.programs[path.name] = {"format": fmt, "mode": mode, "batch": None, "dynamic": dynamic_dims(net)}
            if fresh is not None and fmt in FRESH_FORMATS:
                fresh.add(fmt, mode, path, outputs[mode], inputs, expected[mode])
                continue
            with timed(f"{fmt}_verify"):
                rec.add(fmt, mode, path, verify_file(fmt, path, outputs[mode], inputs, expected[mode], device))
    if fresh is not None:
        with timed("fresh_verify"):
            for fmt, mode, path, result in fresh.results():
                rec.add(fmt, mode, path, result)
    if "pte" in formats:
        _write_pte(net, out_dir, modes, pte_max_batch, shape, device, preprocess, rec, timed, pte_params)
    if "aoti" in formats:
        _write_aoti(net, out_dir, modes, aoti_batches, full_program, shape, device, preprocess, rec, timed,
                    aoti_weights)


def _onnx_models(net: MammothBackbone, out_dir: Path, modes: Sequence[str], full_program, opset: Optional[int],
                 onnx_weights: str, rec: "_Record", timed) -> Dict[str, Any]:
    """The 'full' program converted to ONNX once, and each mode's graph derived from it; the
    parameter names and runtime requirements go to `rec`."""
    from export.formats.onnx import export_onnx, runtime_requirements

    with timed("onnx_export"):
        converted = export_onnx(net, full_program, opset=opset,
                                weights_dir=out_dir if onnx_weights == "shared" else None)
    if onnx_weights == "shared":
        rec.files[SHARED_WEIGHTS] = file_entry(out_dir / SHARED_WEIGHTS)
    rec.onnx_names, rec.opset, rec.onnx_info = (converted.param_names, converted.opset,
                                                runtime_requirements(converted.models["full"]))
    return {m: converted.models[m] for m in modes}


class _Record:
    """What the manifest says of the files written so far, and which failed verification."""

    def __init__(self, formats: Sequence[str]) -> None:
        self.files: Dict[str, FileEntry] = {}
        self.programs: Dict[str, Dict[str, Any]] = {}  # file -> format, mode, batch, dynamic, ...
        self.verification: Dict[str, Dict[str, Any]] = {f: {} for f in formats}
        self.failures: List[str] = []
        #: ONNX: the graphs' parameter names, the opset and the runtime requirements
        self.onnx_names: Dict[str, str] = {}
        self.opset: Optional[int] = None
        self.onnx_info: Optional[Dict[str, Any]] = None

    def add(self, fmt: str, key: str, path: Path, result: Dict[str, Any]) -> None:
        self.verification[fmt][key] = result
        bad = [n for n, s in result.items() if not s["ok"]]
        errors = sorted({s["error"] for s in result.values() if "error" in s})
        if bad:
            self.failures.append(f"{path.name}: {', '.join(bad)} differ from eager beyond "
                                 f"{ATOL:g}*max|eager| + {RTOL:g}*|eager|" + (f" ({errors[0]})" if errors else ""))
        self.files[path.name] = file_entry(path)


class _Timer:
    """Adds the seconds of a `with` block to `seconds[key]`."""

    def __init__(self, seconds: Dict[str, float], key: str) -> None:
        self.seconds, self.key = seconds, key

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.seconds[self.key] = self.seconds.get(self.key, 0.0) + time.perf_counter() - self.start


def _write_aoti(net: MammothBackbone, out_dir: Path, modes: Sequence[str], batches: Sequence[Optional[int]],
                full_program, shape: Tuple[int, ...], device: str, preprocess, rec: _Record, timed,
                weights: str = "replaceable") -> None:
    """Compile the AOTInductor packages of every mode (any batch, and/or per batch size: one
    trace per fixed batch, shared by the modes), then verify them all in one fresh process at
    batch sizes they were not traced with (a fixed-batch package: at its own batch)."""
    from export.formats.aoti import verify_fresh

    full_names = net.output_names()
    outputs = mode_outputs(full_names)
    baked = preprocess is not None
    jobs: List[tuple] = []
    for batch in batches:
        traced = full_program
        # a frozen per-batch package fixes H x W too: only with every size static does inductor
        # prepack the convolution weights into oneDNN's blocked layout when compiling; otherwise
        # each call reorders every weight (CIFAR ResNet-18, batch 1, Zen 4: 20 reorders, 2.8-4.1 ms
        # of a 6.4 ms call)
        fixed_hw = batch is not None and weights == "frozen"
        if batch is not None:
            with timed("torch_export"):
                traced = export_program(net, "full", shape, device, preprocess, batch=batch, fixed_hw=fixed_hw)
        for mode in modes:
            path = out_dir / aoti_name(mode, batch)
            with timed("aoti_compile"), atomic_path(path) as tmp:
                info = get_format("aoti").write(derive_program(traced, mode, full_names), tmp,
                                                metadata={"returnt": mode, "batch": str(batch or "dynamic")},
                                                weights=weights)
            rec.programs[path.name] = {"format": "aoti", "mode": mode, "batch": batch,
                                       "dynamic": dynamic_dims(net, batch, fixed_hw), **info}
            ins = sample_inputs(shape, images=baked, **({} if batch is None else {"batches": (batch,)}))
            jobs.append((path, outputs[mode], ins, eager_outputs(net, mode, ins, device, preprocess)))
    with timed("aoti_verify"):
        results = verify_fresh(jobs, device)
    for (path, *_), result in zip(jobs, results):
        rec.add("aoti", path.name, path, result)


def _write_pte(net: MammothBackbone, out_dir: Path, modes: Sequence[str], max_batch: int,
               shape: Tuple[int, ...], device: str, preprocess, rec: _Record, timed, params: bool = True) -> None:
    """Lower every mode to an XNNPACK ExecuTorch program from one trace with the batch bounded
    by `max_batch` and H x W fixed (ExecuTorch plans memory for the bounds), then verify them
    all with ExecuTorch's runtime in one fresh process at batch 1, 3 and `max_batch`."""
    from export.formats.pte import verify_fresh

    full_names = net.output_names()
    outputs = mode_outputs(full_names)
    with timed("torch_export"):
        traced = export_program(net, "full", shape, "cpu", preprocess, max_batch=max_batch, fixed_hw=True)
    batches = sorted({b for b in (1, _LARGEST_BATCH, max_batch) if b <= max_batch})
    ins = sample_inputs(shape, images=preprocess is not None, batches=batches)
    expected = {m: eager_outputs(net, m, ins, device, preprocess) for m in modes}
    jobs: List[tuple] = []
    for mode in modes:
        path = out_dir / artifact_name(mode, "pte")
        with timed("pte_lower"), atomic_path(path) as tmp:
            info = get_format("pte").write(derive_program(traced, mode, full_names), tmp, max_batch=max_batch,
                                           flat_params=net.get_params().cpu() if params else None)
        rec.programs[path.name] = {"format": "pte", "mode": mode, "batch": 1 if max_batch == 1 else None,
                                   "dynamic": dynamic_dims(net, 1 if max_batch == 1 else None, fixed_hw=True),
                                   **info}
        jobs.append((path, outputs[mode], ins, expected[mode]))
    with timed("pte_verify"):
        results = verify_fresh(jobs)
    for mode, (path, *_), result in zip(modes, jobs, results):
        rec.add("pte", mode, path, result)


def _output_entries(net: MammothBackbone, input_shape: Tuple[int, ...], device: str) -> Dict[str, Dict[str, Any]]:
    """Name, symbolic shape and (for stages) the module and spatial reduction of every output.

    A stage of a network with free H and W has spatial size ceil(height / reduction) or
    floor(height / reduction) (which one depends on its padding: both are measured, at the
    export's size and one pixel more); `shape_at_export` is the concrete shape (batch 1).
    """
    def full_shapes(shape):
        with torch.no_grad():
            return [tuple(t.shape) for t in net(torch.zeros(1, *shape, device=device), returnt="full")]

    at_export = full_shapes(input_shape)
    bigger = tuple(input_shape[:1]) + tuple(d + 1 for d in input_shape[1:])
    at_bigger = full_shapes(bigger) if net.dynamic_hw and len(input_shape) == 3 else at_export
    entries = {}
    for i, (name, example, other) in enumerate(zip(net.output_names(), at_export, at_bigger)):
        entry: Dict[str, Any] = {"name": name, "shape": ["batch", *example[1:]],
                                 "shape_at_export": [1, *example[1:]]}
        if i < len(net.stages):
            entry["module"] = net.stages[i].name
        if len(example) == 4 and len(input_shape) == 3 and example[2]:
            r = input_shape[1] // example[2]
            entry["reduction"] = r
            if net.dynamic_hw:
                rounded = {"ceil": [-(-n // r) for n in bigger[1:]], "floor": [n // r for n in bigger[1:]]}
                rounding = next((f for f, hw in rounded.items() if hw == list(other[2:4])), None)
                entry["shape"][2:] = (["height", "width"] if r == 1 else
                                      [f"{rounding}(height/{r})", f"{rounding}(width/{r})"] if rounding
                                      else [None, None])
        entries[name] = entry
    return entries




def versions() -> Dict[str, str]:
    import onnx
    import onnxruntime
    import onnxscript

    import zoo

    return {"torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "onnxscript": onnxscript.__version__,
            "returnt_zoo": zoo.__version__}


def param_layout(net: MammothBackbone, onnx_names: Dict[str, str]) -> List[Dict[str, Any]]:
    """name, shape, offset, length in eager parameters() order, the names the parameter has in
    torch.export programs and AOTInductor packages (`program_names`) and the ONNX initializer
    that holds it (`onnx_name`)."""
    aliases = parameter_aliases(net)
    layout, offset = [], 0
    for name, p in net.named_parameters():
        entry = {"name": name, "shape": list(p.shape), "offset": offset, "length": p.numel(),
                 "program_names": aliases[name]}
        if name in onnx_names:
            entry["onnx_name"] = onnx_names[name]
        layout.append(entry)
        offset += p.numel()
    return layout
