"""Taking the model out: GGUF for llama.cpp and Ollama, and the Hugging Face hub.

Owns the GGUF export with its proof (``gguf``), the model card (``model_card``) and publishing
(``publish``). Imports ``core``, ``models``, ``data`` and ``evaluate``.
"""
