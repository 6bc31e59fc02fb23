"""Pretraining presets: `python -m train.pretrain --config=configs/pretrain.py:<preset>`.

Presets: tiny (default, minutes on a laptop CPU), small (~28M), 125m (GPT-2 small), 1b (the
Llama-3.2-1B shape), llama3_8b (the Llama-3-8B shape), moe_tiny (tiny with mixture-of-experts
layers: 16 fine-grained experts, top-2, one shared expert, dropless; as many active parameters
per token as tiny), mixtral_8x7b (the Mixtral-8x7B shape: 46.7B parameters, 12.9B active),
deepseek_v2_lite (the DeepSeek-V2-Lite shape: latent attention with a 512-dim cache latent, 64
routed experts of width 1408 with 6 per token plus 2 shared, the first layer dense; 15.7B
parameters, 2.66B active per token counting the embedding row and the output head, 2.45B
without the embedding table, DeepSeek's "2.4B activated"). Its context is the 4K it was
pretrained at; the released checkpoint extends it with YaRN (x40), which `models.hf` imports.
Override any field from the command line, e.g. `--config.optimizer.lr=3e-4 --config.train.steps=80`.
"""

from ml_collections import config_dict
from ml_collections.config_dict import placeholder

PRESETS = ("tiny", "small", "125m", "1b", "llama3_8b", "moe_tiny", "mixtral_8x7b", "deepseek_v2_lite")


def source(**overrides):
    """One data source; every key present so each can be overridden from the command line."""
    d = dict(format="embedded", path="", split="train", text_field="text", text_unit="file", weight=1.0,
             data_dir="", validation_fraction=0.02, strict=False)
    d.update(overrides)
    return config_dict.ConfigDict(d)

# Llama family: RMSNorm, SwiGLU, RoPE, grouped-query attention, untied head, no biases.
_LLAMA = dict(norm="rmsnorm", norm_eps=1e-5, activation="silu", gated_mlp=True, position_embedding="rope",
              rope_theta=10000.0, tie_embeddings=False, attention_bias=False, attention_out_bias=False,
              mlp_bias=False)
# GPT-2 family: LayerNorm with bias, GELU (tanh), learned positions, tied embeddings, biases everywhere.
_GPT2 = dict(norm="layernorm", norm_eps=1e-5, activation="gelu_tanh", gated_mlp=False,
             position_embedding="learned", rope_theta=10000.0, tie_embeddings=True, attention_bias=True, attention_out_bias=True,
             mlp_bias=True)

#            vocab    d     ffn    L   heads kv  head_dim ctx   family  extra
_SHAPES = {
    "tiny": (4096, 256, 704, 4, 4, 2, 64, 256, _LLAMA, {}),
    "small": (4096, 512, 1408, 8, 8, 4, 64, 512, _LLAMA, {}),
    "125m": (50257, 768, 3072, 12, 12, 12, 64, 1024, _GPT2, {}),
    "1b": (128256, 2048, 8192, 16, 32, 8, 64, 2048, _LLAMA, dict(rope_theta=500000.0, tie_embeddings=True)),
    "llama3_8b": (128256, 4096, 14336, 32, 32, 8, 128, 8192, _LLAMA, dict(rope_theta=500000.0)),
    "moe_tiny": (4096, 256, 704, 4, 4, 2, 64, 256, _LLAMA, dict(moe=dict(
        num_experts=16, experts_per_token=2, expert_intermediate_size=176, num_shared_experts=1,
        shared_intermediate_size=352, first_dense_layers=1, aux_loss_weight=0.01, z_loss_weight=1e-3))),
    "mixtral_8x7b": (32000, 4096, 14336, 32, 32, 8, 128, 32768, _LLAMA, dict(rope_theta=1e6, moe=dict(
        num_experts=8, experts_per_token=2, norm_topk_prob=True, aux_loss_weight=0.02))),
    "deepseek_v2_lite": (102400, 2048, 10944, 27, 16, 16, 64, 4096, _LLAMA, dict(norm_eps=1e-6, mla=dict(
        q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128), moe=dict(
        num_experts=64, experts_per_token=6, num_shared_experts=2, expert_intermediate_size=1408,
        first_dense_layers=1, norm_topk_prob=False, routed_scaling_factor=1.0, aux_loss_weight=0.001))),
}

