"""params.yaml's schema (voicetune.core.params): the committed file and every recipe pass; each
kind of problem is a one-line message naming the key, the value and what is allowed; every
problem is reported at once; every stage checks the whole file before doing any work."""
import copy
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from voicetune.core.params import ParamsError, key_paths, load_params, validate
from voicetune.project.recipe import RecipeError, apply
from voicetune.tools.recipe import main as recipe_main

from tests.conftest import ROOT, flatten as _flat

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
COMMITTED = yaml.safe_load((ROOT / "params.yaml").read_text())


def write(tmp_path, params: dict | str, name="params.yaml"):
    path = tmp_path / name
    path.write_text(params if isinstance(params, str) else yaml.safe_dump(params, sort_keys=False))
    return path


def problems_of(tmp_path, monkeypatch, change) -> list[str]:
    """The problems load_params reports for the committed params changed by ``change``, read
    as ``params.yaml`` from the current folder (as the stages do)."""
    params = copy.deepcopy(COMMITTED)
    change(params)
    write(tmp_path, params)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ParamsError) as err:
        load_params("params.yaml")
    assert "Traceback" not in str(err.value)
    return err.value.problems


# ------------------------------------------------------------------ what passes
def test_committed_params_validate_to_a_plain_dict_of_the_same_keys():
    params = load_params(ROOT / "params.yaml")
    assert type(params) is dict and all(type(s) is dict for s in params.values())
    assert type(params["train"]["early_stopping"]) is dict
    assert _flat(params) == _flat(COMMITTED) and list(_flat(params)) == list(_flat(COMMITTED))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_merged_into_params_validates(tmp_path, recipe):
    path = tmp_path / "params.yaml"
    shutil.copyfile(ROOT / "params.yaml", path)
    apply(recipe, path)  # validates the merged result itself
    merged = load_params(path)
    expected = _flat(yaml.safe_load(recipe.read_text()))
    assert {k: v for k, v in _flat(merged).items() if k in expected} == expected


def test_optional_keys_may_be_left_out_and_get_their_defaults(tmp_path):
    params = copy.deepcopy(COMMITTED)
    for section, key in [("model", "revision"), ("model", "chat_template"), ("data", "hub_dataset"),
                         ("data", "hub_revision"), ("data", "split_by"), ("eval", "limit"),
                         ("eval", "repetition_penalty"), ("lora", "num_layers")]:
        del params[section][key]
    del params["train"]["early_stopping"]
    loaded = load_params(write(tmp_path, params))
    assert loaded["model"]["revision"] is None and loaded["model"]["chat_template"] is None
    assert loaded["data"]["hub_dataset"] is None and loaded["data"]["hub_revision"] is None
    assert loaded["data"]["split_by"] == "conversation"
    assert loaded["eval"]["limit"] is None and loaded["eval"]["repetition_penalty"] is None
    assert loaded["lora"]["num_layers"] == -1
    assert loaded["train"]["early_stopping"] == {"patience": 5, "min_delta": 0.001}


def test_train_defaults_come_from_the_schema_alone():
    """Defaults live in one place, the schema: the training configs have none of their own
    and read a section the schema filled in."""
    import dataclasses

    from voicetune.train.preference import PreferenceConfig
    from voicetune.train.sft import TrainConfig

    minimal = {"iters": 1, "batch_size": 1, "learning_rate": 0.1}
    filled = validate({**COMMITTED, "train": minimal})
    for config in (TrainConfig, PreferenceConfig):
        assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(config))
    cfg = TrainConfig.from_params(filled["train"])
    assert (cfg.steps_per_eval, cfg.patience, cfg.min_delta) == (50, 5, 0.001)
    assert PreferenceConfig.from_params(filled["preference"]).max_seq_length == filled["preference"]["max_seq_length"]


def test_dvc_yaml_names_only_keys_of_the_schema():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    named = [p for stage in stages.values() for p in stage.get("params", []) if isinstance(p, str)]
    assert named and set(named) <= set(key_paths())


# ------------------------------------------------------------------ each kind of problem
def _rename(section, old, new):
    def change(params):
        params[section] = {(new if k == old else k): v for k, v in params[section].items()}
    return change


def _set(section, key, value):
    def change(params):
        params[section][key] = value
    return change


def _delete(section, key):
    def change(params):
        del params[section][key]
    return change


