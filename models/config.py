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
ROUTERS = ("softmax", "sigmoid")
GROUPED_MATMULS = ("auto", "ragged_dot", "padded")


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    """Mixture-of-experts feed-forward layers (models/moe.py); `num_experts=0` is a dense model.

    The config's `model.moe` section, nested in `ModelConfig.moe`. Routed experts are gated MLPs
    (or plain, as the model's `gated_mlp`) of width `expert_intermediate_size`; shared experts
    (DeepSeekMoE, Qwen2-MoE) are one MLP of `num_shared_experts x shared_intermediate_size` that
    every token goes through.
    """

    num_experts: int = 0  # routed experts E; 0 = dense model (every other field is then unused)
    experts_per_token: int = 2  # k: routed experts each token goes to (top-k token choice)
    num_shared_experts: int = 0  # experts every token goes through (DeepSeekMoE, Qwen2-MoE); 0 = none
    expert_intermediate_size: int = 0  # hidden width of each routed expert; 0 = model.intermediate_size
    shared_intermediate_size: int = 0  # hidden width of each shared expert; 0 = expert_intermediate_size
    shared_expert_gate: bool = False  # shared output x sigmoid(x . w) with a learned w [D] (Qwen2-MoE)
    first_dense_layers: int = 0  # the first k layers keep the dense MLP (DeepSeek's first_k_dense_replace)
    # more dense-MLP layers anywhere, by index (Qwen-MoE's mlp_only_layers / decoder_sparse_step), besides the prefix
    dense_layers: tuple[int, ...] = ()
    router: str = "softmax"  # gate scores: "softmax" over experts (Mixtral, Qwen) | "sigmoid" per expert (DeepSeek-V3)
    norm_topk_prob: bool = True  # divide the k chosen scores by their sum (Mixtral always; Qwen by config)
    routed_scaling_factor: float = 1.0  # routed output times this (DeepSeek-V2/V3)
    # group-limited routing (DeepSeek-V2's group_limited_greedy): the experts form num_groups equal groups, the
    # topk_groups groups with the highest best score are kept and the k experts are chosen among theirs; 0 = off
    num_groups: int = 0
    topk_groups: int = 0
    capacity_factor: float = 0.0  # slots per expert per sequence = ceil(cf x T x k / E), overflow dropped; 0 = dropless
    aux_loss_weight: float = 0.0  # Switch load-balancing loss E sum_i f_i P_i (1 when balanced) times this
    z_loss_weight: float = 0.0  # router z-loss mean(logsumexp(router logits) ** 2) times this (ST-MoE)
    bias_balancing: bool = False  # auxiliary-loss-free balancing (DeepSeek-V3): a selection-only bias per expert
    bias_update_rate: float = 1e-3  # that bias moves by this x sign(mean load - load) every step (DeepSeek-V3's gamma)
    # grouped expert matmul of dropless dispatch: "ragged_dot" (jax.lax.ragged_dot), "padded" (rows sorted by
    # expert, each expert's rows padded to whole blocks, one batched einsum), "auto" = padded on CPU, where
    # ragged_dot lowers to a dense masked matmul (about E times the work), ragged_dot elsewhere
    grouped_matmul: str = "auto"
    block_size: int = 0  # "padded": rows per block; 0 = automatic (about a quarter of an expert's mean rows)

    def __post_init__(self):
        # JSON / ml_collections give lists; the config must stay hashable (it sits in the model's graphdef)
        object.__setattr__(self, "dense_layers", tuple(int(i) for i in self.dense_layers))
        if self.num_experts < 0:
            raise ValueError(f"model.moe.num_experts={self.num_experts} must be >= 0 (0 = dense model)")
        for name in ("expert_intermediate_size", "shared_intermediate_size", "num_shared_experts",
                     "first_dense_layers", "block_size", "num_groups", "topk_groups"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.moe.{name}={getattr(self, name)} must be >= 0")
        for name in ("capacity_factor", "aux_loss_weight", "z_loss_weight", "bias_update_rate"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.moe.{name}={getattr(self, name)} must be >= 0")
        if self.router not in ROUTERS:
            raise ValueError(f"model.moe.router={self.router!r} is not valid; expected one of {ROUTERS}")
        if self.grouped_matmul not in GROUPED_MATMULS:
            raise ValueError(f"model.moe.grouped_matmul={self.grouped_matmul!r} is not valid; expected one of "
                             f"{GROUPED_MATMULS}")
        if min(self.dense_layers, default=0) < 0 or len(set(self.dense_layers)) != len(self.dense_layers):
            raise ValueError(f"model.moe.dense_layers={self.dense_layers} must be distinct layer indices >= 0")
        if not self.num_experts:
            return
        if not 1 <= self.experts_per_token <= self.num_experts:
            raise ValueError(f"model.moe.experts_per_token={self.experts_per_token} must be in [1, "
                             f"model.moe.num_experts={self.num_experts}]")
        if self.routed_scaling_factor <= 0:
            raise ValueError(f"model.moe.routed_scaling_factor={self.routed_scaling_factor} must be positive")
        if self.shared_expert_gate and not self.num_shared_experts:
            raise ValueError("model.moe.shared_expert_gate=True needs model.moe.num_shared_experts >= 1")
        if self.num_groups or self.topk_groups:
            g, t = self.num_groups, self.topk_groups
            if g < 1 or self.num_experts % g or not 1 <= t <= g:
                raise ValueError(f"model.moe.num_groups={g} must divide model.moe.num_experts={self.num_experts} "
                                 f"and model.moe.topk_groups={t} be in [1, num_groups] (both 0 = no group limit)")
            if self.experts_per_token > t * (self.num_experts // g):
                raise ValueError(f"model.moe.experts_per_token={self.experts_per_token} exceeds the "
                                 f"{t * (self.num_experts // g)} experts of model.moe.topk_groups={t} groups of "
                                 f"{self.num_experts // g}")

    @property
    def group_limited(self) -> bool:
        """Whether routing keeps only some groups of experts (num_groups > 1, topk_groups < num_groups)."""
        return self.num_groups > 1 and self.topk_groups < self.num_groups

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MoeConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model.moe config keys {unknown}; valid keys: {sorted(known)}")
        return cls(**dict(d))


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
    moe: MoeConfig = dataclasses.field(default_factory=MoeConfig)  # mixture-of-experts layers; dense by default

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
        if isinstance(self.moe, Mapping):  # a config dict / config.json gives the section as a dict
            object.__setattr__(self, "moe", MoeConfig.from_dict(self.moe))

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
        if self.moe.enabled:
            if self.moe.first_dense_layers >= self.num_layers:
                raise ValueError(f"model.moe.first_dense_layers={self.moe.first_dense_layers} leaves no MoE layer "
                                 f"of model.num_layers={self.num_layers}; valid: 0..{self.num_layers - 1} (or "
                                 f"model.moe.num_experts=0 for a dense model)")
            outside = [i for i in self.moe.dense_layers if i >= self.num_layers]
            if outside:
                raise ValueError(f"model.moe.dense_layers={self.moe.dense_layers}: layers {outside} are not layers of "
                                 f"model.num_layers={self.num_layers} (valid indices 0..{self.num_layers - 1})")
            if not self.num_moe_layers:
                raise ValueError(f"model.moe.dense_layers={self.moe.dense_layers} with model.moe.first_dense_layers="
                                 f"{self.moe.first_dense_layers} leaves no MoE layer of model.num_layers="
                                 f"{self.num_layers} (or model.moe.num_experts=0 for a dense model)")
            if self.mlp_bias:
                raise ValueError("model.mlp_bias=True is not supported with MoE layers (model.moe.num_experts="
                                 f"{self.moe.num_experts}): experts have no biases")
            if self.pipeline_stages > 1:
                raise ValueError(f"model.pipeline_stages={self.pipeline_stages} is not supported with MoE layers "
                                 f"(model.moe.num_experts={self.moe.num_experts}); use 1 (or mesh.strategy fsdp_ep)")
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
    def is_moe_layer(self, layer: int) -> bool:
        """Whether `layer` has an MoE feed-forward block (the rest keep the dense MLP)."""
        return self.moe.enabled and layer >= self.moe.first_dense_layers and layer not in self.moe.dense_layers

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_layers))

    @property
    def expert_intermediate_size(self) -> int:
        """Hidden width of each routed expert."""
        return self.moe.expert_intermediate_size or self.intermediate_size

    @property
    def shared_intermediate_size(self) -> int:
        """Hidden width of the shared experts fused into one MLP (0 without shared experts)."""
        return self.moe.num_shared_experts * (self.moe.shared_intermediate_size or self.expert_intermediate_size)

    def window(self, layer: int) -> int:
        """The attention window of `layer` (0 = global)."""
        return self.layer_windows[layer] if self.layer_windows else self.sliding_window

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self):
        return jnp.dtype(self.param_dtype)


