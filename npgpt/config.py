"""GPT-2's hyperparameters: one frozen dataclass and the four published presets."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class GPTConfig:
    """The shape of a GPT-2 decoder.

    Shape letters used throughout npgpt: B batch, T time (tokens), C = n_embd channels,
    NH = n_head heads, hs = C // NH head size, V = vocab_size, L = n_layer.
    """

    vocab_size: int = 50257  # V
    n_ctx: int = 1024  # longest sequence; rows of wpe and the KV cache's capacity
    n_embd: int = 768  # C
    n_head: int = 12  # NH
    n_layer: int = 12  # L
    layer_norm_epsilon: float = 1e-5
    dropout: float = 0.0  # GPT-2's embd/attn/resid dropout, used only when training

    def __post_init__(self):
        for name in ("vocab_size", "n_ctx", "n_embd", "n_head", "n_layer"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_size(self) -> int:  # hs
        return self.n_embd // self.n_head

    @classmethod
    def preset(cls, name: str, **overrides) -> GPTConfig:
        """One of GPT-2's published sizes ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl",
        or their parameter counts "124M", "355M", "774M", "1558M")."""
        key = PRESET_ALIASES.get(name, name)
        if key not in PRESETS:
            known = ", ".join(list(PRESETS) + list(PRESET_ALIASES))
            raise ValueError(f"unknown GPT-2 preset {name!r}; known: {known}")
        return cls(**{**PRESETS[key], **overrides})

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> GPTConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        data = json.loads(text)
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"unknown GPTConfig fields {sorted(unknown)}")
        return cls(**data)


PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}
PRESET_ALIASES = {"124M": "gpt2", "355M": "gpt2-medium", "774M": "gpt2-large", "1558M": "gpt2-xl"}