#            steps  batch  lr     seq   tokenizer vocab  dtype       remat
_TRAINING = {
    "tiny": (300, 16, 3e-3, 256, 4096, "bfloat16", "none"),
    "small": (2000, 32, 1e-3, 512, 4096, "bfloat16", "none"),
    "125m": (20000, 512, 6e-4, 1024, 32768, "bfloat16", "save_dots"),
    "1b": (50000, 512, 3e-4, 2048, 32768, "bfloat16", "full"),
    "llama3_8b": (100000, 512, 3e-4, 8192, 32768, "bfloat16", "full"),
    "moe_tiny": (300, 16, 3e-3, 256, 4096, "bfloat16", "none"),
    "mixtral_8x7b": (100000, 512, 3e-4, 4096, 32000, "bfloat16", "full"),
    "deepseek_v2_lite": (100000, 512, 4.2e-4, 4096, 32768, "bfloat16", "full"),
}

# model.mla: multi-head latent attention (DeepSeek-V2, models/mla.py), on when kv_lora_rank > 0; then
# head_dim = qk_rope_head_dim and num_kv_heads = num_heads
_MLA = dict(
    q_lora_rank=0,  # queries through a low-rank bottleneck of this rank (+ RMSNorm); 0 = one projection
    kv_lora_rank=0,  # the compressed latent the KV cache holds per token and layer; 0 = off
    qk_nope_head_dim=0,  # per-head query/key dims without RoPE (keys from the latent)
    qk_rope_head_dim=0,  # decoupled RoPE dims per query head and of the one shared key
    v_head_dim=0,  # per-head value dims (from the latent)
)

# model.moe: every field present (so each can be overridden from the command line); dense by default
_MOE = dict(
    num_experts=0,  # routed experts E; 0 = dense model
    experts_per_token=2,  # k: experts each token goes to (top-k of the router's scores)
    num_shared_experts=0,  # experts every token goes through (DeepSeekMoE, Qwen2-MoE)
    expert_intermediate_size=0,  # hidden width of each routed expert; 0 = intermediate_size
    shared_intermediate_size=0,  # hidden width of each shared expert; 0 = expert_intermediate_size
    shared_expert_gate=False,  # shared experts' output x sigmoid(x . w) (Qwen2-MoE)
    first_dense_layers=0,  # the first k layers keep the dense MLP (of intermediate_size)
    dense_layers=(),  # more dense-MLP layers anywhere, by index (Qwen-MoE's mlp_only_layers)
    router="softmax",  # "softmax" (Mixtral, Qwen, DeepSeek-V2) | "sigmoid" (DeepSeek-V3)
    norm_topk_prob=True,  # renormalise the k chosen scores to sum 1
    routed_scaling_factor=1.0,  # routed output times this (DeepSeek)
    num_groups=0,  # group-limited routing: experts in this many groups (DeepSeek-V2's n_group); 0 = off
    topk_groups=0,  # and the k experts chosen within the best this many groups (topk_group)
    capacity_factor=0.0,  # slots per expert per sequence = ceil(cf T k / E), overflow dropped; 0 = dropless
    aux_loss_weight=0.0,  # Switch load-balancing loss (1 when balanced) times this
    z_loss_weight=0.0,  # router z-loss mean(logsumexp(router logits)^2) times this
    bias_balancing=False,  # auxiliary-loss-free balancing: a selection-only bias per expert (DeepSeek-V3)
    bias_update_rate=1e-3,  # that bias moves by this x sign(mean load - load) each step
    grouped_matmul="auto",  # "auto" (padded on CPU, ragged_dot elsewhere) | "ragged_dot" | "padded"
    block_size=0,  # "padded": rows per block; 0 = automatic
)


