"""Supervised fine-tuning presets: `python -m train.sft --config=configs/sft.py:<preset> --workdir=W`.

Presets: arith_full, arith_lora, arith_qlora, arith_prefix (a `tiny`-shaped base taught 1-digit
addition, the `addition` task of data/synthetic.py, in a few minutes on 2 CPU cores). 1-digit addition has 100
problems, so the held-out examples ask problems the training split also holds: `eval_accuracy`
measures that the run teaches the facts and the answer format, not generalisation to unseen
problems (`--config.data.sources.addition.size=2` and the same for `eval_sources` asks 8,100
problems, which a `tiny` model needs far longer runs for). They need a base: a run of
`python -m train.pretrain --config=configs/pretrain.py:tiny --workdir=runs/tiny`, then
`--config.init.workdir=runs/tiny`. Any Loom workdir (pretraining, SFT, `python -m models.hf
import` output) or a Hugging Face directory (`--config.init.hf_dir=DIR`) serves as the base; its
shape and tokenizer come with it. Override any field from the command line.

chat_lora (LoRA on an imported model and a chat JSONL) and long_context (a base's context extended
4x by RoPE scaling and a short fine-tune, with perplexity at L, 2L and 4L before and after) are
built on arith_lora's sections at the bottom of this file.
"""

from ml_collections import config_dict
from ml_collections.config_dict import placeholder

from configs import pretrain

PRESETS = ("arith_full", "arith_lora", "arith_qlora", "arith_prefix", "chat_lora", "long_context")


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
    if preset in _DERIVED:  # chat_lora, long_context: built on arith_lora below
        return _DERIVED[preset](get_config("arith_lora"))
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

    # the base's shape; these override its dtypes and context (unset: the base's)
    c.model = config_dict.ConfigDict(dict(
        dtype=placeholder(str),  # compute dtype; qlora computes in bfloat16 unless set
        param_dtype=placeholder(str),  # storage dtype of the parameters (and of the trained ones' moments)
        # Context extension (RoPE bases only; see configs/pretrain.py for each kind). Setting a scaling on a
        # base without one makes the unset fields below follow: rope_original_max_seq_len = the base's
        # max_seq_len L, max_seq_len = L x rope_scaling_factor.
        rope_scaling=placeholder(str),  # "none" | "linear" | "llama3" | "dynamic" | "yarn"
        rope_scaling_factor=placeholder(float),
        rope_original_max_seq_len=placeholder(int),
        max_seq_len=placeholder(int),
    ))

    c.data = config_dict.ConfigDict(dict(
        sources=config_dict.ConfigDict({"addition": source(format="synthetic", task="addition", size=1)}),
        eval_sources=config_dict.ConfigDict({"addition": source(format="synthetic", task="addition", size=1,
                                                                split="validation")}),
        seq_len=64,  # tokens per packed row; clamped to the model's max_seq_len (0 = that)
        # with no eval_sources: held-out records of each (jsonl / parquet / hf / text) source, by a hash of
        # their index: round(eval_fraction x records), at least eval_min_records, at most eval_max_records
        # and half the source; never trained on, the same in every process and after a resume. 0 = none
        eval_fraction=0.02,
        eval_min_records=16,
        eval_max_records=1000,
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


# ---------------------------------------------------------------------------------------------
# chat_lora and long_context: arith_lora's sections with what differs


def _chat_lora(c):
    """LoRA on an imported model (a Hugging Face directory, or `python -m models.hf import` output)
    and a chat JSONL (`data.sources.chat.path`, records {"messages": [...]}); the held-out split is
    eval_fraction of its records, whose last user turns are answered greedily into samples.txt."""
    c.name = "chat_lora"
    c.init.how = ("chat_lora fine-tunes an imported model: pass --config.init.hf_dir=DIR (a Hugging Face model "
                  "directory), or import one first (`python -m models.hf import --hf_dir=DIR --out=runs/base`) and "
                  "pass --config.init.workdir=runs/base; the data is --config.data.sources.chat.path=FILE.jsonl")
    c.peft.lora.update(rank=16, alpha=32.0, dropout=0.05, targets=("q", "k", "v", "o", "gate", "up", "down"))
    c.model.dtype = "bfloat16"
    c.data.sources = config_dict.ConfigDict({"chat": source(format="jsonl", schema="messages")})
    c.data.eval_sources = config_dict.ConfigDict()  # the held-out split of `chat`
    c.data.seq_len = 2048
    c.train.update(steps=1000, batch_size=8, eval_every=200, eval_batches=8, checkpoint_every=200,
                   num_samples=8, sample_tokens=128)
    c.optimizer.lr = 2e-4
    return c


def _long_context(c):
    """Extends a base trained at length L to 4L: YaRN RoPE scaling by 4 (original length L) and a
    short full fine-tune on whole documents (`schema="text"`: every token trained) of the embedded
    corpus in rows of 4L; perplexity at L, 2L and 4L on held-out text before (the base as it was,
    and with the scaling) and after: metrics.jsonl `ppl_at_<n>` / `base_ppl_at_<n>`, and
    context_extension.json."""
    c.name = "long_context"
    c.init.how = ("long_context extends a pretrained base's context: run `python -m train.pretrain "
                  "--config=configs/pretrain.py:tiny --workdir=runs/tiny` (L = 256), then pass "
                  "--config.init.workdir=runs/tiny")
    c.peft.method = "full"
    c.model.update(rope_scaling="yarn", rope_scaling_factor=4.0)
    text = dict(format="embedded", schema="text")
    c.data.sources = config_dict.ConfigDict({"stdlib": source(**text, split="train")})
    c.data.eval_sources = config_dict.ConfigDict({"stdlib": source(**text, split="validation")})
    c.data.update(seq_len=0, packing="concat", shuffle_window=64)  # seq_len 0: the extended max_seq_len
    c.train.update(steps=60, batch_size=4, log_every=10, eval_every=30, eval_batches=2, checkpoint_every=30,
                   eval_examples=0, num_samples=0)
    c.optimizer.update(lr=3e-4, weight_decay=0.01)  # about where the base's schedule ended
    c.context = config_dict.ConfigDict(dict(
        eval_sequences=16,  # held-out pieces of max_seq_len tokens (of the eval sources' documents) scored
        lengths=(),  # context lengths to report; () = L, 2L, 4L, ... up to max_seq_len
    ))
    return c


_DERIVED = {"chat_lora": _chat_lora, "long_context": _long_context}
