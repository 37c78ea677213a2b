"""The library versions that produced a run, recorded in its metrics.

Byte-identical outputs need the same versions (the code also uses mlx-lm internals), so
each stage that computes with MLX writes these into its metrics file: `dvc metrics diff`
then shows an environment change next to the figures it moved. `make setup` installs the
versions of requirements.lock.
"""
from __future__ import annotations

import platform
import sys
from importlib import metadata

from voicetune.core import blas

# What decides the numbers: the array library and its kernels, the model/tokenizer code,
# numpy (batching, bootstrap), and what reads the data.
PACKAGES = ("mlx", "mlx-lm", "numpy", "tokenizers", "transformers", "huggingface-hub",
            "safetensors", "dvc")


def versions(packages=PACKAGES) -> dict[str, object]:
    """``{"python": "3.11.7", "platform": "Linux-x86_64", "mlx": "0.32.4", ...}``;
    a package that is not installed is recorded as ``"not installed"``. Then the BLAS that
    MLX's CPU matmuls ran on (library and version, the core its kernels were chosen for, its
    threads): a different one may move the last digits of every float; and the compiler MLX's
    CPU ``mx.compile`` uses (none: compiled functions run uncompiled, slower)."""
    found = {"python": platform.python_version(),
             "platform": f"{platform.system()}-{platform.machine()}"}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    if sys.platform.startswith("linux"):  # MLX's CPU backend; Metal compiles its own kernels
        found["mlx_cpu_compiler"] = blas.cpu_compiler() or "none (uncompiled)"
    return found | blas.describe()
