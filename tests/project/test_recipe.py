import shutil
import subprocess
import sys

import pytest
import yaml

from voicetune.project.recipe import RecipeError, apply
from voicetune.tools.recipe import main

from tests.conftest import ROOT, flatten as _flat

RECIPES = ROOT / "recipes"


@pytest.fixture
def params(tmp_path):
    path = tmp_path / "params.yaml"
    shutil.copyfile(ROOT / "params.yaml", path)
    return path


def test_phi3_blog_changes_exactly_its_keys_and_keeps_comments(params):
    before_text, before = params.read_text(), _flat(yaml.safe_load(params.read_text()))
    changes = apply(RECIPES / "phi3-blog.yaml", params)
    after = _flat(yaml.safe_load(params.read_text()))  # as the stages read it (PyYAML)
    assert {k for k in before if before[k] != after[k]} == {name for name, _, _ in changes} == {
        "model.source", "model.revision", "model.chat_template", "data.hub_dataset",
        "data.hub_revision", "data.system_prompt", "lora.keys", "lora.num_layers",
        "train.iters", "train.learning_rate", "train.steps_per_eval", "train.grad_checkpoint",
        "train.early_stopping.patience",
        "eval.repetition_penalty"}
    assert after["model.source"] == "microsoft/Phi-3-mini-4k-instruct"
    assert len(after["model.revision"]) == 40
    assert after["lora.keys"] == ["self_attn.qkv_proj", "self_attn.o_proj"]
    assert after["train.learning_rate"] == 1.0e-5 and after["train.grad_checkpoint"] is True
    assert after["data.system_prompt"].startswith("You are Didier, CEO of OpenBB. You write")
    assert after["data.system_prompt"].endswith("the future of research workflows.")
    comments = [line.split("#", 1)[1] for line in before_text.splitlines() if "#" in line]
    text = params.read_text()
    assert all(c in text for c in comments) and list(after) == list(before)  # and key order


def test_as_published_adapts_o_proj_only(params):
    apply(RECIPES / "phi3-blog.yaml", params)
    assert [c[0] for c in apply(RECIPES / "phi3-blog-as-published.yaml", params)] == [
        "lora.keys", "eval.temperature"]
    assert yaml.safe_load(params.read_text())["lora"]["keys"] == ["self_attn.o_proj"]


def test_smollm2_default_restores_the_original_file(params):
    original = params.read_bytes()
    assert apply(RECIPES / "smollm2-default.yaml", params) == []  # it is the shipped default
    apply(RECIPES / "phi3-blog.yaml", params)
    apply(RECIPES / "phi3-blog-as-published.yaml", params)
    apply(RECIPES / "smollm2-default.yaml", params)
    assert params.read_bytes() == original


def test_smollm2_default_covers_every_key_the_recipes_set():
    default = set(_flat(yaml.safe_load((RECIPES / "smollm2-default.yaml").read_text())))
    for recipe in RECIPES.glob("*.yaml"):
        assert set(_flat(yaml.safe_load(recipe.read_text()))) <= default, recipe.name


