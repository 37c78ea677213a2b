"""Run the train stage data-parallel on several processes or machines, with MLX's own
distributed layer (``mx.distributed``) launched by ``mlx.launch`` (the command line:
``voicetune.tools.distributed``).

Each process trains on its rows of every batch (train.batch_size must divide evenly);
gradients are combined as one batch's, so the same global batch and seed give the same
losses as one process (up to float rounding; dropout masks are drawn per process). Only rank
0 writes outputs. See the README for a two-Mac hostfile.

``mlx.launch`` exits 0 even when a rank fails (it stops the others, which then fail on the
lost connection): this wrapper watches for that and exits non-zero.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

RANK_FAILED = re.compile(r"Node with rank (\d+) (exited with code (-?\d+)|was killed)")


def launch_command(script: list[str], np: int | None, hostfile: str | None,
                   backend: str = "ring") -> list[str]:
    launcher = shutil.which("mlx.launch", path=os.path.dirname(sys.executable)) or "mlx.launch"
    cmd = [launcher, "--backend", backend]
    if hostfile:
        cmd += ["--hostfile", hostfile]
    else:
        # processes on this machine share its cores: one BLAS thread each avoids oversubscription
        threads = max(1, (os.cpu_count() or 1) // np)
        cmd += ["--hosts", "127.0.0.1", "-n", str(np), "--env", f"OPENBLAS_NUM_THREADS={threads}"]
    return [*cmd, "--", sys.executable, *script]


def run(cmd: list[str]) -> int:
    """Run ``mlx.launch``, pass its output through, and return non-zero if any rank failed."""
    failures, tail = [], ""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        while chunk := proc.stdout.read1(65536):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            text = tail + chunk.decode(errors="replace")  # a line may straddle two chunks
            failures += RANK_FAILED.findall(text)
            tail = text[-200:]
    failed = sorted({int(rank) for rank, *_ in failures})
    if proc.returncode or failed:
        print(f"\ndistributed training failed: rank(s) {', '.join(map(str, failed)) or '?'} "
              f"did not finish (mlx.launch exit code {proc.returncode}); see the log above",
              file=sys.stderr)
        return proc.returncode or 1
    return 0
