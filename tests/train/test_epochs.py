"""train.epochs instead of train.iters: a run of E epochs trains E x ceil(N / batch_size)
iterations, every training sample E times; it resumes mid-epoch exactly; early stopping can
end it before its last epoch; metrics/train.json reports the run's length both ways.
On the 2-layer random Llama (32 train samples, 8 valid)."""
import json
import shutil
import signal
import types
from collections import Counter
from pathlib import Path

import pytest

from mlx_lm import load
from mlx_lm.tuner.datasets import CacheDataset, load_local_dataset

from voicetune.core.params import validate
from voicetune.models.lora import apply_lora
from voicetune.train.batching import batch_order
from voicetune.train.checkpoint import Checkpoint
from voicetune.train.loop import TrainingError
from voicetune.train.sft import TrainConfig, epochs_summary, resolve_iters, sample_batches, train

from tests.conftest import ROOT
from tests.harness.training import ATTENTION, run_train, train_params

# 32 training samples in batches of 5: 7 batches an epoch, the last one of 2 samples (ceil,
# not floor or round, which both give 6). A checkpoint every 3 iterations, a report every 4:
# the checkpoint of step 9 sits 2 batches into epoch 2 (steps 8-14), mid report window.
N_TRAIN, BATCH, EPOCHS, PER_EPOCH = 32, 5, 2, 7
EPOCH_PARAMS = dict(iters=None, epochs=EPOCHS, batch_size=BATCH, steps_per_eval=PER_EPOCH,
                    save_every=3, steps_per_report=4,
                    early_stopping={"patience": 100, "min_delta": 0.001})  # never stops early


def curve(folder: Path, name: str) -> list[tuple[int, float]]:
    lines = (folder / f"live/plots/metrics/{name}.tsv").read_text().splitlines()[1:]
    return [(int(line.split("\t")[0]), float(line.split("\t")[-1])) for line in lines]


