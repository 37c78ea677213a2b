"""Answering held-out questions: batched, deterministic (greedy) or seeded sampling.

Generation stops at the model's end-of-turn tokens (generation_config.json's eos_token_id,
which the base_model stage fills from the chat template: ChatML ``<|im_end|>``, Phi-3
``<|end|>``) or at ``max_tokens``; every answer records which.
"""
from __future__ import annotations

import time
from typing import Callable

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, generate_step
from mlx_lm.sample_utils import make_logits_processors, make_sampler


def prompt_tokens(tokenizer, messages: list[dict]) -> list[int]:
    """The chat-formatted prompt for the conversation up to (not including) the answer."""
    context = messages[:-1] if messages[-1]["role"] == "assistant" else messages
    return tokenizer.apply_chat_template(context, add_generation_prompt=True, return_dict=False)


def _sampler(temperature: float, seed: int | None):
    if temperature > 0:
        mx.random.seed(seed)  # sampling is seeded: two runs give the same answers
    return make_sampler(temp=temperature)


def _processors(repetition_penalty: float | None):
    # small models decode greedily into loops; a mild penalty on the last 20 tokens curbs them
    return make_logits_processors(repetition_penalty=repetition_penalty) if repetition_penalty else None


def generate_batched(model, tokenizer, prompts: list[list[int]], max_tokens: int,
                     temperature: float = 0.0, seed: int = 0, batch_size: int = 16,
                     repetition_penalty: float | None = None,
                     progress: Callable[[int], None] | None = None,
                     on_token: Callable[[int, int], None] | None = None) -> list[dict]:
    """Answers for all prompts with mlx-lm's continuous-batching generator.

    ``on_token(i, token)`` is called for every answer token of prompt ``i`` as soon as it is
    generated (not for the end-of-turn token): the chat streams through it, so that chat and
    the evaluate stage share this one decoding path. An exception it raises (or a Ctrl-C)
    stops generation and propagates; the generator is closed either way."""
    gen = BatchGenerator(model, stop_tokens=[[t] for t in tokenizer.eos_token_ids],
                         sampler=_sampler(temperature, seed), completion_batch_size=batch_size,
                         prefill_batch_size=min(batch_size, 8),
                         logits_processors=_processors(repetition_penalty))
    try:
        uids = gen.insert(prompts, [max_tokens] * len(prompts))
        index = {uid: i for i, uid in enumerate(uids)}
        tokens = {uid: [] for uid in uids}
        finish = {}
        while responses := gen.next_generated():
            for r in responses:
                if r.finish_reason != "stop":  # the end-of-turn token itself is not kept
                    tokens[r.uid].append(r.token)
                    if on_token:
                        on_token(index[r.uid], r.token)
                if r.finish_reason is not None:
                    finish[r.uid] = r.finish_reason
                    if progress:
                        progress(1)
    finally:
        gen.close()
    return [{"prediction": tokenizer.decode(tokens[uid]), "tokens": len(tokens[uid]),
             "finish_reason": finish[uid]} for uid in uids]


def generate_sequential(model, tokenizer, prompts: list[list[int]], max_tokens: int,
                        temperature: float = 0.0, seed: int = 0,
                        repetition_penalty: float | None = None,
                        progress: Callable[[int], None] | None = None) -> list[dict]:
    """One question at a time (the baseline the batched path is benchmarked against)."""
    sampler = _sampler(temperature, seed)
    processors = _processors(repetition_penalty)
    out = []
    for prompt in prompts:
        tokens, reason = [], "length"
        for token, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens, sampler=sampler,
                                      logits_processors=processors):
            token = int(token)
            if token in tokenizer.eos_token_ids:
                reason = "stop"
                break
            tokens.append(token)
        out.append({"prediction": tokenizer.decode(tokens), "tokens": len(tokens),
                    "finish_reason": reason})
        if progress:
            progress(1)
    return out


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start
