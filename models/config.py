"""The model's hyper-parameters as a frozen dataclass, built from a config's `model` section.

Field names follow Hugging Face's words (`hidden_size`, `num_kv_heads`...). `models/` never
imports `configs/`: programs pass `ModelConfig.from_dict(config.model.to_dict())`. Sub-sections
(`model.mla`) are frozen dataclasses of their own, given as dicts (JSON, ml_collections) or
instances.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

NORMS = ("rmsnorm", "layernorm")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
POSITION_EMBEDDINGS = ("rope", "learned", "sinusoidal", "alibi", "none")  # models/positions.py
ROPE_SCALINGS = ("none", "linear", "llama3", "dynamic", "yarn")
REMAT_POLICIES = ("none", "full", "save_dots")
ATTENTION_IMPLS = ("xla", "cudnn", "pallas")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class MlaConfig:
    """Multi-head latent attention (DeepSeek-V2, arXiv 2405.04434; models/mla.py), on when
    `kv_lora_rank` > 0. Field names are DeepSeek's `config.json` words."""

    q_lora_rank: int = 0  # queries through a rank-q_lora_rank bottleneck (+ RMSNorm); 0 = one projection
    kv_lora_rank: int = 0  # the compressed latent c_kv that the KV cache holds; 0 = MLA off
    qk_nope_head_dim: int = 0  # per-head query/key dims without position (from the latent)
    qk_rope_head_dim: int = 0  # decoupled RoPE dims per query head and of the one shared key (= head_dim)
    v_head_dim: int = 0  # per-head value dims (from the latent)

    @property
    def enabled(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_seq_len: int
    dtype: str = "float32"  # compute dtype of activations and matmul inputs
    param_dtype: str = "float32"  # storage dtype of parameters (and of the optimizer's moments)
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    activation: str = "silu"
    gated_mlp: bool = True  # SwiGLU/GeGLU (gate * up) vs a plain two-layer MLP
    position_embedding: str = "rope"  # "rope" | "learned" | "sinusoidal" | "alibi" | "none" (NoPE)
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    attention_bias: bool = False  # biases on the q, k, v projections
    attention_out_bias: bool = False  # bias on the output projection
    mlp_bias: bool = False
    qk_norm: bool = False  # RMS/LayerNorm over head_dim of q and k before RoPE (Qwen3, OLMo 2)
    dropout_rate: float = 0.0  # embedding and residual dropout (GPT-2 style); needs a dropout rng
    logit_softcap: float = 0.0  # final logits -> c * tanh(logits / c); 0 = off
    attn_logit_softcap: float = 0.0  # same on attention scores; 0 = off
    sliding_window: int = 0  # every layer sees the W most recent keys; 0 = global
    layer_windows: tuple[int, ...] = ()  # one window per layer (0 = global), e.g. Gemma 2's local/global
    # RoPE frequency scaling for long contexts (as transformers' rope_type): "none" | "linear" | "llama3"
    # | "dynamic" (NTK-aware base grown with the call's max position + 1) | "yarn"
    rope_scaling: str = "none"
    rope_scaling_factor: float = 1.0  # linear: positions / factor; llama3, yarn: low frequencies / factor
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above original_len / this are divided by factor
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below original_len / this are kept
    rope_original_max_seq_len: int = 0  # llama3, yarn, dynamic: the pretraining context length; 0 = max_seq_len
    rope_beta_fast: float = 32.0  # yarn: dims turning more than this many times in original_len keep their frequency
    rope_beta_slow: float = 1.0  # yarn: dims turning fewer times are divided by factor; a linear ramp between
    rope_truncate: bool = True  # yarn: round the ramp's ends to whole dims (floor / ceil)
    rope_attention_factor: float = 0.0  # yarn: cos and sin times this; 0 = 0.1 ln(factor) + 1 (or mscale's ratio)
    rope_mscale: float = 0.0  # yarn, with rope_mscale_all_dim (both > 0): attention factor =
    rope_mscale_all_dim: float = 0.0  # (0.1 mscale ln(factor) + 1) / (0.1 mscale_all_dim ln(factor) + 1)
    embed_scale: float = 1.0  # embeddings times this, in the compute dtype (Gemma: sqrt(hidden_size))
    norm_weight_offset: float = 0.0  # norms multiply by (offset + scale); Gemma's (1 + w) is 1.0
    post_norms: bool = False  # also normalise the attention / MLP outputs before the residual add (Gemma 2)
    query_pre_attn_scalar: float = 0.0  # attention scores scaled by 1/sqrt(this); 0 = head_dim (Gemma 2)
    remat: str = "none"  # what the scanned layer keeps for the backward pass
    attention_impl: str = "xla"
    init_std: float = 0.02
    pipeline_stages: int = 1  # GPipe stages over the mesh's `stage` axis (models/pipeline.py); 1 = no pipeline
    pipeline_microbatches: int = 0  # micro-batches per pipelined forward/backward; 0 = 2 x pipeline_stages
    mla: MlaConfig = dataclasses.field(default_factory=MlaConfig)  # latent attention; off by default

    def __post_init__(self):
        # JSON gives lists; the config must stay hashable (it sits in the model's graphdef)
        object.__setattr__(self, "layer_windows", tuple(int(w) for w in self.layer_windows))
        if isinstance(self.mla, Mapping):
            known = {f.name for f in dataclasses.fields(MlaConfig)}
            unknown = sorted(set(self.mla) - known)
            if unknown:
                raise ValueError(f"unknown model.mla keys {unknown}; valid keys: {sorted(known)}")
            object.__setattr__(self, "mla", MlaConfig(**self.mla))
        elif not isinstance(self.mla, MlaConfig):
            raise ValueError(f"model.mla={self.mla!r} is not valid; expected a dict of {MlaConfig.__name__} fields")

        def check(name, value, valid):
            if value not in valid:
                raise ValueError(f"model.{name}={value!r} is not valid; expected one of {valid}")

        check("norm", self.norm, NORMS)
        check("activation", self.activation, ACTIVATIONS)
        check("position_embedding", self.position_embedding, POSITION_EMBEDDINGS)
        check("rope_scaling", self.rope_scaling, ROPE_SCALINGS)
        check("remat", self.remat, REMAT_POLICIES)
        check("attention_impl", self.attention_impl, ATTENTION_IMPLS)
        check("dtype", self.dtype, DTYPES)
        check("param_dtype", self.param_dtype, DTYPES)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name}={getattr(self, name)} must be positive")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model.num_heads={self.num_heads} must be a multiple of "
                f"model.num_kv_heads={self.num_kv_heads} (grouped-query attention)")
        if self.position_embedding == "rope" and self.head_dim % 2:
            raise ValueError(f"model.head_dim={self.head_dim} must be even for RoPE")
        if self.position_embedding == "sinusoidal" and self.hidden_size % 2:
            raise ValueError(f"model.hidden_size={self.hidden_size} must be even for sinusoidal positions "
                             f"(sin and cos features in pairs)")
        if self.position_embedding == "alibi" and self.attention_impl == "cudnn":
            raise ValueError("model.position_embedding='alibi' needs a score bias that model.attention_impl='cudnn' "
                             "does not take here; use attention_impl 'xla' or 'pallas'")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"model.dropout_rate={self.dropout_rate} must be in [0, 1)")
        if self.sliding_window < 0:
            raise ValueError(f"model.sliding_window={self.sliding_window} must be >= 0 (0 = global)")
        if self.layer_windows:
            if len(self.layer_windows) != self.num_layers or min(self.layer_windows) < 0:
                raise ValueError(f"model.layer_windows={self.layer_windows} needs one window >= 0 per layer "
                                 f"({self.num_layers} layers; 0 = global)")
            if self.sliding_window:
                raise ValueError(f"model.layer_windows={self.layer_windows} and model.sliding_window="
                                 f"{self.sliding_window} are both set; use one (sliding_window=0)")
        if self.rope_scaling != "none" and self.rope_scaling_factor <= 0:
            raise ValueError(f"model.rope_scaling_factor={self.rope_scaling_factor} must be positive")
        if self.rope_scaling == "llama3" and not self.rope_low_freq_factor < self.rope_high_freq_factor:
            raise ValueError(f"model.rope_low_freq_factor={self.rope_low_freq_factor} must be below "
                             f"model.rope_high_freq_factor={self.rope_high_freq_factor}")
        if self.rope_original_max_seq_len < 0:
            raise ValueError(f"model.rope_original_max_seq_len={self.rope_original_max_seq_len} must be >= 0 "
                             f"(0 = max_seq_len)")
        if self.rope_scaling == "dynamic" and self.head_dim < 4:
            raise ValueError(f"model.head_dim={self.head_dim} is too small for dynamic RoPE scaling (needs >= 4: "
                             f"the base grows by a power H / (H - 2))")
        if self.rope_scaling == "yarn":
            if not 0 < self.rope_beta_slow <= self.rope_beta_fast:
                raise ValueError(f"model.rope_beta_slow={self.rope_beta_slow} and model.rope_beta_fast="
                                 f"{self.rope_beta_fast} must satisfy 0 < beta_slow <= beta_fast (defaults 1, 32)")
            for name in ("rope_attention_factor", "rope_mscale", "rope_mscale_all_dim"):
                if getattr(self, name) < 0:
                    raise ValueError(f"model.{name}={getattr(self, name)} must be >= 0 (0 = unset)")
        if self.query_pre_attn_scalar < 0:
            raise ValueError(f"model.query_pre_attn_scalar={self.query_pre_attn_scalar} must be >= 0 (0 = head_dim)")
        if self.pipeline_stages < 1 or self.num_layers % self.pipeline_stages:
            valid = [s for s in range(1, self.num_layers + 1) if self.num_layers % s == 0]
            raise ValueError(f"model.pipeline_stages={self.pipeline_stages} must divide model.num_layers="
                             f"{self.num_layers} (each stage runs num_layers / stages layers); valid: {valid}")
        if self.pipeline_microbatches < 0:
            raise ValueError(f"model.pipeline_microbatches={self.pipeline_microbatches} must be >= 0 "
                             f"(0 = 2 x pipeline_stages)")
        self._check_mla()

    def _check_mla(self):
        m = self.mla
        for name in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(m, name) < 0:
                raise ValueError(f"model.mla.{name}={getattr(m, name)} must be >= 0")
        if not m.enabled:
            if m.q_lora_rank:
                raise ValueError(f"model.mla.q_lora_rank={m.q_lora_rank} needs model.mla.kv_lora_rank > 0 "
                                 f"(kv_lora_rank 0 = no latent attention)")
            return
        if m.qk_rope_head_dim <= 0 or m.qk_rope_head_dim % 2 or m.v_head_dim <= 0:
            raise ValueError(f"model.mla.qk_rope_head_dim={m.qk_rope_head_dim} must be even and > 0 and "
                             f"model.mla.v_head_dim={m.v_head_dim} > 0 for latent attention")
        if self.head_dim != m.qk_rope_head_dim:
            raise ValueError(f"model.head_dim={self.head_dim} must equal model.mla.qk_rope_head_dim="
                             f"{m.qk_rope_head_dim} with latent attention: RoPE (and its scaling) runs over the "
                             f"decoupled rope dims, as DeepSeek-V2's config.json sets head_dim")
        if self.num_kv_heads != self.num_heads:
            raise ValueError(f"model.num_kv_heads={self.num_kv_heads} must equal model.num_heads={self.num_heads} "
                             f"with latent attention (every head has its own keys and values from the latent)")
        if self.position_embedding != "rope":
            raise ValueError(f"model.position_embedding={self.position_embedding!r}: latent attention's decoupled "
                             f"keys need 'rope'")
        if self.qk_norm:
            raise ValueError("model.qk_norm=True is not supported with latent attention (model.mla.kv_lora_rank > 0)")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; valid keys: {sorted(known)}")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    @property
    def attention(self) -> str:
        """"mla" (multi-head latent attention, models/mla.py) or "mha" (grouped-query, models/transformer.py)."""
        return "mla" if self.mla.enabled else "mha"

    def window(self, layer: int) -> int:
        """The attention window of `layer` (0 = global)."""
        return self.layer_windows[layer] if self.layer_windows else self.sliding_window

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self):
        return jnp.dtype(self.param_dtype)


