"""Answering held-out (or any) questions as the evaluate stage does: one generation path for the
evaluate stages and the voice score's base-model negatives, so the two are made alike by
construction."""
from __future__ import annotations

from tqdm import tqdm

from voicetune.evaluate.questions import prediction_records
from voicetune.models.generation import generate_batched, prompt_tokens


def answer_questions(model, tokenizer, rows: list[dict], p: dict, desc: str) -> list[dict]:
    """Each row's last question answered with the ``eval`` params ``p`` (max_tokens,
    temperature, seed, batch_size, repetition_penalty), batched, with a progress bar: the
    predictions rows of ``prediction_records``."""
    prompts = [prompt_tokens(tokenizer, row["messages"]) for row in rows]
    with tqdm(total=len(prompts), desc=desc, unit="answer") as bar:
        answers = generate_batched(model, tokenizer, prompts, p["max_tokens"], p["temperature"],
                                   p["seed"], p["batch_size"], p.get("repetition_penalty"),
                                   progress=bar.update)
    return prediction_records(tokenizer, prompts, rows, answers)
