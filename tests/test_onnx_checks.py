"""Every ONNX graph the zoo writes passes onnx.checker and strict, type-checked shape inference
(what `check_model(full_check=True)` runs), in memory and as a file beside shared weights."""

import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h

from export.formats.onnx import _checked


def _model(nodes, inputs, outputs) -> onnx.ModelProto:
    return h.make_model(h.make_graph(nodes, "g", inputs, outputs), opset_imports=[h.make_opsetid("", 18)])


def _value(name, elem, shape):
    return h.make_tensor_value_info(name, elem, shape)


BAD = {  # each caught by full_check; the last two only by its shape inference (check_type, strict)
    "undefined input": _model([h.make_node("Relu", ["nope"], ["y"])], [_value("x", T.FLOAT, [2])],
                              [_value("y", T.FLOAT, [2])]),
    "matmul shapes": _model([h.make_node("MatMul", ["a", "b"], ["y"])],
                            [_value("a", T.FLOAT, [2, 3]), _value("b", T.FLOAT, [4, 5])],
                            [_value("y", T.FLOAT, [2, 5])]),
    "declared output type": _model([h.make_node("Relu", ["x"], ["y"])], [_value("x", T.FLOAT, [2])],
                                   [_value("y", T.INT64, [2])]),
    "mixed add": _model([h.make_node("Add", ["a", "b"], ["y"])],
                        [_value("a", T.FLOAT, [2]), _value("b", T.INT64, [2])], [_value("y", T.FLOAT, [2])]),
}


@pytest.mark.parametrize("beside_weights", [False, True], ids=["in-memory", "file"])
@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_graph_is_refused(name, beside_weights, tmp_path):
    refused = (onnx.checker.ValidationError, onnx.shape_inference.InferenceError)
    with pytest.raises(refused):
        onnx.checker.check_model(BAD[name], full_check=True)  # the bar
    with pytest.raises(refused):
        _checked(BAD[name], tmp_path if beside_weights else None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("beside_weights", [False, True], ids=["in-memory", "file"])
def test_a_good_graph_comes_back_with_inferred_shapes(beside_weights, tmp_path):
    good = _model([h.make_node("MatMul", ["a", "b"], ["m"]), h.make_node("Relu", ["m"], ["y"])],
                  [_value("a", T.FLOAT, ["batch", 3]), _value("b", T.FLOAT, [3, 5])],
                  [_value("y", T.FLOAT, ["batch", 5])])
    checked = _checked(good, tmp_path if beside_weights else None)
    inferred = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                for v in list(checked.graph.value_info) + list(checked.graph.output)}
    assert inferred == {"m": ["batch", 5], "y": ["batch", 5]}
    assert list(tmp_path.iterdir()) == []
