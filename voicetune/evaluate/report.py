"""The comparison report: base vs LoRA vs fused on the held-out questions.

Everything here is computed from the evaluate stages' predictions, paired per question, with
seeded bootstrap confidence intervals, so the report says how sure it is.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from voicetune.core.errors import UserError
from voicetune.data.rewrite import draft_of
from voicetune.evaluate import rewrites
from voicetune.evaluate.metrics import compare, score
from voicetune.evaluate.ratings import markdown as ratings_markdown
from voicetune.evaluate.style_control import markdown as style_control_markdown

PAIRS = (("lora", "base"), ("fused", "base"), ("fused", "lora"), ("dpo", "base"), ("dpo", "lora"))


def per_question(runs: dict[str, list[dict]]) -> dict[str, dict[str, list[float]]]:
    """Per-question word overlap, ROUGE-L and length gap (|answer - reference| characters)."""
    out = {}
    for name, rows in runs.items():
        _, values = score(rows)
        values["length_gap"] = [abs(len(r["prediction"]) - len(r["reference"])) for r in rows]
        out[name] = values
    questions = {name: [r.get("question", r.get("prompt")) for r in rows] for name, rows in runs.items()}
    first, first_questions = next(iter(questions.items()))
    for name, qs in questions.items():
        if len(qs) != len(first_questions):
            raise UserError(f"{name} has {len(qs)} answers, {first} has {len(first_questions)}: "
                            "rerun the evaluate stages on the same test split")
        for i, (q, q0) in enumerate(zip(qs, first_questions)):
            if q != q0:
                raise UserError(f"{name}'s answer {i + 1} is to {q!r}, {first}'s to {q0!r}: the "
                                "runs must answer the same questions in the same order; rerun "
                                "the evaluate stages on the same test split")
    return out


def comparisons(values: dict[str, dict[str, list[float]]], seed: int) -> dict:
    result = {}
    for new, old in PAIRS:
        if new in values and old in values:
            result[f"{new}_vs_{old}"] = {
                metric: compare(values[new][metric], values[old][metric], seed)
                for metric in ("word_overlap", "rouge_l", "voice_score")
                if metric in values[new] and metric in values[old]
            }
            # lower is better for the length gap: the improvement is old gap - new gap,
            # relative to the old gap (positive: the new answers are closer in length)
            result[f"{new}_vs_{old}"]["length_gap_reduction"] = compare(
                values[new]["length_gap"], values[old]["length_gap"], seed, lower_is_better=True)
    return result


def rewrite_comparisons(values: dict[str, dict[str, list[float]]], seed: int) -> dict:
    """Each pair's paired comparisons on the rewrites (``rewrites.COMPARED``, and the voice
    score where given), oriented so that a positive difference is better: ``length_off``, the
    distance of the length ratio from 1, is lower-is-better."""
    result = {}
    for new, old in PAIRS:
        if new in values and old in values:
            result[f"{new}_vs_{old}"] = {
                metric: compare(values[new][metric], values[old][metric], seed,
                                lower_is_better=metric in rewrites.LOWER_IS_BETTER)
                for metric in (*rewrites.COMPARED, "voice_score")
                if metric in values[new] and metric in values[old]}
    return result


def rewrite_section(summaries: dict[str, dict], comps: dict, runs: dict[str, list[dict]],
                    voice: dict, plot: str | None = None) -> list[str]:
    """The rewrite task's figures: like the original (chrF, ROUGE-L), the content kept, the
    length, the voice; each model against base with its CI; one example."""
    have = {name: s["rewrite"] for name, s in summaries.items() if "rewrite" in s}
    if not have:
        return []
    n = next(iter(have.values()))["n"]
    rv = voice.get("rewrite") or {}
    lines = ["", "## Rewrites: a plain draft in the author's voice", "",
             f"{n} held-out passages (posts never trained on), each paraphrased plainly by the "
             "rewrite stage's generator; every model is asked \"Rewrite this in my voice:\" with the "
             "persona, and the author's original passage is the reference. A good rewrite is like "
             "the original *and* keeps the draft's content: both sides are shown. chrF (sacrebleu, "
             "0-100) and ROUGE-L against the original; content kept = share of the draft's content "
             "words in the rewrite; copied = share of it verbatim from the draft (runs of 6+ words); "
             "length = its words / the original's.", "",
             "| model | chrF | ROUGE-L | content kept | copied from draft | length | voice P(author) "
             "| hit token limit | chrF vs base |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, s in have.items():
        vs = comps.get(f"{name}_vs_base", {}).get("rewrite", {}).get("chrf")
        v = (rv.get("models") or {}).get(name)
        lines.append(
            f"| {name} | {s['chrf']['mean']:.1f} | {s['rouge_l']['mean']:.4f} | "
            f"{s['content_kept']['mean']:.2f} | {s['draft_copied']['mean']:.2f} | "
            f"{s['length_ratio']['mean']:.2f} | {_fmt(v and v['score'], '.3f')} | "
            f"{s['hit_token_limit']}/{s['n']} | {format_comparison(vs, pct=False) if vs else '—'} |")
    if rv:
        lines += ["", f"Voice score of the rewrites: {rv['verdict']}; the author's originals score "
                  f"{rv['ceiling']['score']:.3f}."]
    lines.append("")
    for pair, metrics in comps.items():
        c = metrics.get("rewrite")
        if not c:
            continue
        lines.append(f"- **{pair.replace('_vs_', ' vs ')}**: chrF {format_comparison(c['chrf'], pct=False)}; "
                     f"ROUGE-L {format_comparison(c['rouge_l'], pct=False)}; content kept "
                     f"{format_comparison(c['content_kept'], pct=False)}; |length ratio - 1| "
                     f"{-c['length_off']['mean_difference']:+.3f} (95% CI {-c['length_off']['ci95_high']:+.3f} … "
                     f"{-c['length_off']['ci95_low']:+.3f})"
                     + (f"; voice score {format_comparison(c['voice_score'], pct=False)}" if "voice_score" in c else ""))
    if plot:
        lines += ["", f"![rewrites: chrF against the original vs the draft's content kept]({plot})"]
    first = runs["base"][0]
    lines += ["", "### Example", "", f"*Draft:* {draft_of(first['question']) or first['question']}", "",
              f"*The author's original:* {first['reference']}", ""]
    for name, rows in runs.items():
        lines += [f"*{name}:* {rows[0]['prediction'].strip()}", ""]
    return lines


def format_comparison(c: dict, pct: bool = True) -> str:
    rel = f"{100 * c['relative_improvement']:+.1f}% " if pct and c["relative_improvement"] is not None else ""
    return (f"{rel}({c['mean_difference']:+.4f}, 95% CI {c['ci95_low']:+.4f} … "
            f"{c['ci95_high']:+.4f}; W/T/L {c['wins']}/{c['ties']}/{c['losses']})")


def preference_section(pref: dict, pairs: dict) -> list[str]:
    """How the preference stage (dpo in the tables) was trained, from metrics/preference.json
    and metrics/pairs.json: what it learnt from, and how far its validation moved."""
    if not pref:
        return []
    method = pref.get("method", "dpo").upper()
    made = (f"{pairs.get('self_pairs', 0)} pairs of the author's answer against the LoRA's own, "
            f"{pairs.get('arena_pairs', 0)} from arena votes"
            + (f" ({pairs.get('dropped_cut', 0)} dropped as cut at {pairs.get('max_tokens')} "
               f"tokens, {pairs.get('dropped_identical', 0) + pairs.get('dropped_similar', 0)} "
               "as near-identical)" if pairs else ""))
    return ["", f"Preference tuning (`dpo` above; {method}, beta {pref.get('beta')}): {made}; "
            f"{pref.get('train_pairs')} to train, {pref.get('valid_pairs')} to validate. "
            f"Validation preference loss {pref.get('base_val_loss', float('nan')):.4f} → "
            f"{pref.get('best_val_loss', float('nan')):.4f} at iteration {pref.get('best_iteration')}, "
            f"reward accuracy {pref.get('best_val_reward_accuracy', float('nan')):.2f}, rewards "
            f"chosen {pref.get('best_val_chosen_reward', float('nan')):+.3f} / rejected "
            f"{pref.get('best_val_rejected_reward', float('nan')):+.3f} (β × log-probability change "
            f"from the reference: the author's answers should not fall far); stopped at "
            f"{pref.get('stopped_at')} ({pref.get('stop_reason')})."]


FEATURE_NAMES = {"both": "both together", "char_ngrams": "masked character n-grams",
                 "function_words": "function words"}


def _pct(g: dict) -> str:
    return (f"{100 * g['value']:.1f}% (95% CI {100 * g['ci95_low']:.1f}% … {100 * g['ci95_high']:.1f}%)"
            if g.get("value") is not None and g.get("ci95_low") is not None else "—")


def voice_section(voice: dict, plot: str | None = None) -> list[str]:
    """Does it sound like the author? The voice score (metrics/voice.json) per model against
    the author's own held-out answers (ceiling) and the base model's (floor)."""
    lines = ["", "## Does it sound like the author? The voice score", ""]
    if not voice:
        return lines + ["No voice score yet (`dvc repro voice`)."]
    if "models" not in voice:  # data.task: rewrite, scored in the rewrite section
        return lines + ["No Q&A answers to score: the rewrites' voice score is in their section."]
    fit, check = voice["fit"], voice["length_check"]
    c = voice["ceiling"]
    lines += [f"P(author): an authorship-verification model (character {fit['char_ngrams'][0]}–"
              f"{fit['char_ngrams'][1]}-grams with content words masked, and function-word "
              f"frequencies; logistic regression) fit on the train split only: "
              f"{fit['author_texts']} of the author's answers against {fit['other_texts']} of the "
              f"base model's answers to training questions, on windows of {fit['window_chars']} "
              "characters. Verdict: " + voice["verdict"] + ".", "",
              f"What it is not shown: length. Length alone would tell the author's held-out answers "
              f"from the base model's with AUC {check['auc_length_alone']:.3f}; the score sees only "
              f"equal windows of every text, and on each text's first window alone (equal lengths, "
              f"no ending) its AUC is {check['auc_first_window_only']:.3f}."
              + ("" if "auc_by_features" not in voice else " Each feature set alone, and together: " + ", ".join(
                  f"{FEATURE_NAMES.get(name, name)} AUC {a['value']:.3f} ({a['ci95_low']:.3f} … {a['ci95_high']:.3f})"
                  for name, a in voice["auc_by_features"].items()) + "."), ""]
    if not voice["informative"]:
        lines += ["**The score is uninformative on this data: the figures below are not a result.**", ""]
    lines += ["| model | P(author) | 95% CI | share of the base → author gap closed | vs base "
              "(paired) | W/T/L vs base | AUC vs the author's answers |", "|---|---|---|---|---|---|---|",
              f"| author (held-out answers: the ceiling) | {c['score']:.3f} | {c['ci95_low']:.3f} … "
              f"{c['ci95_high']:.3f} | 100% | | | 0.5 |"]
    for name, m in voice["models"].items():
        vs = m.get("vs_base")
        lines.append(
            f"| {name} | {m['score']:.3f} | {m['ci95_low']:.3f} … {m['ci95_high']:.3f} | "
            + ("0% (the floor)" if name == "base" else _pct(m["gap_closed"]))
            + (f" | {vs['mean_difference']:+.3f} (95% CI {vs['ci95_low']:+.3f} … {vs['ci95_high']:+.3f}) "
               f"| {vs['wins']}/{vs['ties']}/{vs['losses']}" if vs else " | | ")
            + f" | {m['auc_vs_author']:.3f} |")
    if plot:
        lines += ["", f"![voice score]({plot})"]
    return lines


def judge_section(judge: dict) -> list[str]:
    """The pairwise judge (metrics/judge.json): each contest's raw win rate over the verdicts
    both orders agreed on, position bias, and the length-controlled ratings, or why it was off."""
    lines = ["", "## The judge: which answer did the author write?", ""]
    if not judge:
        return lines + ["No judge run yet (`dvc repro judge`)."]
    if judge.get("run") != "on":
        return lines + [f"Off: {judge.get('reason', 'eval.judge.run is off')}."]
    lines += [f"The judge ({judge.get('generator', '?')}) was shown each pair of answers in both orders, "
              "with a few of the author's training answers as examples; a verdict counts only when "
              "both orders agree (a disagreement is a tie). Position bias: the share of replies "
              f"that picked the first answer (0.5: none); over all contests {judge['position_bias']}, "
              f"consistency {judge['consistency']}, {judge['unparseable']} unparseable replies.", "",
              "| contest | pairs | W / T / L | win rate (ties half) | 95% CI | position bias "
              "| consistency |", "|---|---|---|---|---|---|---|"]
    for name, c in judge["contests"].items():
        lines.append(f"| {name.replace('_vs_', ' vs ')} | {c['pairs']} | {c['wins']} / {c['ties']} / "
                     f"{c['losses']} | {_fmt(c['win_rate'], '.1%')} | {_fmt(c['win_rate_ci_low'], '.1%')} … "
                     f"{_fmt(c['win_rate_ci_high'], '.1%')} | {_fmt(c['position_bias'], '.2f')} "
                     f"| {_fmt(c['consistency'], '.2f')} |")
    lines += ["", "Against the author, a model's win rate is how often the judge took its answer for "
              "the author's (50%: indistinguishable). Length-controlled:", ""]
    return lines + style_control_markdown(judge["length_controlled"])


def _fmt(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def arena_section(arena: dict | None) -> list[str]:
    """The arena's ratings (metrics/arena.json) with a link to their plot, or one line saying
    there are none yet."""
    lines = ["", "## Arena: blind side-by-side votes", ""]
    if not arena or not arena.get("votes"):
        return lines + ["No arena votes yet (`make arena` to judge the models side by side)."]
    if not arena.get("used"):
        return lines + [f"No arena votes for the current adapter yet ({arena['votes']} in "
                        f"data/arena/votes.jsonl, {arena.get('other_weights', 0)} for other "
                        "adapters; `arena.adapter: all` counts them)."]
    return lines + ratings_markdown(arena, plot="plots/arena.png", voice=arena.get("voice"))


def qa_section(summaries: dict[str, dict], comps: dict, seed: int) -> list[str]:
    """The Q&A questions' table and each pair's comparisons."""
    lines = [f"{summaries['base']['n']} test questions, "
             + (f"sampling at temperature {summaries['base']['temperature']} (seed {summaries['base']['seed']})"
                if summaries["base"]["temperature"] > 0 else "greedy decoding")
             + (f" with repetition penalty {summaries['base']['repetition_penalty']}"
                if summaries["base"].get("repetition_penalty") else "")
             + f", at most {summaries['base']['max_tokens']} new tokens. Confidence intervals: "
             f"seeded paired bootstrap (seed {seed}, 10,000 resamples) of the per-question difference.", "",
             "| model | mean overlap | std | range | ROUGE-L | answer chars | reference chars "
             "| ref. perplexity | hit token limit | overlap vs base |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in summaries.items():
        o, p, r = s["word_overlap"], s["prediction_chars"], s["reference_chars"]
        vs = comps.get(f"{name}_vs_base", {}).get("word_overlap")
        lines.append(
            f"| {name} | {o['mean']:.4f} | {o['std']:.4f} | {o['min']:.4f}–{o['max']:.4f} "
            f"| {s['rouge_l']['mean']:.4f} | {p['mean']:.0f} ± {p['std']:.0f} | {r['mean']:.0f} ± {r['std']:.0f} "
            f"| {s['reference_perplexity']:.2f} | {s['hit_token_limit']}/{s['n']} "
            f"| {format_comparison(vs) if vs else '—'} |")
    lines += ["", "## Comparisons", ""]
    for pair, metrics in comps.items():
        lines.append(f"- **{pair.replace('_vs_', ' vs ')}**: word overlap {format_comparison(metrics['word_overlap'])}; "
                     f"ROUGE-L {format_comparison(metrics['rouge_l'])}; "
                     + (f"voice score {format_comparison(metrics['voice_score'], pct=False)}; "
                        if "voice_score" in metrics else "")
                     + f"length gap to the reference "
                     f"{-metrics['length_gap_reduction']['mean_difference']:+.1f} chars "
                     f"(95% CI {-metrics['length_gap_reduction']['ci95_high']:+.1f} … "
                     f"{-metrics['length_gap_reduction']['ci95_low']:+.1f})")
    return lines


def markdown(summaries: dict[str, dict], comps: dict, train: dict, fuse: dict,
             runs: dict[str, list[dict]], examples: int, seed: int, plots: list[str],
             arena: dict | None = None, preference: dict | None = None,
             pairs: dict | None = None, voice: dict | None = None,
             judge: dict | None = None, rewrite_runs: dict[str, list[dict]] | None = None) -> str:
    share = train.get("trainable_share")
    lines = ["# Base vs fine-tuned vs fused: held-out evaluation", ""]
    if runs.get("base"):  # no Q&A questions when data.task is rewrite
        lines += qa_section(summaries, comps, seed)
    else:
        lines += ["No Q&A questions in the test split (data.task: rewrite): the rewrites below "
                  "are the evaluation."]
    if share is not None:
        lines += ["", f"Parameter efficiency: {train['trainable_parameters']:,} trainable parameters, "
                  f"{100 * share:.3f}% of {train['total_parameters']:,}. Best validation loss "
                  f"{train['best_val_loss']:.4f} at iteration {train['best_iteration']} (base "
                  f"{train['base_val_loss']:.4f}); training stopped at {train['stopped_at']} "
                  f"({train['stop_reason']})."]
    if fuse:
        lines += ["", f"Fusion check on {fuse['prompts']} prompts: max |logit| difference fused vs "
                  f"base+adapters {fuse['max_abs_logit_diff_fused_vs_lora']:.2e} (tolerance "
                  f"{fuse['tolerance']:.0e}), fused vs base {fuse['max_abs_logit_diff_fused_vs_base']:.2e}; "
                  f"greedy answers identical {fuse['greedy_answers_identical']}/{fuse['prompts']}."]
    rewrite_plot = next((p for p in plots if Path(p).stem == "rewrites"), None)
    lines += rewrite_section(summaries, comps, rewrite_runs or {}, voice or {}, rewrite_plot)
    lines += preference_section(preference or {}, pairs or {})
    voice_plot = next((p for p in plots if Path(p).stem == "voice"), None)
    lines += voice_section(voice or {}, voice_plot)
    lines += judge_section(judge or {})
    lines += arena_section(arena)
    lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots
                                       if p not in (voice_plot, rewrite_plot)]
    if runs.get("base"):
        lines += ["", "## Examples", ""]
    picks = np.random.default_rng(seed).choice(len(runs.get("base", [])),
                                               size=min(examples, len(runs.get("base", []))), replace=False)
    for i in sorted(int(x) for x in picks):
        lines += [f"### {runs['base'][i].get('question', '')}", "",
                  f"*Reference:* {runs['base'][i]['reference']}", ""]
        for name, rows in runs.items():
            lines += [f"*{name}:* {rows[i]['prediction'].strip()}", ""]
    return "\n".join(lines) + "\n"


def _read_tsv(path: Path, column: str) -> tuple[list[float], list[float]]:
    if not path.exists():
        return [], []
    with open(path) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [float(r["step"]) for r in rows], [float(r[column]) for r in rows]


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})  # no version stamp: stable bytes
    plt.close(fig)


def plot_all(values: dict[str, dict[str, list[float]]], runs: dict[str, list[dict]],
             live_dir: Path, out_dir: Path, voice: dict | None = None,
             rewrite_values: dict[str, dict[str, list[float]]] | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    files = []

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, label in (("train_loss", "train"), ("val_loss", "validation")):
        steps, vals = _read_tsv(live_dir / "plots/metrics" / f"{name}.tsv", name)
        ax.plot(steps, vals, marker="o" if label == "validation" else None, label=label)
    ax.set(xlabel="iteration", ylabel="loss (assistant tokens)", title="Training and validation loss")
    ax.legend()
    files.append(out_dir / "loss.png")
    _save(fig, files[-1])

    fig, ax = plt.subplots(figsize=(7, 4))
    if values:
        ax.boxplot([values[n]["word_overlap"] for n in values], showmeans=True)
        ax.set_xticks(range(1, len(values) + 1), list(values))
        ax.set(ylabel="word overlap with the reference (Jaccard)", title="Per-question word overlap")
    else:  # every declared plot is written, a placeholder where there is nothing to draw
        _nothing(ax, "no Q&A questions evaluated (data.task: rewrite)")
    files.append(out_dir / "overlap.png")
    _save(fig, files[-1])

    fig, ax = plt.subplots(figsize=(7, 4))
    if values:
        lengths = {"reference": [len(r["reference"]) for r in next(iter(runs.values()))]}
        lengths.update({n: [len(r["prediction"]) for r in rows] for n, rows in runs.items()})
        ax.boxplot(list(lengths.values()), showmeans=True)
        ax.set_xticks(range(1, len(lengths) + 1), list(lengths))
        ax.set(ylabel="answer length (characters)", title="Answer lengths vs the reference")
    else:
        _nothing(ax, "no Q&A questions evaluated (data.task: rewrite)")
    files.append(out_dir / "lengths.png")
    _save(fig, files[-1])
    if voice:
        files.append(out_dir / "voice.png")
        if voice.get("models"):
            _save(voice_figure(voice), files[-1])
        else:
            fig, ax = plt.subplots(figsize=(7, 4))
            _nothing(ax, "no Q&A answers scored (data.task: rewrite)")
            _save(fig, files[-1])
    files.append(out_dir / "rewrites.png")  # always written: DVC expects every declared plot
    _save(rewrite_figure(rewrite_values or {}), files[-1])
    return files


def _nothing(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center")
    ax.set_axis_off()


def rewrite_figure(values: dict[str, dict[str, list[float]]]):
    """Both sides of a rewrite at once: each rewrite's chrF against the author's original (up:
    like the author) against the share of the draft's content it kept (right: the facts kept),
    every model in its colour, its mean ringed. A model that copies the draft sits bottom right;
    one that ignores it, top left."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if not values:
        _nothing(ax, "no rewrites evaluated (data.task: qa)")
        return fig
    for i, (name, v) in enumerate(values.items()):
        colour = f"C{i}"
        ax.scatter(v["content_kept"], v["chrf"], color=colour, alpha=0.45, s=22, label=name)
        ax.scatter([np.mean(v["content_kept"])], [np.mean(v["chrf"])], s=160, facecolors="none",
                   edgecolors=colour, linewidths=2)
    n = len(next(iter(values.values()))["chrf"])
    ax.set(xlabel="content of the draft kept (share of its content words)",
           ylabel="chrF against the author's original",
           title=f"Rewrites of {n} held-out passages: like the author vs the facts kept\n(rings: each model's mean)")
    ax.set_xlim(-0.02, 1.02)
    ax.legend(fontsize=8, loc="lower left")
    return fig


