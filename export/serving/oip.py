"""The Open Inference Protocol (KServe v2, what Triton speaks) for export directories, without
any server: model metadata from the manifest, infer requests (JSON tensors and the binary tensor
extension) parsed and checked into (input array, returnt mode, wanted outputs), responses encoded.

The `serve` command's HTTP ingress calls these; they raise `RequestError` (HTTP 400, one line
naming the bad value and what is allowed) for anything a client got wrong.
"""

import difflib
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from export.store.manifest import Manifest, free_dims
from zoo.modes import RETURNT_MODES

#: the one input and output datatype exports have (the manifest's float32)
DATATYPE = "FP32"
#: header of the binary tensor extension: length of the JSON part at the start of the body
HEADER_LENGTH = "Inference-Header-Content-Length"
MODEL_VERSION = "1"
#: the Serve application that answers HTTP (the models' own applications have no route)
ROUTER_APP = "oip"


class RequestError(Exception):
    """A client's mistake: answered with `status` and {"error": message}."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def close_names(name: str, known: Sequence[str]) -> str:
    """'; did you mean a, b' when some known names resemble `name`, else ''."""
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.4)
    return f"; did you mean {', '.join(close)}" if close else ""


@dataclass
class ModelSpec:
    """What the protocol needs of one export directory, read from its manifest."""

    name: str
    input_name: str
    input_dims: List[int]
    #: returnt mode -> its output names, for the exported modes only
    modes: Dict[str, List[str]]
    #: output name -> dims, every output of every exported mode
    outputs: Dict[str, List[int]] = field(default_factory=dict)
    parameters: Dict[str, Any] = field(default_factory=dict)
    #: the export's manifest (what inputs are checked against)
    manifest: Optional[Manifest] = field(default=None, repr=False)

    @classmethod
    def from_manifest(cls, manifest: Manifest, manifest_bytes: bytes, engine: str,
                      precision: str) -> "ModelSpec":
        spec = manifest.input
        modes = {m: manifest.output_names(m) for m in RETURNT_MODES if m in manifest.modes}
        outputs: Dict[str, List[int]] = {}
        for mode in sorted(modes, key=lambda m: m != "full"):  # 'full' first: stage order
            for o in manifest.modes[mode].outputs:
                outputs.setdefault(o.name, free_dims(o.shape))
        params = {"returnt_modes": list(modes), "mode_outputs": modes, "engine": engine, "precision": precision,
                  "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
                  "files": {n: f.sha256 for n, f in sorted(manifest.files.items())},
                  "input_shape_at_export": [1, *spec.shape[1:]]}
        return cls(manifest.backbone.name, spec.name, manifest.input_dims(), modes, outputs, params, manifest)

    @property
    def versioned(self) -> bool:
        """Whether the directory has published weight versions (else it serves its export's
        weights as version 1)."""
        return bool(self.manifest is not None and self.manifest.weight_versions)

    def metadata(self, served: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """GET /v2/models/{name}: the protocol's model metadata (+ modes, engine and sha256s);
        `served`: the versions the replicas hold now, the current one and each one's sha256."""
        served = served or {"versions": [MODEL_VERSION], "current": MODEL_VERSION}
        parameters = {**self.parameters, "current_version": served["current"]}
        if served.get("sha256"):
            parameters["weights_sha256"] = served["sha256"]
        return {"name": self.name, "versions": list(served["versions"]),
                "platform": f"returnt-zoo_{self.parameters['engine']}",
                "inputs": [{"name": self.input_name, "datatype": DATATYPE, "shape": self.input_dims}],
                "outputs": [{"name": n, "datatype": DATATYPE, "shape": d} for n, d in self.outputs.items()],
                "parameters": parameters}


    def choose_mode(self, wanted: List[str], returnt: Optional[str]) -> str:
        """The returnt mode a request runs: the one it names, else the smallest exported mode
        whose outputs include every output asked for (logits alone: 'out')."""
        if returnt is not None:
            if not isinstance(returnt, str) or returnt not in self.modes:
                raise RequestError(f"parameter returnt={returnt!r} is not served; allowed: "
                                   f"{', '.join(self.modes)}")
            missing = [n for n in wanted if n not in self.modes[returnt]]
            if missing:
                raise RequestError(f"returnt {returnt!r} has no output {missing[0]!r}; its outputs: "
                                   f"{', '.join(self.modes[returnt])}")
            return returnt
        if not wanted:
            wanted = ["logits"]
        for mode in RETURNT_MODES:
            if mode in self.modes and set(wanted) <= set(self.modes[mode]):
                return mode
        raise RequestError(f"no exported mode returns all of {', '.join(wanted)}; exported modes: "
                           + "; ".join(f"{m}: {', '.join(o)}" for m, o in self.modes.items()))


@dataclass
class InferRequest:
    """A checked infer request: run `mode` on `x`, answer `outputs` (binary where asked)."""

    x: np.ndarray
    mode: str
    outputs: List[str]
    binary: Dict[str, bool]
    id: Optional[str] = None


