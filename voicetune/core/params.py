"""Reading params.yaml, the project's single control panel, and checking it against one schema.

The schema below is the only definition of what params.yaml may contain: one pydantic model
per section, unknown keys refused, strict types (``"four"`` is not a number, ``true`` is not
an integer), ranges checked. ``load_params`` validates the whole file before any stage does
any work, and ``voicetune.project.recipe`` validates what a recipe would write with the same schema.

Every problem is reported at once, one line each, as ``<file>: <key path>: <what is wrong>``:

    params.yaml: lora.rnak: unknown key; did you mean lora.rank?
    params.yaml: train.batch_size: missing (an integer >= 1)
    params.yaml: data.valid_ratio: got 1.5; expected a number in [0, 1)
"""
from __future__ import annotations

import difflib
import json
import math
import types
from pathlib import Path
from typing import Annotated, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError

from voicetune.core.errors import UserError


class ParamsError(UserError, ValueError):
    """params.yaml (or what a recipe would make of it) is unreadable or invalid.
    ``problems`` holds one line per problem; ``str()`` is the whole message."""

    def __init__(self, problems: list[str], header: str | None = None):
        self.problems = list(problems)
        if header is None and len(self.problems) > 1:
            header = f"{len(self.problems)} problems:"
        lines = [header, *("  " + p for p in self.problems)] if header else self.problems
        super().__init__("\n".join(lines))


# ------------------------------------------------------------------------------ the schema
def _minus_one_or_positive(value: int) -> int:
    if value != -1 and value < 1:
        raise PydanticCustomError("minus_one_or_positive", "must be -1 or >= 1")
    return value


MinusOneOrPositive = Annotated[int, AfterValidator(_minus_one_or_positive)]
Seed = Annotated[int, Field(ge=0)]
Ratio = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]


# a generator's endpoint (ingest, eval.judge): the same keys and checks in both sections
EndpointUrl = Annotated[Optional[str], Field(pattern=r"^https?://\S+$", description=(
    "the base URL of an OpenAI-compatible API (http://127.0.0.1:8080/v1) or null (in-process)"))]
KeyVariable = Annotated[Optional[str], Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description=(
    "the name of an environment variable holding the API key, or null (no key)"))]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ModelParams(_Section):
    source: str = Field(min_length=1, description=(
        "embedded:<name>, a Hugging Face repo id (owner/name) or a local model folder"))
    revision: Optional[str] = Field(None, min_length=1, description=(
        "a commit sha (40 hex digits; a branch or tag name runs unpinned) or null"))
    chat_template: Optional[str] = Field(None, min_length=1, description=(
        "the path of a Jinja chat template, or null for the model's own"))
    # QLoRA: the base_model stage quantizes a float source with mlx-lm (null: as it comes)
    quantize: Optional[Literal[4, 8]] = Field(None, description="4, 8 (bits per weight) or null")
    quantize_group_size: Literal[32, 64, 128] = Field(64, description=(
        "32, 64 or 128 (weights per scale and bias)"))


class DataParams(_Section):
    source: str = Field(min_length=1, description="a JSONL/JSON file or a folder of them")
    hub_dataset: Optional[str] = Field(None, min_length=1)
    hub_revision: Optional[str] = Field(None, min_length=1)
    system_prompt: str = Field(pattern=r"\S", description="a non-empty string (the persona)")
    seed: Seed
    valid_ratio: Ratio
    test_ratio: Ratio
    split_by: Literal["exchange", "conversation", "post"] = "conversation"
    # qa: the Q&A pairs of `source`; rewrite: the rewrite pairs of the rewrite stage (a plain
    # draft -> the author's original passage); both: the two mixed
    task: Literal["qa", "rewrite", "both"] = "qa"
    rewrite_ratio: Optional[float] = Field(None, gt=0, allow_inf_nan=False, description=(
        "a number > 0 (both: at most this many rewrite training samples per Q&A one, a seeded "
        "draw) or null (all)"))

    @model_validator(mode="after")
    def _something_left_to_train_on(self):
        problem = ratio_problem(self.valid_ratio, self.test_ratio)
        if problem:
            raise PydanticCustomError("ratio_sum", problem)
        return self


