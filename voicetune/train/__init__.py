"""train: LoRA training, SFT and preference (DPO, ORPO), in one loop.

``loop`` is the loop (validation, early stopping, non-finite losses, checkpoints, exact
resume, several processes), with the objective passed in; ``sft`` and ``preference`` are
the objectives (a loss, its batches, a validation), ``pairs`` reads the preference pairs.
Beside them, one idea each: ``batching``, ``early_stopping``, ``checkpoint``, ``outputs``
(a stage's outputs, changed only on success) and ``distributed`` (``mlx.launch``).

May import ``voicetune.core``, ``voicetune.models`` and ``voicetune.data``; never
``evaluate``, ``serve``, ``export`` or ``tools``.
"""
