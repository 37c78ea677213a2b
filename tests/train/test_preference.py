"""Preference tuning (voicetune/train/preference.py, stages/preference.py): the DPO and ORPO losses
against hand-computed values, the answers' log-probabilities and their gradient against MLX's
plain full-vocabulary computation, the reference as the step-0 policy, and the guarantees of
`train` (early stopping keeps the best adapter, exact resume after kill -9, a NaN stops with
the outputs untouched) on a 2-layer random Llama with the real tokenizer."""
import json
import math
import signal
from pathlib import Path

import numpy as np
import pytest
import yaml

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm import load

from voicetune.core import kernels
from voicetune.core.jsonl import JsonlError
from voicetune.core.params import validate
from voicetune.models.fusion import load_float32
from voicetune.models.lora import apply_lora
from voicetune.train import preference
from voicetune.train.checkpoint import Checkpoint
from voicetune.train.early_stopping import EarlyStopping
from voicetune.train.pairs import PreferenceError, read_pairs, tokenize_pairs
from voicetune.train.preference import (PreferenceConfig, adapters_off, batch_loss, collate_pairs,
                                        dpo_loss, evaluate_pairs, log1mexp, orpo_loss, pair_batches,
                                        pair_logps, preference_loss, reward_stats, sequence_logps,
                                        train_preference)

from tests.conftest import PERSONA, ROOT, write_jsonl
from tests.harness.faults import fail_after_a_good_run, killing, run_stage

ATTENTION = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
# an easy preference: whatever the question, this answer over that one
GOOD = "Reef early, reef small, and keep a dry watch."
BAD = "I could not tell you, I have never been to sea."
LOG2 = math.log(2)


def questions() -> list[str]:
    rows = [json.loads(line) for line in (ROOT / "data/sample/tilly_brask.jsonl").open()]
    return sorted({r["conversation"][0]["content"] for r in rows}, key=lambda q: (len(q), q))[:16]


def pair_rows(qs, chosen=GOOD, rejected=BAD) -> list[dict]:
    return [{"prompt": q, "chosen": chosen, "rejected": rejected, "system": PERSONA,
             "source": "self", "question_index": i} for i, q in enumerate(qs)]


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory) -> Path:
    """12 training pairs and 4 held out, all preferring GOOD to BAD."""
    out = tmp_path_factory.mktemp("pairs")
    qs = questions()
    write_jsonl(out / "train.jsonl", pair_rows(qs[:12]))
    write_jsonl(out / "valid.jsonl", pair_rows(qs[12:]))
    return out


def adapted(model_dir, dropout=0.0, seed=0):
    model, tokenizer, _ = load_float32(model_dir)
    mx.random.seed(seed)
    apply_lora(model, 4, 20.0, dropout, ATTENTION, -1)
    return model, tokenizer


def lora_layers(model):
    return [m for _, m in model.named_modules() if hasattr(m, "lora_b")]


# ------------------------------------------------------------------ the losses, by hand
def test_dpo_loss_by_hand():
    # pair 1: 0.5 * ((-10 - -11) - (-12 - -11)) = 0.5 * (1 + 1) = 1
    # pair 2: 0.5 * ((-8 - -8) - (-7 - -8)) = 0.5 * (0 - 1) = -0.5
    out = dpo_loss(0.5, mx.array([-10.0, -8.0]), mx.array([-12.0, -7.0]),
                   mx.array([-11.0, -8.0]), mx.array([-11.0, -8.0]))
    # -log σ(x) = log(1 + exp(-x))
    expected = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(0.5))) / 2  # 0.6436...
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.chosen_rewards.tolist() == [0.5, 0.0] and out.rejected_rewards.tolist() == [-0.5, 0.5]
    accuracy, margin = reward_stats(out)
    assert (accuracy.item(), margin.item()) == (0.5, 0.25)  # (1 + -0.5) / 2
    # the same through the batch layout (chosen rows first, then rejected)
    stacked = preference_loss("dpo", 0.5, mx.array([-10.0, -8.0, -12.0, -7.0]), mx.ones(4),
                              mx.array([-11.0, -8.0, -11.0, -8.0]))
    assert stacked.loss.item() == out.loss.item()
    # policy = reference: log 2 per pair, and a tie is no correct preference
    tie = dpo_loss(0.1, mx.array([-3.0, -5.0]), mx.array([-4.0, -1.0]),
                   mx.array([-3.0, -5.0]), mx.array([-4.0, -1.0]))
    assert tie.loss.item() == pytest.approx(LOG2, abs=1e-7)
    assert [v.item() for v in reward_stats(tie)] == [0.0, 0.0]


