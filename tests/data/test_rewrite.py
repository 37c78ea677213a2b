"""The rewrite task's data: paraphrase validation on constructed cases (a copy, a content drop, a
voice kept, a good paraphrase), the sample format and its loss mask (loss on the author's
original only), the stage's rejections, cache and provenance."""
from __future__ import annotations

import json
import types

import pytest

from voicetune.core.params import load_params
from voicetune.data import paraphrase, rewrite
from voicetune.data.posts import read_posts, split_passages
from voicetune.data.text import style_distance
from voicetune.models.generators import Reply

from tests.conftest import ROOT, run_stage
from tests.harness.fakes import FakeRewriter, plain_version, serving

P = load_params(ROOT / "params.yaml")["rewrite"]
ORIGINAL = ("Every spring somebody asks me when they should put a reef in. My answer has not changed "
            "in forty years at sea: the first time you wonder whether you should, you should. By the "
            "time you are sure, the boat is already telling you, and she is telling you loudly. I "
            "have never once regretted reefing early, and I have regretted reefing late a dozen times.")
GOOD = ("Sailors often ask when a reef should be put in. The rule has stayed the same for forty "
        "years: the first moment there is doubt, reef. Once there is certainty the boat is already "
        "showing it loudly. Reefing early is never regretted; reefing late was regretted a dozen times.")


def check(text, finish="stop"):
    return paraphrase.check_paraphrase(text, finish, ORIGINAL, P)


def test_a_good_paraphrase_is_kept_with_its_measures():
    reason, m = check(GOOD)
    assert reason is None
    assert m["copied"] == 0.0 and m["content_kept"] >= P["min_content"]
    assert P["length_ratio"][0] <= m["length_ratio"] <= P["length_ratio"][1]
    assert m["style_distance"] >= P["min_style_distance"]


def test_a_copy_is_rejected_as_copied():
    assert check(ORIGINAL)[0] == "copied"
    # the original with one word changed per sentence is still a copy
    assert check(ORIGINAL.replace("spring", "year").replace("forty", "fifty"))[0] == "copied"


def test_a_paraphrase_that_drops_the_content_is_rejected():
    dropped = ("Boats can be tricky and weather changes, so it is always wise to think carefully "
               "about safety before any trip, whatever the season or the crew on board. Good "
               "preparation matters, and so does a calm head, a tidy deck, a working radio and a "
               "plan for the evening that everybody understands before leaving the harbour.")
    reason, m = check(dropped)
    assert reason == "content_dropped" and m["content_kept"] < P["min_content"]


def test_a_paraphrase_far_too_short_or_long_is_rejected_for_length():
    assert check("Reef early.")[0] == "length"
    assert check(" ".join([GOOD] * 3))[0] == "length"


def test_a_paraphrase_that_keeps_the_voice_is_rejected_by_its_function_words():
    # the same function words in the same proportions, the content words swapped for synonyms:
    # no run copied, the content "kept" by the check's own measure is low, so test the voice
    # check directly with thresholds that let the rest pass
    same_voice = ORIGINAL.replace("spring", "springtime").replace("reef", "reefing")
    p = dict(P, max_copied=1.0, min_content=0.0)
    assert paraphrase.check_paraphrase(same_voice, "stop", ORIGINAL, p)[0] == "voice_kept"
    assert paraphrase.check_paraphrase(GOOD, "stop", ORIGINAL, p)[0] is None
    assert style_distance(ORIGINAL, ORIGINAL) == pytest.approx(0.0, abs=1e-12)
    assert style_distance(ORIGINAL, GOOD) > 0.1


def test_a_cut_reply_and_template_markup_are_rejected():
    assert check(GOOD, finish="length")[0] == "cut"
    assert check(GOOD + " <|im_end|>")[0] == "markup"


def test_a_preamble_and_quotes_are_cleaned_off():
    assert paraphrase.clean(f"Here is the rewritten text:\n\n\"{GOOD}\"") == GOOD
    assert paraphrase.clean(GOOD) == GOOD


def test_the_sample_format_is_persona_instruction_draft_then_the_original():
    assert rewrite.user_message("  A plain draft.\n") == "Rewrite this in my voice:\n\nA plain draft."
    assert rewrite.draft_of(rewrite.user_message("A plain draft.")) == "A plain draft."
    assert rewrite.draft_of("What is a reef?") is None
    assert rewrite.messages("You are Tilly.", "A draft.") == [
        {"role": "system", "content": "You are Tilly."},
        {"role": "user", "content": "Rewrite this in my voice:\n\nA draft."}]
    assert rewrite.by_task([{"a": 1}, {"task": "rewrite"}, {"a": 2}]) == {
        "qa": [{"a": 1}, {"a": 2}], "rewrite": [{"task": "rewrite"}]}


