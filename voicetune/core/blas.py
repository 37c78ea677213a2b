"""A BLAS for MLX's CPU backend on Linux that cannot crash the program.

The mlx[cpu] wheel links a reference BLAS (~5 GFLOP/s float32 matmul on 2 cores). Loading a
real OpenBLAS with RTLD_GLOBAL *before* mlx is imported makes mlx resolve ``cblas_*`` (and
LAPACK) to it: 150-330 GFLOP/s, LoRA training ~20x faster. But a BLAS built for one core
type dies with SIGILL on a CPU that lacks its instructions (cmeel-openblas is SKYLAKEX only:
every matmul on an AVX2-only CPU kills the process), so no library is loaded here on trust:

1. The candidates, in order of preference (``candidates()``): the library ``VOICETUNE_BLAS``
   names; ngsolve-openblas (PyPI, x86-64; OpenBLAS built ``DYNAMIC_ARCH``: it picks a kernel
   for the CPU at run time); the system's ``DYNAMIC_ARCH`` OpenBLAS (Debian/Ubuntu
   ``libopenblas0-pthread``, Fedora's ``openblas-pthreads``); cmeel-openblas (one core type).
2. Each is proved in a child process first (``probe``): load it as MLX will see it, run
   MLX's float32 matmul and a LAPACK inverse on several threads, compare with numpy in
   float64. A child killed by a signal, a wrong product, an error or a time-out rejects the
   candidate, with the reason; the first that passes is loaded here. None passing leaves
   MLX's reference BLAS, with a loud warning (``check``).
3. Verdicts are cached (``cache_file()``) by the library file's identity, the CPU's model and
   flags, the thread count and ``PROBE_VERSION``, so a stage pays a few milliseconds, not a
   probe; a change to any of them probes again.

Threads: ``OPENBLAS_NUM_THREADS`` if set (``voicetune.train.distributed`` sets it per rank), else
every core this process may run on. macOS (Accelerate/Metal) is untouched.
``python -m voicetune.tools.blas_report`` (``make blas``) probes every candidate and prints what
each one measured.
"""
from __future__ import annotations

import ctypes
import glob
import hashlib
import importlib.util
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from voicetune.core.files import write_json_atomic

PROBE_VERSION = 1  # bump when the probe below changes what it proves: every verdict is redone
PROBE_TIMEOUT_S = 60.0  # a candidate whose probe runs longer is taken as hanging
SLOW_GFLOPS = 30.0  # the reference BLAS reaches ~5; any real BLAS is far above this

