"""Parallelism strategies on 8 fake CPU devices, and the memory planner at pod scale.

    .venv/bin/python benchmarks/parallelism.py                       # small preset, all strategies, + planner
    .venv/bin/python benchmarks/parallelism.py --strategies=fsdp,tp --steps=2 --no-planner

Part 1: for the `small` preset on 8 fake CPU devices (one process), for each strategy the
config can name (`dp`, `fsdp`, `fsdp_tp`, `tp`, `fsdp_sp`, `pp_fsdp`, resolved by
`train.mesh.resolve`), the jitted train step (AdamW, the state donated as in train/pretrain.py):
XLA's compiled per-device memory (`memory_analysis`: arguments + temporaries + unaliased
outputs), the planner's prediction for the same step (train/memory.py), and the median step
time. A strategy that fails prints its error in its row. The 8 devices share this machine's
cores, so times compare strategies' overheads, not speed-ups.

Part 2: the planner's per-device figures for the `1b` and `llama3_8b` presets (their own batch,
sequence length and optimizer) on a v5p-64-like machine (64 devices, 95 GiB each) and an
8 x H100-like one (8 devices, 80 GiB), per strategy and remat policy, with the largest
micro-batch (sequences per device) that fits. Prints figures; never asserts on time.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402

from configs import pretrain  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.sharding import use_rules  # noqa: E402
from train import memory  # noqa: E402
from train import mesh as mesh_lib  # noqa: E402
from train.loss import lm_loss_fn  # noqa: E402
from train.optimizer import make_optimizer  # noqa: E402
from train.state import create_state, make_train_step, state_shardings  # noqa: E402

GIB = 2 ** 30
MIB = 2 ** 20
MACHINES = (("v5p-64", 64, 95.0), ("8xH100", 8, 80.0))


def _batch(rng, b, t, vocab):
    x = rng.integers(0, vocab, (b, t + 1), dtype=np.int32)
    return {"inputs_BT": x[:, :-1], "targets_BT": x[:, 1:],
            "positions_BT": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
            "segment_ids_BT": np.ones((b, t), np.int32), "loss_mask_BT": np.ones((b, t), np.float32)}


def _mesh_text(shape) -> str:
    return " x ".join(f"{a}={s}" for a, s in shape.items() if s > 1) or "1 device"


def run_strategy(config, strategy: str, batch_size: int, steps: int) -> dict:
    """Compiled memory, planned memory and median step time of one strategy on 8 devices."""
    model_cfg = ModelConfig.from_dict(config.model.to_dict())
    seq = config.data.seq_len
    n = jax.device_count()
    resolved = mesh_lib.resolve({"shape": mesh_lib.DEFAULT_SHAPE, "strategy": strategy, "rules": ()}, n, model_cfg, seq)
    shape, rules = resolved["shape"], resolved["rules"]
    mesh = mesh_lib.make_mesh(shape)
    tx, _ = make_optimizer(config.optimizer, 1000)
    shards = shape["data"] * shape["fsdp"]
    if shape["stage"] > 1:  # GPipe over the stage axis, as a run sets it, with as many micro-batches (<= 2 x
        # stages) as keep each one split over data x fsdp (train/pretrain.py requires it)
        s = shape["stage"]
        m = max(k for k in range(1, 2 * s + 1) if batch_size % (k * shards) == 0)
        model_cfg = model_cfg.replace(pipeline_stages=s, pipeline_microbatches=m)
    plan = memory.plan_step(model_cfg, tx, mesh_shape=shape, rules=rules, seq_len=seq,
                            micro_batch=max(batch_size // shards, 1))
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
        xla = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
        state, metrics = compiled(state, batch)  # warm-up
        jax.block_until_ready(metrics)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t)
    mesh_text = _mesh_text(shape)
    if shape["stage"] > 1:
        mesh_text += f" (GPipe, {plan.notes[0].split(', ')[1]})" if plan.notes else ""
    return {"mesh": mesh_text, "xla": xla, "args": m.argument_size_in_bytes, "temp": m.temp_size_in_bytes,
            "plan": plan.total, "step_s": float(np.median(times)), "compile_s": compile_s,
            "loss": float(metrics["loss"])}


def part1(args):
    config = pretrain.get_config(args.preset)
    config.model.remat = args.remat or config.model.remat
    print(f"## {args.preset} on {jax.device_count()} fake CPU devices: batch {args.batch} x {config.data.seq_len} "
          f"tokens, {config.model.dtype}, remat={config.model.remat}, {config.optimizer.name}; median of "
          f"{args.steps} steps after 1 warm-up")
    print()
    print("| strategy | mesh | compiled MiB/device (args + temp) | planned MiB | plan / XLA | step s | compile s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for strategy in args.strategies.split(","):
        try:
            r = run_strategy(config, strategy, args.batch, args.steps)
        except Exception as e:  # a strategy in progress elsewhere: report and go on
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"| {strategy} | | error: {type(e).__name__}: {text[:160]} | | | | |", flush=True)
            continue
        print(f"| {strategy} | {r['mesh']} | {r['xla'] / MIB:,.1f} ({r['args'] / MIB:,.1f} + {r['temp'] / MIB:,.1f}) "
              f"| {r['plan'] / MIB:,.1f} | {r['plan'] / r['xla']:.2f} | {r['step_s']:.2f} | {r['compile_s']:.1f} |",
              flush=True)


def part2(args):
    print()
    print("## Planner: per-device GiB (params + grads + optimizer | activations at the smallest micro-batch: 1, "
          "or for pp_fsdp the pipeline's M micro-batches of 1) and the largest micro-batch that fits")
    print()
    print("| preset | machine | strategy | mesh | remat | state GiB | act. GiB @min | total GiB @min | max micro-batch "
          "| tokens / device |")
    print("| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for preset in ("1b", "llama3_8b"):
        config = pretrain.get_config(preset)
        for machine, devices, hbm in MACHINES:
            for strategy in ("fsdp", "fsdp_tp", "fsdp_sp", "pp_fsdp"):
                config.mesh.strategy = strategy
                for remat in ("full", "save_dots"):
                    try:
                        plan = memory.config_planner(config, num_devices=devices, remat=remat)
                        one = plan(plan.granularity)  # 1, or the pipeline's micro-batch count
                        best = memory.largest_fitting(plan, hbm * GIB)
                    except Exception as e:
                        print(f"| {preset} | {machine} | {strategy} | | {remat} | error: {e} | | | | |", flush=True)
                        continue
                    state = one.params + one.grads + one.opt_state
                    print(f"| {preset} | {machine} ({devices} x {hbm:g} GiB) | {strategy} | {_mesh_text(one.mesh_shape)} "
                          f"| {remat} | {state / GIB:.2f} | {one.activations / GIB:.2f} | {one.total / GIB:.2f} "
                          f"| {best} | {best * config.data.seq_len:,} |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--strategies", default=",".join(mesh_lib.STRATEGIES))
    p.add_argument("--batch", type=int, default=16, help="global batch in sequences (divisible by 8; 16 gives "
                   "pp_fsdp its default 2 x stages micro-batches)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--remat", default=None, help="override the preset's remat policy")
    p.add_argument("--no-planner", dest="planner", action="store_false")
    p.add_argument("--no-strategies", dest="run", action="store_false")
    args = p.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__}; "
          f"{time.strftime('%Y-%m-%d')}")
    if args.run:
        part1(args)
    if args.planner:
        part2(args)


if __name__ == "__main__":
    main()
