"""Ray Serve applications for export directories: one `Backbone` application per directory
(named after its backbone, replicas with dynamic batching, the Python handle API) and one `oip`
application that speaks the Open Inference Protocol over HTTP and gRPC (KServe v2) and forwards
to them.

    from ray import serve
    handle = serve.get_app_handle("resnet")
    logits, feats = handle.infer.remote(x_numpy, returnt="both").result()

Imported only by the `serve` command (and Serve's replicas): it imports Ray.
"""

import asyncio
import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import ray
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.grpc_util import RayServegRPCContext
from starlette.requests import Request
from starlette.responses import Response

from export.serving import grpc_oip
from export.serving.config import MESSAGE_SIZE_ENV, check_pinned
from export.serving.oip import (
    MODEL_VERSION,
    InferRequest,
    ModelSpec,
    RequestError,
    close_names,
    encode_infer_response,
    error_body,
    parse_infer_request,
)
from export.store.manifest import MANIFEST, read_manifest
from zoo.base import pack_outputs, unpack_outputs

logger = logging.getLogger("ray.serve")

SERVER_NAME = "returnt-zoo"
SERVER_VERSION = "0.1.0"

#: replica lost mid-request, or none reachable: the client may retry (503 + Retry-After)
RETRIABLE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, BackPressureError,
             DeploymentUnavailableError)


def run_batch(net: Any, items: Sequence[Tuple[np.ndarray, str]]) -> List[List[np.ndarray]]:
    """Run requests of any batch sizes together: one call per (mode, image size), inputs
    concatenated along the batch and the outputs split back per request."""
    groups: Dict[Tuple[str, Tuple[int, ...]], List[int]] = {}
    for i, (x, mode) in enumerate(items):
        groups.setdefault((mode, x.shape[1:]), []).append(i)
    results: List[List[np.ndarray]] = [[] for _ in items]
    for (mode, _), members in groups.items():
        xs = [items[i][0] for i in members]
        outs = unpack_outputs(net(np.concatenate(xs) if len(xs) > 1 else xs[0], returnt=mode))
        bounds = np.cumsum([x.shape[0] for x in xs])[:-1]
        for out in outs:
            for i, part in zip(members, np.split(out, bounds)):
                results[i].append(part)
    return results


@serve.deployment(ray_actor_options={"num_cpus": 1})
class Backbone:
    """Replicas of one export directory. Each holds its engine's sessions with a fixed thread
    count; requests queue into `@serve.batch` and run together on one inference thread, so the
    event loop keeps accepting (and batching) requests while a batch runs."""

    def __init__(self, directory: str, engine: str = "onnxruntime", precision: str = "fp32",
                 threads: int = 1, max_batch_size: int = 32, batch_wait_ms: float = 10.0,
                 manifest_sha256: Optional[str] = None) -> None:
        from export.runtime import load

        if manifest_sha256 is not None:
            check_pinned(Path(directory), manifest_sha256)
        # the proxy and ingress need the same cores between batches: no busy-waiting threads
        self.net = load(directory, engine=engine, precision=precision, threads=threads, spin_wait=False)
        if manifest_sha256 is not None:  # and not swapped while the files were read
            check_pinned(Path(directory), manifest_sha256)
        for mode in self.net.modes:  # sessions made now, not on the first request
            self.net(np.zeros((1,) + tuple(self.net.input_shape), np.float32), returnt=mode)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._batched.set_max_batch_size(max_batch_size)
        self._batched.set_batch_wait_timeout_s(batch_wait_ms / 1000.0)
        self.counts = {"batches": 0, "requests": 0, "images": 0}

    async def infer(self, x: Any, returnt: str = "out") -> Any:
        """What `net(x, returnt=...)` returns, for numpy (or torch) `x`; checked here, before
        batching, so one bad request never fails the others in its batch."""
        outs = await self._batched((self.net.check_call(x, returnt), returnt))
        return pack_outputs(returnt, outs)

    @serve.batch  # size and wait set per deployment in __init__
    async def _batched(self, items: List[Tuple[np.ndarray, str]]) -> List[List[np.ndarray]]:
        self.counts["batches"] += 1
        self.counts["requests"] += len(items)
        self.counts["images"] += sum(x.shape[0] for x, _ in items)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, run_batch, self.net, items)

    def replica_info(self) -> Dict[str, Any]:
        """Which process and actor this replica is (for operators and the fault tests)."""
        ctx = ray.get_runtime_context()
        return {"pid": os.getpid(), "actor_name": ctx.get_actor_name(), "engine": self.net.engine,
                "modes": list(self.net.modes), **self.counts}


