"""Export a fused Hugging Face-format model to one GGUF file (llama.cpp, Ollama, LM Studio)
plus an Ollama Modelfile, and prove the file holds the same model.

What the export has to get right:
- tensor names and layout: llama.cpp's names come from the ``gguf`` package's own maps; for
  ``llama`` the Q and K rows are permuted the way llama.cpp's converter does (its rope pairs
  interleaved rows; models/from_gguf.py undoes it when reading), Phi-3's fused ``qkv_proj`` and
  ``gate_up_proj`` are written as they are;
- the tokenizer, rebuilt from tokenizer.json: byte-level BPE (``gpt2`` + merges and a named
  pre-tokenizer) or SentencePiece (``llama`` + scores, which a BPE's merge ranks imply);
  control tokens, bos/eos/unk/pad ids, and eos = the chat format's end-of-turn token, so that
  llama.cpp stops where the model was trained to stop;
- the chat template, and an Ollama TEMPLATE that renders the same text.

``verify`` reads the file back with the project's own GGUF reader (models/from_gguf.py, checked
against real llama.cpp files) and compares logits and token ids with the fused model.
"""
from __future__ import annotations

import gc
import json
import tempfile
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
from gguf.quants import QuantError, quantize
from mlx_lm.utils import load_tokenizer
from tokenizers import Tokenizer

from voicetune.core.errors import UserError
from voicetune.models.fusion import last_logits, load_float32
from voicetune.models.from_gguf import convert_gguf, permute_qk

# gguf tensor type of the 2-D weights for each export type (1-D norms stay float32, as
# llama.cpp's converter does); general.file_type says which one the file mostly holds.
TYPES = {
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "phi3": gguf.MODEL_ARCH.PHI3}

# Texts whose token ids must be identical through the GGUF: ASCII, accents, emoji, code,
# digits (SmolLM2 splits every digit), whitespace runs, CJK; the special tokens are added
# from the model's own chat template (see tokenizer_texts).
FIXED_TEXTS = [
    "Should I reef before a squall?",
    "Café, naïve façade — Zürich, Ærø, señor, Ångström.",
    "Fair winds 🌊⛵ and 👍🏽 from the bridge 🚢!",
    "def knots(x):\n    return x * 1.852  # km/h\n\tif a <= b: pass",
    "12345 + 0.5 = 12345.5; call 0800-123-456",
    "  two leading spaces,\n\n\nthree newlines\tand a tab  ",
    "北海のフェリー船長",
]


class GgufExportError(UserError, RuntimeError):
    pass


