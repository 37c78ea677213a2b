"""The comparison report (voicetune/evaluate/report.py) on a hand-made case whose numbers are known."""
import pytest

from voicetune.evaluate import report
from voicetune.core.errors import UserError
from voicetune.evaluate.metrics import score


def row(question, reference, prediction):
    return {"question": question, "reference": reference, "prediction": prediction}


# Two questions. base: word overlap 1/3 on both; answer lengths 4 and 24 characters against
# references of 14 and 13 (gaps 10 and 11). lora: the reference's words (overlap 1), gaps 0 and 1.
RUNS = {
    "base": [row("Q1", "reef the sails", "reef"), row("Q2", "tide and wind", "wind wind wind wind wind")],
    "lora": [row("Q1", "reef the sails", "reef the sails"), row("Q2", "tide and wind", "tide and wind!")],
}


def test_per_question_refuses_runs_of_other_questions():
    swapped = {"base": RUNS["base"], "lora": RUNS["lora"][::-1]}
    with pytest.raises(UserError, match=r"lora's answer 1 is to 'Q2', base's to 'Q1'"):
        report.per_question(swapped)
    with pytest.raises(UserError, match="lora has 1 answers, base has 2"):
        report.per_question({"base": RUNS["base"], "lora": RUNS["lora"][:1]})


def test_comparisons_on_a_hand_made_case():
    values = report.per_question(RUNS)
    assert values["base"]["length_gap"] == [10, 11] and values["lora"]["length_gap"] == [0, 1]
    c = report.comparisons(values, seed=0)["lora_vs_base"]
    overlap = c["word_overlap"]
    assert (overlap["mean_old"], overlap["mean_new"]) == (pytest.approx(1 / 3), 1.0)
    assert overlap["mean_difference"] == pytest.approx(2 / 3)
    assert overlap["relative_improvement"] == pytest.approx(2.0)
    # the same difference on every question: the bootstrap interval has no width
    assert overlap["ci95_low"] == overlap["ci95_high"] == pytest.approx(2 / 3)
    assert (overlap["wins"], overlap["ties"], overlap["losses"]) == (2, 0, 0)
    # ROUGE-L F1 of base: 0.5 ("reef": P 1, R 1/3) and 0.25 (P 1/5, R 1/3)
    assert c["rouge_l"]["mean_old"] == pytest.approx(0.375)
    assert c["rouge_l"]["relative_improvement"] == pytest.approx(0.625 / 0.375)
    # lora is closer to the reference length: the gap shrinks by 10 chars of 10.5, +95%
    gap = c["length_gap_reduction"]
    assert (gap["mean_old"], gap["mean_new"]) == (10.5, 0.5)
    assert gap["mean_difference"] == 10.0 and gap["ci95_low"] == gap["ci95_high"] == 10.0
    assert gap["relative_improvement"] == pytest.approx(10 / 10.5)
    assert (gap["wins"], gap["losses"]) == (2, 0)


def summaries():
    out = {}
    for name, rows in RUNS.items():
        summary, _ = score(rows)
        out[name] = {**summary, "reference_perplexity": 12.5, "hit_token_limit": 0,
                     "temperature": 0.0, "seed": None, "repetition_penalty": 1.2, "max_tokens": 200}
    return out


def test_markdown_holds_the_table_and_the_intervals():
    comps = report.comparisons(report.per_question(RUNS), seed=0)
    text = report.markdown(summaries(), comps, train={}, fuse={}, runs=RUNS, examples=1, seed=0,
                           plots=["plots/loss.png"])
    assert "2 test questions, greedy decoding with repetition penalty 1.2, at most 200 new tokens" in text
    assert "| base | 0.3333 | 0.0000 | 0.3333–0.3333 | 0.3750 | 14 ± 10 | 14 ± 0 | 12.50 | 0/2 | — |" in text
    assert ("| lora | 1.0000 | 0.0000 | 1.0000–1.0000 | 1.0000 | 14 ± 0 | 14 ± 0 | 12.50 | 0/2 "
            "| +200.0% (+0.6667, 95% CI +0.6667 … +0.6667; W/T/L 2/0/0) |") in text
    assert ("length gap to the reference -10.0 chars (95% CI -10.0 … -10.0)") in text
    assert "![loss](plots/loss.png)" in text and "*Reference:*" in text


def test_plots_are_written(tmp_path):
    metrics = tmp_path / "live/plots/metrics"
    metrics.mkdir(parents=True)
    (metrics / "train_loss.tsv").write_text("timestamp\tstep\ttrain_loss\n1\t5\t3.0\n2\t10\t2.5\n")
    (metrics / "val_loss.tsv").write_text("timestamp\tstep\tval_loss\n1\t0\t3.2\n2\t10\t2.7\n")
    files = report.plot_all(report.per_question(RUNS), RUNS, tmp_path / "live", tmp_path / "plots")
    # the rewrites' plot is written too, saying there are none (DVC expects every declared plot)
    assert [f.name for f in files] == ["loss.png", "overlap.png", "lengths.png", "rewrites.png"]
    for f in files:
        assert f.read_bytes().startswith(b"\x89PNG") and f.stat().st_size > 5000


