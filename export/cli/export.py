"""The export command: `python -m export BACKBONE [backbone arguments] [options]`, `--checkpoint
FILE` (a Mammoth run: backbone, arguments and dataset read from it) or `--all`. Options are
checked before any work; the backbone's own arguments come from the registry
(`python -m export BACKBONE --help` lists them)."""

import argparse
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from export.cli.options import CliError, check_dir_name, parse_aoti_batches, parse_list
from export.errors import ExportError, first_line
from export.formats import DEFAULT_FORMATS, FORMATS
from export.formats.aoti import AOTI_WEIGHTS
from export.pipeline import preprocessing
from export.pipeline.build import (
    ONNX_WEIGHTS,
    VERIFY_IN,
    ExportResult,
    check_device,
    check_opset,
    check_pte_max_batch,
    default_preprocessing,
    export_backbone,
    formats_for,
    nonfinite_problem,
)
from export.pipeline.checkpoint import Checkpoint, read_checkpoint
from export.tools.tables import format_table
from zoo.base import RETURNT_MODES, backbone_name
from zoo.registry import REGISTRY, BackboneEntry, get_entry, list_backbones, normalise_name
from zoo.unit_scale import set_unit_scale
from zoo.weights import load_state_dict_strict


def _default_verify_in() -> str:
    chosen = os.environ.get("RETURNT_ZOO_VERIFY_IN")
    if chosen:
        if chosen not in VERIFY_IN:
            raise CliError(f"RETURNT_ZOO_VERIFY_IN={chosen!r}: allowed: {', '.join(sorted(VERIFY_IN))}")
        return chosen
    return "fresh" if (os.cpu_count() or 1) >= 2 else "process"