def _mlp_params(cfg: ModelConfig, width: int, *, bias: bool) -> int:
    """Parameters of one MLP of hidden width `width` (gated or plain, as the model's)."""
    d = cfg.hidden_size
    return d * width * (3 if cfg.gated_mlp else 2) + (width * (2 if cfg.gated_mlp else 1) + d) * bias


def _moe_params(cfg: ModelConfig) -> dict[str, int]:
    """One MoE block's parameters: `routed` (all experts), `expert` (one of them), `shared` (the
    shared experts and their gate), `router` (its kernel and, with bias balancing, its bias)."""
    m, d = cfg.moe, cfg.hidden_size
    expert = _mlp_params(cfg, cfg.expert_intermediate_size, bias=False)
    shared = _mlp_params(cfg, cfg.shared_intermediate_size, bias=False) + d * m.shared_expert_gate
    return {"routed": m.num_experts * expert, "expert": expert, "shared": shared,
            "router": d * m.num_experts + m.num_experts * m.bias_balancing}


def _param_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active per token): active counts the k routed experts a token goes to, not all E."""
    d, n, k, h, v = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size
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
    block = attn + (4 if cfg.post_norms else 2) * norm
    dense_mlp = _mlp_params(cfg, cfg.intermediate_size, bias=cfg.mlp_bias)
    n_moe = cfg.num_moe_layers
    n_dense = cfg.num_layers - n_moe
    total = active = n_dense * (block + dense_mlp)
    if n_moe:
        e = _moe_params(cfg)
        total += n_moe * (block + e["routed"] + e["shared"] + e["router"])
        active += n_moe * (block + cfg.moe.experts_per_token * e["expert"] + e["shared"] + e["router"])
    rest = norm + v * d + cfg.max_seq_len * d * (cfg.position_embedding == "learned") + d * v * (not cfg.tie_embeddings)
    return total + rest, active + rest


def param_count(cfg: ModelConfig) -> int:
    """Number of parameters, in closed form (tests check it against the built model); an MoE
    model's counts every expert (`active_param_count` counts what one token uses)."""
    return _param_counts(cfg)[0]