def voice_figure(voice: dict):
    """Each model's P(author) with its 95% CI, between the base model (floor) and the author's
    own held-out answers (ceiling, its CI shaded)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    c = voice["ceiling"]
    ax.axhspan(c["ci95_low"], c["ci95_high"], color="tab:green", alpha=0.15)
    ax.axhline(c["score"], color="tab:green", label=f"the author's held-out answers ({c['score']:.2f})")
    ax.axhline(voice["floor"], color="grey", ls="--", label=f"base model, the floor ({voice['floor']:.2f})")
    names = list(voice["models"])
    scores = [voice["models"][n]["score"] for n in names]
    low = [s - voice["models"][n]["ci95_low"] for n, s in zip(names, scores)]
    high = [voice["models"][n]["ci95_high"] - s for n, s in zip(names, scores)]
    ax.errorbar(range(len(names)), scores, yerr=[low, high], fmt="o", capsize=5, color="tab:blue")
    for i, n in enumerate(names):
        g = voice["models"][n]["gap_closed"]["value"]
        if n != "base" and g is not None:
            ax.annotate(f"{100 * g:.0f}% of the gap", (i, scores[i]), xytext=(8, -4),
                        textcoords="offset points", fontsize=9)
    ax.set_xticks(range(len(names)), names)
    ax.set_xlim(-0.5, len(names) - 0.1)  # room for the last label
    ax.set_ylim(0, 1)
    title = "Voice score: P(the author wrote it), 95% CI"
    if not voice["informative"]:
        title += "\n(uninformative on this data: the score cannot tell the author from base)"
    ax.set(ylabel="mean P(author) on the test answers", title=title)
    ax.legend(loc="lower right", fontsize=8)
    return fig