def test_unknown_key_errors_and_leaves_the_file_alone(params, tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("lora:\n  rank: 8\n  rnak: 16\ntrain:\n  early_stopping:\n    patiense: 3\n")
    original = params.read_bytes()
    with pytest.raises(RecipeError) as err:
        apply(recipe, params)
    message = str(err.value)
    assert "lora.rnak: unknown key; did you mean lora.rank?" in message
    assert "train.early_stopping.patiense: unknown key; did you mean train.early_stopping.patience?" \
        in message
    assert params.read_bytes() == original


def test_unknown_key_with_no_close_name_lists_the_valid_ones(params, tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("lora:\n  zzzz: 8\n")
    with pytest.raises(RecipeError, match="lora.zzzz: unknown key; lora has rank, scale, dropout, "
                                          "keys, num_layers"):
        apply(recipe, params)


@pytest.mark.parametrize("text,problems", [
    ("lora:\n  rank: 0\n", [(2, "lora.rank: got 0; expected an integer >= 1")]),
    ("# a comment\ndata:\n  valid_ratio: 1.5\ntrain:\n  optimizer: sgd\n  batch_size: \"four\"\n",
     [(3, "data.valid_ratio: got 1.5; expected a number in [0, 1)"),
      (5, "train.optimizer: got \"sgd\"; expected one of adam, adamw"),
      (6, 'train.batch_size: got "four"; expected an integer >= 1')]),
    ("data:\n  valid_ratio: 0.5\n  test_ratio: 0.5\n", [(2, "data.valid_ratio + data.test_ratio")]),
    ("data:\n  test_ratio: 0.95\n", [(2, "data.valid_ratio + data.test_ratio")]),  # one of the two
    ("train:\n  grad_checkpoint: 1\n", [(2, "train.grad_checkpoint: got 1; expected true or false")]),
    ("train:\n  early_stopping:\n    patience: 0\n",
     [(3, "train.early_stopping.patience: got 0; expected an integer >= 1")]),
    ("lora:\n  keys:\n    - self_attn.q_proj\n    - \"\"\n",
     [(4, 'lora.keys[1]: got ""; expected a non-empty string')]),
])
def test_a_recipe_making_params_invalid_is_refused_at_its_own_line(params, tmp_path, text, problems):
    """The merged result passes the stages' own schema before anything is written; a value
    the recipe set is reported at the recipe's line, where it is to be fixed."""
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    original = params.read_bytes()
    with pytest.raises(RecipeError) as err:
        apply(recipe, params)
    message = str(err.value)
    assert f"{recipe} does not fit {params} (nothing was written)" in message
    for line, problem in problems:
        assert f"  {recipe}:{line}: {problem}" in message
    assert f"{params}:" not in message.replace(f"does not fit {params} (", "")
    assert params.read_bytes() == original


def test_a_problem_of_params_yaml_itself_keeps_its_name(params, tmp_path):
    params.write_text(params.read_text().replace("  batch_size: 4\n", "  batch_size: 0\n", 1))
    recipe = tmp_path / "ok.yaml"
    recipe.write_text("lora:\n  rank: 8\ntrain:\n  iters: 0\n")
    with pytest.raises(RecipeError) as err:
        apply(recipe, params)
    assert f"  {params}: train.batch_size: got 0" in str(err.value)  # not the recipe's doing
    assert f"  {recipe}:4: train.iters: got 0" in str(err.value)


def test_recipe_yaml_syntax_error_names_file_and_line(params, tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("lora:\n  rank: 8\n  keys: [a, b\n")
    with pytest.raises(RecipeError, match=rf"{recipe}:\d+:\d+: invalid YAML"):
        apply(recipe, params)


@pytest.mark.parametrize("text,message", [
    ("lora: 16\n", "lora is a section"),
    ("lora:\n  rank:\n    value: 16\n", "lora.rank is a value"),
    ("train:\n  learning_rate: 2e-5\n", "1.0e-5"),  # YAML 1.2 float, YAML 1.1 string
])
def test_malformed_recipes_are_refused(params, tmp_path, text, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    original = params.read_bytes()
    with pytest.raises(RecipeError, match=message):
        apply(recipe, params)
    assert params.read_bytes() == original


def test_cli_prints_changes_and_errors(params, capsys):
    assert main([str(RECIPES / "phi3-blog-as-published.yaml"), "--params", str(params)]) == 0
    out = capsys.readouterr().out
    assert "lora.keys: [self_attn.q_proj, self_attn.k_proj, self_attn.v_proj, " \
           "self_attn.o_proj] -> [self_attn.o_proj]" in out
    assert "train.grad_checkpoint: false -> true" in out
    assert main([str(RECIPES / "nope.yaml"), "--params", str(params)]) == 1
    assert "available: my-blog, phi3-blog" in capsys.readouterr().err


def test_cli_refuses_an_invalid_result_without_a_traceback(params, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("lora:\n  rank: 0\n  rnak: 3\n")
    original = params.read_bytes()
    proc = subprocess.run([sys.executable, "-m", "voicetune.tools.recipe", str(recipe), "--params", str(params)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    # both at once: the unknown key, and the schema's verdict on the rest
    assert f"{recipe}:3: lora.rnak: unknown key; did you mean lora.rank?" in proc.stderr
    assert f"{recipe}:2: lora.rank: got 0; expected an integer >= 1" in proc.stderr
    assert params.read_bytes() == original


def test_module_runs_as_a_command(params):
    proc = subprocess.run([sys.executable, "-m", "voicetune.tools.recipe",
                           str(RECIPES / "smollm2-default.yaml"), "--params", str(params)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and "nothing changed" in proc.stdout


def test_my_blog_says_what_to_create_while_its_posts_folder_is_missing(params, capsys):
    """recipes/my-blog.yaml points ingest at posts/, which only the user can fill: applying it
    says so, with the sample posts as the example, instead of DVC's missing dependency later."""
    assert main([str(RECIPES / "my-blog.yaml"), "--params", str(params)]) == 0
    out = capsys.readouterr().out
    assert "to do: posts/ does not exist yet: create it and put your posts in it" in out
    from voicetune.data.posts import SAMPLE, SUPPORTED

    assert f"{SAMPLE}/ holds an example of each kind; `cp -r {SAMPLE} posts`" in out
    assert "next: add your posts, then `dvc params diff`" in out
    sample = {p.suffix for p in (ROOT / SAMPLE).rglob("*") if p.is_file()}
    assert sample <= set(SUPPORTED) and {".md", ".html", ".xml"} <= sample  # each kind, truly
    assert main([str(RECIPES / "my-blog.yaml"), "--params", str(params)]) == 0
    assert "nothing changed" in (out := capsys.readouterr().out) and "posts/ does not exist" in out
    (params.parent / "posts").mkdir()  # beside params.yaml: the project root
    assert main([str(RECIPES / "my-blog.yaml"), "--params", str(params)]) == 0
    assert "to do" not in capsys.readouterr().out