def active_param_count(cfg: ModelConfig) -> int:
    """Parameters one token goes through: every parameter of a dense model; with MoE layers, the
    k routed experts it is sent to (plus the shared experts and the router) instead of all E.
    Embeddings count (Mixtral-8x7B: 46.7B total, 12.9B active)."""
    return _param_counts(cfg)[1]


def _mla_matmul_params(cfg: ModelConfig) -> int:
    """Weights of one latent-attention layer's projections (q or q_a + q_b, kv_a, kv_b, o)."""
    m, d, n = cfg.mla, cfg.hidden_size, cfg.num_heads
    q = d * m.q_lora_rank + m.q_lora_rank * n * m.qk_head_dim if m.q_lora_rank else d * n * m.qk_head_dim
    kv = d * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank * n * (m.qk_nope_head_dim + m.v_head_dim)
    return q + kv + n * m.v_head_dim * d


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> dict[str, float]:
    """Model FLOPs per token (PaLM appendix B convention; no discount for causal masking).

    `forward` counts 2 FLOPs per multiply-add of every matmul: the projections and the head
    (the input embedding is a lookup, not a matmul), plus QK^T and PV over `seq_len` keys. MoE
    layers count the router and the k experts a token goes to (the active parameters), not the
    dispatch's padding. `train` is 3x forward (the backward pass is twice the forward).
    Rematerialisation is not model FLOPs and is not counted, so MFU stays comparable across
    remat policies.
    """
    t = seq_len or cfg.max_seq_len
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    mlp_matmul = d * cfg.intermediate_size * (3 if cfg.gated_mlp else 2)
    attn_matmul = _mla_matmul_params(cfg) if cfg.mla.enabled else d * (n + 2 * k) * h + n * h * d
    n_moe = cfg.num_moe_layers
    matmul_params = cfg.num_layers * attn_matmul + (cfg.num_layers - n_moe) * mlp_matmul
    if n_moe:
        e = _moe_params(cfg)
        matmul_params += n_moe * (cfg.moe.experts_per_token * e["expert"] + e["shared"] + d * cfg.moe.num_experts)
    matmul_params += d * cfg.vocab_size
    if cfg.mla.enabled:  # scores over the q/k head dims, values over v's (the training form, keys expanded)
        attention = cfg.num_layers * 2 * n * t * (cfg.mla.qk_head_dim + cfg.mla.v_head_dim)
    else:
        attention = cfg.num_layers * 2 * 2 * n * h * t
    forward = 2 * matmul_params + attention
    return {"forward": float(forward), "train": float(3 * forward)}
