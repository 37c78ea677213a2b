"""Training: LoRA targets, early stopping and the best adapter, crash-safe resume,
non-finite losses, prompt masking. On a 2-layer random Llama with the real tokenizer."""
import json
import math
import os
import shutil
import signal
import types
from dataclasses import asdict
from pathlib import Path

import pytest

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm import load
from mlx_lm.tuner.datasets import CacheDataset, load_local_dataset

from voicetune.core.params import validate
from voicetune.models.lora import LoRAConfigError, apply_lora, linear_module_names, parameter_counts
from voicetune.train.batching import collate
from voicetune.train.checkpoint import Checkpoint, Progress
from voicetune.train.early_stopping import EarlyStopping
from voicetune.train.loop import TrainingError
from voicetune.train.sft import (TrainConfig, masked_loss, run_fingerprint, sample_batches, train,
                                 train_batches, validation_loss, validation_stats)

from tests.conftest import ROOT
from tests.harness.faults import fail_after_a_good_run, snapshot
from tests.harness.training import ATTENTION, run_train, train_params

def curve(folder: Path, name: str) -> list[tuple[int, float]]:
    lines = (folder / f"live/plots/metrics/{name}.tsv").read_text().splitlines()[1:]
    return [(int(line.split("\t")[0]), float(line.split("\t")[-1])) for line in lines]


def datasets(model_dir, data_dir, mask_prompt=True):
    model, tokenizer = load(str(model_dir))
    train_set, valid_set, _ = load_local_dataset(
        Path(data_dir), tokenizer, types.SimpleNamespace(mask_prompt=mask_prompt))
    return model, tokenizer, CacheDataset(train_set), CacheDataset(valid_set)


# ------------------------------------------------------------------ LoRA targets
def test_bad_lora_key_fails_with_the_module_list(tiny_model_dir):
    model, _ = load(str(tiny_model_dir))
    with pytest.raises(LoRAConfigError) as err:
        apply_lora(model, 4, 20.0, 0.0, ["self_attn.qkv_proj", "self_attn.o_proj"], -1)
    text = str(err.value)
    assert "['self_attn.qkv_proj']" in text
    for name in ATTENTION + ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]:
        assert name in text