@pytest.mark.parametrize("change,expected", [
    (_rename("lora", "rank", "rnak"), ["params.yaml: lora.rank: missing (an integer >= 1)",
                                       "params.yaml: lora.rnak: unknown key; did you mean lora.rank?"]),
    (_rename("data", "valid_ratio", "valid_ration"),
     ["params.yaml: data.valid_ratio: missing (a number in [0, 1))",
      "params.yaml: data.valid_ration: unknown key; did you mean data.valid_ratio?"]),
    (_set("lora", "learning_rate", 1.0e-4),  # in the wrong section
     ["params.yaml: lora.learning_rate: unknown key; did you mean train.learning_rate or preference.learning_rate?"]),
    (_set("lora", "zzzz", 1), ["params.yaml: lora.zzzz: unknown key; lora has rank, scale, dropout, "
                               "keys, num_layers"]),
    (_delete("train", "batch_size"), ["params.yaml: train.batch_size: missing (an integer >= 1)"]),
    (lambda p: p.pop("fuse"), ["params.yaml: fuse: missing (a section with keys verify_prompts, "
                               "verify_max_tokens, logit_tolerance)"]),
    (lambda p: p.update(evl=p["eval"]), ["params.yaml: evl: unknown section; did you mean eval?"]),
    (_set("train", "batch_size", "four"),
     ['params.yaml: train.batch_size: got "four"; expected an integer >= 1']),
    (_set("train", "batch_size", "4"),
     ['params.yaml: train.batch_size: got "4"; expected an integer >= 1 (a string: remove the quotes)']),
    (_set("train", "batch_size", True), ["params.yaml: train.batch_size: got true; expected an integer >= 1"]),
    (_set("train", "batch_size", 4.0), ["params.yaml: train.batch_size: got 4.0; expected an integer >= 1 (write 4)"]),
    (_set("train", "grad_checkpoint", 1), ["params.yaml: train.grad_checkpoint: got 1; expected true or false"]),
    (_set("data", "valid_ratio", 1.5), ["params.yaml: data.valid_ratio: got 1.5; expected a number in [0, 1)"]),
    (_set("data", "test_ratio", -0.1), ["params.yaml: data.test_ratio: got -0.1; expected a number in [0, 1)"]),
    (lambda p: p["data"].update(valid_ratio=0.5, test_ratio=0.5),
     ["params.yaml: data.valid_ratio + data.test_ratio: got 0.5 + 0.5 = 1.0; expected a sum < 1 "
      "(what is left is the training split)"]),
    (_set("data", "split_by", "row"), ['params.yaml: data.split_by: got "row"; expected one of exchange, conversation']),
    (_set("data", "system_prompt", " "), ['params.yaml: data.system_prompt: got " "; expected a non-empty string (the persona)']),
    (_set("lora", "rank", 0), ["params.yaml: lora.rank: got 0; expected an integer >= 1"]),
    (_set("lora", "dropout", 1.0), ["params.yaml: lora.dropout: got 1.0; expected a number in [0, 1)"]),
    (_set("lora", "num_layers", 0), ["params.yaml: lora.num_layers: got 0; expected -1 (all blocks) or an integer >= 1"]),
    (_set("lora", "keys", "self_attn.q_proj"),
     ['params.yaml: lora.keys: got "self_attn.q_proj"; expected a non-empty list of module names']),
    (_set("train", "optimizer", "sgd"), ['params.yaml: train.optimizer: got "sgd"; expected one of adam, adamw']),
    (_set("train", "learning_rate", 0.0), ["params.yaml: train.learning_rate: got 0.0; expected a number > 0"]),
    (_set("train", "learning_rate", "1e-5"),  # what PyYAML makes of an unquoted 1e-5
     ['params.yaml: train.learning_rate: got "1e-5"; expected a number > 0 (PyYAML reads 1e-5 as a string']),
    (_set("train", "max_seq_length", 1), ["params.yaml: train.max_seq_length: got 1; expected an integer >= 2"]),
    (lambda p: p["train"]["early_stopping"].update(patience=0, min_delta=-1.0),
     ["params.yaml: train.early_stopping.patience: got 0; expected an integer >= 1",
      "params.yaml: train.early_stopping.min_delta: got -1.0; expected a number >= 0"]),
    (_set("eval", "temperature", -0.5), ["params.yaml: eval.temperature: got -0.5; expected a number >= 0"]),
    (_set("eval", "limit", 0), ["params.yaml: eval.limit: got 0; expected an integer >= 1 (the first N test "
                                "questions) or null (all)"]),
    (_set("model", "revision", 1234567), ["params.yaml: model.revision: got 1234567; expected a commit sha"]),
])
def test_each_kind_of_problem_is_one_line(tmp_path, monkeypatch, change, expected):
    found = problems_of(tmp_path, monkeypatch, change)
    assert len(found) == len(expected), found
    for line, want in zip(found, expected):
        assert line.startswith(want), (line, want)


