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
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import ray
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.grpc_util import RayServegRPCContext
from starlette.requests import Request
from starlette.responses import Response

from export.errors import ExportError, first_line
from export.serving import grpc_oip
from export.serving.config import BACKBONE_DEPLOYMENT, MESSAGE_SIZE_ENV, check_pinned
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
from zoo.modes import pack_outputs, unpack_outputs

logger = logging.getLogger("ray.serve")

SERVER_NAME = "returnt-zoo"
SERVER_VERSION = "0.1.0"

#: replica lost mid-request, or none reachable: the client may retry (503 + Retry-After)
RETRIABLE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, BackPressureError,
             DeploymentUnavailableError)


def run_batch(nets: Dict[str, Any], items: Sequence[Tuple[np.ndarray, str, str]]) -> List[List[np.ndarray]]:
    """Run requests of any batch sizes together: one call per (version, mode, image size),
    inputs concatenated along the batch and the outputs split back per request."""
    groups: Dict[Tuple[str, str, Tuple[int, ...]], List[int]] = {}
    for i, (x, mode, version) in enumerate(items):
        groups.setdefault((version, mode, x.shape[1:]), []).append(i)
    results: List[List[np.ndarray]] = [[] for _ in items]
    for (version, mode, _), members in groups.items():
        xs = [items[i][0] for i in members]
        outs = unpack_outputs(nets[version](np.concatenate(xs) if len(xs) > 1 else xs[0], returnt=mode))
        bounds = np.cumsum([x.shape[0] for x in xs])[:-1]
        for out in outs:
            for i, part in zip(members, np.split(out, bounds)):
                results[i].append(part)
    return results


class UnknownVersion(LookupError):
    """A request for a weight version the replicas do not hold (404)."""


@dataclass(frozen=True)
class Held:
    """What a replica serves, swapped in one assignment between batches: the loaded versions,
    the one unversioned requests get, each one's sha256."""

    nets: Dict[str, Any]
    current: str
    sha256: Dict[str, str]


