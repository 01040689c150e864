"""ModelConfig: the static description of a Llama-family decoder.

Frozen and hashable, so it can be a `jax.jit` static argument. Built from an HF `config.json` dict
(`from_hf_dict`) or from GGUF metadata (in `specdec.loading`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


class UnsupportedModelError(ValueError):
    """The checkpoint describes a model this package cannot run."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style RoPE frequency scaling (`rope_type: llama3`). Absent (None) means plain RoPE."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama / Mistral / Qwen2 / SmolLM2 decoder.

    Invariants: `num_heads % num_kv_heads == 0`; `head_dim` is even (RoPE rotates halves).
    `dtype` is the dtype of weights and activations ("float32" on CPU, "bfloat16" on GPU/TPU);
    attention softmax and logits are always computed in float32.
    `scan_layers` runs the layers with `lax.scan` over stacked weights (compiles faster, decodes
    ~40% slower on CPU) instead of a Python-unrolled loop.
    `tp_groups` G is the column grouping of the fused projections (`specdec.sharding`): `wqkv` holds
    G groups [q | k | v of heads g·H/G ...], `w_gate_up` G groups [gate | up of columns g·I/G ...],
    so that a tensor-parallel shard holds whole heads and matching gate/up columns. G = 1 is the
    checkpoint's own layout.
    `attention`: "dense" attends over the whole cache under one [B, T, S] mask; "split" attends
    the committed prefix and the new block separately, merged by log-sum-exp
    (`specdec.attention.attend_split`; the accelerator form); "flash" is "split" with the prefix
    half through Pallas's split-K decode-attention kernel (Triton on GPU; per shard on a mesh).
    All give the same result.
    """

    arch: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    sliding_window: int | None = None  # Mistral; None = full attention
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "float32"
    scan_layers: bool = False
    tp_groups: int = 1
    attention: str = "dense"

    def __post_init__(self):
        if self.attention not in ("dense", "split", "flash"):
            raise ValueError(f"attention={self.attention!r}: use dense, split or flash")
        if self.arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {self.arch!r} is not supported; specdec runs {SUPPORTED_ARCHITECTURES}. "
                "Convert the checkpoint to one of these or add a model file under specdec/models/."
            )
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise UnsupportedModelError(f"head_dim={self.head_dim} must be even for RoPE")
        g = self.tp_groups
        if g < 1 or self.num_heads % g or self.num_kv_heads % g or self.intermediate_size % g:
            raise UnsupportedModelError(
                f"tp_groups={g} must divide num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads} "
                f"and intermediate_size={self.intermediate_size}"
            )

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **overrides) -> ModelConfig:
        """Build from a parsed HF `config.json` (transformers 4 or 5 layout)."""
        model_type = d.get("model_type", "")
        arch_map = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
        if model_type not in arch_map:
            archs = d.get("architectures") or []
            raise UnsupportedModelError(
                f"config.json has model_type={model_type!r} (architectures={archs}); specdec supports "
                f"{sorted(arch_map)} (SmolLM2 checkpoints use model_type 'llama')."
            )
        arch = arch_map[model_type]
        hidden = d["hidden_size"]
        heads = d["num_attention_heads"]
        # transformers 5 moved rope settings into `rope_parameters`; 4.x keeps rope_theta/rope_scaling.
        rope = dict(d.get("rope_parameters") or {})
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        scaling = d.get("rope_scaling") or (rope if rope.get("rope_type") not in (None, "default") else None)
        rope_scaling = None
        if scaling:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind == "llama3":
                rope_scaling = RopeScaling(
                    factor=float(scaling["factor"]),
                    low_freq_factor=float(scaling["low_freq_factor"]),
                    high_freq_factor=float(scaling["high_freq_factor"]),
                    original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
                )
            elif kind not in (None, "default"):
                raise UnsupportedModelError(
                    f"rope scaling {kind!r} is not supported (supported: default, llama3)"
                )
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        sliding = d.get("sliding_window") if d.get("use_sliding_window", arch == "mistral") else None
        kw = dict(
            arch=arch,
            vocab_size=d["vocab_size"],
            hidden_size=hidden,
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or hidden // heads,
            intermediate_size=d["intermediate_size"],
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            rope_theta=float(theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", arch == "qwen2")),
            sliding_window=int(sliding) if sliding else None,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )
        kw.update(overrides)
        return cls(**kw)
