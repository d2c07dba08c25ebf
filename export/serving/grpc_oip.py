"""The Open Inference Protocol over gRPC (KServe v2 `inference.GRPCInferenceService`, what
`tritonclient.grpc` speaks), with the service definitions tritonclient ships: requests read
into the same checked `InferRequest` as HTTP ones, responses with `raw_output_contents`.

No server here: the `serve` command's ingress calls these and turns `RequestError` into a gRPC
status (`INVALID_ARGUMENT`, `NOT_FOUND`, `RESOURCE_EXHAUSTED`).
"""

import sys
from typing import Any, Dict

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from export.serving.oip import (
    DATATYPE,
    MODEL_VERSION,
    InferRequest,
    ModelSpec,
    RequestError,
    check_input,
    checked_request,
)

# tritonclient's generated messages name their module after the .proto file, 'grpc_service_pb2',
# which no package provides; pickle imports a class by that name when Ray passes a message
# between its gRPC proxy and a replica. The name is made an alias of tritonclient's module here,
# on import: replicas import this module with the ingress, the proxy through
# `add_inference_service`.
sys.modules.setdefault(pb.ModelInferRequest.__module__, pb)


def add_inference_service(servicer: Any, server: Any) -> None:
    """What Ray Serve's gRPC proxy calls at start (`grpc_options.grpc_servicer_functions`):
    tritonclient's `inference.GRPCInferenceService`, in a process that can pickle its messages."""
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)


#: HTTP status of a RequestError -> the gRPC status code a client gets instead
STATUS_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
                413: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE}


def status_code(error: RequestError) -> grpc.StatusCode:
    return STATUS_CODES.get(error.status, grpc.StatusCode.INVALID_ARGUMENT)


def model_metadata(spec: ModelSpec, served: "Dict[str, Any] | None" = None) -> pb.ModelMetadataResponse:
    """ModelMetadata: the same inputs, outputs and versions as GET /v2/models/{name}."""
    meta = spec.metadata(served)
    return pb.ModelMetadataResponse(
        name=meta["name"], versions=meta["versions"], platform=meta["platform"],
        inputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["inputs"]],
        outputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["outputs"]])


def _string_parameter(request: pb.ModelInferRequest, key: str) -> "str | None":
    if key not in request.parameters:
        return None
    param = request.parameters[key]
    if param.WhichOneof("parameter_choice") != "string_param":
        raise RequestError(f"parameter {key} is a {param.WhichOneof('parameter_choice')}; expected a string_param")
    return param.string_param


def parse_infer_request(spec: ModelSpec, request: pb.ModelInferRequest) -> InferRequest:
    """A ModelInfer request checked against the model: one FP32 input of the manifest's shape in
    `raw_input_contents` (little-endian) or `contents.fp32_contents`, outputs by name,
    parameter `returnt` (a string) optional."""
    if len(request.inputs) != 1:
        raise RequestError(f"inputs has {len(request.inputs)} tensors; model {spec.name!r} takes one, "
                           f"{spec.input_name!r}")
    tensor = request.inputs[0]
    shape = list(tensor.shape)
    count = check_input(spec, tensor.name, tensor.datatype, shape)
    raw = request.raw_input_contents
    if len(raw) > 1:
        raise RequestError(f"raw_input_contents has {len(raw)} entries; the one input takes one")
    if raw:
        if tensor.contents.ByteSize():
            raise RequestError(f"input {tensor.name!r} has both contents and raw_input_contents; send one")
        if len(raw[0]) != count * 4:
            raise RequestError(f"input {tensor.name!r}: raw_input_contents holds {len(raw[0])} bytes; shape "
                               f"{shape} needs exactly {count * 4}")
        x = np.frombuffer(raw[0], dtype="<f4").reshape(shape)
    else:
        values = tensor.contents.fp32_contents
        if len(values) != count:
            raise RequestError(f"input {tensor.name!r}: contents.fp32_contents has {len(values)} values; "
                               f"shape {shape} needs {count}")
        x = np.asarray(values, dtype=np.float32).reshape(shape)
    wanted = [o.name for o in request.outputs]
    return checked_request(spec, tensor.name, x, wanted, {}, _string_parameter(request, "returnt"),
                           request_id=request.id or None)


def infer_response(spec: ModelSpec, request: InferRequest, results: Dict[str, np.ndarray],
                   version: str = MODEL_VERSION) -> pb.ModelInferResponse:
    """ModelInfer's answer: the outputs asked for, their bytes in `raw_output_contents`, and the
    weight version that answered."""
    response = pb.ModelInferResponse(model_name=spec.name, model_version=str(version), id=request.id or "")
    response.parameters["returnt"].string_param = request.mode
    for name in request.outputs:
        arr = np.ascontiguousarray(results[name], dtype="<f4")
        response.outputs.add(name=name, datatype=DATATYPE, shape=arr.shape)
        response.raw_output_contents.append(arr.tobytes())
    return response