def test_orpo_loss_by_hand():
    # pair 1: chosen -6 over 3 tokens (mean -2), rejected -3 over 1 (mean -3)
    # pair 2: chosen -1 over 2 tokens (mean -0.5), rejected -4 over 2 (mean -2)
    beta = 0.2
    out = orpo_loss(beta, mx.array([-6.0, -1.0]), mx.array([-3.0, -4.0]),
                    mx.array([3.0, 2.0]), mx.array([1.0, 2.0]))

    def log_odds(m):  # log(p / (1 - p)) of the mean token probability p = exp(m)
        return m - math.log(1 - math.exp(m))

    def log_sigmoid(x):
        return -math.log(1 + math.exp(-x))

    ratios = [log_odds(-2) - log_odds(-3), log_odds(-0.5) - log_odds(-2)]
    nll = (6 + 1) / (3 + 2)  # the chosen answers' NLL per token, over all their tokens
    expected = nll - beta * (log_sigmoid(ratios[0]) + log_sigmoid(ratios[1])) / 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([-0.4, -0.1])  # beta * mean log-prob
    assert out.rejected_rewards.tolist() == pytest.approx([-0.6, -0.4])
    accuracy, margin = reward_stats(out)
    assert accuracy.item() == 1.0 and margin.item() == pytest.approx((0.2 + 0.3) / 2)


def test_log1mexp_is_accurate_near_zero():
    x = mx.array([-1e-6, -0.1, -0.6931, -0.7, -3.0, -30.0])
    expected = [math.log(-math.expm1(v)) for v in x.tolist()]
    assert log1mexp(x).tolist() == pytest.approx(expected, rel=1e-5)
    # the naive form loses three digits at -1e-6 in float32
    naive = mx.log1p(-mx.exp(mx.array(-1e-6))).item()
    assert abs(naive - expected[0]) > 1e-4


# ------------------------------------------------------------------ log-probabilities and gradients
def full_vocabulary_logps(model, tokens, offsets, lengths):
    """Each row's summed log-probability of targets [offset, length), the plain way: every
    position through the vocabulary, log-softmax, gather, mask."""
    logits = model(tokens[:, :-1]).astype(mx.float32)
    token_logp = mx.take_along_axis(logits - mx.logsumexp(logits, axis=-1, keepdims=True),
                                    tokens[:, 1:, None], axis=-1)[..., 0]
    steps = mx.arange(1, tokens.shape[1])
    mask = (steps >= offsets[:, None]) & (steps < lengths[:, None])
    return (token_logp * mask).sum(axis=1), mask.sum(axis=1)