def ratio_problem(valid_ratio, test_ratio) -> str | None:
    """The one rule across keys: the validation and test shares leave a training split."""
    if valid_ratio + test_ratio >= 1:
        return (f"got {_show(valid_ratio)} + {_show(test_ratio)} = "
                f"{_show(round(valid_ratio + test_ratio, 12))}; expected a sum < 1 "
                "(what is left is the training split)")
    return None


def iters_epochs_problem(iters, epochs) -> str | None:
    """The one rule across train.iters and train.epochs: exactly one of them sets the run's
    length (``epochs`` becomes iters once the training split is known: see
    ``voicetune.train.sft.resolve_iters``)."""
    if iters is not None and epochs is not None:
        return (f"got {_show(epochs)} beside train.iters={_show(iters)}; "
                "set exactly one of train.iters and train.epochs")
    if iters is None and epochs is None:
        return ("null or missing, and so is train.iters; set exactly one of train.iters and "
                "train.epochs")
    return None


def early_stopping_problem(section: str, values: dict, iters: int | None = None) -> str | None:
    """Early stopping that can never end a run before ``iters``: it stops after ``patience``
    validations without improvement, and only (iters - 1) // steps_per_eval of them come
    before the last step. Not refused (a large patience is how one switches it off), but
    worth a warning: a default that cannot act misleads.

    ``iters``: the run's resolved number of iterations (``resolve_iters`` when the section
    sets ``epochs``); by default the section's own ``iters``."""
    iters = values["iters"] if iters is None else iters
    if iters is None:
        raise ValueError(f"{section}.iters is null ({section}.epochs sets the run's length): "
                         "pass the resolved number of iterations")
    before_last = (iters - 1) // values["steps_per_eval"]
    patience = values["early_stopping"]["patience"]
    if patience <= before_last:
        return None
    fix = f"lower the patience to {before_last} or validate more often" if before_last \
        else "validate more often"
    length = f"{section}.iters={iters}" if values.get("epochs") is None else \
        f"{section}.epochs={values['epochs']}: {iters} iterations"
    return (f"{section}.early_stopping.patience={patience} can never stop a run early: "
            f"{before_last or 'no'} validation{'s' * (before_last != 1)} before the last step "
            f"({length}, {section}.steps_per_eval={values['steps_per_eval']}); {fix}")


class LoraParams(_Section):
    rank: int = Field(ge=1)
    scale: float = Field(gt=0, allow_inf_nan=False)
    dropout: float = Field(ge=0, lt=1, allow_inf_nan=False)
    keys: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1, description=(
        "a non-empty list of module names inside a block, e.g. [self_attn.q_proj, self_attn.v_proj]"))
    num_layers: MinusOneOrPositive = Field(-1, description="-1 (all blocks) or an integer >= 1")


class EarlyStoppingParams(_Section):
    patience: int = Field(5, ge=1)
    min_delta: float = Field(0.001, ge=0, allow_inf_nan=False)


class TrainParams(_Section):
    # the run's length: exactly one of the two (``iters_epochs_problem``)
    iters: Optional[int] = Field(None, ge=1, description=(
        "an integer >= 1 (the number of iterations, an upper bound) or null (train.epochs sets it)"))
    epochs: Optional[int] = Field(None, ge=1, description=(
        "an integer >= 1 (every training sample this many times; whole epochs only: for part of "
        "one, set train.iters instead) or null (train.iters sets it)"))
    batch_size: int = Field(ge=1)
    learning_rate: float = Field(gt=0, allow_inf_nan=False)
    optimizer: Literal["adam", "adamw"] = "adam"
    steps_per_eval: int = Field(50, ge=1)
    val_batches: MinusOneOrPositive = Field(-1, description=(
        "-1 (the whole validation set) or an integer >= 1"))
    steps_per_report: int = Field(10, ge=1)
    grad_checkpoint: bool = False
    max_seq_length: int = Field(2048, ge=2)
    # the memory the run is planned and refused against (voicetune.models.memory): null is
    # this machine's usable memory
    memory_limit_gb: Optional[float] = Field(None, gt=0, allow_inf_nan=False, description=(
        "a number of GB > 0, or null (this machine's usable memory)"))
    mask_prompt: bool = True
    seed: Seed = 0
    save_every: int = Field(50, ge=1)
    early_stopping: EarlyStoppingParams = Field(default_factory=EarlyStoppingParams)

    @model_validator(mode="after")
    def _one_length(self):
        problem = iters_epochs_problem(self.iters, self.epochs)
        if problem:
            raise PydanticCustomError("iters_or_epochs", problem)
        return self


