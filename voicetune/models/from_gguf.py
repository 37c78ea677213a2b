"""Convert a Llama-architecture GGUF file into a Hugging Face-format folder that mlx-lm loads.

(Phi-3 files, ``phi3``, are read too: export/gguf.py checks its own Phi-3 exports with them.)

What the conversion has to get right (each is checked by tests/models/test_base_model.py):
- dequantize every tensor to float32 (the ``gguf`` package knows the block formats);
- undo llama.cpp's row permutation of the Q and K projections (its converter reorders
  each head's rotary halves to match GGML's rope; HF/MLX expect the original order);
- rebuild the tokenizer from the GGUF vocabulary, merges, pre-tokenizer name and token
  types, with the control tokens as single special tokens: byte-level BPE (``gpt2``) or
  SentencePiece (``llama``, e.g. Phi-3's; ``write_tokenizer`` also takes vocab-only files);
- keep the GGUF's chat template and end-of-turn token.
The output is deterministic: the same GGUF gives byte-identical files.
"""
from __future__ import annotations

import re
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
from gguf.quants import dequantize
from tokenizers import (AddedToken, Tokenizer, decoders, models, normalizers,
                        pre_tokenizers, processors)

from voicetune.core.errors import UserError
from voicetune.core.files import write_json_atomic

# GGUF tensor names (llama.cpp) -> Hugging Face Llama names.
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Phi-3 keeps Hugging Face's fused projections under their own GGUF names, unpermuted
# (llama.cpp runs Phi-3's rope in NeoX order, which is the Hugging Face order).
_PHI3_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_up": "mlp.gate_up_proj",
    "ffn_down": "mlp.down_proj",
}
_ARCH_LAYER_TENSORS = {"llama": _LAYER_TENSORS, "phi3": _PHI3_LAYER_TENSORS}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


class GGUFConversionError(UserError, ValueError):
    pass


