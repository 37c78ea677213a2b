"""The BLAS under MLX on Linux: each candidate proved in a child process before this process
loads it, so a library built for another CPU cannot crash the program.

The failures are injected with stand-in libraries compiled here from C: one whose sgemm runs
an illegal instruction (ud2, as cmeel's SKYLAKEX build does on an AVX2-only CPU), one that
returns a wrong product, one that hangs, one that needs a shared library that is missing
(libgfortran5's case), a file that is no library, and a path that does not exist. The
emulated-CPU test runs the real libraries on an x86-64 CPU without AVX-512 (QEMU, Haswell).
"""
import ctypes
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from voicetune.core import blas

from tests.conftest import ROOT, unavailable

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="macOS keeps MLX's own BLAS (Accelerate)")

STANDIN_C = r"""
#include <signal.h>
#include <unistd.h>
#ifdef CONFIG
const char *openblas_get_config(void) { return CONFIG; }
const char *openblas_get_corename(void) { return CORE; }
#endif
#ifdef NEEDS
void dependency_symbol(void);
#endif
void cblas_sgemm(int order, int ta, int tb, int m, int n, int k, float alpha, const float *a,
                 int lda, const float *b, int ldb, float beta, float *c, int ldc) {
#if defined(KIND_SIGILL)
#  if defined(__x86_64__)
    __asm__ volatile("ud2");  /* what an AVX-512 instruction does on a CPU without it */
#  else
    raise(SIGILL);
#  endif
#elif defined(KIND_WRONG)
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++)
            c[order == 101 ? i * ldc + j : j * ldc + i] = 0.0f;
#elif defined(KIND_HANG)
    for (;;) pause();
#elif defined(NEEDS)
    dependency_symbol();
#endif
}
"""
CMEEL_LIKE = ['-DCONFIG="OpenBLAS 0.3.31 NO_AFFINITY SKYLAKEX MAX_THREADS=4"', '-DCORE="SKYLAKEX"']


def compiler() -> str:
    found = shutil.which("cc") or shutil.which("gcc")
    if found is None:
        unavailable("no C compiler for the stand-in libraries (.ci/run installs gcc)")
    return found


