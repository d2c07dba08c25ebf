"""Published weight versions of an export directory: `versions/<n>/`, numbered from 1 as
Triton numbers model versions, each never changed after publishing.

A version holds only what changes from task to task (the graphs are the export's, stored once):

- `weights.safetensors`: every parameter and floating buffer (BatchNorm's running statistics)
  of the eager backbone by its state_dict name; each engine loads the export's graph files
  and puts these in (the flat vector through the manifest's layout, buffers by name);
- `graphs.json`: the backbone, the version's number and the sha256 of every export file the
  version runs with, so a signature over the version directory also covers the graphs;
- `model.sig` when signed (OpenSSF model-signing, `export.store.signing`).

Its record (`Manifest.weight_versions`) lists these files' sha256; `versions/deployed.json`
says which version each running deployment serves (written by `serve` and `rollout`), so
pruning never removes it.
"""

import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Tuple, Union

from export.errors import ExportError, IntegrityError, ManifestError
from export.store.atomic import atomic_write_bytes
from export.store.manifest import (
    MANIFEST,
    SHARED_WEIGHTS,
    VERSIONS_DIR,
    LayoutEntry,
    Manifest,
    WeightVersion,
    read_hashed,
    sha256_bytes,
)

if TYPE_CHECKING:
    from torch import Tensor

VERSION_WEIGHTS = "weights.safetensors"
GRAPHS = "graphs.json"
SIGNATURE = "model.sig"
DEPLOYED = "deployed.json"


def version_dir(directory: Path, number: int) -> Path:
    return Path(directory) / VERSIONS_DIR / str(int(number))


def version_numbers(manifest: Manifest) -> List[int]:
    return sorted(int(k) for k in manifest.weight_versions)


def resolve_version(manifest: Manifest, directory: Path, version: Union[int, str, None]) -> WeightVersion:
    """The record of `version` (None or 'latest': the newest); one line naming the versions
    there are otherwise."""
    numbers = version_numbers(manifest)
    if not numbers:
        raise ManifestError(f"{directory}: no published weight versions (python -m export publish "
                            f"{directory} CHECKPOINT adds them)")
    if version is None or version == "latest":
        return manifest.weight_versions[str(numbers[-1])]
    try:
        number = int(version)
    except (TypeError, ValueError):
        number = None
    if number is None or str(number) not in manifest.weight_versions:
        raise ManifestError(f"{directory}: no weight version {version!r}; published: "
                            f"{', '.join(map(str, numbers))}")
    return manifest.weight_versions[str(number)]


def graph_files(manifest: Manifest) -> Dict[str, str]:
    """file name -> sha256 of every export file a version runs with (the float formats' graphs
    and the shared ONNX weights file, whose values a version replaces in memory)."""
    names = [name for _, _, name, _ in manifest.artifacts()]
    if SHARED_WEIGHTS in manifest.files:
        names.append(SHARED_WEIGHTS)
    return {n: manifest.files[n].sha256 for n in sorted(names)}


def graphs_record(manifest: Manifest, number: int) -> bytes:
    """The `graphs.json` of version `number`: what it is a version of."""
    record = {"backbone": manifest.backbone.name, "args": manifest.backbone.args, "version": int(number),
              "graphs": graph_files(manifest)}
    return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()


def read_version_file(directory: Path, version: WeightVersion, name: str) -> bytes:
    """A file of a version, hashed as read against its record."""
    return read_hashed(version_dir(directory, version.number) / name, version.files.get(name),
                       f"version {version.number} in {MANIFEST}",
                       "the file was changed or is corrupt; a version is never rewritten")


def check_version(directory: Path, manifest: Manifest, version: WeightVersion) -> None:
    """Every file of the version is the one recorded, and it is a version of these graphs."""
    for name in sorted(version.files):
        read_version_file(directory, version, name)
    if GRAPHS in version.files:
        recorded = json.loads(read_version_file(directory, version, GRAPHS))
        if recorded.get("graphs") != graph_files(manifest) or recorded.get("version") != version.number:
            raise IntegrityError(f"{version_dir(directory, version.number)}: published for other graph "
                                 "files than this export's (re-exported since?); publish it again")


