"""MLX on Linux runs on a real BLAS, loaded by the package before mlx itself."""
import sys

import numpy as np
import pytest

from voicetune import blas


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="macOS keeps MLX's own BLAS")
def test_openblas_is_loaded_before_mlx():
    assert blas.loaded is not None, f"no OpenBLAS: {blas.failure}"
    assert "libopenblas" in blas.loaded


def test_matmul_through_the_swapped_blas_is_correct():
    import mlx.core as mx

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(96, 64)).astype(np.float32), rng.normal(size=(64, 80)).astype(np.float32)
    assert np.allclose(np.array(mx.array(a) @ mx.array(b)), a @ b, atol=1e-4)


def test_slow_blas_warning(monkeypatch, capsys):
    monkeypatch.setattr(blas, "matmul_gflops", lambda: 5.0)
    monkeypatch.setattr(blas, "loaded", None)
    monkeypatch.setattr(blas, "failure", "libgfortran.so.5: cannot open shared object file")
    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        pytest.skip("the check concerns MLX's CPU backend")
    assert blas.check() == 5.0
    err = capsys.readouterr().err
    assert "WARNING: MLX float32 matmul runs at 5.0 GFLOP/s" in err and "libgfortran5" in err
