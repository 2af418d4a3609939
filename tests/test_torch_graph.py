"""graphq.torch_graph: PyTorch evaluation of ONNX graphs agrees with ONNX Runtime, passes gradients to
overridden values, and refuses ops it does not know."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper

from graphq.errors import UnsupportedModelError
from graphq.modelio import load_model
from graphq.runtime import build_feeds, signature_of_model
from graphq.torch_graph import TorchGraph
from graphq.verify import cpu_session


def _one_node(op, inputs, attributes=None, outputs=1):
    """A model of one ``op`` node over the numpy ``inputs`` (fed as graph inputs), and its feeds."""
    names = [f"i{k}" for k in range(len(inputs))]
    dtype = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.int64): TensorProto.INT64, np.dtype(bool): TensorProto.BOOL}
    node = helper.make_node(op, names, [f"o{k}" for k in range(outputs)], **(attributes or {}))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, dtype[a.dtype], a.shape) for n, a in zip(names, inputs)],
                              [onnx.ValueInfoProto(name=f"o{k}") for k in range(outputs)])  # types inferred
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return proto, dict(zip(names, inputs))


I64 = lambda *v: np.array(v, dtype=np.int64)  # noqa: E731
X = np.arange(24, dtype=np.float32).reshape(2, 3, 4) - 11.5

CASES = [
    ("Slice", [X, I64(-1), I64(-4), I64(2), I64(-1)], {}),  # negative step, clamped end
    ("Slice", [X, I64(0, 1), I64(2, 99), I64(0, 2), I64(1, 2)], {}),
    ("Gather", [X, I64(-1, 0)], {"axis": 1}),  # negative index
    ("Gather", [X, np.array(1, dtype=np.int64)], {"axis": 2}),  # scalar index drops the axis
    ("Div", [I64(7, -7, 9), I64(2, 2, -4)], {}),  # integer division truncates
    ("Reshape", [X, I64(0, -1)], {}),  # 0 copies the input's dimension
    ("Expand", [np.ones((3, 1), np.float32), I64(2, 1, 4)], {}),  # bidirectional broadcast
    ("ReduceMean", [X, I64(-1)], {"keepdims": 1}),
    ("Unsqueeze", [X, I64(-1, 0)], {}),
    ("Transpose", [X], {"perm": [2, 0, 1]}),
    ("Softmax", [X], {"axis": 1}),
    ("Where", [X > 0, X, -X], {}),
    ("Shape", [X], {"start": 1}),
    ("Split", [X, I64(1, 3)], {"axis": 2}),
    ("Trilu", [X], {"upper": 0}),
]


@pytest.mark.parametrize("op, inputs, attributes", CASES, ids=[c[0] + str(i) for i, c in enumerate(CASES)])
def test_single_ops_match_onnx_runtime(op, inputs, attributes, tmp_path):
    outputs = 2 if op == "Split" else 1
    proto, feeds = _one_node(op, inputs, attributes, outputs)
    path = tmp_path / "op.onnx"
    onnx.save(proto, path)
    expected = cpu_session(path).run(None, feeds)
    got = TorchGraph(ir.from_proto(proto))(feeds)
    for want, (name, value) in zip(expected, got.items()):
        assert value.shape == want.shape, name
        np.testing.assert_allclose(value.numpy(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("which", ["tiny_llama_onnx", "tiny_llama_past_onnx"])
def test_exported_model_matches_onnx_runtime(which, request):
    path = request.getfixturevalue(which)
    model = load_model(path)
    ids = np.random.default_rng(0).integers(0, 200, (2, 24))
    feeds = build_feeds(signature_of_model(model), ids)
    expected = dict(zip([o.name for o in cpu_session(path).get_outputs()], cpu_session(path).run(None, feeds)))
    with torch.no_grad():
        got = TorchGraph(model)(feeds)
    assert set(got) == set(expected)
    for name, value in got.items():
        np.testing.assert_allclose(value.numpy(), expected[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_override_replaces_a_weight_and_receives_gradients(tiny_llama_onnx):
    model = load_model(tiny_llama_onnx)
    evaluate = TorchGraph(model)
    node = next(n for n in model.graph if n.op_type == "MatMul" and n.name.endswith("q_proj/MatMul"))
    name = node.inputs[1].name
    weight = evaluate.constant(name).clone().requires_grad_(True)
    feeds = build_feeds(signature_of_model(model), np.arange(16)[None, :])
    logits = evaluate(feeds, ["logits"], {name: weight})["logits"]
    logits.square().sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    with torch.no_grad():
        zeroed = evaluate(feeds, ["logits"], {name: torch.zeros_like(weight)})["logits"]
        plain = evaluate(feeds, ["logits"])["logits"]
    assert not torch.allclose(zeroed, plain)
    torch.testing.assert_close(plain, logits.detach())


def test_unknown_ops_are_refused_by_name():
    proto, _ = _one_node("Gelu", [X])
    proto.graph.node[0].domain = "com.microsoft"
    proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    with pytest.raises(UnsupportedModelError, match="com.microsoft::Gelu"):
        TorchGraph(ir.from_proto(proto))
    proto, _ = _one_node("Einsum", [X, X], {"equation": "abc,abc->a"})
    with pytest.raises(UnsupportedModelError, match="ai.onnx::Einsum"):
        TorchGraph(ir.from_proto(proto))