def param_count(cfg: ModelConfig) -> int:
    """Number of parameters, in closed form (tests check it against the built model)."""
    d, f, n, k, h, v = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                        cfg.head_dim, cfg.vocab_size)
    norm = d * (2 if cfg.norm == "layernorm" else 1)
    if cfg.mla.enabled:
        attn = _mla_matmul_params(cfg) + d * cfg.attention_out_bias
        m = cfg.mla
        attn += m.kv_lora_rank + m.q_lora_rank  # the latents' RMSNorm scales
        attn += (m.kv_lora_rank + m.qk_rope_head_dim + m.q_lora_rank) * cfg.attention_bias  # on q_a, kv_a
    else:
        attn = d * (n + 2 * k) * h + n * h * d
        attn += (n + 2 * k) * h * cfg.attention_bias + d * cfg.attention_out_bias
    if cfg.qk_norm:
        attn += 2 * h * (2 if cfg.norm == "layernorm" else 1)
    mlp = d * f * (3 if cfg.gated_mlp else 2) + (f * (2 if cfg.gated_mlp else 1) + d) * cfg.mlp_bias
    per_layer = attn + mlp + (4 if cfg.post_norms else 2) * norm
    total = cfg.num_layers * per_layer + norm + v * d
    total += cfg.max_seq_len * d * (cfg.position_embedding == "learned")
    total += d * v * (not cfg.tie_embeddings)
    return total


