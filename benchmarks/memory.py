"""The memory planner (train/memory.py) against XLA's compiled memory, and its figures at pod scale.

    .venv/bin/python benchmarks/memory.py                                  # both sections
    .venv/bin/python benchmarks/memory.py --sections=accuracy --presets=tiny --strategies=fsdp,tp

Section `accuracy`: for each preset, parallelism strategy (`1dev`: one device; the others
resolved by `train.mesh.resolve` on 8 fake CPU devices) and remat policy (`none`, `full`,
`save_dots`), the jitted train step (AdamW, the state donated as train/pretrain.py does) is
lowered and compiled from abstract shapes (nothing allocated, nothing run), and XLA's per-device
memory (`memory_analysis()`: arguments + temporaries + outputs not aliased to an argument) is set
beside the planner's prediction for the same step. The error is signed: (planned - compiled) /
compiled. A negative error is an under-prediction, the dangerous direction (the planner says a
batch fits that does not).

Section `scale`: the planner's per-device figures for the `1b` and `llama3_8b` presets (their
own sequence length and optimizer) on a v5p-64-like machine (64 devices, 95 GiB each) and an
8 x H100-like one (8 devices, 80 GiB), per strategy and remat policy, with the largest
micro-batch that fits. No timing: one run is the record.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)  # before anything touches a device

import jax.numpy as jnp  # noqa: E402

from benchmarks import records  # noqa: E402
from benchmarks.records import xla_bytes  # noqa: E402
from configs import pretrain  # noqa: E402
from models.config import REMAT_POLICIES, ModelConfig  # noqa: E402
from models.sharding import use_rules  # noqa: E402
from models.transformer import abstract_model, split_params  # noqa: E402
from train import memory  # noqa: E402
from train import mesh as mesh_lib  # noqa: E402
from train.loss import lm_loss_fn  # noqa: E402
from train.optimizer import make_optimizer  # noqa: E402
from train.state import abstract_state, make_train_step, state_shardings  # noqa: E402

GIB = 2 ** 30
MIB = 2 ** 20
SINGLE = "1dev"
MACHINES = (("v5p-64", 64, 95.0), ("8xH100", 8, 80.0))


def mesh_text(shape) -> str:
    return " x ".join(f"{a}={s}" for a, s in shape.items() if s > 1) or "1 device"


def strategy_case(model_cfg: ModelConfig, strategy: str, batch_size: int, seq_len: int):
    """(model config, mesh shape, rules, mesh, per-device micro-batch) of a strategy as a run
    resolves it: `1dev` is one device with batch_size / 8 sequences; the others use 8 devices;
    pipeline stages get as many GPipe micro-batches (<= 2 x stages) as keep each split over
    data x fsdp (train/pretrain.py requires it)."""
    if strategy == SINGLE:
        shape = mesh_lib.resolve_shape({}, 1)
        return model_cfg, shape, mesh_lib.merge_rules(()), \
            mesh_lib.make_mesh(shape, devices=jax.devices()[:1]), max(batch_size // 8, 1)
    n = jax.device_count()
    resolved = mesh_lib.resolve({"shape": mesh_lib.DEFAULT_SHAPE, "strategy": strategy, "rules": ()}, n, model_cfg,
                                seq_len)
    shape, rules = resolved["shape"], resolved["rules"]
    shards = mesh_lib.batch_shards(shape, rules)  # data x fsdp (x expert under fsdp_ep)
    if batch_size % shards:
        raise ValueError(f"batch {batch_size} does not split over the {shards} batch shards")
    if shape["stage"] > 1:
        s = shape["stage"]
        m = max(k for k in range(1, 2 * s + 1) if batch_size % (k * shards) == 0)
        model_cfg = model_cfg.replace(pipeline_stages=s, pipeline_microbatches=m)
    return model_cfg, shape, rules, mesh_lib.make_mesh(shape), batch_size // shards


def compiled_memory(model_cfg: ModelConfig, tx, mesh, rules, batch_size: int, seq_len: int):
    """XLA's memory analysis of the donated train step, compiled from abstract shapes."""
    with jax.set_mesh(mesh), use_rules(rules):
        sh = state_shardings(model_cfg, tx, mesh, rules)
        graphdef, _ = split_params(abstract_model(model_cfg))
        bsh = mesh_lib.batch_sharding(mesh, (batch_size, seq_len), rules)
        batch = {k: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.float32 if k == "loss_mask_BT" else jnp.int32,
                                         sharding=bsh) for k in memory.BATCH_KEYS}
        step = jax.jit(make_train_step(lm_loss_fn(graphdef), tx), in_shardings=(sh, bsh), out_shardings=(sh, None),
                       donate_argnums=(0,))
        return step.lower(abstract_state(model_cfg, tx, sh), batch).compile().memory_analysis()


