"""`python -m export loadtest URL --model NAME`: a bounded load on an Open Inference Protocol
server (ours or Triton). Sends `--requests` copies of one seeded input from `--concurrency`
concurrent httpx connections, stops at the count or `--duration-s`, and reports throughput,
latency percentiles and errors (JSON with `--json`).

Every answer is checked: status 200, the model's output shapes, finite values, and the same
numbers as the first answer (within the export's verification bound) - a server that answers
fast with wrong numbers shows up as `wrong`, not as throughput. Exit status 1 when any request
failed or was wrong.
"""

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

from export.errors import ExportError
from export.serving.oip import HEADER_LENGTH, decode_infer_response, encode_infer_request
from export.store.tolerance import error_stats  # the export's own bound


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
    #: CPU seconds this process (the client) used during the run: on one machine, the
    #: client's share of the cores is not the server's
    client_cpu_s: float = 0.0

    def fail(self, kind: str, detail: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        self.error_examples.setdefault(kind, detail[:200])

    def report(self) -> Dict[str, Any]:
        ok = len(self.latencies_s)
        lat = np.asarray(self.latencies_s) * 1000.0
        pct = {f"p{q}_ms": round(float(np.percentile(lat, q)), 2) if ok else None for q in (50, 95, 99)}
        return {"requests": self.sent, "ok": ok, "errors": dict(self.errors), "wrong": self.wrong,
                "error_examples": dict(self.error_examples), "seconds": round(self.elapsed_s, 3),
                "requests_per_s": round(ok / self.elapsed_s, 2) if self.elapsed_s else None,
                "images_per_s": round(ok * self.batch / self.elapsed_s, 2) if self.elapsed_s else None,
                "batch": self.batch, "client_cpu_ms_per_request": round(1000 * self.client_cpu_s / self.sent, 2)
                if self.sent else None, **pct,
                "mean_ms": round(float(lat.mean()), 2) if ok else None}


def _close(got: Dict[str, np.ndarray], want: Dict[str, np.ndarray]) -> bool:
    return got.keys() == want.keys() and all(error_stats(got[k], want[k])["ok"] for k in want)


async def run_load(url: str, model: str, requests: int, concurrency: int, batch: int = 1,
                   timeout_s: float = 30.0, duration_s: float = 600.0, returnt: Optional[str] = None,
                   binary: bool = True, seed: int = 0, expected: Optional[Dict[str, np.ndarray]] = None,
                   x: Optional[np.ndarray] = None, progress: bool = False) -> LoadResult:
    """Send at most `requests` infer requests (fewer if `duration_s` runs out), `concurrency` at a
    time, each with `timeout_s`. Answers are compared with `expected` (output name -> array) when
    given, else with the first answer."""
    import httpx

    base = url.rstrip("/")
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=timeout_s, limits=limits) as client:
        try:
            meta = (await client.get(f"/v2/models/{model}")).raise_for_status().json()
        except httpx.HTTPStatusError as exc:
            answer = f"{exc.response.status_code} {exc.response.text.strip()}"
            raise ExportError(f"{base}: model {model!r}: {answer}") from None
        except httpx.HTTPError as exc:
            raise ExportError(f"cannot reach {base} ({type(exc).__name__}: {exc}); is the server running?") from None
        spec = meta["inputs"][0]
        if x is None:
            dims = spec["shape"][1:]
            if any(d < 0 for d in dims):  # any image size: the size it was exported at
                dims = (meta.get("parameters") or {}).get("input_shape_at_export", [None, *dims])[1:]
            if any(not isinstance(d, int) or d < 1 for d in dims):
                raise ExportError(f"model {model!r} takes inputs of shape {spec['shape']}; "
                                  "which size to send is unknown")
            x = np.random.default_rng(seed).standard_normal((batch, *dims)).astype(np.float32)
        body, headers = encode_infer_request(spec["name"], x, returnt=returnt, binary=binary)
        result = LoadResult(batch=int(x.shape[0]))
        reference: Dict[str, Optional[Dict[str, np.ndarray]]] = {"want": expected}
        deadline = time.perf_counter() + duration_s
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=requests, unit="req", desc=f"{model} x{concurrency}")

        async def one() -> None:
            t0 = time.perf_counter()
            try:
                resp = await client.post(f"/v2/models/{model}/infer", content=body, headers=headers)
            except httpx.TimeoutException as exc:
                result.fail("timeout", f"{type(exc).__name__} after {timeout_s:g} s")
                return
            except httpx.HTTPError as exc:
                result.fail(type(exc).__name__, str(exc))
                return
            latency = time.perf_counter() - t0
            if resp.status_code != 200:
                result.fail(str(resp.status_code), resp.text.strip())
                return
            try:
                got = decode_infer_response(resp.content, resp.headers.get(HEADER_LENGTH))
            except Exception as exc:  # noqa: BLE001 - an undecodable answer is the server's error
                result.fail("undecodable", f"{type(exc).__name__}: {exc}")
                return
            if reference["want"] is None:
                reference["want"] = got
            if not all(np.isfinite(v).all() for v in got.values()) or not _close(got, reference["want"]):
                result.wrong += 1
                return
            result.latencies_s.append(latency)

        async def worker() -> None:
            while result.sent < requests and time.perf_counter() < deadline:
                result.sent += 1
                await one()
                if bar is not None:
                    bar.update()

        start, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.elapsed_s = time.perf_counter() - start
        result.client_cpu_s = time.process_time() - cpu
        if bar is not None:
            bar.close()
    return result
