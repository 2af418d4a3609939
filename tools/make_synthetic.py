"""Write a Llama-shaped ONNX language model with random weights, layer by layer, in bounded memory.

The graph looks like optimum's export of ``LlamaForCausalLM`` without a KV cache (inputs
``input_ids``, ``attention_mask``, ``position_ids``; output ``logits``), so graphq's passes find the
same patterns and node names as on a real export:

- ``/model/embed_tokens/Gather``; rotary ``cos``/``sin`` from ``position_ids`` (``/model/rotary_emb/MatMul``
  with the inverse frequencies as its *first* input, as optimum emits it, so it is no weight MatMul);
- per layer ``i``, under ``/model/layers.{i}/``: RMSNorm as ``Pow -> ReduceMean -> Add(eps) -> Sqrt ->
  Div(1, .) -> Mul(x, .) -> Mul(gamma)`` (or, with ``--norm simplified``, one ``SimplifiedLayerNormalization``:
  ONNX Runtime's op in the default domain, which ``onnx.checker`` does not know), ``self_attn/{q,k,v,o}_proj/MatMul`` with weights ``[in, out]``, rotary embedding
  (``rotate_half`` by Slice/Neg/Concat), grouped-query heads repeated by Expand, ``QK^T * scale + mask
  -> Softmax -> @ V``, the residual ``Add``, and the gated MLP ``mlp/{gate,up,down}_proj/MatMul`` with
  ``SiLU = x * Sigmoid(x)``;
- ``/model/norm`` and ``/lm_head/MatMul`` (untied ``[hidden, vocab]``, or with ``--tied`` a Transpose of
  the embedding as optimum exports tied heads).

Every weight goes straight to ``model.onnx.data`` (4096-byte aligned, written in chunks of at most
``--chunk-mb`` as it is generated), and the graph references it by offset and length; the graph itself
is built with ``onnx.helper`` protos and holds only small constants. Peak memory is therefore about
one chunk plus the graph, whatever the model size (7B shapes: a few hundred MB, see ``--help``).

    python tools/make_synthetic.py -o runs/synthetic-7b --dtype float16             # Llama-2-7B shapes
    python tools/make_synthetic.py -o /tmp/tiny --layers 2 --hidden 64 --intermediate 128 --vocab 300 \\
        --heads 4 --kv-heads 2

Beside the model: ``config.json`` (the shapes, as a Hugging Face Llama config) and, unless
``--no-tokenizer``, graphq's byte-level test tokenizer (260 tokens, all ids within any vocabulary of at
least 260), so ``graphq eval`` / ``graphq quantize`` run on the result directly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import resource
import sys
import time
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

logger = logging.getLogger("make_synthetic")

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
ALIGNMENT = 4096
OPSET = 18
DTYPES = {"float32": (np.float32, TensorProto.FLOAT), "float16": (np.float16, TensorProto.FLOAT16)}
NORMS = ("ops", "simplified")


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    """Shapes of the model (defaults: Llama-2-7B) and how to write it."""

    layers: int = 32
    hidden: int = 4096
    intermediate: int = 11008
    vocab: int = 32000
    heads: int = 32
    kv_heads: int = 32
    max_positions: int = 4096
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    dtype: str = "float32"
    norm: str = "ops"
    tied: bool = False
    seed: int = 0
    chunk_mb: int = 64

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "intermediate", "vocab", "heads", "kv_heads", "max_positions", "chunk_mb"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.hidden % self.heads or (self.hidden // self.heads) % 2:
            raise ValueError(f"hidden {self.hidden} must split into {self.heads} heads of an even size")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads {self.heads} must be a multiple of kv-heads {self.kv_heads}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def parameters(self) -> int:
        d, f, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        per_layer = d * (2 * d + 2 * kv) + 3 * d * f + 2 * d
        return self.layers * per_layer + self.vocab * d * (1 if self.tied else 2) + d


@dataclasses.dataclass(frozen=True)
class SyntheticResult:
    model_path: Path
    parameters: int
    data_bytes: int
    seconds: float  # building the model files (not the tokenizer)
    peak_rss_bytes: int  # of the process while building them


class DataWriter:
    """Appends tensors to the external-data file, each at a 4096-byte aligned offset."""

    def __init__(self, handle: BinaryIO, location: str) -> None:
        self.handle = handle
        self.location = location
        self.offset = 0

    def begin(self) -> int:
        padding = -self.offset % ALIGNMENT
        if padding:
            self.handle.write(b"\0" * padding)
            self.offset += padding
        return self.offset

    def write(self, block: np.ndarray) -> None:
        data = np.ascontiguousarray(block)
        self.handle.write(memoryview(data).cast("B"))
        self.offset += data.nbytes


class GraphBuilder:
    """Nodes and initializers of the graph; weights are generated into the data file as they are added."""

    def __init__(self, spec: SyntheticSpec, writer: DataWriter) -> None:
        self.spec = spec
        self.writer = writer
        self.numpy_dtype, self.onnx_dtype = DTYPES[spec.dtype]
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.rng = np.random.default_rng(spec.seed)
        self._constants: dict[tuple, str] = {}

    def node(self, op_type: str, inputs: list[str], name: str, outputs: int = 1, domain: str = "", **attributes) -> str | list[str]:
        """Add a node named ``name`` (optimum style: outputs ``{name}_output_{k}``); returns its output(s)."""
        names = [f"{name}_output_{k}" for k in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=name, domain=domain, **attributes))
        return names[0] if outputs == 1 else names

    def constant(self, values, dtype=None) -> str:
        """A small embedded initializer (shared between equal constants)."""
        array = np.asarray(values, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            name = f"const_{len(self._constants)}"
            self.initializers.append(numpy_helper.from_array(array, name))
            self._constants[key] = name
        return self._constants[key]

    def weight(self, name: str, shape: tuple[int, ...], *, std: float, mean: float = 0.0) -> str:
        """A random ``N(mean, std^2)`` tensor written to the data file in chunks of rows."""
        offset = self.writer.begin()
        rows = shape[0]
        row_elements = math.prod(shape[1:])
        chunk_rows = max(1, (self.spec.chunk_mb << 20) // (4 * max(row_elements, 1)))
        for start in range(0, rows, chunk_rows):
            count = min(chunk_rows, rows - start)
            block = self.rng.standard_normal((count, *shape[1:]), dtype=np.float32)
            block *= np.float32(std)
            block += np.float32(mean)
            self.writer.write(block.astype(self.numpy_dtype, copy=False))
            del block
        tensor = TensorProto(name=name, data_type=self.onnx_dtype, dims=list(shape))
        tensor.data_location = TensorProto.EXTERNAL
        length = math.prod(shape) * np.dtype(self.numpy_dtype).itemsize
        for key, value in (("location", self.writer.location), ("offset", str(offset)), ("length", str(length))):
            tensor.external_data.add(key=key, value=value)
        self.initializers.append(tensor)
        return name

    def scalar(self, value: float) -> str:
        return self.constant(np.array(value, dtype=self.numpy_dtype))


def _rms_norm(g: GraphBuilder, x: str, prefix: str, weight_name: str) -> str:
    """RMSNorm of ``x`` as optimum exports it, op by op, or as one SimplifiedLayerNormalization."""
    spec = g.spec
    gamma = g.weight(weight_name, (spec.hidden,), std=0.1, mean=1.0)
    if spec.norm == "simplified":
        return g.node("SimplifiedLayerNormalization", [x, gamma], f"{prefix}/SimplifiedLayerNormalization",
                      axis=-1, epsilon=spec.rms_eps)
    square = g.node("Pow", [x, g.scalar(2.0)], f"{prefix}/Pow")
    mean = g.node("ReduceMean", [square, g.constant([-1], np.int64)], f"{prefix}/ReduceMean", keepdims=1)
    shifted = g.node("Add", [mean, g.scalar(spec.rms_eps)], f"{prefix}/Add")
    root = g.node("Sqrt", [shifted], f"{prefix}/Sqrt")
    inverse = g.node("Div", [g.scalar(1.0), root], f"{prefix}/Div")
    normed = g.node("Mul", [x, inverse], f"{prefix}/Mul")
    return g.node("Mul", [gamma, normed], f"{prefix}/Mul_1")


def _linear(g: GraphBuilder, x: str, prefix: str, weight_name: str, fan_in: int, fan_out: int) -> str:
    weight = g.weight(weight_name, (fan_in, fan_out), std=0.02)
    return g.node("MatMul", [x, weight], f"{prefix}/MatMul")


def _rotary(g: GraphBuilder) -> tuple[str, str]:
    """cos, sin ``[batch, 1, seq, head_dim]`` from ``position_ids`` (optimum's rotary_emb, simplified)."""
    spec = g.spec
    half = spec.head_dim // 2
    inv_freq = 1.0 / spec.rope_theta ** (np.arange(half, dtype=np.float64) * 2 / spec.head_dim)
    positions = g.node("Cast", ["position_ids"], "/model/rotary_emb/Cast", to=TensorProto.FLOAT)
    positions = g.node("Unsqueeze", [positions, g.constant([1], np.int64)], "/model/rotary_emb/Unsqueeze")
    freqs = g.node("MatMul", [g.constant(inv_freq.reshape(1, half, 1), np.float32), positions], "/model/rotary_emb/MatMul")
    freqs = g.node("Transpose", [freqs], "/model/rotary_emb/Transpose", perm=[0, 2, 1])
    angles = g.node("Concat", [freqs, freqs], "/model/rotary_emb/Concat", axis=-1)
    cos = g.node("Cos", [angles], "/model/rotary_emb/Cos")
    sin = g.node("Sin", [angles], "/model/rotary_emb/Sin")
    if spec.dtype != "float32":
        cos = g.node("Cast", [cos], "/model/rotary_emb/Cast_1", to=g.onnx_dtype)
        sin = g.node("Cast", [sin], "/model/rotary_emb/Cast_2", to=g.onnx_dtype)
    axis = g.constant([1], np.int64)
    return (g.node("Unsqueeze", [cos, axis], "/model/rotary_emb/Unsqueeze_1"),
            g.node("Unsqueeze", [sin, axis], "/model/rotary_emb/Unsqueeze_2"))


def _attention_mask(g: GraphBuilder, hidden: str) -> str:
    """Additive mask ``[batch, 1, seq, seq]``: the dtype's minimum above the diagonal and at padding."""
    shape = g.node("Shape", [hidden], "/model/Shape")
    seq = g.node("Gather", [shape, g.constant([1], np.int64)], "/model/Gather", axis=0)
    square = g.node("Concat", [seq, seq], "/model/Concat", axis=0)
    ones = g.node("ConstantOfShape", [square], "/model/ConstantOfShape",
                  value=helper.make_tensor("one", TensorProto.INT64, [1], [1]))
    future = g.node("Trilu", [ones, g.constant(1, np.int64)], "/model/Trilu", upper=1)
    future = g.node("Cast", [future], "/model/Cast", to=TensorProto.BOOL)
    padding = g.node("Equal", ["attention_mask", g.constant(0, np.int64)], "/model/Equal")
    padding = g.node("Unsqueeze", [padding, g.constant([1, 2], np.int64)], "/model/Unsqueeze")
    masked = g.node("Or", [future, padding], "/model/Or")
    lowest = g.scalar(float(np.finfo(g.numpy_dtype).min))
    return g.node("Where", [masked, lowest, g.scalar(0.0)], "/model/Where")


def _rotate(g: GraphBuilder, x: str, cos: str, sin: str, prefix: str) -> str:
    """``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = concat(-x2, x1)``."""
    half = g.spec.head_dim // 2
    axis = g.constant([-1], np.int64)
    first = g.node("Slice", [x, g.constant([0], np.int64), g.constant([half], np.int64), axis], f"{prefix}/Slice")
    second = g.node("Slice", [x, g.constant([half], np.int64), g.constant([2**62], np.int64), axis], f"{prefix}/Slice_1")
    negated = g.node("Neg", [second], f"{prefix}/Neg")
    rotated = g.node("Concat", [negated, first], f"{prefix}/Concat", axis=-1)
    return g.node("Add", [g.node("Mul", [x, cos], f"{prefix}/Mul"), g.node("Mul", [rotated, sin], f"{prefix}/Mul_1")],
                  f"{prefix}/Add")


def _heads(g: GraphBuilder, x: str, heads: int, prefix: str) -> str:
    """``[b, s, heads * hd] -> [b, heads, s, hd]``."""
    shaped = g.node("Reshape", [x, g.constant([0, 0, heads, g.spec.head_dim], np.int64)], f"{prefix}/Reshape")
    return g.node("Transpose", [shaped], f"{prefix}/Transpose", perm=[0, 2, 1, 3])


def _repeat_kv(g: GraphBuilder, x: str, prefix: str) -> str:
    """Grouped-query attention: each of the kv heads serves ``heads / kv_heads`` query heads."""
    spec = g.spec
    groups = spec.heads // spec.kv_heads
    if groups == 1:
        return x
    wide = g.node("Unsqueeze", [x, g.constant([2], np.int64)], f"{prefix}/Unsqueeze")
    shape = g.node("Shape", [wide], f"{prefix}/Shape")
    target = g.node("Mul", [shape, g.constant([1, 1, groups, 1, 1], np.int64)], f"{prefix}/Mul")
    expanded = g.node("Expand", [wide, target], f"{prefix}/Expand")
    return g.node("Reshape", [expanded, g.constant([0, spec.heads, -1, spec.head_dim], np.int64)], f"{prefix}/Reshape")


def _layer(g: GraphBuilder, hidden: str, index: int, cos: str, sin: str, mask: str) -> str:
    spec = g.spec
    prefix = f"/model/layers.{index}"
    name = f"model.layers.{index}"
    kv = spec.kv_heads * spec.head_dim
    x = _rms_norm(g, hidden, f"{prefix}/input_layernorm", f"{name}.input_layernorm.weight")
    attn = f"{prefix}/self_attn"
    q = _linear(g, x, f"{attn}/q_proj", f"{name}.self_attn.q_proj.weight", spec.hidden, spec.hidden)
    k = _linear(g, x, f"{attn}/k_proj", f"{name}.self_attn.k_proj.weight", spec.hidden, kv)
    v = _linear(g, x, f"{attn}/v_proj", f"{name}.self_attn.v_proj.weight", spec.hidden, kv)
    q = _rotate(g, _heads(g, q, spec.heads, f"{attn}/q"), cos, sin, f"{attn}/q_rotary")
    k = _repeat_kv(g, _rotate(g, _heads(g, k, spec.kv_heads, f"{attn}/k"), cos, sin, f"{attn}/k_rotary"), f"{attn}/k_repeat")
    v = _repeat_kv(g, _heads(g, v, spec.kv_heads, f"{attn}/v"), f"{attn}/v_repeat")
    keys = g.node("Transpose", [k], f"{attn}/Transpose", perm=[0, 1, 3, 2])
    scores = g.node("MatMul", [q, keys], f"{attn}/MatMul")
    scores = g.node("Mul", [scores, g.scalar(1.0 / math.sqrt(spec.head_dim))], f"{attn}/Mul")
    scores = g.node("Add", [scores, mask], f"{attn}/Add")
    probs = g.node("Softmax", [scores], f"{attn}/Softmax", axis=-1)
    context = g.node("MatMul", [probs, v], f"{attn}/MatMul_1")
    context = g.node("Transpose", [context], f"{attn}/Transpose_1", perm=[0, 2, 1, 3])
    context = g.node("Reshape", [context, g.constant([0, 0, spec.hidden], np.int64)], f"{attn}/Reshape")
    attended = _linear(g, context, f"{attn}/o_proj", f"{name}.self_attn.o_proj.weight", spec.hidden, spec.hidden)
    hidden = g.node("Add", [hidden, attended], f"{prefix}/Add")
    x = _rms_norm(g, hidden, f"{prefix}/post_attention_layernorm", f"{name}.post_attention_layernorm.weight")
    mlp = f"{prefix}/mlp"
    gate = _linear(g, x, f"{mlp}/gate_proj", f"{name}.mlp.gate_proj.weight", spec.hidden, spec.intermediate)
    up = _linear(g, x, f"{mlp}/up_proj", f"{name}.mlp.up_proj.weight", spec.hidden, spec.intermediate)
    silu = g.node("Mul", [gate, g.node("Sigmoid", [gate], f"{mlp}/act_fn/Sigmoid")], f"{mlp}/act_fn/Mul")
    product = g.node("Mul", [silu, up], f"{mlp}/Mul")
    down = _linear(g, product, f"{mlp}/down_proj", f"{name}.mlp.down_proj.weight", spec.intermediate, spec.hidden)
    return g.node("Add", [hidden, down], f"{prefix}/Add_1")


def _graph(g: GraphBuilder) -> onnx.GraphProto:
    spec = g.spec
    embedding = g.weight("model.embed_tokens.weight", (spec.vocab, spec.hidden), std=0.02)
    hidden = g.node("Gather", [embedding, "input_ids"], "/model/embed_tokens/Gather")
    cos, sin = _rotary(g)
    mask = _attention_mask(g, hidden)
    for index in range(spec.layers):
        hidden = _layer(g, hidden, index, cos, sin, mask)
        logger.info("layer %d/%d written (%.2f GB)", index + 1, spec.layers, g.writer.offset / 1e9)
    hidden = _rms_norm(g, hidden, "/model/norm", "model.norm.weight")
    if spec.tied:
        head = g.node("Transpose", [embedding], "/lm_head/Transpose", perm=[1, 0])
    else:
        head = g.weight("lm_head.weight", (spec.hidden, spec.vocab), std=0.02)
    logits = g.node("MatMul", [hidden, head], "/lm_head/MatMul")
    if spec.dtype != "float32":
        logits = g.node("Cast", [logits], "/lm_head/Cast", to=TensorProto.FLOAT)
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="/lm_head/Identity"))
    inputs = [helper.make_tensor_value_info(name, TensorProto.INT64, ["batch_size", shape])
              for name, shape in (("input_ids", "sequence_length"), ("attention_mask", "sequence_length"),
                                  ("position_ids", "sequence_length"))]
    output = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", spec.vocab])
    return helper.make_graph(g.nodes, "main_graph", inputs, [output], g.initializers)