def test_sequence_logps_and_their_gradient_match_the_full_vocabulary_computation(tiny_model_dir, pairs_dir,
                                                                                 monkeypatch):
    model, tokenizer = adapted(tiny_model_dir)
    for layer in lora_layers(model):  # trained-looking adapters: gradients flow to A and B
        layer.lora_b = 0.05 * mx.random.normal(layer.lora_b.shape)
    pairs = tokenize_pairs(read_pairs(pairs_dir / "train.jsonl"), tokenizer, 512)
    pairs[1] = pairs[1]._replace(rejected=(pairs[1].rejected[0] + [198] * 40, pairs[1].rejected[1]))
    indices = [0, 1, 2]
    batch = collate_pairs(pairs, indices, 512)
    items = [pairs[i].chosen for i in indices] + [pairs[i].rejected for i in indices]
    offsets = mx.array([offset for _, offset in items])
    lengths = mx.array([len(tokens) for tokens, _ in items])
    assert batch.tokens.shape[1] > int(lengths.max().item())  # padded

    logps, ntoks = sequence_logps(model, *batch)
    plain, plain_ntoks = full_vocabulary_logps(model, batch.tokens, offsets, lengths)
    assert ntoks.tolist() == plain_ntoks.tolist() == (lengths - offsets).tolist()
    assert np.allclose(logps, plain, rtol=1e-5)
    # an architecture without a plain vocabulary head: every position through the model
    with monkeypatch.context() as patch:
        patch.setattr("voicetune.train.preference.vocabulary_head", lambda model: None)
        assert np.allclose(sequence_logps(model, *batch)[0], plain, rtol=1e-5)

    reference = logps - 0.3  # any fixed reference
    weights = mx.random.normal((6,))

    def ours(model):
        return batch_loss(model, *batch, reference, method="dpo", beta=0.5)[0] + \
            (sequence_logps(model, *batch)[0] * weights).sum() * 1e-3

    def theirs(model):
        logps = full_vocabulary_logps(model, batch.tokens, offsets, lengths)[0]
        outcome = dpo_loss(0.5, logps[:3], logps[3:], reference[:3], reference[3:])
        return outcome.loss + (logps * weights).sum() * 1e-3

    value, grads = nn.value_and_grad(model, ours)(model)
    plain_value, plain_grads = nn.value_and_grad(model, theirs)(model)
    assert value.item() == pytest.approx(plain_value.item(), rel=1e-5)
    grads, plain_grads = dict(tree_flatten(grads)), dict(tree_flatten(plain_grads))
    assert grads.keys() == plain_grads.keys() and len(grads) == 16  # A and B of 4 modules x 2 layers
    for name, g in grads.items():
        scale = mx.abs(plain_grads[name]).max().item()
        assert scale > 0, name  # float32 sums in another order: equal to ~1e-5 of the largest
        assert mx.abs(g - plain_grads[name]).max().item() < 1e-4 * scale, name


def test_the_reference_is_the_step_0_policy_and_the_adapters_switched_off(tiny_model_dir, pairs_dir):
    model, tokenizer = adapted(tiny_model_dir, dropout=0.1)
    pairs = tokenize_pairs(read_pairs(pairs_dir / "valid.jsonl"), tokenizer, 512)
    batches = pair_batches(pairs, 3)  # 4 pairs: 3 + 1
    with adapters_off(model):
        reference, ntoks = pair_logps(model, pairs, batches, 512)
    policy, _ = pair_logps(model, pairs, batches, 512)
    # B = 0: the new adapters add exactly nothing, so the step-0 DPO loss is log 2
    assert np.array_equal(policy, reference) and np.isfinite(reference).all()
    stats = evaluate_pairs("dpo", 0.1, policy, ntoks, reference)
    assert stats["loss"] == pytest.approx(LOG2, abs=1e-7)
    assert (stats["reward_accuracy"], stats["reward_margin"]) == (0.0, 0.0)

    for layer in lora_layers(model):  # "trained": switched off, they still give the reference
        layer.lora_b = 0.05 * mx.random.normal(layer.lora_b.shape)
    with adapters_off(model):
        assert np.array_equal(pair_logps(model, pairs, batches, 512)[0], reference)
    assert not np.array_equal(pair_logps(model, pairs, batches, 512)[0], reference)
    assert all(layer.scale == 20.0 for layer in lora_layers(model))


