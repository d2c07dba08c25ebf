"""`python -m export loadtest URL --model NAME`: a bounded load on an Open Inference Protocol
server (ours or Triton); every answer checked against the first one."""

import argparse
import asyncio
import json
from pathlib import Path
from typing import Sequence

from export.cli.options import check_option
from export.serving.loadtest import run_load
from export.store.atomic import write_json


def loadtest_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export loadtest",
        description="A bounded load on an Open Inference Protocol server: throughput, p50/p95/p99 "
                    "latency and errors; every answer is checked against the first one.",
        epilog="Example: python -m export loadtest http://127.0.0.1:8000 --model resnet --requests 2000 "
               "--concurrency 32 --json artifacts/loadtest.json")
    p.add_argument("url", help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="model name (the backbone's name)")
    p.add_argument("--requests", type=int, default=1000, help="requests to send (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight (default: %(default)s)")
    p.add_argument("--batch", type=int, default=1, help="images per request (default: %(default)s)")
    p.add_argument("--returnt", default=None, help="parameters.returnt of every request (default: logits)")
    p.add_argument("--json-tensors", action="store_true",
                   help="send and receive JSON number lists instead of the binary tensor extension")
    p.add_argument("--timeout-s", type=float, default=30.0, help="per request (default: %(default)s)")
    p.add_argument("--duration-s", type=float, default=600.0,
                   help="stop sending after this long (default: %(default)s)")
    p.add_argument("--json", type=Path, help="write the report here")
    return p


def run_loadtest(argv: Sequence[str]) -> int:
    ns = loadtest_parser().parse_args(argv)
    for flag in ("requests", "concurrency", "batch"):
        check_option(f"--{flag}", getattr(ns, flag), getattr(ns, flag) >= 1, "an integer >= 1")
    for flag in ("timeout_s", "duration_s"):
        check_option(f"--{flag.replace('_', '-')}", getattr(ns, flag), getattr(ns, flag) > 0, "a number > 0")
    check_option("URL", repr(ns.url), ns.url.startswith(("http://", "https://")), "http://HOST:PORT")
    result = asyncio.run(run_load(ns.url, ns.model, ns.requests, ns.concurrency, ns.batch, ns.timeout_s,
                                  ns.duration_s, ns.returnt, binary=not ns.json_tensors, progress=True))
    report = {"url": ns.url, "model": ns.model, "concurrency": ns.concurrency, **result.report()}
    print(json.dumps(report, indent=2))
    if ns.json:
        write_json(ns.json, report)
    return 1 if result.errors or result.wrong else 0
