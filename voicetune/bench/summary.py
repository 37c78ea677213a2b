"""The benchmark's figures from its raw runs (medians, ratios, efficiency, targets) and the
tables it prints."""
from __future__ import annotations

import statistics

from voicetune.bench.ceiling import CeilingError, efficiency
from voicetune.bench.workers import FASTPATH, FRAMEWORKS


def _ratio(runs: dict, a: str, b: str) -> float | None:
    """Median of the per-repeat ratios a/b of tokens/s (each repeat ran them back to back)."""
    pairs = list(zip(runs.get(a, []), runs.get(b, [])))
    if not pairs:
        return None
    return statistics.median(x["tokens_per_s"] / y["tokens_per_s"] for x, y in pairs)


def summarize_train(runs: dict, ceiling: dict, label: str, notes: list[str]) -> dict:
    """Medians per framework, efficiency against ``ceiling`` (None, with the reason in
    ``notes``, where it would exceed 100%), and the ratios fast/torch, stock/torch,
    fast/stock."""
    out = {}
    for framework, results in runs.items():
        if not results:
            continue
        tps = statistics.median(r["tokens_per_s"] for r in results)
        out[framework] = {
            "tokens_per_s": tps,
            "seconds_per_step": statistics.median(r["seconds_per_step"] for r in results),
            "peak_memory_gb": statistics.median(r.get("peak_memory_gb", r.get("peak_rss_gb", 0))
                                                for r in results),
            "runs": [r["tokens_per_s"] for r in results],
        }
        try:
            out[framework]["efficiency"] = efficiency(tps, ceiling, f"{label} {framework}")
        except CeilingError as err:
            out[framework]["efficiency"] = None
            notes.append(str(err))
        if framework in FASTPATH:
            out[framework]["fastpath_active"] = all(r.get("fastpath_active", False) for r in results)
            out[framework]["fastpath_swapped"] = results[0].get("fastpath_swapped", [])
    for a, b in (("mlx_fast", "torch"), ("mlx_stock", "torch"), ("mlx_fast", "mlx_stock")):
        ratio = _ratio(runs, a, b)
        if ratio is not None:
            out[f"{a.removeprefix('mlx_')}_over_{b.removeprefix('mlx_')}"] = ratio
    return out


def summarize_generate(runs: dict, model_name: str) -> dict:
    """Per framework and batch size: median tokens/s and the runs; fast/torch per batch."""
    out = {}
    for framework, results in runs.items():
        if not results:
            continue
        sizes = [k for k in results[0] if k.startswith("batch_")]
        out[framework] = {size: {"tokens_per_s": statistics.median(r[size]["tokens_per_s"] for r in results),
                                 "runs": [r[size]["tokens_per_s"] for r in results]} for size in sizes}
        if framework in FASTPATH:
            out[framework]["fastpath_active"] = all(r.get("fastpath_active", False) for r in results)
        if framework == "torch":
            first = portable_result(results[0], model_name)
            out[framework].update({k: first[k] for k in ("torch", "threads", "omp_wait_policy") if k in first})
    for a, b in (("mlx_fast", "torch"), ("mlx_stock", "torch"), ("mlx_fast", "mlx_stock")):
        if runs.get(a) and runs.get(b):
            sizes = [k for k in runs[a][0] if k.startswith("batch_")]
            out[f"{a.removeprefix('mlx_')}_over_{b.removeprefix('mlx_')}"] = {
                size: statistics.median(x[size]["tokens_per_s"] / y[size]["tokens_per_s"]
                                        for x, y in zip(runs[a], runs[b])) for size in sizes}
    return out


def targets(report: dict) -> list[dict]:
    """The issue's targets, each with its figure and whether it was met: training tokens/s
    >= PyTorch+PEFT (every model and mode), MLX's share of the ceiling >= PyTorch's, batched
    generation >= PyTorch at the largest batch."""
    out = []
    for name, entry in report["models"].items():
        for mode, res in entry.get("train", {}).items():
            if "fast_over_torch" in res:
                out.append({"target": "training tokens/s, MLX fast >= PyTorch+PEFT", "model": name,
                            "mode": mode, "value": res["fast_over_torch"],
                            "met": res["fast_over_torch"] >= 1.0})
            fast, torch = res.get("mlx_fast", {}).get("efficiency"), res.get("torch", {}).get("efficiency")
            if fast is not None and torch is not None:
                out.append({"target": "share of the ceiling, MLX fast >= PyTorch+PEFT", "model": name,
                            "mode": mode, "value": [fast, torch], "met": fast >= torch})
        gen = entry.get("generate", {}).get("fast_over_torch")
        if gen:
            size = max(gen, key=lambda k: int(k.split("_")[1]))
            out.append({"target": f"generation tokens/s at {size.replace('_', ' ')}, MLX fast >= PyTorch",
                        "model": name, "mode": size, "value": gen[size], "met": gen[size] >= 1.0})
    return out


