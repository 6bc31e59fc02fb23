"""What the train lines report about the data: real tokens per source and the padding fraction."""

import json

import jax
import numpy as np

from data import pipeline
from data.sources import SourceSpec
from tests.data.test_pipeline import CharTokenizer
from train.metrics import batch_stats


def _jsonl(tmp_path, name, n, seed, weight):
    r = np.random.default_rng(seed)
    lines = ("".join("ab"[x] for x in r.integers(0, 2, r.integers(1, 90))) for _ in range(n))
    (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return SourceSpec(name, "jsonl", path=str(tmp_path / f"{name}.jsonl"), weight=weight)


def test_tokens_per_source_and_padding_of_a_real_mixture_batch(tmp_path):
    specs = [_jsonl(tmp_path, "a", 400, 0, 0.5), _jsonl(tmp_path, "b", 400, 1, 0.3),
             _jsonl(tmp_path, "c", 400, 2, 0.2)]
    # best-fit packing leaves padding; documents up to ~1.4 rows long get split across rows
    it = iter(pipeline.source_batches(specs, CharTokenizer(), seq_len=64, batch_size=16, packing="best_fit",
                                      num_packing_bins=4, seed=3))
    stats = jax.jit(batch_stats, static_argnames="num_sources")
    for _ in range(3):
        batch = next(it)
        counts, pad = stats(batch["source_BT"], batch["loss_mask_BT"], num_sources=3)
        # reference: walk every position; a position is a real token iff its segment id is not 0
        ref = np.zeros(3)
        for src, seg in zip(batch["source_BT"].reshape(-1), batch["segment_ids_BT"].reshape(-1)):
            if seg != 0:
                ref[src] += 1
        padding = float((batch["segment_ids_BT"] == 0).mean())
        assert (ref > 0).all() and padding > 0  # every source present, some padding: nothing vacuous
        np.testing.assert_array_equal(np.asarray(counts), ref)
        np.testing.assert_allclose(float(pad), padding, rtol=1e-6)