class Rewriter:
    """An in-process stand-in generator (FakeRewriter's replies), counting its calls."""
    name = identity = "fake rewriter"
    settings: dict = {}

    def __init__(self, replies=None):
        self.calls, self.replies = 0, replies

    def complete(self, chats, progress=None):
        self.calls += 1
        out = []
        for chat in chats:
            text = chat[-1]["content"].split(":\n\n", 1)[1]
            out.append(Reply(self.replies(text) if self.replies else plain_version(text), "stop"))
            if progress:
                progress(1)
        return out


def sample_passages(limit=None):
    posts, _ = read_posts(ROOT / "data/sample/posts")
    return [x for post in posts for x in split_passages(post, P["max_words"], P["min_words"])][:limit]


def test_run_makes_rows_with_provenance_counts_rejections_and_caches(tmp_path):
    passages = sample_passages()
    # every third passage is answered with a copy of itself: rejected as copied
    copies = {x.text for x in passages[::3]}
    gen = Rewriter(lambda text: text if text in copies else plain_version(text))
    rows, metrics = paraphrase.run(passages, gen, P, tmp_path / "cache")
    assert metrics["passages"] == len(passages) == metrics["passages_generated"]
    assert metrics["rejected"]["copied"] == len(copies) and metrics["pairs"] == len(rows)
    assert len(rows) + sum(metrics["rejected"].values()) == len(passages)
    by_id = {x.id: x for x in passages}
    for row in rows:
        original = by_id[row["passage_id"]]
        assert row["task"] == "rewrite" and row["post_id"] == original.post_id
        user, assistant = row["conversation"]
        assert assistant == {"role": "assistant", "content": original.text}
        assert user["content"] == rewrite.user_message(plain_version(original.text))
        assert row["prompt_version"] == paraphrase.PROMPT_VERSION and row["generator"] == "fake rewriter"
    # a second run asks nothing: every reply is cached
    again = Rewriter(lambda text: "never asked")
    rows2, metrics2 = paraphrase.run(passages, again, P, tmp_path / "cache")
    assert again.calls == 0 and metrics2["cache_hits"] == len(passages) and rows2 == rows


def test_loss_falls_on_the_authors_original_only(base_model_dir):
    """Through mlx-lm's ChatDataset with mask_prompt, as the train stage reads a sample: the
    tokens that carry loss decode to the original (and the end of the turn), nothing of the
    persona, the instruction or the draft."""
    from mlx_lm.tuner.datasets import ChatDataset
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(base_model_dir)
    draft = plain_version(ORIGINAL)
    row = {"messages": [*rewrite.messages("You are Tilly.", draft),
                        {"role": "assistant", "content": ORIGINAL}], "task": "rewrite"}
    tokens, offset = ChatDataset([row], tokenizer, mask_prompt=True).process(row)
    trained = tokenizer.decode(tokens[offset:])
    assert trained.strip().startswith(ORIGINAL)
    assert trained.replace(ORIGINAL, "").strip() in ("<|im_end|>", "<|im_end|>\n")
    prompt = tokenizer.decode(tokens[:offset])
    assert "Rewrite this in my voice:" in prompt and draft in prompt and ORIGINAL not in prompt


def test_the_stage_with_an_endpoint_writes_pairs_and_metrics_and_nothing_for_task_qa(tmp_path):
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["ingest"]["source"] = str(ROOT / "data/sample/posts")
    with serving(FakeRewriter) as url:
        params["rewrite"]["endpoint"] = url
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        args = ["--params", str(tmp_path / "params.yaml"), "--cache", str(tmp_path / "cache"),
                "--out", str(tmp_path / "pairs.jsonl"), "--metrics", str(tmp_path / "rewrite.json")]
        result = run_stage("rewrite.py", *args)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "rewrite.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert metrics["passages"] == len(sample_passages()) and metrics["pairs"] == len(rows) > 20
    assert len({r["post_id"] for r in rows}) >= 5
    assert "rewrite: " in result.stdout and f"{len(rows)} pairs" in result.stdout

    params["data"]["task"] = "qa"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = run_stage("rewrite.py", *args)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "pairs.jsonl").read_text() == ""
    assert json.loads((tmp_path / "rewrite.json").read_text()) == {"task": "qa", "pairs": 0}
