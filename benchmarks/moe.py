"""Mixture of experts on CPU: dispatch cost, moe_tiny's train step against tiny, and expert
parallelism's compiled memory and collectives on 8 fake devices.

    .venv/bin/python benchmarks/moe.py                                  # all sections, 5 rounds
    .venv/bin/python benchmarks/moe.py --sections=dispatch --rounds=3   # a quick check of the script

Section `dispatch`: one MoE feed-forward block of `moe_tiny`'s shape (d 256, 16 experts of width
176, top-2; its shared expert left out, so only routing and dispatch are compared) on one batch
(16 x 256 tokens), forward and backward (the gradient of the summed output with respect to the
input and every weight), jitted, float32. Variants: dropless with the grouped matmul as
`jax.lax.ragged_dot` and as padded blocks (models/moe.py), and dropping at capacity factor 1.25
with each; against a dense MLP as wide as the two experts a token uses (352: the same active
parameters, no routing).

Section `step`: the whole jitted train step (AdamW, the state donated as train/pretrain.py
does) of `tiny` and of `moe_tiny` (5.05M and 5.06M parameters active per token; moe_tiny holds
10.7M) at the presets' batch (16 x 256) and compute dtype (bfloat16), moe_tiny with each grouped
matmul. Tokens/s and the paired per-round ratio of tiny's step time to each row's.

Section `ep`: `moe_tiny`'s train step compiled (not run) on 8 fake CPU devices for `fsdp`
(experts split over fsdp like every weight, gathered for use), `fsdp_ep` (the expert axis 8:
two of the 16 experts per device, all-to-all dispatch) and expert 4 x fsdp 2 (fsdp_ep's rules): XLA's per-device memory and the bytes each kind of collective moves, as they appear in
the compiled program (a collective inside the layer scan's body is counted once, though it runs
once per layer). 8 fake devices share this machine's cores, so no times.

Timed variants run in interleaved rounds (benchmarks/records.py): medians with the min-max
spread. Writes benchmarks/records/moe_cpu.json; never asserts on time.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)  # the ep section; the others run on device 0

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import records  # noqa: E402
from configs import pretrain  # noqa: E402
from models import moe  # noqa: E402
from models.config import ModelConfig, MoeConfig, active_param_count, param_count  # noqa: E402
from models.sharding import use_rules  # noqa: E402
from models.transformer import Mlp  # noqa: E402
from train import mesh as mesh_lib  # noqa: E402
from train.loss import lm_loss_fn  # noqa: E402
from train.optimizer import make_optimizer  # noqa: E402
from train.state import create_state, make_train_step, state_shardings  # noqa: E402

SECTIONS = ("dispatch", "step", "ep")
MIB = 2 ** 20
COLLECTIVES = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute")


def _batch(rng, b, t, vocab):
    x = rng.integers(0, vocab, (b, t + 1), dtype=np.int32)
    return {"inputs_BT": x[:, :-1], "targets_BT": x[:, 1:],
            "positions_BT": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
            "segment_ids_BT": np.ones((b, t), np.int32), "loss_mask_BT": np.ones((b, t), np.float32)}


def _model_cfg(preset: str, **overrides) -> ModelConfig:
    d = pretrain.get_config(preset).model.to_dict()
    moe_over = overrides.pop("moe", {})
    if moe_over:
        d["moe"] = {**d["moe"], **moe_over}
    return ModelConfig.from_dict({**d, **overrides})


# --------------------------------------------------------------------------------------------
# dispatch


def dispatch_section(args) -> tuple[dict, dict]:
    base = _model_cfg("moe_tiny", dtype="float32", moe=dict(num_shared_experts=0))
    b, t, d = 16, base.max_seq_len, base.hidden_size
    x = jnp.asarray(np.random.default_rng(0).normal(0, 1, (b, t, d)), jnp.float32)
    variants = {"dense MLP (width 352, same active)": None,
                "dropless, padded": dict(grouped_matmul="padded"),
                "dropless, ragged_dot": dict(grouped_matmul="ragged_dot"),
                "capacity 1.25, padded": dict(grouped_matmul="padded", capacity_factor=1.25),
                "capacity 1.25, ragged_dot": dict(grouped_matmul="ragged_dot", capacity_factor=1.25)}
    fns, dropped = {}, {}
    for name, kw in variants.items():
        if kw is None:
            module = Mlp(base.replace(intermediate_size=base.moe.experts_per_token * base.expert_intermediate_size,
                                      moe=MoeConfig()), rngs=nnx.Rngs(0))
        else:
            cfg = base.replace(moe=dataclasses.replace(base.moe, **kw))
            module = moe.MoeMlp(cfg, rngs=nnx.Rngs(0))
            with moe.collect_stats() as found:
                module(x)
            dropped[name] = float(found[0]["dropped"])
        graphdef, state = nnx.split(module)
        step = jax.jit(jax.grad(lambda s, x, g=graphdef: jnp.sum(nnx.merge(g, s)(x).astype(jnp.float32) ** 2),
                                argnums=(0, 1)))
        jax.block_until_ready(step(state, x))
        fns[name] = lambda step=step, state=state: records.seconds(lambda: jax.block_until_ready(step(state, x)))
        print(f"  dispatch: {name} compiled", flush=True)
    samples = records.interleaved(fns, args.rounds, warmup=1, pause=args.pause)
    dense = samples[next(iter(variants))]
    rows = []
    for name in variants:
        rows.append([name, records.spread(records.summarize([s * 1e3 for s in samples[name]]), "{:.1f}"),
                     records.spread(records.ratio_summary(samples[name], dense), "{:.2f}"),
                     f"{dropped[name]:.3f}" if name in dropped else ""])
    table = records.table(
        f"One MoE block (moe_tiny: d {d}, {base.moe.num_experts} experts of width {base.expert_intermediate_size}, "
        f"top-{base.moe.experts_per_token}, no shared expert), {b} x {t} tokens, float32, forward + backward; ms = "
        f"median (min–max) over {args.rounds} interleaved rounds",
        ["variant", "ms", "x dense", "dropped fraction"], rows)
    return table, {k: v for k, v in samples.items()}


# --------------------------------------------------------------------------------------------
# step


def _train_step_fn(model_cfg, batch_size, seq, optimizer):
    mesh = mesh_lib.make_mesh(mesh_lib.resolve_shape({}, 1), devices=jax.devices()[:1])
    tx, _ = make_optimizer(optimizer, 1000)
    with jax.set_mesh(mesh), use_rules(None):
        graphdef, state = create_state(model_cfg, tx, seed=0, mesh=mesh)
        sh = state_shardings(model_cfg, tx, mesh)
        post = (lambda old, new, m: moe.balance_router_biases(model_cfg, old, new, m)) if model_cfg.moe.bias_balancing \
            else None
        step = jax.jit(make_train_step(lm_loss_fn(graphdef), tx, post_update=post), in_shardings=(sh, None),
                       out_shardings=(sh, None), donate_argnums=(0,))
        batch = _batch(np.random.default_rng(0), batch_size, seq, model_cfg.vocab_size)
        compiled = step.lower(state, batch).compile()
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
    box = {"state": state}

    def run(n):
        t0 = time.perf_counter()
        for _ in range(n):
            box["state"], out = compiled(box["state"], batch)
        jax.block_until_ready(out)
        return (time.perf_counter() - t0) / n

    return run


def step_section(args) -> tuple[dict, dict]:
    config = pretrain.get_config("moe_tiny")
    seq, batch = config.data.seq_len, config.train.batch_size
    variants = {"tiny (dense)": _model_cfg("tiny"),
                "moe_tiny, padded": _model_cfg("moe_tiny", moe=dict(grouped_matmul="padded")),
                "moe_tiny, ragged_dot": _model_cfg("moe_tiny", moe=dict(grouped_matmul="ragged_dot"))}
    fns = {}
    for name, cfg in variants.items():
        fns[name] = _train_step_fn(cfg, batch, seq, config.optimizer)
        print(f"  step: {name} compiled", flush=True)
    samples = records.interleaved({k: (lambda f=f: f(args.steps)) for k, f in fns.items()}, args.rounds, warmup=1,
                                  pause=args.pause)
    ref = samples["tiny (dense)"]
    rows = []
    for name, cfg in variants.items():
        tps = [batch * seq / s for s in samples[name]]
        rows.append([name, f"{param_count(cfg) / 1e6:.2f}M / {active_param_count(cfg) / 1e6:.2f}M",
                     records.spread(records.summarize(samples[name]), "{:.3f}"),
                     records.spread(records.summarize(tps), "{:,.0f}"),
                     records.spread(records.ratio_summary(ref, samples[name]), "{:.2f}")])
    table = records.table(
        f"Train step, one CPU device, batch {batch} x {seq} tokens, {config.model.dtype} compute, AdamW; median "
        f"(min–max) over {args.rounds} interleaved rounds of {args.steps} steps",
        ["model", "params total / active", "step s", "tokens/s", "tiny step / this step"], rows)
    return table, samples


# --------------------------------------------------------------------------------------------
# ep

# "%name = <shape or (tuple of shapes)> <collective>(" (tuples may hold /*index=N*/ comments)
_COLLECTIVE_RE = re.compile(r"=\s*(\((?:[^()]|\([^()]*\))*\)|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)\s+(" +
                            "|".join(COLLECTIVES) + r")(?:-start)?\(")
_SHAPE_RE = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")
_HLO_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
              "s64": 8, "u64": 8, "f64": 8}


def collective_bytes(hlo: str) -> dict[str, tuple[int, int]]:
    """{collective: (ops, bytes of their results)} in a compiled HLO text."""
    out: dict[str, list[int]] = {}
    for result, op in _COLLECTIVE_RE.findall(hlo):
        n = 0
        for dtype, dims in _SHAPE_RE.findall(result):
            size = int(np.prod([int(x) for x in dims.split(",") if x])) if dims else 1
            n += size * _HLO_BYTES[dtype]
        c = out.setdefault(op, [0, 0])
        c[0] += 1
        c[1] += n
    return {k: (v[0], v[1]) for k, v in out.items()}


def ep_section(args) -> tuple[dict, dict]:
    config = pretrain.get_config("moe_tiny")
    model_cfg = ModelConfig.from_dict(config.model.to_dict())
    seq, batch = config.data.seq_len, config.train.batch_size
    tx, _ = make_optimizer(config.optimizer, 1000)
    cases = {"1 device": (mesh_lib.resolve_shape({}, 1), mesh_lib.merge_rules(())),
             "fsdp": None, "fsdp_ep": None,
             "expert 4 x fsdp 2": (mesh_lib.resolve_shape({"expert": 4, "fsdp": 2}, 8),
                                   mesh_lib.merge_rules(mesh_lib.STRATEGY_RULES["fsdp_ep"]))}
    rows, results = [], {}
    for name, spec in cases.items():
        if spec is None:
            r = mesh_lib.resolve({"shape": mesh_lib.DEFAULT_SHAPE, "strategy": name}, 8, model_cfg, seq)
            spec = (r["shape"], r["rules"])
        shape, rules = spec
        n = int(np.prod(list(shape.values())))
        mesh = mesh_lib.make_mesh(shape, devices=jax.devices()[:n])
        with jax.set_mesh(mesh), use_rules(rules):
            graphdef, state = create_state(model_cfg, tx, seed=0, mesh=mesh, rules=rules)
            sh = state_shardings(model_cfg, tx, mesh, rules)
            b = {k: jax.device_put(v, mesh_lib.batch_sharding(mesh, v.shape, rules))
                 for k, v in _batch(np.random.default_rng(0), batch, seq, model_cfg.vocab_size).items()}
            step = jax.jit(make_train_step(lm_loss_fn(graphdef), tx), in_shardings=(sh, None),
                           out_shardings=(sh, None), donate_argnums=(0,))
            compiled = step.lower(state, b).compile()
        mem = records.xla_bytes(compiled.memory_analysis())
        coll = collective_bytes(compiled.as_text())
        results[name] = {"shape": shape, "xla_bytes": mem, "collectives": coll}
        mesh_text = " x ".join(f"{a}={s}" for a, s in shape.items() if s > 1) or "1 device"
        cells = [f"{coll[c][0]} / {coll[c][1] / MIB:,.2f}" if c in coll else "" for c in COLLECTIVES[:4]]
        rows.append([name, mesh_text, f"{mem / MIB:,.1f}", *cells])
        print(f"  ep: {name} compiled", flush=True)
    table = records.table(
        f"moe_tiny train step compiled on 8 fake CPU devices (batch {batch} x {seq}, {config.model.dtype}): XLA "
        "memory per device and collectives as ops / MiB of results in the compiled program (scan bodies once)",
        ["case", "mesh", "MiB/device", *(f"{c} ops / MiB" for c in COLLECTIVES[:4])], rows)
    return table, results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (>= 5 for a record)")
    ap.add_argument("--steps", type=int, default=2, help="train steps per variant per round (section step)")
    ap.add_argument("--pause", type=float, default=0.5, help="seconds between variants")
    ap.add_argument("--name", default="moe_cpu", help="record name")
    ap.add_argument("--records-dir", default=str(records.RECORDS), help="where the JSON record goes")
    args = ap.parse_args(argv)
    sections = records.comma_list(ap, "--sections", args.sections, SECTIONS)
    if args.rounds < 1 or args.steps < 1:
        ap.error(f"--rounds={args.rounds} and --steps={args.steps} must be >= 1")
    tables, results = [], {}
    for section in sections:
        print(f"## {section}", flush=True)
        table, raw = {"dispatch": dispatch_section, "step": step_section, "ep": ep_section}[section](args)
        records.print_table(table)
        tables.append(table)
        results[section] = raw
    method = ("Mixture-of-experts layers (models/moe.py) on this CPU, one process. `dispatch`: one MoE block "
              "forward + backward, float32, jitted; the grouped matmul as jax.lax.ragged_dot (which XLA:CPU lowers "
              "to a dense masked matmul) or as each expert's rows padded to whole blocks and one batched einsum; "
              "capacity 1.25 drops over-capacity assignments per sequence. `step`: the jitted train step of tiny "
              "and moe_tiny (the same active parameters per token), one device. `ep`: moe_tiny's step compiled "
              "for 8 fake devices, memory from XLA's memory_analysis() and collective bytes from the compiled "
              "HLO text.")
    records.write_record(args.name, title="Mixture of experts on CPU", tables=tables, method=method,
                         params=vars(args), results=results, directory=pathlib.Path(args.records_dir))


if __name__ == "__main__":
    main()