# What an OpenBLAS core's kernels need, for naming the cause when a probe dies by SIGILL.
# (DYNAMIC_ARCH builds choose among these at run time; a one-core build needs its core's.)
CORE_NEEDS = {
    "SKYLAKEX": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"},
    "COOPERLAKE": {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"},
    "SAPPHIRERAPIDS": {"avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_fp16"},
    "ZEN": {"avx2", "fma"},
    "HASWELL": {"avx2", "fma"},
    "SANDYBRIDGE": {"avx"},
    "NEOVERSEN2": {"sve", "sve2", "bf16"},  # cmeel-openblas's aarch64 build
    "NEOVERSEV1": {"sve", "bf16"},
    "NEOVERSEV2": {"sve", "sve2", "bf16"},
    "ARMV8SVE": {"sve"},
    "A64FX": {"sve"},
}

# Run in a fresh interpreter (python -P -c), never importing voicetune: it loads one library
# as voicetune would, then lets MLX compute through it. It prints the library's own words
# about itself first, so that a probe killed in sgemm still says what it was.
_PROBE = r"""
import ctypes, json, sys, time
path, threads = sys.argv[1], int(sys.argv[2])
lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
def text(name):
    f = getattr(lib, name, None)
    if f is None:
        return None
    f.restype = ctypes.c_char_p
    return f().decode(errors="replace").strip()
setter = getattr(lib, "openblas_set_num_threads", None)
if setter is not None:
    setter(threads)
getter = getattr(lib, "openblas_get_num_threads", None)
about = {"config": text("openblas_get_config"), "core": text("openblas_get_corename"),
         "threads": getter() if getter is not None else None}
print(json.dumps({"about": about}), flush=True)
import numpy as np
import mlx.core as mx
mx.set_default_device(mx.cpu)
rng = np.random.default_rng(0)
worst = 0.0
# sizes past OpenBLAS's threshold for threading (m*n*k > 262144), small enough for an emulator
for m, k, n, transpose in ((97, 131, 113, False), (128, 96, 80, True), (160, 144, 120, False)):
    a = rng.standard_normal((k, m) if transpose else (m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    x = mx.array(a).T if transpose else mx.array(a)
    got = np.array(x @ mx.array(b), dtype=np.float64)
    want = (a.T if transpose else a).astype(np.float64) @ b.astype(np.float64)
    worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
s = rng.standard_normal((64, 64)).astype(np.float32) + 16 * np.eye(64, dtype=np.float32)
inv = np.array(mx.linalg.inv(mx.array(s), stream=mx.cpu), dtype=np.float64)
inverse_error = float(np.abs(inv @ s.astype(np.float64) - np.eye(64)).max())
a, b = mx.random.normal((256, 256)), mx.random.normal((256, 256))
mx.eval(a @ b)
times, begun = [], time.perf_counter()
while len(times) < 25 and (not times or time.perf_counter() - begun < 0.2):
    start = time.perf_counter()
    mx.eval(a @ b)
    times.append(time.perf_counter() - start)
gflops = 2 * 256 ** 3 / min(times) / 1e9  # the best: a tiny product's median is noise
print(json.dumps({"result": {"matmul_error": worst, "inverse_error": inverse_error,
                             "gflops": round(gflops, 1)}}), flush=True)
"""
MATMUL_TOLERANCE = 1e-4  # float32 sums of a few hundred terms: ~1e-6 relative when right
INVERSE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Candidate:
    name: str  # where it comes from, e.g. "ngsolve-openblas (PyPI)"
    path: str


@dataclass
class Verdict:
    ok: bool
    reason: str = ""  # why it was rejected; "" when ok
    config: str | None = None  # openblas_get_config(): version, DYNAMIC_ARCH or one core, MAX_THREADS
    core: str | None = None  # openblas_get_corename(): the kernels it runs on this CPU
    threads: int | None = None
    gflops: float | None = None  # MLX's float32 matmul through it, in the probe
    probe_s: float = 0.0  # how long the child took
    cached: bool = False  # read from the cache rather than probed now


@dataclass
class Choice:
    candidate: Candidate | None  # None: MLX keeps its reference BLAS
    verdict: Verdict | None
    examined: list[tuple[Candidate, Verdict]] = field(default_factory=list)  # in order
    seconds: float = 0.0  # the whole choice: cache look-ups plus any probes

    @property
    def rejected(self) -> list[tuple[Candidate, Verdict]]:
        return [(c, v) for c, v in self.examined if not v.ok]


loaded: str | None = None  # path of the library MLX computes with, if any
chosen: Choice | None = None
failure: str | None = None  # why none was loaded


def _multiarch() -> str:
    return sysconfig.get_config_var("MULTIARCH") or f"{platform.machine()}-linux-gnu"


def _package_libraries(package: str, pattern: str) -> list[str]:
    # find_spec does not import: ngsolve_openblas's __init__ would load its library unprobed
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return []
    folder = next(iter(spec.submodule_search_locations))
    return sorted(glob.glob(os.path.join(folder, pattern)))


def candidates() -> list[Candidate]:
    """The libraries to try, best first, each once (by real path), existing or named."""
    found = [Candidate("VOICETUNE_BLAS", p)  # the user's own, first: a list like PATH's
             for p in os.environ.get("VOICETUNE_BLAS", "").split(os.pathsep) if p]
    found += [Candidate("ngsolve-openblas (PyPI, DYNAMIC_ARCH)", p)
              for p in _package_libraries("ngsolve_openblas", "libopenblas*.so*")]
    system = [f"/usr/lib/{_multiarch()}/openblas-pthread/libopenblas.so.0",  # Debian, Ubuntu
              f"/usr/lib/{_multiarch()}/openblas-openmp/libopenblas.so.0",
              "/usr/lib64/libopenblasp.so.0", "/usr/lib64/libopenblaso.so.0",  # Fedora, RHEL
              "/usr/lib/libopenblas.so.0", "/usr/lib64/libopenblas.so.0"]  # Arch, others
    found += [Candidate("system OpenBLAS", p) for p in system if os.path.exists(p)]
    cmeel = os.path.join(sysconfig.get_paths()["purelib"], "cmeel.prefix", "lib", "libopenblas.so.0")
    if os.path.exists(cmeel):
        found.append(Candidate("cmeel-openblas (PyPI, one core type)", cmeel))
    unique, seen = [], set()
    for c in found:
        real = os.path.realpath(c.path)
        if real not in seen:
            seen.add(real)
            unique.append(c)
    return unique


def cpu_identity() -> str:
    """The CPU as a BLAS sees it: its model and instruction-set flags (the first processor's)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    first = text.split("\n\n")[0]
    keep = ("model name", "flags", "Features", "CPU implementer", "CPU part", "vendor_id")
    lines = sorted(line for line in first.splitlines() if line.split(":")[0].strip() in keep)
    return "\n".join([platform.machine(), *lines])


def cpu_flags(identity: str | None = None) -> set[str]:
    flags: set[str] = set()
    for line in (identity or cpu_identity()).splitlines():
        if line.split(":")[0].strip() in ("flags", "Features"):
            flags |= set(line.split(":", 1)[1].split())
    return flags


def blas_threads() -> int:
    """``OPENBLAS_NUM_THREADS`` when set (one per rank under mlx.launch), else every core this
    process may run on: OpenBLAS spin-waits, so more threads than cores only slows it down."""
    try:
        return max(1, int(os.environ["OPENBLAS_NUM_THREADS"]))
    except (KeyError, ValueError):
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cache_file() -> Path:
    base = os.environ.get("VOICETUNE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "voicetune")
    return Path(base) / "blas-verdicts.json"


def verdict_key(candidate: Candidate, threads: int, cpu: str) -> str:
    """The file's identity (real path, size, mtime, inode), the CPU, the probe's threads and
    the probe's version, and what else picks the kernels: a change to any means a new probe."""
    st = os.stat(candidate.path)
    parts = [str(PROBE_VERSION), os.path.realpath(candidate.path), str(st.st_size),
             str(st.st_mtime_ns), str(st.st_ino), cpu, str(threads),
             os.environ.get("OPENBLAS_CORETYPE", ""), sys.executable, *_probe_wrapper()]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if data.get("probe_version") == PROBE_VERSION else {}
    except (OSError, ValueError, AttributeError):
        return {}


def _cached_verdict(entry) -> Verdict | None:
    """A stored verdict, or None for a missing or malformed entry (then it is probed again)."""
    try:
        names = Verdict.__dataclass_fields__.keys()
        return Verdict(**{k: v for k, v in entry.items() if k in names} | {"cached": True})
    except (AttributeError, TypeError):
        return None


def _write_cache(path: Path, verdicts: dict) -> None:
    """Atomically, and never fatally: an unwritable cache only means probing again."""
    try:
        write_json_atomic(path, {"probe_version": PROBE_VERSION, "verdicts": verdicts})
    except OSError:
        pass


def _died_because(signum: int, about: dict, flags: set[str]) -> str:
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    reason = f"the probe was killed by {name} ({signal.strsignal(signum) or 'unknown'})"
    if signum == signal.SIGILL:
        reason += ": the library runs instructions this CPU lacks"
        config, core = about.get("config") or "", (about.get("core") or "").upper()
        missing = sorted(CORE_NEEDS.get(core, set()) - flags)
        if config and "DYNAMIC_ARCH" not in config:
            reason += f" (built for {core or 'one core type'} only, not DYNAMIC_ARCH"
            reason += f"; this CPU has no {', '.join(missing)})" if missing else ")"
    return reason


def _probe_wrapper() -> list[str]:
    """``VOICETUNE_BLAS_PROBE_WRAPPER``: a command to run the probe under, such as an emulator
    of another CPU (``qemu-x86_64 -cpu Haswell``): what would a machine without AVX-512 get?"""
    return shlex.split(os.environ.get("VOICETUNE_BLAS_PROBE_WRAPPER", ""))


def _probe_lines(stdout: str) -> tuple[dict, dict | None]:
    """What the child said about the library, and its result if it got that far."""
    about, result = {}, None
    for line in stdout.splitlines():
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if isinstance(message, dict):
            about = message.get("about", about)
            result = message.get("result", result)
    return {k: about.get(k) for k in ("config", "core", "threads")}, result


def probe_timeout() -> float:
    """``VOICETUNE_BLAS_PROBE_TIMEOUT`` seconds (for slow emulators), else ``PROBE_TIMEOUT_S``."""
    try:
        return float(os.environ["VOICETUNE_BLAS_PROBE_TIMEOUT"])
    except (KeyError, ValueError):
        return PROBE_TIMEOUT_S


def probe(candidate: Candidate, threads: int, timeout: float | None = None,
          flags: set[str] | None = None) -> Verdict:
    """Prove ``candidate`` in a child process; this process never loads it."""
    start = time.perf_counter()
    timeout = probe_timeout() if timeout is None else timeout
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads))
    command = [*_probe_wrapper(), sys.executable, "-P", "-c", _PROBE, candidate.path, str(threads)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else err.stdout
        return Verdict(False, f"the probe did not finish in {timeout:g} s (a hang)",
                       **_probe_lines(out or "")[0], probe_s=time.perf_counter() - start)
    seconds = time.perf_counter() - start
    known, result = _probe_lines(proc.stdout)
    if proc.returncode < 0:
        reason = _died_because(-proc.returncode, known, cpu_flags() if flags is None else flags)
        return Verdict(False, reason, **known, probe_s=seconds)
    if proc.returncode != 0 or result is None:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return Verdict(False, f"the probe failed (exit code {proc.returncode}): {last[:300]}",
                       **known, probe_s=seconds)
    if not result["matmul_error"] <= MATMUL_TOLERANCE:
        return Verdict(False, f"wrong matmul: relative error {result['matmul_error']:.3g} "
                       f"(a correct one is under {MATMUL_TOLERANCE:g})", **known,
                       gflops=result["gflops"], probe_s=seconds)
    if not result["inverse_error"] <= INVERSE_TOLERANCE:
        return Verdict(False, f"wrong LAPACK inverse: error {result['inverse_error']:.3g}",
                       **known, gflops=result["gflops"], probe_s=seconds)
    return Verdict(True, **known, gflops=result["gflops"], probe_s=seconds)


def choose(found: list[Candidate], *, threads: int | None = None, cpu: str | None = None,
           cache: Path | None = None, prober=probe, every: bool = False,
           report=None) -> Choice:
    """The first candidate whose verdict (cached, else probed now) is good. ``every`` probes
    all of them (the diagnostic table); ``report(candidate, verdict)`` hears each new
    rejection as it is found. Loads nothing."""
    start = time.perf_counter()
    threads = blas_threads() if threads is None else threads
    cpu = cpu_identity() if cpu is None else cpu
    cache = cache_file() if cache is None else cache
    probe_threads = max(2, threads)  # always prove the multi-threaded code path
    stored = _read_cache(cache).get("verdicts", {})
    choice, changed = Choice(None, None), False
    for candidate in found:
        try:
            key = verdict_key(candidate, probe_threads, cpu)
        except OSError as err:
            choice.examined.append((candidate, Verdict(False, f"cannot be read: {err.strerror}")))
            continue
        verdict = None if every else _cached_verdict(stored.get(key))
        if verdict is None:
            verdict = prober(candidate, probe_threads, flags=cpu_flags(cpu))
            stored[key] = {**asdict(verdict), "path": candidate.path}
            changed = True
            if not verdict.ok and report:
                report(candidate, verdict)
        choice.examined.append((candidate, verdict))
        if verdict.ok and choice.candidate is None:
            choice.candidate, choice.verdict = candidate, verdict
            if not every:
                break
    if changed:
        stored = {k: v for k, v in stored.items() if os.path.exists(v.get("path", ""))}
        _write_cache(cache, stored)
    choice.seconds = time.perf_counter() - start
    return choice


def _say_rejected(candidate: Candidate, verdict: Verdict) -> None:
    print(f"voicetune: BLAS {candidate.name} ({candidate.path}) rejected: {verdict.reason}",
          file=sys.stderr, flush=True)


def preload() -> str | None:
    """Choose and load the BLAS (Linux only, before mlx); return its path or None."""
    global loaded, chosen, failure
    if loaded or not sys.platform.startswith("linux"):
        return loaded
    if os.environ.get("VOICETUNE_NO_OPENBLAS"):
        failure = "VOICETUNE_NO_OPENBLAS is set"
        return None
    if "mlx.core" in sys.modules:
        failure = "mlx was imported before voicetune, too late to swap its BLAS"
        return None
    chosen = choose(candidates(), report=_say_rejected)
    if chosen.candidate is None:
        failure = ("; ".join(f"{c.name}: {v.reason}" for c, v in chosen.rejected)
                   or "no OpenBLAS library found")
        return None
    try:
        lib = ctypes.CDLL(chosen.candidate.path, mode=ctypes.RTLD_GLOBAL)
    except OSError as err:  # it loaded in the probe: only a change since then gets here
        failure = f"{chosen.candidate.name}: {err}"
        chosen.candidate = chosen.verdict = None
        return None
    if hasattr(lib, "openblas_set_num_threads"):
        lib.openblas_set_num_threads(blas_threads())
        chosen.verdict.threads = lib.openblas_get_num_threads()
    loaded = chosen.candidate.path
    return loaded


def describe() -> dict[str, object]:
    """The BLAS in use, for the ``environment`` block of metrics files (no machine paths)."""
    if not sys.platform.startswith("linux"):
        return {"blas": "Accelerate" if sys.platform == "darwin" else "platform default"}
    if chosen is None or chosen.candidate is None:
        return {"blas": "reference BLAS of mlx[cpu] (slow)"}
    v = chosen.verdict
    version = (v.config or "").split(" ")[1] if (v.config or "").startswith("OpenBLAS ") else None
    name = chosen.candidate.name.split(" (")[0]
    return {"blas": f"{name} {version or os.path.basename(chosen.candidate.path)}",
            "blas_core": v.core, "blas_threads": v.threads}


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


def cpu_compiler() -> str | None:
    """The C++ compiler MLX's CPU ``mx.compile`` runs (``g++``, as ``g++ 12.2.0``), or None:
    without it MLX silently runs compiled functions uncompiled (kernels it already built and
    cached under ``$TMPDIR/mlx`` still load)."""
    if not sys.platform.startswith("linux") or shutil.which("g++") is None:
        return None
    try:
        out = subprocess.run(["g++", "-dumpfullversion"], capture_output=True, text=True, timeout=10)
        return f"g++ {out.stdout.strip()}" if out.returncode == 0 else "g++ (version unknown)"
    except (OSError, subprocess.TimeoutExpired):
        return "g++ (version unknown)"


def _thread_cap_note() -> str | None:
    v = chosen.verdict if chosen and chosen.verdict else None
    if v and v.threads and v.threads < blas_threads():
        return (f"note: {chosen.candidate.name} runs {v.threads} threads where this machine "
                f"offers {blas_threads()} ({v.config}): its build caps them")
    return None


def check(verbose: bool = True) -> float | None:
    """Measure MLX's CPU matmul; warn loudly when it runs on the slow reference BLAS, and
    name every rejected candidate with its reason."""
    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        return None
    for candidate, verdict in (chosen.rejected if chosen else []):
        print(f"BLAS: not using {candidate.name} ({os.path.basename(candidate.path)}): "
              f"{verdict.reason}{' (cached verdict; `make blas` probes again)' if verdict.cached else ''}",
              file=sys.stderr, flush=True)
    if note := _thread_cap_note():
        print(note, file=sys.stderr, flush=True)
    if sys.platform.startswith("linux") and shutil.which("g++") is None:
        print("note: no g++ on PATH: MLX runs its compiled CPU functions uncompiled (the fast "
              "path's kernels, the training step), which is slower; apt-get install g++",
              file=sys.stderr, flush=True)
    rate = matmul_gflops()
    if rate < SLOW_GFLOPS and loaded:
        print(f"warning: MLX float32 matmul measured {rate:.1f} GFLOP/s although OpenBLAS is "
              f"loaded ({loaded}): is the machine busy?", file=sys.stderr, flush=True)
    elif rate < SLOW_GFLOPS:
        print(
            "\n" + "!" * 78 + f"\nWARNING: MLX float32 matmul runs at {rate:.1f} GFLOP/s: the slow "
            "reference BLAS.\nTraining will be ~20x slower than it should. "
            f"No OpenBLAS could be used: {failure}.\nFix: install libgfortran5 and a "
            "DYNAMIC_ARCH OpenBLAS (Debian/Ubuntu: apt-get install libgfortran5 "
            "libopenblas0-pthread;\nFedora: dnf install libgfortran openblas-pthreads; "
            "`make setup` does it as root), then\n`make blas` to see each "
            "candidate's verdict.\n" + "!" * 78, file=sys.stderr, flush=True)
    elif verbose:
        d = describe()
        print(f"BLAS: {rate:.0f} GFLOP/s float32 matmul ({d['blas']}, {d.get('blas_core')} "
              f"kernels, {d.get('blas_threads')} threads)")
    return rate