def accuracy_case(preset: str, strategy: str, remat: str, batch_size: int) -> dict:
    config = pretrain.get_config(preset)
    seq = config.data.seq_len
    model_cfg = ModelConfig.from_dict({**config.model.to_dict(), "remat": remat})
    model_cfg, shape, rules, mesh, micro = strategy_case(model_cfg, strategy, batch_size, seq)
    tx, _ = make_optimizer(config.optimizer, 1000)
    plan = memory.plan_step(model_cfg, tx, mesh_shape=shape, rules=rules, seq_len=seq, micro_batch=micro)
    global_batch = micro * mesh_lib.batch_shards(shape, rules)
    m = compiled_memory(model_cfg, tx, mesh, rules, global_batch, seq)
    xla = xla_bytes(m)
    return {"mesh": mesh_text(shape), "micro_batch": micro, "global_batch": global_batch, "seq_len": seq,
            "dtype": model_cfg.dtype, "xla": {k: getattr(m, k) for k in (
                "argument_size_in_bytes", "temp_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes")},
            "xla_bytes": xla, "plan": plan.as_dict(), "plan_bytes": plan.total, "signed_error": plan.total / xla - 1}


def accuracy(args) -> tuple[list[dict], dict]:
    rows, raw = [], {}
    for preset in args.presets.split(","):
        for strategy in args.strategies.split(","):
            for remat in args.remats.split(","):
                key = f"{preset}/{strategy}/{remat}"
                try:
                    r = accuracy_case(preset, strategy, remat, args.batch)
                except Exception as e:  # report the case and go on with the others
                    text = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
                    raw[key] = {"error": f"{type(e).__name__}: {text}"}
                    rows.append([preset, strategy, "", remat, f"error: {type(e).__name__}: {text}", "", "", ""])
                    print(f"  {key}: error: {type(e).__name__}: {text}", flush=True)
                    continue
                raw[key] = r
                x, p = r["xla"], r["plan"]
                rows.append([preset, strategy, r["mesh"], remat,
                             f"{r['xla_bytes'] / MIB:,.1f} ({x['argument_size_in_bytes'] / MIB:,.1f} + "
                             f"{x['temp_size_in_bytes'] / MIB:,.1f})",
                             f"{r['plan_bytes'] / MIB:,.1f} ({(p['params'] + p['grads'] + p['opt_state']) / MIB:,.1f}"
                             f" + {(p['batch'] + p['activations']) / MIB:,.1f})",
                             f"{r['signed_error']:+.1%}", "under" if r["signed_error"] < 0 else ""])
                print(f"  {key}: {rows[-1][4]} MiB compiled, {rows[-1][5]} planned, {rows[-1][6]}", flush=True)
    errs = [r["signed_error"] for r in raw.values() if "signed_error" in r]
    caption = (f"Planner vs XLA, per device (MiB): global batch {args.batch} on 8 fake CPU devices ({args.batch // 8} "
               "sequences on `1dev`), each preset's sequence length and bf16 compute; compiled = arguments + "
               "temporaries (+ unaliased outputs); planned = state (params + grads + optimizer) + the batch and "
               "activations; error = (planned − compiled) / compiled")
    if errs:
        caption += f"; error range {min(errs):+.1%} to {max(errs):+.1%} over {len(errs)} cases"
    return [records.table(caption, ["preset", "strategy", "mesh", "remat", "compiled MiB (args + temp)",
                                    "planned MiB (state + batch and activations)", "error", "direction"], rows)], raw