def test_lora_counts_and_layers(tiny_model_dir):
    model, _ = load(str(tiny_model_dir))
    assert linear_module_names(model, 2) == sorted(ATTENTION + ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"])
    config = apply_lora(model, 4, 20.0, 0.0, ["self_attn.o_proj"], 1)
    trainable, total = parameter_counts(model)
    assert trainable == 4 * (64 + 64)  # one o_proj (64 -> 64) in the last layer, rank 4
    assert config == {"fine_tune_type": "lora", "num_layers": 1,
                      "lora_parameters": {"rank": 4, "scale": 20.0, "dropout": 0.0, "keys": ["self_attn.o_proj"]}}
    with pytest.raises(LoRAConfigError, match="num_layers=3"):
        apply_lora(load(str(tiny_model_dir))[0], 4, 20.0, 0.0, ["self_attn.o_proj"], 3)


# ------------------------------------------------------------------ early stopping
def run_stopping(losses, patience, min_delta):
    """Feed ``losses`` to an EarlyStopping; the number of evaluations it took to stop (None)."""
    stop = EarlyStopping(patience=patience, min_delta=min_delta)
    for i, loss in enumerate(losses):
        stop.update(loss, i)
        if stop.should_stop:
            return stop, i
    return stop, None


def test_early_stopping_rule():
    stop = EarlyStopping(patience=2, min_delta=0.1)
    assert stop.update(3.0, 0) and not stop.should_stop
    assert stop.update(2.95, 10)  # a new best, but not by min_delta: patience runs on
    assert stop.bad_evals == 1 and stop.best_iter == 10
    assert not stop.update(3.5, 20) and stop.should_stop
    assert (stop.best_loss, stop.best_iter) == (2.95, 10)


def test_early_stopping_measures_patience_from_the_last_significant_improvement():
    # Keras/Lightning: small steps that add up to more than min_delta are an improvement.
    # The old rule moved its reference on every small step and stopped this steady run.
    steady = [1.0 - 0.0009 * i for i in range(12)]
    stop, stopped = run_stopping(steady, patience=2, min_delta=0.001)
    assert stopped is None and stop.bad_evals <= 1
    assert (stop.best_loss, stop.best_iter) == (steady[-1], 11)
    # 1.0, 0.9995, 0.999, 0.9985: the third is 0.0015 below the reference 1.0, a significant
    # improvement that resets patience (the old rule stopped here with patience 3)
    stop, stopped = run_stopping([1.0, 0.9995, 0.999, 0.9985], patience=3, min_delta=0.001)
    assert stopped is None and stop.bad_evals == 0
    assert (stop.reference, stop.best_loss, stop.best_iter) == (0.9985, 0.9985, 3)
    # improving too little to count: stops after `patience` evaluations, and the best kept
    # is still the lowest loss (0.9993), not the reference (1.0)
    stop, stopped = run_stopping([1.0, 0.9995, 0.9993, 0.9991], patience=2, min_delta=0.001)
    assert stopped == 2 and stop.reference == 1.0
    assert (stop.best_loss, stop.best_iter) == (0.9993, 2)


def test_early_stopping_state_survives_a_checkpoint(tmp_path):
    stop, _ = run_stopping([1.0, 0.9995, 0.9993], patience=5, min_delta=0.001)
    Checkpoint(tmp_path, "fp").save(Progress(iteration=3, stopping=asdict(stop)), {"model.w": mx.array([1])})
    restored = EarlyStopping(**Checkpoint(tmp_path, "fp").load()[0].stopping)
    assert restored == stop and (restored.reference, restored.best_loss, restored.bad_evals) == (1.0, 0.9993, 2)


# ------------------------------------------------------------------ batches: every sample
def test_validation_and_epochs_use_every_sample(tiny_model_dir, tiny_data_dir):
    model, _, train_set, valid_set = datasets(tiny_model_dir, tiny_data_dir)
    batches = sample_batches(valid_set, 3)  # 8 samples: 3 + 3 + 2
    assert sorted(i for b in batches for i in b) == list(range(8)) and len(batches[-1]) == 2
    # the validation loss is the mean over the tokens of every sample
    per_sample = [masked_loss(model, *collate(valid_set, [i], 512)) for i in range(8)]
    tokens = sum(n.item() for _, n in per_sample)
    expected = sum(loss.item() * n.item() for loss, n in per_sample) / tokens
    assert validation_loss(model, valid_set, 3, 512) == pytest.approx(expected, rel=1e-5)
    stats = validation_stats(model, valid_set, 3, 512)
    assert (stats.samples, stats.tokens) == (8, tokens)
    # an epoch trains on each of the 32 samples once: 6 batches of 5 and one of 2
    epoch = [next(it) for it in [train_batches(train_set, 5, 512, seed=0)] for _ in range(7)]
    assert sorted(b.tokens.shape[0] for b in epoch) == [2, 5, 5, 5, 5, 5, 5]
    assert sum(b.target_weight.sum().item() for b in epoch) == \
        sum(collate(train_set, [i], 512).target_weight.sum().item() for i in range(32))


def test_a_process_without_rows_trains_nothing(tiny_model_dir, tiny_data_dir):
    # 33 samples, batches of 4 over 2 processes: the last batch has one row, for rank 0 only;
    # rank 1 gets a batch that trains nothing, so it can still join the collective step
    model, _, train_set, _ = datasets(tiny_model_dir, tiny_data_dir)
    subset = [train_set[i] for i in range(32)] + [train_set[0]]
    per_rank = [[next(it) for _ in range(9)] for it in
                (train_batches(subset, 4, 512, seed=1, rank=r, size=2) for r in (0, 1))]
    rows = [[b.tokens.shape[0] if b.target_weight.sum().item() else 0 for b in r] for r in per_rank]
    assert sum(rows[0]) + sum(rows[1]) == 33 and sorted(rows[1])[0] == 0
    empty = per_rank[1][rows[1].index(0)]
    loss, ntoks = masked_loss(model, *empty)
    assert (loss.item(), ntoks.item(), empty.lengths[:, 1].sum().item()) == (0.0, 0, 0)
    grads = nn.value_and_grad(model, masked_loss)(model, *empty)[1]
    assert all(mx.all(g == 0).item() for _, g in tree_flatten(grads))


def test_early_stop_keeps_the_best_adapter(tmp_path, tiny_model_dir, tiny_data_dir):
    # a random model at lr 3e-3: validation loss falls, then wobbles up; early stopping must
    # fire and the adapter kept must be the best one, not the last
    params = train_params(iters=200, steps_per_eval=5, early_stopping={"patience": 2, "min_delta": 0.0})
    folder, result = run_train(tmp_path, tiny_model_dir, tiny_data_dir, params)
    assert result.returncode == 0, result.stderr
    summary = json.loads((folder / "train.json").read_text())
    assert summary["stop_reason"] == "early_stop" and summary["stopped_at"] < 200
    assert summary["stopped_at"] == summary["best_iteration"] + 2 * 5
    assert not (folder / "checkpoint").exists()

    model, _, _, valid_set = datasets(tiny_model_dir, tiny_data_dir)
    from mlx_lm.tuner.utils import load_adapters

    load_adapters(model, str(folder / "adapters"))
    model.eval()
    again = validation_loss(model, valid_set, 2, 512)
    assert again == pytest.approx(summary["best_val_loss"], abs=1e-5)
    assert summary["best_val_loss"] < summary["base_val_loss"]
    vals = [float(line.split("\t")[-1]) for line in
            (folder / "live/plots/metrics/val_loss.tsv").read_text().splitlines()[1:]]
    assert min(vals) == pytest.approx(summary["best_val_loss"]) and vals[-1] > min(vals)


# ------------------------------------------------------------------ crash safety
# a checkpoint every 5 iterations, a report every 4: a checkpoint falls inside report windows
KILL_PARAMS = dict(iters=40, save_every=5, steps_per_report=4)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir, tiny_data_dir) -> Path:
    """The run that the killed and resumed runs must reproduce exactly."""
    folder, result = run_train(tmp_path_factory.mktemp("train"), tiny_model_dir, tiny_data_dir,
                               train_params(**KILL_PARAMS), "reference")
    assert result.returncode == 0, result.stderr
    return folder


