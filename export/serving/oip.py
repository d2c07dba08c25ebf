"""The Open Inference Protocol (KServe v2, what Triton speaks) for export directories, without
any server: model metadata from the manifest, infer requests (JSON tensors and the binary tensor
extension) parsed and checked into (input array, returnt mode, wanted outputs), responses encoded.

The `serve` command's HTTP ingress calls these; they raise `RequestError` (HTTP 400, one line
naming the bad value and what is allowed) for anything a client got wrong.
"""

import difflib
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from export.store.manifest import Manifest, free_dims
from zoo.base import RETURNT_MODES

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
        params = {"returnt_modes": list(modes), "engine": engine, "precision": precision,
                  "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
                  "files": {n: f.sha256 for n, f in sorted(manifest.files.items())},
                  "input_shape_at_export": [1, *spec.shape[1:]]}
        return cls(manifest.backbone.name, spec.name, manifest.input_dims(), modes, outputs, params, manifest)

    def metadata(self) -> Dict[str, Any]:
        """GET /v2/models/{name}: the protocol's model metadata (+ modes, engine and sha256s)."""
        return {"name": self.name, "versions": [MODEL_VERSION],
                "platform": f"returnt-zoo_{self.parameters['engine']}",
                "inputs": [{"name": self.input_name, "datatype": DATATYPE, "shape": self.input_dims}],
                "outputs": [{"name": n, "datatype": DATATYPE, "shape": d} for n, d in self.outputs.items()],
                "parameters": self.parameters}


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


def _json_object(data: bytes, what: str) -> Dict[str, Any]:
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RequestError(f"{what} is not valid JSON ({exc}); expected an object like "
                           '{"inputs": [{"name": ..., "datatype": "FP32", "shape": [...], "data": [...]}]}') from None
    if not isinstance(obj, dict):
        raise RequestError(f"{what} is a JSON {type(obj).__name__}; expected an object with 'inputs'")
    return obj


def _int_list(value: Any, what: str) -> List[int]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise RequestError(f"{what} is {value!r}; expected a list of integers")
    return value


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