def scale(args) -> tuple[list[dict], dict]:
    rows, raw = [], {}
    for preset in ("1b", "llama3_8b"):
        config = pretrain.get_config(preset)
        for machine, devices, hbm in MACHINES:
            for strategy in ("fsdp", "fsdp_tp", "fsdp_sp", "pp_fsdp"):
                config.mesh.strategy = strategy
                for remat in ("full", "save_dots"):
                    key = f"{preset}/{machine}/{strategy}/{remat}"
                    try:
                        plan = memory.config_planner(config, num_devices=devices, remat=remat)
                        one = plan(plan.granularity)  # 1, or the pipeline's micro-batch count
                        best = memory.largest_fitting(plan, hbm * GIB)
                    except Exception as e:
                        rows.append([preset, machine, strategy, "", remat, f"error: {e}", "", "", "", ""])
                        raw[key] = {"error": str(e)}
                        continue
                    state = one.params + one.grads + one.opt_state
                    raw[key] = {"plan_at_min": one.as_dict(), "max_micro_batch": best}
                    rows.append([preset, f"{machine} ({devices} x {hbm:g} GiB)", strategy, mesh_text(one.mesh_shape),
                                 remat, f"{state / GIB:.2f}", f"{one.activations / GIB:.2f}", f"{one.total / GIB:.2f}",
                                 best, f"{best * config.data.seq_len:,}"])
    caption = ("Planner at scale, per device: state = params + grads + optimizer (AdamW, f32); activations and total "
               "at the smallest micro-batch (1 sequence per device, or one per pipeline micro-batch, M = 2S); max "
               "micro-batch = sequences per device that fit")
    return [records.table(caption, ["preset", "machine", "strategy", "mesh", "remat", "state GiB", "act. GiB @min",
                                    "total GiB @min", "max micro-batch", "tokens / device"], rows)], raw


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="accuracy,scale", help="accuracy, scale or both")
    ap.add_argument("--presets", default="tiny,small", help="presets of the accuracy section")
    ap.add_argument("--strategies", default=",".join((SINGLE, *mesh_lib.STRATEGIES)),
                    help=f"{SINGLE} (one device) and/or {mesh_lib.STRATEGIES}")
    ap.add_argument("--remats", default=",".join(REMAT_POLICIES))
    ap.add_argument("--batch", type=int, default=16, help="global batch in sequences on 8 devices (a multiple of 8)")
    ap.add_argument("--name", default="memory", help="record name")
    ap.add_argument("--records-dir", default=str(records.RECORDS), help="where the JSON record goes")
    args = ap.parse_args(argv)
    sections = records.comma_list(ap, "--sections", args.sections, ("accuracy", "scale"))
    records.comma_list(ap, "--remats", args.remats, REMAT_POLICIES)
    records.comma_list(ap, "--strategies", args.strategies, (SINGLE, *mesh_lib.STRATEGIES))
    if args.batch < 8 or args.batch % 8:
        ap.error(f"--batch={args.batch} must be a positive multiple of 8 (the fake devices)")
    tables, results = [], {}
    for s in sections:
        t, raw = {"accuracy": accuracy, "scale": scale}[s](args)
        tables += t
        results[s] = raw
    for t in tables:
        records.print_table(t)
    method = ("The planner (`train.memory.plan_step` / `config_planner`) counts parameters, gradients, optimizer "
              "state, the batch, the residuals the backward pass keeps (traced abstractly under the remat policy) "
              "and the backward pass's peak working set. `accuracy` compiles the real donated train step "
              "(`train.state.make_train_step`, AdamW, global-norm clip) from abstract shapes for each preset, "
              "strategy and remat policy, on 8 fake CPU devices (`jax_num_cpu_devices`), and compares the "
              "prediction with XLA's `memory_analysis()`; errors are signed, negative = under-prediction. XLA's "
              "fragmentation and collective buffers are not modelled; on a GPU or TPU the compiler's own figures "
              "differ. `scale` is the planner alone (no compilation) at pod scale.")
    records.write_record(args.name, title="Memory planner vs XLA's compiled memory", tables=tables, method=method,
                         params=vars(args), results=results, directory=pathlib.Path(args.records_dir))


if __name__ == "__main__":
    main()
