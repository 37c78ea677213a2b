"""The models, named once: what each one loads, and which pipeline stage makes it.

    base   models/base                                the base model, as downloaded
    lora   models/base  + models/adapters             the base model under the SFT LoRA adapters
    fused  models/fused                               the SFT adapters fused into the base weights
    dpo    models/fused + models/preference_adapters  the fused model under the preference adapters

The evaluate stage, the chat, the arena, the ratings, the report and the votes read this
table. Two places repeat it because they cannot import it, each checked by a test that fails
when they disagree: dvc.yaml's ``evaluate`` foreach (tests/test_dvc_graph.py) and params.yaml's
schema in ``voicetune.core.params`` (core imports no other room; tests/models/test_registry.py).
No MLX here, so light readers can import it (the loader is ``voicetune.models.loader``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath


@dataclass(frozen=True)
class Model:
    name: str
    weights: str               # the folder of weights it loads
    adapters: str | None       # the LoRA adapters applied to them at run time, or None
    stage: str                 # the pipeline stage that makes its last part
    description: str

    @property
    def parts(self) -> tuple[str, ...]:
        """Its weight folders by short name: ``("base", "adapters")`` for lora."""
        return tuple(PurePosixPath(p).name for p in (self.weights, self.adapters) if p)


MODELS: dict[str, Model] = {m.name: m for m in (
    Model("base", "models/base", None, "base_model", "the base model, as downloaded"),
    Model("lora", "models/base", "models/adapters", "train",
          "the base model under the SFT LoRA adapters"),
    Model("fused", "models/fused", None, "fuse", "the SFT adapters fused into the base weights"),
    # preference tuning's adapters sit on the fused SFT model (dpo or orpo alike)
    Model("dpo", "models/fused", "models/preference_adapters", "preference",
          "the fused model under the preference (DPO or ORPO) adapters"),
)}
NAMES = tuple(MODELS)  # display order, everywhere

# each weight folder by short name -> (the stage that writes it, its path): the last part of
# a model is made by that model's stage (models/adapters by train, models/fused by fuse)
FILES: dict[str, tuple[str, str]] = {
    PurePosixPath(m.adapters or m.weights).name: (m.stage, m.adapters or m.weights)
    for m in MODELS.values()}
STAGES = {part: stage for part, (stage, _) in FILES.items()}
# model name -> (its weights' short name, its adapters' short name or None)
RECIPES = {name: (m.parts[0], m.parts[1] if m.adapters else None) for name, m in MODELS.items()}