def test_several_problems_are_reported_together(tmp_path, monkeypatch):
    def change(params):
        _rename("lora", "rank", "rnak")(params)
        _delete("train", "batch_size")(params)
        _set("train", "iters", "four")(params)
        _set("data", "valid_ratio", 1.5)(params)
        _set("train", "optimizer", "sgd")(params)

    params = copy.deepcopy(COMMITTED)
    change(params)
    path = write(tmp_path, params)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ParamsError) as err:
        load_params("params.yaml")
    message = str(err.value)
    assert message.startswith("params.yaml: 6 problems:\n")
    for line in ["params.yaml: lora.rnak: unknown key; did you mean lora.rank?",
                 "params.yaml: lora.rank: missing (an integer >= 1)",
                 "params.yaml: train.batch_size: missing (an integer >= 1)",
                 'params.yaml: train.iters: got "four"; expected an integer >= 1',
                 "params.yaml: data.valid_ratio: got 1.5; expected a number in [0, 1)",
                 'params.yaml: train.optimizer: got "sgd"; expected one of adam, adamw']:
        assert line in message
    assert len(message.splitlines()) == 7 and "pydantic" not in message.lower()
    assert path.exists()


def test_a_ratio_sum_is_reported_beside_other_problems_of_its_section(tmp_path, monkeypatch):
    found = problems_of(tmp_path, monkeypatch,
                        lambda p: p["data"].update(valid_ratio=0.6, test_ratio=0.5, seed=-1))
    assert found == ["params.yaml: data.seed: got -1; expected an integer >= 0",
                     "params.yaml: data.valid_ratio + data.test_ratio: got 0.6 + 0.5 = 1.1; "
                     "expected a sum < 1 (what is left is the training split)"]


# ------------------------------------------------------------------ train.iters or train.epochs
EXACTLY_ONE = "set exactly one of train.iters and train.epochs"
WHOLE_EPOCHS = ("expected an integer >= 1 (every training sample this many times; whole epochs only: "
                "for part of one, set train.iters instead) or null (train.iters sets it)")


@pytest.mark.parametrize("change,expected", [
    (_set("train", "epochs", 2),  # beside the committed iters: 40
     [f"params.yaml: train.epochs: got 2 beside train.iters=40; {EXACTLY_ONE}"]),
    (_set("train", "iters", None),  # and epochs: null, as committed
     [f"params.yaml: train.epochs: null or missing, and so is train.iters; {EXACTLY_ONE}"]),
    (lambda p: (p["train"].pop("iters"), p["train"].pop("epochs")),  # a file with neither key
     [f"params.yaml: train.epochs: null or missing, and so is train.iters; {EXACTLY_ONE}"]),
    (lambda p: p["train"].update(iters=None, epochs=0), [f"params.yaml: train.epochs: got 0; {WHOLE_EPOCHS}"]),
    (lambda p: p["train"].update(iters=None, epochs=1.5), [f"params.yaml: train.epochs: got 1.5; {WHOLE_EPOCHS}"]),
    (lambda p: p["train"].update(iters=None, epochs=2.0),
     [f"params.yaml: train.epochs: got 2.0; {WHOLE_EPOCHS} (write 2)"]),
    (lambda p: p["train"].update(iters=None, epochs="2"),
     [f'params.yaml: train.epochs: got "2"; {WHOLE_EPOCHS} (a string: remove the quotes)']),
    (lambda p: p["train"].update(iters=0),
     ["params.yaml: train.iters: got 0; expected an integer >= 1 (the number of iterations, an upper "
      "bound) or null (train.epochs sets it)"]),
    # beside another problem of the section (pydantic then skips the cross-key rule): both reported
    (lambda p: (p["train"].update(epochs=3), p["train"].pop("batch_size")),
     ["params.yaml: train.batch_size: missing (an integer >= 1)",
      f"params.yaml: train.epochs: got 3 beside train.iters=40; {EXACTLY_ONE}"]),
])
def test_exactly_one_of_iters_and_epochs(tmp_path, monkeypatch, change, expected):
    found = problems_of(tmp_path, monkeypatch, change)
    assert found == expected


