"""Data pipeline throughput against what training consumes.

    .venv/bin/python benchmarks/data_pipeline.py                              # tiny and small, 5 rounds
    .venv/bin/python benchmarks/data_pipeline.py --presets=tiny --rounds=2    # a quick check
    .venv/bin/python benchmarks/data_pipeline.py --skip_train                 # the pipeline alone

Tokenize (sentencepiece) + pack (the preset's packing) + batch the embedded corpus at each
preset's sequence length, batch size, tokenizer and shuffle window, with 0, 1 and 2 grain worker
processes, beside the same preset's bf16 train step (one device; benchmarks/train_step.py's Loom
worker, in a process of its own) in tokens/s: the pipeline must outpace training (ratio > 1).

Interleaved rounds (benchmarks/records.py): in each round every pipeline is built afresh, its
start-up and first batch untimed (worker processes, the first shuffle window), then --batches
batches are timed (at least four refills of the shuffle window, so the steady state is measured,
not the draining of the first one), and the pipeline is closed before the next measurement; then
the train step runs --train-steps steps. Medians (min-max) over the rounds; the ratio is per
round. Near-dedup is benchmarked by benchmarks/dedup.py. Prints figures; never asserts on time.
"""

from __future__ import annotations

import argparse
import gc
import os
import pathlib
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import records  # noqa: E402

WORKERS = (0, 1, 2)


def pipeline_timer(preset: str, workers: int, batches: int):
    """A function that builds the preset's pipeline with `workers` grain processes, times
    max(`batches`, 4 shuffle windows) batches after its first, and closes it: {rows_per_s,
    tokens_per_s (loss-bearing tokens), seconds, batches}."""
    from absl import flags

    from configs import pretrain
    from data import pipeline
    from data.sources import specs_from_config
    from data.tokenizer import from_config

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    c = pretrain.get_config(preset)
    specs = specs_from_config(c.data.sources)
    tok = from_config(c.data.tokenizer, specs)  # trained and cached on first use, outside the timing
    n = max(batches, 4 * c.data.shuffle_window // c.train.batch_size)

    def run() -> dict:
        it = iter(pipeline.source_batches(specs, tok, seq_len=c.data.seq_len, batch_size=c.train.batch_size, seed=0,
                                          shuffle_window=c.data.shuffle_window, packing=c.data.packing,
                                          num_packing_bins=c.data.num_packing_bins, num_workers=workers))
        next(it)  # start-up: worker processes, the first shuffle window
        t = time.perf_counter()
        rows = tokens = 0
        for _ in range(n):
            b = next(it)
            rows += b["inputs_BT"].shape[0]
            tokens += int(b["loss_mask_BT"].sum())
        dt = time.perf_counter() - t
        del it  # ends its worker processes before anything else is measured
        gc.collect()
        return {"rows_per_s": rows / dt, "tokens_per_s": tokens / dt, "seconds": dt, "batches": n}

    return run


def train_worker(preset: str):
    """The preset's bf16 Loom train step, compiled and warmed up in a process of its own."""
    from benchmarks.train_step import Worker, loom_spec, preset_config

    cfg = preset_config(preset)
    w = Worker(f"{preset} train step", loom_spec(cfg, "bfloat16"))
    w.finish_start(w.start())
    if w.error:
        raise SystemExit(f"the {preset} train step did not start: {w.error}")
    return w, cfg["batch"] * cfg["seq"]


def run_preset(preset: str, args) -> dict:
    fns = {f"{k} workers": pipeline_timer(preset, k, args.batches) for k in WORKERS}
    worker = None
    if not args.skip_train:
        worker, tokens = train_worker(preset)
        fns["train"] = lambda: {"step_s": worker.steps(args.train_steps)}
    try:
        samples = records.interleaved(fns, args.rounds, warmup=0, pause=args.pause)
    finally:
        if worker:
            worker.close()
    if worker:
        for s in samples["train"]:
            s["tokens_per_s"] = tokens * len(s["step_s"]) / sum(s["step_s"])
    return samples


def preset_rows(preset: str, samples: dict) -> list[list]:
    train = [s["tokens_per_s"] for s in samples["train"]] if "train" in samples else None
    rows = []
    for k in WORKERS:
        runs = samples[f"{k} workers"]
        toks = [r["tokens_per_s"] for r in runs]
        row = [preset, k, records.spread(records.summarize([r["rows_per_s"] for r in runs])),
               records.spread(records.summarize(toks), "{:,.0f}")]
        if train:
            row += [records.spread(records.summarize(train), "{:,.0f}"),
                    records.spread(records.ratio_summary(toks, train), "{:,.0f}x")]
        else:
            row += ["-", "-"]
        rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (>= 5 for a record)")
    ap.add_argument("--batches", type=int, default=40, help="timed batches per pipeline and round (at least 4 "
                    "shuffle windows' worth)")
    ap.add_argument("--train-steps", type=int, default=2, help="train steps per round")
    ap.add_argument("--pause", type=float, default=1.0, help="seconds between measurements")
    ap.add_argument("--skip_train", action="store_true")
    ap.add_argument("--name", default="data_pipeline", help="record name")
    ap.add_argument("--records-dir", default=str(records.RECORDS), help="where the JSON record goes")
    args = ap.parse_args()
    if args.rounds < 1 or args.train_steps < 1:
        ap.error(f"--rounds={args.rounds} and --train-steps={args.train_steps} must be >= 1")
    results, rows = {}, []
    for preset in args.presets.split(","):
        print(f"## {preset}", flush=True)
        results[preset] = run_preset(preset, args)
        rows += preset_rows(preset, results[preset])
    table = records.table(
        f"Tokenize + pack + batch vs the bf16 train step; median (min–max) over {args.rounds} interleaved rounds",
        ["preset", "grain workers", "rows/s", "tokens/s", "train step tokens/s", "pipeline / train"], rows)
    records.print_table(table)
    from configs import pretrain

    shapes = "; ".join(f"`{p}`: {c.train.batch_size} x {c.data.seq_len} tokens per batch, shuffle window "
                       f"{c.data.shuffle_window} rows, {c.data.packing} packing, {c.data.tokenizer.vocab_size}-token "
                       "sentencepiece" for p, c in ((p, pretrain.get_config(p)) for p in results))
    method = (f"The embedded corpus (the running Python's standard library) through `data.pipeline.source_batches` "
              f"({shapes}). Each round builds each pipeline afresh, leaves its start-up and first batch untimed, "
              f"then times at least {args.batches} batches (tokens/s counts loss-bearing tokens) and closes it; the "
              f"train step is the preset's bf16 Loom step on one device in its own process ({args.train_steps} "
              f"steps per round, after compilation and a warm-up step). Rounds are interleaved with a "
              f"{args.pause:g} s pause between measurements; pipeline / train is the per-round ratio.")
    records.write_record(args.name, title="Data pipeline vs training consumption", tables=[table], method=method,
                         params=vars(args), results=results, directory=pathlib.Path(args.records_dir))


if __name__ == "__main__":
    main()
