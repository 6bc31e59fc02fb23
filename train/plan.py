"""Size a model before running it: parameters, FLOPs per token, and per-device memory.

    python -m train.plan --config=configs/pretrain.py:llama3_8b
    python -m train.plan --config=configs/pretrain.py:llama3_8b --mesh=fsdp=8,tensor=4 --hbm_gib=95
    python -m train.plan --config=configs/pretrain.py:1b --config.mesh.strategy=fsdp --devices=64 --hbm_gib=95

Builds the model abstractly (no memory), counts its parameters, checks the count against the
closed form in models/config.py, and prints FLOPs per token for the forward pass and training.
Then plans one train step's per-device memory (train/memory.py): parameters, gradients,
optimizer state and activations for each remat policy, on the config's mesh (`--mesh` replaces
its shape and strategy; `--devices` plans for a device count this machine does not have), and
with `--hbm_gib` whether it fits and the largest micro-batch (sequences per device) that does.
"""

from __future__ import annotations

import math
import sys

import jax
from absl import app
from ml_collections import config_flags

from configs.cli import parse_flags
from models.config import REMAT_POLICIES, ModelConfig, active_param_count, flops_per_token, param_count
from models.sharding import MESH_AXES
from models.transformer import abstract_model, split_params
from train import memory

GIB = memory.GIB


def summarize(model_cfg: ModelConfig, seq_len: int | None = None) -> dict:
    """Parameter count (built abstractly) and FLOPs per token of a model config."""
    _, abs_params = split_params(abstract_model(model_cfg))
    counted = sum(math.prod(x.shape) for x in jax.tree.leaves(abs_params))
    expected = param_count(model_cfg)
    if counted != expected:
        raise AssertionError(f"built model has {counted:,} parameters, closed form says {expected:,}")
    embedding = model_cfg.vocab_size * model_cfg.hidden_size
    if model_cfg.position_embedding == "learned":
        embedding += model_cfg.max_seq_len * model_cfg.hidden_size
    flops = flops_per_token(model_cfg, seq_len)
    return {"parameters": counted, "non_embedding_parameters": counted - embedding,
            "active_parameters": active_param_count(model_cfg),
            "param_bytes": counted * model_cfg.params_dtype.itemsize,
            "forward_flops_per_token": flops["forward"], "train_flops_per_token": flops["train"],
            "seq_len": seq_len or model_cfg.max_seq_len}


def parse_mesh(text: str) -> dict[str, int]:
    """'fsdp=8,tensor=4' -> {'fsdp': 8, 'tensor': 4} (axes not named keep their defaults)."""
    shape = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        axis, eq, size = part.partition("=")
        axis = axis.strip()
        if not eq or axis not in MESH_AXES:
            raise ValueError(f"--mesh={text!r}: {part!r} is not axis=size with an axis in {MESH_AXES}")
        try:
            shape[axis] = int(size)
        except ValueError:
            raise ValueError(f"--mesh={text!r}: size {size.strip()!r} of {axis!r} is not an integer") from None
        if shape[axis] == 0 or shape[axis] < -1:
            raise ValueError(f"--mesh={text!r}: size of {axis!r} must be positive or -1")
    if not shape:
        raise ValueError(f"--mesh={text!r} names no axis; e.g. --mesh=fsdp=8,tensor=4")
    return shape


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def _mesh_text(shape) -> str:
    used = {a: s for a, s in shape.items() if s > 1}
    return " x ".join(f"{a}={s}" for a, s in used.items()) or "1 device"


