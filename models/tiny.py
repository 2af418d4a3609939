"""Tiny random models built from configs, for tests (no download).

The tokenizer is a byte-level BPE with no merges: every UTF-8 byte is one token, so any text
tokenizes and the vocabulary is 256 bytes plus a few special tokens. The encoder's tokenizer frames
a sentence as BERT's does, ``<s> text </s>`` (``[CLS] text [SEP]``), with ``<pad>`` for padding.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")


@dataclasses.dataclass(frozen=True)
class TinyModelSpec:
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 128
    max_positions: int = 1024
    seed: int = 0


def byte_tokenizer(*, frame_sentences: bool = False):
    """A ``PreTrainedTokenizerFast`` over bytes (vocabulary: 4 specials + 256 bytes); with
    ``frame_sentences``, special tokens wrap every sequence: ``<s> text </s>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(byte_alphabet):
        vocab[symbol] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    if frame_sentences:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> $B </s>",
            special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )


def _randomize_norms(model) -> None:
    """Give every norm its own weights (fresh models have all-ones norms, which exporters then
    share as one tensor: unlike any trained model)."""
    import torch

    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name.lower() and parameter.ndim == 1:
                parameter.copy_(1.0 + 0.2 * torch.randn_like(parameter) if name.endswith("weight") else 0.1 * torch.randn_like(parameter))


def make_tiny_llama(out_dir: Path, spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """A random LlamaForCausalLM with tied embeddings, saved with its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config).eval()
    _randomize_norms(model)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)


def make_tiny_bert(out_dir: Path, spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """A random BertModel (encoder, post-norm LayerNorm with bias, GELU), saved with a tokenizer that
    frames sentences as ``<s> text </s>``."""
    import torch
    from transformers import BertConfig, BertModel

    tokenizer = byte_tokenizer(frame_sentences=True)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_positions,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(spec.seed)
    model = BertModel(config).eval()
    _randomize_norms(model)
    with torch.no_grad():  # fresh biases are all zeros, which exporters share through Identity nodes
        for name, parameter in model.named_parameters():
            if name.endswith(".bias") and "norm" not in name.lower():
                parameter.copy_(0.02 * torch.randn_like(parameter))
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)