def assert_same_run(folder: Path, reference: Path) -> None:
    """Everything a resumed run computes equals the uninterrupted run's: summary, adapter
    bytes (CPU arithmetic is deterministic and the state is restored exactly) and every
    logged loss, value for value."""
    summary = json.loads((folder / "train.json").read_text())
    expected = json.loads((reference / "train.json").read_text())
    for key in ("best_val_loss", "best_iteration", "base_val_loss", "stopped_at", "stop_reason"):
        assert summary[key] == expected[key], key
    assert (folder / "adapters/adapters.safetensors").read_bytes() == \
        (reference / "adapters/adapters.safetensors").read_bytes()
    for name in ("val_loss", "train_loss"):
        assert curve(folder, name) == curve(reference, name), name


def test_kill_9_then_resume_gives_the_same_adapter(tmp_path, tiny_model_dir, tiny_data_dir, uninterrupted):
    params = train_params(**KILL_PARAMS)
    # killed as step 17 begins: the checkpoint of step 15 is the last, mid report window (13-16)
    folder, killed = run_train(tmp_path, tiny_model_dir, tiny_data_dir, params, "killed", kill=("iteration", 17))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (folder / "adapters").exists() and not (folder / "train.json").exists()

    _, resumed = run_train(tmp_path, tiny_model_dir, tiny_data_dir, params, "killed")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from the checkpoint at iteration 15" in resumed.stdout
    assert json.loads((folder / "train.json").read_text())["resumed_from"] == 15
    assert_same_run(folder, uninterrupted)


