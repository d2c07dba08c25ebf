"""Moving a running deployment to another weight version, without restarting its replicas.

The version's files are checked here first (sha256 against its record, a version of the served
graphs, the signature when the deployment trusts a key); then the model's application is
re-deployed with only its replicas' `user_config` changed: Serve updates the replicas in place,
all at once, each loading the version beside the one it serves and switching between batches
(`export.serving.app.Backbone.reconfigure`). A replica started later (crash, scaling) gets the
same user_config, so it comes up on this version. Rollback is a rollout to an older version.

The weights of a deployment change only this way: through Ray's control plane, which takes
Ray's token authentication where the cluster uses it; the inference API has no such endpoint.
"""

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from export.errors import ExportError, first_line
from export.serving.config import BACKBONE_APP, BACKBONE_DEPLOYMENT, served_numbers, versions_config
from export.store.manifest import read_manifest
from export.store.versions import read_deployed, record_deployed, resolve_version


@dataclass
class RolloutResult:
    app: str
    version: int
    previous: str
    seconds: float
    held: List[str]


def connect(address: Optional[str], directory: Path) -> str:
    """Join the Ray cluster that serves `directory`: `address`, else $RAY_ADDRESS, else the
    address `serve` recorded in versions/deployed.json."""
    if address is None:
        address = os.environ.get("RAY_ADDRESS")
    if address is None:
        known = [e.get("address") for e in read_deployed(directory).values()
                 if isinstance(e, dict) and e.get("address")]
        address = known[-1] if known else None
    if address is None:
        raise ExportError(f"no Ray address for {directory}: give --address HOST:PORT (serve prints it: "
                          "'ray HOST:PORT'), or set RAY_ADDRESS")
    # a local cluster started by `serve` uses Ray's token authentication; a driver given an
    # explicit address presents the token only when told to, before Ray reads its settings
    if Path("~/.ray/auth_token").expanduser().is_file():
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    if not ray.is_initialized():
        try:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        except ConnectionError as exc:
            raise ExportError(f"cannot reach Ray at {address}: {first_line(exc)}") from None
    return address


def find_app(apps: Dict[str, Dict[str, Any]], directory: Path, name: Optional[str]) -> str:
    """The application serving `directory` (or named `name`)."""
    serving = {n: a for n, a in apps.items() if a.get("import_path") == BACKBONE_APP}
    if name is not None:
        if name not in serving:
            raise ExportError(f"no model application {name!r} on this cluster; served: {', '.join(serving) or 'none'}")
        return name
    resolved = str(directory.resolve())
    found = [n for n, a in serving.items() if str(Path(a["args"]["directory"]).resolve()) == resolved]
    if not found:
        dirs = ", ".join(f"{n}: {a['args']['directory']}" for n, a in serving.items()) or "none"
        raise ExportError(f"{directory} is not served on this cluster (served: {dirs})")
    return found[0]


def rollout(directory: Path, version: int, address: Optional[str] = None, app: Optional[str] = None,
            wait_s: float = 300.0) -> RolloutResult:
    """Move the deployment serving `directory` to `version`; returns when every replica serves it."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    record = resolve_version(manifest, directory, version)
    address = connect(address, directory)  # before anything imports Ray
    from ray import serve

    from export.serving.app import app_configs, apply_apps

    apps = app_configs()
    name = find_app(apps, directory, app)
    config = dict(apps[name])
    trust_key = config["args"].get("trust_key")
    deployments = [dict(d) for d in config.get("deployments") or []]
    current = next((d.get("user_config") for d in deployments if d.get("name") == BACKBONE_DEPLOYMENT), None)
    if not current:
        raise ExportError(f"application {name!r} serves {directory} without weight versions (serve started "
                          "before any was published): restart serve to serve versions")
    policy = current.get("policy", "latest")
    if policy == "latest":
        held = [record.number]
    elif policy == "all":  # what serve started with and every version rolled out since
        held = sorted({int(n) for n in current.get("versions", {})} | {record.number})
    else:  # the policy's numbers and the target
        numbers = [int(n) for n in policy.split(",")]
        held = sorted(set(served_numbers(manifest, directory, numbers)) | {record.number})
    user_config = versions_config(directory, held, record.number, policy, trust_key)  # hashes, signature
    config["deployments"] = [d for d in deployments if d.get("name") != BACKBONE_DEPLOYMENT] + [
        {"name": BACKBONE_DEPLOYMENT, "user_config": user_config}]
    start = time.perf_counter()
    apply_apps([config], wait_s)
    handle = serve.get_app_handle(name)
    deadline = time.monotonic() + wait_s
    agreed = 0
    while agreed < 8:  # requests land on random replicas: several in a row must all agree
        info = handle.served_versions.remote().result(timeout_s=30)
        agreed = agreed + 1 if info["current"] == str(record.number) else 0
        if time.monotonic() > deadline:
            raise ExportError(f"application {name!r}: replicas still report version {info['current']} "
                              f"after {wait_s:g} s")
    seconds = time.perf_counter() - start
    record_deployed(directory, name, record.number, address)
    return RolloutResult(name, record.number, str(current.get("current")), seconds, [str(n) for n in held])