# ------------------------------------------------------------------ the pairs files
def test_bad_pairs_are_named_with_file_and_line(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [
        {"prompt": "Reef?", "chosen": "Aye.", "rejected": "No."},
        {"prompt": "Reef?", "chosen": "Aye."},
        "{not json",
        {"prompt": " ", "chosen": "Aye.", "rejected": "No.", "system": 3},
    ])
    with pytest.raises(JsonlError) as err:
        read_pairs(path)
    text = str(err.value)
    assert text.startswith("3 bad pairs:")
    assert f"{path}:2: rejected: expected strings" in text and f"{path}:3: malformed JSON" in text
    assert f"{path}:4: prompt, system: expected strings" in text
    with pytest.raises(JsonlError, match="not found; the pairs stage writes it"):
        read_pairs(tmp_path / "valid.jsonl")
    # a prompt that leaves no answer token within max_seq_length is refused, not trained on
    rows = [{"prompt": "Reef? " * 50, "chosen": "Aye.", "rejected": "No."}]
    assert len(tokenize_pairs(rows, tokenizer, 512)) == 1
    with pytest.raises(PreferenceError, match=r"1 pairs keep no answer token within "
                                              r"preference.max_seq_length=32: pair 1 \(prompt"):
        tokenize_pairs(rows, tokenizer, 32)


# ------------------------------------------------------------------ the stage
def stage_params(**preference):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["preference"].update({
        "method": "dpo", "beta": 0.1, "learning_rate": 1e-3, "iters": 12, "batch_size": 4,
        "steps_per_eval": 3, "save_every": 100, "max_seq_length": 512, "seed": 0,
        "early_stopping": {"patience": 5, "min_delta": 0.001},
        "lora": {"rank": 4, "scale": 20.0, "dropout": 0.0, "keys": ATTENTION, "num_layers": -1}})
    params["preference"].update(preference)
    return params


def run_preference(tmp_path, model_dir, pairs_dir, params, name="run", wait=True, prefix=None):
    return run_stage("preference", "preference.json", tmp_path, model_dir, pairs_dir, params, name, wait,
                     prefix)


def curve(folder: Path, name: str) -> list[tuple[int, float]]:
    lines = (folder / f"live/plots/metrics/{name}.tsv").read_text().splitlines()[1:]
    return [(int(line.split("\t")[0]), float(line.split("\t")[-1])) for line in lines]


def recomputed_val_loss(model_dir, adapters, pairs_dir, method="dpo", beta=0.1, batch_size=4):
    """The validation loss of saved adapters, from scratch: reference = the model alone."""
    model, tokenizer, _ = load_float32(model_dir)
    pairs = tokenize_pairs(read_pairs(pairs_dir / "valid.jsonl"), tokenizer, 512)
    batches = pair_batches(pairs, batch_size)
    reference, _ = pair_logps(model, pairs, batches, 512)
    tuned, _, _ = load_float32(model_dir, adapters)
    logps, ntoks = pair_logps(tuned, pairs, batches, 512)
    return evaluate_pairs(method, beta, logps, ntoks, reference)["loss"]