# ---------------------------------------------------------------- printing


def _pct(value: float | None) -> str:
    return "refused" if value is None else f"{100 * value:.1f}%"


def print_report(report: dict) -> None:
    c, s = report["ceiling"], report["settings"]
    print(f"\nceiling: float32 matmul {c['matmul_gflops']:.0f} GFLOP/s, the best of {len(c['probes'])} "
          f"probes ({c['best_probe']}; lowest {min(p['gflops'] for p in c['probes']):.0f}); "
          f"{report['machine']['cpus']} CPUs; batch {s['batch']} x {s['seq_len']}, median of "
          f"{s['steps']} steps after {s['warmup']}, {s['repeats']} runs each")
    print_train_table(report)
    print_generate_table(report)
    if "kernels" in report:
        print_kernels_table(report["kernels"], report["machine"].get("numpy_exp_melem_per_s"))
    if "profile" in report:
        print_profile(report["profile"])
    if report.get("targets"):
        print("\ntargets:")
        for t in report["targets"]:
            value = (f"{100 * t['value'][0]:.1f}% vs {100 * t['value'][1]:.1f}%"
                     if isinstance(t["value"], list) else f"{t['value']:.2f}x")
            print(f"  {'met   ' if t['met'] else 'MISSED'} {t['target']}: {t['model']} {t['mode']}: {value}")
    for note in report.get("notes", []):
        print(f"NOTE: {note}")


def _tps(res: dict, fw: str) -> str:
    return f"{res[fw]['tokens_per_s']:.1f}" if fw in res else "-"


def print_train_table(report: dict) -> None:
    rows = [(name, mode, res) for name, entry in report["models"].items()
            for mode, res in entry.get("train", {}).items()]
    if not rows:
        return
    print(f"\n{'model':<18} {'mode':<15} {'ceiling':>7} {'stock':>7} {'fast':>7} {'torch':>7} "
          f"{'fast/torch':>10} {'fast/stock':>10} {'eff stock':>9} {'eff fast':>9} {'eff torch':>9} "
          f"{'peak GB stock/fast/torch':>24}")
    for name, mode, res in rows:
        ceiling = report["models"][name]["ceiling_tokens_per_s"]
        peaks = "/".join(f"{res[fw]['peak_memory_gb']:.2f}" if fw in res else "-" for fw in FRAMEWORKS)
        ratio = lambda k: f"{res[k]:.2f}" if k in res else "-"  # noqa: E731
        eff = lambda fw: _pct(res[fw]["efficiency"]) if fw in res else "-"  # noqa: E731
        print(f"{name:<18} {mode:<15} {ceiling:7.0f} {_tps(res, 'mlx_stock'):>7} {_tps(res, 'mlx_fast'):>7} "
              f"{_tps(res, 'torch'):>7} {ratio('fast_over_torch'):>10} {ratio('fast_over_stock'):>10} "
              f"{eff('mlx_stock'):>9} {eff('mlx_fast'):>9} {eff('torch'):>9} {peaks:>24}")
        if "mlx_fast" in res and not res["mlx_fast"].get("fastpath_active", True):
            print(f"  WARNING: the fast path was not active in the {name} {mode} fast runs")
    print("(tokens/s; ceiling = matmul rate / useful FLOPs per token; eff = tokens/s / ceiling)")