def test_a_kill_right_after_the_checkpoint_tensors_are_written(tmp_path, tiny_model_dir, tiny_data_dir,
                                                               uninterrupted):
    # the window of a checkpoint written as two files: step 10's tensors in place, step 5's
    # progress (iteration, early stopping, history) still beside them. One file has no window:
    # the checkpoint is step 10's, whole.
    params = train_params(**KILL_PARAMS)
    folder, killed = run_train(tmp_path, tiny_model_dir, tiny_data_dir, params, "killed", kill=("state_write", 2))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    _, resumed = run_train(tmp_path, tiny_model_dir, tiny_data_dir, params, "killed")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(folder, uninterrupted)
    assert json.loads((folder / "train.json").read_text())["resumed_from"] == 10


class Killed(BaseException):
    """Stands for kill -9: nothing after it runs (no except or finally cleans up on disk)."""


def test_a_checkpoint_is_whole_wherever_its_save_is_killed(tmp_path, monkeypatch):
    # every filesystem change of a save, in turn, is the last one before the process dies:
    # what loads afterwards is step 5's checkpoint or step 10's, never a mix of the two
    real_replace, real_save = os.replace, mx.save_safetensors
    left = []
    for kill_at in range(1, 10):
        folder = tmp_path / str(kill_at)
        Checkpoint(folder, "fp").save(Progress(iteration=5), {"model.w": mx.array([5])})
        changes = []

        def counted(real):
            def change(*args, **kwargs):
                real(*args, **kwargs)
                changes.append(args)
                if len(changes) == kill_at:
                    raise Killed
            return change

        monkeypatch.setattr(os, "replace", counted(real_replace))
        monkeypatch.setattr(mx, "save_safetensors", counted(real_save))
        try:
            Checkpoint(folder, "fp").save(Progress(iteration=10), {"model.w": mx.array([10])})
        except Killed:
            pass
        monkeypatch.undo()
        progress, tensors = Checkpoint(folder, "fp").load()
        assert tensors["model.w"].item() == progress.iteration, f"killed after change {kill_at}"
        left += folder.glob("*tmp*")
        if len(changes) < kill_at:  # the save ran to its end without being killed
            assert progress.iteration == 10
            break
    assert not left, "a killed save's temporary file is left behind"


def test_the_best_adapter_file_has_the_same_bytes_whatever_its_tensors_order(tmp_path):
    # a resumed run whose best adapter predates its checkpoint writes it from the checkpoint's
    # file, in the order mx.load gives; the uninterrupted run wrote it in the model's order
    tensors = {f"layers.{i}.lora_{ab}": mx.array([float(i), 1.0]) for i in range(12) for ab in "ab"}
    files = []
    for name, items in (("model", tensors.items()), ("reversed", reversed(tensors.items()))):
        Checkpoint(tmp_path / name, "fp").save_best(dict(items))
        files.append((tmp_path / name / "best_adapters.safetensors").read_bytes())
    assert files[0] == files[1]


def test_checkpoint_of_other_params_is_not_resumed(tmp_path, capsys):
    Checkpoint(tmp_path, "params-A").save(Progress(iteration=7), {"model.w": mx.array([1, 2])})
    assert Checkpoint(tmp_path, "params-A").load()[0].iteration == 7
    assert Checkpoint(tmp_path, "params-B").load() is None
    assert not tmp_path.exists() and "other params" in capsys.readouterr().out


# ------------------------------------------------------------------ non-finite loss
def test_non_finite_loss_stops_cleanly_and_keeps_the_best(tmp_path, tiny_model_dir, tiny_data_dir):
    model, _, train_set, valid_set = datasets(tiny_model_dir, tiny_data_dir)
    mx.random.seed(0)
    apply_lora(model, 4, 20.0, 0.0, ATTENTION, -1)
    cfg = TrainConfig.from_params(validate(train_params(
        iters=30, batch_size=2, learning_rate=1e-3, steps_per_eval=4, steps_per_report=6, save_every=4,
        seed=0, max_seq_length=2048, early_stopping={"patience": 5, "min_delta": 0.001}))["train"])
    checkpoint = Checkpoint(tmp_path / "ckpt", "fp")

    def poison(record):  # fault injection: after step 6 a LoRA weight turns NaN
        if record["step"] == 6 and "train_loss" in record:
            lora_a = model.layers[0].self_attn.q_proj.lora_a
            model.layers[0].self_attn.q_proj.lora_a = lora_a * math.nan

    with pytest.raises(TrainingError, match=r"training loss is nan at iteration 7.*best adapter so "
                                            r"far \(iteration 4"):
        train(model, train_set, valid_set, cfg, checkpoint, log=poison)
    best = mx.load(str(checkpoint.best_file))
    assert best and all(mx.isfinite(w).all().item() for w in best.values())


