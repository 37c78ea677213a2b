"""The model itself: where it comes from, how it is adapted, fused and run.

Owns the source fingerprint and base-model materialization (``source``, ``base_model``,
``from_gguf``), the chat template (``chat_template``), LoRA targets (``lora``), fusing
(``fusion``), batched generation (``generation``), the memory estimate (``memory``), the
model registry (``registry``: base, lora, fused, dpo: which weights, which adapters) and its
models loaded on demand for the chat and the arena (``loader``). Imports ``core`` only.
"""
