"""`manifest.json`: what was exported, from what, how well it matches eager, and the sha256 of
every file, which every loader checks before it trusts a file.

One typed model (`Manifest`, pydantic), read and checked once (`read_manifest`) and passed
around; it answers the questions every command asks of a directory (which files a mode has in a
format, the AOTInductor packages of a mode, whether an input fits).
"""

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from export.errors import ExportError, IntegrityError, ManifestError, ParamsError, first_line
from export.store.atomic import atomic_write_bytes

MANIFEST = "manifest.json"
#: the one external-data file every mode's ONNX graph reads its parameters from (--onnx-weights shared)
SHARED_WEIGHTS = "weights.onnx.data"
#: the directory of published weight versions: versions/<n>/weights.safetensors
VERSIONS_DIR = "versions"
#: file name of each kind of artifact, after the mode: `out.pt`, `full.onnx`, `out.int8.onnx`
ARTIFACT_SUFFIX = {"torchscript": ".pt", "onnx": ".onnx", "int8": ".int8.onnx", "exported": ".ep.pt2",
                   "pte": ".pte", "aoti": ".aoti.pt2"}
#: the float32 formats, in the order every listing uses (AOTInductor last: its packages are
#: listed per batch size)
FLOAT_FORMATS = ("torchscript", "onnx", "exported", "pte", "aoti")


def artifact_name(mode: str, kind: str) -> str:
    """The file name of `mode`'s artifact of `kind` (torchscript, onnx, int8, exported, aoti)."""
    return mode + ARTIFACT_SUFFIX[kind]


def aoti_name(mode: str, batch: Optional[int]) -> str:
    """`out.aoti.pt2` (any batch size) or `out.aoti.b64.pt2` (compiled for batch 64 only)."""
    return artifact_name(mode, "aoti") if batch is None else f"{mode}.aoti.b{batch}.pt2"


def free_dims(shape: Sequence[Any]) -> List[int]:
    """A manifest shape with its named (dynamic) dimensions as -1."""
    return [d if isinstance(d, int) else -1 for d in shape]


class _Entry(BaseModel):
    """Every part of the manifest keeps keys it does not know (a newer tool's) when rewritten."""

    model_config = ConfigDict(extra="allow")


class FileEntry(_Entry):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class BackboneInfo(_Entry):
    name: str
    args: Dict[str, Any] = {}
    num_params: int = 0


class InputSpec(_Entry):
    name: str = "x"
    #: ["batch", C, H, W]: a name for each dynamic dimension, an int for each fixed one
    shape: List[Union[int, str]]
    dtype: str = "float32"
    #: the dynamic dimensions: batch, and height and width where the graphs take any size
    dynamic: List[str] = []


class OutputSpec(_Entry):
    name: str
    #: symbolic: ["batch", 64, "ceil(height/2)", "ceil(width/2)"]
    shape: List[Union[int, str, None]]
    shape_at_export: List[int] = []
    #: for stages: the module that produces it and its spatial reduction
    module: Optional[str] = None
    reduction: Optional[int] = None


class ModeSpec(_Entry):
    outputs: List[OutputSpec]


class LayoutEntry(_Entry):
    """One parameter's slice of the flat vector and where each format holds it."""

    name: str
    shape: List[int]
    offset: int
    length: int
    #: its names in torch.export programs and AOTInductor packages
    program_names: List[str] = []
    #: the ONNX initializer that holds it (exports with ONNX files)
    onnx_name: Optional[str] = None


class FlatParams(_Entry):
    count: int
    dtype: str = "float32"
    layout: List[LayoutEntry] = []