def get_config(arg=None):
    preset = arg or "tiny"
    if preset not in PRESETS:
        raise ValueError(f"unknown pretrain preset {preset!r}; valid presets: {PRESETS}")
    vocab, d, ffn, layers, heads, kv, hd, ctx, family, extra = _SHAPES[preset]
    extra = dict(extra)
    moe = {**_MOE, **extra.pop("moe", {})}
    mla = {**_MLA, **extra.pop("mla", {})}
    steps, batch, lr, seq, tok_vocab, dtype, remat = _TRAINING[preset]

    c = config_dict.ConfigDict()
    c.name = preset  # the default workdir is runs/<name>

    c.model = config_dict.ConfigDict(dict(
        vocab_size=vocab,  # embedding rows (>= the tokenizer's vocabulary)
        hidden_size=d,  # residual stream width D
        intermediate_size=ffn,  # MLP hidden width F
        num_layers=layers,  # decoder blocks, stacked and scanned
        num_heads=heads,  # query heads N
        num_kv_heads=kv,  # key/value heads K (grouped-query attention when K < N)
        head_dim=hd,  # H
        max_seq_len=ctx,  # context length (size of learned position tables)
        dtype=dtype,  # compute dtype: "float32" or "bfloat16" (f32 softmax/norms/loss and accumulation)
        param_dtype="float32",  # storage dtype of parameters and optimizer moments
        remat=remat,  # "none" | "full" | "save_dots": what each layer keeps for the backward pass
        attention_impl="xla",  # "xla" | "cudnn" | "pallas"
        qk_norm=False,  # normalise q and k per head before RoPE
        dropout_rate=0.0,  # embedding + residual dropout
        logit_softcap=0.0,  # final logits -> c * tanh(logits / c); 0 = off
        attn_logit_softcap=0.0,  # same on attention scores; 0 = off
        sliding_window=0,  # W most recent keys per query; 0 = global attention
        layer_windows=(),  # one window per layer (0 = global), e.g. Gemma 2; () = sliding_window everywhere
        rope_scaling="none",  # RoPE scaling for long context: "none" | "linear" | "llama3" | "dynamic" | "yarn"
        rope_scaling_factor=1.0,  # linear: positions / factor; llama3, yarn: low frequencies / factor; dynamic: NTK
        rope_low_freq_factor=1.0,  # llama3: wavelengths above original_len / this are divided by the factor
        rope_high_freq_factor=4.0,  # llama3: wavelengths below original_len / this are kept
        rope_original_max_seq_len=0,  # llama3, yarn, dynamic: the pretraining context length; 0 = max_seq_len
        rope_beta_fast=32.0,  # yarn: dims turning more than this many times in original_len keep their frequency
        rope_beta_slow=1.0,  # yarn: dims turning fewer times are divided by the factor; a linear ramp between
        rope_truncate=True,  # yarn: round the ramp's ends to whole dims
        rope_attention_factor=0.0,  # yarn: cos and sin times this; 0 = 0.1 ln(factor) + 1 (or the mscale ratio)
        rope_mscale=0.0,  # yarn, with rope_mscale_all_dim (both > 0): attention factor = ratio of the two mscales
        rope_mscale_all_dim=0.0,  # yarn: see rope_mscale; 0 = unset
        embed_scale=1.0,  # embeddings times this (Gemma: sqrt(hidden_size))
        norm_weight_offset=0.0,  # norms multiply by (offset + scale); Gemma's (1 + w) is 1.0
        post_norms=False,  # also normalise attention / MLP outputs before the residual add (Gemma 2)
        query_pre_attn_scalar=0.0,  # attention scale 1/sqrt(this); 0 = head_dim (Gemma 2)
        init_std=0.02,  # normal init std (output projections scaled by 1/sqrt(2 L))
        pipeline_stages=1,  # GPipe stages over mesh.shape.stage (set from the mesh at run time); 1 = off
        pipeline_microbatches=0,  # micro-batches per pipelined step (bubble (S-1)/(M+S-1)); 0 = 2 x stages
        # multi-head latent attention (DeepSeek-V2, models/mla.py), on when kv_lora_rank > 0; then
        # head_dim = qk_rope_head_dim and num_kv_heads = num_heads
        mla=config_dict.ConfigDict(mla),  # multi-head latent attention (fields in _MLA above); off by default
        moe=config_dict.ConfigDict(moe),  # mixture-of-experts layers (fields in _MOE above); dense by default
        **{**family, **extra},
    ))

    c.data = config_dict.ConfigDict(dict(
        # Named sources, mixed by weight. Each: format (text | jsonl | parquet | hf | array_record |
        # tfds | embedded), path (globs, comma-separated; tfds: the dataset name), split, text_field
        # (dots reach nested keys), text_unit (text: file | line | paragraph), weight, data_dir
        # (tfds), validation_fraction (embedded), strict (raise on the first bad record).
        sources=config_dict.ConfigDict({"stdlib": source(split="train")}),
        eval_sources=config_dict.ConfigDict({"stdlib": source(split="validation")}),  # held out
        seq_len=seq,  # tokens per packed row (<= model.max_seq_len)
        tokenizer=config_dict.ConfigDict(dict(
            kind="sentencepiece",  # "sentencepiece" (.model file) | "hf" (tokenizer.json or its directory)
            path=placeholder(str),  # unset: train a sentencepiece model on the training sources once, cached
            vocab_size=tok_vocab,  # when training one (<= model.vocab_size)
            model_type="bpe",  # "bpe" | "unigram", when training one
            train_documents=200_000,  # documents read from the sources to train one
        )),
        packing="concat",  # "concat" (split, no padding) | "best_fit" (documents kept whole) | "first_fit"
        num_packing_bins=64,  # best_fit: rows filled at once
        shuffle_window=1024,  # rows shuffled in a window after packing (0 = off)
        num_workers=0,  # grain worker processes for reading, tokenisation and packing
        num_shards=0,  # data shards (a multiple of the process count); 0 = the process count, or the checkpoint's
    ))

    c.train = config_dict.ConfigDict(dict(
        steps=steps,  # optimizer updates in the whole run
        batch_size=batch,  # global batch, in sequences of data.seq_len tokens
        microbatches=1,  # gradient accumulation: the batch is split into this many forward/backward passes
        seed=0,  # parameter init, data order, dropout
        z_loss=0.0,  # weight of the z-loss, mean(log Z ** 2)
        log_every=10,  # steps between metrics.jsonl / TensorBoard / progress lines
        eval_every=100,  # steps between held-out loss evaluations (and at the end)
        eval_batches=8,  # held-out batches per evaluation (the same ones every time)
        checkpoint_every=100,  # steps between checkpoints (and at the end)
        keep_checkpoints=3,  # newest checkpoints kept
        async_checkpoint=True,  # write checkpoints in the background
        offload_optimizer=False,  # keep the optimizer state in host memory (pinned_host) between steps
        nan_policy="skip",  # non-finite loss / gradient: "skip" the update (stop after nan_max_skips in a row) | "stop"
        nan_max_skips=10,  # "skip": consecutive skipped updates that stop the run (with a checkpoint)
        num_samples=4,  # prompts sampled into samples.txt at the end (0 = none)
        sample_tokens=96,  # new tokens per sample
    ))

    c.optimizer = config_dict.ConfigDict(dict(
        name="adamw",  # "adamw" | "adafactor" | "lion" | "sgd" | "lamb"
        lr=lr,  # peak learning rate
        schedule="cosine",  # "cosine" | "linear" | "constant" | "inverse_sqrt" | "wsd"
        warmup_steps=placeholder(int),  # unset: warmup_fraction * train.steps
        warmup_fraction=0.05,
        min_lr_ratio=0.1,  # final lr = lr * min_lr_ratio (cosine, linear, wsd)
        decay_fraction=0.2,  # wsd: share of the run spent decaying
        weight_decay=0.1,
        b1=0.9,  # adam/lamb/lion beta1
        b2=0.95,  # adam/lamb/lion beta2
        eps=1e-8,
        momentum=0.9,  # sgd
        nesterov=False,  # sgd
        clip_norm=1.0,  # global gradient-norm clip; 0 = off
        decay_norms=False,  # apply weight decay to norm scales
        decay_biases=False,  # ... to biases
        decay_embeddings=False,  # ... to embeddings (and a tied head)
    ))

    c.mesh = config_dict.ConfigDict(dict(
        # all six axes; at most one -1 (resolved from the device count)
        shape=config_dict.ConfigDict(dict(data=-1, stage=1, fsdp=1, tensor=1, sequence=1, expert=1)),
        # "" (use shape) | "dp" | "fsdp" | "fsdp_tp" | "tp" | "fsdp_sp" | "pp_fsdp" | "fsdp_ep" (expert parallel):
        # picks the shape for the devices present (train/mesh.py)
        strategy="",
        rules=(),  # overrides of the logical-axis table, e.g. (("embed", None),)
    ))

    c.distributed = config_dict.ConfigDict(dict(
        coordinator_address=placeholder(str),  # host:port of process 0 (multi-host without TPU/SLURM detection)
        num_processes=placeholder(int),
        process_id=placeholder(int),
    ))
    return c