def print_generate_table(report: dict) -> None:
    rows = [(name, entry["generate"]) for name, entry in report["models"].items() if entry.get("generate")]
    if not rows:
        return
    print(f"\n{'generation':<18} {'batch':>5} {'stock':>7} {'fast':>7} {'torch':>7} {'fast/torch':>10} "
          f"{'fast/stock':>10}")
    for name, gen in rows:
        any_fw = next(fw for fw in FRAMEWORKS if fw in gen)
        for size in (k for k in gen[any_fw] if k.startswith("batch_")):
            cell = lambda fw: f"{gen[fw][size]['tokens_per_s']:.1f}" if fw in gen else "-"  # noqa: E731
            ratio = lambda k: f"{gen[k][size]:.2f}" if k in gen else "-"  # noqa: E731
            print(f"{name:<18} {size.split('_')[1]:>5} {cell('mlx_stock'):>7} {cell('mlx_fast'):>7} "
                  f"{cell('torch'):>7} {ratio('fast_over_torch'):>10} {ratio('fast_over_stock'):>10}")
    print("(greedy, KV cache, tokens/s including the prefill)")


def print_kernels_table(k: dict, numpy_exp: float | None = None) -> None:
    print(f"\nkernels (ms, median of {k['repeats']} paired runs; SmolLM2 shapes, batch {k['batch']} x "
          f"{k['seq_len']}; f+b = forward and backward)")
    print(f"{'op':<24} {'shape':<22} {'fwd MLX':>8} {'fwd fast':>8} {'x':>6} {'f+b MLX':>8} "
          f"{'f+b fast':>8} {'x':>6} {'max |diff|':>10}")
    for r in k["ops"]:
        if "error" in r:
            print(f"{r['op']:<24} {r['shape']:<22} ERROR {r['error']}")
            continue
        f, fb = r["forward"], r.get("forward_backward", {})
        cells = []
        for t in (f, fb):
            if "builtin" in t and "fast" in t:
                cells += [f"{1e3 * t['builtin']:.2f}", f"{1e3 * t['fast']:.2f}", f"{t['builtin'] / t['fast']:.1f}x"]
            else:
                cells += ["-", "-", "-"]
        diff = f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else "-"
        print(f"{r['op']:<24} {r['shape']:<22} {cells[0]:>8} {cells[1]:>8} {cells[2]:>6} {cells[3]:>8} "
              f"{cells[4]:>8} {cells[5]:>6} {diff:>10}")
    exp = next((r for r in k["ops"] if r["op"] == "exp" and "forward" in r), None)
    if numpy_exp and exp:
        size = int(exp["shape"].replace(",", ""))
        print(f"(numpy's exp of the same {size:,} floats: {1e3 * size / (numpy_exp * 1e6):.2f} ms)")


def print_profile(p: dict) -> None:
    m = p["measured"]
    print(f"\nprofile: one SmolLM2 LoRA step, batch {p['batch']} x {p['seq_len']} (s, median of "
          f"{p['rounds']} paired runs in one process; fast path swaps in: "
          f"{', '.join(p['fastpath_swapped']) or 'nothing'})")
    for what in (w for w in ("forward", "forward_backward", "step") if w in m):
        print(f"  {what.replace('_', '+'):<18} stock {m[what]['stock']:6.2f}   fast {m[what]['fast']:6.2f}   "
              f"speed-up {m[what]['stock'] / m[what]['fast']:.2f}x")
    if "forward" in m and "step" in m:
        back = {k: m["step"][k] - m["forward"][k] for k in ("stock", "fast")}
        print(f"  {'backward+update':<18} stock {back['stock']:6.2f}   fast {back['fast']:6.2f}   (step - forward)")
    for op in p["ops"]:
        if "error" in op:
            print(f"  {op['op']}: not timed ({op['error']})")
    if "table" not in p:
        return
    print(f"  {'where the step goes':<38} {'count':>5} {'stock s':>8} {'fast s':>8} {'fast kernel s':>13}")
    for r in p["table"]["rows"]:
        avail = r.get("fast_available_s")
        note = "" if avail is None or r.get("swapped_in") else " (not swapped in)"
        print(f"  {r['op']:<38} {r['count'] if r['count'] is not None else '':>5} {r['stock_s']:8.2f} "
              f"{r['fast_s']:8.2f} {'' if avail is None else f'{avail:.2f}':>13}{note}")


def portable_result(result: dict, model_name: str) -> dict:
    """A worker's result with its model folder (a temporary one, say) replaced by the
    benchmark's name for the model."""
    return {**result, "model": model_name} if "model" in result else result
