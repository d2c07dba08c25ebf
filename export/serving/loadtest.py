"""`python -m export loadtest URL --model NAME`: a bounded load on an Open Inference Protocol
server (ours or Triton), over HTTP (binary tensors or JSON) or gRPC. Sends `--requests` copies of
one seeded input from `--concurrency` concurrent requests, stops at the count or `--duration-s`,
and reports throughput, latency percentiles and errors (JSON with `--json`).

Requests are encoded and answers decoded by tritonclient's own code (`tritonclient.http`'s
request body and response parser, `tritonclient.grpc.aio`), not by the server's: the two sides
cannot share a bug unnoticed. Every answer is checked: status, the model's outputs, finite
values, and the same numbers as the first answer (within the export's verification bound) - a
server that answers fast with wrong numbers shows up as `wrong`, not as throughput. Exit status
1 when any request failed or was wrong.
"""

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from export.errors import ExportError
from export.serving.oip import HEADER_LENGTH
from export.store.tolerance import error_stats  # the export's own bound

PROTOCOLS = ("http", "grpc")


@dataclass
class LoadResult:
    """Per-request outcomes of one load run and the summary `report` derives from them."""

    latencies_s: List[float] = field(default_factory=list)
    errors: Dict[str, int] = field(default_factory=dict)
    error_examples: Dict[str, str] = field(default_factory=dict)
    wrong: int = 0
    sent: int = 0
    elapsed_s: float = 0.0
    batch: int = 1
    protocol: str = "http"
    #: CPU seconds this process (the client) used during the run: on one machine, the
    #: client's share of the cores is not the server's
    client_cpu_s: float = 0.0
    #: (seconds since the start, model_version) of every correct answer
    answered: List[Tuple[float, str]] = field(default_factory=list)
    #: a rollout during the load (`rollout_during`): its start and end, seconds since the start
    rollout: Dict[str, Any] = field(default_factory=dict)

    def fail(self, kind: str, detail: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        self.error_examples.setdefault(kind, detail[:200])

    def report(self) -> Dict[str, Any]:
        ok = len(self.latencies_s)
        lat = np.asarray(self.latencies_s) * 1000.0
        pct = {f"p{q}_ms": round(float(np.percentile(lat, q)), 2) if ok else None for q in (50, 95, 99)}
        return {"protocol": self.protocol, "requests": self.sent, "ok": ok, "errors": dict(self.errors),
                "wrong": self.wrong, "error_examples": dict(self.error_examples),
                "seconds": round(self.elapsed_s, 3),
                "requests_per_s": round(ok / self.elapsed_s, 2) if self.elapsed_s else None,
                "images_per_s": round(ok * self.batch / self.elapsed_s, 2) if self.elapsed_s else None,
                "batch": self.batch, "client_cpu_ms_per_request": round(1000 * self.client_cpu_s / self.sent, 2)
                if self.sent else None, **pct,
                "mean_ms": round(float(lat.mean()), 2) if ok else None,
                "model_versions": {v: sum(1 for _, a in self.answered if a == v)
                                   for v in sorted({a for _, a in self.answered})},
                **({"rollout": self.rollout_report()} if self.rollout else {})}

    def rollout_report(self) -> Dict[str, Any]:
        """Requests/s before, during and after the rollout, and its time to every replica."""
        start, end = self.rollout.get("start_s", 0.0), self.rollout.get("end_s", self.elapsed_s)

        def rate(a: float, b: float) -> Optional[float]:
            n = sum(1 for t, _ in self.answered if a <= t < b)
            return round(n / (b - a), 2) if b > a else None

        return {**self.rollout, "requests_per_s_before": rate(0.0, start), "requests_per_s_during": rate(start, end),
                "requests_per_s_after": rate(end, self.elapsed_s)}


class Failure(Exception):
    """One request's failure: `kind` (the HTTP status, the gRPC status name, 'timeout', ...)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


def _input_dims(meta: Dict[str, Any], model: str, shape: Optional[Sequence[int]]) -> List[int]:
    """The per-image dims to send: `shape` when given, else the model's fixed dims, else (any
    image size) the size it was exported at, when the metadata says."""
    spec = meta["inputs"][0]
    dims = [int(d) for d in spec["shape"][1:]]
    if shape is not None:
        return list(shape)
    if any(d < 0 for d in dims):
        dims = (meta.get("parameters") or {}).get("input_shape_at_export", [None, *dims])[1:]
    if any(not isinstance(d, int) or d < 1 for d in dims):
        raise ExportError(f"model {model!r} takes inputs of shape {spec['shape']}; give the size to send "
                          "with --input-shape C,H,W")
    return dims


class HttpTarget:
    """POST /v2/models/{model}/infer with httpx; body and answer through tritonclient.http."""

    def __init__(self, url: str, model: str, concurrency: int, timeout_s: float) -> None:
        import httpx

        self.httpx = httpx
        self.base = url.rstrip("/")
        self.model = model
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self.client = httpx.AsyncClient(base_url=self.base, timeout=timeout_s, limits=limits)
        self.timeout_s = timeout_s

    async def metadata(self) -> Dict[str, Any]:
        try:
            return (await self.client.get(f"/v2/models/{self.model}")).raise_for_status().json()
        except self.httpx.HTTPStatusError as exc:
            answer = f"{exc.response.status_code} {exc.response.text.strip()}"
            raise ExportError(f"{self.base}: model {self.model!r}: {answer}") from None
        except self.httpx.HTTPError as exc:
            raise ExportError(f"cannot reach {self.base} ({type(exc).__name__}: {exc}); "
                              "is the server running?") from None

    def prepare(self, input_name: str, x: np.ndarray, outputs: Sequence[str], returnt: Optional[str],
                binary: bool) -> None:
        import tritonclient.http as th

        inp = th.InferInput(input_name, list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        requested = [th.InferRequestedOutput(n, binary_data=binary) for n in outputs]
        body, json_size = th.InferenceServerClient.generate_request_body(
            [inp], outputs=requested or None, parameters={"returnt": returnt} if returnt else None)
        self.body = body
        self.headers = {"Content-Type": "application/octet-stream" if json_size else "application/json"}
        if json_size:
            self.headers[HEADER_LENGTH] = str(json_size)
        self.parse = th.InferenceServerClient.parse_response_body

    async def infer(self) -> Tuple[str, Dict[str, np.ndarray]]:
        """(model_version, outputs) of one request."""
        try:
            resp = await self.client.post(f"/v2/models/{self.model}/infer", content=self.body, headers=self.headers)
        except self.httpx.TimeoutException as exc:
            raise Failure("timeout", f"{type(exc).__name__} after {self.timeout_s:g} s") from None
        except self.httpx.HTTPError as exc:
            raise Failure(type(exc).__name__, str(exc)) from None
        if resp.status_code != 200:
            raise Failure(str(resp.status_code), resp.text.strip())
        length = resp.headers.get(HEADER_LENGTH)
        result = self.parse(resp.content, header_length=int(length) if length else None)
        answer = result.get_response()
        return str(answer.get("model_version", "")), {o["name"]: result.as_numpy(o["name"]) for o in answer["outputs"]}

    async def close(self) -> None:
        await self.client.aclose()


class GrpcTarget:
    """ModelInfer over `tritonclient.grpc.aio` (raw tensor contents both ways)."""

    def __init__(self, url: str, model: str, concurrency: int, timeout_s: float) -> None:
        import tritonclient.grpc.aio as tga

        self.tga = tga
        self.url = url.split("://", 1)[-1].rstrip("/")
        self.model = model
        self.client = tga.InferenceServerClient(self.url)
        self.timeout_s = timeout_s

    async def metadata(self) -> Dict[str, Any]:
        from tritonclient.utils import InferenceServerException

        try:
            return await self.client.get_model_metadata(self.model, as_json=True, client_timeout=self.timeout_s)
        except InferenceServerException as exc:
            raise ExportError(f"grpc {self.url}: model {self.model!r}: {exc}; is the server running "
                              "with gRPC on that port?") from None

    def prepare(self, input_name: str, x: np.ndarray, outputs: Sequence[str], returnt: Optional[str],
                binary: bool) -> None:
        inp = self.tga.InferInput(input_name, list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        self.inputs = [inp]
        self.outputs = [self.tga.InferRequestedOutput(n) for n in outputs] or None
        self.parameters = {"returnt": returnt} if returnt else None

    async def infer(self) -> Tuple[str, Dict[str, np.ndarray]]:
        """(model_version, outputs) of one request."""
        from tritonclient.utils import InferenceServerException

        try:
            result = await self.client.infer(self.model, self.inputs, outputs=self.outputs,
                                             parameters=self.parameters, client_timeout=self.timeout_s)
        except InferenceServerException as exc:
            status = exc.status() or "error"
            kind = "timeout" if "DEADLINE_EXCEEDED" in status else status.replace("StatusCode.", "")
            raise Failure(kind, exc.message() or str(exc)) from None
        answer = result.get_response()
        return answer.model_version, {o.name: result.as_numpy(o.name) for o in answer.outputs}

    async def close(self) -> None:
        await self.client.close()


def _close(got: Dict[str, np.ndarray], want: Dict[str, np.ndarray]) -> bool:
    return got.keys() == want.keys() and all(error_stats(got[k], want[k])["ok"] for k in want)


def _outputs_to_ask(meta: Dict[str, Any], returnt: Optional[str], binary: bool) -> List[str]:
    """Outputs named in each request: none for binary answers (the mode's outputs come back);
    JSON answers need the names (tritonclient asks binary for unnamed ones)."""
    if binary:
        return []
    modes = (meta.get("parameters") or {}).get("mode_outputs", {})
    return list(modes.get(returnt or "out", ["logits"]))


async def run_load(url: str, model: str, requests: int, concurrency: int, batch: int = 1,
                   timeout_s: float = 30.0, duration_s: float = 600.0, returnt: Optional[str] = None,
                   binary: bool = True, seed: int = 0, expected: Optional[Dict[str, np.ndarray]] = None,
                   x: Optional[np.ndarray] = None, progress: bool = False, protocol: str = "http",
                   input_shape: Optional[Sequence[int]] = None,
                   rollout_during: Optional[Callable[[], Any]] = None) -> LoadResult:
    """Send at most `requests` infer requests (fewer if `duration_s` runs out), `concurrency` at a
    time, each with `timeout_s`. Answers are compared with `expected` (output name -> array) when
    given, else with the first answer of the same model_version. `rollout_during` (a blocking
    call, e.g. a rollout) runs on a thread once a third of the requests were sent."""
    target = (GrpcTarget if protocol == "grpc" else HttpTarget)(url, model, concurrency, timeout_s)
    try:
        meta = await target.metadata()
        if x is None:
            dims = _input_dims(meta, model, input_shape)
            x = np.random.default_rng(seed).standard_normal((batch, *dims)).astype(np.float32)
        target.prepare(meta["inputs"][0]["name"], x, _outputs_to_ask(meta, returnt, binary), returnt, binary)
        result = LoadResult(batch=int(x.shape[0]), protocol=protocol)
        await _drive(target, result, requests, concurrency, duration_s, expected, progress, f"{model} x{concurrency}",
                     rollout_during)
    finally:
        await target.close()
    return result


async def _drive(target: Any, result: LoadResult, requests: int, concurrency: int, duration_s: float,
                 expected: Optional[Dict[str, np.ndarray]], progress: bool, desc: str,
                 rollout_during: Optional[Callable[[], Any]] = None) -> None:
    reference: Dict[str, Dict[str, np.ndarray]] = {}  # model_version -> its first answer
    deadline = time.perf_counter() + duration_s
    begin = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=requests, unit="req", desc=desc, disable=None)

    async def one() -> None:
        t0 = time.perf_counter()
        try:
            version, got = await target.infer()
        except Failure as exc:
            result.fail(exc.kind, str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - an undecodable answer is the server's error
            result.fail("undecodable", f"{type(exc).__name__}: {exc}")
            return
        latency = time.perf_counter() - t0
        want = expected if expected is not None else reference.setdefault(version, got)
        if not all(np.isfinite(v).all() for v in got.values()) or not _close(got, want):
            result.wrong += 1
            return
        result.latencies_s.append(latency)
        result.answered.append((time.perf_counter() - begin, version))

    async def roll() -> None:
        while result.sent < requests // 3 and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        result.rollout["start_s"] = round(time.perf_counter() - begin, 3)
        outcome = await asyncio.to_thread(rollout_during)
        result.rollout["end_s"] = round(time.perf_counter() - begin, 3)
        result.rollout["outcome"] = str(outcome)

    async def worker() -> None:
        while result.sent < requests and time.perf_counter() < deadline:
            result.sent += 1
            await one()
            if bar is not None:
                bar.update()

    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)), *([roll()] if rollout_during else []))
    result.elapsed_s = time.perf_counter() - start
    result.client_cpu_s = time.process_time() - cpu
    if bar is not None:
        bar.close()


def process_cpu_s(pid: int) -> Dict[str, float]:
    """CPU seconds (user + system) so far of process `pid` and its descendants, summed by name
    (`ray::ServeReplica:resnet:Backbone`, `ray::ProxyActor`, `haproxy`, ...)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        raise ExportError(f"--server-pid {pid}: no such process") from None
    totals: Dict[str, float] = {}
    for proc in procs:
        try:
            name, times = proc.name(), proc.cpu_times()
        except psutil.Error:  # ended since the listing
            continue
        totals[name] = totals.get(name, 0.0) + times.user + times.system
    return totals


def cpu_ms_per_request(before: Dict[str, float], after: Dict[str, float], requests: int) -> Dict[str, float]:
    """Per process name, the CPU milliseconds per request between two `process_cpu_s` readings
    (names that used under 0.05 ms per request left out)."""
    per = {name: 1000.0 * (after[name] - before.get(name, 0.0)) / max(1, requests) for name in after}
    return {name: round(ms, 2) for name, ms in sorted(per.items(), key=lambda kv: -kv[1]) if ms >= 0.05}


def parse_input_shape(text: str) -> Tuple[int, ...]:
    """'3,224,224' -> (3, 224, 224); ValueError on anything else."""
    dims = tuple(int(t) for t in text.split(","))
    if not dims or any(d < 1 for d in dims):
        raise ValueError(text)
    return dims