def test_markdown_shows_the_arena_ratings_or_says_there_are_none():
    from voicetune.evaluate.ratings import compute_ratings
    from voicetune.data.votes import counted

    comps = report.comparisons(report.per_question(RUNS), seed=0)

    def text(arena):
        return report.markdown(summaries(), comps, train={}, fuse={}, runs=RUNS, examples=1,
                               seed=0, plots=["plots/loss.png"], arena=arena)

    for empty in (None, {}, compute_ratings([], counted("current", {"adapters": "c89e.dir"}), models=["base", "lora"])):
        assert "No arena votes yet (`make arena`" in text(empty)
        assert "plots/arena.png" not in text(empty)
    old = [{"model_a": "lora", "model_b": "base", "vote": "A", "adapter": "old.dir"}]
    assert "No arena votes for the current adapter yet (1 in data/arena/votes.jsonl, 1 for " \
           "other adapters" in text(compute_ratings(old, counted("current", {"adapters": "c89e.dir"})))
    votes = [{"model_a": "lora", "model_b": "base", "vote": v, "adapter": "c89e.dir"}
             for v in ["A"] * 30 + ["B"] * 10]
    shown = text(compute_ratings(votes, counted("current", {"adapters": "c89e.dir"})))
    assert "## Arena: blind side-by-side votes" in shown
    assert "| lora | 1191 |" in shown and "![arena ratings](plots/arena.png)" in shown
    assert shown.index("## Arena") < shown.index("## Plots")


def test_the_report_replaces_its_plots_and_keeps_the_arena_plot(tmp_path):
    from voicetune.core.files import atomic_files

    plots = tmp_path / "metrics/plots"
    plots.mkdir(parents=True)
    (plots / "arena.png").write_bytes(b"arena")
    (plots / "loss.png").write_bytes(b"old loss")
    with atomic_files(plots) as tmp:
        (tmp / "loss.png").write_bytes(b"new loss")
    assert (plots / "arena.png").read_bytes() == b"arena"
    assert (plots / "loss.png").read_bytes() == b"new loss"
    with pytest.raises(RuntimeError):
        with atomic_files(plots) as tmp:
            (tmp / "loss.png").write_bytes(b"half")
            raise RuntimeError("plotting failed")
    assert (plots / "loss.png").read_bytes() == b"new loss"
    assert sorted(p.name for p in (tmp_path / "metrics").iterdir()) == ["plots"]  # no temp left


# ------------------------------------------------------------------------------ rewrites
def rewrite_row(draft, original, prediction):
    from voicetune.data.rewrite import user_message
    return {"question": user_message(draft), "reference": original, "prediction": prediction,
            "task": "rewrite", "finish_reason": "stop"}


ORIGINAL = "I reef early, and I have never once regretted it."
REWRITES = {
    "base": [rewrite_row("Reef early; it is never regretted.", ORIGINAL, "Reef early; it is never regretted.")],
    "lora": [rewrite_row("Reef early; it is never regretted.", ORIGINAL, ORIGINAL)],
}


def rewrite_summaries():
    from voicetune.evaluate import rewrites
    return {name: {"rewrite": rewrites.score(rows)[0]} for name, rows in REWRITES.items()}


def rewrite_comps():
    from voicetune.evaluate import rewrites
    values = {name: rewrites.per_rewrite(rows) for name, rows in REWRITES.items()}
    return {pair: {"rewrite": c} for pair, c in report.rewrite_comparisons(values, seed=0).items()}


def test_the_rewrite_section_shows_both_sides_against_base():
    summaries_ = {name: {**s, **rewrite_summaries()[name]} for name, s in summaries().items()}
    comps = report.comparisons(report.per_question(RUNS), seed=0)
    for pair, c in rewrite_comps().items():
        comps[pair].update(c)
    text = report.markdown(summaries_, comps, train={}, fuse={}, runs=RUNS, examples=1, seed=0,
                           plots=["plots/loss.png", "plots/rewrites.png"], rewrite_runs=REWRITES)
    assert "## Rewrites: a plain draft in the author's voice" in text
    # lora returned the original itself: chrF 100; base returned the draft: all of it copied
    assert "| lora | 100.0 | 1.0000 |" in text
    assert "| base |" in text and "| 1.00 | 1.00 |" in text  # base: content kept 1.00, copied 1.00
    assert "![rewrites: chrF against the original vs the draft's content kept](plots/rewrites.png)" in text
    assert "![rewrites](plots/rewrites.png)" not in text  # shown in its section, not again
    assert "*Draft:* Reef early; it is never regretted." in text and f"*The author's original:* {ORIGINAL}" in text
    assert "- **lora vs base**: chrF (+" in text


def test_a_report_of_rewrites_only_has_no_qa_table(tmp_path):
    empty = {"base": [], "lora": []}
    text = report.markdown(rewrite_summaries(), rewrite_comps(), train={}, fuse={}, runs=empty, examples=2,
                           seed=0, plots=[], voice={"rewrite": {}}, rewrite_runs=REWRITES)
    assert "No Q&A questions in the test split (data.task: rewrite)" in text
    assert "| model | mean overlap" not in text and "## Examples" not in text
    assert "## Rewrites: a plain draft in the author's voice" in text
    assert "No Q&A answers to score" in text
    metrics = tmp_path / "live/plots/metrics"
    metrics.mkdir(parents=True)
    (metrics / "train_loss.tsv").write_text("timestamp\tstep\ttrain_loss\n1\t5\t3.0\n")
    (metrics / "val_loss.tsv").write_text("timestamp\tstep\tval_loss\n1\t0\t3.2\n")
    from voicetune.evaluate import rewrites
    files = report.plot_all({}, empty, tmp_path / "live", tmp_path / "plots", voice={"rewrite": {}},
                            rewrite_values={n: rewrites.per_rewrite(r) for n, r in REWRITES.items()})
    assert [f.name for f in files] == ["loss.png", "overlap.png", "lengths.png", "voice.png", "rewrites.png"]
    assert all(f.read_bytes().startswith(b"\x89PNG") for f in files)