#: deepest JSON nesting a request needs: object > inputs > tensor > data of rank up to 8, with room
MAX_JSON_DEPTH = 32
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_BRACKETS = bytes(range(256)).translate(None, b"[]{}")


def json_depth(data: bytes) -> int:
    """The deepest nesting of `[`/`{` in a JSON text (brackets inside strings not counted),
    measured without parsing: Python's parser recurses once per level."""
    brackets = _STRING.sub(b"", data).translate(None, _BRACKETS)
    if not brackets:
        return 0
    steps = np.frombuffer(brackets, np.uint8)
    return int(np.cumsum(np.where((steps == ord("[")) | (steps == ord("{")), 1, -1)).max())


def _json_object(data: bytes, what: str) -> Dict[str, Any]:
    depth = json_depth(data)
    if depth > MAX_JSON_DEPTH:
        raise RequestError(f"{what} nests {depth} levels deep; at most {MAX_JSON_DEPTH} are allowed")
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RequestError(f"{what} is not valid JSON ({exc}); expected an object like "
                           '{"inputs": [{"name": ..., "datatype": "FP32", "shape": [...], "data": [...]}]}') from None
    if not isinstance(obj, dict):
        raise RequestError(f"{what} is a JSON {type(obj).__name__}; expected an object with 'inputs'")
    return obj


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Open(BaseModel):
    """Parameters objects: the protocol lets clients add their own keys; the known ones are typed."""

    model_config = ConfigDict(extra="allow", strict=True)


class TensorParameters(_Strict):
    binary_data_size: Optional[int] = Field(default=None, ge=0)


class RequestInput(_Strict):
    name: str
    datatype: str
    shape: List[int]
    parameters: Optional[TensorParameters] = None
    #: flat or nested numbers; checked against the shape after the other fields
    data: Optional[List[Any]] = None


class OutputParameters(_Strict):
    binary_data: Optional[bool] = None


class RequestOutput(_Strict):
    name: str
    parameters: Optional[OutputParameters] = None


class RequestParameters(_Open):
    returnt: Optional[str] = None
    binary_data_output: Optional[bool] = None


class InferRequestBody(_Strict):
    """The JSON part of POST /v2/models/{name}/infer (KServe v2 inference request)."""

    id: Optional[str] = None
    parameters: Optional[RequestParameters] = None
    inputs: List[RequestInput]
    outputs: Optional[List[RequestOutput]] = None


def _validation_line(exc: ValidationError) -> str:
    """A pydantic error as one line: where, what was wrong, what was given."""
    err = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in err["loc"]) or "request body"
    given = json.dumps(err.get("input"), default=str)
    if len(given) > 60:
        given = given[:57] + "..."
    return f"{where}: {err['msg']} (got {given})"


def split_body(body: bytes, header_length: Optional[str]) -> Tuple[bytes, bytes]:
    """(JSON part, binary part) of a request body (`Inference-Header-Content-Length` splits them)."""
    if header_length is None:
        return body, b""
    try:
        n = int(header_length)
    except ValueError:
        n = -1
    if not 0 < n <= len(body):
        raise RequestError(f"{HEADER_LENGTH}: {header_length!r} is not a length within the body of "
                           f"{len(body)} bytes")
    return body[:n], body[n:]


def check_input(spec: ModelSpec, name: str, datatype: str, shape: List[int]) -> int:
    """The value count of the one input, after its name, datatype and shape are checked."""
    if name != spec.input_name:
        raise RequestError(f"unknown input {name!r}; model {spec.name!r} has one input, {spec.input_name!r}")
    if datatype != DATATYPE:
        raise RequestError(f"input {name!r} has datatype {datatype!r}; allowed: {DATATYPE}")
    problem = spec.manifest.input_shape_problem(shape)
    if problem:
        raise RequestError(f"input {name!r}: {problem}")
    return int(np.prod(shape))


def array_from_json(name: str, data: List[Any], shape: List[int]) -> np.ndarray:
    """JSON `data` as float32 of `shape`: a flat list of all values, or lists nested exactly as
    the shape (a 3072 x [1] nesting for shape [1, 3, 32, 32] is neither)."""
    count = int(np.prod(shape))
    try:
        arr = np.asarray(data)
    except (TypeError, ValueError):  # ragged nesting
        raise RequestError(f"input {name!r}: data is not a flat list or a nesting of shape {shape}") from None
    if arr.dtype.kind not in "fiu":
        raise RequestError(f"input {name!r}: data is not a (nested) list of numbers")
    if arr.shape != (count,) and list(arr.shape) != list(shape):
        if arr.ndim == 1:
            raise RequestError(f"input {name!r}: data has {arr.size} values; shape {shape} needs {count}")
        raise RequestError(f"input {name!r}: data is nested as {list(arr.shape)}; expected a flat list of "
                           f"{count} numbers or a nesting of shape {shape}")
    return arr.astype(np.float32, copy=False).reshape(shape)