def test_dpo_learns_an_easy_preference_and_the_adapters_load(tmp_path, tiny_model_dir, pairs_dir):
    folder, result = run_preference(tmp_path, tiny_model_dir, pairs_dir, stage_params())
    assert result.returncode == 0, result.stderr
    # 12 iterations, a validation every 3: patience 5 cannot act, and the stage says so
    assert "warning: preference.early_stopping.patience=5 can never stop a run early" in result.stderr
    summary = json.loads((folder / "preference.json").read_text())
    assert (summary["method"], summary["train_pairs"], summary["valid_pairs"]) == ("dpo", 12, 4)
    # step 0: the policy is the reference
    assert summary["base_val_loss"] == pytest.approx(LOG2, abs=1e-7)
    assert summary["base_val_reward_accuracy"] == 0.0
    assert summary["best_val_loss"] < 0.1 and summary["best_val_reward_accuracy"] == 1.0
    assert summary["best_val_reward_margin"] > 1
    assert (summary["best_iteration"], summary["stopped_at"], summary["stop_reason"]) == (12, 12, "iters_done")
    assert summary["trainable_parameters"] == 2 * 4 * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64))
    assert summary["environment"]["mlx"] and summary["peak_memory_gb"] > 0
    assert not (folder / "checkpoint").exists()
    # the training loss starts at log 2 too (the compiled step, in training mode)
    train_loss = curve(folder, "train_loss")
    assert train_loss[0][0] == 1 and train_loss[0][1] == pytest.approx(LOG2, abs=1e-5)
    assert [step for step, _ in curve(folder, "val_loss")] == [0, 3, 6, 9, 12]
    assert curve(folder, "val_reward_accuracy")[-1][1] == 1.0

    config = json.loads((folder / "adapters/adapter_config.json").read_text())
    assert config["model"] == str(tiny_model_dir) and config["num_layers"] == 2
    assert config["lora_parameters"] == {"rank": 4, "scale": 20.0, "dropout": 0.0, "keys": ATTENTION}
    # the saved adapters are the best validation's, and load both ways on the fused model
    assert recomputed_val_loss(tiny_model_dir, folder / "adapters", pairs_dir) == \
        pytest.approx(summary["best_val_loss"], abs=1e-5)
    prompt = mx.array([[1, 504, 3458, 30, 2]])
    base = load_float32(tiny_model_dir)[0](prompt)
    tuned = load_float32(tiny_model_dir, folder / "adapters")[0](prompt)
    via_mlx_lm = load(str(tiny_model_dir), adapter_path=str(folder / "adapters"))[0](prompt)
    assert mx.abs(tuned - base).max().item() > 1e-3
    assert mx.allclose(via_mlx_lm.astype(mx.float32), tuned, atol=1e-4).item()


def test_orpo_runs_without_a_reference(tmp_path, tiny_model_dir, pairs_dir):
    folder, result = run_preference(tmp_path, tiny_model_dir, pairs_dir, stage_params(method="orpo"))
    assert result.returncode == 0, result.stderr
    summary = json.loads((folder / "preference.json").read_text())
    assert summary["method"] == "orpo" and summary["reference_seconds"] == 0.0
    # the chosen answers' NLL dominates at the start (a random model: ~log(49152) per token)
    assert 8 < summary["base_val_loss"] < 12
    assert summary["best_val_loss"] < summary["base_val_loss"] - 1
    assert summary["best_val_reward_accuracy"] == 1.0 and summary["best_val_reward_margin"] > 0
    assert recomputed_val_loss(tiny_model_dir, folder / "adapters", pairs_dir, "orpo") == \
        pytest.approx(summary["best_val_loss"], abs=1e-4)


def test_early_stop_keeps_the_best_adapter(tiny_model_dir, pairs_dir, tmp_path, monkeypatch):
    # The stopping rule on a given sequence of validation losses, with the default kernels
    # (kernels.fast_cpu: auto; a real run's wobble depends on float rounding, so it cannot
    # say when the rule should fire). Patience 2, min_delta 0.01, a validation every 2 steps:
    # step 6 is the lowest loss but no significant improvement on step 4's 0.50 (the
    # reference), step 8 is worse: 2 evaluations without one, stop at 8, keep step 6's adapter.
    losses = iter([LOG2, 0.60, 0.50, 0.495, 0.52, 0.1])  # at steps 0, 2, 4, ...
    real = preference.evaluate_pairs
    validated = {}

    def given(*args):
        return {**real(*args), "loss": next(losses)}

    def log(record):  # after the best adapter is saved: the adapter each validation saw
        if "val_loss" in record:
            validated[record["step"]] = {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}

    monkeypatch.setattr(preference, "evaluate_pairs", given)
    cfg = PreferenceConfig.from_params(validate(stage_params(
        method="dpo", beta=0.1, learning_rate=1e-3, iters=40, batch_size=4, steps_per_eval=2, save_every=100,
        max_seq_length=512, early_stopping={"patience": 2, "min_delta": 0.01}))["preference"])
    with kernels.enabled(yaml.safe_load((ROOT / "params.yaml").read_text())["kernels"]["fast_cpu"]):
        model, tokenizer = adapted(tiny_model_dir)
        pairs = {name: tokenize_pairs(read_pairs(pairs_dir / f"{name}.jsonl"), tokenizer, 512)
                 for name in ("train", "valid")}
        checkpoint = Checkpoint(tmp_path / "checkpoint", "fp")
        result = train_preference(model, pairs["train"], pairs["valid"], cfg, checkpoint, log=log)
    assert (result.stop_reason, result.stopped_at, result.best_iteration) == ("early_stop", 8, 6)
    assert result.best["val_loss"] == 0.495 and sorted(validated) == [0, 2, 4, 6, 8]
    kept = mx.load(str(checkpoint.best_file))
    assert kept.keys() == validated[6].keys()
    assert all(np.array_equal(kept[k], validated[6][k]) for k in kept)
    assert not all(np.array_equal(kept[k], validated[8][k]) for k in kept)  # not the last


