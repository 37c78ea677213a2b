"""Data-parallel training over 2 processes on 127.0.0.1 (mlx.launch, ring backend): the same
losses as one process, only rank 0 writes, and a dead rank fails the run instead of hanging."""
import csv
import json
import os
import subprocess
import sys
import textwrap

import pytest

from voicetune.core import kernels

from tests.conftest import ROOT
from tests.harness.training import run_train, train_params


def launch(args, timeout=300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "voicetune.tools.distributed", "--np", "2", "--", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def losses(folder, name):
    with open(folder / "live/plots/metrics" / f"{name}.tsv") as f:
        return {int(row["step"]): float(row[name]) for row in csv.DictReader(f, delimiter="\t")}


def uneven_data(tiny_data_dir, out):
    """33 train and 9 validation samples: in batches of 4 the last holds one row, so with 2
    processes rank 1 gets none of it."""
    out.mkdir()
    test = (tiny_data_dir / "test.jsonl").read_text().splitlines(keepends=True)
    for i, name in enumerate(("train", "valid")):
        (out / f"{name}.jsonl").write_text((tiny_data_dir / f"{name}.jsonl").read_text() + test[i])
    (out / "test.jsonl").write_text("".join(test[2:]))
    return out


def test_two_processes_match_one(tmp_path, tiny_model_dir, tiny_data_dir):
    # dropout 0: with dropout each process draws the masks of its own rows. 9 iterations are
    # one epoch of 33 samples, so the one-row batch is trained (and every validation has one)
    data = uneven_data(tiny_data_dir, tmp_path / "data")
    # With the default kernels (kernels.fast_cpu: auto, on for x86). Two processes sum the
    # gradient in another order than one (each its rows, then all_sum): the steps differ by
    # float rounding, ~1e-7. At lr 3e-3 this random model overshoots (its validation loss
    # jumps up at step 6) and that amplifies them: 1.2e-4 apart at step 9 with the fast path,
    # 0.99e-4 with MLX's kernels, both identical to 3e-7 through step 5. At lr 1e-3 the runs
    # stay within 4e-7 of each other over all 9 steps, whichever the kernels.
    params = train_params(iters=9, batch_size=4, steps_per_eval=3, steps_per_report=1, learning_rate=1e-3)
    params["lora"]["dropout"] = 0.0
    single, result = run_train(tmp_path, tiny_model_dir, data, params, name="single")
    assert result.returncode == 0, result.stderr

    folder = tmp_path / "dist"
    folder.mkdir()
    (folder / "params.yaml").write_text((single / "params.yaml").read_text())
    result = launch([str(ROOT / "stages/train.py"), "--params", str(folder / "params.yaml"),
                     "--model", str(tiny_model_dir), "--data", str(data),
                     "--out", str(folder / "adapters"), "--metrics", str(folder / "train.json"),
                     "--live-dir", str(folder / "live"), "--checkpoint", str(folder / "checkpoint")])
    assert result.returncode == 0, result.stdout[-3000:]
    summary = json.loads((folder / "train.json").read_text())
    assert summary == {**summary, "val_samples": 9, "stopped_at": 9}
    one_process = json.loads((single / "train.json").read_text())
    assert summary["val_tokens"] == one_process["val_tokens"]
    assert summary["fast_cpu_kernels"] == one_process["fast_cpu_kernels"] == kernels.resolve("auto")

    for name in ("train_loss", "val_loss"):
        one, two = losses(single, name), losses(folder, name)
        assert one.keys() == two.keys() and len(one) >= 3
        for step in one:
            assert two[step] == pytest.approx(one[step], rel=2e-6, abs=0), (name, step)
    # outputs exist once, written by rank 0
    assert (folder / "adapters/adapters.safetensors").exists()
    assert result.stdout.count("best val loss") == 1


def test_batch_must_split_evenly(tmp_path, tiny_model_dir, tiny_data_dir):
    import yaml

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(train_params(iters=2, batch_size=3)))
    result = launch([str(ROOT / "stages/train.py"), "--params", str(tmp_path / "params.yaml"),
                     "--model", str(tiny_model_dir), "--data", str(tiny_data_dir),
                     "--out", str(tmp_path / "adapters"), "--metrics", str(tmp_path / "train.json"),
                     "--live-dir", str(tmp_path / "live"), "--checkpoint", str(tmp_path / "ckpt")])
    assert result.returncode != 0
    assert "train.batch_size=3 does not split evenly over 2 processes" in result.stdout
    assert not (tmp_path / "adapters").exists()


def test_a_dead_rank_fails_the_run(tmp_path, tiny_model_dir, tiny_data_dir):
    script = tmp_path / "die.py"
    script.write_text(textwrap.dedent(f"""
        import os
        import voicetune
        import mlx.core as mx
        from tests.train.test_train import datasets, train_params
        from voicetune.core.params import validate
        from voicetune.models.lora import apply_lora
        from voicetune.train.checkpoint import Checkpoint
        from voicetune.train.sft import TrainConfig, train

        rank = mx.distributed.init().rank()
        model, _, train_set, valid_set = datasets({str(tiny_model_dir)!r}, {str(tiny_data_dir)!r})
        apply_lora(model, 4, 20.0, 0.0, ["self_attn.q_proj"], -1)

        def log(record):
            if rank == 1 and record["step"] >= 2:
                os._exit(7)  # a rank that dies mid-run

        cfg = TrainConfig.from_params(validate(train_params(
            iters=50, batch_size=4, learning_rate=1e-3, steps_per_eval=100, steps_per_report=1,
            max_seq_length=512))["train"])
        train(model, train_set, valid_set, cfg, Checkpoint({str(tmp_path / "ckpt")!r}, "x"), log=log)
        print("rank", rank, "finished")
    """))
    result = launch([str(script)], timeout=180)  # a hang would end in TimeoutExpired
    assert result.returncode != 0
    assert "distributed training failed: rank(s) " in result.stderr
    assert "finished" not in result.stdout
