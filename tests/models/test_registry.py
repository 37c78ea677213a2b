"""The one table of models (voicetune.models.registry), and everything that reads it."""
import pytest

from voicetune.models.registry import FILES, MODELS, NAMES, RECIPES, STAGES, Model


def test_each_model_loads_its_weights_under_its_adapters():
    assert NAMES == ("base", "lora", "fused", "dpo")
    assert {n: (m.weights, m.adapters) for n, m in MODELS.items()} == {
        "base": ("models/base", None), "lora": ("models/base", "models/adapters"),
        "fused": ("models/fused", None), "dpo": ("models/fused", "models/preference_adapters")}
    assert RECIPES == {"base": ("base", None), "lora": ("base", "adapters"),
                       "fused": ("fused", None), "dpo": ("fused", "preference_adapters")}
    assert MODELS["dpo"].parts == ("fused", "preference_adapters")
    assert all(m.description for m in MODELS.values())


def test_every_weight_folder_is_some_stage_s_output():
    assert FILES == {"base": ("base_model", "models/base"), "adapters": ("train", "models/adapters"),
                     "fused": ("fuse", "models/fused"),
                     "preference_adapters": ("preference", "models/preference_adapters")}
    assert STAGES == {part: stage for part, (stage, _) in FILES.items()}
    # every part of every model is one of them
    assert {p for m in MODELS.values() for p in m.parts} == set(FILES)


def test_a_model_is_a_value():
    with pytest.raises(AttributeError):
        MODELS["base"].weights = "elsewhere"  # frozen: one table for every reader
    assert Model("x", "w", None, "s", "d") == Model("x", "w", None, "s", "d")


def test_the_readers_share_the_table():
    from voicetune.core.params import ArenaParams
    from voicetune.data import votes
    from voicetune.evaluate import ratings
    from voicetune.models.loader import ChatModels
    from voicetune.serve import chat

    assert ratings.NAMES is NAMES and chat.NAMES is NAMES
    assert votes.WEIGHTS is FILES
    assert {w: p.as_posix() for w, p in ChatModels(check=False).paths.items()} == {
        w: path for w, (_, path) in FILES.items()}
    with pytest.raises(ValueError, match="'base', 'lora', 'fused' or 'dpo'"):
        ArenaParams(models=["base", "gpt"])


def test_params_yaml_accepts_exactly_the_registry_s_models():
    """core imports no other room (voicetune.project.architecture), so params.py repeats the
    names for arena.models, as dvc.yaml does for evaluate: this holds the copy to the table."""
    from typing import get_args

    from voicetune.core.params import ArenaParams

    [item] = get_args(ArenaParams.model_fields["models"].annotation)  # list[Literal[...]]
    assert get_args(item) == NAMES
    assert ", ".join(NAMES) in ArenaParams.model_fields["models"].description


def test_the_evaluate_stage_and_the_report_offer_every_model():
    import subprocess
    import sys

    from tests.conftest import ROOT

    for script in ("stages/evaluate.py", "stages/report.py"):
        out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout
        assert any(f"{{{','.join(order)}}}" in out for order in (NAMES, sorted(NAMES))), script
