"""voicetune: fine-tune an instruct LLM on one person's writing (MLX LoRA + DVC).

The package's face: every module lives in a room (subpackage) that owns one concern — core,
models, data, train, evaluate, serve, export, project, with bench, fixtures and tools above
them — and imports only the rooms below it (docs/architecture.md, from the code). The scripts
in ``stages/`` are thin wrappers that read ``params.yaml``, call into these rooms and write
their outputs atomically.
"""

# Before anything imports mlx: give MLX's CPU backend a real BLAS on Linux (see core/blas.py).
from voicetune.core import blas as _blas

_blas.preload()