# ------------------------------------------------------------------------------ reading
def _fused_weights(folder: Path) -> dict[str, np.ndarray]:
    """Every weight in float32. A quantized folder (mlx-lm's format: packed ``uint32`` weights
    with ``.scales`` and ``.biases``) is dequantized first: cast as they are, its packed
    integers would be written as numbers (the U32 tensors llama.cpp's converter refuses)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise GgufExportError(f"{folder} has no *.safetensors weights; run `dvc repro fuse` first")
    raw = {}
    for f in files:
        raw.update(mx.load(str(f)))
    quantization = json.loads((folder / "config.json").read_text()).get("quantization") or {}
    weights = {}
    for name, w in raw.items():
        if name.endswith((".scales", ".biases")) and name.rsplit(".", 1)[0] + ".weight" in raw:
            continue
        layer = name.removesuffix(".weight")
        if f"{layer}.scales" in raw:
            q = quantization.get(layer) if isinstance(quantization.get(layer), dict) else quantization
            w = mx.dequantize(w, raw[f"{layer}.scales"], raw.get(f"{layer}.biases"),
                              group_size=q["group_size"], bits=q["bits"],
                              mode=q.get("mode", "affine"))
        weights[name] = np.array(w.astype(mx.float32))
    return weights


def _config(folder: Path) -> dict:
    config = json.loads((folder / "config.json").read_text())
    arch = config.get("model_type")
    if arch not in ARCHS:
        raise GgufExportError(
            f"{folder}/config.json: model_type {arch!r} cannot be exported to GGUF here (only "
            f"{', '.join(ARCHS)}); llama.cpp's convert_hf_to_gguf.py converts many more")
    if config.get("rope_scaling"):
        raise GgufExportError(
            f"{folder}/config.json: rope_scaling {config['rope_scaling']!r} is not supported by "
            "this export (its rope factors are not written); use llama.cpp's convert_hf_to_gguf.py")
    return config


# ------------------------------------------------------------------------------ tensors
def gguf_tensors(weights: dict[str, np.ndarray], config: dict) -> dict[str, np.ndarray]:
    """Hugging Face names and layout -> llama.cpp's, in float32."""
    arch = config["model_type"]
    names = gguf.get_tensor_name_map(ARCHS[arch], config["num_hidden_layers"])
    out = {}
    for name, w in sorted(weights.items()):
        if "rotary_emb.inv_freq" in name:
            continue  # recomputed by every runtime
        if name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue  # llama.cpp reuses token_embd when output.weight is absent
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise GgufExportError(f"no llama.cpp {arch} tensor for {name!r} (shape {w.shape}); "
                                  "this model's layout is not supported by the export")
        if arch == "llama" and name.endswith("self_attn.q_proj.weight"):
            w = permute_qk(w, config["num_attention_heads"])
        elif arch == "llama" and name.endswith("self_attn.k_proj.weight"):
            w = permute_qk(w, config.get("num_key_value_heads") or config["num_attention_heads"])
        out[new] = w
    return out


def _add_tensor(writer: gguf.GGUFWriter, name: str, w: np.ndarray, qtype) -> str:
    if w.ndim == 1:
        writer.add_tensor(name, w.astype(np.float32))
        return "F32"
    try:
        data = quantize(w, qtype)
    except (QuantError, ValueError):  # rows not a multiple of the 32-value block
        qtype = gguf.GGMLQuantizationType.F16
        data = quantize(w, qtype)
    writer.add_tensor(name, data, raw_dtype=qtype)  # a quantized shape is read from its bytes
    return qtype.name


# ------------------------------------------------------------------------------ tokenizer
def end_of_turn(tokenizer) -> int:
    """The id of the special token the chat template puts right after an assistant message."""
    marker = "Q7ZV marker"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}, {"role": "assistant", "content": marker}],
        tokenize=False)
    after = text.split(marker, 1)[-1]
    ids = tokenizer.encode(after, add_special_tokens=False) if after.strip() else []
    if not ids or ids[0] not in tokenizer.all_special_ids:
        raise GgufExportError(
            f"the chat template ends an assistant message with {after!r}, not with a special "
            "token: cannot tell the end-of-turn token that GGUF's eos must name")
    return ids[0]


def _pre_tokenizer_name(spec: dict | None) -> str:
    """llama.cpp's name for the byte-level pre-tokenizer (the ones models/from_gguf.py reads)."""
    kinds = [p.get("type") for p in (spec or {}).get("pretokenizers", [spec or {}])]
    if kinds == ["ByteLevel"]:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and spec["pretokenizers"][0].get("individual_digits"):
        return "smollm"
    raise GgufExportError(
        f"tokenizer.json: pre-tokenizer {json.dumps(spec)} has no llama.cpp name known here "
        "(known: ByteLevel = gpt-2, Digits + ByteLevel = smollm)")


def _spm_scores(tokens: list[str], merges: list[tuple[str, str]]) -> list[float]:
    """SentencePiece scores under which llama.cpp merges in the BPE's order: the piece made by
    the merge of rank r scores -r (gguf_convert.spm_merges turns them back into merges)."""
    rank = {}
    for r, (left, right) in enumerate(merges):
        rank.setdefault(left + right, r)
    return [-float(rank[t]) if t in rank else -float(len(merges) + 1) for t in tokens]