# a replica keeps answering from the version it holds while it loads the next beside it, so a
# rollout updates every replica at once (Serve's default: a fifth of them at a time)
@serve.deployment(ray_actor_options={"num_cpus": 1}, rolling_update_percentage=1.0)
class Backbone:
    """Replicas of one export directory. Each holds its engine's sessions with a fixed thread
    count; requests queue into `@serve.batch` and run together on one inference thread, so the
    event loop keeps accepting (and batching) requests while a batch runs.

    A directory with published weight versions is served by `user_config` (`reconfigure`):
    the versions to hold, each with the sha256 `serve` or `rollout` checked, and the current one.
    A new user_config loads the versions it adds beside the ones held (on another thread: the
    replica keeps answering), then swaps between batches; a batch never mixes versions."""

    def __init__(self, directory: str, engine: str = "onnxruntime", precision: str = "fp32",
                 threads: int = 1, max_batch_size: int = 32, batch_wait_ms: float = 10.0,
                 files_sha256: Optional[str] = None, trust_key: Optional[str] = None) -> None:
        self.directory = Path(directory)
        self.files_sha256 = files_sha256
        self.trust_key = trust_key
        # the proxy and ingress need the same cores between batches: no busy-waiting threads
        self.load_args = {"engine": engine, "precision": precision, "threads": threads, "spin_wait": False}
        self._pin()
        manifest = read_manifest(self.directory)
        self.model = manifest.backbone.name
        self.held = Held({}, MODEL_VERSION, {})
        if not manifest.weight_versions:  # the export's own weights, as version 1
            from export.runtime import load

            net = self._ready(load(self.directory, **self.load_args))
            self.held = Held({MODEL_VERSION: net}, MODEL_VERSION, {})
            self._pin()  # and not swapped while the files were read
        # else: Ray calls reconfigure(user_config) before the replica takes requests
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="version-loader")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._batched.set_max_batch_size(max_batch_size)
        self._batched.set_batch_wait_timeout_s(batch_wait_ms / 1000.0)
        self.counts = {"batches": 0, "requests": 0, "images": 0}

    def _pin(self) -> None:
        if self.files_sha256 is not None:
            check_pinned(self.directory, self.files_sha256)

    @staticmethod
    def _ready(net: Any) -> Any:
        for mode in net.modes:  # sessions made now, not on the first request
            net(np.zeros((1,) + tuple(net.input_shape), np.float32), returnt=mode)
        return net

    def _load_version(self, number: str, expected_sha256: str) -> Any:
        """Version `number`, loaded only if its files are the ones the rollout checked (and,
        with a trusted key, signed with it)."""
        from export.store.versions import resolve_version, version_dir, version_sha256

        self._pin()
        manifest = read_manifest(self.directory)
        record = resolve_version(manifest, self.directory, number)
        if version_sha256(record) != expected_sha256:
            raise ExportError(f"{self.directory} version {number}: its files are not the ones rollout checked "
                              f"(sha256 {version_sha256(record)[:12]}..., expected {expected_sha256[:12]}...)")
        if self.trust_key:
            from export.store.signing import check_signature

            check_signature(version_dir(self.directory, record.number), Path(self.trust_key),
                            f"{self.directory} version {number}")
        from export.runtime import load

        return self._ready(load(self.directory, version=record.number, **self.load_args))

    async def reconfigure(self, config: Dict[str, Any]) -> None:
        """Hold the versions `config` names (loading the new ones beside the held ones), then
        switch; the versions no longer named are freed with the old state."""
        wanted = {str(k): str(v) for k, v in dict(config.get("versions") or {}).items()}
        current = str(config.get("current"))
        if current not in wanted:
            raise ExportError(f"user_config: current version {current!r} is not among the versions "
                              f"held ({', '.join(wanted) or 'none'})")
        held = self.held
        loop = asyncio.get_running_loop()
        nets = {}
        for number, sha in sorted(wanted.items(), key=lambda kv: int(kv[0])):
            if held.sha256.get(number) == sha:
                nets[number] = held.nets[number]
            else:
                nets[number] = await loop.run_in_executor(self._loader, self._load_version, number, sha)
        self.held = Held(nets, current, wanted)
        logger.info("%s: serving versions %s, current %s", self.directory.name, ", ".join(nets), current)

    def _checked(self, x: Any, returnt: str, version: Optional[str]) -> Tuple[np.ndarray, str, Optional[str]]:
        held = self.held
        if not held.nets:  # deployed without the user_config `serve` and `rollout` give it
            raise UnknownVersion(f"model {self.model!r} holds no weight version: its deployment has no "
                                 "user_config naming one (python -m export serve --print-config shows it)")
        if version not in (None, "") and str(version) not in held.nets:
            raise UnknownVersion(f"model {self.model!r} has no version {version!r} served; "
                                 f"versions: {', '.join(held.nets)}")
        net = held.nets[held.current]
        return net.check_call(x, returnt), returnt, (str(version) if version not in (None, "") else None)

    async def infer(self, x: Any, returnt: str = "out") -> Any:
        """What `net(x, returnt=...)` returns, for numpy (or torch) `x`, from the current
        version; checked here, before batching, so one bad request never fails the others."""
        version, outs = await self._batched(self._checked(x, returnt, None))
        return pack_outputs(returnt, outs)

    async def infer_versioned(self, x: Any, returnt: str = "out", version: Optional[str] = None) -> Any:
        """(the version that answered, outputs) for `version` (None: the current one)."""
        version, outs = await self._batched(self._checked(x, returnt, version))
        if outs is None:
            raise UnknownVersion(version)
        return version, pack_outputs(returnt, outs)

    @serve.batch  # size and wait set per deployment in __init__
    async def _batched(self, items: List[Tuple[np.ndarray, str, Optional[str]]]) -> List[Tuple[str, Any]]:
        held = self.held  # one state for the whole batch
        self.counts["batches"] += 1
        self.counts["requests"] += len(items)
        self.counts["images"] += sum(x.shape[0] for x, _, _ in items)
        resolved = [(x, mode, version or held.current) for x, mode, version in items]
        runnable = [i for i, (_, _, v) in enumerate(resolved) if v in held.nets]
        loop = asyncio.get_running_loop()
        outs = await loop.run_in_executor(self._executor, run_batch, held.nets, [resolved[i] for i in runnable])
        answers: List[Tuple[str, Any]] = [(f"{v} is no longer served; versions: {', '.join(held.nets)}", None)
                                          for _, _, v in resolved]
        for i, out in zip(runnable, outs):
            answers[i] = (resolved[i][2], out)
        return answers

    def served_versions(self) -> Dict[str, Any]:
        """The versions this replica holds, the current one and their sha256 (metadata)."""
        held = self.held
        return {"versions": list(held.nets), "current": held.current, "sha256": dict(held.sha256)}

    def replica_info(self) -> Dict[str, Any]:
        """Which process and actor this replica is (for operators and the fault tests)."""
        ctx = ray.get_runtime_context()
        net = self.held.nets[self.held.current]
        return {"pid": os.getpid(), "actor_name": ctx.get_actor_name(), "engine": net.engine,
                "modes": list(net.modes), "version": self.held.current, **self.counts}


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
                 files_sha256s: Optional[List[str]] = None) -> None:
        self.specs: Dict[str, ModelSpec] = {}
        for i, d in enumerate(directories):
            if files_sha256s is not None:
                check_pinned(Path(d), files_sha256s[i])
            manifest = read_manifest(Path(d))
            spec = ModelSpec.from_manifest(manifest, (Path(d) / MANIFEST).read_bytes(), engine, precision)
            self.specs[spec.name] = spec
        self.handles = {name: serve.get_deployment_handle(BACKBONE_DEPLOYMENT, app_name=name) for name in self.specs}
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
        """The model's spec; a version other than 1 of a directory without published versions
        is refused here, any other version by the replicas (which know what they hold)."""
        if model not in self.specs:
            raise RequestError(f"unknown model {model!r}{close_names(model, list(self.specs))}; "
                               f"served: {', '.join(self.specs)}", 404)
        spec = self.specs[model]
        if not spec.versioned and version not in (None, "", MODEL_VERSION):
            raise RequestError(f"model {model!r} has no version {version!r}; versions: {MODEL_VERSION}", 404)
        if version not in (None, "") and not str(version).isdigit():
            raise RequestError(f"model {model!r} has no version {version!r}; versions are numbers", 404)
        return spec

    async def _served(self, model: str) -> Dict[str, Any]:
        """The versions a replica of the model holds now (metadata, readiness)."""
        return await self._call(model, self.handles[model].served_versions.remote())

    async def _call(self, model: str, response: Any) -> Any:
        try:
            return await asyncio.wait_for(response, self.request_timeout_s)
        except asyncio.TimeoutError:
            raise RequestError(f"model {model!r} did not answer within {self.request_timeout_s:g} s; retry",
                               503) from None
        except RETRIABLE as exc:
            logger.warning("call to %s: %s: %s", model, type(exc).__name__, first_line(exc))
            raise RequestError(f"a replica of {model!r} stopped while serving this request "
                               f"({type(exc).__name__}); retry", 503) from None
        except LookupError as exc:  # a version the replicas do not hold
            raise RequestError(str(exc).splitlines()[-1], 404) from None
        except (ValueError, TypeError) as exc:  # the replica's own input checks
            raise RequestError(str(exc).splitlines()[-1]) from None

    async def _check_version(self, model: str, version: Optional[str]) -> Dict[str, Any]:
        served = await self._served(model)
        if version not in (None, "") and str(version) not in served["versions"]:
            raise RequestError(f"model {model!r} has no version {version!r} served; versions: "
                               f"{', '.join(served['versions'])}", 404)
        return served

    def _check_size(self, size: int) -> None:
        if size > self.max_request_bytes:
            raise RequestError(f"request of {size} bytes is over the limit of {self.max_request_bytes} "
                               "bytes (--max-request-mb); send fewer images per request", 413)

    async def _run(self, model: str, req: InferRequest,
                   version: Optional[str] = None) -> Tuple[str, Dict[str, np.ndarray]]:
        """(the weight version that answered, output name -> array) for a checked request, from a
        replica of the model; `version` None: the current one."""
        used, packed = await self._call(model, self.handles[model].infer_versioned.remote(
            req.x, returnt=req.mode, version=version or None))
        return used, dict(zip(self.specs[model].modes[req.mode], unpack_outputs(packed)))

    async def server_metadata(self, request: Request) -> Response:
        return _json({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": ["binary_tensor_data"],
                      "models": list(self.specs)})

    async def health(self, request: Request) -> Response:
        return _json({"ready": True})

    async def model_metadata(self, request: Request, model: str, version: Optional[str] = None) -> Response:
        spec = self._spec(model, version)
        return _json(spec.metadata(await self._check_version(model, version)))

    async def model_ready(self, request: Request, model: str, version: Optional[str] = None) -> Response:
        self._spec(model, version)
        await self._check_version(model, version)
        return _json({"name": model, "ready": True})

    async def infer(self, request: Request, model: str, version: Optional[str] = None) -> Response:
        spec = self._spec(model, version)
        declared = request.headers.get("content-length", "")
        self._check_size(int(declared) if declared.isdigit() else 0)  # before reading the body
        body = await request.body()
        self._check_size(len(body))  # a chunked body declares no length
        req = parse_infer_request(spec, body, request.headers.get("inference-header-content-length"))
        used, results = await self._run(model, req, version)
        body, headers = encode_infer_response(spec, req, results, used)
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
            await self._check_version(request.name, request.version)
        except RequestError as exc:
            return self._grpc_error(grpc_context, exc, grpc_oip.pb.ModelReadyResponse(ready=False))
        return grpc_oip.pb.ModelReadyResponse(ready=True)

    async def ModelMetadata(self, request: Any, grpc_context: RayServegRPCContext) -> Any:  # noqa: N802
        try:
            spec = self._spec(request.name, request.version)
            return grpc_oip.model_metadata(spec, await self._check_version(request.name, request.version))
        except RequestError as exc:
            return self._grpc_error(grpc_context, exc, grpc_oip.pb.ModelMetadataResponse())

    async def ModelInfer(self, request: Any, grpc_context: RayServegRPCContext) -> Any:  # noqa: N802
        try:
            spec = self._spec(request.model_name, request.model_version)
            self._check_size(request.ByteSize())
            req = grpc_oip.parse_infer_request(spec, request)
            used, results = await self._run(request.model_name, req, request.model_version)
            return grpc_oip.infer_response(spec, req, results, used)
        except RequestError as exc:
            return self._grpc_error(grpc_context, exc, grpc_oip.pb.ModelInferResponse())


