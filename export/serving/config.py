"""The Serve applications of a `serve` run, as a Serve config (`serve deploy` schema): one
`Backbone` application per export directory and the HTTP ingress `oip`. No Ray here: the
config is built (and printed with --print-config) before Ray starts."""

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from export.errors import ExportError
from export.serving.oip import ROUTER_APP
from export.store.manifest import Manifest, read_manifest, sha256_bytes
from export.store.versions import resolve_version, version_numbers, version_sha256

#: Ray Serve's direct gRPC between deployments stops at 4 MB per message unless told otherwise
#: (a batch of 7 images of 3x224x224 is 4.2 MB); gRPC's own ceiling is 2 GiB - 1. Ray reads it
#: when a process starts: set for a local instance's processes and in the runtime_env of every
#: replica (which `serve deploy` of the printed config carries to a cluster).
MESSAGE_SIZE_ENV = {"RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str((1 << 31) - 1)}
#: Ray Serve's gRPC proxy with the KServe v2 service from tritonclient's definitions
SERVICER_FUNCTION = "export.serving.grpc_oip.add_inference_service"
BACKBONE_APP = "export.serving.app:backbone_app"
ROUTER_IMPORT = "export.serving.app:oip_app"
#: the deployment of a model's replicas inside its application (the one rollouts reconfigure)
BACKBONE_DEPLOYMENT = "Backbone"


def check_directories(directories: Sequence[Path], engine: str, precision: str) -> Dict[str, Path]:
    """backbone name -> directory, each directory's engine files checked against the manifest."""
    from export.runtime import load  # loads torch: not for the Serve application builders

    names: Dict[str, Path] = {}
    for d in directories:
        net = load(d, engine=engine, precision=precision)  # hashes every file the engine uses
        name = net.manifest.backbone.name
        if name in names:
            raise ExportError(f"{d} and {names[name]} both hold backbone {name!r}; a model name is served once")
        names[name] = d.resolve()
    return names


def files_sha256(directory: Path) -> str:
    """One digest of every file the manifest lists (graphs, weights, int8 files): what a
    deployment pins. Publishing a weight version leaves it as it is; `params write`, a
    re-export or a quantize change it."""
    files = {n: e.sha256 for n, e in sorted(read_manifest(Path(directory)).files.items())}
    return sha256_bytes(json.dumps(files, sort_keys=True).encode())


def check_pinned(directory: Path, pinned: str) -> None:
    """A replica or ingress starts only on the files `serve` checked: a directory changed since
    (a re-export, weights written into it) would make a restarted replica answer with other
    weights than its siblings under the same model version."""
    now = files_sha256(directory)
    if now != pinned:
        raise ExportError(f"{directory} changed since `serve` checked it (files sha256 {now[:12]}..., "
                          f"served {pinned[:12]}...); a replica does not start on other weights: restart "
                          "serve to serve the new ones, or publish them as a version and roll it out")


def parse_versions_policy(text: str) -> Union[str, List[int]]:
    """--versions: 'latest', 'all' or version numbers 'N,M' (as Triton's version_policy)."""
    if text in ("latest", "all"):
        return text
    try:
        numbers = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        numbers = []
    if not numbers or numbers[0] < 1:
        raise ExportError(f"--versions {text!r}: expected latest, all, or version numbers >= 1 such as 2,5")
    return numbers


def policy_text(policy: Union[str, List[int]]) -> str:
    return policy if isinstance(policy, str) else ",".join(map(str, policy))


def served_numbers(manifest: Manifest, directory: Path, policy: Union[str, List[int]]) -> List[int]:
    """The versions a policy serves from a directory with published versions."""
    published = version_numbers(manifest)
    if policy == "latest":
        return published[-1:]
    if policy == "all":
        return published
    missing = [n for n in policy if n not in published]
    if missing:
        raise ExportError(f"--versions: {directory} has no weight version {missing[0]}; published: "
                          f"{', '.join(map(str, published))}")
    return list(policy)


def versions_config(directory: Path, numbers: Sequence[int], current: int, policy: str,
                    trust_key: Optional[str] = None) -> Dict[str, Any]:
    """The `user_config` of a model's replicas: the versions they hold (number -> the sha256
    of its files, checked here), the one unversioned requests get, the policy. Replicas load
    exactly these (Ray gives a replica started later the latest user_config)."""
    from export.store.versions import check_version, version_dir

    manifest = read_manifest(Path(directory))
    held: Dict[str, str] = {}
    for n in sorted(set(numbers) | {current}):
        record = resolve_version(manifest, Path(directory), n)
        check_version(Path(directory), manifest, record)
        if trust_key:
            from export.store.signing import check_signature

            check_signature(version_dir(Path(directory), n), Path(trust_key), f"{directory} version {n}")
        held[str(n)] = version_sha256(record)
    return {"versions": held, "current": str(current), "policy": policy}


def app_args(ns: argparse.Namespace, directory: Path) -> Dict[str, Any]:
    return {"directory": str(directory), "engine": ns.engine, "precision": ns.precision,
            "threads": ns.threads, "max_batch_size": ns.max_batch_size, "batch_wait_ms": ns.batch_wait_ms,
            "replicas": ns.replicas, "files_sha256": files_sha256(directory),
            "trust_key": str(Path(ns.trust_key).resolve()) if getattr(ns, "trust_key", None) else None}


def router_args(ns: argparse.Namespace, directories: List[Path]) -> Dict[str, Any]:
    return {"directories": [str(d) for d in directories], "engine": ns.engine, "precision": ns.precision,
            "max_request_bytes": int(ns.max_request_mb * (1 << 20)), "request_timeout_s": ns.request_timeout_s,
            "files_sha256s": [files_sha256(d) for d in directories]}


def backbone_user_config(ns: argparse.Namespace, directory: Path) -> Optional[Dict[str, Any]]:
    """The replicas' user_config for a directory with published versions (None without)."""
    manifest = read_manifest(directory)
    if not manifest.weight_versions:
        return None
    policy = parse_versions_policy(getattr(ns, "versions", "latest") or "latest")
    numbers = served_numbers(manifest, directory, policy)
    return versions_config(directory, numbers, max(numbers), policy_text(policy), getattr(ns, "trust_key", None))


def serve_config(ns: argparse.Namespace, models: Dict[str, Path]) -> Dict[str, Any]:
    """The Serve config (`serve deploy` schema) for the same applications."""
    apps = []
    for name, d in models.items():
        app: Dict[str, Any] = {"name": name, "route_prefix": None, "import_path": BACKBONE_APP,
                               "args": app_args(ns, d)}
        user_config = backbone_user_config(ns, d)
        if user_config is not None:
            app["deployments"] = [{"name": BACKBONE_DEPLOYMENT, "user_config": user_config}]
        apps.append(app)
    apps.append({"name": ROUTER_APP, "route_prefix": "/", "import_path": ROUTER_IMPORT,
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