def tokenizer_metadata(folder: Path, hf_tokenizer, vocab_size: int) -> dict:
    """What GGUF's tokenizer.* keys need, from tokenizer.json (vocab, merges, added tokens)
    and the tokenizer's behaviour (does it add BOS? a space prefix?)."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise GgufExportError(f"{path} is missing: the GGUF export needs a fast tokenizer's "
                              "tokenizer.json (mlx-lm's fuse writes one)")
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec["model"]
    if model.get("type") != "BPE":
        raise GgufExportError(f"{path}: tokenizer model {model.get('type')!r} is not supported "
                              "(only BPE: byte-level or SentencePiece-style)")
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    by_id.update({i: a["content"] for i, a in added.items()})
    n = max(vocab_size, max(by_id) + 1)
    # Embedding rows beyond the tokenizer (Phi-3: 32064 rows, 32011 tokens) get llama.cpp's
    # placeholder names.
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n)]
    spm = bool(model.get("byte_fallback"))
    T = gguf.TokenType
    types = []
    for i, t in enumerate(tokens):
        if i in added:
            types.append(T.CONTROL if added[i].get("special") else T.USER_DEFINED)
        elif i not in by_id:
            types.append(T.UNUSED)
        elif spm and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types.append(T.BYTE)
        else:
            types.append(T.NORMAL)
    raw = Tokenizer.from_file(str(path))
    plain = raw.encode("Hello", add_special_tokens=False).ids
    full = raw.encode("Hello", add_special_tokens=True).ids
    meta = {
        "model": "llama" if spm else "gpt2",
        "tokens": tokens,
        "types": types,
        "add_bos": len(full) > len(plain) and full[0] == hf_tokenizer.bos_token_id,
        "add_eos": len(full) > len(plain) and full[-1] == hf_tokenizer.eos_token_id,
    }
    if spm:
        meta["pre"] = "default"
        meta["scores"] = _spm_scores(tokens, merges)
        meta["add_space_prefix"] = raw.id_to_token(plain[0]).startswith("\u2581")
    else:
        meta["pre"] = _pre_tokenizer_name(spec.get("pre_tokenizer"))
        meta["merges"] = [f"{a} {b}" for a, b in merges]
    return meta


# ------------------------------------------------------------------------------ writing
def write_gguf(fused_dir: Path, out_file: Path, qtype_name: str, name: str = "voicetune") -> dict:
    """Write ``out_file``; return what was written (end-of-turn id, stop tokens, tensor types)."""
    if qtype_name not in TYPES:
        raise GgufExportError(f"GGUF type {qtype_name!r} is not supported; use one of "
                              f"{', '.join(TYPES)}")
    qtype, file_type = TYPES[qtype_name]
    config = _config(fused_dir)
    arch = config["model_type"]
    tok = load_tokenizer(fused_dir)
    hf = tok._tokenizer
    if not hf.chat_template:
        raise GgufExportError(f"{fused_dir} has no chat template; llama.cpp and Ollama need one")
    eot = end_of_turn(hf)
    meta = tokenizer_metadata(fused_dir, hf, config["vocab_size"])
    tensors = gguf_tensors(_fused_weights(fused_dir), config)

    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    w = gguf.GGUFWriter(str(out_file), arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(config.get("num_key_value_heads") or heads)
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(config.get("rope_theta", 10000.0))
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
        w.add_vocab_size(len(meta["tokens"]))
    else:  # Phi-3 rotates a share of each head (partial_rotary_factor); llama.cpp's keys
        w.add_rope_dimension_count(
            int(config.get("partial_rotary_factor", 1.0) * config["hidden_size"]) // heads)
        w.add_rope_scaling_orig_ctx_len(
            config.get("original_max_position_embeddings", config["max_position_embeddings"]))
        w.add_sliding_window(config.get("sliding_window") or 0)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    w.add_tokenizer_model(meta["model"])
    w.add_tokenizer_pre(meta["pre"])
    w.add_token_list(meta["tokens"])
    w.add_token_types(meta["types"])
    if "merges" in meta:
        w.add_token_merges(meta["merges"])
    if "scores" in meta:
        w.add_token_scores(meta["scores"])
        w.add_add_space_prefix(meta["add_space_prefix"])
    if hf.bos_token_id is not None:
        w.add_bos_token_id(hf.bos_token_id)
    w.add_eos_token_id(eot)  # llama.cpp stops at eos: the end of an assistant turn
    w.add_eot_token_id(eot)
    if hf.unk_token_id is not None:
        w.add_unk_token_id(hf.unk_token_id)
    if hf.pad_token_id is not None:
        w.add_pad_token_id(hf.pad_token_id)
    w.add_add_bos_token(meta["add_bos"])
    w.add_add_eos_token(meta["add_eos"])
    w.add_chat_template(hf.chat_template)

    written = {}
    for tname, t in tensors.items():
        written[tname] = _add_tensor(w, tname, t, qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    gen = json.loads((fused_dir / "generation_config.json").read_text()) \
        if (fused_dir / "generation_config.json").exists() else {}
    stop_ids = gen.get("eos_token_id") or []
    stop_ids = stop_ids if isinstance(stop_ids, list) else [stop_ids]
    stops = [hf.convert_ids_to_tokens(i) for i in dict.fromkeys([eot, *stop_ids])]
    return {"end_of_turn_id": eot, "stop": stops, "tensor_types": written,
            "chat_template": hf.chat_template, "bos_token": hf.bos_token,
            "add_bos": meta["add_bos"]}


# ------------------------------------------------------------------------------ Ollama
# Chat formats as the pieces around each message. The Ollama TEMPLATE (Go template, Ollama's
# long-standing .System/.Prompt/.Response form, as in its own phi3 Modelfile) is built from
# the same pieces, and ``ollama_format`` checks that the model's Jinja template renders
# exactly these pieces, so the two cannot drift apart.
CHAT_FORMATS = {
    "chatml": {"system": "<|im_start|>system\n{}<|im_end|>\n",
               "user": "<|im_start|>user\n{}<|im_end|>\n",
               "assistant": "<|im_start|>assistant\n", "end": "<|im_end|>\n"},
    "phi3": {"system": "<|system|>\n{}<|end|>\n", "user": "<|user|>\n{}<|end|>\n",
             "assistant": "<|assistant|>\n", "end": "<|end|>\n"},
}


def ollama_format(hf_tokenizer, system: str, add_bos: bool) -> str:
    """The name of the CHAT_FORMATS entry that the model's chat template renders."""
    question = "Should I reef before a squall?"
    text = hf_tokenizer.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": question}],
        tokenize=False, add_generation_prompt=True)
    if add_bos and hf_tokenizer.bos_token and text.startswith(hf_tokenizer.bos_token):
        text = text[len(hf_tokenizer.bos_token):]  # llama.cpp and Ollama add BOS themselves
    for fmt, p in CHAT_FORMATS.items():
        if text == p["system"].format(system) + p["user"].format(question) + p["assistant"]:
            return fmt
    raise GgufExportError(
        f"the chat template renders a system + user prompt as {text!r}, which is none of the "
        f"chat formats with an Ollama TEMPLATE here ({', '.join(CHAT_FORMATS)}); add one to "
        "voicetune/export/gguf.py CHAT_FORMATS")


