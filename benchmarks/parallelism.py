"""Parallelism strategies on 8 fake CPU devices: step time and compiled memory per strategy.

    .venv/bin/python benchmarks/parallelism.py                        # small preset, all strategies, 5 rounds
    .venv/bin/python benchmarks/parallelism.py --preset=tiny --strategies=fsdp,tp --rounds=2

For the `small` preset on 8 fake CPU devices (one process), each strategy the config can name
(`dp`, `fsdp`, `fsdp_tp`, `tp`, `fsdp_sp`, `pp_fsdp`, resolved by `train.mesh.resolve`) gets its
jitted train step (AdamW, the state donated as train/pretrain.py does), compiled, with XLA's
per-device memory (`memory_analysis`: arguments + temporaries + unaliased outputs) and one
warm-up step. Then all strategies are timed in interleaved rounds (benchmarks/records.py), the
same number of steps each; each figure is the median (min-max) over the rounds. A strategy that
fails reports its error in its row. The 8 devices share this machine's cores, so the times
compare strategies' overheads, not speed-ups. The planner's error against the same compiled
memory, for every remat policy, is benchmarks/memory.py's. Prints figures; never asserts on time.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.memory import MIB, strategy_case, xla_bytes  # noqa: E402  (sets 8 fake CPU devices first)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import records  # noqa: E402
from configs import pretrain  # noqa: E402
from models.config import REMAT_POLICIES, ModelConfig  # noqa: E402
from models.sharding import use_rules  # noqa: E402
from train import mesh as mesh_lib  # noqa: E402
from train.loss import lm_loss_fn  # noqa: E402
from train.optimizer import make_optimizer  # noqa: E402
from train.state import create_state, make_train_step, state_shardings  # noqa: E402


def _batch(rng, b, t, vocab):
    x = rng.integers(0, vocab, (b, t + 1), dtype=np.int32)
    return {"inputs_BT": x[:, :-1], "targets_BT": x[:, 1:],
            "positions_BT": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
            "segment_ids_BT": np.ones((b, t), np.int32), "loss_mask_BT": np.ones((b, t), np.float32)}


def setup_strategy(config, strategy: str, batch_size: int) -> dict:
    """Compiles one strategy's step on 8 devices and runs its warm-up step; returns its figures
    and `run(n)`, the seconds of n further steps."""
    seq = config.data.seq_len
    model_cfg, shape, rules, mesh, _ = strategy_case(ModelConfig.from_dict(config.model.to_dict()), strategy,
                                                     batch_size, seq)
    tx, _ = make_optimizer(config.optimizer, 1000)
    with jax.set_mesh(mesh), use_rules(rules):
        graphdef, state = create_state(model_cfg, tx, seed=0, mesh=mesh, rules=rules)
        sh = state_shardings(model_cfg, tx, mesh, rules)
        batch = {k: jax.device_put(v, mesh_lib.batch_sharding(mesh, v.shape, rules))
                 for k, v in _batch(np.random.default_rng(0), batch_size, seq, model_cfg.vocab_size).items()}
        step = jax.jit(make_train_step(lm_loss_fn(graphdef), tx), in_shardings=(sh, None),
                       out_shardings=(sh, None), donate_argnums=(0,))
        t0 = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
        m = compiled.memory_analysis()
        state, metrics = compiled(state, batch)  # warm-up
        jax.block_until_ready(metrics)
    box = {"state": state}

    def run(n: int) -> list[float]:
        times = []
        with jax.set_mesh(mesh), use_rules(rules):
            for _ in range(n):
                t = time.perf_counter()
                box["state"], out = compiled(box["state"], batch)
                jax.block_until_ready(out)
                times.append(time.perf_counter() - t)
        return times

    mesh_text = " x ".join(f"{a}={s}" for a, s in shape.items() if s > 1) or "1 device"
    if shape["stage"] > 1:
        mesh_text += f" (GPipe, {model_cfg.pipeline_microbatches} micro-batches)"
    return {"mesh": mesh_text, "xla_bytes": xla_bytes(m), "args": m.argument_size_in_bytes,
            "temp": m.temp_size_in_bytes, "compile_s": compile_s, "first_loss": float(metrics["loss"]), "run": run}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--strategies", default=",".join(mesh_lib.STRATEGIES))
    ap.add_argument("--batch", type=int, default=16, help="global batch in sequences (divisible by 8; 16 gives "
                    "pp_fsdp its default 2 x stages micro-batches)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (>= 5 for a record)")
    ap.add_argument("--steps", type=int, default=1, help="steps per strategy per round")
    ap.add_argument("--pause", type=float, default=0.5, help="seconds between strategies")
    ap.add_argument("--remat", default=None, help=f"override the preset's remat policy ({REMAT_POLICIES})")
    ap.add_argument("--name", default="parallelism", help="record name")
    ap.add_argument("--records-dir", default=str(records.RECORDS), help="where the JSON record goes")
    args = ap.parse_args(argv)
    records.comma_list(ap, "--strategies", args.strategies, mesh_lib.STRATEGIES)
    if args.rounds < 1 or args.steps < 1:
        ap.error(f"--rounds={args.rounds} and --steps={args.steps} must be >= 1")
    config = pretrain.get_config(args.preset)
    config.model.remat = args.remat or config.model.remat
    print(f"## {args.preset} on {jax.device_count()} fake CPU devices: batch {args.batch} x {config.data.seq_len}",
          flush=True)

    setups, errors = {}, {}
    for strategy in args.strategies.split(","):
        try:
            setups[strategy] = setup_strategy(config, strategy, args.batch)
            print(f"  {strategy}: compiled in {setups[strategy]['compile_s']:.1f} s", flush=True)
        except Exception as e:  # a strategy in progress elsewhere: report and go on
            text = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
            errors[strategy] = f"{type(e).__name__}: {text}"
            print(f"  {strategy}: error: {errors[strategy]}", flush=True)
    samples = records.interleaved({s: (lambda r=r: r["run"](args.steps)) for s, r in setups.items()}, args.rounds,
                                  warmup=0, pause=args.pause)
    rows = []
    for strategy in args.strategies.split(","):
        if strategy in errors:
            rows.append([strategy, "", f"error: {errors[strategy]}", "", ""])
            continue
        r = setups[strategy]
        per_round = [sum(x) / len(x) for x in samples[strategy]]
        rows.append([strategy, r["mesh"], records.spread(records.summarize(per_round), "{:.2f}"),
                     f"{r['xla_bytes'] / MIB:,.1f} ({r['args'] / MIB:,.1f} + {r['temp'] / MIB:,.1f})",
                     f"{r['compile_s']:.1f}"])
    table = records.table(
        f"{args.preset} on {jax.device_count()} fake CPU devices: batch {args.batch} x {config.data.seq_len} tokens, "
        f"{config.model.dtype} compute, remat {config.model.remat}; step s = median (min–max) over {args.rounds} "
        f"interleaved rounds of {args.steps} step(s)",
        ["strategy", "mesh", "step s", "compiled MiB/device (args + temp)", "compile s"], rows)
    records.print_table(table)
    m = config.model
    method = (f"`{args.preset}` ({m.num_layers} layers, d {m.hidden_size}, {m.num_heads} heads / {m.num_kv_heads} kv "
              f"heads, vocab {m.vocab_size}), global batch {args.batch} x {config.data.seq_len} tokens, AdamW, the "
              "state donated; 8 fake CPU devices in one process (`jax_num_cpu_devices`), so every device shares the "
              "same cores: times compare the strategies' overheads (collectives, pipeline bubble), not speed-ups. "
              "Each strategy is compiled and warmed up once, then all are timed in interleaved rounds with a "
              f"{args.pause:g} s pause between strategies. Compiled memory: XLA's `memory_analysis()` per device "
              "(arguments + temporaries + unaliased outputs).")
    results = {s: {k: v for k, v in r.items() if k != "run"} | {"step_s": samples[s]} for s, r in setups.items()}
    results.update({s: {"error": e} for s, e in errors.items()})
    records.write_record(args.name, title="Parallelism strategies on 8 fake CPU devices", tables=[table],
                         method=method, params=vars(args), results=results, directory=pathlib.Path(args.records_dir))


if __name__ == "__main__":
    main()