# ------------------------------------------------------------------ prompt masking
def test_prompt_masking_counts_only_the_assistant_tokens(tiny_model_dir, tiny_data_dir):
    model, tokenizer, train_set, _ = datasets(tiny_model_dir, tiny_data_dir)
    messages = [json.loads(line)["messages"] for line in (tiny_data_dir / "train.jsonl").open()][:4]
    batch = collate(train_set, [0, 1, 2, 3], 512)
    tokens = batch.tokens
    loss, ntoks = masked_loss(model, *batch)
    # the full-logits path (architectures without a plain vocabulary head) agrees
    full_loss, full_ntoks = masked_loss(model, batch.tokens, batch.lengths)
    assert full_ntoks.item() == ntoks.item()
    assert full_loss.item() == pytest.approx(loss.item(), rel=1e-5)

    prompt_lens = [len(tokenizer.apply_chat_template(m[:2], add_generation_prompt=True, return_dict=False))
                   for m in messages]
    full_lens = [len(tokenizer.apply_chat_template(m, return_dict=False)) for m in messages]
    assert ntoks.item() == sum(f - p for f, p in zip(full_lens, prompt_lens))

    # the same loss by hand: cross-entropy over assistant tokens only
    logits = model(tokens[:, :-1]).astype(mx.float32)
    ce = nn.losses.cross_entropy(logits, tokens[:, 1:])
    manual = sum(ce[i, p - 1:f - 1].sum().item() for i, (p, f) in enumerate(zip(prompt_lens, full_lens)))
    assert loss.item() == pytest.approx(manual / ntoks.item(), rel=1e-5)

    _, _, unmasked, _ = datasets(tiny_model_dir, tiny_data_dir, mask_prompt=False)
    _, all_toks = masked_loss(model, *collate(unmasked, [0, 1, 2, 3], 512))
    assert all_toks.item() == sum(f - 1 for f in full_lens)  # every target but the first token


def test_trained_adapter_loads_in_mlx_lm(tmp_path, tiny_model_dir, tiny_data_dir):
    folder, result = run_train(tmp_path, tiny_model_dir, tiny_data_dir, train_params(iters=6, steps_per_eval=3))
    assert result.returncode == 0, result.stderr
    config = json.loads((folder / "adapters/adapter_config.json").read_text())
    assert config["lora_parameters"]["keys"] == ATTENTION and config["num_layers"] == 2
    model, tokenizer = load(str(tiny_model_dir), adapter_path=str(folder / "adapters"))
    summary = json.loads((folder / "train.json").read_text())
    # rank 4 on q (64->64), k and v (64->32: 2 kv heads of 16), o (64->64), in 2 layers
    assert summary["trainable_parameters"] == 2 * 4 * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64))
    assert summary["stop_reason"] == "iters_done" and summary["stopped_at"] == 6


