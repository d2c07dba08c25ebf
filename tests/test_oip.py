"""The Open Inference Protocol without a server: the same tensor as JSON (flat or nested) and
as binary parses to the same array, the mode follows the outputs asked for, responses decode.
Requests are made and answers read by tritonclient's code, not by the server's."""

import json

import numpy as np
import pytest
import tritonclient.http as th

from export.serving.oip import (
    HEADER_LENGTH,
    MAX_JSON_DEPTH,
    ModelSpec,
    RequestError,
    encode_infer_response,
    json_depth,
    parse_infer_request,
)
from export.store.manifest import parse_manifest


def encode_infer_request(name, x, outputs=(), returnt=None, binary=True):
    """(body, headers) as tritonclient.http sends them."""
    inp = th.InferInput(name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    outs = [th.InferRequestedOutput(n, binary_data=binary) for n in outputs]
    body, json_size = th.InferenceServerClient.generate_request_body(
        [inp], outputs=outs or None, parameters={"returnt": returnt} if returnt else None)
    return body, ({HEADER_LENGTH: str(json_size)} if json_size else {})


def decode_infer_response(body, header_length=None):
    result = th.InferenceServerClient.parse_response_body(body, header_length=int(header_length)
                                                          if header_length else None)
    return {o["name"]: result.as_numpy(o["name"]) for o in result.get_response()["outputs"]}


def spec(modes=("out", "features", "both", "full"), dynamic=("batch",)) -> ModelSpec:
    full = [{"name": "stage_0", "shape": ["batch", 4, "height", "width"]},
            {"name": "features", "shape": ["batch", 4]}, {"name": "logits", "shape": ["batch", 3]}]
    table = {"out": [full[2]], "features": [full[1]], "both": [full[2], full[1]], "full": full}
    manifest = parse_manifest({"backbone": {"name": "toy"}, "files": {"out.onnx": {"sha256": "ab" * 32, "size": 1}},
                               "input": {"name": "x", "shape": ["batch", 2, 8, 8], "dynamic": list(dynamic)},
                               "modes": {m: {"outputs": table[m]} for m in modes}, "flat_params": {"count": 0}})
    return ModelSpec.from_manifest(manifest, b"{}", "onnxruntime", "fp32")


X = np.arange(2 * 2 * 8 * 8, dtype=np.float32).reshape(2, 2, 8, 8) / 7


@pytest.mark.parametrize("binary", [True, False])
def test_json_and_binary_tensors_parse_to_the_same_array(binary):
    body, headers = encode_infer_request("x", X, outputs=["features"], binary=binary)
    req = parse_infer_request(spec(), body, headers.get(HEADER_LENGTH))
    np.testing.assert_array_equal(req.x, X)
    assert (req.mode, req.outputs, req.binary) == ("features", ["features"], {"features": binary})


def test_nested_json_data_is_accepted():
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": list(X.shape), "data": X.tolist()}]})
    np.testing.assert_array_equal(parse_infer_request(spec(), body.encode()).x, X)


@pytest.mark.parametrize("outputs, returnt, mode", [
    ([], None, "out"), (["logits"], None, "out"), (["features"], None, "features"),
    (["features", "logits"], None, "both"), (["stage_0"], None, "full"), ([], "full", "full"),
    (["logits"], "both", "both"),
])
def test_mode_follows_the_outputs_asked_for(outputs, returnt, mode):
    body, headers = encode_infer_request("x", X, outputs=outputs, returnt=returnt)
    req = parse_infer_request(spec(), body, headers[HEADER_LENGTH])
    assert req.mode == mode and req.outputs == (outputs or spec().modes[mode])


def test_only_exported_modes_are_chosen():
    body, headers = encode_infer_request("x", X, outputs=["features"])
    assert parse_infer_request(spec(modes=("both",)), body, headers[HEADER_LENGTH]).mode == "both"
    body, headers = encode_infer_request("x", X, outputs=["stage_0"])
    with pytest.raises(RequestError, match="unknown output 'stage_0'; model 'toy' has: logits, features"):
        parse_infer_request(spec(modes=("out", "both")), body, headers[HEADER_LENGTH])


def test_dynamic_image_size_is_free_and_fixed_size_is_checked():
    x = np.zeros((1, 2, 5, 9), np.float32)
    body, headers = encode_infer_request("x", x)
    free = spec(dynamic=("batch", "height", "width"))
    assert parse_infer_request(free, body, headers[HEADER_LENGTH]).x.shape == x.shape
    with pytest.raises(RequestError, match=r"expected \[batch, 2, 8, 8\]"):
        parse_infer_request(spec(), body, headers[HEADER_LENGTH])
    assert spec(dynamic=("batch", "height", "width")).metadata()["inputs"][0]["shape"] == [-1, 2, -1, -1]


@pytest.mark.parametrize("header", ["0", "-3", "abc", "999999"])
def test_bad_header_length_is_refused(header):
    body, _ = encode_infer_request("x", X)
    with pytest.raises(RequestError, match="Inference-Header-Content-Length"):
        parse_infer_request(spec(), body, header)


@pytest.mark.parametrize("binary", [True, False])
def test_response_round_trip(binary):
    s = spec()
    body, headers = encode_infer_request("x", X, outputs=["logits", "stage_0"], binary=binary)
    req = parse_infer_request(s, body, headers.get(HEADER_LENGTH))
    results = {"stage_0": np.ones((2, 4, 8, 8), np.float32), "logits": np.full((2, 3), 0.25, np.float32),
               "features": np.zeros((2, 4), np.float32)}
    out, out_headers = encode_infer_response(s, req, results)
    got = decode_infer_response(out, out_headers.get(HEADER_LENGTH))
    assert list(got) == ["logits", "stage_0"]  # the order asked for, and only those
    for name, arr in got.items():
        np.testing.assert_array_equal(arr, results[name])


def _json_request(**tensor_overrides) -> dict:
    tensor = {"name": "x", "datatype": "FP32", "shape": list(X.shape), "data": X.ravel().tolist()}
    tensor.update(tensor_overrides)
    return {"inputs": [tensor]}


@pytest.mark.parametrize("body, fragment", [
    ({**_json_request(), "outputs": [{"name": [1]}]}, "outputs.0.name: Input should be a valid string"),
    ({**_json_request(), "id": {"a": 1}}, "id: Input should be a valid string"),
    (_json_request(data=[[v] for v in X.ravel().tolist()]), "data is nested as [256, 1]"),
    (_json_request(data=X.tolist()[0]), "data is nested as [2, 8, 8]"),
    (_json_request(data=[[1.0, 2.0], [3.0]]), "not a flat list or a nesting of shape"),
    (_json_request(data=[True] * X.size), "not a (nested) list of numbers"),
    (_json_request(shape=[2, 2, 8, "8"]), "inputs.0.shape.3: Input should be a valid integer"),
    (_json_request(shap=[1]), "inputs.0.shap: Extra inputs are not permitted"),
    ({**_json_request(), "parameters": {"returnt": 3}}, "parameters.returnt: Input should be a valid string"),
    ({**_json_request(), "parameters": []}, "parameters: Input should be a valid dictionary"),
    ({"inputs": []}, "inputs has 0 tensors"),
    ({**_json_request(), "outputs": [{"name": "logits"}, {"name": "logits"}]}, "asked for twice"),
])
def test_request_models_refuse_in_one_line(body, fragment):
    with pytest.raises(RequestError) as err:
        parse_infer_request(spec(), json.dumps(body).encode())
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_deep_nesting_is_refused_before_parsing():
    body = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(RequestError, match=f"nests 100001 levels deep; at most {MAX_JSON_DEPTH}"):
        parse_infer_request(spec(), body)


def test_json_depth_ignores_brackets_in_strings():
    assert json_depth(b'{"id": "[[[[{{", "a": [[1], [2]]}') == 3
    assert json_depth(rb'["a\\", [1]]') == 2  # a string ending in an escaped backslash
    assert json_depth(rb'["a\"[[[", [1]]') == 2 and json_depth(b"7") == 0