def checked_request(spec: ModelSpec, name: str, x: np.ndarray, wanted: List[str], binary_out: Dict[str, bool],
                    returnt: Optional[str], default_binary: bool = False,
                    request_id: Optional[str] = None) -> InferRequest:
    """What both protocols share once the input array is read: finite values, outputs known
    and asked once, the mode they need."""
    if not np.isfinite(x).all():
        raise RequestError(f"input {name!r} holds NaN or Inf; expected finite FP32 values")
    for i, out in enumerate(wanted):
        if out not in spec.outputs:
            raise RequestError(f"unknown output {out!r}{close_names(out, list(spec.outputs))}; "
                               f"model {spec.name!r} has: {', '.join(spec.outputs)}")
        if out in wanted[:i]:
            raise RequestError(f"output {out!r} is asked for twice")
    mode = spec.choose_mode(wanted, returnt)
    outputs = wanted or spec.modes[mode]
    return InferRequest(x, mode, outputs, {n: binary_out.get(n, default_binary) for n in outputs}, request_id)


def parse_infer_request(spec: ModelSpec, body: bytes, header_length: Optional[str] = None) -> InferRequest:
    """A POST /v2/models/{name}/infer body, checked against the model: the binary part split
    off first, the JSON part depth-checked, parsed and validated as `InferRequestBody`; one FP32
    input of the manifest's shape (JSON `data`, flat or nested as the shape, or
    `binary_data_size` bytes after the JSON part), outputs by name, `parameters.returnt` optional."""
    head, binary = split_body(body, header_length)
    try:
        req = InferRequestBody.model_validate(_json_object(head, "request body"))
    except ValidationError as exc:
        raise RequestError(_validation_line(exc)) from None
    if len(req.inputs) != 1:
        raise RequestError(f"inputs has {len(req.inputs)} tensors; model {spec.name!r} takes one, {spec.input_name!r}")
    tensor = req.inputs[0]
    count = check_input(spec, tensor.name, tensor.datatype, tensor.shape)
    size = tensor.parameters.binary_data_size if tensor.parameters else None
    if size is not None:
        if size != count * 4 or size != len(binary):
            raise RequestError(f"input {tensor.name!r}: binary_data_size {size} with {len(binary)} bytes after "
                               f"the JSON header; shape {tensor.shape} needs exactly {count * 4} bytes")
        if tensor.data is not None:
            raise RequestError(f"input {tensor.name!r} has both data and parameters.binary_data_size; send one")
        x = np.frombuffer(binary, dtype="<f4").reshape(tensor.shape)
    else:
        if binary:
            raise RequestError(f"{len(binary)} bytes after the JSON header, but no input has binary_data_size")
        if tensor.data is None:
            raise RequestError(f"input {tensor.name!r} has neither 'data' nor parameters.binary_data_size")
        x = array_from_json(tensor.name, tensor.data, tensor.shape)
    params = req.parameters or RequestParameters()
    wanted = [o.name for o in req.outputs or []]
    binary_out = {o.name: o.parameters.binary_data for o in req.outputs or []
                  if o.parameters is not None and o.parameters.binary_data is not None}
    return checked_request(spec, tensor.name, x, wanted, binary_out, params.returnt,
                           bool(params.binary_data_output), req.id)


def _tensor(name: str, array: np.ndarray, binary: bool, blobs: List[bytes]) -> Dict[str, Any]:
    """A request's input or a response's output: JSON `data`, or (binary) its little-endian
    bytes appended to `blobs` and their size in `parameters`."""
    arr = np.ascontiguousarray(array, dtype="<f4")
    entry: Dict[str, Any] = {"name": name, "datatype": DATATYPE, "shape": list(arr.shape)}
    if binary:
        blobs.append(arr.tobytes())
        entry["parameters"] = {"binary_data_size": len(blobs[-1])}
    else:
        entry["data"] = arr.ravel().tolist()
    return entry


def _body(obj: Dict[str, Any], blobs: List[bytes]) -> Tuple[bytes, Dict[str, str]]:
    """(body, headers): the JSON part, then the binary tensors after it when there are any."""
    head = json.dumps(obj).encode()
    if not blobs:
        return head, {"content-type": "application/json"}
    return head + b"".join(blobs), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(head))}


def encode_infer_response(spec: ModelSpec, request: InferRequest, results: Dict[str, np.ndarray],
                          version: str = MODEL_VERSION) -> Tuple[bytes, Dict[str, str]]:
    """(body, headers) of an infer response: JSON `data` per output, or for the outputs asked
    in binary their bytes after the JSON header; `version`: the weight version that answered."""
    blobs: List[bytes] = []
    entries = [_tensor(n, results[n], request.binary[n], blobs) for n in request.outputs]
    resp: Dict[str, Any] = {"model_name": spec.name, "model_version": str(version),
                            "parameters": {"returnt": request.mode}, "outputs": entries}
    if request.id is not None:
        resp["id"] = request.id
    return _body(resp, blobs)


def error_body(message: str) -> bytes:
    """The protocol's error object, on one line."""
    return json.dumps({"error": " ".join(str(message).split())}).encode()
