"""Size a model before running it: parameters and FLOPs per token, from `jax.eval_shape`.

    python -m train.plan --config=configs/pretrain.py:llama3_8b

Builds the model abstractly (no memory), counts its parameters, checks the count against the
closed form in models/config.py, and prints FLOPs per token for the forward pass and training.
"""

from __future__ import annotations

import math

import jax
from absl import app
from ml_collections import config_flags

from models.config import ModelConfig, flops_per_token, param_count
from models.transformer import abstract_model, split_params
from configs.cli import parse_flags


def summarize(model_cfg: ModelConfig, seq_len: int | None = None) -> dict:
    """Parameter count (built abstractly) and FLOPs per token of a model config."""
    _, abs_params = split_params(abstract_model(model_cfg))
    counted = sum(math.prod(x.shape) for x in jax.tree.leaves(abs_params))
    expected = param_count(model_cfg)
    if counted != expected:
        raise AssertionError(f"built model has {counted:,} parameters, closed form says {expected:,}")
    embedding = model_cfg.vocab_size * model_cfg.hidden_size
    if model_cfg.position_embedding == "learned":
        embedding += model_cfg.max_seq_len * model_cfg.hidden_size
    flops = flops_per_token(model_cfg, seq_len)
    return {"parameters": counted, "non_embedding_parameters": counted - embedding,
            "param_bytes": counted * model_cfg.params_dtype.itemsize,
            "forward_flops_per_token": flops["forward"], "train_flops_per_token": flops["train"],
            "seq_len": seq_len or model_cfg.max_seq_len}


def main(argv):
    del argv
    config = _CONFIG.value
    model_cfg = ModelConfig.from_dict(config.model.to_dict())
    s = summarize(model_cfg, config.data.seq_len)
    print(f"preset            {config.name}")
    print(f"parameters        {s['parameters']:,} ({s['non_embedding_parameters']:,} non-embedding)")
    print(f"parameter memory  {s['param_bytes'] / 2**30:.2f} GiB ({model_cfg.param_dtype})")
    print(f"FLOPs / token     {s['forward_flops_per_token']:.4g} forward, {s['train_flops_per_token']:.4g} "
          f"train (seq_len {s['seq_len']})")


if __name__ == "__main__":
    # flags are defined only when run as a program, so tests and other programs can import run()
    _CONFIG = config_flags.DEFINE_config_file("config", "configs/pretrain.py", "Experiment config (file:preset).")
    app.run(main, flags_parser=parse_flags)
