"""Data pipeline throughput against what training consumes (near-dedup: benchmarks/dedup.py).

    .venv/bin/python benchmarks/data_pipeline.py              # everything (a few minutes)
    .venv/bin/python benchmarks/data_pipeline.py --skip_train # pipeline only

1. Tokenize + pack + batch the embedded corpus (the `tiny` and `small` presets' sequence length,
   batch and tokenizer) with 0, 1 and 2 grain worker processes: records/s and tokens/s, after a
   warm-up that fills the shuffle window.
2. The same presets' train step (bf16, one device, benchmarks/train_step.py) in tokens/s: the
   pipeline must outpace it (ratio > 1).
Prints figures; never asserts on time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pipeline_rate(preset: str, workers: int, batches: int):
    from absl import flags

    from configs import pretrain
    from data import pipeline
    from data.sources import specs_from_config
    from data.tokenizer import from_config

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    c = pretrain.get_config(preset)
    specs = specs_from_config(c.data.sources)
    tok = from_config(c.data.tokenizer, specs)
    it = iter(pipeline.source_batches(specs, tok, seq_len=c.data.seq_len, batch_size=c.train.batch_size, seed=0,
                                      shuffle_window=c.data.shuffle_window, num_workers=workers))
    next(it)  # start-up: workers, the first shuffle window
    # steady state spans several refills of the shuffle window, not just draining the first one
    batches = max(batches, 4 * c.data.shuffle_window // c.train.batch_size)
    t = time.perf_counter()
    rows = tokens = 0
    for _ in range(batches):
        b = next(it)
        rows += b["inputs_BT"].shape[0]
        tokens += int(b["loss_mask_BT"].sum())
    dt = time.perf_counter() - t
    return rows / dt, tokens / dt


def train_rate(preset: str) -> float:
    from benchmarks.train_step import time_loom
    from configs import pretrain

    c = pretrain.get_config(preset)
    return c.train.batch_size * c.data.seq_len / time_loom(c, "bfloat16", steps=3)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--skip_train", action="store_true")
    args = ap.parse_args()
    import platform

    print(f"# {platform.machine()} | {os.cpu_count()} cores")
    print(f"{'preset':8s} {'workers':>7s} {'rows/s':>9s} {'tokens/s':>10s} {'train tok/s':>11s} {'pipeline/train':>14s}")
    for preset in args.presets.split(","):
        consume = None if args.skip_train else train_rate(preset)
        for workers in (0, 1, 2):
            rows, toks = pipeline_rate(preset, workers, args.batches)
            ratio = f"{toks / consume:13.1f}x" if consume else "             -"
            print(f"{preset:8s} {workers:7d} {rows:9.1f} {toks:10.0f} {consume or float('nan'):11.0f} {ratio}")


if __name__ == "__main__":
    main()