_MODEL = r"/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?"
ROUTES = [
    ("GET", re.compile(r"/v2/?"), "server_metadata"),
    ("GET", re.compile(r"/v2/health/(?:ready|live)"), "health"),
    ("GET", re.compile(_MODEL), "model_metadata"),
    ("GET", re.compile(_MODEL + r"/ready"), "model_ready"),
    ("POST", re.compile(_MODEL + r"/infer"), "infer"),
]


def _json(obj: Any, status: int = 200) -> Response:
    return Response(json.dumps(obj).encode(), status_code=status, media_type="application/json")


def _error(message: str, status: int, headers: Optional[Dict[str, str]] = None) -> Response:
    return Response(error_body(message), status_code=status, media_type="application/json", headers=headers)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
class OipIngress:
    """The Open Inference Protocol's HTTP routes and gRPC methods: checks every request against
    the model's manifest and forwards the input array to the model's `Backbone` application.
    It stays a deployment of its own (not the model's): a replica lost mid-request reaches the
    client as 503 / UNAVAILABLE from here, where Ray's proxy would answer 500."""

    def __init__(self, directories: List[str], engine: str = "onnxruntime", precision: str = "fp32",
                 max_request_bytes: int = 64 << 20, request_timeout_s: float = 30.0,
                 manifest_sha256s: Optional[List[str]] = None) -> None:
        self.specs: Dict[str, ModelSpec] = {}
        for i, d in enumerate(directories):
            if manifest_sha256s is not None:
                check_pinned(Path(d), manifest_sha256s[i])
            manifest = read_manifest(Path(d))
            spec = ModelSpec.from_manifest(manifest, (Path(d) / MANIFEST).read_bytes(), engine, precision)
            self.specs[spec.name] = spec
        self.handles = {name: serve.get_deployment_handle("Backbone", app_name=name) for name in self.specs}
        self.max_request_bytes = max_request_bytes
        self.request_timeout_s = request_timeout_s

    async def __call__(self, request: Request) -> Response:
        path = request.url.path.rstrip("/") or "/"
        try:
            for method, pattern, handler in ROUTES:
                match = pattern.fullmatch(path)
                if match:
                    if request.method != method:
                        return _error(f"{request.method} {path}: method not allowed; use {method}", 405)
                    return await getattr(self, handler)(request, **match.groupdict())
            return _error(f"no route {request.method} {path}; routes: GET /v2, GET /v2/health/ready, "
                          "GET /v2/models/{name}, POST /v2/models/{name}/infer", 404)
        except RequestError as exc:
            headers = {"Retry-After": "1"} if exc.status == 503 else None
            return _error(str(exc), exc.status, headers)

    def _spec(self, model: str, version: Optional[str] = None) -> ModelSpec:
        if model not in self.specs:
            raise RequestError(f"unknown model {model!r}{close_names(model, list(self.specs))}; "
                               f"served: {', '.join(self.specs)}", 404)
        if version not in (None, "", MODEL_VERSION):
            raise RequestError(f"model {model!r} has no version {version!r}; versions: {MODEL_VERSION}", 404)
        return self.specs[model]

    def _check_size(self, size: int) -> None:
        if size > self.max_request_bytes:
            raise RequestError(f"request of {size} bytes is over the limit of {self.max_request_bytes} "
                               "bytes (--max-request-mb); send fewer images per request", 413)

    async def _run(self, model: str, req: InferRequest) -> Dict[str, np.ndarray]:
        """output name -> array for a checked request, from a replica of the model."""
        try:
            packed = await asyncio.wait_for(self.handles[model].infer.remote(req.x, returnt=req.mode),
                                            self.request_timeout_s)
        except asyncio.TimeoutError:
            raise RequestError(f"model {model!r} did not answer within {self.request_timeout_s:g} s; retry",
                               503) from None
        except RETRIABLE as exc:
            logger.warning("infer on %s: %s: %s", model, type(exc).__name__, str(exc).splitlines()[0])
            raise RequestError(f"a replica of {model!r} stopped while serving this request "
                               f"({type(exc).__name__}); retry", 503) from None
        except (ValueError, TypeError) as exc:  # the replica's own input checks
            raise RequestError(str(exc).splitlines()[-1]) from None
        return dict(zip(self.specs[model].modes[req.mode], unpack_outputs(packed)))

    async def server_metadata(self, request: Request) -> Response:
        return _json({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": ["binary_tensor_data"],
                      "models": list(self.specs)})

    async def health(self, request: Request) -> Response:
        return _json({"ready": True})

    async def model_metadata(self, request: Request, model: str, version: Optional[str] = None) -> Response:
        return _json(self._spec(model, version).metadata())

    async def model_ready(self, request: Request, model: str, version: Optional[str] = None) -> Response:
        self._spec(model, version)
        return _json({"name": model, "ready": True})

    async def infer(self, request: Request, model: str, version: Optional[str] = None) -> Response:
        spec = self._spec(model, version)
        declared = request.headers.get("content-length", "")
        self._check_size(int(declared) if declared.isdigit() else 0)  # before reading the body
        body = await request.body()
        self._check_size(len(body))  # a chunked body declares no length
        req = parse_infer_request(spec, body, request.headers.get("inference-header-content-length"))
        body, headers = encode_infer_response(spec, req, await self._run(model, req))
        return Response(body, headers=headers)

    # gRPC: Ray Serve's gRPC proxy calls the method named after the RPC

    @staticmethod
    def _grpc_error(grpc_context: RayServegRPCContext, exc: RequestError, empty: Any) -> Any:
        grpc_context.set_code(grpc_oip.status_code(exc))
        grpc_context.set_details(" ".join(str(exc).split()))
        return empty

    async def ServerLive(self, request: Any) -> Any:  # noqa: N802 - the RPC's name
        return grpc_oip.pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any) -> Any:  # noqa: N802
        return grpc_oip.pb.ServerReadyResponse(ready=True)

    async def ServerMetadata(self, request: Any) -> Any:  # noqa: N802
        return grpc_oip.pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION,
                                                  extensions=["binary_tensor_data"])

    async def ModelReady(self, request: Any, grpc_context: RayServegRPCContext) -> Any:  # noqa: N802
        try:
            self._spec(request.name, request.version)
        except RequestError as exc:
            return self._grpc_error(grpc_context, exc, grpc_oip.pb.ModelReadyResponse(ready=False))
        return grpc_oip.pb.ModelReadyResponse(ready=True)

    async def ModelMetadata(self, request: Any, grpc_context: RayServegRPCContext) -> Any:  # noqa: N802
        try:
            return grpc_oip.model_metadata(self._spec(request.name, request.version))
        except RequestError as exc:
            return self._grpc_error(grpc_context, exc, grpc_oip.pb.ModelMetadataResponse())

    async def ModelInfer(self, request: Any, grpc_context: RayServegRPCContext) -> Any:  # noqa: N802
        try:
            spec = self._spec(request.model_name, request.model_version)
            self._check_size(request.ByteSize())
            req = grpc_oip.parse_infer_request(spec, request)
            return grpc_oip.infer_response(spec, req, await self._run(request.model_name, req))
        except RequestError as exc:
            return self._grpc_error(grpc_context, exc, grpc_oip.pb.ModelInferResponse())


