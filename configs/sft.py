"""Supervised fine-tuning presets: `python -m train.sft --config=configs/sft.py:<preset> --workdir=W`.

Presets: arith_full, arith_lora, arith_qlora, arith_prefix (a `tiny`-shaped base taught 1-digit addition, the
`addition` task of data/synthetic.py, in a few minutes on 2 CPU cores). 1-digit addition has 100
problems, so the held-out examples ask problems the training split also holds: `eval_accuracy`
measures that the run teaches the facts and the answer format, not generalisation to unseen
problems (`--config.data.sources.addition.size=2` and the same for `eval_sources` asks 8,100
problems, which a `tiny` model needs far longer runs for). They need a base: a run of
`python -m train.pretrain --config=configs/pretrain.py:tiny --workdir=runs/tiny`, then
`--config.init.workdir=runs/tiny`. Any Loom workdir (pretraining, SFT, `python -m models.hf
import` output) or a Hugging Face directory (`--config.init.hf_dir=DIR`) serves as the base; its
shape and tokenizer come with it. Override any field from the command line.
"""

from ml_collections import config_dict
from ml_collections.config_dict import placeholder

from configs import pretrain

PRESETS = ("arith_full", "arith_lora", "arith_qlora", "arith_prefix")


def source(**overrides):
    """One data source; every key present so each can be overridden from the command line."""
    d = dict(format="jsonl", path="", split="train", weight=1.0, strict=False,
             schema="auto",  # "auto" | "messages" | "prompt_completion" | "alpaca" (detected per record)
             messages_field="messages", prompt_field="prompt", completion_field="completion",
             instruction_field="instruction", input_field="input", output_field="output",
             task="", size=0, num_examples=10_000)  # format "synthetic": a data/synthetic.py task
    d.update(overrides)
    return config_dict.ConfigDict(d)


def get_config(arg=None):
    preset = arg or "arith_lora"
    if preset not in PRESETS:
        raise ValueError(f"unknown sft preset {preset!r}; valid presets: {PRESETS}")
    method = preset.split("_", 1)[1]
    c = config_dict.ConfigDict()
    c.name = preset  # the default workdir is runs/<name>

    c.init = config_dict.ConfigDict(dict(
        workdir="",  # a Loom workdir to start from (pretraining, SFT, or `python -m models.hf import` output)
        hf_dir="",  # or a Hugging Face model directory (config.json + safetensors + tokenizer)
        step=placeholder(int),  # init.workdir's checkpoint step; unset: its newest
        how=("arith presets fine-tune a tiny pretrained base: run `python -m train.pretrain "
             "--config=configs/pretrain.py:tiny --workdir=runs/tiny`, then pass --config.init.workdir=runs/tiny"),
    ))

    c.peft = config_dict.ConfigDict(dict(
        method=method,  # "full" | "lora" | "qlora" | "prefix"
        lora=config_dict.ConfigDict(dict(
            rank=16, alpha=32.0, dropout=0.05,
            # name patterns of projections (models/lora.py); the output head too: a briefly pretrained
            # base's head does not yet separate the answer tokens, and adapters below it learn slowly
            targets=("q", "k", "v", "o", "gate", "up", "down", "lm_head"),
            rslora=False,  # scale alpha / sqrt(rank) instead of alpha / rank
        )),
        qlora=config_dict.ConfigDict(dict(
            block_size=64,  # NF4 block along the input features
            double_quant=False,  # absmaxes as 8-bit codes (about 4.13 instead of 4.5 bits per weight)
        )),
        prefix=config_dict.ConfigDict(dict(
            length=16,  # virtual key/value tokens per layer
            reparam=0,  # 0: the prefixes are the parameters; > 0: a per-layer MLP of this width makes them
        )),
    ))

    # the base's shape; these override its dtypes (unset: the base's)
    c.model = config_dict.ConfigDict(dict(
        dtype=placeholder(str),  # compute dtype; qlora computes in bfloat16 unless set
        param_dtype=placeholder(str),  # storage dtype of the parameters (and of the trained ones' moments)
    ))

    c.data = config_dict.ConfigDict(dict(
        sources=config_dict.ConfigDict({"addition": source(format="synthetic", task="addition", size=1)}),
        eval_sources=config_dict.ConfigDict({"addition": source(format="synthetic", task="addition", size=1,
                                                                split="validation")}),
        seq_len=64,  # tokens per packed row; clamped to the base's max_seq_len
        chat_template=placeholder(str),  # unset: the tokenizer's own, else Loom's default (data/sft.py)
        truncation="truncate",  # examples longer than seq_len: "truncate" | "drop" (counted either way)
        packing="best_fit",  # "best_fit" (examples kept whole) | "first_fit" | "concat"
        num_packing_bins=64,
        shuffle_window=256,
        num_workers=0,
        num_shards=0,  # 0 = the process count, or the checkpoint's
    ))

    full = method == "full"
    c.train = config_dict.ConfigDict(dict(
        steps=240,
        batch_size=16,
        microbatches=1,
        seed=0,  # adapters' init, data order, dropout
        z_loss=0.0,
        log_every=10,
        eval_every=80,
        eval_batches=4,  # held-out loss batches
        eval_examples=64,  # held-out examples answered greedily for eval_accuracy (tasks with exact answers)
        checkpoint_every=80,
        keep_checkpoints=2,
        async_checkpoint=True,
        offload_optimizer=False,
        nan_policy="skip",
        nan_max_skips=10,
        num_samples=4,  # held-out prompts answered into samples.txt at the end
        sample_tokens=32,
    ))

    # optimizer, mesh and distributed sections as in pretraining (configs/pretrain.py documents each field)
    shared = pretrain.get_config("tiny")
    c.optimizer = shared.optimizer
    # plain prefixes need a higher rate: on arith_prefix, eval loss 6.26 at 3e-3 and 1.94 at 3e-2 after 240 steps
    c.optimizer.lr = {"full": 1e-3, "prefix": 3e-2}.get(method, 3e-3)
    c.optimizer.weight_decay = 0.01 if full else 0.0
    c.optimizer.b2 = 0.99
    c.mesh = shared.mesh
    c.distributed = shared.distributed
    return c
