"""`python -m export bench` (`make bench`): every engine x precision on one backbone (default
CIFAR ResNet-18, 64 filters) at batch sizes 1, 8, 64, timed in interleaved rounds, then the
accuracy of each on a briefly trained model (scikit-learn's digits, no download). Every figure
is stamped with the CPU model and its kernel flags, the date and the commit."""

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, Sequence

import torch

from export.cli.options import check_option
from export.errors import ExportError
from export.store.atomic import write_json
from export.tools.bench import DIGITS_EPOCHS, format_report, plot, run_benchmark
from zoo.registry import get_entry


def run_bench(argv: Sequence[str]) -> int:
    from tqdm import tqdm

    parser = argparse.ArgumentParser(prog="python -m export bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", nargs="?", type=Path,
                        help="an export directory: time every engine x precision that runs its 'out' mode "
                             "here instead (loaded as export.runtime.load loads them)")
    parser.add_argument("--save", action="store_true",
                        help="with DIR: record the fastest engine per precision for this CPU in its manifest, "
                             "which load(DIR) (engine='auto') then uses")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--arg", action="append", default=[], metavar="NAME=VALUE",
                        help="backbone argument (default for resnet18: num_filters=64)")
    parser.add_argument("--batches", default="1,8,64", help="batch sizes (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="threads for every runtime (default: all cores, %(default)s)")
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="measuring time per runtime and batch, over all rounds; the fp32 matmul peak "
                             "is timed min(0.5, SECONDS/6) per size and runtime, at least 2 runs each "
                             "(default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=DIGITS_EPOCHS,
                        help="seeded training epochs of the digits model for the accuracy table: the same "
                             "model on every machine (0 skips the table; default: %(default)s, ~2 min on 2 cores)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--plot", type=Path, help="also plot images/s per runtime and batch size (PNG)")
    parser.add_argument("--no-aoti", dest="aoti", action="store_false",
                        help="skip the AOTInductor packages (compiling them takes ~1 min)")
    parser.add_argument("--no-pte", dest="pte", action="store_false",
                        help="skip the ExecuTorch rows (lowering fp32 and int8 takes ~40 s; they need the "
                             "edge extra)")
    args = parser.parse_args(argv)
    if args.save and args.directory is None:
        raise ExportError("--save records the fastest engine of an export directory: give one "
                          "(python -m export bench DIR --save)")
    try:
        entry = get_entry(args.backbone)
    except KeyError as exc:
        raise ExportError(exc.args[0]) from None
    kwargs: Dict[str, Any] = {"num_filters": 64} if entry.name == "resnet18" else {}
    for item in args.arg:
        key, _, value = item.partition("=")
        kwargs[key] = entry.arg(key).convert(value)
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        raise ExportError(f"--batches {args.batches!r}: expected comma-separated sizes, e.g. 1,8,64") from None
    check_option("--batches", args.batches, min(batches) >= 1, "sizes >= 1")
    check_option("--rounds", args.rounds, args.rounds >= 1, "an integer >= 1")
    check_option("--threads", args.threads, args.threads >= 1, "an integer >= 1")
    check_option("--seconds", args.seconds, args.seconds > 0, "a number > 0")
    check_option("--epochs", args.epochs, args.epochs >= 0, "an integer >= 0")
    log = lambda msg: tqdm.write(msg, file=sys.stderr)  # noqa: E731
    if args.directory is not None:
        return _bench_directory(args, batches, log)
    if args.pte:
        from export.formats.pte import executorch_version

        executorch_version()  # one line naming the extra (or --no-pte) before any work
    report = run_benchmark(entry.name, kwargs, batches, args.threads, args.seconds, args.rounds,
                           args.epochs, args.aoti, log, pte=args.pte)
    print(format_report(report))
    if args.json:
        write_json(args.json, report)
    if args.plot:
        plot(report, args.plot)
    return 0


def _bench_directory(args: argparse.Namespace, batches: Sequence[int], log) -> int:
    from export.store.manifest import MANIFEST
    from export.tools.bench import bench_directory, format_directory_report, save_engine_choice

    if not (args.directory / MANIFEST).is_file():
        raise ExportError(f"{args.directory}: not an export directory (no {MANIFEST})")
    report = bench_directory(args.directory, batches, args.threads, args.seconds, args.rounds, log)
    print(format_directory_report(report))
    if args.save:
        save_engine_choice(args.directory, report)
        print(f"saved in {args.directory / MANIFEST}: load(DIR) on {report['cpu']} now uses "
              + ", ".join(f"{c['engine']} for {p}" for p, c in report["fastest"].items()))
    if args.json:
        write_json(args.json, report)
    return 0
