"""The registry's models (``voicetune.models.registry``) for the chat and the arena: base and
lora from ONE copy of the base weights, fused and dpo from one copy of the fused weights, each
copy loaded on demand.

A 3.8B model in float32 is 15 GB; two copies of it (base, and base under the adapters)
would not fit where one does. So the base folder is loaded once, the adapters are applied to
it (mlx-lm's LoRA layers, as ``load_float32(base, adapters)`` does for the evaluate stage),
and switching to ``base`` swaps every LoRA layer for the plain linear layer it wraps: the very
same weight arrays, no adapter arithmetic, so its answers are the base model's exactly.
The fused folder (the SFT adapters fused in) is a second full copy and is loaded only when
``fused`` or ``dpo`` is asked for; ``dpo`` is the fused weights under the preference stage's
adapters, switched the same way.

Before a model is first used, DVC is asked whether the stage that made it is current
(``voicetune.core.freshness``): adapters trained with other params stop the chat with what to run.
"""
from __future__ import annotations

from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_unflatten
from mlx_lm.tuner.utils import load_adapters

from voicetune.core import kernels
from voicetune.core.errors import UserError
from voicetune.core.freshness import require_fresh
from voicetune.models.fusion import load_float32
# which folders each model runs on, and the stage whose output each folder is (for the DVC
# freshness check): the registry's table
from voicetune.models.registry import FILES, RECIPES, STAGES


class _Switchable:
    """One loaded copy of weights, with one set of adapters that can be switched on and off."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.lora_layers = None   # [(module path, LoRA layer)] once the adapters are applied
        self.on = False

    def switch(self, on: bool) -> None:
        if self.lora_layers is None or self.on == on:
            return
        self.model.update_modules(tree_unflatten(
            self.lora_layers if on else [(name, m.linear) for name, m in self.lora_layers]))
        self.on = on


class ChatModels:
    """``get(name) -> (model, tokenizer)`` for base, lora, fused and dpo, loading at first use.

    ``fast_cpu`` is params.yaml's ``kernels.fast_cpu`` (``voicetune.core.kernels``); None leaves
    the kernels as they are."""

    def __init__(self, base: str | Path = FILES["base"][1],
                 adapters: str | Path = FILES["adapters"][1],
                 fused: str | Path = FILES["fused"][1], check: bool = True, root: str | Path = ".",
                 log=print, preference_adapters: str | Path = FILES["preference_adapters"][1],
                 fast_cpu: str | None = None):
        self.paths = {"base": Path(base), "adapters": Path(adapters), "fused": Path(fused),
                      "preference_adapters": Path(preference_adapters)}
        self.check, self.root, self.log = check, Path(root), log
        self._copies: dict[str, _Switchable] = {}  # "base" / "fused" -> its loaded copy
        self.fast_cpu = kernels.enable(fast_cpu) if fast_cpu is not None else kernels.active()

    def _require(self, what: str) -> None:
        path = self.paths[what]
        if self.check:
            require_fresh([STAGES[what]], [path], self.root)
        elif not (self.root / path).exists():
            raise UserError(f"{path} not found: run `make repro` (or `dvc repro {STAGES[what]}`) "
                            f"first, or point --{what.replace('_', '-')} at "
                            f"{'a model' if what in ('base', 'fused') else 'an adapter'} folder")

    def _copy(self, weights: str) -> _Switchable:
        if weights not in self._copies:
            self._require(weights)
            self.log(f"loading {self.paths[weights]} ...")
            self._copies[weights] = _Switchable(*load_float32(self.root / self.paths[weights])[:2])
        return self._copies[weights]

    def _apply_adapters(self, copy: _Switchable, weights: str, adapters: str) -> None:
        if copy.lora_layers is not None:
            return
        self._require(adapters)
        self.log(f"applying {self.paths[adapters]} to it (both models share its weights) ...")
        load_adapters(copy.model, str(self.root / self.paths[adapters]))
        if mx.default_device() == mx.cpu:
            copy.model.set_dtype(mx.float32)  # as load_float32 does after loading adapters
        copy.model.eval()  # the new LoRA layers' dropout must be off
        copy.lora_layers = [(name, m) for name, m in copy.model.named_modules()
                            if hasattr(m, "fuse") and hasattr(m, "linear")]
        if not copy.lora_layers:
            raise UserError(f"{self.paths[adapters]} applied no LoRA layer to "
                            f"{self.paths[weights]}: were they trained on another model? "
                            "Run `make repro` to retrain them")
        copy.on = True

    def get(self, name: str):
        """The (model, tokenizer) answering as ``name``; switching within a copy is instant."""
        weights, adapters = RECIPES[name]
        copy = self._copy(weights)
        if adapters:
            self._apply_adapters(copy, weights, adapters)
        copy.switch(adapters is not None)
        return copy.model, copy.tokenizer

    def prepare(self, names: list[str]) -> None:
        """Load (and check) every model of ``names`` now, rather than at its first answer.
        Their weights are computed here too: MLX streams belong to the thread that made them,
        and a lazy array (the adapters' float32 cast) left for another thread to compute (the
        arena's generation worker) fails there with "There is no Stream(cpu, 0) in current
        thread"."""
        for name in names:
            mx.eval(self.get(name)[0].parameters())
