"""Test doubles for evals: a character tokenizer and a bigram "language model" whose
log-probabilities are planted exactly."""

from __future__ import annotations

import json
import math
import pathlib

import jax.numpy as jnp
import numpy as np
from flax import nnx

from tests.helpers import tiny_model_config

VOCAB = 256


class CharTokenizer:
    """One token per UTF-8 byte (an ASCII character's id is its code); 0 pad, 1 BOS, 2 EOS."""

    vocab_size, pad_id, bos_id, eos_id = VOCAB, 0, 1, 2

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i >= 3).decode("utf-8", errors="replace")


class Bigram(nnx.Module):
    """logits[b, t] = table[inputs[b, t]]: with normalised rows, log p(next | prev) = table[prev, next].
    Same call signature as the Decoder, so the jitted scorer runs it unchanged."""

    def __init__(self, table_VV, max_seq_len: int = 64):
        self.table = nnx.Param(jnp.asarray(table_VV, jnp.float32))
        self.config = tiny_model_config(vocab_size=table_VV.shape[0], max_seq_len=max_seq_len)

    def __call__(self, inputs_BT, *, positions_BT=None, segment_ids_BT=None, **unused):
        return jnp.take(self.table[...], inputs_BT, axis=0)


def bigram_table(planted: dict[tuple[str, str], float], vocab: int = VOCAB) -> np.ndarray:
    """Log-probability rows: planted {(prev, next): logp}; each row's remaining mass spread uniformly."""
    table = np.full((vocab, vocab), -math.log(vocab), np.float64)
    rows: dict[int, dict[int, float]] = {}
    for (prev, nxt), lp in planted.items():
        p = 1 if prev == "<bos>" else ord(prev)
        rows.setdefault(p, {})[ord(nxt)] = lp
    for p, cols in rows.items():
        rest = 1.0 - sum(math.exp(v) for v in cols.values())
        assert rest > 0
        table[p, :] = math.log(rest / (vocab - len(cols)))
        for c, lp in cols.items():
            table[p, c] = lp
    return table


def make_workdir(path: pathlib.Path, *, seed: int = 0, max_seq_len: int = 64) -> pathlib.Path:
    """A Loom workdir without training: random params at step 5, config.json, a sentencepiece
    tokenizer trained on a few ASCII texts (vocab 320)."""
    from data import synthetic
    from data.tokenizer import train_sentencepiece
    from models import transformer as T
    from models.checkpoint import save_params

    path.mkdir(parents=True, exist_ok=True)
    texts = [synthetic.format_example(e) for name in synthetic.TASKS for e in synthetic.examples(name, 40)]
    texts += ["The quick brown fox jumps over the lazy dog.", "def f(x):\n    return x + 1\n"] * 10
    train_sentencepiece(texts, vocab_size=320, num_threads=1).save(path / "tokenizer.model")
    cfg = tiny_model_config(vocab_size=320, max_seq_len=max_seq_len)
    save_params(path / "checkpoints" / "5" / "params", T.split_params(T.build(cfg, seed=seed))[1])
    (path / "config.json").write_text(json.dumps({"model": cfg.to_dict()}))
    return path
