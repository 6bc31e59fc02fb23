"""Perplexity by context length (evals/long_context.py) against a direct computation."""

import json
import math

import numpy as np
import pytest

from evals import long_context as LC
from models import transformer as T
from tests.evals.stubs import CharTokenizer
from tests.helpers import tiny_model_config


class OffsetCharTokenizer(CharTokenizer):
    """CharTokenizer with the character spans SFT tokenizers give (ASCII text: one per character)."""

    def encode_with_offsets(self, text):
        return self.encode(text), [(i, i + 1) for i in range(len(text))]


TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(12))  # 600+ chars


def test_lengths_and_pieces():
    assert LC.report_lengths(256, 1024) == [256, 512, 1024]
    assert LC.report_lengths(100, 300) == [100, 200, 300]
    assert LC.report_lengths(64, 256, (200, 16, 16)) == [16, 200]
    with pytest.raises(ValueError, match=r"\[512\] must be in \[2, max_seq_len=256\]"):
        LC.report_lengths(64, 256, (512,))
    tok = OffsetCharTokenizer()
    pieces = LC.heldout_pieces(["short", TEXT, TEXT], tok, 136, 7)
    assert len(pieces) == 7 and all(len(p) == 128 for p in pieces)  # max_len - 8 tokens each
    assert "".join(pieces[:4]) == TEXT[:512]  # consecutive; the first document is too short to cut
    assert pieces[4] == TEXT[:128]  # a document's tail shorter than a piece is left out


def _direct_perplexity(model, tok, pieces, n):
    """[bos] + piece + [eos] in consecutive chunks of n targets, each chunk predicted from the n
    tokens before its last target (the last chunk takes as much earlier context as fits)."""
    import jax

    graphdef, params = T.split_params(model)
    logits_of = jax.jit(lambda x: T.apply(graphdef, params, {"inputs_BT": x}))
    nats = tokens = 0.0
    for p in pieces:
        ids = [tok.bos_id] + tok.encode(p) + [tok.eos_id]
        for a in range(1, len(ids), n):  # targets ids[a:e]
            e = min(a + n, len(ids))
            x = ids[max(0, e - 1 - n):e - 1]
            padded = np.zeros((1, n), np.int32)
            padded[0, :len(x)] = x  # causal: the padding after x changes nothing before it
            logits = np.asarray(logits_of(padded), np.float64)[0, :len(x)]
            logits -= logits.max(-1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            nats -= logp[np.arange(len(x)), ids[max(0, e - 1 - n) + 1:e]][-(e - a):].sum()
            tokens += e - a
    return math.exp(nats / tokens)


def test_report_equals_direct_computation(tmp_path):
    tok = OffsetCharTokenizer()
    model = T.build(tiny_model_config(vocab_size=256, max_seq_len=128, rope_scaling="yarn", rope_scaling_factor=4.0,
                                      rope_original_max_seq_len=32), seed=2)
    pieces = LC.heldout_pieces([TEXT], tok, 128, 3)
    lengths = LC.report_lengths(32, 128)
    assert lengths == [32, 64, 128]
    report = LC.ContextReport(tmp_path, tok, pieces, lengths, {"max_seq_len": 128})
    got = report.measure("scaled", model, step=0)
    for n in lengths:
        assert got[n] == pytest.approx(_direct_perplexity(model, tok, pieces, n), rel=1e-5)
    data = json.loads((tmp_path / LC.REPORT_FILE).read_text())
    assert data["perplexity"]["scaled"] == {str(n): got[n] for n in lengths} and data["scaled_step"] == 0
    assert data["pieces"] == 3 and data["max_seq_len"] == 128
    # a resumed run reads what was measured before; the table has a row per measured model
    again = LC.ContextReport(tmp_path, tok, pieces, lengths, {"max_seq_len": 128})
    assert again.has("scaled") and not again.has("fine_tuned")
    assert again.table().splitlines()[1].split()[0] == "scaled" and "ppl@128" in again.table()
