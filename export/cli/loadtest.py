"""`python -m export loadtest URL --model NAME`: a bounded load on an Open Inference Protocol
server (ours or Triton); every answer checked against the first one."""

import argparse
import asyncio
import json
from pathlib import Path
from typing import Sequence

from export.cli.options import check_option
from export.serving.loadtest import PROTOCOLS, cpu_ms_per_request, parse_input_shape, process_cpu_s, run_load
from export.store.atomic import write_json


def loadtest_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export loadtest",
        description="A bounded load on an Open Inference Protocol server (HTTP or gRPC): throughput, "
                    "p50/p95/p99 latency and errors; requests and answers go through tritonclient's own "
                    "encoder and decoder, and every answer is checked against the first one.",
        epilog="Examples: python -m export loadtest http://127.0.0.1:8000 --model resnet --requests 2000 "
               "--concurrency 32 --json artifacts/loadtest.json; python -m export loadtest 127.0.0.1:8001 "
               "--protocol grpc --model resnet")
    p.add_argument("url", help="server address: http://HOST:PORT for http, HOST:PORT for grpc")
    p.add_argument("--protocol", default="http", choices=PROTOCOLS, help="(default: %(default)s)")
    p.add_argument("--model", required=True, help="model name (the backbone's name)")
    p.add_argument("--requests", type=int, default=1000, help="requests to send (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight (default: %(default)s)")
    p.add_argument("--batch", type=int, default=1, help="images per request (default: %(default)s)")
    p.add_argument("--returnt", default=None, help="parameters.returnt of every request (default: logits)")
    p.add_argument("--input-shape", default=None, metavar="C,H,W",
                   help="per-image input shape (default: the model's, or for any image size the size it was "
                        "exported at; gRPC metadata does not say that size)")
    p.add_argument("--json-tensors", action="store_true",
                   help="HTTP: send and receive JSON number lists instead of the binary tensor extension")
    p.add_argument("--timeout-s", type=float, default=30.0, help="per request (default: %(default)s)")
    p.add_argument("--duration-s", type=float, default=600.0,
                   help="stop sending after this long (default: %(default)s)")
    p.add_argument("--server-pid", type=int, default=None,
                   help="pid of the `serve` command on this machine: report the CPU milliseconds per request of "
                        "each of its processes (proxy, ingress, replicas) during the load")
    p.add_argument("--rollout", nargs=2, metavar=("DIR", "VERSION"),
                   help="roll the deployment serving export directory DIR to weight VERSION once a third of the "
                        "requests were sent (python -m export rollout): report its time to every replica and "
                        "requests/s before, during and after; answers are checked per model_version")
    p.add_argument("--address", default=None, help="with --rollout: the Ray cluster (as rollout --address)")
    p.add_argument("--json", type=Path, help="write the report here")
    return p


def run_loadtest(argv: Sequence[str]) -> int:
    ns = loadtest_parser().parse_args(argv)
    for flag in ("requests", "concurrency", "batch"):
        check_option(f"--{flag}", getattr(ns, flag), getattr(ns, flag) >= 1, "an integer >= 1")
    for flag in ("timeout_s", "duration_s"):
        check_option(f"--{flag.replace('_', '-')}", getattr(ns, flag), getattr(ns, flag) > 0, "a number > 0")
    if ns.protocol == "http":
        check_option("URL", repr(ns.url), ns.url.startswith(("http://", "https://")), "http://HOST:PORT")
    else:
        check_option("URL", repr(ns.url), not ns.url.startswith(("http://", "https://")) and ":" in ns.url,
                     "HOST:PORT for --protocol grpc")
        check_option("--json-tensors", "with --protocol grpc", not ns.json_tensors,
                     "it with --protocol http only (gRPC sends raw tensors)")
    shape = None
    if ns.input_shape is not None:
        try:
            shape = parse_input_shape(ns.input_shape)
        except ValueError:
            check_option("--input-shape", repr(ns.input_shape), False, "positive integers like 3,224,224")
    rollout_during = None
    if ns.rollout is not None:
        from export.serving.rollout import connect, rollout

        directory, version = Path(ns.rollout[0]), ns.rollout[1]
        connect(ns.address, directory)  # before the load: joining Ray takes seconds

        def rollout_during():
            done = rollout(directory, version, ns.address)
            return f"version {done.version} on every replica in {done.seconds:.2f} s (was {done.previous})"
    before = process_cpu_s(ns.server_pid) if ns.server_pid is not None else None
    result = asyncio.run(run_load(ns.url, ns.model, ns.requests, ns.concurrency, ns.batch, ns.timeout_s,
                                  ns.duration_s, ns.returnt, binary=not ns.json_tensors, progress=True,
                                  protocol=ns.protocol, input_shape=shape, rollout_during=rollout_during))
    report = {"url": ns.url, "model": ns.model, "concurrency": ns.concurrency, **result.report()}
    if before is not None:
        report["server_cpu_ms_per_request"] = cpu_ms_per_request(before, process_cpu_s(ns.server_pid),
                                                                 result.sent)
    print(json.dumps(report, indent=2))
    if ns.json:
        write_json(ns.json, report)
    return 1 if result.errors or result.wrong else 0
