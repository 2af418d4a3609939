"""onnxruntime-genai's ``genai_config.json`` for a decoder graph with a KV cache.

onnxruntime-genai (``og.Model(folder)``) runs a decoder graph with its own generation loop; the
config names the graph's inputs and outputs and states the model's shapes and token ids. graphq
writes it beside every with-past decoder graph it emits (``graphq export --with-past`` and
``graphq quantize``), from the graph's own input/output names and the Hugging Face ``config.json``
(and ``generation_config.json``) beside it:

- ``head_size = head_dim`` (or ``hidden_size / num_attention_heads``), ``num_key_value_heads``
  (default ``num_attention_heads``), ``context_length = max_position_embeddings``;
- ``eos_token_id``: ``generation_config.json``'s list when present, else ``config.json``'s;
- the cache crosses the graph as ``past_key_values.N.{key,value}`` -> ``present.N.{key,value}``,
  concatenated inside the graph, so genai may not share one buffer between past and present
  (``past_present_share_buffer = false``).

A graph genai cannot feed (no KV cache, an input other than ``input_ids`` / ``attention_mask`` /
``position_ids`` / the cache, a model type genai does not know) gets no config; the reason is logged.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from graphq.errors import UnsupportedModelError
from graphq.runtime import PAST_INPUT, PRESENT_OUTPUT, GraphSignature

logger = logging.getLogger(__name__)

GENAI_CONFIG = "genai_config.json"
# Hugging Face model_type -> onnxruntime-genai model "type" (decoder-only families genai 0.18 runs).
GENAI_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "phi3": "phi3",
    "phi": "phi",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "granite": "granite",
    "olmo": "olmo",
    "nemotron": "nemotron",
}
# Graph input names genai feeds -> its config key.
GENAI_INPUTS = {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids"}
REQUIRED_INPUTS = ("input_ids", "attention_mask")


def genai_config(signature: GraphSignature, hf_config: dict, filename: str, generation_config: dict | None = None) -> dict:
    """The genai_config.json content for a decoder graph; UnsupportedModelError says why there is none."""
    if not signature.has_kv_cache:
        raise UnsupportedModelError("the graph has no KV cache (export with --with-past)")
    if any(name.endswith("_scale") for name in signature.past_inputs):
        raise UnsupportedModelError("onnxruntime-genai cannot feed an int8 KV cache (per-token scale inputs)")
    if "logits" not in signature.output_names:
        raise UnsupportedModelError("the graph has no 'logits' output")
    unknown = [name for name in signature.input_names if name not in GENAI_INPUTS and name not in signature.past_inputs]
    if unknown:
        raise UnsupportedModelError(f"onnxruntime-genai cannot feed the graph input(s) {', '.join(unknown)}")
    missing = [name for name in REQUIRED_INPUTS if name not in signature.input_names]
    if missing:
        raise UnsupportedModelError(f"the graph lacks the input(s) {', '.join(missing)}")
    model_type = hf_config.get("model_type")
    if model_type not in GENAI_MODEL_TYPES:
        raise UnsupportedModelError(f"onnxruntime-genai has no model type for '{model_type}'")
    layers = sorted({int(PAST_INPUT.match(name).group(1)) for name in signature.past_inputs})
    if layers != list(range(len(layers))):
        raise UnsupportedModelError(f"the KV-cache inputs do not cover layers 0..{len(layers) - 1}")
    for layer in layers:
        for kind in ("key", "value"):
            if PRESENT_OUTPUT.format(layer=layer, kind=kind) not in signature.output_names:
                raise UnsupportedModelError(f"the graph lacks the output {PRESENT_OUTPUT.format(layer=layer, kind=kind)}")
    try:
        heads = int(hf_config["num_attention_heads"])
        hidden = int(hf_config["hidden_size"])
        vocab = int(hf_config["vocab_size"])
    except (KeyError, TypeError, ValueError) as error:
        raise UnsupportedModelError(f"config.json lacks a usable {error}") from error
    kv_heads = int(hf_config.get("num_key_value_heads") or heads)
    head_size = int(hf_config.get("head_dim") or hidden // heads)
    context = int(hf_config.get("max_position_embeddings") or 2048)
    eos = (generation_config or {}).get("eos_token_id", hf_config.get("eos_token_id"))
    eos_ids = [int(t) for t in (eos if isinstance(eos, list) else [eos] if eos is not None else [])]
    pad = hf_config.get("pad_token_id")
    inputs = {GENAI_INPUTS[name]: name for name in signature.input_names if name in GENAI_INPUTS}
    inputs.update({"past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"})
    return {
        "model": {
            "bos_token_id": hf_config.get("bos_token_id"),
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "graphq", "provider_options": []},
                "filename": filename,
                "head_size": head_size,
                "hidden_size": hidden,
                "inputs": inputs,
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": heads,
                "num_hidden_layers": len(layers),
                "num_key_value_heads": kv_heads,
            },
            "eos_token_id": eos_ids,
            "pad_token_id": int(pad) if pad is not None else (eos_ids[0] if eos_ids else 0),
            "type": GENAI_MODEL_TYPES[model_type],
            "vocab_size": vocab,
        },
        "search": {
            "do_sample": False,
            "max_length": context,
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        logger.info("no %s: cannot read %s (%s)", GENAI_CONFIG, path, error)
        return None


def write_genai_config(signature: GraphSignature, model_filename: str, config_dirs: list[Path], target_dir: Path) -> bool:
    """Write ``target_dir/genai_config.json`` for a graph named ``model_filename``, reading the Hugging Face
    configs from the first of ``config_dirs`` that has ``config.json``; False (logged) when not applicable."""
    source = next((d for d in config_dirs if (d / "config.json").is_file()), None)
    if source is None:
        logger.info("no %s: no config.json beside the model", GENAI_CONFIG)
        return False
    hf_config = _read_json(source / "config.json")
    if hf_config is None:
        return False
    try:
        content = genai_config(signature, hf_config, model_filename, _read_json(source / "generation_config.json"))
    except UnsupportedModelError as error:
        logger.info("no %s: %s", GENAI_CONFIG, error)
        return False
    (target_dir / GENAI_CONFIG).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    logger.info("wrote %s for onnxruntime-genai", GENAI_CONFIG)
    return True