def first_stop(section: dict) -> int:
    """The step at which ``section``'s early stopping stops a run whose validation loss never
    improves (validations as the loops run them: every steps_per_eval steps and at the end)."""
    stopping = EarlyStopping(section["early_stopping"]["patience"], section["early_stopping"]["min_delta"])
    stopping.update(LOG2, 0)
    for step in range(1, section["iters"] + 1):
        if step % section["steps_per_eval"] == 0 or step == section["iters"]:
            stopping.update(LOG2, step)
            if stopping.should_stop:
                return step
    return section["iters"]


def test_the_default_early_stopping_can_stop_a_run_early():
    # a default that cannot act is no default: params.yaml's must be able to stop a run that
    # does not improve before its last step
    default = yaml.safe_load((ROOT / "params.yaml").read_text())["preference"]
    assert first_stop(default) < default["iters"]
    # and a setting that cannot is flagged (the stages print it as a warning)
    from voicetune.core.params import early_stopping_problem

    assert early_stopping_problem("preference", default) is None
    never = {**default, "iters": 6, "steps_per_eval": 3, "early_stopping": {"patience": 2, "min_delta": 0.001}}
    assert first_stop(never) == 6
    assert early_stopping_problem("preference", never) == (
        "preference.early_stopping.patience=2 can never stop a run early: 1 validation before the "
        "last step (preference.iters=6, preference.steps_per_eval=3); lower the patience to 1 or "
        "validate more often")
    for iters, every, patience in [(6, 2, 2), (7, 3, 2), (6, 3, 1), (6, 6, 1), (40, 20, 5), (2000, 50, 5)]:
        section = {**default, "iters": iters, "steps_per_eval": every,
                   "early_stopping": {"patience": patience, "min_delta": 0.0}}
        assert (early_stopping_problem("preference", section) is None) == (first_stop(section) < iters), \
            (iters, every, patience)


def test_when_nothing_beats_step_0_the_adapters_change_nothing(tmp_path, tiny_model_dir, pairs_dir):
    # held-out pairs that prefer the opposite: every validation is worse than step 0's
    flipped = tmp_path / "flipped"
    flipped.mkdir()
    (flipped / "train.jsonl").write_bytes((pairs_dir / "train.jsonl").read_bytes())
    write_jsonl(flipped / "valid.jsonl", pair_rows(questions()[12:], chosen=BAD, rejected=GOOD))
    params = stage_params(steps_per_eval=2, early_stopping={"patience": 2, "min_delta": 0.0})
    folder, result = run_preference(tmp_path, tiny_model_dir, flipped, params)
    assert result.returncode == 0, result.stderr
    summary = json.loads((folder / "preference.json").read_text())
    assert (summary["best_iteration"], summary["stopped_at"], summary["stop_reason"]) == (0, 4, "early_stop")
    assert summary["best_val_loss"] == summary["base_val_loss"] == pytest.approx(LOG2, abs=1e-7)
    assert "no validation beat step 0" in result.stderr
    adapters = mx.load(str(folder / "adapters/adapters.safetensors"))
    assert all(mx.all(w == 0).item() for name, w in adapters.items() if name.endswith("lora_b"))