def _ascending(value: list[int]) -> list[int]:
    if value[0] > value[1]:
        raise PydanticCustomError("ascending", "expected [lowest, highest] with lowest <= highest")
    return value


class VoiceParams(_Section):
    """The voice score (stages voice_negatives, voice): authorship verification fit on the
    train split only. Defaults: params files written before it existed still validate."""
    # the "not the author" class: the base model's answers to this many seeded train questions
    negatives: int = Field(48, ge=4)
    # every text is scored on windows of exactly this many characters (its last, shorter piece
    # dropped): the classifier never sees a text's length or where it was cut
    window_chars: int = Field(160, ge=20)
    char_ngrams: Annotated[list[Annotated[int, Field(ge=1, le=8)]], Field(min_length=2, max_length=2),
                           AfterValidator(_ascending)] = Field(
        default_factory=lambda: [2, 4], description="[lowest, highest] n of the character n-grams, lowest <= highest")
    C: float = Field(1.0, gt=0, allow_inf_nan=False)  # inverse L2 strength of the logistic regression


class JudgeParams(_Section):
    """The pairwise judge (stage judge): "which of these two answers did the author write?",
    asked in both orders. A generator like ingest's: the base model in-process, or an
    OpenAI-compatible endpoint."""
    run: Literal["auto", "on", "off"] = Field("auto", description=(
        "auto (on unless the judge would be the embedded 135M model in-process), on or off"))
    endpoint: EndpointUrl = None
    endpoint_model: str = Field("default_model", min_length=1)
    api_key_env: KeyVariable = None
    timeout: float = Field(120.0, gt=0, allow_inf_nan=False)
    examples: int = Field(3, ge=0, le=20)  # the author's train answers shown as examples
    max_tokens: int = Field(16, ge=1)
    limit: Optional[int] = Field(None, ge=1, description=(
        "an integer >= 1 (the first N test questions) or null (all)"))
    seed: Seed = 0

    @field_validator("run", mode="before")
    @classmethod
    def _yaml_booleans(cls, value):
        # YAML 1.1 reads a bare on/off as a boolean (as for kernels.fast_cpu)
        return ("on" if value else "off") if isinstance(value, bool) else value


class EvalParams(_Section):
    max_tokens: int = Field(ge=1)
    # a rewrite is as long as its draft: its own limit (the Q&A answers keep max_tokens)
    rewrite_max_tokens: int = Field(192, ge=1)
    temperature: float = Field(ge=0, allow_inf_nan=False)
    seed: Seed
    repetition_penalty: Optional[float] = Field(None, gt=0, allow_inf_nan=False)
    batch_size: int = Field(ge=1)
    limit: Optional[int] = Field(None, ge=1, description=(
        "an integer >= 1 (the first N test questions) or null (all)"))
    report_examples: int = Field(ge=0)
    voice: VoiceParams = Field(default_factory=VoiceParams)
    judge: JudgeParams = Field(default_factory=JudgeParams)


class FuseParams(_Section):
    verify_prompts: int = Field(ge=1)
    verify_max_tokens: int = Field(ge=1)
    logit_tolerance: float = Field(gt=0, allow_inf_nan=False)


class GgufTolerances(_Section):
    f16: float = Field(gt=0, allow_inf_nan=False)
    q8_0: float = Field(gt=0, allow_inf_nan=False)


class GgufParams(_Section):
    type: Literal["f16", "q8_0"] = "f16"
    verify_prompts: int = Field(ge=1)
    logit_tolerance: GgufTolerances


def _distinct(models: list[str]) -> list[str]:
    if len(set(models)) != len(models):
        raise PydanticCustomError("distinct", "models must be distinct")
    return models