@pytest.fixture(scope="module")
def standins(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("standins")
    source = folder / "standin.c"
    source.write_text(STANDIN_C)
    cc = compiler()

    def build(name, *flags, extra=()):
        out = folder / f"lib{name}.so"
        subprocess.run([cc, "-shared", "-fPIC", "-O1", *flags, "-o", str(out), str(source), *extra],
                       check=True, capture_output=True)
        return str(out)

    (folder / "dep.c").write_text("void dependency_symbol(void) {}\n")
    dep = folder / "libvoicetunedep.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(dep), str(folder / "dep.c")], check=True)
    paths = {"sigill": build("sigill", "-DKIND_SIGILL", *CMEEL_LIKE),
             "wrong": build("wrong", "-DKIND_WRONG"),
             "hang": build("hang", "-DKIND_HANG"),
             "needs": build("needs", "-DNEEDS", extra=(f"-L{folder}", "-lvoicetunedep"))}
    dep.unlink()  # a library it was linked against, now missing: libgfortran5's case
    (folder / "libnotalib.so").write_text("not an ELF file\n")
    paths["notalib"] = str(folder / "libnotalib.so")
    paths["missing"] = str(folder / "libmissing.so")
    return paths


def real_candidates() -> list[blas.Candidate]:
    found = [c for c in blas.candidates() if c.name != "VOICETUNE_BLAS"]
    if not found:
        pytest.fail("no OpenBLAS candidate installed: make setup installs ngsolve-openblas / cmeel-openblas")
    return found


def mapped_libraries(pid_maps: str) -> set[str]:
    return {line.split()[-1] for line in pid_maps.splitlines() if line.count("/") and ".so" in line}


@linux_only
def test_the_good_library_is_chosen_every_rejection_has_its_reason_and_none_is_loaded(
        standins, tmp_path):
    order = ["sigill", "wrong", "hang", "needs", "notalib", "missing"]
    env = dict(os.environ, VOICETUNE_BLAS=os.pathsep.join(standins[k] for k in order),
               VOICETUNE_CACHE_DIR=str(tmp_path / "cache"), VOICETUNE_BLAS_PROBE_TIMEOUT="15")
    env.pop("VOICETUNE_NO_OPENBLAS", None)
    script = """
import json, numpy as np
import voicetune
from voicetune.core import blas
import mlx.core as mx
a = np.random.default_rng(1).standard_normal((150, 130)).astype(np.float32)
err = float(np.abs(np.array(mx.array(a) @ mx.array(a.T)) - a.astype(np.float64) @ a.T).max())
print(json.dumps({"loaded": blas.loaded, "error": err, "maps": open("/proc/self/maps").read(),
                  "rejected": [[c.path, v.reason] for c, v in blas.chosen.rejected]}))
"""
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    assert os.path.realpath(out["loaded"]) == os.path.realpath(real_candidates()[0].path)
    assert out["error"] < 1e-3
    reasons = dict(out["rejected"])
    assert list(reasons) == [standins[k] for k in order]
    assert "killed by SIGILL" in reasons[standins["sigill"]]
    assert "built for SKYLAKEX only, not DYNAMIC_ARCH" in reasons[standins["sigill"]]
    assert reasons[standins["wrong"]].startswith("wrong matmul: relative error 1 ")
    assert "did not finish in 15 s" in reasons[standins["hang"]]
    assert "libvoicetunedep.so: cannot open shared object file" in reasons[standins["needs"]]
    assert "the probe failed" in reasons[standins["notalib"]]
    assert "No such file or directory" in reasons[standins["missing"]]
    # the parent never mapped any of them; it did map the one it chose
    maps = mapped_libraries(out["maps"])
    assert not maps & {os.path.realpath(p) for p in standins.values()}
    assert os.path.realpath(out["loaded"]) in maps
    # each new rejection is said once, as it is found, naming the library and the reason
    for key in ("sigill", "wrong", "hang"):
        assert proc.stderr.count(f"({standins[key]}) rejected:") == 1, proc.stderr


@linux_only
def test_a_sigill_names_the_missing_instructions_of_a_one_core_build(standins):
    verdict = blas.probe(blas.Candidate("cmeel-like", standins["sigill"]), threads=2,
                         flags={"avx", "avx2", "fma", "f16c"})
    assert not verdict.ok and verdict.core == "SKYLAKEX"
    assert verdict.reason == (
        "the probe was killed by SIGILL (Illegal instruction): the library runs instructions "
        "this CPU lacks (built for SKYLAKEX only, not DYNAMIC_ARCH; this CPU has no "
        "avx512bw, avx512cd, avx512dq, avx512f, avx512vl)")


class Recorder:
    """Wraps the real probe and records which candidates it was asked to prove."""

    def __init__(self):
        self.probed: list[str] = []

    def __call__(self, candidate, threads, flags=None):
        self.probed.append(Path(candidate.path).name)
        return blas.probe(candidate, threads, flags=flags)


@linux_only
def test_verdicts_are_cached_and_redone_when_the_file_the_cpu_the_threads_or_the_probe_change(
        standins, tmp_path, monkeypatch):
    cache = tmp_path / "verdicts.json"
    found = [blas.Candidate("sigill", standins["sigill"]), real_candidates()[0]]
    good = Path(found[1].path).name

    def choose(**kw):
        rec = Recorder()
        kw = {"threads": 2, "cpu": "cpu A", **kw}
        choice = blas.choose(found, cache=cache, prober=rec, **kw)
        assert choice.candidate == found[1], choice.rejected
        return rec.probed, choice

    probed, first = choose()
    assert probed == ["libsigill.so", good] and not any(v.cached for _, v in first.examined)
    probed, again = choose()
    assert probed == [] and all(v.cached for _, v in again.examined)
    assert again.rejected[0][1].reason == first.rejected[0][1].reason
    assert choose(cpu="cpu B")[0] == ["libsigill.so", good]
    assert choose(threads=3)[0] == ["libsigill.so", good]
    original = os.environ.get("OPENBLAS_CORETYPE")  # some machines set it (see the env notes)
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Zen" if original == "Haswell" else "Haswell")
    assert choose()[0] == ["libsigill.so", good]  # other kernels from the same file
    if original is None:
        monkeypatch.delenv("OPENBLAS_CORETYPE")
    else:
        monkeypatch.setenv("OPENBLAS_CORETYPE", original)
    os.utime(standins["sigill"], ns=(1, 1))  # another file at the same path
    assert choose()[0] == ["libsigill.so"]
    monkeypatch.setattr(blas, "PROBE_VERSION", blas.PROBE_VERSION + 1)
    assert choose()[0] == ["libsigill.so", good]


@linux_only
def test_a_broken_or_unwritable_cache_only_means_probing_again(standins, tmp_path):
    found = [blas.Candidate("wrong", standins["wrong"])]
    cache = tmp_path / "verdicts.json"
    cache.write_text('{"probe_version": %d, "verdicts": {"x": 3}' % blas.PROBE_VERSION)  # torn
    rec = Recorder()
    assert blas.choose(found, cache=cache, prober=rec, threads=2).candidate is None
    assert rec.probed == ["libwrong.so"] and json.loads(cache.read_text())["verdicts"]
    key = next(iter(json.loads(cache.read_text())["verdicts"]))
    cache.write_text(json.dumps({"probe_version": blas.PROBE_VERSION, "verdicts": {key: [1, 2]}}))
    rec = Recorder()
    blas.choose(found, cache=cache, prober=rec, threads=2)
    assert rec.probed == ["libwrong.so"]
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    rec = Recorder()
    choice = blas.choose(found, cache=blocked / "verdicts.json", prober=rec, threads=2)
    assert rec.probed == ["libwrong.so"] and choice.rejected[0][1].reason.startswith("wrong matmul")


def test_threads_follow_openblas_num_threads_else_every_usable_core(monkeypatch):
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    assert blas.blas_threads() == 1
    monkeypatch.delenv("OPENBLAS_NUM_THREADS")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert blas.blas_threads() == usable


@linux_only
def test_the_chosen_library_runs_on_this_cpu_with_its_threads_correct_and_fast():
    assert blas.loaded is not None, f"no OpenBLAS: {blas.failure}"
    v = blas.chosen.verdict
    flags = blas.cpu_flags()
    core = (v.core or "").upper()
    assert core, v
    if core in ("SKYLAKEX", "COOPERLAKE", "SAPPHIRERAPIDS"):
        assert "avx512f" in flags, f"{core} kernels chosen on a CPU without avx512f"
    assert blas.CORE_NEEDS.get(core, set()) <= flags
    if "OPENBLAS_NUM_THREADS" not in os.environ:
        assert v.threads == blas.blas_threads()  # no cap below the cores this process may use
    import mlx.core as mx

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(96, 64)).astype(np.float32), rng.normal(size=(64, 80)).astype(np.float32)
    assert np.allclose(np.array(mx.array(a) @ mx.array(b)), a @ b, atol=1e-4)
    assert blas.matmul_gflops() > blas.SLOW_GFLOPS