def report(config, *, num_devices: int, mesh_shape=None, hbm_gib: float | None = None,
           micro_batch: int | None = None, offload_optimizer: bool = False) -> str:
    """The memory section of the program's output."""
    config_remat = config.model.remat
    planners = {r: memory.config_planner(config, num_devices=num_devices, mesh_shape=mesh_shape, remat=r,
                                         offload_optimizer=offload_optimizer) for r in REMAT_POLICIES}
    first = planners[config_remat](planners[config_remat].granularity)
    shape = first.mesh_shape
    shards = planners[config_remat].batch_shards
    mb = micro_batch if micro_batch is not None else memory.default_micro_batch(config, shape, shards)
    p = planners[config_remat](mb)
    hbm = None if hbm_gib is None else hbm_gib * GIB
    lines = [
        f"mesh              {_mesh_text(shape)} ({num_devices} devices)",
        f"micro-batch       {mb} sequences x {config.data.seq_len} tokens per device "
        f"(global {mb * shards} x {p.microbatches} micro-batches; train.batch_size={config.train.batch_size})",
        f"optimizer         {config.optimizer.name}, state in {config.model.param_dtype}"
        + (" (offloaded to host)" if offload_optimizer else ""),
        "",
        f"per-device memory, remat={config_remat}  (GiB)",
        f"  parameters             {_gib(p.params):>9}",
        f"  gradients              {_gib(p.grads):>9}",
        f"  optimizer state        {_gib(p.opt_state):>9}"
        + (f"   (+{_gib(p.host_bytes)} on host)" if offload_optimizer else ""),
        f"  batch                  {_gib(p.batch):>9}",
        f"  activations, saved     {_gib(p.saved):>9}   (what the backward pass keeps)",
        f"  activations, transient {_gib(p.transient):>9}   (backward working set: logits or one layer)",
        f"  total                  {_gib(p.total):>9}",
    ]
    lines += [f"  note: {n}" for n in p.notes]
    if hbm is not None:
        verdict = "fits" if p.fits(hbm) else "does not fit"
        lines.append(f"verdict           {verdict} in {hbm_gib:g} GiB at micro-batch {mb}; "
                     f"max micro-batch {memory.largest_fitting(planners[config_remat], hbm)} sequences per device")
    lines += ["", f"by remat policy (micro-batch {mb})", "  remat        activations      total" +
              ("   fits   max micro-batch" if hbm is not None else "")]
    for r, plan in planners.items():
        q = plan(mb)
        row = f"  {r + (' *' if r == config_remat else ''):<11} {_gib(q.activations):>12} {_gib(q.total):>10}"
        if hbm is not None:
            row += f"   {'yes' if q.fits(hbm) else 'no':<5} {memory.largest_fitting(plan, hbm):>16}"
        lines.append(row)
    return "\n".join(lines)


def main(argv):
    del argv
    from configs.cli import quiet_library_logs

    quiet_library_logs()  # e.g. "Unable to initialize backend 'tpu'"
    config = _CONFIG.value
    model_cfg = ModelConfig.from_dict(config.model.to_dict())
    s = summarize(model_cfg, config.data.seq_len)
    print(f"preset            {config.name}")
    print(f"parameters        {s['parameters']:,} ({s['non_embedding_parameters']:,} non-embedding)")
    if model_cfg.moe.enabled:
        print(f"active / token    {s['active_parameters']:,} ({model_cfg.moe.experts_per_token} of "
              f"{model_cfg.moe.num_experts} experts in {model_cfg.num_moe_layers} of {model_cfg.num_layers} layers)")
    print(f"parameter memory  {s['param_bytes'] / 2**30:.2f} GiB ({model_cfg.param_dtype})")
    print(f"FLOPs / token     {s['forward_flops_per_token']:.4g} forward, {s['train_flops_per_token']:.4g} "
          f"train (seq_len {s['seq_len']})")
    try:
        mesh_shape = parse_mesh(_MESH.value) if _MESH.value else None
        devices = _DEVICES.value
        if devices is None:
            fixed = mesh_shape and -1 not in mesh_shape.values()
            devices = math.prod(mesh_shape.values()) if fixed else jax.device_count()
        print(report(config, num_devices=devices, mesh_shape=mesh_shape, hbm_gib=_HBM.value,
                     micro_batch=_MICRO_BATCH.value, offload_optimizer=_OFFLOAD.value))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    # flags are defined only when run as a program, so tests and other programs can import summarize()
    from absl import flags

    _CONFIG = config_flags.DEFINE_config_file("config", "configs/pretrain.py", "Experiment config (file:preset).")
    _MESH = flags.DEFINE_string("mesh", None, "Mesh shape to plan for, e.g. fsdp=8,tensor=4 (replaces "
                                "mesh.shape and mesh.strategy; one axis may be -1).")
    _DEVICES = flags.DEFINE_integer("devices", None, "Devices to plan for (default: the --mesh product, or the "
                                    "devices present).", lower_bound=1)
    _HBM = flags.DEFINE_float("hbm_gib", None, "Memory per device in GiB: prints whether the plan fits and the "
                              "largest micro-batch that does.", lower_bound=0.0)
    _MICRO_BATCH = flags.DEFINE_integer("micro_batch", None, "Sequences per device per micro-batch (default: "
                                        "train.batch_size / train.microbatches / (data x fsdp)).", lower_bound=1)
    _OFFLOAD = flags.DEFINE_bool("offload_optimizer", False, "Plan with the optimizer state in host memory.")

    def _valid_mesh(text):
        if text:
            parse_mesh(text)  # raises ValueError -> absl prints one line
        return True

    flags.register_validator("mesh", _valid_mesh)
    app.run(main, flags_parser=parse_flags)