class ProgramInfo(_Entry):
    """A torch.export program, an ExecuTorch program or an AOTInductor package."""

    format: str
    mode: str
    #: None: any batch size; N: compiled for batch N only (AOTInductor)
    batch: Optional[int] = None
    dynamic: List[str] = []
    #: AOTInductor: the torch that compiled it (packages run only there)
    torch: Optional[str] = None
    #: AOTInductor: whether load_constants replaces every parameter it reads
    weights_replaceable: bool = True
    #: AOTInductor: the package kind (--aoti-weights): replaceable, or frozen (oneDNN kernels, fixed weights)
    aoti_weights: Optional[str] = None
    seconds: Optional[float] = None
    compiler: Optional[str] = None
    inductor_configs: Optional[Dict[str, Any]] = None
    metadata: Optional[Dict[str, Any]] = None
    #: ExecuTorch: the runtime version that lowered it, its delegate, the share of operators
    #: the delegate runs, the batch bound its memory is planned for and that memory
    executorch: Optional[str] = None
    backend: Optional[str] = None
    delegated_ops_pct: Optional[float] = None
    max_batch: Optional[int] = None
    planned_bytes: Optional[int] = None
    #: ExecuTorch: whether the program has the `get_params` method (the flat vector)
    flat_params: Optional[bool] = None


class WeightVersion(_Entry):
    """A published weight version (`python -m export publish`): the same graphs with the
    weights of one checkpoint, stored in `versions/<number>/` and never changed afterwards."""

    number: int = Field(ge=1)
    #: file name (inside versions/<number>/) -> sha256 and size
    files: Dict[str, FileEntry]
    #: the checkpoint it came from: file name, sha256, kind (state_dict or mammoth)
    checkpoint: Dict[str, Any] = {}
    #: Mammoth's task index (from `<ckpt_name>_<task>.pt`) and the run's dataset and arguments
    task: Optional[int] = None
    dataset: Optional[str] = None
    args: Dict[str, Any] = {}
    published: str = ""
    seconds: Optional[float] = None
    #: file -> output -> max_abs, max_rel, ok (every file of the export, with these weights)
    verification: Dict[str, Dict[str, Any]] = {}
    max_abs: Optional[float] = None
    #: Ed25519 signature of the version's record (`publish --sign-key`)
    signature: Optional[Dict[str, str]] = None


