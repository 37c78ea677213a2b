"""The GGUF -> Hugging Face conversion of the embedded model is right, not just loadable."""
import hashlib

import numpy as np
import pytest

from voicetune.models.from_gguf import GGUFConversionError, hf_tensor_name, permute_qk, unpermute_qk


@pytest.mark.parametrize("n_heads", [1, 3, 9])
def test_unpermute_inverts_llama_cpp_permutation(n_heads):
    w = np.random.default_rng(0).normal(size=(n_heads * 64, 32)).astype(np.float32)
    assert np.array_equal(unpermute_qk(permute_qk(w, n_heads), n_heads), w)
    assert not np.array_equal(permute_qk(w, n_heads), w)


def test_tensor_names_map_to_hf_llama():
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_tensor_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert hf_tensor_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    with pytest.raises(GGUFConversionError, match="unexpected tensor"):
        hf_tensor_name("blk.0.attn_qkv.weight")


def test_converted_model_answers_a_factual_question(base_model_dir):
    from mlx_lm import generate, load

    model, tok = load(str(base_model_dir))
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True)
    answer = generate(model, tok, prompt, max_tokens=12)  # greedy by default
    assert "Paris" in answer


def test_tokenizer_round_trips_and_keeps_chat_markers_whole(tokenizer):
    text = "Reef early, reef often: 3 knots of breeze at 04:30, naïve crew — «Fair winds.» 🚢\n\tDone."
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    for marker in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        ids = tokenizer.encode(marker, add_special_tokens=False)
        assert len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids[0]) == marker
    # llama.cpp's "smollm" pre-tokenizer splits digits one by one
    assert len(tokenizer.encode("2024", add_special_tokens=False)) == 4


def test_conversion_is_byte_identical(base_model_dir, tmp_path):
    from voicetune.models.base_model import materialize, write_generation_config

    materialize("embedded:smollm2-135m-instruct", None, tmp_path)
    write_generation_config(tmp_path, [2])

    def digest(folder):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}

    assert digest(tmp_path) == digest(base_model_dir)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= set(digest(tmp_path))