class ArenaParams(_Section):
    """The blind arena (make arena) and its ratings (the arena stage). A section of its own with
    defaults: params files written before the arena existed still validate."""
    adapter: Literal["current", "all"] = "current"
    rounds: int = Field(1000, ge=100)
    seed: Seed = 0
    # battles sample, each with its own seed: a greedy battle answer would be the evaluate
    # stage's prediction, found again by asking the chat tab (or reading data/eval/)
    temperature: float = Field(0.7, gt=0, allow_inf_nan=False, description=(
        "a number > 0: battles sample (0, greedy, would let a judge look an answer up)"))
    # voicetune.models.registry's names: core imports no other room, so they are repeated
    # here, and tests/models/test_registry.py fails when the two lists differ
    models: Annotated[list[Literal["base", "lora", "fused", "dpo"]], AfterValidator(_distinct)] = Field(
        default_factory=lambda: ["base", "lora"], min_length=2, description=(
            "a list of at least 2 distinct models among base, lora, fused, dpo"))


class PreferenceParams(_Section):
    """Preference tuning on top of the SFT LoRA (the pairs and preference stages)."""
    sources: Annotated[list[Literal["self", "arena"]], AfterValidator(_distinct)] = Field(
        min_length=1, description="a list of distinct sources among self, arena")
    pairs: Optional[int] = Field(None, ge=1, description=(
        "null (every training question) or an integer >= 1"))
    max_tokens: int = Field(ge=1)
    drop_cut_answers: bool = True
    max_similarity: float = Field(gt=0, le=1, allow_inf_nan=False)
    valid_ratio: Ratio
    seed: Seed = 0
    method: Literal["dpo", "orpo"] = "dpo"
    beta: float = Field(gt=0, allow_inf_nan=False)
    learning_rate: float = Field(gt=0, allow_inf_nan=False)
    iters: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    steps_per_eval: int = Field(ge=1)
    save_every: int = Field(ge=1)
    max_seq_length: int = Field(2048, ge=2)
    early_stopping: EarlyStoppingParams = Field(default_factory=EarlyStoppingParams)
    lora: LoraParams


class KernelsParams(_Section):
    """MLX's x86 CPU backend computes exp, sigmoid, softmax and SiLU one float at a time;
    voicetune.core.kernels replaces them (training and generation) with compiled polynomial
    versions built from its fast primitives. A section of its own with a default: params
    files written before it existed still validate."""
    fast_cpu: Literal["auto", "on", "off"] = Field("auto", description=(
        "auto (on when MLX runs on an x86 CPU), on, or off"))

    @field_validator("fast_cpu", mode="before")
    @classmethod
    def _yaml_booleans(cls, value):
        # YAML 1.1 (PyYAML, and DVC's `-S kernels.fast_cpu=off`) reads a bare on/off as a boolean
        return ("on" if value else "off") if isinstance(value, bool) else value


class IngestParams(_Section):
    """Posts -> grounded question/answer pairs (the ingest stage). A section of its own with
    defaults: params files written before it existed still validate."""
    source: str = Field("data/sample/posts", min_length=1, description=(
        "a folder (or file) of .md, .html or RSS/Atom feed posts"))
    endpoint: EndpointUrl = None
    endpoint_model: str = Field("default_model", min_length=1)
    api_key_env: KeyVariable = None
    timeout: float = Field(120.0, gt=0, allow_inf_nan=False)
    keep_code: bool = False
    on_error: Literal["skip", "refuse"] = "skip"
    max_words: int = Field(220, ge=20)
    min_words: int = Field(40, ge=1)
    limit: Optional[int] = Field(None, ge=1, description=(
        "an integer >= 1 (the first N passages) or null (all)"))
    questions: int = Field(3, ge=1, le=20)
    max_tokens: int = Field(128, ge=8)
    temperature: float = Field(0.0, ge=0, allow_inf_nan=False)
    repetition_penalty: Optional[float] = Field(1.1, gt=0, allow_inf_nan=False)
    seed: Seed = 0
    batch_size: int = Field(8, ge=1)
    min_answer_words: int = Field(8, ge=1)
    max_answer_words: int = Field(150, ge=1)
    min_grounding: float = Field(0.3, ge=0, le=1, allow_inf_nan=False)
    max_copied: float = Field(0.6, ge=0, le=1, allow_inf_nan=False)
    trim_cut: bool = True


def _low_high(value: list[float]) -> list[float]:
    if value[0] > value[1]:
        raise PydanticCustomError("low_high", "expected [low, high] with low <= high")
    return value