class Manifest(_Entry):
    """An export directory's manifest.json."""

    format_version: int = 1
    backbone: BackboneInfo
    source: Dict[str, Any] = {}
    input: InputSpec
    #: the input normalisation the model was trained with (export.pipeline.preprocessing)
    preprocessing: Optional[Dict[str, Any]] = None
    modes: Dict[str, ModeSpec]
    formats: List[str] = []
    files: Dict[str, FileEntry]
    programs: Dict[str, ProgramInfo] = {}
    opset: Optional[int] = None
    onnx: Optional[Dict[str, Any]] = None
    #: embedded (each ONNX file self-contained) or shared (weights.onnx.data)
    onnx_weights: Optional[str] = None
    versions: Dict[str, str] = {}
    #: format -> mode or file -> output -> max_abs, max_rel, ok
    verification: Dict[str, Dict[str, Any]] = {}
    tolerance: Dict[str, Any] = {}
    flat_params: FlatParams
    timing: Dict[str, Any] = {}
    #: mode -> its int8 file and how it was calibrated (python -m export quantize)
    quantized: Dict[str, Dict[str, Any]] = {}
    #: top-1 per engine x precision (python -m export accuracy)
    accuracy: Optional[Dict[str, Any]] = None
    #: per CPU (model and kernel flags): the fastest engine per precision that
    #: `python -m export bench DIR --save` measured here, for load(DIR, engine="auto")
    engine_choice: Dict[str, Dict[str, Any]] = {}
    #: published weight versions by number (python -m export publish); files in versions/<n>/
    weight_versions: Dict[str, WeightVersion] = {}
    #: versions `versions --keep` never prunes (python -m export versions --pin)
    pinned_versions: List[int] = []

    # ---------------------------------------------------------------- what the directory holds
    def aoti_packages(self, mode: str) -> Dict[Optional[int], str]:
        """batch (None: any batch) -> file name of every listed AOTInductor package of `mode`."""
        return {info.batch: name for name, info in sorted(self.programs.items())
                if info.format == "aoti" and info.mode == mode and name in self.files}

    def mode_files(self, fmt: str) -> Dict[str, str]:
        """mode -> file name of every listed file of format `fmt` (torchscript, onnx, int8,
        exported; for aoti: the any-batch package, else the first per-batch one)."""
        from zoo.base import RETURNT_MODES  # loads torch: not at import time

        found = {}
        for mode in [m for m in RETURNT_MODES if m in self.modes]:
            if fmt == "aoti":
                packages = self.aoti_packages(mode)
                name = packages.get(None) or next(iter(packages.values()), None)
            else:
                name = artifact_name(mode, fmt) if artifact_name(mode, fmt) in self.files else None
            if name:
                found[mode] = name
        return found

    def modes_with(self, fmt: str) -> List[str]:
        """The modes that have files of format `fmt`, in returnt order."""
        return list(self.mode_files(fmt))

    def artifacts(self) -> List[tuple]:
        """(mode, format, file name, batch) of every listed artifact of the float32 formats;
        batch is None except for a file made for one batch size (AOTInductor, ExecuTorch)."""
        found = []
        for mode in self.modes:
            found += [(mode, fmt, artifact_name(mode, fmt), self._fixed_batch(artifact_name(mode, fmt)))
                      for fmt in FLOAT_FORMATS[:-1] if artifact_name(mode, fmt) in self.files]
            found += [(mode, "aoti", name, batch) for batch, name in self.aoti_packages(mode).items()]
        return found

    def _fixed_batch(self, name: str) -> Optional[int]:
        """The one batch size a file takes (an ExecuTorch program lowered for batch 1), else None."""
        info = self.programs.get(name)
        return info.batch if info is not None and info.format == "pte" else None

    def output_names(self, mode: str) -> List[str]:
        """The output names of `mode`, in its returned order."""
        return [o.name for o in self.modes[mode].outputs]

    # ---------------------------------------------------------------- its input
    @property
    def dynamic_hw(self) -> bool:
        return "height" in self.input.dynamic

    def input_dims(self) -> List[int]:
        """The input's shape with -1 for each dynamic dimension (batch; height and width where
        the export takes any image size), as serving protocols and model configs write it."""
        dims = free_dims(self.input.shape)
        for name, index in (("batch", 0), ("height", -2), ("width", -1)):
            if name in self.input.dynamic:
                dims[index] = -1
        return dims

    def input_shape_problem(self, shape: Sequence[int]) -> str:
        """'' when an input of `shape` fits (batch >= 1; H and W free where the graphs take any
        size), else what is wrong, naming the expected shape. Every check of an input against an
        export uses it (the engines, the server, calibration and accuracy data)."""
        dims = self.input_dims()
        expected = "[batch, " + ", ".join("any" if d < 0 else str(d) for d in dims[1:]) + "]"
        shape = [int(d) for d in shape]
        if len(shape) != len(dims):
            return f"shape {shape} has rank {len(shape)}; expected rank {len(dims)}: {expected}"
        if min(shape, default=0) < 1 or any(w >= 0 and d != w for d, w in zip(shape[1:], dims[1:])):
            return f"shape {shape} does not fit; expected {expected} with batch >= 1"
        return ""

    def to_json(self) -> Dict[str, Any]:
        """The manifest as JSON values (non-finite floats as strings: JSON has none)."""
        return _finite(self.model_dump(mode="python"))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_entry(path: Path) -> FileEntry:
    return FileEntry(sha256=sha256(path), size=path.stat().st_size)


def layout_problem(layout: List[LayoutEntry], count: Optional[int] = None) -> str:
    """'' when the layout tiles the flat vector exactly (contiguous, in order, lengths equal to
    the shapes' products, total == count), else the first problem in one line."""
    offset = 0
    for e in layout:
        if e.offset != offset:
            return f"{e.name}: offset {e.offset}, expected {offset}"
        if e.length != math.prod(e.shape):
            return f"{e.name}: length {e.length} != product of shape {e.shape}"
        offset += e.length
    if count is not None and offset != count:
        return f"layout covers {offset} parameters, the manifest's count is {count}"
    return ""


def _finite(value: Any) -> Any:
    """JSON has no NaN/Infinity: non-finite floats are written as strings ('nan', 'inf')."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def manifest_bytes(manifest: Manifest) -> bytes:
    return (json.dumps(manifest.to_json(), indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    path = Path(directory) / MANIFEST
    atomic_write_bytes(path, manifest_bytes(manifest))
    return path


def read_manifest(directory: Path) -> Manifest:
    """The manifest of an export directory, checked for the shape this tool writes (one line
    naming the first problem otherwise)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{directory}: no {MANIFEST} (not an export directory?)")
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({first_line(exc)})") from None
    return parse_manifest(data, path)