def ollama_template(fmt: str) -> str:
    p = CHAT_FORMATS[fmt]
    return ("{{ if .System }}" + p["system"].format("{{ .System }}") + "{{ end }}"
            "{{ if .Prompt }}" + p["user"].format("{{ .Prompt }}") + "{{ end }}"
            + p["assistant"] + "{{ .Response }}" + p["end"])


def export(fused_dir: Path, out_dir: Path, qtype_name: str, system: str) -> dict:
    """``out_dir``/model-<type>.gguf and an Ollama Modelfile with ``system`` as its persona."""
    name = f"model-{qtype_name}.gguf"
    info = write_gguf(fused_dir, out_dir / name, qtype_name)
    fmt = ollama_format(load_tokenizer(fused_dir)._tokenizer, system, info["add_bos"])
    (out_dir / "Modelfile").write_text(modelfile(name, system, fmt, info["stop"]), encoding="utf-8")
    return {"file": name, "chat_format": fmt, **info}


def modelfile(gguf_name: str, system: str, fmt: str, stops: list[str]) -> str:
    if '"""' in system:
        raise GgufExportError('data.system_prompt contains """, which cannot be quoted in an '
                              "Ollama Modelfile; rephrase it")
    lines = [f"# Ollama: ollama create <name> -f Modelfile && ollama run <name>",
             f"FROM ./{gguf_name}",
             f'TEMPLATE """{ollama_template(fmt)}"""',
             f'SYSTEM """{system}"""']
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ verifying
def tokenizer_texts(hf_tokenizer, system: str) -> list[str]:
    """FIXED_TEXTS plus a chat rendered by the model's own template (its special tokens)."""
    chat = hf_tokenizer.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": FIXED_TEXTS[0]},
         {"role": "assistant", "content": "Yes. Early, and twice."}], tokenize=False)
    return [*FIXED_TEXTS, chat, " ".join(hf_tokenizer.all_special_tokens)]


