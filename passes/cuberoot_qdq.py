"""W8A8 with cube-root companding: 8-bit non-uniform weights and activations around planned MatMuls.

Weights (constant ``W [K, N]`` or the transpose of one): cube-root int8 per output column
(:func:`graphq.numerics.companding.quantize_cuberoot` with ``G = K``): ``W_hat = sigma_n (q - 128)^3``,
rebuilt in float by :func:`graphq.passes.cuberoot_emit.cuberoot_weight_nodes` (``codebook`` form by
default: ONNX Runtime folds it into a float weight when the session is created).

Activations ``x`` (one quantizer per tensor, shared by the MatMuls that read it), with
``f(x) = sign(x) |x|^(1/3)`` computed in the graph as ``Sign(x) * Pow(Abs(x), 1/3)``:

- ``static`` (per tensor): ``x_hat = Pow(DequantizeLinear(QuantizeLinear(f(x), s, 0), s, 0), 3)``
  with int8 zero point 0 and ``s = f(r) / 127`` for the calibrated range ``r`` (``f`` is monotone,
  so the range of ``f(x)`` is ``f(r)``).
- ``dynamic-token`` (per token, at run time): ``s_t = max(max_k f(|x[t, k]|) / 127, 1e-12)``,
  ``x_hat = (Round(f(x) / s_t) s_t)^3`` (the rounded values are the int8 codes, kept in float since
  no integer kernel reads them).

The MatMul then multiplies the float ``x_hat`` and ``W_hat``: products of cubed codes do not fit
int8 x int8 -> int32, so no integer kernel (``MatMulInteger``, ``MatMulIntegerToFloat``) can run
it; the companding and cubing ops are extra work on every activation (the speed cost).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
from graphq.passes.cuberoot_emit import CUBEROOT_FORMS, cuberoot_weight_nodes
from graphq.passes.qdq_insert import (
    INT8,
    QdqInsertionPass,
    constant_weight,
    drop_unused_weight,
    new_initializer,
)
from graphq.passes.weight_only_emit import BLOCKWISE_DQ_OPSET

from graphq.errors import GraphqError
from graphq.numerics.companding import (
    ACTIVATION_QMAX,
    MIN_SCALE,
    activation_scale,
    quantize_cuberoot,
)
from graphq.numerics.weight_only import WeightQuantConfig

logger = logging.getLogger(__name__)

CUBEROOT_W8 = WeightQuantConfig(bits=8, group_size=0, symmetric=True, scale_dtype="float32")


class CubeRootQdqPass(QdqInsertionPass):
    """Cube-root int8 weights and activations on the planned MatMuls (a float MatMul runs them)."""

    def __init__(self, *args, weight_form: str = "codebook", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if weight_form not in CUBEROOT_FORMS:
            raise GraphqError(f"cube-root weight form must be one of {CUBEROOT_FORMS}, got '{weight_form}'")
        self.weight_form = weight_form

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.check_plan(model)
        graph = model.graph
        opset = model.opset_imports.get("", 18)
        if opset < 18:
            raise GraphqError(f"cube-root W8A8 needs default opset >= 18 (ReduceMax with axes as input), got {opset}")
        companded: dict[str, ir.Value] = {}
        for node in list(graph):
            if self.plan.get(node.name) != INT8:
                continue
            stem = node.name.strip("/").replace("/", "_")
            qw = quantize_cuberoot(constant_weight(node), CUBEROOT_W8)
            weight_nodes, weight = cuberoot_weight_nodes(graph, stem, qw, self.weight_form)
            graph.insert_before(node, weight_nodes)
            x = node.inputs[0]
            if x.name not in companded:
                nodes, x_hat = self._activation(graph, x)
                graph.insert_before(node, nodes)
                companded[x.name] = x_hat
            old_weight = node.inputs[1]
            node.replace_input_with(0, companded[x.name])
            node.replace_input_with(1, weight)
            drop_unused_weight(graph, old_weight)
            self.quantized.append(node.name)
        if self.quantized and self.weight_form == "dq-cube" and opset < BLOCKWISE_DQ_OPSET:
            model.opset_imports[""] = BLOCKWISE_DQ_OPSET  # DequantizeLinear with block_size
        logger.info("cube-root qdq: %d MatMuls with cube-root int8 weights and %s activations", len(self.quantized),
                    self.config.activation_scheme)
        return ir.passes.PassResult(model, modified=bool(self.quantized))

    def _activation(self, graph: ir.Graph, x: ir.Value) -> tuple[list[ir.Node], ir.Value]:
        name = x.name
        third = new_initializer(graph, f"{name}/cuberoot_third", np.array(1.0 / 3.0, dtype=np.float32))
        three = new_initializer(graph, f"{name}/cuberoot_three", np.array(3.0, dtype=np.float32))
        absolute = ir.node("Abs", [x], name=f"{name}/cuberoot_abs")
        root = ir.node("Pow", [absolute.outputs[0], third], name=f"{name}/cuberoot_pow")
        sign = ir.node("Sign", [x], name=f"{name}/cuberoot_sign")
        compand = ir.node("Mul", [root.outputs[0], sign.outputs[0]], name=f"{name}/cuberoot_compand")
        nodes = [absolute, root, sign, compand]
        if self.config.activation_scheme == "static":
            scale = new_initializer(graph, f"{name}/act_scale", activation_scale(self.activation_abs_max[name]))
            zero = new_initializer(graph, f"{name}/act_zero_point", np.array(0, dtype=np.int8))
            q = ir.node("QuantizeLinear", [compand.outputs[0], scale, zero], name=f"{name}/QuantizeLinear")
            dq = ir.node("DequantizeLinear", [q.outputs[0], scale, zero], name=f"{name}/DequantizeLinear")
            nodes += [q, dq]
        else:
            c127 = new_initializer(graph, f"{name}/c127", np.array(float(ACTIVATION_QMAX), dtype=np.float32))
            eps = new_initializer(graph, f"{name}/min_scale", np.array(MIN_SCALE, dtype=np.float32))
            axes = new_initializer(graph, f"{name}/last_axis", np.array([-1], dtype=np.int64))
            row_max = ir.node("ReduceMax", [root.outputs[0], axes], attributes={"keepdims": 1}, name=f"{name}/token_max")
            raw = ir.node("Div", [row_max.outputs[0], c127], name=f"{name}/token_scale_raw")
            scale = ir.node("Max", [raw.outputs[0], eps], name=f"{name}/token_scale")
            divided = ir.node("Div", [compand.outputs[0], scale.outputs[0]], name=f"{name}/token_divide")
            rounded = ir.node("Round", [divided.outputs[0]], name=f"{name}/token_round")
            dq = ir.node("Mul", [rounded.outputs[0], scale.outputs[0]], name=f"{name}/token_dequantize")
            nodes += [row_max, raw, scale, divided, rounded, dq]
        cube = ir.node("Pow", [dq.outputs[0], three], name=f"{name}/cuberoot_cube")
        nodes.append(cube)
        for index, new in enumerate(nodes):
            new.outputs[0].name = f"{name}/cuberoot_{index}"
        cube.outputs[0].dtype = x.dtype or ir.DataType.FLOAT
        cube.outputs[0].shape = x.shape
        return nodes, cube.outputs[0]
