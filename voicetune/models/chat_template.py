"""The base model's chat template: what it renders, and proof that it renders what we train on.

Every sample is formatted with the model's own template (``tokenizer.apply_chat_template``),
never with a hand-written string. Before trusting a template we render a probe conversation
and check that the system prompt survives (some real templates, e.g. an early Phi-3 one,
silently drop it), that the roles come out in order, and which special tokens mark them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from voicetune.core.errors import UserError

# Strings that no real template or dataset contains, so we can find each role's content.
_PROBE = {
    "system": "voicetune-probe-system-4f1c",
    "user": "voicetune-probe-user-8a27",
    "assistant": "voicetune-probe-assistant-c93e",
}


class ChatTemplateError(UserError, ValueError):
    pass


def messages_for(system: str, user: str, assistant: str | None = None) -> list[dict]:
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    if assistant is not None:
        msgs.append({"role": "assistant", "content": assistant})
    return msgs


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def special_tokens(tokenizer) -> list[str]:
    """Every added/special token string of the tokenizer (chat markers among them)."""
    found = {t.content for t in tokenizer.added_tokens_decoder.values()}
    found.update(tokenizer.all_special_tokens)
    return sorted((t for t in found if t), key=lambda t: (-len(t), t))


def _marker_regex(specials: list[str]) -> re.Pattern:
    return re.compile("|".join(re.escape(s) for s in specials)) if specials else re.compile(r"(?!)")


@dataclass(frozen=True)
class TemplateProfile:
    """What the template does with a [system, user, assistant] conversation."""

    markers: tuple[str, ...]  # the special tokens of a rendered conversation, in order
    end_of_turn: str | None  # the special token that closes the assistant's turn
    specials: tuple[str, ...]

    def markers_in(self, text: str) -> tuple[str, ...]:
        return tuple(_marker_regex(list(self.specials)).findall(text))


def profile_template(tokenizer) -> TemplateProfile:
    """Render a probe conversation and learn the template's markers; refuse broken templates."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            "the base model has no chat template; set model.chat_template in params.yaml "
            "to a Jinja template file (see README, 'Chat templates')"
        )
    msgs = messages_for(_PROBE["system"], _PROBE["user"], _PROBE["assistant"])
    text = render(tokenizer, msgs)
    positions = {role: text.find(probe) for role, probe in _PROBE.items()}
    if positions["system"] < 0:
        raise ChatTemplateError(
            "the base model's chat template drops the system message: the persona prompt "
            "would silently never reach the model. Set model.chat_template in params.yaml to a "
            "template that renders the system role (e.g. templates/phi3.jinja for Phi-3)"
        )
    missing = [role for role, pos in positions.items() if pos < 0]
    if missing:
        raise ChatTemplateError(f"the chat template drops the {', '.join(missing)} message(s)")
    if not positions["system"] < positions["user"] < positions["assistant"]:
        raise ChatTemplateError("the chat template reorders the system/user/assistant messages")
    specials = special_tokens(tokenizer)
    return TemplateProfile(
        markers=tuple(_marker_regex(specials).findall(text)),
        end_of_turn=end_of_turn_token(tokenizer),
        specials=tuple(specials),
    )


def end_of_turn_token(tokenizer) -> str | None:
    """The special token the template writes right after an assistant answer
    (ChatML ``<|im_end|>``, Phi-3 ``<|end|>``): generation must stop there."""
    msgs = [{"role": "user", "content": _PROBE["user"]},
            {"role": "assistant", "content": _PROBE["assistant"]}]
    text = render(tokenizer, msgs)
    pos = text.find(_PROBE["assistant"])
    if pos < 0:
        return None
    after_answer = text[pos + len(_PROBE["assistant"]):].lstrip(" ")
    m = _marker_regex(special_tokens(tokenizer)).match(after_answer)
    return m.group(0) if m else None


def check_rendered(text: str, messages: list[dict], profile: TemplateProfile) -> str | None:
    """Return why ``text`` is not a faithful rendering of ``messages``, or None if it is."""
    cursor = 0
    for msg in messages:
        pos = text.find(msg["content"], cursor)
        if pos < 0:
            return f"the {msg['role']} text does not survive rendering (or is out of order)"
        cursor = pos + len(msg["content"])
    found = profile.markers_in(text)
    if found != profile.markers:
        return f"role markers {list(found)} differ from the template's {list(profile.markers)}"
    return None
