"""The supported Hugging Face architectures: their `config.json` <-> `ModelConfig`, and where each
of our parameters lives in their checkpoints.

Config reading accepts both spellings transformers has used: `rope_theta` / `rope_scaling` at the
top level (transformers 4) and `rope_parameters` (transformers 5); `layer_types` or the older
`use_sliding_window` / `max_window_layers`; `hidden_act` or `hidden_activation`. Writing emits both
RoPE spellings, so transformers 4 and 5 (and vLLM) read the files.

A `Source` says how one of our parameters (one layer's slice, for stacked layer parameters) is
laid out in a Hugging Face tensor: PyTorch's `Linear` stores [out, in], our einsum kernels keep
named dims ([D, N, H] for q, [N, H, D] for o), GPT-2's `Conv1D` stores [in, out] and fuses q|k|v
into one `c_attn` tensor.

DeepSeek-V2 (`DeepseekV2ForCausalLM`, multi-head latent attention: models/mla.py): its RoPE
rotates interleaved pairs (x[2i], x[2i+1]) where Loom rotates halves (x[i], x[i + H/2]): the rows
of the rope dims of q / q_b (per head) and of kv_a's shared k_pe are permuted on import
(`Source.permute`: ours[i] = theirs[2i], ours[H/2 + i] = theirs[2i + 1]) and back on export.
Queries and keys are permuted alike, so every score is unchanged.

Mixture-of-experts families (`model.moe`, models/moe.py; `MOE_FAMILIES`), routing as transformers
5 runs it:
  Mixtral      softmax, top-k, always renormalised; no shared experts; every layer MoE; the
               sliding window as Mistral's. On disk `block_sparse_moe.gate` and
               `block_sparse_moe.experts.{e}.w1 / w3 / w2` (gate, up, down).
  Qwen2-MoE    softmax, top-k, renormalised if `norm_topk_prob`; one shared expert of
               `shared_expert_intermediate_size` times sigmoid(`shared_expert_gate`(x)); dense
               layers (`intermediate_size`) where `mlp_only_layers` / `decoder_sparse_step` put
               them (`moe.dense_layers`); q/k/v biases by `qkv_bias`.
  Qwen3-MoE    as Qwen2-MoE without the shared expert; QK-norm; one window for every layer.
  DeepSeek-V2  softmax, top-k `greedy` or `group_limited_greedy` (`moe.num_groups` /
               `topk_groups`), times `routed_scaling_factor`, never renormalised (transformers'
               DeepseekV2 does not read `norm_topk_prob`); `n_shared_experts` ungated shared
               experts as one MLP of n x `moe_intermediate_size`; the first
               `first_k_dense_replace` layers dense.
Qwen and DeepSeek store experts as `mlp.experts.{e}.{gate,up,down}_proj`. Every family's
experts are also read from transformers' in-memory form (`mlp.experts.gate_up_proj` [E, 2F, D],
gate rows first, and `mlp.experts.down_proj` [E, D, F]; Mixtral's router then `mlp.gate`), which
transformers' own loader accepts too (`Source.alt`); export writes per-expert tensors, as
`save_pretrained` does. A Loom MoE config exports to the family that reproduces it; what none
expresses (a sigmoid router, bias balancing, capacity_factor > 0, group-limited routing outside
DeepSeek-V2, ...) is named by `representation_errors`. The balance-loss weight travels as
`router_aux_loss_coef` (times k: transformers' loss sums over the k choice slots) with
`output_router_logits`; it, the z-loss and the dispatch implementation do not change the logits
and are not compared.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from models.config import ModelConfig

# architecture (config.json "architectures") -> model_type
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "GPT2LMHeadModel": "gpt2",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
_BY_MODEL_TYPE = {v: k for k, v in ARCHITECTURES.items()}
# The order `infer_architecture` tries: the plainest family that reproduces a config wins.
EXPORT_ORDER = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                "GemmaForCausalLM", "Gemma2ForCausalLM", "GPT2LMHeadModel", "MixtralForCausalLM",
                "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "DeepseekV2ForCausalLM")
# families with mixture-of-experts layers (DeepSeek-V2 also without: first_k_dense_replace >= layers)
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2")
ROPE_TYPES = ("default", "linear", "llama3", "dynamic", "yarn")

_ACT_IN = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
           "gelu": "gelu", "relu": "relu"}
_ACT_OUT = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "relu": "relu"}
_GPT2_ACT_OUT = {"silu": "silu", "gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}

# Fields that are not part of the function a checkpoint computes (precision, training knobs).
NON_ARCHITECTURE_FIELDS = ("dtype", "param_dtype", "remat", "attention_impl", "init_std", "dropout_rate")
# model.moe fields of the same kind: training losses and the grouped matmul's implementation
NON_ARCHITECTURE_MOE_FIELDS = ("aux_loss_weight", "z_loss_weight", "bias_update_rate", "grouped_matmul", "block_size")


def architecture_of(hf: dict[str, Any], where: str = "config.json") -> str:
    """The supported architecture named by a Hugging Face config, or a ValueError naming the valid ones."""
    archs = hf.get("architectures") or []
    for a in archs:
        if a in ARCHITECTURES:
            return a
    if not archs and hf.get("model_type") in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[hf["model_type"]]
    raise ValueError(f"{where}: architecture {archs[0] if archs else hf.get('model_type')!r} is not supported; "
                     f"supported architectures: {', '.join(sorted(ARCHITECTURES))}")


# --------------------------------------------------------------------------------------------
# config.json -> ModelConfig


def _rope_fields(hf: dict[str, Any], where: str) -> dict[str, Any]:
    params = dict(hf.get("rope_parameters") or {})
    if params and all(isinstance(v, dict) for v in params.values()):  # per layer type (Gemma 3 style)
        distinct = {tuple(sorted(v.items())) for v in params.values()}
        if len(distinct) > 1:
            raise ValueError(f"{where}: different RoPE parameters per layer type are not supported: {params}")
        params = dict(next(iter(params.values())))
    p = {**(hf.get("rope_scaling") or {}), **params}
    kind = p.get("rope_type") or p.get("type") or "default"
    theta = p.get("rope_theta", hf.get("rope_theta", 10000.0))
    partial = p.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor={partial} is not supported (RoPE over all of head_dim only)")
    if kind not in ROPE_TYPES:
        raise ValueError(f"{where}: RoPE scaling {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    out: dict[str, Any] = dict(rope_theta=float(theta))
    if kind == "linear":
        out.update(rope_scaling="linear", rope_scaling_factor=float(p["factor"]))
    elif kind == "llama3":
        original = p.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings")
        out.update(rope_scaling="llama3", rope_scaling_factor=float(p["factor"]),
                   rope_low_freq_factor=float(p["low_freq_factor"]), rope_high_freq_factor=float(p["high_freq_factor"]),
                   rope_original_max_seq_len=int(original or hf.get("max_position_embeddings")))
    elif kind == "dynamic":  # transformers' dynamic NTK grows the base past max_position_embeddings
        out.update(rope_scaling="dynamic", rope_scaling_factor=float(p["factor"]))
    elif kind == "yarn":
        original = int(p.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings")
                       or hf.get("max_position_embeddings", 2048))
        factor = p.get("factor")
        if factor is None:  # transformers: the ratio of the two lengths (DeepSeek-V3's configs)
            factor = hf.get("max_position_embeddings", 2048) / original
        attention_factor = p.get("attention_factor")
        if attention_factor is not None and not attention_factor > 0:
            raise ValueError(f"{where}: YaRN attention_factor={attention_factor} is not supported (it must be > 0)")
        # transformers reads unset / null / 0 betas and mscales as their defaults (`or`)
        out.update(rope_scaling="yarn", rope_scaling_factor=float(factor), rope_original_max_seq_len=original,
                   rope_beta_fast=float(p.get("beta_fast") or 32), rope_beta_slow=float(p.get("beta_slow") or 1),
                   rope_truncate=bool(p.get("truncate", True)), rope_attention_factor=float(attention_factor or 0.0),
                   rope_mscale=float(p.get("mscale") or 0.0), rope_mscale_all_dim=float(p.get("mscale_all_dim") or 0.0))
    return out


def _windows(windows: list[int]) -> dict[str, Any]:
    """Per-layer windows in canonical form: one shared window is `sliding_window`."""
    if len(set(windows)) <= 1:
        return dict(sliding_window=windows[0] if windows else 0, layer_windows=())
    return dict(sliding_window=0, layer_windows=tuple(windows))


def _typed_windows(hf: dict[str, Any], n_layers: int, window: int | None, default_types: list[str],
                   where: str) -> list[int]:
    types = hf.get("layer_types") or default_types
    if len(types) != n_layers:
        raise ValueError(f"{where}: layer_types has {len(types)} entries for {n_layers} layers")
    return [int(window) if (t == "sliding_attention" and window) else 0 for t in types]


def _activation(name: str | None, where: str, *, family: str) -> str:
    if family == "gemma" and name == "gelu":
        name = "gelu_pytorch_tanh"  # Gemma's released configs say "gelu" and mean the tanh form (as transformers does)
    if name not in _ACT_IN:
        raise ValueError(f"{where}: activation {name!r} is not supported; supported: {', '.join(sorted(_ACT_IN))}")
    return _ACT_IN[name]


def from_hf_config(hf: dict[str, Any], *, dtype: str = "float32", param_dtype: str | None = None,
                   where: str = "config.json") -> ModelConfig:
    """Our ModelConfig for a Hugging Face `config.json` dict (an architecture in ARCHITECTURES)."""
    arch = architecture_of(hf, where)
    family = ARCHITECTURES[arch]
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method", "?")
        raise ValueError(f"{where}: quantized checkpoints ({method}) are not supported; use the unquantized weights")
    common: dict[str, Any] = dict(dtype=dtype, param_dtype=param_dtype or dtype, dropout_rate=0.0)
    if family == "gpt2":
        d, n = hf.get("n_embd", 768), hf.get("n_head", 12)
        if hf.get("scale_attn_by_inverse_layer_idx"):
            raise ValueError(f"{where}: scale_attn_by_inverse_layer_idx=True is not supported")
        if hf.get("add_cross_attention"):
            raise ValueError(f"{where}: add_cross_attention=True is not supported (decoder-only models)")
        return ModelConfig(
            vocab_size=hf["vocab_size"], hidden_size=d, intermediate_size=hf.get("n_inner") or 4 * d,
            num_layers=hf.get("n_layer", 12), num_heads=n, num_kv_heads=n, head_dim=d // n,
            max_seq_len=hf.get("n_positions", 1024), norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            activation=_activation(hf.get("activation_function", "gelu_new"), where, family=family), gated_mlp=False,
            position_embedding="learned", tie_embeddings=hf.get("tie_word_embeddings", True), attention_bias=True,
            attention_out_bias=True, mlp_bias=True,
            query_pre_attn_scalar=0.0 if hf.get("scale_attn_weights", True) else 1.0, **common)

    d, n = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or {"qwen3": 128, "gemma": 256, "gemma2": 256}.get(family, d // n)
    layers = hf["num_hidden_layers"]
    if family == "deepseek_v2":
        return _deepseek_v2_config(hf, common, where)
    if family == "qwen3_moe":
        head_dim = hf.get("head_dim") or d // n
    bias = bool(hf.get("attention_bias", False))
    kw: dict[str, Any] = dict(
        vocab_size=hf["vocab_size"], hidden_size=d, intermediate_size=hf["intermediate_size"], num_layers=layers,
        num_heads=n, num_kv_heads=hf.get("num_key_value_heads") or n, head_dim=head_dim,
        max_seq_len=hf.get("max_position_embeddings", 2048), norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
        gated_mlp=True, position_embedding="rope",
        tie_embeddings=hf.get("tie_word_embeddings", family in ("gemma", "gemma2")),
        attention_bias=bias, attention_out_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)),
        **_rope_fields(hf, where), **common)
    if family in ("gemma", "gemma2"):
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        kw.update(activation=_activation(act, where, family="gemma"), norm_weight_offset=1.0, embed_scale=d ** 0.5)
    else:
        kw.update(activation=_activation(hf.get("hidden_act", "silu"), where, family=family))
    if family in ("mistral", "mixtral"):
        kw.update(attention_bias=False, attention_out_bias=False, mlp_bias=False,
                  **_windows([int(hf.get("sliding_window") or 0)] * layers))
        if family == "mixtral":
            kw.update(moe=_moe_section(hf, family, layers, where))
    elif family == "qwen2_moe":
        window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
        first = hf.get("max_window_layers", 28)
        default = ["sliding_attention" if window and (i + 1) % 2 and i < first else "full_attention"
                   for i in range(layers)]
        kw.update(mlp_bias=False, attention_bias=bool(hf.get("qkv_bias", True)), attention_out_bias=False,
                  moe=_moe_section(hf, family, layers, where),
                  **_windows(_typed_windows(hf, layers, window, default, where)))
    elif family == "qwen3_moe":
        window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
        kw.update(mlp_bias=False, qk_norm=True, moe=_moe_section(hf, family, layers, where),
                  **_windows([int(window or 0)] * layers))
    elif family in ("qwen2", "qwen3"):
        window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
        first = hf.get("max_window_layers", 28)
        default = ["sliding_attention" if window and i >= first else "full_attention" for i in range(layers)]
        kw.update(mlp_bias=False, **_windows(_typed_windows(hf, layers, window, default, where)))
        if family == "qwen2":
            kw.update(attention_bias=True, attention_out_bias=False)
        else:
            kw.update(qk_norm=True)
    elif family == "gemma":
        kw.update(mlp_bias=False)
    elif family == "gemma2":
        default = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
        qpas = float(hf.get("query_pre_attn_scalar", 256))
        kw.update(mlp_bias=False, post_norms=True, attn_logit_softcap=float(hf.get("attn_logit_softcapping") or 0.0),
                  logit_softcap=float(hf.get("final_logit_softcapping") or 0.0),
                  query_pre_attn_scalar=0.0 if qpas == head_dim else qpas,
                  **_windows(_typed_windows(hf, layers, hf.get("sliding_window", 4096), default, where)))
        if hf.get("use_bidirectional_attention"):
            raise ValueError(f"{where}: use_bidirectional_attention=True is not supported (causal models only)")
    return ModelConfig(**kw)


def _aux_loss_weight(hf: dict[str, Any], k: int) -> float:
    """Our balance-loss weight for transformers' `router_aux_loss_coef` (added to the loss only
    with `output_router_logits`): its loss sums the load over the k choice slots, k times ours."""
    if not hf.get("output_router_logits"):
        return 0.0
    return float(hf.get("router_aux_loss_coef", 0.001)) * k


def _moe_section(hf: dict[str, Any], family: str, layers: int, where: str) -> dict[str, Any]:
    """`model.moe` for a Mixtral / Qwen2-MoE / Qwen3-MoE config.json (num_experts 0 = dense)."""
    if family == "mixtral":
        e = hf.get("num_local_experts", 8)
        k = hf.get("num_experts_per_tok", 2)
        return dict(num_experts=e, experts_per_token=k, norm_topk_prob=True, aux_loss_weight=_aux_loss_weight(hf, k))
    e = hf.get("num_experts", hf.get("num_local_experts")) or 0  # transformers writes Qwen3-MoE's as num_local_experts
    if not e:
        return {}
    k = hf.get("num_experts_per_tok", 4)
    step = hf.get("decoder_sparse_step", 1) or 1
    only = set(hf.get("mlp_only_layers") or [])
    dense = tuple(i for i in range(layers) if i in only or (i + 1) % step)
    if len(dense) == layers:  # every layer dense: a dense model (its MLPs have the same names)
        return {}
    out = dict(num_experts=e, experts_per_token=k, expert_intermediate_size=hf["moe_intermediate_size"],
               norm_topk_prob=bool(hf.get("norm_topk_prob", False)), dense_layers=dense,
               aux_loss_weight=_aux_loss_weight(hf, k))
    if family == "qwen2_moe":
        shared = hf.get("shared_expert_intermediate_size")
        if not shared:
            raise ValueError(f"{where}: shared_expert_intermediate_size={shared!r} is not supported (Qwen2-MoE's "
                             f"gated shared expert needs a width > 0)")
        out.update(num_shared_experts=1, shared_intermediate_size=int(shared), shared_expert_gate=True)
    return out


def _deepseek_v2_config(hf: dict[str, Any], common: dict[str, Any], where: str) -> ModelConfig:
    """DeepSeek-V2: latent attention (`model.mla`), RMSNorm, SwiGLU; MoE layers after the first
    `first_k_dense_replace` (`model.moe`: softmax, top-k greedy or group-limited, times
    `routed_scaling_factor`, never renormalised, shared experts ungated)."""
    layers = hf["num_hidden_layers"]
    dense = hf.get("first_k_dense_replace", 0)
    moe: dict[str, Any] = {}
    if dense < layers and hf.get("n_routed_experts"):
        moe = _deepseek_v2_moe(hf, dense, where)
    if not hf.get("kv_lora_rank"):
        raise ValueError(f"{where}: kv_lora_rank={hf.get('kv_lora_rank')!r}: DeepSeek-V2 needs a latent rank > 0")
    rope = hf.get("qk_rope_head_dim", 64)
    if hf.get("head_dim") not in (None, rope):
        raise ValueError(f"{where}: head_dim={hf['head_dim']} differs from qk_rope_head_dim={rope} (DeepSeek-V2's "
                         f"RoPE runs over head_dim = qk_rope_head_dim)")
    n = hf["num_attention_heads"]
    kv = hf.get("num_key_value_heads") or n
    if kv != n:
        raise ValueError(f"{where}: num_key_value_heads={kv} differs from num_attention_heads={n} (latent attention "
                         f"gives every head its keys and values)")
    bias = bool(hf.get("attention_bias", False))
    mla = dict(q_lora_rank=int(hf.get("q_lora_rank") or 0), kv_lora_rank=int(hf["kv_lora_rank"]),
               qk_nope_head_dim=int(hf.get("qk_nope_head_dim", 128)), qk_rope_head_dim=int(rope),
               v_head_dim=int(hf.get("v_head_dim", 128)))
    return ModelConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_layers=layers, num_heads=n, num_kv_heads=n, head_dim=int(rope),
        max_seq_len=hf.get("max_position_embeddings", 2048), norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
        activation=_activation(hf.get("hidden_act", "silu"), where, family="deepseek_v2"), gated_mlp=True,
        position_embedding="rope", tie_embeddings=hf.get("tie_word_embeddings", False), attention_bias=bias,
        attention_out_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)), mla=mla, moe=moe,
        **_rope_fields(hf, where), **common)


def _deepseek_v2_moe(hf: dict[str, Any], dense: int, where: str) -> dict[str, Any]:
    method = hf.get("topk_method") or "greedy"
    if method not in ("greedy", "group_limited_greedy"):
        raise ValueError(f"{where}: topk_method={method!r} is not supported by DeepseekV2ForCausalLM (supported: "
                         f"greedy, group_limited_greedy)")
    k = hf.get("num_experts_per_tok")
    if not k:
        raise ValueError(f"{where}: num_experts_per_tok={k!r}: MoE layers need experts per token >= 1")
    shared = hf.get("n_shared_experts")
    if not shared:
        raise ValueError(f"{where}: n_shared_experts={shared!r} is not supported (DeepSeek-V2's MoE layers always "
                         f"have shared experts, n_shared_experts >= 1)")
    out = dict(num_experts=int(hf["n_routed_experts"]), experts_per_token=int(k), num_shared_experts=int(shared),
               expert_intermediate_size=int(hf["moe_intermediate_size"]), first_dense_layers=int(dense),
               norm_topk_prob=False,  # transformers' DeepseekV2 never reads norm_topk_prob
               routed_scaling_factor=float(hf.get("routed_scaling_factor") or 1.0))
    if method == "group_limited_greedy":
        out.update(num_groups=int(hf["n_group"]), topk_groups=int(hf["topk_group"]))
    return out


# --------------------------------------------------------------------------------------------
# ModelConfig -> config.json


def _windows_of(cfg: ModelConfig) -> list[int]:
    return [cfg.window(i) for i in range(cfg.num_layers)]


def to_hf_config(cfg: ModelConfig, architecture: str, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A Hugging Face `config.json` dict for `cfg` as `architecture`. `base` (the config the model
    was imported from) supplies what we do not model (token ids, ...) when it is the same architecture.

    Does not check that the architecture can express `cfg`: `check_representable` does.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture {architecture!r} is not supported; "
                         f"supported: {', '.join(sorted(ARCHITECTURES))}")
    family = ARCHITECTURES[architecture]
    out = dict(base) if base and base.get("model_type") == family else {}
    for stale in ("torch_dtype", "dtype", "transformers_version", "_name_or_path", "quantization_config"):
        out.pop(stale, None)
    out.update(architectures=[architecture], model_type=family, vocab_size=cfg.vocab_size,
               tie_word_embeddings=cfg.tie_embeddings, dtype=cfg.param_dtype, torch_dtype=cfg.param_dtype)
    if family == "gpt2":
        out.update(n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.intermediate_size,
                   n_positions=cfg.max_seq_len, layer_norm_epsilon=cfg.norm_eps,
                   activation_function=_GPT2_ACT_OUT[cfg.activation],
                   scale_attn_weights=cfg.query_pre_attn_scalar != 1.0, scale_attn_by_inverse_layer_idx=False,
                   add_cross_attention=False)
        if not base:
            out.update(resid_pdrop=cfg.dropout_rate, embd_pdrop=cfg.dropout_rate, attn_pdrop=0.0)
        return out

    out.update(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
               num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
               max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, hidden_act=_ACT_OUT[cfg.activation])
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "linear":
        rope.update(rope_type="linear", factor=cfg.rope_scaling_factor)
    elif cfg.rope_scaling == "llama3":
        rope.update(rope_type="llama3", factor=cfg.rope_scaling_factor, low_freq_factor=cfg.rope_low_freq_factor,
                    high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_seq_len or cfg.max_seq_len)
    elif cfg.rope_scaling == "dynamic":  # its original length is max_position_embeddings (`_canonical`)
        rope.update(rope_type="dynamic", factor=cfg.rope_scaling_factor)
    elif cfg.rope_scaling == "yarn":
        rope.update(rope_type="yarn", factor=cfg.rope_scaling_factor,
                    original_max_position_embeddings=cfg.rope_original_max_seq_len or cfg.max_seq_len,
                    beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow)
        # optional keys only when they differ from the default (transformers 4 releases lack `truncate`)
        if not cfg.rope_truncate:
            rope.update(truncate=False)
        for key in ("attention_factor", "mscale", "mscale_all_dim"):
            if getattr(cfg, f"rope_{key}"):
                rope[key] = getattr(cfg, f"rope_{key}")
    # transformers 5 reads rope_parameters; transformers 4 (and vLLM on it) rope_theta / rope_scaling
    out.update(rope_parameters=rope, rope_theta=cfg.rope_theta,
               rope_scaling=None if cfg.rope_scaling == "none" else
               {k: v for k, v in rope.items() if k != "rope_theta"})
    windows = _windows_of(cfg)
    sliding = max(windows) or None
    types = ["sliding_attention" if w else "full_attention" for w in windows]
    if family == "deepseek_v2":
        m = cfg.mla
        out.update(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias, first_k_dense_replace=cfg.num_layers,
                   q_lora_rank=m.q_lora_rank or None, kv_lora_rank=m.kv_lora_rank,
                   qk_nope_head_dim=m.qk_nope_head_dim, qk_rope_head_dim=m.qk_rope_head_dim, v_head_dim=m.v_head_dim)
        if cfg.moe.enabled:
            out.update(_deepseek_v2_moe_fields(cfg))
        out.pop("layer_types", None)
    elif family == "mixtral":
        out.update(sliding_window=sliding, intermediate_size=cfg.expert_intermediate_size,
                   num_local_experts=cfg.moe.num_experts, num_experts_per_tok=cfg.moe.experts_per_token,
                   **_aux_loss_fields(cfg, out))
        out.pop("layer_types", None)
    elif family in ("qwen2_moe", "qwen3_moe"):
        m = cfg.moe
        dense = [i for i in range(cfg.num_layers) if not cfg.is_moe_layer(i)]
        out.update(num_experts=m.num_experts, num_experts_per_tok=m.experts_per_token,
                   moe_intermediate_size=cfg.expert_intermediate_size, norm_topk_prob=m.norm_topk_prob,
                   decoder_sparse_step=1, mlp_only_layers=dense, use_sliding_window=sliding is not None,
                   sliding_window=sliding, **_aux_loss_fields(cfg, out))
        out.pop("num_local_experts", None)
        if family == "qwen2_moe":
            first = next((i for i, w in enumerate(windows) if w), cfg.num_layers)
            out.update(qkv_bias=cfg.attention_bias, max_window_layers=first, layer_types=types,
                       shared_expert_intermediate_size=cfg.shared_intermediate_size)
        else:
            out.update(attention_bias=cfg.attention_bias)
            out.pop("layer_types", None)
    elif family in ("llama", "gemma"):
        out.update(attention_bias=cfg.attention_bias)
        if family == "llama":
            out.update(mlp_bias=cfg.mlp_bias)
        else:
            out.update(hidden_activation=_ACT_OUT[cfg.activation])
    elif family == "mistral":
        out.update(sliding_window=sliding)
        out.pop("layer_types", None)
    elif family in ("qwen2", "qwen3"):
        first = next((i for i, w in enumerate(windows) if w), cfg.num_layers)
        out.update(use_sliding_window=sliding is not None, sliding_window=sliding, max_window_layers=first,
                   layer_types=types)
        if family == "qwen3":
            out.update(attention_bias=cfg.attention_bias)
    elif family == "gemma2":
        out.update(attention_bias=cfg.attention_bias, hidden_activation=_ACT_OUT[cfg.activation],
                   query_pre_attn_scalar=_int_if_whole(cfg.query_pre_attn_scalar or cfg.head_dim),
                   attn_logit_softcapping=cfg.attn_logit_softcap or None,
                   final_logit_softcapping=cfg.logit_softcap or None, sliding_window=sliding or 4096, layer_types=types)
    return out


def _aux_loss_fields(cfg: ModelConfig, out: dict[str, Any]) -> dict[str, Any]:
    """transformers' `router_aux_loss_coef` / `output_router_logits` for our balance-loss weight
    (see `_aux_loss_weight`); without one, the base config's coefficient stays, switched off."""
    w, k = cfg.moe.aux_loss_weight, cfg.moe.experts_per_token
    if not w:
        return dict(output_router_logits=False, router_aux_loss_coef=out.get("router_aux_loss_coef", 0.001))
    return dict(output_router_logits=True, router_aux_loss_coef=w / k)


