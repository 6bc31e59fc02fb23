"""Small shared test utilities."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_model_config(**overrides):
    from models.config import ModelConfig

    base = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=8, max_seq_len=64, dtype="float32")
    base.update(overrides)
    return ModelConfig(**base)


def random_tokens(rng: np.random.Generator, shape, vocab: int) -> np.ndarray:
    return rng.integers(0, vocab, size=shape, dtype=np.int32)


def corrupt_params(step_dir: pathlib.Path) -> None:
    """Zeroes the array data of a checkpoint step's params (orbax's OCDBT `d/` files), as a bad
    disk or a half-copied directory would leave them: the metadata still reads, the arrays do not."""
    files = [p for p in (pathlib.Path(step_dir) / "params").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files, f"no array data under {step_dir}/params"
    for p in files:
        p.write_bytes(b"\0" * 7)


def run_program(module: str, *args: str, env: dict | None = None, timeout: int = 600, check: bool = True):
    """Runs `python -m module args...` from the repo root in a fresh process (1 CPU device)."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("XLA_FLAGS")}
    e["JAX_PLATFORMS"] = "cpu"
    e.update(env or {})
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=e, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"python -m {module} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def randomize_hf(model, seed=0):
    """Non-trivial weights everywhere in a transformers model (it inits norms to 1 or 0 and biases
    to 0, which would hide mistakes in how they are copied)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if p.ndim == 1 and name.endswith("weight") else 0.15 * noise)
    return model


def hf_logits(model, tokens) -> np.ndarray:
    """float32 logits of a transformers model on int token ids [B, T]."""
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def randomize_adapters(model, seed=0, std=0.05):
    """Every LoRA adapter weight (A and B) of `model` drawn from N(0, std^2), in place: fresh
    adapters have B = 0, which would hide a wrong adapter path."""
    import jax
    from flax import nnx

    from models.lora import LoraParam

    state = nnx.state(model, LoraParam)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [jax.random.normal(k, x.shape, x.dtype) * std for k, x in zip(keys, leaves)]
    nnx.update(model, jax.tree.unflatten(treedef, new))
    return model


def llama3_style_tokenizer(vocab_size: int, chat_template: str, extra_specials=()):
    """A transformers fast tokenizer built here: byte-level BPE trained on a few standard-library
    sources, Llama 3's special tokens (+ `extra_specials`), a post-processor that adds BOS (as
    Llama 3's does), and `chat_template`. Save it with `save_pretrained(dir)`."""
    import inspect
    import json

    import tokenizers
    import transformers
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                *extra_specials]
    corpus = [open(inspect.getfile(m), encoding="utf-8").read() for m in (os, inspect, json)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                                eos_token="<|end_of_text|>")
    fast.chat_template = chat_template
    return fast


def random_llama_hf_dir(path, chat_template: str, seed: int = 3) -> pathlib.Path:
    """A random Llama-shaped transformers model (GQA, untied lm_head, vocabulary 512) with a
    byte-level BPE tokenizer (`llama3_style_tokenizer`, 500 ids) and `chat_template`, saved as a
    Hugging Face directory at `path`: a base for SFT runs from `init.hf_dir`."""
    import torch
    import transformers

    fast = llama3_style_tokenizer(500, chat_template)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=False, bos_token_id=fast.bos_token_id,
                                   eos_token_id=fast.eos_token_id)
    torch.manual_seed(0)
    path = pathlib.Path(path)
    randomize_hf(transformers.LlamaForCausalLM(cfg), seed=seed).save_pretrained(path)
    fast.save_pretrained(path)
    return path
