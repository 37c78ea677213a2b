"""A fast BLAS for MLX's CPU backend on Linux.

The mlx[cpu] wheel links a reference BLAS (~5 GFLOP/s float32 matmul on 2 cores). Loading a
real OpenBLAS with RTLD_GLOBAL *before* mlx is imported makes mlx resolve cblas_* to it
(~150-190 GFLOP/s, LoRA training ~20x faster). OpenBLAS comes from the PyPI wheel
cmeel-openblas (a dependency on Linux), or Debian's libopenblas0-pthread; both need the
system's libgfortran5, which `make setup` installs. macOS (Accelerate/Metal) is untouched.
"""
from __future__ import annotations

import ctypes
import glob
import os
import sys
import sysconfig
import time

_CANDIDATES = [
    os.path.join(sysconfig.get_paths()["purelib"], "cmeel.prefix", "lib", "libopenblas.so.0"),
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    *sorted(glob.glob("/usr/lib*/libopenblas*.so.0")),
]
SLOW_GFLOPS = 30.0  # the reference BLAS reaches ~5; any real BLAS is far above this

loaded: str | None = None  # path of the OpenBLAS in use, if any
failure: str | None = None  # why none could be loaded


def preload() -> str | None:
    """Load OpenBLAS globally (Linux only, before mlx); return its path or None."""
    global loaded, failure
    if loaded or not sys.platform.startswith("linux") or os.environ.get("VOICETUNE_NO_OPENBLAS"):
        return loaded
    if "mlx.core" in sys.modules:
        failure = "mlx was imported before voicetune, too late to swap its BLAS"
        return None
    errors = []
    for path in _CANDIDATES:
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                loaded = path
                return loaded
            except OSError as err:
                errors.append(str(err))
    failure = "; ".join(errors) or "no OpenBLAS library found"
    return None


def matmul_gflops(n: int = 1024, repeats: int = 7) -> float:
    """Median float32 matmul rate of MLX on this machine, in GFLOP/s."""
    import mlx.core as mx

    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a @ b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(a @ b)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / sorted(times)[len(times) // 2] / 1e9


def check(verbose: bool = True) -> float | None:
    """Measure MLX's CPU matmul; warn loudly when it runs on the slow reference BLAS."""
    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        return None
    rate = matmul_gflops()
    if rate < SLOW_GFLOPS and loaded:
        print(f"warning: MLX float32 matmul measured {rate:.1f} GFLOP/s although OpenBLAS is "
              f"loaded ({loaded}): is the machine busy?", file=sys.stderr, flush=True)
    elif rate < SLOW_GFLOPS:
        print(
            "\n" + "!" * 78 + f"\nWARNING: MLX float32 matmul runs at {rate:.1f} GFLOP/s: the slow "
            "reference BLAS.\nTraining will be ~20x slower than it should. "
            f"OpenBLAS could not be loaded: {failure}.\nFix: install libgfortran5 "
            "(Debian/Ubuntu: apt-get install libgfortran5; `make setup` does it as root).\n"
            + "!" * 78, file=sys.stderr, flush=True)
    elif verbose:
        print(f"BLAS: {rate:.0f} GFLOP/s float32 matmul ({loaded or 'native'})")
    return rate