def parse_infer_request(spec: ModelSpec, body: bytes, header_length: Optional[str] = None) -> InferRequest:
    """A POST /v2/models/{name}/infer body, checked against the model: one FP32 input of the
    manifest's shape (JSON `data`, flat or nested, or `binary_data_size` bytes after the JSON
    header), outputs by name, `parameters.returnt` optional."""
    head, binary = split_body(body, header_length)
    req = _json_object(head, "request body")
    params = req.get("parameters") or {}
    if not isinstance(params, dict):
        raise RequestError(f"parameters is {params!r}; expected an object")
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise RequestError(f"inputs must be a list of one tensor ({spec.input_name!r}); got "
                           f"{json.dumps(inputs)[:80] if inputs is not None else 'none'}")
    tensor = inputs[0]
    name = tensor.get("name")
    if name != spec.input_name:
        raise RequestError(f"unknown input {name!r}; model {spec.name!r} has one input, {spec.input_name!r}")
    dtype = tensor.get("datatype")
    if dtype != DATATYPE:
        raise RequestError(f"input {name!r} has datatype {dtype!r}; allowed: {DATATYPE}")
    shape = _int_list(tensor.get("shape"), f"shape of input {name!r}")
    problem = spec.manifest.input_shape_problem(shape)
    if problem:
        raise RequestError(f"input {name!r}: {problem}")
    count = int(np.prod(shape))
    tparams = tensor.get("parameters") or {}
    size = tparams.get("binary_data_size") if isinstance(tparams, dict) else None
    if size is not None:
        if size != count * 4 or size != len(binary):
            raise RequestError(f"input {name!r}: binary_data_size {size!r} with {len(binary)} bytes after "
                               f"the JSON header; shape {shape} needs exactly {count * 4} bytes")
        x = np.frombuffer(binary, dtype="<f4").reshape(shape)
    else:
        if binary:
            raise RequestError(f"{len(binary)} bytes after the JSON header, but no input has binary_data_size")
        if "data" not in tensor:
            raise RequestError(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
        try:
            x = np.asarray(tensor["data"], dtype=np.float32)
        except (TypeError, ValueError):
            raise RequestError(f"input {name!r}: data is not a (nested) list of numbers") from None
        if x.size != count:
            raise RequestError(f"input {name!r}: data has {x.size} values; shape {shape} needs {count}")
        x = x.reshape(shape)
    if not np.isfinite(x).all():
        raise RequestError(f"input {name!r} holds NaN or Inf; expected finite FP32 values")
    wanted, binary_out = _requested_outputs(spec, req.get("outputs"), params)
    mode = spec.choose_mode(wanted, params.get("returnt"))
    outputs = wanted or spec.modes[mode]
    default_binary = bool(params.get("binary_data_output", False))
    binary_map = {n: binary_out.get(n, default_binary) for n in outputs}
    rid = req.get("id")
    return InferRequest(x, mode, outputs, binary_map, rid if isinstance(rid, str) else None)


def _requested_outputs(spec: ModelSpec, outputs: Any, params: Dict[str, Any]) -> Tuple[List[str], Dict[str, bool]]:
    if outputs is None:
        return [], {}
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise RequestError(f"outputs is {json.dumps(outputs)[:80]}; expected a list of {{\"name\": ...}}")
    names: List[str] = []
    binary: Dict[str, bool] = {}
    for o in outputs:
        name = o.get("name")
        if name not in spec.outputs:
            raise RequestError(f"unknown output {name!r}{close_names(str(name), list(spec.outputs))}; "
                               f"model {spec.name!r} has: {', '.join(spec.outputs)}")
        if name in names:
            raise RequestError(f"output {name!r} is asked for twice")
        names.append(name)
        oparams = o.get("parameters") or {}
        if isinstance(oparams, dict) and "binary_data" in oparams:
            binary[name] = bool(oparams["binary_data"])
    return names, binary


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


def encode_infer_response(spec: ModelSpec, request: InferRequest,
                          results: Dict[str, np.ndarray]) -> Tuple[bytes, Dict[str, str]]:
    """(body, headers) of an infer response: JSON `data` per output, or for the outputs asked
    in binary their bytes after the JSON header."""
    blobs: List[bytes] = []
    entries = [_tensor(n, results[n], request.binary[n], blobs) for n in request.outputs]
    resp: Dict[str, Any] = {"model_name": spec.name, "model_version": MODEL_VERSION,
                            "parameters": {"returnt": request.mode}, "outputs": entries}
    if request.id is not None:
        resp["id"] = request.id
    return _body(resp, blobs)


def error_body(message: str) -> bytes:
    """The protocol's error object, on one line."""
    return json.dumps({"error": " ".join(str(message).split())}).encode()


def decode_infer_response(body: bytes, header_length: Optional[str] = None) -> Dict[str, np.ndarray]:
    """output name -> array of an infer response (JSON `data` or binary tensor extension)."""
    head, binary = split_body(body, header_length)
    resp = _json_object(head, "response body")
    arrays: Dict[str, np.ndarray] = {}
    offset = 0
    for out in resp.get("outputs", []):
        shape = out["shape"]
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            arrays[out["name"]] = np.frombuffer(binary[offset:offset + size], dtype="<f4").reshape(shape)
            offset += size
        else:
            arrays[out["name"]] = np.asarray(out["data"], dtype=np.float32).reshape(shape)
    return arrays


def encode_infer_request(input_name: str, x: np.ndarray, outputs: Sequence[str] = (),
                         returnt: Optional[str] = None, binary: bool = True) -> Tuple[bytes, Dict[str, str]]:
    """(body, headers) of an infer request for `x` (the loadtest's client side)."""
    blobs: List[bytes] = []
    req: Dict[str, Any] = {"inputs": [_tensor(input_name, x, binary, blobs)],
                           "parameters": {"binary_data_output": binary}}
    if outputs:
        req["outputs"] = [{"name": n} for n in outputs]
    if returnt is not None:
        req["parameters"]["returnt"] = returnt
    return _body(req, blobs)
