"""Generation (batched, deterministic, stops at end-of-turn) and fusion (verified)."""
import json
import shutil

import pytest
from mlx_lm import load

from voicetune.models.fusion import fuse, verify
from voicetune.models.generation import generate_batched, generate_sequential, prompt_tokens

from tests.conftest import PERSONA
from tests.harness.models import MANY_QUESTIONS, write_adapters

QUESTIONS = ["What is the capital of France?", "Why reef early?", "Name a knot.", "Tide or wind?"]


def prompts_for(tokenizer):
    return [prompt_tokens(tokenizer, [{"role": "system", "content": PERSONA},
                                      {"role": "user", "content": q}]) for q in QUESTIONS]


def test_greedy_stops_at_end_of_turn_and_matches_sequential(base_model_dir):
    model, tokenizer = load(str(base_model_dir))
    prompts = prompts_for(tokenizer)[:1]
    batched = generate_batched(model, tokenizer, prompts, max_tokens=40)
    assert batched[0]["finish_reason"] == "stop" and "Paris" in batched[0]["prediction"]
    assert "<|im_end|>" not in batched[0]["prediction"]
    assert batched == generate_sequential(model, tokenizer, prompts, max_tokens=40)


class RecordingTokenizer:
    """The tokenizer, recording the token ids of every answer it decodes."""

    def __init__(self, tokenizer):
        self.tokenizer, self.decoded = tokenizer, []
        self.eos_token_ids = tokenizer.eos_token_ids

    def decode(self, tokens):
        self.decoded.append(list(tokens))
        return self.tokenizer.decode(tokens)


def test_batched_generation_matches_one_at_a_time(tiny_model_dir):
    model, tokenizer = load(str(tiny_model_dir))
    prompts = [prompt_tokens(tokenizer, [{"role": "system", "content": PERSONA}, {"role": "user", "content": q}])
               for q in MANY_QUESTIONS]
    assert len({len(p) for p in prompts}) >= 6
    for penalty in (None, 1.5):
        batched, sequential = RecordingTokenizer(tokenizer), RecordingTokenizer(tokenizer)
        # batch_size 4: answers start as others finish (continuous batching), with padding
        a = generate_batched(model, batched, prompts, max_tokens=16, batch_size=4, repetition_penalty=penalty)
        b = generate_sequential(model, sequential, prompts, max_tokens=16, repetition_penalty=penalty)
        assert batched.decoded == sequential.decoded, penalty  # token for token
        assert a == b and len(a) == len(prompts)
        assert len({tuple(t) for t in batched.decoded}) > 1  # not one answer for every prompt
    assert generate_batched(model, tokenizer, prompts, max_tokens=16, repetition_penalty=1.5) != \
        generate_batched(model, tokenizer, prompts, max_tokens=16)  # the penalty is applied


def test_generation_is_deterministic_and_seeded(tiny_model_dir):
    model, tokenizer = load(str(tiny_model_dir))
    prompts = prompts_for(tokenizer)
    greedy = generate_batched(model, tokenizer, prompts, max_tokens=12)
    assert greedy == generate_batched(model, tokenizer, prompts, max_tokens=12)
    assert all(a["finish_reason"] == "length" and a["tokens"] == 12 for a in greedy)
    sampled = generate_batched(model, tokenizer, prompts, max_tokens=12, temperature=1.0, seed=5)
    assert sampled == generate_batched(model, tokenizer, prompts, max_tokens=12, temperature=1.0, seed=5)
    assert sampled != generate_batched(model, tokenizer, prompts, max_tokens=12, temperature=1.0, seed=6)
    penalized = generate_batched(model, tokenizer, prompts, max_tokens=12, repetition_penalty=1.5)
    assert penalized == generate_batched(model, tokenizer, prompts, max_tokens=12, repetition_penalty=1.5)
    assert penalized != greedy


def test_fused_model_matches_runtime_adapters(tmp_path, tiny_model_dir):
    adapters = write_adapters(tiny_model_dir, tmp_path / "adapters", scale_b=0.05)
    fuse(tiny_model_dir, adapters, tmp_path / "fused")
    fused_model, tokenizer = load(str(tmp_path / "fused"))  # a complete, loadable folder
    assert tokenizer.chat_template and json.loads((tmp_path / "fused/generation_config.json").read_text())
    report = verify(tiny_model_dir, adapters, tmp_path / "fused", prompts_for(tokenizer)[:3],
                    tolerance=1e-3, max_tokens=8)
    assert report["ok"], report["problems"]
    assert report["max_abs_logit_diff_fused_vs_lora"] < 1e-3 < report["max_abs_logit_diff_fused_vs_base"]
    assert report["greedy_answers_identical"] == 3


def test_fused_model_equal_to_base_is_caught(tmp_path, tiny_model_dir):
    adapters = write_adapters(tiny_model_dir, tmp_path / "adapters", scale_b=0.05)
    not_fused = tmp_path / "not_fused"
    shutil.copytree(tiny_model_dir, not_fused)  # what a fuse that dropped the adapters gives
    _, tokenizer = load(str(tiny_model_dir))
    report = verify(tiny_model_dir, adapters, not_fused, prompts_for(tokenizer)[:2], 1e-3, 4)
    assert not report["ok"]
    assert any("equals the base model" in p for p in report["problems"])


def test_no_op_adapters_are_reported(tmp_path, tiny_model_dir):
    adapters = write_adapters(tiny_model_dir, tmp_path / "adapters", scale_b=0.0)
    fuse(tiny_model_dir, adapters, tmp_path / "fused")
    _, tokenizer = load(str(tiny_model_dir))
    report = verify(tiny_model_dir, adapters, tmp_path / "fused", prompts_for(tokenizer)[:2], 1e-3, 4)
    assert any("adapters change nothing" in p for p in report["problems"])


def test_on_token_streams_each_answer_token_and_changes_no_answer(tiny_model_dir):
    """The chat streams through generate_batched's on_token: it must see every kept token of
    every answer, in order, and leave the answers (the evaluate stage's) exactly as they were."""
    model, tokenizer = load(str(tiny_model_dir))
    prompts = [prompt_tokens(tokenizer, [{"role": "system", "content": PERSONA}, {"role": "user", "content": q}])
               for q in MANY_QUESTIONS]
    seen = [[] for _ in prompts]
    streamed = generate_batched(model, tokenizer, prompts, max_tokens=16, batch_size=4, repetition_penalty=1.5,
                                on_token=lambda i, token: seen[i].append(token))
    assert streamed == generate_batched(model, tokenizer, prompts, max_tokens=16, batch_size=4,
                                        repetition_penalty=1.5)
    assert [tokenizer.decode(t) for t in seen] == [a["prediction"] for a in streamed]
    assert [len(t) for t in seen] == [a["tokens"] for a in streamed]

    def interrupt(i, token):  # what Ctrl-C in the chat does, mid-answer
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_batched(model, tokenizer, prompts[:1], max_tokens=16, on_token=interrupt)
    assert generate_batched(model, tokenizer, prompts[:1], max_tokens=16, batch_size=4,
                            repetition_penalty=1.5) == streamed[:1]  # nothing left behind
