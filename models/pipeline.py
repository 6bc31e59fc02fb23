"""Pipeline parallelism over the mesh's `stage` axis: a GPipe schedule over a per-layer body.

The L stacked layers split into S stages of L/S consecutive layers ([L, ...] -> [S, L/S, ...];
parameters are stored with their `layers` axis sharded over `stage`, so the split is local and
stage s holds layers s*L/S .. (s+1)*L/S - 1). The batch splits into M micro-batches. Each tick
every stage runs its L/S layers on the micro-batch it holds, then hands the result to the next
stage (a roll along the stage dimension: one collective-permute between neighbouring stages,
which also brings the last stage's result, micro-batch t - (S-1), to stage 0 as an output);
stage 0 takes the next micro-batch. M + S - 1 ticks run all micro-batches through; the backward pass is autodiff of the
same loop, so it runs the ticks in reverse (GPipe: all forwards, then all backwards).

The stages are written SPMD-style, as in GSPMD / praxis / MaxText: one program `vmap`ped over
the stage dimension with `spmd_axis_name="stage"`, so every sharding constraint inside a layer
also shards that dimension over `stage`, and the other mesh axes (fsdp, data, tensor) keep
sharding each stage's parameters and micro-batch as they do without a pipeline. With no mesh
(or a mesh whose `stage` axis is 1) the same loop runs the stages one after another on the same
devices: the result is identical, which is how the tests check it.

Idle slots (stage s before tick s, or after its last micro-batch) compute on a copy of a real
micro-batch and their results are dropped, so they cost time, never correctness: the bubble.
GPipe's bubble fraction is (S-1) / (M+S-1) of every stage's time.

Memory: the backward pass keeps, per stage and tick, what the layer's remat policy saves
(`ModelConfig.remat`, applied per layer inside the stage): M + S - 1 micro-batches' worth of
L/S layers, i.e. about one full batch through the stage's own layers, as without a pipeline.
The pipeline's input and output ([B, T, D], batch-sharded) are replicated over `stage`, and
so is everything outside it (embedding, head, loss). With FSDP each tick gathers the stage's
weights again, layer by layer (M + S - 1 gathers per step instead of one).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from models.sharding import current_rules, logical_to_spec, use_rules

STAGE = "stage"


def num_microbatches(stages: int, microbatches: int = 0) -> int:
    """The micro-batch count a config asks for: `microbatches`, or 2 x stages when it is 0."""
    return microbatches if microbatches > 0 else 2 * stages


def bubble_fraction(stages: int, microbatches: int) -> float:
    """Share of each stage's time spent idle under GPipe: (S-1) / (M+S-1); 0 without a pipeline."""
    if stages < 1 or microbatches < 1:
        raise ValueError(f"bubble_fraction needs stages >= 1 and microbatches >= 1; got {stages}, {microbatches}")
    return (stages - 1) / (microbatches + stages - 1)