def test_iters_alone_or_epochs_alone_validates(tmp_path):
    # a params file from before train.epochs (iters, no epochs key) validates unchanged
    old = copy.deepcopy(COMMITTED)
    del old["train"]["epochs"]
    loaded = load_params(write(tmp_path, old))
    assert (loaded["train"]["iters"], loaded["train"]["epochs"]) == (40, None)
    assert {k: v for k, v in loaded["train"].items() if k != "epochs"} == old["train"]
    for epochs_only in ({"iters": None, "epochs": 3}, {"epochs": 3}):
        params = copy.deepcopy(old)
        params["train"].pop("iters")
        params["train"].update(epochs_only)
        loaded = load_params(write(tmp_path, params))
        assert (loaded["train"]["iters"], loaded["train"]["epochs"]) == (None, 3)


def test_the_early_stopping_warning_takes_the_resolved_iterations():
    from voicetune.core.params import early_stopping_problem

    section = {**COMMITTED["train"], "iters": None, "epochs": 2, "steps_per_eval": 7,
               "early_stopping": {"patience": 2, "min_delta": 0.001}}
    # 2 epochs of 7 batches: 14 iterations, validations at 7 and 14: one before the last step
    assert early_stopping_problem("train", section, 14) == (
        "train.early_stopping.patience=2 can never stop a run early: 1 validation before the last "
        "step (train.epochs=2: 14 iterations, train.steps_per_eval=7); lower the patience to 1 or "
        "validate more often")
    assert early_stopping_problem("train", section, 15) is None  # 2 validations before step 15
    with pytest.raises(ValueError, match="pass the resolved number of iterations"):
        early_stopping_problem("train", section)  # iters is null: nothing to guess from
    # an iters section reads its own iters, as before
    assert "(train.iters=40, train.steps_per_eval=20)" in early_stopping_problem(
        "train", {**COMMITTED["train"], "early_stopping": {"patience": 5, "min_delta": 0.0}})


# ------------------------------------------------------------------ the file itself
def test_missing_file_is_a_message(tmp_path):
    with pytest.raises(ParamsError, match=r"nope\.yaml: no such file"):
        load_params(tmp_path / "nope.yaml")


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    text = (ROOT / "params.yaml").read_text().replace("  rank: 16", "  rank: [16", 1)
    line = next(i for i, l in enumerate(text.splitlines(), 1) if l == "  rank: [16")
    path = write(tmp_path, text)
    with pytest.raises(ParamsError) as err:
        load_params(path)
    assert re.match(rf"{re.escape(str(path))}:\d+:\d+: invalid YAML: ", str(err.value))
    assert int(str(err.value).split(":")[1]) >= line


def test_a_key_given_twice_is_refused_with_its_line(tmp_path):
    text = (ROOT / "params.yaml").read_text().replace("  iters: 40", "  iters: 40\n  iters: 400", 1)
    line = next(i for i, l in enumerate(text.splitlines(), 1) if l.startswith("  iters: 400"))
    with pytest.raises(ParamsError, match=rf"params.yaml:{line}: iters: given twice"):
        load_params(write(tmp_path, text))


@pytest.mark.parametrize("text", ["", "- model\n- data\n"])
def test_not_a_mapping(tmp_path, text):
    with pytest.raises(ParamsError, match="expected a mapping of sections"):
        load_params(write(tmp_path, text))


# ------------------------------------------------------------------ the stages and make recipe
BAD = {"lora.rnak: unknown key; did you mean lora.rank?", "train.batch_size: missing (an integer >= 1)",
       'train.optimizer: got "sgd"; expected one of adam, adamw'}


def bad_params(tmp_path):
    params = copy.deepcopy(COMMITTED)
    _rename("lora", "rank", "rnak")(params)
    _delete("train", "batch_size")(params)
    _set("train", "optimizer", "sgd")(params)
    return write(tmp_path, params, "bad.yaml")


def test_prepare_with_bad_params_lists_every_problem_without_a_traceback(tmp_path):
    path = bad_params(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, str(ROOT / "stages/prepare.py"), "--params", str(path)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"prepare: {path}: 4 problems:")
    for problem in BAD:
        assert f"{path}: {problem}" in result.stderr
    assert list(tmp_path.iterdir()) == [path]  # nothing else was done


