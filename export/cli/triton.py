"""`python -m export triton DIR [DIR ...] --repo REPO`: Triton Inference Server model
repositories from export directories."""

import argparse
from pathlib import Path
from typing import Sequence

from export.cli.options import check_option, parse_list
from export.errors import ExportError
from export.serving.config import parse_versions_policy
from export.serving.triton import BACKENDS, write_repository


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
    p.add_argument("--versions", default="all", metavar="POLICY",
                   help="for directories with published weight versions: latest, all or N,M; each becomes "
                        "REPO/<model>/<n>/ with a matching version_policy (default: %(default)s)")
    p.add_argument("--queue-delay-us", type=int, default=5000,
                   help="dynamic_batching max_queue_delay_microseconds (default: %(default)s)")
    return p


def run_triton(argv: Sequence[str]) -> int:
    ns = triton_parser().parse_args(argv)
    backends = parse_list(ns.backends, list(BACKENDS), "--backends value")
    check_option("--max-batch-size", ns.max_batch_size, ns.max_batch_size >= 1, "an integer >= 1")
    check_option("--queue-delay-us", ns.queue_delay_us, ns.queue_delay_us >= 0, "an integer >= 0")
    for d in ns.directories:
        if not d.is_dir():
            raise ExportError(f"{d} is not a directory; expected an export directory (manifest.json)")
    parse_versions_policy(ns.versions)
    written = write_repository(ns.directories, ns.repo, backends, ns.max_batch_size, ns.queue_delay_us, ns.versions)
    for path in written:
        print(ns.repo / path.name)
    print(f"{len(written)} models in {ns.repo}")
    return 0
