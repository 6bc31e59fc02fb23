"""Packing, sharding and resumable iteration of the grain pipeline."""

import json

import grain
import numpy as np
import pytest

from data import pipeline
from data.sources import SourceSpec


class CharTokenizer:
    """A transparent tokenizer for pipeline tests: one id per character."""

    vocab_size, pad_id, bos_id, eos_id = 300, 0, 1, 2

    def encode(self, text):
        return [3 + ord(c) % 290 for c in text]

    def decode(self, ids):
        return "".join(chr(i - 3) for i in ids if i > 2)


def _docs(n, seed=0):
    r = np.random.default_rng(seed)
    return ["".join(chr(97 + x) for x in r.integers(0, 26, r.integers(1, 60))) for _ in range(n)]


def _unpack(rows):
    """Rebuild the (inputs, targets) token streams of every segment of every row."""
    out = []
    for row in rows:
        for s in np.unique(row["segment_ids_BT"]):
            if s == 0:
                continue
            m = row["segment_ids_BT"] == s
            assert np.array_equal(row["positions_BT"][m], np.arange(m.sum()))
            assert (row["loss_mask_BT"][m] == 1).all()
            out.append((row["inputs_BT"][m], row["targets_BT"][m]))
    return out


def _rows(docs, tok, **pack_kw):
    """Packed rows of in-memory documents through the training path's tokenizer and packer."""
    tokenized = grain.MapDataset.source(list(docs)).map(pipeline.TokenizeDocument(tok)).to_iter_dataset()
    return list(pipeline.pack(tokenized, **pack_kw))


def test_rows_have_the_batch_format_and_lose_nothing():
    docs = _docs(40)
    tok = CharTokenizer()
    rows = _rows(docs, tok, seq_len=32)
    assert set(rows[0]) == set(pipeline.BATCH_KEYS) | {"source_BT"}
    for r in rows:
        assert all(v.shape == (32,) for v in r.values())
        assert r["inputs_BT"].dtype == np.int32 and r["loss_mask_BT"].dtype == np.float32
        assert (r["loss_mask_BT"] == (r["segment_ids_BT"] > 0)).all()
    # concatenating segments in order gives back every document, shifted per document
    stream_in = np.concatenate([i for i, _ in _unpack(rows)])
    stream_tg = np.concatenate([t for _, t in _unpack(rows)])
    ids = [np.array([1] + tok.encode(d) + [2]) for d in docs]
    np.testing.assert_array_equal(stream_in, np.concatenate([x[:-1] for x in ids]))
    np.testing.assert_array_equal(stream_tg, np.concatenate([x[1:] for x in ids]))
    # only the very last row may have padding
    assert all(r["loss_mask_BT"].all() for r in rows[:-1])


def test_long_documents_are_split_not_dropped():
    rows = _rows(["x" * 200, "short"], CharTokenizer(), seq_len=16)
    assert sum(r["loss_mask_BT"].sum() for r in rows) == 201 + 6


def test_shuffle_is_seeded_and_epochs_differ(tmp_path):
    spec = _jsonl_source(tmp_path, "s", 40, files=10)

    def first(seed, n):
        it = iter(pipeline.source_batches([spec], CharTokenizer(), seq_len=8, batch_size=2, seed=seed))
        return np.stack([next(it)["inputs_BT"] for _ in range(n)])

    np.testing.assert_array_equal(first(1, 30), first(1, 30))
    assert not np.array_equal(first(1, 30), first(2, 30))
    # each epoch visits every document once, in a fresh order
    docs = iter(pipeline.mixture_docs([spec], CharTokenizer(), seed=1))
    epochs = [[CharTokenizer().decode(next(docs)["targets"]) for _ in range(40)] for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(f"s-{i}" for i in range(40))
    assert epochs[0] != epochs[1]


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="seq_len=0"):
        _rows(["a"], CharTokenizer(), seq_len=0)
    with pytest.raises(ValueError, match="packing='greedy'"):
        _rows(["a"], CharTokenizer(), seq_len=4, packing="greedy")
    with pytest.raises(ValueError, match="batch_size=0"):
        pipeline.source_batches([_jsonl_source(tmp_path, "a", 3)], CharTokenizer(), seq_len=4, batch_size=0)


# ---------------------------------------------------------------------------------------------
# Packing strategies, mixtures and resume through the source pipeline

def test_best_fit_loses_nothing_keeps_documents_whole_and_pads_less_than_first_fit():
    r = np.random.default_rng(4)
    docs = ["".join("ab"[x] for x in r.integers(0, 2, n)) for n in r.integers(1, 70, 400)]  # up to 2 rows
    tok = CharTokenizer()
    pads = {}
    for packing in ("best_fit", "first_fit", "concat"):
        rows = _rows(docs, tok, seq_len=48, packing=packing, num_packing_bins=16)
        total = sum(r["loss_mask_BT"].sum() for r in rows)
        assert total == sum(len(d) + 1 for d in docs), packing  # every target of every document
        pads[packing] = float(np.mean([(r["segment_ids_BT"] == 0).mean() for r in rows]))
        if packing != "concat":  # a document that fits a row is never split across rows
            pieces = [len(t) for _, t in _unpack(rows)]
            short = sorted(len(d) + 1 for d in docs if len(d) + 1 <= 48)
            assert all(n in pieces for n in short[:50])
    assert pads["concat"] < 0.01 and pads["best_fit"] < pads["first_fit"], pads


def _jsonl_source(tmp_path, name, n, files=1, weight=1.0):
    d = tmp_path / name
    d.mkdir()
    for f in range(files):
        (d / f"{f}.jsonl").write_text("".join(json.dumps({"text": f"{name}-{i}"}) + "\n" for i in range(f, n, files)))
    return SourceSpec(name, "jsonl", path=str(d / "*.jsonl"), weight=weight)


def test_mixture_proportions(tmp_path):
    specs = [_jsonl_source(tmp_path, "a", 300, files=3, weight=0.5),
             _jsonl_source(tmp_path, "b", 200, weight=0.3),
             SourceSpec("c", "embedded", split="validation", weight=0.2)]
    docs = iter(pipeline.mixture_docs(specs, CharTokenizer(), seed=1))
    sources = np.array([int(next(docs)["source"][0]) for _ in range(10_000)])
    freq = np.bincount(sources, minlength=3) / sources.size
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.2], atol=0.02)


@pytest.mark.parametrize("num_workers,packing,window,consumed",
                         [(0, "concat", 16, 5), (2, "concat", 16, 5), (0, "concat", 64, 8), (0, "concat", 0, 3),
                          (2, "best_fit", 32, 7)])
def test_source_pipeline_resume_is_exact(tmp_path, num_workers, packing, window, consumed):
    """The state goes through JSON, as in a checkpoint; (64, 8) resumes inside the first window."""
    specs = [_jsonl_source(tmp_path, "a", 500, files=4, weight=2.0), _jsonl_source(tmp_path, "b", 300, weight=1.0)]
    kw = dict(seq_len=16, batch_size=4, seed=5, shuffle_window=window, num_workers=num_workers, packing=packing)
    it = iter(pipeline.source_batches(specs, CharTokenizer(), **kw))
    for _ in range(consumed):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(5)]
    it2 = iter(pipeline.source_batches(specs, CharTokenizer(), **kw))
    it2.set_state(state)
    for a, b in zip(expected, (next(it2) for _ in range(5))):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