def verify(fused_dir: Path, gguf_file: Path, conversations: list[list[dict]], tolerance: float,
           system: str) -> dict:
    """Read ``gguf_file`` back into an HF folder and compare it with ``fused_dir``: logits on
    the conversations (all positions), token ids and decoded text on tokenizer_texts, the chat
    template. Returns the figures and a list of problems (empty when it passes)."""
    with tempfile.TemporaryDirectory(prefix="gguf-readback-") as tmp:
        convert_gguf(gguf_file, tmp)
        back_tok = load_tokenizer(Path(tmp))._tokenizer
        fused_model, fused_tok, _ = load_float32(fused_dir)
        fused_hf = fused_tok._tokenizer
        prompts = [fused_hf.apply_chat_template(c, return_dict=False) for c in conversations]
        fused_logits = last_logits(fused_model, prompts)
        del fused_model
        gc.collect()
        back_model, _, _ = load_float32(Path(tmp))
        back_logits = last_logits(back_model, prompts)
        del back_model
        gc.collect()
    diff = max(float(np.abs(f - b).max()) for f, b in zip(fused_logits, back_logits))
    positions = sum(len(f) for f in fused_logits)
    top1 = sum(int((f.argmax(-1) == b.argmax(-1)).sum()) for f, b in zip(fused_logits, back_logits))
    texts = tokenizer_texts(fused_hf, system)
    same_ids = sum(fused_hf.encode(t) == back_tok.encode(t) for t in texts)
    same_text = sum(fused_hf.decode(fused_hf.encode(t)) == back_tok.decode(back_tok.encode(t))
                    for t in texts)
    report = {
        "prompts": len(prompts),
        "positions": positions,
        "max_abs_logit_diff": diff,
        "logit_tolerance": tolerance,
        "top1_agreement": top1 / positions,
        "tokenizer_texts": len(texts),
        "tokenizer_ids_identical": same_ids,
        "tokenizer_decode_identical": same_text,
        "chat_template_identical": back_tok.chat_template == fused_hf.chat_template,
    }
    problems = []
    if not diff <= tolerance:  # also catches NaN
        problems.append(f"logits of the GGUF differ from models/fused by up to {diff:.3g} "
                        f"(> tolerance {tolerance:g})")
    if same_ids != len(texts):
        problems.append(f"the GGUF tokenizer gives other token ids on {len(texts) - same_ids} "
                        f"of {len(texts)} texts")
    if same_text != len(texts):
        problems.append(f"the GGUF tokenizer decodes {len(texts) - same_text} of {len(texts)} "
                        "texts differently")
    if not report["chat_template_identical"]:
        problems.append("the GGUF's chat template differs from models/fused's")
    report["problems"] = problems
    return report
