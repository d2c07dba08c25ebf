"""Seeded mutations of valid Open Inference Protocol requests, for the server's fuzz test: field
types swapped, keys dropped and added, shapes and datatypes changed, bytes truncated or flipped,
headers that lie. Each variant is (description, body, headers)."""

import copy
import json
import random
from typing import Any, Dict, Iterator, List, Tuple

from export.serving.oip import HEADER_LENGTH

ODD_VALUES: List[Any] = [None, 0, -1, 1.5, True, "", "x", "FP32", [], [1], [[1]], {}, {"name": "x"},
                         2 ** 63, -(2 ** 70), 1e308, "\u00e9\u0000", [None], ["a"]]
DATATYPES = ["FP16", "FP64", "INT8", "BYTES", "fp32", "", "BOOL"]
Variant = Tuple[str, bytes, Dict[str, str]]


def _paths(obj: Any, prefix: Tuple = ()) -> Iterator[Tuple]:
    """Every key/index path into a JSON value (data lists only to their first element)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:1]):
            yield prefix + (i,)
            yield from _paths(v, prefix + (i,))


def _parent(obj: Any, path: Tuple) -> Any:
    for p in path[:-1]:
        obj = obj[p]
    return obj


def _encode(req: Dict[str, Any], blob: bytes) -> Tuple[bytes, Dict[str, str]]:
    head = json.dumps(req).encode()
    if not blob:
        return head, {"content-type": "application/json"}
    return head + blob, {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(head))}


def base_requests(shape: List[int]) -> List[Tuple[Dict[str, Any], bytes]]:
    """Valid requests: JSON data, binary data, with outputs named and returnt set."""
    count = 1
    for d in shape:
        count *= d
    tensor = {"name": "x", "datatype": "FP32", "shape": list(shape)}
    as_json = {"inputs": [{**tensor, "data": [0.25] * count}], "outputs": [{"name": "logits"}], "id": "r1"}
    as_binary = {"inputs": [{**tensor, "parameters": {"binary_data_size": 4 * count}}],
                 "parameters": {"returnt": "both", "binary_data_output": True}}
    return [(as_json, b""), (as_binary, b"\0\0\x80\x3e" * count)]


def variants(shape: List[int], n: int, seed: int = 0) -> List[Variant]:
    """`n` mutated requests (most invalid, some still valid), the same for the same seed."""
    rng = random.Random(seed)
    bases = base_requests(shape)
    out: List[Variant] = []
    while len(out) < n:
        req, blob = copy.deepcopy(rng.choice(bases))
        kind = rng.choice(["swap", "drop", "add", "shape", "datatype", "truncate", "flip", "header",
                           "binary_size", "blob", "content_type", "stack"])
        paths = list(_paths(req))
        headers_extra: Dict[str, str] = {}
        what = kind
        if kind in ("swap", "stack"):
            for _ in range(1 if kind == "swap" else rng.randint(2, 4)):
                path = rng.choice(list(_paths(req)) or [("inputs",)])
                try:
                    _parent(req, path)[path[-1]] = copy.deepcopy(rng.choice(ODD_VALUES))
                except (TypeError, KeyError, IndexError):
                    pass
            what = f"{kind} {path}"
        elif kind == "drop":
            path = rng.choice(paths)
            parent = _parent(req, path)
            if isinstance(parent, dict):
                parent.pop(path[-1], None)
            elif isinstance(parent, list) and parent:
                parent.pop(path[-1])
            what = f"drop {path}"
        elif kind == "add":
            dicts = [()] + [p for p in paths if isinstance(_parent(req, p + ("_",)), dict)]
            target = rng.choice(dicts)
            obj = req
            for p in target:
                obj = obj[p]
            obj[rng.choice(["extra", "name", "shape", "parameters", "data", "binary_data", "classification"])] = \
                copy.deepcopy(rng.choice(ODD_VALUES))
            what = f"add into {target}"
        elif kind == "shape":
            dims = list(shape)
            op = rng.choice(["dim", "rank", "big", "neg"])
            if op == "dim":
                dims[rng.randrange(len(dims))] = rng.choice([0, 2, 3, 27, 29, 1000])
            elif op == "rank":
                dims = dims[:rng.randrange(len(dims))] + ([1] * rng.randint(0, 2))
            elif op == "big":
                dims[0] = rng.choice([10 ** 6, 2 ** 31, 2 ** 62])
            else:
                dims[rng.randrange(len(dims))] = -rng.randint(1, 5)
            req["inputs"][0]["shape"] = dims
            what = f"shape {dims}"
        elif kind == "datatype":
            req["inputs"][0]["datatype"] = rng.choice(DATATYPES)
        elif kind == "binary_size" and "parameters" in req["inputs"][0]:
            req["inputs"][0]["parameters"]["binary_data_size"] = rng.choice([0, 1, 3, -4, len(blob) + 4, 2 ** 40])
        elif kind == "blob":
            blob = blob[: rng.randrange(len(blob) + 1)] if blob and rng.random() < 0.7 else blob + b"\0" * 8
        body, headers = _encode(req, blob)
        if kind == "truncate":
            body = body[: rng.randrange(len(body))]
        elif kind == "flip":
            data = bytearray(body)
            for _ in range(rng.randint(1, 5)):
                i = rng.randrange(min(len(data), 400))
                data[i] = rng.randrange(256)
            body = bytes(data)
        elif kind == "header":
            headers[HEADER_LENGTH] = rng.choice(["0", "-1", "abc", "1e3", str(len(body) + 1), str(len(body) // 2),
                                                 "99999999999999999999", "+12", "0x10", ""])
        elif kind == "content_type":
            headers["content-type"] = rng.choice(["text/plain", "multipart/form-data; boundary=x",
                                                  "application/json; charset=utf-16"])
        headers.update(headers_extra)
        out.append((what, body, headers))
    return out