def _base_parser(add_help: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export", add_help=add_help,
        description="Export a returnt-zoo backbone: per returnt mode a TorchScript file (.pt), an "
                    "ONNX graph (.onnx), a torch.export program (.ep.pt2) and, on request, an "
                    "AOTInductor package (.aoti.pt2), each verified against eager PyTorch, plus "
                    "manifest.json.",
        epilog="Subcommands (each with --help): verify DIR, params read|write, quantize DIR "
               "--calibration DATA, accuracy DIR --data X --labels Y, bench, serve DIR..., "
               "loadtest URL --model NAME, triton DIR... --repo REPO. "
               "Examples: python -m export resnet --depth 18; python -m export resnet18 "
               "--num_filters 32 --modes out,features; python -m export --checkpoint run_last.pt",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("backbone", nargs="?", help="registered backbone name (python -m zoo list)")
    parser.add_argument("--all", action="store_true", help="export every registered backbone")
    parser.add_argument("--modes", default=",".join(RETURNT_MODES),
                        help="comma-separated returnt modes (default: %(default)s)")
    parser.add_argument("--formats", default=None,
                        help=f"comma-separated formats out of {', '.join(FORMATS)} (default: "
                             f"{','.join(DEFAULT_FORMATS)}, less those a backbone cannot have: timm "
                             "backbones do not script; aoti compiles C++, tens of seconds per package)")
    parser.add_argument("--aoti-batch", default="dynamic", metavar="SIZES",
                        help="AOTInductor packages per mode: 'dynamic' (<mode>.aoti.pt2, any batch) "
                             "and/or batch sizes (<mode>.aoti.b<N>.pt2, compiled for batch N only; "
                             "measured no faster on CIFAR ResNet-18), e.g. 1,64 or dynamic,1 (default: %(default)s)")
    parser.add_argument("--aoti-weights", default="replaceable", choices=AOTI_WEIGHTS,
                        help="AOTInductor package kind: replaceable (set_params and published versions "
                             "swap the weights in memory) or frozen (oneDNN convolutions with BatchNorm and "
                             "residual adds fused, the weights folded in: fastest, 2.5-2.8x the replaceable "
                             "package at batch 1 with --aoti-batch 1 on CIFAR ResNet-18; with --aoti-batch N "
                             "it also fixes the input's H x W, so the weights are prepacked; set_params is "
                             "refused) (default: %(default)s)")
    parser.add_argument("--verify-in", choices=VERIFY_IN, default=_default_verify_in(),
                        help="where the TorchScript and torch.export files are loaded and checked: fresh "
                             "(a new Python without the zoo, running on another core during the ONNX "
                             "conversion) or process (this one: less CPU, for 1-core machines and test "
                             "suites); default: fresh with 2+ cores, else process, or $RETURNT_ZOO_VERIFY_IN "
                             "(now: %(default)s)")
    parser.add_argument("--pte-max-batch", type=int, default=64, metavar="N",
                        help="with --formats pte: the largest batch <mode>.pte takes (ExecuTorch plans "
                             "its memory for it; H and W are the export's), 1-4096 (default: %(default)s)")
    parser.add_argument("--pte-without-params", dest="pte_params", action="store_false",
                        help="with --formats pte: leave out each file's get_params method (a copy of the flat "
                             "parameter vector; XNNPACK's packed weights are not it): smaller files, and the "
                             "vector is then read from the other formats")
    parser.add_argument("--checkpoint", type=Path, help="weights: a backbone state_dict (.pt, "
                        ".safetensors) or a Mammoth run checkpoint (backbone and args read from it)")
    parser.add_argument("--allow-unsafe-pickle", action="store_true",
                        help="load a checkpoint that is not weights-only (runs code from the file: "
                             "only for files you trust, e.g. Mammoth's old pickle format)")
    parser.add_argument("--input-shape", help="C,H,W of the example input (default: the backbone's)")
    parser.add_argument("--onnx-weights", choices=ONNX_WEIGHTS, default="embedded",
                        help="embedded: every ONNX file self-contained (default); shared: one "
                             "weights.onnx.data that every mode's graph reads (weights stored once; "
                             "always used for models of 2 GiB or more)")
    parser.add_argument("--opset", type=int, help="ONNX opset, 18 up to the newest the installed "
                        "onnx knows (default: the exporter's)")
    parser.add_argument("--out", type=Path, default=Path("artifacts"),
                        help="parent directory of the export directories (default: %(default)s)")
    parser.add_argument("--name", help="export directory name under --out, not a path (default: "
                        "backbone name + a tag of the arguments that differ from the defaults)")
    parser.add_argument("--device", default="cpu", help="device for eager/TorchScript and the "
                        "onnxruntime provider (cpu, cuda, cuda:N)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights when no "
                        "checkpoint is given (default: %(default)s)")
    parser.add_argument("--dataset", help="Mammoth dataset the weights were trained on (e.g. "
                        "seq-cifar10): its input normalisation goes into the manifest (default: "
                        "the checkpoint's args['dataset'])")
    parser.add_argument("--mean", help="input normalisation mean, one value per channel "
                        "(e.g. 0.4914,0.4822,0.4465); with --std, instead of --dataset's")
    parser.add_argument("--std", help="input normalisation std, one value per channel")
    parser.add_argument("--bake-preprocessing", action="store_true",
                        help="put the normalisation into every graph: the exported files then "
                             "take [0, 1] RGB images")
    parser.add_argument("--example-args", action="store_true",
                        help="fill required backbone arguments that are not given with the "
                             "registry's example values (resnet: --depth 18); `make export` uses it")
    return parser


def dir_name(entry: BackboneEntry, kwargs: Dict[str, Any]) -> str:
    """`resnet18`, or `resnet18-num_filters8` when arguments differ from their defaults (for a
    required argument: from the registry's example, so `resnet --depth 18` is `resnet`)."""
    tag = []
    for a in entry.args:
        usual = entry.example.get(a.name) if a.required else a.default
        if a.name in kwargs and kwargs[a.name] != usual and a.name != "weights":
            tag.append(f"{a.name}{kwargs[a.name]}".replace("/", "_"))
    return "-".join([entry.name] + tag)


def _parse_shape(text: Optional[str]) -> Optional[tuple]:
    if not text:
        return None
    try:
        shape = tuple(int(t) for t in text.replace("x", ",").split(","))
    except ValueError:
        raise CliError(f"--input-shape {text!r}: expected C,H,W integers, e.g. 3,32,32") from None
    if any(d <= 0 for d in shape):
        raise CliError(f"--input-shape {text!r}: dimensions must be positive")
    return shape


def _args_from_checkpoint(entry: BackboneEntry, ckpt: Checkpoint) -> Dict[str, Any]:
    return {a.name: ckpt.args[a.name] for a in entry.args
            if a.name in ckpt.args and ckpt.args[a.name] is not None}


def _parse_full(name: str, argv: Sequence[str]):
    """The whole command line, with the backbone's own (registry-inferred) options: only the
    ones given appear in the namespace."""
    entry = get_entry(name)
    parser = _base_parser(add_help=True)
    REGISTRY.add_argparse_group(parser, entry.name, required=False, only_given=True)
    return entry, parser.parse_args(argv)


def _build(entry: BackboneEntry, ns: argparse.Namespace, ckpt: Optional[Checkpoint], seed: int,
           use_examples: bool = False):
    """Build the backbone: arguments given on the command line, else from the checkpoint, else
    the defaults (or, for required ones with `use_examples`, the registry's examples)."""
    kwargs = _args_from_checkpoint(entry, ckpt) if ckpt else {}
    kwargs.update({a.name: getattr(ns, a.name) for a in entry.args if hasattr(ns, a.name)})
    for a in entry.args:
        if a.name not in kwargs and not a.required:
            kwargs[a.name] = a.default
        elif a.name not in kwargs and use_examples and a.name in entry.example:
            kwargs[a.name] = entry.example[a.name]
            print(f"note: {a.flag} not given, using the example value {entry.example[a.name]!r}",
                  file=sys.stderr)
    missing = [a for a in entry.args if a.required and a.name not in kwargs]
    if missing:
        a = missing[0]
        example = entry.example.get(a.name, "...")
        raise CliError(f"backbone {entry.name!r} needs {a.flag} ({a.type.__name__}); e.g. "
                       f"python -m export {entry.name} {a.flag} {example}  or  "
                       f"make export BACKBONE={entry.name} ARGS='{a.flag} {example}'")
    torch.manual_seed(seed)
    try:
        net = REGISTRY.build(entry.name, **kwargs)
    except (TypeError, ValueError, ImportError) as exc:  # bad arguments; a family's missing extra
        raise CliError(str(exc)) from None
    return entry, net, kwargs


def _source(ckpt: Optional[Checkpoint], seed: int) -> Dict[str, Any]:
    if ckpt is None:
        return {"weights": f"random (seed {seed}), BatchNorm statistics from a forward pass"}
    from export.store.manifest import sha256

    return {"weights": ckpt.kind, "checkpoint": ckpt.path.name, "checkpoint_sha256": sha256(ckpt.path)}


def run_export(argv: Sequence[str]) -> int:
    first, _ = _base_parser(add_help=False).parse_known_args(argv)
    if first.all:
        return run_all(first)
    # every option is checked before any work (a checkpoint read, a build, an export)
    parse_list(first.modes, RETURNT_MODES, "mode")
    if first.formats is not None and "pte" in parse_list(first.formats, FORMATS, "format"):
        from export.formats.pte import executorch_version

        executorch_version()  # the extra to install, before any work
    parse_aoti_batches(first.aoti_batch)
    check_pte_max_batch(first.pte_max_batch)
    check_device(first.device)
    check_opset(first.opset)
    _parse_shape(first.input_shape)
    if first.name is not None:
        check_dir_name(first.name)
    ckpt = None
    if first.checkpoint:
        ckpt = read_checkpoint(first.checkpoint, first.allow_unsafe_pickle)
        problem = nonfinite_problem(ckpt.state_dict)
        if problem:
            raise CliError(f"checkpoint {str(ckpt.path)!r} has {problem}: nothing to export "
                           "(a diverged run?)")
    name = first.backbone or (ckpt.backbone if ckpt else None)
    if not name:
        if "-h" in argv or "--help" in argv:
            _base_parser(add_help=True).parse_args(argv)
        hint = " (the checkpoint names none: give it)" if ckpt else ""
        raise CliError(f"no backbone given{hint}; choose one of: {', '.join(list_backbones())}")
    if ckpt and first.backbone and ckpt.backbone and normalise_name(first.backbone) != normalise_name(ckpt.backbone):
        print(f"note: checkpoint was trained with backbone {ckpt.backbone!r}; exporting "
              f"{first.backbone!r} as asked", file=sys.stderr)
    try:
        get_entry(name)
    except KeyError as exc:
        raise CliError(exc.args[0]) from None
    entry, opts = _parse_full(name, argv)  # the options as the full parser reads them
    entry, net, kwargs = _build(entry, opts, ckpt, opts.seed, opts.example_args)
    if ckpt:
        load_state_dict_strict(net, ckpt.state_dict, what=f"checkpoint {str(ckpt.path)!r}")
    else:
        set_unit_scale(net, tuple(net.input_shape), opts.seed)
    out_dir = opts.out / (check_dir_name(opts.name) if opts.name is not None else dir_name(entry, kwargs))
    dataset = opts.dataset
    trained_on = ckpt.args.get("dataset") if ckpt else None
    if dataset is None and isinstance(trained_on, str):
        if trained_on in preprocessing.MAMMOTH_DATASETS:
            dataset = trained_on
        elif opts.mean is None:
            print(f"note: the checkpoint's dataset {trained_on!r} is not in the normalisation table; "
                  "the manifest records none (give --mean/--std)", file=sys.stderr)
    prep = preprocessing.resolve(net.input_shape[0], dataset, opts.mean, opts.std, opts.bake_preprocessing,
                                 default_preprocessing(net))
    result = _export(net, out_dir, opts, _source(ckpt, opts.seed), prep)
    _print_result(result)
    return 0 if result.ok else 1


def _formats(net, opts) -> List[str]:
    """The formats asked for (a format the backbone cannot have: one line), or the defaults it
    can have, naming those left out."""
    formats = formats_for(net, parse_list(opts.formats, FORMATS, "format") if opts.formats else None)
    if opts.formats is None:
        for fmt, why in sorted(getattr(net, "unsupported_formats", {}).items()):
            if fmt in DEFAULT_FORMATS:
                print(f"note: no {fmt} file for {backbone_name(net)}: {why}", file=sys.stderr)
    return formats


def _export(net, out_dir: Path, opts, source, prep=None) -> ExportResult:
    return export_backbone(net, out_dir, modes=parse_list(opts.modes, RETURNT_MODES, "mode"),
                           formats=_formats(net, opts),
                           input_shape=_parse_shape(opts.input_shape), opset=opts.opset,
                           device=opts.device, source=source, preprocessing=prep,
                           onnx_weights=opts.onnx_weights, aoti_batches=parse_aoti_batches(opts.aoti_batch),
                           pte_max_batch=opts.pte_max_batch, pte_params=opts.pte_params,
                           aoti_weights=opts.aoti_weights, verify_in=opts.verify_in)


def _print_result(result: ExportResult) -> None:
    m = result.manifest
    secs = m.timing["seconds"]
    if result.ok:
        onnx = f" (onnx export {secs['onnx_export']:.1f}s)" if "onnx_export" in secs else ""
        files = f"{len(m.files)} file{'' if len(m.files) == 1 else 's'}"
        print(f"{result.directory}: {files}, max |exported-eager| "
              f"{result.max_error():.2g}, {sum(secs.values()):.1f}s{onnx}")
        return
    for failure in result.failures:
        print(f"FAILED {failure}", file=sys.stderr)
    print(f"{result.directory}: not changed (nothing of this export was kept)", file=sys.stderr)


def run_all(opts) -> int:
    from tqdm import tqdm

    rows: List[List[str]] = []
    failed = skipped = 0
    names = list_backbones()
    for name in (bar := tqdm(names, desc="export", unit="backbone", file=sys.stderr, disable=None)):
        bar.set_postfix_str(name)
        t = time.perf_counter()
        cannot = sorted(set(parse_list(opts.formats, FORMATS, "format") if opts.formats else [])
                        & set(REGISTRY.entry(name).unsupported_formats))
        if cannot:
            skipped += 1
            rows.append([name, opts.modes, opts.formats, "-", "-",
                         f"skipped: no {cannot[0]}: {REGISTRY.entry(name).unsupported_formats[cannot[0]]}"])
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # pretrained variants, no weights
                torch.manual_seed(opts.seed)
                net = REGISTRY.build(name, **REGISTRY.entry(name).example)
                set_unit_scale(net, tuple(net.input_shape), opts.seed)
            result = _export(net, opts.out / name, opts, _source(None, opts.seed))
            status = "ok" if result.ok else "FAILED: " + "; ".join(result.failures)
            err = f"{result.max_error():.1e}"
        except Exception as exc:  # keep going: one backbone's failure must not stop the rest
            status, err = f"FAILED: {type(exc).__name__}: {first_line(exc, 100)}", "-"
            if not isinstance(exc, ExportError):  # a bug, not a bad input: its traceback, for the report
                traceback.print_exc(file=sys.stderr)
        failed += status != "ok"
        rows.append([name, opts.modes, opts.formats or "default", f"{time.perf_counter() - t:.1f}", err, status])
        # a line per backbone: the progress a log gets (the bar shows only on a terminal)
        bar.write(f"{name}: {status.splitlines()[0][:120]} ({rows[-1][3]} s)", file=sys.stderr)
    print(format_table(["backbone", "modes", "formats", "seconds", "max error", "status"], rows))
    print(f"{len(rows) - failed - skipped} exported, {failed} failed"
          + (f", {skipped} skipped (a format they cannot have)" if skipped else ""))
    return 1 if failed else 0
