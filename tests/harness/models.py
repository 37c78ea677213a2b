"""Test models' helpers shared across test folders: adapters written without training, the
questions generation is tried on, and a chat template that loses the persona."""
from __future__ import annotations

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm import load

from voicetune.core.files import write_json_atomic
from voicetune.models.lora import apply_lora

# different lengths (24 to 42 prompt tokens), more than one prefill batch of 8
MANY_QUESTIONS = [
    "Hi?", "Why reef early?", "Name a knot that holds when wet and tell me why it matters.",
    "Tide or wind?", "What is the capital of France?", "Fog?",
    "How long have you sailed the North Sea, captain, and what was your worst storm at sea?",
    "Which ferry did you command, and for how many years did you run the Harwich crossing?",
    "Tea or coffee?",
]

# The shape of the early Phi-3 template: it renders user and assistant turns only.
DROPS_SYSTEM = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{'<|im_start|>user\n' + message['content'] + '<|im_end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|im_start|>assistant\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endif %}{% endfor %}"
)


def write_adapters(model_dir, out, scale_b: float):
    """Adapters in mlx-lm's format, with lora_b set to random values times ``scale_b``."""
    model, _ = load(str(model_dir))
    mx.random.seed(1)
    config = apply_lora(model, 4, 20.0, 0.0, ["self_attn.q_proj", "self_attn.o_proj"], -1)
    weights = {k: (mx.random.normal(v.shape) * scale_b if k.endswith("lora_b") else v)
               for k, v in tree_flatten(model.trainable_parameters())}
    out.mkdir()
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    write_json_atomic(out / "adapter_config.json", config)
    return out


def tiny_model_set(base_dir, root) -> dict:
    """Every weight folder of the four models on a tiny base: adapters that change its answers,
    their fused model, and preference adapters on that (dpo), under ``root``."""
    from voicetune.models.fusion import fuse

    adapters = write_adapters(base_dir, root / "adapters", scale_b=0.05)
    fuse(base_dir, adapters, root / "fused")
    preference = write_adapters(root / "fused", root / "preference_adapters", scale_b=0.05)
    return {"base": base_dir, "adapters": adapters, "fused": root / "fused",
            "preference_adapters": preference}
