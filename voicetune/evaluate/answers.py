"""Answering held-out (or any) questions as the evaluate stage does: one generation path for the
evaluate stages and the voice score's base-model negatives, so the two are made alike by
construction."""
from __future__ import annotations

from tqdm import tqdm

from voicetune.data.rewrite import task_of
from voicetune.evaluate.questions import prediction_records
from voicetune.models.generation import generate_batched, prompt_tokens


def answer_questions(model, tokenizer, rows: list[dict], p: dict, desc: str) -> list[dict]:
    """Each row's last question answered with the ``eval`` params ``p`` (max_tokens,
    temperature, seed, batch_size, repetition_penalty; ``rewrite_max_tokens`` for the rewrite
    task's rows), batched, with a progress bar: the predictions rows of ``prediction_records``,
    in the rows' order.

    Each task is generated as a batch of its own, with its own length limit: the Q&A answers
    come out exactly as they would with no rewrite row beside them."""
    records: list[dict | None] = [None] * len(rows)
    with tqdm(total=len(rows), desc=desc, unit="answer") as bar:
        for task, max_tokens in (("qa", p["max_tokens"]), ("rewrite", p.get("rewrite_max_tokens"))):
            index = [i for i, row in enumerate(rows) if task_of(row) == task]
            if not index:
                continue
            prompts = [prompt_tokens(tokenizer, rows[i]["messages"]) for i in index]
            answers = generate_batched(model, tokenizer, prompts, max_tokens, p["temperature"],
                                       p["seed"], p["batch_size"], p.get("repetition_penalty"),
                                       progress=bar.update)
            for i, record in zip(index, prediction_records(tokenizer, prompts, [rows[i] for i in index],
                                                           answers)):
                records[i] = record
    return records