def backbone_app(args: Dict[str, Any]):
    """Application builder (`import_path: export.serving.app:backbone_app` in a Serve config): args
    directory, engine, precision, threads, max_batch_size, batch_wait_ms, replicas and
    files_sha256 (replicas start only on those files) and trust_key (a public key every weight
    version must be signed with). A directory with published versions is served by the
    deployment's user_config (`export.serving.config.versions_config`)."""
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
    max_request_bytes, request_timeout_s and files_sha256s (one per directory)."""
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

def _client() -> Any:
    from ray.serve.context import _get_global_client

    return _get_global_client()


def app_configs() -> Dict[str, Dict[str, Any]]:
    """name -> the config of every application deployed from a config on the cluster this
    process is connected to (what `serve deploy` and this module deploy)."""
    details = _client().get_serve_details()
    return {name: app["deployed_app_config"] for name, app in (details.get("applications") or {}).items()
            if app.get("deployed_app_config")}


def apply_apps(apps: Sequence[Dict[str, Any]], wait_s: float = 300.0) -> None:
    """Deploy `apps` as `serve deploy` does (a Serve config: declarative, and changing only a
    deployment's user_config updates its replicas in place without restarting them); the
    cluster's other config-deployed applications are kept. Returns when every one is RUNNING;
    one line naming the application and Ray's message if one fails."""
    from ray.serve.schema import ServeDeploySchema

    names = [a["name"] for a in apps]
    merged = {**app_configs(), **{a["name"]: a for a in apps}}
    before = {name: _status(name)[1] for name in names}
    _client().deploy_apps(ServeDeploySchema.model_validate({"applications": list(merged.values())}))
    deadline = time.monotonic() + wait_s
    pending = set(names)
    while pending:
        for name in sorted(pending):
            status, deployed_at, message = _status(name)
            if status == "DEPLOY_FAILED" or status == "UNHEALTHY":
                raise ExportError(f"application {name!r}: {status}: {' '.join(message.split())[:400]}")
            if status == "RUNNING" and deployed_at != before[name]:
                pending.discard(name)
        if pending and time.monotonic() > deadline:
            raise ExportError(f"application(s) {', '.join(sorted(pending))} not running after {wait_s:g} s")
        time.sleep(0.1)


def _status(name: str) -> Tuple[str, float, str]:
    """(status, last deployed time, message) of an application ('' when it does not exist)."""
    app = (_client().get_serve_details().get("applications") or {}).get(name)
    if not app:
        return "", 0.0, ""
    status = app.get("status")
    return (str(getattr(status, "value", status)), float(app.get("last_deployed_time_s") or 0.0),
            str(app.get("message") or ""))


def deploy(config: Dict[str, Any], address: Optional[str] = None, cpus: int = 1,
           haproxy: bool = False) -> Tuple[bool, str]:
    """Start (address None: a local Ray instance with enough logical CPUs for the replicas) or
    join Ray, start Serve's proxies and deploy `config`'s applications as a Serve config (so
    `rollout` can update them in place), each ready on return.
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
    apply_apps([{**app, "logging_config": LOGGING} for app in config["applications"]])
    return local, ray.get_runtime_context().gcs_address


def shut_down(config: Dict[str, Any], local: bool) -> None:
    """Stop what `deploy` started: the whole local instance (ray.shutdown ends its processes;
    with HAProxy, serve.shutdown waited 30 s for the controller here), else only these
    applications of the joined cluster."""
    if not local:
        for app in config["applications"]:
            serve.delete(app["name"])
    ray.shutdown()