def _deepseek_v2_moe_fields(cfg: ModelConfig) -> dict[str, Any]:
    m, f = cfg.moe, cfg.expert_intermediate_size
    leading = next(i for i in range(cfg.num_layers) if cfg.is_moe_layer(i))
    shared = cfg.shared_intermediate_size
    return dict(first_k_dense_replace=leading, n_routed_experts=m.num_experts, num_experts_per_tok=m.experts_per_token,
                moe_intermediate_size=f, n_shared_experts=shared // f if shared % f == 0 else shared / f,
                routed_scaling_factor=m.routed_scaling_factor, norm_topk_prob=False,
                topk_method="group_limited_greedy" if m.group_limited else "greedy",
                n_group=m.num_groups if m.group_limited else None,
                topk_group=m.topk_groups if m.group_limited else None)


def _int_if_whole(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x  # transformers' strict configs type this field int


# The ModelConfig fields each RoPE scaling reads (besides rope_theta); the others do not change the model.
_ROPE_SCALING_FIELDS = {
    "none": (),
    "linear": ("rope_scaling_factor",),
    "llama3": ("rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_seq_len"),
    "dynamic": ("rope_scaling_factor", "rope_original_max_seq_len"),
    "yarn": ("rope_scaling_factor", "rope_original_max_seq_len", "rope_beta_fast", "rope_beta_slow", "rope_truncate",
             "rope_attention_factor", "rope_mscale", "rope_mscale_all_dim"),
}


def _canonical(cfg: ModelConfig) -> dict[str, Any]:
    d = cfg.to_dict()
    for f in NON_ARCHITECTURE_FIELDS:
        d.pop(f)
    d.update(_windows(_windows_of(cfg)))
    if d["query_pre_attn_scalar"] == cfg.head_dim:
        d["query_pre_attn_scalar"] = 0.0
    used = _ROPE_SCALING_FIELDS[cfg.rope_scaling] if cfg.position_embedding == "rope" else ()
    for f in set(_ROPE_SCALING_FIELDS["yarn"] + _ROPE_SCALING_FIELDS["llama3"]) - set(used):
        d.pop(f)
    if "rope_original_max_seq_len" in used:
        d["rope_original_max_seq_len"] = cfg.rope_original_max_seq_len or cfg.max_seq_len
    if cfg.position_embedding != "rope":
        d.pop("rope_theta")
    d.update(_canonical_moe(cfg, d.pop("moe")))
    if cfg.moe.enabled and cfg.num_moe_layers == cfg.num_layers:  # no dense MLP: its width is unused
        d["intermediate_size"] = cfg.expert_intermediate_size
    return d


def _canonical_moe(cfg: ModelConfig, moe: dict[str, Any]) -> dict[str, Any]:
    """model.moe as what the layers compute, one key each ("moe.<field>"): which layers are MoE,
    the resolved expert and total shared widths, groups only when they limit the choice."""
    if not cfg.moe.enabled:
        return {"moe.num_experts": 0}
    for f in NON_ARCHITECTURE_MOE_FIELDS + ("first_dense_layers", "dense_layers", "num_shared_experts",
                                            "shared_intermediate_size"):
        moe.pop(f)
    moe.update(moe_layers=tuple(i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)),
               expert_intermediate_size=cfg.expert_intermediate_size, shared_width=cfg.shared_intermediate_size)
    if not cfg.moe.group_limited:
        moe.update(num_groups=0, topk_groups=0)
    return {f"moe.{k}": v for k, v in moe.items()}


