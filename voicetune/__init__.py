"""voicetune: fine-tune an instruct LLM on one person's writing (MLX LoRA + DVC).

Each module holds one idea; the scripts in ``stages/`` are thin wrappers that read
``params.yaml``, call into this package and write their outputs atomically.
"""

# Before anything imports mlx: give MLX's CPU backend a real BLAS on Linux (see blas.py).
from voicetune.core import blas as _blas

_blas.preload()