def parse_manifest(data: Any, where: object = MANIFEST) -> Manifest:
    """A manifest from JSON values, checked; one-line ManifestError naming the first problem."""
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: expected a JSON object, found {type(data).__name__}")
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        raise ManifestError(f"{where}: {key or 'the manifest'}: {first['msg']} (not written by this tool, "
                            "or damaged)") from None
    names = list(manifest.files) + [n for v in manifest.weight_versions.values() for n in v.files]
    bad = [n for n in names if "/" in n or "\\" in n or n.startswith(".")]
    if bad:
        raise ManifestError(f"{where}: bad files entry {bad[0]!r} (expected a plain file name "
                            "with sha256 and size)")
    wrong = [k for k, v in manifest.weight_versions.items() if k != str(v.number)]
    if wrong:
        raise ManifestError(f"{where}: weight_versions entry {wrong[0]!r} holds version "
                            f"{manifest.weight_versions[wrong[0]].number}")
    return manifest


def check_file(directory: Path, manifest: Manifest, name: str) -> None:
    """One listed file exists with its recorded size and sha256."""
    entry = manifest.files.get(name)
    path = Path(directory) / name
    if entry is None:
        raise IntegrityError(f"{path}: not listed in {MANIFEST}")
    if not path.is_file():
        raise IntegrityError(f"{path}: listed in {MANIFEST} but missing")
    if path.stat().st_size != entry.size or sha256(path) != entry.sha256:
        raise IntegrityError(f"{path}: sha256 does not match {MANIFEST} (the file was changed, "
                             "is corrupt, or comes from another export)")


def check_files(directory: Path, manifest: Manifest, names: Optional[Iterable[str]] = None) -> None:
    """Every file in `names` (default: every listed file) is the one the manifest describes."""
    for name in sorted(manifest.files if names is None else names):
        check_file(directory, manifest, name)


def read_verified(directory: Path, manifest: Manifest, name: str) -> bytes:
    """A listed file's bytes, hashed as read: what is used is what was checked."""
    return read_hashed(Path(directory) / name, manifest.files.get(name), MANIFEST,
                       "the file was changed, is corrupt, or comes from another export")


def read_hashed(path: Path, entry: Optional[FileEntry], listed_in: str, why: str) -> bytes:
    """The bytes of `path` if they are the ones `entry` (from `listed_in`) describes; one-line
    IntegrityError otherwise (`why`: what a mismatch means)."""
    if entry is None:
        raise IntegrityError(f"{path}: not listed in {listed_in}")
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise IntegrityError(f"{path}: listed in {listed_in} but missing") from None
    if len(data) != entry.size or sha256_bytes(data) != entry.sha256:
        raise IntegrityError(f"{path}: sha256 does not match {listed_in} ({why})")
    return data


def stray_files(directory: Path, manifest: Manifest) -> List[str]:
    """Files in the directory that the manifest does not list (temp files of a killed run,
    artifacts of an earlier export)."""
    listed = set(manifest.files) | {MANIFEST}
    if manifest.weight_versions:
        listed.add(VERSIONS_DIR)
    return sorted(p.name for p in Path(directory).iterdir() if p.name not in listed)


def refuse_export_file(out: Path) -> None:
    """Refuse to write over a file of an export directory (a listed artifact or the manifest):
    it would no longer match the manifest's sha256. New names beside them are fine."""
    out = Path(os.path.abspath(out))
    manifest_path = out.parent / MANIFEST
    if not manifest_path.is_file():
        return
    if out.name == MANIFEST:
        raise ParamsError(f"{out}: refusing to overwrite an export's {MANIFEST}; write to "
                          "a new file outside the export directory")
    try:
        listed = read_manifest(out.parent).files
    except ExportError:
        listed = {}
    if out.name in listed:
        raise ParamsError(f"{out}: refusing to overwrite an exported artifact (its sha256 is "
                          f"in {MANIFEST}); write to a new file")