# ------------------------------------------------------------------ crash safety
KILL_PARAMS = dict(iters=40, steps_per_eval=5, save_every=5, learning_rate=3e-3)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir, pairs_dir) -> Path:
    folder, result = run_preference(tmp_path_factory.mktemp("preference"), tiny_model_dir, pairs_dir,
                                    stage_params(**KILL_PARAMS), "reference")
    assert result.returncode == 0, result.stderr
    return folder


# killed as step 17 begins (the checkpoint of step 15 whole), or right after the second
# checkpoint's tensors are in place (step 10's; a checkpoint written as two files had step
# 5's progress beside them)
@pytest.mark.parametrize("kill, resumed_from", [(("iteration", 17), 15), (("state_write", 2), 10)],
                         ids=["mid-run", "right-after-the-tensors"])
def test_kill_9_then_resume_gives_the_same_adapter(tmp_path, tiny_model_dir, pairs_dir, uninterrupted,
                                                   kill, resumed_from):
    params = stage_params(**KILL_PARAMS)
    folder, killed = run_preference(tmp_path, tiny_model_dir, pairs_dir, params, "killed",
                                    prefix=killing(tmp_path, kill))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (folder / "adapters").exists()

    _, resumed = run_preference(tmp_path, tiny_model_dir, pairs_dir, params, "killed")
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((folder / "preference.json").read_text())
    expected = json.loads((uninterrupted / "preference.json").read_text())
    # CPU arithmetic is deterministic, the reference is recomputed and the state restored:
    # every loss and the adapter's bytes are the uninterrupted run's
    assert curve(folder, "val_loss") == curve(uninterrupted, "val_loss")
    assert curve(folder, "train_loss") == curve(uninterrupted, "train_loss")
    for key in ("base_val_loss", "best_val_loss", "best_val_reward_accuracy", "best_val_reward_margin",
                "best_iteration", "stopped_at", "stop_reason"):
        assert summary[key] == expected[key], key
    assert (folder / "adapters/adapters.safetensors").read_bytes() == \
        (uninterrupted / "adapters/adapters.safetensors").read_bytes()
    assert f"resuming from the checkpoint at iteration {resumed_from}" in resumed.stdout
    assert summary["resumed_from"] == resumed_from


def test_a_nan_stops_the_run_and_leaves_the_last_outputs_untouched(tmp_path, tiny_model_dir, pairs_dir):
    def run(params, prefix=None):
        return run_preference(tmp_path, tiny_model_dir, pairs_dir, params, prefix=prefix)

    folder, result, _ = fail_after_a_good_run(run, stage_params(iters=4, steps_per_eval=2),
                                              stage_params(iters=8, steps_per_eval=2), "preference",
                                              "train_preference", 4, "preference.json")
    assert "preference: training loss is nan at iteration 5; the best adapter so far (iteration 4" in result.stderr
    best = folder / "checkpoint/best_adapters.safetensors"
    kept = mx.load(str(best))
    assert kept and all(mx.isfinite(w).all().item() for w in kept.values())


def test_no_validation_pairs_is_a_message(tmp_path, tiny_model_dir, pairs_dir):
    empty = tmp_path / "pairs"
    empty.mkdir()
    (empty / "train.jsonl").write_bytes((pairs_dir / "train.jsonl").read_bytes())
    (empty / "valid.jsonl").write_text("")
    folder, result = run_preference(tmp_path, tiny_model_dir, empty, stage_params())
    assert result.returncode == 1
    assert result.stderr.startswith("preference: no validation pairs") and "Traceback" not in result.stderr
    assert not (folder / "adapters").exists() and not (folder / "preference.json").exists()