class RewriteParams(_Section):
    """The rewrite task's data (stage rewrite): each passage of ingest.source's posts paraphrased
    plainly by a generator (the base model in-process, or an OpenAI-compatible endpoint),
    validated; the model learns to map the plain draft back to the author's original."""
    endpoint: EndpointUrl = None
    endpoint_model: str = Field("default_model", min_length=1)
    api_key_env: KeyVariable = None
    timeout: float = Field(120.0, gt=0, allow_inf_nan=False)
    max_words: int = Field(80, ge=20)  # passage length: drafts the size of a short email
    min_words: int = Field(25, ge=1)
    limit: Optional[int] = Field(None, ge=1, description=(
        "an integer >= 1 (the first N passages) or null (all)"))
    max_tokens: int = Field(256, ge=8)
    temperature: float = Field(0.0, ge=0, allow_inf_nan=False)
    repetition_penalty: Optional[float] = Field(1.1, gt=0, allow_inf_nan=False)
    seed: Seed = 0
    batch_size: int = Field(16, ge=1)
    min_content: float = Field(0.4, ge=0, le=1, allow_inf_nan=False)
    length_ratio: Annotated[list[Annotated[float, Field(gt=0, allow_inf_nan=False)]],
                            Field(min_length=2, max_length=2), AfterValidator(_low_high)] = Field(
        default_factory=lambda: [0.5, 1.5], description="[low, high], 0 < low <= high")
    max_copied: float = Field(0.7, ge=0, le=1, allow_inf_nan=False)
    min_style_distance: float = Field(0.05, ge=0, le=1, allow_inf_nan=False)


class Params(_Section):
    model: ModelParams
    data: DataParams
    lora: LoraParams
    train: TrainParams
    eval: EvalParams
    fuse: FuseParams
    gguf: GgufParams
    arena: ArenaParams = Field(default_factory=ArenaParams)
    preference: PreferenceParams
    kernels: KernelsParams = Field(default_factory=KernelsParams)
    ingest: IngestParams = Field(default_factory=IngestParams)
    rewrite: RewriteParams = Field(default_factory=RewriteParams)


# ------------------------------------------------------------------------------ reading
def load_params(path: str | Path = "params.yaml") -> dict:
    """params.yaml as a plain dict (every key of the schema, defaults filled in), or a
    ParamsError that lists every problem of the file."""
    return validate(read_yaml(path), str(path))


def validate(raw, where: str = "params.yaml") -> dict:
    """Check ``raw`` (params.yaml as PyYAML reads it) against the schema; return it as a
    plain dict or raise ParamsError naming each problem as ``<where>: <key>: ...``."""
    try:
        return Params.model_validate(raw).model_dump()
    except ValidationError as err:
        lines = problems(err, raw, where)
        raise ParamsError(lines, f"{where}: {len(lines)} problems:" if len(lines) > 1 else None) \
            from None


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader (what DVC and the stages read), noting keys given twice, which
    PyYAML would otherwise resolve silently to the last one."""

    def __init__(self, stream):
        super().__init__(stream)
        self.duplicates: list[str] = []

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key in seen and key != "<<":
                self.duplicates.append(f"{key_node.start_mark.line + 1}: {key}: given twice "
                                       "(PyYAML would keep the last one); keep one")
            seen.add(key)
        return super().construct_mapping(node, deep)



def read_yaml(path: str | Path):
    """The YAML file as PyYAML reads it; ParamsError (with file:line) if it can't be read."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError([f"{path}: no such file (run from the repository root, "
                           "or give the params file with --params)"]) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ParamsError([f"{path}: cannot be read: {err}"]) from None
    loader = _Loader(text)
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as err:
        raise ParamsError([f"{path}{yaml_error_text(err)}"]) from None
    except yaml.YAMLError as err:
        raise ParamsError([f"{path}: invalid YAML: {err}"]) from None
    finally:
        loader.dispose()
    if loader.duplicates:
        raise ParamsError([f"{path}:{d}" for d in loader.duplicates])
    return data


def yaml_error_text(err) -> str:
    """``:line:column: invalid YAML: ...`` for a (PyYAML or ruamel) MarkedYAMLError."""
    mark, context_mark = getattr(err, "problem_mark", None), getattr(err, "context_mark", None)
    mark = mark or context_mark
    text = f":{mark.line + 1}:{mark.column + 1}: invalid YAML: " if mark else ": invalid YAML: "
    text += str(getattr(err, "problem", None) or err).strip()
    context = getattr(err, "context", None)
    if context:
        text += f" ({context}" + (f" at line {context_mark.line + 1}" if context_mark is not None
                                  and context_mark is not mark else "") + ")"
    return text


