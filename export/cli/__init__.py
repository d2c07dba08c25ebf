"""`python -m export`: the command line. One module per command (`export.cli.<command>`, each
with a `run_<command>(argv)`); this dispatcher imports only the one asked for (serve imports
Ray, bench OpenVINO). The library (`export.pipeline`, `export.runtime`, ...) never imports it.

    python -m export BACKBONE [--depth 18 ...] [--modes ...] [--formats ...] [--out artifacts]
    python -m export --checkpoint run_last.pt          # a Mammoth run: backbone + args from it
    python -m export --all                             # every registered backbone
    python -m export verify artifacts/resnet           # re-check files and numbers
    python -m export params read|write ...             # flat parameter vectors of exported files
    python -m export quantize artifacts/resnet --calibration inputs.npy   # int8 ONNX per mode
    python -m export accuracy artifacts/resnet --data x.npy --labels y.npy  # top-1 per engine x precision
    python -m export bench                             # every engine x precision, timed
    python -m export serve artifacts/resnet            # Ray Serve, Open Inference Protocol (KServe v2)
    python -m export loadtest http://127.0.0.1:8000 --model resnet   # bounded load on a server
    python -m export triton artifacts/resnet --repo triton-repo      # Triton model repository
    python -m export publish artifacts/resnet run_0.pt run_1.pt      # weight versions, verified
    python -m export versions artifacts/resnet [--keep 3]            # list / prune them
    python -m export rollout artifacts/resnet --version 2            # move a running deployment
    python -m export zoo-table [--names 'timm-*']                    # docs/zoo.md, measured here

`python -m export BACKBONE --help` lists that backbone's own arguments.
"""

import importlib
import sys
from typing import Optional, Sequence

from export.errors import ExportError
from zoo.weights import CheckpointError

#: subcommand -> its module under export.cli, with a run_<subcommand>(argv)
SUBCOMMANDS = ("verify", "params", "quantize", "accuracy", "bench", "serve", "loadtest", "triton", "publish",
               "versions", "rollout", "zoo-table")


def run() -> None:
    """`python -m export` and the console script: `main`, then exit without the interpreter's
    teardown of torch's modules (~2 s on every run of a process that used torch.export; the exit
    handlers still run, buffered output is flushed). With threads still running (a server's),
    the normal exit waits for them."""
    import atexit
    import os
    import threading

    code = main()
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can be written
            pass
    os._exit(code if isinstance(code, int) else 1)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        command = argv[0] if argv and argv[0] in SUBCOMMANDS else "export"
        module_name = command.replace("-", "_")
        module = importlib.import_module(f"export.cli.{module_name}")
        return getattr(module, f"run_{module_name}")(argv[1:] if command != "export" else argv)
    except (ExportError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no export directory was changed", file=sys.stderr)
        return 130