def backbone_app(args: Dict[str, Any]):
    """Application builder (`import_path: export.serving.app:backbone_app` in a Serve config): args
    directory, engine, precision, threads, max_batch_size, batch_wait_ms, replicas and
    manifest_sha256 (replicas start only on that manifest)."""
    args = dict(args)
    replicas = int(args.pop("replicas", 1))
    threads = int(args.get("threads", 1))
    max_batch = int(args.get("max_batch_size", 32))
    # requests wait in the replica's batch queue, not in the ingress's retries with backoff
    return Backbone.options(
        num_replicas=replicas, max_ongoing_requests=max(4 * max_batch, 64),
        ray_actor_options={"num_cpus": threads, "runtime_env": {"env_vars": dict(MESSAGE_SIZE_ENV)}},
    ).bind(**args)


def oip_app(args: Dict[str, Any]):
    """Application builder for the HTTP ingress: args directories, engine, precision,
    max_request_bytes, request_timeout_s and manifest_sha256s (one per directory)."""
    return OipIngress.options(
        ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": dict(MESSAGE_SIZE_ENV)}}).bind(**args)


#: Ray Serve's direct gRPC between deployments (Ray >= 2.55): the ingress -> replica hop costs
#: less CPU. Set to 0 in the environment to turn it off.
THROUGHPUT_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", **MESSAGE_SIZE_ENV}


def haproxy_env() -> Dict[str, str]:
    """HAProxy as the HTTP proxy instead of Ray's Python one (measured here with ResNet-18 at
    concurrency 32: 59.8 -> 99.9 requests/s). Its stats page and Prometheus exporter listen on all interfaces at fixed
    ports unless told otherwise: free ports, chosen now, so two servers on one machine do not
    collide."""
    import socket

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(str(s.getsockname()[1]))
    return {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_HAPROXY_STATS_PORT": ports[0],
            "RAY_SERVE_HAPROXY_METRICS_PORT": ports[1]}


#: warnings and errors only: an access-log line per request costs the proxy and replicas CPU
LOGGING = {"log_level": "WARNING", "enable_access_log": False}

BUILDERS = {"export.serving.app:backbone_app": backbone_app, "export.serving.app:oip_app": oip_app}


def deploy(config: Dict[str, Any], address: Optional[str] = None, cpus: int = 1,
           haproxy: bool = False) -> Tuple[bool, str]:
    """Start (address None: a local Ray instance with enough logical CPUs for the replicas) or
    join Ray, start Serve's HTTP proxy and run `config`'s applications, each ready on return.
    Returns (whether Ray was started here, the cluster's address)."""
    local = address is None
    if local:  # the processes Ray starts inherit these; a joined cluster has its own settings
        env = {**THROUGHPUT_ENV, **(haproxy_env() if haproxy else {"RAY_SERVE_ENABLE_HA_PROXY": "0"})}
        for key, value in env.items():
            os.environ.setdefault(key, value)
    ray.init(address=address, num_cpus=max(os.cpu_count() or 1, cpus) if local else None,
             include_dashboard=False, logging_level=logging.WARNING)
    serve.start(http_options=config["http_options"], grpc_options=config.get("grpc_options"),
                proxy_location=config["proxy_location"], logging_config=LOGGING)
    for app in config["applications"]:
        serve.run(BUILDERS[app["import_path"]](app["args"]), name=app["name"], route_prefix=app["route_prefix"],
                  logging_config=LOGGING)
    return local, ray.get_runtime_context().gcs_address


def shut_down(config: Dict[str, Any], local: bool) -> None:
    """Stop what `deploy` started: the whole local instance (ray.shutdown ends its processes;
    with HAProxy, serve.shutdown waited 30 s for the controller here), else only these
    applications of the joined cluster."""
    if not local:
        for app in config["applications"]:
            serve.delete(app["name"])
    ray.shutdown()
