"""Scoring rewrites against the author's original: chrF, ROUGE-L, the content kept from the
draft, copying, length; and the report's comparisons of them, oriented so that better is
positive."""
import pytest

from voicetune.data.rewrite import user_message
from voicetune.evaluate import report, rewrites

ORIGINAL = "I reef early. The first time you wonder whether you should, you should. I never regretted it."
DRAFT = "Reefing should happen early, at the first doubt; early reefing was never regretted."


def row(prediction, draft=DRAFT, reference=ORIGINAL):
    return {"question": user_message(draft), "reference": reference, "prediction": prediction,
            "task": "rewrite", "finish_reason": "stop"}


def test_each_measure_on_constructed_rewrites():
    values = rewrites.per_rewrite([row(ORIGINAL), row(DRAFT), row("Fog is grey."), row(ORIGINAL + " " + ORIGINAL)])
    # the original itself: chrF 100, the draft's content partly in it, nothing copied from the draft
    assert values["chrf"][0] == pytest.approx(100.0)
    assert values["rouge_l"][0] == pytest.approx(1.0)
    assert values["length_ratio"][0] == 1.0 and values["length_off"][0] == 0.0
    assert values["draft_copied"][0] == 0.0
    # returning the draft unchanged keeps all of its content, and is all copy
    assert values["content_kept"][1] == 1.0 and values["draft_copied"][1] == 1.0
    assert values["chrf"][1] < 60
    # a rewrite about something else keeps nothing and is unlike the original
    assert values["content_kept"][2] == 0.0 and values["chrf"][2] < 20
    # twice the original: twice as long, one off
    assert values["length_ratio"][3] == 2.0 and values["length_off"][3] == 1.0
    summary, _ = rewrites.score([row(ORIGINAL), row(DRAFT)])
    assert summary["n"] == 2 and summary["hit_token_limit"] == 0
    assert summary["content_kept"]["mean"] == pytest.approx((values["content_kept"][0] + 1.0) / 2)


def test_comparisons_count_a_length_closer_to_the_original_as_better():
    good = rewrites.per_rewrite([row(ORIGINAL)] * 4)
    long = rewrites.per_rewrite([row(ORIGINAL + " " + ORIGINAL)] * 4)
    comps = report.rewrite_comparisons({"base": long, "lora": good}, seed=0)["lora_vs_base"]
    assert set(comps) == {"chrf", "rouge_l", "content_kept", "length_off"}
    assert comps["length_off"]["mean_difference"] == pytest.approx(1.0)  # 1 off -> 0 off: better
    assert comps["length_off"]["wins"] == 4
    assert comps["chrf"]["mean_difference"] > 0