@linux_only
def test_metrics_record_the_blas_without_machine_paths():
    from voicetune.core.environment import versions

    env = versions()
    lib = ctypes.CDLL(blas.loaded)  # the loaded library itself, asked directly
    for name in ("openblas_get_config", "openblas_get_corename"):
        getattr(lib, name).restype = ctypes.c_char_p
    version = lib.openblas_get_config().decode().split()[1]  # "OpenBLAS 0.3.33 DYNAMIC_ARCH ..."
    assert env["blas"].endswith(f" {version}") and "/" not in env["blas"]
    assert env["blas_core"] == lib.openblas_get_corename().decode()
    assert env["blas_threads"] == lib.openblas_get_num_threads()


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() != "x86_64" or not sys.platform.startswith("linux"),
                    reason="emulates an x86-64 CPU")
def test_on_an_emulated_cpu_without_avx512_the_one_core_build_is_rejected_and_mlx_still_computes(
        tmp_path):
    """QEMU's user-mode emulator as a Haswell (AVX2, FMA; no AVX-512): the real cmeel-openblas
    build dies there by SIGILL, as on AMD Zen 1-3 and Intel client CPUs, and a DYNAMIC_ARCH
    OpenBLAS picks a kernel that runs."""
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        unavailable("qemu-x86_64 not installed (apt-get install qemu-user; .ci/run installs it)")
    cmeel = [c.path for c in blas.candidates() if c.name.startswith("cmeel")]
    assert cmeel, "cmeel-openblas is a Linux dependency"
    emulate = [qemu, "-cpu", "Haswell"]
    env = dict(os.environ, VOICETUNE_BLAS=cmeel[0], VOICETUNE_CACHE_DIR=str(tmp_path),
               VOICETUNE_BLAS_PROBE_WRAPPER=" ".join(emulate), VOICETUNE_BLAS_PROBE_TIMEOUT="240")
    for forced in ("OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE"):  # the library's own CPU detection
        env.pop(forced, None)
    script = """
import json, numpy as np
import voicetune
from voicetune.core import blas
import mlx.core as mx
a = np.random.default_rng(1).standard_normal((120, 100)).astype(np.float32)
err = float(np.abs(np.array(mx.array(a) @ mx.array(a.T)) - a.astype(np.float64) @ a.T).max())
print(json.dumps({"describe": blas.describe(), "config": blas.chosen.verdict.config, "error": err,
                  "rejected": [[c.path, v.reason] for c, v in blas.chosen.rejected]}))
"""
    proc = subprocess.run([*emulate, sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert [p for p, _ in out["rejected"]] == [cmeel[0]]
    assert "killed by SIGILL" in out["rejected"][0][1]
    assert "DYNAMIC_ARCH" in out["config"]
    assert out["describe"]["blas_core"].upper() in ("HASWELL", "ZEN")
    assert out["error"] < 1e-3


def test_slow_blas_warning(monkeypatch, capsys):
    monkeypatch.setattr(blas, "matmul_gflops", lambda: 5.0)
    monkeypatch.setattr(blas, "loaded", None)
    monkeypatch.setattr(blas, "chosen", None)
    monkeypatch.setattr(blas, "failure", "libgfortran.so.5: cannot open shared object file")
    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        pytest.skip("the check concerns MLX's CPU backend")
    assert blas.check() == 5.0
    err = capsys.readouterr().err
    assert "WARNING: MLX float32 matmul runs at 5.0 GFLOP/s" in err and "libgfortran5" in err
    assert "libopenblas0-pthread" in err and "make blas" in err


@linux_only
def test_make_blas_marks_the_loaded_library_chosen_and_times_every_good_one(capsys):
    from voicetune.tools import blas_report

    assert blas_report.main(["--measure", "1"]) == 0
    out = capsys.readouterr().out
    chosen_rows = [line for line in out.splitlines() if "| chosen |" in line]
    assert len(chosen_rows) == 1 and f"`{blas.loaded}`" in chosen_rows[0]
    timed = [line for line in out.split("GFLOP/s (median of 1 interleaved rounds):")[1].splitlines()
             if line.startswith("| ") and "candidate" not in line]
    assert len(timed) == out.count("| chosen |") + out.count("| ok |") >= 1
    for row in timed:
        rates = [float(x) for x in row.strip("|").split("|")[1:]]
        assert len(rates) == 3 and min(rates) > 0, row


@linux_only
def test_without_gxx_the_run_says_mlx_compiles_nothing_and_records_it(monkeypatch, capsys, tmp_path):
    from voicetune.core.environment import versions

    recorded = versions()["mlx_cpu_compiler"]
    assert recorded.startswith("g++ ") if shutil.which("g++") else recorded == "none (uncompiled)"
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH with no compiler on it
    monkeypatch.setattr(blas, "matmul_gflops", lambda: 300.0)
    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        pytest.skip("the check concerns MLX's CPU backend")
    blas.check(verbose=False)
    assert "no g++ on PATH: MLX runs its compiled CPU functions uncompiled" in capsys.readouterr().err
    assert versions()["mlx_cpu_compiler"] == "none (uncompiled)"


@linux_only
def test_each_rank_under_mlx_launch_runs_its_share_of_the_cores():
    from voicetune.train.distributed import launch_command

    cmd = launch_command(["stages/train.py"], np=2, hostfile=None)
    share = max(1, (os.cpu_count() or 1) // 2)
    assert cmd[cmd.index("--env") + 1] == f"OPENBLAS_NUM_THREADS={share}"
    assert "--env" not in launch_command(["stages/train.py"], np=None, hostfile="hosts.json")
    # and a process started that way loads the library with that many threads, not its default
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", "import json, voicetune.core.blas as b; print(json.dumps(b.describe()))"],
                         env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    assert json.loads(out.stdout.splitlines()[-1])["blas_threads"] == 1
