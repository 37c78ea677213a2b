"""The train stage on test settings: a whole params file with small training settings
(``train_params``) and the stage run as a subprocess (``run_train``), for the train and
data-parallel tests."""

import yaml

from tests.conftest import ROOT
from tests.harness.faults import killing, run_stage


ATTENTION = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]


def train_params(**train):
    base = {"iters": 40, "batch_size": 2, "learning_rate": 3e-3, "optimizer": "adam",
            "steps_per_eval": 10, "val_batches": -1, "steps_per_report": 5,
            "grad_checkpoint": False, "max_seq_length": 512, "mask_prompt": True, "seed": 3,
            "save_every": 10, "early_stopping": {"patience": 5, "min_delta": 0.001}}
    base.update(train)
    # a whole params file (the schema wants every section): the project's, with these two
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    return {**params, "train": base,
            "lora": {"rank": 4, "scale": 20.0, "dropout": 0.1, "keys": ATTENTION, "num_layers": -1}}


def run_train(tmp_path, model_dir, data_dir, params, name="run", wait=True, kill=None, root=ROOT,
              prefix=None):
    """Run the train stage (of the project at ``root``); ``kill`` (see ``faults.killing``)
    kills it with SIGKILL at a chosen point of the run."""
    return run_stage("train", "train.json", tmp_path, model_dir, data_dir, params, name, wait,
                     prefix or killing(tmp_path, kill), root)