def split_microbatches(x, n: int):
    """[B, ...] -> [n, B/n, ...]: micro-batch m takes rows m, m+n, m+2n, ..., so each micro-batch
    keeps the batch's data/fsdp sharding (every shard holds rows of every micro-batch) rather
    than living on a few devices. Used by GPipe here and by gradient accumulation (train/state.py)."""
    b = x.shape[0]
    if b % n:
        raise ValueError(f"batch size {b} is not divisible by {n} micro-batches")
    return jnp.swapaxes(x.reshape(b // n, n, *x.shape[1:]), 0, 1)


def merge_microbatches(x):
    """[n, B/n, ...] -> [B, ...], the inverse of `split_microbatches`."""
    return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _stage_mesh(stages: int):
    """The current mesh if it has a `stage` axis > 1 (then checked against `stages`), else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or STAGE not in mesh.axis_names or mesh.shape[STAGE] == 1:
        return None
    if stages % mesh.shape[STAGE]:
        raise ValueError(f"model.pipeline_stages={stages} must be a multiple of the mesh's stage axis "
                         f"({mesh.shape[STAGE]}); set it to {mesh.shape[STAGE]}")
    return mesh


def _rules_without_stage(rules):
    """Inside a stage the `stage` mesh axis belongs to the stage dimension: no logical name may use it."""
    return tuple((name, tuple(a for a in axes if a != STAGE)) for name, axes in rules)


def _constrain_stages(x, mesh, second=P.UNCONSTRAINED):
    """Shards dim 0 (stages) over `stage`, dim 1 as `second`, and leaves the rest to propagation."""
    if mesh is None:
        return x
    rest = (second,) + (P.UNCONSTRAINED,) * (x.ndim - 2) if x.ndim > 1 else ()
    return jax.lax.with_sharding_constraint(x, P(STAGE, *rest))


def gpipe(layer_fn: Callable, x, layer_xs, batch_xs=None, *, stages: int, microbatches: int):
    """Runs `x` through L layers as a GPipe pipeline of `stages` stages and `microbatches`
    micro-batches; the same function as scanning `layer_fn` over the layers on the whole batch.

    layer_fn(x_b, layer_x, batch_x_b, microbatch) -> x_b: one layer on one micro-batch;
      `layer_x` is layer l's slice of `layer_xs`, `batch_x_b` the micro-batch's rows of
      `batch_xs`, `microbatch` its index (an int32 scalar: fold it into dropout keys).
    x: [B, ...] the activations entering the first layer.
    layer_xs: pytree whose leaves are [L, ...] (parameters, layer indices, per-layer windows).
    batch_xs: pytree whose leaves are [B, ...] (positions, segment ids), travelling with x.
    Returns [B, ...], the activations after the last layer.
    """
    leaves = jax.tree.leaves(layer_xs)
    if not leaves:
        raise ValueError("gpipe needs at least one per-layer array in layer_xs")
    n_layers, b = leaves[0].shape[0], x.shape[0]
    s, m = stages, microbatches
    if s < 1 or n_layers % s:
        raise ValueError(f"{n_layers} layers do not split into {s} pipeline stages; use a divisor of {n_layers}")
    if m < 1 or b % m:
        raise ValueError(f"batch size {b} is not divisible by {m} pipeline micro-batches "
                         f"(model.pipeline_microbatches; 0 means 2 x stages = {2 * s})")
    mesh = _stage_mesh(s)
    per_stage = n_layers // s

    # [L, ...] -> [S, L/S, ...]: local when the layers axis is stored sharded over `stage`
    stage_xs = jax.tree.map(lambda a: _constrain_stages(a.reshape(s, per_stage, *a.shape[1:]), mesh, None),
                            layer_xs)

    with use_rules(_rules_without_stage(current_rules())):
        batch_spec = logical_to_spec(("batch",), (b // m,), mesh)[0] if mesh is not None else None

        def to_stage_state(a):
            return _constrain_stages(a, mesh, batch_spec)

        inputs = {"x": split_microbatches(x, m), "batch": jax.tree.map(lambda a: split_microbatches(a, m), batch_xs),
                  "microbatch": jnp.arange(m, dtype=jnp.int32)}
        # Stage 0's feed, one micro-batch per tick; the S-1 drain ticks repeat the last micro-batch
        # (real data keeps idle slots finite, so their zero cotangents give exactly zero gradients).
        feed = jax.tree.map(lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], s - 1, axis=0)]), inputs)
        state = jax.tree.map(lambda a: to_stage_state(jnp.broadcast_to(a[:1], (s,) + a.shape[1:])), inputs)

        def run_stage(stage_x, st):
            def body(h, layer_x):
                return layer_fn(h, layer_x, st["batch"], st["microbatch"]), None

            h, _ = jax.lax.scan(body, st["x"], stage_x)
            return {**st, "x": h}

        run_stages = jax.vmap(run_stage, spmd_axis_name=STAGE if mesh is not None else None)

        first = jnp.arange(s) == 0

        def tick(prev, feed_t):
            # stage i takes what stage i-1 produced on the previous tick (a collective-permute along
            # `stage`), stage 0 the next micro-batch; the roll also brings the last stage's result
            # to stage 0, where it leaves the pipeline
            rolled = jax.tree.map(lambda a: to_stage_state(jnp.roll(a, 1, axis=0)), prev)
            st = jax.tree.map(lambda r, f: to_stage_state(jnp.where(first.reshape((s,) + (1,) * f.ndim), f[None], r)),
                              rolled, feed_t)
            return jax.tree.map(to_stage_state, run_stages(stage_xs, st)), to_output(rolled["x"][0])

        def to_output(a):  # one micro-batch, replicated over `stage`
            if mesh is None:
                return a
            return jax.lax.with_sharding_constraint(a, P(batch_spec, *(P.UNCONSTRAINED,) * (a.ndim - 1)))

        last, done = jax.lax.scan(tick, state, feed)
        # tick t hands out micro-batch t - S (the last stage's result of tick t-1); the final tick's is M-1
        out = jnp.concatenate([done[s:], to_output(last["x"][s - 1])[None]])
    return merge_microbatches(out)