# ------------------------------------------------------------------------------ messages
def closest(name: str, candidates) -> str | None:
    """The candidate closest to a misspelt ``name``, if any is close enough."""
    found = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=1, cutoff=0.6)
    return found[0] if found else None


def key_paths(model: type[BaseModel] = Params, prefix: str = "") -> list[str]:
    """Every key of the schema as a dotted path, sections included (``train.early_stopping``)."""
    paths = []
    for name, field in model.model_fields.items():
        paths.append(prefix + name)
        if _is_section(field.annotation):
            paths += key_paths(field.annotation, f"{prefix}{name}.")
    return paths


def suggest(path: str, siblings) -> str:
    """`did you mean X?` for an unknown dotted key ``path``, from the keys beside it or, for a
    key put in the wrong section, from anywhere in the schema; else the keys that exist."""
    parent, _, name = path.rpartition(".")
    near = closest(name, siblings)
    if near is not None:
        return f"did you mean {parent + '.' if parent else ''}{near}?"
    elsewhere: dict[str, list[str]] = {}
    for other in key_paths():
        if not parent or not other.startswith(parent + "."):
            elsewhere.setdefault(other.rpartition(".")[2], []).append(other)
    near = closest(name, elsewhere)
    if near is not None:
        options = elsewhere[near]
        return "did you mean " + (" or ".join(options) if len(options) < 3 else
                                  ", ".join(options[:-1]) + " or " + options[-1]) + "?"
    return f"{parent or 'params.yaml'} has {', '.join(map(str, siblings))}"


def problems(err: ValidationError, raw, where: str) -> list[str]:
    """One line per problem of a ValidationError, in the schema's order."""
    lines, seen = [], set()
    for e in err.errors(include_url=False):
        loc = tuple(e["loc"])
        path = _dotted(loc)
        if (path, e["type"]) in seen:
            continue
        seen.add((path, e["type"]))
        try:
            lines.append(_line(e, loc, path, where))
        except Exception:  # noqa: BLE001 - an unforeseen error shape still gets its key path
            lines.append(f"{where}: {path}: got {_show(e.get('input'))}; {e['msg']}")
    # a sum over a section that has other problems too: pydantic skips the section's
    # cross-key rule then, but every problem is reported at once
    data = raw.get("data") if isinstance(raw, dict) else None
    if isinstance(data, dict) and not any(e["type"] == "ratio_sum" for e in err.errors()):
        ratios = [data.get("valid_ratio"), data.get("test_ratio")]
        if all(isinstance(r, (int, float)) and not isinstance(r, bool) and 0 <= r < 1 for r in ratios):
            problem = ratio_problem(*ratios)
            if problem:
                lines.append(f"{where}: data.valid_ratio + data.test_ratio: {problem}")
    # the same for train.iters and train.epochs
    train = raw.get("train") if isinstance(raw, dict) else None
    if isinstance(train, dict) and not any(e["type"] == "iters_or_epochs" for e in err.errors()):
        lengths = [train.get("iters"), train.get("epochs")]
        if all(n is None or (type(n) is int and n >= 1) for n in lengths):
            problem = iters_epochs_problem(*lengths)
            if problem:
                lines.append(f"{where}: train.epochs: {problem}")
    return lines


def _line(e: dict, loc: tuple, path: str, where: str) -> str:
    if not loc and e["type"] == "model_type":
        return (f"{where}: got {_show(e['input'])}; expected a mapping of sections "
                f"({', '.join(Params.model_fields)})")
    if e["type"] in ("extra_forbidden", "invalid_key"):  # invalid_key: a key that is no name
        siblings = list(_model_at(loc[:-1]).model_fields)
        kind = "section" if len(loc) == 1 else "key"
        return f"{where}: {path}: unknown {kind}; {suggest(path, siblings)}"
    if e["type"] == "missing":
        return f"{where}: {path}: missing ({_allowed_at(loc)})"
    if e["type"] == "ratio_sum":
        section = path + "." if path else ""
        return f"{where}: {section}valid_ratio + {section}test_ratio: {e['msg']}"
    if e["type"] == "iters_or_epochs":
        return f"{where}: {path}.epochs: {e['msg']}"
    return f"{where}: {path}: got {_show(e['input'])}; expected {_allowed_at(loc)}{_hint(e, loc)}"


