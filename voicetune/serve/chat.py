"""One model's answer streamed as it is generated, with the evaluate stage's decoding: the
terminal chat (``python -m voicetune.tools.chat``) and the arena page both answer through it,
so a greedy answer to a test question is the evaluate stage's prediction for it.
"""
from __future__ import annotations

from dataclasses import dataclass

from voicetune.core.errors import UserError
from voicetune.models.generation import generate_batched, prompt_tokens
from voicetune.models.registry import NAMES


@dataclass
class Settings:
    """Decoding settings, eval.* by default: the chat decodes as the evaluate stage does."""
    max_tokens: int
    temperature: float = 0.0
    seed: int = 0
    repetition_penalty: float | None = None

    @classmethod
    def from_params(cls, params: dict, max_tokens: int | None = None,
                    temperature: float | None = None) -> "Settings":
        """eval.*, with a command line's ``--max-tokens``/``--temperature`` when given."""
        e = params["eval"]
        return cls(e["max_tokens"] if max_tokens is None else max_tokens,
                   e["temperature"] if temperature is None else temperature,
                   e["seed"], e.get("repetition_penalty"))


def stream_answer(model, tokenizer, messages: list[dict], settings: Settings, write) -> dict:
    """One answer to the conversation ``messages`` (ending with the user's turn), its text
    passed to ``write`` piece by piece as tokens arrive; returns generate_batched's record.

    The pieces add up to exactly the recorded prediction: the answer so far is decoded
    whole at every token, as the prediction is at the end, and only its new tail is written
    (none while it ends inside a multi-byte character). mlx-lm's streaming detokenizer would
    be cheaper but trims the answer's leading space, so the screen and history could differ."""
    tokens, shown = [], [""]

    def show(final: bool = False):
        text = tokenizer.decode(tokens)
        if text.startswith(shown[0]) and (final or not text.endswith("\ufffd")):
            write(text[len(shown[0]):])
            shown[0] = text

    def on_token(_, token):
        tokens.append(token)
        show()

    [answer] = generate_batched(model, tokenizer, [prompt_tokens(tokenizer, messages)],
                                settings.max_tokens, settings.temperature, settings.seed,
                                batch_size=1, repetition_penalty=settings.repetition_penalty,
                                on_token=on_token)
    show(final=True)
    return answer


def parse_models(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in NAMES]
    if not names or unknown or len(set(names)) != len(names):
        raise UserError(f"'{text}': give one or more of {', '.join(NAMES)}, comma-separated, "
                        "each once (e.g. base,lora)")
    return names