def version_sha256(version: WeightVersion) -> str:
    """One digest naming a version's content: its files' sha256 (what a deployment pins)."""
    files = {n: e.sha256 for n, e in sorted(version.files.items()) if n != SIGNATURE}
    return sha256_bytes(json.dumps({"version": version.number, "files": files}, sort_keys=True).encode())


def weights_bytes(params: Dict[str, "Tensor"], buffers: Dict[str, "Tensor"]) -> bytes:
    """The safetensors bytes of a version's weights (parameters and floating buffers by name)."""
    from safetensors.torch import save

    tensors = {name: t.detach().cpu().contiguous().clone() for name, t in {**params, **buffers}.items()}
    return save(tensors, metadata={"format": "pt"})


def read_version_weights(directory: Path, version: WeightVersion,
                         layout: List[LayoutEntry]) -> Tuple["Tensor", Dict[str, "Tensor"]]:
    """(flat vector in the layout's order, floating buffers by eager name) of a version, from
    bytes checked against its record."""
    import torch
    from safetensors.torch import load

    tensors = load(read_version_file(directory, version, VERSION_WEIGHTS))
    missing = [e.name for e in layout if e.name not in tensors]
    if missing:
        raise IntegrityError(f"{version_dir(directory, version.number) / VERSION_WEIGHTS}: no parameter "
                             f"{missing[0]} of the manifest's layout")
    vector = torch.cat([tensors[e.name].reshape(-1).float() for e in layout])
    params = {e.name for e in layout}
    return vector, {n: t for n, t in tensors.items() if n not in params}


# ---------------------------------------------------------------- what deployments serve
def deployed_path(directory: Path) -> Path:
    return Path(directory) / VERSIONS_DIR / DEPLOYED


def read_deployed(directory: Path) -> Dict[str, Dict[str, Any]]:
    """deployment (Serve application) -> the version it serves, as `serve`/`rollout` last wrote."""
    path = deployed_path(directory)
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ManifestError(f"{path}: not valid JSON (written by serve and rollout; remove it "
                            "if no deployment serves this directory)") from None
    return data if isinstance(data, dict) else {}


def record_deployed(directory: Path, app: str, number: int, address: str = "") -> None:
    """Note that deployment `app` serves version `number` now (pruning keeps it)."""
    deployed = read_deployed(directory)
    deployed[app] = {"version": int(number), "address": address,
                     "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write_bytes(deployed_path(directory), (json.dumps(deployed, indent=2, sort_keys=True) + "\n").encode())


def deployed_numbers(directory: Path) -> Dict[int, List[str]]:
    """version -> the deployments that serve it."""
    found: Dict[int, List[str]] = {}
    for app, entry in read_deployed(directory).items():
        if isinstance(entry, dict) and isinstance(entry.get("version"), int):
            found.setdefault(entry["version"], []).append(app)
    return found


# ---------------------------------------------------------------- leftovers and removal
def unlisted_version_dirs(directory: Path, manifest: Manifest) -> List[Path]:
    """Entries of versions/ that no record lists: a publish killed before its manifest was
    written, a staging directory, a version removed from the manifest but not yet from disk."""
    root = Path(directory) / VERSIONS_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name != DEPLOYED and p.name not in manifest.weight_versions
                  and not p.name.startswith(f".{DEPLOYED}."))


def remove_tree(path: Path) -> None:
    """Remove a version directory (its files are read-only: that only stops writes)."""
    if path.is_dir():
        shutil.rmtree(path, onerror=_make_writable_and_retry)
    elif path.exists():
        path.unlink()


def _make_writable_and_retry(func, path, exc_info) -> None:
    os.chmod(os.path.dirname(path), 0o755)
    try:
        os.chmod(path, 0o644)
    except OSError:
        pass
    func(path)


def refuse_if_versions(directory: Path, manifest: Manifest, what: str) -> None:
    """A command that would change the weights or graphs of a directory with published versions
    is refused: versions are how its weights change, and they belong to these graphs."""
    if manifest.weight_versions:
        raise ExportError(f"{directory} has published weight versions "
                          f"({', '.join(map(str, version_numbers(manifest)))}): {what}")