# ------------------------------------------------------------------ what a checkpoint belongs to
def test_checkpoint_of_another_model_or_template_is_not_resumed(tmp_path, tiny_model_dir, tiny_data_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    params = train_params()
    fp = run_fingerprint(params["lora"], params["train"], model, tiny_data_dir, fast_cpu=True, code="c")
    Checkpoint(tmp_path / "ckpt", fp).save(Progress(iteration=7), {"model.w": mx.array([1, 2])})
    assert run_fingerprint(params["lora"], params["train"], model, tiny_data_dir, fast_cpu=True, code="c") == fp
    # what computes the step: the kernels, the code
    assert run_fingerprint(params["lora"], params["train"], model, tiny_data_dir, fast_cpu=False, code="c") != fp
    assert run_fingerprint(params["lora"], params["train"], model, tiny_data_dir, fast_cpu=True, code="d") != fp

    def resumable() -> bool:
        return Checkpoint(tmp_path / "ckpt", run_fingerprint(
            params["lora"], params["train"], model, tiny_data_dir, fast_cpu=True, code="c")).load() is not None

    weights = model / "model.safetensors"
    original = weights.read_bytes()
    changed = bytearray(original)
    changed[-1] ^= 1  # one bit of the last weight: same size, same names
    weights.write_bytes(bytes(changed))
    assert not resumable()

    weights.write_bytes(original)
    Checkpoint(tmp_path / "ckpt", fp).save(Progress(iteration=7), {"model.w": mx.array([1, 2])})
    assert resumable()
    config = model / "tokenizer_config.json"
    settings = json.loads(config.read_text())
    settings["chat_template"] = settings["chat_template"].replace("<|im_start|>", "<|im_start|> ", 1)
    config.write_text(json.dumps(settings))
    assert not resumable()


def project_copy(tmp_path) -> Path:
    """The project's code (stages/, voicetune/) in a folder of its own, to be edited."""
    root = tmp_path / "project"
    for folder in ("stages", "voicetune"):
        shutil.copytree(ROOT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_a_checkpoint_of_other_kernels_or_code_is_not_resumed(tmp_path, tiny_model_dir, tiny_data_dir):
    # killed at step 8 with a checkpoint at 5; the next run computes its steps otherwise
    params = train_params(iters=10, save_every=5, steps_per_eval=5)
    params["kernels"] = {"fast_cpu": "on"}
    folder, killed = run_train(tmp_path, tiny_model_dir, tiny_data_dir, params, "kernels", kill=("iteration", 8))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    params["kernels"] = {"fast_cpu": "off"}
    _, result = run_train(tmp_path, tiny_model_dir, tiny_data_dir, params, "kernels")
    assert result.returncode == 0, result.stderr
    assert "discarding checkpoint" in result.stdout
    assert json.loads((folder / "train.json").read_text())["resumed_from"] == 0

    root = project_copy(tmp_path)
    folder, killed = run_train(tmp_path, tiny_model_dir, tiny_data_dir, params, "code", kill=("iteration", 8),
                               root=root)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    with open(root / "voicetune/train/loop.py", "a") as f:  # a module the step's code comes from
        f.write("\n# another version of the loop\n")
    _, result = run_train(tmp_path, tiny_model_dir, tiny_data_dir, params, "code", root=root)
    assert result.returncode == 0, result.stderr
    assert "discarding checkpoint" in result.stdout
    assert json.loads((folder / "train.json").read_text())["resumed_from"] == 0


# ------------------------------------------------------------------ outputs change only on success
def test_a_failed_run_leaves_the_last_outputs_untouched(tmp_path, tiny_model_dir, tiny_data_dir):
    def run(params, prefix=None):
        return run_train(tmp_path, tiny_model_dir, tiny_data_dir, params, prefix=prefix)

    # a longer run that fails: its training loss turns NaN at iteration 7
    folder, result, before = fail_after_a_good_run(run, train_params(iters=6, steps_per_eval=3),
                                                   train_params(iters=12, steps_per_eval=3), "train", "train", 6,
                                                   "train.json")
    assert "train: training loss is nan at iteration 7" in result.stderr

    # a run that succeeds replaces all three, the logs whole (no steps left from before)
    _, result = run_train(tmp_path, tiny_model_dir, tiny_data_dir, train_params(iters=4, steps_per_eval=2))
    assert result.returncode == 0, result.stderr
    after = snapshot(folder, "train.json")
    assert after.keys() == before.keys()
    assert all(after[k] != before[k] for k in ("train.json", "adapters/adapters.safetensors",
                                               "live/plots/metrics/val_loss.tsv"))
    steps = [line.split("\t")[0] for line in (folder / "live/plots/metrics/val_loss.tsv").read_text().splitlines()]
    assert steps[1:] == ["0", "2", "4"]
    assert json.loads((folder / "train.json").read_text())["stopped_at"] == 4
    assert not (folder / "checkpoint").exists()