def representation_errors(cfg: ModelConfig, architecture: str) -> list[str]:
    """What `architecture` cannot express of `cfg` ([] = it reproduces the model exactly)."""
    family = ARCHITECTURES.get(architecture)
    if cfg.moe.enabled and family not in MOE_FAMILIES:
        return [f"mixture-of-experts layers (model.moe.num_experts={cfg.moe.num_experts}), which {architecture} "
                f"does not have"]
    if not cfg.moe.enabled and family in MOE_FAMILIES and family != "deepseek_v2":
        return [f"no mixture-of-experts layers (model.moe.num_experts=0): {architecture} has them"]
    try:
        back = from_hf_config(to_hf_config(cfg, architecture), dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    except (ValueError, KeyError) as e:
        return [str(e)]
    ours, theirs = _canonical(cfg), _canonical(back)
    return [f"{k}={ours[k]!r} (it has {theirs.get(k)!r})" for k in ours if ours[k] != theirs.get(k)]


def infer_architecture(cfg: ModelConfig) -> str:
    """The first architecture of EXPORT_ORDER that expresses `cfg` exactly, or a ValueError saying
    what each one lacks."""
    reasons = {}
    for arch in EXPORT_ORDER:
        errors = representation_errors(cfg, arch)
        if not errors:
            return arch
        reasons[arch] = ", ".join(errors[:4])
    raise ValueError("no supported Hugging Face architecture expresses this model:\n" +
                     "\n".join(f"  {a}: differs in {r}" for a, r in reasons.items()))


def check_representable(cfg: ModelConfig, architecture: str) -> None:
    errors = representation_errors(cfg, architecture)
    if errors:
        raise ValueError(f"{architecture} cannot express this model: it differs in {', '.join(errors)}")


# --------------------------------------------------------------------------------------------
# Where our parameters live in Hugging Face checkpoints


@dataclasses.dataclass(frozen=True)
class Source:
    """One of our parameters (per layer, for stacked ones) inside a Hugging Face tensor.

    ours = hf[select].reshape(view).transpose(perm); `select` = (dim, start, size) takes one block
    of a fused tensor (GPT-2's q|k|v), None the whole tensor. `permute` = (axis, order) then
    reorders one of our axes, ours = ours.take(order, axis) (DeepSeek's interleaved RoPE rows),
    None keeps it. `name` holds "{i}" for the layer index when the parameter is stacked over layers.
    `experts` > 0: the parameter (per layer) is [experts, *ours], one tensor per expert, `name`
    holding "{e}" for its index (Mixtral's `experts.{e}.w1`). `alt`: another form of the same
    parameter, read when this one's tensors are absent (transformers' fused `experts.gate_up_proj`).
    """

    name: str
    shape: tuple[int, ...]
    view: tuple[int, ...]
    perm: tuple[int, ...]
    select: tuple[int, int, int] | None = None
    permute: tuple[int, tuple[int, ...]] | None = None
    experts: int = 0
    alt: Source | None = None

    def names(self, layer: int | None) -> list[str]:
        """The tensor names for one layer (None: not stacked): one per expert, else one."""
        fmt = {} if layer is None else {"i": layer}
        if self.experts:
            return [self.name.format(e=e, **fmt) for e in range(self.experts)]
        return [self.name.format(**fmt) if fmt else self.name]

    def forms(self) -> list[Source]:
        """This source and its alternatives, in the order they are tried."""
        return [self] + (self.alt.forms() if self.alt is not None else [])

    @property
    def selected_shape(self) -> tuple[int, ...]:
        if self.select is None:
            return self.shape
        dim, _, size = self.select
        return self.shape[:dim] + (size,) + self.shape[dim + 1:]

    @property
    def ours(self) -> tuple[int, ...]:
        return tuple(self.view[p] for p in self.perm)


def _same(name, *shape):
    return Source(name, tuple(shape), tuple(shape), tuple(range(len(shape))))


def _linear(name, out_dims, in_dims):
    """torch Linear weight [prod(out), prod(in)] -> our kernel [*in, *out]."""
    o, i = len(out_dims), len(in_dims)
    return Source(name, (math.prod(out_dims), math.prod(in_dims)), tuple(out_dims) + tuple(in_dims),
                  tuple(range(o, o + i)) + tuple(range(o)))


def _split(name, shape, dims):
    """A tensor [.., prod(dims)] (1-D bias or Conv1D [in, out]) viewed as [.., *dims]."""
    view = tuple(shape[:-1]) + tuple(dims)
    return Source(name, tuple(shape), view, tuple(range(len(view))))


def interleaved_to_halves(nope: int, rope: int) -> tuple[int, ...]:
    """Index order over [nope dims | rope dims] that turns interleaved RoPE pairs into halves:
    position nope + i takes nope + 2i, position nope + rope/2 + i takes nope + 2i + 1."""
    return tuple(range(nope)) + tuple(nope + 2 * i for i in range(rope // 2)) + tuple(
        nope + 2 * i + 1 for i in range(rope // 2))


def _deepseek_v2_attention(cfg: ModelConfig, a: str) -> dict[tuple[str, ...], Source]:
    """Latent attention's parameters in a DeepSeek-V2 layer (`a` = "model.layers.{i}.self_attn.")."""
    m, d, n = cfg.mla, cfg.hidden_size, cfg.num_heads
    hq, r, hr = m.qk_head_dim, m.kv_lora_rank, m.qk_rope_head_dim
    q_rows = (2, interleaved_to_halves(m.qk_nope_head_dim, hr))  # ours [in, N, Hq]: the head dims
    s: dict[tuple[str, ...], Source] = {}
    if m.q_lora_rank:
        rq = m.q_lora_rank
        s[("layers", "attn", "q_a", "kernel")] = _linear(a + "q_a_proj.weight", (rq,), (d,))
        if cfg.attention_bias:
            s[("layers", "attn", "q_a", "bias")] = _same(a + "q_a_proj.bias", rq)
        s[("layers", "attn", "q_norm", "scale")] = _same(a + "q_a_layernorm.weight", rq)
        s[("layers", "attn", "q_b", "kernel")] = dataclasses.replace(_linear(a + "q_b_proj.weight", (n, hq), (rq,)),
                                                                     permute=q_rows)
    else:
        s[("layers", "attn", "q", "kernel")] = dataclasses.replace(_linear(a + "q_proj.weight", (n, hq), (d,)),
                                                                   permute=q_rows)
    kv_rows = interleaved_to_halves(r, hr)  # [c_kv | k_pe]
    s[("layers", "attn", "kv_a", "kernel")] = dataclasses.replace(
        _linear(a + "kv_a_proj_with_mqa.weight", (r + hr,), (d,)), permute=(1, kv_rows))
    if cfg.attention_bias:
        s[("layers", "attn", "kv_a", "bias")] = dataclasses.replace(_same(a + "kv_a_proj_with_mqa.bias", r + hr),
                                                                    permute=(0, kv_rows))
    s[("layers", "attn", "kv_norm", "scale")] = _same(a + "kv_a_layernorm.weight", r)
    s[("layers", "attn", "kv_b", "kernel")] = _linear(a + "kv_b_proj.weight", (n, m.qk_nope_head_dim + m.v_head_dim),
                                                      (r,))
    s[("layers", "attn", "o", "kernel")] = _linear(a + "o_proj.weight", (d,), (n, m.v_head_dim))
    if cfg.attention_out_bias:
        s[("layers", "attn", "o", "bias")] = _same(a + "o_proj.bias", d)
    return s


def param_sources(cfg: ModelConfig, architecture: str) -> dict[tuple[str, ...], Source]:
    """Our parameter path (as in `split_params`) -> its Source, for every parameter of the model."""
    family = ARCHITECTURES[architecture]
    d, f, n, k, h, v = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                        cfg.vocab_size)
    s: dict[tuple[str, ...], Source] = {}
    if family == "gpt2":
        p = "transformer.h.{i}."
        s[("embed",)] = _same("transformer.wte.weight", v, d)
        s[("pos_embed",)] = _same("transformer.wpe.weight", cfg.max_seq_len, d)
        s[("final_norm", "scale")] = _same("transformer.ln_f.weight", d)
        s[("final_norm", "bias")] = _same("transformer.ln_f.bias", d)
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            s[("layers", ours, "scale")] = _same(p + theirs + ".weight", d)
            s[("layers", ours, "bias")] = _same(p + theirs + ".bias", d)
        qkv = n * h
        for part, name in enumerate("qkv"):
            s[("layers", "attn", name, "kernel")] = Source(p + "attn.c_attn.weight", (d, 3 * qkv), (d, n, h), (0, 1, 2),
                                                           select=(1, part * qkv, qkv))
            s[("layers", "attn", name, "bias")] = Source(p + "attn.c_attn.bias", (3 * qkv,), (n, h), (0, 1),
                                                         select=(0, part * qkv, qkv))
        s[("layers", "attn", "o", "kernel")] = Source(p + "attn.c_proj.weight", (qkv, d), (n, h, d), (0, 1, 2))
        s[("layers", "attn", "o", "bias")] = _same(p + "attn.c_proj.bias", d)
        s[("layers", "mlp", "up", "kernel")] = _same(p + "mlp.c_fc.weight", d, f)
        s[("layers", "mlp", "up", "bias")] = _same(p + "mlp.c_fc.bias", f)
        s[("layers", "mlp", "down", "kernel")] = _same(p + "mlp.c_proj.weight", f, d)
        s[("layers", "mlp", "down", "bias")] = _same(p + "mlp.c_proj.bias", d)
    else:
        p = "model.layers.{i}."
        s[("embed",)] = _same("model.embed_tokens.weight", v, d)
        s[("final_norm", "scale")] = _same("model.norm.weight", d)
        s[("layers", "attn_norm", "scale")] = _same(p + "input_layernorm.weight", d)
        if cfg.post_norms:  # Gemma 2 names: post_attention_layernorm is the attention output's norm
            s[("layers", "attn_post_norm", "scale")] = _same(p + "post_attention_layernorm.weight", d)
            s[("layers", "mlp_norm", "scale")] = _same(p + "pre_feedforward_layernorm.weight", d)
            s[("layers", "mlp_post_norm", "scale")] = _same(p + "post_feedforward_layernorm.weight", d)
        else:
            s[("layers", "mlp_norm", "scale")] = _same(p + "post_attention_layernorm.weight", d)
        a = p + "self_attn."
        if family == "deepseek_v2":
            s.update(_deepseek_v2_attention(cfg, a))
        else:
            s[("layers", "attn", "q", "kernel")] = _linear(a + "q_proj.weight", (n, h), (d,))
            s[("layers", "attn", "k", "kernel")] = _linear(a + "k_proj.weight", (k, h), (d,))
            s[("layers", "attn", "v", "kernel")] = _linear(a + "v_proj.weight", (k, h), (d,))
            s[("layers", "attn", "o", "kernel")] = _linear(a + "o_proj.weight", (d,), (n, h))
            if cfg.attention_bias:
                s[("layers", "attn", "q", "bias")] = _split(a + "q_proj.bias", (n * h,), (n, h))
                s[("layers", "attn", "k", "bias")] = _split(a + "k_proj.bias", (k * h,), (k, h))
                s[("layers", "attn", "v", "bias")] = _split(a + "v_proj.bias", (k * h,), (k, h))
            if cfg.attention_out_bias:
                s[("layers", "attn", "o", "bias")] = _same(a + "o_proj.bias", d)
            if cfg.qk_norm:
                s[("layers", "attn", "q_norm", "scale")] = _same(a + "q_norm.weight", h)
                s[("layers", "attn", "k_norm", "scale")] = _same(a + "k_norm.weight", h)
        m = p + "mlp."
        s[("layers", "mlp", "gate", "kernel")] = _linear(m + "gate_proj.weight", (f,), (d,))
        s[("layers", "mlp", "up", "kernel")] = _linear(m + "up_proj.weight", (f,), (d,))
        s[("layers", "mlp", "down", "kernel")] = _linear(m + "down_proj.weight", (d,), (f,))
        if cfg.mlp_bias:
            s[("layers", "mlp", "gate", "bias")] = _same(m + "gate_proj.bias", f)
            s[("layers", "mlp", "up", "bias")] = _same(m + "up_proj.bias", f)
            s[("layers", "mlp", "down", "bias")] = _same(m + "down_proj.bias", d)
    if not cfg.tie_embeddings:
        s[("lm_head", "kernel")] = _linear("lm_head.weight", (v,), (d,))
    if cfg.moe.enabled:  # the block's sources for both stacks; the MoE stack's MLP is the MoE block's
        block = {k[1:]: src for k, src in s.items() if k[0] == "layers" and k[1] != "mlp"}
        dense_mlp = {k[1:]: src for k, src in s.items() if k[:2] == ("layers", "mlp")}
        s = {k: src for k, src in s.items() if k[0] != "layers"}
        from models.transformer import layer_stacks

        for stack in layer_stacks(cfg):
            mlp = _moe_sources(cfg, family, "model.layers.{i}.") if stack == "layers" else dense_mlp
            s.update({(stack,) + k: src for k, src in {**block, **mlp}.items()})
    return s


def _moe_sources(cfg: ModelConfig, family: str, p: str) -> dict[tuple[str, ...], Source]:
    """An MoE block's parameters (paths below the block): router, experts (per-expert tensors,
    or transformers' fused in-memory form as the alternative), shared experts and their gate."""
    d, e, f = cfg.hidden_size, cfg.moe.num_experts, cfg.expert_intermediate_size
    s: dict[tuple[str, ...], Source] = {}
    if family == "mixtral":
        per_expert = p + "block_sparse_moe.experts.{e}."
        names = {"gate": "w1", "up": "w3", "down": "w2"}
        s[("mlp", "router", "kernel")] = dataclasses.replace(_linear(p + "block_sparse_moe.gate.weight", (e,), (d,)),
                                                             alt=_linear(p + "mlp.gate.weight", (e,), (d,)))
    else:
        per_expert = p + "mlp.experts.{e}."
        names = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
        s[("mlp", "router", "kernel")] = _linear(p + "mlp.gate.weight", (e,), (d,))
    fused = p + "mlp.experts."
    alts = {  # gate_up_proj [E, 2F, D] (gate rows first), down_proj [E, D, F]
        "gate": Source(fused + "gate_up_proj", (e, 2 * f, d), (e, f, d), (0, 2, 1), select=(1, 0, f)),
        "up": Source(fused + "gate_up_proj", (e, 2 * f, d), (e, f, d), (0, 2, 1), select=(1, f, f)),
        "down": Source(fused + "down_proj", (e, d, f), (e, d, f), (0, 2, 1)),
    }
    for ours, theirs in names.items():
        out_dims, in_dims = ((d,), (f,)) if ours == "down" else ((f,), (d,))
        s[("mlp", "experts", ours)] = dataclasses.replace(
            _linear(per_expert + theirs + ".weight", out_dims, in_dims), experts=e, alt=alts[ours])
    if cfg.moe.num_shared_experts:
        w = cfg.shared_intermediate_size
        shared = p + ("mlp.shared_expert." if family == "qwen2_moe" else "mlp.shared_experts.")
        s[("mlp", "shared", "gate", "kernel")] = _linear(shared + "gate_proj.weight", (w,), (d,))
        s[("mlp", "shared", "up", "kernel")] = _linear(shared + "up_proj.weight", (w,), (d,))
        s[("mlp", "shared", "down", "kernel")] = _linear(shared + "down_proj.weight", (d,), (w,))
        if cfg.moe.shared_expert_gate:
            s[("mlp", "shared_gate", "kernel")] = _linear(p + "mlp.shared_expert_gate.weight", (1,), (d,))
    return s


# Tensors some checkpoints carry that are not parameters (buffers) and are safe to skip.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")
