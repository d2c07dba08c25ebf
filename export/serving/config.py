"""The Serve applications of a `serve` run, as a Serve config (`serve deploy` schema): one
`Backbone` application per export directory and the HTTP ingress `oip`. No Ray here: the
config is built (and printed with --print-config) before Ray starts."""

import argparse
from pathlib import Path
from typing import Any, Dict, List, Sequence

from export.errors import ExportError
from export.runtime import load
from export.serving.oip import ROUTER_APP
from export.store.manifest import MANIFEST, sha256_bytes

#: Ray Serve's direct gRPC between deployments stops at 4 MB per message unless told otherwise
#: (a batch of 7 images of 3x224x224 is 4.2 MB); gRPC's own ceiling is 2 GiB - 1. Ray reads it
#: when a process starts: set for a local instance's processes and in the runtime_env of every
#: replica (which `serve deploy` of the printed config carries to a cluster).
MESSAGE_SIZE_ENV = {"RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str((1 << 31) - 1)}
#: Ray Serve's gRPC proxy with the KServe v2 service from tritonclient's definitions
SERVICER_FUNCTION = "export.serving.grpc_oip.add_inference_service"


def check_directories(directories: Sequence[Path], engine: str, precision: str) -> Dict[str, Path]:
    """backbone name -> directory, each directory's engine files checked against the manifest."""
    names: Dict[str, Path] = {}
    for d in directories:
        net = load(d, engine=engine, precision=precision)  # hashes every file the engine uses
        name = net.manifest.backbone.name
        if name in names:
            raise ExportError(f"{d} and {names[name]} both hold backbone {name!r}; a model name is served once")
        names[name] = d.resolve()
    return names


def manifest_sha256(directory: Path) -> str:
    return sha256_bytes((Path(directory) / MANIFEST).read_bytes())


def check_pinned(directory: Path, pinned: str) -> None:
    """A replica or ingress starts only on the directory `serve` checked: one changed since
    (`params write` into a served directory, a re-export) would make a restarted replica answer
    with other weights than its siblings under the same model version."""
    now = manifest_sha256(directory)
    if now != pinned:
        raise ExportError(f"{directory} changed since `serve` checked it (manifest sha256 {now[:12]}..., "
                          f"served {pinned[:12]}...); a replica does not start on other weights: restart "
                          "serve to serve the new ones")


def app_args(ns: argparse.Namespace, directory: Path) -> Dict[str, Any]:
    return {"directory": str(directory), "engine": ns.engine, "precision": ns.precision,
            "threads": ns.threads, "max_batch_size": ns.max_batch_size, "batch_wait_ms": ns.batch_wait_ms,
            "replicas": ns.replicas, "manifest_sha256": manifest_sha256(directory)}


def router_args(ns: argparse.Namespace, directories: List[Path]) -> Dict[str, Any]:
    return {"directories": [str(d) for d in directories], "engine": ns.engine, "precision": ns.precision,
            "max_request_bytes": int(ns.max_request_mb * (1 << 20)), "request_timeout_s": ns.request_timeout_s,
            "manifest_sha256s": [manifest_sha256(d) for d in directories]}


def serve_config(ns: argparse.Namespace, models: Dict[str, Path]) -> Dict[str, Any]:
    """The Serve config (`serve deploy` schema) for the same applications."""
    apps = [{"name": name, "route_prefix": None, "import_path": "export.serving.app:backbone_app",
             "args": app_args(ns, d)} for name, d in models.items()]
    apps.append({"name": ROUTER_APP, "route_prefix": "/", "import_path": "export.serving.app:oip_app",
                 "args": router_args(ns, list(models.values()))})
    config: Dict[str, Any] = {"proxy_location": "EveryNode", "http_options": {"host": ns.host, "port": ns.port}}
    if ns.grpc_port is not None:
        config["grpc_options"] = {"port": ns.grpc_port, "grpc_servicer_functions": [SERVICER_FUNCTION]}
    config["applications"] = apps
    return config


def config_yaml(config: Dict[str, Any]) -> str:
    """The Serve config as the YAML file `serve deploy` reads (pyyaml, the serve extra's)."""
    import yaml

    return yaml.safe_dump(config, sort_keys=False)