def _dotted(loc: tuple) -> str:
    path, tp = "", Params
    for part in loc:
        if isinstance(part, int) and get_origin(tp) is list:  # a list item
            path, tp = path + f"[{part}]", get_args(tp)[0]
            continue
        path += f".{part}" if path else str(part)
        field = tp.model_fields.get(part) if _is_section(tp) else None
        tp = _unwrap(field.annotation)[0] if field is not None else None
    return path


def _is_section(tp) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _model_at(loc: tuple) -> type[BaseModel]:
    model = Params
    for part in loc:
        model = model.model_fields[part].annotation
    return model


def _allowed_at(loc: tuple) -> str:
    """What the schema allows at ``loc``, in words."""
    tp, metadata, description = Params, [], None
    for part in loc:
        if isinstance(part, int) and get_origin(tp) is list:  # a list item
            tp, metadata, description = _unwrap(get_args(tp)[0]) + (None,)
        elif _is_section(tp) and part in tp.model_fields:
            field = tp.model_fields[part]
            tp, metadata = _unwrap(field.annotation)
            metadata = [*field.metadata, *metadata]
            description = field.description
        # else: a tag pydantic adds inside a type (e.g. 'function-after'): the same field
    return description or _describe(tp, metadata)


def _unwrap(tp) -> tuple:
    """(type, constraints) of a possibly Annotated type."""
    if get_origin(tp) is Annotated:
        base, *extra = get_args(tp)
        metadata = []
        for item in extra:
            metadata += getattr(item, "metadata", None) or [item]
        return base, metadata
    return tp, []


def _describe(tp, metadata) -> str:
    tp, more = _unwrap(tp)
    metadata = [*metadata, *more]
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        text = _describe(args[0], metadata)
        return f"{text} or null" if type(None) in get_args(tp) else text
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(map(str, get_args(tp)))
    if tp is bool:
        return "true or false"
    if tp in (int, float):
        return ("an integer" if tp is int else "a number") + _bounds(metadata)
    if tp is str:
        return "a non-empty string" if _bound(metadata, "min_length") else "a string"
    if get_origin(tp) is list:
        items = _describe(get_args(tp)[0], [])
        return ("a non-empty list" if _bound(metadata, "min_length") else "a list") + \
            f" ({items.removeprefix('a ').removeprefix('an ')} each)"
    if _is_section(tp):
        return f"a section with keys {', '.join(tp.model_fields)}"
    return str(tp)


def _bound(metadata, name):
    for item in metadata:
        value = getattr(item, name, None)
        if value is not None:
            return value
    return None


def _bounds(metadata) -> str:
    ge, gt, le, lt = (_bound(metadata, n) for n in ("ge", "gt", "le", "lt"))
    low = f"[{_show(ge)}" if ge is not None else f"({_show(gt)}" if gt is not None else None
    high = f"{_show(le)}]" if le is not None else f"{_show(lt)})" if lt is not None else None
    if low and high:
        return f" in {low}, {high}"
    if low:
        return f" >= {_show(ge)}" if ge is not None else f" > {_show(gt)}"
    if high:
        return f" <= {_show(le)}" if le is not None else f" < {_show(lt)}"
    return ""


def _hint(e: dict, loc: tuple) -> str:
    value = e["input"]
    if e["type"] in ("int_type", "float_type") and isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ""
        if e["type"] == "int_type" or "e" not in value.lower():
            return " (a string: remove the quotes)"
        mantissa, exponent = f"{float(value):e}".split("e")
        mantissa = mantissa.rstrip("0") + ("0" if mantissa.rstrip("0").endswith(".") else "")
        return f" (PyYAML reads {value} as a string: write {mantissa}e{int(exponent):+d}, with a " \
               "dot and a signed exponent)"
    if e["type"] == "string_type" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return " (quote it to make it a string)"
    if e["type"] == "int_type" and isinstance(value, float) and value.is_integer():
        return f" (write {int(value)})"
    return ""


def _show(value) -> str:
    """A value as it would look in params.yaml (strings quoted), shortened if long."""
    if isinstance(value, dict):
        return "a section"
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else ("-.inf" if value < 0 else ".inf")
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        text = repr(value)
    else:
        try:
            text = json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError):
            text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