def hf_config(spec: SyntheticSpec) -> dict:
    """The shapes as a Hugging Face Llama ``config.json``."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate, "num_hidden_layers": spec.layers, "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads, "vocab_size": spec.vocab, "max_position_embeddings": spec.max_positions,
        "rms_norm_eps": spec.rms_eps, "rope_theta": spec.rope_theta, "tie_word_embeddings": spec.tied,
        "torch_dtype": spec.dtype, "graphq_synthetic": {"seed": spec.seed, "norm": spec.norm},
    }


def make_synthetic(out_dir: str | Path, spec: SyntheticSpec = SyntheticSpec(), *, tokenizer: bool = True) -> SyntheticResult:
    """Write ``out_dir/model.onnx`` + ``model.onnx.data`` (+ ``config.json``, tokenizer) for ``spec``."""
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / DATA_FILE, "wb") as handle:
        builder = GraphBuilder(spec, DataWriter(handle, DATA_FILE))
        graph = _graph(builder)
        data_bytes = builder.writer.offset
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=9,
                              producer_name="graphq make_synthetic")
    (out / MODEL_FILE).write_bytes(model.SerializeToString())
    (out / "config.json").write_text(json.dumps(hf_config(spec), indent=2) + "\n")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kB; before transformers loads
    seconds = time.perf_counter() - start
    if tokenizer:
        from graphq.models.tiny import byte_tokenizer

        if len(byte_tokenizer()) > spec.vocab:
            raise ValueError(f"the byte tokenizer needs a vocabulary of at least {len(byte_tokenizer())}")
        byte_tokenizer().save_pretrained(out)
    return SyntheticResult(out / MODEL_FILE, spec.parameters, data_bytes, seconds, peak)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = SyntheticSpec()
    parser.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    for name, help_text in (("layers", "decoder layers"), ("hidden", "hidden size"), ("intermediate", "MLP size"),
                            ("vocab", "vocabulary size"), ("heads", "attention heads"), ("kv-heads", "key/value heads"),
                            ("max-positions", "max_position_embeddings in config.json"), ("seed", "random seed"),
                            ("chunk-mb", "largest block of random numbers generated at once (float32 MB)")):
        attribute = name.replace("-", "_")
        parser.add_argument(f"--{name}", type=int, default=getattr(defaults, attribute),
                            help=f"{help_text} (default {getattr(defaults, attribute)})")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=defaults.dtype, help="weight and compute type")
    parser.add_argument("--norm", choices=NORMS, default=defaults.norm,
                        help="RMSNorm op by op (as optimum exports it) or as SimplifiedLayerNormalization (ONNX Runtime's "
                             "op in the default domain, as its transformer optimizer emits it; onnx.checker rejects it)")
    parser.add_argument("--tied", action="store_true", help="LM head = Transpose of the embedding")
    parser.add_argument("--no-tokenizer", action="store_true", help="do not write the byte-level tokenizer")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname).1s %(name)s: %(message)s")
    spec = SyntheticSpec(layers=args.layers, hidden=args.hidden, intermediate=args.intermediate, vocab=args.vocab,
                         heads=args.heads, kv_heads=args.kv_heads, max_positions=args.max_positions, dtype=args.dtype,
                         norm=args.norm, tied=args.tied, seed=args.seed, chunk_mb=args.chunk_mb)
    result = make_synthetic(args.output, spec, tokenizer=not args.no_tokenizer)
    print(f"wrote {result.model_path}: {result.parameters / 1e9:.3f} B parameters, {result.data_bytes / 1e9:.2f} GB "
          f"of {spec.dtype} weights in {result.seconds:.0f}s, peak RSS {result.peak_rss_bytes / 1e6:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