def _mla_matmul_params(cfg: ModelConfig) -> int:
    """Weights of one latent-attention layer's projections (q or q_a + q_b, kv_a, kv_b, o)."""
    m, d, n = cfg.mla, cfg.hidden_size, cfg.num_heads
    q = d * m.q_lora_rank + m.q_lora_rank * n * m.qk_head_dim if m.q_lora_rank else d * n * m.qk_head_dim
    kv = d * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank * n * (m.qk_nope_head_dim + m.v_head_dim)
    return q + kv + n * m.v_head_dim * d


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> dict[str, float]:
    """Model FLOPs per token (PaLM appendix B convention; no discount for causal masking).

    `forward` counts 2 FLOPs per multiply-add of every matmul: the projections and the head
    (the input embedding is a lookup, not a matmul), plus QK^T and PV over `seq_len` keys.
    `train` is 3x forward (the backward pass is twice the forward). Rematerialisation is not
    model FLOPs and is not counted, so MFU stays comparable across remat policies.
    """
    t = seq_len or cfg.max_seq_len
    d, f, n, k, h = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    attn_params = _mla_matmul_params(cfg) if cfg.mla.enabled else d * (n + 2 * k) * h + n * h * d
    matmul_params = cfg.num_layers * (attn_params + d * f * (3 if cfg.gated_mlp else 2))
    matmul_params += d * cfg.vocab_size
    if cfg.mla.enabled:  # scores over the q/k head dims, values over v's (the training form, keys expanded)
        attention = cfg.num_layers * 2 * n * t * (cfg.mla.qk_head_dim + cfg.mla.v_head_dim)
    else:
        attention = cfg.num_layers * 2 * 2 * n * h * t
    forward = 2 * matmul_params + attention
    return {"forward": float(forward), "train": float(3 * forward)}
