"""Per-device memory of a training step, planned from abstract shapes (nothing is allocated).

    plan = plan_memory(config, num_devices=64)        # the config's mesh, strategy and rules
    plan.total, plan.fits(95 * GIB), max_micro_batch(config, 95 * GIB, num_devices=64)

What is counted, per device, for one jitted train step (`train.state.make_train_step`, the state
donated as train/pretrain.py does, so the new state reuses the old one's buffers):

  params       every parameter, divided by the sizes of the mesh axes its dimensions are sharded
               over: each parameter's logical axes (`models.transformer.logical_axes`) through the
               config's rules and `models.sharding.logical_to_spec`, with its divisibility fallback.
               Exact: equal to `addressable_shards[0].data.nbytes` summed over the real arrays.
  grads        one gradient per parameter, same dtype and sharding (param_dtype). With
               `train.microbatches > 1`, plus the float32 accumulator.
  opt_state    the config's optimizer state (`jax.eval_shape` of the real optax transform: AdamW /
               LAMB two moments, Lion and SGD one, Adafactor factored rows and columns), leaves
               shaped like a parameter sharded like it, the rest replicated (as
               `train.state.state_shardings` does). Exact. With `offload_optimizer`
               (`train.offload_optimizer`) it lives in host memory between steps (`host_bytes`)
               and comes to the device only for the update, once the activations are dead.
  batch        the step's input arrays (5 int32/float32 [B, T], all micro-batches).
  saved        what the backward pass keeps: JAX's own list of residuals of the loss's VJP (the
               forward pass under the remat policy, the final norm, the lm head's input, the
               float32 logits), traced abstractly (`jax.make_jaxpr` of `jax.vjp`) at one
               device's shapes: batch = the micro-batch (sequences per device); heads, kv heads,
               mlp and vocab divided by the tensor sharding the rules give them (Megatron style,
               the residual stream whole); the sequence split over the `sequence` axis by
               tracing under an abstract mesh of that size (ring attention keeps what it really
               keeps). Residuals that are the parameters or the batch are not counted again.
               The layer scan's stacked outputs are the per-layer part (x layers per device),
               the rest is counted once. Two traces (micro-batch 1 and 2; every term is linear
               in it) of a 2-layer model per remat policy; long blockwise sequences are traced
               at 256 tokens and scaled (every residual there is per token).
  transient    the backward pass's peak working set on top of that, the larger of
               - the logits phase: the float32 gradient of the logits [B, T, V] (next to the
                 saved logits), plus under FSDP the all-gathered lm head (compute dtype) and
                 its unsharded gradient (param dtype, in the dead logits' room when smaller);
               - one layer's backward: the residuals that layer would keep with no remat at all
                 (recomputed under `full` / `save_dots`; under `none` the same-sized gradients
                 of those intermediates), plus under FSDP the layer's all-gathered weights and
                 their unsharded gradient before the reduce-scatter.

total = params + grads + opt_state + batch + saved + transient
      (offloaded: params + grads + batch + max(saved + transient, optimizer state)).

Attention keeps what its implementation keeps: the blockwise XLA path and the flash kernels
(pallas, cudnn) q, k, v, the output and the log-sum-exp (the per-block scores live only inside a
block); the plain masked path (sequences under 256 tokens or not a multiple of 64) keeps the
full [B, N, T, S] scores and probabilities; ring attention its per-block probabilities for every
ring step. The planner traces "xla" for "pallas" / "cudnn" (the same residuals).

Checked against `compiled.memory_analysis()` (argument + temp + unaliased output bytes) on CPU
in tests/train/test_plan.py (within 10%; arguments exact). Known limits: JAX's list is an upper
bound of what XLA keeps, tight for the blockwise / flash path; on the masked path with remat
`none` it also lists loop-invariant broadcast masks XLA never materialises (up to ~20% over at
T = 128). XLA's own fragmentation, collective buffers and the optimizer update's temporaries
are not modelled. Pipeline stages (`stage` > 1) are planned as the GPipe schedule of
models/pipeline.py runs: each device holds num_layers / stage layers and, for the backward pass,
their residuals for every one of the M + S - 1 ticks. benchmarks/memory.py reports the plan's
signed error against XLA's figure for every strategy (`pp_fsdp` included) and remat policy.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.extend.core import Literal
from jax.sharding import AbstractMesh, AxisType

from models.config import REMAT_POLICIES, ModelConfig
from models.sharding import MESH_AXES, logical_to_spec, use_rules
from models.transformer import abstract_model, layer_stacks, logical_axes, split_params
from train import mesh as mesh_lib
from train.loss import lm_loss_fn
from train.optimizer import make_optimizer

GIB = 2 ** 30
BATCH_KEYS = ("inputs_BT", "targets_BT", "positions_BT", "segment_ids_BT", "loss_mask_BT")


# --------------------------------------------------------------------------------------------
# Sharding arithmetic on an abstract mesh (any device count)


def abstract_mesh(shape: Mapping[str, int]) -> AbstractMesh:
    sizes = tuple(int(shape.get(a, 1)) for a in MESH_AXES)
    return AbstractMesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def shard_count(names, shape, mesh_shape: Mapping[str, int], rules) -> int:
    """How many pieces an array with logical `names` and `shape` is cut into on the mesh."""
    spec = logical_to_spec(names, shape, abstract_mesh(mesh_shape), rules)
    n = 1
    for entry in spec:
        for axis in (entry,) if isinstance(entry, str) else (entry or ()):
            n *= int(mesh_shape[axis])
    return n


def _nbytes(x) -> int:
    return math.prod(x.shape) * jnp.dtype(x.dtype).itemsize


def _per_device(tree, divisors) -> int:
    return sum(_nbytes(x) // d for x, d in zip(jax.tree.leaves(tree), jax.tree.leaves(divisors)))


@functools.lru_cache(maxsize=32)
def _param_layout(model_cfg: ModelConfig, mesh_key: tuple, rules: tuple):
    """(abstract params, divisor tree) for the parameters on a mesh given as sorted (axis, size)."""
    mesh_shape = dict(mesh_key)
    abstract = abstract_model(model_cfg)
    _, params = split_params(abstract)
    axes = logical_axes(abstract)
    divisors = jax.tree.map(lambda names, x: shard_count(names, x.shape, mesh_shape, rules), axes, params,
                            is_leaf=lambda t: isinstance(t, tuple))
    return params, divisors, axes


def state_bytes(model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh_shape: Mapping[str, int],
                rules) -> dict[str, int]:
    """Per-device bytes of the parameters and the optimizer state, exactly as sharded by
    `train.state.state_shardings` (optimizer leaves shaped like their parameter share its
    sharding; the rest, e.g. Adafactor's factored moments and step counts, are replicated)."""
    params, divisors, _ = _param_layout(model_cfg, tuple(sorted(mesh_shape.items())), tuple(rules))
    abs_opt = jax.eval_shape(tx.init, params)
    opt_div = optax.tree_map_params(tx, lambda leaf, d, p: d if getattr(leaf, "shape", None) == p.shape else 1,
                                    abs_opt, divisors, params, transform_non_params=lambda _: 1)
    opt = sum(_nbytes(x) // d for x, d in zip(jax.tree.leaves(abs_opt), jax.tree.leaves(opt_div)))
    return {"params": _per_device(params, divisors), "opt_state": opt,
            "param_count": sum(math.prod(x.shape) for x in jax.tree.leaves(params)),
            "param_count_per_device": sum(math.prod(x.shape) // d for x, d in
                                          zip(jax.tree.leaves(params), jax.tree.leaves(divisors)))}


def _gathered_bytes(model_cfg: ModelConfig, mesh_shape: Mapping[str, int], rules) -> dict[str, int]:
    """FSDP's transients, per device: one layer's weights (and the lm head's) as a matmul needs
    them, all-gathered over the mesh axes that also shard the batch or the sequence but still
    split over the rest (tensor), in the compute dtype (XLA casts before it gathers); and the
    unsharded gradient of each, in the parameter dtype, before its reduce-scatter. All 0 when
    no parameter is sharded over a batch axis."""
    params, _, axes = _param_layout(model_cfg, tuple(sorted(mesh_shape.items())), tuple(rules))
    table = dict(rules)
    gathered_axes = set(table.get("batch", ())) | set(table.get("length", ()))
    # expert weights stay split over their `experts` axes even where those also shard the batch
    # (fsdp_ep): tokens travel to them (all-to-all), they are not gathered
    kept_rules = tuple((name, mesh_axes if name == "experts" else tuple(a for a in mesh_axes if a not in gathered_axes))
                       for name, mesh_axes in rules)
    compute = jnp.dtype(model_cfg.dtype).itemsize

    def gathered(key, stacked):
        weights = grads = 0
        for names, x in zip(jax.tree.leaves(axes[key], is_leaf=lambda t: isinstance(t, tuple)),
                            jax.tree.leaves(params[key])):
            shape = x.shape[1:] if stacked else x.shape  # one layer (it lives on one pipeline stage)
            names = names[1:] if stacked else names
            stored = shard_count(names, shape, mesh_shape, rules)
            used = shard_count(names, shape, mesh_shape, kept_rules)
            if used < stored:
                n = math.prod(shape) // used
                weights += n * min(compute, jnp.dtype(x.dtype).itemsize)
                grads += n * jnp.dtype(x.dtype).itemsize
        return weights, grads

    # the largest layer of any stack (an MoE model's dense-MLP and MoE layers are stacked apart)
    layer_w, layer_g = max(gathered(name, True) for name in layer_stacks(model_cfg))
    head_w, head_g = gathered("embed" if model_cfg.tie_embeddings else "lm_head", False)
    return {"layer_weights": layer_w, "layer_grads": layer_g, "head_weights": head_w, "head_grads": head_g}


# --------------------------------------------------------------------------------------------
# Activations: JAX's own residuals, traced at one device's shapes


def _local_model_config(model_cfg: ModelConfig, mesh_shape, rules, num_layers: int, remat: str) -> ModelConfig:
    """The model as one device computes it: heads, kv heads, mlp and vocab divided by the tensor
    sharding the rules give them (Megatron style: the residual stream stays whole). MoE layers
    keep every expert (a device's share of the assignments is, balanced, what one device
    computes for its own tokens) with their hidden widths divided like the MLP's; the dense
    layers are dropped (`_layer_kinds` traces each kind of layer apart)."""
    def local(name, size):
        return size // shard_count((name,), (size,), mesh_shape, rules)

    n, k = local("heads", model_cfg.num_heads), local("kv_heads", model_cfg.num_kv_heads)
    if n % k:  # heads split but kv heads not: each device still groups its heads over some kv heads
        k = math.gcd(n, k)
    extra = {"pipeline_stages": 1} if hasattr(model_cfg, "pipeline_stages") else {}  # traced as a plain scan
    if model_cfg.moe.enabled:
        m = model_cfg.moe
        extra["moe"] = dataclasses.replace(
            m, first_dense_layers=0, dense_layers=(),
            expert_intermediate_size=local("mlp", model_cfg.expert_intermediate_size),
            shared_intermediate_size=local("mlp", m.shared_intermediate_size or model_cfg.expert_intermediate_size))
    return model_cfg.replace(num_heads=n, num_kv_heads=k, intermediate_size=local("mlp", model_cfg.intermediate_size),
                             vocab_size=local("vocab", model_cfg.vocab_size), num_layers=num_layers, remat=remat,
                             attention_impl="xla", layer_windows=model_cfg.layer_windows[:num_layers], **extra)


def residual_bytes(model_cfg: ModelConfig, batch: int, seq_len: int, *, sequence_shards: int = 1,
                   rules=None) -> tuple[int, int | None]:
    """(bytes outside the layers, bytes per layer) of the residuals the backward pass of the LM
    loss keeps: JAX's own list (what `jax.ad_checkpoint.print_saved_residuals` shows), the
    parameters and the batch excluded. Per-layer residuals are the stacked outputs of the layer
    scan (None if the jaxpr has no top-level scan over the layers).

    With `sequence_shards` > 1 the loss is traced under an abstract mesh of that many `sequence`
    devices (ring attention included) and the bytes are per device."""
    graphdef, params = split_params(abstract_model(model_cfg))
    i32 = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    batch_d = {k: i32 for k in BATCH_KEYS}
    batch_d["loss_mask_BT"] = jax.ShapeDtypeStruct((batch, seq_len), jnp.float32)
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32) if model_cfg.dropout_rate > 0 else None
    loss_fn = lm_loss_fn(graphdef)

    def vjp_residuals(params, batch_d, rng):
        return jax.vjp(lambda p: loss_fn(p, batch_d, rng)[0], params)[1]

    def trace():
        return jax.make_jaxpr(vjp_residuals, return_shape=True)(params, batch_d, rng)

    if sequence_shards > 1:
        mesh = AbstractMesh((sequence_shards,), ("sequence",), axis_types=(AxisType.Auto,))
        with jax.sharding.use_abstract_mesh(mesh), use_rules(rules):
            closed, out_shape = trace()
    else:
        closed, out_shape = trace()
    jaxpr = closed.jaxpr
    residuals = jaxpr.outvars[len(jaxpr.outvars) - len(jax.tree.leaves(out_shape)):]
    layer_scans = [e for e in jaxpr.eqns
                   if e.primitive.name == "scan" and e.params.get("length") == model_cfg.num_layers]
    stacked = {v for e in layer_scans[-1:] for v in e.outvars}
    inputs = set(jaxpr.invars)
    seen, fixed, per_layer = set(), 0, 0
    for v in residuals:
        if isinstance(v, Literal) or v in inputs or v in seen:
            continue
        seen.add(v)
        if v in stacked:
            per_layer += _nbytes(v.aval) // model_cfg.num_layers
        else:
            fixed += _nbytes(v.aval)
    if len(layer_scans) != 1:
        return fixed + per_layer * model_cfg.num_layers, None
    return fixed // sequence_shards, per_layer // sequence_shards


def _layer_kinds(model_cfg: ModelConfig, local_cfg: ModelConfig) -> list[tuple[int, ModelConfig]]:
    """(layers, the local config to trace one kind of layer with) per kind: one entry for a dense
    model; the dense-MLP layers (without MoE) and the MoE layers for an MoE model."""
    if not model_cfg.moe.enabled:
        return [(model_cfg.num_layers, local_cfg)]
    kinds = [(model_cfg.num_moe_layers, local_cfg)]
    dense = model_cfg.num_layers - model_cfg.num_moe_layers
    if dense:
        kinds.insert(0, (dense, local_cfg.replace(moe=dataclasses.replace(
            local_cfg.moe, num_experts=0))))
    return kinds


# Tracing cost grows with the number of attention blocks (the blockwise path is a Python loop),
# so long sequences are traced at this length and scaled: on the blockwise / flash path every
# residual is a per-token array (q, k, v, out, lse, the layer's activations, the logits).
TRACE_SEQ_LEN = 256


@functools.lru_cache(maxsize=256)
def _residual_fit(local_cfg: ModelConfig, seq_len: int, sequence_shards: int, rules: tuple):
    """Residual bytes as (fixed, per layer) pairs, each linear in the micro-batch b:
    ((f0, f1), (l0, l1)) with bytes(b) = f0 + f1 b outside the layers and l0 + l1 b per layer.
    Two traces of a 2-layer model (b = 1 and 2); four (1 and 2 layers) if the layer scan is
    not found in the jaxpr."""
    trace_len, scale = seq_len, 1.0
    if sequence_shards == 1 and seq_len > TRACE_SEQ_LEN and seq_len % TRACE_SEQ_LEN == 0:
        trace_len, scale = TRACE_SEQ_LEN, seq_len / TRACE_SEQ_LEN  # both lengths take the blockwise path

    def traced(layers, b):
        cfg = local_cfg.replace(num_layers=layers, layer_windows=local_cfg.layer_windows[:1] * layers)
        return residual_bytes(cfg, b, trace_len, sequence_shards=sequence_shards, rules=rules)

    fixed, per = {}, {}
    for b in (1, 2):
        fixed[b], per[b] = traced(2, b)
        if per[b] is None:  # by difference: 2 layers - 1 layer
            one = traced(1, b)[0]
            per[b] = fixed[b] - one
            fixed[b] = one - per[b]
    return ((2 * fixed[1] - fixed[2], int((fixed[2] - fixed[1]) * scale)),
            (2 * per[1] - per[2], int((per[2] - per[1]) * scale)))


# --------------------------------------------------------------------------------------------
# The plan


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-device bytes of one train step. `micro_batch` is sequences per device per
    forward/backward pass (global micro-batch / (data x fsdp))."""

    mesh_shape: dict
    micro_batch: int
    microbatches: int
    seq_len: int
    remat: str
    params: int
    grads: int
    opt_state: int
    batch: int
    saved: int
    transient: int
    offload_optimizer: bool = False
    host_bytes: int = 0
    notes: tuple = ()

    @property
    def activations(self) -> int:
        return self.saved + self.transient

    @property
    def total(self) -> int:
        # an offloaded optimizer state comes back to the device for the update (train/state.py),
        # after the backward pass, when the activations are dead
        return self.params + self.grads + self.opt_state + self.batch + max(self.activations, self.host_bytes)

    def fits(self, hbm_bytes: float) -> bool:
        return self.total <= hbm_bytes

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(activations=self.activations, total=self.total)
        return d


def resolve_mesh(config, num_devices: int, mesh_shape: Mapping[str, int] | None = None):
    """(mesh shape, rules) for the config on `num_devices`; `mesh_shape` (axis -> size, -1 allowed)
    replaces the config's shape and strategy."""
    model_cfg = ModelConfig.from_dict(config.model.to_dict())
    mesh_cfg = config.mesh.to_dict()
    if mesh_shape is not None:
        mesh_cfg = {**mesh_cfg, "shape": dict(mesh_shape), "strategy": ""}
    resolved = mesh_lib.resolve(mesh_cfg, num_devices, model_cfg, config.data.seq_len)
    return resolved["shape"], resolved["rules"]


def default_micro_batch(config, mesh_shape: Mapping[str, int], batch_shards: int | None = None) -> int:
    """Sequences per device per micro-batch from `train.batch_size` and `train.microbatches`
    (at least 1); the batch is split over `batch_shards` (default data x fsdp; a plan's
    `batch_shards` says what its rules give)."""
    shards = batch_shards or mesh_shape["data"] * mesh_shape["fsdp"]
    return max(config.train.batch_size // max(config.train.microbatches, 1) // shards, 1)


def make_planner(model_cfg: ModelConfig, tx: optax.GradientTransformation, *, mesh_shape: Mapping[str, int],
                 rules, seq_len: int, microbatches: int = 1, offload_optimizer: bool = False):
    """`plan(micro_batch) -> MemoryPlan` for explicit pieces; the state and the traces are done
    once (see the module docstring for what each term counts)."""
    mesh_shape = {a: int(mesh_shape.get(a, 1)) for a in MESH_AXES}
    rules = tuple((name, tuple(axes)) for name, axes in rules)
    microbatches = max(int(microbatches), 1)
    notes = []
    state = state_bytes(model_cfg, tx, mesh_shape, rules)
    params, opt = state["params"], state["opt_state"]
    grads = params
    if microbatches > 1:  # the float32 accumulator next to each micro-batch's gradient
        grads += state["param_count_per_device"] * 4
    host = 0
    if offload_optimizer:
        host, opt = opt, 0

    seq_shards = shard_count(("length",), (seq_len,), mesh_shape, rules)
    t_local = seq_len // seq_shards
    # GPipe over the `stage` axis (models/pipeline.py; the stage count comes from the mesh): each
    # device runs L/S layers on M micro-batches of the batch, and its backward pass keeps the
    # residuals of all M + S - 1 ticks (idle ticks compute on a copy of a micro-batch)
    stages = mesh_shape["stage"]
    if model_cfg.num_layers % stages:
        raise ValueError(f"model.num_layers={model_cfg.num_layers} is not divisible by the {stages} pipeline stages")
    layers = model_cfg.num_layers // stages
    if stages > 1 and model_cfg.moe.enabled:
        raise ValueError(f"pipeline stages (mesh stage={stages}) are not supported with MoE layers "
                         f"(model.moe.num_experts={model_cfg.moe.num_experts})")
    pipe_mb = 1
    if stages > 1:
        pipe_mb = getattr(model_cfg, "pipeline_microbatches", 0) or 2 * stages
        notes.append(f"pipeline: {layers} layers per stage, {pipe_mb} micro-batches, {pipe_mb + stages - 1} ticks "
                     f"kept for the backward pass (GPipe bubble {(stages - 1) / (pipe_mb + stages - 1):.0%})")
    ticks = pipe_mb + stages - 1

    local_cfg = _local_model_config(model_cfg, mesh_shape, rules, 1, model_cfg.remat)
    # per kind of layer (dense, MoE): (layers per device, saved per layer (l0, l1), no-remat (n0, n1))
    kinds, fixed = [], None
    for count, kind_cfg in _layer_kinds(model_cfg, local_cfg):
        (f0, f1), per_layer = _residual_fit(kind_cfg, seq_len, seq_shards, rules)
        _, no_remat = _residual_fit(kind_cfg.replace(remat="none"), seq_len, seq_shards, rules)
        kinds.append((count // stages, per_layer, no_remat))
        fixed = fixed or (f0, f1)
    (f0, f1) = fixed
    g = _gathered_bytes(model_cfg, mesh_shape, rules)
    if model_cfg.moe.enabled:
        notes.append(f"MoE: {model_cfg.num_moe_layers} of {model_cfg.num_layers} layers, {model_cfg.moe.num_experts} "
                     f"experts ({model_cfg.moe.experts_per_token} per token); activations as one device routes its own "
                     f"tokens")
        table = dict(rules)
        ep = shard_count(("experts",), (model_cfg.moe.num_experts,), mesh_shape, rules)
        if ep > 1 and set(table.get("experts", ())) <= set(table.get("batch", ())):
            k = model_cfg.moe.experts_per_token
            factor = ep * min(k, model_cfg.moe.num_experts // ep) / k
            notes.append(f"expert parallel over {ep} devices: the all-to-all buffers (fixed size, {factor:g}x what a "
                         f"balanced router sends) are not counted; moe_tiny on expert=8 compiled to 1.6x its plan "
                         f"(benchmarks/moe.py)")

    def plan(micro_batch: int) -> MemoryPlan:
        b = int(micro_batch)
        if b < 1:
            raise ValueError(f"micro_batch={micro_batch} must be >= 1 (sequences per device)")
        if b % pipe_mb:  # as train/pretrain.py requires: each pipeline micro-batch splits over data x fsdp
            raise ValueError(f"micro_batch={micro_batch} sequences per device does not split into the {pipe_mb} "
                             f"pipeline micro-batches (model.pipeline_microbatches); use a multiple of {pipe_mb}")
        saved = (f0 + f1 * b) + sum(n * ticks * (l0 + l1 * b / pipe_mb) for n, (l0, l1), _ in kinds)
        # the logits phase: their float32 gradient next to the saved logits, and the gathered
        # head; the head's unsharded gradient comes once the logits are dead (it takes their room)
        logits = b * t_local * local_cfg.vocab_size * 4
        logits_phase = logits + g["head_weights"] + max(0, g["head_grads"] - logits)
        # one layer's backward: its intermediates (recomputed, or their same-sized gradients),
        # its gathered weights and their unsharded gradient
        layer_phase = max(n0 + n1 * b / pipe_mb for _, _, (n0, n1) in kinds) + g["layer_weights"] + g["layer_grads"]
        return MemoryPlan(mesh_shape=mesh_shape, micro_batch=b, microbatches=microbatches, seq_len=seq_len,
                          remat=model_cfg.remat, params=params, grads=grads, opt_state=opt,
                          batch=len(BATCH_KEYS) * 4 * b * microbatches * t_local, saved=int(saved),
                          transient=int(max(logits_phase, layer_phase)), offload_optimizer=offload_optimizer,
                          host_bytes=host, notes=tuple(notes))

    plan.granularity = pipe_mb  # micro-batches come in multiples of this (1 without a pipeline)
    plan.batch_shards = mesh_lib.batch_shards(mesh_shape, rules)  # the batch is split over this many devices
    return plan


def plan_step(model_cfg: ModelConfig, tx: optax.GradientTransformation, *, micro_batch: int, **kw) -> MemoryPlan:
    """One plan for explicit pieces: `make_planner(model_cfg, tx, **kw)(micro_batch)`."""
    return make_planner(model_cfg, tx, **kw)(micro_batch)


def largest_fitting(plan, hbm_bytes: float, limit: int = 1 << 16) -> int:
    """The largest micro-batch b with `plan(b).total <= hbm_bytes` (0 if the smallest does not
    fit); b runs over multiples of `plan.granularity` (the pipeline micro-batch count, else 1).
    The total grows with b, so a doubling then bisecting search."""
    g = getattr(plan, "granularity", 1)

    def fits(k):
        return plan(k * g).fits(hbm_bytes)

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi * g <= limit and fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * g


def config_planner(config, *, num_devices: int, mesh_shape: Mapping[str, int] | None = None,
                   remat: str | None = None, offload_optimizer: bool = False):
    """`make_planner` for a pretrain-style config (model, data.seq_len, train, optimizer, mesh);
    `mesh_shape` replaces the config's mesh shape and strategy, `remat` its policy."""
    model_cfg = ModelConfig.from_dict(config.model.to_dict())
    if remat is not None:
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat={remat!r} is not valid; expected one of {REMAT_POLICIES}")
        model_cfg = model_cfg.replace(remat=remat)
    shape, rules = resolve_mesh(config, num_devices, mesh_shape)
    tx, _ = make_optimizer(config.optimizer, max(int(config.train.steps), 1))
    offload_optimizer = offload_optimizer or bool(config.train.get("offload_optimizer", False))
    return make_planner(model_cfg, tx, mesh_shape=shape, rules=rules, seq_len=config.data.seq_len,
                        microbatches=config.train.microbatches, offload_optimizer=offload_optimizer)


def plan_memory(config, *, num_devices: int, micro_batch: int | None = None, **kw) -> MemoryPlan:
    """The plan of a config at `micro_batch` sequences per device (default: the config's
    batch_size / microbatches / (data x fsdp))."""
    plan = config_planner(config, num_devices=num_devices, **kw)
    if micro_batch is None:
        micro_batch = default_micro_batch(config, plan(plan.granularity).mesh_shape, plan.batch_shards)
    return plan(micro_batch)


def max_micro_batch(config, hbm_bytes: float, *, num_devices: int, **kw) -> int:
    """The largest micro-batch (sequences per device) of the config that fits in `hbm_bytes`."""
    return largest_fitting(config_planner(config, num_devices=num_devices, **kw), hbm_bytes)