def test_every_stage_checks_params_before_any_work(tmp_path):
    """Run in an empty folder: a stage that did anything before checking params would fail
    on its missing inputs instead (or write something)."""
    path = bad_params(tmp_path)
    extra = {"evaluate.py": ["--model", "base"]}
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    stages = sorted((ROOT / "stages").glob("*.py"))
    procs = {s.name: subprocess.Popen([sys.executable, str(s), "--params", str(path),
                                       *extra.get(s.name, [])], cwd=tmp_path, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for s in stages}
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 1, (name, stderr)
        assert "Traceback" not in stderr, (name, stderr)
        assert stderr.startswith(f"{name.removesuffix('.py')}: {path}: 4 problems:"), (name, stderr)
        assert all(problem in stderr for problem in BAD), (name, stderr)
    assert list(tmp_path.iterdir()) == [path]


def test_recipe_producing_an_invalid_value_is_refused_and_params_stays_identical(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    shutil.copyfile(ROOT / "params.yaml", params)
    original = params.read_bytes()
    recipe = write(tmp_path, "lora:\n  rank: 0\ndata:\n  valid_ratio: 0.9\n", "bad-recipe.yaml")
    with pytest.raises(RecipeError):
        apply(recipe, params)
    assert recipe_main([str(recipe), "--params", str(params)]) == 1  # make recipe R=...
    err = capsys.readouterr().err
    # the recipe's own values, at the recipe's lines
    assert f"{recipe}:2: lora.rank: got 0; expected an integer >= 1" in err
    assert f"{recipe}:4: data.valid_ratio + data.test_ratio: got 0.9 + 0.1 = 1.0" in err
    assert params.read_bytes() == original


# ------------------------------------------------------------------ the gguf section
@pytest.mark.parametrize("change,expected", [
    (_set("gguf", "type", "q4_0"), ['params.yaml: gguf.type: got "q4_0"; expected one of f16, q8_0']),
    (lambda p: p["gguf"]["logit_tolerance"].pop("q8_0"),
     ["params.yaml: gguf.logit_tolerance.q8_0: missing (a number > 0)"]),
    (lambda p: p["gguf"]["logit_tolerance"].update(q4_0=1.0),
     ["params.yaml: gguf.logit_tolerance.q4_0: unknown key; did you mean gguf.logit_tolerance.q8_0?"]),
    (_set("gguf", "verify_prompts", 0), ["params.yaml: gguf.verify_prompts: got 0; expected an integer >= 1"]),
])
def test_gguf_problems_are_one_line_each(tmp_path, monkeypatch, change, expected):
    assert problems_of(tmp_path, monkeypatch, change) == expected


# ------------------------------------------------------------------ the arena section
@pytest.mark.parametrize("change,expected", [
    (_set("arena", "adapter", "old"), ['params.yaml: arena.adapter: got "old"; expected one of current, all']),
    (_set("arena", "rounds", 10), ["params.yaml: arena.rounds: got 10; expected an integer >= 100"]),
    (_set("arena", "seed", -1), ["params.yaml: arena.seed: got -1; expected an integer >= 0"]),
    (_set("arena", "temperature", 0), ["params.yaml: arena.temperature: got 0; expected a number > 0: "
                                       "battles sample (0, greedy, would let a judge look an answer up)"]),
    (_set("arena", "models", ["base"]), ['params.yaml: arena.models: got ["base"]; expected a list '
                                         'of at least 2 distinct models among base, lora, fused, dpo']),
    (_set("arena", "models", ["lora", "lora"]), ['params.yaml: arena.models: got ["lora", "lora"]; '
                                                 'expected a list of at least 2 distinct models '
                                                 'among base, lora, fused, dpo']),
    (_set("arena", "models", ["base", "gpt"]), ['params.yaml: arena.models[1]: got "gpt"; expected '
                                                'one of base, lora, fused, dpo']),
    (_set("arena", "rondos", 1000), ["params.yaml: arena.rondos: unknown key; did you mean arena.rounds?"]),
])
def test_arena_problems_are_one_line_each(tmp_path, monkeypatch, change, expected):
    assert problems_of(tmp_path, monkeypatch, change) == expected


def test_a_params_file_from_before_the_arena_gets_its_defaults(tmp_path):
    params = copy.deepcopy(COMMITTED)
    del params["arena"]
    assert load_params(write(tmp_path, params))["arena"] == {
        "adapter": "current", "rounds": 1000, "seed": 0, "temperature": 0.7, "models": ["base", "lora"]}


def test_fast_cpu_on_and_off_read_as_yaml_booleans_are_accepted(tmp_path):
    # PyYAML (and `dvc exp run -S kernels.fast_cpu=off`) read a bare on/off as true/false
    text = (ROOT / "params.yaml").read_text()
    for bare, expected in (("off", "off"), ("on", "on"), ("auto", "auto"), ("'off'", "off")):
        path = tmp_path / f"{bare}.yaml"
        path.write_text(re.sub(r"(?m)^  fast_cpu: \S+", f"  fast_cpu: {bare}", text))
        assert load_params(path)["kernels"]["fast_cpu"] == expected
    path.write_text(re.sub(r"(?m)^  fast_cpu: \S+", "  fast_cpu: fast", text))
    with pytest.raises(ParamsError, match="kernels.fast_cpu: got \"fast\""):
        load_params(path)


# ------------------------------------------------------------------ eval.voice and eval.judge
@pytest.mark.parametrize("change,expected", [
    (lambda p: p["eval"]["voice"].update(char_ngrams=[4, 2]),
     ["params.yaml: eval.voice.char_ngrams: got [4, 2]; expected [lowest, highest] n of the "
      "character n-grams, lowest <= highest"]),
    (lambda p: p["eval"]["voice"].update(negatives=2),
     ["params.yaml: eval.voice.negatives: got 2; expected an integer >= 4"]),
    (lambda p: p["eval"]["judge"].update(run="always"),
     ['params.yaml: eval.judge.run: got "always"; expected auto (on unless the judge would be '
      'the embedded 135M model in-process), on or off']),
    (lambda p: p["eval"]["judge"].update(endpoint="localhost:8080"),
     ['params.yaml: eval.judge.endpoint: got "localhost:8080"; expected the base URL of an '
      'OpenAI-compatible API (http://127.0.0.1:8080/v1) or null (in-process)']),
])
def test_voice_and_judge_problems_are_one_line_each(tmp_path, monkeypatch, change, expected):
    assert problems_of(tmp_path, monkeypatch, change) == expected


def test_judge_run_on_and_off_read_as_yaml_booleans_are_accepted_and_old_files_get_defaults(tmp_path):
    text = (ROOT / "params.yaml").read_text()
    for bare, expected in (("off", "off"), ("on", "on"), ("auto", "auto")):
        path = tmp_path / f"{bare}.yaml"
        path.write_text(re.sub(r"(?m)^    run: \S+", f"    run: {bare}", text))
        assert load_params(path)["eval"]["judge"]["run"] == expected
    params = copy.deepcopy(COMMITTED)
    del params["eval"]["voice"], params["eval"]["judge"]
    loaded = load_params(write(tmp_path, params))["eval"]
    assert loaded["voice"] == {"negatives": 48, "window_chars": 160, "char_ngrams": [2, 4], "C": 1.0}
    assert loaded["judge"]["run"] == "auto" and loaded["judge"]["endpoint"] is None


@pytest.mark.parametrize("change, expected", [
    (lambda p: p["data"].update(task="summarize"),
     ['params.yaml: data.task: got "summarize"; expected one of qa, rewrite, both']),
    (lambda p: p["data"].update(rewrite_ratio=0),
     ["params.yaml: data.rewrite_ratio: got 0; expected a number > 0 (both: at most this many "
      "rewrite training samples per Q&A one, a seeded draw) or null (all)"]),
    (lambda p: p["rewrite"].update(length_ratio=[1.5, 0.5]),
     ["params.yaml: rewrite.length_ratio: got [1.5, 0.5]; expected [low, high], 0 < low <= high"]),
    (lambda p: p["rewrite"].update(max_copied=1.5),
     ["params.yaml: rewrite.max_copied: got 1.5; expected a number in [0, 1]"]),
])
def test_rewrite_problems_are_one_line_each(tmp_path, monkeypatch, change, expected):
    assert problems_of(tmp_path, monkeypatch, change) == expected


def test_a_params_file_from_before_the_rewrite_task_trains_on_qa_only(tmp_path):
    params = copy.deepcopy(COMMITTED)
    del params["rewrite"], params["data"]["task"], params["data"]["rewrite_ratio"]
    del params["eval"]["rewrite_max_tokens"]
    loaded = load_params(write(tmp_path, params))
    assert loaded["data"]["task"] == "qa" and loaded["data"]["rewrite_ratio"] is None
    assert loaded["rewrite"]["endpoint"] is None and loaded["rewrite"]["length_ratio"] == [0.5, 1.5]
    assert loaded["eval"]["rewrite_max_tokens"] == 192