@pytest.fixture(scope="module")
def datasets(tiny_model_dir, tiny_data_dir):
    model, tokenizer = load(str(tiny_model_dir))
    train_set, valid_set, _ = load_local_dataset(
        Path(tiny_data_dir), tokenizer, types.SimpleNamespace(mask_prompt=True))
    return CacheDataset(train_set), CacheDataset(valid_set)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The project's code (stages/, voicetune/) as it is now: the stage runs of this module
    run it, so that an edit of the checkout while they run (a changed module changes the
    checkpoint's fingerprint) cannot turn a resume into a fresh start."""
    root = tmp_path_factory.mktemp("project")
    for folder in ("stages", "voicetune"):
        shutil.copytree(ROOT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return root


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir, tiny_data_dir, project):
    """The epochs run, uninterrupted: what a killed and resumed run must reproduce."""
    folder, result = run_train(tmp_path_factory.mktemp("epochs"), tiny_model_dir, tiny_data_dir,
                               train_params(**EPOCH_PARAMS), "reference", root=project)
    assert result.returncode == 0, result.stderr
    return folder, result


def test_resolve_iters_is_epochs_times_the_batches_of_an_epoch():
    section = {"iters": None, "epochs": 3, "batch_size": 5}
    assert resolve_iters(section, 32) == (21, 7)  # the last batch partial: ceil(32 / 5)
    assert resolve_iters({**section, "batch_size": 4}, 32) == (24, 8)
    assert resolve_iters({**section, "batch_size": 64}, 32) == (3, 1)
    assert resolve_iters({**section, "iters": 40, "epochs": None}, 32) == (40, 7)  # iters as given
    with pytest.raises(TrainingError, match="training split is empty"):
        resolve_iters(section, 0)
    # the metrics: the epochs asked for, or what train.iters makes of them
    assert epochs_summary(section, 21, 7, 10) == {"iters": 21, "epochs": 3, "batches_per_epoch": 7,
                                                  "epochs_trained": 1.429}
    assert epochs_summary({**section, "iters": 40, "epochs": None}, 40, 7, 40) == \
        {"iters": 40, "epochs": 5.714, "batches_per_epoch": 7, "epochs_trained": 5.714}


def test_epochs_train_every_sample_exactly_that_many_times(uninterrupted, datasets):
    folder, result = uninterrupted
    summary = json.loads((folder / "train.json").read_text())
    iters = EPOCHS * PER_EPOCH  # 14
    assert summary["stop_reason"] == "iters_done" and summary["stopped_at"] == iters
    assert (summary["iters"], summary["epochs"], summary["batches_per_epoch"], summary["epochs_trained"]) \
        == (iters, EPOCHS, PER_EPOCH, float(EPOCHS))
    # the progress bar counts to the resolved number; the early-stopping warning uses it too
    assert f"{iters}/{iters}" in result.stderr
    assert f"train.epochs={EPOCHS}: {iters} iterations" in result.stderr
    # validations at 0, at the end of each epoch (steps_per_eval = an epoch's batches)
    assert [step for step, _ in curve(folder, "val_loss")] == [0, PER_EPOCH, iters]

    # the batches those steps took (the loop's order: seed, then epoch by epoch): every one
    # of the 32 training samples exactly EPOCHS times
    train_set, _ = datasets
    assert len(train_set) == N_TRAIN
    batches = sample_batches(train_set, BATCH)
    assert len(batches) == PER_EPOCH and len(batches[-1]) == N_TRAIN - (PER_EPOCH - 1) * BATCH
    order = batch_order(len(batches), train_params(**EPOCH_PARAMS)["train"]["seed"])
    seen = Counter(i for _ in range(summary["stopped_at"]) for i in batches[next(order)])
    assert seen == Counter({i: EPOCHS for i in range(N_TRAIN)})


def test_killed_mid_epoch_then_resumed_gives_the_same_adapter(tmp_path, tiny_model_dir, tiny_data_dir,
                                                             uninterrupted, project):
    reference, _ = uninterrupted
    params = train_params(**EPOCH_PARAMS)
    # killed as step 11 begins: the last checkpoint is step 9's, 2 batches into epoch 2
    folder, killed = run_train(tmp_path, tiny_model_dir, tiny_data_dir, params, "killed", kill=("iteration", 11),
                               root=project)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (folder / "adapters").exists() and not (folder / "train.json").exists()

    _, resumed = run_train(tmp_path, tiny_model_dir, tiny_data_dir, params, "killed", root=project)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from the checkpoint at iteration 9" in resumed.stdout
    summary = json.loads((folder / "train.json").read_text())
    expected = json.loads((reference / "train.json").read_text())
    assert summary["resumed_from"] == 9 and PER_EPOCH < 9 < 2 * PER_EPOCH
    # the best adapter (step 7's) predates the checkpoint: the resumed run writes it from the
    # checkpoint's copy, and must still write the uninterrupted run's bytes
    assert expected["best_iteration"] == PER_EPOCH < 9
    for key in ("best_val_loss", "best_iteration", "base_val_loss", "stopped_at", "stop_reason",
                "iters", "epochs", "batches_per_epoch", "epochs_trained"):
        assert summary[key] == expected[key], key
    assert (folder / "adapters/adapters.safetensors").read_bytes() == \
        (reference / "adapters/adapters.safetensors").read_bytes()
    for name in ("val_loss", "train_loss"):
        assert curve(folder, name) == curve(reference, name), name


def test_early_stopping_ends_an_epochs_run_before_its_last_epoch(tmp_path, tiny_model_dir, datasets):
    # a validation at the end of every epoch; improving by less than min_delta=2 (the first
    # epoch brings the random model's 11.2 down by well under 2) counts as no improvement,
    # so patience 1 ends the run after its first epoch, two before its last
    train_set, valid_set = datasets
    section = validate(train_params(iters=None, epochs=3, batch_size=8, steps_per_eval=4, save_every=4,
                                    steps_per_report=4,
                                    early_stopping={"patience": 1, "min_delta": 2.0}))["train"]
    iters, per_epoch = resolve_iters(section, len(train_set))
    assert (iters, per_epoch) == (12, 4)
    model, _ = load(str(tiny_model_dir))
    apply_lora(model, 4, 20.0, 0.1, ATTENTION, -1)
    result = train(model, train_set, valid_set, TrainConfig.from_params(section, iters=iters),
                   Checkpoint(tmp_path / "ckpt", "fp"))
    figures = epochs_summary(section, iters, per_epoch, result.stopped_at)
    assert result.stop_reason == "early_stop" and result.stopped_at == per_epoch < iters
    assert figures == {"iters": 12, "epochs": 3, "batches_per_epoch": 4, "epochs_trained": 1.0}
    assert figures["epochs_trained"] < figures["epochs"]
