"""The chat's models: base and lora from ONE copy of the base weights, fused on demand.

A 3.8B model in float32 is 15 GB; two copies of it (base, and base under the adapters)
would not fit where one does. So the base folder is loaded once, the adapters are applied to
it (mlx-lm's LoRA layers, as ``load_float32(base, adapters)`` does for the evaluate stage),
and switching to ``base`` swaps every LoRA layer for the plain linear layer it wraps: the very
same weight arrays, no adapter arithmetic, so its answers are the base model's exactly.
The fused folder is a second full copy of the weights and is loaded only when asked for.

Before a model is first used, DVC is asked whether the stage that made it is current
(``voicetune.freshness``): adapters trained with other params stop the chat with what to run.
"""
from __future__ import annotations

from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_unflatten
from mlx_lm.tuner.utils import load_adapters

from .errors import UserError
from .freshness import require_fresh
from .fusion import load_float32

NAMES = ("base", "lora", "fused")
# the pipeline stage whose output each path is, for the DVC freshness check
STAGES = {"base": "base_model", "adapters": "train", "fused": "fuse"}


class ChatModels:
    """``get(name) -> (model, tokenizer)`` for base, lora and fused, loading each at first use."""

    def __init__(self, base: str | Path = "models/base", adapters: str | Path = "models/adapters",
                 fused: str | Path = "models/fused", check: bool = True, root: str | Path = ".",
                 log=print):
        self.paths = {"base": Path(base), "adapters": Path(adapters), "fused": Path(fused)}
        self.check, self.root, self.log = check, Path(root), log
        self._base = None          # (model, tokenizer) of the base folder, adapters maybe applied
        self._lora_layers = None   # [(module path, LoRA layer)] once the adapters are applied
        self._adapters_on = False
        self._fused = None

    def _require(self, what: str) -> None:
        path = self.paths[what]
        if self.check:
            require_fresh([STAGES[what]], [path], self.root)
        elif not (self.root / path).exists():
            raise UserError(f"{path} not found: run `make repro` (or `dvc repro {STAGES[what]}`) "
                            f"first, or point --{what} at a {'model' if what != 'adapters' else 'adapter'} folder")

    def _load_base(self):
        if self._base is None:
            self._require("base")
            self.log(f"loading {self.paths['base']} ...")
            self._base = load_float32(self.root / self.paths["base"])[:2]
        return self._base

    def _apply_adapters(self) -> None:
        if self._lora_layers is not None:
            return
        model, _ = self._load_base()
        self._require("adapters")
        self.log(f"applying {self.paths['adapters']} to it (base and lora share its weights) ...")
        load_adapters(model, str(self.root / self.paths["adapters"]))
        if mx.default_device() == mx.cpu:
            model.set_dtype(mx.float32)  # as load_float32 does after loading adapters
        model.eval()  # the new LoRA layers' dropout must be off
        self._lora_layers = [(name, m) for name, m in model.named_modules()
                             if hasattr(m, "fuse") and hasattr(m, "linear")]
        if not self._lora_layers:
            raise UserError(f"{self.paths['adapters']} applied no LoRA layer to "
                            f"{self.paths['base']}: were they trained on another model? "
                            "Run `make repro` to retrain them")
        self._adapters_on = True

    def _switch_adapters(self, on: bool) -> None:
        if self._lora_layers is None or self._adapters_on == on:
            return
        model, _ = self._base
        model.update_modules(tree_unflatten(
            self._lora_layers if on else [(name, m.linear) for name, m in self._lora_layers]))
        self._adapters_on = on

    def get(self, name: str):
        """The (model, tokenizer) answering as ``name``; switching base <-> lora is instant."""
        if name == "fused":
            if self._fused is None:
                self._require("fused")
                self.log(f"loading {self.paths['fused']} ...")
                self._fused = load_float32(self.root / self.paths["fused"])[:2]
            return self._fused
        if name == "lora":
            self._apply_adapters()
        model, tokenizer = self._load_base()
        self._switch_adapters(name == "lora")
        return model, tokenizer

    def prepare(self, names: list[str]) -> None:
        """Load (and check) every model of ``names`` now, rather than at its first answer.
        Their weights are computed here too: MLX streams belong to the thread that made them,
        and a lazy array (the adapters' float32 cast) left for another thread to compute (the
        arena's generation worker) fails there with "There is no Stream(cpu, 0) in current
        thread"."""
        for name in names:
            mx.eval(self.get(name)[0].parameters())