def _field(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def hf_tensor_name(gguf_name: str, arch: str = "llama") -> str:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    layer_tensors = _ARCH_LAYER_TENSORS[arch]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
    if not m or m.group(2) not in layer_tensors:
        raise GGUFConversionError(f"unexpected tensor {gguf_name!r} in a {arch} GGUF file")
    return f"model.layers.{m.group(1)}.{layer_tensors[m.group(2)]}.weight"


def unpermute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's ``permute``: per head, interleaved rotary pairs -> two halves."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def permute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's own permutation (used by tests to check that ``unpermute_qk`` inverts it)."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def hf_config(reader: gguf.GGUFReader) -> dict:
    arch = _field(reader, "general.architecture")
    if arch == "phi3":
        return _phi3_config(reader)
    if arch != "llama":
        raise GGUFConversionError(
            f"GGUF architecture {arch!r} is not supported by this converter (only 'llama' "
            "and 'phi3'); point model.source at a Hugging Face repo id or a local HF-format "
            "folder instead"
        )
    names = {t.name for t in reader.tensors}
    hidden = int(_field(reader, "llama.embedding_length"))
    heads = int(_field(reader, "llama.attention.head_count"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", heads)),
        "head_dim": int(_field(reader, "llama.rope.dimension_count", hidden // heads)),
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
        # GGUF stores float32; print the shortest decimal that round-trips it (1e-05, not 9.99e-06).
        "rms_norm_eps": float(np.format_float_positional(
            np.float32(_field(reader, "llama.attention.layer_norm_rms_epsilon")), trim="-")),
        "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        "vocab_size": len(tokens),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }


def _phi3_config(reader: gguf.GGUFReader) -> dict:
    """mlx-lm's ``phi3`` config: the keys llama.cpp's Phi-3 converter writes, read back."""
    names = {t.name for t in reader.tensors}
    if "rope_factors_long.weight" in names:
        raise GGUFConversionError("Phi-3 GGUF files with long-context rope factors (128k "
                                  "models) are not supported by this converter")
    hidden = int(_field(reader, "phi3.embedding_length"))
    heads = int(_field(reader, "phi3.attention.head_count"))
    context = int(_field(reader, "phi3.context_length"))
    rope_dims = int(_field(reader, "phi3.rope.dimension_count", hidden // heads))
    config = {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "phi3.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "phi3.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, "phi3.attention.head_count_kv", heads)),
        "max_position_embeddings": context,
        "original_max_position_embeddings": int(
            _field(reader, "phi3.rope.scaling.original_context_length", context)),
        "rms_norm_eps": float(np.format_float_positional(
            np.float32(_field(reader, "phi3.attention.layer_norm_rms_epsilon")), trim="-")),
        "rope_theta": float(_field(reader, "phi3.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "partial_rotary_factor": rope_dims * heads / hidden,
        "vocab_size": len(_field(reader, "tokenizer.ggml.tokens")),
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    if _field(reader, "phi3.attention.sliding_window"):  # 0: none (llama.cpp's Phi-4 marker)
        config["sliding_window"] = int(_field(reader, "phi3.attention.sliding_window"))
    return config


def convert_weights(reader: gguf.GGUFReader, config: dict) -> dict[str, mx.array]:
    weights = {}
    arch = config["model_type"]
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name, arch)
        w = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        # GGUF lists dims fastest-first; numpy's shape is already (out, in) like HF.
        w = w.reshape([int(d) for d in reversed(tensor.shape)])
        if arch != "llama":
            pass  # only llama.cpp's llama layout permutes Q/K rows
        elif name.endswith("q_proj.weight"):
            w = unpermute_qk(w, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = unpermute_qk(w, config["num_key_value_heads"])
        weights[name] = mx.array(w)
    return weights


# llama.cpp pre-tokenizer names -> the equivalent `tokenizers` pre-tokenizer.
def _pre_tokenizer(name: str):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if name in ("gpt-2", "default"):
        return byte_level
    if name == "smollm":  # llama.cpp splits every digit, then applies the GPT-2 regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    raise GGUFConversionError(
        f"GGUF pre-tokenizer {name!r} is not supported (known: gpt-2, default, smollm); "
        "use a Hugging Face folder for this model instead"
    )


def _bpe_model(reader: gguf.GGUFReader, tokens: list[str]) -> Tokenizer:
    """Byte-level BPE (``gpt2``): the GGUF lists its merges."""
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                               fuse_unk=False))
    tok.pre_tokenizer = _pre_tokenizer(_field(reader, "tokenizer.ggml.pre", "default"))
    tok.decoder = decoders.ByteLevel()
    return tok


def spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece vocabulary implies (it stores scores, not merges).

    llama.cpp's SPM tokenizer repeatedly joins the adjacent pair whose joined piece has the
    best score; a BPE whose merges are ranked by that score does the same. Mirrors
    transformers' ``generate_merges`` (used by its LlamaConverter and GGUF loader).
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score in zip(tokens, scores):
        local = [(piece[:k], piece[k:], score) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


_SPACE = "\u2581"  # SentencePiece's visible space


def _spm_model(reader: gguf.GGUFReader, tokens: list[str]) -> Tokenizer:
    """SentencePiece (``llama``): BPE over ``▁``-for-space text with byte fallback.

    Like llama.cpp (and Phi-3's own tokenizer.json), a space is prepended to every run of
    text, including after a special token: a normalizer, not a Metaspace pre-tokenizer,
    which would skip the prefix when the text already starts with a space.
    """
    scores = _field(reader, "tokenizer.ggml.scores")
    if scores is None:
        raise GGUFConversionError("SentencePiece GGUF vocabulary has no tokenizer.ggml.scores")
    unk = _field(reader, "tokenizer.ggml.unknown_token_id")
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                               merges=spm_merges(tokens, scores),
                               unk_token=None if unk is None else tokens[int(unk)],
                               fuse_unk=True, byte_fallback=True))
    normalize = [normalizers.Replace(" ", _SPACE)]
    decode = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if _field(reader, "tokenizer.ggml.add_space_prefix", True):
        normalize.insert(0, normalizers.Prepend(_SPACE))
        decode.append(decoders.Strip(" ", 1, 0))  # drop the prepended space again
    tok.normalizer = normalizers.Sequence(normalize)
    tok.decoder = decoders.Sequence(decode)
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    if bos is not None and _field(reader, "tokenizer.ggml.add_bos_token", True):
        b = tokens[int(bos)]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{b}:0 $A:0", pair=f"{b}:0 $A:0 {b}:1 $B:1", special_tokens=[(b, int(bos))])
    return tok


_TOKENIZER_MODELS = {"gpt2": _bpe_model, "llama": _spm_model}


def build_tokenizer(reader: gguf.GGUFReader) -> tuple[Tokenizer, list[str]]:
    """Return the tokenizer and the list of its special (control) token strings."""
    kind = _field(reader, "tokenizer.ggml.model")
    if kind not in _TOKENIZER_MODELS:
        raise GGUFConversionError(
            f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2', "
            "and SentencePiece, 'llama')"
        )
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    tok = _TOKENIZER_MODELS[kind](reader, tokens)
    special = [tokens[i] for i, t in enumerate(types) if t == gguf.TokenType.CONTROL]
    user_defined = [tokens[i] for i, t in enumerate(types) if t == gguf.TokenType.USER_DEFINED]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])
    if user_defined:  # llama.cpp matches these whole too, but they are ordinary text
        tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in user_defined])
    return tok, special


def tokenizer_config(reader: gguf.GGUFReader, tok: Tokenizer, special: list[str]) -> dict:
    def token(key):
        idx = _field(reader, key)
        return None if idx is None else tok.id_to_token(int(idx))

    arch = _field(reader, "general.architecture")
    # llama.cpp adds BOS to SentencePiece vocabularies unless the file says otherwise
    add_bos_default = _field(reader, "tokenizer.ggml.model") == "llama"
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", add_bos_default)),
        "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        "additional_special_tokens": special,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_field(reader, f"{arch}.context_length")),
        "chat_template": _field(reader, "tokenizer.chat_template"),
    }


def write_tokenizer(reader: gguf.GGUFReader, out_dir: str | Path) -> Tokenizer:
    """Write tokenizer.json and tokenizer_config.json (works on vocab-only GGUF files too)."""
    out_dir = Path(out_dir)
    tok, special = build_tokenizer(reader)
    tok.save(str(out_dir / "tokenizer.json"))
    write_json_atomic(out_dir / "tokenizer_config.json", tokenizer_config(reader, tok, special))
    return tok


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> dict:
    """Write config.json, model.safetensors, tokenizer.json and tokenizer_config.json.

    Returns the HF config. (generation_config.json is written by the caller, which knows
    the end-of-turn token from the chat template.)
    """
    out_dir = Path(out_dir)
    reader = gguf.GGUFReader(str(gguf_path))
    config = hf_config(reader)
    write_json_atomic(out_dir / "config.json", config)
    mx.save_safetensors(
        str(out_dir / "model.safetensors"), convert_weights(reader, config), metadata={"format": "mlx"}
    )
    write_tokenizer(reader, out_dir)
    return config
