"""LoRA adapter settings (the parameters themselves live in ``decoder.Linear``).

Scaling is alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA (rs-LoRA), matching
PEFT's ``use_rslora`` so exported adapters behave identically there and in vLLM.
"""

from __future__ import annotations

import dataclasses
import math

ALL_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# emajax module name -> HF / PEFT module name
HF_MODULE_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                   "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 16
    alpha: float = 32.0
    rslora: bool = False
    targets: tuple[str, ...] = ALL_TARGETS
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ValueError(f"lora rank must be positive, got {self.rank}")
        bad = [t for t in self.targets if t not in ALL_TARGETS and t not in HF_MODULE_NAMES.values()]
        if bad:
            raise ValueError(f"unknown LoRA target module(s) {bad}; choose from {ALL_TARGETS}")
        # Accept HF names (q_proj, ...) as well as emajax's.
        inv = {v: k for k, v in HF_MODULE_NAMES.items()}
        object.__setattr__(self, "targets", tuple(inv.get(t, t) for t in self.targets))

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)
