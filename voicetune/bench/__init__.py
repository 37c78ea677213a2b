"""Benchmarks that print figures: LoRA training and generation speed, MLX against
PyTorch + PEFT (``training`` runs it: ``workers`` measure in their own processes, ``ceiling``
bounds them, ``kernel_timing`` times the fast kernels and profiles a step, ``summary`` turns
runs into figures; ``torch_peft`` is PyTorch's side), batched generation (``generation``).

Tool-level: run through ``voicetune.tools``; nothing in the library imports it. It may import
every library room and ``fixtures``.
"""
